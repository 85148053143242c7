"""Graft pretrained weights into a new model, declared as an assignment map (as in t5x).

Why declared and reported: a silent partial load hides bugs (STYLE.md, known pitfalls). `graft`
says, leaf by leaf, what was copied, what kept its fresh initialisation and what was dropped, and
refuses - listing every offending path at once - when shapes, dtypes or paths do not fit.

It works on in-memory param trees (numpy or jax arrays); reading them from a checkpoint is
jaxlm/checkpoint.py's job.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, NamedTuple, Optional, Sequence

from jaxlm import params as P
from jaxlm.errors import GraftError

# (regex searched in the source path, replacement -> target path, or None to drop); first match wins.
AssignmentMap = Sequence[tuple[str, Optional[str]]]

# The maps themselves belong to the model families (jaxlm/models/*_family.py: `graft_maps`), which
# know their parameter paths; `config.finetune.graft_map` picks one by name.


class Leaf(NamedTuple):
  path: str
  shape: tuple[int, ...]
  dtype: str


def _leaf(path: str, value: Any) -> Leaf:
  return Leaf(path, P.shape_of(value), P.dtype_of(value))


@dataclasses.dataclass
class GraftReport:
  """What `graft` did. Paths are target paths, except in `dropped` (source paths).

  `sources` maps each copied target path to the source path it came from; `unmatched` names the
  dropped source leaves no rule matched (only possible with `strict=False`).
  """
  copied: list[Leaf] = dataclasses.field(default_factory=list)
  initialised: list[Leaf] = dataclasses.field(default_factory=list)
  dropped: list[Leaf] = dataclasses.field(default_factory=list)
  sources: dict[str, str] = dataclasses.field(default_factory=dict)
  unmatched: list[str] = dataclasses.field(default_factory=list)

  def format(self) -> str:
    """A table, one leaf per line, with counts per status: what a user reads after `graft`."""
    def copied_note(leaf):
      source = self.sources.get(leaf.path, leaf.path)
      return "" if source == leaf.path else f"<- {source}"

    rows = [("copied", l, copied_note(l)) for l in self.copied]
    rows += [("initialised", l, "") for l in self.initialised]
    rows += [("dropped", l, "no rule matched" if l.path in self.unmatched else "dropped by rule")
             for l in self.dropped]
    cells = [(status, l.path, str(l.shape), l.dtype, note) for status, l, note in rows]
    header = ("status", "path", "shape", "dtype", "note")
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *cells]]
    counts = (f"{len(self.copied)} copied, {len(self.initialised)} newly initialised, "
              f"{len(self.dropped)} dropped")
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], counts])

  def to_dict(self) -> dict:
    def leaves(items):
      return [{"path": l.path, "shape": list(l.shape), "dtype": l.dtype} for l in items]

    return {"copied": leaves(self.copied), "initialised": leaves(self.initialised),
            "dropped": leaves(self.dropped), "sources": self.sources, "unmatched": self.unmatched}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)


def _hint(problems: list[tuple[str, str, str]], target_paths) -> str:
  """Guesses the usual cause from the offending paths, so the message says what to change."""
  hints = []
  for kind, source, _ in problems:
    if kind == "shape" and source.startswith("embed/") and "vocab" not in " ".join(hints):
      hints.append("the embedding shape differs: a different vocabulary/tokenizer (fine-tune with "
                   "the LM's tokenizer) or embed_dim")
    if kind == "shape" and source.startswith("encoder/") and "hidden" not in " ".join(hints):
      hints.append("encoder weights differ in shape: hidden_size, embed_dim or bidirectional "
                   "differ between the models")
    if kind == "missing" and "layer count" not in " ".join(hints):
      layer = re.match(r"^encoder/(layer_\d+)/", source)
      if layer and not any(p.startswith(f"encoder/{layer.group(1)}/") for p in target_paths):
        hints.append("the source has more encoder layers than the target: the layer count "
                     "(num_layers) differs")
      elif layer:
        hints.append("encoder layers have different submodules: bidirectional differs (use "
                     "--config.finetune.graft_map=lm_to_bidirectional to fill the forward direction)")
  return "\n".join(f"hint: {h}" for h in hints)


def graft(source_params, target_params, assignment_map: AssignmentMap,
          strict: bool = True) -> tuple[dict[str, Any], GraftReport]:
  """Copies source leaves into the target tree by rule: `(params, GraftReport)`.

  For each source leaf the first rule whose regex matches (`re.search`) decides: a replacement
  string substitutes the match (`re.sub` semantics, so `\\1` works) to give the target path;
  `None` drops the leaf. A source leaf no rule matches is an error when `strict`, else dropped
  and reported. Target leaves nothing was copied into keep their values ("newly initialised").
  Missing target paths, shape or dtype mismatches and two sources for one target raise one
  `GraftError` listing every offending path. Returns plain nested dicts; copied leaves are the
  source arrays themselves (no copy, no cast).
  """
  rules = [(re.compile(pattern), repl) for pattern, repl in assignment_map]
  source, target = P.flatten(source_params), P.flatten(target_params)
  report = GraftReport()
  out = dict(target)
  problems: list[tuple[str, str, str]] = []  # (kind, source path, message)

  for path, value in source.items():
    rule = next(((rx, repl) for rx, repl in rules if rx.search(path)), None)
    if rule is None:
      if strict:
        problems.append(("unmatched", path, f"{path} {P.shape_of(value)}: no rule of the "
                         "assignment map matches (strict=True)"))
      else:
        report.dropped.append(_leaf(path, value))
        report.unmatched.append(path)
      continue
    rx, repl = rule
    if repl is None:
      report.dropped.append(_leaf(path, value))
      continue
    dest = rx.sub(repl, path, count=1)
    src, tgt = _leaf(path, value), None if dest not in target else _leaf(dest, target[dest])
    if tgt is None:
      problems.append(("missing", path, f"{path} {src.shape} -> {dest}: no such target path"))
    elif dest in report.sources:
      problems.append(("duplicate", path, f"{path} -> {dest}: already assigned from "
                       f"{report.sources[dest]}"))
    elif src.shape != tgt.shape:
      problems.append(("shape", path, f"{path} {src.shape} -> {dest} {tgt.shape}: shape mismatch"))
    elif src.dtype != tgt.dtype:
      problems.append(("dtype", path, f"{path} {src.dtype} -> {dest} {tgt.dtype}: dtype mismatch"))
    else:
      out[dest] = value
      report.copied.append(tgt)
      report.sources[dest] = path

  if problems:
    hint = _hint(problems, target)
    raise GraftError(f"cannot graft {len(problems)} source leaves into the target model:\n"
                     + "\n".join(f"  {msg}" for _, _, msg in problems) + (f"\n{hint}" if hint else ""))
  report.initialised = [_leaf(p, v) for p, v in target.items() if p not in report.sources]
  return P.unflatten(out), report
