"""Counting what jax traces and compiles, through a listener on jax's own monitoring events.

    with compile_events() as events:
      engine.warmup(shapes)
    assert events.compiles("_decode_steps") <= 2
"""

from __future__ import annotations

import collections
import contextlib
from typing import Iterator

import jax

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class Events:
  """Trace and compile events seen while the listener was installed, by the traced function's name."""

  def __init__(self):
    self.counts: collections.Counter = collections.Counter()

  def __call__(self, event: str, duration: float, **kwargs) -> None:
    del duration
    if event in (TRACE_EVENT, COMPILE_EVENT):
      self.counts[(event, str(kwargs.get("fun_name", "")))] += 1

  def _count(self, event: str, name: str | None) -> int:
    return sum(n for (e, fun), n in self.counts.items() if e == event and (name is None or name in fun))

  def traces(self, name: str | None = None) -> int:
    """Traces of functions whose name contains ``name`` (all functions by default)."""
    return self._count(TRACE_EVENT, name)

  def compiles(self, name: str | None = None) -> int:
    """Compilations of functions whose name contains ``name`` (all functions by default)."""
    return self._count(COMPILE_EVENT, name)


@contextlib.contextmanager
def compile_events() -> Iterator[Events]:
  """Installs a jax.monitoring listener for the duration of the block and yields what it saw."""
  events = Events()
  jax.monitoring.register_event_duration_secs_listener(events)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(events)
