"""Hugging Face Llama / Qwen2 / Mistral safetensors ↔ :class:`ism_jax.Transformer` parameters.

Name and layout mapping (D embed, H query heads, K kv heads, Dh head dim, M mlp, V vocab; per layer ``i``
the HF names start with ``model.layers.{i}.``)::

    HF tensor                          HF shape    ours                       our shape
    model.embed_tokens.weight          [V, D]      embed                      [V, D]
    self_attn.q_proj.weight            [H*Dh, D]   blocks.i.attn.q_proj       [D, H, Dh]  transpose+reshape
    self_attn.k_proj.weight / v_proj   [K*Dh, D]   attn.k_proj / v_proj       [D, K, Dh]
    self_attn.q_proj.bias (Qwen2)      [H*Dh]      attn.q_bias                [H, Dh]     (k, v alike)
    self_attn.o_proj.weight            [D, H*Dh]   attn.o_proj                [H, Dh, D]
    mlp.gate_proj.weight / up_proj     [M, D]      mlp.gate_proj / up_proj    [D, M]
    mlp.down_proj.weight               [D, M]      mlp.down_proj              [M, D]
    input_layernorm.weight             [D]         attn_norm.scale            [D]
    post_attention_layernorm.weight    [D]         mlp_norm.scale             [D]
    model.norm.weight                  [D]         final_norm.scale           [D]
    lm_head.weight (absent when tied)  [V, D]      lm_head                    [D, V]

Both use RoPE in the "rotate half" layout, so q/k need no permutation. With ``scan_layers`` our block
parameters carry a leading layer axis ``[L, ...]``.

Memory: import reads one tensor at a time from memory-mapped files, converts it, and hands it to
``jax.make_array_from_callback`` with the parameter's ``NamedSharding`` (each device receives only its
slice; a stacked parameter is assembled layer by layer in one host buffer of its own size). Export gathers
one tensor (one layer of a stacked parameter) at a time and streams it into the file. Neither ever holds a
second copy of the model in host memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from ism_jax import sharding
from ism_jax.convert import gguf_file, gguf_tokenizer, hf_config
from ism_jax.convert.hf_config import HFConversionError
from ism_jax.convert.safetensors_io import CheckpointReader, TensorSpec, write_checkpoint
from ism_jax.model import ModelConfig, Transformer

_NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}
# Tensors some checkpoints carry that hold no parameters of the model (e.g. precomputed RoPE tables).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One parameter: our path (within a block for per-layer ones) and its HF name.

  ``kind`` is ``"linear"`` (ours ``[in..., out...]`` = HF ``[out, in]`` transposed, with ``num_in`` leading
  input dims), ``"flat"`` (HF keeps the same values flattened to 1-D) or ``"same"``.
  """

  path: tuple[str, ...]
  hf_name: str  # with "{i}" for the layer index of per-layer tensors
  kind: str
  num_in: int = 1

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf_name


def entries(config: ModelConfig) -> list[Entry]:
  """Every parameter of a model of ``config``, in checkpoint order."""
  if config.fused_projections:
    raise ValueError("fused_projections=True is a serving layout without a Hugging Face equivalent: convert "
                     "the unfused model (ism_jax.inference.rewrites.fuse_projections makes the serving "
                     "layout from it)")
  layer = "model.layers.{i}."
  out = [Entry(("embed",), "model.embed_tokens.weight", "same"),
         Entry(("attn_norm", "scale"), layer + "input_layernorm.weight", "flat")]
  for name in ("q", "k", "v"):
    out.append(Entry(("attn", f"{name}_proj"), layer + f"self_attn.{name}_proj.weight", "linear"))
    if config.qkv_bias:
      out.append(Entry(("attn", f"{name}_bias"), layer + f"self_attn.{name}_proj.bias", "flat"))
  out += [Entry(("attn", "o_proj"), layer + "self_attn.o_proj.weight", "linear", num_in=2),
          Entry(("mlp_norm", "scale"), layer + "post_attention_layernorm.weight", "flat")]
  out += [Entry(("mlp", n), layer + f"mlp.{n}.weight", "linear")
          for n in ("gate_proj", "up_proj", "down_proj")]
  out.append(Entry(("final_norm", "scale"), "model.norm.weight", "flat"))
  if not config.tie_embeddings:
    out.append(Entry(("lm_head",), "lm_head.weight", "linear"))
  return out


