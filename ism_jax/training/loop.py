"""``train(config, workdir)``: the training loop.

Order of work, so that nothing is written before every check has passed:

1. validate the config; build the mesh; build the dataset and tokenizer if missing; survey the train
   dialogues' lengths against ``data.seq_len`` (error if none fits or more than
   ``data.max_dropped_fraction`` would be dropped);
2. if ``WORKDIR/checkpoints`` has a checkpoint: check that its tokenizer, vocabulary and model/data config
   match this run (error otherwise), then restore parameters, optimizer state and the data iterator;
3. copy the tokenizer into the workdir and write ``config.json``;
4. loop: host batch → checked → sharded → jitted step. Every ``log_every`` steps the pending step metrics
   are fetched (a NaN/Inf loss stops the run here, before any later checkpoint, so the newest checkpoint on
   disk is the last good one), written to ``metrics.jsonl`` / TensorBoard and the progress bar; every
   ``eval_every`` steps the validation set is evaluated; every ``checkpoint_every`` steps and at the end a
   checkpoint is started (async), once the state has passed the divergence check (:class:`_DivergenceGuard`);
5. SIGTERM (or Ctrl-C) finishes the current step, saves a checkpoint and returns cleanly; in a multi-process
   run a process that dies stops the others with an error (:class:`ism_jax.training.distributed.PeerMonitor`);
6. at the end, a short greedy chat with the trained model is printed.

The step has no randomness (no dropout), and the data order is a pure function of the seed and the iterator
state, so a resumed run repeats the uninterrupted run's losses exactly on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from ism_jax import sharding
from ism_jax.data.pipeline import Inputs
from ism_jax.training import checkpointing, evaluation, flops, inputs, metrics, sample
from ism_jax.training import config as config_lib
from ism_jax.training import train_step as ts
from ism_jax.training.distributed import PeerMonitor
from ism_jax.training.optimizer import optimizer_from_config

_log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradient norm became NaN or Inf; training stopped without saving the bad state."""


class DivergenceError(NonFiniteLossError):
  """A state about to be saved diverged (see :class:`_DivergenceGuard`); it was not saved."""


def _stop_message(problem: str, step: int, last_good: int | None, directory: str) -> str:
  where = f"step {last_good} in {directory}" if last_good is not None else "none (no checkpoint yet)"
  return (f"{problem} at step {step}; training stopped and this state was not saved. The last good "
          f"checkpoint is {where}. Lower optimizer.learning_rate, raise optimizer.warmup_steps or set "
          "optimizer.grad_clip_norm, then resume from the same --workdir")


class _DivergenceGuard:
  """Checks a train state before it is saved, so that the newest checkpoint is always a usable one.

  A diverging run can keep a finite loss for a step or two while its parameters blow up (Adam moves every
  parameter by about the learning rate per step), and a checkpoint of such parameters gives NaN on every
  input. Before each save the guard refuses the state when

  * the parameter norm is not finite, or exceeds ``factor`` times its value when this run started;
  * a gradient norm since the previous save exceeds ``factor`` times the first step's;
  * the cross entropy of the new parameters on the step's own batch (the jitted eval step) is not finite.
  """

  def __init__(self, factor: float, initial_param_norm: float):
    self.factor = factor
    self.initial_param_norm = initial_param_norm
    self.first_grad_norm: float | None = None
    self.max_grad_norm = 0.0

  def observe(self, values: list[tuple[int, dict[str, float]]]) -> None:
    """Takes in fetched step metrics (already checked finite)."""
    for _, m in values:
      if self.first_grad_norm is None:
        self.first_grad_norm = m["grad_norm"]
      self.max_grad_norm = max(self.max_grad_norm, m["grad_norm"])

  def problems(self, param_norm: float, probe_nll: float) -> list[str]:
    """What is wrong with the state to be saved (empty: save it)."""
    out = []
    if not np.isfinite(param_norm):
      out.append(f"the parameter norm became {param_norm}")
    elif param_norm > self.factor * self.initial_param_norm:
      out.append(f"the parameter norm grew from {self.initial_param_norm:.4g} to {param_norm:.4g} (more than "
                 f"training.divergence_factor={self.factor:g} times)")
    first = self.first_grad_norm
    if first is not None and first > 0 and self.max_grad_norm > self.factor * first:
      out.append(f"the gradient norm reached {self.max_grad_norm:.4g}, more than training.divergence_factor="
                 f"{self.factor:g} times the first step's {first:.4g}")
    if not np.isfinite(probe_nll):
      out.append(f"the new parameters give a cross entropy of {probe_nll} on the step's batch")
    return out

  def saved(self) -> None:
    self.max_grad_norm = 0.0


