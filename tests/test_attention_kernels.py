"""The block-sparse Pallas kernels equal the dense oracle, forward and gradients, on every mask layout.

On CPU the kernels run in Pallas interpret mode (GPU kernel: Mosaic GPU interpret mode; TPU kernel: TPU
interpret mode) in float32 on tiny shapes. The ``test_gpu_compiled_*`` tests run only where JAX sees a
GPU and check the compiled kernel in bf16 at realistic sizes; run them on a GPU machine with

    JAX_PLATFORMS=cuda python -m pytest -q tests/test_attention_kernels.py -k gpu_compiled

(docs/KERNELS.md records the last pass).
"""

from __future__ import annotations

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest

from ism_jax.attention import attention as dispatch_attention
from ism_jax.attention import pallas_gpu, pallas_tpu, resolve_impl, tiles
from ism_jax.attention.gpu_common import GpuTuning
from ism_jax.attention.xla import dense_attention
from ism_jax.masks import MaskRanges, chunk_ranges, make_attention_mask, make_attention_ranges
from tests import layouts

PAD, QUERY, ANSWER = layouts.PAD, layouts.QUERY, layouts.ANSWER
ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (see the module docstring)")

# Smallest tiles each kernel allows, so that tiny sequences still span many tiles.
GPU_TILES = GpuTuning(block_q=64, block_kv=64, stages=2, dq_block_q=64, dq_block_kv=64, dq_stages=2,
                      dkv_block_kv=64, dkv_block_q=64, dkv_stages=2)
TPU_TILES = pallas_tpu.TpuTuning(block_q=32, block_kv=32, dq_block_q=32, dq_block_kv=32, dkv_block_kv=32,
                                 dkv_block_q=32)


# ----------------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------------


def _runs(*runs) -> list[int]:
  """``_runs((QUERY, 3), (ANSWER, 2))`` -> ``[1, 1, 1, 2, 2]``."""
  return [kind for kind, count in runs for _ in range(count)]


