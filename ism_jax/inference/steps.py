"""The engine's two device programs: a prefill step over typed chunks and a fixed-length loop of decode steps.

Both take the model as a flat list of parameter leaves plus its :class:`ModelStructure` (a static argument),
so engines over equal models share one jitted function and its compiled programs, and the cache buffer is
donated: every step updates it in place. Compiled programs are counted by jax's own cache
(:func:`compiled_counts`); tests that need more install a listener with ``jax.monitoring``.

    cache, key, out = prefill(leaves, cache, pack_chunks(tokens_BT, types_BT, start_B, length_B), key, None,
                              structure=s, window=W, from_start=False, all_greedy=True)
    cache, key, call = decode(leaves, cache, DecodeState(...), key, None, eot_id, structure=s, steps=8,
                              all_greedy=True, keep_logits=False)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ism_jax.inference import cache as cache_lib
from ism_jax.inference.sampling import greedy, sample
from ism_jax.masks import chunk_ranges, decode_ranges
from ism_jax.model import Transformer


@dataclasses.dataclass(frozen=True, eq=False)
class ModelStructure:
  """A model's graph and parameter tree structure: the static part of a model passed to the jitted steps.

  Hashed once (hashing a graph costs as much as a short step); equal structures compare equal, so engines
  over equal models share compiled programs.
  """

  graphdef: nnx.GraphDef
  treedef: jax.tree_util.PyTreeDef
  _hash: int = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    object.__setattr__(self, "_hash", hash((self.graphdef, self.treedef)))

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other) -> bool:
    if self is other:
      return True
    return (isinstance(other, ModelStructure) and self._hash == other._hash
            and (self.graphdef, self.treedef) == (other.graphdef, other.treedef))

  def model(self, leaves) -> Transformer:
    """The model with these parameter leaves."""
    return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Prefilled:
  """What a prefill step produced per row: the first answer token ``[B]`` (on the device, and a copy in host
  memory that the step writes itself) and its logits ``[B, V]``."""

  first_B: jax.Array
  first_on_host_B: jax.Array
  logits_BV: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  """Per-row decode state, ``[B]`` each: the token to feed next, the slots in use, the answer tokens still
  allowed, and whether the row has stopped."""

  token_B: jax.Array
  fill_B: jax.Array
  remaining_B: jax.Array
  done_B: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeCall:
  """One decode call: ``tokens_BN [B, steps]`` emitted per step (0 once a row is done), the state after the
  call, and with ``keep_logits`` the logits ``[B, steps, V]`` each token was drawn from (else ``None``)."""

  tokens_BN: jax.Array
  state: DecodeState
  logits_BNV: jax.Array | None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _DecodeCarry:
  cache: object
  key: jax.Array
  state: DecodeState
  tokens_BN: jax.Array
  logits_BNV: jax.Array | None


def pack_chunks(tokens_BT: np.ndarray, types_BT: np.ndarray, start_B: np.ndarray, length_B: np.ndarray
                ) -> np.ndarray:
  """The inputs of a prefill step as one ``[B, 2 T + 2]`` int32 array (one host-to-device transfer):
  tokens ``[B, T]``, segment types ``[B, T]``, each row's first slot and its chunk length."""
  return np.concatenate([tokens_BT, types_BT, start_B[:, None], length_B[:, None]], axis=1).astype(np.int32)


def _next_tokens(logits_BV, key, sampling, all_greedy: bool):
  return greedy(logits_BV) if all_greedy else sample(logits_BV, key, **sampling)


def _prefill_step(leaves, cache, chunks_BX, key, sampling, *, structure: ModelStructure, window: int,
                  from_start: bool, all_greedy: bool):
  """Writes chunks (packed by :func:`pack_chunks`) at each row's start slot, attending over slots
  ``[0, window)``.

  Returns:
    ``(cache, key, Prefilled)``: the updated cache, the next random key and the first answer tokens.
  """
  model = structure.model(leaves)
  length, max_len = (chunks_BX.shape[1] - 2) // 2, cache_lib.num_slots(cache)
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
  return cache, key, Prefilled(first_B, first_on_host_B, logits_B1V[:, 0])


