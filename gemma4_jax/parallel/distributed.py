"""Start JAX's multi-process runtime from the settings a launcher provides.

    from gemma4_jax.parallel import distributed
    settings = distributed.resolve_settings()   # flags and environment
    distributed.initialize(settings)            # before any other JAX call

A multi-host job runs one process per host, and every process must call
`jax.distributed.initialize` with the coordinator's address (process 0's
host and a free port), the number of processes and its own id before its
first JAX computation. `resolve_settings` finds them, in this order:

1. explicit: the arguments, or the environment variables
   `JAX_COORDINATOR_ADDRESS` (host:port), `JAX_NUM_PROCESSES` and
   `JAX_PROCESS_ID`. All three must be given, or none.
2. vertex: a Vertex AI custom job with more than one replica. Vertex AI sets
   `CLUSTER_SPEC`, a JSON object whose `cluster` maps each worker pool
   (`workerpool0`, `workerpool1`, ...) to its replicas' `host:port` and whose
   `task` names this replica's pool (`type`) and `index`. Pool 0 contains
   the one primary replica, which becomes process 0 and the coordinator.
   The replicas of pool 1 follow as processes 1, 2, ...
3. tpu: a Cloud TPU VM, recognised by a PCI device of Google's vendor id
   0x1ae0 (the check JAX 0.12 makes itself). `jax.distributed.initialize()`
   without arguments reads the slice's workers from the TPU VM metadata,
   and on a single-host slice it starts a runtime of one process.
4. single: none of the above; nothing is started.

On CPU, processes exchange collectives with gloo
(`jax_cpu_collectives_implementation`, JAX 0.12's default). Each process
needs its device count set before JAX starts, for example
`XLA_FLAGS=--xla_force_host_platform_device_count=4`.
"""

from __future__ import annotations

import dataclasses
import glob
import ipaddress
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

CLUSTERS = ('auto', 'none', 'explicit', 'vertex', 'tpu')

ADDRESS_VARIABLE = 'JAX_COORDINATOR_ADDRESS'
COUNT_VARIABLE = 'JAX_NUM_PROCESSES'
ID_VARIABLE = 'JAX_PROCESS_ID'
# Overrides the port of the Vertex AI primary replica's address.
PORT_VARIABLE = 'JAX_COORDINATOR_PORT'
VERTEX_VARIABLE = 'CLUSTER_SPEC'
# Only the primary pool and the worker pool run training processes, because
# Vertex AI's pools 2 and 3 are meant for parameter or reduction servers and
# evaluators.
_VERTEX_POOLS = ('workerpool0', 'workerpool1')
_GOOGLE_PCI_VENDOR = '0x1ae0'


@dataclasses.dataclass(frozen=True)
class ProcessSettings:
  """A process's place in a multi-process run.

  Attributes:
    cluster: 'single', 'explicit', 'vertex' or 'tpu' (see the module doc).
    coordinator_address: host:port of process 0's coordinator service; None
      for 'single' and 'tpu'.
    num_processes: Processes of the run; None for 'tpu' (read at start).
    process_id: This process's id in [0, num_processes); None for 'tpu'.
  """

  cluster: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


def _parse_count(name: str, text: str | int) -> int:
  try:
    return int(text)
  except ValueError as error:
    raise ValueError(f'{name}={text!r} is not an integer') from error


def _check_address(address: str, source: str) -> None:
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit():
    raise ValueError(
        f'coordinator address {address!r} from {source} is invalid; write'
        ' HOST:PORT, for example 10.0.0.2:8476'
    )


