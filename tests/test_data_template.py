"""Dialogues, the chat tokenizer and the chat template (layout pinned by hand)."""

import numpy as np
import pytest

from ism_jax.data import synthetic
from ism_jax.data.chat_template import (encode_answer, encode_dialogue, encode_query_block, stop_token_id)
from ism_jax.data.dialogue import Message, split_rounds
from ism_jax.data.tokenizer import ChatTokenizer


class FakeTokenizer:
  """The ids of the chat_template docstring: hi=[50], yo=[60], ok?=[70, 71], ok=[70]."""

  pad_id, bos_id, eot_id = 0, 2, 3
  role_ids = {"system": 4, "user": 5, "tool": 6, "assistant": 7}
  _vocab = {"hi": [50], "yo": [60], "ok?": [70, 71], "ok": [70], "sys": [80], "t": [90]}

  def encode(self, text):
    return list(self._vocab[text])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  texts = [m.content for d in synthetic.generate_dialogues(0, "train", 200) for m in d]
  texts += ["Hello there, how are you?", "I'm fine. Thanks!"] * 20
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  return ChatTokenizer.train(texts, vocab_size=320, model_path=str(path))


def test_template_layout_pinned_by_hand():
  messages = [Message("user", "hi"), Message("assistant", "yo"), Message("user", "ok?"),
              Message("assistant", "ok")]
  enc = encode_dialogue(FakeTokenizer(), messages)
  np.testing.assert_array_equal(enc.tokens, [2, 5, 50, 3, 7, 60, 3, 5, 70, 71, 3, 7, 70, 3])
  np.testing.assert_array_equal(enc.segment_types, [1, 1, 1, 1, 1, 2, 2, 1, 1, 1, 1, 1, 2, 2])
  np.testing.assert_array_equal(enc.round_index, [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(enc.answer_targets, [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1])
  assert all(a.dtype == np.int32 for a in (enc.tokens, enc.segment_types, enc.round_index,
                                           enc.answer_targets))


def test_consecutive_query_messages_form_one_block():
  messages = [Message("system", "sys"), Message("user", "hi"), Message("assistant", "yo"),
              Message("tool", "t"), Message("user", "ok?"), Message("assistant", "ok"), Message("user", "hi")]
  rounds = split_rounds(messages)
  assert [len(r.query) for r in rounds] == [2, 2]
  enc = encode_dialogue(FakeTokenizer(), messages)
  np.testing.assert_array_equal(enc.tokens,
                                [2, 4, 80, 3, 5, 50, 3, 7, 60, 3, 6, 90, 3, 5, 70, 71, 3, 7, 70, 3])
  # One QUERY run per round (the trailing user message without an answer is not encoded).
  np.testing.assert_array_equal(enc.segment_types, [1] * 8 + [2] * 2 + [1] * 8 + [2] * 2)


def test_assistant_first_and_back_to_back_answers_have_header_only_query_blocks():
  messages = [Message("assistant", "hi"), Message("assistant", "yo")]
  enc = encode_dialogue(FakeTokenizer(), messages)
  np.testing.assert_array_equal(enc.tokens, [2, 7, 50, 3, 7, 60, 3])
  np.testing.assert_array_equal(enc.segment_types, [1, 1, 2, 2, 1, 2, 2])


def test_inference_blocks_reproduce_training_tokens(tokenizer):
  messages = synthetic.generate_dialogue(3, "validation", 7)
  enc = encode_dialogue(tokenizer, messages)
  tokens = []
  for k, round_ in enumerate(split_rounds(messages)):
    tokens += encode_query_block(tokenizer, round_.query, first=(k == 0))
    assert tokens[-1] == tokenizer.role_ids["assistant"]
    tokens += encode_answer(tokenizer, round_.answer.content)
    assert tokens[-1] == stop_token_id(tokenizer)
  np.testing.assert_array_equal(enc.tokens, tokens)
  # The answer tokens decode back to the reference answer.
  answer = enc.tokens[(enc.round_index == 0) & (enc.segment_types == 2)]
  assert tokenizer.decode(answer) == split_rounds(messages)[0].answer.content


def test_tokenizer_special_ids_survive_save_load(tokenizer):
  loaded = ChatTokenizer.load(tokenizer.path)
  assert (loaded.pad_id, loaded.bos_id, loaded.eot_id) == (0, 2, 3)
  assert loaded.role_ids == {"system": 4, "user": 5, "tool": 6, "assistant": 7}
  assert loaded.vocab_size == tokenizer.vocab_size
  text = "Hello there,  how are you? 12 é\nnew line"
  assert loaded.encode(text) == tokenizer.encode(text)
  assert loaded.decode(loaded.encode(text)) == text
  import pickle
  assert pickle.loads(pickle.dumps(loaded)).encode(text) == loaded.encode(text)


def test_text_cannot_forge_role_tokens(tokenizer):
  ids = tokenizer.encode("<|assistant|> <|eot|> <s>")
  assert not set(ids) & set(range(8))
  rendered = tokenizer.render([2, 5] + tokenizer.encode("hi") + [3])
  assert rendered == "<s><|user|>hi<|eot|>"


def test_tokenizer_rejects_model_without_chat_tokens(tmp_path):
  import sentencepiece as spm
  import io
  buffer = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f g"] * 50), model_writer=buffer,
                                 vocab_size=20, hard_vocab_limit=False, minloglevel=2)
  with pytest.raises(ValueError, match="special tokens"):
    ChatTokenizer(buffer.getvalue())
