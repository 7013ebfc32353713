"""Bad command lines end in one clear line: unknown `--config.a.b` keys name
their full path and the section's keys, unknown `:options` are refused."""

import glob
import importlib
import os
import subprocess
import sys

import pytest

from suti_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if os.path.basename(p) not in ("__init__.py", "common.py"))


def _launch(config, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "launch.train", f"--config={config}",
                         "--workdir=/nonexistent", *flags],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flag, expected", [
    ("--config.train.bogus=1", ["--config.train.bogus: no such config key", "keys of train:",
                                "total_steps", "checkpoint_every_steps"]),
    ("--config.train.totl_steps=5", ["train.totl_steps", "did you mean 'total_steps'"]),
    ("--config.trian.total_steps=5", ["--config.trian:", "did you mean 'train'"]),
    ("--config.model.exemplar.max_exemplars=3", ["model.exemplar is None"]),
])
def test_unknown_override_key_is_one_line_naming_its_path(flag, expected):
  out = _launch("configs/imagen_base64.py:tiny", flag)
  assert out.returncode != 0
  assert "Traceback" not in out.stderr, out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr
  for text in expected:
    assert text in out.stderr, out.stderr


def test_unknown_config_option_is_one_line_naming_the_known_ones():
  out = _launch("configs/imagen_base64.py:tinny")
  assert out.returncode != 0
  assert "Traceback" not in out.stderr, out.stderr
  assert "unknown config option 'tinny' (did you mean 'tiny'?)" in out.stderr
  assert "known options: ['tiny']" in out.stderr


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_accepts_its_options_and_refuses_others(name):
  module = importlib.import_module(f"configs.{name}")
  assert module.OPTIONS, f"configs/{name}.py declares no OPTIONS"
  full = module.get_config()
  for option in module.OPTIONS:
    assert module.get_config(option).to_dict() != full.to_dict(), option
  with pytest.raises(ValueError, match=r"unknown config option 'bogus'; known options: \["):
    module.get_config("bogus")
  with pytest.raises(ValueError, match="unknown config option 'bogus'"):
    module.get_config(f"{module.OPTIONS[0]},bogus")


def test_section_names_the_unknown_key_and_suggests_the_close_one():
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.train.totl_steps: no such config key \(did you mean "
                           r"'total_steps'\?\); keys of config.train: batch_size"):
    config_lib.section(config_lib.TrainConfig, {"totl_steps": 3}, "config.train")
