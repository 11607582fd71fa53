"""The ISM vs causal experiment's runner in its CPU smoke mode, and its statistics on known inputs.

The smoke protocol (a tiny checkpoint, two steps) tests the pipeline, the resume and the report, not the
result; docs/EXPERIMENTS.md holds the real run.
"""

import glob
import json
import os

import numpy as np
import pytest

from experiments.ism_vs_causal import recall, report, run, stats
from experiments.ism_vs_causal.protocol import SMOKE


def test_seed_interval_is_the_student_t_interval():
  interval = stats.seed_interval([1.0, 2.0, 3.0])
  assert interval["mean"] == 2.0 and interval["n"] == 3
  assert interval["ci95"] == pytest.approx(4.302653 * 1.0 / np.sqrt(3), rel=1e-6)
  assert stats.seed_interval([5.0])["ci95"] == 0.0


def test_paired_bootstrap_finds_a_constant_shift_and_ignores_shared_spread():
  rng = np.random.default_rng(0)
  count = rng.integers(5, 50, size=200).astype(float)
  base = count * rng.uniform(1.0, 4.0, size=200)  # dialogues differ a lot; both arms share that
  result = stats.paired_bootstrap(base + 0.1 * count, base, count)
  assert result["diff"] == pytest.approx(0.1) and result["lo"] == pytest.approx(0.1)
  assert result["hi"] == pytest.approx(0.1) and result["dialogues"] == 200
  noisy = stats.paired_bootstrap(base + count * rng.normal(0.0, 0.5, 200), base, count)
  assert noisy["lo"] < 0.0 < noisy["hi"]


def test_probe_set_is_seeded_and_states_the_fact_before_asking():
  probes = recall.make_probe_set(seed=3, per_distance=4, distances=(0, 2))
  assert probes == recall.make_probe_set(seed=3, per_distance=4, distances=(0, 2))
  assert [p["distance"] for p in probes] == [0] * 4 + [2] * 4
  for probe in probes:
    assert probe["value"] in probe["history"][0][0] and len(probe["history"]) == probe["distance"] + 1
    assert all(probe["value"] not in answer for _, answer in probe["history"])
  assert recall.recalled("I think it is Lisbon!", "lisbon") and not recall.recalled("No idea.", "Lisbon")


def test_smoke_run_resumes_and_reports(tmp_path):
  out, data = str(tmp_path / "results"), str(tmp_path / "data")
  assert run.main(["--smoke", "--out", out, "--data_dir", data, "--max_units", "4"]) == 0
  first = sorted(glob.glob(os.path.join(out, "*", "*.json")))
  assert len(first) == 4  # three zero-shot masks and the first fine-tuning unit, then "interrupted"
  assert run.main(["--smoke", "--out", out, "--data_dir", data]) == 0
  units = sorted(glob.glob(os.path.join(out, "*", "*.json")))
  assert len(units) == 3 + len(SMOKE.arms) * len(SMOKE.seeds) * len(SMOKE.lengths)
  with open(os.path.join(out, "short", "ism-seed0.json")) as f:
    ism = json.load(f)
  assert ism["mask"] == "ism" and ism["tokens"] > 0 and len(ism["recall"]) == len(SMOKE.probe_distances) * 2
  assert not os.path.exists(os.path.join(out, "runs", "short", "ism-seed0", "checkpoints"))
  assert report.main(["--results", out]) == 0
  with open(os.path.join(out, "summary.json")) as f:
    summary = json.load(f)
  comparisons = {"short/ism-causal", "short/ism-prefix", "short/ism-prefix_eq_compute"}
  assert set(summary["differences"]) == comparisons
  assert summary["nll"]["short/ism"][0]["n"] == len(SMOKE.seeds)
  assert os.path.exists(os.path.join(out, "nll_by_round.png"))
