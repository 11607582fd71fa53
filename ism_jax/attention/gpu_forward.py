"""Forward pass of the GPU kernel: block-sparse flash attention in Mosaic GPU (Hopper).

One CTA per (query head, 2 x ``block_q`` query rows, batch row). Compute warpgroups 0 and 1 each own
``block_q`` rows and run online softmax over their key tiles (see :mod:`gpu_common` for the five-segment
walk); they take turns on the tensor cores (a shared "schedule" barrier, FlashAttention-3 style) so that
one's softmax overlaps the other's matmuls. Warpgroup 2 streams K and V tiles with TMA.

Outputs ``out [B, T, H, D]`` and the row log-sum-exp in base 2 of the *scaled* logits,
``lse [B, H, T]`` float32, which the backward pass reuses.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from ism_jax.attention import gpu_common as gc


def _compute_wg(refs, scratch, *, wg, run: gc.Run, scale: float, tuning: gc.GpuTuning, staged: bool):
  q_ref, k_smem, v_smem, klo_ref, khi_ref, o_ref, lse_ref = refs
  (q_smem2, lo_smem2, hi_smem2, lse_smem2, p_staging2, q_bars, lo_bars, hi_bars, k_bars, v_bars, k_free,
   v_free, schedule) = scratch
  batch, head, cta = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_seq")
  block_q, block_kv, stages = tuning.block_q, tuning.block_kv, tuning.stages
  row0 = (gc.COMPUTE_WGS * cta + wg) * block_q
  q_smem, lo_smem, hi_smem, lse_smem = q_smem2.at[wg], lo_smem2.at[wg], hi_smem2.at[wg], lse_smem2.at[wg]
  p_staging = p_staging2.at[wg] if staged else None
  plgpu.set_max_registers(232, action="increase")
  plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row0, block_q), head], q_smem, q_bars.at[wg])
  plgpu.copy_gmem_to_smem(klo_ref.at[batch, pl.ds(row0, block_q)], lo_smem, lo_bars.at[wg])
  plgpu.copy_gmem_to_smem(khi_ref.at[batch, pl.ds(row0, block_q)], hi_smem, hi_bars.at[wg])
  for bars in (q_bars, lo_bars, hi_bars):
    plgpu.barrier_wait(bars.at[wg])
  lo_rows = plgpu.load(lo_smem, layout=gc.ROWS)
  hi_rows = plgpu.load(hi_smem, layout=gc.ROWS)
  tile = (block_q, block_kv)
  coef = scale * gc.LOG2E  # logits in log2 units: exp(scale * s) = exp2(coef * s)

  def take_turn():
    plgpu.barrier_arrive(schedule)
    plgpu.barrier_wait(schedule)

  def wait_next_k(kv):
    @pl.when(kv + 1 < run.cta_end)
    def _():
      plgpu.barrier_wait(k_bars.at[gc.ring_slot(kv + 1 - run.cta_start, stages)])

  def step(kv, carry, mode):
    acc, m, l = carry
    slot = gc.ring_slot(kv - run.cta_start, stages)
    if mode == "skip":
      plgpu.barrier_arrive(k_free.at[slot])
      take_turn()
      plgpu.barrier_arrive(schedule)
      plgpu.barrier_wait(v_bars.at[slot])
      plgpu.barrier_wait(schedule)
      wait_next_k(kv)
      plgpu.barrier_arrive(v_free.at[slot])
      return carry
    s = gc.matmul(q_smem, k_smem.at[slot].transpose((1, 0)), tile, after_issue=take_turn)
    plgpu.barrier_arrive(k_free.at[slot])
    if mode == "masked":
      s = jnp.where(gc.visible(lo_rows, hi_rows, kv * block_kv, tile), s, gc.MASKED_LOGIT)
    m_new = jnp.maximum(m, s.max(axis=1) * coef)
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s * coef - gc.by_row(m_new, tile))
    acc *= gc.by_row(alpha, acc.shape)
    l = l * alpha + p.sum(axis=1)
    p16 = p.astype(q_smem.dtype)
    acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
    plgpu.barrier_arrive(schedule)
    plgpu.barrier_wait(v_bars.at[slot])
    plgpu.barrier_wait(schedule)
    acc = gc.matmul_acc(acc, p16, v_smem.at[slot], a_staging=p_staging, after_issue=lambda: wait_next_k(kv))
    plgpu.barrier_arrive(v_free.at[slot])
    return acc, m_new, l

  head_dim = q_smem.shape[-1]
  carry = (gc.zeros((block_q, head_dim)), gc.full((block_q,), gc.ROW_MAX_FLOOR, gc.ROWS),
           gc.full((block_q,), 0.0, gc.ROWS))
  plgpu.barrier_wait(k_bars.at[0])
  pl.when(wg == 1)(take_turn)
  acc, m, l = run.walk(step, carry)
  pl.when(wg == 0)(take_turn)
  q_smem[...] = (acc / gc.by_row(l, acc.shape)).astype(q_smem.dtype)
  lse_smem[...] = m + jnp.log2(l)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, pl.ds(row0, block_q), head])
  plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(row0, block_q)])
  plgpu.wait_smem_to_gmem(0)


def _memory_wg(k_ref, v_ref, k_smem, v_smem, bars, *, cta_start, cta_end, group: int, block_kv: int,
               stages: int):
  """Streams the CTA's K and V tiles through the ring; waits for both consumers before reusing a slot."""
  k_bars, v_bars, k_free, v_free = bars
  batch, head = lax.axis_index("batch"), lax.axis_index("heads")
  kv_head = lax.div(head, jnp.asarray(group, head.dtype))
  plgpu.set_max_registers(40, action="decrease")

  def fetch(kv, slot):
    rows = (batch, pl.ds(kv * block_kv, block_kv), kv_head)
    plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bars.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bars.at[slot])

  for slot in range(stages):
    pl.when(cta_start + slot < cta_end)(functools.partial(fetch, cta_start + slot, slot))

  @pl.loop(cta_start + stages, cta_end)
  def _(kv):
    slot = gc.ring_slot(kv - cta_start, stages)
    plgpu.barrier_wait(k_free.at[slot])
    rows = (batch, pl.ds(kv * block_kv, block_kv), kv_head)
    plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bars.at[slot])
    plgpu.barrier_wait(v_free.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bars.at[slot])

  gc.drain((k_free, v_free), cta_start, cta_end, stages)


