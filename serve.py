"""Serve a model over an OpenAI-compatible HTTP API, keeping each conversation's KV cache between rounds.

    python serve.py --workdir runs/default --kv_budget_mb 512            # a trained run, its mask
    python serve.py --pretrained smollm2 --host 0.0.0.0 --port 8000      # SmolLM2-135M-Instruct, causal

Endpoints: ``POST /v1/chat/completions`` (streaming and not), ``GET /v1/models``, ``GET /stats``. A client
continues a conversation by sending the earlier messages plus a new user turn; the server finds the cached
conversation with that token prefix and prefills only the new tokens (exact under ``ism`` and ``causal``).
Conversations live in a fixed pool of cache slots sized by ``--kv_budget_mb`` (or ``--max_conversations``);
idle ones are evicted least recently used. See docs/INFERENCE.md ("Serving many conversations").
"""

from __future__ import annotations

import argparse
import os
import sys

from ism_jax.masks import MASK_KINDS

DEFAULT_BUDGET_MB = 1024


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="training run directory (checkpoints + tokenizer)")
  source.add_argument("--pretrained", help="'smollm2', a .gguf file or a Hugging Face checkpoint directory")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--mask", choices=MASK_KINDS, default=None,
                      help="mask kind (default: the run's config; causal with --pretrained)")
  parser.add_argument("--model_name", default=None, help="the model id clients send (default: the "
                      "workdir's folder name, or the --pretrained name)")
  parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--max_len", type=int, default=None,
                      help="KV cache slots per conversation (default: the run's data.seq_len; 2048 with "
                           "--pretrained)")
  parser.add_argument("--kv_budget_mb", type=float, default=DEFAULT_BUDGET_MB,
                      help="memory for the KV cache of all conversations: the slot pool is as many "
                           "conversations of --max_len tokens as fit")
  parser.add_argument("--max_conversations", type=int, default=None,
                      help="cap on the slot pool (cached conversations), below what the budget allows")
  parser.add_argument("--max_new_tokens", type=int, default=256,
                      help="answer budget when a request sets no max_tokens")
  parser.add_argument("--max_prefill_tokens", type=int, default=8192,
                      help="new prompt tokens admitted per scheduler tick (bounds the stall of running "
                           "answers)")
  parser.add_argument("--decode_steps", type=int, default=8, help="decode steps per device call")
  parser.add_argument("--attention_impl", default=None, help="override the model's attention_impl")
  return parser


def load(args):
  """``(model, tokenizer, mask, max_len, name)`` from ``--workdir`` or ``--pretrained``."""
  import jax  # pylint: disable=import-outside-toplevel
  overrides = {"attention_impl": args.attention_impl} if args.attention_impl else {}
  if args.pretrained is not None:
    from ism_jax.convert import load_pretrained, load_pretrained_tokenizer  # pylint: disable=import-outside-toplevel
    if jax.default_backend() == "cpu":
      overrides["compute_dtype"] = "float32"  # bfloat16 matmuls are slow on CPUs
    mask = args.mask or "causal"
    _, model = load_pretrained(args.pretrained, mask=mask, **overrides)
    name = args.model_name or os.path.basename(args.pretrained.rstrip("/")).removesuffix(".gguf")
    return model, load_pretrained_tokenizer(args.pretrained), mask, args.max_len or 2048, name
  from ism_jax.workdir import restore  # pylint: disable=import-outside-toplevel
  run = restore(args.workdir, args.step, overrides)
  max_len = args.max_len or int(run.run_config.data.seq_len)
  name = args.model_name or os.path.basename(os.path.abspath(args.workdir))
  return run.model, run.tokenizer, args.mask or run.model.config.mask, max_len, name


def slots_for_budget(slot_bytes: int, budget_mb: float, cap: int | None) -> int:
  """How many conversations fit in the budget (at most ``cap``); refuses a budget below one."""
  slots = int(budget_mb * 2**20) // slot_bytes
  if slots < 1:
    raise ValueError(f"--kv_budget_mb={budget_mb} holds no conversation: one takes {slot_bytes / 2**20:.1f} "
                     "MiB of KV cache at this --max_len; raise the budget or lower --max_len")
  return slots if cap is None else max(1, min(slots, cap))


def build(args):
  """The app and its started worker (no HTTP server yet)."""
  from ism_jax.data.chat_template import stop_token_id  # pylint: disable=import-outside-toplevel
  from ism_jax.inference import cache as cache_lib  # pylint: disable=import-outside-toplevel
  from ism_jax.inference.engine import Engine  # pylint: disable=import-outside-toplevel
  from ism_jax.inference.scheduler import Scheduler  # pylint: disable=import-outside-toplevel
  from ism_jax.serving import Worker, create_app  # pylint: disable=import-outside-toplevel
  model, tokenizer, mask, max_len, name = load(args)
  slot_bytes = cache_lib.slot_bytes(model.config, max_len)
  slots = slots_for_budget(slot_bytes, args.kv_budget_mb, args.max_conversations)
  engine = Engine(model, batch_size=slots, max_len=max_len, decode_steps=args.decode_steps)
  scheduler = Scheduler(engine, kind=mask, eot_id=stop_token_id(tokenizer),
                        max_prefill_tokens=args.max_prefill_tokens)
  worker = Worker(scheduler, tokenizer, default_max_tokens=args.max_new_tokens).start()
  print(f"serving {name!r} ({mask} mask): {slots} conversations of up to {max_len} tokens, "
        f"{slot_bytes / 2**20:.4g} MiB of KV cache each ({slots * slot_bytes / 2**20:.4g} MiB of "
        f"--kv_budget_mb={args.kv_budget_mb:g})", file=sys.stderr, flush=True)
  return create_app(worker, name), worker


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.ERROR)  # orbax's informational warnings while restoring the checkpoint
  try:
    app, worker = build(args)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  import uvicorn  # pylint: disable=import-outside-toplevel
  try:
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
  finally:
    worker.stop()
  return 0


if __name__ == "__main__":
  sys.exit(main())
