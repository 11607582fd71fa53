"""The jitted train, eval, prefill and decode steps lower for TPU v5e and v6e from this CPU host.

``jax.export`` with ``platforms=("tpu",)`` inside ``jax.sharding.use_abstract_mesh`` of an ``AbstractMesh``
of TPU ``AbstractDevice``s lowers every step to StableHLO with the Pallas kernels compiled to Mosaic (the
``tpu_custom_call`` ops carry each kernel's name). Nothing runs: this catches block-shape and lowering errors
of the kernels and of the sharded steps around them without a TPU. Also the notebook's TPU path
(notebooks/ism_colab_tpu.ipynb, its config cell run with a TPU backend reported).
"""

from __future__ import annotations

import collections
import json
import os
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from ism_jax import ModelConfig, Transformer, sharding
from ism_jax.attention import key_window, pallas_tpu
from ism_jax.inference import cache as cache_lib
from ism_jax.inference import engine as engine_lib
from ism_jax.inference import rewrites, steps
from ism_jax.training import config as config_lib
from ism_jax.training import loop
from ism_jax.training import train_step as ts
from ism_jax.training.optimizer import make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "ism_colab_tpu.ipynb")
TPU_KINDS = {"v5e": "TPU v5 lite", "v6e": "TPU v6 lite"}
TRAIN_KERNELS = {"ism_forward", "ism_dq", "ism_dkv"}


def tpu_mesh(device_kind: str, data: int = 1, fsdp: int = 1, tensor: int = 1) -> AbstractMesh:
  device = AbstractDevice(device_kind=device_kind, num_cores=None, platform="tpu")
  return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                      abstract_device=device)


def kernels(exported: jax.export.Exported) -> collections.Counter:
  """Names of the Mosaic kernels (``tpu_custom_call``) in a lowered module, with their counts."""
  assert exported.platforms == ("tpu",)
  text = exported.mlir_module()
  assert text.count("stablehlo.custom_call @tpu_custom_call") == len(re.findall(r'kernel_name = "', text))
  return collections.Counter(re.findall(r'kernel_name = "([^"]+)"', text))


def lower_training(model_config: ModelConfig, mesh: AbstractMesh, rows: int, seq_len: int):
  """``(train_step, eval_step)`` exported for ``mesh``'s TPU, batch ``[rows, seq_len]``."""
  optimizer, _ = make_optimizer(1e-3, total_steps=10)
  with jax.sharding.use_abstract_mesh(mesh):
    graphdef, abstract_params, param_shardings = ts.abstract_model(model_config, mesh)
    shardings = ts.train_state_shardings(optimizer, abstract_params, param_shardings, mesh)
    state = ts.abstract_train_state(optimizer, abstract_params, shardings)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {key: jax.ShapeDtypeStruct((rows, seq_len), jnp.int32, sharding=batch_sharding)
             for key in ts.EVAL_KEYS}
    step = ts.jit_train_step(ts.make_train_step(graphdef, optimizer, model_config.mask), shardings, mesh)
    train = jax.export.export(step, platforms=("tpu",))(state, {k: batch[k] for k in ts.MODEL_KEYS})
    eval_step = ts.jit_eval_step(ts.make_eval_step(graphdef, num_rounds=8), param_shardings, mesh)
    evaluation = jax.export.export(eval_step, platforms=("tpu",))(state.params, batch)
  return train, evaluation


def _served(model_config: ModelConfig) -> tuple[list, steps.ModelStructure, ModelConfig]:
  """The model as the engine serves it (layers unrolled, projections fused, matrices in the compute dtype):
  its parameter leaves as ``ShapeDtypeStruct``s, its :class:`~ism_jax.inference.steps.ModelStructure` and
  its config."""
  model = rewrites.fuse_projections(rewrites.unstack_layers(Transformer(model_config, rngs=nnx.Rngs(0))))
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  dtype = jnp.dtype(model.config.dtype)
  cast = lambda x: dtype if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
  return ([jax.ShapeDtypeStruct(x.shape, cast(x)) for x in leaves],
          steps.ModelStructure(graphdef, treedef), model.config)


def lower_inference(model_config: ModelConfig, mesh: AbstractMesh, batch: int, max_len: int, chunk: int):
  """The engine's programs (:mod:`ism_jax.inference.steps`) exported for ``mesh``'s TPU (one device):
  ``{name: Exported}`` for a first-round prefill (``W = T``), a later round's prefill of ``chunk`` tokens
  whose rows reach the end of a ``max_len`` cache (``W`` from :func:`ism_jax.attention.key_window`, as the
  engine picks it), and one call of ``engine.DEFAULT_DECODE_STEPS`` decode steps, batch ``batch``."""
  leaves, structure, served = _served(model_config)
  cache = jax.eval_shape(lambda: cache_lib.init_cache(served, batch, max_len))
  key = jax.eval_shape(lambda: jax.random.key(0))
  int_B = jax.ShapeDtypeStruct((batch,), jnp.int32)
  padded = next(b for b in engine_lib.bucket_lengths(max_len) if b >= chunk)
  buckets = [b for b in engine_lib.bucket_lengths(max_len) if b >= padded]
  cached_window = key_window(model_config.attention_impl, buckets[-1], max_len)
  out = {}
  with jax.sharding.use_abstract_mesh(mesh):
    for name, window, from_start in (("prefill_first", padded, True),
                                      ("prefill_cached", cached_window, False)):
      packed = jax.ShapeDtypeStruct((batch, 2 * padded + 2), jnp.int32)
      out[name] = jax.export.export(steps.prefill, platforms=("tpu",))(
          leaves, cache, packed, key, None, structure=structure, window=window, from_start=from_start,
          all_greedy=True)
    state = steps.DecodeState(int_B, int_B, int_B, jax.ShapeDtypeStruct((batch,), jnp.bool_))
    out["decode"] = jax.export.export(steps.decode, platforms=("tpu",))(
        leaves, cache, state, key, None, jax.ShapeDtypeStruct((), jnp.int32), structure=structure,
        steps=engine_lib.DEFAULT_DECODE_STEPS, all_greedy=True, keep_logits=False)
  return out


