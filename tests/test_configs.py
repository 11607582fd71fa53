"""Run configs: every shipped config is valid, unknown fields are refused with the valid ones listed."""

import glob
import json
import os
import subprocess
import sys

import pytest

from ism_jax.training import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_are_valid(path):
  config = config_lib.load_config_file(path)
  config_lib.validate(config, where=path)
  model = config_lib.model_config(config)
  assert model.mask == "ism"
  assert model.vocab_size >= config.data.vocab_size or config.init_from


def test_config_sizes():
  def load(name):
    return config_lib.model_config(config_lib.load_config_file(os.path.join(REPO, "configs", name)))

  assert 0.9e9 < load("h100_1b.py").num_params() < 1.1e9
  assert 2.5e9 < load("gpu_8x.py").num_params() < 3.5e9
  assert load("default.py").compute_dtype == "float32" and load("scratch_tiny.py").compute_dtype == "float32"
  h100 = config_lib.load_config_file(os.path.join(REPO, "configs", "h100_1b.py"))
  assert h100.data.seq_len == 4096


def test_unknown_fields_list_the_valid_ones():
  config = config_lib.base_config()
  config.optimizer.lrate = 1.0
  with pytest.raises(ValueError, match=r"unknown config field 'optimizer.lrate'.*optimizer.learning_rate"):
    config_lib.validate(config)
  config = config_lib.base_config()
  config.model.widht = 3
  with pytest.raises(ValueError, match=r"'model.widht'.*model.embed_dim"):
    config_lib.validate(config)
  message = (r"'trainin.steps'.*Valid sections: data, distributed, .*training.*top-level fields: "
             "init_from, seed")
  with pytest.raises(ValueError, match=message):
    config_lib.check_overrides(config_lib.base_config(), ["--config.trainin.steps=3"])
  config_lib.check_overrides(config_lib.base_config(), ["--config.model.mask=causal", "--config.seed", "1"])


def test_invalid_values_are_refused():
  config = config_lib.base_config()
  config.model.mask = "full"
  with pytest.raises(ValueError, match="mask='full' must be one of"):
    config_lib.validate(config)
  config = config_lib.base_config()
  config.training.global_batch_size, config.training.grad_accum_steps = 6, 4
  with pytest.raises(ValueError, match="global_batch_size=6 must be a multiple of .*grad_accum_steps=4"):
    config_lib.validate(config)
  config = config_lib.base_config()
  config.training.loss_chunk_tokens = -1
  with pytest.raises(ValueError, match="training.loss_chunk_tokens=-1 must be >= 0"):
    config_lib.validate(config)


def test_saved_config_round_trips_through_json():
  config = config_lib.load_config_file(os.path.join(REPO, "configs", "default.py"))
  import json  # pylint: disable=import-outside-toplevel
  restored = config_lib.from_json_dict(json.loads(config.to_json()))
  assert restored == config
  assert config_lib.resume_differences(restored, config) == []
  restored.data.seq_len = 64
  assert config_lib.resume_differences(restored, config) == ["data.seq_len: checkpoint 64, now 256"]


def test_tuple_fields_saved_as_json_lists_do_not_block_a_resume():
  config = config_lib.base_config()
  config.model.rope_scaling = (8.0, 1.0, 4.0, 8192)
  import json  # pylint: disable=import-outside-toplevel
  saved = config_lib.from_json_dict(json.loads(config.to_json()))
  assert config_lib.resume_differences(saved, config) == []


def test_cli_refuses_an_unknown_field():
  result = subprocess.run(
      [sys.executable, "train.py", "--config=configs/default.py", "--workdir=/nonexistent/never_written",
       "--config.model.layers=2"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert "unknown config field 'model.layers'" in result.stderr and "model.num_layers" in result.stderr
  assert not os.path.exists("/nonexistent/never_written")


def test_model_presets_and_configs_saved_by_older_runs():
  assert config_lib.base_config(model="1b").model.embed_dim == 2048
  assert config_lib.base_config(model="1m").model.vocab_size == config_lib.base_config().model.vocab_size
  with pytest.raises(ValueError, match="unknown model preset 'huge'; presets: 1m, 250m, 1b, 3b"):
    config_lib.base_config(model="huge")
  saved = json.loads(config_lib.base_config().to_json())
  saved["debug"] = {"kill_at_step": 0}  # a section that older runs wrote and the schema dropped
  assert config_lib.from_json_dict(saved).to_dict() == config_lib.base_config().to_dict()
