"""Tracking and throughput: the learning rate in the rows, TensorBoard events, the batch prefetch and
the on-device metrics window.

Why these: the TensorBoard view must show the numbers metrics.jsonl holds (and hide what a resumed
run replays); the logged rate must be the one the optimizer applied, skipped batches included; and
neither the prefetch thread nor the deferred metrics fetch may change a single bit of a run, its
resume, or where a diverging run stops.
"""
import json
import re
import struct
import sys

import jax
import numpy as np
import optax
import pytest

from jaxlm import batching, checkpoint, commands, config as config_lib, distributed
from jaxlm import params as P, tracking
from jaxlm.train import loop, prefetch, strategies
from test_failures import nan_on_partial_batches  # noqa: F401  (a fixture)

SOURCE = "synthetic:train=80,test=40,unsup=160"
STEPS_PER_EPOCH = 11  # 64 train records in batches of 6: 10 full, 1 partial


def clf_config(**train):
  """A tiny classifier with dropout (the RNG matters) and a schedule that changes every step."""
  config = config_lib.classifier_config()
  config.data.update(source=SOURCE, batch_size=6, eval_batch_size=8, buckets=(48,), max_len=48,
                     valid_fraction=0.2)
  config.tokenizer.vocab_size = 200
  config.model.update(embed_dim=16, hidden_size=32, num_layers=1, dropout_embed=0.1,
                      dropout_hidden=0.1, dropout_output=0.1)
  config.optim.update(learning_rate=3e-3, schedule="stlr")
  config.train.update(**{"num_devices": 1, "log_every_steps": 3, "max_to_keep": 5,
                         "num_epochs": 2, **train})
  return config


def run_training(config, workdir):
  """The training of `jaxlm finetune` without its test pass; returns the run (its final state)."""
  run = commands.train(config, workdir, kinds=("classifier",), progress=False)
  run["lock"].release()
  return run


def rows(workdir, split="train"):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r.get("split") == split]


def read_events(logdir):
  """Every event of every event file under `logdir`, in TensorBoard's reading order, with the
  TFRecord framing and CRCs checked (tensorboardX writes the files; its protos parse them)."""
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  events = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,) = struct.unpack("<Q", header)
      assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
      payload = data[pos + 12:pos + 12 + length]
      assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked_crc32c(payload)
      pos += 16 + length
      event = event_pb2.Event()
      event.ParseFromString(payload)
      events.append((path.name, event))
  return events


def scalars(logdir):
  """{tag: {step: value}} as TensorBoard shows it: a START session log at step S (a resumed
  writer's purge_step) drops the earlier files' points at steps >= S."""
  out: dict = {}
  for _, event in read_events(logdir):
    if event.HasField("session_log") and event.session_log.status == event.session_log.START:
      for points in out.values():
        for s in [s for s in points if s >= event.step]:
          del points[s]
    for value in event.summary.value:
      out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


# --- the learning rate and TensorBoard ------------------------------------------------------


def test_rows_carry_the_learning_rate_and_tensorboard_shows_the_same_scalars(tmp_path):
  config = clf_config()
  config.finetune.discriminative_decay = 2.6  # the logged rate is the top group's
  work = tmp_path / "run"
  run_training(config, work)
  train = rows(work)
  assert [r["step"] for r in train] == [3, 6, 9, 11, 12, 15, 18, 21, 22]  # + each epoch's end
  schedule = strategies.make_schedule(config.optim, 2 * STEPS_PER_EPOCH)
  # The rate of each row's last update: the update of step s counts s - 1 earlier ones.
  expected = [float(schedule(r["step"] - 1)) for r in train]
  np.testing.assert_allclose([r["learning_rate"] for r in train], expected, rtol=1e-6)
  assert len(set(expected)) == len(expected)  # the slanted triangle moves every row

  board = scalars(work / tracking.DIRNAME)
  for tag, split, key in [("train/loss", "train", "loss"),
                          ("train/learning_rate", "train", "learning_rate"),
                          ("train/accuracy", "train", "accuracy"),
                          ("valid/accuracy", "valid", "accuracy"), ("valid/loss", "valid", "loss")]:
    want = {r["step"]: r[key] for r in rows(work, split)}
    assert sorted(board[tag]) == sorted(want), tag
    np.testing.assert_allclose([board[tag][s] for s in sorted(want)],
                               [want[s] for s in sorted(want)], rtol=1e-6, err_msg=tag)
  assert not any(tag.endswith(("/count", "/step", "/epoch")) for tag in board)

  from PIL import Image  # matplotlib's own dependency
  width, _ = Image.open(work / "metrics.png").size
  assert width == 3 * 500  # loss, accuracy and the learning rate: 5 inches at 100 dpi each


