"""Train a multi-turn chat language model with the ISM, causal or prefix mask.

    python train.py --config configs/default.py --workdir runs/default
    python train.py --config configs/synthetic.py --workdir runs/syn --config.model.mask=causal

Any field of the config can be overridden with ``--config.<section>.<field>=value``; an unknown field is
refused with the list of valid ones. Running the same command again resumes from the newest checkpoint in
``--workdir``. SIGTERM / Ctrl-C saves a checkpoint and exits cleanly. See docs/TRAINING.md.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ism_jax.training import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "run config file, e.g. configs/default.py",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, tokenizer")
flags.mark_flags_as_required(["config", "workdir"])


def _config_path(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _parse_flags(argv: list[str]):
  """absl flag parsing, after checking ``--config.*`` overrides against the config's fields."""
  path = _config_path(argv)
  if path is not None:
    try:
      config_lib.check_overrides(config_lib.load_config_file(path), argv[1:])
    except (ValueError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  return app.parse_flags_with_usage(argv)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; config fields are set with "
                         "--config.<field>=value")
  from ism_jax.training import checkpointing, distributed, loop  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS["verbosity"].present:  # library INFO logs only with --verbosity=0 or more
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  try:
    config_lib.validate(config, where=f"config {_config_path(sys.argv)}")
    distributed.initialize_distributed(config)
    loop.train(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError, checkpointing.CheckpointMismatchError, loop.NonFiniteLossError) as e:
    if flags.FLAGS.verbosity >= 1:  # --verbosity=1 shows the traceback
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
