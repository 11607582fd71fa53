"""Multi-process training on one machine (2 processes x 4 CPU devices through jax.distributed and a local
coordinator), and bad coordinator or process counts failing in bounded time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from ism_jax.training import checkpointing, inputs, loop, metrics
from tests.test_training import STEPS, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT = 10  # seconds; distributed.heartbeat_timeout of the multi-process runs


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_unreachable_coordinator_or_missing_processes_fail_in_bounded_time(tmp_path):
  """Process 1 with no coordinator listening, and a process 0 whose job never fills up (num_processes=2,
  one started): each exits with status 1 and the message within the timeout, nothing written."""
  runs = {}
  for process_id in (1, 0):
    address = f"127.0.0.1:{free_port()}"
    workdir = tmp_path / f"run{process_id}"
    command = [sys.executable, "train.py", "--config=configs/synthetic.py", f"--workdir={workdir}",
               "--config.distributed.enabled=True", f"--config.distributed.coordinator_address={address}",
               "--config.distributed.num_processes=2", f"--config.distributed.process_id={process_id}",
               "--config.distributed.initialization_timeout=5"]
    runs[process_id] = (address, workdir, time.time(),
                        subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True))
  for process_id, (address, workdir, start, process) in runs.items():
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr[-3000:]
    assert time.time() - start < 60
    assert (f"error: jax.distributed.initialize did not complete within distributed.initialization_timeout=5 "
            f"s (distributed.coordinator_address={address}, distributed.num_processes=2, "
            f"distributed.process_id={process_id})") in stderr
    assert not workdir.exists()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("data"))
  inputs.prepare(tiny_config(path))
  return path


# train.py, with an after_step hook that SIGKILLs the process after step 5 once the checkpoint of step 3 is
# committed (the collective write finishes asynchronously): the multi-process test's dying process.
KILLED_AFTER_STEP_5 = """
import os, runpy, signal, sys, time
from ism_jax.training import loop

workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
train = loop.train


def kill_after_step_5(step):
  if step == 5:
    while not os.path.isdir(os.path.join(workdir, "checkpoints", "3")):
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)


loop.train = lambda config, workdir: train(config, workdir, after_step=kill_after_step_5)
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def _launch(config_file, workdir, scripts: dict[int, list[str]] | None = None) -> list[subprocess.Popen]:
  """``train.py`` as processes 0 and 1 of a 2-process job, 4 CPU devices each, coordinator on localhost;
  ``scripts[process_id]``: run that command instead of ``train.py`` (with the same flags)."""
  address = f"127.0.0.1:{free_port()}"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": REPO}
  processes = []
  for process_id in (0, 1):
    program = (scripts or {}).get(process_id, ["train.py"])
    command = [sys.executable, *program, f"--config={config_file}", f"--workdir={workdir}",
               "--config.distributed.enabled=True", f"--config.distributed.coordinator_address={address}",
               "--config.distributed.num_processes=2", f"--config.distributed.process_id={process_id}",
               f"--config.distributed.heartbeat_timeout={HEARTBEAT}"]
    processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
  return processes


def test_two_processes_train_like_one_and_survive_a_killed_process(data_dir, tmp_path):
  """2 processes x 4 devices, the mesh over both: each reads its own half of the data; process 1 is killed
  after step 5, process 0 stops within the heartbeat timeout with an error, and a restart of both resumes
  from the 2-process Orbax checkpoint of step 3; every step's loss equals one process with 8 devices
  reading the same two shards (data.num_shards=2), to 1e-6 relative."""
  config = tiny_config(data_dir)
  config.sample.enabled = False
  config.data.num_shards = 2
  loop.train(config, str(tmp_path / "one"))
  reference = {r["step"]: r["loss"] for r in metrics.read_metrics(str(tmp_path / "one")) if "loss" in r}

  config_file = tmp_path / "tiny.py"
  config_file.write_text(f"from tests.test_training import tiny_config\n\n\ndef get_config():\n"
                         f"  config = tiny_config({data_dir!r})\n  config.sample.enabled = False\n"
                         "  return config\n")
  workdir = str(tmp_path / "two")
  first, second = _launch(config_file, workdir, {1: ["-c", KILLED_AFTER_STEP_5]})
  _, killed_err = second.communicate(timeout=300)
  killed_at = time.time()
  assert second.returncode == -signal.SIGKILL, killed_err[-3000:]
  _, err = first.communicate(timeout=HEARTBEAT + 60)
  assert first.returncode == 1 and time.time() - killed_at < HEARTBEAT + 30, err[-3000:]
  assert (f"error: process 1 of 2 stopped responding {HEARTBEAT} s ago (killed, crashed or hung; "
          f"distributed.heartbeat_timeout={HEARTBEAT}); process 0 stops without saving") in err
  assert f"the newest checkpoint is step 3 in {workdir}/checkpoints" in err
  assert checkpointing.Checkpointer(workdir).latest_step() == 3

  outputs = [p.communicate(timeout=300) for p in _launch(config_file, workdir)]
  for (out, err), process_id in zip(outputs, (0, 1)):
    assert f"process {process_id} of 2 reads synthetic_multiturn/small/train shard {process_id} of 2: " \
        f"records {process_id}, {process_id + 2}, {process_id + 4}, ... (1000 of 2000)" in out, err[-3000:]
  assert "resuming from step 3" in outputs[0][0]
  assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in outputs[0][0]  # one mesh over both processes
  final = os.path.join(workdir, checkpointing.CHECKPOINT_DIR, str(STEPS), "data")
  states = [json.load(open(os.path.join(final, f"process_{p}-of-2.json"))) for p in (0, 1)]
  assert all(s["stats"]["dialogues"] > 0 for s in states) and states[0] != states[1]
  losses = {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if "loss" in r}
  assert sorted(losses) == sorted(reference) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([losses[s] for s in sorted(losses)], [reference[s] for s in sorted(losses)],
                             rtol=1e-6)
