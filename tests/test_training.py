"""The training loop: falling loss, metrics, 1 vs 8 devices, exact resume after kill -9, NaN stop, SIGTERM,
tokenizer/vocab mismatch, eval semantics, inference restore. Tiny model, tiny data, few compilations."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ism_jax import ModelConfig, SegmentType, Transformer, make_attention_mask, sharding
from ism_jax import workdir as workdir_lib
from ism_jax.data import pipeline
from ism_jax.data.import_jsonl import import_jsonl
from ism_jax.data.tokenizer import ChatTokenizer
from ism_jax.training import checkpointing, flops, inputs, loop, metrics, sample
from ism_jax.training import config as config_lib
from ism_jax.training import train_step as ts
from ism_jax.training.optimizer import make_optimizer, optimizer_from_config
from tests import layouts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, CHECKPOINT_EVERY = 10, 3


def tiny_config(data_dir: str):
  """A few-thousand-parameter model on the small synthetic dataset: 10 steps of 8 x 128 tokens."""
  config = config_lib.base_config()
  config.model.update(vocab_size=320, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64, compute_dtype="float32", attention_impl="xla", tie_embeddings=True)
  config.data.update(name="synthetic_multiturn/small", data_dir=data_dir, vocab_size=300, seq_len=128,
                     eval_max_dialogues=24, num_threads=1)
  config.optimizer.update(learning_rate=1e-2, warmup_steps=0, weight_decay=0.0)
  config.training.update(num_steps=STEPS, global_batch_size=8, log_every=1, eval_every=5,
                         checkpoint_every=CHECKPOINT_EVERY, keep_checkpoints=5)
  config.metrics.tensorboard = True
  config.sample.update(enabled=True, rounds=2, max_answer_tokens=8)
  return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The small synthetic dataset and its 300-piece tokenizer, built once."""
  path = str(tmp_path_factory.mktemp("data"))
  inputs.prepare(tiny_config(path))
  return path


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
  """One uninterrupted run: (workdir, returned record, metrics records, stdout)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  record = loop.train(tiny_config(data_dir), workdir)
  return workdir, record, metrics.read_metrics(workdir)


def _train_losses(records):
  return {r["step"]: r["loss"] for r in records if "loss" in r}


# ----------------------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------------------


def test_loss_falls_and_metrics_are_written(reference_run):
  workdir, record, records = reference_run
  losses = _train_losses(records)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert losses[STEPS] < losses[1] - 1.0, losses
  evals = [r for r in records if "eval/loss" in r]
  assert [r["step"] for r in evals] == [0, 5, 10]
  assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 1.0
  assert {"eval/loss_round_0", "eval/exact_match", "eval/exact_match_round_0"} <= set(evals[-1])
  assert all(r["tokens_per_sec"] > 0 for r in records[2:] if "loss" in r)
  assert record["step"] == STEPS and record["eval/loss"] == evals[-1]["eval/loss"]
  assert os.listdir(os.path.join(workdir, metrics.TENSORBOARD_DIR))
  assert os.path.isfile(os.path.join(workdir, workdir_lib.TOKENIZER_FILE))
  assert json.load(open(os.path.join(workdir, workdir_lib.CONFIG_FILE)))["model"]["mask"] == "ism"
  names = os.listdir(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR))
  steps = sorted(int(s) for s in names if s.isdigit())
  assert steps == [3, 6, 9, 10]


def test_restore_for_inference_gives_the_trained_model(reference_run, data_dir):
  workdir = reference_run[0]
  restored = workdir_lib.restore(workdir)
  run_config, model, tokenizer_path = restored.run_config, restored.model, restored.tokenizer_path
  assert run_config.training.num_steps == STEPS and tokenizer_path.endswith("tokenizer.model")
  earlier = workdir_lib.restore(workdir, step=CHECKPOINT_EVERY).model
  batch = layouts.random_packed_batch(np.random.default_rng(0), batch=2, length=24)
  logits = model(batch["tokens"], batch["segment_types"], batch["segment_ids"])
  earlier_logits = earlier(batch["tokens"], batch["segment_types"], batch["segment_ids"])
  assert float(jnp.abs(logits - earlier_logits).max()) > 0
  # The sample chat runs on the restored model under every mask kind.
  dialogue = pipeline.read_dialogues(inputs.pipeline_config(tiny_config(data_dir)), "validation", 1)[0]
  assert isinstance(restored.tokenizer, ChatTokenizer)
  for kind in ("ism", "prefix"):  # prefix re-runs the history every round, ism reuses the cache
    turns = sample.sample_chat(model, restored.tokenizer, dialogue, rounds=1, max_answer_tokens=4,
                               max_len=128, kind=kind)
    assert len(turns) == 1 and isinstance(turns[0][1], str)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    workdir_lib.restore(os.path.join(workdir, "nope"))
  with pytest.raises(FileNotFoundError, match=r"checkpoints/7; available steps: \[3, 6, 9, 10\]"):
    workdir_lib.restore(workdir, step=7)


# A training process that SIGKILLs itself after step 5, once the checkpoint of step 3 is on disk.
_KILLED_RUN = """
import os, signal, sys, time
from ism_jax.training import loop
from tests.test_training import tiny_config

