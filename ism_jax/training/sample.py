"""A short greedy multi-turn chat with a trained model, printed at the end of training.

Each round the user's query block is prefilled into a KV cache in one call, then the answer is decoded
token by token until end-of-turn. Mask handling per kind:

* ``ism``: the query block attends bidirectionally within itself and to the cached history; the cache of
  earlier rounds is reused as is.
* ``causal``: the query block is causal; the cache is reused.
* ``prefix``: history plus the new query form one bidirectional block (as in the triplet examples the model
  was trained on), so the whole history is recomputed every round; only the answer is decoded causally.

Prefill chunks are padded to a multiple of :data:`BUCKET` tokens so that few shapes are compiled. This is a
small loop for the training demo, used when ``ism_jax.inference.ChatSession`` (the serving path) is not
installed.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ism_jax.data.chat_template import encode_query_block
from ism_jax.data.dialogue import Message, split_rounds
from ism_jax.data.tokenizer import ChatTokenizer
from ism_jax.masks import MaskRanges, SegmentType, make_attention_ranges
from ism_jax.model import Transformer, init_cache

BUCKET = 32


class GreedyChat:
  """One dialogue with a model: ``reply(messages)`` returns the model's answer text for one round."""

  def __init__(self, model: Transformer, tokenizer: ChatTokenizer, max_len: int, kind: str | None = None):
    self.tokenizer, self.max_len = tokenizer, max_len
    self.kind = model.config.mask if kind is None else kind
    self._config = model.config
    graphdef, self._params = nnx.split(model)

    @jax.jit
    def forward(params, tokens_BT, positions_BT, k_lo_BT, k_hi_BT, cache, write_index_B):
      logits_BTV, cache = nnx.merge(graphdef, params).forward(
          tokens_BT, positions_BT, MaskRanges(k_lo=k_lo_BT, k_hi=k_hi_BT), cache, write_index_B)
      return jnp.argmax(logits_BTV, axis=-1), cache

    self._forward = forward
    self._cache = init_cache(self._config, 1, max_len)
    self._tokens: list[int] = []
    self._types: list[int] = []
    self._cached = 0  # tokens whose keys/values in the cache are final

  def _run(self, start: int, tokens: Sequence[int], k_lo: np.ndarray, k_hi: np.ndarray) -> np.ndarray:
    """Writes ``tokens`` at slots ``start...`` and returns the argmax next token of each."""
    length = len(tokens)
    padded = -(-length // BUCKET) * BUCKET if length > 1 else 1
    pad = padded - length
    positions = np.arange(start, start + padded, dtype=np.int32)
    tokens = np.concatenate([np.asarray(tokens, np.int32), np.zeros(pad, np.int32)])
    # Padding rows see only slot 0; their slots lie beyond every real row's range until overwritten.
    k_lo = np.concatenate([k_lo, np.zeros(pad, np.int32)]).astype(np.int32)
    k_hi = np.concatenate([k_hi, np.ones(pad, np.int32)]).astype(np.int32)
    next_tokens, self._cache = self._forward(self._params, tokens[None], positions[None], k_lo[None],
                                             k_hi[None], self._cache, jnp.array([start], jnp.int32))
    return np.asarray(next_tokens[0, :length])

  def reply(self, query: Sequence[Message], max_answer_tokens: int) -> str:
    """Feeds one round's query messages and greedily decodes the answer (up to end-of-turn)."""
    block = encode_query_block(self.tokenizer, query, first=not self._tokens)
    tokens = self._tokens + block
    if len(tokens) + 1 >= self.max_len:
      raise ValueError(f"the dialogue no longer fits the {self.max_len}-token cache")
    types = np.asarray(self._types + [SegmentType.QUERY] * len(block), np.int32)
    if self.kind == "prefix":  # history + query: one bidirectional block, recomputed from slot 0
      start, ranges = 0, make_attention_ranges(jnp.full((1, len(tokens)), SegmentType.QUERY), kind="ism")
    else:
      start, ranges = self._cached, make_attention_ranges(jnp.asarray(types[None]), kind=self.kind)
    k_lo, k_hi = np.asarray(ranges.k_lo[0, start:]), np.asarray(ranges.k_hi[0, start:])
    next_token = int(self._run(start, tokens[start:], k_lo, k_hi)[-1])
    answer = []
    eot = self.tokenizer.eot_id
    while True:
      position = len(tokens) + len(answer)
      if next_token != eot and (len(answer) >= max_answer_tokens or position + 2 >= self.max_len):
        next_token = eot  # out of budget: close the turn so the template stays intact
      answer.append(next_token)
      next_token = int(self._run(position, [answer[-1]], np.zeros(1, np.int32),
                                 np.array([position + 1], np.int32))[0])
      if answer[-1] == eot:
        break
    self._tokens = tokens + answer
    self._types = list(types) + [SegmentType.ANSWER] * len(answer)
    self._cached = len(self._tokens)
    return self.tokenizer.decode(answer)


def _chat(model: Transformer, tokenizer: ChatTokenizer, max_len: int, max_answer_tokens: int):
  """``reply(query_messages) -> answer``: ``ism_jax.inference.ChatSession`` (greedy) if installed, else
  :class:`GreedyChat`."""
  try:
    from ism_jax.inference import ChatSession  # pylint: disable=import-outside-toplevel
  except ImportError:
    chat = GreedyChat(model, tokenizer, max_len)
    return lambda query: chat.reply(query, max_answer_tokens)
  session = ChatSession(model, tokenizer, max_len=max_len, max_new_tokens=max_answer_tokens)
  return lambda query: session.ask(list(query))


def sample_chat(model: Transformer, tokenizer: ChatTokenizer, dialogue: Sequence[Message], rounds: int,
                max_answer_tokens: int, max_len: int) -> list[tuple[str, str, str]]:
  """Replays the query side of ``dialogue``'s first ``rounds`` rounds; returns ``(user, model, reference)``.

  The model's own answers (not the reference ones) stay in the history, as in a real chat. Stops early when
  the dialogue no longer fits ``max_len`` tokens.
  """
  reply = _chat(model, tokenizer, max_len, max_answer_tokens)
  turns = []
  for round_ in split_rounds(dialogue)[:rounds]:
    try:
      answer = reply(round_.query)
    except ValueError:  # the dialogue outgrew max_len (PromptTooLongError is a ValueError too)
      break
    user = "\n".join(m.content for m in round_.query)
    turns.append((user, answer, round_.answer.content))
  return turns


def format_chat(turns: list[tuple[str, str, str]], width: int = 100) -> str:
  """``user: ...`` / ``model: ...`` lines (reference answers in brackets), long texts shortened."""
  cut = lambda s: (s if len(s) <= width else s[:width - 3] + "...").replace("\n", " / ")
  lines = []
  for user, answer, reference in turns:
    lines += [f"  user:  {cut(user)}", f"  model: {cut(answer)}", f"         (reference: {cut(reference)})"]
  return "\n".join(lines)
