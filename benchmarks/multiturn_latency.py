"""Multi-turn serving latency: time to first token and decode tokens/s per round, causal vs ISM vs prefix.

    python benchmarks/multiturn_latency.py --out /tmp/multiturn          # ~1B model on one GPU
    python benchmarks/multiturn_latency.py --preset tiny --rounds 4      # smoke test on CPU
    python benchmarks/multiturn_latency.py --attention_probe             # attention alone: xla vs kernel

One dialogue of ``--rounds`` rounds (query and answer lengths drawn uniformly from ``--query_len`` and
``--answer_len``) is served under each mask kind with :mod:`ism_jax.inference`:

* ``causal`` and ``ism`` reuse the KV cache: round ``k`` prefills its own query block only;
* ``prefix`` recomputes the whole history + query every round (its mask changes the history's K/V).

Weights and query tokens are random (latency depends on shapes only); answers are decoded greedily for
exactly their drawn length (no end-of-turn stop), so every kind serves dialogues of the same lengths. Every
program is compiled in an untimed warm-up pass over the whole dialogue, then each kind runs ``--repeats``
times (kinds interleaved, Python's garbage collector paused during a pass, as latency-minded servers do)
and the median per round is reported. Time to first token is measured from the
call to the first answer token on the host (prefill and sampling included); decode tokens/s over the rest of
the answer. Writes ``results.json`` and ``multiturn_ttft.png`` to ``--out`` and prints a table.
Imports only jax, flax, numpy and ism_jax's model and inference code (matplotlib for the plot if present).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ism_jax.attention import attention
from ism_jax.attention.xla import dense_attention
from ism_jax.inference.dialogues import DialogueBatch
from ism_jax.inference.engine import DEFAULT_DECODE_STEPS, Engine
from ism_jax.inference.steps import compiled_counts, pack_chunks
from ism_jax.masks import MaskRanges, SegmentType, chunk_ranges, make_attention_ranges
from ism_jax.model import ModelConfig, Transformer

KINDS = ("causal", "ism", "prefix")
PRESETS = {
    # Llama-3.2-1B shapes with a 32k vocabulary: 1.10B parameters.
    "1b": dict(vocab_size=32_000, embed_dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
               mlp_dim=8192, rope_theta=500_000.0, param_dtype="bfloat16", compute_dtype="bfloat16",
               scan_layers=True),
    "tiny": dict(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 mlp_dim=128, compute_dtype="float32", scan_layers=True),
}


def build_model(config: ModelConfig) -> Transformer:
  """Random weights, created on the device in one jitted program."""
  factory = lambda: Transformer(config, rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(nnx.eval_shape(factory))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(factory()))())


def usable_attention(impl: str, dtype) -> str:
  """``impl`` if it runs and matches the XLA reference on a bidirectional block (a prefill from slot 0) and
  on a decode step over a cache (the forward-only path on GPU), else ``"xla"``."""
  if impl == "xla":
    return impl
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, (1, 256, 8, 64), dtype) for key in keys[:3])
  decode_ranges = MaskRanges(k_lo=jnp.zeros((1, 1), jnp.int32), k_hi=jnp.full((1, 1), 200, jnp.int32))
  cases = [(q, k, v, make_attention_ranges(jnp.ones((1, 256), jnp.int32))), (q[:, :1], k, v, decode_ranges)]
  try:
    error = 0.0
    for q, k, v, ranges in cases:
      out = jax.jit(lambda q, k, v, r: attention(q, k, v, r, impl=impl))(q, k, v, ranges)
      ref = attention(q, k, v, ranges, impl="xla")
      error = max(error, float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max()))
  except Exception as e:  # pylint: disable=broad-except
    print(f"attention_impl={impl!r} failed ({type(e).__name__}: {str(e)[:200]}); using xla")
    return "xla"
  if not error < 0.05:
    print(f"attention_impl={impl!r} differs from xla by {error}; using xla")
    return "xla"
  return impl


@dataclasses.dataclass
class Dialogue:
  queries: list[np.ndarray]  # per round, the query block's tokens
  answer_lens: list[int]  # per round, the number of answer tokens to decode

  @property
  def num_tokens(self) -> int:
    return sum(q.size for q in self.queries) + sum(self.answer_lens)


def random_dialogue(rng, rounds: int, query_len: tuple[int, int], answer_len: tuple[int, int],
                    vocab: int) -> Dialogue:
  queries = [rng.integers(8, vocab, size=int(rng.integers(query_len[0], query_len[1] + 1)), dtype=np.int32)
             for _ in range(rounds)]
  answers = [int(rng.integers(answer_len[0], answer_len[1] + 1)) for _ in range(rounds)]
  return Dialogue(queries, answers)


def serve(dialogues: DialogueBatch, dialogue: Dialogue) -> list[dict]:
  """One pass over the dialogue; per round: time to first token, decode rate, tokens prefilled."""
  dialogues.reset()
  rounds = []
  for query, answer_len in zip(dialogue.queries, dialogue.answer_lens):
    history, cached = dialogues.tokens(0).size, int(dialogues.engine.fill[0])
    result = dialogues.ask([query], max_new_tokens=answer_len)
    assert result.answers[0].size == answer_len, "answers must have their drawn length"
    prefilled = history + query.size if dialogues.kind == "prefix" else history - cached + query.size
    rounds.append({"ttft_s": result.ttft_s, "decode_tokens_per_s": result.decode_tokens_per_s,
                   "prefill_tokens": prefilled, "history_tokens": history})
  return rounds


def median_rounds(passes: list[list[dict]]) -> list[dict]:
  return [{key: statistics.median(p[r][key] for p in passes) for key in passes[0][r]}
          for r in range(len(passes[0]))]


def model_config(args) -> ModelConfig:
  config = ModelConfig(**{**PRESETS[args.preset], "attention_impl": "xla"})
  impl = usable_attention(args.attention_impl, config.dtype) if jax.default_backend() == "gpu" else "xla"
  return dataclasses.replace(config, attention_impl=impl)


def queued_prefill(engine: Engine, dialogues: DialogueBatch, tokens, calls: int = 20) -> tuple[float, ...]:
  """Seconds per cached 200-token prefill (at slot 4001) with ``calls`` steps queued back to back (the
  device's time per step once host dispatch and the transfer of the first token overlap it), and of one
  step alone: until the call returned and until its first token was on the host. ``tokens(n)`` draws ``n``
  random token ids."""
  dialogues.reset()
  dialogues.ask([tokens(4000)], max_new_tokens=1)
  start_B, length_B = engine.fill.astype(np.int32), np.array([200], np.int32)
  padded = engine.bucket(200)
  window = engine.prefill_window(padded, int(start_B[0]) + 200, from_start=False)
  tokens_BT = np.zeros((1, padded), np.int32)
  types_BT = np.zeros((1, padded), np.int32)
  tokens_BT[0, :200], types_BT[0, :200] = tokens(200), SegmentType.QUERY
  step = lambda: engine._prefill_call(  # pylint: disable=protected-access
      pack_chunks(tokens_BT, types_BT, start_B, length_B), None, window=window, from_start=False,
      all_greedy=True).first_on_host_B
  first = step()
  jax.block_until_ready(first)
  single = []  # one step at a time: (call returned, first token on the host)
  for _ in range(10):
    start = time.perf_counter()
    first = step()
    dispatched = time.perf_counter()
    np.asarray(first)
    single.append((dispatched - start, time.perf_counter() - start))
  start = time.perf_counter()
  for _ in range(calls):
    first = step()
  jax.block_until_ready(first)
  queued = (time.perf_counter() - start) / calls
  return queued, statistics.median(s[0] for s in single), statistics.median(s[1] for s in single)


def probe(args) -> None:
  """Quick timings (ms, median of ``--repeats`` x 4) of a long prefill from slot 0 (a prefix recompute), a
  short prefill after a long history (a cached round) and a decode step, to compare settings."""
  config = model_config(args)
  start = time.perf_counter()
  engine = Engine(build_model(config), batch_size=1, max_len=8192, min_bucket=args.min_bucket,
                  bucket_step=args.bucket_step or None, unroll_layers=args.layers == "unrolled",
                  decode_steps=args.decode_steps)
  dialogues = DialogueBatch(engine, kind="ism", eot_id=None)
  rng = np.random.default_rng(0)
  tokens = lambda n: rng.integers(8, config.vocab_size, size=n)

  def one_pass():
    dialogues.reset()
    long = dialogues.ask([tokens(4000)], max_new_tokens=1)
    short = dialogues.ask([tokens(200)], max_new_tokens=65)
    return {"prefill 4000 from slot 0": long.ttft_s, "prefill 200 at slot 4001": short.ttft_s,
            "decode step": short.decode_s / short.decode_tokens}

  one_pass()  # compiles
  compiled = time.perf_counter() - start
  passes = [one_pass() for _ in range(4 * args.repeats)]
  queued = [queued_prefill(engine, dialogues, tokens) for _ in range(3)]
  summary = ", ".join(f"{k}: {1e3 * statistics.median(p[k] for p in passes):.2f}" for k in passes[0])
  names = ("queued", "step alone: dispatch", "step alone: first token on host")
  summary += "".join(f", prefill 200 at slot 4001 {name}: {1e3 * statistics.median(q[i] for q in queued):.2f}"
                     for i, name in enumerate(names))
  print(f"probe layers={args.layers} decode_steps={args.decode_steps} "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} attention="
        f"{config.attention_impl} (engine + compiles {compiled:.0f}s, total "
        f"{time.perf_counter() - start:.0f}s) [ms]: {summary}", flush=True)


# (call, T, S, fill): decode steps over the whole cache, a 256-token round after 4000 cached tokens.
ATTENTION_PROBE_CASES = [("decode", 1, 5632, 500), ("decode", 1, 5632, 2500), ("decode", 1, 5632, 5000),
                         ("prefill", 256, 4608, 4000)]


def attention_probe(args) -> None:
  """Attention alone, as the scanned model calls it over its layers' caches (ms per call of all layers,
  median of 7 x 10 calls): decode steps (T = 1 over the whole cache) at three fills and a cached prefill
  (a 256-token chunk after 4000 cached slots, over a 4608-slot window); dense XLA against the forward-only
  kernel with its default key split and with one split."""
  from ism_jax.attention import pallas_gpu  # pylint: disable=import-outside-toplevel

  config = ModelConfig(**PRESETS[args.preset])
  layers, heads, kv_heads, dim = config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim
  impls = {
      "xla": dense_attention,
      "kernel": pallas_gpu.attention_forward,
      "kernel 1 split": lambda *a: pallas_gpu.attention_forward(*a, key_split=1 << 30),
  }
  cases = ATTENTION_PROBE_CASES
  print(f"attention probe: {layers} layers, {heads}/{kv_heads} heads of {dim}, {config.compute_dtype}, "
        f"{jax.devices()[0].device_kind} [ms per call of all layers]")
  print("| call | T | S | fill | " + " | ".join(impls) + " |")
  print("|---|---|---|---|" + "---|" * len(impls))
  for name, length, slots, fill in cases:
    keys = jax.random.split(jax.random.key(fill), 3)
    q = jax.random.normal(keys[0], (layers, 1, length, heads, dim), config.dtype)
    k, v = (jax.random.normal(key, (layers, 1, slots, kv_heads, dim), config.dtype) for key in keys[1:])
    types = jnp.full((1, length), SegmentType.QUERY, jnp.int32).at[:, 0].set(SegmentType.ANSWER)
    ranges = chunk_ranges(types, jnp.array([fill], jnp.int32), from_start=False)
    times = []
    for impl in impls.values():
      step = lambda c, x, impl=impl: (c, impl(*x, ranges))
      fn = jax.jit(lambda q, k, v, step=step: jax.lax.scan(step, None, (q, k, v))[1])
      jax.block_until_ready(fn(q, k, v))
      samples = []
      for _ in range(7):
        start = time.perf_counter()
        for _ in range(10):
          out = fn(q, k, v)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / 10)
      times.append(statistics.median(samples) * 1e3)
    print(f"| {name} | {length} | {slots} | {fill} | " + " | ".join(f"{t:.3f}" for t in times) + " |",
          flush=True)


def run(args) -> dict:
  config = model_config(args)
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; model "
        f"{config.num_params() / 1e9:.2f}B params, {config.num_layers} layers, {config.compute_dtype}, "
        f"attention_impl={config.attention_impl}")
  rng = np.random.default_rng(args.seed)
  dialogue = random_dialogue(rng, args.rounds, args.query_len, args.answer_len, config.vocab_size)
  max_len = -(-(dialogue.num_tokens + 2) // 512) * 512
  start = time.perf_counter()
  model = build_model(config)
  engine = Engine(model, batch_size=1, max_len=max_len, min_bucket=args.min_bucket,
                  bucket_step=args.bucket_step or None, unroll_layers=args.layers == "unrolled",
                  decode_steps=args.decode_steps)
  sessions = {kind: DialogueBatch(engine, kind=kind, eot_id=None) for kind in args.kinds}
  print(f"dialogue: {args.rounds} rounds, {dialogue.num_tokens} tokens; cache {max_len} slots; model built "
        f"in {time.perf_counter() - start:.1f}s")
  start = time.perf_counter()
  for kind in args.kinds:  # warm-up: compiles every prefill bucket/window the dialogue needs, and decode
    serve(sessions[kind], dialogue)
    print(f"  warm-up {kind}: {time.perf_counter() - start:.1f}s", flush=True)
  print(f"programs compiled: {compiled_counts()}")
  passes = {kind: [] for kind in args.kinds}
  for repeat in range(args.repeats):
    for kind in args.kinds:
      gc.collect()
      gc.disable()  # a collection inside a round would add milliseconds to a single TTFT
      try:
        passes[kind].append(serve(sessions[kind], dialogue))
      finally:
        gc.enable()
    print(f"  repeat {repeat + 1}/{args.repeats} done", flush=True)
  return {
      "device": device.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
      "model": dataclasses.asdict(config), "num_params": config.num_params(), "max_len": max_len,
      "rounds": args.rounds, "repeats": args.repeats, "query_lens": [q.size for q in dialogue.queries],
      "answer_lens": dialogue.answer_lens, "results": {kind: median_rounds(passes[kind]) for kind in passes},
  }


def table(report: dict) -> str:
  results = report["results"]
  kinds = [k for k in KINDS if k in results]
  head = (["round", "prefix ctx"] + [f"TTFT {k} ms" for k in kinds] + ["ism/causal", "prefix/ism"]
          + [f"tok/s {k}" for k in kinds])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in range(report["rounds"]):
    ttft = {k: results[k][r]["ttft_s"] * 1e3 for k in kinds}
    ctx = results["prefix"][r]["prefill_tokens"] if "prefix" in results else ""
    ratios = [f"{ttft['ism'] / ttft['causal']:.2f}" if {"ism", "causal"} <= set(kinds) else "",
              f"{ttft['prefix'] / ttft['ism']:.1f}" if {"ism", "prefix"} <= set(kinds) else ""]
    row = ([str(r + 1), str(int(ctx))] + [f"{ttft[k]:.2f}" for k in kinds] + ratios
           + [f"{results[k][r]['decode_tokens_per_s']:.0f}" for k in kinds])
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def targets(report: dict, from_round: int = 10) -> dict:
  """The issue's targets at rounds >= ``from_round``: each ratio at its worst round."""
  results, late = report["results"], range(from_round - 1, report["rounds"])
  ttft = lambda k, r: results[k][r]["ttft_s"]
  rate = lambda k, r: results[k][r]["decode_tokens_per_s"]
  worst = {
      "prefix_over_ism_ttft_min": min(ttft("prefix", r) / ttft("ism", r) for r in late),
      "ism_over_causal_ttft_max": max(ttft("ism", r) / ttft("causal", r) for r in late),
      "ism_over_causal_decode_min": min(rate("ism", r) / rate("causal", r) for r in late),
  }
  worst["met"] = (worst["prefix_over_ism_ttft_min"] >= 5 and worst["ism_over_causal_ttft_max"] <= 1.1
                  and worst["ism_over_causal_decode_min"] >= 0.95)
  return worst


