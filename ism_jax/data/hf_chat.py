"""Chat formats of Hugging Face checkpoints, split into ISM query and answer blocks.

Same contract as :mod:`ism_jax.data.chat_template`: a round's query block holds its system/user/tool messages
and the assistant header; its answer block is the assistant content plus the format's end-of-turn token.
Token ids equal what ``transformers``' ``apply_chat_template`` gives for the same dialogue, except that the
query/answer boundary is always a token boundary (content is encoded on its own).

**Llama 3** (``<|eot_id|>`` ends a turn; content is stripped, as the official template does; ``<s>`` stands
for ``<|begin_of_text|>``, ``[role]`` for ``<|start_header_id|>role<|end_header_id|>\\n\\n``)::

    <s> [user] Hi <|eot_id|> [assistant] | Yo <|eot_id|> | [user] ...
    \\______________ QUERY ______________/   \\_ ANSWER __/   QUERY (round 1)

**ChatML** (Qwen2; ``<|im_end|>`` ends a turn; the newline after it opens the next query block; ``[role]``
stands for ``<|im_start|>role\\n``)::

    [system] S <|im_end|> \\n [user] Hi <|im_end|> \\n [assistant] | Yo <|im_end|> | \\n [user] ...
    \\____________________ QUERY (round 0) _____________________/   \\_ ANSWER __/   QUERY (round 1)

so a whole dialogue is ``apply_chat_template``'s ids without the final newline. Tool messages use the role
name ``ipython`` in Llama 3 and ``tool`` in ChatML.
"""

from __future__ import annotations

import abc
import re
from typing import Sequence, Union

from ism_jax.data.hf_tokenizer import HFTokenizer
from ism_jax.data import chat_template
from ism_jax.data.chat_template import EncodedDialogue
from ism_jax.data.dialogue import Message, check_query_block


class Special(str):
  """A special token given by its text, inserted by id (never encoded from text)."""


Part = Union[str, Special]


def encode_parts(tokenizer: HFTokenizer, parts: Sequence[Part]) -> list[int]:
  """Special tokens by id; each run of adjacent text parts encoded as one string (as rendered)."""
  ids, text = [], ""
  for part in parts:
    if isinstance(part, Special):
      ids += tokenizer.encode(text) if text else []
      ids.append(tokenizer.token_id(part))
      text = ""
    else:
      text += part
  return ids + (tokenizer.encode(text) if text else [])


class ChatFormat(abc.ABC):
  """A chat format as lists of parts. Subclasses define the special tokens and both layouts."""

  name = ""
  end_of_turn = ""
  tokens: tuple[str, ...] = ()  # special tokens the tokenizer must have

  def __init__(self, default_system: str | None = None):
    self.default_system = default_system  # system prompt the template inserts when a dialogue has none

  @abc.abstractmethod
  def query_parts(self, messages: Sequence[Message], first: bool) -> list[Part]:
    """One round's query block: bos (``first`` only), the messages, the assistant header."""

  @abc.abstractmethod
  def answer_parts(self, content: str) -> list[Part]:
    """One answer: the content and the end-of-turn token."""

  def _with_default_system(self, messages: Sequence[Message], first: bool) -> list[Message]:
    if first and self.default_system is not None and not (messages and messages[0].role == "system"):
      return [Message("system", self.default_system), *messages]
    return list(messages)


class Llama3Format(ChatFormat):
  """``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`` after ``<|begin_of_text|>``."""

  name = "llama3"
  end_of_turn = "<|eot_id|>"
  tokens = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
  roles = {"system": "system", "user": "user", "tool": "ipython", "assistant": "assistant"}

  def _header(self, role: str) -> list[Part]:
    return [Special("<|start_header_id|>"), self.roles[role], Special("<|end_header_id|>"), "\n\n"]

  def query_parts(self, messages, first):
    parts: list[Part] = [Special("<|begin_of_text|>")] if first else []
    for message in self._with_default_system(messages, first):
      parts += self._header(message.role) + [message.content.strip(), Special(self.end_of_turn)]
    return parts + self._header("assistant")

  def answer_parts(self, content):
    return [content.strip(), Special(self.end_of_turn)]


class ChatMLFormat(ChatFormat):
  """``<|im_start|>role\\ncontent<|im_end|>\\n`` (Qwen2)."""

  name = "chatml"
  end_of_turn = "<|im_end|>"
  tokens = ("<|im_start|>", "<|im_end|>")

  def query_parts(self, messages, first):
    parts: list[Part] = [] if first else ["\n"]
    for message in self._with_default_system(messages, first):
      parts += [Special("<|im_start|>"), f"{message.role}\n{message.content}", Special(self.end_of_turn),
                "\n"]
    return parts + [Special("<|im_start|>"), "assistant\n"]

  def answer_parts(self, content):
    return [content, Special(self.end_of_turn)]


FORMATS = {f.name: f for f in (Llama3Format, ChatMLFormat)}
# The default system prompt a ChatML template writes as a literal (Qwen2: "You are a helpful assistant.").
# The newline is written as the escape \n (Qwen2) or as a newline character (SmolLM2's GGUF template).
_CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}]*?)<\|im_end\|>")


