"""Where metrics go: ``WORKDIR/metrics.jsonl``, TensorBoard event files, and the console.

``metrics.jsonl`` holds one JSON object per logged step, e.g.::

    {"step": 200, "loss": 2.31, "loss_avg": 2.40, "tokens_per_sec": 5120.0, "mfu": null, "lr": 0.0003,
     "grad_norm": 0.8, "eval/loss": 2.52, "eval/loss_round_0": 2.9, ..., "eval/exact_match": 0.41}

``loss`` is that step's loss; ``loss_avg`` the mean since the previous record. On resume from step ``s``
the records after ``s`` (written by the interrupted run; all of them when no checkpoint was left) are
dropped, and TensorBoard is told to purge them, so both show one consistent history. Only process 0
writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _clean(value: Any) -> Any:
  """JSON-safe scalar: NaN/Inf become strings (``"nan"``), numpy scalars plain numbers."""
  if value is None or isinstance(value, (str, bool)):
    return value
  value = float(value)
  if math.isfinite(value):
    return value
  return str(value)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of ``WORKDIR/metrics.jsonl`` (empty if none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
  """Appends records to ``metrics.jsonl`` and TensorBoard; no-op on processes other than 0."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self._path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if not enabled:
      return
    self._truncate_after(resume_step)
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                               purge_step=resume_step + 1 if resume_step else 0)

  def _truncate_after(self, step: int) -> None:
    """Drops records after checkpoint ``step`` (all of them for a fresh start): an interrupted run's."""
    if not os.path.exists(self._path):
      return
    with open(self._path, encoding="utf-8") as f:
      lines = [line for line in f if line.strip()]
    keep = [line for line in lines if step and json.loads(line).get("step", 0) <= step]
    if len(keep) != len(lines):
      tmp = self._path + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
      os.replace(tmp, self._path)

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _clean(v) for k, v in values.items()}}
    with open(self._path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in values.items():
        if value is not None and not isinstance(value, str):
          self._tb.add_scalar(key if "/" in key else f"train/{key}", float(value), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _rate(tokens_per_sec: float | None) -> str:
  if tokens_per_sec is None:
    return "-"
  return f"{tokens_per_sec / 1000:.1f}k" if tokens_per_sec >= 1000 else f"{tokens_per_sec:.0f}"


class Progress:
  """A progress bar (tqdm on a terminal, one line per update otherwise): step, loss, tokens/s, MFU, ETA."""

  def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
    self.enabled = enabled
    self.total = total_steps
    self._tty = sys.stdout.isatty()
    self._bar = None
    self._start_time, self._start_step = time.time(), start_step
    if enabled and self._tty:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       file=sys.stdout)

  def update(self, step: int, loss: float, tokens_per_sec: float | None, mfu: float | None) -> None:
    if not self.enabled:
      return
    mfu_text = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix_str(f"loss {loss:.3f} | {_rate(tokens_per_sec)} tok/s | MFU {mfu_text}")
      return
    elapsed = time.time() - self._start_time
    done = step - self._start_step
    eta = elapsed / done * (self.total - step) if done > 0 else 0.0
    print(f"step {step}/{self.total} | loss {loss:.4f} | {_rate(tokens_per_sec)} tok/s | MFU {mfu_text} | "
          f"ETA {_duration(eta)}", flush=True)

  def message(self, text: str) -> None:
    """Prints a line without breaking the bar."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=sys.stdout)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
