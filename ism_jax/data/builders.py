"""TFDS datasets of dialogues, written as array_record and read with ``tfds.data_source`` (no TensorFlow).

Every dataset stores dialogues as text, one example per dialogue::

    {"id": "<source id>", "messages": {"role": ["user", "assistant", ...], "content": ["hi", "hello", ...]}}

so the tokenizer can change without rebuilding. Splits are ``train`` and ``validation``, assigned
deterministically. Builders:

* ``chitchat``: the Chit-Chat Challenge corpus shipped by the ``chitchat_dataset`` package (MIT). Of its
  7,168 conversations the 4,018 with two speakers are kept (3,821 train / 197 validation). The speaker who
  opens a conversation is the user side; one speaker's consecutive chat lines form one message (joined by
  newlines). 5% of conversations (by a hash of their id) are validation.
* ``synthetic_multiturn``: the seeded task of :mod:`ism_jax.data.synthetic`; configs ``default`` (20,000
  train / 1,000 validation) and ``small`` (2,000 / 200), or any :class:`SyntheticConfig`.
* user JSONL data: :func:`write_dialogues` (used by :mod:`ism_jax.data.import_jsonl`).

Reading::

    source = tfds.data_source("chitchat", data_dir=DIR, split="train")   # random access, len(source)
    messages = record_to_messages(source[0])

TFDS writes into an ``incomplete.*`` folder and renames it into place when done, so a failed build never
leaves a half-written dataset; :func:`write_dialogues` with ``overwrite=True`` builds the replacement in a
temporary folder first and swaps it in only when complete.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import re
import shutil
import tempfile
import types
import zlib
from typing import Iterable, Mapping, Sequence

import tensorflow_datasets as tfds

from ism_jax.data import synthetic
from ism_jax.data.dialogue import Message, ROLES, trainable_problem

SPLITS = ("train", "validation")
VERSION = "1.0.0"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_RESERVED_NAMES = ("chitchat", "synthetic_multiturn")


def dialogue_features() -> tfds.features.FeaturesDict:
  """The stored form of one dialogue (text only)."""
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "messages": tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()}),
  })


def messages_to_record(dialogue_id: str, messages: Sequence[Message]) -> dict:
  return {"id": dialogue_id, "messages": {"role": [m.role for m in messages],
                                          "content": [m.content for m in messages]}}


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def record_to_messages(record: Mapping) -> list[Message]:
  """A record read back from a data source (byte strings) as a list of :class:`Message`."""
  roles, contents = record["messages"]["role"], record["messages"]["content"]
  return [Message(_text(role), _text(content)) for role, content in zip(roles, contents)]


def validation_by_hash(key: str, percent: int) -> bool:
  """Deterministic split: whether ``key`` falls in the first ``percent`` of 100 hash buckets."""
  return zlib.crc32(key.encode("utf-8")) % 100 < percent


class _NoCodePath:
  """Class attribute that is always ``None``: these builders have no download checksums file to locate.

  (TFDS would otherwise inspect the package layout, which needs the optional ``importlib_resources``.)
  """

  def __get__(self, obj, objtype=None):
    return None


class DialogueBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the dialogue datasets: subclasses implement :meth:`dialogues`, yielding ``(id, messages)``."""

  code_path = _NoCodePath()

  VERSION = tfds.core.Version(VERSION)
  DESCRIPTION = "Dialogues stored as role/content text."

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION, features=dialogue_features())

  @abc.abstractmethod
  def dialogues(self, split: str) -> Iterable[tuple[str, list[Message]]]:
    """Yields ``(id, messages)`` for every dialogue of ``split``."""

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    for dialogue_id, messages in self.dialogues(split):
      yield dialogue_id, messages_to_record(dialogue_id, messages)


# ----------------------------------------------------------------------------------------------------------
# chitchat
# ----------------------------------------------------------------------------------------------------------


def chitchat_dialogues(path: str | None = None) -> Iterable[tuple[str, list[Message]]]:
  """All conversations of the installed ``chitchat_dataset`` package, as ``(id, messages)``.

  The first sender is the user; every other sender is the assistant. Consecutive chat lines of one sender
  are already grouped by the corpus; they are joined with newlines.
  """
  if path is None:
    import chitchat_dataset  # pylint: disable=import-outside-toplevel
    path = os.path.join(os.path.dirname(chitchat_dataset.__file__), "dataset.json")
  with open(path, encoding="utf-8") as f:
    corpus = json.load(f)
  for conversation_id in sorted(corpus):
    turns = corpus[conversation_id]["messages"]
    if not turns or not turns[0]:
      continue
    opener = turns[0][0]["sender"]
    messages = []
    for turn in turns:
      if not turn:
        continue
      role = "user" if turn[0]["sender"] == opener else "assistant"
      messages.append(Message(role, "\n".join(line["text"] for line in turn)))
    if trainable_problem(messages) is None:
      yield conversation_id, messages


