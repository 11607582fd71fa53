"""A sentencepiece tokenizer with chat special tokens, trained offline in seconds.

Fixed ids (the same for every trained model)::

    0 <pad>   1 <unk>   2 <s> (bos)   3 <|eot|> (end of turn; ends every message)
    4 <|system|>   5 <|user|>   6 <|tool|>   7 <|assistant|>   (one role token per role)

The role tokens and end-of-turn are sentencepiece *control symbols*: they are stored in the model file, so
they survive save/load, and plain text never encodes to them. A user who types ``<|assistant|>`` gets the
characters of that string, not the role token, so message content cannot forge a turn boundary. ``decode``
drops them (it returns the text); :meth:`ChatTokenizer.render` shows them, for debugging.

Byte fallback is on: any Unicode text encodes without ``<unk>`` and ``decode(encode(s)) == s`` (no
normalization, whitespace kept).
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Iterable

import sentencepiece as spm

PAD, UNK, BOS = "<pad>", "<unk>", "<s>"
EOT = "<|eot|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "tool": "<|tool|>", "assistant": "<|assistant|>"}
SPECIAL_PIECES = (PAD, UNK, BOS, EOT) + tuple(ROLE_TOKENS.values())

# Inputs longer than this many bytes per sentence are cut for training only (sentencepiece skips longer ones).
_MAX_TRAIN_SENTENCE_BYTES = 8192


class ChatTokenizer:
  """sentencepiece model plus the chat special-token ids.

  Attributes:
    pad_id, bos_id, eot_id: ids 0, 2, 3.
    role_ids: ``{"system": 4, "user": 5, "tool": 6, "assistant": 7}``.
    vocab_size: number of pieces (the model's embedding size).
  """

  def __init__(self, model_proto: bytes, path: str | None = None):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self._proto = model_proto
    self.path = path
    ids = {piece: self._sp.piece_to_id(piece) for piece in SPECIAL_PIECES}
    expected = {piece: i for i, piece in enumerate(SPECIAL_PIECES)}
    if ids != expected:
      raise ValueError(
          f"tokenizer {path or '(in memory)'} does not have the chat special tokens at ids 0..7 (found "
          f"{ids}); train it with ChatTokenizer.train so the ids match"
      )
    self.pad_id, self.unk_id, self.bos_id, self.eot_id = 0, 1, 2, 3
    self.role_ids = {role: ids[piece] for role, piece in ROLE_TOKENS.items()}

  def __reduce__(self):
    # Picklable (e.g. for worker processes): rebuilt from the serialized model.
    return ChatTokenizer, (self._proto, self.path)

  @classmethod
  def load(cls, path: str) -> "ChatTokenizer":
    """Loads a ``.model`` file written by :meth:`train` (or :meth:`save`)."""
    with open(path, "rb") as f:
      return cls(f.read(), path=str(path))

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, model_path: str | None = None,
            max_sentences: int = 500_000) -> "ChatTokenizer":
    """Trains a BPE model on ``texts`` (one message content per item) and optionally saves it.

    The vocabulary is a soft limit: a small corpus yields fewer pieces than ``vocab_size`` rather than an
    error. Only the first ``max_sentences`` texts are used, so training is deterministic. 1–8k pieces train
    in about a second per 10 MB of text.

    Args:
      texts: training text, e.g. every message content of the training split.
      vocab_size: wanted number of pieces (at least 300: 8 special + 256 bytes + some merges).
      model_path: where to write the model (atomically); ``None`` keeps it in memory only.
    """
    if vocab_size < 300:
      raise ValueError(f"vocab_size must be at least 300 (8 special tokens + 256 byte pieces), got "
                       f"{vocab_size}")
    sentences = (_clip_utf8(t, _MAX_TRAIN_SENTENCE_BYTES) for t in texts if t)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_writer=buffer, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, unk_id=1, bos_id=2, eos_id=-1, pad_piece=PAD, unk_piece=UNK, bos_piece=BOS,
        control_symbols=[EOT] + list(ROLE_TOKENS.values()), byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        character_coverage=0.9995, hard_vocab_limit=False, input_sentence_size=max_sentences,
        shuffle_input_sentence=False, max_sentence_length=_MAX_TRAIN_SENTENCE_BYTES * 2,
        num_threads=max(1, min(4, os.cpu_count() or 1)), minloglevel=2,
    )
    tokenizer = cls(buffer.getvalue())
    if model_path is not None:
      tokenizer.save(model_path)
    return tokenizer

  def save(self, path: str) -> None:
    """Writes the model file atomically (a temporary file renamed into place)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(self._proto)
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise
    self.path = str(path)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    """Text to ids (no bos, no end of turn). Never yields a special token."""
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Ids to text; padding, bos, end-of-turn and role tokens are dropped."""
    return self._sp.decode([int(i) for i in ids])

  def render(self, ids: Iterable[int]) -> str:
    """Debug view: special tokens as their pieces, other tokens decoded, e.g. ``<|user|>hi<|eot|>``."""
    out, run = [], []
    for i in (int(i) for i in ids):
      if i < len(SPECIAL_PIECES):
        out.append(self._sp.decode(run))
        out.append(SPECIAL_PIECES[i])
        run = []
      else:
        run.append(i)
    out.append(self._sp.decode(run))
    return "".join(out)

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))


def load_tokenizer(path: str):
  """The tokenizer at ``path``: a ``.model`` file is a :class:`ChatTokenizer`, a directory the tokenizer and
  chat format of a Hugging Face checkpoint (:func:`ism_jax.data.hf_chat.load_hf_tokenizer`)."""
  if os.path.isdir(path):
    from ism_jax.data.hf_chat import load_hf_tokenizer  # pylint: disable=import-outside-toplevel (a cycle)
    return load_hf_tokenizer(path)
  return ChatTokenizer.load(path)


def check_vocab_fits(tokenizer, model_vocab_size: int, fix: str) -> None:
  """Raises ``ValueError`` (ending in ``fix``) if ``tokenizer`` has more pieces than the model has rows."""
  if tokenizer.vocab_size > model_vocab_size:
    raise ValueError(f"the tokenizer {tokenizer.path or '(in memory)'} has {tokenizer.vocab_size} pieces but "
                     f"the model's vocab_size is {model_vocab_size}; {fix}")


def _clip_utf8(text: str, max_bytes: int) -> str:
  data = text.encode("utf-8")
  return text if len(data) <= max_bytes else data[:max_bytes].decode("utf-8", errors="ignore")
