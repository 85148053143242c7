"""Multi-host data parallelism: one process per host, every process running the same program.

`initialize()` connects the processes (`jax.distributed.initialize`) before jax computes anything;
the CLI calls it for `--distributed` or `JAXLM_DISTRIBUTED=1`. From then on `jax.devices()` lists
the devices of every host, and the 1-D mesh of jaxlm/train/loop.py (`Devices`) spans them all.

What a multi-host run relies on:
- Every process reads the same data, builds the same tokenizer and iterates the same deterministic
  batches (jaxlm/batching.py); each puts only its rows of a global batch on its own devices
  (`put`). `check_same` compares a fingerprint of the batches first, so a host that reads other
  data (another copy of the files, another config) fails at once instead of training on a mixture.
- Params and optimizer state are replicated from host-local values that are equal everywhere (same
  seed, same init); step metrics come back as replicated scalars, so every process takes the same
  data-driven decisions (a non-finite batch, the best checkpoint) without talking.
- Decisions a process takes from its own clock or signals (a time-based checkpoint, SIGTERM) are
  agreed on (`agree`): orbax's save is collective, so a process saving alone would wait forever.
- Side effects happen once: process 0 takes the workdir lock, writes config.json, the tokenizer,
  metrics, summaries and reports, and prints (`once`, `is_primary`); orbax coordinates each
  checkpoint save (every process writes its shards, process 0 finalises the step) and process 0
  writes the step's checksums after it. The workdir must be one directory every host sees (NFS,
  Filestore, a gcsfuse mount).

In a single process every helper here is a no-op that costs nothing.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

import numpy as np

from jaxlm.errors import ConfigError, JaxlmError

ENV = "JAXLM_DISTRIBUTED"
# Read by jax itself (JAX_COORDINATOR_ADDRESS) or by `initialize` below, as launchers set them.
ENV_ADDRESS, ENV_COUNT, ENV_INDEX = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
_MESSAGE_BYTES = 2048  # an error of process 0, as the other processes report it


class DistributedError(JaxlmError):
  """Processes of a multi-host run that cannot connect, or that would not run the same program."""


def requested(flag: bool = False) -> bool:
  """`--distributed`, or JAXLM_DISTRIBUTED=1 in the environment (set once for a whole pod)."""
  return bool(flag) or os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Connects this process to the others of the run; before any jax computation, once.

  On a TPU pod slice, under SLURM or Open MPI, jax finds the coordinator, the process count and
  this process's index itself. Elsewhere (several GPU hosts) they come from the arguments or from
  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  import jax
  if jax.distributed.is_initialized():
    return
  kwargs = {"coordinator_address": coordinator_address or os.environ.get(ENV_ADDRESS) or None,
            "num_processes": _env_int(ENV_COUNT) if num_processes is None else num_processes,
            "process_id": _env_int(ENV_INDEX) if process_id is None else process_id}
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError, TypeError) as e:
    detail = " ".join(str(e).split())
    raise DistributedError(
        f"jax.distributed.initialize failed ({detail[:300]}); on a TPU pod slice, SLURM or "
        f"Open MPI it needs no arguments, elsewhere give every host --coordinator_address "
        f"HOST:PORT (of process 0) --num_processes N --process_id I, or {ENV_ADDRESS}, "
        f"{ENV_COUNT}, {ENV_INDEX}") from None


def _env_int(name: str) -> int | None:
  text = os.environ.get(name, "").strip()
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise DistributedError(f"{name}={text!r} is not an integer") from None


def process_count() -> int:
  import jax
  return jax.process_count()


def is_primary() -> bool:
  """Whether this process writes the run's files and prints: process 0 (any single process)."""
  import jax
  return jax.process_index() == 0


def multiprocess() -> bool:
  return process_count() > 1


def mesh_devices(num_devices: int = 0) -> list:
  """The devices of the data-parallel mesh: all, or the first `num_devices`; in a multi-host run
  the same number from every host, process by process (each host feeds only its own devices)."""
  import jax
  devices = jax.devices()
  if not num_devices or num_devices == len(devices):
    return devices
  if num_devices > len(devices):
    raise ConfigError(f"config.train.num_devices={num_devices} but only {len(devices)} "
                      f"{devices[0].platform} device(s) are visible")
  count = jax.process_count()
  if count == 1:
    return devices[:num_devices]
  if num_devices % count:
    raise ConfigError(f"config.train.num_devices={num_devices} is not divisible by the {count} "
                      "processes of the run: every host uses the same number of its devices")
  by_process: dict[int, list] = {}
  for device in devices:
    by_process.setdefault(device.process_index, []).append(device)
  return [d for p in sorted(by_process) for d in by_process[p][:num_devices // count]]


def put(tree, sharding):
  """`tree` on `sharding` (of a mesh over several processes), from values every process holds in
  full: a global batch, freshly initialised or restored params. Each process transfers only the
  rows its own devices hold; arrays already spread over the mesh are resharded if need be."""
  import jax

  def leaf(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x if x.sharding.is_equivalent_to(sharding, x.ndim) else jax.device_put(x, sharding)
    x = np.asarray(x)  # a host copy of a single-device array
    return jax.make_array_from_process_local_data(sharding, x, x.shape)

  return jax.tree.map(leaf, tree)


def barrier(name: str) -> None:
  """Waits until every process got here (e.g. until process 0 wrote what the others read)."""
  if multiprocess():
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def once(fn: Callable, *args, **kwargs) -> Any:
  """`fn(*args, **kwargs)` on process 0 only; every process returns once it has, with its result
  on process 0 and None elsewhere. If it raised, process 0 raises that and the others a
  DistributedError with its message, instead of waiting forever at the next collective."""
  if not multiprocess():
    return fn(*args, **kwargs)
  result, error, message = None, None, ""
  if is_primary():
    try:
      result = fn(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      error = e
      message = str(e) if isinstance(e, JaxlmError) else f"{type(e).__name__}: {e}"
      message = message or type(e).__name__
  message = _broadcast_text(message)
  if error is not None:
    raise error
  if message:
    raise DistributedError(f"process 0 failed: {message}")
  return result


def _broadcast_text(text: str) -> str:
  from jax.experimental import multihost_utils
  data = text.encode("utf-8")[:_MESSAGE_BYTES]
  buffer = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
  buffer[0] = 1 if data else 0
  buffer[1:1 + len(data)] = np.frombuffer(data, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  return bytes(out[1:]).rstrip(b"\0").decode("utf-8", "replace") if out[0] else ""


def agree(*values: int) -> tuple[int, ...]:
  """Each value's maximum over the processes: a flag one process raised (a signal it received, a
  checkpoint its clock says is due) becomes every process's, at the same step."""
  if not multiprocess():
    return tuple(values)
  from jax.experimental import multihost_utils
  gathered = np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int32)))
  return tuple(int(v) for v in gathered.reshape(-1, len(values)).max(axis=0))


def check_same(tree, what: str) -> None:
  """DistributedError unless `tree` (numpy arrays and scalars) is the same on every process."""
  if not multiprocess():
    return
  import jax
  from jax.experimental import multihost_utils
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{leaf.dtype}{leaf.shape}".encode())
    digest.update(leaf.tobytes())
  mine = np.frombuffer(digest.digest()[:16], np.uint32)
  gathered = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, mine.size)
  differ = [p for p in range(len(gathered)) if not np.array_equal(gathered[p], gathered[0])]
  if differ:
    raise DistributedError(f"{what} of process(es) {', '.join(map(str, differ))} differ from "
                           "process 0's: every host must read the same data with the same config "
                           "and jaxlm version")