def test_tensorboard_is_off_without_tensorboardX_or_when_turned_off(tmp_path, monkeypatch, caplog):
  off = tracking.TensorBoardWriter.open(tmp_path / "a", enabled=False)
  off.write({"step": 1, "split": "train", "loss": 1.0})
  off.close()
  with monkeypatch.context() as m:  # process 1 of a multi-host run: process 0 writes for all
    m.setattr(distributed, "is_primary", lambda: False)
    assert not tracking.TensorBoardWriter.open(tmp_path / "a").enabled
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` now fails
  with caplog.at_level("INFO", logger="jaxlm.tracking"):
    missing = tracking.TensorBoardWriter.open(tmp_path / "b")
  missing.write({"step": 1, "split": "train", "loss": 1.0})
  missing.flush()
  assert not off.enabled and not missing.enabled
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
  assert [r.getMessage() for r in caplog.records] == [
      "TensorBoard logging is off: tensorboardX is not installed (pip install 'jaxlm[tensorboard]')"]


# --- the prefetch thread ----------------------------------------------------------------------


def _batches():
  rng = np.random.default_rng(0)
  ids = [rng.integers(2, 50, rng.integers(1, 40)) for _ in range(70)]
  return batching.ClassificationBatches(ids, rng.integers(0, 2, 70), 8, buckets=(16, 32),
                                        pad_id=1, shuffle=True, seed=3)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_yields_the_batches_and_positions_of_iter_epoch(depth):
  plain, fetched = _batches(), _batches()
  for it in (plain, fetched):
    it.set_state({**it.get_state(), "epoch": 1, "index": 4})  # a resumed run, mid-epoch
  expected = []
  for batch in plain.iter_epoch(1):
    expected.append((batch, plain.get_state()))
  got = []
  for batch, moved in prefetch.EpochPrefetch(fetched, 1, lambda b: {"x": b["tokens"] + 1}, depth):
    got.append((batch, fetched.get_state()))  # the position names what was consumed
    np.testing.assert_array_equal(moved["x"], batch["tokens"] + 1)
  assert len(got) == len(expected) == fetched.num_batches_per_epoch - 4
  for (a, state_a), (b, state_b) in zip(expected, got):
    assert state_a == state_b
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert (fetched.epoch, fetched.index) == (2, 0)


def test_prefetch_stops_cleanly_and_raises_the_threads_error_at_its_batch():
  it = _batches()
  stream = prefetch.EpochPrefetch(it, 0, lambda b: b, depth=2)
  for i, _ in enumerate(stream):
    if i == 2:
      break
  stream.close()
  assert stream._thread is None and (it.epoch, it.index) == (0, 3)  # 3 consumed, none lost

  def transfer(batch, seen=[]):
    seen.append(1)
    if len(seen) == 4:
      raise RuntimeError("device full")
    return batch

  it = _batches()
  stream = prefetch.EpochPrefetch(it, 0, transfer, depth=2)
  consumed = 0
  with pytest.raises(RuntimeError, match="device full"):
    for _ in stream:
      consumed += 1
  assert consumed == 3 and (it.epoch, it.index) == (0, 3)
  assert not any(t.name == "jaxlm-prefetch" for t in __import__("threading").enumerate())


# --- runs: nothing changes but the speed --------------------------------------------------------


def test_prefetch_and_deferred_metrics_change_no_bit_and_resume_exactly(tmp_path):
  """The old path (metrics fetched every step, no prefetch) in one go = the new path stopped
  mid-epoch and resumed: same params bit for bit, same rows, and TensorBoard shows each step once."""
  old, new = tmp_path / "old", tmp_path / "new"

  def config(**train):  # a constant rate: max_steps would change the slanted triangle's length
    c = clf_config(**train)
    c.optim.schedule = "constant"
    return c

  run_training(config(prefetch_batches=0, sync_every_step=True), old)
  run_training(config(max_steps=15), new)  # mid-epoch 2
  # A killed run logged past its checkpoint; the resumed run replays it (and TensorBoard hides it).
  with open(new / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 16, "epoch": 2, "split": "train", "loss": 99.0}) + "\n")
  from tensorboardX import SummaryWriter
  with SummaryWriter(str(new / tracking.DIRNAME), filename_suffix=".from000000000.killed") as stale:
    stale.add_scalar("train/loss", 99.0, 16)
  run_training(config(), new)

  a, b = P.flatten(checkpoint.restore_params(old)), P.flatten(checkpoint.restore_params(new))
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=path)
  strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rs]
  assert strip(rows(old)) == strip(rows(new))
  assert [r["step"] for r in rows(new)] == [3, 6, 9, 11, 12, 15, 18, 21, 22]
  board = scalars(new / tracking.DIRNAME)["train/loss"]
  assert sorted(board) == [r["step"] for r in rows(new)]
  np.testing.assert_allclose([board[s] for s in sorted(board)], [r["loss"] for r in rows(new)],
                             rtol=1e-6)


def test_a_deferred_nonfinite_check_still_stops_at_the_bad_step(tmp_path, nan_on_partial_batches):
  """Metrics are fetched every 100 steps, yet the stop names the bad step and batch, and no
  checkpoint holds a state trained past it."""
  work = tmp_path / "run"
  with pytest.raises(loop.DivergenceError) as error:
    run_training(clf_config(log_every_steps=100, checkpoint_every_steps=1), work)
  match = re.search(r"step (\d+): non-finite loss .* on batch (\d+) of epoch 1;", str(error.value))
  assert match and match.group(1) == match.group(2), error.value
  bad = int(match.group(1))
  with checkpoint.Checkpointer(work, read_only=True) as ckpt:
    assert (ckpt.latest_step() or 0) == bad - 1
  assert f"last checkpoint: step {bad - 1}" in str(error.value) or bad == 1


def test_skipped_batches_keep_the_learning_rate_on_the_global_step(tmp_path, nan_on_partial_batches):
  """The schedule is a function of the step, skipped batches included (as a PyTorch scheduler
  stepped every batch behind a GradScaler that skips the update): the run ends on its schedule's
  end and a per-phase schedule restarts on its epoch's first batch."""
  config = clf_config(on_nonfinite="skip", log_every_steps=1)
  config.optim.update(schedule="linear_warmup", warmup_steps=40)  # rises through the whole run
  run = run_training(config, tmp_path / "run")
  train = rows(tmp_path / "run")
  assert [r["step"] for r in train] == list(range(1, 23))
  assert train[-1].get("skipped_batches", 0) == 2  # one partial batch per epoch
  schedule = strategies.make_schedule(config.optim, 2 * STEPS_PER_EPOCH)
  expected = [float(schedule(r["step"] - 1)) for r in train]
  np.testing.assert_allclose([r["learning_rate"] for r in train], expected, rtol=1e-6)
  # What the logged rate reads: the optimizer's own schedule count.
  counts = [s.count for s in jax.tree.leaves(
      run["state"].opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
      if isinstance(s, optax.ScaleByScheduleState)]
  assert [int(c) for c in counts] == [22]
