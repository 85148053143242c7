"""Checkpoints and run files in a workdir: the one place that builds an orbax CheckpointManager.

Layout of a workdir (see docs/ARCHITECTURE.md):

  {workdir}/checkpoints/{step}/state   {'step', 'params', 'opt_state', 'rng'} (StandardSave), and
                                       'model_state' for a model with batch statistics
  {workdir}/checkpoints/{step}/meta    JSON: data iterator state, epoch, metrics, ... (JsonSave)
  {workdir}/checkpoints/{step}/jaxlm_checksums.json   size and sha256 of every file of the step
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
(or on this process's first device), never on the device layout the checkpoint was saved from. In
a multi-host run (jaxlm/distributed.py) every process calls the same methods: orbax coordinates
each save (each process writes its shards, process 0 renames the step) and process 0 alone
writes the checksums, once the step is final, and moves damaged steps aside.

Integrity is jaxlm's: orbax 0.12 verifies nothing it reads back (zarr data carries no checksum,
so flipped bytes in a tensor file restore as garbage and a run "trains" on NaNs). Once a step is
final on disk (after orbax renamed it: for async saves at the next save, wait or `check_for_errors`)
the size and sha256 of each of its files go into `{step}/jaxlm_checksums.json`, and a restore
hashes the files of the step it reads first. A step without that file (jaxlm 0.1, or a crash
between the rename and the checksums) is read unverified. A damaged step, found by its checksums
or by orbax failing to read it, is a warning line naming the step and the file; the newest step
that loads is used instead, and a second line says which (a resumed run also moves the damaged
newer steps aside, since their step numbers would block its saves). A step asked for by number is never replaced: its damage is
the error. A save that fails (a full disk) is a CheckpointError at once, naming the path and the
free space; the earlier steps stay on disk and load.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pathlib
import re
import shutil
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxlm import distributed
from jaxlm.files import atomic_write, strict_json
from jaxlm.errors import CheckpointError, ConfigError, DamagedCheckpointError

log = logging.getLogger(__name__)
_WRITTEN_BY = "run `jaxlm pretrain` or `jaxlm finetune` with --workdir {workdir}"
_MAX_LISTED = 20  # mismatching paths listed in one error message
CHECKSUMS = "jaxlm_checksums.json"
# What orbax and tensorstore raise on a missing, truncated or garbled file (tensorstore's status
# errors are ValueErrors, JSON and UTF-8 decode errors too); anything else is a bug, not damage.
_READ_ERRORS = (OSError, ValueError, KeyError, EOFError)


class Checkpointer:
  """Saves and restores train states under `{workdir}/checkpoints`; also a context manager.

  `best_metric`/`best_mode` name the validation metric that selects the best checkpoint
  (e.g. 'accuracy', 'max'); saves whose `metrics` lack it only count as "latest" candidates.
  Saves are asynchronous by default: `save` returns once arrays are copied off the device, and
  `wait_until_finished`/`close` (or leaving the `with` block) wait for the files.
  """

  def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 2,
               keep_steps: Sequence[int] = (),
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
    # `keep_steps` (the epoch ends, `train.keep_epoch_checkpoints`) outlive the latest-N window.
    keep = [ocp.checkpoint_managers.CustomSteps(steps=sorted(set(keep_steps)))] if keep_steps else []
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=0 if read_only else 1,  # orbax warns about anything else
        create=not read_only,
        read_only=read_only,
        # The partial files of a save that failed or was killed; the workdir lock (jaxlm/files.py)
        # guarantees no other process is writing them.
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save,
        best_fn=score,  # used by `best_step`; retention is the policy below
        best_mode="max",
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(max_to_keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=score, n=1,
                                          keep_checkpoints_without_metrics=False),
            *keep,
        ]),
    )
    self.read_only, self._async = read_only, async_save
    _quiet_orbax_echoes()
    self._unsummed: list[int] = []  # saved steps whose checksums are not written yet
    self._manager = _Manager(self.directory, options=options, handler_registry=_handler_registry())

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
    ranks this step for the best checkpoint. A failed write, this one's or the previous
    asynchronous save's, raises CheckpointError naming the path and the free space.
    """
    step = int(step)
    self._finish_saves()  # the previous save's failure is this one's error, before writing more
    if force and step in self.all_steps():
      raise CheckpointError(f"checkpoint step {step} already exists in {self.directory}")
    best = None
    value = (metrics or {}).get(self.best_metric) if self.best_metric else None
    if value is not None and math.isfinite(value := float(value)):  # NaN does not rank a step
      best = {"best_metric": self.best_metric, "best_value": value,
              "best_score": value if self.best_mode == "max" else -value}
    args = ocp.args.Composite(state=ocp.args.StandardSave(_to_storable(state)),
                              meta=ocp.args.JsonSave(_jsonable(meta or {}, "meta")))
    try:
      saved = self._manager.save(step, args=args, metrics=best, force=force)
    except Exception as e:  # pylint: disable=broad-except
      if not _is_write_error(e):
        raise
      raise self._save_failed(step, e) from None
    if saved:
      self._unsummed.append(step)
      if not self._async:
        self._finish_saves()
    return saved

  def check_for_errors(self) -> None:
    """Raises the failure of a finished background save now; cheap enough to call every step.

    Without it an asynchronous save that failed (a full disk) would surface only at the next
    save, one more checkpoint interval of training that cannot be kept. A save still in
    progress is not waited for.
    """
    if self._unsummed and not self._manager.is_saving_in_progress():
      self._finish_saves()

  def restore(self, template: Any, step: int | None = None, *,
              which: str = "latest") -> tuple[Any, dict]:
    """Restores (state, meta) of `step` (default: the `which` = 'latest' or 'best' step).

    `template` is the freshly initialised state, real or abstract (`jax.eval_shape`): it fixes
    the tree structure (optax namedtuples, masked/empty states) and where each array lands (its
    shardings; the default device for leaves without one). A checkpoint that does not fit it
    raises CheckpointError listing every mismatching path, instead of being cast or reshaped.
    Without `step`, a damaged step is skipped for the next newest that loads (see the module
    docstring); a damaged `step` raises DamagedCheckpointError naming the file.
    """
    return self.restore_any([template], step, which=which)

  def restore_any(self, templates: Iterable[Any], step: int | None = None, *,
                  which: str = "latest") -> tuple[Any, dict]:
    """`restore` with alternative templates, e.g. one optimizer state per training phase.

    For each candidate step the first template that fits its stored tree is used; templates
    are built lazily, only as far as needed, and each at most once. A step that none fits
    raises the first template's mismatch error: a model that does not fit is a config to fix,
    not damage to route around with an older step.
    """
    templates = _Memo(templates)

    def read(step):
      stored = self._stored_state(step)
      problems = None
      for template in templates:
        target = jax.tree.map(_abstract_storable, template)
        mismatches = _mismatches(target, stored)
        if not mismatches:
          break
        problems = problems or mismatches
      else:
        raise CheckpointError(
            f"checkpoint {self.directory / str(step)} does not fit the model "
            f"({len(problems or [])} mismatching paths):\n  " + "\n  ".join(_clip(problems or [])))
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
      state = jax.tree.map(_rewrap_key, template, restored["state"])
      return state, restored["meta"] or {}

    return self._load(step, which, read, resuming=True)[1]

  def restore_params(self, step: int | None = None, *, which: str = "latest") -> Any:
    """Reads only `state/params` of a step, without knowing the optimizer that wrote it.

    The target tree comes from the checkpoint's own metadata; orbax's partial restore
    (`PyTreeRestore(partial_restore=True)`) then skips opt_state, step and rng. Arrays land on
    the default device. Damaged steps are handled as in `restore`.
    """
    return self._restore_parts(step, which, ("params",))["params"]

  def restore_variables(self, step: int | None = None, *,
                        which: str = "latest") -> tuple[Any, dict]:
    """(params, model_state) of a step: what applying the trained model needs. `model_state` is
    the batch statistics of a batch-normalised head, `{}` for a checkpoint without any."""
    parts = self._restore_parts(step, which, ("params", "model_state"))
    return parts["params"], parts.get("model_state", {})

  def _restore_parts(self, step, which, keys: tuple[str, ...]) -> dict:
    """The `keys` of `state` (those present; `params` is required) as a partial restore."""
    def read(step):
      stored = self._stored_state(step)
      if "params" not in stored:
        raise CheckpointError(f"checkpoint {self.directory / str(step)} has no 'params' "
                              f"(found: {sorted(stored)})")
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = {key: jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), stored[key])
          for key in keys if key in stored}
      restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)))
      return restored["state"], stored

    step, (parts, stored) = self._load(step, which, read)
    log.info("restored %s (%d arrays) from %s; not loaded: %s", ", ".join(parts),
             len(jax.tree.leaves(parts)), self.directory / str(step),
             ", ".join(sorted(k for k in stored if k not in parts)))
    return dict(parts)

  def params_metadata(self, step: int | None = None, *,
                      which: str = "latest") -> tuple[int, Any]:
    """(step, its `state/params` as ShapeDtypeStructs) from the step's metadata: no array is read
    (`jaxlm inspect`). Steps are chosen, verified and skipped when damaged as in `restore`."""
    def read(step):
      stored = self._stored_state(step)
      if "params" not in stored:
        raise CheckpointError(f"checkpoint {self.directory / str(step)} has no 'params' "
                              f"(found: {sorted(stored)})")
      return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored["params"])

    return self._load(step, which, read)

  def wait_until_finished(self):
    """Waits for an asynchronous save and writes its checksums; raises its failure."""
    self._finish_saves()

  def close(self):
    try:
      self._finish_saves()
    finally:
      self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, exc_type, *exc):
    if exc_type is None:
      self.close()
      return
    try:  # already failing: that error is the one to see, not a second one from closing
      self.close()
    except Exception:  # pylint: disable=broad-except
      log.debug("closing %s after an error", self.directory, exc_info=True)

  # --- reading, with damaged steps skipped --------------------------------------------------

  def _load(self, step: int | None, which: str, read: Callable[[int], Any], *,
            resuming: bool = False) -> tuple[int, Any]:
    """(step, read(step)) of `step`, or of the first of the `which` candidates that loads."""
    if which not in ("latest", "best"):
      raise ConfigError(f"which checkpoint: expected 'latest' or 'best', got {which!r}")
    self._finish_saves()  # a step saved asynchronously is readable (and summed) only now
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoints in {self.directory}: "
                            + _WRITTEN_BY.format(workdir=self.workdir))
    if step is not None:
      if int(step) not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available steps: {steps}")
      return int(step), self._read(int(step), read)  # asked for by number: damage is the error
    damaged = []
    for candidate in self._candidates(steps, which):
      try:
        out = self._read(candidate, read)
      except DamagedCheckpointError as e:
        log.warning("%s", e)
        damaged.append(e)
        continue
      if damaged:
        log.warning("using checkpoint step %d in %s instead: the newest that loads",
                    candidate, self.directory)
        if resuming and not self.read_only:
          self._set_aside([e.step for e in damaged if e.step > candidate])
      return candidate, out
    raise CheckpointError(f"no checkpoint in {self.directory} loads (tried steps "
                          f"{', '.join(str(e.step) for e in damaged)}): "
                          + "; ".join(f"step {e.step}: {e.detail}" for e in damaged))

  def _candidates(self, steps: list[int], which: str) -> list[int]:
    newest_first = sorted(steps, reverse=True)
    if which == "latest":
      return newest_first
    best = self.best_step()
    if best is None:
      log.warning("no checkpoint in %s carries a best metric; using the latest, step %d",
                  self.directory, newest_first[0])
      return newest_first
    return [best] + [s for s in newest_first if s != best]

  def _read(self, step: int, read: Callable[[int], Any]) -> Any:
    """read(step) after verifying the step's checksums; orbax's read errors become damage."""
    self._verify(step)
    try:
      return read(step)
    except _READ_ERRORS as e:
      file = _file_in_error(e, self.directory / str(step))
      raise self._damaged(step, f"{file + ' ' if file else ''}cannot be read "
                                f"({type(e).__name__}: {_first_line(e)})") from None

  def _verify(self, step: int) -> None:
    """Compares the step's files with `{step}/jaxlm_checksums.json`, when the step has one."""
    stepdir = self.directory / str(step)
    listing = stepdir / CHECKSUMS
    if not listing.exists():
      # Saved by jaxlm 0.1 (or a crash before the checksums): unverified. Only this file's loss
      # would go unnoticed by orbax (it reads the tree from the data instead, as a mismatch).
      if (stepdir / "state").is_dir() and not (stepdir / "state" / "_METADATA").exists():
        raise self._damaged(step, "state/_METADATA is missing")
      return
    try:
      files = json.loads(listing.read_text(encoding="utf-8"))["files"]
      expected = {rel: (int(v["size"]), str(v["sha256"])) for rel, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise self._damaged(step, f"{CHECKSUMS} cannot be read ({type(e).__name__}: "
                                f"{_first_line(e)})") from None
    problems = []
    for rel, (size, digest) in sorted(expected.items()):
      path = stepdir / rel
      try:
        actual = path.stat().st_size
      except FileNotFoundError:
        problems.append(f"{rel} is missing")
        continue
      if actual != size:
        problems.append(f"{rel} is {'truncated' if actual < size else 'longer than saved'} "
                        f"({actual} bytes, {size} when saved)")
      elif _sha256(path) != digest:
        problems.append(f"{rel} does not match its sha256 from the save (changed on disk)")
    if problems:
      more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
      raise self._damaged(step, "; ".join(problems[:3]) + more)

  def _damaged(self, step: int, detail: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(f"checkpoint step {step} in {self.directory} is damaged: "
                                  f"{detail}", step=step, detail=detail)

  def _set_aside(self, steps: list[int]) -> None:
    """Renames damaged steps out of orbax's sight (`{step}.damaged-TIME`), kept for inspection:
    a run resumed from an earlier step saves those step numbers again."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # Every process of a multi-host run found the same damage; process 0 moves the steps.
    distributed.once(self._move_aside, steps, stamp)
    self._manager.reload()

  def _move_aside(self, steps: list[int], stamp: str) -> None:
    for step in steps:
      source = self.directory / str(step)
      target = self.directory / f"{step}.damaged-{stamp}"
      try:
        source.rename(target)
      except OSError as e:
        raise CheckpointError(f"cannot move the damaged checkpoint {source} aside ({e.strerror}); "
                              "move or delete it, then rerun") from None
      log.warning("moved the damaged checkpoint step %d to %s; delete it when no longer needed",
                  step, target)

  def model_state_metadata(self, step: int) -> dict:
    """The `model_state` collections (batch statistics) saved at `step` as ShapeDtypeStructs,
    read from orbax metadata without loading arrays; {} for a model without any."""
    import jax
    stored = self._stored_state(step)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                        dict(stored.get("model_state") or {}))

  def _stored_state(self, step: int) -> Any:
    """The saved tree of `state` at `step` (ArrayMetadata leaves: shape, dtype)."""
    try:
      metadata = self._manager.item_metadata(step)["state"]
    except _READ_ERRORS as e:
      raise self._damaged(step, f"state/_METADATA cannot be read ({type(e).__name__}: "
                                f"{_first_line(e)})") from None
    if metadata is None:
      raise self._damaged(step, "state/_METADATA is missing")
    return getattr(metadata, "tree", metadata)

  # --- saving: completion, checksums, failures ----------------------------------------------

  def _finish_saves(self) -> None:
    """Waits for orbax to finish (rename) the saved steps, then writes their checksums."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      steps, self._unsummed = self._unsummed, []
      if not _is_write_error(e):
        raise
      raise self._save_failed(steps[-1] if steps else None, e) from None
    steps, self._unsummed = self._unsummed, []
    # On process 0 the wait above includes orbax's coordinated finish of a multi-host save (every
    # process wrote its shards, then process 0 renamed the step): only it sums the final files.
    for step in steps if distributed.is_primary() else ():
      try:
        self._write_checksums(step)
      except OSError as e:
        raise self._save_failed(step, e) from None

  def _write_checksums(self, step: int) -> None:
    stepdir = self.directory / str(step)
    if not stepdir.is_dir():  # already removed by the retention policy
      return
    files = {}
    for path in sorted(stepdir.rglob("*")):
      rel = path.relative_to(stepdir).as_posix()
      if path.is_file() and rel != CHECKSUMS and not path.name.startswith(f".{CHECKSUMS}."):
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    text = json.dumps({"algorithm": "sha256", "files": files}, indent=1, sort_keys=True) + "\n"
    atomic_write(stepdir / CHECKSUMS, text.encode("utf-8"))

  def _save_failed(self, step: int | None, error: BaseException) -> CheckpointError:
    """The one-line error of a failed save (free space as the save met it), after removing its
    partial files (they hold space on what is usually a full disk; what other threads still
    write goes when the next writable Checkpointer opens) and re-reading the steps on disk."""
    try:
      free = _human_bytes(shutil.disk_usage(self.directory).free) + " free"
    except OSError:
      free = "free space unknown"
    if step is not None:
      for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
        shutil.rmtree(partial, ignore_errors=True)
    try:
      self._manager.reload()  # orbax already dropped the steps this save was to replace
      intact = self.all_steps()
    except Exception:  # pylint: disable=broad-except
      intact = []
    path = self.directory / str(step) if step is not None else self.directory
    kept = (f"steps {', '.join(map(str, intact))} are intact; a rerun resumes from step "
            f"{intact[-1]}" if intact else "no earlier checkpoint exists")
    return CheckpointError(f"cannot write checkpoint {path}: {_os_reason(error)} ({free} on "
                           f"{self.directory}); training stopped, {kept}")


class _Manager(ocp.CheckpointManager):
  """orbax's manager, except that a step whose best-metric file is damaged is merely unranked.

  orbax reads every step's `metrics/metrics` when it opens a directory; one garbled file would
  otherwise make every command on the workdir fail, whichever step it wants.
  """

  def metrics(self, step: int):
    try:
      return super().metrics(step)
    except _READ_ERRORS as e:
      log.warning("checkpoint step %d in %s: metrics/metrics cannot be read (%s: %s); the step "
                  "is not ranked for the best checkpoint", step, self.directory,
                  type(e).__name__, _first_line(e))
      return None


class _Memo:
  """Iterates an iterable any number of times, drawing each item from it only once, on demand."""

  def __init__(self, items: Iterable[Any]):
    self._items, self._seen = iter(items), []

  def __iter__(self):
    i = 0
    while True:
      if i == len(self._seen):
        try:
          self._seen.append(next(self._items))
        except StopIteration:
          return
      yield self._seen[i]
      i += 1


def restore_params(workdir: str | os.PathLike, step: int | None = None,
                   which: str = "latest") -> Any:
  """The params of a run's checkpoint (latest, best or `step`), e.g. an LM to graft."""
  with Checkpointer(workdir, read_only=True) as checkpointer:
    return checkpointer.restore_params(step, which=which)


def restore_variables(workdir: str | os.PathLike, step: int | None = None,
                      which: str = "latest") -> tuple[Any, dict]:
  """(params, model_state) of a run's checkpoint: the trained model to evaluate or apply."""
  with Checkpointer(workdir, read_only=True) as checkpointer:
    return checkpointer.restore_variables(step, which=which)


def write_json_atomic(path: str | os.PathLike, obj: Any):
  """Writes JSON so readers see the old file or the new one, never half of one."""
  text = json.dumps(_jsonable(obj, str(path)), indent=2) + "\n"
  atomic_write(path, text.encode("utf-8"))


def save_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict):
  """Writes `{workdir}/config.json`, the run's resolved config (tuples become lists)."""
  write_json_atomic(pathlib.Path(workdir) / "config.json", json.loads(config.to_json_best_effort()))


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """Reads `{workdir}/config.json` back, so evaluate/predict rebuild the run's model.

  The model block gets the defaults of fields added since the run was written (the model's
  family knows them), so an older workdir builds, resumes and grafts as it did.
  """
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise CheckpointError(f"{path} does not exist: " + _WRITTEN_BY.format(workdir=workdir))
  try:
    with open(path) as f:
      config = ml_collections.ConfigDict(json.load(f))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}): "
                          f"{e.msg}") from None
  if "model" in config and config.model.get("name") is not None:
    from jaxlm import models
    try:
      family = models.family_of(config.model.name)
    except ConfigError:  # an unknown model name: validate() names it when the config is used
      return config
    config.model = family.complete(config.model)
  return config


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
  sharding = (getattr(x, "sharding", None)
              or jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
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
    # Non-finite floats become null: summaries and meta stay strict JSON (jaxlm/files.py).
    return strict_json(json.loads(json.dumps(obj, default=default, allow_nan=True)))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"cannot write {what} as JSON: {e}") from None