def hf_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape of our parameter shape (one layer's)."""
  if entry.kind == "linear":
    return (math.prod(shape[entry.num_in:]), math.prod(shape[:entry.num_in]))
  if entry.kind == "flat":
    return (math.prod(shape),)
  return tuple(shape)


def to_ours(entry: Entry, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """HF tensor → our layout of ``shape``."""
  return value.T.reshape(shape) if entry.kind == "linear" else value.reshape(shape)


def to_hf(entry: Entry, value: np.ndarray) -> np.ndarray:
  """Our parameter (one layer's) → HF layout."""
  target = hf_shape(entry, value.shape)
  return value.reshape(target[::-1]).T if entry.kind == "linear" else value.reshape(target)


def _names(entry: Entry, config: ModelConfig) -> list[str]:
  return [entry.hf_name.format(i=i) for i in range(config.num_layers)] if entry.per_layer else [entry.hf_name]


def _check_tensor_names(reader: CheckpointReader, config: ModelConfig) -> None:
  expected = {name for entry in entries(config) for name in _names(entry, config)}
  present = set(reader.names())
  missing = sorted(expected - present)
  if missing:
    missing = [reader.label(name) for name in missing]
    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    hint = " (the config says tie_word_embeddings=false)" if "lm_head.weight" in expected - present else ""
    raise HFConversionError(f"{reader.directory}: missing tensors {shown}{hint}; the checkpoint does not "
                            "match its config or is incomplete")
  ignorable = {"lm_head.weight"} if config.tie_embeddings else set()
  unexpected = sorted(n for n in present - expected
                      if n not in ignorable and not n.endswith(_IGNORED_SUFFIXES))
  if unexpected:
    unexpected = [reader.label(name) for name in unexpected]
    shown = ", ".join(unexpected[:8]) + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
    raise HFConversionError(f"{reader.directory}: unexpected tensors {shown} (in "
                            f"{reader.file_of(unexpected[0])}); the model has no parameters for them, so "
                            "they would be lost")


def _check_shape(reader: CheckpointReader, entry: Entry, name: str, shape: tuple[int, ...]) -> None:
  """Raises unless HF tensor ``name`` has the HF shape of our (one layer's) parameter ``shape``."""
  want = hf_shape(entry, shape)
  if reader.shape(name) != want:
    raise HFConversionError(f"{reader.file_of(name)}: tensor {reader.label(name)} has shape "
                            f"{list(reader.shape(name))}, but the config implies {list(want)}")


def _check_tensor_shapes(reader: CheckpointReader, config: ModelConfig, variables: dict) -> None:
  for entry in entries(config):
    for i, name in enumerate(_names(entry, config)):
      if not entry.per_layer:
        shape = variables[entry.path].shape
      elif config.scan_layers:
        shape = variables[("blocks",) + entry.path].shape[1:]
      else:
        shape = variables[("blocks", i) + entry.path].shape
      _check_shape(reader, entry, name, shape)


def _read_into(out: np.ndarray, reader: CheckpointReader, entry: Entry, name: str) -> np.ndarray:
  """Converts one HF tensor (shape checked by ``_check_tensor_shapes``) into the host array ``out``."""
  out[...] = to_ours(entry, reader.get(name), out.shape)
  return out


def _sharding_of(variable: nnx.Variable, mesh: Mesh | None):
  if mesh is None:
    return SingleDeviceSharding(jax.local_devices()[0])
  return NamedSharding(mesh, sharding.variable_spec(variable, mesh))


def _place(host: np.ndarray, variable: nnx.Variable, mesh: Mesh | None) -> jax.Array:
  """``host`` as a device array with the variable's sharding; each device gets only its slice."""
  return jax.make_array_from_callback(host.shape, _sharding_of(variable, mesh), lambda index: host[index])


def load_weights(directory: str, config: ModelConfig, mesh: Mesh | None = None) -> Transformer:
  """A :class:`Transformer` of ``config`` holding the weights of the checkpoint in ``directory``.

  Parameters are placed straight into their sharded layout on ``mesh`` (single device when ``None``).
  Raises :class:`HFConversionError` naming missing, unexpected or misshapen tensors.
  """
  with CheckpointReader(directory) as reader:
    return load_from_reader(reader, config, mesh)


def load_from_reader(reader, config: ModelConfig, mesh: Mesh | None = None) -> Transformer:
  """A :class:`Transformer` of ``config`` from any reader of Hugging Face tensor names and layouts.

  ``reader`` offers ``names()``, ``shape(name)``, ``get(name)`` (a numpy array in the HF layout),
  ``label(name)`` and ``file_of(name)`` (for errors) and ``directory``: a
  :class:`~ism_jax.convert.safetensors_io.CheckpointReader` or a
  :class:`~ism_jax.convert.gguf_file.GGUFCheckpoint`. Every tensor name and shape is checked before the
  first one is read, so a bad checkpoint raises with nothing placed on a device.
  """
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  variables = dict(nnx.to_flat_state(state))
  dtype = _NUMPY_DTYPES[config.param_dtype]
  _check_tensor_names(reader, config)
  _check_tensor_shapes(reader, config, variables)
  for entry in entries(config):
    if not entry.per_layer:
      variable = variables[entry.path]
      host = _read_into(np.empty(variable.shape, dtype), reader, entry, entry.hf_name)
      variable.set_value(_place(host, variable, mesh))
    elif config.scan_layers:
      variable = variables[("blocks",) + entry.path]
      host = np.empty(variable.shape, dtype)
      for i, name in enumerate(_names(entry, config)):
        _read_into(host[i], reader, entry, name)
      variable.set_value(_place(host, variable, mesh))
    else:
      for i, name in enumerate(_names(entry, config)):
        variable = variables[("blocks", i) + entry.path]
        host = _read_into(np.empty(variable.shape, dtype), reader, entry, name)
        variable.set_value(_place(host, variable, mesh))
    del host
  return nnx.merge(graphdef, state)


def load_hf_model(directory: str, mesh: Mesh | None = None, *, ignore_sliding_window: bool = False,
                  **model_overrides) -> tuple[ModelConfig, Transformer]:
  """Reads a Hugging Face Llama / Qwen2 / Mistral checkpoint directory.

  Args:
    directory: holds ``config.json`` and ``model.safetensors`` (or shards + ``model.safetensors.index.json``).
    mesh: a mesh from :func:`ism_jax.sharding.make_mesh`; parameters are created sharded on it.
    ignore_sliding_window: see :func:`ism_jax.convert.hf_config.model_config_from_hf`.
    **model_overrides: ModelConfig fields not stored in the checkpoint, e.g. ``scan_layers=True``,
      ``compute_dtype="bfloat16"``, ``remat_policy="dots"``, ``mask="ism"``.

  Returns:
    ``(config, model)``.
  """
  where = os.path.join(directory, hf_config.CONFIG_FILE)
  config = hf_config.model_config_from_hf(hf_config.read_hf_config(directory), where,
                                          ignore_sliding_window=ignore_sliding_window, **model_overrides)
  return config, load_weights(directory, config, mesh)


def _to_host(array: jax.Array) -> np.ndarray:
  if array.is_fully_addressable:
    return np.asarray(jax.device_get(array))
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _specs(model: Transformer, dtype: np.dtype) -> Iterator[TensorSpec]:
  config = model.config
  variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for entry in entries(config):
    names = _names(entry, config)
    if not entry.per_layer:
      layers = [(entry.hf_name, variables[entry.path], None)]
    elif config.scan_layers:
      layers = [(name, variables[("blocks",) + entry.path], i) for i, name in enumerate(names)]
    else:
      layers = [(name, variables[("blocks", i) + entry.path], None) for i, name in enumerate(names)]
    for name, variable, index in layers:
      shape = variable.shape if index is None else variable.shape[1:]

      def produce(entry=entry, variable=variable, index=index):
        value = variable[...] if index is None else variable[...][index]
        return to_hf(entry, _to_host(value))

      yield TensorSpec(name, hf_shape(entry, shape), dtype, produce)


def save_hf_model(model: Transformer, directory: str, *, architecture: str | None = None,
                  source: str | None = None, dtype: str = "float32",
                  max_shard_bytes: int = 5 * 10**9) -> list[str]:
  """Writes ``model`` as a Hugging Face checkpoint that ``transformers`` loads with ``from_pretrained``.

  Args:
    model: the model (any sharding; every process must call this on multi-host, process 0 writes).
    directory: output directory (created).
    architecture: ``"LlamaForCausalLM"``, ``"Qwen2ForCausalLM"`` or ``"MistralForCausalLM"``; default: that
      of ``source``, else Qwen2 when the model has QKV biases and Llama otherwise.
    source: the checkpoint the model was imported from, a Hugging Face directory or a ``.gguf`` file: its
      config fields (token ids, context length) are kept and its tokenizer files are copied (for a GGUF
      file, written as ``tokenizer.json`` + ``tokenizer_config.json``).
    dtype: stored dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    max_shard_bytes: larger checkpoints are split into files of at most this size plus an index.

  Returns:
    The weight file names written.
  """
  if dtype not in _NUMPY_DTYPES:
    raise ValueError(f"dtype={dtype!r} must be one of {tuple(_NUMPY_DTYPES)}")
  from_gguf = bool(source) and gguf_file.is_gguf(source)
  if from_gguf:
    base = gguf_file.gguf_hf_config(source)
  else:
    base = hf_config.read_hf_config(source) if source else None
  if architecture is None:
    if base is not None:
      architecture = hf_config.architecture_of(base, source if from_gguf else
                                               os.path.join(source, hf_config.CONFIG_FILE))
    else:
      architecture = "Qwen2ForCausalLM" if model.config.qkv_bias else "LlamaForCausalLM"
  config_json = hf_config.hf_config_from_model(model.config, architecture, dtype, base)
  specs = list(_specs(model, _NUMPY_DTYPES[dtype]))
  if jax.process_index() != 0:
    for spec in specs:  # take part in the gathers in the same order as process 0
      spec.produce()
    return []
  files = write_checkpoint(directory, specs, max_shard_bytes)
  with open(os.path.join(directory, hf_config.CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config_json, f, indent=2)
  if from_gguf:
    gguf_tokenizer.export_tokenizer(source, directory)
  elif source and os.path.realpath(source) != os.path.realpath(directory):
    for name in TOKENIZER_FILES:
      if os.path.exists(os.path.join(source, name)):
        shutil.copyfile(os.path.join(source, name), os.path.join(directory, name))
  return files
