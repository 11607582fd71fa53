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
ranges are the chunk's own (all four arrays), so on GPU the training kernel runs. Other prefills and the
decode step have per-query ranges: on GPU they run the kernel's forward-only path, which reads only the
slots below each row's ``k_hi`` and shares them out among its key splits (:mod:`ism_jax.attention`), so they
take the whole cache (``W = max_len``); the dense XLA path pays for every key it is given, so there ``W`` is
the bucket length at or above the furthest slot any row's chunk reaches and an early round does not pay for
the empty end of the cache. Compiled programs: one decode program, and one prefill per ``(T, W)`` pair, shared
by all engines over equal models (:data:`TRACE_COUNTS` counts traces, :func:`compiled_counts` executables;
:meth:`Engine.warmup` compiles them ahead). The cache buffer is donated to every step: updates are in place.

Serving latency at batch 1 is mostly fixed cost per step (host dispatch, kernel launches), so by default the
engine serves the model unrolled and with fused projections (:func:`ism_jax.model.unstack_layers`,
:func:`ism_jax.model.fuse_projections`: the same network, fewer and larger kernels), sends a prefill's
inputs in one transfer (:func:`pack_chunks`), draws random keys on the device and has the step write the
first token into host memory itself. docs/BENCHMARKS.md has the measurements.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ism_jax.attention import resolve_impl
from ism_jax.inference import cache as cache_lib
from ism_jax.inference.sampling import SamplingParams, as_arrays, greedy, sample
from ism_jax.masks import MaskRanges, SegmentType, make_attention_ranges
from ism_jax.model import Transformer, unstack_layers
from ism_jax.model import fuse_projections as _fuse

DEFAULT_MIN_BUCKET = 32
DEFAULT_BUCKET_STEP = 1024
DEFAULT_DECODE_STEPS = 8


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


def chunk_ranges(types_BT: jax.Array, start_B: jax.Array, from_start: bool) -> MaskRanges:
  """Mask ranges of a chunk written at slots ``start_B[b] + t``, in slot coordinates.

  ``types_BT`` are the mask-effective segment types with padding (``PAD``) at the end of each row. With
  ``from_start`` every row with tokens starts at slot 0 and keys are the chunk itself, so the full range form
  (``q_lo``/``q_hi`` too, which the differentiable Pallas kernels take) is that of the chunk. Otherwise real
  tokens see ``[0, start + chunk-local k_hi)`` and padding tokens repeat the last real token's range (a row
  without tokens sees slot 0), so ``k_hi`` stays non-decreasing along the chunk as the kernels' tile bounds
  need; padding rows are never read.

  Returns:
    ``MaskRanges``, ``[B, T]`` int32 arrays (``k_lo, k_hi`` only unless ``from_start``).
  """
  ranges = make_attention_ranges(types_BT)
  if from_start:
    return ranges
  real_BT = types_BT != SegmentType.PAD
  k_hi_BT = jax.lax.cummax(jnp.where(real_BT, ranges.k_hi + start_B[:, None], 1), axis=1)
  return MaskRanges(k_lo=jnp.zeros_like(k_hi_BT), k_hi=k_hi_BT)


# Traces of the jitted steps, by step and shape (a test counts them to prove that rounds and tokens do not
# recompile).
TRACE_COUNTS: collections.Counter = collections.Counter()


def _next_tokens(logits_BV, key, sampling, all_greedy: bool):
  return greedy(logits_BV) if all_greedy else sample(logits_BV, key, **sampling)


def pack_chunks(tokens_BT: np.ndarray, types_BT: np.ndarray, start_B: np.ndarray, length_B: np.ndarray
                ) -> np.ndarray:
  """The inputs of a prefill step as one ``[B, 2 T + 2]`` int32 array (one host-to-device transfer):
  tokens ``[B, T]``, segment types ``[B, T]``, each row's first slot and its chunk length."""
  return np.concatenate([tokens_BT, types_BT, start_B[:, None], length_B[:, None]], axis=1).astype(np.int32)