class _StopSignal:
  """Turns SIGTERM / SIGINT into a flag checked after every step (a second Ctrl-C interrupts at once).

  Multi-host runs install no handler: there JAX's preemption service catches SIGTERM and every process
  stops at the same step (``CheckpointManager.reached_preemption``), as a collective checkpoint needs.
  """

  def __init__(self, checkpointer: checkpointing.Checkpointer):
    self.received: str | None = None
    self._previous = {}
    self._checkpointer = checkpointer
    self._multihost = jax.process_count() > 1

  def stopping(self, step: int) -> bool:
    """Whether to save and stop after ``step``."""
    if self._multihost and self.received is None and self._checkpointer.manager.reached_preemption(step):
      self.received = "preemption"
    return self.received is not None

  def __enter__(self):
    if self._multihost:
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handlers
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class _IteratorSnapshot:
  """The data iterator's state captured at save time (grain's checkpoint handler calls ``get_state``)."""

  def __init__(self, state: dict):
    self._data = json.dumps(state, indent=2).encode("utf-8")

  def get_state(self) -> bytes:
    return self._data


@dataclasses.dataclass
class _Window:
  """Step metrics since the last record, still on device until :meth:`fetch`."""

  pending: list = dataclasses.field(default_factory=list)  # (step, metrics dict of device scalars)
  start_time: float = 0.0
  timed_steps: int = 0  # steps of ``pending`` that count for throughput (not the compile step)

  def fetch(self, last_good: int | None, directory: str) -> list[tuple[int, dict[str, float]]]:
    """The pending metrics as floats; raises :class:`NonFiniteLossError` at a NaN/Inf loss or gradient."""
    values = jax.device_get([m for _, m in self.pending])
    out = [(step, {k: float(v) for k, v in m.items()}) for (step, _), m in zip(self.pending, values)]
    for step, m in out:
      bad = [f"{name} became {m[name]}" for name in ("loss", "grad_norm") if not np.isfinite(m[name])]
      if bad:  # a non-finite gradient makes this step's parameters non-finite even if its loss is not
        raise NonFiniteLossError(_stop_message(" and ".join(bad), step, last_good, directory))
    return out


def _record(window_values, seconds: float, timed_steps: int, model_config, peak, num_devices, lr) -> dict:
  """The metrics.jsonl record of a window of steps."""
  step, last = window_values[-1]
  timed = window_values[len(window_values) - timed_steps:] if timed_steps else []
  tokens = sum(m["tokens"] for _, m in timed)
  step_flops = sum(flops.train_flops(model_config, m["tokens"], m["attention_pairs"]) for _, m in timed)
  tokens_per_sec = tokens / seconds if timed and seconds > 0 else None
  mfu = flops.mfu(step_flops, seconds, num_devices, peak) if timed else None
  return {
      "loss": last["loss"],
      "loss_avg": float(np.mean([m["loss"] for _, m in window_values])),
      "tokens_per_sec": tokens_per_sec,
      "mfu": mfu,
      "lr": float(lr(step)),
      "grad_norm": last["grad_norm"],
      "param_norm": last["param_norm"],
      "targets": last["targets"],
      "window_tokens": tokens,  # real tokens of the timed steps of this window (compile step excluded)
      "window_seconds": seconds if timed else 0.0,  # their wall time
  }


def _data_counts(stats) -> dict[str, int]:
  """Cumulative truncation counts of this host's train stream, as ``data/...`` entries of a record."""
  return {"data/dialogues": stats.dialogues, "data/dropped_dialogues": stats.dropped_dialogues,
          "data/truncated_dialogues": stats.truncated_dialogues, "data/dropped_rounds": stats.dropped_rounds}


