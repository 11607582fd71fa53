"""The input pipeline: TFDS data source → grain → packed numpy batches of the docs/DESIGN.md §2 arrays.

Training::

    source (array_record, random access)
      → this host's shard: records shard_index, shard_index + shard_count, ...
      → shuffle (seed; a new permutation every epoch: epoch e uses seed + e) → repeat (num_epochs)
      → record → messages → chat template tokens          (reader threads)
      → loss policy, truncation, [triplets for prefix]    → first-fit packing → batch

Every batch is a dict of int32 numpy arrays ``[batch_size, seq_len]``: ``tokens``, ``segment_types``,
``segment_ids``, ``positions``, ``loss_mask``, ``round_index`` (see :mod:`ism_jax.data.packing`).
``batch_size`` is per host. The train iterator is a grain ``DatasetIterator``: ``get_state()`` gives a small
JSON-serialisable dict, and ``set_state(state)`` on a fresh iterator of the same config resumes exactly.

Example::

    config = PipelineConfig(name="synthetic_multiturn/small", data_dir="/tmp/ism_data", seq_len=256,
                            batch_size=8)
    inputs = open_inputs(config)             # all of the below at once: what the trainer calls
    prepare_data(config)                     # builds the dataset if missing (process 0 on multi-host)
    tokenizer = load_tokenizer(config)       # trained once on the train split, cached next to the data
    train = make_train_iterator(config, tokenizer)
    batch = next(train)                      # {"tokens": int32[8, 256], ...}
    state = train.get_state()                # store with the model checkpoint
    evals = make_eval_batches(config, tokenizer)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import grain
import numpy as np

from ism_jax.data import builders, packing
from ism_jax.data.chat_template import encode_dialogue
from ism_jax.data.dialogue import Message
from ism_jax.data.packed_iterator import ConcatenatedBatches, PackedBatchIterDataset, PackedBatchIterator
from ism_jax.data.tokenizer import ChatTokenizer
from ism_jax.data.tokenizer import load_tokenizer as load_tokenizer_file

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Everything the input pipeline needs. ``from_mapping`` accepts an ml_collections ``ConfigDict``."""

  name: str                           # "chitchat", "synthetic_multiturn[/small]", or an imported dataset
  data_dir: str                       # TFDS data directory
  seq_len: int = 512                  # tokens per row
  batch_size: int = 8                 # rows per batch, per host
  loss_on: str = "all"                # "all" answers, or "last" answer of each dialogue
  triplets: bool = False              # prefix-LM baseline: one example per round (loss_on is then moot)
  seed: int = 0                       # shuffle seed (epoch e shuffles with seed + e)
  num_epochs: int | None = None       # None repeats forever
  shard_index: int | None = None      # this host's shard; None → jax.process_index()
  shard_count: int | None = None      # number of shards; None → jax.process_count()
  num_shards: int | None = None       # train shards over all hosts, a multiple of shard_count; None = one
                                      # per host (see train_shards)
  vocab_size: int = 4000              # tokenizer size when training one
  tokenizer_path: str | None = None   # a .model file or a Hugging Face checkpoint folder to load instead
  num_threads: int = 2                # reader threads (tokenization runs there)
  prefetch: int = 64                  # dialogues read ahead
  eval_max_dialogues: int | None = None  # validation dialogues evaluated (open_inputs); None = all
  sample_dialogues: int = 0           # validation dialogues open_inputs reads for a sample chat

  def __post_init__(self):
    if self.seq_len < 2 or self.batch_size < 1:
      raise ValueError(f"seq_len must be >= 2 and batch_size >= 1, got {self.seq_len} and {self.batch_size}")
    packing.check_loss_on(self.loss_on)
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"num_epochs must be None (forever) or >= 1, got {self.num_epochs}")

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> "PipelineConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"unknown data config fields {unknown}; known: {sorted(names)}")
    return cls(**dict(values))

  def shard(self) -> tuple[int, int]:
    """``(shard_index, shard_count)``, defaulting to this JAX process and the process count."""
    if self.shard_index is not None and self.shard_count is not None:
      index, count = self.shard_index, self.shard_count
    else:
      import jax  # pylint: disable=import-outside-toplevel
      index = jax.process_index() if self.shard_index is None else self.shard_index
      count = jax.process_count() if self.shard_count is None else self.shard_count
    if not 0 <= index < count:
      raise ValueError(f"shard_index must be in [0, shard_count), got {index} of {count}")
    return index, count

  def train_shards(self) -> list[tuple[int, int]]:
    """``(shard_index, shard_count)`` of each train shard this host reads, in the order of its rows.

    ``num_shards`` shards are split evenly over the hosts: host ``p`` of ``n`` reads shards ``p k, ...,
    p k + k - 1`` with ``k = num_shards / n``, each packing ``batch_size / k`` of its rows. So one host with
    ``num_shards = 2`` builds the global batches of two hosts with one shard each.
    """
    index, count = self.shard()
    total = self.num_shards or count
    if total % count or self.batch_size % (total // count):
      raise ValueError(f"num_shards={total} must be a multiple of the {count} hosts, and batch_size="
                       f"{self.batch_size} a multiple of the {total // count or 1} shards each host reads")
    per_host = total // count
    return [(index * per_host + j, total) for j in range(per_host)]


def prepare_data(config: PipelineConfig) -> None:
  """Builds ``chitchat`` / ``synthetic_multiturn[/config]`` under ``data_dir`` if missing.

  Imported datasets must already exist (``python -m ism_jax.data.import_jsonl``).
  """
  if os.path.isdir(builders.dataset_dir(config.name, config.data_dir)):
    return
  base = config.name.partition("/")[0]
  if base not in builders.BUILDERS:
    builders.data_source(config.name, config.data_dir, "train")  # raises with what to do
  builders.prepare(config.name, config.data_dir)


def read_dialogues(config: PipelineConfig, split: str,
                   max_dialogues: int | None = None) -> list[list[Message]]:
  """The first ``max_dialogues`` dialogues of ``split`` in stored order, as messages (e.g. for generation)."""
  source = builders.data_source(config.name, config.data_dir, split)
  count = len(source) if max_dialogues is None else min(max_dialogues, len(source))
  return [builders.record_to_messages(source[i]) for i in range(count)]


def _training_texts(config: PipelineConfig):
  source = builders.data_source(config.name, config.data_dir, "train")
  for i in range(len(source)):
    for message in builders.record_to_messages(source[i]):
      yield message.content


def load_tokenizer(config: PipelineConfig) -> ChatTokenizer:
  """Loads ``config.tokenizer_path``, or the cached tokenizer of this dataset, training it if missing.

  A ``tokenizer_path`` folder is a Hugging Face checkpoint's (its own tokenizer and chat format). The cache
  is ``<dataset folder>/tokenizer_<vocab_size>.model``, trained on every message content of the train split
  (deterministic, so hosts that train concurrently write identical files).
  """
  if config.tokenizer_path:
    return load_tokenizer_file(config.tokenizer_path)
  folder = builders.dataset_dir(config.name, config.data_dir)
  path = os.path.join(folder, f"tokenizer_{config.vocab_size}.model")
  if os.path.exists(path):
    return ChatTokenizer.load(path)
  _log.info("training a %d-piece tokenizer on %s train split -> %s", config.vocab_size, config.name, path)
  return ChatTokenizer.train(_training_texts(config), config.vocab_size, model_path=path)


class _Encode(grain.transforms.Map):
  """Record → messages → :class:`EncodedDialogue` (runs in grain's reader threads)."""

  def __init__(self, tokenizer: ChatTokenizer):
    self._tokenizer = tokenizer

  def map(self, record):
    return encode_dialogue(self._tokenizer, builders.record_to_messages(record))


def _dialogues(config: PipelineConfig, tokenizer: ChatTokenizer, split: str, shuffle: bool,
               num_epochs: int | None, shard: tuple[int, int]) -> grain.IterDataset:
  source = builders.data_source(config.name, config.data_dir, split)
  index, count = shard
  dataset = grain.MapDataset.source(source)[index::count]
  if len(dataset) == 0:
    raise ValueError(f"shard {index} of {count} of {config.name}/{split} is empty ({len(source)} dialogues); "
                     "use fewer shards or more data")
  if shuffle:
    dataset = dataset.shuffle(seed=config.seed)
  if num_epochs != 1:
    dataset = dataset.repeat(num_epochs)
  dataset = dataset.map(_Encode(tokenizer))
  read_options = grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.prefetch)
  return dataset.to_iter_dataset(read_options)