class Chitchat(DialogueBuilder):
  """The Chit-Chat Challenge corpus (``chitchat_dataset`` package, MIT), read offline."""

  DESCRIPTION = ("Chit-Chat Challenge two-person conversations (PyPI chitchat-dataset, MIT). The opening "
                 "speaker is the user side; single-speaker conversations are left out; 5% of conversations "
                 "(crc32 of the id) are validation.")
  VALIDATION_PERCENT = 5

  def dialogues(self, split):
    for conversation_id, messages in chitchat_dialogues():
      if validation_by_hash(conversation_id, self.VALIDATION_PERCENT) == (split == "validation"):
        yield conversation_id, messages


# ----------------------------------------------------------------------------------------------------------
# synthetic_multiturn
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  """One synthetic dataset: seed, sizes and task parameters."""

  version: str = VERSION
  release_notes: dict = dataclasses.field(default_factory=lambda: {VERSION: "Seeded synthetic dialogues."})
  seed: int = 0
  num_train: int = 20_000
  num_validation: int = 1_000
  task: synthetic.SyntheticTask = synthetic.SyntheticTask()


class SyntheticMultiturn(DialogueBuilder):
  """The seeded multi-round memory task of :mod:`ism_jax.data.synthetic`."""

  DESCRIPTION = ("Synthetic multi-round task: facts from earlier rounds, operation word at the end of the "
                 "query.")
  BUILDER_CONFIGS = [
      SyntheticConfig(name="default", description="20,000 train / 1,000 validation dialogues, seed 0."),
      SyntheticConfig(name="small", num_train=2_000, num_validation=200,
                      description="2,000 train / 200 validation dialogues, seed 0."),
  ]

  def dialogues(self, split):
    config = self.builder_config
    count = config.num_train if split == "train" else config.num_validation
    for index in range(count):
      yield f"{split}-{index}", synthetic.generate_dialogue(config.seed, split, index, config.task)


# ----------------------------------------------------------------------------------------------------------
# Dialogues from memory (JSONL import).
# ----------------------------------------------------------------------------------------------------------


class _InMemoryDialogues(DialogueBuilder, skip_registration=True):
  """Writes given splits; the dataset name is set on a subclass made by :func:`write_dialogues`."""

  DESCRIPTION = "Dialogues imported from user JSONL files (ism_jax.data.import_jsonl)."

  def __init__(self, *, splits: Mapping[str, Sequence[tuple[str, list[Message]]]], **kwargs):
    self._splits = splits
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # TFDS refuses empty splits: write only those with dialogues.
    return {split: self._generate_examples(split) for split in SPLITS if self._splits.get(split)}

  def dialogues(self, split):
    return self._splits[split]


def check_dataset_name(name: str) -> None:
  """Names for imported datasets: TFDS-style snake case, and not the name of a built-in builder."""
  if not _NAME_RE.match(name):
    raise ValueError(f"dataset name {name!r} is not valid: use lower-case letters, digits and underscores, "
                     "starting with a letter (e.g. my_chats)")
  if name in _RESERVED_NAMES:
    raise ValueError(f"dataset name {name!r} belongs to a built-in dataset; choose another name")


