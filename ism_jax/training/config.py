"""The run config: its schema, validation, and the pieces built from it.

A run config is an ``ml_collections.ConfigDict`` with the sections below. :func:`base_config` holds every
valid field with its default; the files in ``configs/`` start from it and change what they need. Any field
not in the schema is refused with the list of valid ones, whether it comes from a config file or from a
``--config.a.b=value`` override on the command line::

    seed, init_from
    model.*         every field of ism_jax.ModelConfig (mask = "ism" | "causal" | "prefix", ...)
    data.*          dataset, tokenizer, sequence length, loss policy
    optimizer.*     AdamW, warmup + cosine schedule, gradient clipping
    training.*      batch size, steps, gradient accumulation, logging / eval / checkpoint cadence
    mesh.*          device mesh sizes (data, fsdp, tensor)
    metrics.*       peak FLOP/s for MFU, TensorBoard
    sample.*        the short chat printed after training
    distributed.*   jax.distributed.initialize() for multi-host runs
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any, Iterable

import ml_collections

from ism_jax.data import packing
from ism_jax.model import ModelConfig

# Sections that older runs saved and this schema dropped (``debug``: a test-only fault injection).
RETIRED_SECTIONS = ("debug",)
# Fields whose change would make a resumed run read different data or build a different model.
RESUME_LOCKED_FIELDS = ("seed", "data.name", "data.seq_len", "data.loss_on", "data.num_shards",
                        "training.global_batch_size", "model.mask")


def base_config(model: str | None = None) -> ml_collections.ConfigDict:
  """Every valid field with its default value (the schema of a run config).

  ``model`` names a size of :data:`ism_jax.model.PRESETS` for the ``model`` section (``None``: the
  ``ModelConfig`` defaults); config files start from this and change what differs.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0  # parameter-init seed and data shuffle seed
  config.init_from = ""  # pretrained start: HF checkpoint dir, .gguf file or "smollm2"; "" = random init

  # The model: every field of ism_jax.ModelConfig (see ism_jax/model.py for their meaning).
  model_config = ModelConfig() if model is None else ModelConfig.preset(model)
  config.model = ml_collections.ConfigDict(dataclasses.asdict(model_config))

  config.data = ml_collections.ConfigDict()
  config.data.name = "chitchat"  # "chitchat", "synthetic_multiturn[/small]" or an imported JSONL dataset
  config.data.data_dir = "data"  # TFDS data directory (datasets are built here on first use)
  config.data.tokenizer_path = ""  # a ChatTokenizer .model file; "" = train one on the train split (cached)
  config.data.vocab_size = 4000  # pieces of a tokenizer trained here (must not exceed model.vocab_size)
  config.data.seq_len = 512  # tokens per packed row
  config.data.max_dropped_fraction = 0.5  # refuse to start when more train dialogues than this exceed seq_len
  config.data.loss_on = "all"  # train on "all" answers of a dialogue or the "last" one only
  config.data.prefix_triplets = True  # mask "prefix": one example per round of each dialogue (triplets)
  config.data.num_shards = 0  # train shards (a multiple of the process count); 0 = one per process
  config.data.num_threads = 2  # reader threads (tokenization runs there)
  config.data.prefetch = 64  # dialogues read ahead
  config.data.eval_max_dialogues = 0  # validation dialogues evaluated; 0 = the whole split

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 3e-4  # peak learning rate
  config.optimizer.warmup_steps = 100  # linear warmup from 0 to the peak
  config.optimizer.min_lr_ratio = 0.1  # the cosine decays to learning_rate * min_lr_ratio at the last step
  config.optimizer.weight_decay = 0.1  # AdamW decoupled weight decay (matrices only, not norms/biases)
  config.optimizer.b1 = 0.9  # Adam first-moment decay
  config.optimizer.b2 = 0.95  # Adam second-moment decay
  config.optimizer.eps = 1e-8  # Adam epsilon
  config.optimizer.grad_clip_norm = 1.0  # clip gradients to this global norm; 0 = no clipping

  config.training = ml_collections.ConfigDict()
  config.training.num_steps = 1000  # optimizer steps in total (the schedule's length)
  config.training.global_batch_size = 8  # packed rows per optimizer step, over all hosts
  config.training.grad_accum_steps = 1  # microbatches per step (jax.lax.scan inside the jitted step)
  config.training.loss_chunk_tokens = 0  # loss over chunks of this many tokens (no [B, T, V] logits); 0 = off
  config.training.log_every = 10  # steps between metric records (metrics.jsonl, TensorBoard, console)
  config.training.eval_every = 200  # steps between evaluations; 0 = only at the end
  config.training.checkpoint_every = 200  # steps between checkpoints (one is always written at the end)
  config.training.keep_checkpoints = 3  # newest checkpoints kept on disk
  config.training.async_checkpoints = True  # write checkpoints in the background
  config.training.divergence_factor = 1000.0  # refuse to save once param/grad norms grow this much in a run

  _add_run_sections(config)
  return config


