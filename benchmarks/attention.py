"""Attention benchmark: the ISM Pallas kernel against cuDNN causal attention, on one GPU.

    python benchmarks/attention.py                       # T = 2048 ... 32768, 16 query heads, 16 KV heads
    python benchmarks/attention.py --kv-heads 4 --lengths 8192 16384

For every length T the batch is ``--tokens // T`` (tokens per step fixed). Rows are packed dialogue
layouts: query blocks and answers of 32-512 tokens, several dialogues per row, padding at the end (seeded).
Rows of the table:

* ``ism kernel``      Pallas kernel (``impl="pallas_gpu"``) on the ISM layout
* ``causal kernel``   the same kernel on the plain causal layout (one dialogue of answers per row)
* ``cudnn causal``    ``jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")``
* ``cudnn ism mask``  cuDNN given the dense ``[B, 1, T, T]`` ISM mask
* ``xla reference``   ``ism_jax.attention.dense_attention`` (dense mask, plain XLA)

By default each row is one long dialogue (``--layouts packed`` packs several per row: fewer allowed pairs;
``--layouts one packed`` runs both, one table each).

PyTorch peers, timed in the same process after the JAX rows of each length, in the same table (skipped
with a note where torch or a CUDA device is absent; torch is not a dependency of the project):

* ``torch sdpa cudnn causal``  ``F.scaled_dot_product_attention(..., is_causal=True)`` under
  ``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)``, bf16 ``[B, H, T, D]``
* ``torch flex ism``           ``torch.compile(flex_attention)`` with the ISM ``BlockMask`` of the row's own
  layout (``benchmarks/torch_peers.py``), GQA through ``enable_gqa``

Before anything is timed, the FlexAttention ISM mask and output are checked against the project's dense
oracle mask on a packed 256-token case with padding (``torch_peers.check_flex_ism``); a mismatch stops
the run.

Times are medians of ``--reps`` runs after warm-up, in ms; "fwd+bwd" is one jitted step computing the
output and the gradients of q, k, v. ``ratio`` is time over cuDNN causal's. TFLOP/s count allowed
(query, key) pairs of the row's own mask: forward ``4 * D * H * pairs``, forward+backward 3.5 times that
(the backward is 2.5 forwards: five matmuls against two, FlashAttention's convention).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import torch_peers  # noqa: E402  (imports torch only when asked)
from ism_jax.attention import attention, dense_attention  # noqa: E402
from ism_jax.masks import MaskRanges, make_attention_mask, make_attention_ranges  # noqa: E402

PAD, QUERY, ANSWER = 0, 1, 2
BWD_FLOP_FACTOR = 3.5  # forward + backward FLOPs over forward FLOPs


def dialogue_layout(rng: np.random.Generator, batch: int, length: int, *, min_block: int = 32,
                    max_block: int = 512, new_dialogue_prob: float = 0.0):
  """``(segment_types, segment_ids)`` int32 ``[batch, length]``: rounds of a query block and an answer.

  Block lengths are uniform in ``[min_block, max_block]``; the last answer runs to the end of the row (no
  padding). With ``new_dialogue_prob = 0`` a row is one long multi-turn dialogue, so the ISM mask holds the
  causal pairs plus each query block's upper triangle (the comparison the issue asks for); a positive
  value packs several dialogues per row.
  """
  types = np.full((batch, length), ANSWER, np.int32)
  ids = np.ones((batch, length), np.int32)
  for row in range(batch):
    cursor, dialogue = 0, 1
    while cursor + min_block < length:
      query, answer = (int(x) for x in rng.integers(min_block, max_block + 1, size=2))
      query = min(query, length - cursor - min_block)
      types[row, cursor:cursor + query] = QUERY
      ids[row, cursor:] = dialogue
      cursor += query + answer
      dialogue += int(rng.random() < new_dialogue_prob)
  return types, ids


def allowed_pairs(ranges: MaskRanges) -> int:
  return int((np.asarray(ranges.k_hi) - np.asarray(ranges.k_lo)).astype(np.int64).sum())


def median_time(fn, args, reps: int, warmup: int = 2) -> float:
  """Median wall time of ``fn(*args)`` in seconds (each run awaited)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def forward_and_step(attend):
  """Jitted forward and jitted forward+backward (gradients of q, k, v) of ``attend(q, k, v, extra)``."""
  fwd = jax.jit(attend)

  def loss(q, k, v, extra, cotangent):
    return jnp.sum(attend(q, k, v, extra).astype(jnp.float32) * cotangent)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return fwd, grads


