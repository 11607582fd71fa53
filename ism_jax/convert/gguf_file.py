"""Reading llama.cpp GGUF files: metadata, a Hugging Face view of the config, dequantized tensors.

A GGUF file is one header (key/value metadata, then a table of tensors: name, type, shape) followed by the
tensor data. llama.cpp's converters rename the Hugging Face tensors and, for the ``llama`` architecture,
permute the rows of the Q and K projections (each head's rotary pairs ``(i, i + Dh/2)`` become adjacent
rows ``(2i, 2i + 1)``, the layout of llama.cpp's RoPE). :class:`GGUFCheckpoint` undoes both, so it reads
like a Hugging Face checkpoint: :meth:`GGUFCheckpoint.names`, :meth:`~GGUFCheckpoint.shape` and
:meth:`~GGUFCheckpoint.get` speak Hugging Face tensor names and layouts (``[out, in]`` float32), which is what
:func:`ism_jax.convert.hf_weights.load_weights` consumes::

    GGUF tensor              HF tensor (model.layers.{i}. prefix)    note
    token_embd.weight        model.embed_tokens.weight
    blk.{i}.attn_norm        input_layernorm
    blk.{i}.attn_q / attn_k  self_attn.q_proj / k_proj                rows un-permuted (llama)
    blk.{i}.attn_v           self_attn.v_proj
    blk.{i}.attn_output      self_attn.o_proj
    blk.{i}.ffn_norm         post_attention_layernorm
    blk.{i}.ffn_gate/up/down mlp.gate_proj / up_proj / down_proj
    output_norm.weight       model.norm.weight
    output.weight            lm_head.weight                          absent when the embedding is tied

GGUF lists a tensor's dimensions innermost first (``ne = [in, out]``); the numpy view is ``[out, in]``, the
Hugging Face layout. Quantized types are dequantized one tensor at a time by the ``gguf`` package (from
llama.cpp), so at most one tensor is expanded in host memory while the rest stays memory-mapped.

Every check (architecture, tensor names, types, shapes, that the file is complete) runs when the file is
opened, before any tensor is read, so a bad file fails with nothing half-loaded.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from ism_jax.convert.hf_config import HFConversionError

# Tensor types this reader dequantizes (names of gguf.GGMLQuantizationType).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# GGUF architectures read, and the Hugging Face architecture each one is read as.
ARCHITECTURES = {"llama": "LlamaForCausalLM"}

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")


class GGUFFormatError(HFConversionError):
  """A GGUF file cannot be read or converted; the message names the file, the tensor or field and the type."""


def hf_name(gguf_name: str) -> str | None:
  """The Hugging Face name of a GGUF tensor name, or ``None`` when the model has no such parameter."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  match = _LAYER_TENSOR.fullmatch(gguf_name)
  if match and match.group(2) in _LAYER_NAMES:
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
  return None


