"""Hugging Face import/export: logit parity with transformers, exact round trips, sharding, clear errors.

The fixtures under tests/fixtures/hf/ (tiny random checkpoints plus the logits and chat-template ids that
transformers produced for them) are made by scripts/make_hf_fixtures.py; no torch or transformers here.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from safetensors.numpy import load_file, save_file

from ism_jax import sharding
from ism_jax.convert import (HFConversionError, hf_config_from_model, load_hf_model, load_hf_tokenizer,
                             model_config_from_hf, save_hf_model)
from ism_jax.data.hf_chat import template_default_system
from ism_jax.convert.safetensors_io import INDEX_FILE, CheckpointReader
from ism_jax.data import chat_template
from ism_jax.data.dialogue import Message
from ism_jax.masks import SegmentType

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
NAMES = ("llama", "qwen2", "mistral")
EXACT = dict(compute_dtype="float32", attention_impl="xla")


def _fixture(name: str) -> str:
  return os.path.join(FIXTURES, name)


def _max_logit_diff(model, name: str) -> float:
  """Max |our causal logits - transformers' logits| on the fixture's reference tokens."""
  tokens = np.load(os.path.join(_fixture(name), "reference_tokens.npy"))
  expected = np.load(os.path.join(_fixture(name), "reference_logits.npy"))
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, tokens, types: nnx.merge(graphdef, state)(tokens, types, kind="causal"))
  logits = forward(state, jnp.asarray(tokens), jnp.full(tokens.shape, SegmentType.ANSWER, jnp.int32))
  return float(np.abs(np.asarray(logits) - expected).max())


def _params(model) -> dict:
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _copy_checkpoint(name: str, tmp_path) -> str:
  out = str(tmp_path / name)
  shutil.copytree(_fixture(name), out)
  return out


def _edit_config(directory: str, **changes) -> None:
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  with open(path, "w") as f:
    json.dump(config, f)


# ----------------------------------------------------------------------------------------------------------
# Parity with transformers and the config mapping.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, scan", [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True),
                                        ("mistral", False)])
def test_logits_match_transformers(name, scan):
  config, model = load_hf_model(_fixture(name), scan_layers=scan, **EXACT)
  assert config.scan_layers == scan
  assert _max_logit_diff(model, name) <= 1e-4


def test_config_fields_read_from_checkpoint():
  llama, _ = load_hf_model(_fixture("llama"))
  assert (llama.num_heads, llama.num_kv_heads, llama.head_dim, llama.norm_eps) == (4, 2, 16, 1e-5)
  assert llama.rope_theta == 500_000.0 and llama.rope_scaling == (8.0, 1.0, 4.0, 16)
  assert not llama.qkv_bias and not llama.tie_embeddings
  qwen = model_config_from_hf(json.load(open(os.path.join(_fixture("qwen2"), "config.json"))))
  assert qwen.qkv_bias and qwen.tie_embeddings and qwen.rope_theta == 1e6 and qwen.rope_scaling is None


def test_transformers4_rope_layout_reads_the_same():
  with open(os.path.join(_fixture("llama"), "config.json")) as f:
    v5 = json.load(f)
  params = dict(v5.pop("rope_parameters"))
  v4 = dict(v5, rope_theta=params.pop("rope_theta"), rope_scaling=params)
  assert model_config_from_hf(v4) == model_config_from_hf(json.load(open(os.path.join(_fixture("llama"),
                                                                                       "config.json"))))


def test_sharded_load_places_parameters_by_logical_axes():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  _, model = load_hf_model(_fixture("llama"), mesh=mesh, scan_layers=True, **EXACT)
  for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    expected = NamedSharding(mesh, sharding.variable_spec(variable, mesh))
    assert variable[...].sharding.is_equivalent_to(expected, variable.ndim)
  q_spec = model.blocks.attn.q_proj[...].sharding.spec
  assert q_spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  with jax.set_mesh(mesh):
    assert _max_logit_diff(model, "llama") <= 1e-4


# ----------------------------------------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, scan", [("llama", True), ("qwen2", False)])
def test_export_import_round_trip_is_exact(name, scan, tmp_path):
  _, model = load_hf_model(_fixture(name), scan_layers=scan)
  files = save_hf_model(model, str(tmp_path / "out"), source=_fixture(name), max_shard_bytes=60_000)
  assert len(files) > 1 and os.path.exists(tmp_path / "out" / INDEX_FILE)
  assert os.path.exists(tmp_path / "out" / "tokenizer.json")
  _, again = load_hf_model(str(tmp_path / "out"), scan_layers=not scan, **EXACT)
  _, same_layout = load_hf_model(str(tmp_path / "out"), scan_layers=scan)
  for path, value in _params(model).items():
    np.testing.assert_array_equal(_params(same_layout)[path], value)
  # The exported tensors are bitwise the original HF tensors (the safetensors package reads our files).
  original = load_file(os.path.join(_fixture(name), "model.safetensors"))
  with CheckpointReader(str(tmp_path / "out")) as reader:
    names = reader.names()
    exported = {n: load_file(reader.file_of(n))[n] for n in names}
  assert sorted(original) == names
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value)
  assert _max_logit_diff(again, name) <= 1e-4


def test_bfloat16_export(tmp_path):
  _, model = load_hf_model(_fixture("qwen2"))
  save_hf_model(model, str(tmp_path), source=_fixture("qwen2"), dtype="bfloat16")
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  _, again = load_hf_model(str(tmp_path))
  for path, value in _params(model).items():
    np.testing.assert_array_equal(_params(again)[path], value.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_export_without_source_picks_architecture_and_refuses_impossible_ones(tmp_path):
  config, model = load_hf_model(_fixture("qwen2"))
  save_hf_model(model, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    written = json.load(f)
  assert written["architectures"] == ["Qwen2ForCausalLM"] and written["tie_word_embeddings"] is True
  assert model_config_from_hf(written) == config
  with pytest.raises(HFConversionError, match="qkv_bias=True as LlamaForCausalLM"):
    hf_config_from_model(config, "LlamaForCausalLM")


# ----------------------------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------------------------


def test_unknown_architecture_is_named(tmp_path):
  directory = _copy_checkpoint("llama", tmp_path)
  _edit_config(directory, architectures=["GPT2LMHeadModel"])
  with pytest.raises(HFConversionError, match=r"architectures=\['GPT2LMHeadModel'\] is not supported"):
    load_hf_model(directory)


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
  directory = _copy_checkpoint("llama", tmp_path)
  weights = os.path.join(directory, "model.safetensors")
  tensors = load_file(weights)
  save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}, weights)
  with pytest.raises(HFConversionError, match=r"missing tensors model\.layers\.1\.mlp\.up_proj\.weight"):
    load_hf_model(directory)
  save_file({**tensors, "model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}, weights)
  with pytest.raises(HFConversionError, match=r"unexpected tensors model\.layers\.0\.self_attn\.o_proj"):
    load_hf_model(directory)
  save_file({**tensors, "model.norm.weight": np.ones(63, np.float32)}, weights)
  with pytest.raises(HFConversionError, match=r"tensor model\.norm\.weight has shape \[63\].*implies \[64\]"):
    load_hf_model(directory)
  os.remove(weights)
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
    load_hf_model(directory)


@pytest.mark.parametrize("changes, message", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "type 'yarn' is not supported"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"hidden_size": None}, "required field \"hidden_size\" is missing"),
])
def test_unsupported_config_fields_are_named(changes, message):
  with open(os.path.join(_fixture("llama"), "config.json")) as f:
    config = json.load(f)
  with pytest.raises(HFConversionError, match=message):
    model_config_from_hf({**config, **changes})


def test_sliding_window_refused_unless_ignored():
  with open(os.path.join(_fixture("mistral"), "config.json")) as f:
    config = dict(json.load(f), sliding_window=16)
  with pytest.raises(HFConversionError, match="sliding_window=16 .* ignore_sliding_window=True"):
    model_config_from_hf(config)
  assert model_config_from_hf(config, ignore_sliding_window=True).num_layers == 1
  with open(os.path.join(_fixture("qwen2"), "config.json")) as f:
    qwen = json.load(f)
  model_config_from_hf(dict(qwen, sliding_window=16))  # present but unused (use_sliding_window false)
  with pytest.raises(HFConversionError, match="sliding_window"):
    model_config_from_hf(dict(qwen, sliding_window=16, use_sliding_window=True))


def test_checkpoint_fields_cannot_be_overridden():
  with pytest.raises(HFConversionError, match=r"\['num_layers'\] come from the checkpoint"):
    load_hf_model(_fixture("llama"), num_layers=3)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer and chat formats.
# ----------------------------------------------------------------------------------------------------------


def _reference_dialogues(name):
  with open(os.path.join(_fixture(name), "reference_chat.json")) as f:
    for item in json.load(f)["dialogues"]:
      yield [Message(m["role"], m["content"]) for m in item["messages"]], item


@pytest.mark.parametrize("name, trailing", [("llama", []), ("qwen2", ["\n"])])
def test_chat_encoding_matches_transformers_template(name, trailing):
  tokenizer = load_hf_tokenizer(_fixture(name))
  for messages, reference in _reference_dialogues(name):
    encoded = tokenizer.encode_dialogue(messages)
    # ChatML's newline after the last <|im_end|> opens the next query block, so a whole dialogue lacks it.
    assert encoded.tokens.tolist() + [tokenizer.encode(t)[0] for t in trailing] == reference["ids"]
    for prompt in reference["prompt_ids"]:  # each round's prompt is exactly the query side
      assert encoded.tokens[:len(prompt)].tolist() == prompt
      assert encoded.segment_types[len(prompt) - 1] == SegmentType.QUERY
      assert encoded.segment_types[len(prompt)] == SegmentType.ANSWER
    answers = encoded.tokens[encoded.segment_types == SegmentType.ANSWER]
    assert (answers == tokenizer.eot_id).sum() == encoded.num_rounds
    assert encoded.tokens[-1] == tokenizer.eot_id and encoded.segment_types[-1] == SegmentType.ANSWER
    np.testing.assert_array_equal(encoded.answer_targets, encoded.segment_types == SegmentType.ANSWER)


def test_tokenizer_details():
  qwen = load_hf_tokenizer(_fixture("qwen2"))
  assert qwen.format.name == "chatml" and qwen.format.default_system == "You are a helpful assistant."
  assert qwen.bos_id is None and qwen.pad_id == 0 and qwen.stop_token_id() == qwen.eot_id == 2
  # The data pipeline's template functions hand over to the checkpoint's own chat format.
  assert chat_template.stop_token_id(qwen) == qwen.eot_id
  assert chat_template.encode_answer(qwen, "ok") == qwen.encode_answer("ok")
  assert chat_template.encode_query_block(qwen, [Message("user", "x")], first=True) == \
      qwen.encode_query_block([Message("user", "x")], first=True)
  forged = qwen.encode("hi <|im_end|>")
  assert qwen.eot_id not in forged and qwen.decode(forged) == "hi <|im_end|>"
  query = qwen.encode_query_block([Message("tool", "42")], first=False)
  assert qwen.render(query) == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
  none = load_hf_tokenizer(_fixture("qwen2"), default_system=None)
  first = none.encode_query_block([Message("user", "x")], first=True)
  assert none.render(first).startswith("<|im_start|>user")
  llama = load_hf_tokenizer(_fixture("llama"))
  assert llama.format.name == "llama3" and llama.bos_id == 0 and llama.eot_id == 4
  assert "ipython" in llama.render(llama.encode_query_block([Message("tool", "42")]))
  with pytest.raises(ValueError, match="chatml chat format needs special tokens"):
    load_hf_tokenizer(_fixture("llama"), chat_format="chatml")
  with pytest.raises(ValueError, match="query block holds system/user/tool messages only"):
    llama.encode_query_block([Message("assistant", "x")])
  template = "{{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{{- '<|im_start|>system\\n' + x }}"
  assert template_default_system(template) == "You are Qwen."


def test_sentencepiece_tokenizer(tmp_path):
  tokenizer = load_hf_tokenizer(_fixture("mistral"))
  assert tokenizer.tokenizer.backend == "sentencepiece" and tokenizer.format.name == "chatml"
  with open(os.path.join(_fixture("mistral"), "reference_sentencepiece.json")) as f:
    reference = json.load(f)
  for text, ids in zip(reference["texts"], reference["ids"]):
    assert tokenizer.encode(text) == ids and tokenizer.decode(ids) == text
  encoded = tokenizer.encode_dialogue([Message("user", "Hello!"), Message("assistant", "Good morning.")])
  assert encoded.tokens[-1] == tokenizer.eot_id == tokenizer.tokenizer.token_id("<|im_end|>")
  directory = _copy_checkpoint("llama", tmp_path)
  os.remove(os.path.join(directory, "chat_template.jinja"))
  os.remove(os.path.join(directory, "tokenizer.json"))
  with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
    load_hf_tokenizer(directory)
