"""Continuous batching: many conversations on one :class:`~ism_jax.inference.engine.Engine`, each keeping
its KV cache between rounds in a slot (a row of the engine's cache).

    scheduler = Scheduler(Engine(model, batch_size=32, max_len=4096), kind="ism", eot_id=eot)
    rid = scheduler.submit(Request(tokens, segment_types, max_new_tokens=256))
    while not scheduler.idle:
      for event in scheduler.step():   # Event(request_id, tokens, finished, stop_reason, ...)
        ...

A :class:`Request` carries a conversation's whole dialogue so far (every earlier round as the model saw it,
then the new query block ending with the assistant header), laid out and typed as in training
(docs/DESIGN.md §2). The scheduler finds the cached conversation whose tokens share the longest prefix with
it that ends on a round boundary (after an answer's end of turn) and prefills only what follows; under
``ism`` and ``causal`` the K/V of those earlier rounds are exactly what a full pass would compute (no token
sees a later block), so nothing is recomputed. Under ``prefix`` the row is rewritten from slot 0 (the
baseline). A request that matches nothing takes a free slot, or evicts the least recently used idle
conversation; when every slot is busy it waits.

Each :meth:`Scheduler.step` (a tick) runs, without waiting on the host in between:

1. **Admit**: waiting requests (first come, first served) take slots, up to ``max_prefill_tokens`` new tokens
   per tick (at least one request), so long prompts do not stall running answers for long.
2. **Prefill** the admitted chunks, grouped by padded length, one call per group on the admitted rows only
   (:func:`~ism_jax.inference.steps.prefill_rows`; ``P`` rows padded to a power of two, the whole pool
   when that is every row).
3. **Join** the prefilled rows into the decode state on the device (:func:`~ism_jax.inference.steps.
   join_rows`) and launch one decode call (``engine.decode_steps`` steps) for every row; rows that are done
   or idle attend to one slot and write past their fill, never into another row.
4. **Read** the previous tick's decode call (one call behind, so the device never waits on the host) and the
   new first tokens; emit :class:`Event`s; a finished answer leaves its conversation cached and idle.

Every device program has a fixed shape from a small set (chunk buckets, key windows, ``P`` buckets, greedy
or not), so requests joining and leaving never compile anything new once those shapes were seen.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools

import numpy as np

from ism_jax.inference.dialogues import PromptTooLongError
from ism_jax.inference.engine import ANSWER_SLOTS, Engine
from ism_jax.inference.sampling import SamplingParams, as_arrays
from ism_jax.inference import steps
from ism_jax.inference.steps import DecodeCall, DecodeState, Prefilled, pack_chunks
from ism_jax.masks import MASK_KINDS, SegmentType

DEFAULT_MAX_PREFILL_TOKENS = 8192
STAT_NAMES = ("requests", "answers", "cancelled", "evictions", "prefill_tokens", "cached_tokens",
              "answer_tokens", "decode_tokens", "prefill_calls", "decode_calls", "ticks")


@dataclasses.dataclass(eq=False)  # compared by identity (its arrays have no single truth value)
class Request:
  """One round to answer.

  Attributes:
    tokens: ``[T]`` int32, the conversation so far: earlier rounds (query blocks and answers, each answer
      ending with end of turn) then the new query block, which ends with the assistant header.
    segment_types: ``[T]`` int32, QUERY/ANSWER (the true roles, whatever the mask kind).
    max_new_tokens: answer token budget (cut to the slots left in the conversation's cache row).
    sampling: how to pick the answer tokens.
    id: set by :meth:`Scheduler.submit`.
  """

  tokens: np.ndarray
  segment_types: np.ndarray
  max_new_tokens: int = 256
  sampling: SamplingParams = SamplingParams()
  id: int = -1


@dataclasses.dataclass
class Event:
  """What a tick produced for one request: new answer tokens and, at the end, why it stopped.

  ``stop_reason``: ``"end_of_turn"``, ``"max_new_tokens"``, ``"cache_full"`` or ``"cancelled"``.
  ``prompt_tokens`` / ``cached_tokens`` (on the first event): the request's length and how many of its
  tokens were already in the cache (not prefilled again).
  """

  request_id: int
  tokens: list[int]
  finished: bool = False
  stop_reason: str | None = None
  prompt_tokens: int = 0
  cached_tokens: int = 0


@dataclasses.dataclass
class _Conversation:
  """A conversation resident in a slot: ``tokens[:cached]`` have their K/V in the slot's cache row."""

  tokens: np.ndarray
  types: np.ndarray
  cached: int
  last_used: int
  busy: bool = False


@dataclasses.dataclass
class _Running:
  """A request being answered in ``row``: its chunk starts at slot ``start``."""

  request: Request
  row: int
  start: int
  chunk: np.ndarray
  chunk_types: np.ndarray
  budget: int
  answer: list[int] = dataclasses.field(default_factory=list)
  remaining: int = 0  # answer tokens still allowed after the last call the host has read
  cancelled: bool = False


@dataclasses.dataclass
class _InFlight:
  """A dispatched decode call and the requests that were running in it."""

  call: DecodeCall
  running: list[_Running]


def with_answer(tokens, segment_types, answer, eot_id: int | None) -> tuple[np.ndarray, np.ndarray]:
  """A dialogue ``[T]`` with an answer appended, plus the end of turn training puts after an answer cut by
  its budget (the layout the scheduler caches, and what a client continuing it sends back)."""
  answer = np.asarray(answer, np.int32)
  if eot_id is not None and (answer.size == 0 or answer[-1] != eot_id):
    answer = np.append(answer, np.int32(eot_id))
  return (np.concatenate([np.asarray(tokens, np.int32), answer]),
          np.concatenate([np.asarray(segment_types, np.int32), np.full(answer.size, SegmentType.ANSWER,
                                                                       np.int32)]))


def reusable_prefix(cached_tokens, cached_types, tokens, types) -> int:
  """The longest prefix of ``tokens`` that equals the cached dialogue's and ends on a round boundary of
  both (after an ANSWER token, before a QUERY token), leaving at least one new token; 0 if none.

  >>> q, a = SegmentType.QUERY, SegmentType.ANSWER
  >>> reusable_prefix([5, 6, 7, 8], [q, a, q, a], [5, 6, 7, 8, 9], [q, a, q, a, q])
  4
  >>> reusable_prefix([5, 6, 7, 8], [q, a, q, a], [5, 6, 7, 9, 9], [q, a, q, a, q])  # round 2 differs
  2
  """
  cached_tokens, cached_types = np.asarray(cached_tokens), np.asarray(cached_types)
  tokens, types = np.asarray(tokens), np.asarray(types)
  n = min(cached_tokens.size, tokens.size - 1)
  same = (cached_tokens[:n] == tokens[:n]) & (cached_types[:n] == types[:n])
  common = n if same.all() else int(np.argmin(same))
  ends = np.arange(1, common + 1)  # candidate prefix lengths b: tokens [0, b) reused
  after_answer = cached_types[ends - 1] == SegmentType.ANSWER
  cached_next = np.append(cached_types, SegmentType.QUERY)[ends]  # the cached dialogue ends on a boundary
  boundary = after_answer & (cached_next == SegmentType.QUERY) & (types[ends] == SegmentType.QUERY)
  return int(ends[boundary].max()) if boundary.any() else 0


class Scheduler:
  """Continuous batching of conversations over the rows (slots) of one engine (see the module docstring).

  Args:
    engine: the engine whose ``batch_size`` cache rows are the slot pool; the scheduler owns it.
    kind: ``"ism"``, ``"causal"`` (reuse the cache) or ``"prefix"`` (recompute every round).
    eot_id: end of turn: an answer stops on it; one cut by its budget gets it appended, as in training.
    max_prefill_tokens: new tokens admitted per tick (at least one request is).
  """

  def __init__(self, engine: Engine, *, kind: str = "ism", eot_id: int | None = None,
               max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS):
    if kind not in MASK_KINDS:
      raise ValueError(f"kind must be one of {MASK_KINDS}, got {kind!r}")
    self.engine, self.kind, self.eot_id = engine, kind, eot_id
    self.max_prefill_tokens = max_prefill_tokens
    self._eot = -1 if eot_id is None else eot_id
    batch = engine.batch_size
    self._slots: list[_Conversation | None] = [None] * batch
    self._running: dict[int, _Running] = {}  # by row
    self._waiting: collections.deque[Request] = collections.deque()
    self._ids, self._clock = itertools.count(), itertools.count()  # request ids; LRU order
    self._inflight: _InFlight | None = None
    self._stop_B = np.zeros(batch, bool)
    self._sampling = [SamplingParams()] * batch
    self._state = DecodeState(*engine.put((np.zeros(batch, np.int32), np.zeros(batch, np.int32),
                                           np.zeros(batch, np.int32), np.ones(batch, bool))))
    self._eot_device = engine.put(np.int32(self._eot))
    # Counts since the start: requests, answers, tokens prefilled / found in the cache / generated, calls.
    self.stats = collections.Counter({name: 0 for name in STAT_NAMES})

  # --------------------------------------------------------------------------------------------------------
  # Requests.
  # --------------------------------------------------------------------------------------------------------

  @property
  def num_slots(self) -> int:
    return self.engine.batch_size

  @property
  def idle(self) -> bool:
    """Nothing waiting, running or in flight."""
    return not self._waiting and not self._running and self._inflight is None

  def resident(self) -> int:
    """Conversations holding a slot (running or cached)."""
    return sum(c is not None for c in self._slots)

  def cached_dialogues(self) -> list[tuple[np.ndarray, np.ndarray]]:
    """The idle resident conversations as ``(tokens [T], segment_types [T])``, most recently used first."""
    idle = sorted((c for c in self._slots if c is not None and not c.busy), key=lambda c: -c.last_used)
    return [(c.tokens, c.types) for c in idle]

  def submit(self, request: Request) -> int:
    """Queues a request; returns its id. Checks it first.

    Raises:
      PromptTooLongError: the dialogue + 2 answer slots exceed ``engine.max_len``.
      ValueError: malformed tokens or types (named).
    """
    tokens = np.asarray(request.tokens, np.int32).reshape(-1)
    types = np.asarray(request.segment_types, np.int32).reshape(-1)
    if tokens.size == 0 or tokens.shape != types.shape:
      raise ValueError(f"a request has equal non-empty tokens and segment_types, got {tokens.shape} and "
                       f"{types.shape}")
    if tokens.min() < 0 or tokens.max() >= self.engine.config.vocab_size:
      raise ValueError(f"token ids must be in [0, {self.engine.config.vocab_size})")
    typed = ((types == SegmentType.QUERY) | (types == SegmentType.ANSWER)).all()
    if not typed or types[-1] != SegmentType.QUERY:
      raise ValueError("segment_types must be QUERY (1) or ANSWER (2) and end with the query block (1)")
    if request.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={request.max_new_tokens} must be >= 1")
    if tokens.size + ANSWER_SLOTS > self.engine.max_len:
      raise PromptTooLongError(
          f"the conversation is {tokens.size} tokens (history + new query) and needs {ANSWER_SLOTS} more "
          f"slots for an answer: {tokens.size + ANSWER_SLOTS} > max_len={self.engine.max_len} KV cache "
          "slots per conversation; shorten the conversation or start a new one")
    request = dataclasses.replace(request, tokens=tokens, segment_types=types, id=next(self._ids))
    self._waiting.append(request)
    self.stats["requests"] += 1
    return request.id

  def cancel(self, request_id: int) -> list[Event]:
    """Stops a request (a client went away): it leaves the queue, or its row stops at the next tick and its
    conversation is dropped. Returns its final event (none if it already finished)."""
    for request in self._waiting:
      if request.id == request_id:
        self._waiting.remove(request)
        return [Event(request_id, [], finished=True, stop_reason="cancelled")]
    for row, running in list(self._running.items()):
      if running.request.id == request_id:
        running.cancelled = True
        del self._running[row]
        self._slots[row] = None
        self._stop_B[row] = True
        self.stats["cancelled"] += 1
        return [Event(request_id, [], finished=True, stop_reason="cancelled")]
    return []

  def run(self) -> list[Event]:
    """Steps until idle; every event, in order (tests and benchmarks)."""
    events = []
    while not self.idle:
      events += self.step()
    return events

  # --------------------------------------------------------------------------------------------------------
  # Slots.
  # --------------------------------------------------------------------------------------------------------

  def _match(self, request: Request) -> tuple[int, int]:
    """The idle conversation sharing the longest round-boundary prefix with the request: ``(row, length)``,
    ``(-1, 0)`` if none."""
    best, best_len = -1, 0
    for row, conv in enumerate(self._slots):
      if conv is None or conv.busy:
        continue
      n = reusable_prefix(conv.tokens, conv.types, request.tokens, request.segment_types)
      if n > best_len or (n == best_len and n > 0 and conv.last_used > self._slots[best].last_used):
        best, best_len = row, n
    return best, best_len

  def _free_row(self) -> int:
    """An empty slot, else the least recently used idle conversation's (evicted); -1 if all are busy."""
    for row, conv in enumerate(self._slots):
      if conv is None:
        return row
    idle = [(conv.last_used, row) for row, conv in enumerate(self._slots) if not conv.busy]
    if not idle:
      return -1
    row = min(idle)[1]
    self._slots[row] = None
    self.stats["evictions"] += 1
    return row

  def _place(self, request: Request) -> _Running | None:
    """A row and chunk for the request (reusing a cached prefix when it can); ``None`` if no row is free."""
    row, reused = self._match(request)
    if row < 0:
      row = self._free_row()
      if row < 0:
        return None
    start = 0 if self.kind == "prefix" or reused == 0 else min(self._slots[row].cached, reused)
    chunk, types = request.tokens[start:], request.segment_types[start:]
    if self.kind == "prefix":
      types = np.full(chunk.shape, SegmentType.QUERY, np.int32)
    elif self.kind == "causal":
      types = np.full(chunk.shape, SegmentType.ANSWER, np.int32)
    budget = min(request.max_new_tokens, self.engine.max_len - start - chunk.size - 1)
    self._slots[row] = _Conversation(request.tokens, request.segment_types, start, next(self._clock),
                                     busy=True)
    running = _Running(request, row, start, chunk, types, budget, remaining=budget - 1)
    self.stats["cached_tokens"] += start
    self.stats["prefill_tokens"] += chunk.size
    return running

  def _admit(self) -> list[_Running]:
    joined, tokens = [], 0
    while self._waiting:
      request = self._waiting[0]
      if joined and tokens + request.tokens.size > self.max_prefill_tokens:
        break  # a full prefill of that size is the worst case; the reused prefix is not known yet
      running = self._place(request)
      if running is None:
        break
      self._waiting.popleft()
      joined.append(running)
      tokens += running.chunk.size
      self._running[running.row] = running
      self._sampling[running.row] = request.sampling
    return joined

  # --------------------------------------------------------------------------------------------------------
  # One tick.
  # --------------------------------------------------------------------------------------------------------

  def step(self) -> list[Event]:
    """One tick: admit, prefill the admitted, one decode call for every row, read the previous call."""
    joined = self._admit()
    groups = self._prefill(joined)
    call = None
    if self._running:
      all_greedy = all(self._sampling[r].greedy for r in self._running)
      sampling = None if all_greedy else self.engine.put(as_arrays(self._sampling))
      if self._stop_B.any():  # rows cancelled since the last tick and not rejoined
        self._join(None, [])
      call = self.engine.decode_call(self._state, sampling, self._eot_device, all_greedy=all_greedy)
      call.state.done_B.copy_to_host_async()
      self._state = call.state
      self.stats["decode_calls"] += 1
    events = self._read_inflight()
    self._inflight = None if call is None else _InFlight(call, list(self._running.values()))
    for prefilled, group in groups:
      events += self._read_first_tokens(prefilled, group)
    self.stats["ticks"] += 1
    return events

  def _prefill(self, joined: list[_Running]) -> list[tuple[Prefilled, list[_Running]]]:
    """Prefill calls for the admitted requests, one per chunk bucket; each is joined into the decode state."""
    by_bucket: dict[int, list[_Running]] = collections.defaultdict(list)
    for running in joined:
      by_bucket[self.engine.bucket(running.chunk.size)].append(running)
    groups = []
    for padded, group in sorted(by_bucket.items()):
      prefilled, rows = self._prefill_group(padded, group)
      self._join((rows, prefilled.first_B), group)
      groups.append((prefilled, group))
      self.stats["prefill_calls"] += 1
    return groups

  def _prefill_group(self, padded: int, group: list[_Running]) -> tuple[Prefilled, np.ndarray]:
    """One prefill call writing the group's chunks (padded to ``padded``) into their rows."""
    batch = self.engine.batch_size
    rows = [r.row for r in group]
    width = 1 << (len(rows) - 1).bit_length()  # P: a power of two, or the whole pool
    if width >= batch:
      order = list(range(batch))
    else:
      order = rows + [r for r in range(batch) if r not in set(rows)][:width - len(rows)]
    tokens = np.zeros((len(order), padded), np.int32)
    types = np.full((len(order), padded), SegmentType.PAD, np.int32)
    starts, lengths = np.zeros(len(order), np.int64), np.zeros(len(order), np.int64)
    for running in group:
      p = order.index(running.row)
      n = running.chunk.size
      tokens[p, :n], types[p, :n] = running.chunk, running.chunk_types
      starts[p], lengths[p] = running.start, n
    from_start = all(r.start == 0 for r in group)
    reach = max(r.start + r.chunk.size for r in group)
    window = self.engine.prefill_window(padded, reach, from_start)
    all_greedy = all(r.request.sampling.greedy for r in group)
    sampling = None if all_greedy else as_arrays([self._sampling[r] for r in order])
    packed = pack_chunks(tokens, types, starts, lengths)
    if width >= batch:
      out = self.engine.prefill_step(packed, sampling, window=window, from_start=from_start,
                                     all_greedy=all_greedy)
    else:
      out = self.engine.prefill_rows(packed, np.asarray(order), sampling, window=window,
                                     from_start=from_start, all_greedy=all_greedy)
    return out, np.asarray(order, np.int32)

  def _join(self, prefilled: tuple[np.ndarray, object] | None, group: list[_Running]) -> None:
    """Joins the group's rows into the decode state (and stops cancelled rows), on the device."""
    batch = self.engine.batch_size
    join, fill, remaining = np.zeros(batch, bool), np.zeros(batch, np.int32), np.zeros(batch, np.int32)
    for running in group:
      join[running.row] = True
      fill[running.row] = running.start + running.chunk.size
      remaining[running.row] = running.remaining
    rows, first = prefilled if prefilled is not None else (np.zeros(1, np.int32), np.zeros(1, np.int32))
    stop = self._stop_B & ~join
    self._state = steps.join_rows(self._state, *self.engine.put((rows, first, join, fill, remaining, stop)),
                                  self._eot_device)
    self._stop_B[:] = False

  # --------------------------------------------------------------------------------------------------------
  # Reading results.
  # --------------------------------------------------------------------------------------------------------

  def _read_inflight(self) -> list[Event]:
    if self._inflight is None:
      return []
    inflight, self._inflight = self._inflight, None
    call = inflight.call
    tokens_BN = np.asarray(call.tokens_BN)
    remaining_B, done_B = np.asarray(call.state.remaining_B), np.asarray(call.state.done_B)
    events = []
    for running in inflight.running:
      if running.cancelled or self._running.get(running.row) is not running:
        continue  # cancelled, or finished on its first token
      n = running.remaining - int(remaining_B[running.row])
      new = tokens_BN[running.row, :n].tolist()
      running.answer += new
      running.remaining = int(remaining_B[running.row])
      self.stats["decode_tokens"] += n
      if done_B[running.row]:
        events.append(self._finish(running, new))
      elif new:
        events.append(Event(running.request.id, new))
    return events

  def _read_first_tokens(self, prefilled: Prefilled, group: list[_Running]) -> list[Event]:
    first_P = np.asarray(prefilled.first_on_host_B)
    order = list(range(self.engine.batch_size)) if first_P.size == self.engine.batch_size else None
    events = []
    for p, running in enumerate(group):
      token = int(first_P[running.row if order is not None else p])
      running.answer.append(token)
      start = Event(running.request.id, [token], prompt_tokens=running.request.tokens.size,
                    cached_tokens=running.start)
      if token == self._eot or running.budget <= 1:
        final = self._finish(running, [token])
        start.finished, start.stop_reason = True, final.stop_reason
      events.append(start)
    return events

  def _finish(self, running: _Running, new: list[int]) -> Event:
    """Ends a request: its conversation (query, answer and any end-of-turn glue) stays cached, idle."""
    del self._running[running.row]
    answer = np.asarray(running.answer, np.int32)
    if answer[-1] == self._eot:
      reason = "end_of_turn"
    else:
      reason = "max_new_tokens" if answer.size == running.request.max_new_tokens else "cache_full"
    request = running.request
    tokens, types = with_answer(request.tokens, request.segment_types, answer, self.eot_id)
    cached = running.start + running.chunk.size + answer.size - 1
    self._slots[running.row] = _Conversation(tokens, types, cached, next(self._clock))
    self.stats["answers"] += 1
    self.stats["answer_tokens"] += answer.size
    return Event(request.id, new, finished=True, stop_reason=reason)
