"""Tables and plots from the raw results of run.py: every arm and seed that exists, nothing else.

    python experiments/ism_vs_causal/report.py --results experiments/ism_vs_causal/results \
        --plots docs/experiments

Writes ``summary.json`` and ``report.md`` into the results folder and three PNG plots into ``--plots``:
answer NLL by round per arm with 95% bands over seeds, recall accuracy by distance, and training cost.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments.ism_vs_causal import stats  # noqa: E402

ARM_ORDER = ("causal", "ism", "prefix", "prefix_eq_compute")
COMPARISONS = (("ism", "causal"), ("ism", "prefix"), ("ism", "prefix_eq_compute"))


def load(results: str) -> tuple[dict, list[dict], dict[str, dict]]:
  """``(protocol.json, fine-tuned run results, zero-shot results by mask)``."""
  with open(os.path.join(results, "protocol.json")) as f:
    meta = json.load(f)
  runs = []
  for length, _ in meta["protocol"]["lengths"]:
    for path in sorted(glob.glob(os.path.join(results, length, "*.json"))):
      with open(path) as f:
        runs.append(json.load(f))
  zero = {}
  for path in sorted(glob.glob(os.path.join(results, "zero_shot", "*.json"))):
    with open(path) as f:
      zero[os.path.basename(path)[:-5]] = json.load(f)
  return meta, runs, zero


def per_round(result: dict) -> np.ndarray:
  """``[R + 1]`` mean answer NLL per round bucket, then over all rounds (NaN where a bucket is empty)."""
  nll, count = np.asarray(result["nll"]), np.asarray(result["count"])
  with np.errstate(invalid="ignore", divide="ignore"):
    rounds = nll.sum(0) / count.sum(0)
  return np.append(rounds, nll.sum() / count.sum())


def recall_by_distance(result: dict) -> dict[int, float]:
  by = {}
  for answer in result.get("recall", []):
    by.setdefault(answer["distance"], []).append(answer["recalled"])
  return {str(d): float(np.mean(v)) for d, v in sorted(by.items())}


def _group(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
  groups: dict[tuple[str, str], list[dict]] = {}
  for run in runs:
    groups.setdefault((run["length"], run["arm"]), []).append(run)
  return groups


def summarize(meta: dict, runs: list[dict], zero: dict[str, dict]) -> dict:
  """Means and 95% CIs over seeds, paired bootstrap differences, recall and cost, as one JSON-able dict."""
  out = {"nll": {}, "differences": {}, "recall": {}, "cost": {}, "zero_shot": {}, "seeds": {}}
  for mask, result in zero.items():
    out["zero_shot"][mask] = {"nll": per_round(result).tolist(), "recall": recall_by_distance(result)}
  groups = _group(runs)
  for (length, arm), members in groups.items():
    key = f"{length}/{arm}"
    out["seeds"][key] = sorted(m["seed"] for m in members)
    curves = np.stack([per_round(m) for m in members])
    out["nll"][key] = [stats.seed_interval(curves[:, j]) if np.isfinite(curves[:, j]).all() else None
                       for j in range(curves.shape[1])]
    recalls = [recall_by_distance(m) for m in members if "recall" in m]
    if recalls:
      out["recall"][key] = {str(d): stats.seed_interval([r[d] for r in recalls]) for d in recalls[0]}
    out["cost"][key] = {name: stats.seed_interval([m[name] for m in members])
                        for name in ("tokens", "train_seconds", "wall_seconds", "device_seconds")}
  for length, _ in meta["protocol"]["lengths"]:
    for a, b in COMPARISONS:
      if (length, a) not in groups or (length, b) not in groups:
        continue
      nll_a, count = _seed_mean(groups[(length, a)])
      nll_b, count_b = _seed_mean(groups[(length, b)])
      if not np.array_equal(count, count_b):
        raise ValueError(f"{length}: arms {a} and {b} scored different answer tokens; not comparable")
      rounds = [stats.paired_bootstrap(nll_a[:, r], nll_b[:, r], count[:, r]) for r in range(count.shape[1])]
      rounds.append(stats.paired_bootstrap(nll_a.sum(1), nll_b.sum(1), count.sum(1)))
      out["differences"][f"{length}/{a}-{b}"] = rounds
    if (length, "ism") in groups and (length, "prefix") in groups:
      ism, prefix = groups[(length, "ism")], groups[(length, "prefix")]
      out["cost"][f"{length}/prefix_over_ism_train_time"] = (
          np.mean([m["train_seconds"] for m in prefix]) / np.mean([m["train_seconds"] for m in ism]))
  return out


def _seed_mean(members: list[dict]) -> tuple[np.ndarray, np.ndarray]:
  """Per-dialogue NLL sums averaged over seeds ``[D, R]`` and the (shared) token counts."""
  return (np.mean([np.asarray(m["nll"]) for m in members], axis=0), np.asarray(members[0]["count"]))


def _cell(interval: dict | None, digits: int = 3) -> str:
  if interval is None:
    return "—"
  if interval["n"] == 1:  # no interval from one seed; the row's label says so
    return f"{interval['mean']:.{digits}f}"
  return f"{interval['mean']:.{digits}f} ± {interval['ci95']:.{digits}f}"


def _difference(c: dict) -> str:
  if not np.isfinite(c["diff"]):
    return "—"
  return f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}] ({100 * c['relative']:+.1f}%)"


def _head(first: str, columns: list[str]) -> list[str]:
  """A markdown table's header row and separator."""
  return [f"| {first} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]


def markdown(meta: dict, summary: dict) -> str:
  """The report's tables (NLL by round, paired differences, recall by distance, cost)."""
  rounds = meta["protocol"].get("num_rounds", 8)
  heads = [str(r + 1) for r in range(rounds - 1)] + [f"{rounds}+", "all"]
  lines = [f"Held-out dialogues: {meta['validation_dialogues']}; device: {meta['device']}; prefix token "
           f"expansion {meta['expansion']:.2f}x. Mean ± 95% CI over seeds (Student t).", ""]
  lines += _head("run", [f"round {h}" for h in heads])
  for mask, values in summary["zero_shot"].items():
    lines.append(f"| base model, {mask} mask (zero-shot) | " + " | ".join(
        "—" if not np.isfinite(v) else f"{v:.3f}" for v in values["nll"]) + " |")
  for key, cells in summary["nll"].items():
    seeds = len(summary["seeds"][key])
    lines.append(f"| {key} ({seeds} seed{'s' if seeds > 1 else ''}) | " + " | ".join(_cell(c) for c in cells) + " |")
  lines += ["", "Paired differences of answer NLL (nats per token; negative = the first arm is better), "
            "seed-averaged per dialogue, 95% bootstrap CI over dialogues, relative change in brackets:", ""]
  lines += _head("comparison", [f"round {h}" for h in heads])
  for key, cells in summary["differences"].items():
    lines.append(f"| {key} | " + " | ".join(_difference(c) for c in cells) + " |")
  distances = sorted({d for v in summary["recall"].values() for d in v}, key=int)
  if distances:
    lines += ["", "Recall probe: share of greedy answers that contain the fact, by distance (rounds between "
              "the fact and the question):", ""]
    lines += _head("run", [f"distance {d}" for d in distances])
    for mask, values in summary["zero_shot"].items():
      lines.append(f"| base model, {mask} mask | " + " | ".join(
          f"{values['recall'].get(d, float('nan')):.3f}" for d in distances) + " |")
    for key, cells in summary["recall"].items():
      seeds = len(summary["seeds"][key])
      lines.append(f"| {key} ({seeds} seed{'s' if seeds > 1 else ''}) | " + " | ".join(_cell(cells.get(d), 3) for d in distances) + " |")
  lines += ["", "Cost per run (mean ± 95% CI over seeds): real tokens processed, steady-state training "
            "seconds (compile, evaluation and checkpoints excluded), whole-run wall seconds, device-seconds:",
            ""]
  lines += _head("run", ["tokens", "train s", "wall s", "device-s"])
  for key, cost in summary["cost"].items():
    if isinstance(cost, dict):
      lines.append(f"| {key} | {cost['tokens']['mean']:,.0f} | {_cell(cost['train_seconds'], 1)} | "
                   f"{_cell(cost['wall_seconds'], 1)} | {_cell(cost['device_seconds'], 1)} |")
  ratios = {k: v for k, v in summary["cost"].items() if not isinstance(v, dict)}
  for key, value in ratios.items():
    lines.append(f"\n{key}: {value:.2f}x")
  return "\n".join(lines) + "\n"


def plots(meta: dict, summary: dict, directory: str) -> list[str]:
  """NLL by round, recall by distance and cost bars as PNG files; returns their paths."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  lengths = [length for length, _ in meta["protocol"]["lengths"]]
  fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4), squeeze=False)
  for ax, length in zip(axes[0], lengths):
    for arm in ARM_ORDER:
      cells = summary["nll"].get(f"{length}/{arm}")
      if not cells:
        continue
      x = [i + 1 for i, c in enumerate(cells[:-1]) if c is not None]
      mean = np.array([c["mean"] for c in cells[:-1] if c is not None])
      half = np.array([c["ci95"] for c in cells[:-1] if c is not None])
      ax.plot(x, mean, marker="o", label=arm)
      ax.fill_between(x, mean - half, mean + half, alpha=0.2)
    ax.set(title=f"{length} fine-tuning", xlabel="round (8 = 8+)", ylabel="answer NLL (nats/token)")
    ax.legend()
  paths = [os.path.join(directory, "nll_by_round.png")]
  fig.tight_layout()
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(6, 4))
  for mask, values in summary["zero_shot"].items():
    d = sorted(values["recall"], key=int)
    ax.plot([int(k) for k in d], [values["recall"][k] for k in d], linestyle=":", label=f"base, {mask}")
  for key, cells in summary["recall"].items():
    d = sorted(cells, key=int)
    mean = np.array([cells[k]["mean"] for k in d])
    half = np.array([cells[k]["ci95"] for k in d])
    ax.errorbar([int(k) for k in d], mean, yerr=half, marker="o", capsize=3, label=key)
  ax.set(xlabel="rounds between fact and question", ylabel="recall (share of answers)", ylim=(0, 1))
  ax.legend(fontsize=7)
  paths.append(os.path.join(directory, "recall_by_distance.png"))
  fig.tight_layout()
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(7, 4))
  keys = [k for k, v in summary["cost"].items() if isinstance(v, dict)]
  ax.bar(range(len(keys)), [summary["cost"][k]["train_seconds"]["mean"] for k in keys],
         yerr=[summary["cost"][k]["train_seconds"]["ci95"] for k in keys], capsize=3)
  ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=8)
  ax.set(ylabel="training seconds per run")
  paths.append(os.path.join(directory, "cost.png"))
  fig.tight_layout()
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)
  return paths


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--results", required=True)
  parser.add_argument("--plots", default=None, help="folder for the PNG plots (default: the results folder)")
  args = parser.parse_args(argv)
  meta, runs, zero = load(args.results)
  summary = summarize(meta, runs, zero)
  with open(os.path.join(args.results, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  text = markdown(meta, summary)
  with open(os.path.join(args.results, "report.md"), "w") as f:
    f.write(text)
  plots(meta, summary, args.plots or args.results)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
