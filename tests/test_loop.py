"""The training loop end to end on tiny synthetic data: resume, data parallelism, stream LM, freezing.

Why these: each is a promise the README makes that no unit test of a single module can check -
a rerun continues exactly where a run stopped, 4 devices compute what 1 device does, stream-mode
LM carries its state through train and eval, and a frozen layer group really does not move.
"""
import json

import jax
import numpy as np
import pytest

from jaxlm import checkpoint, commands, config as config_lib, tasks

SOURCE = "synthetic:train=80,test=40,unsup=160"


def _tiny(config):
  config.data.update(source=SOURCE, batch_size=8, eval_batch_size=8, buckets=(48,), max_len=48)
  config.tokenizer.vocab_size = 200
  config.model.update(embed_dim=16, hidden_size=32, num_layers=1)
  config.train.update(num_devices=1, log_every_steps=1, max_to_keep=5)
  return config


def clf_config(**train):
  """64 train / 16 valid records: 8 batches of 8 per epoch. Dropout on, so the RNG matters."""
  config = _tiny(config_lib.classifier_config())
  config.data.update(num_labeled=0, valid_fraction=0.2)
  config.model.update(dropout_embed=0.1, dropout_hidden=0.1, dropout_output=0.1)
  config.optim.update(learning_rate=3e-3, schedule="constant")
  config.train.update(**{"num_epochs": 2, **train})
  return config


def lm_config(**train):
  config = _tiny(config_lib.lm_config())
  config.data.update(train_split="unsup", valid_fraction=0.1)
  config.train.update(num_epochs=1, **train)
  return config


def _rows(workdir, split):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r.get("split") == split]


def _assert_trees_close(a, b, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol,
                                                       rtol=0), a, b)


def gradual_config(**train):
  """Groups embed, encoder/layer_0, head; gradual (ULMFiT) trains head, +layer_0, +embed."""
  config = clf_config(**{"num_epochs": 3, **train})
  config.finetune.update(strategy="gradual", discriminative_decay=2.6)
  return config


@pytest.fixture(scope="module")
def gradual_runs(tmp_path_factory):
  """One uninterrupted 3-epoch run, and the same run stopped at step 12 (mid-epoch 2) and rerun.

  Gradual unfreezing is the hardest case to resume: the checkpoint at step 12 holds the optimizer
  state of phase 2 (head + layer_0), not the one a fresh run starts with.
  """
  root = tmp_path_factory.mktemp("gradual")
  one_go, resumed = root / "one_go", root / "resumed"
  full = commands.finetune(gradual_config(), one_go, progress=False)
  half = commands.finetune(gradual_config(max_steps=12), resumed, progress=False)
  # A killed run logs past its last checkpoint; the rerun must replay those steps, not double them.
  with open(resumed / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 13, "epoch": 2, "split": "train", "loss": 99.0}) + "\n")
  rest = commands.finetune(gradual_config(), resumed, progress=False)
  return dict(one_go=one_go, resumed=resumed, full=full, half=half, rest=rest)


def test_resume_continues_exactly(gradual_runs):
  """Stopping with max_steps and rerunning on the same workdir = one uninterrupted run."""
  r = gradual_runs
  one_go, resumed = r["one_go"], r["resumed"]
  assert r["half"]["steps"] == 12 and r["full"]["steps"] == r["rest"]["steps"] == 24
  meta = json.loads((resumed / "checkpoints" / "12" / "meta" / "metadata").read_text())
  assert (meta["batches"]["epoch"], meta["batches"]["index"]) == (1, 4)  # data position saved

  _assert_trees_close(checkpoint.restore_params(one_go, which="latest"),
                      checkpoint.restore_params(resumed, which="latest"), atol=1e-6)
  a, b = _rows(one_go, "train"), _rows(resumed, "train")
  assert [x["step"] for x in a] == [x["step"] for x in b] == list(range(1, 25))
  # One row per batch (log_every_steps=1): equal losses after the restart mean the same batches
  # (data position) and the same dropout masks (RNG) as the uninterrupted run.
  np.testing.assert_allclose([x["loss"] for x in a], [x["loss"] for x in b], rtol=0, atol=1e-6)
  va = {x["step"]: x["loss"] for x in _rows(one_go, "valid")}
  vb = {x["step"]: x["loss"] for x in _rows(resumed, "valid")}
  assert sorted(va) == [8, 16, 24] and sorted(vb) == [8, 12, 16, 24]  # + the eval at the stop
  np.testing.assert_allclose([va[k] for k in sorted(va)], [vb[k] for k in sorted(va)], atol=1e-6)
  assert r["full"]["best_valid"] == r["rest"]["best_valid"]
  assert r["full"]["test_loss"] == pytest.approx(r["rest"]["test_loss"], abs=1e-6)