data_dir, workdir = sys.argv[1:]

def kill_after_step_5(step):
  if step == 5:
    while not os.path.isdir(os.path.join(workdir, "checkpoints", "3")):  # written asynchronously
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)

loop.train(tiny_config(data_dir), workdir, after_step=kill_after_step_5)
"""


def test_resume_after_kill_9_reproduces_the_losses(reference_run, data_dir, tmp_path):
  """A run killed with SIGKILL after step 5 (checkpoint at 3) resumes from 3 and matches step for step."""
  workdir = str(tmp_path / "run")
  killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, data_dir, workdir], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert max(_train_losses(metrics.read_metrics(workdir))) == 5
  assert checkpointing.Checkpointer(workdir).latest_step() == 3
  loop.train(tiny_config(data_dir), workdir)
  resumed = _train_losses(metrics.read_metrics(workdir))
  assert resumed == _train_losses(reference_run[2])  # exact: every step 1..10, no duplicates


def _restored_on(workdir: str, step: int, config, mesh):
  """Checkpoint ``step`` restored under ``mesh``: ``(params, opt_state)`` in the run's shardings there."""
  model_config = config_lib.model_config(config)
  optimizer, _ = optimizer_from_config(config.optimizer, config.training.num_steps)
  _, abstract_params, param_shardings = ts.abstract_model(model_config, mesh)
  shardings = ts.train_state_shardings(optimizer, abstract_params, param_shardings, mesh)
  abstract = ts.abstract_train_state(optimizer, abstract_params, shardings)
  pipe = inputs.pipeline_config(config)
  tokenizer = ChatTokenizer.load(os.path.join(workdir, "tokenizer.model"))
  train_iter = pipeline.make_train_iterator(pipe, tokenizer)
  checkpointer = checkpointing.Checkpointer(workdir)
  with jax.set_mesh(mesh):
    params, opt_state = checkpointer.restore(step, abstract.params, abstract.opt_state, train_iter)
  checkpointer.close()
  return params, opt_state, shardings


def _assert_restores_exactly(workdir: str, step: int, config, mesh) -> None:
  """The checkpoint restored under ``mesh`` equals it read onto one device, in ``mesh``'s shardings."""
  params, opt_state, shardings = _restored_on(workdir, step, config, mesh)
  model = workdir_lib.restore(workdir, step=step).model
  want = nnx.to_pure_dict(nnx.state(model))
  for got, expected, sharding_ in zip(jax.tree.leaves(params), jax.tree.leaves(want),
                                      jax.tree.leaves(shardings.params)):
    assert got.sharding == sharding_
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(opt_state))


def stop_at(step: int):
  """An ``after_step`` hook that sends this process SIGTERM after ``step - 1``: the loop then saves ``step``
  and returns, as a preempted run does."""

  def hook(done: int) -> None:
    if done == step - 1:
      os.kill(os.getpid(), signal.SIGTERM)

  return hook


