"""Continuous batching: conversations joining and leaving a slot pool at different ticks give the tokens each
would get alone (DialogueBatch) and the argmax of one full forward pass; prefix reuse, eviction, cancelling
and compile counts. Tiny float32 model, the shapes of tests/test_inference.py."""


import numpy as np
import pytest

from ism_jax import SegmentType
from ism_jax.inference import DialogueBatch, Engine, PromptTooLongError
from ism_jax.inference import steps as steps_lib
from ism_jax.inference.scheduler import Request, Scheduler, reusable_prefix, with_answer
from tests import tiny_chat
from tests.compiles import compile_events

MAX_LEN = 128
EOT = 3
SLOTS = 2  # the batch of tests/test_inference.py: full-pool prefills and decode share its programs
Q, A = SegmentType.QUERY, SegmentType.ANSWER


@pytest.fixture(scope="module")
def model():
  return tiny_chat.tiny_model()


@pytest.fixture(scope="module")
def full_argmax(model):
  """``(tokens [T], types [T], kind) -> [T]`` argmax of one full forward pass (padded to MAX_LEN)."""
  forward = tiny_chat.full_forward(model, MAX_LEN)
  return lambda tokens, types, kind: forward(tokens, types, kind).argmax(-1)


def _scenario(seed, conversations=5, rounds=3):
  rng = np.random.default_rng(seed)
  queries = [[rng.integers(8, 64, size=int(rng.integers(3, 14))) for _ in range(rounds)]
             for _ in range(conversations)]
  return queries, [3, 5, 7, 4, 6][:conversations]


def _drive(scheduler, queries, budgets, starts=None, on_tick=None):
  """Conversation ``i`` submits its first round at tick ``starts[i]`` and each next round (history +
  answer + next query, as a client sends it) once the previous answer is complete.

  Returns ``(answers, dialogues, first_events)``: per conversation its answers (token lists), its final
  dialogue ``(tokens, types)`` and the first event of each round."""
  starts = list(range(len(queries))) if starts is None else starts
  history = [(np.zeros(0, np.int32), np.zeros(0, np.int32)) for _ in queries]
  answers, firsts, owner, partial = [[] for _ in queries], [[] for _ in queries], {}, {}

  def submit(i):
    query = queries[i][len(answers[i])]
    tokens, types = history[i]
    request = Request(np.concatenate([tokens, query]), np.concatenate([types, np.full(query.size, Q)]),
                      max_new_tokens=budgets[i])
    owner[scheduler.submit(request)] = (i, request)

  tick = 0
  while tick <= max(starts) or not scheduler.idle:
    for i in (i for i, s in enumerate(starts) if s == tick):
      submit(i)
    if on_tick is not None:
      on_tick(tick, owner)
    for event in scheduler.step():
      i, request = owner[event.request_id]
      if event.request_id not in partial:
        firsts[i].append(event)
      partial.setdefault(event.request_id, []).extend(event.tokens)
      if event.finished and event.stop_reason != "cancelled":
        answers[i].append(partial[event.request_id])
        history[i] = with_answer(request.tokens, request.segment_types, answers[i][-1], scheduler.eot_id)
        if len(answers[i]) < len(queries[i]):
          submit(i)
    tick += 1
  return answers, history, firsts


def _alone(model, queries, budget, kind):
  """One conversation served alone, round by round, by DialogueBatch (the engine shapes of
  tests/test_inference.py)."""
  dialogues = DialogueBatch(Engine(model, batch_size=2, max_len=MAX_LEN), kind=kind, eot_id=EOT)
  return [dialogues.ask([q, None], max_new_tokens=budget).answers[0].tolist() for q in queries]


@pytest.mark.parametrize("kind", ["ism", "causal", "prefix"])
def test_conversations_joining_at_different_ticks_get_the_tokens_they_get_alone(model, full_argmax, kind):
  """Five conversations of different lengths on two slots (three wait, evictions follow), three decode
  steps per call so answers stop inside calls: every answer equals the conversation served alone and the
  greedy argmax of a full forward pass over the whole dialogue (under ``prefix``: of its last answer, the
  one that pass computes)."""
  queries, budgets = _scenario(1)
  scheduler = Scheduler(Engine(model, batch_size=SLOTS, max_len=MAX_LEN, decode_steps=3), kind=kind,
                        eot_id=EOT)
  answers, dialogues, _ = _drive(scheduler, queries, budgets, starts=[0, 1, 4, 8, 16])
  for i, (tokens, types) in enumerate(dialogues):
    assert answers[i] == _alone(model, queries[i], budgets[i], kind)
    predicted = full_argmax(tokens, types, kind)
    generated = sorted(set(np.flatnonzero(types == A).tolist()) - _glue_positions(answers[i], queries[i]))
    if kind == "prefix":  # the pass over the whole dialogue joins earlier answers to the prefix block
      generated = generated[-len(answers[i][-1]):]
    np.testing.assert_array_equal(tokens[generated], predicted[np.asarray(generated) - 1])
  assert scheduler.stats["evictions"] >= 1 and scheduler.resident() <= SLOTS
  if kind == "prefix":
    assert scheduler.stats["cached_tokens"] == 0
  else:  # later rounds prefilled only their new tokens (evicted conversations restarted)
    assert scheduler.stats["cached_tokens"] > 0