def _restore_or_init(config, model_config, mesh, optimizer, checkpointer, latest, train_iter):
  """The train state (restored from ``latest``, initialised from Hugging Face, or random) and shardings."""
  graphdef, abstract_params, param_shardings = ts.abstract_model(model_config, mesh)
  shardings = ts.train_state_shardings(optimizer, abstract_params, param_shardings, mesh)
  with jax.set_mesh(mesh):
    if latest is not None:
      abstract = ts.abstract_train_state(optimizer, abstract_params, shardings)
      params, opt_state = checkpointer.restore(latest, abstract.params, abstract.opt_state, train_iter)
      return graphdef, ts.TrainState(params, opt_state), shardings
    if config.init_from:
      graphdef, params = _pretrained_params(config, model_config, mesh)
    else:
      graphdef, params = ts.init_params(model_config, mesh, config.seed)
    return graphdef, ts.init_train_state(optimizer, params, shardings), shardings


def _pretrained_params(config, model_config, mesh):
  """Parameters of the pretrained model ``config.init_from`` (HF, GGUF or a name), sharded on ``mesh``."""
  try:
    from ism_jax.convert import load_pretrained  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError(f"config.init_from={config.init_from!r} needs ism_jax.convert.load_pretrained, which "
                     f"could not be imported ({e}); set --config.init_from='' to start from random "
                     "weights") from e
  runtime = {name: getattr(model_config, name)
             for name in (*model_config.RUNTIME_FIELDS, "mask", "scan_layers", "param_dtype")}
  hf_config, model = load_pretrained(config.init_from, mesh, **runtime)
  names = [f.name for f in dataclasses.fields(model_config)]
  diffs = [f"model.{n}: checkpoint {getattr(hf_config, n)!r}, config {getattr(model_config, n)!r}"
           for n in names if getattr(hf_config, n) != getattr(model_config, n)]
  if diffs:
    raise ValueError(f"config.init_from={config.init_from!r} does not match the run's model config: "
                     + "; ".join(diffs) + ". Set these model fields to the checkpoint's values "
                     "(configs/finetune_hf.py copies them from the checkpoint)")
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


@dataclasses.dataclass
class _Run:
  """What the step loop works with, built once by :func:`train`."""

  config: ml_collections.ConfigDict
  model_config: Any
  mesh: Any
  data: Inputs
  checkpointer: checkpointing.Checkpointer
  fingerprint: dict
  step_fn: Callable
  eval_fn: Callable
  schedule: Callable
  writer: metrics.MetricsWriter
  progress: metrics.Progress
  peak: float | None
  guard: _DivergenceGuard | None = None  # set by _loop


