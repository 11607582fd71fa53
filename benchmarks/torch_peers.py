"""PyTorch peers of the attention benchmark: cuDNN SDPA causal and FlexAttention with the ISM block mask.

torch is optional: :func:`import_torch` returns ``(None, reason)`` where it is absent, and the benchmarks
print a note row instead. The ISM mask is given to FlexAttention as a ``mask_mod`` over two per-token
arrays built here with numpy from the segment arrays of docs/DESIGN.md §2, independently of
``ism_jax.masks``: the dialogue id and a block counter that steps at every answer token and at the first
token of every query block. Key ``i`` is visible to query ``j`` iff both are real tokens of one dialogue
and ``block(i) <= block(j)``; a padding token sees only itself. :func:`check_flex_ism` compares that mask
and FlexAttention's output with the project's dense oracle (``ism_jax.masks.make_attention_mask``).

Layout: torch tensors are ``[B, H, T, D]`` (the JAX rows use ``[B, T, H, D]``); query head ``h`` uses KV head
``h // (H / K)``, as in ``ism_jax.attention``.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

PAD, QUERY, ANSWER = 0, 1, 2


def import_torch():
  """``(torch, "")``, or ``(None, why)`` when torch is not installed."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    return None, f"torch not installed ({error})"
  return torch, ""


def cuda_note(torch) -> str:
  """Why the torch rows cannot be timed here ("" when they can)."""
  if torch is None:
    return "torch not installed"
  return "" if torch.cuda.is_available() else "torch has no CUDA device"


def block_counter(segment_types: np.ndarray, segment_ids: np.ndarray | None = None):
  """``(dialogue, block)`` int32 ``[B, T]``: the dialogue id (0 = padding) and the ISM block counter.

  The counter steps at every answer token and at the first token of every query block (a run of QUERY
  tokens inside one dialogue); padding gets dialogue 0.
  """
  types = np.asarray(segment_types, np.int32)
  ids = (types != PAD).astype(np.int32) if segment_ids is None else np.asarray(segment_ids, np.int32)
  prev_types = np.concatenate([np.full_like(types[:, :1], -1), types[:, :-1]], axis=1)
  prev_ids = np.concatenate([np.full_like(ids[:, :1], -1), ids[:, :-1]], axis=1)
  opens = (types == ANSWER) | ((types == QUERY) & ((prev_types != QUERY) | (prev_ids != ids)))
  block = np.cumsum(opens, axis=1).astype(np.int32)
  return np.where(types == PAD, 0, ids).astype(np.int32), block


def ism_mask_mod(dialogue, block):
  """FlexAttention ``mask_mod(b, h, q, kv)`` over ``[B, T]`` int tensors from :func:`block_counter`."""

  def mask_mod(b, h, q_idx, kv_idx):
    del h
    same = dialogue[b, q_idx] == dialogue[b, kv_idx]
    earlier = block[b, kv_idx] <= block[b, q_idx]
    return (same & earlier & (dialogue[b, q_idx] != 0)) | (q_idx == kv_idx)

  return mask_mod


def ism_block_mask(torch, segment_types, segment_ids, device):
  """The FlexAttention ``BlockMask`` of the ISM mask for ``[B, T]`` segment arrays."""
  from torch.nn.attention.flex_attention import create_block_mask  # pylint: disable=import-outside-toplevel
  dialogue, block = block_counter(segment_types, segment_ids)
  dialogue = torch.as_tensor(dialogue, device=device)
  block = torch.as_tensor(block, device=device)
  batch, length = dialogue.shape
  return create_block_mask(ism_mask_mod(dialogue, block), batch, None, length, length, device=device,
                           _compile=torch.device(device).type != "cpu")


def dense_mask_from_mask_mod(torch, segment_types, segment_ids) -> np.ndarray:
  """``[B, T, T]`` bool: :func:`ism_mask_mod` evaluated at every (query, key) pair (for the check)."""
  dialogue, block = (torch.as_tensor(x) for x in block_counter(segment_types, segment_ids))
  batch, length = dialogue.shape
  b = torch.arange(batch)[:, None, None]
  q = torch.arange(length)[None, :, None]
  kv = torch.arange(length)[None, None, :]
  return ism_mask_mod(dialogue, block)(b, None, q, kv).numpy()


def dense_reference(torch, q, k, v, mask_BTS):
  """Masked softmax attention in float32 from a dense ``[B, T, S]`` bool mask; ``[B, H, T, D]`` layout."""
  group = q.shape[1] // k.shape[1]
  k, v = k.repeat_interleave(group, dim=1).float(), v.repeat_interleave(group, dim=1).float()
  scores = torch.einsum("bhtd,bhsd->bhts", q.float(), k) * q.shape[-1] ** -0.5
  scores = scores.masked_fill(~torch.as_tensor(np.array(mask_BTS, bool))[:, None], float("-inf"))
  return torch.einsum("bhts,bhsd->bhtd", torch.softmax(scores, dim=-1), v)


