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

**Levers** (``--levers``): one row per lever, each in its own subprocess (so XLA flags take effect before
jax starts, and every row's peak memory is its own), ISM mask unless a row ends in ``@causal``; levers of a
row are joined with ``+``::

    python benchmarks/train_step.py --config configs/h100_1b.py --levers baseline baseline@causal \
        chunked_ce remat_dots_attn remat_none "xla:--xla_gpu_enable_command_buffer=" opt_flat

* ``baseline``           the config as it is
* ``chunked_ce[_N]``     ``training.loss_chunk_tokens = N`` (default 8192): no ``[B, T, V]`` float32 logits
* ``remat_<policy>``     ``model.remat_policy``: none, full, dots, dots_no_batch or dots_attn
* ``xla:<flags>``        appended to ``XLA_FLAGS`` (space-separated flags; an unknown flag fails the row)
* ``fused_proj``         ``model.fused_projections``: one q/k/v matmul and one gate/up matmul per layer
* ``unrolled``           ``model.scan_layers = False`` (longer compile)
* ``opt_flat``           Adam's moments over one flattened vector (``optax.flatten(scale_by_adam)``, then
                         weight decay and the schedule as before): one fused update instead of one per tensor

Each row's result is printed (and written to ``--json``) as soon as it finishes; ``--deadline_s`` skips the
rows that would start later; ``--profile_dir DIR`` traces two extra steps of every row into ``DIR/<row>``.
After the lever rows the Hugging Face + FlexAttention peer runs on the same batches (``--peer hf_flex``,
the default; ``benchmarks/hf_peer.py``; a note row where torch, transformers or a GPU is absent), and the
table gives each row's speed-up over it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
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
from ism_jax.training.optimizer import learning_rate_schedule, optimizer_from_config  # noqa: E402

DEFAULT_LOSS_CHUNK_TOKENS = 8192


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


