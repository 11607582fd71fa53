"""Orbax checkpoints of a training run, the workdir layout, and loading a trained model for inference.

Workdir layout::

    WORKDIR/
      config.json              run config of the latest start (for reading; each checkpoint has its own)
      tokenizer.model          the run's ChatTokenizer, copied in atomically
      hf_tokenizer/            instead, the tokenizer files of a pretrained model (init_from)
      metrics.jsonl            one JSON object per logged step
      tensorboard/             TensorBoard event files
      checkpoints/<step>/      one Orbax checkpoint per saved step, items:
        params/                model parameters (pure dict of float32 arrays, as nnx.to_pure_dict)
        opt_state/             optimizer state
        data/                  the train iterator's state, one JSON file per host (grain)
        meta/                  JSON: step, run config, tokenizer sha256 and vocab size

Checkpoints are written by an async ``CheckpointManager`` that keeps the newest ``keep`` of them; a step is
visible only once fully written, so a run killed mid-write resumes from the previous one.

For inference::

    run_config, model, tokenizer_path = restore_for_inference("runs/default")
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from ism_jax.model import ModelConfig, Transformer
from ism_jax.training import config as config_lib

CHECKPOINT_DIR = "checkpoints"
TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_DIR = "hf_tokenizer"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                      "chat_template.jinja", "chat_template.json")
CONFIG_FILE = "config.json"
ITEMS = ("params", "opt_state", "data", "meta")


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit this run (tokenizer, vocabulary or model config differ)."""


# ----------------------------------------------------------------------------------------------------------
# Files of the workdir.
# ----------------------------------------------------------------------------------------------------------


def _tokenizer_files(path: str) -> list[str]:
  """The files that define a tokenizer: the ``.model`` file, or those of a Hugging Face directory."""
  if os.path.isfile(path):
    return [path]
  names = sorted(n for n in os.listdir(path) if n in HF_TOKENIZER_FILES)
  if not names:
    raise FileNotFoundError(f"no tokenizer files ({', '.join(HF_TOKENIZER_FILES)}) in {path}")
  return [os.path.join(path, n) for n in names]


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
  """``{"sha256": ..., "vocab_size": ...}`` of a tokenizer (ChatTokenizer file or Hugging Face directory)."""
  digest = hashlib.sha256()
  for file in _tokenizer_files(tokenizer.path):
    with open(file, "rb") as f:
      digest.update(os.path.basename(file).encode() + b"\0" + f.read())
  return {"sha256": digest.hexdigest(), "vocab_size": int(tokenizer.vocab_size)}


def atomic_write(path: str, data: bytes) -> None:
  """Writes ``data`` to a temporary file next to ``path`` and renames it into place."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def install_tokenizer(workdir: str, tokenizer) -> str:
  """Copies the tokenizer into the workdir (each file atomically) and returns its path there.

  A ChatTokenizer becomes ``WORKDIR/tokenizer.model``; a Hugging Face tokenizer's files go to
  ``WORKDIR/hf_tokenizer/``.
  """
  if os.path.isfile(tokenizer.path):
    target, files = os.path.join(workdir, TOKENIZER_FILE), {TOKENIZER_FILE: tokenizer.path}
    directory = workdir
  else:
    directory = target = os.path.join(workdir, HF_TOKENIZER_DIR)
    files = {os.path.basename(f): f for f in _tokenizer_files(tokenizer.path)}
  for name, source in files.items():
    destination = os.path.join(directory, name)
    if os.path.abspath(source) != os.path.abspath(destination):
      with open(source, "rb") as f:
        atomic_write(destination, f.read())
  return target


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  atomic_write(os.path.join(workdir, CONFIG_FILE), config.to_json(indent=2).encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------
# The checkpoint manager.
# ----------------------------------------------------------------------------------------------------------


class Checkpointer:
  """Saves and restores ``(params, opt_state, data iterator, meta)`` under ``WORKDIR/checkpoints``."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, params, opt_state, data_iterator, meta: dict[str, Any]) -> None:
    """Starts writing step ``step`` (returns before the write ends when async)."""
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta),
    ), force=True)

  def read_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, step: int, abstract_params, abstract_opt_state, data_iterator):
    """``(params, opt_state)`` of ``step`` in the shardings of the abstract targets; the iterator is set."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_params),
          opt_state=ocp.args.StandardRestore(abstract_opt_state),
          data=grain.checkpoint.CheckpointRestore(data_iterator),
      ))
    except ValueError as e:
      if "process_" in str(e):
        raise CheckpointMismatchError(
            f"checkpoint {self.directory}/{step} holds the data iterator state of a different number of "
            f"hosts ({e}); resume with the same number of processes") from e
      raise
    return restored.params, restored.opt_state

  def wait(self) -> None:
    """Blocks until pending async writes are committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def checkpoint_meta(step: int, config: ml_collections.ConfigDict, tokenizer: dict[str, Any]) -> dict:
  return {"step": int(step), "config": json.loads(config.to_json()), "tokenizer": tokenizer}


