"""What a crash or a failing disk leaves behind must not end a run: damaged checkpoints, full
disks, partial metrics lines.

Each case is one line naming the step and the file (docs/ARCHITECTURE.md, the CLI contract), and
the run goes on from what is intact: the newest step that loads, unless a step was asked for by
number. The damage is done to a copy of one tiny finetune workdir with two saved steps (2 and 4;
only step 4 is evaluated, so it is the latest and the best), through `jaxlm.cli.main` as a user
would meet it.
"""
import errno
import json
import logging
import os
import pathlib
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxlm import checkpoint, metrics
from jaxlm.checkpoint import Checkpointer
from jaxlm.errors import CheckpointError, DamagedCheckpointError
from test_cli import CLF_ARGS, _assert_user_error, run

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "workdirs_v0_1"
ARGS = [*CLF_ARGS, "--config.train.max_steps=4", "--config.train.checkpoint_every_steps=2"]

# The files of a step that a restore reads, as a relative path (a glob picks the first match).
FILES = {
    "tensor": "state/d/*",                          # the array data orbax reads
    "process_tensor": "state/ocdbt.process_0/d/*",  # the per-process copy written first
    "metadata": "state/_METADATA",                  # the tree: paths, shapes, dtypes
    "manifest": "state/manifest.ocdbt",             # the OCDBT index of the data files
    "meta": "meta/metadata",                        # JSON: epoch, data position, best
}


