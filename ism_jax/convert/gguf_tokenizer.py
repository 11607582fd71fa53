"""The tokenizer of a GGUF file, rebuilt with the ``tokenizers`` library and kept as Hugging Face files.

A GGUF file carries its tokenizer as metadata: ``tokenizer.ggml.model`` (``"gpt2"`` = byte-level BPE),
``.tokens`` (the vocabulary, in the byte-to-unicode spelling of GPT-2), ``.merges``, ``.token_type``
(1 normal, 3 control, 4 user-defined), ``.pre`` (which pre-tokenizer split the merges were learned on), the
special token ids, and ``tokenizer.chat_template``. :func:`load_gguf_tokenizer` builds the same tokenizer
with ``tokenizers``, writes it as ``tokenizer.json`` + ``tokenizer_config.json`` into a directory (by default
a cache folder named after the contents), and reads that directory back with
:func:`ism_jax.convert.load_hf_tokenizer`. So a GGUF tokenizer is an ordinary Hugging Face tokenizer from then
on: training copies its files into the workdir, export copies them next to the weights, data workers reload
it from the directory.

Pre-tokenizers follow llama.cpp's ``tokenizer.ggml.pre`` types (the regexes the vocabularies were trained
with; SmolLM2's ``"smollm"`` splits digits one by one before GPT-2's split). Control tokens become special
tokens, which :class:`~ism_jax.data.hf_tokenizer.HFTokenizer` never produces from text.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from ism_jax.convert import gguf_file
from ism_jax.convert.gguf_file import GGUFFormatError
from ism_jax.data.hf_chat import HFChatTokenizer, load_hf_tokenizer

CACHE_ENV = "ISM_JAX_CACHE"
FILES = ("tokenizer.json", "tokenizer_config.json")  # what a GGUF tokenizer is written as
_CONTROL, _USER_DEFINED = 3, 4
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre → (split before the byte-level step: "gpt2" regex, "digits" then gpt2, or a regex;
# whether merges are skipped for whole-vocabulary words, as llama.cpp does for Llama 3).
PRE_TOKENIZERS = {
    "default": ("gpt2", False),
    "gpt2": ("gpt2", False),
    "smollm": ("digits", False),
    "llama-bpe": (_LLAMA3_SPLIT, True),
}


def cache_dir() -> str:
  """Where generated tokenizer folders are kept: ``$ISM_JAX_CACHE`` or ``~/.cache/ism_jax``."""
  return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ism_jax")


def _pre_tokenizer(pre: str, path: str):
  from tokenizers import Regex, pre_tokenizers  # pylint: disable=import-outside-toplevel
  if pre not in PRE_TOKENIZERS:
    raise GGUFFormatError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported (supported: "
                          f"{sorted(PRE_TOKENIZERS)}); its split rule is unknown, so ids would differ")
  split, _ = PRE_TOKENIZERS[pre]
  if split == "gpt2":
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if split == "digits":
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def build_tokenizer(metadata: dict, path: str):
  """A ``tokenizers.Tokenizer`` from a GGUF file's tokenizer metadata (``path`` is named in errors)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models  # pylint: disable=import-outside-toplevel
  kind = metadata.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise GGUFFormatError(f"{path}: tokenizer.ggml.model={kind!r} is not supported; only byte-level BPE "
                          "('gpt2', as in SmolLM2, Llama 3, Qwen2) is read")
  for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
    if not metadata.get(key):
      raise GGUFFormatError(f"{path}: metadata {key} is missing or empty")
  tokens = metadata["tokenizer.ggml.tokens"]
  types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  if len(types) != len(tokens):
    raise GGUFFormatError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} "
                          "tokens")
  pre = metadata.get("tokenizer.ggml.pre", "default")
  merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
  vocab = {token: i for i, token in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise GGUFFormatError(f"{path}: tokenizer.ggml.tokens holds duplicate tokens")
  tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=PRE_TOKENIZERS.get(pre, ("", False))[1]))
  tokenizer.pre_tokenizer = _pre_tokenizer(pre, path)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == _CONTROL])
  tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
  return tokenizer


def tokenizer_files(metadata: dict, path: str) -> dict[str, str]:
  """``{"tokenizer.json": ..., "tokenizer_config.json": ...}``: the Hugging Face files of the tokenizer."""
  tokens = metadata.get("tokenizer.ggml.tokens") or []
  tokenizer = build_tokenizer(metadata, path)
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
            "model_max_length": int(metadata.get(f"{metadata.get('general.architecture')}.context_length",
                                                 8192))}
  for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                    ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
    token_id = metadata.get(f"tokenizer.ggml.{key}")
    if token_id is not None:
      if not 0 <= int(token_id) < len(tokens):
        raise GGUFFormatError(f"{path}: tokenizer.ggml.{key}={token_id} is outside the {len(tokens)} tokens")
      config[name] = tokens[int(token_id)]
  if metadata.get("tokenizer.chat_template"):
    config["chat_template"] = metadata["tokenizer.chat_template"]
  return dict(zip(FILES, (tokenizer.to_str(pretty=False), json.dumps(config, indent=2, ensure_ascii=False))))


def write_tokenizer_files(files: dict[str, str], directory: str) -> None:
  """Writes ``files`` into ``directory``, each file atomically (a reader never sees half a file)."""
  os.makedirs(directory, exist_ok=True)
  for name, text in files.items():
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, os.path.join(directory, name))


def export_tokenizer(path: str, directory: str | None = None) -> str:
  """Writes the GGUF file's tokenizer as Hugging Face files; returns the folder.

  Without ``directory`` the folder is ``cache_dir()/gguf-tokenizers/<key>``, the key a hash of the file's
  path, size and modification time: the same file's tokenizer is built once, later calls only find it.
  """
  if directory is None:
    stat = os.stat(path)
    key = f"{os.path.realpath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    directory = os.path.join(cache_dir(), "gguf-tokenizers", hashlib.sha256(key).hexdigest()[:32])
    if all(os.path.isfile(os.path.join(directory, name)) for name in FILES):
      return directory
  write_tokenizer_files(tokenizer_files(gguf_file.read_metadata(path), path), directory)
  return directory


def load_gguf_tokenizer(path: str, chat_format: str | None = None, default_system: str | None = "auto",
                        directory: str | None = None) -> HFChatTokenizer:
  """The tokenizer and chat format of a GGUF file, as :func:`~ism_jax.convert.load_hf_tokenizer` gives them.

  Args:
    path: the ``.gguf`` file.
    chat_format: ``"llama3"`` or ``"chatml"``; default: detected from ``tokenizer.chat_template``.
    default_system: as for ``load_hf_tokenizer`` (``"auto"`` takes the template's default system prompt).
    directory: where the Hugging Face tokenizer files are written; default: a cache folder
      (:func:`export_tokenizer`).

  Example::

      tokenizer = load_gguf_tokenizer(smollm2_path())
      tokenizer.encode_dialogue([Message("user", "Hi"), Message("assistant", "Hello!")])
  """
  return load_hf_tokenizer(export_tokenizer(path, directory), chat_format, default_system)