MESH_SCRIPT = """
import sys
from tests import test_training as t
data_dir, workdir = sys.argv[1:]
config = t.tiny_config(data_dir)
config.sample.enabled = False
config.mesh.update(data=-1, fsdp=1, tensor=2)
import jax
assert jax.device_count() == 4, jax.devices()
mesh = t.sharding.make_mesh(-1, 1, 2)
t._assert_restores_exactly(workdir, 6, config, mesh)
t.loop.train(config, workdir, after_step=t.stop_at(8))
"""


def test_checkpoints_restore_across_mesh_shapes(reference_run, data_dir, tmp_path):
  """One run over four meshes: fsdp 8 (steps 1-3) -> data 2 x fsdp 4 (4-6) -> 4 devices with tensor 2 (7-8,
  a subprocess) -> tensor 1 on 8 devices (9-10). Each checkpoint restores under the next mesh to the saved
  parameters exactly, and the losses follow the uninterrupted data-parallel run's."""
  workdir = str(tmp_path / "run")
  config = tiny_config(data_dir)
  config.sample.enabled = False
  config.mesh.update(data=1, fsdp=8, tensor=1)
  loop.train(config, workdir, after_step=stop_at(3))
  config.mesh.update(data=2, fsdp=4)
  _assert_restores_exactly(workdir, 3, config, sharding.make_mesh(2, 4, 1))
  loop.train(config, workdir, after_step=stop_at(6))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": REPO}
  result = subprocess.run([sys.executable, "-c", MESH_SCRIPT, data_dir, workdir], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 2}" in result.stdout
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  _assert_restores_exactly(workdir, 8, config, sharding.make_mesh(-1, 1, 1))
  loop.train(config, workdir)
  assert sorted(checkpointing.Checkpointer(workdir).manager.all_steps()) == [3, 6, 8, 9, 10]
  resumed, reference = _train_losses(metrics.read_metrics(workdir)), _train_losses(reference_run[2])
  assert sorted(resumed) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([resumed[s] for s in sorted(resumed)], [reference[s] for s in sorted(resumed)],
                             rtol=1e-6)


def test_sigterm_saves_and_returns(data_dir, tmp_path):
  config = tiny_config(data_dir)
  config.training.update(num_steps=10_000, checkpoint_every=10_000, eval_every=0)
  workdir = str(tmp_path)

  def send_sigterm_after_two_records():
    while len(metrics.read_metrics(workdir)) < 2:
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=send_sigterm_after_two_records, daemon=True).start()
  record = loop.train(config, workdir)
  assert 2 <= record["step"] < 10_000
  assert checkpointing.Checkpointer(workdir).latest_step() == record["step"]


def test_nan_loss_stops_before_any_later_checkpoint(data_dir, tmp_path):
  config = tiny_config(data_dir)
  config.optimizer.update(learning_rate=1e30, grad_clip_norm=0.0)  # parameters overflow at step 1
  config.training.update(checkpoint_every=5, eval_every=0)
  message = (r"(loss|grad_norm) became (nan|inf) at step 2; training stopped and this state was not saved. "
             r"The last good checkpoint is none \(no checkpoint yet\)")
  with pytest.raises(loop.NonFiniteLossError, match=message) as error:
    loop.train(config, str(tmp_path))
  assert not isinstance(error.value, loop.DivergenceError)
  assert checkpointing.Checkpointer(str(tmp_path)).latest_step() is None


def test_divergence_is_caught_before_it_is_saved(data_dir, tmp_path):
  """An absurd learning rate after a zero-rate first step (warmup): the step-2 state has a finite loss and
  gradient but parameters near 1e6; it is not saved, and the checkpoint the error names is usable."""
  config = tiny_config(data_dir)
  config.optimizer.update(learning_rate=1e7, warmup_steps=5, grad_clip_norm=0.0)
  config.training.update(checkpoint_every=1, eval_every=0)
  workdir = str(tmp_path)
  with pytest.raises(loop.DivergenceError, match=r"training diverged: the parameter norm grew from .* to .* "
                     r"\(more than training.divergence_factor=1000 times\).* at step 2; .*this state was not "
                     r"saved. The last good checkpoint is step 1 in ") as error:
    loop.train(config, workdir)
  named = int(error.value.args[0].split("last good checkpoint is step ")[1].split()[0])
  assert sorted(checkpointing.Checkpointer(workdir).manager.all_steps()) == [named] == [1]
  model = workdir_lib.restore(workdir, step=named).model
  assert all(np.isfinite(x).all() and np.abs(x).max() < 1e3 for x in jax.tree.leaves(nnx.state(model)))
  batch = layouts.random_packed_batch(np.random.default_rng(0), batch=2, length=24)
  assert np.isfinite(np.asarray(model(batch["tokens"], batch["segment_types"], batch["segment_ids"]))).all()


