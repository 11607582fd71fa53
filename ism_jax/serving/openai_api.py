"""The OpenAI chat-completions wire format: request checking, errors, responses and stream chunks.

Requests are checked here, by hand rather than by pydantic models, so that every refusal is an OpenAI-style
error naming the field (``messages[2].role``) and the fix, with OpenAI's status codes (404 for an unknown
model, 400 for the rest), instead of a framework's generic 422.
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from typing import Any

from ism_jax.data.dialogue import DataFormatError, Message, parse_openai_record, split_dialogue
from ism_jax.inference.sampling import SamplingParams

FINISH_REASONS = {"end_of_turn": "stop", "max_new_tokens": "length", "cache_full": "length"}
# Accepted and ignored: they change nothing a client relies on here (or default to doing nothing).
IGNORED_FIELDS = ("user", "seed", "metadata", "store", "service_tier", "parallel_tool_calls")
_PARAM = re.compile(r"messages\[\d+\](\.\w+)?")


class APIError(Exception):
  """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

  def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
               type: str = "invalid_request_error"):  # pylint: disable=redefined-builtin
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

  def body(self) -> dict[str, Any]:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class ChatRequest:
  """A checked ``POST /v1/chat/completions`` body.

  Attributes:
    messages: the whole conversation (earlier rounds with the assistant's answers, then the new query).
    max_tokens: the answer token budget, ``None`` for the server's default.
    sampling: temperature and top-p.
    stream: answer as server-sent events.
    include_usage: with ``stream``, a last chunk carries the token counts (``stream_options``).
  """

  messages: list[Message]
  max_tokens: int | None
  sampling: SamplingParams
  stream: bool
  include_usage: bool


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
  value = body.get(name, default)
  value = default if value is None else value
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise APIError(400, f"{name} must be a number, got {value!r}", param=name)
  if value > high or value < low or (low_open and value == low):
    bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
    raise APIError(400, f"{name}={value} must be in {bound}", param=name)
  return float(value)


def _max_tokens(body: dict) -> int | None:
  name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
  value = body.get(name)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise APIError(400, f"{name} must be a positive integer, got {value!r}", param=name)
  return value


def _unsupported(body: dict) -> None:
  """Refuses the options this server does not implement, saying what to do instead."""
  if body.get("n", 1) not in (1, None):
    raise APIError(400, f"n={body['n']!r}: this server returns one choice per request; send n requests",
                   param="n")
  if body.get("stop") not in (None, [], ""):
    raise APIError(400, "stop sequences are not supported: answers end on the model's end-of-turn token; "
                   "cut the text yourself or use max_tokens", param="stop")
  if body.get("logprobs") or body.get("tools") or body.get("functions"):
    name = "logprobs" if body.get("logprobs") else "tools" if body.get("tools") else "functions"
    raise APIError(400, f"{name} is not supported by this server; leave it out", param=name)


def _messages(body: dict) -> list[Message]:
  try:
    messages = parse_openai_record({"messages": body.get("messages")}, where="request")
  except DataFormatError as e:
    message = str(e).removeprefix("request: ")
    found = _PARAM.search(message)
    raise APIError(400, message, param=found.group(0) if found else "messages") from None
  if not split_dialogue(messages)[1]:
    raise APIError(400, "messages must end with a user, system or tool message (the query to answer); "
                   f"got {len(messages)} messages ending with "
                   f"{messages[-1].role if messages else 'nothing'}", param="messages")
  return messages


def parse_chat_request(body: Any, model_name: str) -> ChatRequest:
  """Checks a request body.

  Raises:
    APIError: 404 for another model than ``model_name``, 400 naming the field for anything malformed.
  """
  if not isinstance(body, dict):
    raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
  model = body.get("model")
  if not isinstance(model, str):
    raise APIError(400, "model is required: the id GET /v1/models lists", param="model")
  if model != model_name:
    raise APIError(404, f"The model '{model}' does not exist; this server serves '{model_name}' "
                   "(GET /v1/models)", param="model", code="model_not_found")
  _unsupported(body)
  messages = _messages(body)
  stream = body.get("stream") or False
  if not isinstance(stream, bool):
    raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream")
  options = body.get("stream_options") or {}
  if not isinstance(options, dict):
    raise APIError(400, "stream_options must be an object", param="stream_options")
  temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
  top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
  return ChatRequest(messages=messages, max_tokens=_max_tokens(body),
                     sampling=SamplingParams(temperature=temperature, top_p=top_p), stream=stream,
                     include_usage=bool(options.get("include_usage")))


def new_id() -> str:
  return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens,
          "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion(completion_id: str, model: str, text: str, stop_reason: str, usage_: dict) -> dict[str, Any]:
  """A ``chat.completion`` object."""
  return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
          "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                       "finish_reason": FINISH_REASONS.get(stop_reason, "stop"), "logprobs": None}],
          "usage": usage_}


def chunk(completion_id: str, model: str, delta: dict, finish_reason: str | None = None,
          usage_: dict | None = None) -> dict[str, Any]:
  """A ``chat.completion.chunk`` object (``usage_``: the final usage chunk, no choices)."""
  out = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
  if usage_ is not None:
    return {**out, "choices": [], "usage": usage_}
  return {**out, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
