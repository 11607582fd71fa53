"""TFDS builders read through tfds.data_source, the grain pipeline, resume, sharding, the synthetic task."""

import dataclasses
import json
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ism_jax.data import builders, packing, pipeline, synthetic
from ism_jax.data.dialogue import split_rounds
from ism_jax.masks import validate_segments

TINY = builders.SyntheticConfig(name="tiny", num_train=120, num_validation=30, seed=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """A tiny synthetic dataset, a config for it and its cached tokenizer."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  name = builders.prepare("synthetic_multiturn", data_dir, config=TINY)
  config = pipeline.PipelineConfig(name=name, data_dir=data_dir, seq_len=96, batch_size=3, vocab_size=320,
                                   shard_index=0, shard_count=1, num_threads=2)
  return config, pipeline.load_tokenizer(config)


def batches(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_synthetic_builder_round_trip(data):
  config, _ = data
  assert config.name == "synthetic_multiturn/tiny"
  train = tfds.data_source(config.name, data_dir=config.data_dir, split="train")
  assert len(train) == 120
  assert len(tfds.data_source(config.name, data_dir=config.data_dir, split="validation")) == 30
  stored = sorted((builders.record_to_messages(train[i]) for i in range(len(train))), key=str)
  expected = sorted(synthetic.generate_dialogues(1, "train", 120, TINY.task), key=str)
  assert stored == expected


def test_tokenizer_is_cached_next_to_the_dataset(data):
  config, tokenizer = data
  assert tokenizer.path.startswith(builders.dataset_dir(config.name, config.data_dir))
  again = pipeline.load_tokenizer(config)
  assert again.path == tokenizer.path and again.vocab_size == tokenizer.vocab_size


def test_train_batches_follow_the_data_contract(data):
  config, tokenizer = data
  for batch in batches(pipeline.make_train_iterator(config, tokenizer), 5):
    assert set(batch) == {"tokens", "segment_types", "segment_ids", "positions", "loss_mask", "round_index"}
    assert all(v.shape == (3, 96) and v.dtype == np.int32 for v in batch.values())
    for kind in ("ism", "causal"):
      validate_segments(batch["segment_types"], batch["segment_ids"], batch["loss_mask"], kind)
    assert batch["loss_mask"].sum() > 0


def test_prefix_triplets_through_the_pipeline(data):
  config, tokenizer = data
  config = dataclasses.replace(config, triplets=True)
  iterator = pipeline.make_train_iterator(config, tokenizer)
  for batch in batches(iterator, 5):
    for kind in ("ism", "causal", "prefix"):
      validate_segments(batch["segment_types"], batch["segment_ids"], batch["loss_mask"], kind)
  assert iterator.stats.examples > iterator.stats.dialogues


@pytest.mark.parametrize("triplets", [False, True])
def test_restored_iterator_yields_the_same_next_batches(data, triplets):
  config, tokenizer = data
  config = dataclasses.replace(config, triplets=triplets, num_epochs=2)
  original = pipeline.make_train_iterator(config, tokenizer)
  batches(original, 7)
  state = json.loads(json.dumps(original.get_state()))  # what a checkpoint stores
  expected = batches(original, 40)  # crosses into the second epoch
  restored = pipeline.make_train_iterator(config, tokenizer)
  restored.set_state(state)
  assert_same(batches(restored, 40), expected)
  assert restored.stats == original.stats


def test_grain_checkpoint_handler_saves_and_restores_the_iterator(data, tmp_path):
  """The Orbax handler grain ships (``grain.checkpoint.CheckpointHandler``) works on this iterator."""
  import grain
  from etils import epath
  config, tokenizer = data
  original = pipeline.make_train_iterator(config, tokenizer)
  batches(original, 3)
  grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), original)
  expected = batches(original, 5)
  restored = grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path),
                                                          pipeline.make_train_iterator(config, tokenizer))
  assert_same(batches(restored, 5), expected)


def test_finite_epochs_end_and_every_dialogue_is_seen_once_per_epoch(data):
  config, tokenizer = data
  config = dataclasses.replace(config, num_epochs=1, seq_len=512)
  iterator = pipeline.make_train_iterator(config, tokenizer)
  out = list(iterator)
  assert iterator.stats.dialogues == 120 and iterator.stats.truncated_dialogues == 0
  assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in out) == 120


def test_shuffle_is_deterministic_by_seed_and_differs_by_epoch(data):
  config, tokenizer = data
  first = batches(pipeline.make_train_iterator(config, tokenizer), 3)
  assert_same(batches(pipeline.make_train_iterator(config, tokenizer), 3), first)
  other = batches(pipeline.make_train_iterator(dataclasses.replace(config, seed=5), tokenizer), 3)
  assert not np.array_equal(other[0]["tokens"], first[0]["tokens"])
  one_epoch = dataclasses.replace(config, seq_len=512, batch_size=1)
  epochs = list(pipeline.make_train_iterator(dataclasses.replace(one_epoch, num_epochs=2), tokenizer))
  half = len(epochs) // 2
  assert not np.array_equal(epochs[0]["tokens"], epochs[half]["tokens"])


def dialogue_keys(config, tokenizer, shard_index, shard_count):
  config = dataclasses.replace(config, shard_index=shard_index, shard_count=shard_count, num_epochs=1,
                               seq_len=512, batch_size=1)
  keys = set()
  for batch in pipeline.make_train_iterator(config, tokenizer):
    for seg in range(1, batch["segment_ids"].max() + 1):
      keys.add(tuple(batch["tokens"][0][batch["segment_ids"][0] == seg]))
  return keys


def test_per_host_shards_are_disjoint_and_cover_the_split(data):
  config, tokenizer = data
  shards = [dialogue_keys(config, tokenizer, i, 3) for i in range(3)]
  assert all(shards)
  assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
  assert shards[0] | shards[1] | shards[2] == dialogue_keys(config, tokenizer, 0, 1)


def test_eval_batches_are_equal_in_number_on_every_host(data):
  config, tokenizer = data
  single = pipeline.make_eval_batches(config, tokenizer)
  per_host = [pipeline.make_eval_batches(dataclasses.replace(config, shard_index=i, shard_count=4), tokenizer)
              for i in range(4)]
  assert len({len(b) for b in per_host}) == 1
  assert sum(int(b["loss_mask"].sum()) for h in per_host for b in h) == sum(int(b["loss_mask"].sum())
                                                                         for b in single)
  for batch in single:
    validate_segments(batch["segment_types"], batch["segment_ids"], batch["loss_mask"], "ism")


def test_truncation_is_counted_in_the_pipeline(data):
  config, tokenizer = data
  iterator = pipeline.make_train_iterator(dataclasses.replace(config, seq_len=24), tokenizer)
  for batch in batches(iterator, 10):
    assert (batch["segment_ids"] > 0).any()
  stats = iterator.stats
  assert stats.truncated_dialogues + stats.dropped_dialogues > 0 and stats.dropped_rounds > 0


def test_synthetic_generator_is_deterministic_and_answers_are_right():
  a = synthetic.generate_dialogues(7, "train", 50)
  assert a == synthetic.generate_dialogues(7, "train", 50)
  assert a != synthetic.generate_dialogues(8, "train", 50)
  assert a[:5] != synthetic.generate_dialogues(7, "validation", 5)
  for messages in a:
    facts = {}
    for round_ in split_rounds(messages):
      text = " ".join(m.content for m in round_.query if m.role == "user")
      statement, _, question = text.rpartition(" . ")
      for clause in statement.replace(" .", "").split(" , "):
        if " is " in clause:
          name, _, value = clause.strip().partition(" is ")
          facts[name] = int(value)
      *items, op, _ = question.split()
      assert synthetic.answer_for(op, items, facts) == round_.answer.content


def test_score_answer():
  assert synthetic.score_answer(" dog ", "dog")
  assert synthetic.score_answer("2  4", "2 4")
  assert not synthetic.score_answer("2 4 1", "2 4")


def test_chitchat_builds_offline_with_the_user_opening(tmp_path):
  name = builders.prepare("chitchat", str(tmp_path))
  train = tfds.data_source(name, data_dir=str(tmp_path), split="train")
  validation = tfds.data_source(name, data_dir=str(tmp_path), split="validation")
  assert 3500 < len(train) < 4100 and 100 < len(validation) < 400
  for i in range(0, len(train), 500):
    messages = builders.record_to_messages(train[i])
    assert messages[0].role == "user" and any(m.role == "assistant" for m in messages)


def test_length_survey_counts_what_truncation_does(data):
  config, tokenizer = data
  survey = pipeline.survey_lengths(config, tokenizer)
  source = builders.data_source(config.name, config.data_dir, "train")
  encoded = [pipeline._Encode(tokenizer).map(source[i]) for i in range(len(source))]
  verdicts = [packing.truncate_rounds(d, config.seq_len) for d in encoded]
  assert survey.surveyed == survey.total == 120
  assert survey.dropped == sum(kept is None for kept, _ in verdicts)
  assert survey.truncated == sum(kept is not None and dropped > 0 for kept, dropped in verdicts)
  assert survey.truncated > 0  # seq_len 96 shortens some of the 2-6 round dialogues
  assert (survey.shortest, survey.longest) == (min(map(len, encoded)), max(map(len, encoded)))
  sample = pipeline.survey_lengths(config, tokenizer, max_dialogues=10)
  assert sample.surveyed == 10 and sample.total == 120 and "10 of 120 dialogues surveyed" in sample.summary()


def test_no_dialogue_fitting_seq_len_fails_instead_of_reading_forever(data):
  """Every dialogue dropped: a pass over the shard raises, where the iterator used to loop forever."""
  config, tokenizer = data
  short = dataclasses.replace(config, seq_len=8)
  survey = pipeline.survey_lengths(short, tokenizer)
  assert survey.dropped == survey.surveyed and survey.seq_len_keeping(0.0) == survey.first_rounds[-1] > 8
  iterator = pipeline.make_train_iterator(short, tokenizer)
  outcome = []
  thread = threading.Thread(target=lambda: outcome.append(_raised(lambda: next(iterator))), daemon=True)
  thread.start()
  thread.join(timeout=120)
  assert outcome, "next() on a stream where nothing fits seq_len did not return within 120 s"
  assert isinstance(outcome[0], ValueError), outcome
  assert "120 dialogues in a row of synthetic_multiturn/tiny/train (shard 0 of 1)" in str(outcome[0])
  assert "seq_len=8" in str(outcome[0])


def _raised(function):
  try:
    function()
  except Exception as e:  # pylint: disable=broad-except
    return e
  return None