def _tokenizer_path(data_dir: str) -> str:
  return pipeline.load_tokenizer(inputs.pipeline_config(tiny_config(data_dir))).path


def test_dropped_dialogues_are_reported_and_refused_above_the_limit(data_dir, tmp_path, capsys):
  """Half the conversations have a system prompt longer than seq_len: reported, refused at a 0.4 limit."""
  lines = []
  for i in range(20):
    system = [{"role": "system", "content": "cat is 4 and dog is 7. " * 40}] if i % 2 else []
    lines.append(json.dumps({"messages": system + [{"role": "user", "content": f"cat dog sum {i} ?"},
                                                   {"role": "assistant", "content": f"{i + 11}"}]}))
  (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
  import_jsonl(str(tmp_path / "mixed.jsonl"), "mixed_lengths", data_dir, validation_percent=0)
  config = tiny_config(data_dir)
  config.data.update(name="mixed_lengths", tokenizer_path=_tokenizer_path(data_dir), max_dropped_fraction=0.4)
  config.training.update(num_steps=2, eval_every=0, checkpoint_every=2)
  config.sample.enabled = False
  workdir = str(tmp_path / "run")
  message = (r"10 of 20 surveyed dialogues \(50.0%\) of dataset mixed_lengths/train would be dropped at "
             r"data.seq_len=128 .*than data.max_dropped_fraction=0.4. Set --config.data.seq_len=\d+")
  with pytest.raises(ValueError, match=message):
    loop.train(config, workdir)
  assert not os.path.exists(workdir)
  config.data.max_dropped_fraction = 0.5
  loop.train(config, workdir)
  assert "10 dropped (50.0%, first round longer than seq_len), 0 truncated" in capsys.readouterr().out
  records = [r for r in metrics.read_metrics(workdir) if "loss" in r]
  assert [r["step"] for r in records] == [1, 2]
  last = records[-1]
  assert last["data/dropped_dialogues"] > 0 and last["data/dialogues"] > last["data/dropped_dialogues"]
  assert last["data/truncated_dialogues"] == 0


def test_no_dialogue_fitting_seq_len_fails_at_once(data_dir, tmp_path):
  """train.py used to read forever (ignoring SIGTERM) when no dialogue fits; now it exits with the lengths."""
  config_file = tmp_path / "tiny.py"
  config_file.write_text(f"from tests.test_training import tiny_config\n\n\ndef get_config():\n"
                         f"  return tiny_config({data_dir!r})\n")
  result = subprocess.run(
      [sys.executable, "train.py", f"--config={config_file}", f"--workdir={tmp_path / 'run'}",
       "--config.data.seq_len=16"], cwd=REPO, capture_output=True, text=True, timeout=180)
  assert result.returncode == 1, result.stderr[-3000:]
  message = result.stderr.strip().splitlines()[-1]
  assert re.search(r"error: no dialogue of dataset synthetic_multiturn/small/train \(\d+ surveyed\) fits "
                   r"data.seq_len=16: the dialogues are \d+ \(shortest\) to \d+ \(longest\) tokens", message)
  assert not os.path.exists(tmp_path / "run")


def test_mismatched_tokenizer_or_vocab_is_refused_before_training(reference_run, data_dir, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(reference_run[0], workdir)
  before = sorted(os.listdir(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)))
  other = ChatTokenizer.train(["a different corpus " * 3, "with other words entirely"] * 50, vocab_size=310,
                              model_path=str(tmp_path / "other.model"))
  config = tiny_config(data_dir)
  config.data.tokenizer_path = other.path
  with pytest.raises(checkpointing.CheckpointMismatchError, match="different tokenizer|310-piece|pieces"):
    loop.train(config, workdir)
  config = tiny_config(data_dir)
  config.model.vocab_size = 384
  with pytest.raises(checkpointing.CheckpointMismatchError, match="vocab_size: checkpoint 320, now 384"):
    loop.train(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR))) == before
  with open(os.path.join(workdir, workdir_lib.TOKENIZER_FILE), "rb") as f:
    assert f.read() == open(os.path.join(reference_run[0], workdir_lib.TOKENIZER_FILE), "rb").read()