def write_dialogues(name: str, data_dir: str, splits: Mapping[str, Sequence[tuple[str, list[Message]]]],
                    overwrite: bool = False, description: str | None = None) -> str:
  """Writes ``{"train": [(id, messages), ...], "validation": [...]}`` as TFDS dataset ``name``.

  Empty splits are left out (TFDS cannot store them); ``train`` must not be empty.

  The dataset appears only when complete: it is built under a temporary folder of ``data_dir`` and renamed
  into ``data_dir/name/1.0.0``. An existing dataset is kept unless ``overwrite``; then it is replaced only
  after the new one is fully written.

  Returns:
    The dataset's folder (``data_dir/name/1.0.0``).
  """
  check_dataset_name(name)
  seen = set()
  for split, items in splits.items():
    if split not in SPLITS:
      raise ValueError(f"split {split!r} is not one of {SPLITS}")
    for dialogue_id, messages in items:
      if dialogue_id in seen:
        raise ValueError(f"dialogue id {dialogue_id!r} occurs twice; ids must be unique across splits")
      seen.add(dialogue_id)
      for m in messages:
        if m.role not in ROLES:
          raise ValueError(f"dialogue {dialogue_id!r}: role {m.role!r} is not one of {ROLES}")
  if not splits.get("train"):
    raise ValueError(f"dataset {name!r}: the train split is empty; nothing to write")
  final = os.path.join(data_dir, name, VERSION)
  if os.path.exists(final) and not overwrite:
    raise FileExistsError(f"dataset {final} already exists; pass overwrite=True (--overwrite) to replace "
                          "it, or choose another name")
  os.makedirs(data_dir, exist_ok=True)
  attributes = {"name": name, "__module__": __name__}
  if description:
    attributes["DESCRIPTION"] = description
  cls = types.new_class(f"Imported_{name}", (_InMemoryDialogues,), {"skip_registration": True},
                        lambda ns: ns.update(attributes))
  staging = tempfile.mkdtemp(prefix=f".{name}.staging-", dir=data_dir)
  try:
    builder = cls(splits={s: list(v) for s, v in splits.items()}, data_dir=staging)
    builder.download_and_prepare(download_dir=os.path.join(staging, "downloads"))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    retired = None
    if os.path.exists(final):
      retired = tempfile.mkdtemp(prefix=f".{VERSION}.old-", dir=os.path.dirname(final))
      os.replace(final, os.path.join(retired, VERSION))
    os.replace(os.path.join(staging, name, VERSION), final)
    if retired:
      shutil.rmtree(retired, ignore_errors=True)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return final


# ----------------------------------------------------------------------------------------------------------
# Preparing and reading.
# ----------------------------------------------------------------------------------------------------------

BUILDERS = {"chitchat": Chitchat, "synthetic_multiturn": SyntheticMultiturn}


def canonical_name(name: str) -> str:
  """Adds the default config to a builder with configs: ``synthetic_multiturn`` → ``.../default``."""
  builder = BUILDERS.get(name)
  if builder is not None and builder.BUILDER_CONFIGS:
    return f"{name}/{builder.BUILDER_CONFIGS[0].name}"
  return name


def dataset_dir(name: str, data_dir: str) -> str:
  """A prepared dataset's folder, e.g. ``DIR/chitchat/1.0.0`` or ``DIR/synthetic_multiturn/small/1.0.0``."""
  return os.path.join(data_dir, *canonical_name(name).split("/"), VERSION)


def prepare(name: str, data_dir: str, config: tfds.core.BuilderConfig | None = None) -> str:
  """Builds ``chitchat`` or ``synthetic_multiturn[/config]`` under ``data_dir`` unless already there.

  Args:
    name: ``"chitchat"``, ``"synthetic_multiturn"`` (config ``default``), ``"synthetic_multiturn/small"``.
    config: a custom :class:`SyntheticConfig` (its ``name`` then names the folder).

  Returns:
    The dataset name to pass to :func:`data_source` (``"synthetic_multiturn/<config>"`` for synthetic).
  """
  base, _, config_name = name.partition("/")
  if base not in BUILDERS:
    raise ValueError(f"no builder named {base!r} (builders: {sorted(BUILDERS)}); user data is imported with "
                     "`python -m ism_jax.data.import_jsonl`")
  kwargs = {"data_dir": data_dir}
  if config is not None:
    kwargs["config"] = config
  elif config_name:
    kwargs["config"] = config_name
  builder = BUILDERS[base](**kwargs)
  builder.download_and_prepare(download_dir=os.path.join(data_dir, "downloads"))
  return f"{base}/{builder.builder_config.name}" if builder.builder_config else base


def data_source(name: str, data_dir: str, split: str):
  """Random-access source of ``split`` (``len``, ``[i]``) for a prepared dataset; reads array_record."""
  if not os.path.isdir(dataset_dir(name, data_dir)):
    raise FileNotFoundError(
        f"dataset {name!r} is not prepared under {data_dir} (no folder {dataset_dir(name, data_dir)}); build "
        "it with ism_jax.data.builders.prepare (chitchat, synthetic_multiturn) or import JSONL with "
        "`python -m ism_jax.data.import_jsonl`")
  return tfds.data_source(canonical_name(name), data_dir=data_dir, split=split)
