"""`jaxlm inspect`: a parameter tree as data and as an indented table, and two trees compared.

What a user asks before or after a fine-tuning run: how many parameters (and bytes) each part of the
model holds, which of them a freezing strategy trains and at what learning-rate multiplier, and what
grafting an LM into a classifier keeps, adds and drops. All of it needs shapes only, so no array is
read: a workdir's or checkpoint step's shapes come from its orbax metadata
(`Checkpointer.params_metadata`), a config's from `jax.eval_shape` of the model's init (a
`jaxlm export` folder's safetensors are read and mapped back to jaxlm paths). The marks
come from the `strategies.Plan` a run trains with (the family's layer groups, `make_strategy`), so
what inspect calls trainable is exactly what `jaxlm finetune` would train.

A model with batch statistics (ULMFiT's batch-normalised head) also holds a model state beside its
params: the `batch_stats` collection, running averages that train mode updates and no optimizer
touches. Inspect lists it apart (`model_state`, paths `batch_stats/...`, always marked not
trainable) with its own totals, so the parameter count stays what the optimizer and a strategy see.

    inspect(path_or_config, strategy=None, epoch=0, step=None, which=None) -> Inspection
    diff(a, b) -> Diff                      (a, b: Inspections, paths or configs)
    format_inspection(...), format_diff(...) -> str   (the CLI's tables; `.to_dict()` its --json)
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxlm import checkpoint, config as config_lib, params as P
from jaxlm.errors import ConfigError

SOURCE_KINDS = ("a workdir, a checkpoint step (WORKDIR/checkpoints/N), a config file, a shipped "
                "config or a safetensors export")
RUN_CONFIG = "config"  # --strategy config: the strategy the inspected config (or run) trains with


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One array: where it is, its shape and size; with a strategy, its layer group, whether it
  trains and its learning-rate multiplier (0 when frozen)."""
  path: str
  shape: tuple[int, ...]
  dtype: str
  count: int
  bytes: int
  group: str | None = None
  trainable: bool | None = None
  lr_multiplier: float | None = None


@dataclasses.dataclass(frozen=True)
class Subtree:
  """Totals of every leaf under `path` (an inner node of the tree)."""
  path: str
  arrays: int
  count: int
  bytes: int
  trainable: int | None = None  # trainable parameters under it (with a strategy)


@dataclasses.dataclass(frozen=True)
class Inspection:
  """A parameter tree: its leaves in tree order, its inner nodes' totals and the grand totals."""
  source: str                 # what was inspected, as a reader would name it
  kind: str                   # workdir | checkpoint | config | export
  model: str | None
  task: str | None
  step: int | None            # the checkpoint step read (None for a config)
  leaves: list[Leaf]
  subtrees: list[Subtree]     # parents before their children
  parameters: int
  bytes: int
  strategy: str | None = None
  epoch: int | None = None    # 0-based; only `gradual` depends on it
  trainable_parameters: int | None = None
  # Non-trainable state (batch statistics), not counted in `parameters`: leaves with paths
  # `batch_stats/...` and trainable=False, their subtrees, and their totals.
  model_state: list[Leaf] = dataclasses.field(default_factory=list)
  model_state_subtrees: list[Subtree] = dataclasses.field(default_factory=list)
  model_state_values: int = 0
  model_state_bytes: int = 0

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Diff:
  """Two trees by path: the same shape and dtype in both (`shared`), only in `b` (`added`), only in
  `a` (`removed`), or in both with another shape or dtype (`changed`: pairs of a's and b's leaf)."""
  a: str
  b: str
  shared: list[Leaf]
  added: list[Leaf]
  removed: list[Leaf]
  changed: list[tuple[Leaf, Leaf]]

  def to_dict(self) -> dict:
    out = {"a": self.a, "b": self.b}
    for name in ("shared", "added", "removed"):
      out[name] = [dataclasses.asdict(leaf) for leaf in getattr(self, name)]
    out["changed"] = [{"path": a.path, "a": dataclasses.asdict(a), "b": dataclasses.asdict(b)}
                      for a, b in self.changed]
    out["counts"] = _diff_counts(self)
    return out


# --- what a path names ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Source:
  description: str
  kind: str
  params: Any                 # abstract: ShapeDtypeStruct leaves
  config: ml_collections.ConfigDict | None
  step: int | None = None
  workdir: pathlib.Path | None = None
  model_state: Any = None     # abstract too: {"batch_stats": ...}, or {} / None without any


