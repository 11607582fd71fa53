"""ChatSession and chat.py: text round trips with a tokenizer trained in a temp dir, the training layout of
the cached dialogue, loading from a training workdir, JSONL mode and the interactive loop."""

import io
import json
import os

import numpy as np
import pytest

import chat
from ism_jax import workdir as workdir_lib
from ism_jax.data.chat_template import encode_dialogue, encode_query_block
from ism_jax.data.dialogue import Message
from ism_jax.inference import ChatBatch, ChatSession, PromptTooLongError, SamplingParams
from ism_jax.masks import SegmentType
from tests.tiny_chat import tiny_model, train_tokenizer, write_workdir

MAX_LEN = 128


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def model(tokenizer):
  return tiny_model(tokenizer.vocab_size)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, model, tokenizer):
  return write_workdir(str(tmp_path_factory.mktemp("run")), model, tokenizer, MAX_LEN)


def _session(model, tokenizer, **kwargs):
  return ChatSession(model, tokenizer, max_len=MAX_LEN, max_new_tokens=6, **kwargs)


def test_session_keeps_the_training_layout_across_rounds(model, tokenizer):
  session = _session(model, tokenizer, system="be brief")
  expected = []
  for k, text in enumerate(["hello there", "how are you today?", "tell me a story"]):
    answer = session.ask(text)
    assert isinstance(answer, str)
    generated = session.batch.last_round.answers[0].tolist()
    messages = ([Message("system", "be brief")] if k == 0 else []) + [Message("user", text)]
    expected += encode_query_block(tokenizer, messages, first=k == 0) + generated
    if generated[-1] != tokenizer.eot_id:  # a budget-cut answer gets its end of turn, as in training
      expected.append(tokenizer.eot_id)
    assert answer == tokenizer.decode(generated)
  np.testing.assert_array_equal(session.tokens(), expected)
  assert [m.role for m in session.history()] == ["system", "user", "assistant"] + ["user", "assistant"] * 2
  assert session.stats["ttft_s"] > 0
  # Given rounds are laid out exactly like encode_dialogue (what training saw).
  session.reset()
  given = [Message("user", "hi"), Message("assistant", "hello there"), Message("user", "how are you")]
  session.add_round(given[0].content, given[1].content)
  session.ask(given[2].content)
  dialogue = encode_dialogue(tokenizer, [Message("system", "be brief")] + given[:2])
  np.testing.assert_array_equal(session.tokens()[:len(dialogue)], dialogue.tokens)
  np.testing.assert_array_equal(session.batch.dialogues.segment_types(0)[:len(dialogue)],
                                dialogue.segment_types)
  assert session.batch.dialogues.segment_types(0)[-1] == SegmentType.ANSWER


def test_session_prompt_too_long_leaves_the_session_unchanged(model, tokenizer):
  session = _session(model, tokenizer)
  session.ask("hello there")
  tokens, history = session.tokens(), session.history()
  with pytest.raises(PromptTooLongError, match="max_len=128"):
    session.ask("hello there " * 100)
  np.testing.assert_array_equal(session.tokens(), tokens)
  assert session.history() == history
  assert session.ask("how are you") == _replay(model, tokenizer, ["hello there", "how are you"])[-1]


def _replay(model, tokenizer, texts, **kwargs):
  session = _session(model, tokenizer, **kwargs)
  return [session.ask(t) for t in texts]


def test_sampled_session_is_reproducible_with_its_seed(model, tokenizer):
  sampling = SamplingParams(temperature=1.0, top_k=20, top_p=0.9)
  first = _replay(model, tokenizer, ["hello", "and then?"], sampling=sampling, seed=3)
  assert first == _replay(model, tokenizer, ["hello", "and then?"], sampling=sampling, seed=3)


def test_load_from_a_training_workdir(workdir, model, tokenizer):
  session = ChatSession.load(workdir, max_new_tokens=6)
  assert session.engine.max_len == MAX_LEN and session.kind == "ism"
  assert [session.ask(t) for t in ["hello", "what time is it"]] == _replay(model, tokenizer,
                                                                           ["hello", "what time is it"])


def test_load_errors_name_the_missing_file(tmp_path, workdir):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match=f"workdir {missing} does not exist"):
    ChatSession.load(missing)
  no_tokenizer = tmp_path / "run"  # a checkpoint without its tokenizer
  no_tokenizer.mkdir()
  os.symlink(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR), no_tokenizer / workdir_lib.CHECKPOINT_DIR)
  with pytest.raises(FileNotFoundError, match=f"{no_tokenizer}/tokenizer.model is missing"):
    ChatSession.load(str(no_tokenizer))


def test_chat_cli_jsonl_mode(tmp_path, workdir, model, tokenizer, capsys):
  lines = [
      {"id": "a", "turns": ["hello", "how are you today?", "what time is it"]},
      {"id": "b", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                               {"role": "user", "content": "the weather is nice"}]},
      {"id": "c", "turns": ["tell me a story " * 60]},
      {"id": "d", "system": "be brief", "turns": ["good night"]},
  ]
  source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  source.write_text("".join(json.dumps(line) + "\n" for line in lines))
  code = chat.main(["--workdir", workdir, "--input", str(source), "--output", str(target),
                    "--batch_size", "2", "--max_new_tokens", "6"])
  assert code == 0
  out = [json.loads(line) for line in target.read_text().splitlines()]
  assert [o["id"] for o in out] == ["a", "b", "c", "d"]
  assert out[0]["answers"] == _replay(model, tokenizer, lines[0]["turns"])
  assert len(out[0]["stop_reasons"]) == 3 and [m["role"] for m in out[0]["messages"]][-2:] == ["user",
                                                                                            "assistant"]
  replay_b = _session(model, tokenizer)
  replay_b.add_round("hi", "hello")
  assert out[1]["answers"] == [replay_b.ask("the weather is nice")]
  assert out[2]["answers"] == [] and "max_len=128" in out[2]["error"]
  assert out[3]["answers"] == _replay(model, tokenizer, ["good night"], system="be brief")
  # Bad input is refused before the model loads, naming file and line.
  source.write_text('{"turns": ["ok"]}\n{"messages": [{"role": "user", "content": "x"}, '
                    '{"role": "assistant", "content": "y"}]}\n')
  assert chat.main(["--workdir", workdir, "--input", str(source)]) == 2
  assert f"{source}:2: nothing to answer" in capsys.readouterr().err


def test_chat_cli_interactive(workdir, model, tokenizer):
  stdin, stdout = io.StringIO("hello\n/reset\nhello\n/quit\n"), io.StringIO()
  code = chat.main(["--workdir", workdir, "--max_new_tokens", "6", "--stats"], stdin=stdin, stdout=stdout)
  assert code == 0
  text = stdout.getvalue()
  assert text.count("model> ") == 2 and "(new conversation)" in text and "first token" in text
  first = _replay(model, tokenizer, ["hello"])[0]
  assert text.count(f"model> {first}\n") == 2  # /reset started over: the same greedy answer again


def test_chat_batch_rows_are_independent(model, tokenizer):
  batch = ChatBatch(model, tokenizer, batch_size=2, max_len=MAX_LEN, max_new_tokens=6)
  first = batch.ask(["hello", "what time is it"])
  second = batch.ask([None, "and you?"])
  assert second[0] is None
  assert [first[0]] == _replay(model, tokenizer, ["hello"])
  assert [first[1], second[1]] == _replay(model, tokenizer, ["what time is it", "and you?"])
