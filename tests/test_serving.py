"""serve.py with the official openai client on localhost: completions streamed and not, conversations that
continue from their cached prefix and equal ChatSession and a full forward pass, OpenAI-style errors, a
client that disconnects mid-stream, and a bounded load test. One server (a tiny model from a training
workdir, four slots) for the whole module."""

import concurrent.futures
import functools
import json
import socket
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import openai
import pytest

import serve
from ism_jax import SegmentType
from ism_jax.inference import ChatSession
from ism_jax.inference import cache as cache_lib
from ism_jax.serving import BackgroundServer
from tests.tiny_chat import TEXTS, tiny_model, train_tokenizer, write_workdir

MAX_LEN = 128
MAX_NEW_TOKENS = 6
SLOTS = 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def model(tokenizer):
  return tiny_model(tokenizer.vocab_size)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model, tokenizer):
  """``python serve.py --workdir RUN`` with a KV budget of four conversations, on a free localhost port."""
  workdir = write_workdir(str(tmp_path_factory.mktemp("run") / "tiny-chat"), model, tokenizer, MAX_LEN)
  budget_mb = SLOTS * cache_lib.slot_bytes(model.config, MAX_LEN) / 2**20
  args = serve.build_parser().parse_args(["--workdir", workdir, "--kv_budget_mb", str(budget_mb),
                                          "--max_new_tokens", str(MAX_NEW_TOKENS)])
  app, worker = serve.build(args)
  with BackgroundServer(app) as http:
    http.worker, http.budget_bytes = worker, budget_mb * 2**20
    yield http
  worker.stop()


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _stats(server) -> dict:
  with urllib.request.urlopen(server.url + "/stats") as response:
    return json.loads(response.read())


def _ask(client, messages, **kwargs):
  return client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0, **kwargs)


def _session(model, tokenizer):
  return ChatSession(model, tokenizer, max_len=MAX_LEN, max_new_tokens=MAX_NEW_TOKENS)


def _streamed(client, messages):
  stream = _ask(client, messages, stream=True, stream_options={"include_usage": True})
  chunks = list(stream)
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage


def test_a_conversation_continues_from_its_cache_and_equals_chat_session(client, server, model, tokenizer):
  """Three rounds (plain, streamed, plain), each sending the whole conversation: the answers equal
  ChatSession's, later rounds prefill only the new tokens, and the cached dialogue is ChatSession's, whose
  answers are the argmax of a full forward pass."""
  assert [m.id for m in client.models.list().data] == ["tiny-chat"]
  session, messages, previous_total = _session(model, tokenizer), [], 0
  for k, text in enumerate(["hello there", "how are you today?", "tell me a story"]):
    messages.append({"role": "user", "content": text})
    before = _stats(server)
    if k == 1:
      answer, finish, usage = _streamed(client, messages)
    else:
      completion = _ask(client, messages)
      answer, finish, usage = (completion.choices[0].message.content, completion.choices[0].finish_reason,
                               completion.usage)
    assert answer == session.ask(text)
    assert finish == ("stop" if session.batch.last_round.stop_reasons[0] == "end_of_turn" else "length")
    prefilled = _stats(server)["prefill_tokens"] - before["prefill_tokens"]
    assert usage.prompt_tokens == len(session.tokens()) - len(session.batch.last_round.answers[0]) - (
        finish == "length")
    assert prefilled == usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens
    if k > 0:  # everything but the last answer token (and its end-of-turn glue) came from the cache
      assert usage.prompt_tokens_details.cached_tokens >= previous_total - 2
    previous_total = len(session.tokens())
    messages.append({"role": "assistant", "content": answer})
  tokens, types = server.worker.scheduler.cached_dialogues()[0]
  np.testing.assert_array_equal(tokens, session.tokens())
  _check_full_forward(model, tokens, types, tokenizer.eot_id)