def test_gradual_unfreezing_keeps_frozen_groups_bit_identical(gradual_runs):
  """A frozen group does not move at all: not by Adam, weight decay or a share of clipping."""
  init = jax.device_get(tasks.build_task(gradual_config()).init_params(0))
  after = {s: checkpoint.restore_params(gradual_runs["one_go"], step=s) for s in (8, 16, 24)}

  def same(a, b, *path):
    for key in path:
      a, b = a[key], b[key]
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  # epoch 1: only the head trains
  assert same(init, after[8], "embed") and same(init, after[8], "encoder", "layer_0")
  assert not same(init, after[8], "head")
  # epoch 2: + encoder/layer_0
  assert same(init, after[16], "embed") and not same(after[8], after[16], "encoder", "layer_0")
  # epoch 3: everything
  assert not same(after[16], after[24], "embed")


def test_one_vs_four_devices_same_params(tmp_path):
  """Data parallelism over 4 (simulated) devices computes the single-device update."""
  assert jax.device_count() >= 4, "tests/conftest.py should simulate 4 CPU devices"
  runs = {}
  for n in (1, 4):
    run = commands.train(clf_config(max_steps=4, num_devices=n), tmp_path / f"d{n}",
                         kinds=("classifier",), progress=False)
    assert run["devices"].count == n
    runs[n] = jax.device_get(run["state"].params)
  _assert_trees_close(runs[1], runs[4], atol=1e-5)
  init = tasks.build_task(clf_config()).init_params(0)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), init, runs[4])
  assert max(jax.tree.leaves(moved)) > 1e-4  # the 4 steps really trained


def test_stream_lm_trains_and_evaluates(tmp_path):
  """Stream mode carries the LSTM state; eval batches (4 rows) differ from train batches (8)."""
  config = lm_config(max_steps=6)
  config.data.update(lm_mode="stream", bptt=16, eval_batch_size=4)
  summary = commands.pretrain(config, tmp_path / "lm", progress=False)
  assert summary["steps"] == 6
  assert np.isfinite(summary["test_perplexity"]) and 1 < summary["test_perplexity"] < 300
  assert np.isfinite(summary["valid"]["perplexity"])
  assert [r["step"] for r in _rows(tmp_path / "lm", "valid")] == [6]
  out = commands.evaluate(tmp_path / "lm", split="test", which="latest")
  assert out["perplexity"] == pytest.approx(summary["test_perplexity"], rel=1e-4)


@pytest.mark.parametrize("kind", ["word", "sentencepiece"])
def test_lm_perplexity_per_word_is_the_same_text_whatever_the_vocabulary(tmp_path, kind):
  """exp(total NLL / (whitespace words + one <eos> per text)), by hand from the summary: the
  figure that compares a word LM with a SentencePiece one (pieces per word > 1 lowers the
  per-token perplexity, not this one)."""
  config = lm_config(max_steps=3)
  config.tokenizer.kind = kind
  summary = commands.pretrain(config, tmp_path / "lm", progress=False)
  records = tasks.read_split(config, config.data.test_split, labeled=False)
  words = sum(len(r.text.split()) for r in records) + len(records)
  assert summary["test_words"] == words
  nll = np.log(summary["test_perplexity"]) * summary["test_tokens"]
  assert summary["test_word_perplexity"] == pytest.approx(np.exp(nll / words), rel=1e-6)
  assert 0 <= summary["test_unk_rate"] < 1
  if kind == "sentencepiece":  # more pieces than words: per word is the larger figure
    assert summary["test_tokens"] > words
    assert summary["test_word_perplexity"] > summary["test_perplexity"]
  out = commands.evaluate(tmp_path / "lm", split="test", which="latest")
  assert out["word_perplexity"] == pytest.approx(summary["test_word_perplexity"], rel=1e-5)
  assert out["unk_rate"] == summary["test_unk_rate"]