def gguf_name(name: str) -> str:
  """The GGUF tensor name of a Hugging Face tensor name (the inverse of :func:`hf_name`)."""
  for ours, theirs in _GLOBAL_NAMES.items():
    if theirs == name:
      return ours
  match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
  for ours, theirs in _LAYER_NAMES.items():
    if match and theirs == match.group(2):
      return f"blk.{match.group(1)}.{ours}"
  return name


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation, head by head.

  ``weight`` is ``[num_heads * Dh, in]``. Within a head the GGUF file keeps each rotary pair next to each
  other, rows ``[x0, y0, x1, y1, ...]``; the model's "rotate half" RoPE wants
  ``[x0, x1, ..., y0, y1, ...]`` (pair ``i`` is rows ``i`` and ``i + Dh/2``). For ``Dh = 4``:
  GGUF ``[x0, y0, x1, y1]`` → ``[x0, x1, y0, y1]``.
  """
  rows = weight.shape[0]
  half = rows // num_heads // 2
  return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _open(path: str):
  """A ``gguf.GGUFReader`` of ``path``; any failure to parse it becomes a :class:`GGUFFormatError`."""
  try:
    import gguf  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading GGUF files needs the gguf package: pip install gguf") from e
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file {path} does not exist")
  try:
    return gguf.GGUFReader(path, "r")
  except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as e:
    size = os.path.getsize(path)
    raise GGUFFormatError(f"{path}: not a readable GGUF file ({size} bytes; {type(e).__name__}: {e}); the "
                          "file is truncated or corrupt, download or copy it again") from None


def read_metadata(path: str) -> dict[str, Any]:
  """Every metadata key of a GGUF file with its value (strings, numbers, lists); tensors are not read."""
  return {name: _field_value(field) for name, field in _open(path).fields.items()
          if not name.startswith("GGUF.")}


def is_gguf(path: str) -> bool:
  """Whether ``path`` is a file that starts with the GGUF magic."""
  if not os.path.isfile(path):
    return False
  with open(path, "rb") as f:
    return f.read(4) == b"GGUF"


def gguf_hf_config(path: str) -> dict[str, Any]:
  """The Hugging Face ``config.json`` dict equivalent to a GGUF file's metadata."""
  return GGUFCheckpoint(path).hf_config()


