"""Train-step benchmark: step time, tokens/s and MFU of one config under the causal, ISM and prefix masks.

    python benchmarks/train_step.py --config configs/h100_1b.py            # the table in docs/BENCHMARKS.md
    python benchmarks/train_step.py --config configs/scratch_tiny.py --steps 3  # a CPU smoke run

Every mask trains on the same packed batches of synthetic multi-turn dialogues (random tokens; 2–8 rounds of
16–256-token queries and 16–384-token answers, packed first-fit into rows of ``data.seq_len``), with the
config's optimizer, one jitted step (``ism_jax.training.train_step``) on a one-device mesh. ``prefix`` runs
the same tokens under the prefix mask; training the prefix baseline for real also expands every dialogue
into one example per round, which multiplies the tokens per dialogue by the factor printed below the table
(its "dialogues/s" column divides by it).

MFU counts matmul FLOPs plus attention FLOPs of the allowed (query, key) pairs (ism_jax.training.flops).
Needs only jax, flax, optax, numpy, ml_collections and ism_jax (no data pipeline).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ism_jax import sharding  # noqa: E402
from ism_jax.attention import resolve_impl  # noqa: E402
from ism_jax.masks import SegmentType  # noqa: E402
from ism_jax.training import config as config_lib  # noqa: E402
from ism_jax.training import flops  # noqa: E402
from ism_jax.training import train_step as ts  # noqa: E402
from ism_jax.training.optimizer import optimizer_from_config  # noqa: E402


def synthetic_dialogues(rng: np.random.Generator, count: int, max_len: int) -> list[list[tuple[int, int]]]:
  """``count`` dialogues as lists of ``(query_len, answer_len)`` rounds, cut to fit ``max_len`` tokens."""
  dialogues = []
  for _ in range(count):
    rounds, total = [], 0
    for _ in range(int(rng.integers(2, 9))):
      q, a = int(rng.integers(16, 257)), int(rng.integers(16, 385))
      if total + q + a > max_len:
        break
      rounds.append((q, a))
      total += q + a
    dialogues.append(rounds or [(min(64, max_len // 2), min(64, max_len // 2))])
  return dialogues


def pack(dialogues, rows: int, seq_len: int, vocab: int, rng: np.random.Generator) -> list[dict]:
  """First-fit packing into ``[rows, seq_len]`` batches with loss on every answer target."""
  batches = []

  def new_batch():
    return {k: np.zeros((rows, seq_len), np.int32) for k in ts.MODEL_KEYS}, np.zeros(rows, np.int64)

  arrays, fill = new_batch()
  counts = np.zeros(rows, np.int64)
  for rounds in dialogues:
    types = np.concatenate([[SegmentType.QUERY] * q + [SegmentType.ANSWER] * a for q, a in rounds])
    types = types.astype(np.int32)
    length = len(types)
    free = np.flatnonzero(fill + length <= seq_len)
    if not free.size:
      batches.append(arrays)
      arrays, fill = new_batch()
      counts[:] = 0
      free = np.array([0])
    row, start = int(free[0]), int(fill[free[0]])
    span = slice(start, start + length)
    counts[row] += 1
    arrays["tokens"][row, span] = rng.integers(8, vocab, size=length)
    arrays["segment_types"][row, span] = types
    arrays["segment_ids"][row, span] = counts[row]
    arrays["positions"][row, span] = np.arange(length)
    next_is_answer = np.append(types[1:] == SegmentType.ANSWER, False)
    arrays["loss_mask"][row, span] = next_is_answer
    fill[row] += length
  return batches


def triplet_factor(dialogues) -> float:
  """Tokens of the prefix-LM triplet expansion (one example per round) over the dialogues' own tokens."""
  own = expanded = 0
  for rounds in dialogues:
    lengths = np.cumsum([q + a for q, a in rounds])
    own += lengths[-1]
    expanded += lengths.sum()
  return expanded / own


@dataclasses.dataclass
class Result:
  kind: str
  impl: str
  step_ms: float
  tokens_per_sec: float
  mfu: float | None
  tflops_per_sec: float
  peak_memory_gib: float | None = None
  note: str = ""