def _check_mesh(config: ml_collections.ConfigDict, mesh) -> None:
  rows, accum = config.training.global_batch_size, config.training.grad_accum_steps
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if (rows // accum) % shards:
    raise ValueError(f"each microbatch of training.global_batch_size / grad_accum_steps = {rows // accum} "
                     f"rows must divide evenly over the mesh's data x fsdp = {shards} devices")


def _open_workdir(config, workdir: str, tokenizer, fingerprint: dict, primary: bool):
  """The checkpointer and the step to resume from (``None``: a new run), after the resume checks; only then
  the tokenizer and config are written."""
  os.makedirs(workdir, exist_ok=True)
  checkpointer = checkpointing.Checkpointer(workdir, config.training.keep_checkpoints,
                                            config.training.async_checkpoints)
  latest = checkpointer.latest_step()
  if latest is not None:
    checkpointing.check_resume(checkpointer.read_meta(latest), config, fingerprint, checkpointer.directory)
  if primary:
    checkpointing.install_tokenizer(workdir, tokenizer)
    checkpointing.write_config(workdir, config)
  return checkpointer, latest


def _announce(run: _Run, start: int, workdir: str, state) -> None:
  """The start message, a note when there is nothing left to train, and the step-0 evaluation (on every
  process: it is a collective; messages print on process 0 only)."""
  config, t = run.config, run.config.training
  run.progress.message(
      f"{'resuming from step ' + str(start) if start else 'starting'}: "
      f"{run.model_config.num_params() / 1e6:.2f}M parameters, mask {run.model_config.mask!r}, mesh "
      f"{dict(run.mesh.shape)}, {t.global_batch_size} rows x {config.data.seq_len} tokens per step, "
      f"workdir {workdir}")
  run.progress.message(run.data.survey.summary())
  if run.data.shard_report:  # every process says which records it reads
    print(run.data.shard_report, flush=True)
  if start >= t.num_steps:
    run.progress.message(f"the checkpoint at step {start} already reaches training.num_steps={t.num_steps}; "
                         "raise --config.training.num_steps to train further")
  if start == 0 and t.eval_every and run.data.eval_batches:  # the starting point of the eval curves
    with jax.set_mesh(run.mesh):
      initial = evaluation.evaluate(run.eval_fn, state.params, run.data.eval_batches, run.mesh)
    run.writer.write(0, initial)
    run.progress.message(f"step 0: {evaluation.summary(initial)}")


def train(config: ml_collections.ConfigDict, workdir: str,
          after_step: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in ``workdir``. Returns the last metrics record (with eval results).

  ``after_step(step)``, when given, is called after each step once its metrics and checkpoint are handled
  (a hook for tools and tests, e.g. one that kills the process at a chosen step).

  Raises:
    ValueError: invalid config, data or a checkpoint that does not fit this run (nothing written).
    NonFiniteLossError: the loss became NaN/Inf (the newest checkpoint is the last good one).
    DivergenceError: the state to be saved diverged (not saved; the newest checkpoint is the last good one).
  """
  config_lib.validate(config)
  model_config = config_lib.model_config(config)
  primary = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  _check_mesh(config, mesh)
  data = inputs.prepare(config)
  fingerprint = checkpointing.tokenizer_fingerprint(data.tokenizer)
  checkpointer, latest = _open_workdir(config, workdir, data.tokenizer, fingerprint, primary)

  optimizer, schedule = optimizer_from_config(config.optimizer, config.training.num_steps)
  graphdef, state, shardings = _restore_or_init(config, model_config, mesh, optimizer, checkpointer, latest,
                                                data.train)
  start = latest or 0
  train_step = ts.make_train_step(graphdef, optimizer, model_config.mask, config.training.grad_accum_steps,
                                  config.training.loss_chunk_tokens)
  writer = metrics.MetricsWriter(workdir, enabled=primary, tensorboard=config.metrics.tensorboard,
                                 resume_step=start)
  run = _Run(
      config=config, model_config=model_config, mesh=mesh, data=data, checkpointer=checkpointer,
      fingerprint=fingerprint, step_fn=ts.jit_train_step(train_step, shardings, mesh),
      eval_fn=ts.jit_eval_step(ts.make_eval_step(graphdef, evaluation.NUM_ROUNDS), shardings.params, mesh),
      schedule=schedule, writer=writer, progress=metrics.Progress(config.training.num_steps, start,
                                                                  enabled=primary),
      peak=flops.peak_flops_per_device(jax.devices()[0].device_kind, config.metrics.peak_tflops_per_device))
  _announce(run, start, workdir, state)
  try:
    state, step, record = _loop(run, state, start, latest, after_step)
  finally:
    checkpointer.wait()
    checkpointer.close()
    run.writer.close()
    run.progress.close()
  if step == config.training.num_steps and config.sample.enabled and primary and jax.process_count() == 1:
    _print_sample(config, state, graphdef, data, writer_step=step)
  return {"step": step, **record}


def _loop(run: _Run, state, start: int, latest: int | None, after_step):
  """Steps ``start + 1 ... num_steps`` (or until a stop signal). Returns ``(state, last step, record)``."""
  t, kind = run.config.training, run.model_config.mask
  window, saved, record, step = _Window(), latest, {}, start
  with jax.set_mesh(run.mesh):
    run.guard = _DivergenceGuard(t.divergence_factor, float(jax.jit(optax.tree.norm)(state.params)))
  status = lambda: (f"The last step started here is {step}; the newest checkpoint is "  # read when a peer dies
                    + (f"step {saved} in {run.checkpointer.directory}" if saved is not None else "none yet"))
  monitor = PeerMonitor(run.config.distributed.heartbeat_timeout, status)
  with _StopSignal(run.checkpointer) as stop, monitor, jax.set_mesh(run.mesh):
    for step in range(start + 1, t.num_steps + 1):
      host_batch = next(run.data.train)
      inputs.check_batch(host_batch, kind)
      state, step_metrics = run.step_fn(state, ts.device_batch(host_batch, run.mesh))
      window.pending.append((step, step_metrics))
      if step == start + 1:  # compile step: block so that throughput windows exclude it
        jax.block_until_ready(step_metrics)
        window.start_time = time.time()
      else:
        window.timed_steps += 1
      stopping = stop.stopping(step)
      last = step == t.num_steps or stopping
      do_eval = step == t.num_steps or (t.eval_every and step % t.eval_every == 0)
      do_save = last or step % t.checkpoint_every == 0
      if last or do_eval or do_save or step % t.log_every == 0:
        record = _write_record(run, window, step, state, saved, do_eval)
        window = _Window(start_time=time.time())
      if do_save:
        _save(run, step, state, host_batch, record, saved)
        saved = step
      if after_step is not None:
        after_step(step)
      if stopping:
        run.progress.message(f"{stop.received} received: saved step {step} to {run.checkpointer.directory}; "
                             "run the same command to resume")
        break
  return state, step, record


def _save(run: _Run, step: int, state, host_batch: dict, record: dict, saved: int | None) -> None:
  """Checks the state with the divergence guard (raising :class:`DivergenceError`, nothing written) and
  starts the checkpoint of ``step``. ``host_batch``: the step's batch, the guard's probe."""
  probe = run.eval_fn(state.params, ts.device_batch(host_batch, run.mesh, ts.EVAL_KEYS))
  problems = run.guard.problems(record["param_norm"], float(jax.device_get(probe["nll"]).sum()))
  if problems:
    raise DivergenceError(_stop_message("training diverged: " + "; ".join(problems), step, saved,
                                        run.checkpointer.directory))
  run.guard.saved()
  meta = checkpointing.checkpoint_meta(step, run.config, run.fingerprint)
  data_state = _IteratorSnapshot(run.data.train.get_state())
  run.checkpointer.save(step, state.params, state.opt_state, data_state, meta)


def _write_record(run: _Run, window: _Window, step: int, state, saved: int | None, do_eval: bool) -> dict:
  """Fetches the window's metrics (stopping at a NaN/Inf), evaluates when due, and writes the record."""
  values = window.fetch(saved, run.checkpointer.directory)
  run.guard.observe(values)
  seconds = time.time() - window.start_time
  record = _record(values, seconds, window.timed_steps, run.model_config, run.peak, jax.device_count(),
                   run.schedule)
  record.update(_data_counts(run.data.train.stats))
  if do_eval and run.data.eval_batches:
    record.update(evaluation.evaluate(run.eval_fn, state.params, run.data.eval_batches, run.mesh))
    run.progress.message(f"step {step}: {evaluation.summary(record)}")
  run.writer.write(step, record)
  run.progress.update(step, record["loss"], record["tokens_per_sec"], record["mfu"])
  return record


def _print_sample(config, state, graphdef, data, writer_step: int) -> None:
  """Greedy multi-turn chat on the first validation dialogues' user turns."""
  params = jax.device_put(state.params, jax.devices()[0])
  model = nnx.merge(graphdef, params)
  for i, dialogue in enumerate(data.sample_dialogues):
    turns = sample.sample_chat(model, data.tokenizer, dialogue, config.sample.rounds,
                               config.sample.max_answer_tokens, max_len=config.data.seq_len)
    print(f"\nsample chat {i + 1} (greedy, after step {writer_step}; user turns from the validation split):")
    print(sample.format_chat(turns), flush=True)
