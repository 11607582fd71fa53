"""From encoded dialogues to packed rows of the docs/DESIGN.md §2 per-token arrays.

Steps, each a small function:

1. :func:`select_targets`: loss on every answer (``"all"``, default) or on the last answer only (``"last"``).
2. :func:`truncate_rounds`: a dialogue longer than a row loses whole later rounds (a block is never cut);
   one whose first round alone is too long is dropped. The caller counts both (:class:`PackingStats`).
3. :func:`expand_triplets` (prefix-LM baseline): a dialogue of n rounds → n examples, example k holds
   rounds 0..k with loss on round k's answer only.
4. :class:`FirstFitPacker`: places examples into ``num_rows`` rows of ``seq_len`` tokens, each in the first
   row with room; when an example fits nowhere the rows are emitted as one batch.

Packed arrays, all int32 ``[rows, seq_len]``:

* ``tokens``; ``segment_types`` (PAD 0 / QUERY 1 / ANSWER 2); ``segment_ids`` (1, 2, … per dialogue of a
  row, 0 = padding); ``positions`` (0 at each dialogue start, 0 on padding); ``round_index`` (-1 on padding);
* ``loss_mask``: 1 at ``t`` iff token ``t + 1`` is a trained answer token of the same dialogue.

Example: one row of 12 holding dialogue A (``q q a a``, one round) and dialogue B (``q q a q q a``, two
rounds), loss on all answers::

    tokens         qA qA aA aA  qB qB aB qB qB aB  0  0
    segment_types   1  1  2  2   1  1  2  1  1  2  0  0
    segment_ids     1  1  1  1   2  2  2  2  2  2  0  0
    positions       0  1  2  3   0  1  2  3  4  5  0  0
    round_index     0  0  0  0   0  0  0  1  1  1 -1 -1
    loss_mask       0  1  1  0   0  1  0  0  1  0  0  0

The last token of every query block carries loss (it predicts the first answer token, which no query token
can see); the last token of a dialogue never does.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Iterator

import numpy as np

from ism_jax.data.chat_template import EncodedDialogue

LOSS_ON = ("all", "last")
BATCH_KEYS = ("tokens", "segment_types", "segment_ids", "positions", "loss_mask", "round_index")


def check_loss_on(loss_on: str, field: str = "loss_on") -> None:
  """Raises ``ValueError`` naming ``field`` unless ``loss_on`` is one of :data:`LOSS_ON`."""
  if loss_on not in LOSS_ON:
    raise ValueError(f"{field} must be one of {LOSS_ON}, got {loss_on!r}")


def select_targets(dialogue: EncodedDialogue, loss_on: str = "all") -> EncodedDialogue:
  """Keeps loss on every answer (``"all"``) or on the last answer only (``"last"``)."""
  check_loss_on(loss_on)
  if loss_on == "all" or not len(dialogue):
    return dialogue
  last = dialogue.round_index == dialogue.num_rounds - 1
  return dataclasses.replace(dialogue, answer_targets=dialogue.answer_targets * last.astype(np.int32))


def truncate_rounds(dialogue: EncodedDialogue, max_len: int) -> tuple[EncodedDialogue | None, int]:
  """Drops whole later rounds until the dialogue fits ``max_len`` tokens.

  Returns:
    ``(dialogue, rounds_dropped)``; ``dialogue`` is ``None`` when even the first round is too long (then
    ``rounds_dropped`` is the number of rounds it had).

  Example: rounds of 5, 4 and 6 tokens (round ends 5, 9, 15) into ``max_len=10`` keep rounds 0 and 1
  (9 tokens) and drop one round; into ``max_len=4`` nothing fits and the dialogue is dropped.
  """
  if len(dialogue) <= max_len:
    return dialogue, 0
  ends = dialogue.round_ends()
  keep = int(np.searchsorted(ends, max_len, side="right"))
  if keep == 0:
    return None, dialogue.num_rounds
  return dialogue.slice_rounds(keep), dialogue.num_rounds - keep


def expand_triplets(dialogue: EncodedDialogue) -> list[EncodedDialogue]:
  """Prefix-LM expansion: round k's example is rounds 0..k with loss on round k's answer only.

  A dialogue of n rounds and T tokens yields n examples of O(n·T) tokens in total; under the ``prefix``
  mask each example's history plus current query is one bidirectional block.
  """
  examples = []
  for k in range(dialogue.num_rounds):
    part = dialogue.slice_rounds(k + 1)
    targets = part.answer_targets * (part.round_index == k).astype(np.int32)
    examples.append(dataclasses.replace(part, answer_targets=targets))
  return examples


def example_arrays(dialogue: EncodedDialogue) -> dict[str, np.ndarray]:
  """Per-dialogue ``[length]`` int32 arrays: tokens, segment_types, round_index and the shifted loss_mask."""
  loss_mask = np.zeros(len(dialogue), np.int32)
  loss_mask[:-1] = dialogue.answer_targets[1:]
  return {"tokens": dialogue.tokens, "segment_types": dialogue.segment_types,
          "round_index": dialogue.round_index, "loss_mask": loss_mask}


@dataclasses.dataclass
class PackingStats:
  """Counts of what truncation and packing did (cumulative). Logged; exposed by the data iterators."""

  dialogues: int = 0            # dialogues read
  truncated_dialogues: int = 0  # dialogues that lost later rounds to fit a row
  dropped_rounds: int = 0       # rounds removed by truncation (including those of dropped dialogues)
  dropped_dialogues: int = 0    # dialogues whose first round alone is longer than a row
  examples: int = 0             # examples packed (dialogues, or triplets for the prefix baseline)
  tokens: int = 0               # real tokens packed
  slots: int = 0                # row slots emitted (rows × seq_len); tokens / slots is the fill rate

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict) -> "PackingStats":
    return cls(**{k: int(v) for k, v in values.items()})


_log = logging.getLogger(__name__)


def prepare_examples(dialogue: EncodedDialogue, seq_len: int, loss_on: str = "all", triplets: bool = False,
                     stats: PackingStats | None = None, log: bool = True) -> list[EncodedDialogue]:
  """Applies the loss policy, truncation and (optionally) triplet expansion to one dialogue.

  Updates ``stats`` and (if ``log``) logs the first truncation and every tenfold count after it.
  """
  stats = PackingStats() if stats is None else stats
  stats.dialogues += 1
  kept, dropped = truncate_rounds(dialogue, seq_len)
  if dropped:
    stats.dropped_rounds += dropped
    if kept is None:
      stats.dropped_dialogues += 1
    else:
      stats.truncated_dialogues += 1
    events = stats.dropped_dialogues + stats.truncated_dialogues
    if log and events in (1, 10, 100, 1000, 10_000, 100_000):
      _log.info("truncation to seq_len=%d so far: %d dialogues shortened, %d dropped whole, %d rounds "
                "removed (of %d dialogues)", seq_len, stats.truncated_dialogues, stats.dropped_dialogues,
                stats.dropped_rounds, stats.dialogues)
  if kept is None:
    return []
  if triplets:
    return expand_triplets(kept)
  return [select_targets(kept, loss_on)]


class FirstFitPacker:
  """Packs examples into ``num_rows`` rows of ``seq_len`` tokens, first fit.

  Usage::

    packer = FirstFitPacker(seq_len=512, num_rows=8)
    for example in examples:
      if not packer.add(example):   # fits in no row: the rows are full enough, emit them
        yield packer.finish()
        packer.add(example)         # always fits an empty packer (examples are at most seq_len)
    if not packer.is_empty:
      yield packer.finish()         # the last batch, with padding rows where nothing was placed
  """

  def __init__(self, seq_len: int, num_rows: int):
    if seq_len < 1 or num_rows < 1:
      raise ValueError(f"seq_len and num_rows must be positive, got {seq_len} and {num_rows}")
    self.seq_len, self.num_rows = seq_len, num_rows
    self._reset()

  def _reset(self) -> None:
    self._fill = np.zeros(self.num_rows, np.int64)
    self._count = np.zeros(self.num_rows, np.int64)
    self._arrays = {key: np.zeros((self.num_rows, self.seq_len), np.int32) for key in BATCH_KEYS}
    self._arrays["round_index"][:] = -1

  @property
  def is_empty(self) -> bool:
    return not self._fill.any()

  def add(self, example: EncodedDialogue) -> bool:
    """Places ``example`` in the first row with room; ``False`` (nothing changed) if none has room."""
    length = len(example)
    if length > self.seq_len:
      raise ValueError(f"an example of {length} tokens cannot fit seq_len={self.seq_len}; truncate first "
                       "(prepare_examples)")
    if length == 0:
      return True
    rows = np.flatnonzero(self._fill + length <= self.seq_len)
    if not rows.size:
      return False
    row, start = int(rows[0]), int(self._fill[rows[0]])
    span = slice(start, start + length)
    for key, values in example_arrays(example).items():
      self._arrays[key][row, span] = values
    self._count[row] += 1
    self._arrays["segment_ids"][row, span] = self._count[row]
    self._arrays["positions"][row, span] = np.arange(length, dtype=np.int32)
    self._fill[row] += length
    return True

  def finish(self) -> dict[str, np.ndarray]:
    """The packed ``[num_rows, seq_len]`` int32 arrays (see module docstring); the packer starts empty."""
    batch = self._arrays
    self._reset()
    return batch


def pack_examples(examples: Iterable[EncodedDialogue], seq_len: int,
                  num_rows: int) -> Iterator[dict[str, np.ndarray]]:
  """Packs a stream of (already truncated) examples into batches of ``[num_rows, seq_len]``."""
  packer = FirstFitPacker(seq_len, num_rows)
  for example in examples:
    if not packer.add(example):
      yield packer.finish()
      packer.add(example)
  if not packer.is_empty:
    yield packer.finish()


def answer_numbers(batch: dict[str, np.ndarray]) -> np.ndarray:
  """``[rows, seq_len]`` int32: each row's trained answers numbered 1, 2, ... on their loss positions.

  An answer's loss positions are contiguous (from the assistant header to the token before its end of
  turn), so per-answer metrics such as teacher-forced exact match are a segment reduction over this array.
  For the row of the module docstring: ``[0, 1, 1, 0, 0, 2, 0, 0, 3, 0, 0, 0]``.
  """
  loss = batch["loss_mask"] != 0
  key = batch["segment_ids"].astype(np.int64) * (1 << 20) + batch["round_index"]
  starts = loss.copy()
  starts[:, 1:] &= ~loss[:, :-1] | (key[:, 1:] != key[:, :-1])
  return (np.cumsum(starts, axis=1) * loss).astype(np.int32)

