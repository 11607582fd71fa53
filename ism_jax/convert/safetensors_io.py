"""Reading and writing safetensors checkpoints one tensor at a time.

A safetensors file is ``[u64 little-endian header size N][N bytes of JSON header][tensor bytes]``; the
header maps each tensor name to ``{"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}`` (offsets
relative to the end of the header). A sharded checkpoint adds ``model.safetensors.index.json`` with a
``weight_map`` from tensor name to file.

:class:`CheckpointReader` memory-maps the files, so :meth:`CheckpointReader.get` returns a read-only numpy
view that costs no host memory until read, for every dtype including ``BF16`` (through ``ml_dtypes``, which
the ``safetensors`` package's numpy backend cannot read). :func:`write_checkpoint` writes the header first
(shapes and dtypes are known in advance) and then each tensor as its producer returns it, so at most one
tensor is in host memory at a time. The ``safetensors`` package reads what this writes and vice versa
(checked in tests/test_convert.py).
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import re
import struct
from typing import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


class CheckpointFormatError(ValueError):
  """A safetensors file or index is malformed; the message names the file."""


def _read_header(path: str) -> tuple[dict, int]:
  """``(header, data_start)`` of one safetensors file."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise CheckpointFormatError(f"{path}: too short for a safetensors file ({len(raw)} bytes)")
    (size,) = struct.unpack("<Q", raw)
    if size > _MAX_HEADER_BYTES:
      raise CheckpointFormatError(f"{path}: header size {size} is implausible; not a safetensors file?")
    try:
      header = json.loads(f.read(size))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointFormatError(f"{path}: the safetensors header is not valid JSON ({e})") from None
  header.pop("__metadata__", None)
  return header, 8 + size


class CheckpointReader:
  """The tensors of a checkpoint directory (``model.safetensors`` or an index plus shards), memory-mapped.

  Use as a context manager (or call :meth:`close`) to release the maps.
  """

  def __init__(self, directory: str):
    self.directory = directory
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
      with open(index_path, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointFormatError(f"{index_path}: no \"weight_map\" object")
      files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
      files = [SINGLE_FILE]
    else:
      found = sorted(n for n in os.listdir(directory) if n.endswith((".safetensors", ".bin", ".pt", ".pth")))
      raise FileNotFoundError(
          f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found (weight files present: "
          f"{found or 'none'}); only safetensors checkpoints are read: re-save with "
          "save_pretrained(..., safe_serialization=True)"
      )
    self._entries: dict[str, tuple[str, dict, int]] = {}
    self._maps: dict[str, mmap.mmap] = {}
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.exists(path):
        raise FileNotFoundError(f"{index_path} names {name}, which is missing from {directory}")
      header, start = _read_header(path)
      for tensor, info in header.items():
        self._entries[tensor] = (path, info, start)

  def __enter__(self) -> "CheckpointReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    for m in self._maps.values():
      try:
        m.close()
      except BufferError:  # a caller still holds a view; the map is released when it is collected
        pass
    self._maps.clear()

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def file_of(self, name: str) -> str:
    return self._entries[name][0]

  def label(self, name: str) -> str:
    """How errors name a tensor (its name in the checkpoint)."""
    return name

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name][1]["shape"])

  def get(self, name: str) -> np.ndarray:
    """A read-only view of one tensor in its stored dtype (no copy until the caller converts it)."""
    path, info, start = self._entries[name]
    if info["dtype"] not in DTYPES:
      raise CheckpointFormatError(f"{path}: tensor {name} has dtype {info['dtype']}, which is not supported "
                                  f"(supported: {sorted(DTYPES)})")
    dtype = DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    count = int(np.prod(shape))
    if end - begin != count * dtype.itemsize:
      raise CheckpointFormatError(f"{path}: tensor {name} spans {end - begin} bytes, but shape {list(shape)} "
                                  f"of {info['dtype']} needs {count * dtype.itemsize}")
    if path not in self._maps:
      with open(path, "rb") as f:
        self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(self._maps[path], dtype=dtype, count=count, offset=start + begin).reshape(shape)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One tensor to write: its name, shape, dtype and a function that returns its value (any dtype)."""

  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  produce: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def _write_file(path: str, specs: Sequence[TensorSpec]) -> None:
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for spec in specs:
    if np.dtype(spec.dtype) not in _NAMES:
      raise ValueError(f"tensor {spec.name}: dtype {spec.dtype} cannot be written to safetensors")
    header[spec.name] = {"dtype": _NAMES[np.dtype(spec.dtype)], "shape": list(spec.shape),
                         "data_offsets": [offset, offset + spec.nbytes]}
    offset += spec.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw)
    for spec in specs:
      value = np.ascontiguousarray(np.asarray(spec.produce()).astype(spec.dtype, copy=False))
      if value.shape != tuple(spec.shape):
        raise ValueError(f"tensor {spec.name}: produced shape {value.shape}, declared {tuple(spec.shape)}")
      f.write(value.reshape(-1).view(np.uint8).data)  # bytes view (ml_dtypes arrays lack a buffer)
      del value
  os.replace(tmp, path)


def write_checkpoint(directory: str, specs: Iterable[TensorSpec],
                     max_shard_bytes: int = 5 * 10**9) -> list[str]:
  """Writes ``specs`` as ``model.safetensors``, or as numbered shards plus an index when larger than a shard.

  Files hold tensors in the order given, a new file starting when the next tensor would pass
  ``max_shard_bytes`` (a tensor larger than that gets a file of its own). Returns the file names written.
  """
  specs = list(specs)
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for spec in specs:
    if shards[-1] and size + spec.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += spec.nbytes
  os.makedirs(directory, exist_ok=True)
  for stale in os.listdir(directory):  # files of an earlier export would confuse readers
    if stale in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.fullmatch(stale):
      os.remove(os.path.join(directory, stale))
  if len(shards) == 1:
    _write_file(os.path.join(directory, SINGLE_FILE), shards[0])
    return [SINGLE_FILE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for name, shard in zip(names, shards):
    _write_file(os.path.join(directory, name), shard)
  index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
           "weight_map": {spec.name: name for name, shard in zip(names, shards) for spec in shard}}
  with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
    json.dump(index, f, indent=2)
  return names
