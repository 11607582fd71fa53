"""Import chat JSONL files (OpenAI ``messages`` or ShareGPT ``conversations``) as a TFDS dataset.

Command line::

    python -m ism_jax.data.import_jsonl --input chats.jsonl [--input more.jsonl] --format openai \\
        --name my_chats --data_dir ~/ism_data [--validation_percent 5] [--overwrite]

then train with ``data.name = "my_chats"`` and the same ``data_dir``. Each line is one conversation::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}                                  # openai
    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}   # sharegpt

System, user and tool messages are the query side, assistant messages the answer side. A malformed line
stops the import with ``file:line`` and the field at fault. Conversations with no messages or no assistant
message are skipped, counted and the first few located by ``file:line``; if none is left the import fails
saying why each was skipped. Nothing is written before every line is
read, and the dataset appears atomically: a failed import never touches an existing dataset (replacing one
needs ``--overwrite``).

Split: a conversation goes to validation when the crc32 of its content falls in the first
``validation_percent`` of 100 buckets (stable when files grow or are reordered); validation gets at least
one conversation when there are two or more.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import zlib
from typing import Sequence

import tensorflow_datasets as tfds

from ism_jax.data import builders
from ism_jax.data.dialogue import FORMATS, Message, ReadReport, read_jsonl


@dataclasses.dataclass
class ImportReport:
  """What an import wrote: the dataset folder, split sizes, the skipped-conversation counts and the
  ``(file:line, reason)`` of the first few skipped conversations."""

  path: str
  num_train: int
  num_validation: int
  skipped: dict[str, int]
  read: ReadReport = dataclasses.field(default_factory=ReadReport)

  def __str__(self) -> str:
    return (f"wrote {self.path}: {self.num_train} train, {self.num_validation} validation conversations; "
            f"skipped: {self.read.describe_skips()}")


def _content_hash(messages: Sequence[Message]) -> int:
  text = json.dumps([[m.role, m.content] for m in messages], ensure_ascii=False)
  return zlib.crc32(text.encode("utf-8"))


def split_dialogues(dialogues: Sequence[list[Message]], validation_percent: int,
                    ids: Sequence[str]) -> dict[str, list[tuple[str, list[Message]]]]:
  """Assigns each dialogue to train or validation by a hash of its content (see module docstring)."""
  if not 0 <= validation_percent < 100:
    raise ValueError(f"validation_percent must be in [0, 100), got {validation_percent}")
  hashes = [_content_hash(m) for m in dialogues]
  is_validation = [h % 100 < validation_percent for h in hashes]
  if validation_percent and not any(is_validation) and len(dialogues) >= 2:
    is_validation[min(range(len(hashes)), key=lambda i: (hashes[i] % 100, i))] = True
  splits = {"train": [], "validation": []}
  for dialogue_id, messages, validation in zip(ids, dialogues, is_validation):
    splits["validation" if validation else "train"].append((dialogue_id, messages))
  return splits


def import_jsonl(paths: str | Sequence[str], name: str, data_dir: str, format: str = "openai",
                 validation_percent: int = 5, overwrite: bool = False) -> ImportReport:
  """Reads JSONL conversations and writes them as TFDS dataset ``name`` (array_record) under ``data_dir``.

  Raises:
    DataFormatError: a malformed line (message names ``file:line`` and the field).
    ValueError: no trainable conversation left, or a bad name / option.
    FileExistsError: the dataset exists and ``overwrite`` is false.
  """
  builders.check_dataset_name(name)
  paths = [paths] if isinstance(paths, str) else list(paths)
  final = builders.dataset_dir(name, data_dir)
  if os.path.exists(final) and not overwrite:
    raise FileExistsError(f"dataset {final} already exists; pass --overwrite to replace it or pick another "
                          "--name")
  dialogues, read_report = read_jsonl(paths, format)
  ids = [f"{i:08d}" for i in range(len(dialogues))]
  splits = split_dialogues(dialogues, validation_percent, ids)
  if not splits["train"]:
    raise ValueError(f"all {len(dialogues)} conversations fell into validation; lower validation_percent")
  description = f"Imported from {', '.join(os.path.basename(p) for p in paths)} ({format} format)."
  path = builders.write_dialogues(name, data_dir, splits, overwrite=overwrite, description=description)
  return ImportReport(path=path, num_train=len(splits["train"]), num_validation=len(splits["validation"]),
                      skipped=dict(read_report.skipped), read=read_report)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ism_jax.data.import_jsonl",
                                   description="Import chat JSONL files as a TFDS (array_record) dataset.")
  parser.add_argument("--input", action="append", required=True, help="a JSONL file; repeat for several")
  parser.add_argument("--format", choices=FORMATS, default="openai", help="record format (default openai)")
  parser.add_argument("--name", required=True, help="dataset name: lower-case letters, digits, underscores")
  parser.add_argument("--data_dir", required=True, help="TFDS data directory to write into")
  parser.add_argument("--validation_percent", type=int, default=5, help="share of validation (default 5)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
  args = parser.parse_args(argv)
  tfds.disable_progress_bar()
  try:
    report = import_jsonl(args.input, args.name, os.path.expanduser(args.data_dir), args.format,
                          args.validation_percent, args.overwrite)
  except (ValueError, FileExistsError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
