"""Does pretraining pay where labels are few? ULMFiT's sample-efficiency study, with jaxlm.

For each labelled-set size (default 100, 1,000, 5,000 IMDB reviews; a seeded subset of the train
split, `data.num_labeled`) and seed, two arms are fine-tuned with the *same* recipe search:
  * `pretrained` - grafted from the LM in `--lm` (`jaxlm finetune --init-from`);
  * `scratch`    - the same architecture and tokenizer from random weights (`tokenizer_from`),
and a linear n-gram model (jaxlm/baseline.py) is trained on the same labelled reviews.

The search: every recipe of the size's grid (learning rate x strategy; epochs scaled to the size)
is trained; each arm keeps the recipe with the best validation accuracy (its validation set is
a `--valid-fraction` hold-out of the labelled subset itself, all a user with N labels has), and only
that run is scored on the test split (`--test-examples`, 0 = all 25,000 reviews). During the search
each run is tested on a small seeded subset only, to save CPU.

Every run is a workdir under `--workdir`, so rerunning the same command skips finished runs and
resumes an interrupted one; a workdir holding a run of another recipe (other epochs, rates,
overrides, LM) is refused, not reused. Ties in validation accuracy (20 reviews at N = 100 move
it in 5-point steps) go to the lower validation loss. Results: `sample_efficiency.md` and
`.json` in `--workdir`.

    python scripts/sample_efficiency.py --lm runs/imdb_lm --config configs/imdb_ulmfit.py \
        --source jsonl:PATH/imdb --workdir runs/sample_efficiency
"""
from __future__ import annotations

import argparse
import ast
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

# Epochs per size: about the same number of steps for the small sets, fewer passes over large ones.
EPOCHS = {100: 30, 1000: 12, 5000: 6}


def recipes(size: int, rates: list[float], epochs: int = 0) -> list[dict]:
  epochs = epochs or EPOCHS.get(size) or min(30, max(3, round(30_000 / max(size, 1))))
  out = []
  for lr in rates:
    out.append({"name": f"full_lr{lr:g}", "optim.learning_rate": lr,
                "finetune.strategy": "full", "finetune.discriminative_decay": 1.0,
                "train.num_epochs": epochs})
    out.append({"name": f"gradual_lr{lr:g}", "optim.learning_rate": lr,
                "finetune.strategy": "gradual", "finetune.discriminative_decay": 2.6,
                "train.num_epochs": epochs})
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lm", required=True, help="pretrained LM workdir (or export) to graft from")
  parser.add_argument("--config", required=True, help="classifier config (file or shipped name)")
  parser.add_argument("--source", default=None, help="data.source override, e.g. jsonl:PATH/imdb")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--sizes", default="100,1000,5000")
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--rates", default="1e-3,4e-3", help="learning rates of the recipe grid")
  parser.add_argument("--epochs", type=int, default=0, help="epochs of every recipe (0: by size)")
  parser.add_argument("--valid-fraction", type=float, default=0.2)
  parser.add_argument("--search-test-examples", type=int, default=500)
  parser.add_argument("--test-examples", type=int, default=0, help="0 = the whole test split")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="extra config override for every run (repeatable)")
  args = parser.parse_args(argv)

  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's routine notices, as the CLI does
  import jaxlm
  from jaxlm import baseline, commands
  root = pathlib.Path(args.workdir)
  root.mkdir(parents=True, exist_ok=True)
  extra = dict(_parse_set(s) for s in args.set)
  if args.source:
    extra["data.source"] = args.source
  rates = [float(r) for r in args.rates.split(",")]
  # The deep runs skip their own baseline (fitted once per size below); its kind is the config's.
  linear_kind = jaxlm.get_config(args.config, extra).baseline.kind
  linear_kind = "nb_logreg" if linear_kind == "none" else linear_kind
  rows = []
  for size in (int(s) for s in args.sizes.split(",")):
    for seed in (int(s) for s in args.seeds.split(",")):
      base = {**extra, "data.num_labeled": size, "train.seed": seed,
              "data.valid_fraction": args.valid_fraction,
              "data.test_max_examples": args.search_test_examples,
              "finetune.select_metric": "accuracy",  # each run's best epoch, and the search, by it
              "baseline.kind": "none"}  # fitted once per size and seed below, on the whole test split
      row = {"labels": size, "seed": seed}
      for arm in ("pretrained", "scratch"):
        tried = []
        for recipe in recipes(size, rates, args.epochs):
          workdir = root / f"n{size}_s{seed}" / f"{arm}_{recipe['name']}"
          overrides = {**base, **{k: v for k, v in recipe.items() if k != "name"}}
          config = jaxlm.get_config(args.config, overrides)
          init_from = args.lm if arm == "pretrained" else None
          _check_same_recipe(workdir, config, init_from)
          t0 = time.perf_counter()
          summary = _finished(workdir) or commands.finetune(
              config, workdir, progress=False,
              init_from=init_from,
              tokenizer_from=None if arm == "pretrained" else args.lm)
          tried.append({"recipe": recipe["name"], "workdir": str(workdir),
                        "valid_accuracy": _best_valid(summary),
                        "valid_loss": _best_valid(summary, "loss"),
                        "train_seconds": summary["train_seconds"],
                        "wall_seconds": time.perf_counter() - t0})
          print(f"n={size} seed={seed} {arm} {recipe['name']}: valid "
                f"{tried[-1]['valid_accuracy']:.4f}", flush=True)
        best = _pick(tried)
        test = _test_score(best["workdir"], args.test_examples, commands)
        row[arm] = {**best, "test_accuracy": test["accuracy"], "test_examples": int(test["count"]),
                    "tried": tried}
      config = jaxlm.get_config(args.config, {**base, "data.test_max_examples": args.test_examples,
                                              "baseline.kind": linear_kind})
      row["linear"] = baseline.for_config(config)
      rows.append(row)
      _write(root, rows, args)
  print((root / "sample_efficiency.md").read_text())
  return 0


