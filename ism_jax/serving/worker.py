"""The thread that owns the device: it tokenizes conversations, runs the scheduler and hands results back.

HTTP handlers run on the server's event loop; every JAX call runs on this one thread, so the scheduler needs
no locks. Handlers send work through a thread-safe inbox (:meth:`Worker.submit`, :meth:`Worker.cancel`);
results come back on each request's ``asyncio.Queue`` through ``loop.call_soon_threadsafe``: first a
``("start", Event)`` (or ``("error", APIError)``), then ``("tokens", Event)`` items, the last one with
``event.finished``.

**Token prefix.** A request carries the whole conversation as messages. It is tokenized with the chat
template training used (:func:`ism_jax.data.chat_template.encode_query_block` / ``encode_answer``, what
``ChatSession`` does), except that an assistant message this server generated is replaced by the tokens it
generated (a memo keyed by the tokens before it and its text): decoded text does not always re-encode to
the same tokens, and the cache holds the generated ones. The scheduler then finds the cached prefix.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import queue
import threading
from typing import Any

import numpy as np

from ism_jax.data.chat_template import encode_answer, encode_query_block
from ism_jax.data.dialogue import Message, split_dialogue
from ism_jax.inference.dialogues import PromptTooLongError
from ism_jax.inference.scheduler import Event, Request, Scheduler, with_answer
from ism_jax.masks import SegmentType
from ism_jax.serving.openai_api import APIError, ChatRequest


@dataclasses.dataclass(eq=False)
class Handle:
  """One request in flight: where its results go, and (set by the worker) its scheduler id and tokens."""

  chat: ChatRequest
  loop: asyncio.AbstractEventLoop
  results: asyncio.Queue
  request_id: int = -1
  prompt: np.ndarray | None = None
  answer: list[int] = dataclasses.field(default_factory=list)


def _digest(tokens: list[int]) -> bytes:
  return hashlib.blake2b(np.asarray(tokens, np.int32).tobytes(), digest_size=16).digest()


class AnswerMemo:
  """Generated answers by ``(tokens before them, their text)``, least recently used dropped past ``size``."""

  def __init__(self, size: int):
    self.size = size
    self._items: collections.OrderedDict[tuple[bytes, str], list[int]] = collections.OrderedDict()

  def get(self, before: list[int], text: str) -> list[int] | None:
    key = (_digest(before), text)
    if key in self._items:
      self._items.move_to_end(key)
    return self._items.get(key)

  def put(self, before: list[int], text: str, tokens: list[int]) -> None:
    self._items[(_digest(before), text)] = tokens
    self._items.move_to_end((_digest(before), text))
    while len(self._items) > self.size:
      self._items.popitem(last=False)


def encode_conversation(tokenizer, messages: list[Message], memo: AnswerMemo | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
  """A conversation ending with a query block as ``(tokens [T], segment_types [T])``, laid out as training
  and ``ChatSession`` lay it out; assistant messages found in ``memo`` keep their generated tokens."""
  rounds, pending = split_dialogue(messages)
  tokens, types = [], []
  for k, round_ in enumerate(rounds):
    query = encode_query_block(tokenizer, list(round_.query), first=k == 0)
    tokens += query
    types += [SegmentType.QUERY] * len(query)
    answer = memo.get(tokens, round_.answer.content) if memo is not None else None
    answer = encode_answer(tokenizer, round_.answer.content) if answer is None else answer
    tokens += answer
    types += [SegmentType.ANSWER] * len(answer)
  query = encode_query_block(tokenizer, list(pending), first=not rounds)
  tokens += query
  types += [SegmentType.QUERY] * len(query)
  return np.asarray(tokens, np.int32), np.asarray(types, np.int32)


class Worker:
  """Runs ``scheduler`` on its own thread for the HTTP handlers (see the module docstring).

  Args:
    scheduler: owns the engine and its slot pool.
    tokenizer: the model's tokenizer (its chat template).
    default_max_tokens: the answer budget of requests that set none.
    memo_size: generated answers remembered for exact token prefixes (default: 16 per slot).
  """

  def __init__(self, scheduler: Scheduler, tokenizer, *, default_max_tokens: int = 256,
               memo_size: int | None = None):
    self.scheduler, self.tokenizer = scheduler, tokenizer
    self.default_max_tokens = default_max_tokens
    self.memo = AnswerMemo(16 * scheduler.num_slots if memo_size is None else memo_size)
    self._inbox: queue.SimpleQueue = queue.SimpleQueue()
    self._handles: dict[int, Handle] = {}
    self._stats_lock = threading.Lock()
    self._stats: dict[str, Any] = {}
    self._thread = threading.Thread(target=self._run, name="ism-serving-worker", daemon=True)
    self.error: BaseException | None = None

  def start(self) -> "Worker":
    self._publish_stats()
    self._thread.start()
    return self

  def stop(self, timeout: float = 30.0) -> None:
    self._inbox.put(("stop", None))
    self._thread.join(timeout)

  @property
  def alive(self) -> bool:
    return self._thread.is_alive()

  def submit(self, chat: ChatRequest, loop: asyncio.AbstractEventLoop) -> Handle:
    """Queues a request (from any thread); its results arrive on ``handle.results``."""
    handle = Handle(chat, loop, asyncio.Queue())
    self._inbox.put(("submit", handle))
    return handle

  def cancel(self, handle: Handle) -> None:
    """Stops a request whose client went away (from any thread); its slot is freed."""
    self._inbox.put(("cancel", handle))

  def stats(self) -> dict[str, Any]:
    """Counters of the scheduler and the slot pool (a copy; safe from any thread)."""
    with self._stats_lock:
      return dict(self._stats)

  # --------------------------------------------------------------------------------------------------------
  # On the worker thread.
  # --------------------------------------------------------------------------------------------------------

  def _run(self) -> None:
    try:
      while True:
        if not self._drain(block=self.scheduler.idle):
          return
        if not self.scheduler.idle:
          self._deliver(self.scheduler.step())
        self._publish_stats()
    except BaseException as e:  # pylint: disable=broad-except
      self.error = e  # the server answers 500 from now on (app.py), naming it
      for handle in list(self._handles.values()):
        self._send(handle, "error", APIError(500, f"the serving worker failed: {e!r}", type="server_error"))
      raise

  def _drain(self, block: bool) -> bool:
    """Applies what the inbox holds (waiting for one item when ``block``); ``False`` on stop."""
    while True:
      try:
        op, handle = self._inbox.get(block=block)
      except queue.Empty:
        return True
      block = False
      if op == "stop":
        return False
      if op == "submit":
        self._start(handle)
      elif handle.request_id in self._handles:
        self._handles.pop(handle.request_id)
        self.scheduler.cancel(handle.request_id)

  def _start(self, handle: Handle) -> None:
    tokens, types = encode_conversation(self.tokenizer, handle.chat.messages, self.memo)
    max_tokens = handle.chat.max_tokens or self.default_max_tokens
    try:
      request_id = self.scheduler.submit(Request(tokens, types, max_tokens, handle.chat.sampling))
    except PromptTooLongError as e:
      self._send(handle, "error", APIError(400, str(e), param="messages", code="context_length_exceeded"))
      return
    handle.request_id, handle.prompt = request_id, tokens
    self._handles[request_id] = handle

  def _deliver(self, events: list[Event]) -> None:
    for event in events:
      handle = self._handles.get(event.request_id)
      if handle is None:
        continue
      first = not handle.answer
      handle.answer += event.tokens
      if event.finished:
        del self._handles[event.request_id]
        text = self.tokenizer.decode(handle.answer)
        cached, _ = with_answer(handle.prompt, handle.prompt, handle.answer, self.scheduler.eot_id)
        self.memo.put(handle.prompt.tolist(), text, cached[handle.prompt.size:].tolist())
      self._send(handle, "start" if first else "tokens", event)

  def _send(self, handle: Handle, kind: str, item) -> None:
    try:
      handle.loop.call_soon_threadsafe(handle.results.put_nowait, (kind, item))
    except RuntimeError:  # the event loop is closed (server shutting down)
      pass

  def _publish_stats(self) -> None:
    scheduler = self.scheduler
    stats = dict(scheduler.stats, slots=scheduler.num_slots, resident=scheduler.resident(),
                 slot_bytes=scheduler.engine.slot_bytes, cache_bytes=scheduler.engine.slot_bytes *
                 scheduler.num_slots, max_len=scheduler.engine.max_len, kind=scheduler.kind,
                 in_flight=len(self._handles))
    with self._stats_lock:
      self._stats = stats
