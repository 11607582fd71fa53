"""The Transformer: the ISM property, overfitting, scan/unscanned parity, sharding, KV-cache consistency."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ism_jax import (ModelConfig, SegmentType, Transformer, make_attention_mask, make_attention_ranges,
                     sharding)
from ism_jax.inference.cache import init_cache
from ism_jax.inference.rewrites import fuse_projections, unstack_layers
from ism_jax.masks import MaskRanges
from tests import fitting, layouts


def _dialogue(rng, rounds: int, vocab: int = 64):
  """Tokens and segment types of a random dialogue of ``rounds`` rounds: [1, T] int32 each."""
  types = []
  for _ in range(rounds):
    types += [SegmentType.QUERY] * int(rng.integers(2, 6)) + [SegmentType.ANSWER] * int(rng.integers(2, 6))
  tokens = rng.integers(1, vocab, size=len(types))
  return jnp.asarray(tokens[None], jnp.int32), jnp.asarray(np.array(types)[None], jnp.int32)


@pytest.fixture(scope="module")
def tiny_model():
  return Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(0))


def test_logits_shape_and_dtype(tiny_model, packed_batch):
  b = {k: jnp.asarray(v) for k, v in packed_batch.items()}
  logits = tiny_model(b["tokens"], b["segment_types"], b["segment_ids"], b["positions"])
  assert logits.shape == (4, 48, 64) and logits.dtype == jnp.float32
  # Positions default to restarting in each packed dialogue.
  np.testing.assert_allclose(tiny_model(b["tokens"], b["segment_types"], b["segment_ids"]), logits, atol=1e-6)


# One packed row: dialogue 1 = two rounds, dialogue 2 = a round and a query, then padding.
CAUSALITY_TYPES = [1, 1, 2, 2, 1, 1, 2,  1, 1, 2, 2, 1,  0, 0]
CAUSALITY_IDS = [1, 1, 1, 1, 1, 1, 1,  2, 2, 2, 2, 2,  0, 0]


@pytest.mark.parametrize("kind", ["ism", "causal", "prefix"])
def test_each_position_depends_exactly_on_the_positions_its_mask_allows(tiny_model, kind):
  """The Jacobian of each position's logits with respect to every input embedding is nonzero exactly where
  ``make_attention_mask`` allows (through every layer: the masks are transitively closed)."""
  types = jnp.asarray([CAUSALITY_TYPES], jnp.int32)
  ids = jnp.asarray([CAUSALITY_IDS], jnp.int32)
  length = types.shape[1]
  tokens = jnp.arange(1, length + 1, dtype=jnp.int32)[None]  # distinct: embedding row tokens[s] is input s
  graphdef, state = nnx.split(tiny_model)
  params = nnx.to_pure_dict(state)
  direction = jax.random.normal(jax.random.key(0), (tiny_model.config.vocab_size,))

  def projected_logits(table_VD):  # [T]: each position's logits in one random direction
    model = nnx.merge(graphdef, {**params, "embed": table_VD})
    return model(tokens, types, ids, kind=kind)[0] @ direction

  jacobian_TVD = jax.jacrev(projected_logits)(params["embed"])
  depends_TT = (jnp.abs(jacobian_TVD[:, tokens[0]]).sum(-1) > 0)  # [query position, input position]
  np.testing.assert_array_equal(depends_TT, make_attention_mask(types, ids, kind)[0])


@pytest.mark.parametrize("kind, unchanged", [("ism", True), ("causal", True), ("prefix", False)])
def test_appending_rounds_keeps_earlier_logits_only_for_ism_and_causal(tiny_model, kind, unchanged):
  rng = np.random.default_rng(7)
  tokens, types = _dialogue(rng, rounds=5)
  short = 0
  for _ in range(2):  # first two rounds: find where round 3 starts
    short += int(np.argmax(np.asarray(types[0, short:]) == SegmentType.ANSWER))
    short += int(np.argmax(np.asarray(types[0, short:]) == SegmentType.QUERY))
  full = tiny_model(tokens, types, kind=kind)[:, :short]
  prefix_only = tiny_model(tokens[:, :short], types[:, :short], kind=kind)
  diff = float(jnp.abs(full - prefix_only).max())
  if unchanged:
    assert diff <= 1e-5, diff
  else:
    assert diff > 1e-3, diff


def _with_answer_loss(batch):
  types, ids = batch["segment_types"], batch["segment_ids"]
  next_is_answer = np.roll(types, -1, axis=1) == SegmentType.ANSWER
  same_dialogue = (np.roll(ids, -1, axis=1) == ids) & (ids != 0)
  loss_mask = (next_is_answer & same_dialogue).astype(np.int32)
  loss_mask[:, -1] = 0
  return {**{k: jnp.asarray(v) for k, v in batch.items()}, "loss_mask": jnp.asarray(loss_mask)}


def test_loss_decreases_on_tiny_overfit_batch(packed_batch):
  model = Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(1))
  _, _, losses = fitting.fit(model, _with_answer_loss(packed_batch), learning_rate=1e-2, steps=40)
  assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize("remat_policy", ["none", "full"])
def test_scanned_layers_give_the_same_logits(tiny_model, packed_batch, remat_policy):
  scanned = Transformer(ModelConfig.tiny(scan_layers=True, remat_policy=remat_policy), rngs=nnx.Rngs(99))
  fitting.stack_layers(tiny_model, scanned)
  batch = _with_answer_loss(packed_batch)
  np.testing.assert_allclose(scanned(batch["tokens"], batch["segment_types"], batch["segment_ids"]),
                             tiny_model(batch["tokens"], batch["segment_types"], batch["segment_ids"]),
                             atol=1e-5)
  grads_scanned = nnx.grad(fitting.answer_loss)(scanned, batch)
  grads_plain = nnx.grad(fitting.answer_loss)(tiny_model, batch)
  np.testing.assert_allclose(grads_scanned["blocks"]["mlp"]["up_proj"][...][1],
                             grads_plain["blocks"][1]["mlp"]["up_proj"][...], atol=1e-5)


def test_serving_transforms_keep_the_network(packed_batch):
  """unstack_layers and fuse_projections (as the inference engine applies them) give the same logits, with
  QKV biases and GQA, on one device and placed by the rules table on a mesh."""
  config = ModelConfig.tiny(scan_layers=True, qkv_bias=True)
  model = Transformer(config, rngs=nnx.Rngs(4))
  for name in ("q_bias", "k_bias", "v_bias"):  # zeros at init: make them count
    bias = getattr(model.blocks.attn, name)
    bias[...] = jax.random.normal(jax.random.key(len(name)), bias[...].shape)
  batch = {k: jnp.asarray(v) for k, v in packed_batch.items()}
  run = lambda m: m(batch["tokens"], batch["segment_types"], batch["segment_ids"])
  served = fuse_projections(unstack_layers(model))
  assert not served.config.scan_layers and served.config.fused_projections
  assert served.blocks[1].attn.qkv_proj[...].shape == (32, 2, 4, 8)  # [D, K, G + 2, Dh]
  np.testing.assert_allclose(run(served), run(model), atol=1e-5)
  np.testing.assert_allclose(run(fuse_projections(model)), run(model), atol=1e-5)  # fused, still scanned

  mesh = sharding.make_mesh(data=4, fsdp=1, tensor=2)
  sharded = sharding.create_sharded(lambda: Transformer(config, rngs=nnx.Rngs(4)), mesh)
  served = fuse_projections(unstack_layers(sharded))
  spec = served.blocks[0].attn.qkv_proj[...].sharding.spec
  assert spec == jax.sharding.PartitionSpec(None, "tensor", None, None), spec  # whole query groups per shard


def test_sharded_on_8_devices_matches_one_device(packed_batch):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
  config = ModelConfig.tiny(vocab_size=64)
  batch = layouts.random_packed_batch(np.random.default_rng(5), batch=8, length=32)
  batch = _with_answer_loss(batch)
  reference = Transformer(config, rngs=nnx.Rngs(3))
  expected_loss = fitting.answer_loss(reference, batch)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  model = sharding.create_sharded(lambda: Transformer(config, rngs=nnx.Rngs(3)), mesh)
  assert model.blocks[0].mlp.up_proj[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  graphdef, state = nnx.split(model)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(batch, sharding.batch_sharding(mesh))
    loss = jax.jit(lambda s, b: fitting.answer_loss(nnx.merge(graphdef, s), b))(state, sharded)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)


def test_undivided_sharding_rules_are_logged_once(caplog):
  """2 KV heads cannot split over tensor=4: the k/v projections stay replicated, and one warning says so."""
  mesh = sharding.make_mesh(data=2, fsdp=1, tensor=4)
  abstract = nnx.eval_shape(lambda: Transformer(ModelConfig.tiny(scan_layers=True), rngs=nnx.Rngs(0)))
  with caplog.at_level("WARNING", logger="ism_jax.sharding"):
    shardings = sharding.state_shardings(nnx.state(abstract), mesh)
  assert shardings["blocks"]["attn"]["k_proj"].spec == jax.sharding.PartitionSpec(None, None, None, None)
  assert shardings["blocks"]["attn"]["q_proj"].spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
  warnings = [r.getMessage() for r in caplog.records]
  assert len(warnings) == 1, warnings
  assert "blocks.attn.k_proj (2, 32, 2, 8): kv_heads (dim 2 of size 2) on tensor=4" in warnings[0]
  assert "blocks.attn.v_proj" in warnings[0] and "q_proj" not in warnings[0]


def test_mesh_errors_name_the_sizes():
  with pytest.raises(ValueError, match=r"needs 6 devices, found 8"):
    sharding.make_mesh(data=3, fsdp=2, tensor=1)
  with pytest.raises(ValueError, match="at most one may be -1"):
    sharding.make_mesh(data=-1, fsdp=-1)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_kv_cache_forward_equals_full_forward(scan_layers):
  """Query blocks prefilled in one step and answers decoded token by token reproduce the full pass."""
  config = ModelConfig.tiny(scan_layers=scan_layers)
  model = Transformer(config, rngs=nnx.Rngs(4))
  tokens, types = _dialogue(np.random.default_rng(11), rounds=3)
  length = tokens.shape[1]
  full = model(tokens, types)
  ranges = make_attention_ranges(types)  # rows of earlier tokens never depend on later ones under ISM
  positions = jnp.arange(length, dtype=jnp.int32)[None]
  cache = init_cache(config, batch_size=1, cache_len=length + 3)
  # Chunks: each query block whole, each answer token alone.
  t, chunks = np.asarray(types[0]), []
  start = 0
  while start < length:
    end = start + 1
    if t[start] == SegmentType.QUERY:
      while end < length and t[end] == SegmentType.QUERY:
        end += 1
    chunks.append((start, end))
    start = end
  for start, end in chunks:
    chunk_ranges = MaskRanges(k_lo=ranges.k_lo[:, start:end], k_hi=ranges.k_hi[:, start:end])
    logits, cache = model.forward(tokens[:, start:end], positions[:, start:end], chunk_ranges, cache,
                                  jnp.array([start], jnp.int32))
    np.testing.assert_allclose(logits, full[:, start:end], atol=1e-5)


def test_config_errors():
  with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
    ModelConfig.tiny(num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="mask='full' must be one of"):
    ModelConfig.tiny(mask="full")


def test_num_params_matches_the_model():
  for tie in (False, True):
    config = ModelConfig.tiny(tie_embeddings=tie, qkv_bias=tie)
    model = Transformer(config, rngs=nnx.Rngs(0))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == config.num_params()


@pytest.mark.parametrize("policy, kept", [("dots_no_batch", False), ("dots_attn", True)])
def test_remat_dots_attn_keeps_the_attention_kernel_residuals(policy, kept, capsys):
  """Traced only (the GPU kernel is not run on CPU): under "dots_attn" the backward pass reads the kernel's
  saved output and log-sum-exp instead of running its forward again."""
  config = ModelConfig.tiny(num_layers=1, head_dim=64, compute_dtype="bfloat16", attention_impl="pallas_gpu",
                            remat_policy=policy)
  graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
  types = jnp.ones((1, 128), jnp.int32)

  def loss(state):
    return nnx.merge(graphdef, state)(jnp.zeros((1, 128), jnp.int32), types).sum()

  jax.ad_checkpoint.print_saved_residuals(loss, state)
  saved = capsys.readouterr().out
  assert ("named 'attention_out'" in saved and "named 'attention_lse'" in saved) == kept
