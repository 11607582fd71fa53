"""A decoder-only transformer of the Llama / Qwen2 family in Flax NNX, with ISM, causal and prefix masks.

    model = Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(0))
    logits_BTV = model(tokens_BT, segment_types_BT)              # ISM mask, one dialogue per row
    logits_BTV = model(tokens_BT, segment_types_BT, segment_ids_BT, kind="causal")

Pieces: token embedding, RMSNorm, rotary position embedding (positions restart in every packed dialogue),
grouped-query attention with optional QKV bias, SwiGLU MLP, tied or untied output embedding. Parameters are
float32 and carry ``logical_axes`` metadata for :mod:`ism_jax.sharding`; compute runs in ``compute_dtype``.
Layers are either a list of blocks or one block with stacked parameters run under ``jax.lax.scan``, each
optionally rematerialised.

The mask is built once per call as :class:`ism_jax.masks.MaskRanges` (O(T)) and shared by every layer; the
attention implementation (dense XLA, chunked XLA, Pallas GPU/TPU kernels) is picked by
``ModelConfig.attention_impl``. :meth:`Transformer.forward` is the lower-level entry that also reads and
writes a KV cache for multi-turn inference.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from ism_jax import sharding
from ism_jax.attention import IMPLEMENTATIONS, attention
from ism_jax.attention.tiles import RESIDUAL_NAMES
from ism_jax.masks import (
    MASK_KINDS,
    MaskRanges,
    check_segment_arrays,
    default_segment_ids,
    make_attention_ranges,
    positions_from_segment_ids,
)

# "dots_attn": as "dots_no_batch", and the attention kernels' output and log-sum-exp are kept too, so the
# backward pass does not run the forward kernel again (ism_jax.attention.tiles.RESIDUAL_NAMES).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "dots_attn")
# Named model sizes for ModelConfig.preset: width, depth and heads (vocabulary, dtypes and the rest stay the
# config's own). Parameters with a 32k untied vocabulary: 1m 9M (1.0M with 2k tied), 250m 0.25B, 1b 0.98B,
# 3b 3.0B.
PRESETS = {
    "1m": dict(embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384),
    "250m": dict(embed_dim=1024, num_layers=16, num_heads=16, num_kv_heads=8, head_dim=64, mlp_dim=2816),
    "1b": dict(embed_dim=2048, num_layers=18, num_heads=16, num_kv_heads=8, head_dim=128, mlp_dim=5632),
    "3b": dict(embed_dim=3072, num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128, mlp_dim=8192),
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a :class:`Transformer`. Defaults give a small Llama-style model."""

  # Fields that change how the network runs but not its parameters: a checkpoint may be resumed or served
  # with other values of these.
  RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("attention_impl", "remat_policy", "compute_dtype")

  vocab_size: int = 32_000
  embed_dim: int = 512  # model width D
  num_layers: int = 8
  num_heads: int = 8  # query heads H
  num_kv_heads: int = 8  # key/value heads K (grouped-query attention when K < H)
  head_dim: int = 64
  mlp_dim: int = 1536  # SwiGLU hidden width
  rope_theta: float = 10_000.0
  # Llama-3.1 style RoPE frequency scaling: (factor, low_freq_factor, high_freq_factor, original_max_len).
  rope_scaling: tuple[float, float, float, int] | None = None
  norm_eps: float = 1e-6
  qkv_bias: bool = False  # Qwen2 uses biases on q, k, v
  tie_embeddings: bool = False  # output projection = embedding table transposed
  init_std: float = 0.02
  param_dtype: str = "float32"
  compute_dtype: str = "bfloat16"
  mask: str = "ism"  # default mask kind: "ism" | "causal" | "prefix"
  attention_impl: str = "auto"  # see ism_jax.attention.IMPLEMENTATIONS
  scan_layers: bool = False  # one stacked block under jax.lax.scan (faster compiles for deep models)
  # One q/k/v weight [D, K, H/K + 2, Dh] and one gate/up weight [D, 2, M] instead of five: fewer, larger
  # matmuls. Serving converts a trained model with fuse_projections; the Hugging Face converters refuse it.
  fused_projections: bool = False
  remat_policy: str = "none"  # "none" | "full" | "dots" | "dots_no_batch" | "dots_attn"

  def __post_init__(self):
    problems = []
    if self.num_heads % self.num_kv_heads:
      problems.append(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if self.rope_scaling is not None:
      object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))
      if len(self.rope_scaling) != 4 or not self.rope_scaling[1] < self.rope_scaling[2]:
        problems.append(f"rope_scaling={self.rope_scaling} must be (factor, low_freq_factor, "
                        "high_freq_factor, original_max_len) with low_freq_factor < high_freq_factor")
    if self.mask not in MASK_KINDS:
      problems.append(f"mask={self.mask!r} must be one of {MASK_KINDS}")
    if self.attention_impl not in IMPLEMENTATIONS:
      problems.append(f"attention_impl={self.attention_impl!r} must be one of {IMPLEMENTATIONS}")
    if self.remat_policy not in REMAT_POLICIES:
      problems.append(f"remat_policy={self.remat_policy!r} must be one of {REMAT_POLICIES}")
    for field in ("param_dtype", "compute_dtype"):
      if getattr(self, field) not in _DTYPES:
        problems.append(f"{field}={getattr(self, field)!r} must be one of {tuple(_DTYPES)}")
    sizes = ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim")
    for field in sizes:
      if getattr(self, field) <= 0:
        problems.append(f"{field}={getattr(self, field)} must be positive")
    if problems:
      raise ValueError("invalid ModelConfig: " + "; ".join(problems))

  @classmethod
  def from_dict(cls, values) -> "ModelConfig":
    """A config from a mapping (a run config's ``model`` section, saved JSON); unknown fields are refused."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
      raise ValueError(f"unknown model config fields {unknown}; valid fields of model: {', '.join(names)}")
    return cls(**dict(values))

  @classmethod
  def preset(cls, name: str, **overrides) -> "ModelConfig":
    """The named size of :data:`PRESETS` (``"1m"``, ``"250m"``, ``"1b"``, ``"3b"``) plus ``overrides``."""
    if name not in PRESETS:
      raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    return cls(**{**PRESETS[name], **overrides})

  @classmethod
  def tiny(cls, **overrides) -> "ModelConfig":
    """A few-thousand-parameter model for tests."""
    fields = dict(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  mlp_dim=64, compute_dtype="float32", attention_impl="xla")
    return cls(**{**fields, **overrides})

  @property
  def dtype(self):
    return _DTYPES[self.compute_dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]

  def num_params(self) -> int:
    """Parameter count (embedding included once when tied)."""
    d, h, k, hd, m = self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim
    attn = d * hd * (2 * h + 2 * k) + (hd * (h + 2 * k) if self.qkv_bias else 0)
    block = attn + 3 * d * m + 2 * d
    head = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_layers * block + d + head


def _param(rngs: nnx.Rngs, config: ModelConfig, shape, logical_axes, init=None) -> nnx.Param:
  init = init or jax.nn.initializers.normal(config.init_std)
  value = init(rngs.params(), shape, config.weight_dtype)
  return nnx.Param(value, logical_axes=logical_axes)


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm, computed in float32."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.scale = _param(rngs, config, (config.embed_dim,), ("act_embed",), jax.nn.initializers.ones)
    self.eps = config.norm_eps

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(x_BTD.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: tuple | None = None) -> jax.Array:
  """``[head_dim // 2]`` inverse frequencies ``theta ** (-2i / head_dim)``, optionally Llama-3.1 scaled.

  With ``scaling = (factor, low, high, original_len)``: wavelengths longer than ``original_len / low`` are
  stretched by ``factor``, those shorter than ``original_len / high`` are kept, and the band between is
  interpolated linearly in ``original_len / wavelength``.
  """
  half = head_dim // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if scaling is None:
    return inv_freq
  factor, low, high, original_len = scaling
  smooth = jnp.clip((original_len * inv_freq / (2 * jnp.pi) - low) / (high - low), 0.0, 1.0)
  return (1.0 - smooth) * inv_freq / factor + smooth * inv_freq


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array, theta: float, scaling: tuple | None = None
               ) -> jax.Array:
  """Rotary position embedding, "rotate half" layout (as in Hugging Face Llama/Qwen2)."""
  inv_freq = rope_frequencies(x_BTHD.shape[-1], theta, scaling)
  angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
  cos, sin = jnp.cos(angles_BTF)[:, :, None], jnp.sin(angles_BTF)[:, :, None]
  x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BTHD.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
  """Keys and values of one layer for every cache slot: ``[B, S, K, Dh]`` each (S = cache length)."""

  k: jax.Array
  v: jax.Array


def _write_rows(cache_BSKD: jax.Array, new_BTKD: jax.Array, start_B: jax.Array) -> jax.Array:
  """Writes ``new`` into every row of the cache at that row's own offset; slots past the end are dropped."""
  slots_T = jnp.arange(new_BTKD.shape[1], dtype=jnp.int32)
  write = lambda c, n, s: c.at[s + slots_T].set(n, mode="drop")
  return jax.vmap(write)(cache_BSKD, new_BTKD.astype(cache_BSKD.dtype), start_B)


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary embeddings and an optional KV cache.

  With ``config.fused_projections`` one weight ``qkv_proj [D, K, G + 2, Dh]`` (``G = H / K``) holds, per KV
  head, its ``G`` query heads, then its key and its value head; query head ``h`` is ``(h // G, h % G)``, the
  grouping attention uses, so tensor parallelism over ``kv_heads`` splits whole groups.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    d, h, k, hd = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim
    self.config = config
    if config.fused_projections:
      self.qkv_proj = _param(rngs, config, (d, k, h // k + 2, hd), ("embed", "kv_heads", None, "head_dim"))
      self.o_proj = _param(rngs, config, (h, hd, d), ("heads", "head_dim", "embed"))
      if config.qkv_bias:
        zeros = jax.nn.initializers.zeros
        self.qkv_bias = _param(rngs, config, (k, h // k + 2, hd), ("kv_heads", None, "head_dim"), zeros)
      return
    self.q_proj = _param(rngs, config, (d, h, hd), ("embed", "heads", "head_dim"))
    self.k_proj = _param(rngs, config, (d, k, hd), ("embed", "kv_heads", "head_dim"))
    self.v_proj = _param(rngs, config, (d, k, hd), ("embed", "kv_heads", "head_dim"))
    self.o_proj = _param(rngs, config, (h, hd, d), ("heads", "head_dim", "embed"))
    if config.qkv_bias:
      zeros = jax.nn.initializers.zeros
      self.q_bias = _param(rngs, config, (h, hd), ("heads", "head_dim"), zeros)
      self.k_bias = _param(rngs, config, (k, hd), ("kv_heads", "head_dim"), zeros)
      self.v_bias = _param(rngs, config, (k, hd), ("kv_heads", "head_dim"), zeros)

  def _project(self, x_BTD, name: str) -> jax.Array:
    dtype = self.config.dtype
    y = jnp.einsum("btd,dhk->bthk", x_BTD, getattr(self, f"{name}_proj")[...].astype(dtype))
    if self.config.qkv_bias:
      y = y + getattr(self, f"{name}_bias")[...].astype(dtype)
    return y

  def _project_qkv(self, x_BTD) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries ``[B, T, H, Dh]``, keys and values ``[B, T, K, Dh]``."""
    if not self.config.fused_projections:
      return self._project(x_BTD, "q"), self._project(x_BTD, "k"), self._project(x_BTD, "v")
    dtype = self.config.dtype
    y_BTKCD = jnp.einsum("btd,dkch->btkch", x_BTD, self.qkv_proj[...].astype(dtype))
    if self.config.qkv_bias:
      y_BTKCD = y_BTKCD + self.qkv_bias[...].astype(dtype)
    group = y_BTKCD.shape[3] - 2
    q_BTHD = y_BTKCD[:, :, :, :group].reshape(*x_BTD.shape[:2], -1, y_BTKCD.shape[-1])
    return q_BTHD, y_BTKCD[:, :, :, group], y_BTKCD[:, :, :, group + 1]

  def __call__(self, x_BTD, positions_BT, ranges: MaskRanges, cache: LayerCache | None = None,
               write_index_B: jax.Array | None = None):
    config = self.config
    q_BTHD, k_BTKD, v_BTKD = self._project_qkv(x_BTD)
    q_BTHD = apply_rope(q_BTHD, positions_BT, config.rope_theta, config.rope_scaling)
    k_BTKD = apply_rope(k_BTKD, positions_BT, config.rope_theta, config.rope_scaling)
    if cache is not None:
      cache = LayerCache(_write_rows(cache.k, k_BTKD, write_index_B),
                         _write_rows(cache.v, v_BTKD, write_index_B))
      k_BTKD, v_BTKD = cache.k.astype(q_BTHD.dtype), cache.v.astype(q_BTHD.dtype)
    out_BTHD = attention(q_BTHD, k_BTKD, v_BTKD, ranges, impl=config.attention_impl)
    out_BTD = jnp.einsum("bthk,hkd->btd", out_BTHD, self.o_proj[...].astype(config.dtype))
    return out_BTD, cache


class SwiGLU(nnx.Module):
  """``down(silu(gate(x)) * up(x))``; with ``config.fused_projections`` gate and up are one weight
  ``gate_up_proj [D, 2, M]``."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    d, m = config.embed_dim, config.mlp_dim
    self.config = config
    if config.fused_projections:
      self.gate_up_proj = _param(rngs, config, (d, 2, m), ("embed", None, "mlp"))
    else:
      self.gate_proj = _param(rngs, config, (d, m), ("embed", "mlp"))
      self.up_proj = _param(rngs, config, (d, m), ("embed", "mlp"))
    self.down_proj = _param(rngs, config, (m, d), ("mlp", "embed"))

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    dtype = self.config.dtype
    if self.config.fused_projections:
      y_BT2M = jnp.einsum("btd,dcm->btcm", x_BTD, self.gate_up_proj[...].astype(dtype))
      gate_BTM, up_BTM = y_BT2M[:, :, 0], y_BT2M[:, :, 1]
    else:
      gate_BTM = x_BTD @ self.gate_proj[...].astype(dtype)
      up_BTM = x_BTD @ self.up_proj[...].astype(dtype)
    hidden_BTM = sharding.constrain(jax.nn.silu(gate_BTM) * up_BTM, ("batch", "length", "mlp"))
    return hidden_BTM @ self.down_proj[...].astype(dtype)


class Block(nnx.Module):
  """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config, rngs=rngs)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config, rngs=rngs)
    self.mlp = SwiGLU(config, rngs=rngs)

  def __call__(self, x_BTD, positions_BT, ranges, cache=None, write_index_B=None):
    attn_out_BTD, cache = self.attn(self.attn_norm(x_BTD), positions_BT, ranges, cache, write_index_B)
    x_BTD = x_BTD + attn_out_BTD
    x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
    return sharding.constrain(x_BTD, ("batch", "length", "act_embed")), cache


def _remat(fn, policy: str):
  if policy == "none":
    return fn
  policies = {
      "full": None,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
      "dots_attn": jax.checkpoint_policies.save_from_both_policies(
          jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
          jax.checkpoint_policies.save_only_these_names(*RESIDUAL_NAMES)),
  }
  return jax.checkpoint(fn, policy=policies[policy], prevent_cse=False)


class Transformer(nnx.Module):
  """Decoder-only language model; see the module docstring."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = _param(rngs, config, (config.vocab_size, config.embed_dim), ("vocab", "embed"))
    if config.scan_layers:
      self.blocks = _stacked_blocks(config, rngs)
    else:
      self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config, rngs=rngs)
    if not config.tie_embeddings:
      self.lm_head = _param(rngs, config, (config.embed_dim, config.vocab_size), ("embed", "vocab"))

  def __call__(self, tokens, segment_types, segment_ids=None, positions=None, kind: str | None = None):
    """Logits ``[B, T, V]`` (float32) for a batch of (packed) dialogues.

    Args:
      tokens, segment_types: ``[B, T]`` int arrays (docs/DESIGN.md §2 data contract).
      segment_ids: ``[B, T]`` dialogue ids for packed rows (0 = padding); ``None``: one dialogue per row.
      positions: ``[B, T]`` position within each dialogue; derived from ``segment_ids`` when ``None``.
      kind: mask kind, default ``config.mask``.
    """
    return self.logits(self.final_hidden(tokens, segment_types, segment_ids, positions, kind))

  def final_hidden(self, tokens, segment_types, segment_ids=None, positions=None, kind: str | None = None):
    """The final-normed hidden states ``[B, T, D]`` (compute dtype) that :meth:`logits` projects; same
    arguments as :meth:`__call__`. A loss may project them in chunks instead of building ``[B, T, V]``."""
    check_segment_arrays(segment_types, segment_ids, tokens=tokens, positions=positions)
    kind = self.config.mask if kind is None else kind
    ranges = make_attention_ranges(segment_types, segment_ids, kind)
    if positions is None:
      ids = default_segment_ids(segment_types) if segment_ids is None else segment_ids
      positions = positions_from_segment_ids(ids)
    x_BTD, _ = self._trunk(tokens, positions, ranges)
    return self.final_norm(x_BTD)

  def forward(self, tokens_BT, positions_BT, ranges: MaskRanges, cache: list[LayerCache] | None = None,
              write_index_B: jax.Array | None = None, logits_at_BN: jax.Array | None = None):
    """The network on explicit positions and mask ranges, optionally through a KV cache.

    With ``cache`` (one :class:`LayerCache` per layer, or one with a leading layer axis when layers are
    scanned), the new keys/values of row ``b`` are written at slots ``write_index_B[b] + t`` (slots past the
    cache end are dropped) and the queries attend over the whole cache; ``ranges`` then index cache slots.
    ``logits_at_BN`` (indices into ``T``) computes logits only there, e.g. at the last token of a prefill
    chunk. Returns ``(logits_BTV, cache)``, or ``(logits_BNV, cache)`` with ``logits_at_BN``.
    """
    x_BTD, cache = self._trunk(tokens_BT, positions_BT, ranges, cache, write_index_B)
    if logits_at_BN is not None:
      x_BTD = jnp.take_along_axis(x_BTD, logits_at_BN[:, :, None], axis=1)
    return self.logits(self.final_norm(x_BTD)), cache

  def _trunk(self, tokens_BT, positions_BT, ranges: MaskRanges, cache=None, write_index_B=None):
    """Embedding and every block: ``(x_BTD, cache)`` before the final norm."""
    x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(self.config.dtype)
    x_BTD = sharding.constrain(x_BTD, ("batch", "length", "act_embed"))
    if self.config.scan_layers:
      return self._scan_blocks(x_BTD, positions_BT, ranges, cache, write_index_B)
    new_cache = []
    for i, block in enumerate(self.blocks):
      run = _remat(block.__call__, self.config.remat_policy)
      x_BTD, layer_cache = run(x_BTD, positions_BT, ranges, None if cache is None else cache[i],
                               write_index_B)
      new_cache.append(layer_cache)
    return x_BTD, None if cache is None else new_cache

  def output_head(self) -> jax.Array:
    """The output projection ``[D, V]`` in the parameter dtype (the embedding transposed when tied)."""
    return self.embed[...].T if self.config.tie_embeddings else self.lm_head[...]

  def logits(self, x_BTD: jax.Array) -> jax.Array:
    """Output projection of final hidden states to float32 vocabulary logits."""
    logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, self.output_head().astype(self.config.dtype),
                            preferred_element_type=jnp.float32)
    return sharding.constrain(logits_BTV, ("batch", "length", "vocab"))

  def _scan_blocks(self, x_BTD, positions_BT, ranges, cache, write_index_B):
    graphdef, state = nnx.split(self.blocks)

    def body(x, layer):
      layer_state, layer_cache = layer
      block = nnx.merge(graphdef, layer_state)
      return block(x, positions_BT, ranges, layer_cache, write_index_B)

    body = _remat(body, self.config.remat_policy)
    x_BTD, cache = jax.lax.scan(body, x_BTD, (state, cache))
    return x_BTD, cache


def _stacked_blocks(config: ModelConfig, rngs: nnx.Rngs) -> Block:
  """One :class:`Block` whose parameters have a leading ``layers`` axis of size ``num_layers``."""

  @nnx.split_rngs(splits=config.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0,
            transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"})
  def create(rngs: nnx.Rngs) -> Block:
    return Block(config, rngs=rngs)

  return create(rngs)
