"""A training run's directory (the workdir): its layout, and restoring its model, tokenizer and config.

    run = restore("runs/default")        # the latest checkpoint
    run.model, run.tokenizer, run.run_config.data.seq_len

Layout::

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

The trainer writes a workdir (:mod:`ism_jax.training.checkpointing`) and the inference side reads one
(:meth:`ism_jax.inference.ChatSession.load`); this module is what both depend on, and it imports neither.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from ism_jax.data.tokenizer import check_vocab_fits, load_tokenizer
from ism_jax.model import ModelConfig, Transformer

CHECKPOINT_DIR = "checkpoints"
TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_DIR = "hf_tokenizer"
CONFIG_FILE = "config.json"
ITEMS = ("params", "opt_state", "data", "meta")


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit this run or model (tokenizer, vocabulary, model config or parameter shapes)."""


@dataclasses.dataclass
class Restored:
  """A trained model as :func:`restore` loads it.

  Attributes:
    run_config: the run config saved with the checkpoint (as saved: fields added to the schema later are
      absent), with any model overrides applied.
    model: the :class:`~ism_jax.model.Transformer` with restored parameters, on the default device.
    tokenizer: the workdir's tokenizer (a ChatTokenizer, or a Hugging Face checkpoint's).
    tokenizer_path: ``WORKDIR/tokenizer.model`` or ``WORKDIR/hf_tokenizer``.
    step: the checkpoint's step.
  """

  run_config: ml_collections.ConfigDict
  model: Transformer
  tokenizer: object
  tokenizer_path: str
  step: int


def tokenizer_path(workdir: str) -> str:
  """The workdir's tokenizer: ``tokenizer.model``, or the ``hf_tokenizer`` folder of a run started from a
  pretrained model (``init_from``). Raises ``FileNotFoundError`` naming the missing file."""
  path = os.path.join(workdir, TOKENIZER_FILE)
  if not os.path.isfile(path) and os.path.isdir(os.path.join(workdir, HF_TOKENIZER_DIR)):
    path = os.path.join(workdir, HF_TOKENIZER_DIR)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: {workdir} is not a training workdir, or its "
                            "tokenizer was deleted (training copies it there on start)")
  return path


def _checkpoint_manager(workdir: str, step: int | None) -> tuple[ocp.CheckpointManager, int]:
  """A read-only manager of the workdir's checkpoints and the step to restore (the latest by default)."""
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
  return manager, step


def _model_config(saved_model: dict, overrides: dict | None) -> ModelConfig:
  """The saved model config with ``overrides`` of fields that do not change the parameters."""
  overrides = overrides or {}
  unknown = sorted(set(overrides) - set(ModelConfig.RUNTIME_FIELDS))
  if unknown:
    raise ValueError(f"model_overrides {unknown} would change the parameters; only "
                     f"{ModelConfig.RUNTIME_FIELDS} may be overridden")
  return ModelConfig.from_dict({**saved_model, **overrides})


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def saved_param_metadata(directory: str, step: int):
  """The Orbax tree metadata (names, shapes, dtypes; nothing is read) of checkpoint ``step``'s parameters."""
  return ocp.StandardCheckpointHandler().metadata(epath.Path(directory) / str(step) / "params")


def check_param_shapes(saved_tree, target, where: str) -> None:
  """Refuses a checkpoint whose parameters differ in name or shape from ``target`` (naming them).

  Args:
    saved_tree: the ``params`` item's Orbax tree metadata (:func:`saved_param_metadata`).
    target: pure dict of the model's parameters or ``ShapeDtypeStruct``s.
    where: the checkpoint's directory, for the message.
  """
  saved_tree = getattr(saved_tree, "tree", saved_tree)
  saved = {_path_name(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
  wanted = {_path_name(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(target)[0]}
  problems = [f"params/{n}: checkpoint {saved[n]}, model {wanted[n]}"
              for n in sorted(saved.keys() & wanted.keys()) if saved[n] != wanted[n]]
  problems += [f"params/{n} is missing from the checkpoint" for n in sorted(wanted.keys() - saved.keys())]
  problems += [f"params/{n} is in the checkpoint but not in the model"
               for n in sorted(saved.keys() - wanted.keys())]
  if problems:
    shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
    raise CheckpointMismatchError(
        f"checkpoint {where} does not fit the model: {shown}. Restore it with the model config it was saved "
        "with (its meta item holds the run config) or start a new --workdir")


def restore(workdir: str, step: int | None = None, model_overrides: dict | None = None) -> Restored:
  """Loads a trained model, its tokenizer and its run config from a training workdir.

  Args:
    workdir: the ``--workdir`` of a training run.
    step: checkpoint step; ``None`` = the latest.
    model_overrides: :data:`ModelConfig.RUNTIME_FIELDS` to change, e.g. ``{"attention_impl": "xla"}``.

  Raises:
    FileNotFoundError: naming the missing workdir, tokenizer or checkpoint.
    ValueError: an override that would change the parameters, or a tokenizer larger than the model's
      vocabulary.
    CheckpointMismatchError: parameters whose names or shapes differ from the saved model config's (named;
      nothing is read).
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist; pass the --workdir of a training run "
                            "(it holds checkpoints/ and tokenizer.model)")
  path = tokenizer_path(workdir)
  manager, step = _checkpoint_manager(workdir, step)
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  run_config = ml_collections.ConfigDict(meta["config"])
  model_config = _model_config(meta["config"]["model"], model_overrides)
  run_config.model.update(model_overrides or {})
  abstract = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        nnx.to_pure_dict(state))
  check_param_shapes(saved_param_metadata(manager.directory, step), target,
                     os.path.join(workdir, CHECKPOINT_DIR, str(step)))
  params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
  manager.close()
  tokenizer = load_tokenizer(path)
  check_vocab_fits(tokenizer, model_config.vocab_size,
                   "the workdir's tokenizer does not belong to its checkpoint")
  return Restored(run_config, nnx.merge(graphdef, params), tokenizer, path, step)
