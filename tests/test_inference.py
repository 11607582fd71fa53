"""Inference engine: cache-reuse exactness against the full forward pass, sampling, stopping, compilation
counts, errors. Tiny float32 model; every engine uses the same shapes so compiled steps are shared."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ism_jax import ModelConfig, SegmentType, Transformer, sharding
from ism_jax.inference import (
    CacheFullError,
    DialogueBatch,
    Engine,
    PromptTooLongError,
    SamplingParams,
    bucket_lengths,
    sample,
)
from ism_jax.inference import cache as cache_lib
from ism_jax.inference import steps as steps_lib
from ism_jax.inference.sampling import filter_logits
from tests import fitting, tiny_chat
from tests.compiles import compile_events

MAX_LEN = 128
EOT = 3
REFERENCE_LEN = MAX_LEN  # dialogues are padded to this length for the (jitted) full forward pass


@pytest.fixture(scope="module")
def model():
  return tiny_chat.tiny_model()


@pytest.fixture(scope="module")
def full_forward(model):
  return tiny_chat.full_forward(model, REFERENCE_LEN)


def _batch(model, kind, eot_id=EOT, **engine_options):
  """Two rows: every test uses the same engine shapes, so compiled steps are shared."""
  engine = Engine(model, batch_size=2, max_len=MAX_LEN, **engine_options)
  return DialogueBatch(engine, kind=kind, eot_id=eot_id)


def _answer_logits_error(dialogues, result, row, full_forward) -> float:
  """Max |logit difference| over the row's answer tokens of this round vs. one full forward pass."""
  tokens, types = dialogues.tokens(row), dialogues.segment_types(row)
  answer = result.answers[row]
  glue = 0 if dialogues.eot_id is None or answer[-1] == dialogues.eot_id else 1
  end = tokens.size - glue
  start = end - answer.size
  np.testing.assert_array_equal(tokens[start:end], answer)
  assert (types[start:tokens.size] == SegmentType.ANSWER).all()
  reference = full_forward(tokens, types, dialogues.kind)[start - 1:end - 1]  # logits that predict each token
  assert result.logits[row].shape == reference.shape
  return float(np.abs(result.logits[row] - reference).max())


def _random_query(rng, low=2, high=14):
  return rng.integers(8, 64, size=int(rng.integers(low, high)))


@pytest.mark.parametrize("kind", ["ism", "causal", "prefix"])
def test_round_by_round_logits_equal_the_full_forward_pass(model, full_forward, kind):
  """Two sessions of different lengths, four rounds, one row skipping a round: every answer token's logits
  match the full-sequence forward pass over the dialogue so far (float32, 1e-5). Three decode steps per
  call: the answers take one and two calls, so a row stops inside a call while the other goes on."""
  rng = np.random.default_rng(1)
  dialogues = _batch(model, kind, decode_steps=3)
  for round_index in range(4):
    queries = [_random_query(rng), _random_query(rng)]
    if round_index == 2:
      queries[1] = None
    result = dialogues.ask(queries, max_new_tokens=[4, 7], return_logits=True)
    for row, query in enumerate(queries):
      if query is None:
        assert result.answers[row] is None
        continue
      assert _answer_logits_error(dialogues, result, row, full_forward) <= 1e-5
  assert dialogues.tokens(0).size != dialogues.tokens(1).size
  if kind != "prefix":  # the cache holds everything but the last answer token (and its end-of-turn glue)
    assert all(dialogues.engine.fill[b] >= dialogues.tokens(b).size - 2 for b in range(2))