def flex_ism_attention(torch, compiled: bool):
  """``attend(q, k, v, block_mask)`` with FlexAttention (``torch.compile``d when ``compiled``)."""
  from torch.nn.attention.flex_attention import flex_attention  # pylint: disable=import-outside-toplevel
  # One compilation per shape, layout (mask_mod closure) and grad mode: more than dynamo's default limit of
  # 8 recompilations of one function, past which it would silently run the unfused eager path.
  dynamo = torch._dynamo.config  # pylint: disable=protected-access
  for name in ("recompile_limit", "cache_size_limit"):
    if hasattr(dynamo, name):
      setattr(dynamo, name, max(getattr(dynamo, name), 64))
  flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

  def attend(q, k, v, block_mask):
    return flex(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])

  return attend


# Dialogues of the check layout: (segment type, length) runs; each row is padded to 256 tokens.
CHECK_ROWS = (
    (((QUERY, 20), (ANSWER, 30), (QUERY, 100), (ANSWER, 10)), ((ANSWER, 15), (QUERY, 1), (ANSWER, 20))),
    (((QUERY, 1), (ANSWER, 5), (QUERY, 40), (ANSWER, 90)), ((QUERY, 50), (ANSWER, 30), (QUERY, 20),
                                                            (ANSWER, 20))),
)


def check_layout(length: int = 256):
  """``(segment_types, segment_ids)`` ``[2, length]`` of :data:`CHECK_ROWS`: packed dialogues whose blocks
  straddle the 128-token mask blocks, a dialogue that starts with an answer, a one-token query block, and
  padding (60 tokens at the end of row 0)."""
  types = np.zeros((len(CHECK_ROWS), length), np.int32)
  ids = np.zeros((len(CHECK_ROWS), length), np.int32)
  for row, dialogues in enumerate(CHECK_ROWS):
    cursor = 0
    for dialogue, runs in enumerate(dialogues, start=1):
      for kind, size in runs:
        types[row, cursor:cursor + size] = kind
        ids[row, cursor:cursor + size] = dialogue
        cursor += size
  return types, ids


def check_flex_ism(torch, oracle_mask: np.ndarray, segment_types, segment_ids, device: str = "cpu",
                   heads: int = 4, kv_heads: int = 2, dim: int = 32) -> float:
  """Checks the ISM ``mask_mod`` and FlexAttention against the dense oracle mask ``[B, T, T]``.

  The mask must equal the oracle at every pair; FlexAttention's float32 output (compiled on a GPU, eager
  on CPU) must match :func:`dense_reference` on the oracle mask (to 1e-4 on CPU, 5e-3 on a GPU, where
  float32 matmuls may run in TF32). Returns the largest absolute difference;
  raises ``AssertionError`` naming the first differing pair or the error.
  """
  mine = dense_mask_from_mask_mod(torch, segment_types, segment_ids)
  if not np.array_equal(mine, oracle_mask):
    b, q, kv = (int(i) for i in np.argwhere(mine != oracle_mask)[0])
    raise AssertionError(f"the ISM mask_mod differs from the oracle at row {b}, query {q}, key {kv}: "
                         f"mask_mod {bool(mine[b, q, kv])}, oracle {bool(oracle_mask[b, q, kv])}")
  batch, length = np.asarray(segment_types).shape
  gen = torch.Generator().manual_seed(0)
  q = torch.randn(batch, heads, length, dim, generator=gen).to(device)
  k, v = (torch.randn(batch, kv_heads, length, dim, generator=gen).to(device) for _ in range(2))
  block_mask = ism_block_mask(torch, segment_types, segment_ids, device)
  out = flex_ism_attention(torch, compiled=device != "cpu")(q, k, v, block_mask)
  expected = dense_reference(torch, q.cpu(), k.cpu(), v.cpu(), oracle_mask)
  error = float((out.float().cpu() - expected).abs().max())
  tolerance = 1e-4 if device == "cpu" else 5e-3  # a GPU may run float32 matmuls in TF32; a mask error is O(1)
  if not error < tolerance:
    raise AssertionError(f"FlexAttention with the ISM block mask differs from the dense oracle by {error:.3g}"
                         " (largest absolute difference)")
  return error


def sdpa_cudnn_causal(torch):
  """``attend(q, k, v, _)``: ``scaled_dot_product_attention(is_causal=True)`` on the cuDNN backend only."""
  from torch.nn.attention import SDPBackend, sdpa_kernel  # pylint: disable=import-outside-toplevel
  sdpa = torch.nn.functional.scaled_dot_product_attention

  def attend(q, k, v, _):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
      return sdpa(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])

  return attend


def median_seconds(torch, fn, reps: int, warmup: int = 2) -> float:
  """Median wall time of ``fn()`` in seconds, each run awaited (``torch.cuda.synchronize``)."""
  for _ in range(warmup):
    fn()
  torch.cuda.synchronize()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
  return statistics.median(times)
