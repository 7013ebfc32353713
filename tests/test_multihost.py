"""Two local CPU processes (jax.distributed on 127.0.0.1, 4 devices each) train
3 steps together; they agree with each other and with one 8-device process."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

import train_testlib as tl
from train_testlib import fast_compiles  # noqa: F401  (autouse fixture)
from suti_jax.config import MeshConfig
from suti_jax.parallel import mesh as mesh_lib
from suti_jax.parallel import sharding
from suti_jax.train import experiment
from suti_jax.train import state as state_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _single_process_losses():
  exp = experiment.build(experiment.sections(tl.micro_config()))
  mesh = mesh_lib.make_mesh(MeshConfig(ici_data=2, ici_fsdp=4))
  _, shardings, compiled = tl.compile_on(exp, mesh)
  state = state_lib.create_state(exp.init, shardings, jax.random.PRNGKey(0), exp.sec.rules)
  losses = []
  for i in range(3):
    state, m = compiled(state, sharding.global_batch(tl.random_batch(exp.sec, seed=i), mesh,
                                                     exp.sec.rules))
    losses.append(float(m["train/loss"]))
  return losses, float(m["train/param_norm"])


def test_two_processes_train_together(tmp_path):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.path.dirname(HERE))
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"),
                             str(port), str(i), str(tmp_path / "ckpt")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  results = [json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
             for out in outs]
  assert [r["devices"] for r in results] == [8, 8]
  assert results[0]["losses"] == results[1]["losses"]
  assert all(r["restored_equal"] for r in results)
  losses, norm = _single_process_losses()
  np.testing.assert_allclose(results[0]["losses"], losses, rtol=2e-5)
  np.testing.assert_allclose(results[0]["param_norm"], norm, rtol=1e-5)
