"""Reads HuggingFace `save_pretrained` checkpoints into {HF key: array} dicts.

Safetensors and torch zip files, single or sharded, without torch: the torch
unpickler only accepts tensors, so loading cannot run code from the checkpoint,
and every offset is checked against the file, so none reads past its data.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pickle
import struct
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np

# File names `save_pretrained` writes, in the order they are tried.
CHECKPOINT_NAMES = ("model.safetensors", "model.safetensors.index.json",
                    "pytorch_model.bin", "pytorch_model.bin.index.json")

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
}
# safetensors' own limit; real headers (JSON offsets per tensor) are tens of KB.
_MAX_HEADER_BYTES = 100_000_000
_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32,
    "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64, "IntStorage": np.int32,
}


class CheckpointError(ValueError):
  """A checkpoint lacks a key, has a wrong shape, is corrupt or an unsupported format."""


def _safetensors_header(path: str) -> tuple[dict[str, Any], int, int]:
  """The JSON header of a `.safetensors` file, the data's start and its size in bytes."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > min(size - 8, _MAX_HEADER_BYTES):
      raise CheckpointError(
          f"{path}: header length {header_len} exceeds the file ({size} bytes) or "
          f"the {_MAX_HEADER_BYTES}-byte limit")
    raw = f.read(header_len)
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise CheckpointError(f"{path}: header is not UTF-8 JSON ({e})") from e
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: header is not a JSON object")
  header.pop("__metadata__", None)
  return header, 8 + header_len, size - 8 - header_len


