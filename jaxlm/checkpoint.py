"""Checkpoints and run files in a workdir: the one place that builds an orbax CheckpointManager.

Layout of a workdir (see docs/ARCHITECTURE.md):

  {workdir}/checkpoints/{step}/state   {'step', 'params', 'opt_state', 'rng'} (StandardSave)
  {workdir}/checkpoints/{step}/meta    JSON: data iterator state, epoch, metrics, ... (JsonSave)
  {workdir}/config.json, summary.json  written atomically by `write_json_atomic`
  {workdir}/tokenizer/                 written by the tokenizer module

Resume and model selection share one manager. Retention keeps the `max_to_keep` latest steps
(resume) plus the single best step by a validation metric (model selection), so up to
`max_to_keep + 1` steps sit on disk and the best one is never written twice. The best metric is
stored with each step as orbax metrics `{'best_metric', 'best_value', 'best_score'}` with
`best_score` = value for mode 'max' and -value for 'min': any later reader (resume, evaluate,
`restore_params`) finds the best step without being told the metric or its direction.

Atomicity is orbax's: a step is written into `{step}.orbax-checkpoint-tmp-*` and renamed once
complete, and only renamed step directories count as steps, so an interrupted save never becomes
the latest checkpoint. Restores are device-agnostic: arrays land on the shardings of the template
(or on the default device), never on the device layout the checkpoint was saved from.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxlm.files import atomic_write
from jaxlm.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)
_WRITTEN_BY = "run `jaxlm pretrain` or `jaxlm finetune` with --workdir {workdir}"
_MAX_LISTED = 20  # mismatching paths listed in one error message


class Checkpointer:
  """Saves and restores train states under `{workdir}/checkpoints`; also a context manager.

  `best_metric`/`best_mode` name the validation metric that selects the best checkpoint
  (e.g. 'accuracy', 'max'); saves whose `metrics` lack it only count as "latest" candidates.
  Saves are asynchronous by default: `save` returns once arrays are copied off the device, and
  `wait_until_finished`/`close` (or leaving the `with` block) wait for the files.
  """

  def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 2,
               best_metric: str | None = None, best_mode: str = "max",
               async_save: bool = True, read_only: bool = False):
    if best_mode not in ("max", "min"):
      raise ConfigError(f"best checkpoint mode must be 'max' or 'min', got {best_mode!r}")
    self.workdir = pathlib.Path(workdir).absolute()  # orbax refuses relative paths
    self.directory = self.workdir / "checkpoints"
    if read_only and not self.directory.is_dir():
      raise CheckpointError(f"no checkpoints in {self.directory}: "
                            + _WRITTEN_BY.format(workdir=self.workdir))
    self.best_metric, self.best_mode = best_metric, best_mode
    score = lambda metrics: metrics["best_score"]
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=0 if read_only else 1,  # orbax warns about anything else
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=async_save,
        best_fn=score,  # used by `best_step`; retention is the policy below
        best_mode="max",
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(max_to_keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=score, n=1,
                                          keep_checkpoints_without_metrics=False),
        ]),
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=_handler_registry())

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the best metric; None when no saved step carried the best metric."""
    return self._manager.best_step()

  def save(self, step: int, state: dict, meta: dict | None = None, *,
           metrics: dict | None = None, force: bool = False) -> bool:
    """Saves `state` (a pytree) and `meta` (JSON-able) as `step`; returns whether it was written.

    A step at or before the latest one is skipped (orbax: returns False) unless `force`;
    forcing a step that already exists is an error. `metrics[best_metric]`, when present,
    ranks this step for the best checkpoint.
    """
    step = int(step)
    if force and step in self.all_steps():
      raise CheckpointError(f"checkpoint step {step} already exists in {self.directory}")
    best = None
    value = (metrics or {}).get(self.best_metric) if self.best_metric else None
    if value is not None and math.isfinite(value := float(value)):  # NaN does not rank a step
      best = {"best_metric": self.best_metric, "best_value": value,
              "best_score": value if self.best_mode == "max" else -value}
    args = ocp.args.Composite(state=ocp.args.StandardSave(_to_storable(state)),
                              meta=ocp.args.JsonSave(_jsonable(meta or {}, "meta")))
    return self._manager.save(step, args=args, metrics=best, force=force)

  def restore(self, template: Any, step: int | None = None, *,
              which: str = "latest") -> tuple[Any, dict]:
    """Restores (state, meta) of `step` (default: the `which` = 'latest' or 'best' step).

    `template` is the freshly initialised state, real or abstract (`jax.eval_shape`): it fixes
    the tree structure (optax namedtuples, masked/empty states) and where each array lands (its
    shardings; the default device for leaves without one). A checkpoint that does not fit it
    raises CheckpointError listing every mismatching path, instead of being cast or reshaped.
    """
    step = self._resolve_step(step, which)
    target = jax.tree.map(_abstract_storable, template)
    problems = _mismatches(target, self._stored_state(step))
    if problems:
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} does not fit the model "
          f"({len(problems)} mismatching paths):\n  " + "\n  ".join(_clip(problems)))
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    state = jax.tree.map(_rewrap_key, template, restored["state"])
    return state, restored["meta"] or {}

  def restore_params(self, step: int | None = None, *, which: str = "latest") -> Any:
    """Reads only `state/params` of a step, without knowing the optimizer that wrote it.

    The target tree comes from the checkpoint's own metadata; orbax's partial restore
    (`PyTreeRestore(partial_restore=True)`) then skips opt_state, step and rng. Arrays land on
    the default device.
    """
    step = self._resolve_step(step, which)
    stored = self._stored_state(step)
    if "params" not in stored:
      raise CheckpointError(f"checkpoint {self.directory / str(step)} has no 'params' "
                            f"(found: {sorted(stored)})")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), stored["params"])}
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
    params = restored["state"]["params"]
    log.info("restored params (%d arrays) from %s; not loaded: %s",
                 len(jax.tree.leaves(params)), self.directory / str(step),
                 ", ".join(sorted(k for k in stored if k != "params")))
    return params

  def wait_until_finished(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc):
    self.close()

  def _resolve_step(self, step: int | None, which: str) -> int:
    self._manager.wait_until_finished()  # a step saved asynchronously is readable only now
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoints in {self.directory}: "
                            + _WRITTEN_BY.format(workdir=self.workdir))
    if step is not None:
      if int(step) not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available steps: {steps}")
      return int(step)
    if which == "latest":
      return steps[-1]
    if which == "best":
      best = self.best_step()
      if best is None:
        log.warning("no checkpoint in %s carries a best metric; using the latest, step %d",
                        self.directory, steps[-1])
        return steps[-1]
      return best
    raise ConfigError(f"which checkpoint: expected 'latest' or 'best', got {which!r}")

  def _stored_state(self, step: int) -> Any:
    """The saved tree of `state` at `step` (ArrayMetadata leaves: shape, dtype)."""
    metadata = self._manager.item_metadata(step)["state"]
    return getattr(metadata, "tree", metadata)


