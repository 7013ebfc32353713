"""Gin as a second spelling of `--config.a.b=v`: each config section is a gin
configurable of the same name whose bindings are applied to the (locked)
ConfigDict before it is converted into typed sections (`suti_jax.config`).

`train.total_steps = 5` -> config.train.total_steps,
`model.exemplar = {'max_exemplars': 3}` -> config.model.exemplar.max_exemplars,
and top-level keys go through `config`: `config.init_from = '/ckpt'`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import gin
import ml_collections

from suti_jax import config as config_lib

# Gin configurable names; each returns its bindings as an overrides dict.
GIN_SECTIONS = ("config", "model", "text", "diffusion", "sampling", "optimizer", "mesh",
                "data", "train")


def _overrides(**kwargs: Any) -> dict[str, Any]:
  return kwargs


# Import-time registration (the only module-level state): one configurable per
# section, so gin rejects nothing and we check every key against the config.
for _name in GIN_SECTIONS:
  gin.external_configurable(_overrides, name=_name)


def _apply(config: ml_collections.ConfigDict, path: str, values: Mapping[str, Any]) -> None:
  """Sets `values` under `config`, refusing unknown keys and type changes."""
  for key, value in values.items():
    where = f"{path}.{key}"
    if key not in config:
      raise KeyError(f"gin binding {config_lib.unknown_key_message(where, config.keys())}")
    if isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, Mapping):
      _apply(config[key], where, value)
      continue
    try:
      config[key] = value
    except (TypeError, ValueError) as e:
      raise TypeError(f"gin binding {where}={value!r}: {e}") from e


def apply_gin(config: ml_collections.ConfigDict, gin_files: Sequence[str],
              gin_bindings: Sequence[str]) -> ml_collections.ConfigDict:
  """Parses gin files/bindings and applies them as config overrides.

  Args:
    config: the (locked) config; changed in place.
    gin_files: gin files.
    gin_bindings: binding strings.

  Returns:
    `config`.
  """
  if not gin_files and not gin_bindings:
    return config
  gin.clear_config()  # The launcher owns gin: only these files/bindings count.
  gin.parse_config_files_and_bindings(gin_files, gin_bindings, finalize_config=False)
  for name in GIN_SECTIONS:
    values = gin.get_configurable(name)()
    if name == "config":
      _apply(config, "config", values)
    else:
      _apply(config[name], f"config.{name}", values)
  return config
