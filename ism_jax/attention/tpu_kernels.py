"""Pallas TPU kernels of block-sparse ISM attention: forward, dq and dk/dv.

Layout: ``q [B, H, T, D]``, ``k, v [B, K, T, D]`` (heads before time, as the TPU block shapes need);
per-row statistics ``lse, delta [B, H, T, 1]`` and per-query key ranges ``k_lo, k_hi [B, T, 1]`` int32.

Tile runs come in by scalar prefetch (flattened ``[B * tiles * 4]`` int32, see
:func:`ism_jax.attention.tiles.tile_bounds`). The innermost grid axis walks the run of one row tile: step
``j`` visits column tile ``start + j``; steps past ``end`` map to the last tile of the run (the pipeline
does not fetch an unchanged block again) and do no math. Tiles in ``[full_start, full_end)`` skip the
elementwise mask. Every kernel keeps queries on the rows of its score tile ``s [block_q, block_kv]``, so
the per-query ranges mask the dk/dv pass too (the per-key ranges only pick its tiles). The kernels are named
(``ism_forward``, ``ism_dq``, ``ism_dkv``, ``ism_forward_only``), so a lowered module shows which ran.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import tpu as pltpu

ROW_MAX_FLOOR = -1e30  # running maxima start finite, so fully masked rows keep p = exp(-inf) = 0
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class TpuTuning:
  """Tile sizes of the TPU kernels (multiples of 128 on hardware; any size in interpret mode)."""

  block_q: int = 512
  block_kv: int = 512
  dq_block_q: int = 512
  dq_block_kv: int = 512
  dkv_block_kv: int = 512
  dkv_block_q: int = 512


@dataclasses.dataclass(frozen=True)
class _Run:
  """The run of one row tile, read from the prefetched bounds at grid step ``step``."""

  tile: jax.Array  # the column tile this step visits
  active: jax.Array  # the step is inside the run
  full: jax.Array  # the tile needs no mask

  @classmethod
  def at(cls, bounds_ref, row_tile, step) -> "_Run":
    start, full_start, full_end, end = (bounds_ref[row_tile * 4 + i] for i in range(4))
    tile = start + step
    return cls(tile=tile, active=tile < end, full=(full_start <= tile) & (tile < full_end))


def _column_tile(bounds_ref, row_tile, step):
  """Column tile fetched at ``step``: the run's tile, clamped to its last one past the end."""
  start, end = bounds_ref[row_tile * 4], bounds_ref[row_tile * 4 + 3]
  return jnp.minimum(start + step, end - 1)


def _visible(lo_ref, hi_ref, col0, shape):
  cols = col0 + lax.broadcasted_iota(jnp.int32, shape, 1)
  return (lo_ref[...] <= cols) & (cols < hi_ref[...])


def _when_active(run: _Run, compute):
  """Runs ``compute(masked)`` on active steps, with the mask only where the tile is partial."""
  pl.when(run.active & run.full)(functools.partial(compute, False))
  pl.when(run.active & ~run.full)(functools.partial(compute, True))


def _params(interpret: bool):
  semantics = ("parallel", "parallel", "parallel", "arbitrary")
  return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=semantics), interpret=interpret)


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------


def _forward_kernel(bounds_ref, q_ref, k_ref, v_ref, lo_ref, hi_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref,
                    *, scale: float, num_q_tiles: int, block_kv: int):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  run = _Run.at(bounds_ref, b * num_q_tiles + i, j)

  @pl.when(j == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, ROW_MAX_FLOOR, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def compute(masked: bool):
    s = lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32) * scale
    if masked:
      s = jnp.where(_visible(lo_ref, hi_ref, run.tile * block_kv, s.shape), s, -jnp.inf)
    m_old = m_ref[...]
    m_new = jnp.maximum(m_old, s.max(axis=1, keepdims=True))
    alpha = jnp.exp(m_old - m_new)
    p = jnp.exp(s - m_new)
    l_ref[...] = l_ref[...] * alpha + p.sum(axis=1, keepdims=True)
    pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
    acc_ref[...] = acc_ref[...] * alpha + pv
    m_ref[...] = m_new

  _when_active(run, compute)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    l = l_ref[...]
    # A row that sees no key (only in the forward-only path) gives zeros, like the dense oracle.
    o_ref[...] = jnp.where(l > 0, acc_ref[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)
    lse_ref[...] = m_ref[...] + jnp.log(l)


def _forward_call(name: str, q_BXRD, kv_block: tuple, kv_map, num_kv_tiles: int, *, scale: float,
                  block_q: int, block_kv: int, interpret: bool):
  """The forward kernel's ``pallas_call`` over queries ``[B, X, R, D]`` (X query or KV heads, R rows).

  Grid ``(B, X, R / block_q, num_kv_tiles)``; the key and value tiles have block shape ``kv_block`` and are
  located by ``kv_map(b, h, i, j, bounds_ref)``. Outputs ``(out [B, X, R, D], lse [B, X, R, 1] float32)``.
  """
  batch, heads, rows, dim = q_BXRD.shape
  bq = block_q
  nq = rows // bq
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(batch, heads, nq, num_kv_tiles),
      in_specs=[pl.BlockSpec((None, None, bq, dim), lambda b, h, i, j, _: (b, h, i, 0)),
                pl.BlockSpec(kv_block, kv_map),
                pl.BlockSpec(kv_block, kv_map),
                pl.BlockSpec((None, bq, 1), lambda b, h, i, j, _: (b, i, 0)),
                pl.BlockSpec((None, bq, 1), lambda b, h, i, j, _: (b, i, 0))],
      out_specs=[pl.BlockSpec((None, None, bq, dim), lambda b, h, i, j, _: (b, h, i, 0)),
                 pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, _: (b, h, i, 0))],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, dim), jnp.float32)])
  kernel = functools.partial(_forward_kernel, scale=scale, num_q_tiles=nq, block_kv=block_kv)
  out_shape = [jax.ShapeDtypeStruct(q_BXRD.shape, q_BXRD.dtype),
               jax.ShapeDtypeStruct((batch, heads, rows, 1), jnp.float32)]
  return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape, name=name, **_params(interpret))