def _check_full_forward(model, tokens, types, eot):
  """Every answer token the model produced is the argmax of one full forward pass at the position before."""
  logits = jax.jit(functools.partial(model, kind="ism"))(tokens[None], types[None])[0]
  predicted = np.asarray(logits.argmax(-1))
  answer = np.flatnonzero(types == SegmentType.ANSWER)
  glue = {p for p in answer if tokens[p] == eot and p - 1 in answer and predicted[p - 1] != eot}
  generated = np.array(sorted(set(answer.tolist()) - glue))
  np.testing.assert_array_equal(tokens[generated], predicted[generated - 1])


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, server, model, tokenizer):
  with pytest.raises(openai.NotFoundError) as error:
    client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
  assert error.value.code == "model_not_found" and "tiny-chat" in error.value.message
  cases = [
      ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], {}, "messages[1].role"),
      ([{"role": "user"}], {}, "messages[0]"),
      ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], {}, "messages"),
      ([{"role": "user", "content": "hi"}], {"stop": ["\n"]}, "stop"),
      ([{"role": "user", "content": "hi"}], {"temperature": 3}, "temperature"),
  ]
  for messages, options, param in cases:
    with pytest.raises(openai.BadRequestError) as error:
      client.chat.completions.create(model="tiny-chat", messages=messages, **options)
    assert error.value.param == param, (param, error.value.message)
  with pytest.raises(openai.BadRequestError) as error:
    _ask(client, [{"role": "user", "content": "tell me a story about a cat " * 30}])
  assert error.value.code == "context_length_exceeded" and "max_len=128" in error.value.message
  request = urllib.request.Request(server.url + "/v1/chat/completions", data=b"{not json", method="POST")
  with pytest.raises(urllib.error.HTTPError) as http_error:
    urllib.request.urlopen(request)
  assert http_error.value.code == 400 and "not valid JSON" in json.loads(http_error.value.read())["error"][
      "message"]
  assert _ask(client, [{"role": "user", "content": "hello"}]).choices[0].message.content == _session(
      model, tokenizer).ask("hello")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_request(client, server, model, tokenizer, stream):
  """The client closes the connection during a long answer (streamed: after its first event; not streamed:
  once the request runs): the request is cancelled at the next tick (ticks slowed down here so the answer
  cannot finish first); others go on."""
  scheduler = server.worker.scheduler
  step = scheduler.step
  scheduler.step = lambda: (time.sleep(0.02), step())[1]
  try:
    before = _stats(server)["cancelled"]
    body = json.dumps({"model": "tiny-chat", "stream": stream, "max_tokens": 100, "temperature": 0,
                       "messages": [{"role": "user", "content": "what time is it"}]}).encode()
    with socket.create_connection((server.host, server.port)) as conn:
      conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
      _wait_for(lambda: _stats(server)["in_flight"], server)
      received = b""
      while stream and b"data: " not in received:  # the headers, then the first event
        received += conn.recv(4096)
    _wait_for(lambda: _stats(server)["cancelled"] > before and not _stats(server)["in_flight"], server)
  finally:
    scheduler.step = step
  assert _ask(client, [{"role": "user", "content": "hello"}]).choices[0].message.content == _session(
      model, tokenizer).ask("hello")


def _wait_for(condition, server, seconds: float = 20.0) -> None:
  deadline = time.monotonic() + seconds
  while not condition():
    assert time.monotonic() < deadline, _stats(server)
    time.sleep(0.02)


def _client_conversation(client, texts):
  messages, answers = [], []
  for text in texts:
    messages.append({"role": "user", "content": text})
    answers.append(_ask(client, messages).choices[0].message.content)
    messages.append({"role": "assistant", "content": answers[-1]})
  return answers


def test_load_many_clients_every_request_answered_exactly_within_the_budget(client, server, model, tokenizer):
  """16 concurrent clients x 3 rounds on 4 slots (requests wait, conversations are evicted and restarted):
  every request is answered, each conversation equals ChatSession run alone (no cache corruption across
  conversations), and the cache never holds more conversations than the budget."""
  conversations = [[TEXTS[(i + k) % 7] + f" {i}" for k in range(3)] for i in range(16)]
  resident = []
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    futures = [pool.submit(_client_conversation, client, texts) for texts in conversations]
    while not all(f.done() for f in futures):
      resident.append(_stats(server)["resident"])
      time.sleep(0.01)
    answers = [f.result() for f in futures]
  for texts, got in zip(conversations, answers):
    session = _session(model, tokenizer)
    assert got == [session.ask(t) for t in texts]
  stats = _stats(server)
  assert max(resident) <= stats["slots"] == SLOTS and stats["in_flight"] == 0
  assert stats["cache_bytes"] <= server.budget_bytes and stats["evictions"] > 0


def test_budget_errors_name_the_fix():
  with pytest.raises(ValueError, match="holds no conversation: one takes 2.0 MiB"):
    serve.slots_for_budget(2 * 2**20, 1.0, None)
  assert serve.slots_for_budget(2**20, 10.0, 4) == 4
