"""The Hugging Face + FlexAttention peer of the train-step benchmark (``benchmarks/train_step.py``).

A ``transformers.LlamaForCausalLM`` with the shapes of the run config's ``ModelConfig`` (same parameter
count), ``attn_implementation="flex_attention"`` given the ISM ``BlockMask`` of each batch (built from the
same segment arrays as the JAX rows, ``benchmarks/torch_peers.py``), ``position_ids`` restarting in every
packed dialogue, labels only where the project's ``loss_mask`` puts a target; float32 weights under bf16
autocast, the model under ``torch.compile``, fused AdamW with the config's learning rate, betas, epsilon
and weight decay (on matrices only, as ``ism_jax.training.optimizer``; constant learning rate), gradient
clipping to ``optimizer.grad_clip_norm``. One step = forward, backward, clipping, AdamW, synchronised.

The per-batch ``BlockMask``s are built once before the timed steps; their ``mask_mod`` reads per-token
buffers that each step refills with its batch's arrays, so the compiled model sees one ``mask_mod`` and is
not recompiled per batch. On CPU (a smoke run at tiny shapes) nothing is compiled and attention is
``attn_implementation="sdpa"`` given the dense ``[B, 1, T, T]`` form of the same ``mask_mod`` (FlexAttention
has no backward pass on CPU).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from benchmarks import torch_peers

IGNORE = -100  # transformers' ignore_index


def llama_config(transformers, model_config, seq_len: int, attention: str = "flex_attention"):
  """A ``LlamaConfig`` with the architecture of an ``ism_jax.ModelConfig``; refuses what Llama lacks."""
  mc = model_config
  if mc.fused_projections:
    raise ValueError("model.fused_projections=True has no Llama equivalent; benchmark the unfused model")
  rope = {"rope_type": "default", "rope_theta": float(mc.rope_theta)}
  if mc.rope_scaling is not None:
    factor, low, high, original = mc.rope_scaling
    rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                original_max_position_embeddings=original)
  config = transformers.LlamaConfig(
      vocab_size=mc.vocab_size, hidden_size=mc.embed_dim, intermediate_size=mc.mlp_dim,
      num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_heads, num_key_value_heads=mc.num_kv_heads,
      head_dim=mc.head_dim, max_position_embeddings=seq_len, rms_norm_eps=mc.norm_eps,
      tie_word_embeddings=mc.tie_embeddings, attention_bias=mc.qkv_bias, mlp_bias=False, hidden_act="silu",
      initializer_range=mc.init_std, attention_dropout=0.0, rope_parameters=rope, use_cache=False)
  config._attn_implementation = attention  # pylint: disable=protected-access
  return config


def labels_from_loss_mask(tokens: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
  """Labels for transformers' shifted loss: ``labels[t + 1] = tokens[t + 1]`` where ``loss_mask[t]``."""
  labels = np.full_like(tokens, IGNORE)
  labels[:, 1:] = np.where(loss_mask[:, :-1] != 0, tokens[:, 1:], IGNORE)
  return labels


class IsmMasks:
  """Per-batch ISM ``BlockMask``s sharing one ``mask_mod`` over buffers that :meth:`select` refills."""

  def __init__(self, torch, batches, device):
    shape = batches[0]["segment_types"].shape
    self.dialogue = torch.zeros(shape, dtype=torch.int32, device=device)
    self.block = torch.zeros(shape, dtype=torch.int32, device=device)
    self.arrays = [tuple(torch.as_tensor(x, device=device) for x in torch_peers.block_counter(
        b["segment_types"], b["segment_ids"])) for b in batches]
    self.masks = []
    if torch.device(device).type == "cpu":  # the dense form for attn_implementation="sdpa"
      self.masks = [torch.as_tensor(torch_peers.dense_mask_from_mask_mod(
          torch, b["segment_types"], b["segment_ids"]))[:, None].to(device) for b in batches]
      return
    mask_mod = torch_peers.ism_mask_mod(self.dialogue, self.block)
    from torch.nn.attention.flex_attention import create_block_mask  # pylint: disable=import-outside-toplevel
    for i in range(len(batches)):
      self.select(i)
      self.masks.append(create_block_mask(mask_mod, shape[0], None, shape[1], shape[1], device=device,
                                          _compile=True))

  def select(self, i: int):
    """Fills the buffers with batch ``i``'s arrays; returns its ``BlockMask``."""
    self.dialogue.copy_(self.arrays[i][0])
    self.block.copy_(self.arrays[i][1])
    return self.masks[i] if len(self.masks) > i else None