def _resolve(path_or_config, step, which) -> _Source:
  if isinstance(path_or_config, ml_collections.ConfigDict):
    if step is not None:
      raise ConfigError("--step picks a checkpoint of a workdir; a config has none")
    return _from_config(path_or_config, "config")
  text = str(path_or_config)
  path = pathlib.Path(text)
  if (path.is_file() and path.suffix == ".safetensors") or (path / "model.safetensors").is_file():
    if step is not None:
      raise ConfigError(f"--step picks a checkpoint of a workdir; {text} is an export of one step")
    return _from_export(path)
  if path.is_dir():
    if path.parent.name == "checkpoints" and path.name.isdigit():  # WORKDIR/checkpoints/N
      if step is not None and int(step) != int(path.name):
        raise ConfigError(f"{path} is checkpoint step {path.name}; --step {step} names another")
      return _from_checkpoint(path.parent.parent, int(path.name), None, kind="checkpoint")
    if path.name == "checkpoints" and (path.parent / "config.json").is_file():
      path = path.parent
    return _from_checkpoint(path, step, which, kind="workdir")
  if step is not None:
    raise ConfigError(f"--step picks a checkpoint of a workdir; {text} is not a directory")
  if path.is_file() and path.suffix == ".json":
    raise ConfigError(f"{text} is a JSON file, not a config file (a Python file with get_config()); "
                      f"to inspect the run it belongs to, pass its workdir ({path.parent})")
  name, _, part = text.partition(":") if not path.is_file() else (text, "", "")
  shipped = config_lib.shipped_configs()
  bare = name[:-3] if name.endswith(".py") else name
  if not pathlib.Path(name).is_file() and bare not in shipped:
    raise ConfigError(f"{text}: no such workdir, checkpoint or config file, and no shipped config "
                      f"of that name (inspect takes {SOURCE_KINDS}: {', '.join(shipped)})")
  try:
    config = config_lib.get_config(name, part or None)
  except SyntaxError as e:
    raise ConfigError(f"config file {e.filename} line {e.lineno}: {e.msg}") from None
  except OSError as e:
    raise ConfigError(f"cannot load config {text}: {e}") from None
  return _from_config(config, f"config {text}")


def _from_config(config, description: str) -> _Source:
  """Abstract params of the model `config` builds, with the vocabulary the config asks for (a run's
  tokenizer may have kept fewer words: inspect its workdir for the trained shapes)."""
  from jaxlm import commands
  parts = [k for k, v in config.items() if isinstance(v, ml_collections.ConfigDict) and "task" in v]
  if "task" not in config and parts:
    raise ConfigError(f"{description} has several parts ({', '.join(parts)}): inspect one of them, "
                      f"as NAME:{parts[0]}")
  from jaxlm import interop
  config_lib.validate(config)
  vocab = commands._vocab_size_for(config)  # pylint: disable=protected-access
  params, model_state = interop.abstract_variables(config, vocab)
  return _Source(f"{description} (abstract, vocabulary {vocab:,})", "config", params, config,
                 model_state=model_state)


def _from_checkpoint(workdir: pathlib.Path, step, which, *, kind: str) -> _Source:
  """Shapes of a checkpoint's params from its metadata. A workdir's default step is the one its
  run is evaluated and grafted from: the best by validation for a run that selects one (a
  classifier), else the latest (an LM)."""
  config = checkpoint.load_config(workdir) if (workdir / "config.json").is_file() else None
  if which is None and step is None:
    which = "best" if config is not None and _selects(config) else "latest"
  with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
    chosen, params = ckpt.params_metadata(step, which=which or "latest")
    model_state = ckpt.model_state_metadata(chosen)
  how = "" if step is not None else f" ({which})"
  return _Source(f"{workdir}, checkpoint step {chosen}{how}", kind, params, config, chosen, workdir,
                 model_state)


def _from_export(path: pathlib.Path) -> _Source:
  """A `jaxlm export` folder or its .safetensors file, as the jaxlm tree `--init-from` would
  read (jaxlm/interop.py: torch names mapped back, shapes checked against its config.json)."""
  from jaxlm import interop
  export = interop.read_export(path)
  params, model_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                     export.variables())
  return _Source(f"{export.weights} (safetensors export)", "export", params, export.config,
                 model_state=model_state)


def _selects(config) -> bool:
  from jaxlm import tasks
  kind = tasks.TASKS.get(config.get("task"))
  return kind is not None and kind.select_metric(config) is not None


# --- strategies ---------------------------------------------------------------------------------


