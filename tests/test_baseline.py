"""The linear n-gram baseline: it learns, it is scored on the classifier's own records, and every
classifier summary carries it (jaxlm/baseline.py)."""
import json

import numpy as np
import pytest

from jaxlm import baseline, cli, config as config_lib
from jaxlm.errors import ConfigError
from cli_helpers import run
from test_cli import CLF_ARGS

pytest.importorskip("sklearn")

POSITIVE = ["great", "wonderful", "loved", "superb", "moving"]
NEGATIVE = ["awful", "boring", "hated", "dull", "terrible"]


def _reviews(n, seed):
  """Texts whose label is decided by sentiment words drowned in shared filler."""
  rng = np.random.default_rng(seed)
  filler = [f"w{i}" for i in range(300)]
  texts, labels = [], []
  for i in range(n):
    label = i % 2
    words = list(rng.choice(filler, 30)) + list(rng.choice(POSITIVE if label else NEGATIVE, 2))
    rng.shuffle(words)
    texts.append(" ".join(words))
    labels.append(label)
  return texts, labels


@pytest.mark.parametrize("kind", ["nb_logreg", "tfidf_logreg"])
def test_learns_a_separable_task_and_reports_what_it_ran(kind):
  train, test = _reviews(400, 0), _reviews(200, 1)
  out = baseline.fit_and_score(*train, *test, kind=kind, ngram_max=2)
  assert out["kind"] == kind and out["ngram_max"] == 2
  assert out["accuracy"] > 0.95 and out["loss"] < 0.4
  assert out["train_examples"] == 400 and out["test_examples"] == 200 and out["features"] > 300
  # Shuffled labels carry no signal: the same model falls to chance on the test set.
  shuffled = list(np.random.default_rng(2).permutation(train[1]))
  chance = baseline.fit_and_score(train[0], shuffled, *test, kind=kind)
  assert abs(chance["accuracy"] - 0.5) < 0.12


@pytest.mark.parametrize("kind", ["nb_logreg", "tfidf_logreg"])
def test_refitting_gives_the_same_model_to_the_bit(kind):
  # A run's summary and `evaluate --with_linear` fit the baseline separately: they must agree.
  train, test = _reviews(400, 3), _reviews(100, 4)
  first = baseline.fit(*train, kind=kind).probabilities(test[0], 2)
  second = baseline.fit(*train, kind=kind).probabilities(test[0], 2)
  np.testing.assert_array_equal(first, second)


def test_more_than_two_classes_use_tfidf_and_one_class_is_skipped():
  texts = [f"topic{i % 3} word{i % 3} filler" for i in range(90)]
  labels = [i % 3 for i in range(90)]
  out = baseline.fit_and_score(texts, labels, texts, labels, kind="nb_logreg")
  assert out["kind"] == "tfidf_logreg" and out["accuracy"] == 1.0
  assert "one class" in baseline.fit_and_score(texts, [0] * 90, texts, labels)["skipped"]
  assert baseline.fit_and_score(texts, labels, texts, labels, kind="none")["kind"] == "none"


def test_bad_baseline_config_is_one_error():
  config = config_lib.classifier_config()
  config.baseline.kind = "svm"
  with pytest.raises(ConfigError, match="config.baseline.kind='svm'"):
    config_lib.validate(config)


def test_finetune_summary_and_log_carry_the_baseline(tmp_path, capsys):
  code, out, err = run(capsys, "finetune", *CLF_ARGS, "--workdir", tmp_path / "clf")
  assert code == 0, err
  summary = json.loads((tmp_path / "clf" / "summary.json").read_text())
  lin = summary["linear_baseline"]
  assert lin["kind"] == "nb_logreg" and 0 <= lin["accuracy"] <= 1
  # The same test records as the classifier; the train records minus its validation hold-out.
  assert lin["test_examples"] == summary["test_examples"]
  assert lin["train_examples"] == summary["train_records"]
  assert "linear baseline (NB-logreg, 1-2-grams)" in out


def test_the_baseline_key_can_change_on_resume(tmp_path, capsys):
  work = tmp_path / "clf"
  assert run(capsys, "finetune", *CLF_ARGS, "--workdir", work)[0] == 0
  code, out, err = run(capsys, "finetune", *CLF_ARGS, "--workdir", work,
                       "--config.baseline.kind=none")
  assert code == 0, err
  assert json.loads((work / "summary.json").read_text())["linear_baseline"]["kind"] == "none"
  assert "linear baseline skipped" in out
