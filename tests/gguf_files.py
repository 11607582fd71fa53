"""Writes small GGUF files the way llama.cpp's converter does, for the GGUF import tests.

:func:`write_gguf` takes a :class:`ism_jax.Transformer` (Llama layout), renames its tensors to GGUF names,
applies llama.cpp's Q/K row permutation, quantizes the matrices to the requested type with the ``gguf``
package, and adds a byte-level BPE tokenizer (the 256 byte symbols, a few merges, ChatML control tokens).
"""

from __future__ import annotations

import gguf
import numpy as np
from tokenizers.pre_tokenizers import ByteLevel

from ism_jax.convert import gguf_file
from ism_jax.convert.hf_weights import _specs

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]


def tokens() -> list[str]:
  """``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, the 256 byte symbols, then the merged pieces."""
  alphabet = sorted(ByteLevel.alphabet())
  return ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, *(m.replace(" ", "") for m in MERGES)]


def permute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's converter permutation (the inverse of ``gguf_file.unpermute_rows``)."""
  half = weight.shape[0] // num_heads // 2
  return weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(path: str, model, *, quant: str = "F32", arch: str = "llama", drop: tuple[str, ...] = (),
               raw_types: dict[str, np.dtype] | None = None, vocab_tokens: list[str] | None = None,
               pre: str = "smollm") -> None:
  """Writes ``model`` as a GGUF file.

  Args:
    quant: type of the 2-D weights (``"F32"``, ``"F16"``, ``"BF16"``, ``"Q8_0"``, ``"Q4_0"``, ``"Q4_1"``,
      ...); norms stay F32, as llama.cpp keeps them.
    arch: ``general.architecture``.
    drop: GGUF tensor names to leave out.
    raw_types: GGUF tensor name → numpy dtype to store it in unconverted (e.g. int32, an unsupported type).
    vocab_tokens: the tokenizer's tokens (default :func:`tokens`).
  """
  config = model.config
  writer = gguf.GGUFWriter(path, arch)
  writer.add_block_count(config.num_layers)
  writer.add_context_length(256)
  writer.add_embedding_length(config.embed_dim)
  writer.add_feed_forward_length(config.mlp_dim)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_layer_norm_rms_eps(config.norm_eps)
  writer.add_rope_dimension_count(config.head_dim)
  vocab = vocab_tokens or tokens()
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(vocab)
  writer.add_token_types([3 if t.startswith("<|") else 1 for t in vocab])
  writer.add_token_merges(MERGES)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_pad_token_id(2)
  writer.add_chat_template(CHATML)
  for spec in _specs(model, np.dtype(np.float32)):
    name = gguf_file.gguf_name(spec.name)
    if name in drop:
      continue
    value = np.ascontiguousarray(spec.produce(), dtype=np.float32)
    if name.endswith("attn_q.weight"):
      value = permute_rows(value, config.num_heads)
    elif name.endswith("attn_k.weight"):
      value = permute_rows(value, config.num_kv_heads)
    if raw_types and name in raw_types:
      writer.add_tensor(name, value.astype(raw_types[name]))
    elif value.ndim == 1 or quant == "F32":
      writer.add_tensor(name, value)
    elif quant == "F16":
      writer.add_tensor(name, value.astype(np.float16))
    else:
      qtype = gguf.GGMLQuantizationType[quant]
      writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
