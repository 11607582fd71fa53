"""The context-dependence probe: facts stated in an early user turn, asked for later, at a set distance.

Each probe dialogue is written from templates with a seeded generator::

    user:      Hi! My name is Priya, by the way.          <- the fact (round 1)
    assistant: Nice to meet you! How can I help today?     (given; it does not repeat the fact)
    user:      What is a good way to relax after work?    <- ``distance`` filler rounds, answers given
    assistant: A short walk or some quiet music helps.
    ...
    user:      Quick question: what is my name?           <- the question (generated greedily)

A probe counts as recalled when the fact's value (``"Priya"``) appears in the greedy answer, case-folded;
that is the "exact match" of the fact, not of a whole reference sentence. The set is written to disk as JSONL
once (``write_probe_set``) and read back for every model, so every arm answers the same dialogues.
"""

from __future__ import annotations

import json
import os
import random
from typing import Sequence

from ism_jax.data.dialogue import Message

FACTS = {
    "name": (["Priya", "Tomasz", "Amara", "Kenji", "Lucia", "Dmitri", "Fatima", "Oskar", "Mei", "Rafael",
              "Ingrid", "Kwame"],
             ["Hi! My name is {v}, by the way.", "Hello there, I'm {v}."],
             ["Quick question: what is my name?", "Do you remember my name?"]),
    "city": (["Lisbon", "Nairobi", "Osaka", "Toronto", "Krakow", "Valparaiso", "Tbilisi", "Hanoi", "Bergen",
              "Cusco"],
             ["I just moved to {v} last month.", "I live in {v} these days."],
             ["Which city did I say I live in?", "Where do I live?"]),
    "pet": (["Biscuit", "Pepper", "Mochi", "Ziggy", "Nala", "Bruno", "Pickle", "Olive", "Rocket", "Juniper"],
            ["My dog is called {v}.", "I have a cat named {v}."],
            ["What is my pet's name?", "Remind me, what did I say my pet is called?"]),
    "color": (["purple", "orange", "turquoise", "crimson", "yellow", "green", "silver", "maroon"],
              ["My favorite color is {v}.", "I really love the color {v}."],
              ["What is my favorite color?", "Which color did I say I love?"]),
}
ACKNOWLEDGEMENTS = ["Nice to meet you! How can I help today?", "Thanks for telling me. What's on your mind?",
                    "Got it. What would you like to talk about?", "Sounds good! How is your day going?"]
FILLER = [
    ("What is a good way to relax after work?", "A short walk or some quiet music can help a lot."),
    ("Any tips for sleeping better?", "Keep a regular bedtime and avoid screens late at night."),
    ("What should I cook for dinner tonight?", "A simple vegetable stir fry with rice is quick and tasty."),
    ("Can you suggest a good hobby?", "Drawing is relaxing, and you only need paper and a pencil."),
    ("How do I stay motivated to exercise?", "Set small goals and find a friend to train with."),
    ("What is a fun thing to do on a rainy day?", "Watch a movie or try a new board game at home."),
    ("How can I learn a new language faster?", "Practice a little every day and talk with native speakers."),
    ("Is it better to read in the morning or at night?", "Whenever you focus best; many like the evening."),
    ("What makes a good cup of coffee?", "Fresh beans, the right grind and water that is not too hot."),
    ("How do I keep my plants alive?", "Give them enough light and water only when the soil is dry."),
    ("Any ideas for a weekend trip?", "A small town nearby with a market and a hiking trail is lovely."),
    ("How do I make small talk with strangers?", "Ask open questions and listen to their answers."),
]


def make_probe_set(seed: int, per_distance: int, distances: Sequence[int]) -> list[dict]:
  """``per_distance`` probe dialogues for each distance, as dicts (see the module docstring)."""
  rng = random.Random(seed)
  probes = []
  for distance in distances:
    for i in range(per_distance):
      kind = sorted(FACTS)[i % len(FACTS)]
      values, statements, questions = FACTS[kind]
      value = rng.choice(values)
      history = [(rng.choice(statements).format(v=value), rng.choice(ACKNOWLEDGEMENTS))]
      history += rng.sample(FILLER, distance) if distance <= len(FILLER) else rng.choices(FILLER, k=distance)
      probes.append({"id": f"d{distance}-{i}", "distance": distance, "fact": kind, "value": value,
                     "history": [list(pair) for pair in history], "question": rng.choice(questions)})
  return probes


def write_probe_set(path: str, probes: list[dict]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for probe in probes:
      f.write(json.dumps(probe, ensure_ascii=False) + "\n")


def read_probe_set(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def recalled(answer: str, value: str) -> bool:
  return value.casefold() in answer.casefold()


def run_probe(chat, probes: list[dict], max_new_tokens: int) -> list[dict]:
  """Greedy answers of ``chat`` (a :class:`~ism_jax.inference.session.ChatBatch`) to every probe.

  The history rounds are appended as given (``add_round``: their tokens reach the KV cache with the question's
  prefill, or are recomputed under ``prefix``); only the question is answered.
  """
  out = []
  for start in range(0, len(probes), chat.batch_size):
    chunk = probes[start:start + chat.batch_size]
    chat.reset()
    for row, probe in enumerate(chunk):
      for query, answer in probe["history"]:
        chat.add_round(row, [Message("user", query)], answer)
    queries = [probe["question"] for probe in chunk] + [None] * (chat.batch_size - len(chunk))
    answers = chat.ask(queries, max_new_tokens=max_new_tokens)
    for probe, answer in zip(chunk, answers):
      out.append({"id": probe["id"], "distance": probe["distance"], "answer": answer,
                  "recalled": recalled(answer, probe["value"])})
  return out