def _sha256(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _first_line(error: BaseException, limit: int = 200) -> str:
  """An exception's message, one line, without tensorstore's long spec suffix."""
  text = str(error).split(" [tensorstore_spec=")[0]
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _file_in_error(error: BaseException, stepdir: pathlib.Path) -> str | None:
  """The step's file an orbax/tensorstore read error names (relative to the step), if any."""
  paths = [getattr(error, "filename", None) or ""]
  paths += re.findall(r'(?:local file|File) "?(/[^"\s]+?)"?(?:[:\s]|$)', str(error))
  for path in reversed(paths):
    try:
      rel = pathlib.Path(path).relative_to(stepdir).as_posix()
    except ValueError:
      continue
    if rel not in (".", "state", "meta") and not path.endswith("/"):
      return rel
  return None


def _chain(error: BaseException):
  """The error and its causes, contexts and (exception group) members."""
  seen, todo = set(), [error]
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def _is_write_error(error: BaseException) -> bool:
  """Whether a save failed for the file system (full disk, permissions, I/O), not for a bug.

  Python raises OSError; tensorstore a ValueError whose message carries the OS error code."""
  return any(isinstance(e, OSError) or "os_error_code=" in str(e) or
             str(e).startswith("RESOURCE_EXHAUSTED") for e in _chain(error))


def _os_reason(error: BaseException) -> str:
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno:
      return e.strerror or os.strerror(e.errno)
  for e in _chain(error):
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code:
      return os.strerror(int(code.group(1)))
  return f"{type(error).__name__}: {_first_line(error)}"


def _human_bytes(n: float) -> str:
  for unit in ("bytes", "KB", "MB", "GB", "TB"):
    if n < 1024 or unit == "TB":
      return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
    n /= 1024


_quieted = False


def _quiet_orbax_echoes() -> None:
  """Silences orbax's and tensorstore's echoes of a failed read or write, which jaxlm reports
  itself, in one line (the CLI's contract).

  orbax logs a failed background write at ERROR with a traceback from each of its threads; and
  when one tensorstore operation fails, its abandoned siblings fail later, in other threads, as
  "Future exception was never retrieved" (asyncio's logger) and "Event loop is closed" or
  tensorstore status errors (unraisable exceptions): dozens of tracebacks restating one error.
  Only those are dropped; installed once, by the first Checkpointer.
  """
  global _quieted
  if _quieted:
    return
  _quieted = True

  def orbax_echo(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    text = record.getMessage()
    io_failure = (error is not None and (_is_write_error(error) or _is_status_error(error))) or (
        "os_error_code=" in text or "RESOURCE_EXHAUSTED" in text)
    return not (io_failure and f"{os.sep}orbax{os.sep}" in record.pathname)

  logging.getLogger("absl").addFilter(orbax_echo)
  logging.getLogger("asyncio").addFilter(
      lambda record: "exception was never retrieved" not in record.getMessage())
  previous = sys.unraisablehook

  def hook(unraisable):
    e = unraisable.exc_value
    if not ((isinstance(e, RuntimeError) and "Event loop is closed" in str(e))
            or _is_status_error(e)):
      previous(unraisable)

  sys.unraisablehook = hook


def _is_status_error(error: BaseException | None) -> bool:
  """A tensorstore error: a ValueError whose message starts with an absl status code."""
  return isinstance(error, ValueError) and re.match(r"[A-Z][A-Z_]+: ", str(error)) is not None
