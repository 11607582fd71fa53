"""Tile bounds for the block-sparse kernels, read off the O(T) mask ranges.

A kernel cuts the ``[T, S]`` score matrix into tiles: rows in tiles of ``row_tile``, columns in tiles of
``col_tile``. For one row tile ``[t0, t1)`` the visible columns of each row ``t`` are ``[lo[t], hi[t])``
with ``lo`` and ``hi`` non-decreasing, so

* the column tiles holding any visible pair form one run ``[start, end)``, from ``lo[t0]`` to
  ``hi[t1 - 1]`` (every row sees itself, so the union of the rows' ranges has no hole);
* the column tiles in which *every* pair is visible form one run ``[full_start, full_end)``: tile
  ``[s0, s1)`` is fully visible iff ``s0 >= lo[t1 - 1]`` and ``s1 <= hi[t0]``;
* the rest of ``[start, end)``, i.e. ``[start, full_start)`` and ``[full_end, end)``, are partial tiles
  that need the elementwise mask.

The same function serves both directions: per query tile from ``(k_lo, k_hi)`` (forward and dq passes,
columns = keys) and per key tile from ``(q_lo, q_hi)`` (dk/dv pass, columns = queries).

Example: one row of 8 tokens ``q q a a q q a a`` under ISM, tiles of 4 rows and 2 columns::

    >>> r = make_attention_ranges(jnp.array([[1, 1, 2, 2, 1, 1, 2, 2]]))
    >>> tile_bounds(r.k_lo, r.k_hi, row_tile=4, col_tile=2)[0]   # (start, full_start, full_end, end)
    Array([[0, 0, 1, 2],
           [0, 0, 3, 4]], dtype=int32)

Rows 0-3 see keys 0-1 fully (the open query block and the answers after it) and keys 2-3 partially
(answers are causal); rows 4-7 see keys 0-5 fully and keys 6-7 partially.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ism_jax.masks import MaskRanges

# Index of each field along the last axis of a bounds array.
START, FULL_START, FULL_END, END = 0, 1, 2, 3


# Names of the differentiable kernels' forward residuals for remat policies (jax.checkpoint_policies names):
# a policy that saves them keeps the backward pass from running the forward kernel again.
RESIDUAL_NAMES = ("attention_out", "attention_lse")


def name_residuals(out: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(out, lse)`` of a kernel's forward named :data:`RESIDUAL_NAMES` (identity outside a remat)."""
  return checkpoint_name(out, RESIDUAL_NAMES[0]), checkpoint_name(lse, RESIDUAL_NAMES[1])


def check_kernel_inputs(kernel: str, q_BTHD, k_BSKD, v_BSKD, ranges: MaskRanges) -> None:
  """The differentiable kernels' contract (``kernel`` names the caller in the errors): equal query and key
  lengths, ``k`` and ``v`` of one shape, whole query groups per KV head, all four ranges."""
  if q_BTHD.shape[1] != k_BSKD.shape[1] or k_BSKD.shape != v_BSKD.shape:
    raise ValueError(f"{kernel} attention needs equal query and key lengths and k, v of one shape; got q "
                     f"{q_BTHD.shape}, k {k_BSKD.shape}, v {v_BSKD.shape}")
  check_head_groups(q_BTHD, k_BSKD)
  if ranges.q_lo is None or ranges.q_hi is None:
    raise ValueError(f"{kernel} attention needs the per-key ranges q_lo, q_hi (make_attention_ranges)")


def check_forward_only_inputs(name: str, q_BTHD, k_BSKD, v_BSKD, ranges) -> None:
  """The inputs of a forward-only kernel path (``name`` is named in errors): q ``[B, T, H, D]``, k and v
  ``[B, S, K, D]`` of one shape, whole query groups per KV head, ranges ``[B, T]``."""
  if (q_BTHD.ndim != 4 or k_BSKD.ndim != 4 or k_BSKD.shape != v_BSKD.shape
      or q_BTHD.shape[0] != k_BSKD.shape[0] or q_BTHD.shape[3] != k_BSKD.shape[3]):
    raise ValueError(f"{name} attention_forward needs q [B, T, H, D] and k, v [B, S, K, D] of one shape; "
                     f"got q {q_BTHD.shape}, k {k_BSKD.shape}, v {v_BSKD.shape}")
  check_head_groups(q_BTHD, k_BSKD)
  if ranges.k_lo.shape != q_BTHD.shape[:2] or ranges.k_hi.shape != q_BTHD.shape[:2]:
    raise ValueError(f"ranges.k_lo and k_hi must have shape {q_BTHD.shape[:2]}, got {ranges.k_lo.shape} "
                     f"and {ranges.k_hi.shape}")