def _glue_positions(answers, queries):
  """Positions of the end-of-turn tokens appended after budget-cut answers (not predicted by the model)."""
  positions, at = set(), 0
  for answer, query in zip(answers, queries):
    at += query.size + len(answer)
    if answer[-1] != EOT:
      positions.add(at)
      at += 1
  return positions


def test_joining_and_leaving_compiles_nothing_new(model):
  """A second run of the same traffic shapes (other tokens) traces no step: joins, leaves, sub-pool
  prefills and the join of rows into the decode state reuse their programs."""
  queries, budgets = _scenario(2)
  scheduler = Scheduler(Engine(model, batch_size=SLOTS, max_len=MAX_LEN, decode_steps=3), eot_id=EOT)
  _drive(scheduler, queries, budgets, starts=[0, 1, 4, 8, 16])
  compiled = steps_lib.compiled_counts()
  other = [[np.where(q > 30, q - 1, q + 1) for q in conversation] for conversation in queries]
  with compile_events() as events:
    _drive(Scheduler(Engine(model, batch_size=SLOTS, max_len=MAX_LEN, decode_steps=3), eot_id=EOT), other,
           budgets, starts=[0, 1, 4, 8, 16])
  for name in ("_prefill_step", "_prefill_rows_step", "_decode_steps", "_join_rows"):
    assert events.traces(name) == 0, name
  assert steps_lib.compiled_counts() == compiled


def test_regenerating_the_last_answer_reuses_the_earlier_rounds(model):
  """A client that sends round 2's query again (its cached answer discarded) reuses round 1 from the cache
  (a round-boundary prefix), and gets the same answer again."""
  queries, budgets = _scenario(3, conversations=1, rounds=2)
  scheduler = Scheduler(Engine(model, batch_size=SLOTS, max_len=MAX_LEN, decode_steps=3), eot_id=EOT)
  answers, [(tokens, types)], _ = _drive(scheduler, queries, budgets)
  round_2 = queries[0][0].size + len(answers[0][0]) + (answers[0][0][-1] != EOT)  # round 2 starts here
  end = round_2 + queries[0][1].size
  rid = scheduler.submit(Request(tokens[:end], types[:end], max_new_tokens=budgets[0]))
  events = scheduler.run()
  assert events[0].cached_tokens == round_2 and events[0].prompt_tokens == end
  assert sum((e.tokens for e in events), []) == answers[0][1]
  assert {e.request_id for e in events} == {rid} and scheduler.resident() == 1
  q, a = Q, A
  assert reusable_prefix([5, 6, 7, 8], [q, a, q, a], [5, 6, 7, 8], [q, a, q, a]) == 2  # one new token needed
  assert reusable_prefix([5, 6], [q, a], [5, 7, 9], [q, a, q]) == 0


def test_cancelled_requests_free_their_slot_and_spare_the_others(model):
  """Cancelling a waiting and a running request (a client gone) leaves the other conversations' answers
  exact, and frees the slot."""
  queries, budgets = _scenario(4, conversations=5, rounds=2)
  budgets = [7, 7, 7, 7, 7]
  scheduler = Scheduler(Engine(model, batch_size=SLOTS, max_len=MAX_LEN, decode_steps=3), eot_id=EOT)
  cancelled = []

  def cancel(tick, owner):
    if tick == 2:  # conversation 1 is decoding, conversation 4 waits for a slot (0 and 1 hold both)
      for rid, (i, _) in owner.items():
        if i in (1, 4):
          cancelled.extend(scheduler.cancel(rid))

  answers, _, _ = _drive(scheduler, queries, budgets, starts=[0, 0, 0, 0, 1], on_tick=cancel)
  assert [e.stop_reason for e in cancelled] == ["cancelled", "cancelled"]
  assert len(answers[1]) < 2 and answers[4] == []
  for i in (0, 2, 3):
    assert answers[i] == _alone(model, queries[i], budgets[i], "ism")
  assert scheduler.resident() <= SLOTS and scheduler.idle


def test_requests_are_checked(model):
  scheduler = Scheduler(Engine(model, batch_size=SLOTS, max_len=MAX_LEN), eot_id=EOT)
  with pytest.raises(PromptTooLongError, match=r"127 tokens .* 129 > max_len=128"):
    scheduler.submit(Request(np.full(127, 9), np.full(127, Q)))
  with pytest.raises(ValueError, match="end with the query block"):
    scheduler.submit(Request(np.full(4, 9), np.full(4, A)))
  with pytest.raises(ValueError, match="kind must be one of"):
    Scheduler(scheduler.engine, kind="bidirectional")
  assert scheduler.idle and scheduler.step() == []