def forward(q_BTHD, k_BTKD, v_BTKD, k_lo_BT, k_hi_BT, bounds_BN4, *, scale: float, tuning: gc.GpuTuning,
            interpret: bool = False):
  """Runs the forward kernel. ``bounds_BN4``: query-tile bounds for tiles of ``block_q`` rows and
  ``block_kv`` keys. Returns ``(out [B, T, H, D], lse [B, H, T] float32, base 2)``."""
  batch, length, heads, head_dim = q_BTHD.shape
  kv_heads = k_BTKD.shape[2]
  group = heads // kv_heads
  block_q, block_kv, stages = tuning.block_q, tuning.block_kv, tuning.stages
  dtype = q_BTHD.dtype
  staged = interpret

  def kernel(q_ref, k_ref, v_ref, klo_ref, khi_ref, bounds_ref, o_ref, lse_ref, *scratch):
    k_smem, v_smem = scratch[:2]
    wg_scratch = scratch[2:7]
    q_bars, lo_bars, hi_bars, k_bars, v_bars, k_free, v_free, schedule = scratch[7:]
    batch_i, cta, wg = lax.axis_index("batch"), lax.axis_index("q_seq"), lax.axis_index("wg")

    @pl.when(wg < gc.COMPUTE_WGS)
    def _():
      run = gc.Run.read(bounds_ref, batch_i, cta, wg)
      refs = (q_ref, k_smem, v_smem, klo_ref, khi_ref, o_ref, lse_ref)
      bars = (q_bars, lo_bars, hi_bars, k_bars, v_bars, k_free, v_free, schedule)
      _compute_wg(refs, (*wg_scratch, *bars), wg=wg, run=run, scale=scale, tuning=tuning, staged=staged)

    @pl.when(wg == gc.COMPUTE_WGS)
    def _():
      cta_start, cta_end = gc.Run.read_cta(bounds_ref, batch_i, cta)
      _memory_wg(k_ref, v_ref, k_smem, v_smem, (k_bars, v_bars, k_free, v_free), cta_start=cta_start,
                 cta_end=cta_end, group=group, block_kv=block_kv, stages=stages)

  wgs = gc.COMPUTE_WGS
  scratch = [
      gc.tiled_smem((stages, block_kv, head_dim), dtype),  # k ring
      gc.tiled_smem((stages, block_kv, head_dim), dtype),  # v ring
      gc.tiled_smem((wgs, block_q, head_dim), dtype),  # q, then out
      plgpu.SMEM((wgs, block_q), jnp.int32),  # k_lo of the rows
      plgpu.SMEM((wgs, block_q), jnp.int32),  # k_hi of the rows
      plgpu.SMEM((wgs, block_q), jnp.float32),  # lse
      gc.tiled_smem((wgs, block_q, block_kv), dtype) if staged else None,  # p staging (interpret)
      plgpu.Barrier(num_barriers=wgs),  # q arrived
      plgpu.Barrier(num_barriers=wgs),  # k_lo arrived
      plgpu.Barrier(num_barriers=wgs),  # k_hi arrived
      plgpu.Barrier(num_barriers=stages),  # k slot filled
      plgpu.Barrier(num_barriers=stages),  # v slot filled
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),  # k slot free
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),  # v slot free
      plgpu.Barrier(num_arrivals=wgs),  # tensor-core turn
  ]
  out_types = (jax.ShapeDtypeStruct(q_BTHD.shape, dtype),
               jax.ShapeDtypeStruct((batch, heads, length), jnp.float32))
  call = plgpu.kernel(
      kernel, out_type=out_types, scratch_types=scratch,
      grid=(heads, length // (wgs * block_q), batch), grid_names=("heads", "q_seq", "batch"),
      num_threads=wgs + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=gc.interpret_params(interpret),
  )
  return call(q_BTHD, k_BTKD, v_BTKD, k_lo_BT, k_hi_BT, bounds_BN4)
