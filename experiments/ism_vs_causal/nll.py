"""Answer NLL of every held-out dialogue, round by round, each arm under its own mask.

``causal`` and ``ism`` score a whole dialogue in one forward pass. ``prefix`` is scored as it is served:
round k is one forward pass over rounds 1..k, history plus query bidirectional, with loss on round k's answer
only (the triplet expansion the prefix arm trains on). Both give, for dialogue d and round bucket r
(0-based; the last bucket gathers rounds >= NUM_ROUNDS - 1)::

    nll[d, r]     summed cross entropy (nats) of round r's answer tokens (and its end-of-turn token)
    count[d, r]   number of those tokens

so per-round means, seed averages and paired differences between arms over the same dialogues follow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ism_jax.data import packing
from ism_jax.training.train_step import token_losses

NUM_ROUNDS = 8


def examples_of(dialogues, seq_len: int, kind: str) -> list[tuple[int, object]]:
  """``(dialogue index, example)`` pairs: one per dialogue, or one per round for ``prefix``."""
  out = []
  for d, dialogue in enumerate(dialogues):
    for example in packing.prepare_examples(dialogue, seq_len, "all", triplets=kind == "prefix", log=False):
      out.append((d, example))
  return out


def _rows(examples, seq_len: int) -> dict[str, np.ndarray]:
  """One example per row, padded to ``seq_len``: the arrays ``token_losses`` reads, plus round_index."""
  rows = len(examples)
  batch = {key: np.zeros((rows, seq_len), np.int32) for key in
           ("tokens", "segment_types", "segment_ids", "positions", "loss_mask", "round_index")}
  for i, example in enumerate(examples):
    n = len(example)
    for key, values in packing.example_arrays(example).items():
      batch[key][i, :n] = values
    batch["segment_ids"][i, :n] = 1
    batch["positions"][i, :n] = np.arange(n)
  return batch


def dialogue_nll(model, dialogues, seq_len: int, kind: str, rows_per_batch: int = 64):
  """``(nll [D, NUM_ROUNDS], count [D, NUM_ROUNDS])`` float64 of ``model`` under mask ``kind``."""
  if model.config.mask != kind:
    raise ValueError(f"the model's mask is {model.config.mask!r}; load it with mask={kind!r}")
  graphdef, params = nnx.split(model)

  @jax.jit
  def sums(params, batch):
    nll_BT, _ = token_losses(graphdef, params, batch)
    return jnp.where(batch["loss_mask"] != 0, nll_BT, 0.0)

  pairs = examples_of(dialogues, seq_len, kind)
  pairs.sort(key=lambda p: len(p[1]))  # similar lengths share a padded width (fewer wasted positions)
  nll = np.zeros((len(dialogues), NUM_ROUNDS))
  count = np.zeros((len(dialogues), NUM_ROUNDS))
  for start in range(0, len(pairs), rows_per_batch):
    chunk = pairs[start:start + rows_per_batch]
    width = min(seq_len, -(-max(len(e) for _, e in chunk) // 128) * 128)  # a few widths: few compiles
    batch = _rows([e for _, e in chunk] + [chunk[0][1]] * (rows_per_batch - len(chunk)), width)
    token_nll = np.asarray(sums(params, {k: jnp.asarray(v) for k, v in batch.items()}), np.float64)
    for i, (d, _) in enumerate(chunk):
      loss = batch["loss_mask"][i] != 0
      rounds = np.minimum(batch["round_index"][i][loss], NUM_ROUNDS - 1)
      np.add.at(nll[d], rounds, token_nll[i][loss])
      np.add.at(count[d], rounds, 1)
  return nll, count
