"""Packing layout, positions, loss-mask rules, truncation counts and triplet expansion."""

import numpy as np
import pytest

from ism_jax.data.chat_template import EncodedDialogue
from ism_jax.data.packing import (FirstFitPacker, PackingStats, answer_numbers, expand_triplets,
                                  pack_examples, prepare_examples, select_targets, truncate_rounds)
from ism_jax.masks import validate_segments


def dialogue(*rounds, start=100):
  """A dialogue from ``(query_len, answer_len)`` per round; token ids count up from ``start``."""
  types, index = [], []
  for k, (q, a) in enumerate(rounds):
    types += [1] * q + [2] * a
    index += [k] * (q + a)
  types = np.asarray(types, np.int32)
  return EncodedDialogue(tokens=np.arange(start, start + len(types), dtype=np.int32), segment_types=types,
                         round_index=np.asarray(index, np.int32),
                         answer_targets=(types == 2).astype(np.int32))


def check_valid(batch, kinds=("ism", "causal")):
  for kind in kinds:
    validate_segments(batch["segment_types"], batch["segment_ids"], batch["loss_mask"], kind)


def test_packed_row_pinned_by_hand():
  """The example of the packing module docstring."""
  a, b = dialogue((2, 2), start=10), dialogue((2, 1), (2, 1), start=20)
  [batch] = list(pack_examples([a, b], seq_len=12, num_rows=1))
  np.testing.assert_array_equal(batch["tokens"][0], [10, 11, 12, 13, 20, 21, 22, 23, 24, 25, 0, 0])
  np.testing.assert_array_equal(batch["segment_types"][0], [1, 1, 2, 2, 1, 1, 2, 1, 1, 2, 0, 0])
  np.testing.assert_array_equal(batch["segment_ids"][0], [1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0])
  np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 0])
  np.testing.assert_array_equal(batch["round_index"][0], [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, -1, -1])
  np.testing.assert_array_equal(batch["loss_mask"][0], [0, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0])
  assert all(v.dtype == np.int32 and v.shape == (1, 12) for v in batch.values())
  check_valid(batch)
  np.testing.assert_array_equal(answer_numbers(batch)[0], [0, 1, 1, 0, 0, 2, 0, 0, 3, 0, 0, 0])


def test_first_fit_fills_earlier_rows_first_and_emits_when_nothing_fits():
  sizes = [6, 5, 3, 2, 4]  # rows of 8: [6, 2], [5, 3]; then 4 fits nowhere -> new batch
  examples = [dialogue((s - 1, 1), start=10 * i) for i, s in enumerate(sizes)]
  batches = list(pack_examples(examples, seq_len=8, num_rows=2))
  assert len(batches) == 2
  first = batches[0]
  np.testing.assert_array_equal(first["segment_ids"], [[1] * 6 + [2] * 2, [1] * 5 + [2] * 3])
  np.testing.assert_array_equal(first["tokens"][0, 6:], [30, 31])
  np.testing.assert_array_equal(first["positions"][1], [0, 1, 2, 3, 4, 0, 1, 2])
  np.testing.assert_array_equal(batches[1]["segment_ids"], [[1] * 4 + [0] * 4, [0] * 8])
  for batch in batches:
    check_valid(batch)


def test_loss_on_last_answer_only():
  d = select_targets(dialogue((2, 2), (3, 2)), "last")
  np.testing.assert_array_equal(d.answer_targets, [0, 0, 0, 0, 0, 0, 0, 1, 1])
  [batch] = list(pack_examples([d], seq_len=9, num_rows=1))
  np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 0, 0, 0, 0, 1, 1, 0])
  check_valid(batch, kinds=("ism", "causal", "prefix"))


def test_all_answers_leak_under_prefix_but_triplets_do_not():
  d = dialogue((2, 2), (3, 2), (1, 3))
  [batch] = list(pack_examples([d], seq_len=16, num_rows=1))
  with pytest.raises(ValueError, match="prefix"):
    check_valid(batch, kinds=("prefix",))
  triplets = expand_triplets(d)
  assert [len(t) for t in triplets] == [4, 9, 13]
  for k, t in enumerate(triplets):
    np.testing.assert_array_equal(t.answer_targets, (t.segment_types == 2) & (t.round_index == k))
  batches = list(pack_examples(triplets, seq_len=16, num_rows=2))
  for batch in batches:
    check_valid(batch, kinds=("ism", "causal", "prefix"))


def test_truncation_drops_whole_later_rounds():
  d = dialogue((3, 2), (2, 2), (4, 2))  # round ends 5, 9, 15
  kept, dropped = truncate_rounds(d, 10)
  assert (len(kept), dropped) == (9, 1)
  np.testing.assert_array_equal(kept.segment_types, [1, 1, 1, 2, 2, 1, 1, 2, 2])
  kept, dropped = truncate_rounds(d, 9)
  assert (len(kept), dropped) == (9, 1)
  kept, dropped = truncate_rounds(d, 8)
  assert (len(kept), dropped) == (5, 2)
  kept, dropped = truncate_rounds(d, 4)
  assert kept is None and dropped == 3
  assert truncate_rounds(d, 15) == (d, 0)


def test_prepare_examples_counts_truncation():
  stats = PackingStats()
  long_first_round = dialogue((9, 2))
  three_rounds = dialogue((3, 2), (2, 2), (4, 2))
  fits = dialogue((2, 2))
  out = [prepare_examples(d, seq_len=10, stats=stats) for d in (long_first_round, three_rounds, fits)]
  assert [len(o) for o in out] == [0, 1, 1]
  assert (stats.dialogues, stats.truncated_dialogues, stats.dropped_dialogues, stats.dropped_rounds) == (
      3, 1, 1, 2)
  triplets = prepare_examples(three_rounds, seq_len=10, triplets=True)
  assert [len(t) for t in triplets] == [5, 9]


def test_packer_refuses_overlong_example():
  packer = FirstFitPacker(seq_len=4, num_rows=1)
  with pytest.raises(ValueError, match="truncate first"):
    packer.add(dialogue((4, 1)))


def test_random_packed_batches_are_valid():
  rng = np.random.default_rng(0)
  examples = []
  for _ in range(60):
    rounds = [(int(rng.integers(1, 6)), int(rng.integers(1, 5))) for _ in range(int(rng.integers(1, 5)))]
    d, _ = truncate_rounds(select_targets(dialogue(*rounds), str(rng.choice(["all", "last"]))), 24)
    if d is not None:
      examples.append(d)
  batches = list(pack_examples(examples, seq_len=24, num_rows=3))
  assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == sum(len(e) for e in examples)
  for batch in batches:
    check_valid(batch)
    for row in range(3):
      for seg in np.unique(batch["segment_ids"][row]):
        if seg:
          cols = np.flatnonzero(batch["segment_ids"][row] == seg)
          np.testing.assert_array_equal(batch["positions"][row, cols], np.arange(len(cols)))
