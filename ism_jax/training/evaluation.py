"""Periodic evaluation: answer loss per round index, and teacher-forced exact match per answer.

Keys of the returned dict (``R`` = ``num_rounds``; the last bucket gathers rounds ``>= R - 1``)::

    eval/loss                    mean answer cross entropy over every target
    eval/loss_round_<r>          the same over targets of round r (0-based; "<R-1>+" for the last bucket)
    eval/exact_match             answers whose every token (and end-of-turn) is the argmax, teacher forced;
                                 equal to greedy decoding reproducing the answer exactly (synthetic task)
    eval/exact_match_round_<r>   the same per round
    eval/answers                 number of answers evaluated

Rounds without targets are left out.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import numpy as np

from ism_jax.training.train_step import EVAL_KEYS, device_batch

NUM_ROUNDS = 8


def _round_name(r: int, num_rounds: int) -> str:
  return f"{r}+" if r == num_rounds - 1 else str(r)


def evaluate(eval_step: Callable, params, batches: Iterable[dict[str, np.ndarray]], mesh,
             num_rounds: int = NUM_ROUNDS) -> dict[str, float]:
  """Runs the jitted ``eval_step`` over host batches and reduces the per-round sums (see module docstring)."""
  totals = None
  for batch in batches:
    sums = eval_step(params, device_batch(batch, mesh, EVAL_KEYS))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  if totals is None:
    return {}
  totals = {k: np.asarray(v, np.float64) for k, v in jax.device_get(totals).items()}
  results = {}
  if totals["targets"].sum() > 0:
    results["eval/loss"] = float(totals["nll"].sum() / totals["targets"].sum())
  if totals["answers"].sum() > 0:
    results["eval/exact_match"] = float(totals["exact"].sum() / totals["answers"].sum())
  results["eval/answers"] = float(totals["answers"].sum())
  for r in range(num_rounds):
    name = _round_name(r, num_rounds)
    if totals["targets"][r] > 0:
      results[f"eval/loss_round_{name}"] = float(totals["nll"][r] / totals["targets"][r])
    if totals["answers"][r] > 0:
      results[f"eval/exact_match_round_{name}"] = float(totals["exact"][r] / totals["answers"][r])
  return results


def summary(results: dict[str, float]) -> str:
  """One line: overall loss and exact match, then the loss of each round."""
  parts = [f"eval loss {results.get('eval/loss', float('nan')):.4f}",
           f"exact match {100 * results.get('eval/exact_match', 0.0):.1f}%"]
  rounds = [(k.rsplit("_", 1)[1], v) for k, v in results.items() if k.startswith("eval/loss_round_")]
  if rounds:
    parts.append("by round " + " ".join(f"{r}:{v:.3f}" for r, v in rounds))
  return " | ".join(parts)
