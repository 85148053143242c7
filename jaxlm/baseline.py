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

import dataclasses
import time
from typing import Any, Sequence

import numpy as np

from jaxlm import metrics
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


class Unavailable(ConfigError):
  """The linear model cannot be fitted here (no scikit-learn, one class only): why, in one line."""


@dataclasses.dataclass
class LinearModel:
  """A fitted n-gram model: `probabilities(texts)` is what an ensemble averages (jaxlm/ensemble.py)."""
  kind: str
  ngram_max: int
  C: float
  vectorizer: Any
  ratio: np.ndarray | None  # NB log-count ratios (nb_logreg), None for TF-IDF
  model: Any
  train_examples: int
  seconds: float

  @property
  def features(self) -> int:
    return len(self.vectorizer.vocabulary_)

  def features_of(self, texts: Sequence[str]):
    x = self.vectorizer.transform(texts)
    return x.multiply(self.ratio).tocsr() if self.ratio is not None else x

  def probabilities(self, texts: Sequence[str], num_classes: int | None = None) -> np.ndarray:
    """[len(texts), num_classes] class probabilities, column c = label c (a label absent from the
    train records gets probability 0)."""
    probs = self.model.predict_proba(self.features_of(list(texts)))
    k = num_classes or int(self.model.classes_.max()) + 1
    out = np.zeros((probs.shape[0], k), np.float64)
    out[:, self.model.classes_.astype(int)] = probs
    return out

  def describe(self) -> str:
    return f"linear ({NAMES[self.kind]}, 1-{self.ngram_max}-grams)"


NAMES = {"nb_logreg": "NB-logreg", "tfidf_logreg": "TF-IDF logreg"}


def fit(train_texts: Sequence[str], train_labels: Sequence[int], *, kind: str = "nb_logreg",
        ngram_max: int = 2, C: float = 1.0, min_df: int = 2) -> LinearModel:
  """Fit the linear model on labelled texts; `Unavailable` says why it cannot be."""
  if kind == "none":
    raise Unavailable("config.baseline.kind=none")
  try:
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
  except ImportError:
    raise Unavailable("scikit-learn is not installed (pip install 'jaxlm[baseline]')") from None
  t0 = time.perf_counter()
  y_train = np.asarray(train_labels)
  classes = np.unique(y_train)
  if len(classes) < 2:
    raise Unavailable(f"the train records hold one class only ({classes.tolist()})")
  if kind == "nb_logreg" and len(classes) > 2:
    kind = "tfidf_logreg"
  # min_df drops n-grams seen once: they cannot generalise and would double the feature count.
  min_df = min_df if len(train_texts) >= 50 * min_df else 1
  ratio = None
  if kind == "nb_logreg":
    vectorizer = CountVectorizer(ngram_range=(1, ngram_max), min_df=min_df, binary=True,
                                 token_pattern=TOKEN_PATTERN)
    x_train = vectorizer.fit_transform(train_texts)
    ratio = _log_count_ratio(x_train, y_train == classes[1])
    x_train = x_train.multiply(ratio).tocsr()
    # liblinear shuffles its dual coordinates: a fixed seed makes a run's baseline reproducible.
    model = LogisticRegression(C=C, solver="liblinear", dual=True, max_iter=2000, random_state=0)
  else:
    vectorizer = TfidfVectorizer(ngram_range=(1, ngram_max), min_df=min_df, sublinear_tf=True,
                                 token_pattern=TOKEN_PATTERN)
    x_train = vectorizer.fit_transform(train_texts)
    model = LogisticRegression(C=C * 16, max_iter=2000)  # TF-IDF rows have unit norm: weaker C
  model.fit(x_train, y_train)
  return LinearModel(kind, ngram_max, C, vectorizer, ratio, model, len(train_texts),
                     time.perf_counter() - t0)


def fit_and_score(train_texts: Sequence[str], train_labels: Sequence[int],
                  test_texts: Sequence[str], test_labels: Sequence[int], *,
                  kind: str = "nb_logreg", ngram_max: int = 2, C: float = 1.0,
                  min_df: int = 2) -> dict:
  """Train the linear model on the train records and score it on the test records.

  Returns `accuracy`, `loss` (mean log loss), `kind` (the one used), `ngram_max`, `features`,
  `train_examples`, `test_examples`, `seconds`; or `{"kind": ..., "skipped": reason}`.
  """
  t0 = time.perf_counter()
  try:
    linear = fit(train_texts, train_labels, kind=kind, ngram_max=ngram_max, C=C, min_df=min_df)
  except Unavailable as e:
    return {"kind": kind, "skipped": str(e)}
  y_test = np.asarray(test_labels)
  probs = linear.probabilities(test_texts, max(int(linear.model.classes_.max()) + 1,
                                               int(y_test.max(initial=0)) + 1))
  scores = metrics.probability_scores(probs, y_test)
  return {"kind": linear.kind, "ngram_max": ngram_max, "C": C, "features": linear.features,
          "accuracy": scores["accuracy"], "loss": scores["loss"],
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
  name = NAMES[result["kind"]]
  return (f"linear baseline ({name}, 1-{result['ngram_max']}-grams) "
          f"{100 * result['accuracy']:.2f}% in {result['seconds']:.0f} s")


def train_records(config):
  """The run's labelled train records, its validation hold-out excluded (as for the deep model)."""
  from jaxlm import tasks
  kind = tasks.TASKS[config.task]
  records = tasks.read_split(config, config.data.train_split, labeled=True)
  train, _ = tasks.split_train_valid(kind.train_records(config, records),
                                     config.data.valid_fraction, config.train.seed)
  return train


def _settings(config) -> dict:
  cfg = config.get("baseline") or {"kind": "none"}
  return {"kind": cfg["kind"], "ngram_max": cfg.get("ngram_max", 2), "C": cfg.get("C", 1.0)}


def for_config(config) -> dict:
  """The baseline of a classifier run: fit on the run's train records and scored on the test
  records its summary reports."""
  from jaxlm import tasks
  settings = _settings(config)
  if settings["kind"] == "none":
    return {"kind": "none", "skipped": "config.baseline.kind=none"}
  train = train_records(config)
  test = tasks.read_split(config, config.data.test_split, labeled=True,
                          max_examples=config.data.test_max_examples)
  return fit_and_score([r.text for r in train], [r.label for r in train],
                       [r.text for r in test], [r.label for r in test], **settings)


def fit_for_config(config) -> LinearModel:
  """The run's linear model itself, fitted on its train records (an ensemble member); the kind
  is `config.baseline.kind`, NB-logreg where that is `none`."""
  settings = _settings(config)
  if settings["kind"] == "none":
    settings["kind"] = "nb_logreg"
  train = train_records(config)
  return fit([r.text for r in train], [r.label for r in train], **settings)
