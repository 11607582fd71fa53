"""Runs every arm, seed and length of the protocol (protocol.py), resuming where an earlier run stopped.

    python experiments/ism_vs_causal/run.py --out experiments/ism_vs_causal/results   # the experiment (GPU)
    python experiments/ism_vs_causal/run.py --smoke --out /tmp/smoke                  # CPU smoke mode
    python experiments/ism_vs_causal/report.py --results experiments/ism_vs_causal/results

Layout of ``--out`` (raw results, one JSON per unit of work; a unit whose JSON exists is skipped, and a
training run cut short resumes from its checkpoint)::

    protocol.json                 the protocol as run, and the measured prefix token expansion
    recall.jsonl                  the probe set (written once from its seed)
    zero_shot/<mask>.json         base model: per-dialogue NLL and recall answers under each mask
    <length>/<arm>-seed<s>.json   fine-tuned: the same, plus training cost
    runs/<length>/<arm>-seed<s>/  the train.py workdir (metrics.jsonl; checkpoints removed once scored)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402

from experiments.ism_vs_causal import nll, recall  # noqa: E402
from experiments.ism_vs_causal.protocol import FULL, SMOKE, Protocol, accumulation, run_config  # noqa: E402
from ism_jax.convert import load_pretrained  # noqa: E402
from ism_jax.data import packing, pipeline  # noqa: E402
from ism_jax.inference.session import ChatBatch  # noqa: E402
from ism_jax.training import checkpointing, inputs, loop, metrics  # noqa: E402
from ism_jax.workdir import restore  # noqa: E402


def _write_json(path: str, value) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  checkpointing.atomic_write(path, json.dumps(value, indent=1).encode("utf-8"))


def _validation_dialogues(protocol: Protocol, pipe, tokenizer) -> list:
  raw = pipeline.read_dialogues(pipe, "validation", max_dialogues=protocol.eval_dialogues or None)
  encoded = [tokenizer.encode_dialogue(messages) for messages in raw]
  return [d for d in encoded if d.num_rounds > 0]


def _expansion(protocol: Protocol, pipe, tokenizer) -> float:
  """Tokens of the prefix triplet expansion over tokens of one example per dialogue (train split sample)."""
  totals = {False: 0, True: 0}
  for messages in pipeline.read_dialogues(pipe, "train", max_dialogues=protocol.expansion_sample):
    dialogue = tokenizer.encode_dialogue(messages)
    for triplets in totals:
      examples = packing.prepare_examples(dialogue, protocol.seq_len, "all", triplets=triplets, log=False)
      totals[triplets] += sum(len(e) for e in examples)
  return totals[True] / totals[False]


def _score(model, tokenizer, dialogues, probes, protocol: Protocol, kind: str, with_probe: bool) -> dict:
  """Per-dialogue NLL under ``kind`` and, if asked, the recall probe's greedy answers."""
  start = time.time()
  nll_sum, count = nll.dialogue_nll(model, dialogues, protocol.seq_len, kind)
  out = {"nll": nll_sum.tolist(), "count": count.tolist(), "score_seconds": time.time() - start}
  if with_probe:
    start = time.time()
    chat = ChatBatch(model, tokenizer, batch_size=protocol.probe_batch, kind=kind,
                     max_len=protocol.probe_max_len, max_new_tokens=protocol.probe_max_new_tokens)
    out["recall"] = recall.run_probe(chat, probes, protocol.probe_max_new_tokens)
    out["probe_seconds"] = time.time() - start
  return out


def _costs(workdir: str) -> dict:
  records = [r for r in metrics.read_metrics(workdir) if "window_tokens" in r]
  return {"tokens": sum(r["window_tokens"] for r in records),
          "train_seconds": sum(r["window_seconds"] for r in records),
          "final_loss": records[-1]["loss"] if records else None}