def _plan(strategy, source: _Source):
  """(name, Plan) of `strategy`: a `jaxlm compare` item (`head`, `top_k=2`, `gradual`,
  `discriminative=2.6`, ...), `config` for the inspected config's own `config.finetune`, or a
  `config.finetune`-like mapping; (None, None) without one."""
  if strategy is None:
    return None, None
  from jaxlm import compare, models
  from jaxlm.train import strategies
  if source.config is None:  # a workdir without config.json: the error names it
    checkpoint.load_config(source.workdir)
  if isinstance(strategy, Mapping):
    finetune, name = dict(strategy), _describe(strategy)
  elif strategy == RUN_CONFIG:
    finetune = source.config.get("finetune")
    if finetune is None:
      raise ConfigError(f"--strategy {RUN_CONFIG}: {source.description} has no config.finetune "
                        f"(a {source.config.get('task')} run); name one instead: {compare.FORMS}")
    name = f"{_describe(finetune)} (the config's)"
  else:
    arms = compare.parse_strategies(str(strategy))
    if len(arms) != 1:
      raise ConfigError(f"--strategy {strategy!r}: inspect marks one strategy at a time; "
                        f"valid forms: {compare.FORMS}, or {RUN_CONFIG!r}")
    finetune, name = arms[0].overrides, arms[0].name
  family = models.family_of(source.config.model.name)
  try:
    return name, strategies.make_strategy(finetune, source.params, family)
  except ConfigError as e:
    raise ConfigError(f"--strategy {name} on {source.description}: {e}") from None


def _describe(finetune) -> str:
  name = finetune.get("strategy", "full")
  if name == "top_k":
    name += f"={int(finetune.get('top_k', 1))}"
  decay = float(finetune.get("discriminative_decay", 1.0))
  return name if decay == 1.0 else f"{name}, discriminative_decay={decay:g}"


# --- the data -----------------------------------------------------------------------------------


def inspect(path_or_config, *, strategy=None, epoch: int = 0, step: int | None = None,
            which: str | None = None) -> Inspection:
  """The parameter tree of a workdir, a checkpoint step directory, a config file or shipped config
  name (`quickstart:finetune`), a ConfigDict, or a `jaxlm export` folder or .safetensors file.

  `strategy` marks every leaf trainable or frozen in `epoch` (0-based) with its learning-rate
  multiplier. `step`/`which` ('best' | 'latest') pick a workdir's checkpoint; by default the one
  the run is evaluated from (best for a classifier, latest for an LM).
  """
  if which not in (None, "best", "latest"):
    raise ConfigError(f"--which must be best or latest, got {which!r}")
  if int(epoch) < 0:
    raise ConfigError(f"--epoch must be >= 0 (0 is the first epoch), got {epoch}")
  source = _resolve(path_or_config, step, which)
  name, plan = _plan(strategy, source)
  mask = P.flatten(plan.trainable_mask(source.params, int(epoch))) if plan else {}
  multipliers = plan.lr_multipliers if plan else {}
  leaves = []
  for path, leaf in P.flatten(source.params).items():
    marks = {}
    if plan:
      group = plan.group_of(path)
      marks = dict(group=group, trainable=bool(mask[path]),
                   lr_multiplier=float(multipliers[group]) if mask[path] else 0.0)
    leaves.append(_leaf(path, leaf, **marks))
  # Statistics are never trained by the optimizer, whatever the strategy: trainable=False always.
  state = [_leaf(path, leaf, trainable=False)
           for path, leaf in P.flatten(source.model_state or {}).items()]
  config = source.config
  return Inspection(
      source=source.description, kind=source.kind,
      model=config.model.get("name") if config is not None else None,
      task=config.get("task") if config is not None else None, step=source.step,
      leaves=leaves, subtrees=_subtrees(leaves, with_marks=plan is not None),
      parameters=sum(l.count for l in leaves), bytes=sum(l.bytes for l in leaves),
      strategy=name, epoch=int(epoch) if plan else None,
      trainable_parameters=sum(l.count for l in leaves if l.trainable) if plan else None,
      model_state=state, model_state_subtrees=_subtrees(state, with_marks=False),
      model_state_values=sum(l.count for l in state), model_state_bytes=sum(l.bytes for l in state))


def _leaf(path: str, leaf, **marks) -> Leaf:
  shape = P.shape_of(leaf)
  count = math.prod(shape)
  return Leaf(path, shape, str(np.dtype(leaf.dtype)), count, count * np.dtype(leaf.dtype).itemsize,
              **marks)