def test_scanned_layers_and_a_sharded_engine_give_the_same_answers(model):
  """A model with stacked (scanned) layers (served unrolled and fused, the default, and as it is: scanned,
  with a stacked cache), and the model sharded on 8 devices with its cache, reproduce the plain engine's
  logits round by round."""
  rng = np.random.default_rng(8)
  queries = [[_random_query(rng), _random_query(rng)] for _ in range(2)]
  plain = _batch(model, "ism")
  expected = [plain.ask(q, max_new_tokens=[3, 4], return_logits=True).logits for q in queries]
  scanned = Transformer(ModelConfig.tiny(scan_layers=True), rngs=nnx.Rngs(1))
  fitting.stack_layers(model, scanned)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = sharding.create_sharded(lambda: Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(1)), mesh)
  nnx.update(sharded, jax.device_put(nnx.state(model), sharding.state_shardings(nnx.state(sharded), mesh)))
  engines = [Engine(sharded, batch_size=2, max_len=MAX_LEN, mesh=mesh), Engine(scanned, batch_size=2,
                                                                               max_len=MAX_LEN),
             Engine(scanned, batch_size=2, max_len=MAX_LEN, unroll_layers=False, fuse_projections=False)]
  assert engines[2].cache.k.shape == (2, 2, MAX_LEN, 2, 8)  # [L, B, S, K, Dh]: the scanned model's own
  expected_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, "tensor"))
  assert engines[0].cache[0].k.sharding.is_equivalent_to(expected_sharding, 4)
  for engine in engines:
    dialogues = DialogueBatch(engine, kind="ism", eot_id=EOT)
    for q, logits in zip(queries, expected):
      got = dialogues.ask(q, max_new_tokens=[3, 4], return_logits=True).logits
      for row in range(2):
        np.testing.assert_allclose(got[row], logits[row], atol=1e-5)
  assert engines[0].cache[0].k.sharding.is_equivalent_to(expected_sharding, 4)  # kept through the steps


def test_prefix_round_differs_from_reusing_the_cache(model, full_forward):
  """The prefix baseline must recompute: its history logits change when the next query joins the block."""
  rng = np.random.default_rng(2)
  dialogues = _batch(model, "prefix")
  dialogues.ask([_random_query(rng), None], max_new_tokens=3)
  before = dialogues.tokens(0)
  result = dialogues.ask([_random_query(rng), None], max_new_tokens=3, return_logits=True)
  assert _answer_logits_error(dialogues, result, 0, full_forward) <= 1e-5
  history_now = full_forward(dialogues.tokens(0), dialogues.segment_types(0), "prefix")[:before.size]
  history_then = full_forward(before, dialogues.segment_types(0)[:before.size], "prefix")
  assert np.abs(history_now - history_then).max() > 1e-3


def test_stops_on_end_of_turn_and_on_budget(model):
  rng = np.random.default_rng(3)
  query = _random_query(rng)
  free = _batch(model, "ism", eot_id=None).ask([query, None], max_new_tokens=6).answers[0]
  assert free.size == 6
  # Stop on budget: the end-of-turn glue is appended to the dialogue, as training lays answers out.
  unused = int(np.setdiff1d(np.arange(8, 64), free)[0])
  dialogues = _batch(model, "ism", eot_id=unused)
  budget = dialogues.ask([query, None], max_new_tokens=3)
  assert budget.stop_reasons == ["max_new_tokens", None]
  np.testing.assert_array_equal(budget.answers[0], free[:3])
  np.testing.assert_array_equal(dialogues.tokens(0)[-4:], np.append(free[:3], unused))
  # Stop on end of turn: pretend the third greedy token is the end of turn.
  stop_at = int(np.argmax(free == free[2]))
  dialogues = _batch(model, "ism", eot_id=int(free[2]))
  eot = dialogues.ask([query, None], max_new_tokens=6)
  assert eot.stop_reasons == ["end_of_turn", None]
  np.testing.assert_array_equal(eot.answers[0], free[:stop_at + 1])
  np.testing.assert_array_equal(dialogues.tokens(0)[query.size:], free[:stop_at + 1])  # no glue
  assert dialogues.engine.fill[0] == query.size + stop_at  # all but the last answer token are cached


