"""Runs that go wrong: divergence, interrupts, kills, changed configs, concurrent runs.

Each test reproduces a failure a user met and checks the documented outcome: one line naming
what happened, the conventional exit code, and no good checkpoint lost or poisoned.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import checkpoint, files, params as P, tasks
from jaxlm.train import loop
from cli_helpers import run

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
SOURCE = "synthetic:train=80,test=40,unsup=160"
TINY = [f"--config.{k}={v}" for k, v in [
    ("data.source", SOURCE), ("data.batch_size", 6), ("data.eval_batch_size", 8),
    ("data.buckets", "(32,)"), ("data.max_len", 32), ("tokenizer.vocab_size", 60),
    ("model.embed_dim", 8), ("model.hidden_size", 8), ("model.num_layers", 1),
    ("train.num_devices", 1), ("train.log_every_steps", 1)]]
CLF = ["finetune", "--config", f"{CONFIGS}/quickstart.py:finetune", *TINY, "--noprogress"]


def finite_params(workdir):
  with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
    return [bool(np.all(np.isfinite(leaf))) for step in ckpt.all_steps()
            for leaf in P.flatten(ckpt.restore_params(step)).values()]


# --- divergence ---------------------------------------------------------------------------


def test_a_huge_learning_rate_stops_at_once_and_saves_nothing_non_finite(tmp_path, capsys):
  work = tmp_path / "run"
  code, _, err = run(capsys, *CLF, "--config.optim.learning_rate=1e38",
                     "--config.train.num_epochs=3", "--workdir", work)
  assert code == 2 and "Traceback" not in err
  line = err.strip().splitlines()[-1]
  assert "non-finite loss or gradient norm" in line and "step " in line and "batch " in line
  assert all(finite_params(work)) if (work / "checkpoints").exists() else True
  assert not (work / "summary.json").exists()


@pytest.fixture
def nan_on_partial_batches(monkeypatch):
  """A loss that is NaN on the partial last batch of each epoch (64 train records, batch 6)."""
  original = tasks.ClassifierTask.loss

  def loss(self, config, model):
    inner = original(self, config, model)

    def poisoned(params, batch, carry, rng, train, **model_state):
      loss_sum, metrics, *rest = inner(params, batch, carry, rng, train, **model_state)
      partial = jnp.sum(batch["weights"]) < batch["weights"].shape[0]
      poison = jnp.where(partial & train, jnp.nan, 1.0)
      return loss_sum * poison, dict(metrics, loss_sum=metrics["loss_sum"] * poison), *rest

    return poisoned

  monkeypatch.setattr(tasks.ClassifierTask, "loss", loss)


def test_stop_names_the_step_and_batch(tmp_path, capsys, nan_on_partial_batches):
  code, _, err = run(capsys, *CLF, "--config.train.num_epochs=2", "--workdir", tmp_path / "run")
  assert code == 2
  # The shuffled epoch holds one partial batch; its step is its position in the first epoch.
  import re
  match = re.search(r"step (\d+): non-finite loss .* on batch (\d+) of epoch 1;", err)
  assert match and match.group(1) == match.group(2), err


def test_skip_goes_on_and_counts(tmp_path, capsys, nan_on_partial_batches):
  work = tmp_path / "run"
  code, _, err = run(capsys, *CLF, "--config.train.num_epochs=2",
                     "--config.train.on_nonfinite=skip", "--workdir", work)
  assert code == 0, err
  rows = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  assert max(r.get("skipped_batches", 0) for r in rows) == 2
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
  assert all(finite_params(work))
  summary = json.loads((work / "summary.json").read_text())  # strict JSON: no NaN anywhere
  assert summary["test_accuracy"] is not None


def test_json_files_never_hold_nan(tmp_path):
  checkpoint.write_json_atomic(tmp_path / "s.json", {"a": float("nan"), "b": [1.0, float("inf")]})
  text = (tmp_path / "s.json").read_text()
  assert "NaN" not in text and "Infinity" not in text
  assert json.loads(text) == {"a": None, "b": [1.0, None]}


# --- a workdir is one run -----------------------------------------------------------------


def test_resume_with_a_changed_config_is_refused(tmp_path, capsys):
  work = tmp_path / "run"
  assert run(capsys, *CLF, "--config.train.num_epochs=1", "--workdir", work)[0] == 0
  before = (work / "config.json").read_text()
  code, _, err = run(capsys, *CLF, "--config.train.num_epochs=1", "--config.optim.learning_rate=0.5",
                     "--config.model.dropout_output=0.5", "--workdir", work)
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert "optim.learning_rate: 0.002 -> 0.5" in err and "model.dropout_output" in err
  assert (work / "config.json").read_text() == before
  # Changing how long it runs is a resume, and config.json then says what ran.
  code, out, err = run(capsys, *CLF, "--config.train.num_epochs=2", "--workdir", work)
  assert code == 0 and "resuming" in out and "schedule" not in out, err  # a constant rate
  assert json.loads((work / "config.json").read_text())["train"]["num_epochs"] == 2
  # --overwrite starts over with the new config.
  code, out, err = run(capsys, *CLF, "--config.train.num_epochs=1", "--config.optim.learning_rate=0.5",
                       "--overwrite", "--workdir", work)
  assert code == 0 and "resuming" not in out, err
  assert json.loads((work / "config.json").read_text())["optim"]["learning_rate"] == 0.5


def test_a_longer_resume_says_that_a_decaying_schedule_is_rebuilt(tmp_path, capsys):
  """A resumed run may run longer, but cosine or STLR over 2 epochs is not the 1-epoch schedule
  continued: the rate jumps back up, and the resume line says so."""
  work, cosine = tmp_path / "run", "--config.optim.schedule=cosine"
  assert run(capsys, *CLF, cosine, "--config.train.num_epochs=1", "--workdir", work)[0] == 0
  code, out, err = run(capsys, *CLF, cosine, "--config.train.num_epochs=2", "--workdir", work)
  assert code == 0, err
  (line,) = [x for x in out.splitlines() if x.startswith("resuming")]
  assert "train.num_epochs 1 -> 2: the cosine learning-rate schedule now spans the new length" in line


def test_a_second_process_is_refused_and_stale_locks_are_taken(tmp_path, capsys):
  work = tmp_path / "run"
  work.mkdir()
  import socket
  lock = work / files.WorkdirLock.NAME
  lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))  # alive
  code, _, err = run(capsys, *CLF, "--workdir", work)
  assert code == 2 and f"in use by process {os.getppid()}" in err
  assert not (work / "checkpoints").exists()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
  code, _, err = run(capsys, *CLF, "--config.train.num_epochs=1", "--workdir", work)
  assert code == 0, err
  assert not lock.exists()  # released at the end


def test_a_bad_test_split_fails_before_training(tmp_path, capsys):
  work = tmp_path / "run"
  code, _, err = run(capsys, *CLF, "--config.data.test_split=nosuch", "--workdir", work)
  assert code == 2 and "nosuch" in err
  assert not work.exists()


# --- interrupts and kills, in a real process ------------------------------------------------


def _cli(work, *extra):
  return [sys.executable, "-m", "jaxlm.cli", *CLF, "--config.train.num_epochs=40",
          "--config.train.checkpoint_every_minutes=0.002", *extra, "--workdir", str(work)]


def _start(work, *extra):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(_cli(work, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env)
  deadline = time.monotonic() + 120
  metrics = work / "metrics.jsonl"
  while time.monotonic() < deadline:  # wait for training to be under way, past a checkpoint
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 25:
      return proc, env
    if proc.poll() is not None:
      raise AssertionError(proc.stderr.read())
    time.sleep(0.2)
  proc.kill()
  raise AssertionError("training did not start in time")


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_says_where_to_resume_and_exits_conventionally(tmp_path, sig, code):
  work = tmp_path / "run"
  proc, env = _start(work)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == code, err
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  assert f"stopped by {signal.Signals(sig).name} at step" in last and "rerun the same command" in last
  step = int(last.split(" at step ")[1].split()[0])
  with checkpoint.Checkpointer(work, read_only=True) as ckpt:
    assert ckpt.latest_step() == step
  assert not (work / files.WorkdirLock.NAME).exists()


@pytest.mark.slow
def test_killed_run_resumes_bit_identically(tmp_path):
  """SIGKILL mid-run, rerun the same command: params and metrics equal an uninterrupted run's."""
  short = ["--config.train.num_epochs=3"]
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  cmd = lambda work: [*_cli(work)[:-2], *short, "--workdir", str(work)]
  subprocess.run(cmd(whole), check=True, env=env, capture_output=True)
  proc = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = killed / "metrics.jsonl"
  while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 14):
    time.sleep(0.05)
  proc.kill()
  proc.wait()
  result = subprocess.run(cmd(killed), env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  a = P.flatten(checkpoint.restore_params(whole))
  b = P.flatten(checkpoint.restore_params(killed))
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=path)
  strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rows]
  read = lambda w: strip(json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines())
  assert read(whole) == read(killed)
  sa, sb = (json.loads((w / "summary.json").read_text()) for w in (whole, killed))
  assert sa["test_accuracy"] == sb["test_accuracy"] and sa["test_loss"] == sb["test_loss"]