def _subtrees(leaves: list[Leaf], with_marks: bool) -> list[Subtree]:
  """Totals of every proper prefix of the leaf paths, parents first (leaves come in tree order)."""
  totals: dict[str, list[int]] = {}
  for leaf in leaves:
    parts = leaf.path.split(P.SEP)
    for i in range(1, len(parts)):
      t = totals.setdefault(P.SEP.join(parts[:i]), [0, 0, 0, 0])
      t[0] += 1
      t[1] += leaf.count
      t[2] += leaf.bytes
      t[3] += leaf.count if leaf.trainable else 0
  return [Subtree(path, a, c, b, t if with_marks else None) for path, (a, c, b, t) in totals.items()]


def diff(a, b, *, step: int | None = None, which: str | None = None) -> Diff:
  """Compares two parameter trees by path (e.g. an LM and the classifier grafted from it); `a` and
  `b` are Inspections or anything `inspect` takes (`step`/`which` apply to both)."""
  a = a if isinstance(a, Inspection) else inspect(a, step=step, which=which)
  b = b if isinstance(b, Inspection) else inspect(b, step=step, which=which)
  left, right = {l.path: l for l in a.leaves}, {l.path: l for l in b.leaves}
  shared, changed = [], []
  for path, leaf in left.items():
    other = right.get(path)
    if other is not None:
      if (leaf.shape, leaf.dtype) == (other.shape, other.dtype):
        shared.append(leaf)
      else:
        changed.append((leaf, other))
  return Diff(a.source, b.source, shared, [l for p, l in right.items() if p not in left],
              [l for p, l in left.items() if p not in right], changed)


def _diff_counts(d: Diff) -> dict:
  out = {name: {"arrays": len(getattr(d, name)), "parameters": sum(l.count for l in getattr(d, name))}
         for name in ("shared", "added", "removed")}
  out["changed"] = {"arrays": len(d.changed), "parameters_a": sum(a.count for a, _ in d.changed),
                    "parameters_b": sum(b.count for _, b in d.changed)}
  return out


# --- text -----------------------------------------------------------------------------------------


def human_bytes(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return ""  # unreachable


def _lr(values) -> str:
  values = sorted(set(values))
  if not values:
    return "-"
  lo, hi = f"{values[0]:.4g}", f"{values[-1]:.4g}"
  return lo if lo == hi else f"{lo}..{hi}"


def _marks(trainable: int, count: int) -> str:
  return "train" if trainable == count else "frozen" if trainable == 0 else "partly"


def format_inspection(ins: Inspection) -> str:
  """The tree as an indented table: each inner node with its totals, each leaf with its shape,
  dtype, count and bytes (and with a strategy its marks), then the totals; a model state
  (batch statistics) follows in a table of its own with its own totals."""
  marked = ins.strategy is not None
  header = ["path", "shape", "dtype", "params", "bytes"] + (["train", "lr mult"] if marked else [])
  body = _tree_rows(ins.leaves, ins.subtrees, marked)
  what = f"{ins.model} ({ins.task})" if ins.model else "parameters"
  lines = [f"{what}: {ins.source}", *_table(header, body, right=(3, 4)),
           f"total: {ins.parameters:,} parameters in {len(ins.leaves)} arrays, {ins.bytes:,} bytes "
           f"({human_bytes(ins.bytes)})"]
  if marked:
    share = ins.trainable_parameters / ins.parameters if ins.parameters else 0.0
    when = f" in epoch {ins.epoch + 1} (--epoch {ins.epoch})" if ins.strategy.startswith("gradual") else ""
    lines.append(f"trainable under {ins.strategy}{when}: {ins.trainable_parameters:,} parameters "
                 f"({share:.2%}); frozen: {ins.parameters - ins.trainable_parameters:,}")
  if ins.model_state:
    lines += ["", "model state (non-trainable: running statistics, updated in train mode; not "
                  "counted as parameters):",
              *_table(["path", "shape", "dtype", "values", "bytes"],
                      _tree_rows(ins.model_state, ins.model_state_subtrees, False), right=(3, 4)),
              f"total model state: {ins.model_state_values:,} values in {len(ins.model_state)} "
              f"arrays, {ins.model_state_bytes:,} bytes ({human_bytes(ins.model_state_bytes)})"]
  return "\n".join(lines)


def _tree_rows(leaves: list[Leaf], subtrees: list[Subtree], marked: bool) -> list[list[str]]:
  """Table rows of a tree: each inner node (indented, with its totals) before its leaves."""
  subtrees = {s.path: s for s in subtrees}
  leaves_under: dict[str, list[Leaf]] = {}
  for leaf in leaves:
    parts = leaf.path.split(P.SEP)
    for i in range(1, len(parts)):
      leaves_under.setdefault(P.SEP.join(parts[:i]), []).append(leaf)
  body, shown = [], set()
  for leaf in leaves:
    parts = leaf.path.split(P.SEP)
    for i in range(1, len(parts)):
      prefix = P.SEP.join(parts[:i])
      if prefix in shown:
        continue
      shown.add(prefix)
      s = subtrees[prefix]
      row = ["  " * (i - 1) + parts[i - 1], "", "", f"{s.count:,}", human_bytes(s.bytes)]
      if marked:
        row += [_marks(s.trainable, s.count),
                _lr(l.lr_multiplier for l in leaves_under[prefix] if l.trainable)]
      body.append(row)
    row = ["  " * (len(parts) - 1) + parts[-1], str(leaf.shape), leaf.dtype, f"{leaf.count:,}",
           human_bytes(leaf.bytes)]
    if marked:
      row += ["train" if leaf.trainable else "frozen",
              f"{leaf.lr_multiplier:.4g}" if leaf.trainable else "-"]
    body.append(row)
  return body


def _table(header: list[str], body: list[list[str]], right=()) -> list[str]:
  widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

  def fmt(row):
    return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                     for i, (c, w) in enumerate(zip(row, widths))).rstrip()

  rule = "-" * len(fmt(header))
  return [fmt(header), rule, *map(fmt, body), rule]


