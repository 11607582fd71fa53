"""Backward pass of the GPU kernel: a dq kernel and a dk/dv kernel in Mosaic GPU (Hopper).

With ``s = scale * q.k``, ``p = exp(s - lse)`` recomputed from the forward's log-sum-exp and
``delta = rowsum(dout * out)``::

    dv = p^T dout        dp = dout v^T        ds = p * (dp - delta)
    dq = scale * ds k    dk = scale * ds^T q

* dq kernel: one CTA per (query head, 2 x ``dq_block_q`` rows, batch row); the compute warpgroups walk
  their key tiles (bounds from ``k_lo``/``k_hi``) while the memory warpgroup streams K and V.
* dk/dv kernel: one CTA per (KV head, 2 x ``dkv_block_kv`` keys, batch row); for every query head of the
  KV head's group, the compute warpgroups walk their query tiles (bounds from ``q_lo``/``q_hi``) while the
  memory warpgroup streams q, dout, lse and delta. dk and dv of a group accumulate in registers, so GQA
  needs no reduction afterwards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from ism_jax.attention import gpu_common as gc

_WGS = gc.COMPUTE_WGS


def _copy_rows(pairs, barrier):
  for src, dst in pairs:
    plgpu.copy_gmem_to_smem(src, dst, barrier)
  plgpu.barrier_wait(barrier)


# ----------------------------------------------------------------------------------------------------------
# dq
# ----------------------------------------------------------------------------------------------------------


def _dq_compute_wg(refs, scratch, *, wg, run: gc.Run, scale: float, block_q: int, block_kv: int,
                   stages: int):
  q_ref, do_ref, lse_ref, delta_ref, klo_ref, khi_ref, dq_ref = refs
  k_ring, v_ring, q2, do2, lo2, hi2, lse2, delta2, staging2, row_bars, kv_bars, kv_free = scratch
  batch, head, cta = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_seq")
  row0 = (_WGS * cta + wg) * block_q
  rows = pl.ds(row0, block_q)
  q_smem, do_smem, staging = q2.at[wg], do2.at[wg], (None if staging2 is None else staging2.at[wg])
  plgpu.set_max_registers(232, action="increase")
  _copy_rows([(q_ref.at[batch, rows, head], q_smem), (do_ref.at[batch, rows, head], do_smem),
              (lse_ref.at[batch, head, rows], lse2.at[wg]), (delta_ref.at[batch, head, rows], delta2.at[wg]),
              (klo_ref.at[batch, rows], lo2.at[wg]), (khi_ref.at[batch, rows], hi2.at[wg])],
             row_bars.at[wg])
  lse_rows, delta_rows = plgpu.load(lse2.at[wg], layout=gc.ROWS), plgpu.load(delta2.at[wg], layout=gc.ROWS)
  lo_rows, hi_rows = plgpu.load(lo2.at[wg], layout=gc.ROWS), plgpu.load(hi2.at[wg], layout=gc.ROWS)
  tile = (block_q, block_kv)
  coef = scale * gc.LOG2E

  def step(kv, dq, mode):
    slot = gc.ring_slot(kv - run.cta_start, stages)
    plgpu.barrier_wait(kv_bars.at[slot])
    if mode == "skip":
      plgpu.barrier_arrive(kv_free.at[slot])
      return dq
    s, dp = gc.matmul2(q_smem, k_ring.at[slot].transpose((1, 0)), do_smem, v_ring.at[slot].transpose((1, 0)),
                       tile)
    p = jnp.exp2(s * coef - gc.by_row(lse_rows, tile))
    if mode == "masked":
      p = jnp.where(gc.visible(lo_rows, hi_rows, kv * block_kv, tile), p, 0.0)
    ds = p * (dp - gc.by_row(delta_rows, tile))
    dq = gc.matmul_acc(dq, ds.astype(q_smem.dtype), k_ring.at[slot], a_staging=staging)
    plgpu.barrier_arrive(kv_free.at[slot])
    return dq

  dq = run.walk(step, gc.zeros((block_q, q_smem.shape[-1])))
  q_smem[...] = (dq * scale).astype(q_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[batch, rows, head])
  plgpu.wait_smem_to_gmem(0)


def _dq_memory_wg(k_ref, v_ref, k_ring, v_ring, kv_bars, kv_free, *, cta_start, cta_end, group: int,
                  block_kv: int, stages: int):
  batch, head = lax.axis_index("batch"), lax.axis_index("heads")
  kv_head = lax.div(head, jnp.asarray(group, head.dtype))
  plgpu.set_max_registers(40, action="decrease")

  def fetch(kv, slot):
    rows = (batch, pl.ds(kv * block_kv, block_kv), kv_head)
    plgpu.copy_gmem_to_smem(k_ref.at[rows], k_ring.at[slot], kv_bars.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[rows], v_ring.at[slot], kv_bars.at[slot])

  for slot in range(stages):
    pl.when(cta_start + slot < cta_end)(functools.partial(fetch, cta_start + slot, slot))

  @pl.loop(cta_start + stages, cta_end)
  def _(kv):
    slot = gc.ring_slot(kv - cta_start, stages)
    plgpu.barrier_wait(kv_free.at[slot])
    fetch(kv, slot)

  gc.drain((kv_free,), cta_start, cta_end, stages)


def dq_pass(q, k, v, do, lse, delta, k_lo, k_hi, bounds, *, scale: float, tuning: gc.GpuTuning,
            interpret: bool = False):
  """``dq [B, T, H, D]``. ``bounds``: query-tile bounds for ``dq_block_q`` rows, ``dq_block_kv`` keys."""
  batch, length, heads, head_dim = q.shape
  group = heads // k.shape[2]
  block_q, block_kv, stages = tuning.dq_block_q, tuning.dq_block_kv, tuning.dq_stages
  dtype = q.dtype

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, klo_ref, khi_ref, bounds_ref, dq_ref,
             *scratch):
    k_ring, v_ring, *_, kv_bars, kv_free = scratch
    batch_i, cta, wg = lax.axis_index("batch"), lax.axis_index("q_seq"), lax.axis_index("wg")

    @pl.when(wg < _WGS)
    def _():
      run = gc.Run.read(bounds_ref, batch_i, cta, wg)
      refs = (q_ref, do_ref, lse_ref, delta_ref, klo_ref, khi_ref, dq_ref)
      _dq_compute_wg(refs, scratch, wg=wg, run=run, scale=scale, block_q=block_q, block_kv=block_kv,
                     stages=stages)

    @pl.when(wg == _WGS)
    def _():
      cta_start, cta_end = gc.Run.read_cta(bounds_ref, batch_i, cta)
      _dq_memory_wg(k_ref, v_ref, k_ring, v_ring, kv_bars, kv_free, cta_start=cta_start, cta_end=cta_end,
                    group=group, block_kv=block_kv, stages=stages)

  scratch = [
      gc.tiled_smem((stages, block_kv, head_dim), dtype),  # k ring
      gc.tiled_smem((stages, block_kv, head_dim), dtype),  # v ring
      gc.tiled_smem((_WGS, block_q, head_dim), dtype),  # q, then dq
      gc.tiled_smem((_WGS, block_q, head_dim), dtype),  # dout
      plgpu.SMEM((_WGS, block_q), jnp.int32),  # k_lo
      plgpu.SMEM((_WGS, block_q), jnp.int32),  # k_hi
      plgpu.SMEM((_WGS, block_q), jnp.float32),  # lse
      plgpu.SMEM((_WGS, block_q), jnp.float32),  # delta
      gc.tiled_smem((_WGS, block_q, block_kv), dtype) if interpret else None,  # ds staging
      plgpu.Barrier(num_arrivals=6, num_barriers=_WGS),  # the six row buffers arrived
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # k and v slot filled
      plgpu.Barrier(num_arrivals=_WGS, num_barriers=stages),  # slot free
  ]
  call = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct(q.shape, dtype), scratch_types=scratch,
      grid=(heads, length // (_WGS * block_q), batch), grid_names=("heads", "q_seq", "batch"),
      num_threads=_WGS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=gc.interpret_params(interpret),
  )
  return call(q, k, v, do, lse, delta, k_lo, k_hi, bounds)


# ----------------------------------------------------------------------------------------------------------
# dk, dv
# ----------------------------------------------------------------------------------------------------------


def _dkv_compute_wg(refs, scratch, *, wg, run: gc.Run, scale: float, group: int, block_kv: int,
                    block_q: int, stages: int):
  k_ref, v_ref, qlo_ref, qhi_ref, dk_ref, dv_ref = refs
  q_ring, do_ring, lse_ring, delta_ring, k2, v2, lo2, hi2, staging2, row_bars, q_bars, q_free = scratch
  batch, kv_head, cta = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("kv_seq")
  keys = pl.ds((_WGS * cta + wg) * block_kv, block_kv)
  k_smem, v_smem = k2.at[wg], v2.at[wg]
  staging = None if staging2 is None else (staging2.at[wg, 0], staging2.at[wg, 1])
  plgpu.set_max_registers(232, action="increase")
  _copy_rows([(k_ref.at[batch, keys, kv_head], k_smem), (v_ref.at[batch, keys, kv_head], v_smem),
              (qlo_ref.at[batch, keys], lo2.at[wg]), (qhi_ref.at[batch, keys], hi2.at[wg])],
             row_bars.at[wg])
  lo_rows, hi_rows = plgpu.load(lo2.at[wg], layout=gc.ROWS), plgpu.load(hi2.at[wg], layout=gc.ROWS)
  tile = (block_kv, block_q)
  coef = scale * gc.LOG2E
  dtype = k_smem.dtype

  def one_head(g, carry):
    def step(qt, carry, mode):
      dk, dv = carry
      slot = gc.ring_slot(g * run.length + qt - run.cta_start, stages)
      plgpu.barrier_wait(q_bars.at[slot])
      if mode == "skip":
        plgpu.barrier_arrive(q_free.at[slot])
        return carry
      q_smem, do_smem = q_ring.at[slot], do_ring.at[slot]
      s_t, dp_t = gc.matmul2(k_smem, q_smem.transpose((1, 0)), v_smem, do_smem.transpose((1, 0)), tile)
      p_t = jnp.exp2(s_t * coef - gc.by_col(plgpu.load(lse_ring.at[slot], layout=gc.COLS), tile))
      if mode == "masked":
        p_t = jnp.where(gc.visible(lo_rows, hi_rows, qt * block_q, tile), p_t, 0.0)
      ds_t = p_t * (dp_t - gc.by_col(plgpu.load(delta_ring.at[slot], layout=gc.COLS), tile))
      dv, dk = gc.matmul_acc2(dv, p_t.astype(dtype), do_smem, dk, ds_t.astype(dtype), q_smem,
                              a_staging=staging)
      plgpu.barrier_arrive(q_free.at[slot])
      return dk, dv

    return run.walk(step, carry)

  head_dim = k_smem.shape[-1]
  dk, dv = lax.fori_loop(0, group, one_head, (gc.zeros((block_kv, head_dim)), gc.zeros((block_kv, head_dim))))
  k_smem[...] = (dk * scale).astype(dtype)
  v_smem[...] = dv.astype(dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[batch, keys, kv_head])
  plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[batch, keys, kv_head])
  plgpu.wait_smem_to_gmem(0)


def _dkv_memory_wg(refs, ring, q_bars, q_free, *, cta_start, cta_end, group: int, block_q: int,
                   stages: int):
  q_ref, do_ref, lse_ref, delta_ref = refs
  q_ring, do_ring, lse_ring, delta_ring = ring
  batch, kv_head = lax.axis_index("batch"), lax.axis_index("heads")
  plgpu.set_max_registers(40, action="decrease")
  per_head = cta_end - cta_start
  total = group * per_head

  def fetch(n, slot):
    head = kv_head * group + lax.div(n, per_head)
    rows = pl.ds((cta_start + lax.rem(n, per_head)) * block_q, block_q)
    plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_ring.at[slot], q_bars.at[slot])
    plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_ring.at[slot], q_bars.at[slot])
    plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_ring.at[slot], q_bars.at[slot])
    plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_ring.at[slot], q_bars.at[slot])

  for slot in range(stages):
    pl.when(slot < total)(functools.partial(fetch, jnp.int32(slot), slot))

  @pl.loop(stages, total)
  def _(n):
    slot = gc.ring_slot(n, stages)
    plgpu.barrier_wait(q_free.at[slot])
    fetch(n, slot)

  gc.drain((q_free,), jnp.int32(0), total, stages)


def dkv_pass(q, k, v, do, lse, delta, q_lo, q_hi, bounds, *, scale: float, tuning: gc.GpuTuning,
             interpret: bool = False):
  """``(dk, dv)``, each ``[B, S, K, D]``. ``bounds``: key-tile bounds for ``dkv_block_kv`` keys and
  ``dkv_block_q`` queries."""
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  block_kv, block_q, stages = tuning.dkv_block_kv, tuning.dkv_block_q, tuning.dkv_stages
  dtype = k.dtype

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qlo_ref, qhi_ref, bounds_ref, dk_ref, dv_ref,
             *scratch):
    ring, q_bars, q_free = scratch[:4], scratch[-2], scratch[-1]
    batch_i, cta, wg = lax.axis_index("batch"), lax.axis_index("kv_seq"), lax.axis_index("wg")

    @pl.when(wg < _WGS)
    def _():
      run = gc.Run.read(bounds_ref, batch_i, cta, wg)
      refs = (k_ref, v_ref, qlo_ref, qhi_ref, dk_ref, dv_ref)
      _dkv_compute_wg(refs, scratch, wg=wg, run=run, scale=scale, group=group, block_kv=block_kv,
                      block_q=block_q, stages=stages)

    @pl.when(wg == _WGS)
    def _():
      cta_start, cta_end = gc.Run.read_cta(bounds_ref, batch_i, cta)
      _dkv_memory_wg((q_ref, do_ref, lse_ref, delta_ref), ring, q_bars, q_free, cta_start=cta_start,
                     cta_end=cta_end, group=group, block_q=block_q, stages=stages)

  scratch = [
      gc.tiled_smem((stages, block_q, head_dim), dtype),  # q ring
      gc.tiled_smem((stages, block_q, head_dim), dtype),  # dout ring
      plgpu.SMEM((stages, block_q), jnp.float32),  # lse ring
      plgpu.SMEM((stages, block_q), jnp.float32),  # delta ring
      gc.tiled_smem((_WGS, block_kv, head_dim), dtype),  # k, then dk
      gc.tiled_smem((_WGS, block_kv, head_dim), dtype),  # v, then dv
      plgpu.SMEM((_WGS, block_kv), jnp.int32),  # q_lo of the keys
      plgpu.SMEM((_WGS, block_kv), jnp.int32),  # q_hi of the keys
      gc.tiled_smem((_WGS, 2, block_kv, block_q), dtype) if interpret else None,  # p^T, ds^T staging
      plgpu.Barrier(num_arrivals=4, num_barriers=_WGS),  # the four row buffers arrived
      plgpu.Barrier(num_arrivals=4, num_barriers=stages),  # q, dout, lse, delta slot filled
      plgpu.Barrier(num_arrivals=_WGS, num_barriers=stages),  # slot free
  ]
  out = jax.ShapeDtypeStruct(k.shape, dtype)
  call = plgpu.kernel(
      kernel, out_type=(out, out), scratch_types=scratch,
      grid=(kv_heads, length // (_WGS * block_kv), batch), grid_names=("heads", "kv_seq", "batch"),
      num_threads=_WGS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=gc.interpret_params(interpret),
  )
  return call(q, k, v, do, lse, delta, q_lo, q_hi, bounds)
