"""A linear bag-of-n-grams classifier beside every deep classifier: does the model earn its cost?

On IMDB a logistic regression on n-gram features is a strong baseline (RESULTS.md): a pretrained
LSTM that loses to it has not paid for its hours. Every classifier summary (`finetune`,
`pretrain` of a classifier, `compare`, `quickstart`) therefore carries the figure of a linear
model trained on the same labelled records and scored on the same test records.

Kinds (`config.baseline.kind`):
  * `nb_logreg` - Wang & Manning's NB weighting (NBSVM's features) with a logistic regression:
    binary n-gram indicators scaled by the log-count ratio r = log(p/|p|) - log(q/|q|) of the two
    classes. Two classes only; with more it falls back to `tfidf_logreg`.
  * `tfidf_logreg` - sublinear TF-IDF n-grams, multinomial logistic regression.
  * `none` - skip it.

scikit-learn is an optional extra (`pip install 'jaxlm[baseline]'`): without it the summary says
the baseline was skipped and why, and nothing else changes.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from jaxlm.errors import ConfigError

KINDS = ("nb_logreg", "tfidf_logreg", "none")
# Words, and the punctuation that carries sentiment ("!", "?"): scikit-learn's default pattern
# drops both one-letter words and punctuation.
TOKEN_PATTERN = r"(?u)\b\w+\b|[!?]"


def validate(cfg) -> None:
  if cfg.kind not in KINDS:
    raise ConfigError(f"config.baseline.kind={cfg.kind!r} is not one of {', '.join(KINDS)}")
  if cfg.ngram_max < 1:
    raise ConfigError(f"config.baseline.ngram_max must be >= 1, got {cfg.ngram_max}")
  if cfg.C <= 0:
    raise ConfigError(f"config.baseline.C must be > 0, got {cfg.C}")


def fit_and_score(train_texts: Sequence[str], train_labels: Sequence[int],
                  test_texts: Sequence[str], test_labels: Sequence[int], *,
                  kind: str = "nb_logreg", ngram_max: int = 2, C: float = 1.0,
                  min_df: int = 2) -> dict:
  """Train the linear model on the train records and score it on the test records.

  Returns `accuracy`, `loss` (mean log loss), `kind` (the one used), `ngram_max`, `features`,
  `train_examples`, `test_examples`, `seconds`; or `{"kind": "none", "skipped": reason}`.
  """
  if kind == "none":
    return {"kind": "none", "skipped": "config.baseline.kind=none"}
  try:
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
  except ImportError:
    return {"kind": kind, "skipped": "scikit-learn is not installed (pip install 'jaxlm[baseline]')"}
  t0 = time.perf_counter()
  y_train, y_test = np.asarray(train_labels), np.asarray(test_labels)
  classes = np.unique(y_train)
  if len(classes) < 2:
    return {"kind": kind, "skipped": f"the train records hold one class only ({classes.tolist()})"}
  if kind == "nb_logreg" and len(classes) > 2:
    kind = "tfidf_logreg"
  # min_df drops n-grams seen once: they cannot generalise and would double the feature count.
  min_df = min_df if len(train_texts) >= 50 * min_df else 1
  if kind == "nb_logreg":
    vectorizer = CountVectorizer(ngram_range=(1, ngram_max), min_df=min_df, binary=True,
                                 token_pattern=TOKEN_PATTERN)
    x_train = vectorizer.fit_transform(train_texts)
    ratio = _log_count_ratio(x_train, y_train == classes[1])
    x_train = x_train.multiply(ratio).tocsr()
    x_test = vectorizer.transform(test_texts).multiply(ratio).tocsr()
    model = LogisticRegression(C=C, solver="liblinear", dual=True, max_iter=2000)
  else:
    vectorizer = TfidfVectorizer(ngram_range=(1, ngram_max), min_df=min_df, sublinear_tf=True,
                                 token_pattern=TOKEN_PATTERN)
    x_train = vectorizer.fit_transform(train_texts)
    x_test = vectorizer.transform(test_texts)
    model = LogisticRegression(C=C * 16, max_iter=2000)  # TF-IDF rows have unit norm: weaker C
  model.fit(x_train, y_train)
  probs = model.predict_proba(x_test)
  predicted = model.classes_[np.argmax(probs, axis=1)]
  return {"kind": kind, "ngram_max": ngram_max, "C": C, "features": int(x_train.shape[1]),
          "accuracy": float(np.mean(predicted == y_test)),
          "loss": float(log_loss(y_test, probs, labels=model.classes_)),
          "train_examples": len(train_texts), "test_examples": len(test_texts),
          "seconds": time.perf_counter() - t0}


def _log_count_ratio(x, positive: np.ndarray, alpha: float = 1.0) -> np.ndarray:
  """NBSVM's r: log of each feature's smoothed share among positive vs negative documents."""
  p = np.asarray(x[positive].sum(axis=0)).ravel() + alpha
  q = np.asarray(x[~positive].sum(axis=0)).ravel() + alpha
  return np.log(p / p.sum()) - np.log(q / q.sum())


def describe(result: dict | None) -> str:
  """One phrase for logs and tables: `NB-logreg 1-2-grams 91.47%` or why it was skipped."""
  if not result:
    return "linear baseline: not run"
  if "skipped" in result:
    return f"linear baseline skipped: {result['skipped']}"
  name = {"nb_logreg": "NB-logreg", "tfidf_logreg": "TF-IDF logreg"}[result["kind"]]
  return (f"linear baseline ({name}, 1-{result['ngram_max']}-grams) "
          f"{100 * result['accuracy']:.2f}% in {result['seconds']:.0f} s")


def for_config(config) -> dict:
  """The baseline of a classifier run: fit on the run's train records (its validation hold-out
  excluded, as for the deep model) and scored on the test records its summary reports."""
  from jaxlm import tasks
  cfg = config.get("baseline") or {"kind": "none"}
  if cfg["kind"] == "none":
    return {"kind": "none", "skipped": "config.baseline.kind=none"}
  kind = tasks.TASKS[config.task]
  records = tasks.read_split(config, config.data.train_split, labeled=True)
  train, _ = tasks.split_train_valid(kind.train_records(config, records),
                                     config.data.valid_fraction, config.train.seed)
  test = tasks.read_split(config, config.data.test_split, labeled=True,
                          max_examples=config.data.test_max_examples)
  return fit_and_score([r.text for r in train], [r.label for r in train],
                       [r.text for r in test], [r.label for r in test],
                       kind=cfg["kind"], ngram_max=cfg["ngram_max"], C=cfg["C"])
