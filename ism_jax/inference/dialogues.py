"""A batch of independent token-level dialogues served round by round under one mask kind.

Each row keeps its dialogue exactly as training lays it out (docs/DESIGN.md §2): ``Q1 A1 Q2 A2 ...`` with
segment types QUERY/ANSWER, every answer ending with end of turn. How a round reaches the cache depends on
the mask kind:

* ``ism`` and ``causal``: the K/V of earlier tokens never depend on later ones, so the cache is reused. A
  round appends the tokens not yet in the cache (the last answer token and, if the model did not emit it,
  the end-of-turn glue) followed by the new query block, in one prefill chunk; under ``causal`` the query
  tokens are relabelled ANSWER so the chunk is causal. Round ``k`` costs its own tokens only.
* ``prefix``: the history joins the current query in one bidirectional block, so the K/V of every earlier
  token change each round: the row is re-run from slot 0 (history + query as one QUERY block), then the
  answer is decoded causally over the cache that recompute built. Round ``k`` costs the whole dialogue.

In every case the logits of each answer token equal those of one full forward pass
(``Transformer(tokens, segment_types, kind=kind)``) over the dialogue so far, which the tests check.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ism_jax.inference.engine import CacheFullError, Chunk, Engine, Generation
from ism_jax.inference.sampling import SamplingParams
from ism_jax.masks import MASK_KINDS, SegmentType


class PromptTooLongError(CacheFullError):
  """The dialogue plus the new query does not fit in the cache; nothing was changed."""


@dataclasses.dataclass
class _Row:
  tokens: list[int] = dataclasses.field(default_factory=list)
  types: list[int] = dataclasses.field(default_factory=list)
  cached: int = 0  # tokens[:cached] have their K/V in the cache (ism, causal)


# One round of a DialogueBatch: the engine's record of it (per-row lists hold None for rows that sat it out).
RoundResult = Generation


class DialogueBatch:
  """``engine.batch_size`` independent dialogues (rows) on one :class:`Engine`.

  Args:
    engine: the engine whose cache rows this batch owns.
    kind: ``"ism"``, ``"causal"`` or ``"prefix"`` (how rounds reach the cache; see the module docstring).
    eot_id: the end-of-turn token that ends every answer (decoding stops on it; appended to the dialogue when
      an answer stops on its budget). ``None``: no end of turn (benchmarks on random tokens).
  """

  def __init__(self, engine: Engine, *, kind: str = "ism", eot_id: int | None = None):
    if kind not in MASK_KINDS:
      raise ValueError(f"kind must be one of {MASK_KINDS}, got {kind!r}")
    self.engine = engine
    self.kind = kind
    self.eot_id = eot_id
    self._rows = [_Row() for _ in range(engine.batch_size)]

  @property
  def batch_size(self) -> int:
    return self.engine.batch_size

  def tokens(self, row: int = 0) -> np.ndarray:
    """The row's dialogue so far, ``[T]`` int32, laid out as in training."""
    return np.asarray(self._rows[row].tokens, np.int32)

  def segment_types(self, row: int = 0) -> np.ndarray:
    """``[T]`` int32 QUERY/ANSWER of :meth:`tokens` (the true roles, whatever the kind)."""
    return np.asarray(self._rows[row].types, np.int32)

  def reset(self, rows: Sequence[int] | None = None) -> None:
    """Starts new, empty dialogues in ``rows`` (all by default)."""
    rows = range(self.batch_size) if rows is None else list(rows)
    for b in rows:
      self._rows[b] = _Row()
    self.engine.reset(rows)

  def append(self, row: int, tokens: Sequence[int], segment_type: int) -> None:
    """Adds tokens of one role to a row without computing anything (e.g. a given earlier answer).

    They reach the cache with the next :meth:`ask`, laid out and typed exactly as appended.
    """
    if segment_type not in (SegmentType.QUERY, SegmentType.ANSWER):
      raise ValueError(f"segment_type must be QUERY (1) or ANSWER (2), got {segment_type}")
    tokens = [int(t) for t in tokens]
    self.check_room(row, len(tokens))
    self._rows[row].tokens += tokens
    self._rows[row].types += [int(segment_type)] * len(tokens)

  def check_room(self, row: int, new_tokens: int) -> None:
    """Raises :class:`PromptTooLongError` unless ``new_tokens`` more tokens leave room for an answer
    (:meth:`Engine.check_room`)."""
    self.engine.check_room(row, len(self._rows[row].tokens), new_tokens, error=PromptTooLongError)

  def _chunk(self, row: _Row, query: np.ndarray) -> Chunk:
    """What the engine writes this round: the tokens not yet cached then the query, typed for the kind."""
    if self.kind == "prefix":
      tokens = np.concatenate([np.asarray(row.tokens, np.int32), query])
      return Chunk(tokens, np.full(tokens.shape, SegmentType.QUERY, np.int32))
    tokens = np.concatenate([np.asarray(row.tokens[row.cached:], np.int32), query])
    types = np.asarray(row.types[row.cached:] + [SegmentType.QUERY] * query.size, np.int32)
    if self.kind == "causal":
      types = np.full(types.shape, SegmentType.ANSWER, np.int32)
    return Chunk(tokens, types)

  def ask(self, queries: Sequence[Sequence[int] | None], *, max_new_tokens: int | Sequence[int] = 256,
          sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
          return_logits: bool = False) -> RoundResult:
    """One round: appends each row's query block and generates its answer.

    Args:
      queries: per row, the query block's tokens (ending with the assistant header), or ``None`` to skip.
      max_new_tokens, sampling: per row or for all rows.
      return_logits: return the logits of every answer token (tests).

    Raises:
      PromptTooLongError: a row's dialogue + query does not fit; raised before any work, nothing changes.
    """
    if len(queries) != self.batch_size:
      raise ValueError(f"expected {self.batch_size} queries (one per row, None to skip), got {len(queries)}")
    blocks: list[np.ndarray | None] = []
    for b, query in enumerate(queries):
      if query is not None:
        query = np.asarray(query, np.int32).reshape(-1)
        if query.size == 0:
          raise ValueError(f"row {b}: empty query block; pass None to skip a row")
        self.check_room(b, query.size)
      blocks.append(query)
    chunks = [None if q is None else self._chunk(self._rows[b], q) for b, q in enumerate(blocks)]
    generation = self.engine.generate(
        chunks, restart=self.kind == "prefix", max_new_tokens=max_new_tokens, sampling=sampling,
        eot_id=self.eot_id, return_logits=return_logits)
    self._record(blocks, generation)
    return generation

  def _record(self, blocks: list[np.ndarray | None], generation: Generation) -> None:
    """Appends each row's query block and answer (with the end of turn training puts after it)."""
    fill = self.engine.fill
    for b, query in enumerate(blocks):
      if query is None:
        continue
      row, answer = self._rows[b], generation.answers[b]
      row.tokens += query.tolist() + answer.tolist()
      row.types += [SegmentType.QUERY] * query.size + [SegmentType.ANSWER] * answer.size
      if self.eot_id is not None and answer[-1] != self.eot_id:  # the template's end of turn, as trained
        row.tokens.append(self.eot_id)
        row.types.append(SegmentType.ANSWER)
      row.cached = int(fill[b])
