"""The jitted train and eval steps over a ``Mesh(('data', 'fsdp', 'tensor'))``.

The model is split once into a static ``graphdef`` and a pure dict of parameters (``nnx.split`` +
``nnx.to_pure_dict``); the steps are plain ``jax.jit`` functions of ``(TrainState, batch)`` with
``NamedSharding``s taken from the logical-axis rules (:mod:`ism_jax.sharding`). Parameters are created
already sharded, the batch is sharded over ``data`` and ``fsdp``.

Loss: mean cross entropy in float32 over the positions with ``loss_mask = 1``, target = the next token::

    loss = sum_t loss_mask[t] * -log p(tokens[t + 1] | visible context of t) / sum_t loss_mask[t]

With ``grad_accum_steps = A`` the global batch ``[B, T]`` is split into A microbatches ``[B / A, T]`` (rows
``a, a + A, a + 2A, ...``, so each keeps the batch sharding) and their gradients are summed under
``jax.lax.scan``; every microbatch's loss is divided by the whole batch's target count, so the result equals
the one-shot step on the same rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ism_jax import sharding
from ism_jax.masks import SegmentType, make_attention_ranges
from ism_jax.model import ModelConfig, Transformer

MODEL_KEYS = ("tokens", "segment_types", "segment_ids", "positions", "loss_mask")
EVAL_KEYS = MODEL_KEYS + ("round_index",)

Params = dict  # nested dict of arrays (nnx.to_pure_dict of the model's state)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  """What the train step updates: parameters (float32, sharded) and the optimizer state (same layout)."""

  params: Params
  opt_state: optax.OptState


# ----------------------------------------------------------------------------------------------------------
# Parameters and their shardings.
# ----------------------------------------------------------------------------------------------------------


def abstract_model(model_config: ModelConfig, mesh) -> tuple[nnx.GraphDef, Params, Params]:
  """``(graphdef, abstract_params, param_shardings)`` without allocating anything.

  ``abstract_params`` is a pure dict of ``jax.ShapeDtypeStruct`` carrying each parameter's sharding.
  """
  abstract = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  shardings = nnx.to_pure_dict(sharding.state_shardings(state, mesh))
  shapes = nnx.to_pure_dict(state)
  abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                                 shardings)
  return graphdef, abstract_params, shardings


def init_params(model_config: ModelConfig, mesh, seed: int) -> tuple[nnx.GraphDef, Params]:
  """Random parameters created directly in their sharded layout."""
  model = sharding.create_sharded(lambda: Transformer(model_config, rngs=nnx.Rngs(seed)), mesh)
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_params: Params, param_shardings,
                        mesh):
  """Shardings of ``optimizer.init(params)``: moments like their parameter, counters replicated."""
  abstract_state = jax.eval_shape(optimizer.init, abstract_params)
  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree_map_params(optimizer, lambda _, s: s, abstract_state, param_shardings,
                               transform_non_params=lambda _: replicated)


def init_train_state(optimizer: optax.GradientTransformation, params: Params, state_shardings) -> TrainState:
  """The initial :class:`TrainState` (optimizer state created sharded like the parameters)."""
  opt_state = jax.jit(optimizer.init, out_shardings=state_shardings.opt_state)(params)
  return TrainState(params=params, opt_state=opt_state)


def train_state_shardings(optimizer, abstract_params: Params, param_shardings, mesh) -> TrainState:
  return TrainState(params=param_shardings,
                    opt_state=opt_state_shardings(optimizer, abstract_params, param_shardings, mesh))


def abstract_train_state(optimizer, abstract_params: Params, shardings: TrainState) -> TrainState:
  """A :class:`TrainState` of ``ShapeDtypeStruct``s with shardings (the restore target of a checkpoint)."""
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  abstract_opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_opt,
                              shardings.opt_state)
  return TrainState(params=abstract_params, opt_state=abstract_opt)


# ----------------------------------------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------------------------------------


def device_batch(host_batch: dict[str, np.ndarray], mesh, keys=MODEL_KEYS) -> dict[str, jax.Array]:
  """This host's ``[rows, T]`` numpy arrays → global ``[rows * process_count, T]`` arrays sharded by rows."""
  batch_sharding = sharding.batch_sharding(mesh)
  out = {}
  for key in keys:
    local = np.asarray(host_batch[key], np.int32)
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    out[key] = jax.make_array_from_process_local_data(batch_sharding, local, global_shape)
  return out


