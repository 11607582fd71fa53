"""The inference engine: bucketed prefill of typed token chunks and a fixed-shape decode step over one cache.

An :class:`Engine` serves ``B`` independent rows (dialogues) with one preallocated KV cache of ``max_len``
slots per row. Row ``b`` uses slots ``[0, fill[b])``; slot = position in the dialogue. One call of
:meth:`Engine.generate` is one round for every row that gets a chunk:

1. **Prefill**: each row's chunk (typed tokens, e.g. the end of the last answer then the new query block) is
   written at slots ``fill[b] + t`` in one jitted step. Mask ranges in slot coordinates: a QUERY token sees
   ``[0, end of its query block)``, an ANSWER token ``[0, own slot + 1)`` (types already relabelled for the
   mask kind by the caller). The logits of each row's last chunk token give the first answer token. With
   ``restart`` a row is rewritten from slot 0 (the ``prefix`` baseline).
2. **Decode**: one jitted program of fixed shapes runs ``decode_steps`` steps in a fixed-length loop on the
   device (one host call per ``decode_steps`` tokens, not per token). Each step feeds every row's last token
   (``[B, 1]``), attends over the whole cache with ranges ``[0, slot + 1)``, samples the next token, and
   stops a row on end of turn or its token budget (finished rows idle through the rest of the call and keep
   their fill; their writes land past it). The host reads the ``done`` flags one call behind the device, so
   the device never waits on the host.

Shapes are bucketed so that few programs are compiled: a chunk is padded to ``T``, the next bucket length
(powers of two, then multiples of ``bucket_step``; see :func:`bucket_lengths`); padding is never seen, and
its cache writes land past the row's fill or are dropped past the end. Each prefill attends over a key window
of ``W`` slots. When every row starts at slot 0 (a first round, a ``prefix`` recompute) ``W = T`` and the
ranges are the chunk's own (all four arrays), so on GPU and TPU the training kernel runs. Other prefills and
the decode step have per-query ranges: on GPU and TPU they run the kernel's forward-only path, which reads
only the slots below each row's ``k_hi`` (on GPU shared out among its key splits; :mod:`ism_jax.attention`),
so they take the whole cache (``W = max_len``); the dense XLA path pays for every key it is given, so there
``W`` is the bucket length at or above the furthest slot any row's chunk reaches and an early round does not
pay for the empty end of the cache (:func:`ism_jax.attention.key_window` says which). Compiled programs
(:mod:`ism_jax.inference.steps`): one decode program, and one prefill per ``(T, W)`` pair, shared by all
engines over equal models (:func:`~ism_jax.inference.steps.compiled_counts` counts them;
:meth:`Engine.warmup` compiles them ahead). The cache buffer is donated to every step: updates are in place.

Serving latency at batch 1 is mostly fixed cost per step (host dispatch, kernel launches), so by default the
engine serves the model unrolled and with fused projections (:func:`ism_jax.inference.rewrites.
unstack_layers`, :func:`~ism_jax.inference.rewrites.fuse_projections`: the same network, fewer and larger
kernels), sends a prefill's inputs in one transfer (:func:`~ism_jax.inference.steps.pack_chunks`), draws
random keys on the device and has the step write the first token into host memory itself.
docs/BENCHMARKS.md has the measurements.
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ism_jax.attention import key_window
from ism_jax.inference import cache as cache_lib
from ism_jax.inference import rewrites, steps
from ism_jax.inference.sampling import SamplingParams, as_arrays
from ism_jax.inference.steps import DecodeCall, DecodeState, ModelStructure, Prefilled, pack_chunks
from ism_jax.masks import SegmentType
from ism_jax.model import Transformer

DEFAULT_MIN_BUCKET = 32
DEFAULT_BUCKET_STEP = 1024
DEFAULT_DECODE_STEPS = 8


ANSWER_SLOTS = 2  # room a chunk must leave in its row: the first answer token and the end of turn after it


class Chunk(NamedTuple):
  """Tokens to append to one row: ids and segment types (QUERY/ANSWER as the mask should treat them),
  ``[T]`` int32 each. A plain ``(tokens, segment_types)`` tuple works too."""

  tokens: np.ndarray
  segment_types: np.ndarray


class PrefillShape(NamedTuple):
  """The static shape of one prefill program: chunk length ``T``, key window ``W``, and whether every row
  starts at slot 0."""

  length: int
  window: int
  from_start: bool


class CacheFullError(ValueError):
  """A chunk does not fit in a row's remaining cache slots (raised before any work)."""


