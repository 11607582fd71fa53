"""JSONL parsing (OpenAI / ShareGPT), bad-input errors and counts, and the atomic TFDS import."""

import json
import os

import pytest

from ism_jax.data import builders
from ism_jax.data.dialogue import (DataFormatError, Message, parse_openai_record, parse_sharegpt_record,
                                   read_jsonl)
from ism_jax.data.import_jsonl import import_jsonl, main


def write_lines(path, lines):
  path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
  return str(path)


def chat(i):
  return {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q{i}"},
                       {"role": "assistant", "content": f"a{i}"}]}


def test_openai_record_roles_and_content_parts():
  record = {"messages": [
      {"role": "developer", "content": "rules"},
      {"role": "user", "content": [{"type": "text", "text": "look "}, {"type": "text", "text": "up"}]},
      {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {"name": "f"}}]},
      {"role": "tool", "content": "42"},
      {"role": "assistant", "content": "It is 42."}]}
  messages = parse_openai_record(record)
  assert [m.role for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
  assert messages[1].content == "look up"
  assert json.loads(messages[2].content) == [{"id": "c1", "function": {"name": "f"}}]


def test_sharegpt_record():
  record = {"system": "be kind", "conversations": [{"from": "human", "value": "hi"},
                                                   {"from": "gpt", "value": "yo"},
                                                   {"from": "observation", "value": "x"}]}
  assert parse_sharegpt_record(record) == [Message("system", "be kind"), Message("user", "hi"),
                                           Message("assistant", "yo"), Message("tool", "x")]


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', r"bad\.jsonl:2: invalid JSON"),
    ('[1, 2]', r"bad\.jsonl:2: expected a JSON object"),
    ('{"msgs": []}', r"bad\.jsonl:2: missing field \"messages\""),
    ('{"messages": {"role": "user"}}', r"bad\.jsonl:2: \"messages\" must be a list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"bad\.jsonl:2: messages\[0\]\.role = 'robot'"),
    ('{"messages": [{"role": "user"}]}', r"bad\.jsonl:2: messages\[0\] has no \"content\""),
    ('{"messages": [{"role": "user", "content": 5}]}', r"bad\.jsonl:2: messages\[0\]\.content must be"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
     r"bad\.jsonl:2: messages\[0\]\.content\[0\] is not a text part"),
])
def test_malformed_openai_lines_name_file_line_and_field(tmp_path, line, message):
  path = write_lines(tmp_path / "bad.jsonl", [chat(0), line, chat(2)])
  with pytest.raises(DataFormatError, match=message):
    read_jsonl(path, "openai")