def forward(q_BHTD, k_BKTD, v_BKTD, lo_BT1, hi_BT1, bounds, *, scale: float, tuning: TpuTuning,
            interpret: bool):
  """``(out [B, H, T, D], lse [B, H, T, 1] float32)``; ``bounds`` flattened query-tile bounds."""
  batch, heads, length, dim = q_BHTD.shape
  group = heads // k_BKTD.shape[1]
  bq, bk = tuning.block_q, tuning.block_kv
  nq, nk = length // bq, length // bk

  def kv_map(b, h, i, j, bounds_ref):
    return b, h // group, _column_tile(bounds_ref, b * nq + i, j), 0

  call = _forward_call("ism_forward", q_BHTD, (None, None, bk, dim), kv_map, nk, scale=scale, block_q=bq,
                       block_kv=bk, interpret=interpret)
  return call(bounds, q_BHTD, k_BKTD, v_BKTD, lo_BT1, hi_BT1)


def forward_only(q_BKRD, k_BSX, v_BSX, lo_BR1, hi_BR1, bounds, *, scale: float, block_q: int, block_kv: int,
                 interpret: bool):
  """The forward kernel over a KV cache in its own layout: ``out [B, K, R, D]`` (no lse).

  Args:
    q_BKRD: each KV head's query rows ``[B, K, R, D]`` (the group's query heads packed into rows).
    k_BSX, v_BSX: the cache ``[B, S, K * D]``: ``[B, S, K, D]`` reshaped for free, so the kernel reads KV head
      ``h``'s ``[block_kv, D]`` tiles in place (no transposed copy of the cache per call).
    lo_BR1, hi_BR1: each row's key range ``[B, R, 1]`` int32.
    bounds: flattened row-tile bounds of ``block_q`` rows over ``block_kv`` keys.
  """
  batch, kv_heads, rows, dim = q_BKRD.shape
  keys = k_BSX.shape[1]
  bq, bk = block_q, block_kv
  nq, nk = rows // bq, keys // bk

  def kv_map(b, h, i, j, bounds_ref):
    return b, _column_tile(bounds_ref, b * nq + i, j), h

  call = _forward_call("ism_forward_only", q_BKRD, (None, bk, dim), kv_map, nk, scale=scale, block_q=bq,
                       block_kv=bk, interpret=interpret)
  out, _ = call(bounds, q_BKRD, k_BSX, v_BSX, lo_BR1, hi_BR1)
  return out


# ----------------------------------------------------------------------------------------------------------
# dq
# ----------------------------------------------------------------------------------------------------------


