"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

The settings travel into the jitted steps as per-row arrays (``[B]`` each), so changing them between calls,
or giving every dialogue of a batch its own, never recompiles. Order of operations (as in most serving
stacks): divide by the temperature, keep the ``top_k`` largest logits, keep the smallest set of those whose
probabilities sum to at least ``top_p``, then draw. ``temperature = 0`` is greedy (argmax) and ignores the
other two. Whether every row is greedy is the one static choice (it skips the sort over the vocabulary).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_EXCLUDED = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick each answer token.

  Attributes:
    temperature: 0 for greedy decoding, else the softmax temperature (> 0).
    top_k: keep only the ``top_k`` most likely tokens; 0 keeps all.
    top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``; 1.0 keeps all.
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    problems = []
    if not self.temperature >= 0.0:
      problems.append(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
    if int(self.top_k) != self.top_k or self.top_k < 0:
      problems.append(f"top_k={self.top_k} must be a non-negative integer (0 = no limit)")
    if not 0.0 < self.top_p <= 1.0:
      problems.append(f"top_p={self.top_p} must be in (0, 1] (1 = no limit)")
    if problems:
      raise ValueError("invalid SamplingParams: " + "; ".join(problems))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def as_arrays(params: Sequence[SamplingParams]) -> dict[str, np.ndarray]:
  """Per-row settings as ``{"temperature": [B] f32, "top_k": [B] i32, "top_p": [B] f32}``."""
  return {
      "temperature": np.array([p.temperature for p in params], np.float32),
      "top_k": np.array([p.top_k for p in params], np.int32),
      "top_p": np.array([p.top_p for p in params], np.float32),
  }


def filter_logits(logits_BV: jax.Array, temperature_B, top_k_B, top_p_B) -> tuple[jax.Array, jax.Array]:
  """Tempered logits in descending order with the excluded ones set to ``-inf``, and their token ids.

  Returns:
    ``(sorted_BV, token_ids_BV)``: ``sorted_BV[b, r]`` is the ``r``-th largest tempered logit of row ``b``
    (or ``-inf`` when top-k/top-p drop it) and ``token_ids_BV[b, r]`` its token id. Rank 0 is always kept.
  """
  vocab = logits_BV.shape[-1]
  temperature_B = jnp.maximum(jnp.asarray(temperature_B, jnp.float32), 1e-6)
  scaled_BV = logits_BV.astype(jnp.float32) / temperature_B[:, None]
  sorted_BV, token_ids_BV = jax.lax.top_k(scaled_BV, vocab)
  rank_V = jnp.arange(vocab, dtype=jnp.int32)
  top_k_B = jnp.asarray(top_k_B, jnp.int32)
  keep_BV = rank_V < jnp.where(top_k_B > 0, top_k_B, vocab)[:, None]
  probs_BV = jax.nn.softmax(jnp.where(keep_BV, sorted_BV, _EXCLUDED), axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # probability of the better-ranked tokens
  keep_BV &= mass_before_BV < jnp.asarray(top_p_B, jnp.float32)[:, None]
  keep_BV |= rank_V == 0
  return jnp.where(keep_BV, sorted_BV, _EXCLUDED), token_ids_BV


def sample(logits_BV: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """One token per row, ``[B]`` int32, with per-row settings (``[B]`` arrays, see :func:`as_arrays`).

  Rows with temperature 0 take the argmax. No data-dependent control flow (a ``lax.cond`` would make a GPU
  wait for the host every step); callers whose rows are all greedy use :func:`greedy` and skip the sort.
  """
  sorted_BV, token_ids_BV = filter_logits(logits_BV, temperature, top_k, top_p)
  rank_B = jax.random.categorical(key, sorted_BV, axis=-1)
  drawn_B = jnp.take_along_axis(token_ids_BV, rank_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jnp.where(jnp.asarray(temperature) > 0, drawn_B, greedy(logits_BV))


def greedy(logits_BV: jax.Array) -> jax.Array:
  """The most likely token of each row, ``[B]`` int32."""
  return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