def run_kind(config, kind: str, impl: str, batches, steps: int, warmup: int, peak) -> Result:
  """Compiles and times the train step of ``config`` under mask ``kind`` with attention ``impl``."""
  model_config = dataclasses.replace(config_lib.model_config(config), mask=kind, attention_impl=impl)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  optimizer, _ = optimizer_from_config(config.optimizer, total_steps=1000)
  graphdef, abstract_params, param_shardings = ts.abstract_model(model_config, mesh)
  shardings = ts.train_state_shardings(optimizer, abstract_params, param_shardings, mesh)
  _, params = ts.init_params(model_config, mesh, seed=0)
  state = ts.init_train_state(optimizer, params, shardings)
  step = ts.jit_train_step(ts.make_train_step(graphdef, optimizer, kind, config.training.grad_accum_steps),
                           shardings, mesh)
  times, counted = [], []
  with jax.set_mesh(mesh):
    device_batches = [ts.device_batch(b, mesh) for b in batches]
    for i in range(warmup + steps):
      start = time.perf_counter()
      state, metrics = step(state, device_batches[i % len(device_batches)])
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - start
      if i >= warmup:
        times.append(elapsed)
        counted.append((metrics["tokens"], metrics["attention_pairs"]))
  del state, params
  stats = jax.devices()[0].memory_stats() or {}
  peak_memory = stats.get("peak_bytes_in_use", 0) / 2**30 or None
  seconds = statistics.median(times)
  tokens = float(np.mean([c[0] for c in counted]))
  step_flops = float(np.mean([flops.train_flops(model_config, t, p) for t, p in counted]))
  return Result(kind=kind, impl=impl, step_ms=1000 * seconds, tokens_per_sec=tokens / seconds,
                mfu=flops.mfu(step_flops, seconds, 1, peak), tflops_per_sec=step_flops / seconds / 1e12,
                peak_memory_gib=peak_memory)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/h100_1b.py", help="run config (model, batch, seq_len)")
  parser.add_argument("--kinds", default="causal,ism,prefix", help="mask kinds, comma-separated")
  parser.add_argument("--impl", default="auto", help="attention impl (auto = the backend's default kernel)")
  parser.add_argument("--fallback_impl", default="xla_chunked", help="used if --impl fails to compile or run")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per mask (median reported)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
  parser.add_argument("--json", default="", help="also write the results to this JSON file")
  args = parser.parse_args()

  config = config_lib.load_config_file(args.config)
  rows, seq_len = config.training.global_batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  dialogues = synthetic_dialogues(rng, count=max(64, rows * seq_len // 300 * 3), max_len=seq_len)
  batches = pack(dialogues, rows, seq_len, config.model.vocab_size, rng)[:3]
  fill = float(np.mean([(b["segment_types"] != 0).mean() for b in batches]))
  device = jax.devices()[0]
  peak = flops.peak_flops_per_device(device.device_kind, config.metrics.peak_tflops_per_device)
  model_config = config_lib.model_config(config)
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
        f"config {args.config}: {model_config.num_params() / 1e9:.3f}B params, {rows} x {seq_len} "
        f"tokens/step (fill {fill:.1%}), {model_config.compute_dtype}, remat {model_config.remat_policy}, "
        f"scan {model_config.scan_layers}", flush=True)

  results = []
  for kind in args.kinds.split(","):
    impl = resolve_impl(args.impl)
    try:
      result = run_kind(config, kind, impl, batches, args.steps, args.warmup, peak)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      note = f"{impl} failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); ran {args.fallback_impl}"
      print(note, flush=True)
      result = run_kind(config, kind, args.fallback_impl, batches, args.steps, args.warmup, peak)
      result.note = note
    results.append(result)
    memory = "" if result.peak_memory_gib is None else f", peak memory {result.peak_memory_gib:.1f} GiB"
    mfu = "n/a" if result.mfu is None else f"{100 * result.mfu:.1f}%"
    print(f"{kind}: {result.step_ms:.1f} ms/step, {result.tokens_per_sec:,.0f} tok/s, MFU {mfu} "
          f"({result.impl}{memory})", flush=True)

  factor = triplet_factor(dialogues)
  print("\n| mask | attention impl | step (ms) | tokens/s | counted TFLOP/s | MFU | dialogues/s (relative) |")
  print("|---|---|---|---|---|---|---|")
  base = results[0].tokens_per_sec
  for r in results:
    per_dialogue = r.tokens_per_sec / (factor if r.kind == "prefix" else 1.0)
    mfu = "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%"
    print(f"| {r.kind} | {r.impl} | {r.step_ms:.1f} | {r.tokens_per_sec:,.0f} | {r.tflops_per_sec:.1f} "
          f"| {mfu} | {per_dialogue / base:.2f} |")
  print(f"\nprefix triplet expansion: {factor:.2f}x the tokens per dialogue (one example per round); "
        f"'dialogues/s' divides prefix tokens/s by it. Device: {device.device_kind}.")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"device": device.device_kind, "config": args.config, "triplet_factor": factor, "fill": fill,
                 "results": [dataclasses.asdict(r) for r in results]}, f, indent=2)


if __name__ == "__main__":
  main()
