"""`jaxlm compare`: the strategy list, one comparison end to end, its resumption, its CLI errors.

One tiny LSTM LM is pretrained and one comparison (scratch, full, head, top_k=1; 2 epochs of a
16/32-unit classifier) is run per module; the rerun tests work on it or on a copy of it.
"""
import json
import pathlib
import shutil

import numpy as np
import pytest

from jaxlm import checkpoint, cli, commands, params as P
from jaxlm.compare import parse_strategies
from jaxlm.errors import ConfigError
from cli_helpers import run

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
SOURCE = "synthetic:train=80,test=40,unsup=160"
TINY = [f"--config.{k}={v}" for k, v in [
    ("data.source", SOURCE), ("data.batch_size", 8), ("data.eval_batch_size", 8),
    ("data.buckets", "(48,)"), ("data.max_len", 48), ("tokenizer.vocab_size", 200),
    ("model.embed_dim", 16), ("model.hidden_size", 32), ("model.num_layers", 1),
    ("train.num_devices", 1)]]
LM_ARGS = ["--config", f"{CONFIGS}/quickstart.py:pretrain", *TINY, "--config.train.max_steps=6",
           "--config.data.test_max_examples=30", "--noprogress"]
CLF_ARGS = ["--config", f"{CONFIGS}/quickstart.py:finetune", *TINY, "--config.train.num_epochs=2",
            "--noprogress"]
ARMS = ("scratch", "full", "head", "top_k_1")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
  root = tmp_path_factory.mktemp("compare")
  lm, work = root / "lm", root / "cmp"
  assert cli.main(["jaxlm", "pretrain", *LM_ARGS, "--workdir", str(lm)]) == 0
  assert cli.main(["jaxlm", "compare", *CLF_ARGS, "--init-from", str(lm), "--workdir", str(work),
                   "--strategies", "scratch,full,head,top_k=1"]) == 0
  return {"lm": lm, "work": work}


# --- the strategy list --------------------------------------------------------------------------


def test_parse_strategies_forms_and_dirnames():
  arms = parse_strategies("scratch, full,head,top_k,top_k=2,gradual,gradual=2.6,discriminative")
  assert [a.name for a in arms] == ["scratch", "full", "head", "top_k=1", "top_k=2", "gradual",
                                    "gradual=2.6", "discriminative=2.6"]
  assert [a.dirname for a in arms] == ["scratch", "full", "head", "top_k_1", "top_k_2", "gradual",
                                       "gradual_2.6", "discriminative_2.6"]
  assert [a.grafts for a in arms] == [False] + [True] * 7
  by_name = {a.name: a.overrides for a in arms}
  assert by_name["scratch"] == by_name["full"] == {"strategy": "full", "top_k": 1,
                                                   "discriminative_decay": 1.0}
  assert by_name["head"]["strategy"] == "head"
  assert by_name["top_k=2"] == {"strategy": "top_k", "top_k": 2, "discriminative_decay": 1.0}
  assert by_name["gradual"]["discriminative_decay"] == 1.0
  assert by_name["gradual=2.6"] == {"strategy": "gradual", "top_k": 1, "discriminative_decay": 2.6}
  assert by_name["discriminative=2.6"]["strategy"] == "full"
  assert parse_strategies("discriminative=3")[0].overrides["discriminative_decay"] == 3.0


@pytest.mark.parametrize("spec,item", [
    ("full,bogus", "bogus"), ("full,head,full", "full"), ("top_k,top_k=1", "top_k=1"),
    ("top_k=x", "top_k=x"), ("top_k=-1", "top_k=-1"), ("top_k=1.5", "top_k=1.5"),
    ("head=2", "head=2"), ("discriminative=0", "discriminative=0"), ("gradual=nan", "gradual=nan"),
    ("full,,head", "''"), ("", "''"),
])
def test_parse_strategies_errors_name_the_item(spec, item):
  with pytest.raises(ConfigError) as e:
    parse_strategies(spec)
  message = str(e.value)
  assert item in message and "\n" not in message
  assert "valid forms" in message or "repeats" in message


# --- one comparison end to end --------------------------------------------------------------