def test_checkpoint_of_other_shapes_is_refused_naming_the_parameter(reference_run):
  config = tiny_config("unused")
  config.model.update(vocab_size=384, mlp_dim=96)
  mesh = sharding.make_mesh()
  optimizer, _ = make_optimizer(1e-2, total_steps=STEPS)
  _, abstract_params, param_shardings = ts.abstract_model(config_lib.model_config(config), mesh)
  shardings = ts.train_state_shardings(optimizer, abstract_params, param_shardings, mesh)
  abstract = ts.abstract_train_state(optimizer, abstract_params, shardings)
  message = (r"checkpoint \S+/checkpoints/10 does not fit the model: params/\S*down_proj: checkpoint "
             r"\(64, 32\), model \(96, 32\); .*params/embed\S*: checkpoint \(320, 32\), model \(384, 32\)")
  with pytest.raises(checkpointing.CheckpointMismatchError, match=message):
    checkpointing.Checkpointer(reference_run[0]).restore(STEPS, abstract.params, abstract.opt_state, None)


def test_restore_refuses_parameters_of_other_shapes_by_name(reference_run, tmp_path):
  """A checkpoint whose meta names another model (mlp_dim 96 for 64-wide saved weights) is refused by
  ``workdir.restore`` naming the parameter, before any array is read."""
  workdir = str(tmp_path / "copy")
  shutil.copytree(reference_run[0], workdir)
  meta_file = os.path.join(workdir, checkpointing.CHECKPOINT_DIR, str(STEPS), "meta", "metadata")
  with open(meta_file) as f:
    meta = json.load(f)
  meta["config"]["model"]["mlp_dim"] = 96
  with open(meta_file, "w") as f:
    json.dump(meta, f)
  message = (r"checkpoint \S+/checkpoints/10 does not fit the model: params/\S*down_proj: checkpoint "
             r"\(64, 32\), model \(96, 32\)")
  with pytest.raises(checkpointing.CheckpointMismatchError, match=message):
    workdir_lib.restore(workdir)


def test_loss_on_a_visible_target_is_refused():
  batch = layouts.random_packed_batch(np.random.default_rng(3), batch=2, length=32)
  loss_mask = np.zeros_like(batch["tokens"])
  row, col = np.argwhere((batch["segment_types"][:, :-1] == SegmentType.QUERY)
                         & (batch["segment_types"][:, 1:] == SegmentType.QUERY))[0]
  loss_mask[row, col] = 1
  with pytest.raises(ValueError, match=rf"loss_mask\[row {row}, position {col}\]"):
    inputs.check_batch({**batch, "loss_mask": loss_mask}, "ism")


# ----------------------------------------------------------------------------------------------------------
# The steps.
# ----------------------------------------------------------------------------------------------------------


def _answer_loss_batch(seed: int, rows: int = 8, length: int = 32) -> dict[str, np.ndarray]:
  """A random packed batch with loss on every position whose next token is an answer token of its dialogue."""
  batch = layouts.random_packed_batch(np.random.default_rng(seed), batch=rows, length=length)
  types, ids = batch["segment_types"], batch["segment_ids"]
  next_is_answer = np.roll(types, -1, axis=1) == SegmentType.ANSWER
  loss_mask = next_is_answer & (np.roll(ids, -1, axis=1) == ids) & (ids != 0)
  loss_mask[:, -1] = False
  rounds = np.cumsum((types == SegmentType.QUERY) & (np.roll(types, 1, axis=1) != SegmentType.QUERY), axis=1)
  return {**batch, "loss_mask": loss_mask.astype(np.int32), "round_index": np.where(ids > 0, rounds, -1)}


