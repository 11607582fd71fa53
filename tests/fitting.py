"""Model helpers shared by tests: the answer loss, a few Adam steps on one batch, stacking layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ism_jax.model import Transformer
from ism_jax.training.train_step import token_losses


def answer_loss(model: Transformer, batch: dict) -> jax.Array:
  """Mean next-token cross entropy over the positions of ``batch["loss_mask"]``."""
  nll_BT, _ = token_losses(*nnx.split(model), batch)
  return jnp.sum(nll_BT * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])


def fit(model: Transformer, batch: dict, learning_rate: float, steps: int):
  """``steps`` jitted Adam steps on ``answer_loss`` of one batch: ``(graphdef, params, losses)``."""
  graphdef, params = nnx.split(model, nnx.Param)
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: answer_loss(nnx.merge(graphdef, p), batch))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  return graphdef, params, losses


def stack_layers(unscanned: Transformer, scanned: Transformer) -> None:
  """Copies an unscanned model's parameters into a scanned one (layers stacked on axis 0): the inverse of
  :func:`ism_jax.inference.rewrites.unstack_layers`, in place."""
  layers = [nnx.state(block, nnx.Param) for block in unscanned.blocks]
  nnx.update(scanned.blocks, jax.tree.map(lambda *xs: jnp.stack(xs), *layers))
  for name in ("embed", "lm_head"):
    getattr(scanned, name)[...] = getattr(unscanned, name)[...]
  nnx.update(scanned.final_norm, nnx.state(unscanned.final_norm))
