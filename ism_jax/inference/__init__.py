"""Multi-turn inference with KV-cache reuse across rounds (ISM and causal) and the prefix baseline.

    from ism_jax.inference import ChatSession
    session = ChatSession.load("runs/default")
    session.ask("Hello!")

Layers, each usable alone (see docs/INFERENCE.md):

* :mod:`~ism_jax.inference.cache`: the preallocated KV cache, sharded like the model.
* :mod:`~ism_jax.inference.rewrites`: serving layouts of a trained model (unrolled layers, fused projections).
* :mod:`~ism_jax.inference.sampling`: greedy, temperature, top-k and top-p sampling.
* :mod:`~ism_jax.inference.steps`: the jitted prefill step and decode loop, with their named state.
* :mod:`~ism_jax.inference.engine`: :class:`Engine`, bucketed prefill and a fixed-shape decode step for a
  batch of rows.
* :mod:`~ism_jax.inference.dialogues`: :class:`DialogueBatch`, token-level dialogues under a mask kind.
* :mod:`~ism_jax.inference.session`: :class:`ChatSession` / :class:`ChatBatch`, text in, text out.
"""

from ism_jax.inference.dialogues import DialogueBatch, PromptTooLongError, RoundResult
from ism_jax.inference.engine import CacheFullError, Chunk, Engine, Generation, bucket_lengths
from ism_jax.inference.sampling import SamplingParams, sample

_SESSION_NAMES = ("ChatBatch", "ChatSession")


def __getattr__(name):
  # The chat classes need the tokenizer (sentencepiece); the engine alone does not, so import on first use.
  if name in _SESSION_NAMES:
    from ism_jax.inference import session  # pylint: disable=import-outside-toplevel
    return getattr(session, name)
  raise AttributeError(f"module 'ism_jax.inference' has no attribute {name!r}")


__all__ = [
    "CacheFullError",
    "ChatBatch",
    "ChatSession",
    "Chunk",
    "DialogueBatch",
    "Engine",
    "Generation",
    "PromptTooLongError",
    "RoundResult",
    "SamplingParams",
    "bucket_lengths",
    "sample",
]
