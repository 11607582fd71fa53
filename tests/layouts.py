"""Random multi-turn layouts and a brute-force mask oracle, shared by the tests.

The oracle is written from the definitions in docs/DESIGN.md §1-§2 with plain loops, independently of
``ism_jax.masks``, so the library's two formulations (block counter and ranges) are checked against a third.
"""

from __future__ import annotations

import numpy as np

PAD, QUERY, ANSWER = 0, 1, 2


def random_dialogue(rng: np.random.Generator, max_block: int = 5) -> list[int]:
  """Segment types of one dialogue: rounds of a query block then an answer block, with variations."""
  style = rng.integers(0, 6)
  if style == 0:  # only queries (e.g. a truncated first round)
    return [QUERY] * int(rng.integers(1, 2 * max_block))
  if style == 1:  # only answers (causal-like)
    return [ANSWER] * int(rng.integers(1, 2 * max_block))
  types: list[int] = []
  if style == 2:  # starts with an answer
    types += [ANSWER] * int(rng.integers(1, max_block))
  for _ in range(int(rng.integers(1, 4))):
    types += [QUERY] * int(rng.integers(1, max_block))
    types += [ANSWER] * int(rng.integers(1, max_block))
  if style == 3:  # ends with an unanswered query
    types += [QUERY] * int(rng.integers(1, max_block))
  return types


def random_packed_batch(rng: np.random.Generator, batch: int, length: int, max_block: int = 5):
  """Rows packed with whole dialogues, padded at the end. Returns int32 arrays of shape [batch, length]."""
  types = np.zeros((batch, length), np.int32)
  ids = np.zeros((batch, length), np.int32)
  for row in range(batch):
    cursor, dialogue = 0, 1
    while True:
      d = random_dialogue(rng, max_block)
      if cursor + len(d) > length:
        if cursor == 0:
          d = d[:length]
        else:
          break
      types[row, cursor:cursor + len(d)] = d
      ids[row, cursor:cursor + len(d)] = dialogue
      cursor += len(d)
      dialogue += 1
      if rng.random() < 0.2:
        break
  positions = np.zeros_like(ids)
  for row in range(batch):
    for t in range(length):
      same = t > 0 and ids[row, t] == ids[row, t - 1] and ids[row, t] != 0
      positions[row, t] = positions[row, t - 1] + 1 if same else 0
  tokens = rng.integers(3, 50, size=(batch, length)).astype(np.int32)
  return {"tokens": tokens, "segment_types": types, "segment_ids": ids, "positions": positions}


def brute_force_mask(types: np.ndarray, ids: np.ndarray, kind: str) -> np.ndarray:
  """``[B, T, T]`` bool mask from the definitions, one (query, key) pair at a time."""
  batch, length = types.shape
  mask = np.zeros((batch, length, length), bool)
  for b in range(batch):
    for j in range(length):
      for i in range(length):
        mask[b, j, i] = _visible(types[b], ids[b], j, i, kind)
  return mask


def _visible(types, ids, j: int, i: int, kind: str) -> bool:
  if types[j] == PAD or types[i] == PAD:
    return i == j and types[j] == PAD and types[i] == PAD
  if ids[j] != ids[i]:
    return False
  if i <= j:
    return True
  if kind == "causal":
    return False
  if kind == "prefix":
    members = [t for t in range(len(types)) if ids[t] == ids[j]]
    answer_starts = [t for t in members if types[t] == ANSWER and (t == members[0] or types[t - 1] != ANSWER)]
    last = answer_starts[-1] if answer_starts else members[-1] + 1
    if i < last and j < last:
      return True
  # ism (and the trailing part of prefix): same query block, i.e. an unbroken run of QUERY tokens.
  if types[j] != QUERY:
    return False
  return all(types[t] == QUERY and ids[t] == ids[j] for t in range(j, i + 1))
