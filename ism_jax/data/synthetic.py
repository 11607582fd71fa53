"""A seeded synthetic multi-turn task: remember facts across rounds, read the whole query, answer briefly.

Each round the user states zero to two facts (``cat is 4``; a name may be re-bound, the latest value counts)
and asks about two or three names bound in this *or earlier* rounds. The operation word comes **last**, after
the names it applies to, so a query token can only know what to compute by seeing the end of its query
(bidirectional query attention can help); the values come from earlier rounds (memory across rounds is
needed). Answers are one to three words, so exact match is meaningful::

    system:    you track facts .                           (half of the dialogues)
    user:      cat is 4 , dog is 7 . cat dog sum ?
    assistant: 1                                           (4 + 7 = 11, last digit)
    user:      fox is 2 .                                  (facts and question may come as two messages;
    user:      dog fox cat max ?                            they form one query block)
    assistant: dog
    user:      cat fox rev ?
    assistant: 2 4

Operations over the listed names' values: ``sum`` (last digit of the sum), ``max`` / ``min`` (the name with
the largest / smallest value; the names asked about have distinct values), ``list`` (values in order),
``rev`` (values in reverse order).

The vocabulary is about 30 words, so a tiny model learns the task in minutes on CPU. Generation is a pure
function of ``(seed, split, index)``.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from ism_jax.data.dialogue import Message

NAMES = ("ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "owl", "yak")
OPS = ("sum", "max", "min", "list", "rev")
SYSTEM_PROMPT = "you track facts ."


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
  """Parameters of the task (defaults are the ``synthetic_multiturn`` dataset's)."""

  min_rounds: int = 2        # rounds per dialogue, drawn uniformly from [min_rounds, max_rounds]
  max_rounds: int = 6
  num_names: int = 8         # names used, the first num_names of NAMES (at most 10)
  max_new_facts: int = 2     # facts stated per round, 0..max_new_facts (at least 1 in the first round)
  max_items: int = 3         # names per question, 2..max_items
  split_prob: float = 0.3    # chance that facts and question come as two user messages

  def __post_init__(self):
    if not 1 <= self.min_rounds <= self.max_rounds:
      raise ValueError(f"need 1 <= min_rounds <= max_rounds, got {self.min_rounds}, {self.max_rounds}")
    if not 3 <= self.num_names <= len(NAMES):
      raise ValueError(f"num_names must be in [3, {len(NAMES)}], got {self.num_names}")
    if not 2 <= self.max_items <= self.num_names:
      raise ValueError(f"max_items must be in [2, num_names], got {self.max_items}")


def _split_code(split: str) -> int:
  return zlib.crc32(split.encode("utf-8"))


def answer_for(op: str, items: list[str], facts: dict[str, int]) -> str:
  """The reference answer of question ``items op ?`` given the current ``facts``."""
  values = [facts[name] for name in items]
  if op == "sum":
    return str(sum(values) % 10)
  if op == "max":
    return items[int(np.argmax(values))]
  if op == "min":
    return items[int(np.argmin(values))]
  if op == "list":
    return " ".join(map(str, values))
  if op == "rev":
    return " ".join(map(str, values[::-1]))
  raise ValueError(f"unknown operation {op!r}; expected one of {OPS}")


def _pick_items(rng: np.random.Generator, op: str, facts: dict[str, int], max_items: int) -> list[str] | None:
  bound = sorted(facts)
  count = int(rng.integers(2, min(max_items, len(bound)) + 1))
  for _ in range(20):
    items = [bound[i] for i in rng.choice(len(bound), size=count, replace=False)]
    values = [facts[name] for name in items]
    if op not in ("max", "min") or len(set(values)) == len(values):
      return items
  return None


def generate_dialogue(seed: int, split: str, index: int,
                      task: SyntheticTask = SyntheticTask()) -> list[Message]:
  """Dialogue number ``index`` of ``split`` (a pure function of its arguments)."""
  rng = np.random.default_rng([seed, _split_code(split), index])
  names = NAMES[:task.num_names]
  facts: dict[str, int] = {}
  messages = [Message("system", SYSTEM_PROMPT)] if rng.random() < 0.5 else []
  for k in range(int(rng.integers(task.min_rounds, task.max_rounds + 1))):
    low = 2 if k == 0 else 0
    new = {}
    for _ in range(int(rng.integers(low, max(low, task.max_new_facts) + 1))):
      new[names[int(rng.integers(len(names)))]] = int(rng.integers(10))
    facts.update(new)
    if len(facts) < 2:  # two different names are needed for a question
      name = next(n for n in names if n not in facts)
      new[name] = facts[name] = int(rng.integers(10))
    op = OPS[int(rng.integers(len(OPS)))]
    items = _pick_items(rng, op, facts, task.max_items)
    if items is None:  # no distinct values to compare: ask for the list instead
      op, items = "list", sorted(facts)[:2]
    statement = " , ".join(f"{name} is {value}" for name, value in new.items())
    question = f"{' '.join(items)} {op} ?"
    if statement and rng.random() < task.split_prob:
      messages += [Message("user", statement + " ."), Message("user", question)]
    else:
      messages.append(Message("user", f"{statement} . {question}" if statement else question))
    messages.append(Message("assistant", answer_for(op, items, facts)))
  return messages


def generate_dialogues(seed: int, split: str, count: int, task: SyntheticTask = SyntheticTask()):
  """Dialogues ``0 .. count-1`` of ``split``, as a list of message lists."""
  return [generate_dialogue(seed, split, i, task) for i in range(count)]


def normalize_answer(text: str) -> str:
  """Whitespace-insensitive form used for exact match: words joined by single spaces."""
  return " ".join(text.split())


def score_answer(generated: str, reference: str) -> bool:
  """Exact match of a generated answer string against the reference (whitespace-insensitive).

  >>> score_answer(" 2  4", "2 4"), score_answer("2 4 1", "2 4")
  (True, False)
  """
  return normalize_answer(generated) == normalize_answer(reference)
