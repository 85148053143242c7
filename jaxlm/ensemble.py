"""Ensembles of classifier workdirs: their class probabilities averaged, text by text.

ULMFiT's best IMDB figure averages a forward and a backward classifier (each fine-tuned from its
own LM, `data.reverse`); any classifiers of the same classes combine the same way. Each member
reads the text as it was trained to (its own tokenizer, direction and truncation), so a forward
word-level model and a backward SentencePiece one are a valid pair.

`jaxlm evaluate --workdir A,B` and `jaxlm predict --workdir A,B` (or a list of workdirs from
Python) use this module; one workdir is the plain single-model path.

`--with_linear` adds the first member's linear n-gram model (jaxlm/baseline.py, fitted on that
run's own train records, validation hold-out excluded) as one more member: a word-order model
and a bag of n-grams err on different reviews, so their average can beat both (Mesnil et al.
2014 ensemble an RNN LM, paragraph vectors and NBSVM the same way on IMDB).
"""
from __future__ import annotations

import pathlib

import numpy as np

from jaxlm import checkpoint, metrics, tasks
from jaxlm.errors import ConfigError


def members(workdirs) -> list[pathlib.Path]:
  """`A,B` or a list -> paths; at least one."""
  if isinstance(workdirs, (str, pathlib.Path)):
    if pathlib.Path(str(workdirs)).exists():  # one workdir whose name has a comma
      return [pathlib.Path(str(workdirs))]
    workdirs = [w for w in str(workdirs).split(",") if w.strip()]
  paths = [pathlib.Path(str(w).strip()) for w in workdirs]
  if not paths:
    raise ConfigError("an ensemble needs at least one workdir")
  return paths


def _check_compatible(configs: list, paths: list[pathlib.Path]) -> None:
  first = configs[0]
  for config, path in zip(configs, paths):
    if config.task != "classifier":
      raise ConfigError(f"{path} holds a {config.task} run; an ensemble averages classifiers")
    if config.model.num_classes != first.model.num_classes:
      raise ConfigError(f"{path} has {config.model.num_classes} classes, {paths[0]} has "
                        f"{first.model.num_classes}: an ensemble's members must share their classes")


def linear_member(workdirs):
  """The first member's linear model, fitted on its run's train records."""
  from jaxlm import baseline
  first = checkpoint.load_config(members(workdirs)[0])
  _check_compatible([first], members(workdirs)[:1])
  return baseline.fit_for_config(first)


def probabilities(workdirs, texts, *, which: str = "best",
                  linear=None) -> tuple[np.ndarray, list[np.ndarray]]:
  """(mean over members, each member's) [len(texts), classes] probabilities; `linear` (a fitted
  baseline.LinearModel, or True to fit the first member's) is the last member."""
  from jaxlm import commands
  paths = members(workdirs)
  configs = [checkpoint.load_config(p) for p in paths]
  _check_compatible(configs, paths)
  if linear is True:
    linear = linear_member(paths)
  texts = list(texts)
  each = []
  for path in paths:
    config, tokenizer, model, params, model_state = commands._load_run(path, which)
    each.append(commands.class_probabilities(config, tokenizer, model, params, texts, model_state))
  if linear:
    each.append(linear.probabilities(texts, configs[0].model.num_classes))
  return np.mean(each, axis=0), each


def evaluate(workdirs, *, split: str = "test", which: str = "best", max_examples: int = 0,
             with_linear: bool = False) -> dict:
  """Accuracy, log loss and confusion of the averaged probabilities on `split` of the first
  member's data source (every member's own accuracy beside it; the linear one's as `linear`)."""
  paths = members(workdirs)
  configs = [checkpoint.load_config(p) for p in paths]
  _check_compatible(configs, paths)
  linear = linear_member(paths) if with_linear else None
  records = tasks.read_split(configs[0], split, labeled=True, max_examples=max_examples)
  labels = np.array([r.label for r in records])
  mean, each = probabilities(paths, [r.text for r in records], which=which, linear=linear)
  out = metrics.probability_scores(mean, labels)
  names = [str(p) for p in paths] + ([linear.describe()] if linear else [])
  out["members"] = [dict(workdir=name, **{k: v for k, v in metrics.probability_scores(
      m, labels).items() if k != "confusion"}) for name, m in zip(names, each)]
  return out