def test_sampled_lm_reports_train_loss_not_perplexity(tmp_path):
  """exp(sampled training loss) is not a perplexity: train rows omit it, held-out rows are exact."""
  config = lm_config(max_steps=3)
  config.model.update(output="sampled", num_sampled=16)
  summary = commands.pretrain(config, tmp_path / "lm", progress=False)
  train_rows = _rows(tmp_path / "lm", "train")
  assert train_rows and all("loss" in r and "perplexity" not in r for r in train_rows)
  valid = _rows(tmp_path / "lm", "valid")[-1]
  assert valid["perplexity"] == pytest.approx(np.exp(valid["loss"]), rel=1e-6)
  assert 1 < summary["test_perplexity"] < 300


@pytest.mark.parametrize("num_devices", [1, 4])
def test_stream_lm_resume_continues_the_carried_state(tmp_path, num_devices):
  """Stream mode: a rerun restores the LSTM state carried between batches, not a zero state."""
  def config(max_steps):
    c = lm_config(max_steps=max_steps, num_devices=num_devices)
    c.data.update(lm_mode="stream", bptt=16, eval_batch_size=4)
    return c

  commands.pretrain(config(6), tmp_path / "one_go", progress=False)
  commands.pretrain(config(3), tmp_path / "resumed", progress=False)
  commands.pretrain(config(6), tmp_path / "resumed", progress=False)
  a, b = _rows(tmp_path / "one_go", "train"), _rows(tmp_path / "resumed", "train")
  assert [x["step"] for x in a] == [x["step"] for x in b] == list(range(1, 7))
  np.testing.assert_allclose([x["loss"] for x in a], [x["loss"] for x in b], rtol=0, atol=1e-6)
  _assert_trees_close(checkpoint.restore_params(tmp_path / "one_go"),
                      checkpoint.restore_params(tmp_path / "resumed"), atol=1e-6)


def test_progress_bar_shows_the_latest_held_out_metric():
  from jaxlm.train import loop
  train = {"loss": 5.25, "tokens_per_sec": 11608.7, "count": 100.0}  # a sampled LM: no perplexity
  assert loop._postfix(train, {"loss": 4.91, "perplexity": 135.72, "count": 9.0}) == {
      "loss": "5.25", "tok/s": "1.161e+04", "valid_ppl": "135.7"}
  assert loop._postfix({"loss": 0.3, "accuracy": 0.9}, {}) == {"loss": "0.3", "accuracy": "0.9"}


@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_best_checkpoint_follows_the_selection_metric(tmp_path, metric):
  """select_metric=accuracy keeps the highest validation accuracy, =loss the lowest loss; the
  checkpoint `evaluate --which best` reads is the step the loop reported."""
  config = clf_config(num_epochs=4)
  config.finetune.select_metric = metric
  summary = commands.finetune(config, tmp_path / "run", progress=False)
  valid = _rows(tmp_path / "run", "valid")
  pick = max if metric == "accuracy" else min
  # Ties in the metric go to the lower loss, so compare (metric, loss) as the loop does.
  sign = 1 if metric == "accuracy" else -1
  expected = max(valid, key=lambda r: (sign * r[metric], -r["loss"]))
  assert summary["best_valid"]["step"] == expected["step"]
  assert summary["best_valid"]["value"] == pick(r[metric] for r in valid)
  with checkpoint.Checkpointer(tmp_path / "run", read_only=True) as ckpt:
    assert ckpt.best_step() == expected["step"]
