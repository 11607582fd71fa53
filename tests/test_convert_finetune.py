"""Fine-tuning an imported Hugging Face model with ISM: the chat encoding packs into valid ISM batches, a few
optimizer steps learn, the ISM property holds, the export of the result reloads exactly, and
configs/finetune_hf.py reads its model fields from the checkpoint."""

import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ism_jax.convert import load_hf_model, load_hf_tokenizer, save_hf_model
from ism_jax.convert.hf_config import CHECKPOINT_FIELDS
from ism_jax.data import packing
from ism_jax.data.dialogue import Message
from ism_jax.masks import SegmentType, validate_segments
from ism_jax.training import config as config_lib
from tests import fitting

ROOT = os.path.join(os.path.dirname(__file__), "..")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
DIALOGUES = [
    [Message("user", "Hello! How are you?"), Message("assistant", "Fine, thank you."),
     Message("user", "Count to three."), Message("assistant", "one, two, three")],
    [Message("system", "You are terse."), Message("user", "What is the capital of France?"),
     Message("assistant", "Paris.")],
    [Message("user", "Good morning."), Message("assistant", "Good morning!"), Message("user", "Now five."),
     Message("tool", "42"), Message("assistant", "one, two, three, four, five.")],
]


def _batch(tokenizer, seq_len=128, rows=3):
  examples = [e for d in DIALOGUES for e in packing.prepare_examples(tokenizer.encode_dialogue(d), seq_len)]
  batch = next(packing.pack_examples(examples, seq_len, rows))
  validate_segments(batch["segment_types"], batch["segment_ids"], batch["loss_mask"], "ism")
  return {k: jnp.asarray(v) for k, v in batch.items()}


def test_ism_finetune_from_hf_learns_and_exports(tmp_path):
  directory = os.path.join(FIXTURES, "qwen2")
  _, model = load_hf_model(directory, compute_dtype="float32", attention_impl="xla")
  tokenizer = pickle.loads(pickle.dumps(load_hf_tokenizer(directory)))  # data workers may pickle it
  batch = _batch(tokenizer)
  answers = int((batch["segment_types"] == SegmentType.ANSWER).sum())
  assert int(batch["segment_ids"].max(axis=1).sum()) == len(DIALOGUES)  # all packed, none truncated
  assert int(batch["loss_mask"].sum()) == answers > 30  # every answer token (and end of turn) is a target
  graphdef, params, losses = fitting.fit(model, batch, learning_rate=5e-3, steps=10)
  assert losses[-1] < 0.5 * losses[0], losses
  save_hf_model(nnx.merge(graphdef, params), str(tmp_path), source=directory)
  _, again = load_hf_model(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(again, nnx.Param), params)


def test_imported_model_keeps_earlier_rounds_fixed_under_ism():
  directory = os.path.join(FIXTURES, "qwen2")
  _, model = load_hf_model(directory, compute_dtype="float32", attention_impl="xla")
  encoded = load_hf_tokenizer(directory).encode_dialogue(DIALOGUES[0])
  first = int(encoded.round_ends()[0])
  tokens, types = jnp.asarray(encoded.tokens[None]), jnp.asarray(encoded.segment_types[None])
  assert encoded.segment_types[first] == SegmentType.QUERY
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, tokens, types: nnx.merge(graphdef, state)(tokens, types, kind="ism"))
  whole = forward(state, tokens, types)[:, :first]
  np.testing.assert_allclose(whole, forward(state, tokens[:, :first], types[:, :first]), atol=1e-5)


def test_finetune_config_reads_model_fields_from_checkpoint():
  path = os.path.join(FIXTURES, "llama")
  config = config_lib.load_config_file(os.path.join(ROOT, "configs", "finetune_hf.py") + ":" + path)
  config_lib.validate(config)
  imported, _ = load_hf_model(path)
  model_config = config_lib.model_config(config)
  assert config.init_from == os.path.abspath(path) and model_config.mask == "ism"
  assert all(getattr(model_config, f) == getattr(imported, f) for f in CHECKPOINT_FIELDS)
  saved = config_lib.from_json_dict(json.loads(config.to_json()))  # as a checkpoint stores it
  assert config_lib.resume_differences(saved, config) == []
  default = config_lib.load_config_file(os.path.join(ROOT, "configs", "finetune_hf.py"))
  assert default.model.qkv_bias and default.model.vocab_size == 320  # the tiny Qwen2 smoke checkpoint