def template_default_system(template: str | None) -> str | None:
  """The system prompt a ChatML template writes (as a literal) when a dialogue has none, or ``None``."""
  found = _CHATML_DEFAULT_SYSTEM.search(template or "")
  return found.group(1).replace("\\n", "\n") if found else None


def detect_format(tokenizer: HFTokenizer) -> type[ChatFormat]:
  """The chat format of a checkpoint's template (or, without one, of its special tokens)."""
  template = tokenizer.chat_template or ""
  if "<|start_header_id|>" in template:
    return Llama3Format
  if "<|im_start|>" in template:
    return ChatMLFormat
  if not template:
    for cls in FORMATS.values():
      if all(tokenizer.has_token(t) for t in cls.tokens):
        return cls
  what = "its chat template" if template else "it has no chat template and its special tokens"
  raise ValueError(f"{tokenizer.directory}: {what} match no supported chat format ({sorted(FORMATS)}); pass "
                   "chat_format='llama3' or 'chatml' to load_hf_tokenizer")


class HFChatTokenizer:
  """A checkpoint's tokenizer plus its chat format: what the data pipeline and inference need.

  Mirrors :class:`ism_jax.data.tokenizer.ChatTokenizer` (``encode``, ``decode``, ``render``, ``vocab_size``,
  ``pad_id``, ``bos_id``, ``eot_id``) and the functions of :mod:`ism_jax.data.chat_template` as methods
  (``encode_dialogue``, ``encode_query_block``, ``encode_answer``, ``stop_token_id``).

  Attributes:
    path: the checkpoint directory the tokenizer files were read from.
    format: the :class:`ChatFormat`.
    eot_id: the end-of-turn id (answers end with it; decoding stops on it).
    bos_id: id of the tokenizer's bos token, or ``None`` (Qwen2 has none).
    pad_id: id of the pad token, else of the end of turn (padding is masked, so its id does not matter).
  """

  def __init__(self, tokenizer: HFTokenizer, chat_format: ChatFormat):
    missing = [t for t in chat_format.tokens if not tokenizer.has_token(t)]
    if missing:
      raise ValueError(f"{tokenizer.directory}: the {chat_format.name} chat format needs special tokens "
                       f"{missing}, which the tokenizer lacks; pick the checkpoint's own format")
    self.tokenizer = tokenizer
    self.format = chat_format
    self.path = tokenizer.directory
    self.eot_id = tokenizer.token_id(chat_format.end_of_turn)
    self.bos_id = tokenizer.token_id(tokenizer.bos_token) if tokenizer.bos_token else None
    self.pad_id = tokenizer.token_id(tokenizer.pad_token) if tokenizer.pad_token else self.eot_id

  def __reduce__(self):
    # Picklable (e.g. for data worker processes): rebuilt from the checkpoint directory.
    return load_hf_tokenizer, (self.path, self.format.name, self.format.default_system)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text)

  def decode(self, ids) -> str:
    return self.tokenizer.decode(ids)

  def render(self, ids) -> str:
    return self.tokenizer.render(ids)

  def stop_token_id(self) -> int:
    return self.eot_id

  def encode_query_block(self, messages: Sequence[Message], *, first: bool = False) -> list[int]:
    """One round's query side (system/user/tool messages, then the assistant header)."""
    check_query_block(messages)
    return encode_parts(self.tokenizer, self.format.query_parts(messages, first))

  def encode_answer(self, content: str) -> list[int]:
    """One answer: the content then the end-of-turn token."""
    return encode_parts(self.tokenizer, self.format.answer_parts(content))

  def encode_dialogue(self, messages: Sequence[Message]) -> EncodedDialogue:
    """The complete rounds of a dialogue as an :class:`EncodedDialogue` (all answers are targets)."""
    return chat_template.encode_dialogue(self, messages)


def load_hf_tokenizer(directory: str, chat_format: str | None = None,
                      default_system: str | None = "auto") -> HFChatTokenizer:
  """The tokenizer and chat format of a Hugging Face checkpoint directory.

  Args:
    directory: holds tokenizer.json (or tokenizer.model) and tokenizer_config.json.
    chat_format: ``"llama3"`` or ``"chatml"``; default: detected from the chat template.
    default_system: system prompt inserted when a dialogue has none; ``"auto"`` takes the literal default of a
      ChatML template (Qwen2's "You are a helpful assistant."), ``None`` inserts nothing.
  """
  tokenizer = HFTokenizer(directory)
  if chat_format is not None and chat_format not in FORMATS:
    raise ValueError(f"chat_format={chat_format!r} must be one of {sorted(FORMATS)}")
  cls = detect_format(tokenizer) if chat_format is None else FORMATS[chat_format]
  if default_system == "auto":
    default_system = template_default_system(tokenizer.chat_template) if cls is ChatMLFormat else None
  return HFChatTokenizer(tokenizer, cls(default_system))
