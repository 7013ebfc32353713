"""Reads HuggingFace `save_pretrained` checkpoints into {HF key: array} dicts.

Safetensors and torch zip files, single or sharded, without torch: the torch
unpickler only accepts tensors, so loading cannot run code from the checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import json
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
_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32,
    "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64, "IntStorage": np.int32,
}


class CheckpointError(ValueError):
  """A checkpoint lacks a key, has a wrong shape or is an unsupported format."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Tensors of a `.safetensors` file as read-only memory-mapped arrays."""
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
  header.pop("__metadata__", None)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  tensors = {}
  for name, info in header.items():
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype "
                            f"{info['dtype']}")
    start, end = info["data_offsets"]
    tensors[name] = data[start:end].view(
        _SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
  return tensors


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
    return dict(Unpickler(f).load())


def _read_file(path: str) -> Mapping[str, Any]:
  """Tensors of one checkpoint file or a sharded checkpoint's index."""
  if path.endswith(".index.json"):
    with open(path) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    folder = os.path.dirname(path)
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
