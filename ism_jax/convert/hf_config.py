"""Hugging Face ``config.json`` of Llama / Qwen2 / Mistral ↔ :class:`ism_jax.ModelConfig`.

=========================  =============================  ==============================================
config.json                ModelConfig                    note
=========================  =============================  ==============================================
vocab_size                 vocab_size
hidden_size                embed_dim
intermediate_size          mlp_dim
num_hidden_layers          num_layers
num_attention_heads        num_heads
num_key_value_heads        num_kv_heads                   default num_attention_heads (no GQA)
head_dim                   head_dim                       default hidden_size // num_attention_heads
rms_norm_eps               norm_eps
rope_theta                 rope_theta                     or rope_parameters.rope_theta (transformers 5)
rope_scaling               rope_scaling                   "llama3" type only; or inside rope_parameters
tie_word_embeddings        tie_embeddings                 default false
(architecture)             qkv_bias                       true for Qwen2
=========================  =============================  ==============================================

Features the model does not implement raise :class:`HFConversionError` naming the field: another
``hidden_act`` than silu, Llama's ``attention_bias`` / ``mlp_bias``, other RoPE scaling types, and a sliding
window that is in use (Qwen2 ``use_sliding_window``, Mistral ``sliding_window``) unless
``ignore_sliding_window=True`` (exact only for sequences no longer than the window).
"""

from __future__ import annotations

import json
import os
from typing import Any

from ism_jax.model import ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
# ModelConfig fields that come from the checkpoint; the others (dtypes, mask, attention_impl, scan_layers,
# remat_policy, init_std) may be overridden at load time.
CHECKPOINT_FIELDS = ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "mlp_dim", "rope_theta", "rope_scaling", "norm_eps", "qkv_bias", "tie_embeddings")
CONFIG_FILE = "config.json"


class HFConversionError(ValueError):
  """A checkpoint cannot be converted; the message names the file, field or tensor and what to do."""


def read_hf_config(directory: str) -> dict[str, Any]:
  """The parsed ``config.json`` of a checkpoint directory."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; expected a Hugging Face checkpoint directory "
                            "(config.json + model.safetensors or sharded safetensors with an index)")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def architecture_of(hf: dict[str, Any], where: str = CONFIG_FILE) -> str:
  """The checkpoint's architecture (e.g. ``"LlamaForCausalLM"``); raises if it is not supported."""
  names = hf.get("architectures") or []
  if not names:
    by_type = {v: k for k, v in ARCHITECTURES.items()}
    if hf.get("model_type") in by_type:
      return by_type[hf["model_type"]]
    raise HFConversionError(f"{where}: no \"architectures\" and model_type={hf.get('model_type')!r}; "
                            f"supported: {sorted(ARCHITECTURES)}")
  if len(names) != 1 or names[0] not in ARCHITECTURES:
    raise HFConversionError(f"{where}: architectures={names} is not supported; "
                            f"supported: {sorted(ARCHITECTURES)}")
  return names[0]


def _required(hf: dict, field: str, where: str) -> Any:
  if hf.get(field) is None:
    raise HFConversionError(f"{where}: required field \"{field}\" is missing")
  return hf[field]


