"""Multi-process runs: ``jax.distributed`` start-up in bounded time, and stopping when a process dies.

Every process of a job runs the same ``train.py`` command; :func:`initialize_distributed` joins them
(``distributed.*`` fields) before any other JAX work, and :class:`PeerMonitor` watches the others while
training runs.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

import jax
import ml_collections

_KEY = "ism_jax/alive/{}"


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """``jax.distributed.initialize()`` when ``distributed.enabled`` (call before any other JAX work).

  JAX aborts the process (a C++ fatal error, no Python exception) when the processes do not all join in
  time, and by default waits 5 minutes first. So a watchdog thread enforces
  ``distributed.initialization_timeout`` itself (JAX gets a minute more as a backstop): when the job is not
  complete by then, it prints an error naming ``coordinator_address``, ``num_processes`` and ``process_id``
  and exits the process with status 1. Causes: the coordinator (process 0) is unreachable, or fewer
  processes than ``num_processes`` were started.
  """
  d = config.distributed
  if not d.enabled:
    return
  address = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or "(auto-detected)"
  timeout = int(d.initialization_timeout)
  joined = threading.Event()

  def watchdog():
    if joined.wait(timeout):
      return
    print(f"error: jax.distributed.initialize did not complete within distributed.initialization_timeout="
          f"{timeout} s (distributed.coordinator_address={address}, distributed.num_processes="
          f"{d.num_processes or '(detect)'}, distributed.process_id="
          f"{d.process_id if d.process_id >= 0 else '(detect)'}): either the coordinator, process 0, cannot "
          "be reached at that address (not started, wrong host or port, a firewall), or fewer processes than "
          "num_processes were started (every process needs the same distributed.num_processes and its own "
          "process_id). Fix the address or the counts and start all processes again", file=sys.stderr,
          flush=True)
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=watchdog, name="ism_jax-distributed-watchdog", daemon=True).start()
  try:
    jax.distributed.initialize(coordinator_address=d.coordinator_address or None,
                               num_processes=d.num_processes or None,
                               process_id=None if d.process_id < 0 else d.process_id,
                               initialization_timeout=timeout + 60,
                               heartbeat_timeout_seconds=int(d.heartbeat_timeout) + 60)
  except ValueError as e:
    raise ValueError(f"jax.distributed.initialize failed: {e}. Set distributed.coordinator_address "
                     "('host:port' of process 0), distributed.num_processes and distributed.process_id where "
                     "they cannot be detected (no TPU, Slurm or Open MPI environment)") from e
  finally:
    joined.set()


class PeerMonitor:
  """Stops this process, with an error naming the lost process, when another process of the job dies.

  A process that dies (killed, out of memory, a crashed host) leaves the others blocked in their next
  collective; JAX aborts them only after its heartbeat timeout, with a C++ fatal error. Instead a thread
  in every process writes a counter to the coordinator's key-value store every ``timeout / 10`` seconds
  and reads the others'; once a process's counter has not moved for ``timeout`` seconds (three times that
  before its first write, while it may still be setting up) this process prints an error (which process,
  the last step started here, the newest checkpoint and how to resume) and exits with status 1 without
  saving: a checkpoint needs every process. (JAX's own heartbeat timeout is set a minute longer, so this
  message comes first.) If process 0 dies, the coordinator goes with it and JAX aborts the others at once
  with its own message. A no-op in single-process runs.

  Args:
    timeout: seconds of silence after which a process counts as dead (``distributed.heartbeat_timeout``).
    status: called at that moment for the last step and checkpoint, e.g. ``"The last step started here is
      6; the newest checkpoint is step 3 in DIR"``.
  """

  def __init__(self, timeout: float, status: Callable[[], str]):
    self.timeout = float(timeout)
    self._status = status
    self._stop = threading.Event()
    self._thread = None
    if jax.process_count() > 1:
      from jax._src import distributed  # pylint: disable=import-outside-toplevel
      self._client = distributed.global_state.client
      self._thread = threading.Thread(target=self._run, name="ism_jax-peer-monitor", daemon=True)

  def __enter__(self) -> "PeerMonitor":
    if self._thread is not None:
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def _run(self) -> None:
    me, count = jax.process_index(), jax.process_count()
    others = [p for p in range(count) if p != me]
    interval = max(self.timeout / 10, 0.2)
    seen = {p: (None, time.monotonic()) for p in others}
    beat = 0
    while not self._stop.is_set():
      beat += 1
      try:
        self._client.key_value_set(_KEY.format(me), str(beat), allow_overwrite=True)
      except Exception:  # pylint: disable=broad-except
        return  # the coordination service is shutting down (the job ends)
      now = time.monotonic()
      for p in others:
        try:
          value = self._client.key_value_try_get(_KEY.format(p))
        except Exception:  # pylint: disable=broad-except
          value = None  # not written yet
        if value != seen[p][0]:
          seen[p] = (value, now)
        # A process not heard from yet may still be setting up: it gets three times as long.
        elif now - seen[p][1] > self.timeout * (1 if seen[p][0] else 3) and not self._stop.is_set():
          print(f"error: process {p} of {count} stopped responding {self.timeout:g} s ago (killed, crashed "
                f"or hung; distributed.heartbeat_timeout={self.timeout:g}); process {me} stops without "
                f"saving, since a checkpoint needs every process. {self._status()}. Start all {count} "
                "processes again with the same command to resume from that checkpoint", file=sys.stderr,
                flush=True)
          os._exit(1)  # pylint: disable=protected-access
      self._stop.wait(interval)