def _matrices(params):
  """Weight decay on matrices only, as ``ism_jax.training.optimizer``."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def flat_adamw(optimizer_config, total_steps: int):
  """The config's optimizer with Adam's moments kept over one flattened vector (the ``opt_flat`` lever):
  clipping, ``optax.flatten(scale_by_adam)``, decoupled weight decay on matrices, the schedule."""
  import optax  # pylint: disable=import-outside-toplevel
  c = optimizer_config
  schedule = learning_rate_schedule(c.learning_rate, c.warmup_steps, total_steps, c.min_lr_ratio)
  parts = [optax.clip_by_global_norm(c.grad_clip_norm)] if c.grad_clip_norm > 0 else []
  parts += [optax.flatten(optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps)),
            optax.add_decayed_weights(c.weight_decay, _matrices), optax.scale_by_learning_rate(schedule)]
  return optax.chain(*parts)


def run_kind(config, kind: str, impl: str, batches, steps: int, warmup: int, peak, opt_flat: bool = False,
             profile_dir: str = "") -> Result:
  """Compiles and times the train step of ``config`` under mask ``kind`` with attention ``impl``; with
  ``profile_dir``, two more steps are traced there (``jax.profiler``, for TensorBoard or Perfetto)."""
  model_config = dataclasses.replace(config_lib.model_config(config), mask=kind, attention_impl=impl)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  optimizer = (flat_adamw(config.optimizer, 1000) if opt_flat
               else optimizer_from_config(config.optimizer, total_steps=1000)[0])
  graphdef, abstract_params, param_shardings = ts.abstract_model(model_config, mesh)
  if opt_flat:  # the flat moments are no parameter-shaped tree; on one device everything is replicated
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = ts.TrainState(params=param_shardings, opt_state=jax.tree.map(
        lambda _: replicated, jax.eval_shape(optimizer.init, abstract_params)))
  else:
    shardings = ts.train_state_shardings(optimizer, abstract_params, param_shardings, mesh)
  _, params = ts.init_params(model_config, mesh, seed=0)
  state = ts.init_train_state(optimizer, params, shardings)
  step = ts.jit_train_step(ts.make_train_step(graphdef, optimizer, kind, config.training.grad_accum_steps,
                                              config.training.loss_chunk_tokens), shardings, mesh)
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
    if profile_dir:
      with jax.profiler.trace(profile_dir):
        for i in range(2):
          state, metrics = step(state, device_batches[i % len(device_batches)])
        jax.block_until_ready(metrics)
  del state, params
  stats = jax.devices()[0].memory_stats() or {}
  peak_memory = stats.get("peak_bytes_in_use", 0) / 2**30 or None
  seconds = statistics.median(times)
  tokens = float(np.mean([c[0] for c in counted]))
  step_flops = float(np.mean([flops.train_flops(model_config, t, p) for t, p in counted]))
  return Result(kind=kind, impl=impl, step_ms=1000 * seconds, tokens_per_sec=tokens / seconds,
                mfu=flops.mfu(step_flops, seconds, 1, peak), tflops_per_sec=step_flops / seconds / 1e12,
                peak_memory_gib=peak_memory)


@dataclasses.dataclass
class Row:
  """One row of ``--levers``: its spec and what it changes."""

  spec: str
  kind: str = "ism"
  loss_chunk_tokens: int | None = None  # None: the config's
  remat_policy: str | None = None  # None: the config's
  xla_flags: str = ""
  opt_flat: bool = False
  model: dict = dataclasses.field(default_factory=dict)  # model fields set by fused_proj / unrolled


MODEL_LEVERS = {"fused_proj": {"fused_projections": True}, "unrolled": {"scan_layers": False}}


def parse_row(spec: str) -> Row:
  """``lever[+lever...][@kind]`` (see the module docstring) -> :class:`Row`; unknown levers are refused."""
  levers, _, kind = spec.partition("@")
  row = Row(spec=spec, kind=kind or "ism")
  for lever in levers.split("+"):
    if lever == "baseline":
      continue
    if lever.startswith("xla:"):
      row.xla_flags = (row.xla_flags + " " + lever[4:]).strip()
    elif lever == "chunked_ce" or lever.startswith("chunked_ce_"):
      row.loss_chunk_tokens = int(lever[11:] or DEFAULT_LOSS_CHUNK_TOKENS)
    elif lever.startswith("remat_"):
      row.remat_policy = lever[6:]
    elif lever == "opt_flat":
      row.opt_flat = True
    elif lever in MODEL_LEVERS:
      row.model.update(MODEL_LEVERS[lever])
    else:
      raise ValueError(f"unknown lever {lever!r} in --levers row {spec!r}; levers: baseline, chunked_ce[_N], "
                       f"remat_<policy>, xla:<flags>, opt_flat, {', '.join(MODEL_LEVERS)}, joined with '+', "
                       "optionally '@causal'")
  if row.kind not in ("ism", "causal", "prefix"):
    raise ValueError(f"--levers row {spec!r}: mask {row.kind!r} must be ism, causal or prefix")
  return row


def make_batches(config):
  """``(batches, dialogues, fill)``: three packed batches of synthetic dialogues (seeded, so every process
  of one run builds the same), the dialogues, and the share of real tokens."""
  rows, seq_len = config.training.global_batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  dialogues = synthetic_dialogues(rng, count=max(64, rows * seq_len // 300 * 3), max_len=seq_len)
  batches = pack(dialogues, rows, seq_len, config.model.vocab_size, rng)[:3]
  fill = float(np.mean([(b["segment_types"] != 0).mean() for b in batches]))
  return batches, dialogues, fill


def describe(config, args, fill: float, device_kind: str, backend: str) -> None:
  model_config = config_lib.model_config(config)
  rows, seq_len = config.training.global_batch_size, config.data.seq_len
  print(f"device: {device_kind} ({backend}), jax {jax.__version__}; config {args.config}: "
        f"{model_config.num_params() / 1e9:.3f}B params, {rows} x {seq_len} tokens/step (fill {fill:.1%}), "
        f"{model_config.compute_dtype}, remat {model_config.remat_policy}, scan {model_config.scan_layers}, "
        f"loss_chunk_tokens {config.training.loss_chunk_tokens}", flush=True)


def run_lever_row(args) -> None:
  """``--row``: one lever row in this process (XLA flags already set by the parent); result to ``--json``."""
  row = parse_row(args.row)
  config = config_lib.load_config_file(args.config)
  if row.loss_chunk_tokens is not None:
    config.training.loss_chunk_tokens = row.loss_chunk_tokens
  if row.remat_policy is not None:
    config.model.remat_policy = row.remat_policy
  config.model.update(row.model)
  batches, _, fill = make_batches(config)
  device = jax.devices()[0]
  describe(config, args, fill, device.device_kind, jax.default_backend())
  print(f"row {row.spec}: XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  peak = flops.peak_flops_per_device(device.device_kind, config.metrics.peak_tflops_per_device)
  name = "".join(c if c.isalnum() or c in "@_" else "-" for c in row.spec)  # the row's trace folder
  profile_dir = os.path.join(args.profile_dir, name) if args.profile_dir else ""
  result = run_kind(config, row.kind, resolve_impl(args.impl), batches, args.steps, args.warmup, peak,
                    opt_flat=row.opt_flat, profile_dir=profile_dir)
  result.note = row.spec
  _write_json(args.json, {"device": device.device_kind, "result": dataclasses.asdict(result)})


def run_peer_row(args) -> None:
  """``--peer_child``: the Hugging Face + FlexAttention peer (jax on CPU only counts FLOPs); to ``--json``."""
  from benchmarks import hf_peer  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config_file(args.config)
  model_config = config_lib.model_config(config)
  batches, _, _ = make_batches(config)
  skipped = hf_peer.unavailable(model_config)
  if skipped:
    print(f"hf+flex peer skipped: {skipped}", flush=True)
    _write_json(args.json, {"skipped": skipped})
    return
  out = hf_peer.run(config, model_config, batches, args.steps, args.warmup)
  timed = [batches[i % len(batches)] for i in range(args.warmup, args.warmup + args.steps)]
  tokens = float(np.mean([(b["segment_types"] != 0).sum() for b in timed]))
  pairs = float(np.mean([ts.attention_pairs({k: jax.numpy.asarray(v) for k, v in b.items()}, "ism")
                         for b in timed]))
  step_flops = flops.train_flops(model_config, tokens, pairs)
  seconds = out["step_ms"] / 1000
  peak = flops.peak_flops_per_device(out["device"], config.metrics.peak_tflops_per_device)
  result = Result(kind="ism", impl="hf+flex", step_ms=out["step_ms"], tokens_per_sec=tokens / seconds,
                  mfu=flops.mfu(step_flops, seconds, 1, peak), tflops_per_sec=step_flops / seconds / 1e12,
                  peak_memory_gib=out["peak_memory_gib"],
                  note=f"torch {out['torch']}, transformers {out['transformers']}, {out['attention']}, "
                       f"{out['num_params'] / 1e9:.3f}B params")
  _write_json(args.json, {"device": out["device"], "result": dataclasses.asdict(result),
                          "losses": out["losses"]})


def _write_json(path: str, value) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2)


def _child(args, extra: list[str], env: dict) -> tuple[dict | None, float, str]:
  """Runs this script with ``extra`` arguments; ``(its JSON or None, wall seconds, failure note)``."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "row.json")
    command = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--impl", args.impl, "--json", out,
               "--profile_dir", args.profile_dir, *extra]
    start = time.perf_counter()
    try:
      code = subprocess.run(command, env=env, timeout=args.row_timeout, check=False).returncode
    except subprocess.TimeoutExpired:
      return None, time.perf_counter() - start, f"timed out after {args.row_timeout} s"
    wall = time.perf_counter() - start
    if code or not os.path.exists(out):
      return None, wall, f"failed (exit status {code}; its output is above)"
    with open(out, encoding="utf-8") as f:
      value = json.load(f)
    return (None, wall, f"skipped: {value['skipped']}") if "skipped" in value else (value, wall, "")