# GQA 8/4 heads of 128 (a whole lane tile), two unrolled layers.
SMALL = ModelConfig(vocab_size=512, embed_dim=256, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=128,
                    mlp_dim=512, compute_dtype="bfloat16", attention_impl="pallas_tpu")


@pytest.mark.parametrize("chip", sorted(TPU_KINDS))
def test_train_and_eval_steps_lower_with_the_pallas_kernels(chip):
  """A 4-chip slice, data 2 x tensor 2 (the kernels run per device under shard_map), 1024 tokens a row."""
  train, evaluation = lower_training(SMALL, tpu_mesh(TPU_KINDS[chip], data=2, tensor=2), rows=8, seq_len=1024)
  assert train.nr_devices == evaluation.nr_devices == 4
  assert kernels(train) == {name: SMALL.num_layers for name in TRAIN_KERNELS}
  assert kernels(evaluation) == {"ism_forward": SMALL.num_layers}


def test_tpu_tiles_follow_the_device_kind_and_the_sequence():
  """Default tiles by chip (chosen from published guidance, not run on hardware), clamped to short rows."""
  for chip, (block_q, block_kv) in {"v5e": (512, 1024), "v6e": (1024, 1024)}.items():
    with jax.sharding.use_abstract_mesh(tpu_mesh(TPU_KINDS[chip])):
      assert pallas_tpu.device_kind() == TPU_KINDS[chip]
      tuning = pallas_tpu.default_tuning(8192)
    assert (tuning.block_q, tuning.block_kv, tuning.dq_block_q, tuning.dq_block_kv) == (block_q, block_kv) * 2
    assert (tuning.dkv_block_kv, tuning.dkv_block_q) == (block_q, block_kv)
    assert pallas_tpu.default_tuning(1000, TPU_KINDS[chip]).block_kv == 512  # clamped: rows of 1000 tokens
    assert pallas_tpu.default_tuning(100, TPU_KINDS[chip]) == pallas_tpu.TpuTuning(*(128,) * 6)
  assert pallas_tpu.default_tuning(8192, "cpu") == pallas_tpu.TpuTuning()  # other kinds: 512 x 512


@pytest.mark.parametrize("chip", sorted(TPU_KINDS))
def test_prefill_and_decode_lower_with_the_pallas_kernels(chip):
  """Cached prefill and decode run the forward-only kernel, not dense XLA; a first round the training
  kernel's forward."""
  lowered = lower_inference(SMALL, tpu_mesh(TPU_KINDS[chip]), batch=2, max_len=2048, chunk=256)
  assert kernels(lowered["prefill_first"]) == {"ism_forward": SMALL.num_layers}
  assert kernels(lowered["prefill_cached"]) == {"ism_forward_only": SMALL.num_layers}
  assert kernels(lowered["decode"]) == {"ism_forward_only": SMALL.num_layers}


def notebook_tpu_config(monkeypatch):
  """The run config and chat cache length the notebook uses on a TPU runtime (not TINY).

  The notebook's config cell runs with ``jax.default_backend()`` reporting ``"tpu"`` and ``train``
  replaced by a function that records the config; ``MAX_LEN`` is read from the chat cell.
  """
  with open(NOTEBOOK, encoding="utf-8") as f:
    cells = ["".join(c["source"]) for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  config_cell = [c for c in cells if "summary = train(config, WORKDIR)" in c]
  max_len_lines = [line for c in cells for line in c.splitlines() if line.startswith("MAX_LEN = ")]
  assert len(config_cell) == 1 and len(max_len_lines) == 1, "the notebook's config or chat cell changed"
  captured = {}
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  monkeypatch.setattr(loop, "train", lambda config, workdir: captured.setdefault("config", config))
  namespace = {"os": os, "jax": jax, "REPO_DIR": REPO, "DATA_DIR": "unused", "WORKDIR": "unused",
               "TINY": False}
  exec(config_cell[0], namespace)  # pylint: disable=exec-used
  exec(max_len_lines[0], namespace)  # pylint: disable=exec-used
  config = captured["config"]
  config_lib.validate(config)
  return config, namespace["MAX_LEN"]


def test_notebook_tpu_path_lowers_with_the_pallas_kernels(monkeypatch):
  """The notebook's TPU run on its Colab chip, one v5e: its model with attention "auto" resolved on a TPU
  backend, its batch and sequence length, and its chat programs at its MAX_LEN (v6e: the tests above)."""
  config, max_len = notebook_tpu_config(monkeypatch)
  model_config = config_lib.model_config(config)
  assert model_config.attention_impl == "auto" and model_config.compute_dtype == "bfloat16"
  mesh = tpu_mesh(TPU_KINDS["v5e"])
  train, evaluation = lower_training(model_config, mesh, config.training.global_batch_size,
                                     config.data.seq_len)
  layers = 1 if model_config.scan_layers else model_config.num_layers
  assert kernels(train) == {name: layers for name in TRAIN_KERNELS}
  assert kernels(evaluation) == {"ism_forward": layers}
  lowered = lower_inference(model_config, mesh, batch=1, max_len=max_len, chunk=64)
  assert kernels(lowered["prefill_first"]) == {"ism_forward": model_config.num_layers}
  assert kernels(lowered["prefill_cached"]) == {"ism_forward_only": model_config.num_layers}
  assert kernels(lowered["decode"]) == {"ism_forward_only": model_config.num_layers}
