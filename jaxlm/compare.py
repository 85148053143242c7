"""`jaxlm compare`: several fine-tuning strategies from one pretrained run, side by side.

A comparison is only fair if the arms differ in nothing but the strategy, so every arm is the same
config (data, budget, seed) with only `config.finetune.strategy`, `top_k` and
`discriminative_decay` changed, and `scratch` is the same model without `--init-from`. Every arm
sets all three fields, so what the table names is what ran, whatever the config file had there.

Each arm is an ordinary finetune run in `{workdir}/{arm.dirname}`; a comparison is resumed like
any run: an arm with a `summary.json` is done and read back, an interrupted one resumes from its
checkpoints. Everything a rerun could trip on (the strategy list, the pretrained run, an arm's
workdir holding another config) is checked before the first arm trains, so a typo in the last arm
does not cost the training of the first ones.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import os
import pathlib
import statistics
import sys
import types

from jaxlm import baseline, checkpoint, commands, config as config_lib, distributed, files, metrics
from jaxlm.errors import CheckpointError, ConfigError

DEFAULT_STRATEGIES = "scratch,full,head,top_k=1"
DEFAULT_DECAY = 2.6  # ULMFiT's discriminative factor: lr of a group = lr of the group above / 2.6
FORMS = ("scratch, full, head, top_k[=K] (K >= 0 groups below the head, default 1), gradual[=D], "
         f"discriminative[=D] (D > 0, default {DEFAULT_DECAY:g})")


@dataclasses.dataclass(frozen=True)
class Arm:
  """One strategy of a comparison: its table name, its sub-workdir, what it changes in
  `config.finetune`, and whether it starts from the pretrained run."""
  name: str
  dirname: str
  overrides: dict
  grafts: bool = True


def parse_strategies(spec: str) -> list[Arm]:
  """`scratch,full,head,top_k=1,gradual=2.6,discriminative` -> one Arm per item, in order."""
  arms, seen = [], {}
  for item in (spec or "").split(","):
    arm = _parse_item(item.strip(), spec)
    if arm.name in seen:
      raise ConfigError(f"strategies {spec!r}: {item.strip()!r} repeats {seen[arm.name]!r}; "
                        "each strategy may appear once")
    seen[arm.name] = item.strip()
    arms.append(arm)
  return arms


def _parse_item(item: str, spec: str) -> Arm:
  name, has_value, value = item.partition("=")
  name = name.strip()

  def bad(why: str) -> ConfigError:
    return ConfigError(f"strategies {spec!r}: {item!r} {why}; valid forms: {FORMS}")

  if name in ("scratch", "full", "head"):
    if has_value:
      raise bad("takes no value")
    strategy = "head" if name == "head" else "full"
    return Arm(name, name, _overrides(strategy), grafts=name != "scratch")
  if name == "top_k":
    k = _number(value, int, bad) if has_value else 1
    if k < 0:
      raise bad("needs K >= 0")
    return Arm(f"top_k={k}", f"top_k_{k}", _overrides("top_k", top_k=k))
  if name in ("gradual", "discriminative"):
    default = 1.0 if name == "gradual" else DEFAULT_DECAY
    d = _number(value, float, bad) if has_value else default
    if not (math.isfinite(d) and d > 0):
      raise bad("needs a decay D > 0")
    shown = name if name == "gradual" and d == 1.0 else f"{name}={d:g}"
    strategy = "gradual" if name == "gradual" else "full"
    return Arm(shown, shown.replace("=", "_"), _overrides(strategy, decay=d))
  raise bad("is not a strategy")


def _number(text: str, kind, bad):
  try:
    return kind(text.strip())
  except ValueError:
    raise bad(f"needs {'an integer' if kind is int else 'a number'} after '='") from None


def _overrides(strategy: str, *, top_k: int = 1, decay: float = 1.0) -> dict:
  return {"strategy": strategy, "top_k": int(top_k), "discriminative_decay": float(decay)}


def arm_config(config, arm: Arm):
  """`config` with the arm's `config.finetune` fields; `config` itself is left as it was."""
  cfg = copy.deepcopy(config)
  cfg.finetune.update(arm.overrides)
  return cfg


