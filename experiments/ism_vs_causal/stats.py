"""Statistics of the experiment: means with 95% intervals over seeds, paired bootstrap over dialogues.

* :func:`seed_interval`: mean and the half-width of the two-sided 95% Student-t interval of a few seeds'
  values (n = 3 gives mean ± 4.30 · sd / √3).
* :func:`paired_bootstrap`: the token-weighted mean difference of two arms' answer NLL over the same
  dialogues, ``Σ_d (a_d − b_d) / Σ_d n_d``, and its 95% percentile interval from resampling dialogues
  with replacement. Pairing removes the dialogue-to-dialogue spread that both arms share.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as scipy_stats


def seed_interval(values) -> dict[str, float]:
  """``{"mean", "ci95", "n"}``; ``ci95`` is the half-width (0 for a single value)."""
  values = np.asarray(values, np.float64)
  n = len(values)
  if n == 0:
    raise ValueError("seed_interval needs at least one value")
  half = 0.0
  if n > 1:
    half = float(scipy_stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n))
  return {"mean": float(values.mean()), "ci95": half, "n": n}


def paired_bootstrap(nll_a, nll_b, count, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
  """Mean per-token difference a − b over dialogues (``[D]`` sums and ``[D]`` token counts) with its 95% CI.

  Returns ``{"diff", "lo", "hi", "relative", "dialogues"}``; ``relative`` is ``diff`` over b's mean, and
  dialogues without tokens are left out. Example: a = b + 0.1 nats on every token gives diff 0.1, lo = hi.
  """
  nll_a, nll_b, count = (np.asarray(x, np.float64) for x in (nll_a, nll_b, count))
  keep = count > 0
  delta, count, base = (nll_a - nll_b)[keep], count[keep], nll_b[keep]
  if not count.size:
    return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "relative": float("nan"),
            "dialogues": 0}
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, count.size, size=(resamples, count.size))
  samples = delta[picks].sum(axis=1) / count[picks].sum(axis=1)
  diff = float(delta.sum() / count.sum())
  lo, hi = np.percentile(samples, [2.5, 97.5])
  return {"diff": diff, "lo": float(lo), "hi": float(hi), "relative": diff / float(base.sum() / count.sum()),
          "dialogues": int(count.size)}


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
  """95% Wilson score interval of a proportion (used for recall accuracy of one run)."""
  if trials == 0:
    return float("nan"), float("nan")
  z, p = 1.959964, successes / trials
  centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
  half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
  return float(centre - half), float(centre + half)
