"""launch/: config flag overrides and their errors, gin bindings, AOT compiles
(a TPU topology with libtpu, clear errors without), the TPU script's syntax."""

import json
import os
import subprocess
import sys

import pytest

from configs import imagen_base64
from launch import compile_aot
from suti_jax import gin_bindings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "launch.train",
                         "--config=configs/imagen_base64.py:tiny", "--workdir=/nonexistent",
                         *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_unknown_override_key_is_a_clear_error():
  out = _launch("--config.train.totl_steps=5")
  assert out.returncode != 0
  assert "totl_steps" in out.stderr


def test_wrong_override_type_is_a_clear_error():
  out = _launch("--config.train.total_steps=many")
  assert out.returncode != 0
  assert "total_steps" in out.stderr and "many" in out.stderr


def test_gin_bindings_and_files_override_the_config(tmp_path):
  gin_file = tmp_path / "run.gin"
  gin_file.write_text("optimizer.learning_rate = 3e-4\nmodel.exemplar = None\n")
  config = imagen_base64.get_config("tiny")
  config.lock()
  gin_bindings.apply_gin(config, [str(gin_file)], ["train.total_steps = 5", "mesh.ici_fsdp = 2",
                                                   "config.stage = 'custom'"])
  assert config.train.total_steps == 5 and config.mesh.ici_fsdp == 2
  assert config.optimizer.learning_rate == 3e-4 and config.stage == "custom"


@pytest.mark.parametrize("binding, error, match", [
    ("train.totl_steps = 5", KeyError, "config.train.totl_steps"),
    ("train.total_steps = 'many'", TypeError, "config.train.total_steps"),
])
def test_bad_gin_bindings_are_clear_errors(binding, error, match):
  config = imagen_base64.get_config("tiny")
  config.lock()
  with pytest.raises(error, match=match):
    gin_bindings.apply_gin(config, [], [binding])


def _compile_aot(*flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "launch.compile_aot",
                         "--config=configs/imagen_base64.py:tiny", *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flags, match", [
    (["--topology=v5x:2x2"], "v5x:2x2"),  # Misspelt: no silent local compile.
    ([], "--topology"),  # Local only when asked for.
])
def test_aot_without_a_describable_topology_fails_clearly(flags, match):
  out = _compile_aot(*flags)
  assert out.returncode != 0, out.stdout
  assert match in out.stderr and "FLOPs" not in out.stdout


def test_aot_without_libtpu_is_an_error_not_a_fallback(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` raises ImportError.
  with pytest.raises(compile_aot.TopologyError, match="libtpu is not installed"):
    compile_aot.target_devices("v5e:2x2")
  devices, note = compile_aot.target_devices("local")
  assert len(devices) == 8 and "local" in note


@pytest.mark.slow
def test_aot_compiles_tiny_config_for_local_devices():
  config = imagen_base64.get_config("tiny")
  report = compile_aot.compile_report(config, "local")
  assert report["flops_per_device"] > 0 and report["memory"]["argument"] > 0


def test_aot_compiles_for_a_tpu_topology_with_libtpu(tmp_path):
  """Runs where libtpu is installed (requirements-test.lock; no TPU needed): the
  tiny config compiles for a v5e 2x2 slice and reports TPU memory against HBM."""
  pytest.importorskip("libtpu")
  report_path = tmp_path / "aot" / "tiny_v5e.json"
  out = _compile_aot("--topology=v5e:2x2", "--config.mesh.ici_data=1",
                     "--config.mesh.ici_fsdp=-1", f"--report={report_path}")
  assert out.returncode == 0, out.stderr[-2000:]
  report = json.loads(report_path.read_text())
  assert "TPU topology v5e:2x2" in report["note"] and "fsdp=4" in report["mesh"]
  assert report["devices"] == 4 and report["device_kind"] == "TPU v5 lite"
  assert report["flops_per_device"] > 0 and report["memory"]["argument"] > 0
  assert report["hbm_bytes_per_device"] == 16 * 2**30 and report["fits"] is True
  assert 0 < report["hbm_fraction"] < 0.01 and report["compile_s"] > 0
  assert 0 <= report["param_sharding_excess"] < 0.1
  assert "GiB HBM" in out.stdout


def test_tpu_script_is_valid_bash():
  script = os.path.join(ROOT, "launch", "tpu", "create_and_train.sh")
  assert os.access(script, os.X_OK)
  subprocess.run(["bash", "-n", script], check=True)
  out = subprocess.run(["bash", script], capture_output=True, text=True,
                       env={"PATH": os.environ["PATH"]})
  assert out.returncode != 0 and "set PROJECT" in out.stderr