def _train_and_score(protocol, arm, seed, length, steps, rows, args, context) -> dict | None:
  """Trains (or resumes) one unit and scores it; ``None`` when a signal stopped the training early."""
  workdir = os.path.join(args.out, "runs", length, f"{arm}-seed{seed}")
  config = run_config(protocol, arm, seed, steps, rows, args.data_dir)
  start = time.time()
  if loop.train(config, workdir)["step"] < steps:  # SIGTERM or Ctrl-C: a checkpoint was saved; stop here
    return None
  wall = time.time() - start
  model = restore(workdir).model
  kind = protocol.mask(arm)
  result = {"arm": arm, "mask": kind, "seed": seed, "length": length, "steps": steps, "rows": rows,
            "seq_len": protocol.seq_len, "wall_seconds": wall, "device": jax.devices()[0].device_kind,
            **_costs(workdir)}
  result["device_seconds"] = wall * jax.device_count()
  result.update(_score(model, context["tokenizer"], context["dialogues"], context["probes"], protocol, kind,
                       length in protocol.probe_lengths))
  return result


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="results folder (resumed if it exists)")
  parser.add_argument("--data_dir", default="data", help="TFDS data directory")
  parser.add_argument("--smoke", action="store_true", help="the CPU smoke protocol (tiny model, few steps)")
  parser.add_argument("--max_units", type=int, default=0, help="stop after this many new units (0 = all)")
  args = parser.parse_args(argv)
  protocol = SMOKE if args.smoke else FULL
  config = run_config(protocol, "ism", protocol.seeds[0], 1, protocol.rows, args.data_dir)
  pipe, tokenizer = inputs.pipeline_config(config), inputs.prepare(config).tokenizer
  dialogues = _validation_dialogues(protocol, pipe, tokenizer)
  probe_path = os.path.join(args.out, "recall.jsonl")
  if not os.path.exists(probe_path):
    recall.write_probe_set(probe_path, recall.make_probe_set(protocol.probe_seed, protocol.probe_per_distance,
                                                              protocol.probe_distances))
  context = {"tokenizer": tokenizer, "dialogues": dialogues, "probes": recall.read_probe_set(probe_path)}
  meta_path = os.path.join(args.out, "protocol.json")
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
  else:
    meta = {"protocol": dataclasses.asdict(protocol), "expansion": _expansion(protocol, pipe, tokenizer),
            "validation_dialogues": len(dialogues), "device": jax.devices()[0].device_kind}
    _write_json(meta_path, meta)
  target = protocol.rows * meta["expansion"]  # rows of triplets that hold as many dialogues as ism's rows
  unit = jax.device_count() * accumulation(protocol, round(target))  # rows split over microbatches, devices
  prefix_rows = max(protocol.rows, round(target / unit) * unit)
  done = 0

  def budget_left() -> bool:
    return not args.max_units or done < args.max_units

  for kind in ("causal", "ism", "prefix"):
    path = os.path.join(args.out, "zero_shot", f"{kind}.json")
    if os.path.exists(path) or not budget_left():
      continue
    _, model = load_pretrained(protocol.base, mask=kind, compute_dtype=protocol.compute_dtype,
                               scan_layers=True)
    _write_json(path, {"mask": kind, **_score(model, tokenizer, dialogues, context["probes"], protocol, kind,
                                              True)})
    done += 1
    print(f"zero-shot {kind}: done", flush=True)
  for length, steps in protocol.lengths:
    for seed in protocol.seeds:
      for arm in protocol.arms:
        path = os.path.join(args.out, length, f"{arm}-seed{seed}.json")
        if os.path.exists(path) or not budget_left():
          continue
        rows = prefix_rows if arm == "prefix" else protocol.rows
        result = _train_and_score(protocol, arm, seed, length, steps, rows, args, context)
        if result is None:
          print(f"{length} {arm} seed {seed}: interrupted; run again to resume", flush=True)
          return 1
        _write_json(path, result)
        shutil.rmtree(os.path.join(args.out, "runs", length, f"{arm}-seed{seed}", "checkpoints"),
                      ignore_errors=True)
        done += 1
        print(f"{length} {arm} seed {seed}: {result['wall_seconds']:.0f} s, final loss "
              f"{result['final_loss']}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