def test_budget_is_cut_to_the_free_cache_slots(model):
  dialogues = _batch(model, "ism", eot_id=None)
  query = np.full(MAX_LEN - 10, 9)
  result = dialogues.ask([query, [9, 10]], max_new_tokens=50)
  assert result.stop_reasons == ["cache_full", "max_new_tokens"]
  assert result.answers[0].size == 9  # one slot is kept for the end-of-turn glue
  with pytest.raises(PromptTooLongError, match="exceed the KV cache of max_len=128"):
    dialogues.ask([[9], None])


def test_chunk_padding_past_the_cache_end_is_dropped(model, full_forward):
  """A padded chunk that runs past the last slot must not shift onto earlier slots (exactness holds)."""
  rng = np.random.default_rng(7)
  dialogues = _batch(model, "ism", eot_id=None)
  dialogues.ask([rng.integers(8, 64, size=97), None], max_new_tokens=4)
  assert dialogues.engine.fill[0] == 100  # the next chunk (1 pending + 20 query tokens) pads to 32 slots
  result = dialogues.ask([rng.integers(8, 64, size=20), None], max_new_tokens=3, return_logits=True)
  assert _answer_logits_error(dialogues, result, 0, full_forward) <= 1e-5


def test_prompt_longer_than_the_cache_fails_before_any_work(model, full_forward):
  rng = np.random.default_rng(4)
  dialogues = _batch(model, "ism")
  dialogues.ask([_random_query(rng), _random_query(rng)], max_new_tokens=3)
  tokens, fill = [dialogues.tokens(b) for b in range(2)], dialogues.engine.fill
  cache = jax.tree.map(np.asarray, dialogues.engine.cache)
  too_long = r"row 1: the dialogue so far \(\d+ tokens\) \+ 125 new tokens"
  with compile_events() as events, pytest.raises(PromptTooLongError, match=too_long):
    dialogues.ask([_random_query(rng), np.full(125, 9)])
  assert events.traces() == 0
  np.testing.assert_array_equal(dialogues.engine.fill, fill)
  for b in range(2):
    np.testing.assert_array_equal(dialogues.tokens(b), tokens[b])
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, dialogues.engine.cache), cache)
  # The sessions carry on exactly.
  result = dialogues.ask([_random_query(rng), _random_query(rng)], max_new_tokens=3, return_logits=True)
  assert max(_answer_logits_error(dialogues, result, b, full_forward) for b in range(2)) <= 1e-5
  with pytest.raises(CacheFullError, match=r"row 0: the dialogue so far \(0 tokens\) \+ 127 new tokens"):
    Engine(model, batch_size=2, max_len=MAX_LEN).generate(
        [(np.full(127, 9), np.ones(127)), None])


def test_no_recompilation_across_tokens_rounds_and_sampling_settings(model):
  """After warm-up, any number of rounds and tokens compiles nothing: one decode program for every token,
  one prefill program per (chunk bucket, key window)."""
  rng = np.random.default_rng(5)
  dialogues = _batch(model, "ism")
  shapes = dialogues.engine.prefill_shapes([20])  # chunks of up to 32 tokens
  assert shapes == [(32, 32, False), (32, 32, True), (32, 64, False), (32, 128, False)]
  before = steps_lib.compiled_counts()  # other tests may have compiled some of these already
  with compile_events() as warm:
    dialogues.engine.warmup(shapes)  # greedy and sampled programs
  compiled = steps_lib.compiled_counts()
  assert compiled["prefill"] >= 2 * len(shapes) and compiled["decode"] >= 2
  assert warm.compiles("_prefill_step") == compiled["prefill"] - before["prefill"] <= 2 * len(shapes)
  assert warm.compiles("_decode_steps") == compiled["decode"] - before["decode"] <= 2
  with compile_events() as again:
    dialogues.engine.warmup(shapes)  # every program of these shapes and modes exists now
  assert again.traces("_prefill_step") == again.traces("_decode_steps") == 0
  settings = [SamplingParams(), SamplingParams(temperature=0.8, top_k=5), SamplingParams(0.5, top_p=0.9)]
  for round_index in range(7):  # the dialogues grow through every key window
    dialogues.ask([_random_query(rng, 4, 10), _random_query(rng, 4, 10)], max_new_tokens=[6, 2],
                  sampling=settings[round_index % 3])
  assert dialogues.engine.fill.max() > 64
  assert steps_lib.compiled_counts() == compiled


