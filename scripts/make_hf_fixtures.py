"""Builds the tiny Hugging Face checkpoints under tests/fixtures/hf/ with transformers + torch (not in CI).

Each fixture directory holds what ``from_pretrained`` reads (config.json, model.safetensors in float32,
tokenizer files with a chat template) plus the references tests/test_convert.py checks without torch:

* ``reference_tokens.npy`` ``[2, 24]`` int32 and ``reference_logits.npy`` ``[2, 24, V]`` float32: the
  causal-LM logits transformers computes for those tokens;
* ``reference_chat.json``: dialogues with the ids ``apply_chat_template`` gives for each whole dialogue and
  for each round's prompt (``add_generation_prompt=True``);
* ``reference_sentencepiece.json`` (mistral): texts and their sentencepiece ids.

Fixtures: ``llama`` (GQA 4/2, untied, Llama-3.1 RoPE scaling, Llama-3 chat template, byte-level BPE),
``qwen2`` (QKV biases, tied embeddings, ChatML template with a default system prompt), ``mistral``
(sentencepiece ``tokenizer.model``, ChatML template).

Usage (in a separate environment: ``pip install torch transformers safetensors numpy sentencepiece``)::

    python scripts/make_hf_fixtures.py                      # (re)write tests/fixtures/hf/*
    python scripts/make_hf_fixtures.py --verify DIR NAME    # load an exported DIR in transformers and compare
                                                            # its logits with fixture NAME's references
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "hf")
SEQ_LEN = 24

TEXTS = [
    "The quick brown fox jumps over the lazy dog.", "Hello! How are you today?",
    "I am fine, thank you. And you?", "What is the capital of France? Paris is the capital.",
    "Let us count: one, two, three, four, five.", "Masks decide which tokens may see which others.",
    "A query block is bidirectional; the answer is causal.", "Please summarise the story in one line.",
    "Numbers like 42 and 3.14 appear in text too.", "Good morning, good evening, good night.",
]
DIALOGUES = [
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Hello! How are you?"},
     {"role": "assistant", "content": "Fine, thank you."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital."}],
    [{"role": "user", "content": "Count to three."},
     {"role": "assistant", "content": "one, two, three"},
     {"role": "user", "content": "Now five."},
     {"role": "user", "content": "Please."},
     {"role": "assistant", "content": "one, two, three, four, five."}],
]

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def bpe_tokenizer(specials: list[str], vocab_size: int):
  """A byte-level BPE ``tokenizers.Tokenizer`` trained on TEXTS, special tokens first."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS * 4, trainer)
  return tok


def save_fast_tokenizer(path: str, tok, template: str, **special) -> object:
  from transformers import PreTrainedTokenizerFast
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
  fast.chat_template = template
  fast.save_pretrained(path)
  return fast


def save_sentencepiece_tokenizer(path: str, template: str):
  """A sentencepiece ``tokenizer.model`` (Mistral-style ids 0 unk, 1 bos, 2 eos) with ChatML symbols."""
  import sentencepiece as spm
  buffer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(TEXTS * 4), model_writer=buffer, vocab_size=320, model_type="bpe",
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
      byte_fallback=True, hard_vocab_limit=False, normalization_rule_name="identity", minloglevel=2)
  with open(os.path.join(path, "tokenizer.model"), "wb") as f:
    f.write(buffer.getvalue())
  config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "add_bos_token": True, "chat_template": template}
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return spm.SentencePieceProcessor(model_proto=buffer.getvalue())


def reference_chat(fast) -> dict:
  """Ids of each whole dialogue and of each round's prompt, as transformers' chat templating gives them."""
  out = []
  for dialogue in DIALOGUES:
    prompts = [fast.apply_chat_template(dialogue[:k], tokenize=True, add_generation_prompt=True,
                                        return_dict=False)
               for k, message in enumerate(dialogue) if message["role"] == "assistant"]
    full = fast.apply_chat_template(dialogue, tokenize=True, return_dict=False)
    out.append({"messages": dialogue, "ids": list(map(int, full)),
                "prompt_ids": [list(map(int, p)) for p in prompts]})
  return {"dialogues": out}


