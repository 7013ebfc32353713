"""Untrusted checkpoint files (issue 17): every malformed safetensors header, torch
storage extent or shard name ends in one CheckpointError naming the file and tensor."""

import json
import os
import re
import struct
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
import safetensors
from safetensors import numpy as safetensors_numpy

from suti_jax.models import hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _file(header, data: bytes = b"") -> bytes:
  """A safetensors file: u64 header length, the header (JSON unless bytes), data."""
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  return struct.pack("<Q", len(raw)) + raw + data


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
  return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# name -> (file bytes, tensor named in the error or None, what the error says).
CORRUPT = {
    "too_short": (b"\x01\x02", None, "too short"),
    "bad_json": (_file(b"{abc}"), None, "not UTF-8 JSON"),
    "bad_utf8": (_file(b'{"\xff\xfe": 1}'), None, "not UTF-8 JSON"),
    "huge_header_length": (struct.pack("<Q", 2**62) + b"{}", None, "header length"),
    "not_an_object": (_file([1, 2]), None, "not a JSON object"),
    "past_eof": (_file({"w": _entry(shape=[1000], offsets=[0, 4000])}, bytes(16)), "w",
                 "run past the 16 data bytes"),
    "overlap": (_file({"a": _entry(), "b": _entry(offsets=[4, 12])}, bytes(12)), "b",
                "overlap or gap"),
    "gap": (_file({"a": _entry(), "b": _entry(offsets=[12, 20])}, bytes(20)), "b",
            "overlap or gap"),
    "size_mismatch": (_file({"w": _entry(shape=[3])}, bytes(8)), "w", "needs 12"),
    "reversed_offsets": (_file({"w": _entry(shape=[0], offsets=[8, 0])}, bytes(8)), "w",
                         "hold -8 bytes"),
    "unknown_dtype": (_file({"w": _entry(dtype="Q7")}, bytes(8)), "w", "unsupported dtype"),
    "negative_shape": (_file({"w": _entry(shape=[-2])}, bytes(8)), "w", "not a list of sizes"),
    "float_offsets": (_file({"w": _entry(offsets=[0.0, 8.5])}, bytes(8)), "w",
                      "is not \\[start, end\\]"),
    "missing_fields": (_file({"w": {"dtype": "F32"}}, bytes(8)), "w", "lacks dtype"),
    "trailing_bytes": (_file({"w": _entry()}, bytes(12)), None, "4 bytes after the last"),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_safetensors_is_one_named_error(tmp_path, name):
  data, tensor, problem = CORRUPT[name]
  path = tmp_path / "model.safetensors"
  path.write_bytes(data)
  where = re.escape(str(path)) + (f": tensor '{tensor}'" if tensor else "")
  with pytest.raises(hf_checkpoint.CheckpointError, match=f"^{where}.*{problem}"):
    hf_checkpoint.read_checkpoint(tmp_path)
  # The reference implementation refuses every one of them too.
  with pytest.raises(safetensors.SafetensorError):
    with safetensors.safe_open(str(path), framework="numpy") as f:
      [f.get_tensor(k) for k in f.keys()]


def test_files_written_by_safetensors_read_back_exactly(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
      "f32": rng.normal(size=(3, 4)).astype(np.float32),
      "bf16": rng.normal(size=(5,)).astype(ml_dtypes.bfloat16),
      "f16": rng.normal(size=(2, 2, 2)).astype(np.float16),
      "i64": np.arange(7, dtype=np.int64),
      "empty": np.zeros((0, 3), np.float32),
  }
  path = str(tmp_path / "model.safetensors")
  safetensors_numpy.save_file(tensors, path, metadata={"format": "pt"})
  state = hf_checkpoint.read_safetensors(path)
  assert state.keys() == tensors.keys()
  for key, value in tensors.items():
    assert state[key].dtype == value.dtype and state[key].shape == value.shape
    np.testing.assert_array_equal(state[key], value)
  safetensors_numpy.save_file({}, path)
  assert hf_checkpoint.read_safetensors(path) == {}


def test_sharded_index_may_not_point_outside_its_folder(tmp_path):
  (tmp_path / "outside.safetensors").write_bytes(_file({"w": _entry()}, bytes(8)))
  (tmp_path / "model").mkdir()
  index = tmp_path / "model" / "model.safetensors.index.json"
  index.write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
  with pytest.raises(hf_checkpoint.CheckpointError,
                     match=f"^{re.escape(str(index))}: shard '../outside.safetensors'"):
    hf_checkpoint.read_checkpoint(tmp_path / "model")


def test_torch_tensor_past_its_storage_is_refused(tmp_path):
  torch = pytest.importorskip("torch")
  torch.save({"w": torch.arange(8, dtype=torch.float32)}, tmp_path / "full.bin")
  # Rewrite the archive with the tensor's storage cut to 2 of its 8 floats.
  with zipfile.ZipFile(tmp_path / "full.bin") as source, \
       zipfile.ZipFile(tmp_path / "cut.bin", "w") as cut:
    for info in source.infolist():
      data = source.read(info)
      cut.writestr(info, data[:8] if info.filename.endswith("/data/0") else data)
  with pytest.raises(hf_checkpoint.CheckpointError,
                     match=re.escape(f"{tmp_path / 'cut.bin'}: tensor 'w': offset 0, "
                                     "shape (8,), stride (1,) reach element 7 of a "
                                     "2-element storage")):
    hf_checkpoint.read_checkpoint(tmp_path / "cut.bin")


def test_convert_t5_cli_fails_naming_file_and_tensor(tmp_path):
  config = {"vocab_size": 8, "d_model": 4, "d_kv": 2, "d_ff": 8, "num_layers": 1,
            "num_heads": 2, "feed_forward_proj": "gated-gelu"}
  (tmp_path / "config.json").write_text(json.dumps(config))
  header = {"encoder.embed_tokens.weight": _entry(shape=[8, 4], offsets=[0, 128])}
  (tmp_path / "model.safetensors").write_bytes(_file(header, bytes(16)))
  output = tmp_path / "t5_orbax"
  result = subprocess.run(
      [sys.executable, "-m", "launch.convert_t5", f"--input={tmp_path}",
       f"--output={output}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
  assert result.returncode != 0 and not output.exists()
  assert (f"CheckpointError: {tmp_path / 'model.safetensors'}: tensor "
          "'encoder.embed_tokens.weight'") in result.stderr