def bucket_lengths(max_len: int, min_bucket: int = DEFAULT_MIN_BUCKET, step: int | None = None
                   ) -> tuple[int, ...]:
  """Padded lengths below ``max_len``, then ``max_len``: powers of two from ``min_bucket``, and past ``step``
  the multiples of ``step`` (long chunks waste at most ``step`` padded tokens). ``step=None``: powers only.

  >>> bucket_lengths(5000, min_bucket=256, step=1024)
  (256, 512, 1024, 2048, 3072, 4096, 5000)
  """
  buckets, b = [], min_bucket
  while b < max_len:
    buckets.append(b)
    b = b * 2 if step is None or b < step else b + step
  return tuple(buckets) + (max_len,)


@dataclasses.dataclass
class Generation:
  """What one :meth:`Engine.generate` call produced.

  Attributes:
    answers: per row, the answer tokens ``[n_b]`` int32 (end of turn included when emitted), or ``None``
      for rows without a chunk.
    stop_reasons: per row ``"end_of_turn"``, ``"max_new_tokens"``, ``"cache_full"`` (the budget was cut to
      the free slots) or ``None``.
    logits: with ``return_logits``, per row ``[n_b, V]`` float32: the logits each answer token was drawn from.
    ttft_s: seconds from the call to the first answer tokens on the host (the prefill, sampling included).
    decode_s: seconds from then until every row stopped.
    decode_tokens: answer tokens produced by decode steps (all rows; the first tokens come from prefill).
  """

  answers: list[np.ndarray | None]
  stop_reasons: list[str | None]
  logits: list[np.ndarray | None] | None
  ttft_s: float
  decode_s: float
  decode_tokens: int

  @property
  def decode_tokens_per_s(self) -> float:
    return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


@dataclasses.dataclass
class _Plan:
  """One round as checked by :meth:`Engine._validate`: the rows with chunks, each row's first slot, answer
  budget and chunk length (``[B]`` int64 each; 0 for rows without a chunk)."""

  rows: list[int]
  starts: np.ndarray
  budgets: np.ndarray
  lengths: np.ndarray


def _cast_params(state: nnx.State, dtype) -> nnx.State:
  """Matrices and embedding tables in the compute dtype (norm scales stay): the model casts them anyway."""
  def cast(x):
    if isinstance(x, jax.Array) and x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x
  return jax.tree.map(cast, state)


