"""The trainer's view of the input pipeline (:mod:`ism_jax.data.pipeline`): dataset, tokenizer, batches.

The run config's ``data`` section and the global batch size become one :class:`PipelineConfig` per host:
each host reads its own shard and packs ``global_batch_size / process_count`` rows per step. Host batches
are checked with :func:`ism_jax.masks.validate_segments` before they enter the jitted step, so a loss on a
target the position can see is refused with the row and position named.
"""

from __future__ import annotations

import logging

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ism_jax.data import builders, pipeline
from ism_jax.data.tokenizer import ChatTokenizer
from ism_jax.masks import validate_segments

_log = logging.getLogger(__name__)


def pipeline_config(config: ml_collections.ConfigDict) -> pipeline.PipelineConfig:
  """This host's pipeline settings for a run config."""
  rows = config.training.global_batch_size
  if rows % jax.process_count():
    raise ValueError(f"training.global_batch_size={rows} must be a multiple of the {jax.process_count()} "
                     "processes (each host packs an equal share)")
  data = config.data
  return pipeline.PipelineConfig(
      name=data.name, data_dir=data.data_dir, seq_len=data.seq_len, batch_size=rows // jax.process_count(),
      loss_on=data.loss_on, triplets=config.model.mask == "prefix" and data.prefix_triplets, seed=config.seed,
      vocab_size=data.vocab_size, tokenizer_path=data.tokenizer_path or None, num_threads=data.num_threads,
      prefetch=data.prefetch)


def prepare(config: ml_collections.ConfigDict) -> tuple[pipeline.PipelineConfig, ChatTokenizer]:
  """Builds the dataset and the tokenizer if missing (process 0 first, then the others read them)."""
  pipe = pipeline_config(config)
  if jax.process_index() == 0:
    pipeline.prepare_data(pipe)
    tokenizer = load_tokenizer(config, pipe)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("ism_jax: dataset and tokenizer ready")
  if jax.process_index() != 0:
    tokenizer = load_tokenizer(config, pipe)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but model.vocab_size "
                     f"is {config.model.vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size} or "
                     "more")
  return pipe, tokenizer


def load_tokenizer(config: ml_collections.ConfigDict, pipe: pipeline.PipelineConfig):
  """The pretrained model's own tokenizer with ``init_from``, else the pipeline's ChatTokenizer."""
  if config.init_from:
    from ism_jax.convert import load_pretrained_tokenizer  # pylint: disable=import-outside-toplevel
    return load_pretrained_tokenizer(config.init_from)
  return pipeline.load_tokenizer(pipe)


def train_iterator(pipe: pipeline.PipelineConfig, tokenizer: ChatTokenizer):
  """The checkpointable, shuffled, repeating stream of this host's packed batches."""
  return pipeline.make_train_iterator(pipe, tokenizer)


def has_split(pipe: pipeline.PipelineConfig, split: str) -> bool:
  """Whether the prepared dataset has ``split`` (an imported dataset may lack ``validation``)."""
  try:
    builders.data_source(pipe.name, pipe.data_dir, split)
  except ValueError as e:
    if "Unknown split" in str(e):
      return False
    raise
  return True


def eval_batches(pipe: pipeline.PipelineConfig, tokenizer: ChatTokenizer, max_dialogues: int, kind: str):
  """This host's validation batches (every host gets the same number), checked once; none without a split."""
  if not has_split(pipe, "validation"):
    _log.warning("dataset %s has no validation split: evaluation is skipped", pipe.name)
    return []
  batches = pipeline.make_eval_batches(pipe, tokenizer, max_dialogues=max_dialogues or None)
  for batch in batches:
    check_batch(batch, kind)
  return batches


def check_batch(batch: dict[str, np.ndarray], kind: str) -> None:
  """Raises ``ValueError`` if a host batch breaks the data contract or puts loss on a visible target."""
  validate_segments(batch["segment_types"], batch["segment_ids"], batch["loss_mask"], kind)


def sample_dialogues(pipe: pipeline.PipelineConfig, count: int):
  """The first ``count`` validation dialogues (train ones without a validation split) for the sample chat."""
  split = "validation" if has_split(pipe, "validation") else "train"
  return pipeline.read_dialogues(pipe, split, max_dialogues=count)
