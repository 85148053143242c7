"""Batching: token ids -> dicts of fixed-shape numpy arrays, deterministic and resumable.

Three iterators share one base, `ResumableBatches`, which owns the epoch/position bookkeeping:

- `ClassificationBatches`: reviews + labels, bucketed by length.
- `ReviewLMBatches`: per-review language modelling (`<bos> w1..wn <eos>`, seed 001), bucketed.
- `StreamLMBatches`: one contiguous token stream cut into `batch_size` rows and read in `bptt`
  windows (PyTorch's word_language_model), so a hidden state can be carried across batches.

Why buckets: jit compiles once per distinct input shape. Padding every batch to the longest review
wastes compute, padding each batch to its own longest row recompiles constantly; a handful of bucket
lengths (64, 128, 256, ...) bounds both. A last partial batch of a bucket is filled up with filler
rows whose weight is 0, so shapes never change and no example is dropped.

Why deterministic and resumable: an epoch's order is a pure function of (seed, epoch), so the state
`{epoch, index}` (JSON, stored in the checkpoint's `meta`) is enough to continue a run mid-epoch
with exactly the batches an uninterrupted run would have seen.

Batch layouts (docs/ARCHITECTURE.md):
- classification: `tokens` int32 [B,T], `lengths` int32 [B] (>= 1), `labels` int32 [B],
  `weights` float32 [B] (0 for filler rows);
- LM: `inputs`, `targets` int32 [B,T], `weights` float32 [B,T] (0 on padding), `lengths` int32 [B].
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np

from jaxlm.errors import CheckpointError, ConfigError, DataError

DEFAULT_BUCKETS = (64, 128, 256, 512)


# ----------------------------------------------------------------------------------------------
# Shared resumable iteration
# ----------------------------------------------------------------------------------------------


class ResumableBatches:
  """Epoch-structured batch iterator whose position is `(epoch, index)`.

  Subclasses say how many batches an epoch has (the same for every epoch), what an epoch's plan
  is (`_plan(epoch)`, a pure function of seed and epoch) and how to build batch `index` of a plan.
  The position names the *next* batch: it advances before a batch is handed out, so
  `get_state()` taken after training on a batch resumes just after it.

  Use either `for batch in it.iter_epoch(epoch)` in an epoch loop, or `next(it)`, which runs on
  across epochs forever.
  """

  kind = "batches"

  def __init__(self, seed: int):
    self.seed = int(seed)
    self.epoch = 0
    self.index = 0
    self._cached_plan = (None, None)

  # -- to be provided by subclasses -----------------------------------------------------------

  @property
  def num_batches_per_epoch(self) -> int:
    raise NotImplementedError

  def _plan(self, epoch: int):
    raise NotImplementedError

  def _make_batch(self, plan, index: int) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def _fingerprint(self) -> dict:
    """Settings that must match for a saved state to mean the same batches."""
    return dict(num_batches_per_epoch=self.num_batches_per_epoch)

  # -- iteration ------------------------------------------------------------------------------

  def __len__(self) -> int:
    return self.num_batches_per_epoch

  def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
    """Batch `index` of `epoch`, without moving the position (random access, for tests/tools)."""
    if not 0 <= index < self.num_batches_per_epoch:
      raise IndexError(f"batch index {index} outside 0..{self.num_batches_per_epoch - 1}")
    return self._make_batch(self._epoch_plan(epoch), index)

  def epoch_batches(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Yields every batch of `epoch` from its first, without moving the position: what evaluation
    uses, so that a pass stopped early (eval_max_batches) leaves the next pass unchanged."""
    for index in range(self.num_batches_per_epoch):
      yield self.batch(int(epoch), index)

  def iter_epoch(self, epoch: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yields the remaining batches of `epoch` (default: the current one).

    If the position is inside `epoch` (e.g. after `set_state`), iteration resumes there; otherwise
    the epoch starts from its first batch. Afterwards the position is at the start of epoch + 1.
    """
    epoch = self.epoch if epoch is None else int(epoch)
    if epoch != self.epoch:
      self.epoch, self.index = epoch, 0
    while self.epoch == epoch:
      yield next(self)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_batches_per_epoch == 0:
      raise StopIteration
    batch = self.batch(self.epoch, self.index)
    self.advance()
    return batch

  def advance(self) -> None:
    """Moves the position past the next batch without building it: for a prefetcher
    (jaxlm/train/prefetch.py) that built it ahead with `batch()`, so the position, and with it
    the checkpointed state, names the batches consumed, not the ones prepared."""
    self.index += 1
    if self.index >= self.num_batches_per_epoch:
      self.epoch, self.index = self.epoch + 1, 0

  def _epoch_plan(self, epoch: int):
    cached_epoch, plan = self._cached_plan
    if cached_epoch != epoch:
      plan = self._plan(epoch)
      self._cached_plan = (epoch, plan)
    return plan

  def _rng(self, epoch: int) -> np.random.Generator:
    """The generator of one epoch: independent of how many epochs ran before (resumable)."""
    return np.random.default_rng([self.seed, epoch])

  # -- state ----------------------------------------------------------------------------------

  def get_state(self) -> dict:
    return dict(kind=self.kind, epoch=self.epoch, index=self.index, seed=self.seed,
                **self._fingerprint())

  def set_state(self, state: dict) -> None:
    """Continues from a `get_state()` dict; refuses one taken from different data or settings."""
    expected = dict(kind=self.kind, seed=self.seed, **self._fingerprint())
    mismatched = [f"{key}: saved {state.get(key)!r}, now {value!r}"
                  for key, value in expected.items() if state.get(key) != value]
    if mismatched:
      raise CheckpointError("the saved data-iterator state does not fit this data/config ("
                            + "; ".join(mismatched) + ")")
    epoch, index = int(state["epoch"]), int(state["index"])
    if epoch < 0 or not 0 <= index < max(self.num_batches_per_epoch, 1):
      raise CheckpointError(f"the saved data-iterator position epoch={epoch} index={index} is out "
                            f"of range ({self.num_batches_per_epoch} batches per epoch)")
    self.epoch, self.index = epoch, index


# ----------------------------------------------------------------------------------------------
# Bucketing (shared by classification and per-review LM)
# ----------------------------------------------------------------------------------------------


def effective_buckets(buckets: Sequence[int] | None, max_len: int | None,
                      longest: int) -> tuple[int, ...]:
  """The padded lengths actually used; the last one is the truncation length.

  Examples are cut to min(max_len, largest bucket). Buckets above `max_len` are replaced by
  `max_len` itself (with max_len=200 an example of 200 tokens is padded to 200, not 256). Without
  buckets there is one, `max_len` or else the longest example.
  """
  if not buckets:
    return (int(max_len if max_len is not None else max(longest, 1)),)
  buckets = sorted(set(int(b) for b in buckets))
  if buckets[0] < 1:
    raise ConfigError(f"config.data.buckets={tuple(buckets)} must all be >= 1")
  cap = buckets[-1] if max_len is None else min(int(max_len), buckets[-1])
  return tuple(b for b in buckets if b < cap) + (cap,)


def bucket_plan(bucket_of: np.ndarray, num_buckets: int, batch_size: int, drop_remainder: bool,
                rng: np.random.Generator | None, min_rows: int = 1) -> list[tuple[int, np.ndarray]]:
  """Groups example indices into batches of one bucket each: a list of (bucket, indices).

  Without `rng` the order is bucket by bucket, examples in their original order (eval: every
  example exactly once). With `rng` examples are shuffled within their bucket and the batches of
  all buckets are shuffled together, so an epoch mixes lengths. A bucket's last, partial batch is
  dropped with `drop_remainder`, or when it has fewer than `min_rows` examples (a batch-normalised
  head learns nothing from one row and its variance is 0; with `rng` the dropped example changes
  from epoch to epoch).
  """
  plan = []
  for bucket in range(num_buckets):
    members = np.flatnonzero(bucket_of == bucket)
    if rng is not None:
      members = rng.permutation(members)
    rest = len(members) % batch_size
    stop = len(members) - rest if drop_remainder or rest < min_rows else len(members)
    plan.extend((bucket, members[start:start + batch_size]) for start in range(0, stop, batch_size))
  if rng is not None:
    plan = [plan[i] for i in rng.permutation(len(plan))]
  return plan


def count_batches(bucket_of: np.ndarray, num_buckets: int, batch_size: int,
                  drop_remainder: bool, min_rows: int = 1) -> int:
  """How many batches `bucket_plan` makes."""
  sizes = np.bincount(bucket_of, minlength=num_buckets)
  partial = (sizes % batch_size >= max(min_rows, 1)) & (not drop_remainder)
  return int((sizes // batch_size + partial).sum())


def _check_batch_size(batch_size: int) -> int:
  if int(batch_size) < 1:
    raise ConfigError(f"config.data.batch_size must be >= 1, got {batch_size}")
  return int(batch_size)


def _check_nonempty(num_batches: int, num_examples: int, batch_size: int, what: str) -> None:
  if num_batches == 0:
    raise DataError(f"{what}: {num_examples} examples make no batch of {batch_size} "
                    "(drop_remainder=True needs at least one full batch)")


class _BucketedBatches(ResumableBatches):
  """Bucketed iteration over a list of variable-length examples (classification, review LM)."""

  def __init__(self, lengths: np.ndarray, *, batch_size: int, buckets, max_len, shuffle: bool,
               seed: int, drop_remainder: bool, what: str, min_rows: int = 1):
    super().__init__(seed)
    self.batch_size = _check_batch_size(batch_size)
    if max_len is not None and int(max_len) < 1:
      raise ConfigError(f"config.data.max_len must be >= 1, got {max_len}")
    self.shuffle = bool(shuffle)
    self.drop_remainder = bool(drop_remainder)
    self.min_rows = int(min_rows)
    self.buckets = effective_buckets(buckets, max_len, int(lengths.max(initial=1)))
    # Lengths beyond the largest bucket are truncated to it; empty examples count as length 1.
    self.lengths = np.clip(lengths, 1, self.buckets[-1]).astype(np.int32)
    self.bucket_of = np.searchsorted(np.asarray(self.buckets), self.lengths)
    self._num_batches = count_batches(self.bucket_of, len(self.buckets), self.batch_size,
                                      self.drop_remainder, self.min_rows)
    _check_nonempty(self._num_batches, len(lengths), self.batch_size, what)

  @property
  def num_batches_per_epoch(self) -> int:
    return self._num_batches

  @property
  def num_examples(self) -> int:
    return len(self.lengths)

  def _plan(self, epoch: int):
    rng = self._rng(epoch) if self.shuffle else None
    return bucket_plan(self.bucket_of, len(self.buckets), self.batch_size, self.drop_remainder, rng,
                       self.min_rows)

  def _fingerprint(self) -> dict:
    return dict(num_examples=self.num_examples, batch_size=self.batch_size,
                buckets=list(self.buckets), shuffle=self.shuffle,
                num_batches_per_epoch=self.num_batches_per_epoch)


# ----------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------


TRUNCATIONS = ("head", "tail", "head_tail")


def truncated(seq: np.ndarray, width: int, how: str) -> np.ndarray:
  """`seq` cut to at most `width` tokens: its start (`head`), its end (`tail`), or both
  (`head_tail`: the first width // 4 and the last width - width // 4)."""
  if len(seq) <= width:
    return seq
  if how == "head":
    return seq[:width]
  if how == "tail":
    return seq[len(seq) - width:]
  head = width // 4
  return np.concatenate([seq[:head], seq[len(seq) - (width - head):]])


class ClassificationBatches(_BucketedBatches):
  """Padded, bucketed (tokens, lengths, labels, weights) batches.

  Each example is truncated to `max_len` tokens (`truncate='head'` keeps the first ones,
  `'tail'` the last ones, `'head_tail'` the first quarter and the last three quarters of the
  window - where reviews state their verdict; Sun et al. 2019 found 128 + 382 of 510 tokens best
  for IMDB) and padded to the smallest bucket that holds it. An empty example
  becomes one `pad_id` token with length 1, so every length is >= 1 and an LSTM always has a
  last valid step. With `include_index=True` batches also carry `index` int32 [B]: each row's
  position in `ids` (-1 for filler rows), to write predictions back in the original order.
  """

  kind = "classification"

  def __init__(self, ids: Sequence[np.ndarray], labels, batch_size: int, *,
               buckets: Sequence[int] | None = DEFAULT_BUCKETS, max_len: int | None = None,
               pad_id: int, shuffle: bool, seed: int = 0, drop_remainder: bool = False,
               truncate: str = "head", include_index: bool = False, min_rows: int = 1):
    if pad_id is None:
      raise ConfigError("classification batches need a pad id: the tokenizer has no <pad>")
    if truncate not in TRUNCATIONS:
      raise ConfigError(f"truncate={truncate!r} is not one of {', '.join(TRUNCATIONS)}")
    labels = np.asarray(labels, dtype=np.int32).reshape(-1)
    if len(ids) != len(labels):
      raise DataError(f"classification data has {len(ids)} token sequences but {len(labels)} "
                      "labels")
    if len(ids) == 0:
      raise DataError("classification data is empty: no examples to batch")
    self.ids = list(ids)
    self.labels = labels
    self.pad_id = int(pad_id)
    self.truncate = truncate
    self.include_index = bool(include_index)
    super().__init__(np.fromiter((len(x) for x in self.ids), np.int64, len(self.ids)),
                     batch_size=batch_size, buckets=buckets, max_len=max_len, shuffle=shuffle,
                     seed=seed, drop_remainder=drop_remainder, what="classification batches",
                     min_rows=min_rows)

  def _make_batch(self, plan, index: int) -> dict[str, np.ndarray]:
    bucket, members = plan[index]
    width, size = self.buckets[bucket], self.batch_size
    tokens = np.full((size, width), self.pad_id, np.int32)
    lengths = np.ones(size, np.int32)
    labels = np.zeros(size, np.int32)
    weights = np.zeros(size, np.float32)
    for row, example in enumerate(members):
      seq = self.ids[example]
      seq = truncated(seq, width, self.truncate)
      tokens[row, :len(seq)] = seq
      lengths[row] = self.lengths[example]
    n = len(members)
    labels[:n] = self.labels[members]
    weights[:n] = 1.0
    batch = dict(tokens=tokens, lengths=lengths, labels=labels, weights=weights)
    if self.include_index:
      batch["index"] = np.full(size, -1, np.int32)
      batch["index"][:n] = members
    return batch


# ----------------------------------------------------------------------------------------------
# Language modelling, one review at a time
# ----------------------------------------------------------------------------------------------


def review_windows(seq: np.ndarray, max_len: int | None, long_text: str) -> list[np.ndarray]:
  """Cuts `<bos> w1..wn <eos>` into windows of at most `max_len` + 1 tokens.

  Consecutive windows overlap by one token, so each target is predicted exactly once: chunking
  loses no text (a window after the first starts without <bos>, which the model copes with as it
  would with a BPTT window). `long_text='truncate'` keeps only the first window instead.
  Sequences with fewer than 2 tokens give no (input, target) pair and no window.
  """
  if len(seq) < 2:
    return []
  if max_len is None or len(seq) <= max_len + 1:
    return [seq]
  starts = range(0, len(seq) - 1, max_len)
  if long_text == "truncate":
    starts = starts[:1]
  return [seq[start:start + max_len + 1] for start in starts]


class ReviewLMBatches(_BucketedBatches):
  """Per-review LM batches: inputs = seq[:-1], targets = seq[1:] with seq = <bos> ids <eos>.

  Reviews longer than `max_len` input steps are chunked into several examples (see
  `review_windows`; `long_text='truncate'` drops the rest instead). `bos_id`/`eos_id` may be None
  to leave that marker out. `lengths` counts real input steps; `weights` is 1 exactly there.
  """

  kind = "review_lm"

  def __init__(self, ids: Sequence[np.ndarray], batch_size: int, *, pad_id: int,
               bos_id: int | None, eos_id: int | None,
               buckets: Sequence[int] | None = DEFAULT_BUCKETS, max_len: int | None = None,
               shuffle: bool, seed: int = 0, drop_remainder: bool = False,
               long_text: str = "chunk"):
    if pad_id is None:
      raise ConfigError("LM batches need a pad id: the tokenizer has no <pad>")
    if long_text not in ("chunk", "truncate"):
      raise ConfigError(f"long_text={long_text!r} is not one of chunk, truncate")
    width = effective_buckets(buckets, max_len, 0)[-1] if (buckets or max_len) else None
    head = [bos_id] if bos_id is not None else []
    tail = [eos_id] if eos_id is not None else []
    self.windows = []
    for seq in ids:
      seq = np.concatenate([np.asarray(head, np.int32), np.asarray(seq, np.int32),
                            np.asarray(tail, np.int32)])
      self.windows.extend(review_windows(seq, width, long_text))
    if not self.windows:
      raise DataError(f"LM data has no text to predict: {len(ids)} reviews, none with 2+ tokens")
    self.pad_id = int(pad_id)
    self.long_text = long_text
    super().__init__(np.fromiter((len(w) - 1 for w in self.windows), np.int64, len(self.windows)),
                     batch_size=batch_size, buckets=buckets, max_len=width, shuffle=shuffle,
                     seed=seed, drop_remainder=drop_remainder, what="review LM batches")

  def target_ids(self) -> np.ndarray:
    """Every token an epoch predicts (what the weights mark), without building batches."""
    return np.concatenate([w[1:] for w in self.windows])

  def _make_batch(self, plan, index: int) -> dict[str, np.ndarray]:
    bucket, members = plan[index]
    width, size = self.buckets[bucket], self.batch_size
    inputs = np.full((size, width), self.pad_id, np.int32)
    targets = np.full((size, width), self.pad_id, np.int32)
    weights = np.zeros((size, width), np.float32)
    lengths = np.ones(size, np.int32)
    for row, example in enumerate(members):
      window = self.windows[example]
      steps = len(window) - 1
      inputs[row, :steps] = window[:-1]
      targets[row, :steps] = window[1:]
      weights[row, :steps] = 1.0
      lengths[row] = steps
    return dict(inputs=inputs, targets=targets, weights=weights, lengths=lengths)


# ----------------------------------------------------------------------------------------------
# Language modelling, one contiguous stream (BPTT)
# ----------------------------------------------------------------------------------------------


class StreamLMBatches(ResumableBatches):
  """Contiguous-stream LM batches for truncated backpropagation through time.

  All documents are concatenated, each followed by `eos_id`, and the stream is cut into
  `batch_size` contiguous rows (row r holds tokens [r*L, (r+1)*L)). Batch k holds columns
  [k*bptt, (k+1)*bptt) as inputs and the same shifted by one as targets, so row r of batch k+1
  continues row r of batch k and the LSTM state can be carried across batches.

  With `random_offset=True` each epoch starts the stream at a (seed, epoch)-determined offset in
  [0, bptt) so window boundaries differ between epochs; the row length is fixed so every epoch has
  the same number of batches. The last window is padded (`weights` 0, `pad_id`) when it is short,
  unless `drop_remainder=True` drops it. `lengths` is always `bptt` (the state after a full window
  is what carries over).
  """

  kind = "stream_lm"

  def __init__(self, ids: Sequence[np.ndarray], batch_size: int, bptt: int, *,
               eos_id: int | None, pad_id: int = 0, random_offset: bool = False, seed: int = 0,
               drop_remainder: bool = False):
    super().__init__(seed)
    self.batch_size = _check_batch_size(batch_size)
    if int(bptt) < 1:
      raise ConfigError(f"config.data.bptt must be >= 1, got {bptt}")
    self.bptt = int(bptt)
    self.pad_id = int(pad_id)
    self.random_offset = bool(random_offset)
    self.drop_remainder = bool(drop_remainder)
    self.stream = self._concatenate(ids, eos_id)
    self.max_offset = self.bptt - 1 if self.random_offset else 0
    self.row_len = (len(self.stream) - self.max_offset) // self.batch_size
    steps = max(self.row_len - 1, 0)  # (input, target) pairs per row
    self._num_batches = steps // self.bptt if self.drop_remainder else math.ceil(steps / self.bptt)
    if self._num_batches == 0:
      need = self.bptt + 1 if self.drop_remainder else 2
      raise DataError(f"stream LM data has {len(self.stream)} tokens: too few for "
                      f"{self.batch_size} rows of at least {need} tokens")

  def target_ids(self) -> np.ndarray:
    """Every token an epoch without random offset predicts: each row's tokens after its first."""
    rows = self.stream[:self.row_len * self.batch_size].reshape(self.batch_size, self.row_len)
    steps = self._num_batches * self.bptt if self.drop_remainder else self.row_len - 1
    return rows[:, 1:1 + steps].ravel()

  @staticmethod
  def _concatenate(ids: Sequence[np.ndarray], eos_id: int | None) -> np.ndarray:
    tail = np.asarray([eos_id] if eos_id is not None else [], np.int32)
    parts = []
    for seq in ids:
      parts.append(np.asarray(seq, np.int32))
      parts.append(tail)
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)

  @property
  def num_batches_per_epoch(self) -> int:
    return self._num_batches

  @property
  def num_tokens(self) -> int:
    return len(self.stream)

  def _plan(self, epoch: int) -> np.ndarray:
    """The [batch_size, row_len] matrix of this epoch (a view of the stream, no copy)."""
    offset = int(self._rng(epoch).integers(0, self.max_offset + 1)) if self.max_offset else 0
    used = self.stream[offset:offset + self.row_len * self.batch_size]
    return used.reshape(self.batch_size, self.row_len)

  def _make_batch(self, rows: np.ndarray, index: int) -> dict[str, np.ndarray]:
    start = index * self.bptt
    steps = min(self.bptt, self.row_len - 1 - start)
    inputs = np.full((self.batch_size, self.bptt), self.pad_id, np.int32)
    targets = np.full((self.batch_size, self.bptt), self.pad_id, np.int32)
    weights = np.zeros((self.batch_size, self.bptt), np.float32)
    inputs[:, :steps] = rows[:, start:start + steps]
    targets[:, :steps] = rows[:, start + 1:start + 1 + steps]
    weights[:, :steps] = 1.0
    lengths = np.full(self.batch_size, self.bptt, np.int32)
    return dict(inputs=inputs, targets=targets, weights=weights, lengths=lengths)

  def _fingerprint(self) -> dict:
    return dict(num_tokens=self.num_tokens, batch_size=self.batch_size, bptt=self.bptt,
                random_offset=self.random_offset, num_batches_per_epoch=self.num_batches_per_epoch)
