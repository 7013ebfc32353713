"""One process of tests/test_multihost.py: joins a 2-process job on 127.0.0.1,
trains 3 steps of the micro config on the global (data=2, fsdp=4) mesh from its
half of a fixed batch, saves a checkpoint and prints the results as JSON."""

import json
import os
import sys

import jax

from suti_jax.parallel import distributed


def main(port: str, process_id: str, workdir: str) -> None:
  distributed.initialize(f"127.0.0.1:{port}", 2, int(process_id))
  jax.config.update("jax_disable_most_optimizations", True)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import train_testlib as tl  # pylint: disable=import-outside-toplevel
  from suti_jax.config import MeshConfig  # pylint: disable=import-outside-toplevel
  from suti_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from suti_jax.parallel import sharding  # pylint: disable=import-outside-toplevel
  from suti_jax.train import checkpoint, experiment  # pylint: disable=import-outside-toplevel
  from suti_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel

  exp = experiment.build(experiment.sections(tl.micro_config()))
  mesh = mesh_lib.make_mesh(MeshConfig(ici_data=2, ici_fsdp=4))
  abstract, shardings, compiled = tl.compile_on(exp, mesh)
  state = state_lib.create_state(exp.init, shardings, jax.random.PRNGKey(0), exp.sec.rules)
  per_process = exp.sec.train.batch_size // jax.process_count()
  lo = jax.process_index() * per_process
  losses = []
  for i in range(3):
    full = tl.random_batch(exp.sec, seed=i)
    local = {k: v[lo:lo + per_process] for k, v in full.items()}
    state, m = compiled(state, sharding.global_batch(local, mesh, exp.sec.rules))
    losses.append(float(m["train/loss"]))
  ckpt = checkpoint.Checkpointer(workdir, every_steps=1, keep=1)
  ckpt.save(3, state, data_iter={"p": 0}, config={}, meta={})
  ckpt.wait()
  restored, _, _ = ckpt.restore(abstract)
  ckpt.close()
  same = all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))
  norm = float(m["train/param_norm"])
  print("RESULT " + json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                                "losses": losses, "param_norm": norm, "restored_equal": same}),
        flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