def reference_logits(model, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.random.default_rng(0).integers(0, vocab_size, size=(2, SEQ_LEN)).astype(np.int32)
  with torch.no_grad():
    logits = model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
  return tokens, logits


def build(name: str, model, path: str) -> None:
  with torch.no_grad():  # norm scales and biases start constant; randomise them so their mapping is tested
    for key, param in model.named_parameters():
      if key.endswith("norm.weight"):
        param.normal_(1.0, 0.3)
      elif key.endswith("bias"):
        param.normal_(0.0, 0.5)
  model.eval()
  model.save_pretrained(path, safe_serialization=True)
  tokens, logits = reference_logits(model, model.config.vocab_size)
  np.save(os.path.join(path, "reference_tokens.npy"), tokens)
  np.save(os.path.join(path, "reference_logits.npy"), logits)
  print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters -> {path}")


def make_all() -> None:
  from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config
  from transformers import Qwen2ForCausalLM
  common = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                initializer_range=0.15, dtype=torch.float32)

  torch.manual_seed(0)
  path = os.path.join(ROOT, "llama")
  specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
              "<|eot_id|>"]
  fast = save_fast_tokenizer(path, bpe_tokenizer(specials, 300), LLAMA3_TEMPLATE,
                             bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
  config = LlamaConfig(**common, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=4,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 16})
  build("llama", LlamaForCausalLM(config), path)
  _write_json(os.path.join(path, "reference_chat.json"), reference_chat(fast))

  torch.manual_seed(1)
  path = os.path.join(ROOT, "qwen2")
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  fast = save_fast_tokenizer(path, bpe_tokenizer(specials, 300), CHATML_TEMPLATE, eos_token="<|im_end|>",
                             pad_token="<|endoftext|>")
  config = Qwen2Config(**common, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=None,
                       eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
  build("qwen2", Qwen2ForCausalLM(config), path)
  _write_json(os.path.join(path, "reference_chat.json"), reference_chat(fast))

  torch.manual_seed(2)
  path = os.path.join(ROOT, "mistral")
  os.makedirs(path, exist_ok=True)
  sp = save_sentencepiece_tokenizer(path, CHATML_TEMPLATE)
  config = MistralConfig(**{**common, "num_hidden_layers": 1}, head_dim=16, sliding_window=None,
                         rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
  build("mistral", MistralForCausalLM(config), path)
  ids = {"texts": TEXTS[:3], "ids": [sp.encode(t) for t in TEXTS[:3]]}
  _write_json(os.path.join(path, "reference_sentencepiece.json"), ids)


def _write_json(path: str, value) -> None:
  with open(path, "w") as f:
    json.dump(value, f)
    f.write("\n")


def verify(directory: str, name: str) -> None:
  """Loads an exported checkpoint with transformers and compares it with fixture ``name``'s references."""
  from transformers import AutoModelForCausalLM, AutoTokenizer
  model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  tokens = np.load(os.path.join(ROOT, name, "reference_tokens.npy"))
  expected = np.load(os.path.join(ROOT, name, "reference_logits.npy"))
  with torch.no_grad():
    logits = model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
  diff = float(np.abs(logits - expected).max())
  print(f"{directory} ({type(model).__name__}): max |logits - reference {name}| = {diff:.3g}")
  if os.path.exists(os.path.join(directory, "tokenizer_config.json")):
    tokenizer = AutoTokenizer.from_pretrained(directory)
    print(f"  tokenizer {type(tokenizer).__name__} loads; chat template: {bool(tokenizer.chat_template)}")
  if diff > 1e-4:
    sys.exit(1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--verify", nargs=2, metavar=("DIR", "NAME"))
  args = parser.parse_args()
  if args.verify:
    verify(*args.verify)
  else:
    make_all()


if __name__ == "__main__":
  main()