def run_levers(args) -> None:
  """``--levers``: every row in its own subprocess, then the peer; prints the table (and ``--json``)."""
  rows = [parse_row(spec) for spec in args.levers]  # refuses a bad spec before anything runs
  start = time.perf_counter()
  results = []

  def record(name, kind, value, wall, note):  # printed and saved at once: a killed run keeps its rows
    results.append((name, kind, value, wall, note))
    summary = note or (f"{value['result']['step_ms']:.1f} ms/step, peak "
                       f"{value['result']['peak_memory_gib'] or float('nan'):.1f} GiB")
    print(f"== row {name} ({kind}): {summary}, {wall:.0f} s", flush=True)
    if args.json:
      _write_json(args.json, {"config": args.config, "rows": [
          {"row": n, "kind": k, "wall_s": w, "note": t, **(v or {})} for n, k, v, w, t in results]})

  for row in rows:
    if args.deadline_s and time.perf_counter() - start > args.deadline_s:
      record(row.spec, row.kind, None, 0.0, f"skipped: past --deadline_s {args.deadline_s}")
      continue
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + row.xla_flags).strip()
    record(row.spec, row.kind, *_child(args, ["--row", row.spec], env))
  if args.peer == "hf_flex":
    record("hf+flex peer", "ism", *_child(args, ["--peer_child", "hf_flex"],
                                          {**os.environ, "JAX_PLATFORMS": "cpu"}))
  print_lever_table(results, args.peer == "hf_flex")
  print(f"\ntotal wall time {time.perf_counter() - start:.0f} s ({len(results)} rows)")