def implementations():
  """name -> (attend(q, k, v, extra), which extra it takes: "ism" ranges, "causal" ranges or "mask")."""
  return {
      "ism kernel": (lambda q, k, v, r: attention(q, k, v, r, impl="pallas_gpu"), "ism"),
      "causal kernel": (lambda q, k, v, r: attention(q, k, v, r, impl="pallas_gpu"), "causal"),
      "cudnn causal": (lambda q, k, v, _: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation="cudnn"), "causal"),
      "cudnn ism mask": (lambda q, k, v, m: jax.nn.dot_product_attention(
          q, k, v, mask=m, implementation="cudnn"), "mask"),
      "xla reference": (lambda q, k, v, r: dense_attention(q, k, v, r), "ism"),
  }


TORCH_ROWS = {"torch sdpa cudnn causal": "causal", "torch flex ism": "ism"}  # name -> mask of its pairs
LAYOUTS = {"one": 0.0, "packed": 0.15}  # layout -> probability that a new dialogue starts at a round


def _is_oom(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "Out of memory" in text


def bench_length(length: int, args, layout: str = "one") -> list[dict]:
  batch = max(1, args.tokens // length)
  rng = np.random.default_rng(args.seed)
  types, ids = dialogue_layout(rng, batch, length, new_dialogue_prob=LAYOUTS[layout])
  ism = make_attention_ranges(jnp.asarray(types), jnp.asarray(ids), "ism")
  causal = make_attention_ranges(jnp.full((batch, length), ANSWER, jnp.int32))
  keys = jax.random.split(jax.random.key(args.seed), 4)
  dtype = jnp.bfloat16
  q = jax.random.normal(keys[0], (batch, length, args.heads, args.head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, length, args.kv_heads, args.head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, length, args.kv_heads, args.head_dim), dtype)
  cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)
  pairs = {"ism": allowed_pairs(ism), "causal": allowed_pairs(causal)}
  rows = []
  for name, (attend, extra_kind) in implementations().items():
    if args.only and name not in args.only:
      continue
    row = {"T": length, "B": batch, "impl": name, "fwd": None, "step": None, "note": ""}
    pair_kind = "causal" if extra_kind == "causal" else "ism"
    row["flops"] = 4 * args.head_dim * args.heads * pairs[pair_kind]
    try:
      if extra_kind == "mask":
        extra = make_attention_mask(jnp.asarray(types), jnp.asarray(ids), "ism")[:, None]
      else:
        extra = ism if extra_kind == "ism" else causal
      fwd, step = forward_and_step(attend)
      row["fwd"] = median_time(fwd, (q, k, v, extra), args.reps)
      row["step"] = median_time(lambda *a: step(*a, cotangent), (q, k, v, extra), args.reps)
    except Exception as error:  # noqa: BLE001 - a failed row is reported, the run goes on
      row["note"] = "OOM" if _is_oom(error) else f"failed: {type(error).__name__}: {str(error)[:120]}"
    finally:
      extra = fwd = step = None
      jax.clear_caches()
    rows.append(row)
    print(format_row(row, None), flush=True)
  for name, pair_kind in TORCH_ROWS.items():
    if args.only and name not in args.only:
      continue
    row = {"T": length, "B": batch, "impl": name, "fwd": None, "step": None, "note": "",
           "flops": 4 * args.head_dim * args.heads * pairs[pair_kind]}
    row.update(torch_row(name, types, ids, args))
    rows.append(row)
    print(format_row(row, None), flush=True)
  return rows


def torch_row(name: str, types: np.ndarray, ids: np.ndarray, args) -> dict:
  """``{"fwd", "step"}`` seconds of a PyTorch peer on the layout, or ``{"note"}`` saying why not."""
  torch, _ = torch_peers.import_torch()
  note = torch_peers.cuda_note(torch)
  if note:
    return {"note": note}
  try:
    batch, length = types.shape
    gen = torch.Generator(device="cuda").manual_seed(args.seed)

    def randn(heads):
      return torch.randn(batch, heads, length, args.head_dim, device="cuda", dtype=torch.bfloat16,
                         generator=gen, requires_grad=True)

    q, k, v = randn(args.heads), randn(args.kv_heads), randn(args.kv_heads)
    cotangent = torch.randn_like(q).detach()
    if name == "torch flex ism":
      attend, extra = torch_peers.flex_ism_attention(torch, compiled=True), torch_peers.ism_block_mask(
          torch, types, ids, "cuda")
    else:
      attend, extra = torch_peers.sdpa_cudnn_causal(torch), None
      k, v, note = _sdpa_heads(torch, attend, q, k, v)

    def forward():
      with torch.no_grad():
        return attend(q, k, v, extra)

    def step():
      return torch.autograd.grad(attend(q, k, v, extra), (q, k, v), cotangent)

    return {"fwd": torch_peers.median_seconds(torch, forward, args.reps),
            "step": torch_peers.median_seconds(torch, step, args.reps), "note": note}
  except Exception as error:  # noqa: BLE001 - a failed row is reported, the run goes on
    return {"note": "OOM" if _is_oom(error) else f"failed: {type(error).__name__}: {str(error)[:120]}"}
  finally:
    q = k = v = cotangent = extra = None
    torch.cuda.empty_cache()


def _sdpa_heads(torch, attend, q, k, v):
  """``(k, v, note)``: the KV heads as given if cuDNN SDPA takes them (``enable_gqa``), else repeated to the
  query heads outside the timed calls (and a note saying so)."""
  try:
    attend(q, k, v, None)
    return k, v, ""
  except RuntimeError:
    if k.shape[1] == q.shape[1]:
      raise
    group = q.shape[1] // k.shape[1]
    expand = lambda x: x.detach().repeat_interleave(group, dim=1).requires_grad_()
    return expand(k), expand(v), "cuDNN SDPA refused enable_gqa: k, v repeated to H heads"


def flex_check() -> str:
  """Runs ``torch_peers.check_flex_ism`` against ``make_attention_mask`` (raises on a mismatch); the
  line to print, or why the check was skipped."""
  torch, note = torch_peers.import_torch()
  if torch is None:
    return f"# flex ism check skipped: {note}"
  types, ids = torch_peers.check_layout()
  oracle = np.asarray(make_attention_mask(jnp.asarray(types), jnp.asarray(ids), "ism"))
  device = "cuda" if torch.cuda.is_available() else "cpu"
  error = torch_peers.check_flex_ism(torch, oracle, types, ids, device=device)
  return (f"# flex ism check ({device}, torch {torch.__version__}; T=256, packed dialogues and padding, "
          f"GQA 4/2, float32): mask_mod equals make_attention_mask at every pair, max |out - dense "
          f"oracle| = {error:.1e}")


def format_row(row: dict, baseline: dict | None) -> str:
  def ms(x):
    return f"{x * 1e3:9.2f}" if x else f"{row['note'] or '-':>9.9}"

  def ratio(x, base):
    return f"{x / base:6.2f}" if x and base else f"{'-':>6}"

  def tflops(x, factor):
    return f"{row['flops'] * factor / x / 1e12:7.0f}" if x else f"{'-':>7}"

  base_fwd = baseline["fwd"] if baseline else None
  base_step = baseline["step"] if baseline else None
  note = f" {row['note']}" if len(row["note"]) > 9 else ""
  return (f"| {row['T']:6d} | {row['B']:3d} | {row['impl']:23} | {ms(row['fwd'])} | {ms(row['step'])} | "
          f"{ratio(row['fwd'], base_fwd)} | {ratio(row['step'], base_step)} | {tflops(row['fwd'], 1)} | "
          f"{tflops(row['step'], BWD_FLOP_FACTOR)} |{note}")


HEADER = ("|      T |   B | implementation          |    fwd ms |  f+b ms   | ratio fwd | ratio f+b | "
          "TFLOP/s fwd | TFLOP/s f+b |\n"
          "|-------:|----:|:------------------------|----------:|----------:|-------:|-------:|--------:|--------:|")


def kernel_breakdown(length: int, args) -> None:
  """Times the three passes of the ISM kernel separately (forward, dq, dk/dv) with ``args.tuning``."""
  from ism_jax.attention import gpu_backward, gpu_forward, tiles  # pylint: disable=g-import-not-at-top
  from ism_jax.attention.gpu_common import GpuTuning  # pylint: disable=g-import-not-at-top
  tuning = GpuTuning(**args.tuning)
  batch = max(1, args.tokens // length)
  types, ids = dialogue_layout(np.random.default_rng(args.seed), batch, length)
  r = make_attention_ranges(jnp.asarray(types), jnp.asarray(ids), "ism")
  keys = jax.random.split(jax.random.key(args.seed), 4)
  q = jax.random.normal(keys[0], (batch, length, args.heads, args.head_dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (batch, length, args.kv_heads, args.head_dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, length, args.kv_heads, args.head_dim), jnp.bfloat16)
  do = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
  scale = args.head_dim ** -0.5
  fwd_bounds = tiles.tile_bounds(r.k_lo, r.k_hi, row_tile=tuning.block_q, col_tile=tuning.block_kv)
  dq_bounds = tiles.tile_bounds(r.k_lo, r.k_hi, row_tile=tuning.dq_block_q, col_tile=tuning.dq_block_kv)
  dkv_bounds = tiles.tile_bounds(r.q_lo, r.q_hi, row_tile=tuning.dkv_block_kv, col_tile=tuning.dkv_block_q)
  kw = dict(scale=scale, tuning=tuning)
  forward = jax.jit(lambda *a: gpu_forward.forward(*a, **kw))
  out, lse = forward(q, k, v, r.k_lo, r.k_hi, fwd_bounds)
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
  dq = jax.jit(lambda *a: gpu_backward.dq_pass(*a, **kw))
  dkv = jax.jit(lambda *a: gpu_backward.dkv_pass(*a, **kw))
  times = [median_time(forward, (q, k, v, r.k_lo, r.k_hi, fwd_bounds), args.reps),
           median_time(dq, (q, k, v, do, lse, delta, r.k_lo, r.k_hi, dq_bounds), args.reps),
           median_time(dkv, (q, k, v, do, lse, delta, r.q_lo, r.q_hi, dkv_bounds), args.reps)]
  flops = 4 * args.head_dim * args.heads * allowed_pairs(r)
  rates = [flops * f / t / 1e12 for f, t in zip((1.0, 1.5, 2.0), times)]  # dq: 3 matmuls, dk/dv: 4
  print(f"| {length:6d} | {args.tuning or 'default'} | " + " | ".join(
      f"{t * 1e3:7.2f} ms {x:4.0f} TF/s" for t, x in zip(times, rates)) + " |", flush=True)


def _tuning_override(text: str) -> tuple[str, int]:
  name, value = text.split("=")
  return name, int(value)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
  parser.add_argument("--tokens", type=int, default=32768, help="tokens per step (batch = tokens // T)")
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv-heads", type=int, default=16)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--packed", action="store_true", help="the same as --layouts packed")
  parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=None,
                      help="one dialogue per row and/or packed dialogues; one table each (default: one)")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer rows and their check")
  parser.add_argument("--breakdown", action="store_true",
                      help="time the kernel's forward, dq and dk/dv passes separately instead of the table")
  parser.add_argument("--tuning", type=_tuning_override, nargs="*", default=[],
                      help="GpuTuning overrides for --breakdown, e.g. dq_block_kv=128")
  parser.add_argument("--only", nargs="*", default=None, help="implementation names to run")
  args = parser.parse_args(argv)
  args.layouts = args.layouts or (["packed"] if args.packed else ["one"])
  if args.no_torch:
    args.only = [name for name in (args.only or [*implementations(), *TORCH_ROWS]) if name not in TORCH_ROWS]
  device = jax.devices()[0]
  print(f"# {datetime.date.today()} {device.device_kind}, jax {jax.__version__}, H={args.heads} "
        f"K={args.kv_heads} D={args.head_dim} bf16, {args.tokens} tokens per step", flush=True)
  args.tuning = dict(args.tuning)
  if args.breakdown:
    print("|      T | tuning | forward | dq | dk/dv |")
    for length in args.lengths:
      try:
        kernel_breakdown(length, args)
      except Exception as error:  # noqa: BLE001 - a tuning that does not compile is reported
        print(f"| {length:6d} | {args.tuning} | failed: {type(error).__name__}: {str(error)[:200]} |")
    return
  if not args.only or set(args.only) & set(TORCH_ROWS):
    print(flex_check(), flush=True)
  tables = {}
  for layout in args.layouts:
    print(f"# layout: {layout}", flush=True)
    tables[layout] = [row for length in args.lengths for row in bench_length(length, args, layout)]
  for layout, all_rows in tables.items():
    print(f"\nlayout: {'one dialogue per row' if layout == 'one' else 'packed dialogues'}\n" + HEADER)
    for length in args.lengths:
      rows = [r for r in all_rows if r["T"] == length]
      baseline = next((r for r in rows if r["impl"] == "cudnn causal"), None)
      for row in rows:
        print(format_row(row, baseline))


if __name__ == "__main__":
  main()