def compare(config, workdir, *, init_from, strategies=DEFAULT_STRATEGIES, progress=True) -> dict:
  """Fine-tunes every arm of `strategies` (a spec string or Arms) into `workdir/{arm.dirname}` and
  writes compare.json, compare.md and compare.png; returns what compare.json holds."""
  workdir = pathlib.Path(workdir)
  arms = parse_strategies(strategies) if isinstance(strategies, str) else list(strategies)
  config_lib.validate(config)
  if config.get("task") != "classifier" or "finetune" not in config:
    raise ConfigError(f"config.task={config.get('task')!r}: jaxlm compare fine-tunes classifiers; "
                      "use a config built on jaxlm.config.classifier_config() (see configs/)")
  init_from = pathlib.Path(init_from) if init_from is not None else None
  source = _check_source(config, arms, init_from)
  configs = {arm.name: arm_config(config, arm) for arm in arms}
  _check_strategies(config, arms, configs)
  for arm in arms:
    _check_existing(workdir / arm.dirname, configs[arm.name], init_from if arm.grafts else None)
  summaries, linear = {}, None
  for i, arm in enumerate(arms, 1):
    sub = workdir / arm.dirname
    if (sub / "summary.json").is_file():
      _log(f"compare {i}/{len(arms)} {arm.name}: {sub / 'summary.json'} exists, not retrained "
           "(delete it to rerun this arm)")
    else:
      _log(f"compare {i}/{len(arms)} {arm.name}: fine-tuning into {sub}")
      # Every arm has the same train and test records: one linear baseline serves them all.
      linear = linear or baseline.for_config(config)
      # `scratch` reads text with the pretrained run's tokenizer: only the weights differ.
      commands.finetune(configs[arm.name], sub, init_from=init_from if arm.grafts else None,
                        tokenizer_from=init_from, progress=progress, linear_baseline=linear)
      distributed.barrier(f"jaxlm compare: {arm.name} done")  # its summary.json is on disk
    # Read back from disk, also for arms just trained: a rerun then reports exactly the same.
    summaries[arm.name] = json.loads((sub / "summary.json").read_text())
  result = _result(config, workdir, arms, summaries, init_from, source)
  table = format_markdown(result)
  distributed.once(_write_results, workdir, result, table)
  _log(table)
  return result


def _write_results(workdir: pathlib.Path, result: dict, table: str) -> None:
  """compare.json, compare.md and compare.png (process 0 of a multi-host run)."""
  checkpoint.write_json_atomic(workdir / "compare.json", result)
  files.atomic_write(workdir / "compare.md", table.encode("utf-8"))
  _plot(result, workdir / "compare.png")


def _log(msg: str) -> None:
  commands._log(msg)  # quiet under commands.verbosity(False), as the Python API runs it


# --- checks before any training ---------------------------------------------------------------


def _check_source(config, arms, init_from) -> dict | None:
  """The pretrained run every grafting arm starts from: present, with a checkpoint, and of the
  config's model family; returns its model, task and headline test metric."""
  grafting = [arm.name for arm in arms if arm.grafts]
  if not grafting:
    return None
  if init_from is None:
    raise ConfigError(f"strategies {', '.join(grafting)} start from a pretrained run: pass "
                      "--init-from DIR (only 'scratch' trains without one)")
  from jaxlm import interop
  if interop.is_export(init_from):  # a safetensors export: its config.json, no checkpoints
    source_config = interop.read_export(init_from).config
  else:
    source_config = checkpoint.load_config(init_from)
  if not interop.is_export(init_from) and commands._latest_step(init_from) is None:
    raise CheckpointError(f"{init_from} has no checkpoint to graft from ({init_from / 'checkpoints'} "
                          "is missing or empty): pretrain into it first")
  commands._graft_map(source_config, config, init_from)  # same family, a known graft map
  out = {"model": source_config.model.name, "task": source_config.get("task")}
  summary_path = init_from / "summary.json"
  if summary_path.is_file():
    summary = json.loads(summary_path.read_text())
    for key in ("test_perplexity", "test_accuracy"):
      if key in summary:
        out[key] = summary[key]
  return out


def _check_strategies(config, arms, configs) -> None:
  """Every arm's strategy against the model's layer groups (e.g. top_k=5 of a 3-group model), on
  the abstract params: no data read, no weights computed."""
  from jaxlm import models
  from jaxlm.train import strategies
  params = commands._abstract_params(config, commands._vocab_size_for(config))
  family = models.family_of(config.model.name)
  for arm in arms:
    try:
      strategies.make_strategy(configs[arm.name].finetune, params, family)
    except ConfigError as e:
      raise ConfigError(f"strategy {arm.name}: {e}") from None