def _truncate(path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _garble(path):
  size = path.stat().st_size
  path.write_bytes((b"\x00garbled\xff" * (size // 9 + 1))[:size])


DAMAGE = {"truncate": _truncate, "garble": _garble, "delete": pathlib.Path.unlink}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  work = tmp_path_factory.mktemp("robust") / "clf"
  code = run_cli("finetune", *ARGS, "--workdir", work)
  assert code == 0
  with Checkpointer(work, read_only=True) as ckpt:
    assert ckpt.all_steps() == [2, 4] and ckpt.best_step() == 4
  return work


def run_cli(*args):
  from jaxlm import cli
  return cli.main(["jaxlm", *map(str, args)])


@pytest.fixture
def work(base, tmp_path):
  copy = tmp_path / "clf"
  shutil.copytree(base, copy)
  return copy


def damage(work, name, kind, step=4) -> str:
  """Damages FILES[name] of `step`; returns its path relative to the step directory."""
  stepdir = work / "checkpoints" / str(step)
  path = sorted(stepdir.glob(FILES[name]))[0]
  DAMAGE[kind](path)
  return path.relative_to(stepdir).as_posix()


def warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


CASES = [(name, kind) for name in FILES for kind in DAMAGE]


@pytest.mark.parametrize("name,kind", CASES)
def test_evaluate_falls_back_to_the_newest_step_that_loads(work, capsys, caplog, name, kind):
  rel = damage(work, name, kind)
  caplog.set_level(logging.WARNING)
  code, out, err = run(capsys, "evaluate", "--workdir", work)  # --which best: step 4
  assert code == 0, err
  assert "test: accuracy" in out
  said = warnings(caplog)
  assert any("step 4" in w and rel in w and "damaged" in w for w in said), said
  assert any("using checkpoint step 2" in w for w in said), said
  assert (work / "checkpoints" / "4").is_dir()  # evaluate reads; it moves nothing


@pytest.mark.parametrize("name,kind", CASES)
def test_a_damaged_step_asked_for_is_an_error(work, capsys, name, kind):
  rel = damage(work, name, kind)
  code, _, err = run(capsys, "evaluate", "--workdir", work, "--step", 4)
  _assert_user_error(code, err, "step 4", rel, "damaged")
  code, out, err = run(capsys, "evaluate", "--workdir", work, "--step", 2)
  assert code == 0 and "test: accuracy" in out, err


@pytest.mark.parametrize("name,kind", CASES)
def test_resume_goes_on_from_the_newest_step_that_loads(work, capsys, caplog, name, kind):
  rel = damage(work, name, kind)
  caplog.set_level(logging.WARNING)
  code, out, err = run(capsys, "finetune", *ARGS, "--workdir", work)
  assert code == 0, err
  assert f"resuming {work} from step 2" in out
  said = warnings(caplog)
  assert any("step 4" in w and rel in w for w in said), said
  # The damaged step is kept aside for inspection; step 4 is trained and saved anew.
  checkpoints = work / "checkpoints"
  assert len(list(checkpoints.glob("4.damaged-*"))) == 1
  assert (checkpoints / "4" / checkpoint.CHECKSUMS).exists()
  with Checkpointer(work, read_only=True) as ckpt:
    assert ckpt.all_steps() == [2, 4]
    ckpt.restore_params(step=4)
  rows = metrics.MetricsWriter(work).read()
  assert [r["step"] for r in rows if r["split"] == "valid"] == [4]  # rewound, not doubled


def test_flipped_bytes_in_a_tensor_file_are_detected(work, capsys, caplog):
  """Silent corruption: same size, one bit pattern changed. orbax would restore the garbage."""
  stepdir = work / "checkpoints" / "4"
  tensor = sorted((stepdir / "state" / "d").iterdir())[0]
  data = bytearray(tensor.read_bytes())
  data[len(data) // 2] ^= 0x5A
  tensor.write_bytes(bytes(data))
  rel = tensor.relative_to(stepdir).as_posix()
  with pytest.raises(DamagedCheckpointError, match=f"step 4 .*{rel} does not match its sha256"):
    checkpoint.restore_params(work, step=4)
  code, _, err = run(capsys, "evaluate", "--workdir", work, "--step", 4)
  _assert_user_error(code, err, rel, "sha256")
  caplog.set_level(logging.WARNING)
  code, out, err = run(capsys, "evaluate", "--workdir", work)
  assert code == 0 and "test: accuracy" in out, err
  assert any(rel in w for w in warnings(caplog))


def test_no_step_loads(work, capsys):
  damage(work, "tensor", "truncate", step=4)
  damage(work, "meta", "delete", step=2)
  code, _, err = run(capsys, "finetune", *ARGS, "--workdir", work)
  _assert_user_error(code, err, "no checkpoint in", "loads", "tried steps 4, 2", "meta/metadata")


def test_a_garbled_best_metric_file_only_unranks_its_step(work, capsys, caplog):
  """orbax reads every step's metrics file when it opens a directory: one garbled file must not
  make the whole workdir unreadable."""
  _garble(work / "checkpoints" / "4" / "metrics" / "metrics")
  caplog.set_level(logging.WARNING)
  code, _, err = run(capsys, "evaluate", "--workdir", work, "--which", "latest")
  assert code == 0, err
  assert any("metrics/metrics" in w for w in warnings(caplog))


def test_steps_saved_without_checksums_load(tmp_path):
  """jaxlm 0.1 wrote no checksums: its workdirs load unverified, and reading them writes nothing."""
  legacy = tmp_path / "legacy"
  shutil.copytree(FIXTURES, legacy)
  before = sorted(p.relative_to(legacy) for p in legacy.rglob("*"))
  for run_dir in ("lm", "clf"):
    params = checkpoint.restore_params(legacy / run_dir)
    assert params
  assert sorted(p.relative_to(legacy) for p in legacy.rglob("*")) == before


# --- checksums ------------------------------------------------------------------------------


@pytest.mark.parametrize("async_save", [True, False])
def test_every_saved_file_gets_a_checksum(tmp_path, async_save):
  state = {"step": np.int32(1), "params": {"w": np.arange(6, dtype=np.float32)}}
  with Checkpointer(tmp_path, async_save=async_save) as ckpt:
    ckpt.save(1, state, {"epoch": 0})
    ckpt.save(2, state, {"epoch": 1})
  for step in (1, 2):
    stepdir = tmp_path / "checkpoints" / str(step)
    listed = json.loads((stepdir / checkpoint.CHECKSUMS).read_text())["files"]
    on_disk = {p.relative_to(stepdir).as_posix() for p in stepdir.rglob("*") if p.is_file()}
    assert set(listed) == on_disk - {checkpoint.CHECKSUMS}
    assert {"state/_METADATA", "state/manifest.ocdbt", "meta/metadata"} <= set(listed)


# --- full disk ------------------------------------------------------------------------------


def _disk_full_from(monkeypatch, step):
  """Every JSON write (the `meta` item) of a save of `step` or later fails with ENOSPC, in
  orbax's background commit for async saves, as a full disk does."""
  save_fn = ocp.handlers.JsonCheckpointHandler._save_fn

  async def failing(self, x, directory):
    name = pathlib.Path(str(directory)).parent.name  # {step}.orbax-checkpoint-tmp...
    if name.split(".")[0].isdigit() and int(name.split(".")[0]) >= step:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return await save_fn(self, x, directory)

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", failing)


@pytest.mark.parametrize("async_save", [True, False])
def test_a_failed_save_is_one_error_and_keeps_the_earlier_steps(tmp_path, monkeypatch, async_save):
  state = lambda i: {"step": np.int32(i), "params": {"w": np.full(4, i, np.float32)}}
  ckpt = Checkpointer(tmp_path, async_save=async_save, max_to_keep=2)
  ckpt.save(1, state(1))
  ckpt.save(2, state(2))
  _disk_full_from(monkeypatch, 3)
  with pytest.raises(CheckpointError) as info:
    ckpt.save(3, state(3))
    ckpt.wait_until_finished()
  message = str(info.value)
  assert "\n" not in message
  for needle in (f"{tmp_path / 'checkpoints' / '3'}", "No space left on device", "free on",
                 "steps 1, 2 are intact"):
    assert needle in message, (needle, message)
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()
  np.testing.assert_array_equal(checkpoint.restore_params(tmp_path)["w"], np.full(4, 2))
  monkeypatch.undo()  # space freed: the next run saves again, and its partial files are gone
  with Checkpointer(tmp_path, async_save=async_save, max_to_keep=2) as ckpt:
    ckpt.save(3, state(3))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3"]


def test_a_full_disk_stops_training_at_once(work, tmp_path, capsys, monkeypatch):
  """The save of step 4 fails in the background: the run stops (exit 2, one line with the path
  and the free space) by step 6, the next save, at the latest; step 2 stays and resumes."""
  fresh = tmp_path / "fresh"
  _disk_full_from(monkeypatch, 4)
  args = [*CLF_ARGS, "--config.train.max_steps=10", "--config.train.checkpoint_every_steps=2",
          "--config.train.log_every_steps=1"]
  code, _, err = run(capsys, "finetune", *args, "--workdir", fresh)
  _assert_user_error(code, err, str(fresh / "checkpoints" / "4"), "No space left on device",
                     "free on")
  assert 4 <= max(r["step"] for r in metrics.MetricsWriter(fresh).read()) <= 6
  with Checkpointer(fresh, read_only=True) as ckpt:
    assert ckpt.all_steps() == [2]
  monkeypatch.undo()  # space freed: the same command resumes from step 2
  code, out, err = run(capsys, "finetune", *args, "--workdir", fresh)
  assert code == 0 and f"resuming {fresh} from step 2" in out, err


# --- metrics.jsonl --------------------------------------------------------------------------


def test_a_partial_last_metrics_line_is_dropped(tmp_path, caplog):
  writer = metrics.MetricsWriter(tmp_path)
  for step in (1, 2, 3):
    writer.write({"step": step, "split": "train", "loss": 1.0})
  with open(writer.path, "a") as f:
    f.write('{"step": 4, "split": "tr')  # the crash
  caplog.set_level(logging.WARNING)
  assert [r["step"] for r in writer.read()] == [1, 2, 3]
  assert any("partial last line 4" in w for w in warnings(caplog))
  assert metrics.MetricsWriter(tmp_path).rewind(2) == 1
  assert writer.path.read_text().splitlines() == [json.dumps(r) for r in writer.read()]
  # A run that starts again without a checkpoint appends after a cut line, not onto it.
  with open(writer.path, "a") as f:
    f.write('{"step": 3, "spl')
  metrics.MetricsWriter(tmp_path).write({"step": 1, "split": "train"})
  assert [r["step"] for r in writer.read()] == [1, 2, 1]


def test_a_garbled_metrics_line_names_file_and_line(work, capsys):
  path = work / "metrics.jsonl"
  lines = path.read_text().splitlines()
  path.write_text("\n".join([lines[0], "{garbled", *lines[1:]]) + "\n")
  with pytest.raises(CheckpointError, match=r"metrics\.jsonl line 2 is not a JSON object"):
    metrics.MetricsWriter(work).read()
  code, _, err = run(capsys, "finetune", *ARGS, "--workdir", work)
  _assert_user_error(code, err, str(path), "line 2")


def test_resume_after_a_crash_mid_metrics_line(work, capsys):
  path = work / "metrics.jsonl"
  with open(path, "a") as f:
    f.write('{"step": 5, "epoch": 1, "split": "tra')
  code, out, err = run(capsys, "finetune", *CLF_ARGS, "--config.train.max_steps=6",
                       "--config.train.checkpoint_every_steps=2", "--workdir", work)
  assert code == 0 and f"resuming {work} from step 4" in out, err
  rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line parses
  assert rows[-1]["step"] == 6


# --- alternative templates (one optimizer state per training phase) ---------------------------


def test_restore_any_tries_each_template_per_step(tmp_path):
  """A gradual-unfreezing run: step 1 was written in phase 0, step 2 in phase 1 (another
  optimizer tree). With step 2 damaged, resume falls back to step 1 and its phase's template;
  a template that fits no step is the mismatch error, not a reason to try older steps."""
  phase0 = {"step": np.int32(1), "params": {"w": np.ones(3, np.float32)}, "opt_state": {}}
  phase1 = {"step": np.int32(2), "params": {"w": np.ones(3, np.float32)},
            "opt_state": {"mu": np.zeros(3, np.float32)}}
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, phase0)
    ckpt.save(2, phase1)
  built = []

  def templates():
    for phase in (phase0, phase1):
      built.append(phase)
      yield phase

  with Checkpointer(tmp_path, read_only=True) as ckpt:
    state, _ = ckpt.restore_any(templates())
    assert int(state["step"]) == 2 and len(built) == 2
    other = {"step": np.int32(0), "params": {"v": np.ones(2, np.float32)}}
    with pytest.raises(CheckpointError, match=r"checkpoints/2 does not fit the model"):
      ckpt.restore_any([other])
  damage(tmp_path, "tensor", "truncate", step=2)
  built.clear()
  with Checkpointer(tmp_path, read_only=True) as ckpt:
    state, _ = ckpt.restore_any(templates())
  assert int(state["step"]) == 1 and len(built) == 1  # phase 0 fits step 1; phase 1 never built