def _decode_steps(leaves, cache, state: DecodeState, key, sampling, eot_id, *, structure: ModelStructure,
                  steps: int, all_greedy: bool, keep_logits: bool):
  """``steps`` decode steps in one call: a loop of fixed length on the device (launched from the host once).

  Each step feeds ``state.token_B`` at slots ``state.fill_B`` (attending to ``[0, fill + 1)``), samples the
  next tokens, and advances the rows that are not done; a row is done after it emits ``eot_id`` or spends
  its budget ``state.remaining_B``. Done rows emit 0 and keep their fill (their cache writes land past it)
  for the rest of the loop.

  Returns:
    ``(cache, key, DecodeCall)``.
  """
  model = structure.model(leaves)
  batch = state.token_B.shape[0]

  def step(i, carry: _DecodeCarry) -> _DecodeCarry:
    s = carry.state
    key, draw_key = jax.random.split(carry.key)
    # A done row attends to slot 0 only (its output is dropped): idle rows cost no cache reads.
    seen_B = jnp.where(s.done_B, 0, s.fill_B)
    logits_B1V, cache = model.forward(s.token_B[:, None], s.fill_B[:, None], decode_ranges(seen_B),
                                      carry.cache, s.fill_B)
    active_B = ~s.done_B
    next_B = jnp.where(active_B, _next_tokens(logits_B1V[:, 0], draw_key, sampling, all_greedy), 0)
    remaining_B = s.remaining_B - active_B
    done_B = s.done_B | (next_B == eot_id) | (remaining_B <= 0)
    state = DecodeState(token_B=next_B, fill_B=s.fill_B + active_B, remaining_B=remaining_B, done_B=done_B)
    tokens_BN = jax.lax.dynamic_update_slice(carry.tokens_BN, next_B[:, None], (0, i))
    logits_BNV = carry.logits_BNV
    if keep_logits:
      logits_BNV = jax.lax.dynamic_update_slice(logits_BNV, logits_B1V.astype(logits_BNV.dtype), (0, i, 0))
    return _DecodeCarry(cache, key, state, tokens_BN, logits_BNV)

  logits_BNV = jnp.zeros((batch, steps, model.config.vocab_size), jnp.float32) if keep_logits else None
  tokens_BN = jnp.zeros((batch, steps), jnp.int32)
  carry = jax.lax.fori_loop(0, steps, step, _DecodeCarry(cache, key, state, tokens_BN, logits_BNV))
  return carry.cache, carry.key, DecodeCall(carry.tokens_BN, carry.state, carry.logits_BNV)


_BATCH_AXIS = -4  # every cache array is [..., B, S, K, Dh]


def _gather_rows(cache, rows_P):
  return jax.tree.map(lambda x: jnp.take(x, rows_P, axis=x.ndim + _BATCH_AXIS), cache)


def _scatter_rows(cache, rows_P, part):
  def put(x, p):
    return x.at[(slice(None),) * (x.ndim + _BATCH_AXIS) + (rows_P,)].set(p)
  return jax.tree.map(put, cache, part)


def _prefill_rows_step(leaves, cache, chunks_PX, rows_P, key, sampling, *, structure: ModelStructure,
                       window: int, from_start: bool, all_greedy: bool):
  """:func:`_prefill_step` on ``P`` of the cache's ``B`` rows: rows ``rows_P`` (``[P]`` int32, distinct) are
  gathered, prefilled with ``chunks_PX`` (row ``p`` of the packed chunks goes to cache row ``rows_P[p]``)
  and written back; the other rows are untouched. A prefill of a few newly arrived queries then costs ``P``
  rows, not the whole pool (continuous batching, :mod:`ism_jax.inference.scheduler`).

  Returns:
    ``(cache, key, Prefilled)`` with ``[P]`` first tokens.
  """
  part, key, out = _prefill_step(leaves, _gather_rows(cache, rows_P), chunks_PX, key, sampling,
                                 structure=structure, window=window, from_start=from_start,
                                 all_greedy=all_greedy)
  return _scatter_rows(cache, rows_P, part), key, out


def _join_rows(state: DecodeState, rows_P, first_P, join_B, fill_B, remaining_B, stop_B, eot_id
               ) -> DecodeState:
  """The decode state with freshly prefilled rows joined, on the device (no host round trip).

  Rows with ``join_B`` take their first answer token (``first_P[p]`` belongs to row ``rows_P[p]``), fill and
  remaining budget, and are done at once if that token is ``eot_id`` or the budget is spent; rows with
  ``stop_B`` are stopped; the others keep their state. ``[B]`` arrays, ``rows_P``/``first_P`` ``[P]``.
  """
  first_B = jnp.zeros_like(state.token_B).at[rows_P].set(first_P)
  joined_done_B = (first_B == eot_id) | (remaining_B <= 0)
  return DecodeState(token_B=jnp.where(join_B, first_B, state.token_B),
                     fill_B=jnp.where(join_B, fill_B, state.fill_B),
                     remaining_B=jnp.where(join_B, remaining_B, state.remaining_B),
                     done_B=jnp.where(join_B, joined_done_B, state.done_B | stop_B))


prefill = jax.jit(_prefill_step, static_argnames=("structure", "window", "from_start", "all_greedy"),
                  donate_argnums=1)
prefill_rows = jax.jit(_prefill_rows_step,
                       static_argnames=("structure", "window", "from_start", "all_greedy"), donate_argnums=1)
decode = jax.jit(_decode_steps, static_argnames=("structure", "steps", "all_greedy", "keep_logits"),
                 donate_argnums=1)
join_rows = jax.jit(_join_rows)


def compiled_counts() -> dict[str, int]:
  """Executables held by the jitted steps (all engines together): ``{"prefill": n, "decode": m,
  "prefill_rows": p, "join_rows": j}``."""
  def size(fn):
    return fn._cache_size()  # pylint: disable=protected-access
  return {"prefill": size(prefill), "decode": size(decode), "prefill_rows": size(prefill_rows),
          "join_rows": size(join_rows)}
