"""A training workdir as ism_jax.training.checkpointing lays it out (tokenizer.model + one checkpoint), for
the tests that load one (chat.py, serve.py)."""

import json
import os

import orbax.checkpoint as ocp
from flax import nnx

from ism_jax import workdir as workdir_lib
from ism_jax.training import config as config_lib


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