def _explicit_settings(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    environ: Mapping[str, str],
) -> ProcessSettings | None:
  """Return the explicit settings, None if none is given, or raise if some are."""
  provided = {
      ADDRESS_VARIABLE: coordinator_address or environ.get(ADDRESS_VARIABLE),
      COUNT_VARIABLE: (
          num_processes if num_processes is not None
          else environ.get(COUNT_VARIABLE)
      ),
      ID_VARIABLE: (
          process_id if process_id is not None else environ.get(ID_VARIABLE)
      ),
  }
  provided = {
      name: value for name, value in provided.items()
      if value not in (None, '')
  }
  if not provided:
    return None

  missing = [name for name in (ADDRESS_VARIABLE, COUNT_VARIABLE, ID_VARIABLE)
             if name not in provided]
  if missing:
    raise ValueError(
        f'multi-process settings are incomplete: {", ".join(sorted(provided))}'
        f' given but {", ".join(missing)} missing; set all three (flags'
        ' --coordinator_address, --num_processes, --process_id or these'
        ' environment variables), or none for a single process'
    )

  address = str(provided[ADDRESS_VARIABLE])
  _check_address(address, ADDRESS_VARIABLE)
  count = _parse_count(COUNT_VARIABLE, provided[COUNT_VARIABLE])
  index = _parse_count(ID_VARIABLE, provided[ID_VARIABLE])
  if count < 1:
    raise ValueError(f'{COUNT_VARIABLE}={count} must be at least 1')
  if not 0 <= index < count:
    raise ValueError(
        f'{ID_VARIABLE}={index} must be in [0, {COUNT_VARIABLE}={count});'
        ' number the processes 0, 1, ..., N-1'
    )

  if count == 1:
    return ProcessSettings('single')
  return ProcessSettings('explicit', address, count, index)


def vertex_settings(
    cluster_spec: str, environ: Mapping[str, str] | None = None
) -> ProcessSettings:
  """Return the settings of a Vertex AI replica from its `CLUSTER_SPEC` JSON."""
  environ = os.environ if environ is None else environ
  try:
    spec = json.loads(cluster_spec)
    pools = spec['cluster']
    task_pool = spec['task']['type']
    task_index = int(spec['task']['index'])
  except (ValueError, KeyError, TypeError) as error:
    raise ValueError(
        f'{VERTEX_VARIABLE} is not the JSON of a Vertex AI cluster ({error!r}):'
        f' expected {{"cluster": {{"workerpool0": ["host:port"], ...}},'
        f' "task": {{"type": "workerpool0", "index": 0}}}}, got'
        f' {cluster_spec[:200]!r}'
    ) from error

  primary = pools.get('workerpool0') or []
  if len(primary) != 1:
    raise ValueError(
        f'Vertex AI worker pool 0 has {len(primary)} replicas; give it'
        ' replicaCount 1 (the primary replica) and put the other hosts in'
        ' worker pool 1'
    )
  if task_pool not in _VERTEX_POOLS:
    raise ValueError(
        f'this replica is in Vertex AI pool {task_pool!r}, but fine-tuning'
        f' runs only in {" and ".join(_VERTEX_POOLS)}; remove worker pools'
        ' 2 and 3 from the job'
    )
  workers = list(primary) + list(pools.get('workerpool1') or [])
  process_id = 0 if task_pool == 'workerpool0' else 1 + task_index
  if process_id >= len(workers):
    raise ValueError(
        f'task {task_pool}[{task_index}] is not among the {len(workers)}'
        f' replicas that {VERTEX_VARIABLE} lists'
    )
  if len(workers) == 1:
    return ProcessSettings('single')

  address = str(primary[0])
  _check_address(address, f'{VERTEX_VARIABLE} workerpool0')
  port = environ.get(PORT_VARIABLE)
  if port:
    address = f'{address.rpartition(":")[0]}:{_parse_count(PORT_VARIABLE, port)}'
  return ProcessSettings('vertex', address, len(workers), process_id)


