"""Attention masks from per-token segment arrays: causal, prefix and ISM.

A multi-turn dialogue is one sequence ``Q1 A1 Q2 A2 ... Qn An``. Every token carries a segment type
(``PAD = 0``, ``QUERY = 1``, ``ANSWER = 2``) and, when several dialogues are packed into one row, a
segment id (``1, 2, ...``; ``0`` is padding). The three mask kinds are functions of these arrays alone:

* ``causal``: every token sees itself and the earlier tokens of its dialogue.
* ``ism`` (Intermittent Semi-working Mask): each *query block* (maximal run of QUERY tokens in a dialogue)
  is bidirectional within itself; answer tokens are causal; no token sees a later block.
* ``prefix``: everything before the dialogue's last answer block is one bidirectional block; that answer
  is causal.

Worked example (ISM), two tokens per segment; row = query position, column = key position::

            q1 q1' a1 a1' q2 q2' a2 a2'
    q1       1  1  .  .   .  .   .  .      ISM differs from causal only at (q1, q1') and (q2, q2'):
    q1'      1  1  .  .   .  .   .  .      inside each query block the upper triangle is open.
    a1       1  1  1  .   .  .   .  .
    a1'      1  1  1  1   .  .   .  .
    q2       1  1  1  1   1  1   .  .
    q2'      1  1  1  1   1  1   .  .
    a2       1  1  1  1   1  1   1  .
    a2'      1  1  1  1   1  1   1  1

Packed example: one row holding dialogue 1 = ``q q a`` and dialogue 2 = ``q a a`` and two pads::

    segment_types = [1, 1, 2,  1, 2, 2,  0, 0]
    segment_ids   = [1, 1, 1,  2, 2, 2,  0, 0]

              0  1  2   3  4  5   6  7
    0  q      1  1  .   .  .  .   .  .
    1  q      1  1  .   .  .  .   .  .
    2  a      1  1  1   .  .  .   .  .
    3  q      .  .  .   1  .  .   .  .     dialogue 2 never sees dialogue 1
    4  a      .  .  .   1  1  .   .  .
    5  a      .  .  .   1  1  1   .  .
    6  pad    .  .  .   .  .  .   1  .     padding sees only itself; nobody sees padding
    7  pad    .  .  .   .  .  .   .  1

All three kinds reduce to ISM on relabelled types (:func:`effective_segment_types`): ``causal`` turns every
QUERY into ANSWER, ``prefix`` turns every token before the dialogue's last answer block into QUERY.

**The O(T) range form.** With contiguous dialogues and blocks, the keys visible to query ``j`` form one
range ``[k_lo(j), k_hi(j))`` and the queries that see key ``i`` form one range ``[q_lo(i), q_hi(i))``::

    k_lo(j) = start of j's dialogue
    k_hi(j) = end of j's query block (exclusive) if j is QUERY, else j + 1
    q_lo(i) = start of i's query block if i is QUERY, else i
    q_hi(i) = end of i's dialogue (exclusive)
    padding: k_lo = q_lo = j, k_hi = q_hi = j + 1

All four are non-decreasing in position, so a kernel tile reads its bounds off its first and last rows.
They cost O(B·T) and are shared by every layer. The dense ``[B, T, T]`` mask (:func:`make_attention_mask`)
is the test oracle and the CPU reference; it is built from a second, independent formulation (a block
counter) so the two check each other.
"""

from __future__ import annotations

import dataclasses
import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np

MASK_KINDS = ("causal", "prefix", "ism")