def _check_existing(sub: pathlib.Path, cfg, init_from) -> None:
  """An arm's workdir left by an earlier comparison must hold this arm's run: reusing (or resuming)
  a run made with other settings would put it in the table as if it were this one. Only fields both
  configs have count: a field added to jaxlm since the run was made is not a difference."""
  if (sub / "config.json").is_file():
    stored = config_lib.flat_keys(json.loads((sub / "config.json").read_text()))
    wanted = config_lib.flat_keys(json.loads(cfg.to_json_best_effort()))
    for key in sorted(set(stored) & set(wanted)):
      if stored[key] != wanted[key]:
        raise ConfigError(f"{sub} holds a run with config.{key}={stored[key]!r}, this comparison "
                          f"has {wanted[key]!r}: use another --workdir or delete {sub}")
  if (sub / "summary.json").is_file():
    had = json.loads((sub / "summary.json").read_text()).get("init_from")
    want = str(init_from) if init_from is not None else None
    if (had and os.path.realpath(had)) != (want and os.path.realpath(want)):
      raise ConfigError(f"{sub} was fine-tuned from --init-from {had}, this comparison from {want}: "
                        f"use another --workdir or delete {sub}")





# --- results ----------------------------------------------------------------------------------


def _result(config, workdir, arms, summaries, init_from, source) -> dict:
  first = summaries[arms[0].name]
  return {
      "workdir": str(workdir), "init_from": str(init_from) if source else None, "source": source,
      "model": config.model.name, "data_source": config.data.source,
      "train_records": first["train_records"], "test_examples": first["test_examples"],
      "epochs": config.train.num_epochs, "max_steps": config.train.max_steps,
      "seed": config.train.seed, "select_metric": config.finetune.select_metric,
      "majority_accuracy": first["majority_accuracy"],
      "linear_baseline": first.get("linear_baseline"),
      "arms": [_arm_row(arm, summaries[arm.name], workdir / arm.dirname) for arm in arms],
  }


def _arm_row(arm: Arm, summary: dict, sub: pathlib.Path) -> dict:
  rows = metrics.MetricsWriter(sub).read()
  curve = valid_curve(rows)
  tokens_per_sec = [r["tokens_per_sec"] for r in rows
                    if r.get("split", "train") == "train" and "tokens_per_sec" in r]
  with_acc = [p for p in curve if "accuracy" in p]
  best_acc = max(with_acc, key=lambda p: (p["accuracy"], -p["loss"]), default=None)
  low_loss = min(curve, key=lambda p: p["loss"], default=None)
  return {
      "name": arm.name, "dirname": arm.dirname, **arm.overrides, "strategy": summary["strategy"],
      "init_from": summary["init_from"],
      "test_accuracy": summary["test_accuracy"], "test_loss": summary["test_loss"],
      "best_valid_accuracy": best_acc and best_acc["accuracy"],
      "best_valid_accuracy_epoch": best_acc and best_acc["epoch"],
      "lowest_valid_loss": low_loss and low_loss["loss"],
      "lowest_valid_loss_epoch": low_loss and low_loss["epoch"],
      "selected": summary["best_valid"],
      "trainable_parameters": summary["trainable_parameters"],
      "trainable_parameters_last_epoch": summary["trainable_parameters_last_epoch"],
      "parameters": summary["parameters"], "train_seconds": summary["train_seconds"],
      "median_tokens_per_sec": statistics.median(tokens_per_sec) if tokens_per_sec else None,
      "steps": summary["steps"], "curve": curve,
  }


def valid_curve(rows: list[dict]) -> list[dict]:
  """The valid rows of a metrics.jsonl as `{epoch, loss, accuracy}`: the row's epoch, or with
  several evaluations per epoch the fractional epoch step / steps_per_epoch."""
  valid = [r for r in rows if r.get("split") == "valid" and "loss" in r]
  epochs = [r["epoch"] for r in valid]
  fractional = len(set(epochs)) < len(epochs)
  per_epoch = _steps_per_epoch(rows) if fractional else 1
  out = []
  for r in valid:
    point = {"epoch": round(r["step"] / per_epoch, 3) if fractional else r["epoch"],
             "step": r["step"], "loss": r["loss"]}
    if "accuracy" in r:
      point["accuracy"] = r["accuracy"]
    out.append(point)
  return out


def _steps_per_epoch(rows: list[dict]) -> int:
  """The loop writes a train row at the last step of every epoch, so the last step of epoch 1 is
  the epoch's length (if epoch 1 is all there is, its last row: a max_steps stop may shorten it)."""
  first = [r["step"] for r in rows if r.get("epoch") == 1]
  return max(first, default=1) or 1


