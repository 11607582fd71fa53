"""Dialogues as lists of messages, their rounds, and parsing of OpenAI / ShareGPT JSON records.

A dialogue is a list of :class:`Message`. Roles ``system``, ``user`` and ``tool`` are the *query side*,
``assistant`` is the *answer side*. A **round** is the run of consecutive non-assistant messages (possibly
empty) followed by one assistant message; the non-assistant messages of a round form ONE query block::

    system, user, assistant, user, tool, user, assistant, user
    \\_____ round 0 _______/ \\______ round 1 ________/   (trailing user: no answer, not a round)

Parsing validates every field and raises :class:`DataFormatError` naming the source (``file:line``) and the
field that is wrong. Conversations that parse but cannot train (no messages, no assistant message) are not
errors: callers skip and count them (see :func:`trainable_problem`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, Iterator, Sequence, TextIO

QUERY_ROLES = ("system", "user", "tool")
ANSWER_ROLE = "assistant"
ROLES = QUERY_ROLES + (ANSWER_ROLE,)
FORMATS = ("openai", "sharegpt")

# Role names seen in the wild, mapped onto the four roles above.
_OPENAI_ROLES = {
    "system": "system", "developer": "system", "user": "user", "tool": "tool", "function": "tool",
    "assistant": "assistant",
}
_SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "function_call": "assistant",
    "tool": "tool", "observation": "tool", "function_response": "tool", "function": "tool",
}


class DataFormatError(ValueError):
  """A record does not follow its declared format; the message names the place and the field."""


@dataclasses.dataclass(frozen=True)
class Message:
  """One message of a dialogue. ``role`` is one of :data:`ROLES`; ``content`` is plain text."""

  role: str
  content: str

  def __post_init__(self):
    if self.role not in ROLES:
      raise ValueError(f"message role must be one of {ROLES}, got {self.role!r}")
    if not isinstance(self.content, str):
      raise TypeError(f"message content must be a str, got {type(self.content).__name__}")

  @property
  def is_query(self) -> bool:
    return self.role != ANSWER_ROLE


@dataclasses.dataclass(frozen=True)
class Round:
  """One round: the query-side messages (maybe none) and the assistant answer that follows them."""

  query: tuple[Message, ...]
  answer: Message


def split_dialogue(messages: Sequence[Message]) -> tuple[list[Round], tuple[Message, ...]]:
  """Splits a dialogue into its rounds and the query messages after the last answer (a query to answer).

  >>> m = [Message("user", "hi"), Message("assistant", "hello"), Message("user", "bye")]
  >>> rounds, trailing = split_dialogue(m)
  >>> [(len(r.query), r.answer.content) for r in rounds], [t.content for t in trailing]
  ([(1, 'hello')], ['bye'])
  """
  rounds, pending = [], []
  for message in messages:
    if message.is_query:
      pending.append(message)
    else:
      rounds.append(Round(tuple(pending), message))
      pending = []
  return rounds, tuple(pending)


def split_rounds(messages: Sequence[Message]) -> list[Round]:
  """The complete rounds of a dialogue (:func:`split_dialogue` without the trailing query messages)."""
  return split_dialogue(messages)[0]


def check_query_block(messages: Sequence[Message]) -> None:
  """Raises ``ValueError`` unless ``messages`` can form one query block (no assistant message)."""
  for message in messages:
    if not message.is_query:
      raise ValueError(f"a query block holds system/user/tool messages only, got role {message.role!r}")


def trainable_problem(messages: Sequence[Message]) -> str | None:
  """Why a parsed conversation cannot train (``"empty"``, ``"no_assistant"``), or ``None`` if it can."""
  if not messages:
    return "empty"
  if not any(m.role == ANSWER_ROLE for m in messages):
    return "no_assistant"
  return None


# ----------------------------------------------------------------------------------------------------------
# JSON records.
# ----------------------------------------------------------------------------------------------------------


def _text_content(value: Any, where: str, field: str) -> str:
  """Message content: a string, ``null`` (empty), or a list of ``{"type": "text", "text": ...}`` parts."""
  if value is None:
    return ""
  if isinstance(value, str):
    return value
  if isinstance(value, list):
    parts = []
    for i, part in enumerate(value):
      if isinstance(part, str):
        parts.append(part)
      elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        parts.append(part["text"])
      else:
        raise DataFormatError(
            f"{where}: {field}[{i}] is not a text part (expected a string or "
            f'{{"type": "text", "text": "..."}}, got {json.dumps(part)[:80]}); only text content is supported'
        )
    return "".join(parts)
  raise DataFormatError(f"{where}: {field} must be a string or a list of text parts, got "
                        f"{type(value).__name__}")


def _record_list(record: Any, where: str, field: str, format_hint: str) -> list:
  """``record[field]``, checked to be a list inside a JSON object; errors name ``where`` and the format."""
  if not isinstance(record, dict):
    raise DataFormatError(f"{where}: expected a JSON object with a \"{field}\" list, got "
                          f"{type(record).__name__}")
  if field not in record:
    raise DataFormatError(f"{where}: missing field \"{field}\" (fields present: {sorted(record)}); "
                          f"{format_hint}")
  items = record[field]
  if not isinstance(items, list):
    raise DataFormatError(f"{where}: \"{field}\" must be a list, got {type(items).__name__}")
  return items


def parse_openai_record(record: Any, where: str = "record") -> list[Message]:
  """Parses ``{"messages": [{"role": ..., "content": ...}, ...]}`` (OpenAI chat fine-tuning format).

  Roles ``developer`` → system and ``function`` → tool. An assistant message without content but with
  ``tool_calls`` (or legacy ``function_call``) keeps those calls as its content, written as compact JSON.

  Args:
    record: the decoded JSON value of one line.
    where: the place to name in errors, e.g. ``"chats.jsonl:12"``.
  """
  items = _record_list(record, where, "messages",
                       "OpenAI format is {\"messages\": [{\"role\": ..., \"content\": ...}]}")
  messages = []
  for i, item in enumerate(items):
    field = f"messages[{i}]"
    if not isinstance(item, dict):
      raise DataFormatError(f"{where}: {field} must be an object, got {type(item).__name__}")
    role = item.get("role")
    if role not in _OPENAI_ROLES:
      raise DataFormatError(f"{where}: {field}.role = {role!r} is not one of {sorted(_OPENAI_ROLES)}")
    role = _OPENAI_ROLES[role]
    if "content" not in item and not (role == ANSWER_ROLE and _calls(item)):
      raise DataFormatError(f"{where}: {field} has no \"content\" field")
    content = _text_content(item.get("content"), where, f"{field}.content")
    if role == ANSWER_ROLE and not content and _calls(item):
      content = json.dumps(_calls(item), separators=(",", ":"), ensure_ascii=False)
    messages.append(Message(role, content))
  return messages


def _calls(item: dict) -> Any:
  return item.get("tool_calls") or item.get("function_call")


def parse_sharegpt_record(record: Any, where: str = "record") -> list[Message]:
  """Parses ``{"conversations": [{"from": ..., "value": ...}, ...]}`` (ShareGPT format).

  ``from`` may be ``human``/``user``, ``gpt``/``assistant`` (and ``chatgpt``, ``bing``, ``bard``),
  ``system``, ``tool``/``observation``/``function_response`` (tool side) or ``function_call`` (assistant).
  A top-level ``"system"`` string, when present, becomes a leading system message.
  """
  items = _record_list(record, where, "conversations",
                       "ShareGPT format is {\"conversations\": [{\"from\": ..., \"value\": ...}]}")
  messages = []
  system = record.get("system")
  if system is not None:
    if not isinstance(system, str):
      raise DataFormatError(f"{where}: \"system\" must be a string, got {type(system).__name__}")
    if system:
      messages.append(Message("system", system))
  for i, item in enumerate(items):
    field = f"conversations[{i}]"
    if not isinstance(item, dict):
      raise DataFormatError(f"{where}: {field} must be an object, got {type(item).__name__}")
    speaker = item.get("from")
    if speaker not in _SHAREGPT_ROLES:
      raise DataFormatError(f"{where}: {field}.from = {speaker!r} is not one of {sorted(_SHAREGPT_ROLES)}")
    if "value" not in item:
      raise DataFormatError(f"{where}: {field} has no \"value\" field")
    messages.append(Message(_SHAREGPT_ROLES[speaker], _text_content(item["value"], where, f"{field}.value")))
  return messages


PARSERS = {"openai": parse_openai_record, "sharegpt": parse_sharegpt_record}


# What each reason of trainable_problem() means, for messages.
SKIP_REASONS = {"empty": "no messages", "no_assistant": "no assistant message"}
SHOWN_SKIPS = 5  # skipped conversations located by file:line in messages; the rest are counted


@dataclasses.dataclass
class ReadReport:
  """What :func:`read_jsonl` kept and skipped. ``skipped`` maps a reason to a count; ``locations`` holds
  ``(file:line, reason)`` of the first :data:`SHOWN_SKIPS` skipped conversations."""

  kept: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  locations: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  def skip(self, reason: str, where: str = "?") -> None:
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    if len(self.locations) < SHOWN_SKIPS:
      self.locations.append((where, reason))

  def describe_skips(self) -> str:
    """E.g. ``"2 no assistant message, 1 no messages (c.jsonl:1: no assistant message; ...; and 1 more)"``."""
    total = sum(self.skipped.values())
    if not total:
      return "none"
    counts = ", ".join(f"{n} {SKIP_REASONS.get(why, why)}" for why, n in sorted(self.skipped.items()))
    shown = "; ".join(f"{where}: {SKIP_REASONS.get(why, why)}" for where, why in self.locations)
    more = total - len(self.locations)
    return f"{counts} ({shown}{f'; and {more} more' if more else ''})"


def jsonl_records(stream: TextIO, name: str) -> Iterator[tuple[str, Any]]:
  """``(where, record)`` for every non-blank line of a JSONL stream, ``where`` being ``name:line``.

  Raises:
    DataFormatError: a line that is not one complete JSON value, naming ``name:line`` and the column.
  """
  for line_number, line in enumerate(stream, start=1):
    if not line.strip():
      continue
    where = f"{name}:{line_number}"
    try:
      record = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as e:
      raise DataFormatError(f"{where}: invalid JSON ({e.msg} at column {e.pos + 1}); each line must be "
                            "one complete JSON object") from None
    yield where, record


def read_jsonl(paths: str | Iterable[str], format: str = "openai") -> tuple[list[list[Message]], ReadReport]:
  """Reads conversations from JSONL files (one JSON object per line; blank lines are ignored).

  Malformed lines raise :class:`DataFormatError` with ``file:line`` and the field. Conversations with no
  messages or no assistant message are skipped, counted in the report and the first few located by
  ``file:line``. If nothing trainable is left, a ``ValueError`` says why each conversation was skipped (or
  that the files hold no records at all).

  Returns:
    ``(dialogues, report)``: the trainable dialogues in file order, and the counts.
  """
  if format not in PARSERS:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
  parse = PARSERS[format]
  paths = [paths] if isinstance(paths, str) else list(paths)
  if not paths:
    raise ValueError("no input files given")
  dialogues, report = [], ReadReport()
  for path in paths:
    with open(path, encoding="utf-8") as f:
      for where, record in jsonl_records(f, path):
        messages = parse(record, where)
        problem = trainable_problem(messages)
        if problem is None:
          dialogues.append(messages)
          report.kept += 1
        else:
          report.skip(problem, where)
  skipped = sum(report.skipped.values())
  if not dialogues and not skipped:
    raise ValueError(f"no trainable conversation in {', '.join(paths)}: the files hold no records (only "
                     f"blank lines); each line must be one conversation ({format} format)")
  if not dialogues:
    raise ValueError(
        f"no trainable conversation in {', '.join(paths)}: all {skipped} conversations were skipped"
        f", {report.describe_skips()}; every conversation needs at least one assistant message "
        f"({format} format)")
  return dialogues, report