def _is_count(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_span(path: str, name: str, info: Any, data_bytes: int
                 ) -> tuple[np.dtype, tuple[int, ...], int, int]:
  """(dtype, shape, start, end) of one header entry, checked against the data size."""
  where = f"{path}: tensor {name!r}"
  if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
    raise CheckpointError(f"{where}: entry {info!r} lacks dtype, shape or data_offsets")
  if info["dtype"] not in _SAFETENSORS_DTYPES:
    raise CheckpointError(f"{where} has unsupported dtype {info['dtype']}")
  dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
  shape, offsets = info["shape"], info["data_offsets"]
  if not isinstance(shape, list) or not all(map(_is_count, shape)):
    raise CheckpointError(f"{where}: shape {shape!r} is not a list of sizes")
  if (not isinstance(offsets, list) or len(offsets) != 2 or
      not all(map(_is_count, offsets))):
    raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [start, end]")
  start, end = offsets
  needed = math.prod(shape) * dtype.itemsize
  if end - start != needed:
    raise CheckpointError(f"{where}: data_offsets [{start}, {end}) hold {end - start} "
                          f"bytes, {info['dtype']} {shape} needs {needed}")
  if end > data_bytes:
    raise CheckpointError(f"{where}: data_offsets [{start}, {end}) run past the "
                          f"{data_bytes} data bytes in the file")
  return dtype, tuple(shape), start, end


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Tensors of a `.safetensors` file as read-only memory-mapped arrays.

  The header is untrusted: as in the `safetensors` library, tensors must tile
  the data exactly (no gap, no overlap, nothing after the last one). This
  reader, unlike the library's messages, names the tensor at fault.

  Raises:
    CheckpointError: naming the file (and the tensor) of any malformed header.
  """
  header, data_start, data_bytes = _safetensors_header(path)
  spans = {name: _tensor_span(path, name, info, data_bytes)
           for name, info in header.items()}
  expected = 0
  for name, (_, _, start, end) in sorted(spans.items(), key=lambda kv: kv[1][2:]):
    if start != expected:
      raise CheckpointError(f"{path}: tensor {name!r}: data_offsets start {start}, the "
                            f"previous tensor ends at {expected} (overlap or gap)")
    expected = end
  if expected != data_bytes:
    raise CheckpointError(f"{path}: {data_bytes - expected} bytes after the last tensor")
  if not data_bytes:  # np.memmap can not map zero bytes.
    data = np.zeros(0, np.uint8)
  else:
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_bytes,))
  return {name: data[start:end].view(dtype).reshape(shape)
          for name, (dtype, shape, start, end) in spans.items()}


@dataclasses.dataclass(frozen=True)
class _TorchTensor:
  """A tensor of a torch zip checkpoint, read from the archive on demand."""

  archive: zipfile.ZipFile
  storage: str
  dtype: Any
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    buf = np.frombuffer(self.archive.read(self.storage), self.dtype)
    itemsize = buf.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        buf[self.offset:], self.shape, [s * itemsize for s in self.stride])
    return np.array(view, dtype=dtype)


def _check_torch_extent(path: str, archive: zipfile.ZipFile, key: str, tensor: Any) -> None:
  """Refuses a tensor whose offset, shape and strides reach outside its storage:
  `as_strided` would read process memory beyond it."""
  if not isinstance(tensor, _TorchTensor):
    return
  where = f"{path}: tensor {key!r}"
  try:
    count = archive.getinfo(tensor.storage).file_size // np.dtype(tensor.dtype).itemsize
  except KeyError:
    raise CheckpointError(f"{where}: storage {tensor.storage} is missing") from None
  layout = f"offset {tensor.offset}, shape {tensor.shape}, stride {tensor.stride}"
  if (len(tensor.shape) != len(tensor.stride) or
      not all(map(_is_count, (tensor.offset, *tensor.shape, *tensor.stride)))):
    raise CheckpointError(f"{where}: invalid {layout}")
  if 0 in tensor.shape:
    return
  last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride))
  if last >= count:
    raise CheckpointError(f"{where}: {layout} reach element {last} of a {count}-element "
                          "storage")


def read_torch(path: str) -> dict[str, _TorchTensor]:
  """A `torch.save`d state dict (zip format, torch >= 1.6), without torch.

  Only tensors, storages and OrderedDicts are unpickled; any other object in
  the file is refused, so loading cannot run code from the checkpoint.
  """
  if not zipfile.is_zipfile(path):
    raise CheckpointError(f"{path}: not a zip-format torch checkpoint")
  archive = zipfile.ZipFile(path)
  pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
  prefix = pkl[:-len("data.pkl")]
  byteorder = prefix + "byteorder"
  if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
    raise CheckpointError(f"{path}: big-endian checkpoints are not supported")

  def rebuild_tensor(storage, offset, shape, stride, *unused_args):
    return dataclasses.replace(storage, offset=offset, shape=tuple(shape),
                               stride=tuple(stride))

  allowed = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): lambda data, *unused: data,
  }

  class Unpickler(pickle.Unpickler):

    def find_class(self, module: str, name: str) -> Any:
      if module == "torch" and name in _TORCH_STORAGE_DTYPES:
        return _TORCH_STORAGE_DTYPES[name]
      if (module, name) not in allowed:
        raise CheckpointError(f"{path}: refusing to unpickle {module}.{name}")
      return allowed[(module, name)]

    def persistent_load(self, pid: tuple) -> _TorchTensor:
      _, dtype, key, _, _ = pid  # ('storage', dtype, key, location, numel)
      return _TorchTensor(archive, f"{prefix}data/{key}", dtype, 0, (), ())

  with archive.open(pkl) as f:
    state = dict(Unpickler(f).load())
  for key, tensor in state.items():
    _check_torch_extent(path, archive, key, tensor)
  return state


def _read_file(path: str) -> Mapping[str, Any]:
  """Tensors of one checkpoint file or a sharded checkpoint's index."""
  if path.endswith(".index.json"):
    with open(path) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    folder = os.path.dirname(path)
    # Shards are file names beside the index; a path could read any file.
    for shard in shards:
      if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", "..", "."):
        raise CheckpointError(f"{path}: shard {shard!r} is not a file name in {folder}")
    return {k: v for s in shards
            for k, v in _read_file(os.path.join(folder, s)).items()}
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  return read_torch(path)


def read_checkpoint(path: str | os.PathLike[str]) -> Mapping[str, Any]:
  """HF state dict arrays (numpy or lazy, each with `.shape`) from a dir or file.

  Args:
    path: a `save_pretrained` directory, a `.safetensors` / `.bin` file, or a
      sharded checkpoint's `*.index.json`.

  Returns:
    {HF key: array-like}; `np.asarray` reads the values.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    for name in CHECKPOINT_NAMES:
      if os.path.isfile(os.path.join(path, name)):
        return _read_file(os.path.join(path, name))
    raise FileNotFoundError(
        f"no checkpoint in {path!r}; looked for {list(CHECKPOINT_NAMES)}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint not found: {path!r}")
  return _read_file(path)
