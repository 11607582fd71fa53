"""Serving many conversations at once: aggregate tokens/s and p50/p99 time to first token through the
continuous-batching scheduler, ISM (cache reuse) against prefix (recompute), at several concurrencies.

    python benchmarks/serving.py --out /tmp/serving                          # ~1B model on one GPU
    python benchmarks/serving.py --preset tiny --rounds 2 --concurrency 1 4  # smoke test on CPU (seconds)
    python benchmarks/serving.py --hf_peer                                   # + Hugging Face generate row

``C`` conversations (the synthetic dialogues of benchmarks/multiturn_latency.py: random query tokens, answers
decoded greedily for exactly their drawn length) run closed-loop on a pool of ``C`` slots: every
conversation submits its first round at once, and each next round (the whole dialogue so far plus the next
query, as a client would send it) as soon as its previous answer is complete. Time to first token is from a
request's submission to its first answer token on the host (waiting for admission and the prefill
included); tokens/s is every answer token over the wall time of the run. Each (kind, C) is run once untimed
(it compiles every program that traffic needs) and then timed.

``--hf_peer`` adds a row for Hugging Face transformers ``generate`` with its own KV cache (``DynamicCache``)
on the same dialogues, a randomly initialised Llama of the same shapes in torch: rounds run in lockstep over
the ``C`` conversations as one left-padded batch (``generate`` has no continuous batching), so each round
re-encodes its history; at ``C = 1`` the cache is carried from round to round instead. Skipped, with a
note, where torch or transformers are missing. Prints a markdown table; writes ``serving.json`` to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ism_jax.inference.engine import DEFAULT_DECODE_STEPS, Engine  # noqa: E402
from ism_jax.inference.scheduler import Request, Scheduler, with_answer  # noqa: E402
from ism_jax.inference.steps import compiled_counts  # noqa: E402
from ism_jax.masks import SegmentType  # noqa: E402
from multiturn_latency import PRESETS, Dialogue, build_model, model_config, random_dialogue  # noqa: E402


def percentile(values: list[float], q: float) -> float:
  return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_conversations(scheduler: Scheduler, dialogues: list[Dialogue]) -> dict:
  """Serves every dialogue closed-loop through ``scheduler``; TTFTs, answer tokens and the wall time."""
  history = [(np.zeros(0, np.int32), np.zeros(0, np.int32)) for _ in dialogues]
  rounds_done, owner, submitted, ttft, answers = [0] * len(dialogues), {}, {}, [], {}
  query_type = SegmentType.QUERY

  def submit(i):
    query = dialogues[i].queries[rounds_done[i]]
    tokens, types = history[i]
    types = np.concatenate([types, np.full(query.size, query_type)])
    request = Request(np.concatenate([tokens, query]), types,
                      max_new_tokens=dialogues[i].answer_lens[rounds_done[i]])
    rid = scheduler.submit(request)
    owner[rid], submitted[rid], answers[rid] = (i, request), time.perf_counter(), []

  start = time.perf_counter()
  for i in range(len(dialogues)):
    submit(i)
  tokens = 0
  while not scheduler.idle:
    for event in scheduler.step():
      i, request = owner[event.request_id]
      if not answers[event.request_id]:
        ttft.append(time.perf_counter() - submitted[event.request_id])
      answers[event.request_id] += event.tokens
      tokens += len(event.tokens)
      if event.finished:
        history[i] = with_answer(request.tokens, request.segment_types, answers.pop(event.request_id), None)
        rounds_done[i] += 1
        if rounds_done[i] < len(dialogues[i].queries):
          submit(i)
  wall = time.perf_counter() - start
  return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "ttft_p50_s": percentile(ttft, 50),
          "ttft_p99_s": percentile(ttft, 99), "requests": len(ttft)}


def bench_scheduler(model, dialogues: list[Dialogue], kind: str, args) -> dict:
  max_len = -(-(max(d.num_tokens for d in dialogues) + 2) // 512) * 512
  engine = Engine(model, batch_size=len(dialogues), max_len=max_len, min_bucket=args.min_bucket,
                  decode_steps=args.decode_steps)
  scheduler = Scheduler(engine, kind=kind, eot_id=None, max_prefill_tokens=args.max_prefill_tokens)
  start = time.perf_counter()
  run_conversations(scheduler, dialogues)  # warm-up: compiles what this traffic needs
  warmup_s = time.perf_counter() - start
  scheduler = Scheduler(engine, kind=kind, eot_id=None, max_prefill_tokens=args.max_prefill_tokens)
  result = run_conversations(scheduler, dialogues)
  result.update(warmup_s=warmup_s, max_len=max_len, slot_bytes=engine.slot_bytes,
                prefill_tokens=scheduler.stats["prefill_tokens"],
                cached_tokens=scheduler.stats["cached_tokens"])
  return result


def _hf_model(config):
  """A randomly initialised transformers Llama of the preset's shapes (torch, the first GPU if any)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  hf_config = transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.embed_dim, intermediate_size=config.mlp_dim,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, rope_theta=config.rope_theta,
      max_position_embeddings=32768)
  dtype = torch.bfloat16 if config.compute_dtype == "bfloat16" else torch.float32
  device = "cuda" if torch.cuda.is_available() else "cpu"
  return transformers.LlamaForCausalLM(hf_config).to(device=device, dtype=dtype).eval(), device


class _FirstToken:
  """A ``generate`` streamer that records when the first new tokens (the second ``put``) arrive."""

  def __init__(self):
    self.puts, self.first = 0, None

  def put(self, value):
    self.puts += 1
    if self.puts == 2:
      self.first = time.perf_counter()

  def end(self):
    pass


