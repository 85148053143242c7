"""Atomic file writes: readers (and a resumed run) see the old file or the new one, never half.

Used for everything jaxlm writes beside its checkpoints: config.json, summary.json, graft reports,
tokenizer files.
"""
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