def _dq_kernel(bounds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, dq_ref, acc_ref,
               *, scale: float, num_q_tiles: int, block_kv: int):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  run = _Run.at(bounds_ref, b * num_q_tiles + i, j)

  @pl.when(j == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def compute(masked: bool):
    s = lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32) * scale
    p = jnp.exp(s - lse_ref[...])
    if masked:
      p = jnp.where(_visible(lo_ref, hi_ref, run.tile * block_kv, s.shape), p, 0.0)
    dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta_ref[...])).astype(k_ref.dtype)
    acc_ref[...] += jnp.dot(ds, k_ref[...], preferred_element_type=jnp.float32)

  _when_active(run, compute)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def dq_pass(q, k, v, do, lse, delta, lo, hi, bounds, *, scale: float, tuning: TpuTuning, interpret: bool):
  """``dq [B, H, T, D]``; ``bounds`` flattened query-tile bounds (``dq_block_q`` x ``dq_block_kv``)."""
  batch, heads, length, dim = q.shape
  group = heads // k.shape[1]
  bq, bk = tuning.dq_block_q, tuning.dq_block_kv
  nq, nk = length // bq, length // bk

  def kv_map(b, h, i, j, bounds_ref):
    return b, h // group, _column_tile(bounds_ref, b * nq + i, j), 0

  rows = pl.BlockSpec((None, None, bq, dim), lambda b, h, i, j, _: (b, h, i, 0))
  row_stat = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, _: (b, h, i, 0))
  row_range = pl.BlockSpec((None, bq, 1), lambda b, h, i, j, _: (b, i, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(batch, heads, nq, nk),
      in_specs=[rows, pl.BlockSpec((None, None, bk, dim), kv_map),
                pl.BlockSpec((None, None, bk, dim), kv_map), rows, row_stat, row_stat, row_range, row_range],
      out_specs=rows, scratch_shapes=[pltpu.VMEM((bq, dim), jnp.float32)])
  kernel = functools.partial(_dq_kernel, scale=scale, num_q_tiles=nq, block_kv=bk)
  return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
                        name="ism_dq", **_params(interpret))(bounds, q, k, v, do, lse, delta, lo, hi)


# ----------------------------------------------------------------------------------------------------------
# dk, dv
# ----------------------------------------------------------------------------------------------------------


def _dkv_kernel(bounds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, dk_ref, dv_ref,
                dk_acc, dv_acc, *, scale: float, num_kv_tiles: int, num_q_tiles: int, block_kv: int):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  run = _Run.at(bounds_ref, b * num_kv_tiles + i, lax.rem(j, num_q_tiles))

  @pl.when(j == 0)
  def _():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def compute(masked: bool):
    q, do = q_ref[...], do_ref[...]
    s = lax.dot_general(q, k_ref[...], _NT, preferred_element_type=jnp.float32) * scale
    p = jnp.exp(s - lse_ref[...])
    if masked:
      p = jnp.where(_visible(lo_ref, hi_ref, i * block_kv, s.shape), p, 0.0)
    dv_acc[...] += lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
    dp = lax.dot_general(do, v_ref[...], _NT, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta_ref[...])).astype(q.dtype)
    dk_acc[...] += lax.dot_general(ds, q, _TN, preferred_element_type=jnp.float32)

  _when_active(run, compute)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def dkv_pass(q, k, v, do, lse, delta, lo, hi, bounds, *, scale: float, tuning: TpuTuning, interpret: bool):
  """``(dk, dv)`` ``[B, K, T, D]``; ``bounds`` flattened key-tile bounds (``dkv_block_kv`` x
  ``dkv_block_q``). The innermost grid axis runs over (query head of the group, query step)."""
  batch, heads, length, dim = q.shape
  kv_heads = k.shape[1]
  group = heads // kv_heads
  bk, bq = tuning.dkv_block_kv, tuning.dkv_block_q
  nk, nq = length // bk, length // bq

  def q_tile(b, i, j, bounds_ref):
    return _column_tile(bounds_ref, b * nk + i, lax.rem(j, nq))

  def q_rows(b, h, i, j, bounds_ref):
    return b, h * group + lax.div(j, nq), q_tile(b, i, j, bounds_ref), 0

  def q_range(b, h, i, j, bounds_ref):
    return b, q_tile(b, i, j, bounds_ref), 0

  keys = pl.BlockSpec((None, None, bk, dim), lambda b, h, i, j, _: (b, h, i, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(batch, kv_heads, nk, group * nq),
      in_specs=[pl.BlockSpec((None, None, bq, dim), q_rows), keys, keys,
                pl.BlockSpec((None, None, bq, dim), q_rows),
                pl.BlockSpec((None, None, bq, 1), q_rows), pl.BlockSpec((None, None, bq, 1), q_rows),
                pl.BlockSpec((None, bq, 1), q_range), pl.BlockSpec((None, bq, 1), q_range)],
      out_specs=[keys, keys],
      scratch_shapes=[pltpu.VMEM((bk, dim), jnp.float32), pltpu.VMEM((bk, dim), jnp.float32)])
  kernel = functools.partial(_dkv_kernel, scale=scale, num_kv_tiles=nk, num_q_tiles=nq, block_kv=bk)
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2
  return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape, name="ism_dkv",
                        **_params(interpret))(bounds, q, k, v, do, lse, delta, lo, hi)
