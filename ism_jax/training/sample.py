"""A short greedy multi-turn chat with a trained model, printed at the end of training.

The chat runs through the serving path (:class:`ism_jax.inference.ChatSession`, as ``chat.py`` does): each
round's query block is prefilled into the KV cache in one call and the answer decoded until end of turn;
under ``prefix`` the history is recomputed every round, as that mask requires.
"""

from __future__ import annotations

from typing import Sequence

from ism_jax.data.dialogue import Message, split_rounds
from ism_jax.data.tokenizer import ChatTokenizer
from ism_jax.inference.session import ChatSession
from ism_jax.model import Transformer


def sample_chat(model: Transformer, tokenizer: ChatTokenizer, dialogue: Sequence[Message], rounds: int,
                max_answer_tokens: int, max_len: int, kind: str | None = None) -> list[tuple[str, str, str]]:
  """Replays the query side of ``dialogue``'s first ``rounds`` rounds; returns ``(user, model, reference)``.

  The model's own answers (not the reference ones) stay in the history, as in a real chat. Stops early when
  the dialogue no longer fits ``max_len`` tokens. ``kind`` defaults to the model's mask.
  """
  session = ChatSession(model, tokenizer, kind=kind, max_len=max_len, max_new_tokens=max_answer_tokens)
  turns = []
  for round_ in split_rounds(dialogue)[:rounds]:
    try:
      answer = session.ask(list(round_.query))
    except ValueError:  # the dialogue outgrew max_len (PromptTooLongError is a ValueError)
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
