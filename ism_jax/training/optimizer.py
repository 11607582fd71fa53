"""AdamW with linear warmup and cosine decay, global-norm gradient clipping, and decay on matrices only."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(learning_rate: float, warmup_steps: int, total_steps: int,
                           min_lr_ratio: float = 0.1) -> optax.Schedule:
  """0 → ``learning_rate`` linearly over ``warmup_steps``, then cosine to ``learning_rate * min_lr_ratio``.

  The cosine ends at ``total_steps`` (the run's last step); warmup longer than the run is cut to it.
  """
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=learning_rate * min_lr_ratio)


def _decay_mask(params):
  """Weight decay on matrices (ndim >= 2: projections, embeddings), not on norm scales or biases."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(learning_rate: float, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   grad_clip_norm: float = 0.0) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """``(optimizer, schedule)``: clip by global norm (if ``grad_clip_norm > 0``) then AdamW on the schedule."""
  schedule = learning_rate_schedule(learning_rate, warmup_steps, total_steps, min_lr_ratio)
  adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask)
  if grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adamw), schedule
  return adamw, schedule


def optimizer_from_config(optimizer_config, total_steps: int):
  """:func:`make_optimizer` from a run config's ``optimizer`` section (any mapping with those fields)."""
  c = optimizer_config
  return make_optimizer(c.learning_rate, total_steps, warmup_steps=c.warmup_steps,
                        min_lr_ratio=c.min_lr_ratio, weight_decay=c.weight_decay, b1=c.b1, b2=c.b2, eps=c.eps,
                        grad_clip_norm=c.grad_clip_norm)
