"""A grain ``IterDataset`` that turns a stream of encoded dialogues into packed, checkpointable batches.

Each parent element is an :class:`~ism_jax.data.chat_template.EncodedDialogue`. The iterator applies the
loss policy, truncation and (optionally) triplet expansion (:func:`~ism_jax.data.packing.prepare_examples`),
then packs examples first-fit into ``[batch_size, seq_len]`` rows; a batch is emitted when the next example
fits in no row (the example starts the next batch). The end of the stream emits the last, partly filled
batch; rows nobody used are all padding.

State (``get_state`` / ``set_state``, JSON-serialisable, so grain's Orbax handler can save it)::

    {"parent": <parent state before the dialogue now being consumed>, "has_pending": bool,
     "offset": <examples of that dialogue already placed in emitted batches>, "stats": {...counts...}}

Restoring re-reads that one dialogue and skips ``offset`` examples, so a restored iterator yields exactly the
batches the original would have yielded next.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import grain
import numpy as np

from ism_jax.data import packing


class PackedBatchIterDataset(grain.IterDataset):
  """Packs the parent's encoded dialogues into dict batches of int32 ``[batch_size, seq_len]`` arrays."""

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, batch_size: int, loss_on: str = "all",
               triplets: bool = False, max_dropped_in_a_row: int | None = None, where: str = "the dataset"):
    """``max_dropped_in_a_row``: raise ``ValueError`` (naming ``where`` and ``seq_len``) once that many
    dialogues in a row were dropped for not fitting ``seq_len`` (e.g. one pass over a repeating parent, which
    would otherwise be read forever); ``None``: never."""
    super().__init__(parent)
    packing.check_loss_on(loss_on)
    self._options = dict(seq_len=seq_len, batch_size=batch_size, loss_on=loss_on, triplets=triplets,
                         max_dropped_in_a_row=max_dropped_in_a_row, where=where)

  def __iter__(self) -> "PackedBatchIterator":
    return PackedBatchIterator(self._parent.__iter__(), **self._options)

  def __str__(self) -> str:
    return f"PackedBatchIterDataset({self._options})"


class PackedBatchIterator(grain.DatasetIterator):
  """Iterator of :class:`PackedBatchIterDataset`; ``stats`` holds the truncation and packing counts."""

  def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, batch_size: int, loss_on: str,
               triplets: bool, max_dropped_in_a_row: int | None = None, where: str = "the dataset"):
    super().__init__(parent)
    self._seq_len, self._batch_size = seq_len, batch_size
    self._loss_on, self._triplets = loss_on, triplets
    self._max_dropped, self._where, self._dropped_in_a_row = max_dropped_in_a_row, where, 0
    self.stats = packing.PackingStats()
    self._pending: list = []
    self._offset = 0
    self._has_pending = False
    self._pending_parent_state = self._parent.get_state()

  def _prepare(self, dialogue, stats: packing.PackingStats, log: bool = True) -> list:
    return packing.prepare_examples(dialogue, self._seq_len, self._loss_on, self._triplets, stats, log)

  def _read_next_dialogue(self) -> bool:
    self._pending_parent_state = self._parent.get_state()
    try:
      dialogue = next(self._parent)
    except StopIteration:
      self._pending, self._offset, self._has_pending = [], 0, False
      return False
    self._pending, self._offset, self._has_pending = self._prepare(dialogue, self.stats), 0, True
    self._dropped_in_a_row = 0 if self._pending else self._dropped_in_a_row + 1
    if self._max_dropped is not None and self._dropped_in_a_row >= self._max_dropped:
      raise ValueError(f"{self._dropped_in_a_row} dialogues in a row of {self._where} were dropped because "
                       f"their first round is longer than seq_len={self._seq_len}: no dialogue fits; raise "
                       "data.seq_len")
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    packer = packing.FirstFitPacker(self._seq_len, self._batch_size)
    while True:
      if self._offset >= len(self._pending):
        if not self._read_next_dialogue():
          break
        continue
      example = self._pending[self._offset]
      if not packer.add(example):
        break
      self._offset += 1
      self.stats.examples += 1
      self.stats.tokens += len(example)
    if packer.is_empty:
      raise StopIteration
    self.stats.slots += self._batch_size * self._seq_len
    return packer.finish()

  def get_state(self) -> dict[str, Any]:
    return {"parent": copy.deepcopy(self._pending_parent_state), "has_pending": self._has_pending,
            "offset": self._offset, "stats": self.stats.as_dict()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._pending_parent_state = copy.deepcopy(state["parent"])
    self.stats = packing.PackingStats.from_dict(state["stats"])
    self._pending, self._offset, self._has_pending = [], 0, False
    if state["has_pending"]:
      try:
        dialogue = next(self._parent)
      except StopIteration:
        return
      # The saved counts already include this dialogue: prepare it again without counting.
      self._pending = self._prepare(dialogue, packing.PackingStats(), log=False)
      self._offset, self._has_pending = int(state["offset"]), True

  def __str__(self) -> str:
    return "PackedBatchIterator"


class ConcatenatedBatches:
  """Several packed-batch iterators side by side: batch ``i`` is their batches ``i`` concatenated by rows.

  A host that reads several data shards (one iterator each, ``rows / shards`` rows per batch) builds the
  rows that as many hosts, one shard each, would contribute to the global batch, in the same order. State
  (JSON-serialisable): ``{"shards": [state of each iterator]}``. Grain's checkpoint handler restores
  iterators that are not grain ``DatasetIterator``s by ``set_state(bytes)`` and ``start_prefetch()``.
  """

  def __init__(self, iterators: list[PackedBatchIterator]):
    if not iterators:
      raise ValueError("ConcatenatedBatches needs at least one iterator")
    self._iterators = list(iterators)

  def __iter__(self) -> "ConcatenatedBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(iterator) for iterator in self._iterators]
    return {key: np.concatenate([b[key] for b in batches], axis=0) for key in batches[0]}

  @property
  def stats(self) -> packing.PackingStats:
    """The shards' counts added up."""
    total = {}
    for iterator in self._iterators:
      for key, value in iterator.stats.as_dict().items():
        total[key] = total.get(key, 0) + value
    return packing.PackingStats.from_dict(total)

  def get_state(self) -> dict[str, Any]:
    return {"shards": [iterator.get_state() for iterator in self._iterators]}

  def set_state(self, state: dict[str, Any] | bytes) -> None:
    if isinstance(state, bytes):
      state = json.loads(state.decode("utf-8"))
    if "shards" not in state or len(state["shards"]) != len(self._iterators):
      held = len(state.get("shards", [None]))
      raise ValueError(f"the data iterator state holds {held} shards, this host reads "
                       f"{len(self._iterators)}; resume with the same data.num_shards and process count")
    for iterator, shard_state in zip(self._iterators, state["shards"]):
      iterator.set_state(shard_state)

  def start_prefetch(self) -> None:
    for iterator in self._iterators:
      iterator.start_prefetch()
