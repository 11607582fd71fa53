"""A Hugging Face checkpoint's own tokenizer: ``tokenizer.json`` through ``tokenizers``, else sentencepiece.

:class:`HFTokenizer` reads the tokenizer files of a checkpoint directory and offers the text side of
:class:`ism_jax.data.tokenizer.ChatTokenizer`: ``encode`` (plain text, never special tokens), ``decode``
(special tokens dropped), ``render`` (special tokens shown), ``token_id`` (a special token's id) and
``vocab_size``. It also reads the special tokens (``bos_token``, ``eos_token``, ``pad_token``) and the chat
template text from ``tokenizer_config.json`` / ``chat_template.jinja`` / ``chat_template.json``.

Text that contains a special token's string (a user typing ``<|im_end|>``) encodes as ordinary characters,
so message content cannot forge a turn boundary (transformers' ``apply_chat_template`` would parse it).
"""

from __future__ import annotations

import json
import os
from typing import Iterable

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _token_text(value) -> str | None:
  """A special token entry of tokenizer_config.json: a string or ``{"content": ...}``."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def read_chat_template(directory: str) -> str | None:
  """The checkpoint's chat template text (the default one when several are named), or ``None``."""
  jinja = os.path.join(directory, "chat_template.jinja")
  if os.path.exists(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  template = _read_json(os.path.join(directory, "chat_template.json")).get("chat_template")
  if template is None:
    template = _read_json(os.path.join(directory, "tokenizer_config.json")).get("chat_template")
  if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default", next(iter(named.values()), None))
  return template


class HFTokenizer:
  """The tokenizer files of a Hugging Face checkpoint directory.

  Attributes:
    directory: the checkpoint directory.
    backend: ``"tokenizers"`` (tokenizer.json) or ``"sentencepiece"`` (tokenizer.model).
    bos_token, eos_token, pad_token: special token strings from tokenizer_config.json (``None`` if unset).
    chat_template: the chat template text, or ``None``.
  """

  def __init__(self, directory: str):
    self.directory = directory
    config = _read_json(os.path.join(directory, "special_tokens_map.json"))
    config.update(_read_json(os.path.join(directory, "tokenizer_config.json")))
    self.bos_token = _token_text(config.get("bos_token"))
    self.eos_token = _token_text(config.get("eos_token"))
    self.pad_token = _token_text(config.get("pad_token"))
    self.chat_template = read_chat_template(directory)
    if os.path.exists(os.path.join(directory, TOKENIZER_JSON)):
      from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
      self.backend = "tokenizers"
      self._tok = Tokenizer.from_file(os.path.join(directory, TOKENIZER_JSON))
      self._tok.encode_special_tokens = True  # special-token strings in text stay text
    elif os.path.exists(os.path.join(directory, SENTENCEPIECE_MODEL)):
      import sentencepiece as spm  # pylint: disable=import-outside-toplevel
      self.backend = "sentencepiece"
      self._sp = spm.SentencePieceProcessor(model_file=os.path.join(directory, SENTENCEPIECE_MODEL))
    else:
      raise FileNotFoundError(f"{directory} has neither {TOKENIZER_JSON} nor {SENTENCEPIECE_MODEL}; copy the "
                              "checkpoint's tokenizer files next to its config.json")

  @property
  def vocab_size(self) -> int:
    """Number of token ids, added tokens included (may be less than the model's embedding rows)."""
    if self.backend == "tokenizers":
      return self._tok.get_vocab_size(with_added_tokens=True)
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    """Text to ids: no bos/eos added, special-token strings encoded as plain characters."""
    if self.backend == "tokenizers":
      return self._tok.encode(text, add_special_tokens=False).ids
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Ids to text with special tokens dropped."""
    ids = [int(i) for i in ids]
    if self.backend == "tokenizers":
      return self._tok.decode(ids, skip_special_tokens=True)
    return self._sp.decode(ids)

  def render(self, ids: Iterable[int]) -> str:
    """Debug view with special tokens shown, e.g. ``<|im_start|>user\\nhi<|im_end|>``."""
    ids = [int(i) for i in ids]
    if self.backend == "tokenizers":
      return self._tok.decode(ids, skip_special_tokens=False)
    sp = self._sp
    return "".join(sp.id_to_piece(i) if sp.is_control(i) else sp.decode([i]) for i in ids)

  def has_token(self, piece: str) -> bool:
    if self.backend == "tokenizers":
      return self._tok.token_to_id(piece) is not None
    token_id = self._sp.piece_to_id(piece)
    return self._sp.id_to_piece(token_id) == piece and not self._sp.is_unknown(token_id)

  def token_id(self, piece: str) -> int:
    """The id of one (special) token; raises naming the token and the tokenizer file if it is absent."""
    if not self.has_token(piece):
      source = TOKENIZER_JSON if self.backend == "tokenizers" else SENTENCEPIECE_MODEL
      raise KeyError(f"{os.path.join(self.directory, source)} has no token {piece!r}")
    if self.backend == "tokenizers":
      return self._tok.token_to_id(piece)
    return self._sp.piece_to_id(piece)