def degenerate_layouts(length: int) -> tuple[np.ndarray, np.ndarray]:
  """``(types, ids)`` ``[5, length]``: one degenerate layout per row.

  0: all answers (ISM = causal); 1: one query block over the whole row; 2: one-token blocks
  ``q a q a ...``; 3: blocks of 37 and 29 tokens straddling every tile boundary, three dialogues, padding;
  4: a query block, then padding from the middle of a tile on.
  """
  straddle = _runs(*[(QUERY, 37), (ANSWER, 29)] * (length // 66 + 1))[:length - 11] + [PAD] * 11
  rows = [
      [ANSWER] * length,
      [QUERY] * length,
      [QUERY, ANSWER] * (length // 2),
      straddle,
      _runs((QUERY, length // 2 - 5), (ANSWER, 20)) + [PAD] * (length - length // 2 - 15),
  ]
  types = np.array(rows, np.int32)
  ids = (types != PAD).astype(np.int32)
  ids[3, 66:] = 2  # dialogue boundaries inside tiles
  ids[3, 132:] = 3
  ids[types == PAD] = 0
  return types, ids


def packed_layouts(seed: int, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  data = layouts.random_packed_batch(np.random.default_rng(seed), batch=batch, length=length, max_block=40)
  return data["segment_types"], data["segment_ids"]


def qkv(seed: int, batch: int, length: int, heads: int, kv_heads: int, dim: int, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, length, heads, dim), dtype)
  k = jax.random.normal(keys[1], (batch, length, kv_heads, dim), dtype)
  v = jax.random.normal(keys[2], (batch, length, kv_heads, dim), dtype)
  cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)
  return q, k, v, cotangent


def forward_and_grads(attend, q, k, v, ranges, cotangent):
  """``(out, (dq, dk, dv))`` of ``sum(attend(q, k, v, ranges) * cotangent)``."""

  def loss(q, k, v):
    out = attend(q, k, v, ranges)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def assert_matches_oracle(attend, types, ids, kind, *, heads, kv_heads, dim, atol, rtol=0.0, seed=0,
                          dtype=jnp.float32):
  """Forward and gradients of ``attend`` against the dense oracle computed in float32."""
  types, ids = jnp.asarray(types), jnp.asarray(ids)
  ranges = make_attention_ranges(types, ids, kind)
  q, k, v, cotangent = qkv(seed, *types.shape, heads, kv_heads, dim, dtype)
  out, grads = forward_and_grads(attend, q, k, v, ranges, cotangent)
  f32 = lambda x: x.astype(jnp.float32)
  want_out, want_grads = forward_and_grads(dense_attention, f32(q), f32(k), f32(v), ranges, cotangent)
  np.testing.assert_allclose(f32(out), want_out, atol=atol, rtol=rtol, err_msg="out")
  for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads):
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(f32(got), want, atol=atol * max(1.0, scale), rtol=rtol, err_msg=name)


# ----------------------------------------------------------------------------------------------------------
# Tile bounds
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ism", "prefix", "causal"])
def test_tile_bounds_classify_every_tile_like_the_dense_mask(kind):
  types, ids = packed_layouts(7, batch=3, length=96)
  d_types, d_ids = degenerate_layouts(96)
  types, ids = np.concatenate([types, d_types]), np.concatenate([ids, d_ids])
  ranges = make_attention_ranges(jnp.asarray(types), jnp.asarray(ids), kind)
  mask = np.asarray(make_attention_mask(jnp.asarray(types), jnp.asarray(ids), kind))
  for rows, cols in [(16, 8), (32, 32), (8, 16)]:
    for bounds, tile_mask in [
        (tiles.query_tile_bounds(ranges, q_tile=rows, k_tile=cols), mask),
        (tiles.key_tile_bounds(ranges, k_tile=rows, q_tile=cols), mask.transpose(0, 2, 1)),
    ]:
      blocks = tile_mask.reshape(len(types), 96 // rows, rows, 96 // cols, cols)
      any_visible, all_visible = blocks.any(axis=(2, 4)), blocks.all(axis=(2, 4))
      col = np.arange(96 // cols)
      start, full_start, full_end, end = (np.asarray(bounds)[..., i, None] for i in range(4))
      visited = (start <= col) & (col < end)
      unmasked = (full_start <= col) & (col < full_end)
      np.testing.assert_array_equal(visited, any_visible)
      np.testing.assert_array_equal(unmasked, all_visible)


def test_pad_ranges_adds_rows_that_see_only_themselves():
  ranges = make_attention_ranges(jnp.array([[QUERY, QUERY, ANSWER]]))
  padded = tiles.pad_ranges(ranges, 5)
  np.testing.assert_array_equal(padded.dense()[0, 3:], np.eye(5, dtype=bool)[3:])
  np.testing.assert_array_equal(padded.q_hi[0, 3:], [4, 5])


# ----------------------------------------------------------------------------------------------------------
# GPU kernel (Mosaic GPU) in interpret mode
# ----------------------------------------------------------------------------------------------------------


def gpu_interpret(q, k, v, ranges):
  return pallas_gpu.attention(q, k, v, ranges, tuning=GPU_TILES, interpret=True)


def test_gpu_kernel_interpret_degenerate_layouts():
  types, ids = degenerate_layouts(192)  # T = 192 pads to 256; D = 32 pads to 64
  assert_matches_oracle(gpu_interpret, types, ids, "ism", heads=2, kv_heads=1, dim=32, atol=2e-5)


@pytest.mark.parametrize("kind, batch, length", [("ism", 2, 256), ("prefix", 1, 128)])
def test_gpu_kernel_interpret_packed_gqa(kind, batch, length):
  types, ids = packed_layouts(1, batch=batch, length=length)
  assert_matches_oracle(gpu_interpret, types, ids, kind, heads=4, kv_heads=2, dim=64, atol=2e-5)


# ----------------------------------------------------------------------------------------------------------
# GPU kernel, forward-only path (query chunk over a KV cache, T != S) in interpret mode
# ----------------------------------------------------------------------------------------------------------


def cache_chunk_layout(length: int) -> tuple[np.ndarray, np.ndarray]:
  """``(types [4, length], starts [4])``: chunks as the engine writes them at slot ``start`` of a cache.

  0: the last answer token, a query block, an answer token, a second query block, then padding;
  1: one query block filling the chunk, starting mid-tile; 2: a single answer token (a decode-like row);
  3: no tokens at all (a row sitting the round out).
  """
  rows = [
      _runs((ANSWER, 1), (QUERY, 9), (ANSWER, 1), (QUERY, length // 2), (PAD, length - length // 2 - 11)),
      [QUERY] * length,
      [ANSWER] + [PAD] * (length - 1),
      [PAD] * length,
  ]
  return np.array(rows, np.int32), np.array([130, 37, 199, 0], np.int32)


def kv_cache(seed: int, batch: int, length: int, slots: int, heads: int, kv_heads: int, dim: int,
             dtype=jnp.float32):
  """``q [B, length, H, D]`` and a cache ``k, v [B, slots, K, D]`` of random values."""
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (batch, length, heads, dim), dtype)
  k = jax.random.normal(keys[1], (batch, slots, kv_heads, dim), dtype)
  v = jax.random.normal(keys[2], (batch, slots, kv_heads, dim), dtype)
  return q, k, v


@pytest.mark.parametrize("key_split", [64, 100_000])  # four key splits merged, or one
def test_gpu_forward_only_interpret_chunk_over_cache(key_split):
  """Chunks at different cache offsets (query blocks, answers, padding rows) over 224 slots, GQA 4/2."""
  types, starts = cache_chunk_layout(24)  # 24 queries x 2 heads per KV head pad to 128 rows
  ranges = chunk_ranges(jnp.asarray(types), jnp.asarray(starts), from_start=False)
  assert ranges.q_lo is None
  assert (np.diff(np.asarray(ranges.k_hi), axis=1) >= 0).all(), "padding rows must keep k_hi monotone"
  q, k, v = kv_cache(5, 4, 24, 224, heads=4, kv_heads=2, dim=32)  # 224 slots pad to 256, D to 64
  out = pallas_gpu.attention_forward(q, k, v, ranges, tuning=GPU_TILES, key_split=key_split, interpret=True)
  np.testing.assert_allclose(out, dense_attention(q, k, v, ranges), atol=2e-5)


@pytest.mark.parametrize("slots,key_split", [(192, None), (512, 128)])
def test_gpu_forward_only_interpret_decode_steps(slots, key_split):
  """T = 1 over a 192-slot cache (two default key splits), and over 512 slots of which at most 151 are
  filled (four splits sharing out each row's filled keys), rows at different fills and one empty range."""
  fill = jnp.array([[0], [150], [63], [0]], jnp.int32)
  ranges = MaskRanges(k_lo=jnp.zeros_like(fill), k_hi=(fill + 1).at[3].set(0))
  q, k, v = kv_cache(6, 4, 1, slots, heads=4, kv_heads=1, dim=64)
  out = pallas_gpu.attention_forward(q, k, v, ranges, tuning=GPU_TILES, key_split=key_split, interpret=True)
  want = dense_attention(q, k, v, ranges)
  np.testing.assert_allclose(out, want, atol=2e-5)
  np.testing.assert_array_equal(out[3], 0.0)  # nothing visible: zeros, like the dense path


def test_gpu_forward_only_refuses_gradients():
  q, k, v = kv_cache(7, 1, 1, 64, heads=2, kv_heads=1, dim=64)
  ranges = MaskRanges(k_lo=jnp.zeros((1, 1), jnp.int32), k_hi=jnp.full((1, 1), 9, jnp.int32))
  loss = lambda q: pallas_gpu.attention_forward(q, k, v, ranges, tuning=GPU_TILES, interpret=True).sum()
  with pytest.raises(NotImplementedError, match="no backward pass"):
    jax.eval_shape(jax.grad(loss), q)


@pytest.mark.parametrize("module", [pallas_gpu, pallas_tpu])
def test_dispatch_runs_the_forward_only_kernel_for_cache_calls_per_device(monkeypatch, module):
  """``pallas_gpu`` and ``pallas_tpu`` calls that do not fit the training kernel take the forward-only path,
  under a mesh too (shard_map over rows and heads with ranges lacking q_lo/q_hi).

  Under the mesh the spy computes with ``dense_attention``: Mosaic GPU's interpreter keeps one shared state
  and cannot run several devices' kernels at once, and the TPU kernel runs only on a TPU or in interpret
  mode (the kernels themselves are checked above and below)."""
  from ism_jax import sharding

  calls = []

  def spy(*args, **kwargs):
    calls.append(args[0].shape)
    return dense_attention(*args, **kwargs)

  monkeypatch.setattr(module, "attention_forward", spy)
  fill = jnp.array([[5], [70], [127], [31]], jnp.int32)
  ranges = MaskRanges(k_lo=jnp.zeros_like(fill), k_hi=fill + 1)
  q, k, v = kv_cache(8, 4, 1, 128, heads=4, kv_heads=2, dim=16)
  want = dense_attention(q, k, v, ranges)
  mesh = sharding.make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
  impl = module.__name__.rsplit(".", 1)[1]
  with jax.set_mesh(mesh):
    out = jax.jit(lambda q, k, v, r: dispatch_attention(q, k, v, r, impl=impl))(q, k, v, ranges)
  assert calls == [(2, 1, 2, 16)]  # one trace, per device: half the rows and half the heads
  np.testing.assert_allclose(out, want, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# TPU kernel in interpret mode
# ----------------------------------------------------------------------------------------------------------


def tpu_interpret(q, k, v, ranges):
  return pallas_tpu.attention(q, k, v, ranges, tuning=TPU_TILES, interpret=True)


# Forward-only tiles: 8 rows (one sublane tile) or 16, keys in tiles of 32.
TPU_FORWARD_TILES = pallas_tpu.TpuTuning(block_q=16, block_kv=32)


def test_tpu_forward_only_interpret_chunk_over_cache():
  """Chunks at different cache offsets (query blocks, answers, padding rows) over 224 slots, GQA 4/2: 24
  queries x 2 heads = 48 rows per KV head in three row tiles, 224 slots in seven key tiles."""
  types, starts = cache_chunk_layout(24)
  ranges = chunk_ranges(jnp.asarray(types), jnp.asarray(starts), from_start=False)
  q, k, v = kv_cache(5, 4, 24, 224, heads=4, kv_heads=2, dim=32)
  out = pallas_tpu.attention_forward(q, k, v, ranges, tuning=TPU_FORWARD_TILES, interpret=True)
  np.testing.assert_allclose(out, dense_attention(q, k, v, ranges), atol=2e-5)


def test_tpu_forward_only_interpret_decode_steps():
  """T = 1 over 200 slots (padded to 224), GQA 4/1 (4 rows, one 8-row tile), rows at different fills and
  one empty range."""
  fill = jnp.array([[0], [150], [63], [0]], jnp.int32)
  ranges = MaskRanges(k_lo=jnp.zeros_like(fill), k_hi=(fill + 1).at[3].set(0))
  q, k, v = kv_cache(6, 4, 1, 200, heads=4, kv_heads=1, dim=64)
  assert pallas_tpu.forward_only_tiles(4, 200, TPU_FORWARD_TILES) == (8, 32)
  out = pallas_tpu.attention_forward(q, k, v, ranges, tuning=TPU_FORWARD_TILES, interpret=True)
  np.testing.assert_allclose(out, dense_attention(q, k, v, ranges), atol=2e-5)
  np.testing.assert_array_equal(out[3], 0.0)  # nothing visible: zeros, like the dense path


def test_tpu_forward_only_tiles_stay_valid_for_the_hardware():
  """Rows in whole 8-sublane tiles up to block_q; keys in block_kv, or 128 lanes when that avoids a pad."""
  assert pallas_tpu.forward_only_tiles(4, 2048) == (8, 512)  # a decode step of 4 query heads per KV head
  assert pallas_tpu.forward_only_tiles(3000, 2048) == (512, 512)
  assert pallas_tpu.forward_only_tiles(40, 1920) == (40, 128)  # 1920 = 15 x 128, not a multiple of 512
  assert pallas_tpu.forward_only_tiles(40, 1000) == (40, 512)  # no lane multiple: keys padded to 1024
  q, k, v = kv_cache(7, 1, 1, 64, heads=2, kv_heads=1, dim=64)
  ranges = MaskRanges(k_lo=jnp.zeros((1, 1), jnp.int32), k_hi=jnp.full((1, 1), 9, jnp.int32))
  loss = lambda q: pallas_tpu.attention_forward(q, k, v, ranges, interpret=True).sum()
  with pytest.raises(NotImplementedError, match="no backward pass"):
    jax.eval_shape(jax.grad(loss), q)


def test_tpu_kernel_interpret_degenerate_layouts():
  types, ids = degenerate_layouts(96)  # T = 96 pads to 128
  assert_matches_oracle(tpu_interpret, types, ids, "ism", heads=2, kv_heads=1, dim=16, atol=2e-5)


@pytest.mark.parametrize("kind", ["ism", "prefix"])
def test_tpu_kernel_interpret_packed_gqa(kind):
  types, ids = packed_layouts(2, batch=2, length=128)
  assert_matches_oracle(tpu_interpret, types, ids, kind, heads=4, kv_heads=2, dim=16, atol=2e-5)


# ----------------------------------------------------------------------------------------------------------
# Memory: no [T, T] array anywhere in the forward or backward computation
# ----------------------------------------------------------------------------------------------------------


def _sub_jaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jex_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jex_core.Jaxpr):
        yield item


def _largest_intermediate(fn, *args) -> int:
  """The element count of the largest value ``fn`` computes, nested jaxprs (kernels too) included."""
  sizes = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape"))
      for sub in _sub_jaxprs(eqn.params):
        visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return max(sizes)


@pytest.mark.parametrize("module", [pallas_gpu, pallas_tpu])
def test_kernels_never_build_a_length_squared_array(module):
  batch, length, heads, dim = 1, 4096, 2, 128
  types = jnp.full((batch, length), ANSWER, jnp.int32)
  ranges = make_attention_ranges(types)
  q, k, v, cotangent = qkv(0, batch, length, heads, heads, dim, jnp.bfloat16)
  step = lambda q, k, v: forward_and_grads(module.attention, q, k, v, ranges, cotangent)
  assert _largest_intermediate(step, q, k, v) <= batch * length * heads * dim


# ----------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, impl", [("cpu", "xla_chunked"), ("gpu", "pallas_gpu"),
                                           ("tpu", "pallas_tpu")])
def test_auto_picks_the_kernel_of_the_backend(monkeypatch, backend, impl):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert resolve_impl("auto") == impl


# ----------------------------------------------------------------------------------------------------------
# Compiled GPU kernel (GPU machines only): bf16 at realistic sizes
# ----------------------------------------------------------------------------------------------------------


def gpu_compiled(q, k, v, ranges):
  return dispatch_attention(q, k, v, ranges, impl="pallas_gpu")


@gpu_only
@pytest.mark.parametrize("kind", ["ism", "prefix", "causal"])
def test_gpu_compiled_bf16_packed_dialogues(kind):
  data = layouts.random_packed_batch(np.random.default_rng(3), batch=2, length=2048, max_block=400)
  assert_matches_oracle(gpu_compiled, data["segment_types"], data["segment_ids"], kind, heads=8,
                        kv_heads=2, dim=128, atol=2e-2, dtype=jnp.bfloat16)


@gpu_only
def test_gpu_compiled_bf16_degenerate_layouts():
  types, ids = degenerate_layouts(1000)
  assert_matches_oracle(gpu_compiled, types, ids, "ism", heads=4, kv_heads=4, dim=128, atol=2e-2,
                        dtype=jnp.bfloat16)


@gpu_only
def test_gpu_compiled_float32_inputs_and_odd_head_dim():
  types, ids = packed_layouts(4, batch=2, length=700)
  assert_matches_oracle(gpu_compiled, types, ids, "ism", heads=6, kv_heads=3, dim=80, atol=2e-2)


@gpu_only
@pytest.mark.parametrize("fill, length, slots", [(4000, 256, 4608), (3000, 1, 5632), (700, 1, 5632)])
def test_gpu_compiled_forward_only_over_a_cache(fill, length, slots):
  """A cached prefill (query block after ``fill`` cached slots) and decode steps, 32 / 8 heads of 64, bf16."""
  types = np.full((2, length), QUERY, np.int32)
  types[1, length // 2:] = PAD  # the second row: half a chunk, then padding
  types[:, 0] = ANSWER
  starts = jnp.array([fill, fill // 3], jnp.int32)
  ranges = chunk_ranges(jnp.asarray(types), starts, from_start=False)
  q, k, v = kv_cache(9, 2, length, slots, heads=32, kv_heads=8, dim=64, dtype=jnp.bfloat16)
  out = jax.jit(gpu_compiled)(q, k, v, ranges)
  f32 = lambda x: x.astype(jnp.float32)
  want = dense_attention(f32(q), f32(k), f32(v), ranges)
  real = jnp.asarray(types != PAD)[:, :, None, None]
  np.testing.assert_allclose(f32(out) * real, want * real, atol=2e-2)


# ----------------------------------------------------------------------------------------------------------
# Multi-device: kernels run per device under shard_map
# ----------------------------------------------------------------------------------------------------------


def test_kernel_under_a_mesh_runs_per_device_and_matches_the_oracle():
  """On a (data=2, tensor=2) mesh each device attends over its rows and heads; results equal one device."""
  from ism_jax import sharding
  from ism_jax.attention import per_device

  batch = layouts.random_packed_batch(np.random.default_rng(21), batch=4, length=64)
  ranges = make_attention_ranges(jnp.asarray(batch["segment_types"]), jnp.asarray(batch["segment_ids"]))
  kq, kk, kv = jax.random.split(jax.random.key(21), 3)
  q = jax.random.normal(kq, (4, 64, 4, 16))
  k, v = jax.random.normal(kk, (4, 64, 2, 16)), jax.random.normal(kv, (4, 64, 2, 16))
  kernel = lambda *args, **kw: pallas_tpu.attention(*args, tuning=TPU_TILES, interpret=True, **kw)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) ** 2)

  mesh = sharding.make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
  sharded = lambda q, k, v: per_device(kernel, q, k, v, ranges)
  with jax.set_mesh(mesh):
    out = jax.jit(sharded)(q, k, v)
    grads = jax.jit(jax.grad(lambda *a: loss(sharded, *a), argnums=(0, 1, 2)))(q, k, v)
  reference = lambda q, k, v: dense_attention(q, k, v, ranges)
  np.testing.assert_allclose(out, reference(q, k, v), atol=1e-5)
  for got, want in zip(grads, jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, atol=1e-4)