def restore_params(workdir: str | os.PathLike, step: int | None = None,
                   which: str = "latest") -> Any:
  """The params of a run's checkpoint (latest, best or `step`), e.g. an LM to graft."""
  with Checkpointer(workdir, read_only=True) as checkpointer:
    return checkpointer.restore_params(step, which=which)


def write_json_atomic(path: str | os.PathLike, obj: Any):
  """Writes JSON so readers see the old file or the new one, never half of one."""
  text = json.dumps(_jsonable(obj, str(path)), indent=2) + "\n"
  atomic_write(path, text.encode("utf-8"))


def save_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict):
  """Writes `{workdir}/config.json`, the run's resolved config (tuples become lists)."""
  write_json_atomic(pathlib.Path(workdir) / "config.json", json.loads(config.to_json_best_effort()))


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """Reads `{workdir}/config.json` back, so evaluate/predict rebuild the run's model."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise CheckpointError(f"{path} does not exist: " + _WRITTEN_BY.format(workdir=workdir))
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}): "
                          f"{e.msg}") from None


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """Item handlers: `state` as a standard pytree (and partial pytree restore), `meta` as JSON."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for item, args in [("state", ocp.args.StandardSave), ("state", ocp.args.StandardRestore),
                     ("state", ocp.args.PyTreeRestore),
                     ("meta", ocp.args.JsonSave), ("meta", ocp.args.JsonRestore)]:
    registry.add(item, args)
  return registry


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _key_impl(x):
  """The PRNG implementation of a typed key array or of its abstract ShapeDtypeStruct."""
  if isinstance(x, jax.Array):
    return jax.random.key_impl(x)
  found = []
  jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)),
                 jax.ShapeDtypeStruct(x.shape, x.dtype))
  return found[0]


def _to_storable(state):
  """Typed PRNG keys become their uint32 key data; Python scalars become arrays."""
  def leaf(x):
    if _is_key(x):
      return jax.random.key_data(x)
    return x if hasattr(x, "dtype") else jnp.asarray(x)
  return jax.tree.map(leaf, state)


def _abstract_storable(x) -> jax.ShapeDtypeStruct:
  """Restore target of one template leaf: shape and dtype as stored, sharding as the template's."""
  if not hasattr(x, "dtype"):
    x = jnp.asarray(x)
  sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if _is_key(x):  # key data has trailing dims: the same sharding leaves them replicated
    x = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _rewrap_key(template_leaf, restored):
  if _is_key(template_leaf):
    return jax.random.wrap_key_data(restored, impl=_key_impl(template_leaf))
  return restored


def _mismatches(target, stored) -> list[str]:
  """Paths where the target and the stored trees differ in presence, shape or dtype."""
  want, have = _shapes_by_path(target), _shapes_by_path(stored)
  problems = [f"{p}: in the model, not in the checkpoint" for p in sorted(want.keys() - have)]
  problems += [f"{p}: in the checkpoint, not in the model" for p in sorted(have.keys() - want)]
  problems += [f"{p}: checkpoint {have[p][0]} {have[p][1]}, model {want[p][0]} {want[p][1]}"
               for p in sorted(want.keys() & have) if want[p] != have[p]]
  return problems


def _shapes_by_path(tree) -> dict[str, tuple[tuple, str]]:
  """{'opt_state/0/mu/embed/embedding': (shape, dtype)}: namedtuple fields and dict keys alike,
  since orbax stores namedtuples as dicts and tuples as lists; empty nodes have no leaves."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_name(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
          for path, leaf in flat}


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _clip(lines: list[str]) -> list[str]:
  if len(lines) <= _MAX_LISTED:
    return lines
  return lines[:_MAX_LISTED] + [f"... and {len(lines) - _MAX_LISTED} more"]


def _jsonable(obj: Any, what: str) -> Any:
  """`obj` with numpy/jax scalars and arrays as Python values; CheckpointError if not JSON."""
  def default(x):
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
      return np.asarray(x).tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")
  try:
    return json.loads(json.dumps(obj, default=default, allow_nan=True))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"cannot write {what} as JSON: {e}") from None