class SegmentType(enum.IntEnum):
  """Per-token role: padding, query side (bidirectional under ISM), answer side (causal)."""

  PAD = 0
  QUERY = 1
  ANSWER = 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskRanges:
  """The O(T) form of an attention mask. All arrays int32.

  Query ``t`` may attend to key ``s`` iff ``k_lo[b, t] <= s < k_hi[b, t]``; equivalently key ``s`` is seen
  by query ``t`` iff ``q_lo[b, s] <= t < q_hi[b, s]``. Indices are positions along the key axis (for
  ``k_*``) and the query axis (for ``q_*``); in training both axes are the same sequence.

  Attributes:
    k_lo, k_hi: ``[B, T]`` per query, the half-open range of visible keys.
    q_lo, q_hi: ``[B, S]`` per key, the half-open range of queries that see it. ``None`` where only the
      per-query form is needed (decoding against a KV cache).
  """

  k_lo: jax.Array
  k_hi: jax.Array
  q_lo: jax.Array | None = None
  q_hi: jax.Array | None = None

  def dense(self, num_keys: int | None = None) -> jax.Array:
    """The ``[B, T, S]`` boolean mask these ranges describe (for reference paths and tests)."""
    num_keys = self.k_hi.shape[-1] if num_keys is None else num_keys
    keys = jnp.arange(num_keys, dtype=jnp.int32)
    return (self.k_lo[:, :, None] <= keys) & (keys < self.k_hi[:, :, None])


# ----------------------------------------------------------------------------------------------------------
# Trace-time checks (shapes and dtypes).
# ----------------------------------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
  if kind not in MASK_KINDS:
    raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {kind!r}")


