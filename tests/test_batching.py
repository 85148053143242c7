"""Batching: shapes, buckets, padding masks, determinism, resumption, stream continuity,
eval coverage."""
import json

import numpy as np
import pytest

from jaxlm.batching import (ClassificationBatches, ReviewLMBatches, StreamLMBatches,
                            effective_buckets, review_windows)
from jaxlm.errors import CheckpointError, ConfigError, DataError

PAD, BOS, EOS = 1, 2, 3


def _docs(n=103, seed=0, low=0, high=300):
  """Documents whose tokens encode (document, position) so rows can be traced back."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(low, high, n)
  return [np.arange(length, dtype=np.int32) + 1000 * (i + 1) for i, length in enumerate(lengths)]


def _clf(docs=None, **kw):
  docs = _docs() if docs is None else docs
  labels = np.arange(len(docs)) % 2
  args = dict(batch_size=8, buckets=(64, 128, 256), pad_id=PAD, shuffle=True, seed=0)
  args.update(kw)
  return ClassificationBatches(docs, labels, **args)


def _epoch(it, epoch=0):
  return list(it.iter_epoch(epoch))


def _same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# -- classification ---------------------------------------------------------------------------


def test_classification_shapes_dtypes_and_few_distinct_shapes():
  it = _clf()
  batches = _epoch(it)
  assert len(batches) == it.num_batches_per_epoch == len(it)
  shapes = {b["tokens"].shape for b in batches}
  assert shapes <= {(8, 64), (8, 128), (8, 256)}
  for b in batches:
    assert b["tokens"].dtype == np.int32 and b["lengths"].dtype == np.int32
    assert b["labels"].dtype == np.int32 and b["weights"].dtype == np.float32
    assert b["lengths"].shape == b["labels"].shape == b["weights"].shape == (8,)
    assert (b["lengths"] >= 1).all() and (b["lengths"] <= b["tokens"].shape[1]).all()
    # Each real row sits in the smallest bucket that holds it.
    real = b["weights"] > 0
    width = b["tokens"].shape[1]
    smaller = {64: 0, 128: 64, 256: 128}[width]
    assert (b["lengths"][real] > smaller).all()


def test_classification_padding_and_filler_rows_are_masked():
  docs = [np.arange(1, n + 1, dtype=np.int32) + 10 for n in (5, 3, 70, 0, 2)]
  it = _clf(docs, batch_size=4, shuffle=False)
  small, large = _epoch(it)
  assert small["tokens"].shape == (4, 64) and large["tokens"].shape == (4, 128)
  np.testing.assert_array_equal(small["lengths"], [5, 3, 1, 2])
  np.testing.assert_array_equal(small["weights"], [1, 1, 1, 1])
  assert (small["tokens"][0, 5:] == PAD).all() and (small["tokens"][0, :5] == docs[0]).all()
  # The empty review is one pad token of length 1 (documented), still a weighted example.
  assert (small["tokens"][2] == PAD).all()
  # The 70-token review is alone in its bucket: three filler rows with weight 0, length 1.
  np.testing.assert_array_equal(large["weights"], [1, 0, 0, 0])
  np.testing.assert_array_equal(large["lengths"], [70, 1, 1, 1])
  assert (large["tokens"][1:] == PAD).all()


def test_classification_truncation_head_tail_and_max_len_caps_buckets():
  docs = [np.arange(300, dtype=np.int32) + 10]
  assert effective_buckets((64, 128, 256), 100, 300) == (64, 100)
  assert effective_buckets((64, 128, 256), 1000, 300) == (64, 128, 256)
  assert effective_buckets(None, None, 300) == (300,)
  head = _epoch(_clf(docs, batch_size=1, max_len=100))[0]
  assert head["tokens"].shape == (1, 100) and head["lengths"][0] == 100
  np.testing.assert_array_equal(head["tokens"][0], docs[0][:100])
  tail = _epoch(_clf(docs, batch_size=1, max_len=100, truncate="tail"))[0]
  np.testing.assert_array_equal(tail["tokens"][0], docs[0][-100:])
  # Without max_len the largest bucket truncates.
  capped = _epoch(_clf(docs, batch_size=1))[0]
  assert capped["tokens"].shape == (1, 256) and capped["lengths"][0] == 256


def test_classification_eval_covers_every_example_exactly_once():
  docs = _docs()
  it = _clf(docs, shuffle=False, include_index=True)
  batches = _epoch(it)
  assert sum(b["weights"].sum() for b in batches) == len(docs)
  seen = np.concatenate([b["index"][b["weights"] > 0] for b in batches])
  np.testing.assert_array_equal(np.sort(seen), np.arange(len(docs)))
  for b in batches:
    for row in np.flatnonzero(b["weights"]):
      example = b["index"][row]
      assert b["labels"][row] == example % 2
      first = docs[example][0] if len(docs[example]) else PAD
      assert b["tokens"][row, 0] == first
  assert (np.concatenate([b["index"][b["weights"] == 0] for b in batches]) == -1).all()


def test_classification_shuffle_deterministic_per_seed_and_epoch():
  a, b = _clf(seed=3), _clf(seed=3)
  _same(_epoch(a, 0), _epoch(b, 0))
  first = [x["tokens"] for x in _epoch(_clf(seed=3), 0)]
  second = [x["tokens"] for x in _epoch(_clf(seed=3), 1)]
  other_seed = [x["tokens"] for x in _epoch(_clf(seed=4), 0)]
  assert any(not np.array_equal(x, y) or x.shape != y.shape for x, y in zip(first, second))
  assert any(not np.array_equal(x, y) or x.shape != y.shape for x, y in zip(first, other_seed))
  # Shuffled epochs still see every example once.
  it = _clf(include_index=True)
  seen = np.concatenate([x["index"][x["weights"] > 0] for x in _epoch(it, 5)])
  np.testing.assert_array_equal(np.sort(seen), np.arange(103))


def test_classification_drop_remainder():
  it = _clf(drop_remainder=True)
  batches = _epoch(it)
  assert all((b["weights"] == 1).all() for b in batches)
  with pytest.raises(DataError):
    _clf(_docs(3), drop_remainder=True)


def test_min_rows_drops_a_lone_remainder_row_and_a_different_one_each_epoch():
  """Buckets of 9 examples with batch size 8 leave one-row batches; `min_rows=2` (a
  batch-normalised head's training batches) drops them, and a shuffled epoch drops another row."""
  docs = [np.arange(n, dtype=np.int32) + 1000 * (i + 1) for i, n in enumerate([10] * 9 + [100] * 9)]
  every = _clf(docs, include_index=True)
  assert len(every) == 4 and min(b["weights"].sum() for b in _epoch(every)) == 1
  it = _clf(docs, include_index=True, min_rows=2)
  assert len(it) == 2 and len(_epoch(it)) == 2
  dropped = [set(range(18)) - set(np.concatenate([b["index"][b["weights"] > 0] for b in _epoch(it, e)]))
             for e in range(4)]
  assert all(len(d) == 2 for d in dropped) and len({frozenset(d) for d in dropped}) > 1
  assert len(_clf(docs, include_index=True, min_rows=2, shuffle=False)) == 2


# -- resumption -------------------------------------------------------------------------------


def _resume_equals_uninterrupted(make, stop_after):
  full = make()
  epoch0, epoch1 = _epoch(full, 0), _epoch(full, 1)

  first = make()
  gen = first.iter_epoch(0)
  seen = [next(gen) for _ in range(stop_after)]
  state = json.loads(json.dumps(first.get_state()))  # survives the checkpoint's JSON
  assert state["epoch"] == 0 and state["index"] == stop_after

  resumed = make()
  resumed.set_state(state)
  rest = _epoch(resumed, 0)
  _same(seen + rest, epoch0)
  assert resumed.get_state()["epoch"] == 1 and resumed.get_state()["index"] == 0
  _same(_epoch(resumed, 1), epoch1)


@pytest.mark.parametrize("make", [
    lambda: _clf(),
    lambda: ReviewLMBatches(_docs(), 8, pad_id=PAD, bos_id=BOS, eos_id=EOS, max_len=128,
                            buckets=(32, 64, 128), shuffle=True, seed=1),
    lambda: StreamLMBatches(_docs(), 4, 16, eos_id=EOS, random_offset=True, seed=2),
], ids=["classification", "review_lm", "stream_lm"])
def test_resume_mid_epoch_equals_uninterrupted_run(make):
  _resume_equals_uninterrupted(make, stop_after=3)


def test_next_runs_across_epochs_and_set_state_rejects_other_data():
  it = _clf()
  n = it.num_batches_per_epoch
  for _ in range(n + 2):
    next(it)
  assert it.get_state()["epoch"] == 1 and it.get_state()["index"] == 2
  state = it.get_state()
  with pytest.raises(CheckpointError, match="seed"):
    _clf(seed=9).set_state(state)
  with pytest.raises(CheckpointError, match="num_examples"):
    _clf(_docs(50)).set_state(state)
  with pytest.raises(CheckpointError, match="out of range"):
    _clf().set_state(dict(state, index=10_000))


# -- per-review language modelling ------------------------------------------------------------


def test_review_windows_chunk_without_losing_targets():
  seq = np.arange(10)
  windows = review_windows(seq, 4, "chunk")
  assert [w.tolist() for w in windows] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
  assert np.concatenate([w[1:] for w in windows]).tolist() == list(range(1, 10))
  assert [w.tolist() for w in review_windows(seq, 4, "truncate")] == [[0, 1, 2, 3, 4]]
  assert review_windows(np.arange(1), 4, "chunk") == []


def test_review_lm_bos_eos_shift_and_weights():
  docs = [np.array([10, 11, 12], np.int32), np.array([], np.int32)]
  it = ReviewLMBatches(docs, 2, pad_id=PAD, bos_id=BOS, eos_id=EOS, buckets=(8,), shuffle=False)
  (b,) = _epoch(it)
  assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (2, 8)
  np.testing.assert_array_equal(b["inputs"][0, :4], [BOS, 10, 11, 12])
  np.testing.assert_array_equal(b["targets"][0, :4], [10, 11, 12, EOS])
  np.testing.assert_array_equal(b["lengths"], [4, 1])
  np.testing.assert_array_equal(b["weights"][0], [1, 1, 1, 1, 0, 0, 0, 0])
  # An empty review still teaches <bos> -> <eos>.
  np.testing.assert_array_equal(b["inputs"][1, :1], [BOS])
  np.testing.assert_array_equal(b["targets"][1, :1], [EOS])
  assert (b["inputs"][:, 4:][b["weights"][:, 4:] == 0] == PAD).all()
  assert b["weights"].sum() == b["lengths"].sum()


def test_review_lm_chunks_long_reviews_and_covers_all_targets():
  docs = _docs(40, high=400)
  it = ReviewLMBatches(docs, 4, pad_id=PAD, bos_id=BOS, eos_id=EOS, max_len=100,
                       buckets=(32, 64, 128), shuffle=False)
  batches = _epoch(it)
  assert {b["inputs"].shape for b in batches} <= {(4, 32), (4, 64), (4, 100)}
  targets = np.concatenate([b["targets"][b["weights"] > 0] for b in batches])
  # Every token and every <eos> is predicted exactly once (bos is never a target).
  assert len(targets) == sum(len(d) + 1 for d in docs)
  expected = np.concatenate([np.append(d, EOS) for d in docs])
  np.testing.assert_array_equal(np.sort(targets), np.sort(expected))
  truncated = ReviewLMBatches(docs, 4, pad_id=PAD, bos_id=BOS, eos_id=EOS, max_len=100,
                              buckets=(32, 64, 128), shuffle=False, long_text="truncate")
  assert truncated.num_examples == len(docs)
  assert sum(b["weights"].sum() for b in _epoch(truncated)) < len(targets)


def test_review_lm_without_bos_eos():
  docs = [np.array([10, 11, 12], np.int32), np.array([7], np.int32)]
  it = ReviewLMBatches(docs, 2, pad_id=PAD, bos_id=None, eos_id=None, buckets=(4,), shuffle=False)
  assert it.num_examples == 1  # a one-token review has nothing to predict
  (b,) = _epoch(it)
  np.testing.assert_array_equal(b["inputs"][0, :2], [10, 11])
  np.testing.assert_array_equal(b["targets"][0, :2], [11, 12])


# -- stream language modelling ----------------------------------------------------------------


def test_stream_rows_continue_across_batches():
  docs = _docs(30)
  it = StreamLMBatches(docs, 4, 16, eos_id=EOS, drop_remainder=True)
  batches = _epoch(it)
  stream = np.concatenate([np.append(d, EOS) for d in docs])
  row_len = len(stream) // 4
  assert len(batches) == (row_len - 1) // 16
  rows = np.concatenate([b["inputs"] for b in batches], axis=1)
  for r in range(4):
    np.testing.assert_array_equal(rows[r], stream[r * row_len:r * row_len + rows.shape[1]])
  for b in batches:
    assert b["inputs"].shape == (4, 16)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    assert (b["weights"] == 1).all() and (b["lengths"] == 16).all()
  for prev, nxt in zip(batches, batches[1:]):
    np.testing.assert_array_equal(prev["targets"][:, -1], nxt["inputs"][:, 0])


def test_stream_last_window_padded_and_eos_between_documents():
  docs = [np.array([10, 11, 12], np.int32), np.array([20, 21], np.int32)]
  it = StreamLMBatches(docs, 1, 4, eos_id=EOS, pad_id=PAD)
  batches = _epoch(it)
  assert len(batches) == 2
  np.testing.assert_array_equal(batches[0]["inputs"][0], [10, 11, 12, EOS])
  np.testing.assert_array_equal(batches[0]["targets"][0], [11, 12, EOS, 20])
  np.testing.assert_array_equal(batches[1]["inputs"][0], [20, 21, PAD, PAD])
  np.testing.assert_array_equal(batches[1]["targets"][0], [21, EOS, PAD, PAD])
  np.testing.assert_array_equal(batches[1]["weights"][0], [1, 1, 0, 0])


def test_stream_random_offset_is_deterministic_and_keeps_batch_count():
  make = lambda seed: StreamLMBatches(_docs(30), 4, 16, eos_id=EOS, random_offset=True, seed=seed)
  _same(_epoch(make(0), 3), _epoch(make(0), 3))
  it = make(0)
  starts = {int(_epoch(it, e)[0]["inputs"][0, 0]) for e in range(8)}
  assert len(starts) > 1
  assert all(len(_epoch(make(0), e)) == it.num_batches_per_epoch for e in range(3))


@pytest.mark.parametrize("make", [
    lambda d: ReviewLMBatches(d, 4, pad_id=PAD, bos_id=BOS, eos_id=EOS, max_len=100,
                              buckets=(32, 64, 128), shuffle=True),
    lambda d: StreamLMBatches(d, 4, 16, eos_id=EOS, pad_id=PAD),
    lambda d: StreamLMBatches(d, 3, 16, eos_id=EOS, pad_id=PAD, drop_remainder=True),
], ids=["review", "stream", "stream_drop_remainder"])
def test_target_ids_are_exactly_the_weighted_targets(make):
  """The unigram baseline counts target_ids() instead of building an epoch of batches."""
  it = make(_docs(40, high=300))
  targets = np.concatenate([b["targets"][b["weights"] > 0] for b in _epoch(it)])
  np.testing.assert_array_equal(np.sort(it.target_ids()), np.sort(targets))


def test_epoch_batches_always_start_at_the_first_batch_and_keep_the_position():
  """Evaluation stops early with eval_max_batches; the next evaluation must see the same batches
  (a shared position made successive held-out evaluations alternate between subsets)."""
  it = ReviewLMBatches(_docs(40, high=300), 4, pad_id=PAD, bos_id=BOS, eos_id=EOS, max_len=100,
                       buckets=(32, 64, 128), shuffle=False)
  first = [b for _, b in zip(range(3), it.epoch_batches())]
  again = [b for _, b in zip(range(3), it.epoch_batches())]
  _same(first, again)
  _same(first, [it.batch(0, i) for i in range(3)])
  assert (it.epoch, it.index) == (0, 0)
  assert sum(1 for _ in it.epoch_batches()) == it.num_batches_per_epoch


def test_config_and_data_errors():
  with pytest.raises(ConfigError):
    _clf(batch_size=0)
  with pytest.raises(ConfigError, match="pad"):
    ClassificationBatches(_docs(), np.zeros(103), 8, pad_id=None, shuffle=False)
  with pytest.raises(DataError, match="labels"):
    ClassificationBatches(_docs(), np.zeros(5), 8, pad_id=PAD, shuffle=False)
  with pytest.raises(DataError):
    ClassificationBatches([], [], 8, pad_id=PAD, shuffle=False)
  with pytest.raises(DataError):
    StreamLMBatches([np.arange(3)], 8, 16, eos_id=EOS)
  with pytest.raises(ConfigError):
    StreamLMBatches(_docs(), 4, 0, eos_id=EOS)
