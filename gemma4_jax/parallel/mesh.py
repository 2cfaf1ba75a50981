"""Device meshes with the four axes every sharded step uses.

The mesh always has the axes `data`, `fsdp`, `expert` and `tensor`, in that
order, so that rules and shardings never depend on which axes a user named:
an axis the user left out has size 1. `tensor` comes last so that its
devices are neighbours, which matters on TPU slices where tensor-parallel
collectives run every layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math

import jax
import numpy as np

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')


def parse_mesh(text: str) -> dict[str, int]:
  """Parse 'tensor=8,fsdp=4' into {'tensor': 8, 'fsdp': 4}."""
  shape = {}
  for item in text.split(','):
    item = item.strip()
    if not item:
      continue
    name, sep, size = item.partition('=')
    name = name.strip()
    if not sep or not size.strip().isdigit():
      raise ValueError(
          f'invalid mesh entry {item!r} in {text!r}: write AXIS=SIZE, for'
          f' example tensor=8,fsdp=4'
      )
    if name not in MESH_AXES:
      raise ValueError(
          f'unknown mesh axis {name!r} in {text!r}; the axes are'
          f' {", ".join(MESH_AXES)}'
      )
    if name in shape:
      raise ValueError(f'mesh axis {name!r} is given twice in {text!r}')
    shape[name] = int(size)
    if shape[name] < 1:
      raise ValueError(f'mesh axis {name}={size} must be at least 1')
  return shape


def full_shape(shape: Mapping[str, int]) -> dict[str, int]:
  """Return `shape` with every axis of MESH_AXES, missing ones of size 1."""
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(
        f'unknown mesh axes {unknown}; the axes are {", ".join(MESH_AXES)}'
    )
  return {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}


def make_mesh(
    shape: Mapping[str, int] | str,
    devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
  """Build a mesh of `devices` (default: all devices) with axes MESH_AXES.

  Args:
    shape: Size per axis, as a mapping or as 'tensor=8,fsdp=4'. Axes left
      out have size 1. The sizes must multiply to the number of devices.
    devices: The devices, in the order to lay out on the mesh.
  """
  if isinstance(shape, str):
    shape = parse_mesh(shape)
  sizes = full_shape(shape)
  devices = list(jax.devices() if devices is None else devices)
  total = math.prod(sizes.values())
  if total != len(devices):
    described = ','.join(f'{k}={v}' for k, v in sizes.items() if v > 1)
    raise ValueError(
        f'mesh {described or "of size 1"} needs {total} devices but'
        f' {len(devices)} are available; pick axis sizes that multiply to'
        f' {len(devices)}'
    )
  grid = np.asarray(devices, dtype=object).reshape(
      tuple(sizes[a] for a in MESH_AXES)
  )
  return jax.sharding.Mesh(grid, MESH_AXES)


def preset_mesh_shape(variant: str, num_devices: int) -> dict[str, int]:
  """Suggest a mesh shape for a released variant on `num_devices` devices.

  - 31B: tensor parallelism over up to 8 devices (its 32 query heads and 16
    local KV heads split 8 ways), FSDP over the rest.
  - 26B-A4B: its 128 experts over up to 16 devices, FSDP over the rest.
  - E2B, E4B: FSDP over up to 8 devices, data parallelism over the rest.
  """
  def largest_divisor(limit: int) -> int:
    return max(d for d in range(1, min(limit, num_devices) + 1)
               if num_devices % d == 0)

  if variant == '31b':
    tensor = largest_divisor(8)
    return {'tensor': tensor, 'fsdp': num_devices // tensor}
  if variant == '26b_a4b':
    expert = largest_divisor(16)
    return {'expert': expert, 'fsdp': num_devices // expert}
  if variant in ('e2b', 'e4b'):
    fsdp = largest_divisor(8)
    return {'fsdp': fsdp, 'data': num_devices // fsdp}
  raise ValueError(
      f'unknown variant {variant!r}; expected one of e2b, e4b, 26b_a4b, 31b'
  )
