"""Atomic file writes: readers (and a resumed run) see the old file or the new one, never half.

Used for everything jaxlm writes beside its checkpoints: config.json, summary.json, graft reports,
tokenizer files.
"""
import math
import os
import pathlib
import tempfile


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to a temporary file in the same folder, fsyncs it and renames it over `path`."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def strict_json(obj):
  """`obj` with every non-finite float (NaN, inf) replaced by None: strict JSON, which
  `json.loads` in any language reads, where Python's default would write a bare `NaN`."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: strict_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict_json(v) for v in obj]
  return obj


class WorkdirLock:
  """`{workdir}/.jaxlm.lock`: one process at a time trains in a workdir.

  Created with O_EXCL and holding the owner's pid and host, so two runs on one workdir (two
  terminals, a notebook cell run twice) cannot interleave checkpoints and metrics. A lock whose
  process is gone (same host, pid not alive) is stale and taken over. `acquire` raises the
  `error` class given, with one line naming the owner.
  """

  NAME = ".jaxlm.lock"

  def __init__(self, workdir, error=RuntimeError):
    self.path = pathlib.Path(workdir) / self.NAME
    self.error = error
    self.held = False

  def acquire(self) -> "WorkdirLock":
    import json
    import socket
    self.path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        try:
          owner = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
          owner = {}
        if owner.get("host") == me["host"] and not _alive(owner.get("pid")):
          self.path.unlink(missing_ok=True)  # stale: its process is gone
          continue
        raise self.error(f"{self.path.parent} is in use by process {owner.get('pid', '?')} on "
                         f"{owner.get('host', '?')} (lock file {self.path}); wait for it to end, "
                         "or delete the lock file if that process is gone") from None
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      return self
    raise self.error(f"cannot take the lock {self.path}")

  def release(self) -> None:
    if self.held:
      self.path.unlink(missing_ok=True)
      self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _alive(pid) -> bool:
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