def _prefill_step(model: Transformer, cache, chunks_BX, key, sampling, *, window, from_start, all_greedy):
  """Writes chunks (packed by :func:`pack_chunks`) at each row's start slot, attending over slots
  ``[0, window)``.

  Returns the cache, the first answer tokens ``[B]``, their logits ``[B, V]`` and the next random key.
  """
  length, max_len = (chunks_BX.shape[1] - 2) // 2, cache_lib.num_slots(cache)
  TRACE_COUNTS[prefill_name(length, window, from_start, all_greedy)] += 1
  tokens_BT, types_BT = chunks_BX[:, :length], chunks_BX[:, length:2 * length]
  start_B, length_B = chunks_BX[:, 2 * length], chunks_BX[:, 2 * length + 1]
  key, draw_key = jax.random.split(key)
  ranges = chunk_ranges(types_BT, start_B, from_start)
  positions_BT = start_B[:, None] + jnp.arange(length, dtype=jnp.int32)
  write_B = jnp.where(length_B > 0, start_B, window)  # rows without a chunk write nothing
  view = cache if window == max_len else cache_lib.window(cache, window)
  last_B1 = jnp.maximum(length_B - 1, 0)[:, None]
  logits_B1V, view = model.forward(tokens_BT, positions_BT, ranges, view, write_B, logits_at_BN=last_B1)
  cache = view if window == max_len else cache_lib.put_window(cache, view)
  first_B = _next_tokens(logits_B1V[:, 0], draw_key, sampling, all_greedy)
  # A copy in host memory, written by the step itself: the host reads the first token as soon as the step
  # is done, without a device-to-host transfer of its own. (A host-memory output commits every output of
  # the step to its device; the engine commits all inputs alike, so each program compiles once.)
  first_on_host_B = jax.device_put(first_B, jax.memory.Space.Host)
  return cache, first_B, first_on_host_B, logits_B1V[:, 0], key


def _decode_steps(model: Transformer, cache, token_B, fill_B, remaining_B, done_B, key, sampling, eot_id, *,
                  steps: int, all_greedy: bool, keep_logits: bool):
  """``steps`` decode steps in one call: a loop of fixed length on the device (launched from the host once).

  Each step feeds ``token_B`` at slots ``fill_B`` (attending to ``[0, fill + 1)``), samples the next tokens,
  and advances the rows that are not done; a row is done after it emits ``eot_id`` or spends its budget
  ``remaining_B``. Done rows emit 0 and keep their fill (their cache writes land past it) for the rest of the
  loop.

  Returns:
    ``(cache, tokens_BN, token_B, fill_B, remaining_B, done_B, key, logits_BNV)``: ``tokens_BN``
    ``[B, steps]`` the tokens of each step (0 once a row is done), ``token_B`` the token to feed next, the
    updated state, and with ``keep_logits`` the logits ``[B, steps, V]`` each token was drawn from (else
    ``None``).
  """
  TRACE_COUNTS[decode_name(steps, all_greedy, keep_logits)] += 1
  batch = token_B.shape[0]

  def step(i, carry):
    cache, token_B, fill_B, remaining_B, done_B, key, tokens_BN, logits_BNV = carry
    key, draw_key = jax.random.split(key)
    ranges = MaskRanges(k_lo=jnp.zeros_like(fill_B)[:, None], k_hi=fill_B[:, None] + 1)
    logits_B1V, cache = model.forward(token_B[:, None], fill_B[:, None], ranges, cache, fill_B)
    active_B = ~done_B
    next_B = jnp.where(active_B, _next_tokens(logits_B1V[:, 0], draw_key, sampling, all_greedy), 0)
    fill_B = fill_B + active_B
    remaining_B = remaining_B - active_B
    done_B = done_B | (next_B == eot_id) | (remaining_B <= 0)
    tokens_BN = jax.lax.dynamic_update_slice(tokens_BN, next_B[:, None], (0, i))
    if keep_logits:
      logits_BNV = jax.lax.dynamic_update_slice(logits_BNV, logits_B1V.astype(logits_BNV.dtype), (0, i, 0))
    return cache, next_B, fill_B, remaining_B, done_B, key, tokens_BN, logits_BNV

  logits_BNV = jnp.zeros((batch, steps, model.config.vocab_size), jnp.float32) if keep_logits else None
  tokens_BN = jnp.zeros((batch, steps), jnp.int32)
  carry = jax.lax.fori_loop(0, steps, step, (cache, token_B, fill_B, remaining_B, done_B, key, tokens_BN,
                                             logits_BNV))
  cache, token_B, fill_B, remaining_B, done_B, key, tokens_BN, logits_BNV = carry
  return cache, tokens_BN, token_B, fill_B, remaining_B, done_B, key, logits_BNV


