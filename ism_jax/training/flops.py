"""Model FLOPs of a train step and model FLOPs utilisation (MFU).

Convention (also in docs/TRAINING.md): a train step costs 3× its forward pass (forward + backward, which
needs two matmuls per forward matmul). Counted are

* matmul FLOPs: ``6 · P_matmul`` per real (non-padding) token, where ``P_matmul`` is the parameter count of
  every matmul: q, k, v, o projections, the three SwiGLU matrices of every layer, and the output projection
  (the embedding lookup is a gather and not counted; with tied embeddings the table counts once, as the
  output projection);
* attention FLOPs of the *allowed* pairs only: ``12 · L · H · Dh`` per (query, key) pair the mask allows
  (``q·k`` and ``p·v``, 2 FLOPs per multiply-add each, times 3 for training), with pairs counted exactly
  from the batch's mask ranges. Masked-out pairs, padding, norms, softmax, RoPE and rematerialised recompute
  are not counted.

MFU = counted FLOPs per second / (devices × peak dense bf16 FLOP/s per device).
"""

from __future__ import annotations

from ism_jax.model import ModelConfig

# Peak dense bf16 TFLOP/s per device by device-kind substring (first match wins).
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("H800", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L4", 121.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0),
    ("TPU v6e", 918.0),
    ("TPU v4", 275.0),
)


def matmul_params(config: ModelConfig) -> int:
  """Parameters that take part in a matmul per token (see the module docstring)."""
  d, h, k, hd, m = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim, config.mlp_dim
  per_layer = d * hd * (2 * h + 2 * k) + 3 * d * m
  return config.num_layers * per_layer + d * config.vocab_size


def train_flops(config: ModelConfig, tokens: float, attention_pairs: float) -> float:
  """Counted FLOPs of one train step over ``tokens`` real tokens and ``attention_pairs`` allowed pairs."""
  attention_per_pair = 12 * config.num_layers * config.num_heads * config.head_dim
  return 6.0 * matmul_params(config) * tokens + attention_per_pair * attention_pairs


def peak_flops_per_device(device_kind: str, override_tflops: float = 0.0) -> float | None:
  """Peak FLOP/s of one device: the override if positive, else the table; ``None`` when unknown (CPU)."""
  if override_tflops > 0:
    return override_tflops * 1e12
  for name, tflops in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops * 1e12
  return None


def mfu(flops: float, seconds: float, num_devices: int, peak_per_device: float | None) -> float | None:
  """Model FLOPs utilisation in [0, 1], or ``None`` without a known peak."""
  if peak_per_device is None or seconds <= 0:
    return None
  return flops / seconds / (num_devices * peak_per_device)
