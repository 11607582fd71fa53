"""jax.distributed: bad coordinator or process counts fail in bounded time."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