# The jitted steps of each model structure; engines over equal models share them (and their executables).
_JITTED_STEPS: dict = {}


def _jitted_steps(graphdef, treedef):
  """``(prefill, decode)`` jitted over the model's parameter leaves (a flat list, cheap to pass per step)."""
  key = (graphdef, treedef)
  if key not in _JITTED_STEPS:
    model = lambda leaves: nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    prefill = lambda leaves, *args, **kwargs: _prefill_step(model(leaves), *args, **kwargs)
    decode = lambda leaves, *args, **kwargs: _decode_steps(model(leaves), *args, **kwargs)
    _JITTED_STEPS[key] = (
        jax.jit(prefill, static_argnames=("window", "from_start", "all_greedy"), donate_argnums=1),
        jax.jit(decode, static_argnames=("steps", "all_greedy", "keep_logits"), donate_argnums=1),
    )
  return _JITTED_STEPS[key]


def prefill_name(length: int, window: int, from_start: bool, all_greedy: bool = True) -> str:
  """The :data:`TRACE_COUNTS` key of a prefill program, e.g. ``"prefill[T=32,W=128]"``."""
  flags = (",from_start" if from_start else "") + ("" if all_greedy else ",sampled")
  return f"prefill[T={length},W={window}{flags}]"


def decode_name(steps: int, all_greedy: bool = True, keep_logits: bool = False) -> str:
  """The :data:`TRACE_COUNTS` key of a decode program, e.g. ``"decode[N=8]"``."""
  return f"decode[N={steps}" + ("" if all_greedy else ",sampled") + (",logits" if keep_logits else "") + "]"


