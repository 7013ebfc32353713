"""The device mesh: (data, fsdp, tensor) sizes from a MeshConfig, per slice (ICI)
and across slices (DCN), one -1 per group filled from the device count.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from suti_jax.config import MeshConfig
from suti_jax.parallel import axes


class MeshError(ValueError):
  """Mesh sizes that do not fit the available devices."""


def _fill(sizes: Sequence[int], total: int, group: str) -> tuple[int, ...]:
  """Replaces the one -1 in `sizes` so that their product is `total`."""
  named = ", ".join(f"{group}_{a}={s}" for a, s in zip(axes.MESH_AXES, sizes))
  unit = "slices" if group == "dcn" else "devices per slice"
  if sum(s == -1 for s in sizes) > 1:
    raise MeshError(f"at most one -1 per group, got {named}")
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"mesh sizes must be positive or -1, got {named}")
  known = math.prod(s for s in sizes if s != -1)
  if total % known:
    raise MeshError(f"{named} (product {known}) does not divide {total} {unit}")
  filled = tuple(total // known if s == -1 else s for s in sizes)
  if math.prod(filled) != total:
    raise MeshError(f"{named} covers {known} of {total} {unit}; set one size to -1")
  return filled


def mesh_shape(cfg: MeshConfig, num_devices: int,
               num_slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Resolves the per-slice (ICI) and cross-slice (DCN) mesh shapes.

  Args:
    cfg: sizes per axis; one -1 per group is filled in.
    num_devices: all devices in the job.
    num_slices: slices (or processes, off TPU) the DCN group spans.

  Returns:
    (ici_shape, dcn_shape), each ordered like `axes.MESH_AXES`; the full mesh
    shape is their elementwise product.
  """
  if num_devices % num_slices:
    raise MeshError(f"{num_devices} devices do not split into {num_slices} slices")
  dcn = _fill((cfg.dcn_data, cfg.dcn_fsdp, cfg.dcn_tensor), num_slices, "dcn")
  ici = _fill((cfg.ici_data, cfg.ici_fsdp, cfg.ici_tensor), num_devices // num_slices, "ici")
  return ici, dcn


def _granules(devices: Sequence[Any]) -> tuple[int, bool]:
  """Number of DCN granules and whether they are processes (no slice_index)."""
  if hasattr(devices[0], "slice_index"):
    return len({d.slice_index for d in devices}), False
  return len({d.process_index for d in devices}), True


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh.

  Axes are `AxisType.Auto`: flax's logical partitioning relies on GSPMD
  propagation, which Explicit axes (jax.make_mesh's default) reject.

  Args:
    cfg: mesh sizes.
    devices: defaults to `jax.devices()`; TPU topology devices for AOT compiles.

  Returns:
    A `Mesh` with axis names `axes.MESH_AXES`.
  """
  devices = list(jax.devices() if devices is None else devices)
  num_granules, process_is_granule = _granules(devices)
  dcn_requested = (cfg.dcn_data, cfg.dcn_fsdp, cfg.dcn_tensor)
  # A single slice (or a config with no DCN axes) uses one ICI mesh over all
  # devices; processes only stand in for slices when the config asks for DCN.
  if num_granules == 1 or (process_is_granule and all(s == 1 for s in dcn_requested)):
    num_granules = 1
  ici, dcn = mesh_shape(cfg, len(devices), num_granules)
  if math.prod(dcn) > 1:
    grid = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=process_is_granule)
  else:
    grid = mesh_utils.create_device_mesh(ici, devices)
  return Mesh(np.asarray(grid), axes.MESH_AXES,
              axis_types=(AxisType.Auto,) * len(axes.MESH_AXES))


def describe(mesh: Mesh) -> str:
  """'data=2 fsdp=4 tensor=1 (8 devices, cpu)' for logs and checkpoint meta."""
  sizes = " ".join(f"{n}={s}" for n, s in mesh.shape.items())
  return f"{sizes} ({mesh.devices.size} devices, {mesh.devices.flat[0].platform})"