def _rope(hf: dict, where: str) -> tuple[float, tuple | None]:
  """``(rope_theta, rope_scaling)`` from either the transformers 4 or the transformers 5 layout."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or params
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind in (None, "default"):
    return theta, None
  if kind != "llama3":
    raise HFConversionError(f"{where}: {field} type {kind!r} is not supported (supported: default, llama3)")
  try:
    scale = (float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"]),
             int(scaling["original_max_position_embeddings"]))
  except KeyError as e:
    raise HFConversionError(f"{where}: {field} of type llama3 lacks {e.args[0]!r}") from None
  return theta, scale


def _check_unsupported(hf: dict, family: str, where: str, ignore_sliding_window: bool) -> None:
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise HFConversionError(f"{where}: hidden_act={act!r} is not supported (the MLP is SwiGLU with silu)")
  if family in ("llama", "mistral"):
    for field in ("attention_bias", "mlp_bias"):
      if hf.get(field):
        raise HFConversionError(f"{where}: {field}=true is not supported (no bias on o_proj or the MLP)")
  window = hf.get("sliding_window")
  if family == "qwen2":
    used = bool(hf.get("use_sliding_window")) and window is not None
  else:
    used = window is not None and window < hf.get("max_position_embeddings", float("inf"))
  if used and not ignore_sliding_window:
    raise HFConversionError(
        f"{where}: sliding_window={window} (attention limited to the last {window} tokens) is not supported; "
        "pass ignore_sliding_window=True to import anyway with full attention, which is exact for sequences "
        f"of at most {window} tokens"
    )


def model_config_from_hf(hf: dict[str, Any], where: str = CONFIG_FILE, *, ignore_sliding_window: bool = False,
                         **overrides) -> ModelConfig:
  """A :class:`ModelConfig` for a parsed ``config.json``.

  Args:
    hf: the parsed config.json.
    where: the file to name in errors.
    ignore_sliding_window: import a model whose config uses a sliding window with full attention.
    **overrides: ModelConfig fields not read from the checkpoint, e.g. ``compute_dtype="float32"``,
      ``scan_layers=True``, ``attention_impl="xla"``.
  """
  family = ARCHITECTURES[architecture_of(hf, where)]
  fixed = sorted(set(overrides) & set(CHECKPOINT_FIELDS))
  if fixed:
    raise HFConversionError(f"{where}: {fixed} come from the checkpoint and cannot be overridden")
  _check_unsupported(hf, family, where, ignore_sliding_window)
  heads = int(_required(hf, "num_attention_heads", where))
  hidden = int(_required(hf, "hidden_size", where))
  theta, scaling = _rope(hf, where)
  fields = dict(
      vocab_size=int(_required(hf, "vocab_size", where)),
      embed_dim=hidden,
      num_layers=int(_required(hf, "num_hidden_layers", where)),
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or hidden // heads),
      mlp_dim=int(_required(hf, "intermediate_size", where)),
      rope_theta=theta,
      rope_scaling=scaling,
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qkv_bias=family == "qwen2",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
  )
  return ModelConfig(**fields, **overrides)


def hf_config_from_model(config: ModelConfig, architecture: str, dtype: str = "float32",
                         base: dict[str, Any] | None = None) -> dict[str, Any]:
  """The ``config.json`` contents for exporting a model of ``config`` as ``architecture``.

  Fields of ``base`` (e.g. the imported checkpoint's config: token ids, max_position_embeddings) are kept
  unless they describe the architecture, which is always written from ``config``. RoPE is written in both the
  transformers 4 (``rope_theta``/``rope_scaling``) and 5 (``rope_parameters``) layouts.
  """
  if architecture not in ARCHITECTURES:
    raise HFConversionError(f"architecture {architecture!r} is not supported; "
                            f"supported: {sorted(ARCHITECTURES)}")
  family = ARCHITECTURES[architecture]
  if config.qkv_bias != (family == "qwen2"):
    raise HFConversionError(
        f"cannot export a model with qkv_bias={config.qkv_bias} as {architecture}: QKV biases exist in Qwen2 "
        "only; export as Qwen2ForCausalLM" + (" or LlamaForCausalLM" if not config.qkv_bias else "")
    )
  scaling = None
  if config.rope_scaling is not None:
    factor, low, high, original = config.rope_scaling
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": original}
  out = {k: v for k, v in (base or {}).items() if k not in ("rope_parameters", "rope_scaling", "dtype")}
  out.update(
      architectures=[architecture], model_type=family, vocab_size=config.vocab_size,
      hidden_size=config.embed_dim, intermediate_size=config.mlp_dim, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
      hidden_act="silu", rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, rope_scaling=scaling,
      rope_parameters={"rope_type": "default", **(scaling or {}), "rope_theta": config.rope_theta},
      tie_word_embeddings=config.tie_embeddings, torch_dtype=dtype,
  )
  out.setdefault("max_position_embeddings", 8192)
  if family == "qwen2":
    out.update(use_sliding_window=False, sliding_window=None)
  elif family == "mistral":
    out.update(sliding_window=None)
  else:
    out.update(attention_bias=False, mlp_bias=False)
  return out