def on_tpu_vm() -> bool:
  """Return whether a Google TPU chip is on this host's PCI bus."""
  for path in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(path) as file:
        if file.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def resolve_settings(
    cluster: str = 'auto',
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> ProcessSettings:
  """Find this process's multi-process settings (see the module doc).

  Args:
    cluster: 'auto' tries explicit settings, then Vertex AI, then a TPU VM.
      'none' starts nothing. 'explicit', 'vertex' and 'tpu' require that
      source and raise if it is absent.
    coordinator_address: host:port of process 0; overrides
      `JAX_COORDINATOR_ADDRESS`.
    num_processes: Overrides `JAX_NUM_PROCESSES`.
    process_id: Overrides `JAX_PROCESS_ID`.
    environ: The environment to read; `os.environ` by default.

  Raises:
    ValueError: an unknown `cluster`, settings given only in part, or a
      malformed `CLUSTER_SPEC`.
  """
  environ = os.environ if environ is None else environ
  if cluster not in CLUSTERS:
    raise ValueError(
        f'cluster={cluster!r} is invalid; use one of {", ".join(CLUSTERS)}'
    )
  if cluster == 'none':
    return ProcessSettings('single')

  if cluster in ('auto', 'explicit'):
    explicit = _explicit_settings(
        coordinator_address, num_processes, process_id, environ
    )
    if explicit is not None:
      return explicit
    if cluster == 'explicit':
      raise ValueError(
          f'cluster=explicit but none of {ADDRESS_VARIABLE},'
          f' {COUNT_VARIABLE} and {ID_VARIABLE} is set; set all three'
      )

  if cluster in ('auto', 'vertex'):
    spec = environ.get(VERTEX_VARIABLE)
    if spec:
      settings = vertex_settings(spec, environ)
      if settings.cluster != 'single' or cluster == 'vertex':
        return settings
    elif cluster == 'vertex':
      raise ValueError(
          f'cluster=vertex but {VERTEX_VARIABLE} is not set; Vertex AI sets'
          ' it in custom jobs with more than one replica'
      )

  if cluster == 'tpu' or (cluster == 'auto' and on_tpu_vm()):
    return ProcessSettings('tpu')
  return ProcessSettings('single')


def _bind_address(coordinator_address: str) -> str | None:
  """Return the coordinator's bind address, or None for JAX's default (all).

  A coordinator on a loopback address listens on loopback only.
  """
  host, _, port = coordinator_address.rpartition(':')
  host = host.strip('[]')
  if host == 'localhost':
    return f'127.0.0.1:{port}'
  try:
    if ipaddress.ip_address(host).is_loopback:
      return coordinator_address
  except ValueError:
    pass  # A host name: JAX binds to all interfaces.
  return None


def initialize(
    settings: ProcessSettings, *, timeout_s: int = 300
) -> None:
  """Start JAX's multi-process runtime for `settings` ('single': nothing).

  Must run before the first JAX computation of the process. Every process
  of the run then waits, up to `timeout_s` seconds, until all have
  connected to the coordinator.
  """
  if settings.cluster == 'single':
    logging.info('single-process run; JAX multi-process runtime not started')
    return

  started = time.perf_counter()
  # Gloo is JAX 0.12's default, set here so that the choice does not depend
  # on the JAX version. The setting only affects CPU devices.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if settings.cluster == 'tpu':
    jax.distributed.initialize(initialization_timeout=timeout_s)
  else:
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address,
        num_processes=settings.num_processes,
        process_id=settings.process_id,
        coordinator_bind_address=_bind_address(settings.coordinator_address),
        cluster_detection_method='deactivate',
        initialization_timeout=timeout_s,
    )
  logging.info(
      'process %d of %d (%s) connected to the coordinator in %.1f s; %d local'
      ' and %d global devices',
      jax.process_index(), jax.process_count(), settings.cluster,
      time.perf_counter() - started, jax.local_device_count(),
      jax.device_count(),
  )


def allgather_json(value: Any) -> list[Any]:
  """Return every process's JSON-serialisable `value`, in process order.

  A collective: all processes must call it at the same point.
  """
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  encoded = np.frombuffer(json.dumps(value).encode('utf-8'), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(len(encoded)))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:len(encoded)] = encoded
  gathered = multihost_utils.process_allgather(padded)
  return [
      json.loads(bytes(row[:int(length)]).decode('utf-8'))
      for row, length in zip(gathered, np.ravel(lengths))
  ]
