"""Mosaic GPU building blocks shared by the ISM attention kernels (Hopper: wgmma, TMA, warp specialization).

Every kernel here has the same shape: two *compute* warpgroups each own a tile of rows (64 query rows, or
64 key rows in the dk/dv pass) and one *memory* warpgroup streams the other operand's tiles through a ring
of shared-memory slots with TMA. The tiles a row tile visits come from :mod:`ism_jax.attention.tiles` as a
run ``[start, end)`` with a fully visible middle ``[full_start, full_end)``. The memory warpgroup streams
the union of both compute warpgroups' runs; each compute warpgroup walks that union in five segments::

    [cta_start, start)          skip    (consume the slot, no math)
    [start, full_start)         masked  (elementwise mask from the per-row ranges)
    [full_start, full_end)      full    (no mask)
    [full_end, end)             masked
    [end, cta_end)              skip

Skipped steps still wait on and release their slot, so barrier phases stay in step across warpgroups.

In interpret mode (CPU) two things differ, because the GPU interpreter does not model them: a register
operand of ``wgmma`` is staged through shared memory, and an accumulator carried across steps is added
to a fresh zero accumulator instead of being passed to ``pl.run_state``. The math is the same.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
# Masked logits are -inf and the running row maximum starts at a finite floor, so a row that sees no key
# of a tile keeps p = exp2(-inf) = 0 and alpha = 1 (a finite masked logit would break under the fused
# multiply-add in exp2(s * coef - m): the unrounded product minus its rounded copy can reach +1e22).
MASKED_LOGIT = -jnp.inf
ROW_MAX_FLOOR = -1e30
COMPUTE_WGS = 2  # compute warpgroups per CTA; the memory warpgroup has index COMPUTE_WGS
ROWS = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a WGMMA-layout tile
COLS = plgpu.Layout.WGMMA.reduce(0)  # one value per column of a WGMMA-layout tile
SWIZZLE_BYTES = 128


@dataclasses.dataclass(frozen=True)
class GpuTuning:
  """Tile sizes of the GPU kernels. Row tiles are per compute warpgroup (two per CTA).

  Attributes:
    block_q: query rows per warpgroup in the forward pass (multiple of 64).
    block_kv: keys per pipeline step in the forward pass (multiple of 64).
    stages: shared-memory slots of the forward K/V ring.
    dq_block_q, dq_block_kv, dq_stages: the same for the dq pass.
    dkv_block_kv, dkv_block_q, dkv_stages: key rows per warpgroup, queries per step, ring slots (dk/dv).
  """

  block_q: int = 64
  block_kv: int = 128
  stages: int = 2
  dq_block_q: int = 64
  dq_block_kv: int = 64
  dq_stages: int = 3
  dkv_block_kv: int = 64
  dkv_block_q: int = 64
  dkv_stages: int = 3

  @property
  def row_multiple(self) -> int:
    """The sequence length must be a multiple of this (the wrapper pads to it)."""
    tiles = (COMPUTE_WGS * self.block_q, self.block_kv, COMPUTE_WGS * self.dq_block_q, self.dq_block_kv,
             COMPUTE_WGS * self.dkv_block_kv, self.dkv_block_q)
    return math.lcm(*tiles)


def tiled_smem(shape: tuple[int, ...], dtype) -> plgpu.SMEM:
  """A shared-memory buffer laid out for TMA and wgmma (8-row tiles, 128-byte swizzle)."""
  minor = SWIZZLE_BYTES // jnp.dtype(dtype).itemsize
  transforms = (plgpu.TilingTransform((8, minor)), plgpu.SwizzleTransform(SWIZZLE_BYTES))
  return plgpu.SMEM(shape, dtype, transforms=transforms)


def matmul(a_ref, b_ref, shape: tuple[int, int], *, after_issue: Callable[[], None] | None = None):
  """``a @ b`` of two shared-memory operands into a fresh float32 accumulator (WGMMA layout)."""

  def scope(acc_ref):
    plgpu.wgmma(acc_ref, a_ref, b_ref)
    if after_issue is not None:
      after_issue()
    return acc_ref[...]

  return pl.run_scoped(scope, plgpu.ACC(shape, jnp.float32))


def matmul2(a1_ref, b1_ref, a2_ref, b2_ref, shape: tuple[int, int]):
  """``(a1 @ b1, a2 @ b2)`` of shared-memory operands, both issued before either is awaited."""

  def scope(acc1_ref, acc2_ref):
    plgpu.wgmma(acc1_ref, a1_ref, b1_ref)
    plgpu.wgmma(acc2_ref, a2_ref, b2_ref)
    return acc1_ref[...], acc2_ref[...]

  return pl.run_scoped(scope, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))


def matmul_acc(acc, a, b_ref, *, a_staging=None, after_issue: Callable[[], None] | None = None):
  """``acc + a @ b`` with ``a`` in registers. ``a_staging``: shared-memory staging buffer (interpret mode)."""
  if a_staging is not None:
    a_staging[...] = a
    plgpu.commit_smem()
    return acc + matmul(a_staging, b_ref, acc.shape, after_issue=after_issue)

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b_ref)
    if after_issue is not None:
      after_issue()

  return pl.run_state(body)(plgpu.ACC.init(acc))


def matmul_acc2(acc1, a1, b1_ref, acc2, a2, b2_ref, *, a_staging=None):
  """``(acc1 + a1 @ b1, acc2 + a2 @ b2)``, ``a1, a2`` in registers, both issued before either is awaited.
  ``a_staging``: two shared-memory staging buffers (interpret mode)."""
  if a_staging is not None:
    a_staging[0][...] = a1
    a_staging[1][...] = a2
    plgpu.commit_smem()
    prod1, prod2 = matmul2(a_staging[0], b1_ref, a_staging[1], b2_ref, acc1.shape)
    return acc1 + prod1, acc2 + prod2

  def body(refs):
    acc1_ref, acc2_ref = refs
    plgpu.wgmma(acc1_ref, a1, b1_ref)
    plgpu.wgmma(acc2_ref, a2, b2_ref)

  return pl.run_state(body)((plgpu.ACC.init(acc1), plgpu.ACC.init(acc2)))


def zeros(shape: tuple[int, ...], layout=plgpu.Layout.WGMMA) -> jax.Array:
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), layout)


def full(shape: tuple[int, ...], value: float, layout) -> jax.Array:
  return plgpu.layout_cast(jnp.full(shape, value, jnp.float32), layout)


def by_row(row_values, shape: tuple[int, int]) -> jax.Array:
  """Broadcasts one value per row (``ROWS`` layout) over a ``shape`` tile."""
  return lax.broadcast_in_dim(row_values, shape, [0])


def by_col(col_values, shape: tuple[int, int]) -> jax.Array:
  """Broadcasts one value per column (``COLS`` layout) over a ``shape`` tile."""
  return lax.broadcast_in_dim(col_values, shape, [1])


def visible(lo_rows, hi_rows, col0, shape: tuple[int, int]) -> jax.Array:
  """Boolean tile: row ``r`` sees column ``col0 + c`` iff ``lo[r] <= col0 + c < hi[r]``."""
  cols = col0 + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
  return (cols >= by_row(lo_rows, shape)) & (cols < by_row(hi_rows, shape))


@dataclasses.dataclass(frozen=True)
class Run:
  """The tile runs of one compute warpgroup and of its CTA (scalars read from a bounds array)."""

  cta_start: jax.Array
  start: jax.Array
  full_start: jax.Array
  full_end: jax.Array
  end: jax.Array
  cta_end: jax.Array

  @classmethod
  def read(cls, bounds_ref, batch, cta, wg) -> "Run":
    """From ``bounds_ref [B, tiles, 4]`` (GMEM): row tile ``COMPUTE_WGS * cta + wg`` and its CTA."""
    first = COMPUTE_WGS * cta
    own = first + wg
    return cls(cta_start=bounds_ref[batch, first, 0], start=bounds_ref[batch, own, 0],
               full_start=bounds_ref[batch, own, 1], full_end=bounds_ref[batch, own, 2],
               end=bounds_ref[batch, own, 3], cta_end=bounds_ref[batch, first + COMPUTE_WGS - 1, 3])

  @classmethod
  def read_cta(cls, bounds_ref, batch, cta) -> tuple[jax.Array, jax.Array]:
    """``(cta_start, cta_end)``: the union of the CTA's row tiles' runs."""
    first = COMPUTE_WGS * cta
    return bounds_ref[batch, first, 0], bounds_ref[batch, first + COMPUTE_WGS - 1, 3]

  @property
  def length(self) -> jax.Array:
    return self.cta_end - self.cta_start

  def walk(self, step: Callable, carry):
    """Runs ``step(tile, carry, mode)`` over the CTA's run, ``mode`` in {"skip", "masked", "full"}."""
    segments = ((self.cta_start, self.start, "skip"), (self.start, self.full_start, "masked"),
                (self.full_start, self.full_end, "full"), (self.full_end, self.end, "masked"),
                (self.end, self.cta_end, "skip"))
    for lo, hi, mode in segments:
      carry = lax.fori_loop(lo, hi, lambda t, c, mode=mode: step(t, c, mode), carry)
    return carry


def ring_slot(step, num_slots: int) -> jax.Array:
  return lax.rem(step, jnp.asarray(num_slots, step.dtype))


def drain(free_bars, first, last, num_slots: int) -> None:
  """Waits until the consumers release the slots of steps ``[last - num_slots, last)`` (clipped at
  ``first``), so that the producer has observed every phase of its "slot free" barriers at exit."""

  @pl.loop(jnp.maximum(last - num_slots, first), last)
  def _(step):
    for bars in free_bars:
      plgpu.barrier_wait(bars.at[ring_slot(step - first, num_slots)])


def interpret_params(interpret: bool):
  """The ``interpret=`` argument of ``plgpu.kernel``: GPU interpret mode on CPU, or None."""
  return plgpu.InterpretGPUParams() if interpret else None