def _run_steps(mesh, grad_accum_steps: int, batches, loss_chunk_tokens: int = 0) -> list[float]:
  config = ModelConfig.tiny(vocab_size=64)
  optimizer, _ = make_optimizer(1e-2, total_steps=10, warmup_steps=2, weight_decay=0.1, grad_clip_norm=1.0)
  graphdef, abstract_params, param_shardings = ts.abstract_model(config, mesh)
  shardings = ts.train_state_shardings(optimizer, abstract_params, param_shardings, mesh)
  _, params = ts.init_params(config, mesh, seed=0)
  state = ts.init_train_state(optimizer, params, shardings)
  train_step = ts.make_train_step(graphdef, optimizer, "ism", grad_accum_steps, loss_chunk_tokens)
  step = ts.jit_train_step(train_step, shardings, mesh)
  losses = []
  with jax.set_mesh(mesh):
    for batch in batches:
      state, step_metrics = step(state, ts.device_batch(batch, mesh))
      losses.append(float(step_metrics["loss"]))
  return losses


def test_one_device_and_eight_devices_give_the_same_losses():
  assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
  batches = [_answer_loss_batch(seed) for seed in range(4)]
  one = _run_steps(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), 1, batches)
  eight = _run_steps(sharding.make_mesh(data=2, fsdp=2, tensor=2), 1, batches)
  accumulated = _run_steps(sharding.make_mesh(data=2, fsdp=2, tensor=2), 2, batches)
  # Chunks of 48 tokens of the [8, 32] batch: [8, 6] slices, the last one padded.
  chunked = _run_steps(sharding.make_mesh(data=2, fsdp=2, tensor=2), 1, batches, loss_chunk_tokens=48)
  np.testing.assert_allclose(eight, one, rtol=1e-6)  # observed: 1.2e-7, one float32 ulp
  np.testing.assert_allclose(accumulated, one, rtol=1e-6)
  np.testing.assert_allclose(chunked, one, rtol=1e-6)
  assert one[-1] < one[0]


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_chunked_loss_equals_the_unchunked_loss_and_its_gradients(tie_embeddings):
  """Chunks of [3, 4] tokens (21 positions: the last chunk is padded), of one token and one whole chunk."""
  config = ModelConfig.tiny(vocab_size=96, tie_embeddings=tie_embeddings)
  graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(4)))
  params = nnx.to_pure_dict(state)
  batch = {k: jnp.asarray(v) for k, v in _answer_loss_batch(6, rows=3, length=21).items()}
  assert (batch["segment_types"] == SegmentType.PAD).any() and 0 < batch["loss_mask"].sum() < 3 * 21
  weights = batch["loss_mask"].astype(jnp.float32) / jnp.sum(batch["loss_mask"])
  chunk_sizes = (12, 1, 1000) if not tie_embeddings else (12,)

  def loss(params, chunk_tokens):
    if chunk_tokens:
      return ts.chunked_loss(graphdef, params, batch, weights, chunk_tokens)
    nll, _ = ts.token_losses(graphdef, params, batch)
    return jnp.sum(nll * weights)

  grad = jax.value_and_grad(loss)
  chunked_program = str(jax.make_jaxpr(lambda p: grad(p, 12))(params))
  assert "f32[3,21,96]" not in chunked_program and "f32[3,4,96]" in chunked_program  # [B, C, V] only
  scaled = jax.grad(lambda p: 3.0 * loss(p, 12))  # the backward pass scales by the incoming cotangent
  results, scaled_grads = jax.jit(lambda p: ([grad(p, c) for c in (0,) + chunk_sizes], scaled(p)))(params)
  expected, expected_grads = results[0]
  for path, g in jax.tree_util.tree_leaves_with_path(scaled_grads):
    np.testing.assert_allclose(g, 3.0 * _at(expected_grads, path), rtol=1e-5, atol=1e-7)
  for chunk_tokens, (value, grads) in zip(chunk_sizes, results[1:]):
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      np.testing.assert_allclose(g, _at(expected_grads, path), rtol=1e-5, atol=1e-7,
                                 err_msg=f"{chunk_tokens} tokens: {jax.tree_util.keystr(path)}")


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_eval_step_matches_a_numpy_reference():
  config = ModelConfig.tiny(vocab_size=64)
  model = Transformer(config, rngs=nnx.Rngs(2))
  batch = _answer_loss_batch(5)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  sums = jax.jit(ts.make_eval_step(graphdef, num_rounds=3))(params, batch)
  nll, logits = jax.jit(lambda p, b: ts.token_losses(graphdef, p, b))(params, batch)
  nll, correct = np.asarray(nll), np.asarray(jnp.argmax(logits, -1)) == np.roll(batch["tokens"], -1, axis=1)
  expected = {k: np.zeros(3) for k in ("nll", "targets", "answers", "exact")}
  for row in range(batch["tokens"].shape[0]):
    t = 0
    while t < batch["tokens"].shape[1]:
      if not batch["loss_mask"][row, t]:
        t += 1
        continue
      end = t
      while end < batch["tokens"].shape[1] and batch["loss_mask"][row, end] and \
          batch["round_index"][row, end] == batch["round_index"][row, t]:
        end += 1
      r = min(batch["round_index"][row, t], 2)
      expected["nll"][r] += nll[row, t:end].sum()
      expected["targets"][r] += end - t
      expected["answers"][r] += 1
      expected["exact"][r] += correct[row, t:end].all()
      t = end
  for key, value in expected.items():
    np.testing.assert_allclose(sums[key], value, rtol=1e-5, err_msg=key)
  assert expected["answers"].sum() > 5


