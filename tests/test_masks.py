"""The three mask kinds against hand-drawn matrices and a brute-force oracle; ranges; validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ism_jax import masks
from ism_jax.masks import SegmentType, make_attention_mask, make_attention_ranges, validate_segments
from tests import layouts


def _matrix(text: str) -> np.ndarray:
  return np.array([[c == "1" for c in line.split()] for line in text.strip().splitlines()])


WORKED_TYPES = [[1, 1, 2, 2, 1, 1, 2, 2]]  # q1 q1' a1 a1' q2 q2' a2 a2'

HAND_DRAWN = {
    "ism": """
        1 1 . . . . . .
        1 1 . . . . . .
        1 1 1 . . . . .
        1 1 1 1 . . . .
        1 1 1 1 1 1 . .
        1 1 1 1 1 1 . .
        1 1 1 1 1 1 1 .
        1 1 1 1 1 1 1 1""",
    "causal": """
        1 . . . . . . .
        1 1 . . . . . .
        1 1 1 . . . . .
        1 1 1 1 . . . .
        1 1 1 1 1 . . .
        1 1 1 1 1 1 . .
        1 1 1 1 1 1 1 .
        1 1 1 1 1 1 1 1""",
    "prefix": """
        1 1 1 1 1 1 . .
        1 1 1 1 1 1 . .
        1 1 1 1 1 1 . .
        1 1 1 1 1 1 . .
        1 1 1 1 1 1 . .
        1 1 1 1 1 1 . .
        1 1 1 1 1 1 1 .
        1 1 1 1 1 1 1 1""",
}

PACKED_TYPES = [[1, 1, 2, 1, 2, 2, 0, 0]]
PACKED_IDS = [[1, 1, 1, 2, 2, 2, 0, 0]]
PACKED_ISM = """
    1 1 . . . . . .
    1 1 . . . . . .
    1 1 1 . . . . .
    . . . 1 . . . .
    . . . 1 1 . . .
    . . . 1 1 1 . .
    . . . . . . 1 .
    . . . . . . . 1"""


@pytest.mark.parametrize("kind", masks.MASK_KINDS)
def test_worked_example_matches_hand_drawn(kind):
  expected = _matrix(HAND_DRAWN[kind])
  np.testing.assert_array_equal(make_attention_mask(jnp.array(WORKED_TYPES), kind=kind)[0], expected)
  ranges = make_attention_ranges(jnp.array(WORKED_TYPES), kind=kind)
  np.testing.assert_array_equal(ranges.dense()[0], expected)


def test_packed_example_matches_hand_drawn():
  types, ids = jnp.array(PACKED_TYPES), jnp.array(PACKED_IDS)
  np.testing.assert_array_equal(make_attention_mask(types, ids)[0], _matrix(PACKED_ISM))
  ranges = make_attention_ranges(types, ids)
  np.testing.assert_array_equal(ranges.k_lo[0], [0, 0, 0, 3, 3, 3, 6, 7])
  np.testing.assert_array_equal(ranges.k_hi[0], [2, 2, 3, 4, 5, 6, 7, 8])
  np.testing.assert_array_equal(ranges.q_lo[0], [0, 0, 2, 3, 4, 5, 6, 7])
  np.testing.assert_array_equal(ranges.q_hi[0], [3, 3, 3, 6, 6, 6, 7, 8])


def test_consecutive_query_messages_form_one_block():
  # Two query messages back to back (system + user) are one QUERY run: one bidirectional block.
  types = jnp.array([[1, 1, 1, 1, 2, 2]])
  mask = make_attention_mask(types)[0]
  assert bool(mask[:4, :4].all()) and not bool(mask[:4, 4:].any())


def test_adjacent_dialogues_do_not_merge_query_blocks():
  # Dialogue 1 ends with a query, dialogue 2 starts with one: two blocks, no attention across.
  types = jnp.array([[2, 1, 1, 1, 1, 2]])
  ids = jnp.array([[1, 1, 1, 2, 2, 2]])
  mask = np.asarray(make_attention_mask(types, ids)[0])
  assert not mask[1:3, 3:].any() and not mask[3:, :3].any()
  assert mask[1, 2] and mask[3, 4]


@pytest.mark.parametrize("kind", masks.MASK_KINDS)
def test_random_layouts_match_brute_force_oracle(kind):
  rng = np.random.default_rng({"ism": 0, "causal": 1, "prefix": 2}[kind])
  for _ in range(4):
    batch = layouts.random_packed_batch(rng, batch=6, length=40, max_block=int(rng.integers(2, 7)))
    types, ids = batch["segment_types"], batch["segment_ids"]
    expected = layouts.brute_force_mask(types, ids, kind)
    dense = np.asarray(make_attention_mask(jnp.asarray(types), jnp.asarray(ids), kind))
    np.testing.assert_array_equal(dense, expected)
    ranges = make_attention_ranges(jnp.asarray(types), jnp.asarray(ids), kind)
    np.testing.assert_array_equal(np.asarray(ranges.dense()), expected)
    # The per-key ranges describe the same mask, read by column.
    queries = np.arange(types.shape[1])
    by_key = (np.asarray(ranges.q_lo)[:, None, :] <= queries[None, :, None]) & (
        queries[None, :, None] < np.asarray(ranges.q_hi)[:, None, :])
    np.testing.assert_array_equal(by_key, expected)
    for name in ("k_lo", "k_hi", "q_lo", "q_hi"):
      assert (np.diff(np.asarray(getattr(ranges, name)), axis=1) >= 0).all(), f"{name} not monotone"


def test_ranges_are_jittable_and_default_ids_mean_one_dialogue_per_row():
  types = jnp.array([[1, 1, 2, 2, 0], [2, 2, 2, 0, 0]])
  jitted = jax.jit(make_attention_ranges, static_argnames="kind")(types, kind="ism")
  eager = make_attention_ranges(types)
  for name in ("k_lo", "k_hi", "q_lo", "q_hi"):
    np.testing.assert_array_equal(getattr(jitted, name), getattr(eager, name))
  one_dialogue = (types != 0).astype(jnp.int32)
  np.testing.assert_array_equal(make_attention_mask(types), make_attention_mask(types, one_dialogue))


def test_positions_restart_per_dialogue():
  ids = jnp.array([[1, 1, 1, 2, 2, 0, 0]])
  np.testing.assert_array_equal(masks.positions_from_segment_ids(ids)[0], [0, 1, 2, 0, 1, 0, 1])


def test_every_row_sees_at_least_itself(packed_batch):
  for kind in masks.MASK_KINDS:
    mask = np.asarray(make_attention_mask(jnp.asarray(packed_batch["segment_types"]),
                                          jnp.asarray(packed_batch["segment_ids"]), kind))
    assert np.diagonal(mask, axis1=1, axis2=2).all()


# ---- validation -------------------------------------------------------------------------------------------


def test_trace_time_shape_and_dtype_errors():
  with pytest.raises(ValueError, match=r"segment_types must have shape \[batch, length\]"):
    make_attention_ranges(jnp.ones((4,), jnp.int32))
  with pytest.raises(TypeError, match="segment_types must be an integer array"):
    make_attention_ranges(jnp.ones((1, 4), jnp.float32))
  with pytest.raises(ValueError, match="segment_ids has shape"):
    make_attention_ranges(jnp.ones((1, 4), jnp.int32), jnp.ones((1, 5), jnp.int32))
  with pytest.raises(ValueError, match="mask kind must be one of"):
    make_attention_ranges(jnp.ones((1, 4), jnp.int32), kind="bidirectional")


@pytest.mark.parametrize("types, ids, message", [
    ([[1, 2, 7]], None, r"segment_types\[row 0, position 2\] = 7"),
    ([[1, 2, 0]], [[1, 1, 1]], r"disagree at row 0, position 2"),
    ([[1, 2, 1, 2]], [[1, 2, 1, 2]],
     r"segment_ids\[row 0\]: dialogue 1 is not one contiguous run .*position 2"),
    ([[1, 0, 2]], None, r"padding splits the row's tokens .*position 2"),
    ([[1, 2]], [[-1, 1]], r"segment_ids\[row 0, position 0\] is negative"),
])
def test_value_validation_names_array_and_position(types, ids, message):
  with pytest.raises(ValueError, match=message):
    validate_segments(np.array(types), None if ids is None else np.array(ids))


def test_loss_mask_check_refuses_visible_targets():
  types = np.array([[1, 1, 1, 2, 2, 1, 2]])
  ok = np.array([[0, 0, 1, 1, 0, 1, 0]])  # last query token -> first answer token, answers -> answers
  validate_segments(types, loss_mask=ok, kind="ism")
  with pytest.raises(ValueError, match=r"loss_mask\[row 0, position 0\] = 1 .* 'ism'"):
    validate_segments(types, loss_mask=np.array([[1, 0, 0, 0, 0, 0, 0]]), kind="ism")
  # Loss on an earlier answer leaks under prefix (it sits inside the bidirectional block) but not under ISM.
  earlier_answer = np.array([[0, 0, 0, 1, 0, 0, 0]])
  validate_segments(types, loss_mask=earlier_answer, kind="ism")
  with pytest.raises(ValueError, match="'prefix'"):
    validate_segments(types, loss_mask=earlier_answer, kind="prefix")
  # A target across a dialogue boundary is refused too.
  with pytest.raises(ValueError, match=r"position 2"):
    validate_segments(np.array([[1, 2, 2, 2]]), np.array([[1, 1, 1, 2]]),
                      loss_mask=np.array([[0, 0, 1, 0]]), kind="causal")


def test_segment_type_values():
  assert [int(t) for t in SegmentType] == [0, 1, 2]
  assert SegmentType.QUERY.name == "QUERY"
