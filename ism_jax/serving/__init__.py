"""An OpenAI-compatible chat server over the continuous-batching scheduler (see docs/INFERENCE.md).

    python serve.py --workdir runs/default --kv_budget_mb 512 --port 8000

* :mod:`~ism_jax.serving.openai_api`: request checking, OpenAI-style errors, responses and stream chunks.
* :mod:`~ism_jax.serving.worker`: :class:`Worker`, the thread that owns the device: it tokenizes each
  conversation (keeping the tokens the model generated) and runs the
  :class:`~ism_jax.inference.scheduler.Scheduler`.
* :mod:`~ism_jax.serving.app`: the FastAPI app (:func:`create_app`) and :class:`BackgroundServer`.
"""

from ism_jax.serving.app import BackgroundServer, create_app
from ism_jax.serving.openai_api import APIError, ChatRequest, parse_chat_request
from ism_jax.serving.worker import Worker, encode_conversation

__all__ = ["APIError", "BackgroundServer", "ChatRequest", "Worker", "create_app", "encode_conversation",
           "parse_chat_request"]
