"""Ensembles: `evaluate` / `predict` over several classifier workdirs average their probabilities
(jaxlm/ensemble.py), each member reading text its own way (here a forward and a backward model)."""
import json

import numpy as np
import pytest

from jaxlm import commands, ensemble
from cli_helpers import run
from test_cli import CLF_ARGS


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  root = tmp_path_factory.mktemp("ens")
  from jaxlm import cli
  for name, extra in (("fwd", []), ("bwd", ["--config.data.reverse=True", "--config.train.seed=1"])):
    assert cli.main(["jaxlm", "finetune", *CLF_ARGS, *extra, "--workdir", str(root / name)]) == 0
  return root / "fwd", root / "bwd"


def test_ensemble_probabilities_are_the_members_mean(pair):
  texts = ["a fine film", "dull and long", ""]
  mean, each = ensemble.probabilities(list(pair), texts)
  assert mean.shape == (3, 2) and len(each) == 2
  np.testing.assert_allclose(mean, (each[0] + each[1]) / 2)
  np.testing.assert_allclose(mean.sum(axis=1), 1.0)
  # Each member's probabilities are what that workdir alone predicts.
  for workdir, probs in zip(pair, each):
    alone = commands.predict(workdir, texts)
    np.testing.assert_allclose([r["probability"] for r in alone], probs.max(axis=1), rtol=1e-6)


def test_evaluate_an_ensemble_reports_it_and_its_members(pair, capsys):
  code, out, err = run(capsys, "evaluate", "--workdir", f"{pair[0]},{pair[1]}")
  assert code == 0, err
  assert "ensemble of 2" in out and out.count("member ") == 2
  result = ensemble.evaluate(list(pair))
  assert result["count"] == 40 and sum(map(sum, result["confusion"])) == 40
  singles = [commands.evaluate(w) for w in pair]
  for member, single in zip(result["members"], singles):
    assert member["accuracy"] == pytest.approx(single["accuracy"])
    assert member["loss"] == pytest.approx(single["loss"], rel=1e-4)


def test_predict_with_an_ensemble_and_bad_members(pair, capsys, tmp_path):
  code, out, err = run(capsys, "predict", "--workdir", f"{pair[0]},{pair[1]}", "great", "awful")
  assert code == 0, err
  rows = [json.loads(l) for l in out.strip().splitlines()[-2:]]
  assert [r["text"] for r in rows] == ["great", "awful"] and all(0.5 <= r["probability"] <= 1 for r in rows)
  code, _, err = run(capsys, "evaluate", "--workdir", f"{pair[0]},{tmp_path / 'nope'}")
  assert code == 2 and len(err.strip().splitlines()) == 1
  code, _, err = run(capsys, "evaluate", "--workdir", f"{pair[0]},{pair[1]}", "--step", "1")
  assert code == 2 and "--step" in err


def test_a_workdir_with_a_comma_in_its_name_is_one_member(tmp_path):
  odd = tmp_path / "lr=1e-3,bs=32"
  odd.mkdir()
  assert ensemble.members(str(odd)) == [odd]
  assert len(ensemble.members(f"{tmp_path / 'a'},{tmp_path / 'b'}")) == 2


def test_with_linear_adds_the_runs_ngram_model_as_a_member(pair, capsys):
  pytest.importorskip("sklearn")
  from jaxlm import baseline, checkpoint
  texts = ["a fine film", "dull and long", ""]
  linear = ensemble.linear_member([pair[0]])
  # Fitted on the run's own train records, validation hold-out excluded, like its summary's baseline.
  config = checkpoint.load_config(pair[0])
  assert linear.train_examples == len(baseline.train_records(config))
  mean, each = ensemble.probabilities([pair[0]], texts, linear=linear)
  assert len(each) == 2
  np.testing.assert_allclose(each[1], linear.probabilities(texts, 2))
  np.testing.assert_allclose(mean, (each[0] + each[1]) / 2)
  # One workdir with --with_linear is an ensemble of two; the linear member's own accuracy is
  # the figure the run's summary reports as its baseline (same train and test records).
  code, out, err = run(capsys, "evaluate", "--workdir", str(pair[0]), "--with_linear")
  assert code == 0, err
  assert "ensemble of 2" in out and "linear (NB-logreg, 1-2-grams)" in out
  result = ensemble.evaluate([pair[0]], with_linear=True)
  summary = json.loads((pair[0] / "summary.json").read_text())
  assert result["members"][1]["accuracy"] == pytest.approx(summary["linear_baseline"]["accuracy"])
  assert result["members"][1]["loss"] == pytest.approx(summary["linear_baseline"]["loss"], rel=1e-6)
  code, out, err = run(capsys, "predict", "--workdir", f"{pair[0]},{pair[1]}", "--with_linear", "great")
  assert code == 0, err
  row = json.loads(out.strip().splitlines()[-1])
  assert row["text"] == "great" and 0.5 <= row["probability"] <= 1


def test_linear_probabilities_fill_every_class_column():
  pytest.importorskip("sklearn")
  from jaxlm import baseline
  texts = ["good fun", "great fun", "bad bore", "awful bore"] * 5
  linear = baseline.fit(texts, [0, 0, 2, 2] * 5, kind="tfidf_logreg")
  probs = linear.probabilities(["good", "bore"], num_classes=3)
  assert probs.shape == (2, 3) and np.all(probs[:, 1] == 0)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0)
  assert probs[0, 0] > 0.5 and probs[1, 2] > 0.5
  with pytest.raises(baseline.Unavailable, match="one class"):
    baseline.fit(texts, [1] * len(texts))