def make_train_iterator(config: PipelineConfig, tokenizer: ChatTokenizer,
                        split: str = "train") -> PackedBatchIterator | ConcatenatedBatches:
  """The shuffled, repeated, sharded, packed training stream (see module docstring); with several shards
  per host (:meth:`PipelineConfig.train_shards`) their batches side by side, rows in shard order.

  A whole pass over a shard in which no dialogue fits ``seq_len`` raises ``ValueError`` instead of reading
  on forever (see :func:`survey_lengths` for the check made before training starts).

  Returns:
    A checkpointable iterator of batch dicts with ``get_state``/``set_state`` and a ``stats`` attribute
    (:class:`~ism_jax.data.packing.PackingStats`: truncation counts, fill rate).
  """
  shards = config.train_shards()
  rows = config.batch_size // len(shards)
  size = len(builders.data_source(config.name, config.data_dir, split))
  iterators = []
  for shard in shards:
    dialogues = _dialogues(config, tokenizer, split, shuffle=True, num_epochs=config.num_epochs, shard=shard)
    packed = PackedBatchIterDataset(dialogues, seq_len=config.seq_len, batch_size=rows,
                                    loss_on=config.loss_on, triplets=config.triplets,
                                    max_dropped_in_a_row=len(range(shard[0], size, shard[1])),
                                    where=f"{config.name}/{split} (shard {shard[0]} of {shard[1]})")
    iterators.append(iter(packed))
  return iterators[0] if len(iterators) == 1 else ConcatenatedBatches(iterators)