def _pct(x) -> str:
  return "–" if x is None else f"{x:.2%}"


def _at(value, epoch, fmt) -> str:
  return "–" if value is None else f"{fmt(value)} ({epoch:g})"


def format_markdown(result: dict) -> str:
  """compare.md: the settings, the pretrained source and baseline, one table row per arm."""
  src = result["source"]
  if src:
    metric = (f"; test perplexity {src['test_perplexity']:.2f}" if "test_perplexity" in src else
              f"; test accuracy {src['test_accuracy']:.2%}" if "test_accuracy" in src else "")
    source = f"`{result['init_from']}` ({src['model']}, {src['task']} run{metric})"
  else:
    source = "none (every arm from random init)"
  budget = f"{result['epochs']} epoch{'' if result['epochs'] == 1 else 's'}" + (f", at most {result['max_steps']} steps"
                                           if result["max_steps"] else "")
  lines = [
      f"# jaxlm compare: {result['model']}", "",
      f"- pretrained source: {source}",
      f"- data: `{result['data_source']}`, {result['train_records']:,} train records, {budget}, "
      f"seed {result['seed']}",
      f"- test: {result['test_examples']:,} examples; majority-class baseline "
      f"{_pct(result['majority_accuracy'])}; each arm is tested at its best validation "
      f"{result['select_metric']}", "",
      "| strategy | init | test acc | test loss | best valid acc (epoch) | lowest valid loss (epoch) "
      "| trainable params (first / last epoch) | params | train s | train tokens/s | steps |",
      "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
  ]
  for a in result["arms"]:
    tps = a["median_tokens_per_sec"]
    cells = [
        a["name"], "pretrained" if a["init_from"] else "random", _pct(a["test_accuracy"]),
        f"{a['test_loss']:.4f}",
        _at(a["best_valid_accuracy"], a["best_valid_accuracy_epoch"], _pct),
        _at(a["lowest_valid_loss"], a["lowest_valid_loss_epoch"], lambda v: f"{v:.4f}"),
        f"{a['trainable_parameters']:,} / {a['trainable_parameters_last_epoch']:,}",
        f"{a['parameters']:,}", f"{a['train_seconds']:.1f}", "–" if tps is None else f"{tps:,.0f}",
        str(a["steps"]),
    ]
    lines.append("| " + " | ".join(cells) + " |")
  lin = result.get("linear_baseline") or {}
  if "accuracy" in lin:  # the same train records and test examples as every arm
    name = {"nb_logreg": "NB-logreg", "tfidf_logreg": "TF-IDF logreg"}[lin["kind"]]
    lines.append(f"| linear baseline ({name}, 1-{lin['ngram_max']}-grams) | same labels | "
                 f"{_pct(lin['accuracy'])} | {lin['loss']:.4f} | – | – | {lin['features']:,} features "
                 f"| – | {lin['seconds']:.1f} | – | – |")
  elif lin:
    lines += ["", f"- {baseline.describe(lin)}"]
  return "\n".join(lines) + "\n"


def _plot(result: dict, path: pathlib.Path) -> None:
  """compare.png: validation loss and accuracy of every arm against epoch, written atomically."""
  import matplotlib.ticker
  from matplotlib.figure import Figure  # not pyplot: a notebook's backend stays as it was
  fig = Figure(figsize=(11, 4))
  axes = fig.subplots(1, 2)
  for ax, key, title in ((axes[0], "loss", "validation loss"),
                         (axes[1], "accuracy", "validation accuracy")):
    for arm in result["arms"]:
      points = [(p["epoch"], p[key]) for p in arm["curve"] if key in p and math.isfinite(p[key])]
      if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=arm["name"])
    ax.set_xlabel("epoch")
    if all(isinstance(p["epoch"], int) for arm in result["arms"] for p in arm["curve"]):
      ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title(title)
    if ax.lines:
      ax.legend()
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  files.atomic_write(path, buffer.getvalue())


class _CallableModule(types.ModuleType):
  """`jaxlm.compare(...)` is the Python API's `compare` (jaxlm/api.py), though `jaxlm.compare` is
  this module: importing a submodule sets the package's attribute of that name, so a function
  `jaxlm.compare` would be replaced by the module as soon as anything imported it."""

  def __call__(self, *args, **kwargs):
    from jaxlm import api
    return api.compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