def check_head_groups(q_BTHD, k_BSKD) -> None:
  """Every KV head serves the same number of query heads."""
  if q_BTHD.shape[2] % k_BSKD.shape[2]:
    raise ValueError(f"{q_BTHD.shape[2]} query heads are not a multiple of {k_BSKD.shape[2]} KV heads")


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """``x`` zero-padded at the end of ``axis`` to ``size`` (unchanged when already that long)."""
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _ceil_div(x: jax.Array, d: int) -> jax.Array:
  return (x + d - 1) // d


def tile_bounds(lo_BT: jax.Array, hi_BT: jax.Array, *, row_tile: int, col_tile: int) -> jax.Array:
  """Per row tile, the runs of column tiles to visit and to visit without a mask.

  Args:
    lo_BT, hi_BT: ``[B, T]`` int32, non-decreasing; row ``t`` sees columns ``[lo[t], hi[t])``.
      ``T`` must be a multiple of ``row_tile``.
    row_tile, col_tile: tile sizes along the rows and the columns.

  Returns:
    ``[B, T // row_tile, 4]`` int32: ``(start, full_start, full_end, end)`` in column-tile units, with
    ``start <= full_start <= full_end <= end``; tiles in ``[start, full_start)`` and ``[full_end, end)``
    need the elementwise mask, tiles in ``[full_start, full_end)`` do not, the rest are skipped.
  """
  batch, length = lo_BT.shape
  if length % row_tile:
    raise ValueError(f"sequence length {length} is not a multiple of the row tile {row_tile}")
  lo_BNR = lo_BT.reshape(batch, length // row_tile, row_tile)
  hi_BNR = hi_BT.reshape(batch, length // row_tile, row_tile)
  first_lo, last_lo = lo_BNR[..., 0], lo_BNR[..., -1]
  first_hi, last_hi = hi_BNR[..., 0], hi_BNR[..., -1]
  start = first_lo // col_tile
  end = _ceil_div(last_hi, col_tile)
  full_start = jnp.clip(_ceil_div(last_lo, col_tile), start, end)
  full_end = jnp.clip(first_hi // col_tile, full_start, end)
  return jnp.stack([start, full_start, full_end, end], axis=-1).astype(jnp.int32)


def query_tile_bounds(ranges: MaskRanges, *, q_tile: int, k_tile: int) -> jax.Array:
  """``[B, T // q_tile, 4]``: key-tile runs per query tile (forward and dq passes)."""
  return tile_bounds(ranges.k_lo, ranges.k_hi, row_tile=q_tile, col_tile=k_tile)


def key_tile_bounds(ranges: MaskRanges, *, k_tile: int, q_tile: int) -> jax.Array:
  """``[B, T // k_tile, 4]``: query-tile runs per key tile (dk/dv pass)."""
  if ranges.q_lo is None or ranges.q_hi is None:
    raise ValueError("the dk/dv pass needs the per-key ranges q_lo, q_hi; build them with "
                     "ism_jax.masks.make_attention_ranges")
  return tile_bounds(ranges.q_lo, ranges.q_hi, row_tile=k_tile, col_tile=q_tile)


def pad_ranges(ranges: MaskRanges, padded_length: int) -> MaskRanges:
  """Extends the ranges to ``padded_length`` with padding rows that see only themselves."""
  length = ranges.k_lo.shape[-1]
  pad = padded_length - length
  if pad == 0:
    return ranges
  extra = jnp.arange(length, padded_length, dtype=jnp.int32)[None, :]
  extra = jnp.broadcast_to(extra, (ranges.k_lo.shape[0], pad))

  def extend(x, offset):
    return None if x is None else jnp.concatenate([x.astype(jnp.int32), extra + offset], axis=1)

  return MaskRanges(k_lo=extend(ranges.k_lo, 0), k_hi=extend(ranges.k_hi, 1),
                    q_lo=extend(ranges.q_lo, 0), q_hi=extend(ranges.q_hi, 1))


def pad_rows_repeating_last(lo_BT: jax.Array, hi_BT: jax.Array, padded_length: int
                            ) -> tuple[jax.Array, jax.Array]:
  """Extends per-row ranges ``[B, T]`` to ``[B, padded_length]`` by repeating each row's last range.

  For query chunks over a longer key axis (``T != S``), where "sees only itself" has no meaning: the
  repeated range keeps ``lo`` and ``hi`` non-decreasing, so the padded row tiles classify like the real
  ones, and the padding rows' outputs are finite (they are sliced away).
  """
  pad = padded_length - lo_BT.shape[-1]
  if pad == 0:
    return lo_BT, hi_BT
  extend = lambda x: jnp.concatenate([x, jnp.repeat(x[:, -1:], pad, axis=1)], axis=1)
  return extend(lo_BT), extend(hi_BT)