def _microbatches(batch: dict[str, jax.Array], count: int) -> dict[str, jax.Array]:
  """``[B, T]`` → ``[count, B / count, T]``; microbatch ``a`` holds rows ``a, a + count, ...``."""

  def split(x):
    x = x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(x, (None, "batch", "length"))

  return {key: split(value) for key, value in batch.items()}


# ----------------------------------------------------------------------------------------------------------
# Loss.
# ----------------------------------------------------------------------------------------------------------


def token_losses(graphdef: nnx.GraphDef, params: Params, batch: dict[str, jax.Array]):
  """``(nll_BT, logits_BTV)``: float32 cross entropy of each position against the next token, and logits."""
  model = nnx.merge(graphdef, params)
  logits_BTV = model(batch["tokens"], batch["segment_types"], batch["segment_ids"], batch["positions"])
  targets_BT = jnp.roll(batch["tokens"], -1, axis=1)  # the last position never carries loss
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
  return nll_BT, logits_BTV


def chunked_loss(graphdef: nnx.GraphDef, params: Params, batch: dict[str, jax.Array], weights_BT: jax.Array,
                 chunk_tokens: int) -> jax.Array:
  """``sum_t weights[t] * nll[t]`` (``nll`` of :func:`token_losses`) without the ``[B, T, V]`` logits.

  The final hidden states are cut along time into chunks of ``[B, C]`` tokens, ``C = max(1, chunk_tokens //
  B)`` (each chunk keeps the batch sharding; the last one is padded with zero weight). One ``jax.lax.scan``
  projects a chunk to float32 logits, takes its weighted cross entropy and, in the same pass, that
  chunk's gradients (``weights * (softmax - onehot)`` times the head, and the head's gradient summed in
  float32): a ``jax.custom_vjp`` whose backward pass only scales them by the incoming cotangent. So only
  ``[B, C, V]`` logits exist at once and no matmul is recomputed. ``weights_BT`` is not differentiated.
  """
  model = nnx.merge(graphdef, params)
  hidden_BTD = model.final_hidden(batch["tokens"], batch["segment_types"], batch["segment_ids"],
                                  batch["positions"])
  targets_BT = jnp.roll(batch["tokens"], -1, axis=1)  # the last position never carries loss
  return _weighted_nll(hidden_BTD, model.output_head(), targets_BT, weights_BT.astype(jnp.float32),
                       chunk_tokens)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _weighted_nll(hidden_BTD, head_DV, targets_BT, weights_BT, chunk_tokens):
  return _weighted_nll_fwd(hidden_BTD, head_DV, targets_BT, weights_BT, chunk_tokens)[0]


