"""The train-step benchmark's lever rows (benchmarks/train_step.py): parsing and the flat-moment optimizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import train_step as bench
from ism_jax.training.config import base_config
from ism_jax.training.optimizer import optimizer_from_config


def test_lever_rows_parse_and_unknown_levers_are_refused():
  row = bench.parse_row("chunked_ce_4096+remat_dots_attn+xla:--xla_a=1 --xla_b=2+opt_flat@causal")
  assert (row.kind, row.loss_chunk_tokens, row.remat_policy) == ("causal", 4096, "dots_attn") and row.opt_flat
  assert row.xla_flags == "--xla_a=1 --xla_b=2"
  assert bench.parse_row("chunked_ce").loss_chunk_tokens == bench.DEFAULT_LOSS_CHUNK_TOKENS
  assert bench.parse_row("fused_proj+unrolled").model == {"fused_projections": True, "scan_layers": False}
  assert bench.parse_row("baseline") == bench.Row(spec="baseline")
  with pytest.raises(ValueError, match="unknown lever 'fast'"):
    bench.parse_row("baseline+fast")
  with pytest.raises(ValueError, match="mask 'full' must be"):
    bench.parse_row("baseline@full")


def test_flat_moments_give_the_updates_of_the_configured_optimizer():
  config = base_config().optimizer
  config.warmup_steps = 0
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,)), "e": jnp.full((5, 2), 2.0)}
  grads = jax.tree.map(lambda p: 3 * jnp.sin(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape), params)
  results = []
  for optimizer in (optimizer_from_config(config, 100)[0], bench.flat_adamw(config, 100)):
    state, p = optimizer.init(params), params
    for _ in range(3):
      updates, state = optimizer.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    results.append(p)
  for key in params:
    np.testing.assert_allclose(results[1][key], results[0][key], rtol=1e-6)