def _parse_set(text: str):
  """`KEY=VALUE`, the value read as JSON, else a Python literal (`(48, 96)`), else a string."""
  key, _, value = text.partition("=")
  for parse in (json.loads, ast.literal_eval):
    try:
      return key, parse(value)
    except (ValueError, SyntaxError):
      pass
  return key, value


def _pick(tried: list[dict]) -> dict:
  """The recipe with the best validation accuracy; a tie goes to the lower validation loss."""
  return max(tried, key=lambda t: (t["valid_accuracy"], -t["valid_loss"]))


def _check_same_recipe(workdir: pathlib.Path, config, init_from) -> None:
  """A workdir named for this size, seed, arm and recipe may still hold a run of other settings
  (another --epochs, --set, --source, --config or --lm): reusing or resuming it would report the
  wrong experiment. `train.num_epochs` counts here, though the CLI lets a resumed run change it."""
  from jaxlm import checkpoint, config as config_lib
  from jaxlm.errors import ConfigError
  if not (workdir / "config.json").is_file():
    return
  saved = checkpoint.load_config(workdir)
  changes = config_lib.changed_keys(saved, config)
  if saved.train.num_epochs != config.train.num_epochs:
    changes.append(f"train.num_epochs: {saved.train.num_epochs} -> {config.train.num_epochs}")
  summary = _finished(workdir) or {}
  where = lambda path: pathlib.Path(path).resolve() if path else None
  if summary and where(summary.get("init_from")) != where(init_from):
    changes.append(f"init_from: {summary.get('init_from')} -> {init_from}")
  if changes:
    raise ConfigError(f"{workdir} holds a run of another recipe ({'; '.join(changes)}); "
                      "use another --workdir")


def _finished(workdir: pathlib.Path) -> dict | None:
  path = workdir / "summary.json"
  return json.loads(path.read_text()) if path.is_file() else None


def _test_score(workdir: str, max_examples: int, commands) -> dict:
  """The chosen run's test accuracy, kept in its workdir: a rerun does not evaluate it again."""
  path = pathlib.Path(workdir) / f"test_{max_examples or 'all'}.json"
  if path.is_file():
    return json.loads(path.read_text())
  result = commands.evaluate(workdir, split="test", max_examples=max_examples)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(result))
  tmp.replace(path)
  return result


def _best_valid(summary: dict, key: str = "value") -> float:
  """The best epoch's validation accuracy (`value`) or `loss` from a run's summary."""
  best = summary.get("best_valid")  # {"value": accuracy, "loss", "step", "epoch"}
  if not best:
    return 0.0 if key == "value" else float("inf")
  return float(best[key])


def _write(root: pathlib.Path, rows: list[dict], args) -> None:
  (root / "sample_efficiency.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
  lines = ["| labels | seed | pretrained LM | recipe | from scratch | recipe | linear n-grams | "
           "pretrained - scratch |", "|--:|--:|--:|---|--:|---|--:|--:|"]
  for r in rows:
    pre, scr, lin = r["pretrained"], r["scratch"], r["linear"]
    lin_acc = f"{100 * lin['accuracy']:.2f}%" if "accuracy" in lin else lin.get("skipped", "-")
    lines.append(f"| {r['labels']:,} | {r['seed']} | {100 * pre['test_accuracy']:.2f}% | "
                 f"{pre['recipe']} | {100 * scr['test_accuracy']:.2f}% | {scr['recipe']} | {lin_acc} | "
                 f"{100 * (pre['test_accuracy'] - scr['test_accuracy']):+.2f} |")
  (root / "sample_efficiency.md").write_text("\n".join(lines) + "\n")


def run(argv=None) -> int:
  """`main` with the CLI's error contract: a jaxlm error (a bad override, a damaged checkpoint) is
  one line and exit 2; SIGTERM / Ctrl-C in a run saves it and exits 143 / 130, and rerunning the
  same command goes on from there."""
  from jaxlm.errors import JaxlmError
  try:
    return main(argv)
  except JaxlmError as e:
    code = getattr(e, "exit_code", 2)
    print(f"sample_efficiency: {'error: ' if code == 2 else ''}{e}", file=sys.stderr)
    return code


if __name__ == "__main__":
  sys.exit(run())