def _weighted_nll_fwd(hidden_BTD, head_DV, targets_BT, weights_BT, chunk_tokens):
  batch_size, length, _ = hidden_BTD.shape
  chunk = max(1, min(length, chunk_tokens // batch_size))
  count = -(-length // chunk)

  def to_chunks(x):  # [B, T, ...] -> [count, B, C, ...], zero-padded
    x = jnp.pad(x, ((0, 0), (0, count * chunk - length)) + ((0, 0),) * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(batch_size, count, chunk, *x.shape[2:]), 1, 0)

  head = head_DV.astype(hidden_BTD.dtype)

  def one_chunk(dhead_DV, xs):
    hidden_BCD, targets_BC, weights_BC = xs
    logits_BCV = jnp.einsum("bcd,dv->bcv", hidden_BCD, head, preferred_element_type=jnp.float32)
    logits_BCV = sharding.constrain(logits_BCV, ("batch", "length", "vocab"))
    nll_BC = optax.softmax_cross_entropy_with_integer_labels(logits_BCV, targets_BC)
    onehot_BCV = jax.nn.one_hot(targets_BC, logits_BCV.shape[-1], dtype=jnp.float32)
    dlogits_BCV = (jax.nn.softmax(logits_BCV, axis=-1) - onehot_BCV) * weights_BC[..., None]
    dlogits_BCV = dlogits_BCV.astype(head.dtype)  # the compute dtype, as the matmuls of the model
    dhidden_BCD = jnp.einsum("bcv,dv->bcd", dlogits_BCV, head, preferred_element_type=jnp.float32)
    dhead_DV += jnp.einsum("bcd,bcv->dv", hidden_BCD, dlogits_BCV, preferred_element_type=jnp.float32)
    return dhead_DV, (jnp.sum(weights_BC * nll_BC), dhidden_BCD.astype(hidden_BCD.dtype))

  zeros = jnp.zeros(head_DV.shape, jnp.float32)
  dhead_DV, (losses, dhidden_NBCD) = jax.lax.scan(
      one_chunk, zeros, (to_chunks(hidden_BTD), to_chunks(targets_BT), to_chunks(weights_BT)))
  dhidden_BTD = jnp.moveaxis(dhidden_NBCD, 0, 1).reshape(batch_size, count * chunk, -1)[:, :length]
  return jnp.sum(losses), (dhidden_BTD, dhead_DV.astype(head_DV.dtype))


def _weighted_nll_bwd(chunk_tokens, residuals, cotangent):
  del chunk_tokens
  dhidden_BTD, dhead_DV = residuals
  return (cotangent * dhidden_BTD).astype(dhidden_BTD.dtype), cotangent * dhead_DV, None, None


_weighted_nll.defvjp(_weighted_nll_fwd, _weighted_nll_bwd)


def attention_pairs(batch: dict[str, jax.Array], kind: str) -> jax.Array:
  """Number of (query, key) pairs the mask allows over the real tokens of the batch (float32 scalar)."""
  ranges = make_attention_ranges(batch["segment_types"], batch["segment_ids"], kind)
  real = batch["segment_types"] != SegmentType.PAD
  return jnp.sum(jnp.where(real, ranges.k_hi - ranges.k_lo, 0).astype(jnp.float32))


# ----------------------------------------------------------------------------------------------------------
# Train step.
# ----------------------------------------------------------------------------------------------------------


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, kind: str,
                    grad_accum_steps: int = 1, loss_chunk_tokens: int = 0) -> Callable:
  """``step(state, batch) -> (state, metrics)``, to be jitted (see :func:`jit_train_step`).

  ``loss_chunk_tokens > 0`` computes the loss and its gradient with :func:`chunked_loss` (chunks of about
  that many tokens; the ``[B, T, V]`` float32 logits never exist), 0 with :func:`token_losses`; the result
  is the same loss up to float rounding.

  ``metrics`` (float32 scalars): ``loss`` (mean over targets), ``grad_norm`` (before clipping),
  ``param_norm`` (global norm of the updated parameters), ``tokens`` (real tokens), ``targets`` (positions
  with loss), ``attention_pairs`` (allowed pairs, for MFU).
  """
  if loss_chunk_tokens < 0:
    raise ValueError(f"loss_chunk_tokens={loss_chunk_tokens} must be >= 0 (0 = unchunked loss)")

  def summed_loss(params, micro, num_targets):
    if loss_chunk_tokens:
      weights_BT = micro["loss_mask"].astype(jnp.float32) / num_targets
      return chunked_loss(graphdef, params, micro, weights_BT, loss_chunk_tokens)
    nll_BT, _ = token_losses(graphdef, params, micro)
    return jnp.sum(nll_BT * micro["loss_mask"].astype(jnp.float32)) / num_targets

  grad_fn = jax.value_and_grad(summed_loss)

  def step(state: TrainState, batch: dict[str, jax.Array]):
    num_targets = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    if grad_accum_steps == 1:
      loss, grads = grad_fn(state.params, batch, num_targets)
    else:
      def accumulate(carry, micro):
        loss_sum, grads_sum = carry
        loss, grads = grad_fn(state.params, micro, num_targets)
        return (loss_sum + loss, jax.tree.map(jnp.add, grads_sum, grads)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                      _microbatches(batch, grad_accum_steps))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "tokens": jnp.sum((batch["segment_types"] != SegmentType.PAD).astype(jnp.float32)),
        "targets": jnp.sum(batch["loss_mask"].astype(jnp.float32)),
        "attention_pairs": attention_pairs(batch, kind),
    }
    return TrainState(params=params, opt_state=opt_state), metrics

  return step


def jit_train_step(step: Callable, shardings: TrainState, mesh) -> Callable:
  """``jax.jit`` with the state's shardings in and out (state donated) and the batch sharded by rows."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, replicated), donate_argnums=0)


# ----------------------------------------------------------------------------------------------------------
# Eval step.
# ----------------------------------------------------------------------------------------------------------


def make_eval_step(graphdef: nnx.GraphDef, num_rounds: int) -> Callable:
  """``eval_step(params, batch) -> sums``: per-round ``[num_rounds]`` float32 sums for one batch.

  ``nll`` and ``targets``: summed cross entropy and target count of positions whose ``round_index`` is r
  (the last bucket gathers rounds >= num_rounds - 1). ``answers`` and ``exact``: answers (maximal runs of
  loss positions of one round of one dialogue) and those whose every target is the argmax prediction
  (teacher forced; all correct ⇔ greedy decoding reproduces the answer and its end-of-turn token).
  """

  def eval_step(params: Params, batch: dict[str, jax.Array]):
    nll_BT, logits_BTV = token_losses(graphdef, params, batch)
    targets_BT = jnp.roll(batch["tokens"], -1, axis=1)
    mask_BT = batch["loss_mask"] != 0
    wrong_BT = mask_BT & (jnp.argmax(logits_BTV, axis=-1) != targets_BT)
    round_BT = jnp.clip(batch["round_index"], 0, num_rounds - 1)
    # An answer starts where loss begins or the (dialogue, round) changes inside a run of loss positions.
    shift = lambda x, fill: jnp.concatenate([jnp.full_like(x[:, :1], fill), x[:, :-1]], axis=1)
    starts_BT = mask_BT & (~shift(mask_BT, False) | (shift(batch["round_index"], -1) != batch["round_index"])
                           | (shift(batch["segment_ids"], -1) != batch["segment_ids"]))
    size = mask_BT.size
    answer_id = jnp.where(mask_BT.reshape(-1), jnp.cumsum(starts_BT.reshape(-1)) - 1, size)
    any_wrong = jax.ops.segment_max(wrong_BT.reshape(-1).astype(jnp.int32), answer_id, num_segments=size + 1)
    exact_BT = starts_BT & (any_wrong[answer_id].reshape(mask_BT.shape) == 0)
    per_round = lambda x: jax.ops.segment_sum(x.reshape(-1).astype(jnp.float32), round_BT.reshape(-1),
                                              num_segments=num_rounds)
    return {
        "nll": per_round(jnp.where(mask_BT, nll_BT, 0.0)),
        "targets": per_round(mask_BT),
        "answers": per_round(starts_BT),
        "exact": per_round(exact_BT),
    }

  return eval_step


def jit_eval_step(eval_step: Callable, param_shardings, mesh) -> Callable:
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(eval_step, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=replicated)