def test_compare_writes_table_json_and_plot(compared):
  work = compared["work"]
  result = json.loads((work / "compare.json").read_text())
  assert [a["dirname"] for a in result["arms"]] == list(ARMS)
  assert result["init_from"] == str(compared["lm"]) and result["epochs"] == 2
  assert result["data_source"] == SOURCE and result["seed"] == 0 and result["train_records"] > 0
  arms = {a["dirname"]: a for a in result["arms"]}
  for a in arms.values():
    for key in ("test_accuracy", "test_loss", "best_valid_accuracy", "lowest_valid_loss",
                "train_seconds", "median_tokens_per_sec", "steps", "parameters"):
      assert a[key] is not None, key
    assert a["best_valid_accuracy_epoch"] in (1, 2) and a["lowest_valid_loss_epoch"] in (1, 2)
    assert [p["epoch"] for p in a["curve"]] == [1, 2]
  trainable = {k: a["trainable_parameters"] for k, a in arms.items()}
  assert trainable["head"] < trainable["top_k_1"] < trainable["full"] == arms["full"]["parameters"]
  assert trainable["scratch"] == trainable["full"]
  assert arms["scratch"]["init_from"] is None and arms["full"]["init_from"] == str(compared["lm"])
  scratch = json.loads((work / "scratch" / "summary.json").read_text())
  assert scratch["init_from"] is None and not (work / "scratch" / "graft_report.txt").exists()
  table = (work / "compare.md").read_text()
  assert str(compared["lm"]) in table and "majority-class baseline" in table
  rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
  assert [r.split("|")[1].strip() for r in rows] == ["scratch", "full", "head", "top_k=1",
                                                     "linear baseline (NB-logreg, 1-2-grams)"]
  # The linear model saw the arms' train records and scored their test examples.
  lin = result["linear_baseline"]
  assert lin["test_examples"] == result["test_examples"]
  assert lin["train_examples"] == result["train_records"]
  assert (work / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_head_keeps_the_pretrained_encoder_bit_identical(compared):
  lm = P.flatten(checkpoint.restore_params(compared["lm"]))
  head = P.flatten(checkpoint.restore_params(compared["work"] / "head", which="best"))
  full = P.flatten(checkpoint.restore_params(compared["work"] / "full", which="best"))
  shared = [k for k in head if k.startswith(("embed/", "encoder/"))]
  assert shared and all(k in lm for k in shared)
  for k in shared:
    np.testing.assert_array_equal(np.asarray(head[k]), np.asarray(lm[k]), err_msg=k)
  assert any(not np.array_equal(np.asarray(full[k]), np.asarray(lm[k])) for k in shared)


# --- resuming ----------------------------------------------------------------------------------


@pytest.fixture
def count_finetunes(monkeypatch):
  calls, real = [], commands.finetune

  def counting(config, workdir, **kw):
    calls.append(pathlib.Path(workdir).name)
    return real(config, workdir, **kw)

  monkeypatch.setattr(commands, "finetune", counting)
  return calls


def test_rerun_trains_nothing_and_reports_the_same(compared, capsys, count_finetunes):
  work = compared["work"]
  before = (work / "compare.md").read_text(), json.loads((work / "compare.json").read_text())
  mtimes = {arm: (work / arm / "summary.json").stat().st_mtime_ns for arm in ARMS}
  code, out, err = run(capsys, "compare", *CLF_ARGS, "--init-from", compared["lm"],
                       "--workdir", work, "--strategies", "scratch,full,head,top_k=1")
  assert code == 0, err
  assert count_finetunes == []
  assert out.count("not retrained") == len(ARMS)
  assert before[0] in out and (work / "compare.md").read_text() == before[0]
  assert json.loads((work / "compare.json").read_text()) == before[1]
  assert {arm: (work / arm / "summary.json").stat().st_mtime_ns for arm in ARMS} == mtimes


def test_deleting_one_summary_reruns_only_that_arm(compared, tmp_path, capsys, count_finetunes):
  work = tmp_path / "cmp"
  shutil.copytree(compared["work"], work)
  before = {a["dirname"]: a for a in json.loads((work / "compare.json").read_text())["arms"]}
  (work / "head" / "summary.json").unlink()
  code, _, err = run(capsys, "compare", *CLF_ARGS, "--init-from", compared["lm"],
                     "--workdir", work, "--strategies", "scratch,full,head,top_k=1")
  assert code == 0, err
  assert count_finetunes == ["head"]
  after = {a["dirname"]: a for a in json.loads((work / "compare.json").read_text())["arms"]}
  for arm in ARMS:  # the head arm resumed from its finished checkpoints: same model, same test
    assert after[arm]["test_accuracy"] == before[arm]["test_accuracy"], arm
    assert after[arm]["curve"] == before[arm]["curve"], arm


def test_rerun_with_another_config_fails_before_training(compared, tmp_path, capsys,
                                                         count_finetunes):
  work = tmp_path / "cmp"
  shutil.copytree(compared["work"], work)
  code, _, err = run(capsys, "compare", *CLF_ARGS, "--config.train.seed=1",
                     "--init-from", compared["lm"], "--workdir", work)
  _assert_user_error(code, err, "config.train.seed=0", str(work / "scratch"))
  assert count_finetunes == []


# --- CLI errors: exit 2, one line, nothing written ----------------------------------------------


def _assert_user_error(code, err, *needles):
  assert code == 2 and "Traceback" not in err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxlm compare: error: "), err
  for needle in needles:
    assert needle in err, (needle, err)


@pytest.mark.parametrize("strategies,needles", [
    ("full,bogus", ["'bogus'", "valid forms"]),
    ("top_k=x", ["'top_k=x'", "valid forms"]),
    ("scratch,top_k=5", ["top_k=5", "layer groups"]),  # 1-layer model: 3 groups; before scratch trains
])
def test_bad_strategies_exit_2_and_write_nothing(compared, tmp_path, capsys, strategies, needles):
  work = tmp_path / "run"
  code, _, err = run(capsys, "compare", *CLF_ARGS, "--init-from", compared["lm"], "--workdir", work,
                     "--strategies", strategies)
  _assert_user_error(code, err, *needles)
  assert not work.exists()


def test_grafting_arm_needs_init_from(tmp_path, capsys):
  work = tmp_path / "run"
  code, _, err = run(capsys, "compare", *CLF_ARGS, "--workdir", work)
  _assert_user_error(code, err, "--init-from", "full, head, top_k=1")
  assert not work.exists()


def test_init_from_without_checkpoint(tmp_path, capsys):
  empty, work = tmp_path / "empty", tmp_path / "run"
  empty.mkdir()
  code, _, err = run(capsys, "compare", *CLF_ARGS, "--init-from", empty, "--workdir", work)
  _assert_user_error(code, err, str(empty))
  assert not work.exists()


def test_compare_help_lists_its_flags(capsys, tmp_path):
  code, out, _ = run(capsys, "compare", "--help", "--workdir", tmp_path / "never")
  assert code == 0 and out.startswith("usage: jaxlm compare ")
  assert all(f in out for f in ("--strategies:", "--init-from:", "--config.KEY=VALUE", "top_k"))
  assert not (tmp_path / "never").exists()


def test_compare_from_a_safetensors_export(compared, tmp_path, capsys):
  """An export (jaxlm export, or PyTorch weights with their config.json) is a source like a
  workdir: the grafting arms start from its weights, scratch reads with its tokenizer."""
  from jaxlm import interop
  export = tmp_path / "export"
  interop.export(compared["lm"], export)
  for source in (export, export / "model.safetensors"):
    work = tmp_path / f"cmp_{source.name}"
    code, _, err = run(capsys, "compare", *CLF_ARGS, "--config.train.num_epochs=1",
                       "--init-from", source, "--workdir", work, "--strategies", "scratch,head")
    assert code == 0, err
    result = json.loads((work / "compare.json").read_text())
    assert [a["name"] for a in result["arms"]] == ["scratch", "head"]
    report = json.loads((work / "head" / "graft_report.json").read_text())
    assert report["sources"]["encoder/layer_0/hh/kernel"] == "encoder/layer_0/hh/kernel"
