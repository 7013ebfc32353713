"""The XLA:CPU flags suti_jax adds on import: added once, never over the user's."""

import os

from suti_jax import xla_flags

FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"


def test_added_to_existing_flags_once():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_flags.add_cpu_flags(env, "0.10.2") == [FLAG]
  assert env["XLA_FLAGS"] == f"{FLAG} --xla_force_host_platform_device_count=8"
  assert xla_flags.add_cpu_flags(env, "0.10.2") == []
  assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1


def test_user_value_wins():
  env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
  assert xla_flags.add_cpu_flags(env, "0.10.2") == []
  assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"


def test_opt_out_and_unmeasured_jaxlib_add_nothing():
  env = {xla_flags.OPT_OUT_ENV: "1"}
  assert xla_flags.add_cpu_flags(env, "0.10.2") == [] and "XLA_FLAGS" not in env
  env = {}
  assert xla_flags.add_cpu_flags(env, "0.11.0") == [] and "XLA_FLAGS" not in env


def test_this_process_has_the_flag():
  assert FLAG.lstrip("-").split("=")[0] in os.environ["XLA_FLAGS"]


def test_the_demo_opts_out_by_the_same_name():
  """launch/demo sets the opt-out before importing suti_jax, so it spells the name out;
  this keeps the two spellings from drifting apart."""
  path = os.path.join(os.path.dirname(__file__), os.pardir, "launch", "demo", "__main__.py")
  with open(path) as f:
    source = f.read()
  assert f'os.environ.setdefault("{xla_flags.OPT_OUT_ENV}", "1")' in source