def _add_run_sections(config: ml_collections.ConfigDict) -> None:
  """The sections of :func:`base_config` about where and how the run executes (not what it learns)."""
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # data-parallel size; -1 = all devices left over
  config.mesh.fsdp = 1  # parameter-sharding (ZeRO-3) size
  config.mesh.tensor = 1  # tensor-parallel size

  config.metrics = ml_collections.ConfigDict()
  config.metrics.peak_tflops_per_device = 0.0  # for MFU; 0 = look up the device kind (none on CPU)
  config.metrics.tensorboard = True  # write TensorBoard event files to WORKDIR/tensorboard

  config.sample = ml_collections.ConfigDict()
  config.sample.enabled = True  # print a short greedy multi-turn chat with the trained model at the end
  config.sample.dialogues = 1  # validation dialogues whose user turns are replayed
  config.sample.rounds = 3  # rounds of each sample dialogue
  config.sample.max_answer_tokens = 48  # answer length limit in tokens

  config.distributed = ml_collections.ConfigDict()
  config.distributed.enabled = False  # call jax.distributed.initialize() before anything else
  config.distributed.coordinator_address = ""  # "host:port" of process 0; "" = detect (TPU, Slurm, Open MPI)
  config.distributed.num_processes = 0  # processes in the job; 0 = detect
  config.distributed.process_id = -1  # this process's index; -1 = detect
  config.distributed.initialization_timeout = 300  # seconds for every process to join, then exit (error)
  config.distributed.heartbeat_timeout = 100  # seconds of silence after which a process counts as dead


def pretrained_config(source: str) -> ml_collections.ConfigDict:
  """:func:`base_config` for fine-tuning ``source``: ``init_from`` and the architecture fields are set.

  ``source`` is anything :func:`ism_jax.convert.load_pretrained` takes: a Hugging Face checkpoint
  directory, a ``.gguf`` file or a name such as ``"smollm2"``. The model fields that come from the
  checkpoint (widths, heads, RoPE, norm epsilon, tying) are read from it, so they always match the weights;
  the tokenizer and chat format are the checkpoint's own.
  """
  from ism_jax.convert import hf_config, pretrained_model_config  # pylint: disable=import-outside-toplevel
  config = base_config()
  config.init_from = os.path.abspath(source) if os.path.exists(source) else source
  imported = pretrained_model_config(source)
  for field in hf_config.CHECKPOINT_FIELDS:
    value = getattr(imported, field)
    config.model[field] = list(value) if isinstance(value, tuple) else value  # as saved in run JSON
  config.data.vocab_size = imported.vocab_size  # the checkpoint's tokenizer is used, not one trained here
  return config


# ----------------------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------------------


def field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Dotted paths of every leaf field, e.g. ``["seed", "model.mask", ...]``."""
  paths = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      paths += field_paths(value, path + ".")
    else:
      paths.append(path)
  return paths


def _unknown_field_message(path: str, where: str) -> str:
  """Names the bad field and lists the valid fields of its section (or all fields)."""
  schema = base_config()
  section = path.rpartition(".")[0]
  if section in _section_paths(schema):
    valid = [p for p in field_paths(schema) if p.startswith(section + ".")]
    return f"unknown config field {path!r} ({where}). Valid fields of {section}: {', '.join(valid)}"
  sections = [p for p in _section_paths(schema) if "." not in p]
  fields = [p for p in field_paths(schema) if "." not in p]
  return (f"unknown config field {path!r} ({where}). Valid sections: {', '.join(sections)} (fields are "
          f"<section>.<name>, e.g. training.num_steps); valid top-level fields: {', '.join(fields)}")


def _section_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.append(prefix + key)
      out += _section_paths(value, prefix + key + ".")
  return out


def validate(config: ml_collections.ConfigDict, where: str = "config") -> None:
  """Raises ``ValueError`` for fields not in :func:`base_config` and for inconsistent values."""
  valid = set(field_paths(base_config()))
  for path in field_paths(config):
    if path not in valid:
      raise ValueError(_unknown_field_message(path, where))
  missing = sorted(valid - set(field_paths(config)))
  if missing:
    raise ValueError(f"{where} lacks fields {missing}; start the config from "
                     "ism_jax.training.config.base_config()")
  model_config(config)  # raises on invalid model values
  training, mesh = config.training, config.mesh
  problems = []
  if training.num_steps < 1:
    problems.append(f"training.num_steps={training.num_steps} must be at least 1")
  if training.global_batch_size < 1 or training.grad_accum_steps < 1:
    problems.append("training.global_batch_size and training.grad_accum_steps must be positive")
  elif training.global_batch_size % training.grad_accum_steps:
    problems.append(f"training.global_batch_size={training.global_batch_size} must be a multiple of "
                    f"training.grad_accum_steps={training.grad_accum_steps}")
  if training.loss_chunk_tokens < 0:
    problems.append(f"training.loss_chunk_tokens={training.loss_chunk_tokens} must be >= 0 (0 = the "
                    "unchunked loss)")
  for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
    if training[name] < 1:
      problems.append(f"training.{name}={training[name]} must be at least 1")
  if not training.divergence_factor > 1.0:
    problems.append(f"training.divergence_factor={training.divergence_factor} must be greater than 1")
  if training.eval_every < 0:
    problems.append(f"training.eval_every={training.eval_every} must be >= 0")
  try:
    packing.check_loss_on(config.data.loss_on, "data.loss_on")
  except ValueError as e:
    problems.append(str(e))
  if config.data.seq_len < 2:
    problems.append(f"data.seq_len={config.data.seq_len} must be at least 2")
  if config.data.num_shards < 0:
    problems.append(f"data.num_shards={config.data.num_shards} must be >= 0 (0 = one per process)")
  elif config.data.num_shards and training.global_batch_size % config.data.num_shards:
    problems.append(f"training.global_batch_size={training.global_batch_size} must be a multiple of "
                    f"data.num_shards={config.data.num_shards} (each shard packs an equal share)")
  if not 0.0 <= config.data.max_dropped_fraction <= 1.0:
    problems.append(f"data.max_dropped_fraction={config.data.max_dropped_fraction} must be in [0, 1]")
  if [mesh.data, mesh.fsdp, mesh.tensor].count(-1) > 1:
    problems.append("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
  if config.optimizer.warmup_steps < 0 or config.optimizer.learning_rate <= 0:
    problems.append("optimizer.learning_rate must be positive and optimizer.warmup_steps >= 0")
  if config.distributed.heartbeat_timeout < 1:
    problems.append(f"distributed.heartbeat_timeout={config.distributed.heartbeat_timeout} must be at least "
                    "1 (seconds)")
  if config.distributed.initialization_timeout < 1:
    problems.append(f"distributed.initialization_timeout={config.distributed.initialization_timeout} must be "
                    "at least 1 (seconds)")
  if problems:
    raise ValueError(f"invalid {where}: " + "; ".join(problems))


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The :class:`ModelConfig` of a run config's ``model`` section (unknown fields are refused)."""
  return ModelConfig.from_dict(config.model)


