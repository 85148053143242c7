"""scripts/sample_efficiency.py end to end on the synthetic corpus: both deep arms trained with the
same recipe grid, the recipe chosen on each arm's own hold-out, the table written, and a rerun
that trains nothing (every run is a finished workdir)."""
import importlib.util
import json
import pathlib

import pytest

from jaxlm import cli
from test_cli import CONFIGS, LM_ARGS, SOURCE

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "sample_efficiency.py"


def _script():
  spec = importlib.util.spec_from_file_location("sample_efficiency", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _args(lm, workdir):
  tiny = {"data.batch_size": 8, "data.eval_batch_size": 8, "data.buckets": "(48,)",
          "data.max_len": 48, "model.embed_dim": 16, "model.hidden_size": 32,
          "model.num_layers": 1, "train.num_devices": 1}
  sets = [a for k, v in tiny.items() for a in ("--set", f"{k}={v}")]
  return ["--lm", str(lm), "--config", f"{CONFIGS}/quickstart.py", "--source", SOURCE,
          "--workdir", str(workdir), "--sizes", "24", "--rates", "1e-3", "--epochs", "1",
          "--valid-fraction", "0.25", "--search-test-examples", "10", *sets]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
  path = tmp_path_factory.mktemp("se") / "lm"
  assert cli.main(["jaxlm", "pretrain", *LM_ARGS, "--workdir", str(path)]) == 0
  return path


def test_both_arms_the_same_search_and_a_resumable_table(lm, tmp_path, capsys):
  pytest.importorskip("sklearn")
  script = _script()
  # quickstart.py has two parts: the script reads its finetune part through the API's name:part.
  args = _args(lm, tmp_path / "se")
  args[args.index("--config") + 1] += ":finetune"
  assert script.run(args) == 0
  result = json.loads((tmp_path / "se" / "sample_efficiency.json").read_text())
  (row,) = result["rows"]
  assert row["labels"] == 24
  for arm in ("pretrained", "scratch"):
    tried = row[arm]["tried"]
    assert [t["recipe"] for t in tried] == ["full_lr0.001", "gradual_lr0.001"]
    best = script._pick(tried)
    assert row[arm]["recipe"] == best["recipe"] and 0 <= row[arm]["test_accuracy"] <= 1
    summary = json.loads((pathlib.Path(best["workdir"]) / "summary.json").read_text())
    assert summary["train_records"] == 18  # 24 labels minus the 25% hold-out
  pre = json.loads((pathlib.Path(row["pretrained"]["workdir"]) / "summary.json").read_text())
  scr = json.loads((pathlib.Path(row["scratch"]["workdir"]) / "summary.json").read_text())
  assert pre["init_from"] and not scr.get("init_from")
  assert scr["tokenizer_from"] == str(lm)  # the same vocabulary for both arms
  assert row["linear"]["kind"] == "nb_logreg" and row["linear"]["train_examples"] == 18
  assert (pathlib.Path(row["pretrained"]["workdir"]) / "test_all.json").is_file()
  table = (tmp_path / "se" / "sample_efficiency.md").read_text()
  assert "| 24 | 0 |" in table
  # A rerun finds every run finished and trains nothing.
  stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "se").rglob("summary.json")}
  capsys.readouterr()
  assert script.run(args) == 0
  assert {p: p.stat().st_mtime_ns for p in (tmp_path / "se").rglob("summary.json")} == stamps


def test_a_workdir_of_another_recipe_is_refused_not_reused(lm, tmp_path, capsys):
  """Rerunning into the same --workdir with other epochs or another override would otherwise
  report the old runs as the new experiment."""
  pytest.importorskip("sklearn")
  script = _script()
  args = _args(lm, tmp_path / "se")
  args[args.index("--config") + 1] += ":finetune"
  args[args.index("--sizes") + 1] = "16"
  assert script.run(args) == 0
  stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "se").rglob("summary.json")}
  for change, key in ((["--epochs", "2"], "train.num_epochs: 1 -> 2"),
                      (["--set", "optim.weight_decay=0.5"], "optim.weight_decay")):
    changed = list(args)
    if change[0] in changed:
      changed[changed.index(change[0]) + 1] = change[1]
    else:
      changed += change
    capsys.readouterr()
    assert script.run(changed) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another recipe" in err[0] and key in err[0], err
  assert {p: p.stat().st_mtime_ns for p in (tmp_path / "se").rglob("summary.json")} == stamps


def test_a_validation_tie_goes_to_the_lower_loss():
  script = _script()
  tried = [{"valid_accuracy": 0.85, "valid_loss": 0.40}, {"valid_accuracy": 0.85, "valid_loss": 0.30},
           {"valid_accuracy": 0.80, "valid_loss": 0.10}]
  assert script._pick(tried) is tried[1]
  assert script._best_valid({"best_valid": {"value": 0.9, "loss": 0.2}}, "loss") == 0.2


def test_a_bad_override_is_one_line(lm, tmp_path, capsys):
  script = _script()
  args = _args(lm, tmp_path / "se") + ["--set", "model.no_such_key=1"]
  args[args.index("--config") + 1] += ":finetune"
  assert script.run(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no_such_key" in err[0]
