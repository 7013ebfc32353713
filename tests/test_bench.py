"""bench/: the helpers, and every benchmark in --smoke mode through bench.run_all
(well-formed JSON and Markdown with positive figures; never timing thresholds)."""

import json
import math
import os
import subprocess
import sys

import pytest

from bench import common
from bench import run_all

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_configure_host_replaces_device_flags_and_drops_non_flags(monkeypatch):
  for name in ("JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "TF_NUM_INTRAOP_THREADS",
               "TF_NUM_INTEROP_THREADS"):  # Restored after the test.
    monkeypatch.setenv(name, os.environ.get(name, ""))
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_foo=1 "
                     "intra_op_parallelism_threads=7")
  common.configure_host(num_devices=2, threads=3)
  flags = os.environ["XLA_FLAGS"].split()
  assert "--xla_foo=1" in flags
  assert [f for f in flags if "device_count" in f] == [
      "--xla_force_host_platform_device_count=2"]
  # XLA ignores the flags after a token that is not a --flag.
  assert not [f for f in flags if not f.startswith("--")]
  assert os.environ["TF_NUM_INTRAOP_THREADS"] == "3"


def test_time_calls_counts_and_ratio():
  calls = []
  timing = common.time_calls(lambda: calls.append(sum(range(20000))), warmup=2, calls=5)
  assert len(calls) == 7 and len(timing.wall_s) == len(timing.cpu_s) == 5
  assert min(timing.wall_s) <= timing.median_s <= max(timing.wall_s)
  assert timing.cpu_wall_ratio > 0
  assert set(timing.as_dict()) == {"median_s", "min_s", "max_s", "cpu_wall_ratio", "calls"}


def test_table_markdown_and_report(tmp_path):
  table = common.Table("T", ["a", "b"], [[1234, 0.5], ["x", 2e-9]])
  lines = table.markdown().splitlines()
  assert lines[2:] == ["| a | b |", "|---|---|", "| 1,234 | 0.5 |", "| x | 2.000e-09 |"]
  report = common.write_report("demo_name", "Q?", [table], {"k": 1.0}, smoke=True,
                               out_dir=str(tmp_path))
  on_disk = json.load(open(tmp_path / "demo_name.json"))
  assert on_disk == json.loads(json.dumps(report))
  assert on_disk["tables"][0]["rows"] == [[1234, 0.5], ["x", 2e-9]]
  assert "| a | b |" in on_disk["markdown"] and "Smoke run" in on_disk["markdown"]