# ----------------------------------------------------------------------------------------------------------
# Loading config files and command-line overrides.
# ----------------------------------------------------------------------------------------------------------

_OVERRIDE = re.compile(r"^--config\.([A-Za-z0-9_.]+)(=.*)?$")


def check_overrides(config: ml_collections.ConfigDict, argv: Iterable[str]) -> None:
  """Refuses ``--config.a.b=...`` arguments that name a field the config does not have.

  Called before absl parses the flags, so the user sees the valid fields instead of a traceback.
  """
  valid = set(field_paths(config))
  sections = set(_section_paths(config))
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if match and match.group(1) not in valid and match.group(1) not in sections:
      raise ValueError(_unknown_field_message(match.group(1), f"command-line override {arg.split('=')[0]}"))


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Runs a config file's ``get_config()`` (the file may end in ``:arg`` like ml_collections allows)."""
  path, _, arg = path.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} does not exist; see configs/ for the shipped configs")
  spec = importlib.util.spec_from_file_location("ism_run_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path} defines no get_config() function")
  return module.get_config(arg) if arg else module.get_config()


def resume_differences(saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict) -> list[str]:
  """Fields that differ between a checkpoint's config and this run's and would break an exact resume."""
  diffs = []
  for path in RESUME_LOCKED_FIELDS:
    if _get(saved, path) != _get(current, path):
      diffs.append(f"{path}: checkpoint {_get(saved, path)!r}, now {_get(current, path)!r}")
  for name in dataclasses.asdict(ModelConfig()):
    if name in ModelConfig.RUNTIME_FIELDS or f"model.{name}" in RESUME_LOCKED_FIELDS:
      continue
    if _as_tuples(saved.model.get(name)) != _as_tuples(current.model.get(name)):
      diffs.append(f"model.{name}: checkpoint {saved.model.get(name)!r}, now {current.model.get(name)!r}")
  return diffs


def _as_tuples(value: Any) -> Any:
  """Lists (as saved in JSON) and tuples (as written in config files) compare equal."""
  return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  for key in path.split("."):
    config = config.get(key) if config is not None else None
  return config


def from_json_dict(values: dict) -> ml_collections.ConfigDict:
  """A run config saved as JSON (a plain nested dict) back as a ``ConfigDict`` on top of the schema.

  Fields added to the schema after the checkpoint was written keep their defaults; sections the schema no
  longer has (:data:`RETIRED_SECTIONS`) are ignored.
  """
  config = base_config()
  values = {k: v for k, v in values.items() if k not in RETIRED_SECTIONS}
  if "init_from_hf" in values:  # the field's name before GGUF files could be given too
    values["init_from"] = values.pop("init_from_hf")
  _update(config, values, "")
  return config


def _update(config: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
  for key, value in values.items():
    if key not in config:
      raise ValueError(_unknown_field_message(prefix + key, "saved run config"))
    if isinstance(config[key], ml_collections.ConfigDict):
      _update(config[key], value, prefix + key + ".")
    else:
      default = config[key]
      if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
      with config.ignore_type():
        config[key] = value
