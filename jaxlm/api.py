"""The Python API: jaxlm's commands as functions that return their results (notebooks, scripts).

    import jaxlm
    config = jaxlm.get_config("quickstart:finetune", {"train.num_epochs": 2})
    lm = jaxlm.pretrain("quickstart:pretrain", "runs/lm")           # -> summary dict
    clf = jaxlm.finetune(config, "runs/clf", init_from="runs/lm")   # -> summary dict
    table = jaxlm.compare(config, "runs/cmp", init_from="runs/lm", strategies="scratch,full,head")
    run = jaxlm.load("runs/clf")                                    # model, params, tokenizer, config
    run.predict(["not good at all"])    # -> [{"text", "label", "probability"}]

Why a layer of its own, and why so thin: a notebook wants return values, not printed lines, and
configs as Python values, not `--config.key=value` strings; everything else must be what the CLI
does, so each function here resolves its config and calls the same jaxlm/commands.py (or
jaxlm/compare.py) function the CLI calls. Nothing is printed unless `verbose=True`, which prints
the CLI's progress lines; progress bars (tqdm.auto: widgets in Jupyter and Colab, text on a
terminal) stay on unless `progress=False`. Errors are the CLI's one-line ones, raised
(`jaxlm.errors.ConfigError`, `DataError`, `CheckpointError`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

from jaxlm import config as config_lib
from jaxlm.errors import ConfigError, DataError

PathLike = str | os.PathLike
ConfigLike = str | os.PathLike | ml_collections.ConfigDict


# --- configs ------------------------------------------------------------------------------------


def get_config(name_or_path: ConfigLike, overrides: Mapping | None = None,
               part: str | None = None) -> ml_collections.ConfigDict:
  """The config `--config NAME_OR_PATH[:part]` means, with `overrides` applied; locked as the CLI's
  is, so a misspelt key is an error instead of a new field.

  `name_or_path`: a shipped config's name (`imdb_lm`, `quickstart:pretrain`), a config file, or a
  ConfigDict (copied, never changed). `overrides`: `{"train.num_epochs": 2}` or nested,
  `{"train": {"num_epochs": 2}}`, as `--config.train.num_epochs=2` would set it; an unknown key
  is a ConfigError naming it.
  """
  if isinstance(name_or_path, ml_collections.ConfigDict):
    if part is not None:
      raise ConfigError(f"part={part!r} picks a part of a named config; a ConfigDict is one already "
                        "(pass config.pretrain, say)")
    config = copy.deepcopy(name_or_path)
  else:
    name = str(name_or_path)
    if part is None and not pathlib.Path(name).is_file() and ":" in name:
      name, _, part = name.partition(":")  # as the CLI's `--config NAME:part`
    config = config_lib.get_config(name, part or None)
  config.lock()
  apply_overrides(config, overrides or {})
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping) -> None:
  """Sets each `dotted.key: value` (nested mappings are flattened along the config's blocks) in
  `config`, in place; an unknown key or a value of the wrong type is a ConfigError naming it."""
  if not isinstance(overrides, Mapping):
    raise ConfigError(f"overrides must be a dict of config keys to values, got "
                      f"{type(overrides).__name__}")
  for key, value in _flatten(config, overrides, "").items():
    node, leaf = _parent(config, key)
    try:
      node[leaf] = tuple(value) if isinstance(value, list) else value
    except (TypeError, ValueError):
      current = node[leaf]
      if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config.{key} is a block of keys, not a value: override its fields "
                          f"(e.g. {key}.{next(iter(current.keys()), 'KEY')})") from None
      raise ConfigError(f"config.{key}={value!r}: expected {type(current).__name__} (like "
                        f"{current!r}), got {type(value).__name__}") from None


def _flatten(config, overrides: Mapping, prefix: str) -> dict:
  out = {}
  for key, value in overrides.items():
    if not isinstance(key, str) or not key:
      raise ConfigError(f"config override keys are dotted strings, got {key!r}")
    dotted = prefix + key
    node, leaf = _parent(config, dotted)
    if isinstance(value, Mapping) and isinstance(node[leaf], ml_collections.ConfigDict):
      out.update(_flatten(config, value, dotted + "."))
    else:
      out[dotted] = value
  return out


def _parent(config, dotted: str):
  """(block, last key) of `dotted` in `config`, checking that every key on the way exists."""
  node, parts = config, dotted.split(".")
  for i, part in enumerate(parts):
    where = "config." + ".".join(parts[:i]) if i else "the config"
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"unknown config key {dotted!r}: {where} is a value "
                        f"({node!r}), not a block of keys")
    if part not in node:
      close = difflib.get_close_matches(part, list(node.keys()), n=1)
      hint = f"; did you mean {'.'.join(parts[:i] + close)!r}?" if close else \
          f" (it has: {', '.join(node.keys())})"
      raise ConfigError(f"unknown config key {dotted!r}: {where} has no {part!r}{hint}")
    if i == len(parts) - 1:
      return node, part
    node = node[part]


# --- what the CLI's commands do -----------------------------------------------------------------


@contextlib.contextmanager
def _quiet(verbose: bool):
  """The commands' progress lines on or off; orbax's routine absl WARNINGs off (as in the CLI)
  unless `verbose`."""
  from absl import logging as absl_logging

  from jaxlm import commands
  before = absl_logging.get_verbosity()
  if not verbose:
    absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    with commands.verbosity(verbose):
      yield
  finally:
    absl_logging.set_verbosity(before)


def pretrain(config: ConfigLike, workdir: PathLike, *, overrides: Mapping | None = None,
             overwrite: bool = False, progress: bool = True, verbose: bool = False) -> dict:
  """`jaxlm pretrain`: trains (or resumes) the run in `workdir`; returns its summary.json (an LM's
  test and unigram perplexity, a pretrained classifier's test accuracy)."""
  from jaxlm import commands
  config = get_config(config, overrides)
  with _quiet(verbose):
    return commands.pretrain(config, workdir, progress=progress, overwrite=overwrite)


def finetune(config: ConfigLike, workdir: PathLike, *, init_from: PathLike | None = None,
             overrides: Mapping | None = None, overwrite: bool = False, progress: bool = True,
             verbose: bool = False) -> dict:
  """`jaxlm finetune [--init-from DIR]`: grafts the pretrained run in `init_from` (none: from
  scratch), trains with the config's freezing strategy and tests the best checkpoint; returns the
  summary.json, with the graft report under "graft_report" when one was written."""
  from jaxlm import commands
  config = get_config(config, overrides)
  with _quiet(verbose):
    summary = commands.finetune(config, workdir, init_from=init_from, progress=progress,
                                overwrite=overwrite)
  report = pathlib.Path(workdir) / "graft_report.json"
  if init_from is not None and report.is_file():
    summary = {**summary, "graft_report": json.loads(report.read_text())}
  return summary


def compare(config: ConfigLike, workdir: PathLike, *, init_from: PathLike | None,
            strategies: str = "scratch,full,head,top_k=1", overrides: Mapping | None = None,
            progress: bool = True, verbose: bool = False) -> dict:
  """`jaxlm compare`: fine-tunes every strategy (`scratch,full,head,top_k=1,gradual,...`) into
  `workdir/STRATEGY` and returns compare.json's contents (`format_compare` gives the table;
  `workdir/compare.png` is the plot)."""
  from jaxlm import compare as compare_lib
  config = get_config(config, overrides)
  with _quiet(verbose):
    return compare_lib.compare(config, workdir, init_from=init_from, strategies=strategies,
                               progress=progress)


def evaluate(workdir: PathLike, *, split: str = "test", which: str = "best",
             step: int | None = None, max_examples: int = 0, with_linear: bool = False,
             verbose: bool = False) -> dict:
  """`jaxlm evaluate`: accuracy, loss and confusion matrix (classifier) or perplexity (LM) of a
  workdir's checkpoint on `split` of its data source; a list of classifier workdirs (or
  `with_linear`, the run's linear n-gram model as a member) is scored as an ensemble."""
  from jaxlm import commands
  with _quiet(verbose):
    return commands.evaluate(workdir, split=split, which=which, step=step,
                             max_examples=max_examples, with_linear=with_linear)


def quickstart(workdir: PathLike = "runs/quickstart", *, config: ConfigLike = "quickstart",
               overrides: Mapping | None = None, progress: bool = True,
               verbose: bool = False) -> dict:
  """`jaxlm quickstart`: pretrain -> graft -> fine-tune on few labels beside the same classifier
  from scratch; returns the top-level summary.json (`format_quickstart` gives the table).
  `overrides` address the two parts: `{"pretrain.train.max_steps": 50}`."""
  from jaxlm import commands
  config = get_config(config, overrides)
  with _quiet(verbose):
    return commands.quickstart(config, workdir, progress=progress)


def format_quickstart(summary: dict) -> str:
  """The table `jaxlm quickstart` prints, from what `quickstart` returned."""
  from jaxlm import commands
  return commands.format_quickstart_table(summary)


def format_compare(result: dict) -> str:
  """compare.md, the Markdown table `jaxlm compare` prints, from what `compare` returned."""
  from jaxlm import compare as compare_lib
  return compare_lib.format_markdown(result)


def inspect(path_or_config, *, strategy=None, epoch: int = 0, step: int | None = None,
            which: str | None = None):
  """`jaxlm inspect`: the parameter tree of a workdir, checkpoint step, config file or name, or a
  ConfigDict, as a `jaxlm.inspection.Inspection` (`.to_dict()`; `format_inspection` the table)."""
  from jaxlm import inspection
  with _quiet(False):
    return inspection.inspect(path_or_config, strategy=strategy, epoch=epoch, step=step,
                              which=which)


def diff(a, b, *, step: int | None = None, which: str | None = None):
  """`jaxlm inspect A --diff B`: two parameter trees compared by path (`jaxlm.inspection.Diff`)."""
  from jaxlm import inspection
  with _quiet(False):
    return inspection.diff(a, b, step=step, which=which)


def format_inspection(inspection_or_diff) -> str:
  """The table `jaxlm inspect` prints for an Inspection (or, for a Diff, the diff's)."""
  from jaxlm import inspection
  if isinstance(inspection_or_diff, inspection.Diff):
    return inspection.format_diff(inspection_or_diff)
  return inspection.format_inspection(inspection_or_diff)


# --- a trained run in memory --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Run:
  """A run read back from its workdir: its config, tokenizer, Flax model, params and model state
  (the running averages of a batch-normalised head, else `{}`), which are all `evaluate` and
  `predict` need. `model.apply({"params": run.params, **run.model_state}, ...)` is the plain model."""
  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  tokenizer: Any
  model: Any
  params: Any
  model_state: Any = dataclasses.field(default_factory=dict)

  @property
  def task(self) -> str:
    return self.config.task

  @property
  def summary(self) -> dict | None:
    """The run's summary.json (its test figures), if training finished."""
    path = self.workdir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None

  def predict(self, texts: str | Iterable[str]) -> list[dict]:
    """`{"text", "label", "probability"}` per text, in order: what `jaxlm predict` prints (a
    single string is one text)."""
    from jaxlm import commands
    if self.task != "classifier":
      raise ConfigError(f"{self.workdir} holds a {self.task} run: predict needs a classifier "
                        "workdir (an LM scores texts with .perplexity(texts))")
    return commands.classify(self.config, self.tokenizer, self.model, self.params, _texts(texts),
                             self.model_state)

  def perplexity(self, texts: str | Iterable[str]) -> dict:
    """An LM's perplexity and loss over `texts` (each read as one review, as its test split is),
    and the number of tokens scored: `jaxlm evaluate`'s figures for texts of your own."""
    from jaxlm import tasks
    from jaxlm.data.sources import Record
    from jaxlm.train import loop
    if self.task != "lm":
      raise ConfigError(f"{self.workdir} holds a {self.task} run: perplexity needs a language-model "
                        "workdir (a classifier labels texts with .predict(texts))")
    texts = _texts(texts)
    if not texts:
      raise DataError("perplexity needs at least one text")
    return tasks.TASKS["lm"].evaluate_records(
        self.config, self.tokenizer, self.model, self.params, loop.Devices.create(1),
        [Record(text, -1) for text in texts], model_state=self.model_state)

  def __repr__(self) -> str:
    from jaxlm import params as params_lib
    return (f"Run({str(self.workdir)!r}: {self.task}, {self.config.model.name}, "
            f"{params_lib.count_params(self.params):,} parameters)")


def _texts(texts) -> list[str]:
  texts = [texts] if isinstance(texts, str) else list(texts)
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(f"texts[{i}] is a {type(text).__name__}, not a str")
  return texts


def load(workdir: PathLike, which: str = "best", step: int | None = None) -> Run:
  """The run in `workdir` at its best checkpoint (`which="latest"`, or `step=N`, for another); a
  run that selects no best checkpoint (an LM) is read at its latest."""
  from jaxlm import checkpoint, commands, tasks
  workdir = pathlib.Path(workdir)
  config = checkpoint.load_config(workdir)
  if which == "best" and tasks.TASKS[config.task].select_metric(config) is None:
    which = "latest"
  with _quiet(False):
    config, tokenizer, model, params, model_state = commands._load_run(workdir, which, step)
  return Run(workdir, config, tokenizer, model, params, model_state)
