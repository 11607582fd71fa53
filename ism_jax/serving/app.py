"""The OpenAI-compatible HTTP API (FastAPI on uvicorn) in front of a :class:`~ism_jax.serving.worker.Worker`.

Routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` (``stream`` true or
false), and ``GET /stats`` (the scheduler's counters and the slot pool: not part of OpenAI's API). Errors
are OpenAI's ``{"error": {"message", "type", "param", "code"}}``. A client that goes away, streaming or not,
stops its request at the next scheduler tick and frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ism_jax.inference.scheduler import Event
from ism_jax.serving import openai_api
from ism_jax.serving.openai_api import APIError
from ism_jax.serving.worker import Handle, Worker


def _sse(payload: Any) -> str:
  return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _EventStream(StreamingResponse):
  """Server-sent events that cancel their request however the response ends (done, client gone, error)."""

  def __init__(self, content: AsyncIterator[str], on_close):
    super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    self._content, self._on_close = content, on_close

  async def __call__(self, scope, receive, send) -> None:
    try:
      await super().__call__(scope, receive, send)
    finally:
      self._on_close()
      await self._content.aclose()


class _Text:
  """Answer text as tokens arrive: deltas are sent only while the decoded text grows by whole characters."""

  def __init__(self, tokenizer):
    self.tokenizer, self.tokens, self.sent = tokenizer, [], ""

  def add(self, tokens: list[int], final: bool) -> str:
    self.tokens += tokens
    text = self.tokenizer.decode(self.tokens)
    if not text.startswith(self.sent) or (text.endswith("\ufffd") and not final):
      return ""  # a partial UTF-8 character, or a decoding that rewrote its start: wait
    delta, self.sent = text[len(self.sent):], text
    return delta


async def _stream(worker: Worker, handle: Handle, first: Event, model: str) -> AsyncIterator[str]:
  completion_id, text = openai_api.new_id(), _Text(worker.tokenizer)
  yield _sse(openai_api.chunk(completion_id, model, {"role": "assistant", "content": ""}))
  event, completion_tokens = first, 0
  while True:
    completion_tokens += len(event.tokens)
    delta = text.add(event.tokens, event.finished)
    if delta:
      yield _sse(openai_api.chunk(completion_id, model, {"content": delta}))
    if event.finished:
      break
    kind, event = await handle.results.get()
    if kind == "error":
      yield _sse(event.body())
      return
  reason = openai_api.FINISH_REASONS.get(event.stop_reason, "stop")
  yield _sse(openai_api.chunk(completion_id, model, {}, finish_reason=reason))
  if handle.chat.include_usage:
    usage = openai_api.usage(first.prompt_tokens, completion_tokens, first.cached_tokens)
    yield _sse(openai_api.chunk(completion_id, model, {}, usage_=usage))
  yield "data: [DONE]\n\n"


async def _complete(worker: Worker, handle: Handle, first: Event, model: str) -> dict[str, Any]:
  tokens, event = list(first.tokens), first
  while not event.finished:
    kind, event = await handle.results.get()
    if kind == "error":
      raise event
    tokens += event.tokens
  usage = openai_api.usage(first.prompt_tokens, len(tokens), first.cached_tokens)
  return openai_api.completion(openai_api.new_id(), model, worker.tokenizer.decode(tokens),
                               event.stop_reason, usage)


async def _disconnected(request: Request) -> None:
  """Returns when the client has gone (the body is read already, so the next message is the disconnect)."""
  while (await request.receive())["type"] != "http.disconnect":
    pass


async def _unless_gone(awaitable, gone: asyncio.Future):
  """``awaitable``'s result, or ``None`` if the client went away first (then ``awaitable`` is cancelled)."""
  task = asyncio.ensure_future(awaitable)
  await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
  if task.done():
    return task.result()
  task.cancel()
  return None


def _error_response(error: APIError) -> JSONResponse:
  return JSONResponse(error.body(), status_code=error.status)


def _gone_or_raise(worker: Worker, handle: Handle, started):
  """The client went away (``started`` is None: cancel its request) or the request failed (raise)."""
  if started is None:
    worker.cancel(handle)
    return JSONResponse({}, status_code=499)  # nobody reads it
  raise started[1]


def create_app(worker: Worker, model_name: str) -> FastAPI:
  """The ASGI app serving ``model_name`` through ``worker`` (started already)."""
  app = FastAPI(title="ism_jax", docs_url=None, redoc_url=None)
  created = int(time.time())
  model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "ism_jax"}

  @app.exception_handler(APIError)
  async def api_error(_, error: APIError):
    return _error_response(error)

  @app.exception_handler(HTTPException)
  async def http_error(_, error: HTTPException):
    return _error_response(APIError(error.status_code, str(error.detail), code=str(error.status_code)))

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [model_card]}

  @app.get("/v1/models/{model_id}")
  async def model(model_id: str):
    if model_id != model_name:
      raise APIError(404, f"The model '{model_id}' does not exist; this server serves '{model_name}'",
                     param="model", code="model_not_found")
    return model_card

  @app.get("/stats")
  async def stats():
    return worker.stats()

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    try:
      body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise APIError(400, f"the request body is not valid JSON: {e}") from None
    chat = openai_api.parse_chat_request(body, model_name)
    if worker.error is not None or not worker.alive:
      raise APIError(500, f"the serving worker has stopped: {worker.error!r}", type="server_error")
    handle = worker.submit(chat, asyncio.get_running_loop())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
      started = await _unless_gone(handle.results.get(), gone)
      if started is None or started[0] == "error":
        return _gone_or_raise(worker, handle, started)
      if chat.stream:  # the stream watches for the client itself
        return _EventStream(_stream(worker, handle, started[1], model_name), lambda: worker.cancel(handle))
      completion = await _unless_gone(_complete(worker, handle, started[1], model_name), gone)
      return completion if completion is not None else _gone_or_raise(worker, handle, None)
    except asyncio.CancelledError:
      worker.cancel(handle)
      raise
    finally:
      gone.cancel()

  return app


class BackgroundServer:
  """uvicorn serving ``app`` on a thread (tests, notebooks): ``with BackgroundServer(app) as server:``
  ``server.url`` is ``http://host:port`` (port 0 picks a free one)."""

  def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    import socket  # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel

    import uvicorn  # pylint: disable=import-outside-toplevel
    self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self._socket.bind((host, port))
    self.host, self.port = self._socket.getsockname()[:2]
    self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                    name="ism-serving-http", daemon=True)

  @property
  def url(self) -> str:
    return f"http://{self.host}:{self.port}"

  def __enter__(self) -> "BackgroundServer":
    self._thread.start()
    deadline = time.monotonic() + 30
    while not self._server.started:
      if time.monotonic() > deadline or not self._thread.is_alive():
        raise RuntimeError(f"the HTTP server did not start on {self.url}")
      time.sleep(0.01)
    return self

  def __exit__(self, *exc) -> None:
    self._server.should_exit = True
    self._thread.join(10)
    self._socket.close()