def _check_int_array(name: str, x, shape=None) -> None:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  if x.ndim != 2:
    raise ValueError(f"{name} must have shape [batch, length], got shape {tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
  if shape is not None and tuple(x.shape) != tuple(shape):
    raise ValueError(
        f"{name} has shape {tuple(x.shape)} but segment_types has shape {tuple(shape)}; "
        "all per-token arrays must share one [batch, length] shape"
    )


def check_segment_arrays(segment_types, segment_ids=None, **others) -> None:
  """Raises at trace time if per-token arrays have the wrong rank, dtype or mismatched shapes."""
  _check_int_array("segment_types", segment_types)
  if segment_ids is not None:
    _check_int_array("segment_ids", segment_ids, segment_types.shape)
  for name, array in others.items():
    if array is not None:
      _check_int_array(name, array, segment_types.shape)


# ----------------------------------------------------------------------------------------------------------
# O(T) building blocks. Each takes [B, T] arrays and runs inside jit.
# ----------------------------------------------------------------------------------------------------------


def _run_starts(is_start: jax.Array) -> jax.Array:
  """Index of the most recent ``True`` at or before each position (``is_start[:, 0]`` must be True)."""
  index = jnp.arange(is_start.shape[-1], dtype=jnp.int32)
  return jax.lax.cummax(jnp.where(is_start, index, 0), axis=1)


def _run_ends(is_end: jax.Array) -> jax.Array:
  """One past the index of the next ``True`` at or after each position (``is_end[:, -1]`` must be True)."""
  length = is_end.shape[-1]
  index = jnp.arange(length, dtype=jnp.int32)
  return jax.lax.cummin(jnp.where(is_end, index + 1, length), axis=1, reverse=True)


def _changes(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(starts, ends): whether each position begins / ends a run of equal values of ``x`` along a row."""
  differs = x[:, 1:] != x[:, :-1]
  edge = jnp.ones_like(x[:, :1], dtype=bool)
  return jnp.concatenate([edge, differs], axis=1), jnp.concatenate([differs, edge], axis=1)


def default_segment_ids(segment_types: jax.Array) -> jax.Array:
  """One dialogue per row: id 1 for every real token, 0 for padding."""
  return (segment_types != SegmentType.PAD).astype(jnp.int32)


def dialogue_bounds(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(start, end)`` of each token's dialogue (end exclusive), ``[B, T]`` int32 each."""
  starts, ends = _changes(segment_ids)
  return _run_starts(starts), _run_ends(ends)


def positions_from_segment_ids(segment_ids: jax.Array) -> jax.Array:
  """Position of every token within its dialogue (0 at each dialogue start), ``[B, T]`` int32."""
  start, _ = dialogue_bounds(segment_ids)
  return jnp.arange(segment_ids.shape[-1], dtype=jnp.int32) - start


def effective_segment_types(segment_types, segment_ids=None, kind: str = "ism") -> jax.Array:
  """Relabels segment types so that the ISM rules produce the mask of ``kind``.

  * ``ism``: unchanged.
  * ``causal``: every QUERY becomes ANSWER (types then only mark padding).
  * ``prefix``: every real token before the start of its dialogue's last answer block becomes QUERY, so
    the whole history plus the current query is one bidirectional block. A dialogue with no answer is one
    query block.
  """
  _check_kind(kind)
  types = jnp.asarray(segment_types, jnp.int32)
  if kind == "ism":
    return types
  if kind == "causal":
    return jnp.where(types == SegmentType.QUERY, SegmentType.ANSWER, types).astype(jnp.int32)
  ids = default_segment_ids(types) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
  index = jnp.arange(types.shape[-1], dtype=jnp.int32)
  dialogue_start, dialogue_end = dialogue_bounds(ids)
  answer_starts, _ = _changes(types)
  answer_starts = answer_starts & (types == SegmentType.ANSWER)
  answer_starts = answer_starts | ((types == SegmentType.ANSWER) & (index == dialogue_start))
  # The latest answer-block start up to each position; read at the dialogue's last token, it is the start
  # of that dialogue's last answer block (or belongs to an earlier dialogue, meaning "no answer").
  latest = jax.lax.cummax(jnp.where(answer_starts, index, -1), axis=1)
  last_answer_start = jnp.take_along_axis(latest, dialogue_end - 1, axis=1)
  has_answer = last_answer_start >= dialogue_start
  before_last_answer = ~has_answer | (index < last_answer_start)
  is_real = types != SegmentType.PAD
  return jnp.where(is_real & before_last_answer, SegmentType.QUERY, types).astype(jnp.int32)


def _query_block_bounds(types: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(start, end)`` of each token's run of equal (type, dialogue), end exclusive; ``[B, T]`` each."""
  type_starts, type_ends = _changes(types)
  id_starts, id_ends = _changes(ids)
  return _run_starts(type_starts | id_starts), _run_ends(type_ends | id_ends)


def make_attention_ranges(segment_types, segment_ids=None, kind: str = "ism") -> MaskRanges:
  """The O(T) range form of the ``kind`` mask (see the module docstring). Jittable.

  Args:
    segment_types: ``[B, T]`` int, values in ``SegmentType``.
    segment_ids: ``[B, T]`` int dialogue ids (0 = padding), or ``None`` for one dialogue per row.
    kind: ``"causal"``, ``"prefix"`` or ``"ism"``.

  Returns:
    ``MaskRanges`` with ``k_lo, k_hi, q_lo, q_hi`` of shape ``[B, T]``, int32.
  """
  check_segment_arrays(segment_types, segment_ids)
  types = effective_segment_types(segment_types, segment_ids, kind)
  ids = default_segment_ids(types) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
  index = jnp.arange(types.shape[-1], dtype=jnp.int32)
  is_query = types == SegmentType.QUERY
  is_pad = types == SegmentType.PAD
  dialogue_start, dialogue_end = dialogue_bounds(ids)
  block_start, block_end = _query_block_bounds(types, ids)
  k_lo = jnp.where(is_pad, index, dialogue_start)
  k_hi = jnp.where(is_query, block_end, index + 1)
  q_lo = jnp.where(is_query, block_start, index)
  q_hi = jnp.where(is_pad, index + 1, dialogue_end)
  return MaskRanges(k_lo=k_lo, k_hi=k_hi, q_lo=q_lo, q_hi=q_hi)


def chunk_ranges(types_BT: jax.Array, start_B: jax.Array, from_start: bool) -> MaskRanges:
  """Mask ranges of a chunk written into a KV cache at slots ``start_B[b] + t``, in slot coordinates.

  ``types_BT`` are the mask-effective segment types (:func:`effective_segment_types`) with padding (``PAD``)
  at the end of each row; the cache before ``start_B[b]`` holds the row's earlier tokens. With
  ``from_start`` every row with tokens starts at slot 0 and keys are the chunk itself, so the full range
  form (``q_lo``/``q_hi`` too, which the differentiable kernels take) is that of the chunk. Otherwise real
  tokens see ``[0, start + chunk-local k_hi)`` and padding tokens repeat the last real token's range (a row
  without tokens sees slot 0), so ``k_hi`` stays non-decreasing along the chunk as kernel tile bounds need;
  padding rows are never read.

  Returns:
    ``MaskRanges``, ``[B, T]`` int32 arrays (``k_lo, k_hi`` only unless ``from_start``).
  """
  ranges = make_attention_ranges(types_BT)
  if from_start:
    return ranges
  real_BT = types_BT != SegmentType.PAD
  k_hi_BT = jax.lax.cummax(jnp.where(real_BT, ranges.k_hi + start_B[:, None], 1), axis=1)
  return MaskRanges(k_lo=jnp.zeros_like(k_hi_BT), k_hi=k_hi_BT)


def decode_ranges(fill_B: jax.Array) -> MaskRanges:
  """Mask ranges ``[B, 1]`` of one new token per row written at slot ``fill_B[b]``: it sees ``[0, fill + 1)``
  (an answer token is causal; everything earlier in the cache is its own dialogue)."""
  return MaskRanges(k_lo=jnp.zeros_like(fill_B)[:, None], k_hi=fill_B[:, None] + 1)


def make_attention_mask(segment_types, segment_ids=None, kind: str = "ism") -> jax.Array:
  """The dense ``[B, T, T]`` boolean mask (query, key) of ``kind``: the oracle and CPU reference.

  Built from the block-counter form, independent of :func:`make_attention_ranges`: a counter increments at
  every answer token and at the first token of every query block; key ``i`` is visible to query ``j`` iff
  both are in the same dialogue and ``block(i) <= block(j)``. Padding sees only itself.

  Example (ISM, the packed row of the module docstring)::

    >>> types = jnp.array([[1, 1, 2, 1, 2, 2, 0, 0]])
    >>> ids = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0]])
    >>> make_attention_mask(types, ids)[0, 1].astype(int)   # second query token of dialogue 1
    Array([1, 1, 0, 0, 0, 0, 0, 0], dtype=int32)
  """
  check_segment_arrays(segment_types, segment_ids)
  types = effective_segment_types(segment_types, segment_ids, kind)
  ids = default_segment_ids(types) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
  type_starts, _ = _changes(types)
  id_starts, _ = _changes(ids)
  opens_block = (types == SegmentType.ANSWER) | (
      (types == SegmentType.QUERY) & (type_starts | id_starts)
  )
  block = jnp.cumsum(opens_block.astype(jnp.int32), axis=1)
  same_dialogue = ids[:, :, None] == ids[:, None, :]
  earlier_block = block[:, None, :] <= block[:, :, None]
  is_real = types != SegmentType.PAD
  real = same_dialogue & earlier_block & is_real[:, :, None] & is_real[:, None, :]
  eye = jnp.eye(types.shape[-1], dtype=bool)[None]
  return real | (eye & ~is_real[:, :, None])


def leaking_targets(loss_mask, ranges: MaskRanges, segment_ids) -> jax.Array:
  """``[B, T]`` bool: positions whose loss would train a target the position can already see.

  Position ``t`` with ``loss_mask[t] = 1`` is trained to predict token ``t + 1``. That is a leak when
  ``t + 1`` is inside ``t``'s visible range (``t + 1 < k_hi[t]``, e.g. a query token that is not the last
  of its block under ISM). A target in another dialogue or in padding is also refused.
  """
  loss_mask = jnp.asarray(loss_mask) != 0
  ids = jnp.asarray(segment_ids, jnp.int32)
  index = jnp.arange(loss_mask.shape[-1], dtype=jnp.int32)
  next_id = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
  bad_target = (next_id != ids) | (ids == 0)
  visible_target = index + 1 < ranges.k_hi
  return loss_mask & (bad_target | visible_target)


@functools.partial(jax.jit, static_argnames="kind")
def _leaks(types, ids, loss_mask, kind):
  return leaking_targets(loss_mask, make_attention_ranges(types, ids, kind), ids)


# ----------------------------------------------------------------------------------------------------------
# Host-side value validation (numpy; call on batches before they enter a jitted step).
# ----------------------------------------------------------------------------------------------------------


def _where(array: np.ndarray) -> str:
  row, col = (int(i) for i in np.argwhere(array)[0])
  return f"row {row}, position {col}"


def _check_contiguous(ids: np.ndarray, derived: bool) -> None:
  """Raises unless each dialogue is one contiguous run of its row (padding may sit anywhere); ``derived``:
  the ids were derived from the segment types (no ``segment_ids`` given)."""
  for row in range(ids.shape[0]):
    run_ids = ids[row][np.concatenate([[True], ids[row, 1:] != ids[row, :-1]])]
    run_ids = run_ids[run_ids != 0]
    unique, counts = np.unique(run_ids, return_counts=True)
    if (counts > 1).any():
      repeated = unique[counts > 1][0]
      cols = np.flatnonzero(ids[row] == repeated)
      resumes = cols[np.flatnonzero(np.diff(cols) > 1)[0] + 1]
      if derived:
        raise ValueError(
            f"segment_types[row {row}]: padding splits the row's tokens (they resume at position "
            f"{resumes}); without segment_ids a row holds one dialogue, so pass segment_ids for packed rows"
        )
      raise ValueError(
          f"segment_ids[row {row}]: dialogue {repeated} is not one contiguous run (it resumes at position "
          f"{resumes}); pack each dialogue as one run"
      )


def validate_segments(segment_types, segment_ids=None, loss_mask=None, kind: str = "ism") -> None:
  """Checks the values of a batch's per-token arrays; raises ``ValueError`` naming array and position.

  Checks: shapes and dtypes; segment types in {0, 1, 2}; segment ids non-negative, 0 exactly where the type
  is PAD, each dialogue one contiguous run in its row; and, given ``loss_mask``, that no trained target is
  visible to its position under ``kind`` (see :func:`leaking_targets`).

  Example:
    >>> validate_segments(np.array([[1, 3]]))
    Traceback (most recent call last):
    ValueError: segment_types[row 0, position 1] = 3: expected 0 (PAD), 1 (QUERY) or 2 (ANSWER)
  """
  _check_kind(kind)
  types = np.asarray(segment_types)
  check_segment_arrays(types, None if segment_ids is None else np.asarray(segment_ids),
                       loss_mask=None if loss_mask is None else np.asarray(loss_mask))
  bad = ~np.isin(types, [int(t) for t in SegmentType])
  if bad.any():
    row, col = np.argwhere(bad)[0]
    raise ValueError(
        f"segment_types[row {row}, position {col}] = {types[row, col]}: "
        "expected 0 (PAD), 1 (QUERY) or 2 (ANSWER)"
    )
  if segment_ids is None:
    ids = (types != SegmentType.PAD).astype(np.int32)
  else:
    ids = np.asarray(segment_ids)
    if (ids < 0).any():
      raise ValueError(f"segment_ids[{_where(ids < 0)}] is negative; ids are 1, 2, ... and 0 = padding")
    mismatch = (ids == 0) != (types == SegmentType.PAD)
    if mismatch.any():
      raise ValueError(
          f"segment_ids and segment_types disagree at {_where(mismatch)}: padding must have segment id 0 "
          "and type PAD together"
      )
  _check_contiguous(ids, derived=segment_ids is None)
  if loss_mask is not None:
    leaks = np.asarray(_leaks(jnp.asarray(types), jnp.asarray(ids), jnp.asarray(loss_mask), kind))
    if leaks.any():
      row, col = np.argwhere(leaks)[0]
      raise ValueError(
          f"loss_mask[row {row}, position {col}] = 1 trains a target that position can see under the "
          f"{kind!r} mask (or a target outside its dialogue); put loss only on positions whose next token "
          "is an answer token not visible to them (under 'ism': answers and the last token of each query "
          "block; under 'prefix': the last answer block only)"
      )