def test_buckets():
  assert bucket_lengths(128) == (32, 64, 128)
  assert bucket_lengths(128, min_bucket=16) == (16, 32, 64, 128)
  assert bucket_lengths(3000, min_bucket=256, step=512) == (256, 512, 1024, 1536, 2048, 2560, 3000)
  assert bucket_lengths(100, min_bucket=32) == (32, 64, 100)


def test_engine_settings_are_checked(model):
  with pytest.raises(ValueError, match="decode_steps=0 must be >= 1"):
    Engine(model, max_len=MAX_LEN, decode_steps=0)
  with pytest.raises(ValueError, match="max_len=1"):
    Engine(model, max_len=1)


def test_greedy_is_argmax_and_filters_restrict_the_support():
  logits = jnp.asarray(np.random.default_rng(6).normal(size=(3, 40)) * 3, jnp.float32)
  keys = jax.random.split(jax.random.key(0), 2000)
  many = jax.jit(jax.vmap(sample, in_axes=(None, 0, None, None, None)))  # [draws, 3]; compiled once

  def draws(temperature, top_k, top_p):
    return np.asarray(many(logits, keys, jnp.full(3, temperature, jnp.float32), jnp.full(3, top_k, jnp.int32),
                           jnp.full(3, top_p, jnp.float32)))

  order = np.argsort(-np.asarray(logits), axis=-1)
  np.testing.assert_array_equal(draws(0.0, 5, 0.5)[0], order[:, 0])  # temperature 0: argmax, filters ignored
  for row in range(3):
    assert set(draws(1.0, 4, 1.0)[:, row]) <= set(order[row, :4])
  # top-p: the smallest set of most likely tokens whose mass reaches p.
  probs = np.asarray(jax.nn.softmax(logits / 0.7))
  sorted_probs = np.take_along_axis(probs, order, axis=-1)
  nucleus = (np.cumsum(sorted_probs, axis=-1) - sorted_probs) < 0.6
  for row in range(3):
    assert set(draws(0.7, 0, 0.6)[:, row]) <= set(order[row][nucleus[row]])
  # Temperature: frequencies follow softmax(logits / T).
  counts = np.bincount(draws(2.0, 0, 1.0)[:, 0], minlength=40) / len(keys)
  np.testing.assert_allclose(counts, np.asarray(jax.nn.softmax(logits[0] / 2.0)), atol=0.03)
  # Per-row settings in one call: row 0 greedy, rows 1-2 restricted to their top 2.
  mixed = np.asarray(many(logits, keys, jnp.array([0.0, 1.0, 1.0]), jnp.array([0, 2, 2]), jnp.ones(3)))
  assert set(mixed[:, 0]) == {order[0, 0]} and set(mixed[:, 1]) <= set(order[1, :2])
  sorted_logits, _ = filter_logits(logits, jnp.ones(3), jnp.array([3, 3, 3]), jnp.ones(3))
  assert np.isfinite(np.asarray(sorted_logits)).sum(axis=-1).tolist() == [3, 3, 3]


def test_sampling_params_are_checked():
  with pytest.raises(ValueError, match="top_p=0 must be in"):
    SamplingParams(top_p=0)
  with pytest.raises(ValueError, match="temperature=-1 must be >= 0"):
    SamplingParams(temperature=-1)


def test_cache_is_sharded_like_the_model():
  config = ModelConfig.tiny()
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  cache = cache_lib.allocate(config, batch_size=4, max_len=32, mesh=mesh)
  spec = cache[0].k.sharding.spec
  assert spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)
  assert cache_lib.num_slots(cache) == 32
  stacked = cache_lib.allocate(ModelConfig.tiny(scan_layers=True), batch_size=2, max_len=32, mesh=mesh)
  assert stacked.k.shape == (2, 2, 32, 2, 8) and stacked.k.sharding.spec[1] == "data"