class Engine:
  """Prefill and decode for ``batch_size`` rows sharing one KV cache of ``max_len`` slots per row.

  Args:
    model: a :class:`~ism_jax.model.Transformer` (sharded already when ``mesh`` is given).
    batch_size: number of independent rows.
    max_len: cache slots per row (the longest dialogue a row can hold).
    mesh: run sharded on this mesh; the cache is created sharded like the model's attention.
    min_bucket: the smallest padded chunk length.
    bucket_step: past this length chunks are padded to its multiples (not to powers of two); ``None``: powers
      of two up to ``max_len``.
    cast_params: keep matrices in the compute dtype (halves the weight reads of a float32-parameter model
      computing in bfloat16; the results are identical, since the model casts them before every use).
    unroll_layers: serve a model that scans its layers with them unrolled (:func:`~ism_jax.inference.
      rewrites.unstack_layers`: the same network, fewer and larger GPU launches per step, longer compiles).
    fuse_projections: serve with q/k/v and gate/up weights concatenated (:func:`~ism_jax.inference.
      rewrites.fuse_projections`: the same network in fewer, larger matmuls). Both copy the parameters: the
      engine keeps its own, so drop the model after building the engine to hold them once.
    decode_steps: decode steps per device call (a fixed-length loop on the device). At batch 1 a step costs
      about as much to launch from the host as to run, so one call per token leaves the GPU waiting on
      Python and dispatch; a loop of steps is launched at once. The price: a call runs all its steps, and
      the host learns that every row stopped (end of turn) one call late, so an answer that ends on end of
      turn costs up to ``2 * decode_steps - 1`` extra steps of device work (one that ends on its budget only
      the rest of its last call). 1: one call per token.
    seed: seed of the sampling key.
  """

  def __init__(self, model: Transformer, *, batch_size: int = 1, max_len: int = 2048,
               mesh: Mesh | None = None, min_bucket: int = DEFAULT_MIN_BUCKET,
               bucket_step: int | None = DEFAULT_BUCKET_STEP, cast_params: bool = True,
               unroll_layers: bool = True, fuse_projections: bool = True,
               decode_steps: int = DEFAULT_DECODE_STEPS, seed: int = 0):
    if max_len < 2:
      raise ValueError(f"max_len={max_len}: the cache needs at least 2 slots")
    if decode_steps < 1:
      raise ValueError(f"decode_steps={decode_steps} must be >= 1")
    if unroll_layers:
      model = rewrites.unstack_layers(model)
    if fuse_projections:
      model = rewrites.fuse_projections(model)
    self.config = model.config
    self.batch_size = batch_size
    self.max_len = max_len
    self.decode_steps = decode_steps
    self.mesh = mesh
    self.buckets = bucket_lengths(max_len, min_bucket, bucket_step)  # chunk lengths T and key windows W
    graphdef, state = nnx.split(model)
    if cast_params and self.config.weight_dtype != self.config.dtype:
      state = _cast_params(state, self.config.dtype)
    leaves, treedef = jax.tree.flatten(state)
    self._structure = ModelStructure(graphdef, treedef)
    # Inputs are committed to their devices, like the steps' outputs (see steps.prefill), so that warm-up
    # calls and later calls share their executables.
    self._placement = jax.devices()[0] if mesh is None else NamedSharding(mesh, PartitionSpec())
    self._params = leaves if mesh is not None else jax.device_put(leaves, self._placement)
    self.cache = cache_lib.allocate(self.config, batch_size, max_len, mesh)
    if mesh is None:
      self.cache = jax.device_put(self.cache, self._placement)
    self._fill = np.zeros(batch_size, np.int64)
    self._key = self._put(jax.random.key(seed))

  # --------------------------------------------------------------------------------------------------------
  # Host-side state.
  # --------------------------------------------------------------------------------------------------------

  @property
  def fill(self) -> np.ndarray:
    """``[B]`` slots in use per row (a copy)."""
    return self._fill.copy()

  def reset(self, rows: Sequence[int] | None = None) -> None:
    """Empties rows (all by default); their slots are overwritten by the next chunk."""
    rows = range(self.batch_size) if rows is None else rows
    for b in rows:
      self._fill[b] = 0

  def bucket(self, length: int) -> int:
    """The smallest bucket length that holds ``length`` tokens (or slots)."""
    for b in self.buckets:
      if length <= b:
        return b
    raise CacheFullError(f"a chunk of {length} tokens exceeds the cache of {self.max_len} slots")

  def check_room(self, row: int, have: int, new: int, error: type[CacheFullError] = CacheFullError) -> None:
    """Raises ``error`` unless ``new`` tokens after the ``have`` a row holds leave room for an answer.

    Room for an answer is :data:`ANSWER_SLOTS` slots: its first token and the end of turn that may follow.
    """
    needed = have + new + ANSWER_SLOTS
    if needed > self.max_len:
      raise error(
          f"row {row}: the dialogue so far ({have} tokens) + {new} new tokens + {ANSWER_SLOTS} answer slots "
          f"(first answer token, end of turn) = {needed} tokens exceed the KV cache of "
          f"max_len={self.max_len}; reset the row (start a new dialogue) or use a larger max_len")

  def _put(self, tree):
    """Host values (or device arrays) committed to the engine's device (replicated over its mesh)."""
    return jax.device_put(tree, self._placement)

  def _run(self, fn, *args, **kwargs):
    """Calls a jitted step on the engine's parameters (under its mesh, if any)."""
    if self.mesh is None:
      return fn(self._params, *args, structure=self._structure, **kwargs)
    with jax.set_mesh(self.mesh):
      return fn(self._params, *args, structure=self._structure, **kwargs)

  def _prefill_call(self, packed_BX: np.ndarray, sampling, *, window: int, from_start: bool,
                    all_greedy: bool) -> Prefilled:
    """One prefill step on chunks packed by :func:`~ism_jax.inference.steps.pack_chunks`; updates the cache
    and the random key."""
    self.cache, self._key, out = self._run(steps.prefill, self.cache, packed_BX, self._key, sampling,
                                           window=window, from_start=from_start, all_greedy=all_greedy)
    return out

  def _decode_call(self, state: DecodeState, sampling, eot_id, *, all_greedy: bool,
                   keep_logits: bool) -> DecodeCall:
    """One call of ``decode_steps`` decode steps; updates the cache and the random key."""
    self.cache, self._key, out = self._run(steps.decode, self.cache, state, self._key, sampling, eot_id,
                                           steps=self.decode_steps, all_greedy=all_greedy,
                                           keep_logits=keep_logits)
    return out

  # --------------------------------------------------------------------------------------------------------
  # Single steps, for a scheduler that owns the rows (ism_jax.inference.scheduler): the engine's host-side
  # fill is not kept up to date by these.
  # --------------------------------------------------------------------------------------------------------

  def put(self, tree):
    """Host values committed to the engine's device (what every step's inputs must be)."""
    return self._put(tree)

  def prefill_step(self, packed_BX: np.ndarray, sampling, *, window: int, from_start: bool,
                   all_greedy: bool) -> Prefilled:
    """One prefill step over all ``B`` rows (chunks packed by :func:`~ism_jax.inference.steps.pack_chunks`;
    rows with length 0 are untouched)."""
    return self._prefill_call(packed_BX, sampling, window=window, from_start=from_start,
                              all_greedy=all_greedy)

  def prefill_rows(self, packed_PX: np.ndarray, rows_P: np.ndarray, sampling, *, window: int,
                   from_start: bool, all_greedy: bool) -> Prefilled:
    """One prefill step on the distinct rows ``rows_P`` only (:func:`~ism_jax.inference.steps.prefill_rows`):
    ``[P]`` first tokens, the other rows untouched."""
    self.cache, self._key, out = self._run(steps.prefill_rows, self.cache, packed_PX,
                                           self._put(np.asarray(rows_P, np.int32)), self._key, sampling,
                                           window=window, from_start=from_start, all_greedy=all_greedy)
    return out

  def decode_call(self, state: DecodeState, sampling, eot_id, *, all_greedy: bool) -> DecodeCall:
    """One call of ``decode_steps`` decode steps over all rows (inputs on the device, see :meth:`put`)."""
    return self._decode_call(state, sampling, eot_id, all_greedy=all_greedy, keep_logits=False)

  @property
  def slot_bytes(self) -> int:
    """Bytes of keys and values one row (conversation) of the cache holds: ``max_len`` slots."""
    return sum(x.nbytes for x in jax.tree.leaves(self.cache)) // self.batch_size

  # --------------------------------------------------------------------------------------------------------
  # One round.
  # --------------------------------------------------------------------------------------------------------

  def _validate(self, chunks, restart, max_new_tokens):
    if len(chunks) != self.batch_size:
      raise ValueError(f"expected {self.batch_size} chunks (one per row, None to skip), got {len(chunks)}")
    budgets = np.zeros(self.batch_size, np.int64)
    starts, rows = self._fill.copy(), []
    for b, chunk in enumerate(chunks):
      if chunk is None:
        continue
      tokens, types = chunk.tokens, chunk.segment_types
      if tokens.ndim != 1 or tokens.shape != types.shape or tokens.size == 0:
        raise ValueError(f"row {b}: a chunk is two equal non-empty 1-D arrays (tokens, segment types), got "
                         f"shapes {tokens.shape} and {types.shape}")
      if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
        raise ValueError(f"row {b}: token ids must be in [0, {self.config.vocab_size}), got "
                         f"[{tokens.min()}, {tokens.max()}]")
      if not ((types == SegmentType.QUERY) | (types == SegmentType.ANSWER)).all():  # (np.isin: slower)
        raise ValueError(f"row {b}: chunk segment types must be QUERY (1) or ANSWER (2)")
      if restart[b]:
        starts[b] = 0
      self.check_room(b, int(starts[b]), tokens.size)
      if max_new_tokens[b] < 1:
        raise ValueError(f"row {b}: max_new_tokens={max_new_tokens[b]} must be >= 1")
      budgets[b] = min(max_new_tokens[b], self.max_len - starts[b] - tokens.size - 1)
      rows.append(b)
    if not rows:
      raise ValueError("generate needs at least one row with a chunk")
    lengths = np.array([0 if c is None else c.tokens.size for c in chunks], np.int64)
    return _Plan(rows, starts, budgets, lengths)

  def generate(self, chunks: Sequence[Chunk | tuple[np.ndarray, np.ndarray] | None], *,
               restart: bool | Sequence[bool] = False, max_new_tokens: int | Sequence[int] = 256,
               sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
               eot_id: int | None = None, return_logits: bool = False) -> Generation:
    """Prefills each row's chunk and decodes its answer; everything is checked before any work.

    Args:
      chunks: per row ``(tokens [T_b], segment_types [T_b])`` to append (types QUERY/ANSWER as the mask
        should treat them), or ``None`` for rows that sit this round out.
      restart: per row (or for all): write the chunk from slot 0, discarding the row's cache.
      max_new_tokens: per row (or for all): the answer token budget, cut to the row's free slots minus one
        (room for an end-of-turn token the caller may append).
      sampling: per row (or for all).
      eot_id: stop a row when it emits this token (``None``: stop on the budget only).
      return_logits: also return the logits of every answer token (for tests; costs transfers).

    Raises:
      CacheFullError: a chunk does not fit (row state unchanged).
    """
    start_time = time.perf_counter()
    chunks = [None if c is None else Chunk(*(np.asarray(x, np.int32) for x in c)) for c in chunks]
    per_row = lambda x: [x] * self.batch_size if not isinstance(x, (list, tuple)) else list(x)
    restart, max_new_tokens, sampling = per_row(restart), per_row(max_new_tokens), per_row(sampling)
    plan = self._validate(chunks, restart, max_new_tokens)
    all_greedy = all(sampling[b].greedy for b in plan.rows)  # static: greedy steps skip the sort over vocab
    sampling_arrays = None if all_greedy else as_arrays(sampling)  # greedy steps take no settings

    prefilled = self._prefill(chunks, plan, sampling_arrays, all_greedy)
    first = np.asarray(prefilled.first_on_host_B)
    ttft = time.perf_counter() - start_time
    eot = -1 if eot_id is None else eot_id
    active = np.isin(np.arange(self.batch_size), plan.rows)
    fill = np.where(active, plan.starts + plan.lengths, self._fill)
    remaining = np.where(active, plan.budgets - 1, 0)
    done = ~active | (first == eot) | (remaining <= 0)
    calls = self._decode_loop(prefilled.first_B, fill, remaining, done, sampling_arrays, all_greedy, eot,
                              return_logits)
    tokens = np.concatenate([first[:, None]] + [np.asarray(c.tokens_BN) for c in calls], axis=1)
    if calls:
      self._fill = np.asarray(calls[-1].state.fill_B).astype(np.int64)
      remaining = np.asarray(calls[-1].state.remaining_B)
    else:
      self._fill = fill
    decode_time = time.perf_counter() - start_time - ttft
    logits = None
    if return_logits:
      logits = np.concatenate([np.asarray(prefilled.logits_BV)[:, None]]
                              + [np.asarray(c.logits_BNV) for c in calls], axis=1)
    return self._generation(plan, tokens, remaining, logits, max_new_tokens, eot, ttft, decode_time)

  def _generation(self, plan, tokens_BN, remaining_B, logits_BNV, max_new_tokens, eot, ttft, decode_time
                  ) -> Generation:
    """Cuts each row's answer out of the tokens of every step and names why it stopped."""
    out = Generation(answers=[None] * self.batch_size, stop_reasons=[None] * self.batch_size,
                     logits=None if logits_BNV is None else [None] * self.batch_size, ttft_s=ttft,
                     decode_s=decode_time, decode_tokens=0)
    for b in plan.rows:
      n = int(plan.budgets[b] - remaining_B[b])
      out.answers[b] = tokens_BN[b, :n]
      out.decode_tokens += n - 1
      if out.answers[b][-1] == eot:
        out.stop_reasons[b] = "end_of_turn"
      else:
        out.stop_reasons[b] = "max_new_tokens" if n == max_new_tokens[b] else "cache_full"
      if logits_BNV is not None:
        out.logits[b] = logits_BNV[b, :n]
    return out

  def _prefill(self, chunks, plan: _Plan, sampling, all_greedy) -> Prefilled:
    """Pads the chunks to their bucket, picks the key window and runs the prefill step."""
    padded = self.bucket(int(plan.lengths.max()))
    from_start = all(plan.starts[b] == 0 for b in plan.rows)
    reach = int(max(plan.starts[b] + plan.lengths[b] for b in plan.rows))  # one past the furthest slot
    window = self.prefill_window(padded, reach, from_start)
    tokens_BT = np.zeros((self.batch_size, padded), np.int32)
    types_BT = np.full((self.batch_size, padded), SegmentType.PAD, np.int32)
    for b in plan.rows:
      tokens_BT[b, :plan.lengths[b]] = chunks[b].tokens
      types_BT[b, :plan.lengths[b]] = chunks[b].segment_types
    packed = pack_chunks(tokens_BT, types_BT, plan.starts, plan.lengths)
    return self._prefill_call(packed, sampling, window=window, from_start=from_start, all_greedy=all_greedy)

  def _decode_loop(self, token_B, fill, remaining, done, sampling, all_greedy, eot, return_logits
                   ) -> list[DecodeCall]:
    """Runs decode calls (``decode_steps`` steps each) until every row is done; the host reads the ``done``
    flags one call behind, so the next call is queued before it waits. Returns the calls (device arrays)."""
    calls: list[DecodeCall] = []
    if done.all():
      return calls
    fill_B, remaining_B, done_B = self._put((fill.astype(np.int32), remaining.astype(np.int32), done))
    state = DecodeState(token_B=token_B, fill_B=fill_B, remaining_B=remaining_B, done_B=done_B)
    sampling, eot_id = self._put((sampling, np.int32(eot)))  # moved to the device once
    for i in range(-(-int(remaining.max()) // self.decode_steps)):
      call = self._decode_call(state, sampling, eot_id, all_greedy=all_greedy, keep_logits=return_logits)
      call.state.done_B.copy_to_host_async()
      calls.append(call)
      state = call.state
      if i >= 1 and np.asarray(calls[i - 1].state.done_B).all():
        break
    return calls

  def prefill_window(self, padded: int, reach: int, from_start: bool) -> int:
    """The key window ``W`` of a prefill of chunks padded to ``padded`` that write up to slot ``reach``."""
    if from_start:
      return padded
    return key_window(self.config.attention_impl, max(padded, self.bucket(reach)), self.max_len)

  def prefill_shapes(self, chunk_lengths: Sequence[int]) -> list[PrefillShape]:
    """Every prefill shape a chunk of one of these lengths can need (for :meth:`warmup`)."""
    shapes = set()
    for padded in {self.bucket(n) for n in chunk_lengths}:
      shapes.add(PrefillShape(padded, padded, True))
      windows = {key_window(self.config.attention_impl, w, self.max_len) for w in self.buckets if w >= padded}
      shapes.update(PrefillShape(padded, w, False) for w in windows)
    return sorted(shapes)

  def warmup(self, shapes: Sequence[PrefillShape] | None = None, chunk_lengths: Sequence[int] = (),
             modes: Sequence[str] = ("greedy", "sampled")) -> None:
    """Compiles the decode program and the prefill programs ``shapes`` (default: :meth:`prefill_shapes` of
    ``chunk_lengths``), for each sampling mode in ``modes`` (``"greedy"``: every row has temperature 0).

    Runs them on rows without chunks, so no row's cache or fill changes.
    """
    shapes = self.prefill_shapes(chunk_lengths) if shapes is None else shapes
    none_B = np.zeros(self.batch_size, np.int32)
    for all_greedy in (mode == "greedy" for mode in modes):
      sampling = None if all_greedy else as_arrays([SamplingParams()] * self.batch_size)
      for padded, window, from_start in shapes:
        empty = pack_chunks(*(2 * [np.zeros((self.batch_size, padded), np.int32)]), none_B, none_B)
        self._prefill_call(empty, sampling, window=window, from_start=from_start, all_greedy=all_greedy)
      state = DecodeState(*self._put((none_B, self._fill.astype(np.int32), none_B,
                                      np.ones(self.batch_size, bool))))
      self._decode_call(state, self._put(sampling), self._put(np.int32(-1)), all_greedy=all_greedy,
                        keep_logits=False)
    jax.block_until_ready(self.cache)
