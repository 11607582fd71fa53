"""Temporary probe: compile-time split and a perfetto trace summary of cached 200-token asks."""
import gzip, glob, json, os, sys, time, statistics, collections
import jax, jax.numpy as jnp, numpy as np
from benchmarks.multiturn_latency import build_model, PRESETS
from ism_jax.model import ModelConfig
from ism_jax.inference.engine import Engine, pack_chunks
from ism_jax.inference.dialogues import DialogueBatch

layers = sys.argv[1] if len(sys.argv) > 1 else "unrolled"
cfg = ModelConfig(**{**PRESETS[os.environ.get("PRESET", "1b")], "attention_impl": "auto"})
engine = Engine(build_model(cfg), batch_size=1, max_len=8192, min_bucket=64, bucket_step=None,
                unroll_layers=layers == "unrolled")
# compile split for the cached prefill program
padded, window = 256, engine.prefill_window(256, 4201, False)
packed = pack_chunks(np.zeros((1, padded), np.int32), np.ones((1, padded), np.int32), np.array([4001]), np.array([200]))
t0 = time.perf_counter()
lowered = engine._prefill_fn.lower(engine._params, engine.cache, packed, engine._key, None, window=window,
                                   from_start=False, all_greedy=True)
t1 = time.perf_counter()
compiled = lowered.compile()
t2 = time.perf_counter()
print(f"[{layers}] cached prefill program: lower {t1-t0:.1f}s compile {t2-t1:.1f}s", flush=True)
d = DialogueBatch(engine, kind="ism", eot_id=None)
rng = np.random.default_rng(0)
tok = lambda n: rng.integers(8, cfg.vocab_size, size=n)
t0 = time.perf_counter()
d.ask([tok(4000)], max_new_tokens=1); d.ask([tok(200)], max_new_tokens=3)
print(f"[{layers}] first pass (remaining compiles) {time.perf_counter()-t0:.1f}s", flush=True)
ttfts = []
for _ in range(6):
  d.reset(); d.ask([tok(4000)], max_new_tokens=1)
  ttfts.append(d.ask([tok(200)], max_new_tokens=8).ttft_s)
print(f"[{layers}] ask ttft ms: " + " ".join(f"{1e3*t:.2f}" for t in ttfts), flush=True)
out = f"/tmp/trace_{layers}"
with jax.profiler.trace(out, create_perfetto_trace=True):
  for i in range(3):
    d.reset(); d.ask([tok(4000)], max_new_tokens=1)
    with jax.profiler.TraceAnnotation(f"ASK{i}"):
      r = d.ask([tok(200)], max_new_tokens=1)
    print(f"traced ask ttft {r.ttft_s*1e3:.2f} ms")
  with jax.profiler.TraceAnnotation("DECODE"):
    r = d.ask([tok(100)], max_new_tokens=41)
path = max(glob.glob(out + "/**/perfetto_trace.json.gz", recursive=True), key=os.path.getmtime)
events = json.load(gzip.open(path))
events = events["traceEvents"] if isinstance(events, dict) else events
pnames = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
tnames = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
X = [e for e in events if e.get("ph") == "X"]
gpu = [e for e in X if "GPU" in pnames.get(e["pid"], "") or "gpu" in pnames.get(e["pid"], "").lower()]
print("processes:", set(pnames.values()))
for i in range(3):
  ann = [e for e in X if e["name"] == f"ASK{i}"][0]
  s, t = ann["ts"], ann["ts"] + ann["dur"]
  g = sorted([e for e in gpu if s <= e["ts"] <= t], key=lambda e: e["ts"])
  if not g:
    print("no gpu events"); continue
  busy = sum(e["dur"] for e in g)
  gaps = [(b["ts"] - (a["ts"] + a["dur"]), a["name"][:40], b["name"][:40]) for a, b in zip(g, g[1:])]
  big = sorted(gaps, reverse=True)[:6]
  print(f"ASK{i}: host span {ann['dur']:.0f}us, gpu events {len(g)}, first at +{g[0]['ts']-s:.0f}us, last end +{g[-1]['ts']+g[-1]['dur']-s:.0f}us, busy sum {busy:.0f}us")
  print("   biggest gaps:", [(round(x[0]), x[1], x[2]) for x in big])
  host = sorted([e for e in X if s <= e["ts"] <= t and e not in g and e["dur"] > 40], key=lambda e: e["ts"])
  for e in host[:40]:
    print(f"   host +{e['ts']-s:7.0f} dur {e['dur']:6.0f} {tnames.get((e['pid'], e['tid']), '')[:20]:20s} {e['name'][:70]}")
  by = collections.Counter()
  for e in g: by[e["name"][:60]] += e["dur"]
  print("   top gpu:", [(k, round(v)) for k, v in by.most_common(8)])
  if i == 0:
    for j, e in enumerate(g[:75]):
      print(f"   K{j:3d} +{e['ts']-s:7.0f} {e['dur']:6.1f} {e['name'][:60]} {e.get('args', {}).get('kernel_details', '')[-40:]}")
ann = [e for e in X if e["name"] == "DECODE"][0]
s, t = ann["ts"], ann["ts"] + ann["dur"]
g = [e for e in gpu if s <= e["ts"] <= t]
by, cnt = collections.Counter(), collections.Counter()
for e in g: by[e["name"][:60]] += e["dur"]; cnt[e["name"][:60]] += 1
print(f"DECODE(41 tokens): span {ann['dur']:.0f}us gpu events {len(g)} busy {sum(e['dur'] for e in g):.0f}us")
print("   top gpu:", [(k, round(v), cnt[k]) for k, v in by.most_common(10)])

