"""The trainer's side of the input pipeline (:mod:`ism_jax.data.pipeline`).

The run config becomes one :class:`~ism_jax.data.pipeline.PipelineConfig` per host (each host reads its
own shard and packs ``global_batch_size / process_count`` rows per step), and one call,
:func:`~ism_jax.data.pipeline.open_inputs`, hands back the tokenizer and the data (a pretrained model's
tokenizer, loaded here through :mod:`ism_jax.convert`, goes in with the config). Host batches are checked
with :func:`ism_jax.masks.validate_segments` before they enter the jitted step, so a loss on a target the
position can see is refused with the row and position named.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from ism_jax.data import pipeline
from ism_jax.data.tokenizer import check_vocab_fits
from ism_jax.masks import validate_segments


def pipeline_config(config: ml_collections.ConfigDict) -> pipeline.PipelineConfig:
  """This host's pipeline settings for a run config: the only place the run config reaches the data."""
  rows = config.training.global_batch_size
  if rows % jax.process_count():
    raise ValueError(f"training.global_batch_size={rows} must be a multiple of the {jax.process_count()} "
                     "processes (each host packs an equal share)")
  data = config.data
  return pipeline.PipelineConfig(
      name=data.name, data_dir=data.data_dir, seq_len=data.seq_len, batch_size=rows // jax.process_count(),
      loss_on=data.loss_on, triplets=config.model.mask == "prefix" and data.prefix_triplets, seed=config.seed,
      vocab_size=data.vocab_size, tokenizer_path=data.tokenizer_path or None,
      num_shards=data.num_shards or None,
      num_threads=data.num_threads, prefetch=data.prefetch,
      eval_max_dialogues=data.eval_max_dialogues or None,
      sample_dialogues=config.sample.dialogues if config.sample.enabled else 0)


def prepare(config: ml_collections.ConfigDict) -> pipeline.Inputs:
  """The run's tokenizer, train iterator, checked eval batches and sample dialogues (datasets and tokenizer
  are built first if missing). With ``init_from`` the pretrained model's own tokenizer is used."""
  tokenizer = None
  if config.init_from:
    from ism_jax.convert import load_pretrained_tokenizer  # pylint: disable=import-outside-toplevel
    tokenizer = load_pretrained_tokenizer(config.init_from)
  inputs = pipeline.open_inputs(pipeline_config(config), tokenizer)
  check_lengths(config, inputs.survey)
  check_vocab_fits(inputs.tokenizer, config.model.vocab_size,
                   f"set --config.model.vocab_size={inputs.tokenizer.vocab_size} or more")
  for batch in inputs.eval_batches:
    check_batch(batch, config.model.mask)
  return inputs


def check_lengths(config: ml_collections.ConfigDict, survey: pipeline.LengthSurvey) -> None:
  """Refuses a train split that does not fit ``data.seq_len`` (``survey``: :func:`pipeline.survey_lengths`).

  Raises:
    ValueError: no surveyed dialogue fits ``data.seq_len``, or more than ``data.max_dropped_fraction`` of
      them would be dropped; the message names the dataset, the dialogue lengths and the ``seq_len`` needed.
  """
  seq_len = config.data.seq_len
  if survey.dropped == survey.surveyed:
    raise ValueError(
        f"no dialogue of dataset {survey.where} ({survey.surveyed} surveyed) fits data.seq_len={seq_len}: "
        f"the dialogues are {survey.shortest} (shortest) to {survey.longest} (longest) tokens and even the "
        f"shortest first round is {survey.first_rounds[0]} tokens (a dialogue whose first round exceeds "
        f"seq_len is dropped). Set --config.data.seq_len={survey.seq_len_keeping(0.0)} or more to keep every "
        "dialogue")
  limit = config.data.max_dropped_fraction
  if survey.dropped_fraction > limit:
    raise ValueError(
        f"{survey.dropped} of {survey.surveyed} surveyed dialogues ({100 * survey.dropped_fraction:.1f}%) of "
        f"dataset {survey.where} would be dropped at data.seq_len={seq_len} (first round longer than "
        f"that; the dialogues are {survey.shortest} to {survey.longest} tokens), more than "
        f"data.max_dropped_fraction={limit}. Set --config.data.seq_len={survey.seq_len_keeping(limit)} or "
        f"more (or raise data.max_dropped_fraction to train on the rest)")


def check_batch(batch: dict[str, np.ndarray], kind: str) -> None:
  """Raises ``ValueError`` if a host batch breaks the data contract or puts loss on a visible target."""
  validate_segments(batch["segment_types"], batch["segment_ids"], batch["loss_mask"], kind)