def plot(report: dict, path: str) -> bool:
  """Time to first token against round, one line per kind (log scale). False if matplotlib is missing."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
  styles = {"causal": ("tab:gray", "s", "causal (cache reuse)"),
            "ism": ("tab:blue", "o", "ISM (cache reuse)"),
            "prefix": ("tab:red", "^", "prefix (recompute)")}
  for kind, rounds in report["results"].items():
    color, marker, label = styles[kind]
    ax.plot(range(1, len(rounds) + 1), [r["ttft_s"] * 1e3 for r in rounds], color=color, marker=marker,
            markersize=4, label=label)
  ax.set_yscale("log")
  ax.set_xlabel("round")
  ax.set_ylabel("time to first token (ms)")
  params = report["num_params"]
  size = f"{params / 1e9:.1f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"
  ax.set_title(f"{size}-parameter model, {report['rounds']} rounds, {report['device']}", fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
  parser.add_argument("--rounds", type=int, default=16)
  parser.add_argument("--query_len", type=int, nargs=2, default=(64, 256), help="min and max query tokens")
  parser.add_argument("--answer_len", type=int, nargs=2, default=(64, 256), help="min and max answer tokens")
  parser.add_argument("--repeats", type=int, default=11, help="timed passes per kind (median reported)")
  parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
  parser.add_argument("--attention_impl", default="auto", help="attention of every step (GPU only)")
  parser.add_argument("--layers", choices=("scan", "unrolled"), default="unrolled",
                      help="serve the (scanned) model's layers unrolled (the engine's default) or scanned")
  parser.add_argument("--decode_steps", type=int, default=DEFAULT_DECODE_STEPS,
                      help="decode steps per device call (engine option)")
  parser.add_argument("--probe", action="store_true", help="only time a few steps (compare settings)")
  parser.add_argument("--attention_probe", action="store_true",
                      help="only time attention alone: dense xla vs the forward-only kernel (GPU)")
  parser.add_argument("--min_bucket", type=int, default=64, help="smallest padded prefill length")
  parser.add_argument("--bucket_step", type=int, default=0,
                      help="pad prefills longer than this to its multiples; 0 = powers of two only")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.environ.get("OUT", "."),
                      help="folder for results.json and the plot")
  parser.add_argument("--from_json", default=None, help="only print the table and plot of a results.json")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.probe:
    probe(args)
    return
  if args.attention_probe:
    attention_probe(args)
    return
  if args.from_json:
    with open(args.from_json, encoding="utf-8") as f:
      report = json.load(f)
  else:
    report = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
  if plot(report, os.path.join(args.out, "multiturn_ttft.png")):
    print(f"plot: {os.path.join(args.out, 'multiturn_ttft.png')}")
  print(table(report))
  if set(KINDS) <= set(report["results"]) and report["rounds"] >= 10:
    print("targets at rounds >= 10 (worst round):", json.dumps(targets(report)))


if __name__ == "__main__":
  main()