def describe_train_shards(config: PipelineConfig) -> str:
  """E.g. ``"process 1 of 2 reads chitchat/train shard 1 of 2: records 1, 3, 5, ... (1000 of 2000)"``."""
  index, count = config.shard()
  total = len(builders.data_source(config.name, config.data_dir, "train"))
  parts = []
  for shard, shards in config.train_shards():
    records = range(shard, total, shards)
    first = ", ".join(str(r) for r in records[:3])
    parts.append(f"shard {shard} of {shards}: records {first}, ... ({len(records)} of {total})")
  return f"process {index} of {count} reads {config.name}/train " + "; ".join(parts)


SURVEY_DIALOGUES = 2000  # dialogues tokenized by survey_lengths (evenly spaced over the split)


@dataclasses.dataclass(frozen=True)
class LengthSurvey:
  """Token lengths of (a sample of) a split against ``seq_len``: what truncation will do to the data.

  A dialogue longer than ``seq_len`` loses whole later rounds (``truncated``); one whose first round alone is
  longer is dropped (``dropped``). Lengths count the chat template's tokens.
  """

  where: str                # "<dataset>/<split>"
  seq_len: int
  surveyed: int             # dialogues tokenized
  total: int                # dialogues in the split
  dropped: int              # surveyed dialogues whose first round exceeds seq_len
  truncated: int            # surveyed dialogues that lose later rounds
  shortest: int             # shortest surveyed dialogue, tokens
  longest: int              # longest surveyed dialogue, tokens
  first_rounds: tuple[int, ...]  # first-round length of every surveyed dialogue, sorted

  @property
  def dropped_fraction(self) -> float:
    return self.dropped / max(self.surveyed, 1)

  def seq_len_keeping(self, fraction: float) -> int:
    """The smallest ``seq_len`` under which at most ``fraction`` of the surveyed dialogues are dropped."""
    keep = max(1, int(np.ceil((1.0 - fraction) * len(self.first_rounds))))
    return int(self.first_rounds[min(keep, len(self.first_rounds)) - 1]) if self.first_rounds else 0

  def summary(self) -> str:
    sample = f"{self.surveyed} of {self.total}" if self.surveyed < self.total else f"all {self.total}"
    return (f"data {self.where} at seq_len={self.seq_len} ({sample} dialogues surveyed): "
            f"{self.dropped} dropped ({100 * self.dropped_fraction:.1f}%, first round longer than seq_len), "
            f"{self.truncated} truncated by rounds; dialogues are {self.shortest}..{self.longest} tokens")


def survey_lengths(config: PipelineConfig, tokenizer: ChatTokenizer, split: str = "train",
                   max_dialogues: int = SURVEY_DIALOGUES) -> LengthSurvey:
  """Tokenizes up to ``max_dialogues`` dialogues of ``split``, evenly spaced over the whole split (the same
  sample on every host), and counts what truncation to ``config.seq_len`` does to them.

  Raises:
    ValueError: the split is empty.
  """
  source = builders.data_source(config.name, config.data_dir, split)
  total = len(source)
  where = f"{config.name}/{split}"
  if total == 0:
    raise ValueError(f"dataset {where} in {config.data_dir} holds no dialogues")
  count = min(total, max_dialogues)
  indices = np.unique(np.linspace(0, total - 1, count).round().astype(np.int64))
  encode = _Encode(tokenizer)
  lengths, first_rounds = [], []
  for i in indices:
    dialogue = encode.map(source[int(i)])
    lengths.append(len(dialogue))
    first_rounds.append(int(dialogue.round_ends()[0]) if dialogue.num_rounds else len(dialogue))
  lengths, first = np.asarray(lengths), np.asarray(first_rounds)
  dropped = first > config.seq_len
  truncated = (lengths > config.seq_len) & ~dropped
  return LengthSurvey(where=where, seq_len=config.seq_len, surveyed=len(indices), total=total,
                      dropped=int(dropped.sum()), truncated=int(truncated.sum()),
                      shortest=int(lengths.min()), longest=int(lengths.max()),
                      first_rounds=tuple(int(x) for x in np.sort(first)))