class GGUFCheckpoint:
  """A GGUF file of a supported architecture, read as a Hugging Face checkpoint (see the module docstring).

  Attributes:
    path: the file.
    directory: the same path (the attribute error messages of the shared loader name).
    metadata: every metadata key (``general.architecture``, ``llama.block_count``, ``tokenizer.ggml.*``,
      ...) with its value (strings, numbers, lists).
    architecture: the GGUF architecture, e.g. ``"llama"``.
  """

  def __init__(self, path: str):
    self.path = self.directory = path
    reader = _open(path)
    self.metadata = {name: _field_value(field) for name, field in reader.fields.items()
                     if not name.startswith("GGUF.")}
    self.architecture = self.metadata.get("general.architecture")
    if self.architecture not in ARCHITECTURES:
      raise GGUFFormatError(f"{path}: general.architecture={self.architecture!r} is not supported "
                            f"(supported: {sorted(ARCHITECTURES)}); the file holds another kind of model")
    self._tensors = {}
    unknown = []
    for tensor in reader.tensors:
      name = hf_name(tensor.name)
      if name is None:
        unknown.append(tensor.name)
      else:
        self._tensors[name] = tensor
    if unknown:
      shown = ", ".join(unknown[:6]) + (f" and {len(unknown) - 6} more" if len(unknown) > 6 else "")
      raise GGUFFormatError(f"{path}: tensors {shown} have no counterpart in the model (e.g. "
                            "rope_freqs.weight for Llama 3.1 RoPE scaling, which is not supported); "
                            "converting would lose them")
    self._check_types_and_extent(reader)
    self._num_heads = self._int("attention.head_count")
    self._num_kv_heads = self._int("attention.head_count_kv", self._num_heads)

  def _check_types_and_extent(self, reader) -> None:
    size = os.path.getsize(self.path)
    for tensor in reader.tensors:
      kind = tensor.tensor_type.name
      if kind not in SUPPORTED_TYPES:
        raise GGUFFormatError(f"{self.path}: tensor {tensor.name} has type {kind}, which is not supported "
                              f"(supported: {', '.join(SUPPORTED_TYPES)}); re-quantize the model to one of "
                              "them")
      if tensor.data_offset + tensor.n_bytes > size:
        end = tensor.data_offset + tensor.n_bytes
        raise GGUFFormatError(f"{self.path}: tensor {tensor.name} ({kind}) ends at byte {end} but the file "
                              f"has {size}; it is truncated")

  def _key(self, name: str) -> str:
    return f"{self.architecture}.{name}"

  def _int(self, name: str, default: int | None = None) -> int:
    value = self.metadata.get(self._key(name), default)
    if value is None:
      raise GGUFFormatError(f"{self.path}: required metadata {self._key(name)} is missing")
    if isinstance(value, list):
      raise GGUFFormatError(f"{self.path}: metadata {self._key(name)} differs per layer ({value[:4]}...), "
                            "which the model does not support")
    return int(value)

  def hf_config(self) -> dict[str, Any]:
    """The file's architecture as a Hugging Face ``config.json`` dict (token ids and context length too)."""
    scaling = self.metadata.get(self._key("rope.scaling.type"), "none")
    if scaling not in ("none", None):
      raise GGUFFormatError(f"{self.path}: {self._key('rope.scaling.type')}={scaling!r} is not supported "
                            "(only unscaled RoPE)")
    embed = self._tensors.get("model.embed_tokens.weight")
    if embed is None:
      raise GGUFFormatError(f"{self.path}: missing tensor token_embd.weight (the token embedding)")
    width, heads = self._int("embedding_length"), self._num_heads
    rope_dims = self._int("rope.dimension_count", width // heads)
    head_dim = self._int("attention.key_length", width // heads)
    if rope_dims != head_dim:
      raise GGUFFormatError(f"{self.path}: {self._key('rope.dimension_count')}={rope_dims} rotates part of a "
                            f"head of {head_dim}; partial rotary embeddings are not supported")
    config = {
        "architectures": [ARCHITECTURES[self.architecture]], "model_type": self.architecture,
        "vocab_size": int(embed.shape[1]), "hidden_size": width,
        "intermediate_size": self._int("feed_forward_length"), "num_hidden_layers": self._int("block_count"),
        "num_attention_heads": heads, "num_key_value_heads": self._num_kv_heads, "head_dim": head_dim,
        "rms_norm_eps": _float32(self.metadata.get(self._key("attention.layer_norm_rms_epsilon"), 1e-5)),
        "rope_theta": _float32(self.metadata.get(self._key("rope.freq_base"), 10_000.0)),
        "tie_word_embeddings": "lm_head.weight" not in self._tensors, "hidden_act": "silu",
        "max_position_embeddings": self._int("context_length", 8192),
    }
    for key, field in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                       ("padding_token_id", "pad_token_id")):
      if f"tokenizer.ggml.{key}" in self.metadata:
        config[field] = int(self.metadata[f"tokenizer.ggml.{key}"])
    return config

  # The reader interface of ism_jax.convert.hf_weights.load_weights (Hugging Face names and layouts).

  def names(self) -> list[str]:
    return sorted(self._tensors)

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def file_of(self, name: str) -> str:
    del name
    return self.path

  def label(self, name: str) -> str:
    """How errors name a tensor: its GGUF name, and its type when the file has it."""
    tensor = self._tensors.get(name)
    return f"{tensor.name} ({tensor.tensor_type.name})" if tensor is not None else gguf_name(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(self._tensors[name].shape))

  def get(self, name: str) -> np.ndarray:
    """One tensor dequantized to float32 in the Hugging Face layout (Q/K rows un-permuted)."""
    import gguf  # pylint: disable=import-outside-toplevel
    tensor = self._tensors[name]
    try:
      value = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(self.shape(name))
    except (ValueError, NotImplementedError) as e:
      raise GGUFFormatError(f"{self.path}: tensor {self.label(name)} could not be dequantized "
                            f"({e})") from None
    value = np.asarray(value, dtype=np.float32)
    if name.endswith("self_attn.q_proj.weight"):
      value = unpermute_rows(value, self._num_heads)
    elif name.endswith("self_attn.k_proj.weight"):
      value = unpermute_rows(value, self._num_kv_heads)
    return value

  def close(self) -> None:
    self._tensors.clear()

  def __enter__(self) -> "GGUFCheckpoint":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _float32(value) -> float:
  """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.9999997e-06)."""
  return float(str(np.float32(value)))


def _field_value(field) -> Any:
  """A metadata field as Python values (strings decoded, arrays as lists)."""
  value = field.contents()
  return value.tolist() if isinstance(value, np.ndarray) else value
