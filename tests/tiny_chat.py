"""What the inference and serving tests share: a tiny chat tokenizer and model, a training workdir laid out
as ism_jax.training.checkpointing writes it (tokenizer.model + one checkpoint, for chat.py and serve.py),
and the full-forward reference every cached path is compared with."""

import functools
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ism_jax import ModelConfig, SegmentType, Transformer
from ism_jax import workdir as workdir_lib
from ism_jax.data.tokenizer import ChatTokenizer
from ism_jax.training import config as config_lib

TEXTS = ["hello there", "how are you today?", "fine, thanks. and you?", "the weather is nice",
         "what time is it", "it is late; good night", "tell me a story about a cat"] * 20


def train_tokenizer(folder) -> ChatTokenizer:
  """A 300-piece tokenizer trained on :data:`TEXTS` into ``folder``."""
  return ChatTokenizer.train(TEXTS, vocab_size=300, model_path=str(folder / "chat.model"))


def tiny_model(vocab_size: int | None = None) -> Transformer:
  config = ModelConfig.tiny() if vocab_size is None else ModelConfig.tiny(vocab_size=vocab_size)
  return Transformer(config, rngs=nnx.Rngs(0))


def full_forward(model, length: int):
  """``(tokens [T], types [T], kind) -> logits [T, V]`` of one pass over the whole dialogue, padded at the end
  to ``length`` (never seen by real tokens) so that it compiles once per kind."""
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnames="kind")
  def forward(state, tokens_BT, types_BT, kind):
    return nnx.merge(graphdef, state)(tokens_BT, types_BT, kind=kind)

  def run(tokens, types, kind):
    pad = length - tokens.size
    tokens_BT = np.pad(tokens, (0, pad))[None]
    types_BT = np.pad(types, (0, pad), constant_values=SegmentType.PAD)[None]
    return np.asarray(forward(state, tokens_BT, types_BT, kind))[0, :tokens.size]

  return run


def write_workdir(path: str, model, tokenizer, seq_len: int) -> str:
  tokenizer.save(os.path.join(path, workdir_lib.TOKENIZER_FILE))
  run_config = config_lib.base_config()
  run_config.model.update({k: getattr(model.config, k) for k in run_config.model})
  run_config.data.seq_len = seq_len
  meta = {"step": 1, "config": json.loads(run_config.to_json())}
  manager = ocp.CheckpointManager(os.path.join(path, workdir_lib.CHECKPOINT_DIR),
                                  item_names=workdir_lib.ITEMS)
  params = nnx.to_pure_dict(nnx.state(model))
  manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
  manager.wait_until_finished()
  manager.close()
  return path
