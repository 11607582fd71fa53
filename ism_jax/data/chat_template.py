"""The chat template: the one definition of how a dialogue becomes tokens.

Every message is ``<role> content <|eot|>``. The dialogue starts with ``<s>``. The assistant header
``<|assistant|>`` belongs to the query block, so a round is laid out as::

    [<s>] <|user|> u u <|eot|> <|assistant|> | a a <|eot|>
    \\______________ QUERY (1) ______________/  \\ ANSWER (2) /

The answer side is the assistant's content plus its end-of-turn token (the model learns to stop). Worked
example, ``user: "hi"`` → ``assistant: "yo"`` → ``user: "ok?"`` → ``assistant: "ok"`` (content ids made up:
hi=[50], yo=[60], ok?=[70, 71], ok=[70])::

    tokens         2  5 50  3  7 | 60  3 |  5 70 71  3  7 | 70  3
    segment_types  1  1  1  1  1 |  2  2 |  1  1  1  1  1 |  2  2
    round_index    0  0  0  0  0 |  0  0 |  1  1  1  1  1 |  1  1
    answer_targets 0  0  0  0  0 |  1  1 |  0  0  0  0  0 |  1  1

Inference uses :func:`encode_query_block` for each round's query side (which ends with the assistant header)
and decodes until :func:`stop_token_id`; concatenating query blocks and answers (content + end of turn)
reproduces :func:`encode_dialogue` exactly.

A tokenizer may carry its own chat format (a Hugging Face checkpoint's, see
:class:`ism_jax.data.hf_chat.HFChatTokenizer`): when it has methods ``encode_query_block``,
``encode_answer`` and ``stop_token_id``, the functions here hand over to them, so the pipeline, training and
inference use that format with the same query/answer split.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ism_jax.data.dialogue import Message, check_query_block, split_rounds
from ism_jax.data.tokenizer import ChatTokenizer
from ism_jax.masks import SegmentType


@dataclasses.dataclass(frozen=True)
class EncodedDialogue:
  """One dialogue as per-token int32 arrays, all of shape ``[length]``.

  Attributes:
    tokens: token ids.
    segment_types: ``SegmentType.QUERY`` (1) or ``SegmentType.ANSWER`` (2).
    round_index: 0-based round of each token.
    answer_targets: 1 on the answer tokens that are trained targets (all answers unless narrowed by
      :func:`ism_jax.data.packing.select_targets` or :func:`ism_jax.data.packing.expand_triplets`).
  """

  tokens: np.ndarray
  segment_types: np.ndarray
  round_index: np.ndarray
  answer_targets: np.ndarray

  def __len__(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def num_rounds(self) -> int:
    return int(self.round_index[-1]) + 1 if len(self) else 0

  def round_ends(self) -> np.ndarray:
    """``[num_rounds]`` exclusive end index of each round."""
    return np.searchsorted(self.round_index, np.arange(self.num_rounds), side="right")

  def slice_rounds(self, num_rounds: int) -> "EncodedDialogue":
    """The first ``num_rounds`` rounds (whole blocks only)."""
    end = int(self.round_ends()[num_rounds - 1]) if num_rounds > 0 else 0
    return EncodedDialogue(self.tokens[:end], self.segment_types[:end], self.round_index[:end],
                           self.answer_targets[:end])


def _message_tokens(tokenizer: ChatTokenizer, message: Message) -> list[int]:
  return [tokenizer.role_ids[message.role]] + tokenizer.encode(message.content) + [tokenizer.eot_id]


def encode_query_block(tokenizer: ChatTokenizer, messages: Sequence[Message], *,
                       first: bool = False) -> list[int]:
  """The query side of one round: ``[<s>]`` (first round only), each message, then ``<|assistant|>``.

  Args:
    messages: the round's non-assistant messages, in order (may be empty).
    first: pass ``True`` for the dialogue's first round, which starts with ``<s>``.
  """
  if hasattr(tokenizer, "encode_query_block"):
    return tokenizer.encode_query_block(messages, first=first)
  check_query_block(messages)
  tokens = [tokenizer.bos_id] if first else []
  for message in messages:
    tokens += _message_tokens(tokenizer, message)
  return tokens + [tokenizer.role_ids["assistant"]]


def encode_answer(tokenizer: ChatTokenizer, content: str) -> list[int]:
  """The answer side of one round: assistant content, then ``<|eot|>`` (the header is on the query side)."""
  if hasattr(tokenizer, "encode_answer"):
    return tokenizer.encode_answer(content)
  return tokenizer.encode(content) + [tokenizer.eot_id]


def stop_token_id(tokenizer: ChatTokenizer) -> int:
  """The id the decoder stops on: end of turn."""
  if hasattr(tokenizer, "stop_token_id"):
    return tokenizer.stop_token_id()
  return tokenizer.eot_id


def encode_dialogue(tokenizer: ChatTokenizer, messages: Sequence[Message]) -> EncodedDialogue:
  """Encodes the complete rounds of a dialogue (trailing messages without an answer are dropped).

  See the module docstring for the layout. All answers are targets.
  """
  tokens, types, rounds = [], [], []
  for k, round_ in enumerate(split_rounds(messages)):
    query = encode_query_block(tokenizer, round_.query, first=(k == 0))
    answer = encode_answer(tokenizer, round_.answer.content)
    tokens += query + answer
    types += [SegmentType.QUERY] * len(query) + [SegmentType.ANSWER] * len(answer)
    rounds += [k] * (len(query) + len(answer))
  tokens = np.asarray(tokens, np.int32)
  types = np.asarray(types, np.int32)
  return EncodedDialogue(tokens=tokens, segment_types=types, round_index=np.asarray(rounds, np.int32),
                         answer_targets=(types == SegmentType.ANSWER).astype(np.int32))