def test_flops_count_allowed_pairs():
  batch = _answer_loss_batch(7, rows=2, length=24)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  for kind in ("ism", "causal", "prefix"):
    mask = np.asarray(make_attention_mask(jbatch["segment_types"], jbatch["segment_ids"], kind))
    real = batch["segment_types"] != SegmentType.PAD
    assert float(ts.attention_pairs(jbatch, kind)) == mask[real].sum()
  config = ModelConfig.tiny(tie_embeddings=True)
  per_layer = 32 * 8 * (2 * 4 + 2 * 2) + 3 * 32 * 64
  assert flops.matmul_params(config) == 2 * per_layer + 32 * 64
  assert flops.train_flops(config, tokens=10, attention_pairs=100) == 6 * (2 * per_layer + 2048) * 10 + \
      12 * 2 * 4 * 8 * 100
  assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989.4e12
  assert flops.peak_flops_per_device("cpu") is None


def test_init_from_starts_from_the_checkpoint_weights(data_dir, tmp_path):
  """configs/finetune_hf.py on the tiny Qwen2 fixture: weights loaded, its tokenizer used and installed."""
  from ism_jax.convert import load_hf_model  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config_file(os.path.join(REPO, "configs", "finetune_hf.py"))
  config.model.compute_dtype = "float32"
  config.data.update(name="synthetic_multiturn/small", data_dir=data_dir, seq_len=128, eval_max_dialogues=8)
  config.optimizer.update(learning_rate=1e-30, warmup_steps=0)  # one step that leaves the weights in place
  config.training.update(num_steps=1, global_batch_size=8, eval_every=0, checkpoint_every=1)
  config.mesh.update(data=-1, fsdp=1)
  config.sample.enabled = False
  workdir = str(tmp_path)
  loop.train(config, workdir)
  restored = workdir_lib.restore(workdir)
  model, tokenizer_path = restored.model, restored.tokenizer_path
  assert tokenizer_path == os.path.join(workdir, workdir_lib.HF_TOKENIZER_DIR)
  assert "tokenizer.json" in os.listdir(tokenizer_path)
  _, reference = load_hf_model(config.init_from, scan_layers=True)
  for got, want in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(reference))):
    np.testing.assert_allclose(got, want, rtol=1e-6)