def check_resume(meta: dict, config: ml_collections.ConfigDict, tokenizer: dict[str, Any],
                 directory: str) -> None:
  """Refuses to resume a checkpoint whose tokenizer, vocabulary or model/data config differ from this run."""
  saved_tokenizer = meta.get("tokenizer", {})
  where = f"{directory}/{meta.get('step')}"
  if saved_tokenizer.get("vocab_size") != tokenizer["vocab_size"]:
    raise CheckpointMismatchError(
        f"checkpoint {where} was trained with a {saved_tokenizer.get('vocab_size')}-piece tokenizer but this "
        f"run's tokenizer has {tokenizer['vocab_size']} pieces; use the workdir's own {TOKENIZER_FILE} "
        "(--config.data.tokenizer_path) or start a new --workdir")
  if saved_tokenizer.get("sha256") != tokenizer["sha256"]:
    raise CheckpointMismatchError(
        f"checkpoint {where} was trained with a different tokenizer (sha256 {saved_tokenizer.get('sha256')}, "
        f"this run's is {tokenizer['sha256']}); use the workdir's own {TOKENIZER_FILE} "
        "(--config.data.tokenizer_path) or start a new --workdir")
  saved = config_lib.from_json_dict(meta["config"])
  diffs = config_lib.resume_differences(saved, config)
  if diffs:
    raise CheckpointMismatchError(
        f"cannot resume checkpoint {where}: these fields differ from the run that wrote it: "
        + "; ".join(diffs) + ". Resume with the same values or start a new --workdir")


# ----------------------------------------------------------------------------------------------------------
# Inference.
# ----------------------------------------------------------------------------------------------------------


def restore_for_inference(workdir: str, step: int | None = None, model_overrides: dict | None = None,
                          ) -> tuple[ml_collections.ConfigDict, Transformer, str]:
  """Loads a trained model from a training workdir.

  Args:
    workdir: the ``--workdir`` of a training run.
    step: checkpoint step; ``None`` = the latest.
    model_overrides: ``ModelConfig`` fields that do not change the parameters, e.g.
      ``{"attention_impl": "xla"}`` (``attention_impl``, ``remat_policy``, ``compute_dtype``).

  Returns:
    ``(run_config, model, tokenizer_path)``: the run config saved with the checkpoint, the
    :class:`~ism_jax.Transformer` with restored parameters (on the default device), and the path of the
    workdir's tokenizer: ``WORKDIR/tokenizer.model`` (load with ``ChatTokenizer.load``) or, for a run
    started from a Hugging Face checkpoint, the folder ``WORKDIR/hf_tokenizer`` (load with
    ``ism_jax.convert.load_hf_tokenizer``).
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist; pass the --workdir of a training run")
  tokenizer_path = os.path.join(workdir, TOKENIZER_FILE)
  if not os.path.isfile(tokenizer_path) and os.path.isdir(os.path.join(workdir, HF_TOKENIZER_DIR)):
    tokenizer_path = os.path.join(workdir, HF_TOKENIZER_DIR)
  if not os.path.exists(tokenizer_path):
    raise FileNotFoundError(f"{tokenizer_path} is missing: {workdir} is not a training workdir, or its "
                            "tokenizer was deleted (training copies it there on start)")
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  manager = None
  if os.path.isdir(directory):
    options = ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0)
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=ITEMS, options=options)
  steps = list(manager.all_steps()) if manager else []
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory}; train first "
                            f"(python train.py --config ... --workdir {workdir})")
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint {os.path.join(directory, str(step))}; available steps: {steps}")
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  run_config = config_lib.from_json_dict(meta["config"])
  model_config = config_lib.model_config(run_config)
  if model_overrides:
    unknown = sorted(set(model_overrides) - set(config_lib.MODEL_RUNTIME_FIELDS))
    if unknown:
      raise ValueError(f"model_overrides {unknown} would change the parameters; only "
                       f"{config_lib.MODEL_RUNTIME_FIELDS} may be overridden")
    model_config = ModelConfig(**{**dict(run_config.model), **model_overrides})
    run_config.model.update(model_overrides)
  abstract = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        nnx.to_pure_dict(state))
  params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
  manager.close()
  return run_config, nnx.merge(graphdef, params), tokenizer_path

