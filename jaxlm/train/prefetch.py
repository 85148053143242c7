"""Preparing the next batches while the current step runs: a small background-thread prefetch.

Why: a jitted step returns as soon as it is dispatched; if the loop then builds the next batch on
the host (numpy padding and bucketing) and transfers it, a GPU/TPU waits for that work every step.
A thread that builds and transfers the next `depth` batches ahead hides it behind the step. XLA
releases the GIL while it computes, so this helps on a CPU too, by whatever host time a batch
costs.

Resume semantics stay exact: the thread builds batches by random access (`batches.batch(epoch,
index)`, which does not move the iterator), and the consumer advances the iterator's position
(`batches.advance()`) only as it takes each batch. The position, and the checkpoint that stores
it, always names the batches trained on, never the ones merely prepared.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

_DONE = object()


class EpochPrefetch:
  """Iterates the remaining batches of `epoch` as `(host_batch, device_batch)` pairs.

  Yields what `batches.iter_epoch(epoch)` would, in the same order and with the same effect on
  the position, each paired with `transfer(batch)` (e.g. `Devices.shard_batch`). With
  `depth` > 0 a daemon thread prepares up to `depth` pairs ahead; with 0 everything happens in the
  caller's thread, as without a prefetcher. An error in the thread is raised in the consumer at the
  batch it would have produced. `close()` (also on `with` exit) stops the thread and waits for it;
  call it when leaving the loop early (max_steps, a signal, an error).
  """

  def __init__(self, batches, epoch: int, transfer: Callable[[dict], Any], depth: int = 2):
    self.batches, self.epoch, self.transfer = batches, int(epoch), transfer
    self.depth = max(int(depth), 0)
    # Where `iter_epoch(epoch)` starts: the saved position if it lies in this epoch, else batch 0.
    if batches.epoch != self.epoch:
      batches.epoch, batches.index = self.epoch, 0
    self._indices = range(batches.index, batches.num_batches_per_epoch)
    self._stop = threading.Event()
    self._queue: queue.Queue = queue.Queue(maxsize=max(self.depth, 1))
    self._thread = None
    if self.depth:
      self._thread = threading.Thread(target=self._produce, name="jaxlm-prefetch", daemon=True)
      self._thread.start()

  def _prepare(self, index: int):
    batch = self.batches.batch(self.epoch, index)
    return batch, self.transfer(batch)

  def _produce(self) -> None:
    try:
      for index in self._indices:
        if not self._put((index, self._prepare(index), None)):
          return
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consumer)
      self._put((None, None, e))
      return
    self._put(_DONE)

  def _put(self, item) -> bool:
    """Blocks until the consumer has room, unless it closed meanwhile; False once closed."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self) -> Iterator[tuple[dict, Any]]:
    try:
      if not self.depth:
        for index in self._indices:
          pair = self._prepare(index)
          self.batches.advance()
          yield pair
        return
      for expected in self._indices:
        item = self._queue.get()
        if item is _DONE:
          return
        index, pair, error = item
        if error is not None:
          raise error
        assert index == expected, (index, expected)
        self.batches.advance()
        yield pair
    finally:
      self.close()

  def close(self) -> None:
    """Stops the producer (it may be blocked on a full queue) and waits for it to exit."""
    self._stop.set()
    thread, self._thread = self._thread, None
    if thread is not None:
      while thread.is_alive():
        try:  # make room so a blocked put returns and sees the stop flag
          while True:
            self._queue.get_nowait()
        except queue.Empty:
          pass
        thread.join(timeout=0.05)

  def __enter__(self) -> "EpochPrefetch":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