def test_peers_skipped_says_why(tmp_path):
  # Importing a bench script reconfigures XLA_FLAGS for its own process: use a fresh one.
  code = ("from bench import train_step_vs_peers as t; import sys; "
          f"print(t.peers_skipped('auto', {str(tmp_path)!r})); "
          f"print(t.peers_skipped('none', {str(tmp_path)!r}))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True).stdout.splitlines()
  assert "not set up" in out[0] and "setup_peers.sh" in out[0]
  assert "--peers=none" in out[1]


def test_conv_dot_flops_counts_convs_dots_and_scans():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from bench import suti_step  # pylint: disable=import-outside-toplevel

  def conv(x, w):  # [1, 8, 8, 3] * [3, 3, 3, 4], SAME: 2 * 8*8*4 outputs * 27 MACs.
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def fn(x, w, a, b, m):
    loop = jax.lax.scan(lambda c, _: (m @ c, None), jnp.ones(4), None, length=3)[0]
    return conv(x, w).sum() + jax.jit(jnp.matmul)(a, b).sum() + loop.sum()

  args = (jnp.ones((1, 8, 8, 3)), jnp.ones((3, 3, 3, 4)), jnp.ones((2, 5)), jnp.ones((5, 7)),
          jnp.ones((4, 4)))
  conv_flops, dot_flops, scan_flops = 2 * 8 * 8 * 4 * 27, 2 * 2 * 7 * 5, 3 * 2 * 4 * 4
  assert suti_step.conv_dot_flops(jax.make_jaxpr(fn)(*args)) == (
      conv_flops + dot_flops + scan_flops)
  # The kernel gradient is one more convolution of the same size.
  grad = jax.make_jaxpr(jax.grad(lambda w: conv(args[0], w).sum()))(args[1])
  assert suti_step.conv_dot_flops(grad) == 2 * conv_flops


def test_run_all_rejects_unknown_names():
  with pytest.raises(SystemExit, match="unknown benchmark"):
    run_all.main(["--only=roofline,nope"])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """Every benchmark once in --smoke mode; their reports and SUMMARY.md."""
  out = tmp_path_factory.mktemp("bench")
  proc = subprocess.run([sys.executable, "-m", "bench.run_all", "--smoke", f"--out_dir={out}"],
                        cwd=REPO, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  reports = {n: json.load(open(out / f"{n}.json")) for n in run_all.SCRIPTS}
  return reports, (out / "SUMMARY.md").read_text()


@pytest.mark.parametrize("name", run_all.SCRIPTS)
@pytest.mark.slow  # runs every benchmark end to end
def test_smoke_report_is_well_formed(smoke, name):
  reports, summary = smoke
  r = reports[name]
  assert r["name"] == name and r["smoke"] is True and r["question"].endswith("?")
  assert set(r) >= {"environment", "tables", "results", "notes", "markdown"}
  assert r["tables"]
  for t in r["tables"]:
    header = "| " + " | ".join(t["headers"]) + " |"
    assert header in r["markdown"] and header in summary
    assert t["rows"] and all(len(row) == len(t["headers"]) for row in t["rows"])


@pytest.mark.slow  # runs every benchmark end to end
def test_smoke_train_step_vs_peers(smoke):
  res = smoke[0]["train_step_vs_peers"]["results"]
  systems = res["systems"]
  suti = {s["attention_layout"]: s for s in systems[:2]}
  assert [s["library"] for s in systems[:2]] == ["suti_jax (every_block)", "suti_jax (level_end)"]
  peer_venv = os.path.join(REPO, ".venv-bench", "bin", "python")
  assert res["peers_ran"] == os.access(peer_venv, os.X_OK)
  assert len(systems) == (4 if res["peers_ran"] else 2)
  # Attending once per level is fewer attention layers: fewer parameters, less work.
  assert suti["level_end"]["params"] < suti["every_block"]["params"]
  assert suti["level_end"]["conv_dot_flops"] < suti["every_block"]["conv_dot_flops"]
  rows = {row[0]: row for row in smoke[0]["train_step_vs_peers"]["tables"][0]["rows"]}
  for s in systems:
    assert _positive(s["params"]) and _positive(s["examples_per_s"])
    assert _positive(s["conv_dot_flops"])  # Work per example is counted for every system.
  for s in systems[2:]:
    # Each peer's ratio is the measured throughputs' quotient against suti_jax in
    # the peer's layout, in the JSON and the table; per FLOP, GFLOP/s's quotient.
    matched = suti[res["peer_layouts"][s["library"]]]
    ratio = matched["examples_per_s"] / s["examples_per_s"]
    assert res["suti_over_peer"][s["library"]] == pytest.approx(ratio)
    assert rows[s["library"]][-2] == pytest.approx(ratio)
    per_flop = matched["gflop_per_s"] / s["gflop_per_s"]
    assert res["suti_over_peer_per_flop"][s["library"]] == pytest.approx(per_flop)
    assert rows[s["library"]][-1] == pytest.approx(per_flop)


@pytest.mark.slow  # runs every benchmark end to end
def test_smoke_step_profile_compares_the_flag_sets_it_names(smoke):
  res = smoke[0]["step_profile"]["results"]
  flag = "xla_cpu_experimental_ynn_fusion_type="
  for run in res["runs"]["jaxlib defaults"]:
    assert flag not in run["xla_flags"]
  for run in res["runs"]["suti_jax flags"]:
    assert run["xla_flags"].startswith("--" + flag)
  for runs in res["runs"].values():
    assert all(_positive(r["examples_per_s"]) for r in runs)
    kinds = runs[0]["profile"]["kinds_ms"]
    assert any(k.startswith("convolution") for k in kinds)
    assert all(ms >= 0 for ms in kinds.values()) and _positive(sum(kinds.values()))


@pytest.mark.slow  # runs every benchmark end to end
def test_smoke_roofline(smoke):
  res = smoke[0]["roofline"]["results"]
  assert _positive(res["peak_gflops_per_s"])
  assert len(res["programs"]) == 4
  for prog in res["programs"]:
    assert _positive(prog["flops"]) and _positive(prog["fraction_of_peak"])
  # The full sampler does num_steps times the single step's work.
  one, full = res["programs"][2]["flops"], res["programs"][3]["flops"]
  assert full == pytest.approx(2 * one)


@pytest.mark.slow  # runs every benchmark end to end
def test_smoke_sharding_memory(smoke):
  res = smoke[0]["sharding_memory"]["results"]
  rows = {r["devices"]: r for r in res["abstract"]}
  assert set(rows) == {1, 2}
  assert rows[1]["ratio_to_even"] == pytest.approx(1.0)
  # fsdp over 2 devices halves most bytes; a device never holds less than total/N.
  assert rows[2]["params_plus_opt_per_device"] < rows[1]["params_plus_opt_per_device"]
  assert 1.0 <= rows[2]["ratio_to_even"] < 2.0
  compiled = {r["devices"]: r for r in res["compiled"]}
  assert _positive(compiled[1]["argument"]) and _positive(compiled[2]["argument"])
  assert compiled[2]["argument"] < compiled[1]["argument"]


@pytest.mark.slow  # runs every benchmark end to end
def test_smoke_exemplar_gradients(smoke):
  res = smoke[0]["exemplar_gradients"]["results"]
  through, constant = res["through the exemplars"], res["exemplars as constants"]
  assert _positive(through["ms_per_step"]) and _positive(constant["ms_per_step"])
  # Without the backward pass through the exemplar encoding the step does less work.
  assert 0 < constant["gflop_per_step"] < through["gflop_per_step"]
  assert res["speedup"] == pytest.approx(through["ms_per_step"] / constant["ms_per_step"])


@pytest.mark.slow  # runs every benchmark end to end
def test_smoke_page_faults(smoke):
  from bench import page_faults  # pylint: disable=import-outside-toplevel

  res = smoke[0]["page_faults"]["results"]
  cpu = {}
  for variant in page_faults.VARIANTS:
    r = res[variant]
    assert _positive(r["ms_per_step"]) and r["minor_faults_per_step"] >= 0
    cpu[variant] = r["user_ms_per_step"] + r["system_ms_per_step"]
  default, huge = (cpu[v] for v in page_faults.VARIANTS)
  assert res["cpu_ratio"] == pytest.approx(huge / default)


def test_page_faults_variants_keep_the_users_other_tunables(monkeypatch):
  from bench import page_faults  # pylint: disable=import-outside-toplevel

  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0")
  assert page_faults._tunables("glibc defaults") == "glibc.malloc.arena_max=2"
  assert (page_faults._tunables("huge pages for malloc")
          == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
  monkeypatch.delenv("GLIBC_TUNABLES")
  assert page_faults._tunables("glibc defaults") == ""


@pytest.mark.slow  # runs every benchmark end to end
def test_smoke_input_pipeline(smoke):
  res = smoke[0]["input_pipeline"]["results"]
  assert res["beam"]["groups"] > 0
  for value in (res["beam"]["groups_per_s"], res["tfdata"]["groups_per_s"],
                res["train_step"]["examples_per_s"], res["tfdata_over_step"],
                res["beam_over_step"]):
    assert _positive(value)


@pytest.mark.slow  # runs every benchmark end to end
def test_smoke_personalization_cost(smoke):
  res = smoke[0]["personalization_cost"]["results"]
  assert res["num_images"] == 5  # One prompt per skill.
  assert set(res["methods"]) == {"SuTI (in context)", "DreamBooth expert"}
  for row in res["methods"].values():
    assert _positive(row["seconds_per_subject"]) and _positive(row["dreambooth_over_method"])
    assert -1.0 <= row["subject_fidelity"] <= 1.0 and 0.0 <= row["subject_match"] <= 1.0
  assert _positive(res["dreambooth_over_suti"])


@pytest.mark.slow  # runs all benchmarks end to end
def test_smoke_loop_efficiency(smoke):
  res = smoke[0]["loop_efficiency"]["results"]
  assert {(r["stage"], r["cache"]) for r in res["loop"]} == {
      ("base", True), ("base", False), ("suti", True), ("suti", False)}
  for row in res["loop"]:
    assert _positive(row["step_examples_per_s"]) and _positive(row["loop_examples_per_s"])
    assert row["ratio"] == pytest.approx(row["loop_examples_per_s"] / row["step_examples_per_s"])
  assert [r["size"] for r in res["sampling"]] == [16, 64]
  assert all(_positive(r["images_per_s"]) for r in res["sampling"])