def build(torch, transformers, model_config, optimizer_config, seq_len: int, device, compiled: bool):
  """``(model, call, optimizer)``: the float32 model on ``device``, its (compiled) forward and AdamW."""
  attention = "flex_attention" if compiled else "sdpa"
  with torch.device(device):
    model = transformers.LlamaForCausalLM(llama_config(transformers, model_config, seq_len, attention))
  model.train()
  call = torch.compile(model, dynamic=False) if compiled else model
  c = optimizer_config
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
  optimizer = torch.optim.AdamW(groups, lr=c.learning_rate, betas=(c.b1, c.b2), eps=c.eps,
                                fused=torch.device(device).type == "cuda")
  return model, call, optimizer


def device_batches(torch, batches, device) -> list[dict]:
  """The numpy batches as the model's inputs on ``device``: ``input_ids``, ``position_ids``, ``labels``."""
  out = []
  for b in batches:
    labels = labels_from_loss_mask(b["tokens"], b["loss_mask"])
    out.append({"input_ids": torch.as_tensor(b["tokens"], dtype=torch.long, device=device),
                "position_ids": torch.as_tensor(b["positions"], dtype=torch.long, device=device),
                "labels": torch.as_tensor(labels, dtype=torch.long, device=device)})
  return out


def loss(torch, call, inputs: dict, mask, autocast: bool = True):
  """The model's mean cross entropy over the labelled targets of one batch (bf16 autocast unless not)."""
  device_type = inputs["input_ids"].device.type
  with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
    return call(**inputs, attention_mask=mask, use_cache=False).loss


CPU_MAX_PARAMS = 50_000_000  # without a GPU the peer runs only configs this small (a smoke run)


def unavailable(model_config) -> str:
  """Why the peer cannot run here ("" when it can): torch or transformers missing, or no GPU for a model
  larger than :data:`CPU_MAX_PARAMS`."""
  torch, note = torch_peers.import_torch()
  if torch is None:
    return note
  try:
    import transformers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as error:
    return f"transformers not installed ({error})"
  if not torch.cuda.is_available() and model_config.num_params() > CPU_MAX_PARAMS:
    return f"no GPU for torch, and {model_config.num_params() / 1e9:.2f}B parameters are too many for a CPU"
  return ""


def run(config, model_config, batches, steps: int, warmup: int, device: str | None = None) -> dict:
  """Times the peer's train step on ``batches``; ``{"step_ms", "peak_memory_gib", "losses", "device"}``.

  ``device`` defaults to ``"cuda"`` when torch sees a GPU, else ``"cpu"`` (uncompiled).
  """
  torch, note = torch_peers.import_torch()
  if torch is None:
    raise ImportError(note)
  import transformers  # pylint: disable=import-outside-toplevel
  device = device or ("cuda" if torch.cuda.is_available() else "cpu")
  cuda = torch.device(device).type == "cuda"
  model, call, optimizer = build(torch, transformers, model_config, config.optimizer, config.data.seq_len,
                                 device, compiled=cuda)
  masks = IsmMasks(torch, batches, device)
  inputs = device_batches(torch, batches, device)
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  times, losses = [], []
  for i in range(warmup + steps):
    start = time.perf_counter()
    value = loss(torch, call, inputs[i % len(inputs)], masks.select(i % len(inputs)))
    value.backward()
    if config.optimizer.grad_clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip_norm, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    if i >= warmup:
      times.append(time.perf_counter() - start)
    losses.append(float(value.detach()))
  peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
  return {"step_ms": 1000 * statistics.median(times), "peak_memory_gib": peak, "losses": losses,
          "attention": model.config._attn_implementation,  # pylint: disable=protected-access
          "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
          "transformers": transformers.__version__, "num_params": sum(p.numel() for p in model.parameters())}
