"""Mesh shapes from MeshConfig on 8 virtual devices: -1 fill, DCN groups, errors."""

import jax
import pytest

from suti_jax.config import MeshConfig
from suti_jax.parallel import mesh as mesh_lib


@pytest.mark.parametrize("cfg, expected", [
    (MeshConfig(), {"data": 8, "fsdp": 1, "tensor": 1}),
    (MeshConfig(ici_data=1, ici_fsdp=-1), {"data": 1, "fsdp": 8, "tensor": 1}),
    (MeshConfig(ici_data=2, ici_fsdp=-1), {"data": 2, "fsdp": 4, "tensor": 1}),
    (MeshConfig(ici_data=2, ici_fsdp=2, ici_tensor=2), {"data": 2, "fsdp": 2, "tensor": 2}),
    (MeshConfig(ici_data=-1, ici_fsdp=1, ici_tensor=4), {"data": 2, "fsdp": 1, "tensor": 4}),
])
def test_make_mesh_shapes(cfg, expected):
  mesh = mesh_lib.make_mesh(cfg)
  assert dict(mesh.shape) == expected
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_mesh_shape_fills_each_group():
  cfg = MeshConfig(ici_data=1, ici_fsdp=-1, ici_tensor=2, dcn_data=-1, dcn_fsdp=1)
  assert mesh_lib.mesh_shape(cfg, 16, num_slices=2) == ((1, 4, 2), (2, 1, 1))


@pytest.mark.parametrize("cfg, match", [
    (MeshConfig(ici_data=3), "does not divide 8"),
    (MeshConfig(ici_data=2, ici_fsdp=2, ici_tensor=1), "covers 4 of 8"),
    (MeshConfig(ici_data=-1, ici_fsdp=-1), "at most one -1"),
    (MeshConfig(ici_data=0), "positive or -1"),
])
def test_mesh_errors(cfg, match):
  with pytest.raises(mesh_lib.MeshError, match=match):
    mesh_lib.make_mesh(cfg)


def test_dcn_needs_matching_slices():
  with pytest.raises(mesh_lib.MeshError, match="covers 1 of 2 slices"):
    mesh_lib.mesh_shape(MeshConfig(), 8, num_slices=2)


def test_describe_names_axes():
  mesh = mesh_lib.make_mesh(MeshConfig(ici_data=2, ici_fsdp=4))
  assert mesh_lib.describe(mesh) == "data=2 fsdp=4 tensor=1 (8 devices, cpu)"
