"""Orbax checkpoints of a training run and the files the trainer writes into its workdir.

The workdir layout is described (and read back for inference) in :mod:`ism_jax.workdir`. Checkpoints are
written by an async ``CheckpointManager`` that keeps the newest ``keep`` of them; a step is visible only once
fully written, so a run killed mid-write resumes from the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp

from ism_jax.training import config as config_lib
from ism_jax.workdir import (CHECKPOINT_DIR, CONFIG_FILE, HF_TOKENIZER_DIR, ITEMS, TOKENIZER_FILE,
                             CheckpointMismatchError, check_param_shapes, saved_param_metadata)

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                      "chat_template.jinja", "chat_template.json")


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
    """``(params, opt_state)`` of ``step`` in the shardings of the abstract targets; the iterator is set.

    The targets' shardings may come from another mesh than the one that saved (another shape or device
    count): Orbax reads each device's part of every array. Parameters whose names or shapes differ from the
    checkpoint's are refused by name (:class:`CheckpointMismatchError`) before anything is read.
    """
    check_param_shapes(saved_param_metadata(self.directory, step), abstract_params,
                       f"{self.directory}/{step}")
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