def test_malformed_sharegpt_line(tmp_path):
  path = write_lines(tmp_path / "bad.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                                {"from": "gpt"}]}])
  with pytest.raises(DataFormatError, match=r"bad\.jsonl:1: conversations\[1\] has no \"value\""):
    read_jsonl(path, "sharegpt")


def test_untrainable_conversations_are_skipped_and_counted(tmp_path):
  no_answer = {"messages": [{"role": "user", "content": "hello?"}]}
  empty = {"messages": []}
  path = write_lines(tmp_path / "c.jsonl", [chat(0), no_answer, "", empty, chat(1), no_answer])
  dialogues, report = read_jsonl(path, "openai")
  assert len(dialogues) == 2 and report.kept == 2
  assert report.skipped == {"no_assistant": 2, "empty": 1}
  assert report.locations == [(f"{path}:2", "no_assistant"), (f"{path}:4", "empty"),
                              (f"{path}:6", "no_assistant")]


def test_skipped_conversations_are_located_first_few_then_counted(tmp_path):
  no_answer = {"messages": [{"role": "user", "content": "hello?"}]}
  path = write_lines(tmp_path / "c.jsonl", [chat(0)] + [no_answer] * 7 + [chat(1)])
  _, report = read_jsonl(path, "openai")
  assert report.describe_skips() == (
      f"7 no assistant message ({path}:2: no assistant message; {path}:3: no assistant message; {path}:4: no "
      f"assistant message; {path}:5: no assistant message; {path}:6: no assistant message; and 2 more)")
  import_report = import_jsonl(path, "located", str(tmp_path / "tfds"), validation_percent=0)
  assert f"skipped: 7 no assistant message ({path}:2: no assistant message;" in str(import_report)


def test_error_when_nothing_is_left_says_why_each_was_skipped(tmp_path):
  no_answer = {"messages": [{"role": "user", "content": "x"}]}
  path = write_lines(tmp_path / "c.jsonl", [no_answer, {"messages": []}])
  with pytest.raises(ValueError) as error:
    read_jsonl(path, "openai")
  assert str(error.value).startswith(
      f"no trainable conversation in {path}: all 2 conversations were skipped, 1 no messages, 1 no assistant "
      f"message ({path}:1: no assistant message; {path}:2: no messages);")
  assert "hold no records" not in str(error.value)
  blank = write_lines(tmp_path / "blank.jsonl", ["", "  "])
  with pytest.raises(ValueError, match=r"blank.jsonl: the files hold no records \(only blank lines\)"):
    read_jsonl(blank, "openai")


def test_import_round_trip_through_tfds_data_source(tmp_path):
  path = write_lines(tmp_path / "chats.jsonl", [chat(i) for i in range(40)] + [{"messages": []}])
  data_dir = str(tmp_path / "tfds")
  report = import_jsonl(path, "my_chats", data_dir, "openai", validation_percent=10)
  assert report.num_train + report.num_validation == 40 and report.num_validation >= 1
  assert report.skipped == {"empty": 1}
  import tensorflow_datasets as tfds
  train = tfds.data_source("my_chats", data_dir=data_dir, split="train")
  validation = tfds.data_source("my_chats", data_dir=data_dir, split="validation")
  assert (len(train), len(validation)) == (report.num_train, report.num_validation)
  got = sorted(builders.record_to_messages(train[i])[1].content for i in range(len(train)))
  got += sorted(builders.record_to_messages(validation[i])[1].content for i in range(len(validation)))
  assert sorted(got) == sorted(f"q{i}" for i in range(40))
  assert builders.record_to_messages(train[0])[0] == Message("system", "be brief")


def test_bad_input_never_touches_an_existing_dataset(tmp_path):
  data_dir = str(tmp_path / "tfds")
  good = write_lines(tmp_path / "good.jsonl", [chat(i) for i in range(5)])
  import_jsonl(good, "chats", data_dir)
  folder = builders.dataset_dir("chats", data_dir)
  before = sorted(os.listdir(folder))
  bad = write_lines(tmp_path / "bad.jsonl", [chat(0), "{oops"])
  with pytest.raises(DataFormatError, match=r"bad\.jsonl:2"):
    import_jsonl(bad, "chats", data_dir, overwrite=True)
  nothing = write_lines(tmp_path / "nothing.jsonl", [{"messages": []}])
  with pytest.raises(ValueError, match="no trainable"):
    import_jsonl(nothing, "chats", data_dir, overwrite=True)
  with pytest.raises(FileExistsError, match="overwrite"):
    import_jsonl(good, "chats", data_dir)
  assert sorted(os.listdir(folder)) == before
  assert len(builders.data_source("chats", data_dir, "train")) >= 1
  assert [p for p in os.listdir(data_dir) if "staging" in p] == []
  # A good overwrite replaces the data.
  more = write_lines(tmp_path / "more.jsonl", [chat(i) for i in range(30)])
  report = import_jsonl(more, "chats", data_dir, overwrite=True, validation_percent=0)
  assert (report.num_train, report.num_validation) == (30, 0)
  assert len(builders.data_source("chats", data_dir, "train")) == 30


def test_cli(tmp_path, capsys):
  path = write_lines(tmp_path / "sg.jsonl", [{"conversations": [{"from": "human", "value": f"q{i}"},
                                                                {"from": "gpt", "value": f"a{i}"}]}
                                             for i in range(8)])
  data_dir = str(tmp_path / "tfds")
  argv = ["--input", path, "--format", "sharegpt", "--name", "sg_chats", "--data_dir", data_dir]
  assert main(argv) == 0
  assert "sg_chats/1.0.0" in capsys.readouterr().out
  assert main(argv) == 1
  assert "already exists" in capsys.readouterr().err
  assert main(["--input", path, "--name", "Bad-Name", "--data_dir", data_dir]) == 1
  assert "not valid" in capsys.readouterr().err
  assert main(["--input", path, "--name", "chitchat", "--data_dir", data_dir]) == 1
  assert "built-in" in capsys.readouterr().err


def test_failure_while_writing_keeps_the_old_dataset(tmp_path, monkeypatch):
  data_dir = str(tmp_path / "tfds")
  import_jsonl(write_lines(tmp_path / "good.jsonl", [chat(i) for i in range(5)]), "chats", data_dir,
               validation_percent=0)

  def broken(self, split):
    yield "x", [Message("user", "q"), Message("assistant", "a")]
    raise OSError("disk full")

  monkeypatch.setattr(builders._InMemoryDialogues, "dialogues", broken)
  with pytest.raises(OSError, match="disk full"):
    import_jsonl(write_lines(tmp_path / "new.jsonl", [chat(i) for i in range(9)]), "chats", data_dir,
                 overwrite=True)
  assert len(builders.data_source("chats", data_dir, "train")) == 5
  assert sorted(os.listdir(data_dir)) == ["chats"]
