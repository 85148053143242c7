"""Experiment tracking: the metrics rows also written as TensorBoard event files.

`metrics.jsonl` stays the record a run reads back (resume, plots, summaries); TensorBoard is a view
of the same scalars for people who compare runs in its UI:

    tensorboard --logdir runs/      # every workdir's tensorboard/ folder is one run

Written with tensorboardX (the `tensorboard` extra: `pip install 'jaxlm[tensorboard]'`), which needs
neither TensorFlow nor torch. Without it, or with `config.train.tensorboard=False`, nothing is
written and the run is otherwise the same. Only process 0 of a multi-host run writes.

A resumed run opens its writer with `purge_step` = the checkpoint's step + 1: TensorBoard then hides
the points an interrupted run logged after its last checkpoint, which the resumed run logs again,
just as `MetricsWriter.rewind` drops them from metrics.jsonl.
"""
from __future__ import annotations

import logging
import math
import os
import pathlib
from typing import Mapping

from jaxlm import distributed

log = logging.getLogger(__name__)

DIRNAME = "tensorboard"
# Keys of a metrics row that are not scalars to chart: where and what the row is.
_NOT_SCALARS = frozenset({"step", "epoch", "split", "count"})


class TensorBoardWriter:
  """Writes metrics rows (`{"step", "split", <scalar>...}`) as `{split}/{key}` scalars.

  `TensorBoardWriter.open(workdir, ...)` gives a writer that is off (`enabled` False, every method a
  no-op) when tracking is turned off, tensorboardX is not installed, or this is not process 0.
  """

  def __init__(self, summary_writer=None, logdir: pathlib.Path | None = None):
    self._writer = summary_writer
    self.logdir = logdir

  @classmethod
  def open(cls, workdir: str | os.PathLike, *, enabled: bool = True,
           purge_step: int | None = None) -> "TensorBoardWriter":
    if not enabled or not distributed.is_primary():
      return cls()
    try:
      from tensorboardX import SummaryWriter
    except ImportError:
      log.info("TensorBoard logging is off: tensorboardX is not installed "
               "(pip install 'jaxlm[tensorboard]')")
      return cls()
    logdir = pathlib.Path(workdir) / DIRNAME
    # tensorboardX names a file by the second it was opened: the start step in the name keeps a
    # run resumed within that second from overwriting the previous leg's file, in reading order.
    suffix = f".from{purge_step or 0:09d}"
    # flush_secs: a killed run loses at most this much of its view (checkpoints also flush).
    writer = SummaryWriter(str(logdir), purge_step=purge_step, flush_secs=20, filename_suffix=suffix)
    return cls(writer, logdir)

  @property
  def enabled(self) -> bool:
    return self._writer is not None

  def write(self, record: Mapping) -> None:
    if self._writer is None or "step" not in record:
      return
    step, split = int(record["step"]), record.get("split", "train")
    for key, value in record.items():
      if (key not in _NOT_SCALARS and isinstance(value, (int, float))
          and not isinstance(value, bool) and math.isfinite(value)):
        self._writer.add_scalar(f"{split}/{key}", float(value), step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
