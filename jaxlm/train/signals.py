"""Stopping a run cleanly on SIGTERM (preemption, a scheduler or Colab stop) and SIGINT (Ctrl-C).

The handler only records the request; the loop (jaxlm/train/loop.py) sees it after the current
step, saves a checkpoint and raises `Interrupted`, which the CLI prints as one line and turns into
the conventional exit code (128 + signal number: 130 for SIGINT, 143 for SIGTERM). A second Ctrl-C
while the checkpoint is being written exits at once, as a user who presses it twice expects.
"""
from __future__ import annotations

import signal
import sys
import threading

from jaxlm.errors import JaxlmError


class Interrupted(JaxlmError):
  """A run stopped on a signal after saving a checkpoint; `exit_code` is 128 + the signal."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + int(signum)


class StopRequest:
  """Context manager: while active, SIGINT/SIGTERM set `signum` instead of killing the process.

  Outside the main thread (where Python cannot install handlers) it is inert: the run behaves
  as without it.
  """
  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
    self.signum = signum
    print(f"jaxlm: {signal.Signals(signum).name} received: finishing the current step and saving "
          "a checkpoint (Ctrl-C again to exit at once)", file=sys.stderr, flush=True)

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else ""