def empty_batch(batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
  """A batch of padding only (no loss): used to give every host the same number of eval batches."""
  batch = {key: np.zeros((batch_size, seq_len), np.int32) for key in packing.BATCH_KEYS}
  batch["round_index"][:] = -1
  return batch


def make_eval_batches(config: PipelineConfig, tokenizer: ChatTokenizer, split: str = "validation",
                      max_dialogues: int | None = None) -> list[dict[str, np.ndarray]]:
  """This host's share of one pass over ``split``, packed in stored order (no shuffle).

  Every host packs the whole split (eval sets are small), then takes batches ``shard_index``,
  ``shard_index + shard_count``, ...; hosts with fewer batches get padding-only batches, so all hosts run
  the same number of eval steps. Truncation counts are logged.
  """
  source = builders.data_source(config.name, config.data_dir, split)
  count = len(source) if max_dialogues is None else min(max_dialogues, len(source))
  encode = _Encode(tokenizer)
  stats = packing.PackingStats()
  examples = (example for i in range(count)
              for example in packing.prepare_examples(encode.map(source[i]), config.seq_len, config.loss_on,
                                                      config.triplets, stats, log=False))
  batches = list(packing.pack_examples(examples, config.seq_len, config.batch_size))
  _log.info("eval %s/%s: %d dialogues -> %d batches; %d shortened, %d dropped (first round longer than "
            "seq_len=%d), %d rounds removed", config.name, split, stats.dialogues, len(batches),
            stats.truncated_dialogues, stats.dropped_dialogues, config.seq_len, stats.dropped_rounds)
  index, shards = config.shard()
  per_host = -(-len(batches) // shards)
  mine = batches[index::shards]
  return mine + [empty_batch(config.batch_size, config.seq_len) for _ in range(per_host - len(mine))]


def has_split(config: PipelineConfig, split: str) -> bool:
  """Whether the prepared dataset has ``split`` (an imported dataset may lack ``validation``)."""
  try:
    builders.data_source(config.name, config.data_dir, split)
  except ValueError as e:
    if "Unknown split" in str(e):
      return False
    raise
  return True


@dataclasses.dataclass
class Inputs:
  """What the pipeline hands a trainer: the tokenizer and this host's data.

  Attributes:
    tokenizer: the run's tokenizer (see :func:`load_tokenizer`).
    train: the checkpointable train iterator (:func:`make_train_iterator`).
    eval_batches: this host's validation batches (:func:`make_eval_batches`); empty without a validation
      split.
    sample_dialogues: the first ``config.sample_dialogues`` validation dialogues as messages (train ones
      without a validation split).
    survey: the train split's token lengths against ``seq_len`` (:func:`survey_lengths`, the same sample on
      every host); the caller decides how many dropped dialogues are too many.
    shard_report: which train records this host reads (:func:`describe_train_shards`) when the data is
      split at all (several hosts or shards), else ``""``.
  """

  tokenizer: ChatTokenizer
  train: PackedBatchIterator | ConcatenatedBatches
  eval_batches: list[dict[str, np.ndarray]]
  sample_dialogues: list[list[Message]]
  survey: LengthSurvey
  shard_report: str


def open_inputs(config: PipelineConfig, tokenizer: ChatTokenizer | None = None) -> Inputs:
  """Builds the dataset and the tokenizer if missing (process 0 first, the other hosts then read them) and
  opens everything a training run reads. ``tokenizer``: use this one (e.g. a pretrained model's own)
  instead of :func:`load_tokenizer`'s."""
  import jax  # pylint: disable=import-outside-toplevel (only for the multi-host handshake)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    prepare_data(config)
    tokenizer = load_tokenizer(config) if tokenizer is None else tokenizer
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("ism_jax: dataset and tokenizer ready")
  tokenizer = load_tokenizer(config) if tokenizer is None else tokenizer
  validation = has_split(config, "validation")
  if not validation:
    _log.warning("dataset %s has no validation split: evaluation is skipped", config.name)
  evals = make_eval_batches(config, tokenizer, max_dialogues=config.eval_max_dialogues) if validation else []
  samples = read_dialogues(config, "validation" if validation else "train", config.sample_dialogues)
  survey = survey_lengths(config, tokenizer)
  split = config.shard()[1] > 1 or len(config.train_shards()) > 1
  report = describe_train_shards(config) if split else ""
  return Inputs(tokenizer, make_train_iterator(config, tokenizer), evals, samples, survey, report)