def compiled_counts() -> dict[str, int]:
  """Executables held by the jitted steps of all engines: ``{"prefill": n, "decode": m}``."""
  steps = list(_JITTED_STEPS.values())
  size = lambda fn: fn._cache_size()  # pylint: disable=protected-access
  return {"prefill": sum(size(p) for p, _ in steps), "decode": sum(size(d) for _, d in steps)}


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
    unroll_layers: serve a model that scans its layers with them unrolled (:func:`~ism_jax.model.
      unstack_layers`: the same network, fewer and larger GPU launches per step, longer compiles).
    fuse_projections: serve with q/k/v and gate/up weights concatenated (:func:`~ism_jax.model.
      fuse_projections`: the same network in fewer, larger matmuls). Both copy the parameters: the engine
      keeps its own, so drop the model after building the engine to hold them once.
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
      model = unstack_layers(model)
    if fuse_projections:
      model = _fuse(model)
    self.config = model.config
    self.batch_size = batch_size
    self.max_len = max_len
    self.decode_steps = decode_steps
    self.mesh = mesh
    self.buckets = bucket_lengths(max_len, min_bucket, bucket_step)  # chunk lengths T and key windows W
    # Dense attention pays for every key it is given, so a cached prefill gets a window of the cache; the
    # forward-only kernel reads only the slots below each query's k_hi, so it takes the whole cache.
    self._windowed = resolve_impl(self.config.attention_impl) != "pallas_gpu"
    graphdef, state = nnx.split(model)
    if cast_params and self.config.weight_dtype != self.config.dtype:
      state = _cast_params(state, self.config.dtype)
    leaves, treedef = jax.tree.flatten(state)
    # Inputs are committed to their devices, like the steps' outputs (see _prefill_step), so that warm-up
    # calls and later calls share their executables.
    self._placement = jax.devices()[0] if mesh is None else NamedSharding(mesh, PartitionSpec())
    self._params = leaves if mesh is not None else jax.device_put(leaves, self._placement)
    self._prefill_fn, self._decode_fn = _jitted_steps(graphdef, treedef)
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

  def check_fits(self, b: int, start: int, length: int) -> None:
    """Raises :class:`CacheFullError` unless ``length`` tokens at ``start`` leave room for an answer."""
    if start + length + 2 > self.max_len:
      raise CacheFullError(
          f"row {b}: {start} cached tokens + a chunk of {length} tokens + 2 answer slots (first answer "
          f"token, end of turn) = {start + length + 2} > max_len={self.max_len}; reset the row or build the "
          "engine with a larger max_len"
      )

  def _put(self, tree):
    """Host values (or device arrays) committed to the engine's device (replicated over its mesh)."""
    return jax.device_put(tree, self._placement)

  def _run(self, fn, *args, **kwargs):
    if self.mesh is None:
      return fn(self._params, *args, **kwargs)
    with jax.set_mesh(self.mesh):
      return fn(self._params, *args, **kwargs)

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
      tokens, types = chunk
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
      self.check_fits(b, int(starts[b]), tokens.size)
      if max_new_tokens[b] < 1:
        raise ValueError(f"row {b}: max_new_tokens={max_new_tokens[b]} must be >= 1")
      budgets[b] = min(max_new_tokens[b], self.max_len - starts[b] - tokens.size - 1)
      rows.append(b)
    if not rows:
      raise ValueError("generate needs at least one row with a chunk")
    return rows, starts, budgets

  def generate(self, chunks: Sequence[tuple[np.ndarray, np.ndarray] | None], *,
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
    chunks = [None if c is None else (np.asarray(c[0], np.int32), np.asarray(c[1], np.int32)) for c in chunks]
    per_row = lambda x: [x] * self.batch_size if not isinstance(x, (list, tuple)) else list(x)
    restart, max_new_tokens, sampling = per_row(restart), per_row(max_new_tokens), per_row(sampling)
    rows, starts, budgets = self._validate(chunks, restart, max_new_tokens)
    lengths = np.array([0 if c is None else c[0].size for c in chunks], np.int64)
    all_greedy = all(sampling[b].greedy for b in rows)  # static: greedy steps skip the sort over the vocab
    sampling_arrays = None if all_greedy else as_arrays(sampling)  # greedy steps take no settings

    first_B, first_on_host_B, first_logits_BV = self._prefill(chunks, rows, starts, lengths, sampling_arrays,
                                                              all_greedy)
    first = np.asarray(first_on_host_B)
    ttft = time.perf_counter() - start_time
    eot = -1 if eot_id is None else eot_id
    active = np.isin(np.arange(self.batch_size), rows)
    fill = np.where(active, starts + lengths, self._fill)
    remaining = np.where(active, budgets - 1, 0)
    done = ~active | (first == eot) | (remaining <= 0)
    calls = self._decode_loop(first_B, fill, remaining, done, sampling_arrays, all_greedy, eot, return_logits)
    if calls:
      self._fill, remaining = np.asarray(calls[-1][1]).astype(np.int64), np.asarray(calls[-1][2])
      tokens = np.concatenate([first[:, None]] + [np.asarray(c[0]) for c in calls], axis=1)
    else:
      self._fill, tokens = fill, first[:, None]
    decode_time = time.perf_counter() - start_time - ttft
    logits = None
    if return_logits:
      logits = np.concatenate([np.asarray(first_logits_BV)[:, None]] + [np.asarray(c[4]) for c in calls],
                              axis=1)

    out = Generation(answers=[None] * self.batch_size, stop_reasons=[None] * self.batch_size,
                     logits=[None] * self.batch_size if return_logits else None, ttft_s=ttft,
                     decode_s=decode_time, decode_tokens=0)
    for b in rows:
      n = int(budgets[b] - remaining[b])
      out.answers[b] = tokens[b, :n]
      out.decode_tokens += n - 1
      if out.answers[b][-1] == eot:
        out.stop_reasons[b] = "end_of_turn"
      else:
        out.stop_reasons[b] = "max_new_tokens" if n == max_new_tokens[b] else "cache_full"
      if return_logits:
        out.logits[b] = logits[b, :n]
    return out

  def _prefill(self, chunks, rows, starts, lengths, sampling, all_greedy):
    """Pads the chunks to their bucket, picks the key window and runs the prefill step."""
    padded = self.bucket(int(lengths.max()))
    from_start = all(starts[b] == 0 for b in rows)
    reach = int(max(starts[b] + lengths[b] for b in rows))  # one past the furthest slot a chunk writes
    window = self.prefill_window(padded, reach, from_start)
    tokens_BT = np.zeros((self.batch_size, padded), np.int32)
    types_BT = np.full((self.batch_size, padded), SegmentType.PAD, np.int32)
    for b in rows:
      tokens_BT[b, :lengths[b]], types_BT[b, :lengths[b]] = chunks[b]
    packed = pack_chunks(tokens_BT, types_BT, starts, lengths)
    self.cache, first_B, first_on_host_B, logits_BV, self._key = self._run(
        self._prefill_fn, self.cache, packed, self._key, sampling, window=window, from_start=from_start,
        all_greedy=all_greedy)
    return first_B, first_on_host_B, logits_BV

  def _decode_loop(self, token_B, fill, remaining, done, sampling, all_greedy, eot, return_logits):
    """Runs decode calls (``decode_steps`` steps each) until every row is done; the host reads the ``done``
    flags one call behind, so the next call is queued before it waits.

    Returns per call ``(tokens_BN, fill_B, remaining_B, done_B, logits_BNV)`` (device arrays).
    """
    calls = []
    if done.all():
      return calls
    fill_B, remaining_B, done_B = self._put((fill.astype(np.int32), remaining.astype(np.int32), done))
    sampling, eot_id = self._put((sampling, np.int32(eot)))  # moved to the device once
    for i in range(-(-int(remaining.max()) // self.decode_steps)):
      self.cache, tokens_BN, token_B, fill_B, remaining_B, done_B, self._key, logits_BNV = self._run(
          self._decode_fn, self.cache, token_B, fill_B, remaining_B, done_B, self._key, sampling, eot_id,
          steps=self.decode_steps, all_greedy=all_greedy, keep_logits=return_logits)
      done_B.copy_to_host_async()
      calls.append((tokens_BN, fill_B, remaining_B, done_B, logits_BNV))
      if i >= 1 and np.asarray(calls[i - 1][3]).all():
        break
    return calls

  def prefill_window(self, padded: int, reach: int, from_start: bool) -> int:
    """The key window ``W`` of a prefill of chunks padded to ``padded`` that write up to slot ``reach``."""
    if from_start:
      return padded
    return max(padded, self.bucket(reach)) if self._windowed else self.max_len

  def prefill_shapes(self, chunk_lengths: Sequence[int]) -> list[tuple[int, int, bool]]:
    """Every ``(T, W, from_start)`` a chunk of one of these lengths can need (for :meth:`warmup`)."""
    shapes = set()
    for padded in {self.bucket(n) for n in chunk_lengths}:
      shapes.add((padded, padded, True))
      windows = [w for w in self.buckets if w >= padded] if self._windowed else [self.max_len]
      shapes.update((padded, w, False) for w in windows)
    return sorted(shapes)

  def warmup(self, shapes: Sequence[tuple[int, int, bool]] | None = None, chunk_lengths: Sequence[int] = (),
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
        self.cache, *_ = self._run(self._prefill_fn, self.cache, empty, self._key, sampling, window=window,
                                   from_start=from_start, all_greedy=all_greedy)
      inputs = self._put((none_B, self._fill.astype(np.int32), none_B, np.ones(self.batch_size, bool)))
      self.cache, *_ = self._run(self._decode_fn, self.cache, *inputs, self._key, self._put(sampling),
                                 self._put(np.int32(-1)), steps=self.decode_steps, all_greedy=all_greedy,
                                 keep_logits=False)
    jax.block_until_ready(self.cache)