def print_lever_table(results, peer_requested: bool) -> None:
  peer = next((v["result"] for n, _, v, _, _ in results if n == "hf+flex peer" and v), None)
  print("\n| row | mask | step (ms) | tokens/s | counted TFLOP/s | MFU | peak GiB | speed-up vs HF+Flex "
        "| wall s | device |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
  steps = {}
  for name, kind, value, wall, note in results:
    if value is None:
      print(f"| {name} | {kind} | {note} | | | | | | {wall:.0f} | |")
      continue
    r = value["result"]
    steps[name] = r["step_ms"]
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    memory = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
    speedup = f"{peer['step_ms'] / r['step_ms']:.3f}" if peer else "-"
    print(f"| {name} | {kind} | {r['step_ms']:.1f} | {r['tokens_per_sec']:,.0f} | {r['tflops_per_sec']:.1f} "
          f"| {mfu} | {memory} | {speedup} | {wall:.0f} | {value['device']} |")
  if "baseline" in steps and "baseline@causal" in steps:
    print(f"\nism baseline / causal baseline step time: {steps['baseline'] / steps['baseline@causal']:.4f}")
  if peer is not None:
    print(f"\nhf+flex peer: {peer['note']}; speed-up = peer step time / row step time")
  if peer is None and peer_requested:
    print("\nno HF+Flex peer row (see its note above: torch, transformers or a GPU missing, or it failed)")


def run_kinds(args) -> None:
  """The mask-kind table of docs/BENCHMARKS.md: every ``--kinds`` row in this process."""
  config = config_lib.load_config_file(args.config)
  batches, dialogues, fill = make_batches(config)
  device = jax.devices()[0]
  peak = flops.peak_flops_per_device(device.device_kind, config.metrics.peak_tflops_per_device)
  describe(config, args, fill, device.device_kind, jax.default_backend())
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
  print_kinds_table(results, triplet_factor(dialogues), device.device_kind)
  if args.json:
    _write_json(args.json, {"device": device.device_kind, "config": args.config,
                            "triplet_factor": triplet_factor(dialogues), "fill": fill,
                            "results": [dataclasses.asdict(r) for r in results]})


def print_kinds_table(results, factor: float, device_kind: str) -> None:
  print("\n| mask | attention impl | step (ms) | tokens/s | counted TFLOP/s | MFU | dialogues/s (relative) |")
  print("|---|---|---|---|---|---|---|")
  base = results[0].tokens_per_sec
  for r in results:
    per_dialogue = r.tokens_per_sec / (factor if r.kind == "prefix" else 1.0)
    mfu = "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%"
    print(f"| {r.kind} | {r.impl} | {r.step_ms:.1f} | {r.tokens_per_sec:,.0f} | {r.tflops_per_sec:.1f} "
          f"| {mfu} | {per_dialogue / base:.2f} |")
  print(f"\nprefix triplet expansion: {factor:.2f}x the tokens per dialogue (one example per round); "
        f"'dialogues/s' divides prefix tokens/s by it. Device: {device_kind}.")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/h100_1b.py", help="run config (model, batch, seq_len)")
  parser.add_argument("--kinds", default="causal,ism,prefix", help="mask kinds, comma-separated")
  parser.add_argument("--impl", default="auto", help="attention impl (auto = the backend's default kernel)")
  parser.add_argument("--fallback_impl", default="xla_chunked", help="used if --impl fails to compile or run")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per row (median reported)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
  parser.add_argument("--json", default="", help="also write the results to this JSON file")
  parser.add_argument("--levers", nargs="+", default=None,
                      help="lever rows, one subprocess each (see the module docstring); replaces --kinds")
  parser.add_argument("--peer", choices=("hf_flex", "none"), default="hf_flex",
                      help="with --levers: also time the Hugging Face + FlexAttention peer")
  parser.add_argument("--row_timeout", type=int, default=900, help="seconds one --levers row may take")
  parser.add_argument("--deadline_s", type=int, default=0,
                      help="with --levers: skip lever rows that would start after this many seconds")
  parser.add_argument("--profile_dir", default="",
                      help="with --levers: trace two extra steps of every row under DIR/<row> (jax.profiler)")
  parser.add_argument("--row", default="", help=argparse.SUPPRESS)  # a --levers child
  parser.add_argument("--peer_child", default="", help=argparse.SUPPRESS)  # the peer's child
  args = parser.parse_args()
  if args.row:
    run_lever_row(args)
  elif args.peer_child:
    run_peer_row(args)
  elif args.levers:
    run_levers(args)
  else:
    run_kinds(args)


if __name__ == "__main__":
  main()