def format_diff(d: Diff) -> str:
  """One line per subtree whose leaves all share a status (`removed  decoder`), else per leaf;
  changed leaves always one each, with both shapes."""
  status, leaf_of = {}, {}
  for name in ("shared", "added", "removed"):
    for leaf in getattr(d, name):
      status[leaf.path], leaf_of[leaf.path] = name, (leaf, leaf)
  for a, b in d.changed:
    status[a.path], leaf_of[a.path] = "changed", (a, b)
  paths = sorted(status, key=lambda p: tuple(p.split(P.SEP)))
  rows = []

  def walk(prefix: tuple[str, ...], under: list[str]):
    kinds = {status[p] for p in under}
    if prefix and len(kinds) == 1 and kinds != {"changed"} and len(under) > 1:
      leaves = [leaf_of[p][0] for p in under]
      rows.append([kinds.pop(), P.SEP.join(prefix),
                   f"{len(leaves)} arrays, {sum(l.count for l in leaves):,} parameters"])
      return
    children: dict[str, list[str]] = {}
    for p in under:
      children.setdefault(p.split(P.SEP)[len(prefix)], []).append(p)
    for child, sub in children.items():
      if sub == [P.SEP.join(prefix + (child,))]:  # a leaf
        a, b = leaf_of[sub[0]]
        shape = f"{a.shape} {a.dtype}" + (f" -> {b.shape} {b.dtype}" if a is not b else "")
        rows.append([status[sub[0]], sub[0], f"{shape}, {a.count:,}"
                     + (f" -> {b.count:,}" if a is not b else "") + " parameters"])
      else:
        walk(prefix + (child,), sub)

  walk((), paths)
  c = _diff_counts(d)
  summary = ", ".join(f"{name} {c[name]['arrays']} arrays ({c[name]['parameters']:,} parameters)"
                      for name in ("shared", "added", "removed"))
  summary += f", changed {c['changed']['arrays']} arrays"
  widths = [max((len(r[i]) for r in rows), default=0) for i in range(2)]
  lines = [f"a: {d.a}", f"b: {d.b}"]
  lines += [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows]
  lines.append(summary)
  return "\n".join(lines)


# --- the command ----------------------------------------------------------------------------------


def command(source, *, other=None, strategy=None, epoch: int = 0, step: int | None = None,
            which: str | None = None, as_json: bool = False) -> dict:
  """`jaxlm inspect`: prints the table (or with `other` the diff; `as_json`: the data as JSON) and
  returns the data as a dict."""
  if other is not None:
    if strategy is not None:
      raise ConfigError("--diff compares two trees by shape; it takes no --strategy (inspect each "
                        "tree with --strategy instead)")
    data = diff(inspect(source, step=step, which=which), inspect(other))
    text = format_diff(data)
  else:
    data = inspect(source, strategy=strategy, epoch=epoch, step=step, which=which)
    text = format_inspection(data)
  out = data.to_dict()
  print(json.dumps(out, indent=2) if as_json else text, flush=True)
  return out