def _hf_round(model, device, histories, answer_len, cache):
  """One lockstep round of ``generate`` over left-padded histories; ``(new tokens [C, n], ttft, cache)``."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import DynamicCache  # pylint: disable=import-outside-toplevel
  width = max(h.size for h in histories)
  ids = np.zeros((len(histories), width), np.int64)
  mask = np.zeros((len(histories), width), np.int64)
  for b, h in enumerate(histories):
    ids[b, width - h.size:], mask[b, width - h.size:] = h, 1
  streamer, start = _FirstToken(), time.perf_counter()
  with torch.no_grad():
    out = model.generate(input_ids=torch.from_numpy(ids).to(device),
                         attention_mask=torch.from_numpy(mask).to(device), do_sample=False,
                         max_new_tokens=answer_len, min_new_tokens=answer_len, streamer=streamer,
                         past_key_values=cache if cache is not None else DynamicCache(),
                         return_dict_in_generate=True, pad_token_id=0)
  torch.cuda.synchronize() if device == "cuda" else None
  new = out.sequences[:, width:].cpu().numpy()
  return new, (streamer.first or time.perf_counter()) - start, out.past_key_values


def bench_hf(config, dialogues: list[Dialogue]) -> dict:
  """Lockstep rounds of HF generate over the dialogues (see the module docstring); the same metrics."""
  model, device = _hf_model(config)
  for passes in range(2):  # the first pass warms up (CUDA kernels, allocator)
    histories = [np.zeros(0, np.int64) for _ in dialogues]
    tokens, ttft, cache, start = 0, [], None, time.perf_counter()
    for r in range(len(dialogues[0].queries)):
      histories = [np.concatenate([h, d.queries[r]]) for h, d in zip(histories, dialogues)]
      answer_len = max(d.answer_lens[r] for d in dialogues)
      new, first_s, cache = _hf_round(model, device, histories, answer_len, cache)
      cache = cache if len(dialogues) == 1 else None  # a padded batch cannot carry its cache over rounds
      ttft += [first_s] * len(dialogues)
      tokens += new.size
      histories = [np.concatenate([h, n]) for h, n in zip(histories, new)]
    wall = time.perf_counter() - start
  return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "ttft_p50_s": percentile(ttft, 50),
          "ttft_p99_s": percentile(ttft, 99), "requests": len(ttft), "device": device}


def table(report: dict) -> str:
  lines = ["| conversations | kind | tokens/s | TTFT p50 ms | TTFT p99 ms | prefilled tokens | from cache |",
           "|---|---|---|---|---|---|---|"]
  for row in report["rows"]:
    r = row["result"]
    if "skipped" in r:
      lines.append(f"| {row['concurrency']} | {row['kind']} | skipped: {r['skipped']} | | | | |")
      continue
    lines.append(f"| {row['concurrency']} | {row['kind']} | {r['tokens_per_s']:.0f} | "
                 f"{r['ttft_p50_s'] * 1e3:.1f} | {r['ttft_p99_s'] * 1e3:.1f} | "
                 f"{r.get('prefill_tokens', '')} | {r.get('cached_tokens', '')} |")
  return "\n".join(lines)


def _peer_row(config, dialogues) -> dict:
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import transformers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    return {"skipped": f"{e.name} is not installed"}
  return bench_hf(config, dialogues)


def run(args) -> dict:
  config = model_config(args)
  model = build_model(config)
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}); model {config.num_params() / 1e9:.3f}B "
        f"params, {config.compute_dtype}, attention_impl={config.attention_impl}", flush=True)
  rows = []
  for concurrency in args.concurrency:
    rng = np.random.default_rng(args.seed)
    dialogues = [random_dialogue(rng, args.rounds, args.query_len, args.answer_len, config.vocab_size)
                 for _ in range(concurrency)]
    for kind in args.kinds:
      rows.append({"concurrency": concurrency, "kind": kind, "result": bench_scheduler(model, dialogues, kind,
                                                                                      args)})
      print(f"  {concurrency} conversations, {kind}: {json.dumps(rows[-1]['result'])}", flush=True)
    if args.hf_peer:
      rows.append({"concurrency": concurrency, "kind": "hf generate", "result": _peer_row(config, dialogues)})
      print(f"  {concurrency} conversations, hf generate: {json.dumps(rows[-1]['result'])}", flush=True)
  return {"device": device.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
          "model": dataclasses.asdict(config), "rounds": args.rounds, "query_len": args.query_len,
          "answer_len": args.answer_len, "decode_steps": args.decode_steps, "rows": rows,
          "programs": compiled_counts()}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
  parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
  parser.add_argument("--kinds", nargs="+", choices=("ism", "causal", "prefix"), default=["ism", "prefix"])
  parser.add_argument("--rounds", type=int, default=8)
  parser.add_argument("--query_len", type=int, nargs=2, default=(64, 256), help="min and max query tokens")
  parser.add_argument("--answer_len", type=int, nargs=2, default=(64, 256), help="min and max answer tokens")
  parser.add_argument("--decode_steps", type=int, default=DEFAULT_DECODE_STEPS)
  parser.add_argument("--max_prefill_tokens", type=int, default=8192, help="scheduler admission per tick")
  parser.add_argument("--min_bucket", type=int, default=64, help="smallest padded prefill length")
  parser.add_argument("--attention_impl", default="auto", help="attention of every step (GPU only)")
  parser.add_argument("--hf_peer", action="store_true", help="add the Hugging Face transformers row")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for serving.json")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  report = run(args)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "serving.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  print(table(report))


if __name__ == "__main__":
  main()
