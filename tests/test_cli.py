"""The command line end to end, through `jaxlm.cli.main`, on tiny synthetic data.

Why through `main`: flag parsing, `--config.key=value` overrides, exit codes and the one-line error
contract (docs/ARCHITECTURE.md: a user's mistake prints one message and exits 2, leaving no
half-written workdir) only exist there. Each run is a few steps of a 16/32-unit model.
"""
import io
import json
import pathlib

import pytest

from jaxlm import cli
from cli_helpers import run

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
SOURCE = "synthetic:train=80,test=40,unsup=160"


def tiny(prefix="--config."):
  """Overrides that shrink a quickstart part to seconds; `prefix` targets a sub-config."""
  return [f"{prefix}{k}={v}" for k, v in [
      ("data.source", SOURCE), ("data.batch_size", 8), ("data.eval_batch_size", 8),
      ("data.buckets", "(48,)"), ("data.max_len", 48), ("tokenizer.vocab_size", 200),
      ("model.embed_dim", 16), ("model.hidden_size", 32), ("model.num_layers", 1),
      ("train.num_devices", 1)]]


LM_ARGS = ["--config", f"{CONFIGS}/quickstart.py:pretrain", *tiny(), "--config.train.max_steps=6",
           "--config.data.test_max_examples=30", "--noprogress"]
CLF_ARGS = ["--config", f"{CONFIGS}/quickstart.py:finetune", *tiny(),
            "--config.train.num_epochs=1", "--noprogress"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  """pretrain -> finetune --init-from, once for the module's tests."""
  root = tmp_path_factory.mktemp("cli")
  lm, clf = root / "lm", root / "clf"
  assert cli.main(["jaxlm", "pretrain", *LM_ARGS, "--workdir", str(lm)]) == 0
  assert cli.main(["jaxlm", "finetune", *CLF_ARGS, "--init-from", str(lm), "--workdir", str(clf)]) == 0
  return {"root": root, "lm": lm, "clf": clf}


def test_pretrain_writes_a_complete_workdir(pipeline):
  lm = pipeline["lm"]
  for name in ("config.json", "tokenizer", "checkpoints", "metrics.jsonl", "metrics.png", "summary.json"):
    assert (lm / name).exists(), name
  summary = json.loads((lm / "summary.json").read_text())
  assert summary["command"] == "pretrain" and summary["steps"] == 6
  for key in ("test_perplexity", "unigram_perplexity", "test_tokens", "valid", "parameters", "vocab_size"):
    assert key in summary, key
  assert 1 < summary["test_perplexity"] < summary["vocab_size"] + 10
  assert summary["test_reviews"] == 30  # a seeded subset of the 40 test reviews, as configured
  rows = [json.loads(l) for l in (lm / "metrics.jsonl").read_text().splitlines()]
  assert {r["split"] for r in rows} == {"train", "valid"} and rows[-1]["step"] == 6
  assert json.loads((lm / "config.json").read_text())["model"]["hidden_size"] == 32  # overrides kept


def test_finetune_grafts_and_reports(pipeline):
  clf = pipeline["clf"]
  report = (clf / "graft_report.txt").read_text()
  assert "copied" in report and "dropped" in report
  assert "embed/embedding" in report and "decoder/kernel" in report
  copied = [l for l in report.splitlines() if l.startswith("copied")]
  assert any("encoder/layer_0/hh/kernel" in l for l in copied)
  summary = json.loads((clf / "summary.json").read_text())
  for key in ("test_accuracy", "test_loss", "test_confusion", "test_examples", "majority_accuracy",
              "best_valid", "strategy", "steps", "parameters", "train_records"):
    assert key in summary, key
  assert summary["init_from"] == str(pipeline["lm"])
  assert summary["test_examples"] == 40 and sum(map(sum, summary["test_confusion"])) == 40
  assert (clf / "metrics.jsonl").exists() and (clf / "metrics.png").exists()


def test_evaluate_matches_finetune_summary(pipeline, capsys):
  code, out, err = run(capsys, "evaluate", "--workdir", pipeline["clf"], "--split", "test")
  assert code == 0, err
  summary = json.loads((pipeline["clf"] / "summary.json").read_text())
  assert f"test: accuracy {summary['test_accuracy']:.4f}" in out
  assert "confusion matrix" in out
  code, out, err = run(capsys, "evaluate", "--workdir", pipeline["lm"], "--which", "latest")
  assert code == 0 and "perplexity" in out, err
  # The pretrain summary measured 30 of the 40 test reviews; evaluate picks the same subset.
  lm_summary = json.loads((pipeline["lm"] / "summary.json").read_text())
  code, out, err = run(capsys, "evaluate", "--workdir", pipeline["lm"], "--which", "latest",
                       "--max_examples", 30)
  assert code == 0 and f"test: perplexity {lm_summary['test_perplexity']:.3f}" in out, (out, err)


def _predictions(out):
  return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


def test_predict_from_args_and_stdin(pipeline, capsys, monkeypatch):
  texts = ["a wonderful, moving film", "not good at all"]
  code, out, err = run(capsys, "predict", "--workdir", pipeline["clf"], *texts)
  assert code == 0, err
  from_args = _predictions(out)
  assert [p["text"] for p in from_args] == texts
  assert all(p["label"] in (0, 1) and 0.5 <= p["probability"] <= 1 for p in from_args)
  monkeypatch.setattr("sys.stdin", io.StringIO(texts[0] + "\n\n" + texts[1] + "\n"))
  code, out, err = run(capsys, "predict", "--workdir", pipeline["clf"])
  assert code == 0, err
  from_stdin = _predictions(out)  # one answer per line, the blank one too, in order
  assert [p["text"] for p in from_stdin] == [texts[0], "", texts[1]]
  assert [from_stdin[0], from_stdin[2]] == from_args  # same model, same answers


# --- bad input: exit 2, one line naming the problem, nothing written --------------------------


def _jsonl_dir(root, train_lines):
  root.mkdir(parents=True)
  (root / "train.jsonl").write_text("\n".join(train_lines) + "\n")
  (root / "test.jsonl").write_text('{"text": "fine film", "label": 1}\n')
  return root


def _assert_user_error(code, err, *needles, one_line=True):
  assert code == 2
  assert "Traceback" not in err
  lines = err.strip().splitlines()
  assert lines and lines[0].startswith("jaxlm ") and ": error: " in lines[0]
  if one_line:
    assert len(lines) == 1, err
  for needle in needles:
    assert needle in err, (needle, err)


def test_unknown_source(tmp_path, capsys):
  work = tmp_path / "run"
  code, _, err = run(capsys, "pretrain", *LM_ARGS, "--config.data.source=bogus:x", "--workdir", work)
  _assert_user_error(code, err, "bogus:x")
  assert not work.exists()


def test_missing_jsonl_folder(tmp_path, capsys):
  work, missing = tmp_path / "run", tmp_path / "no_such_folder"
  code, _, err = run(capsys, "pretrain", *LM_ARGS, f"--config.data.source=jsonl:{missing}",
                     "--workdir", work)
  _assert_user_error(code, err, str(missing))
  assert not work.exists()


def test_jsonl_record_without_label(tmp_path, capsys):
  data = _jsonl_dir(tmp_path / "data", ['{"text": "good", "label": 1}', '{"text": "no label here"}'])
  work = tmp_path / "run"
  code, _, err = run(capsys, "pretrain", *LM_ARGS, f"--config.data.source=jsonl:{data}",
                     "--config.data.train_split=train", "--workdir", work)
  _assert_user_error(code, err, "train.jsonl", "line 2", "label")
  assert not work.exists()


def test_label_outside_classes(tmp_path, capsys):
  data = _jsonl_dir(tmp_path / "data", ['{"text": "good", "label": 1}', '{"text": "what", "label": 5}'])
  work = tmp_path / "run"
  code, _, err = run(capsys, "finetune", *CLF_ARGS, f"--config.data.source=jsonl:{data}",
                     "--workdir", work)
  _assert_user_error(code, err, "train.jsonl", "line 2", "label 5")
  assert not work.exists()


def test_unknown_config_key(tmp_path, capsys):
  work = tmp_path / "run"
  code, _, err = run(capsys, "pretrain", *LM_ARGS, "--config.model.hiden_size=8", "--workdir", work)
  _assert_user_error(code, err, "hiden_size", "hidden_size")
  assert not work.exists()


def test_init_from_folder_without_checkpoints(tmp_path, capsys):
  empty, work = tmp_path / "empty_lm", tmp_path / "run"
  empty.mkdir()
  code, _, err = run(capsys, "finetune", *CLF_ARGS, "--init-from", empty, "--workdir", work)
  _assert_user_error(code, err, str(empty))
  assert not work.exists() and list(empty.iterdir()) == []


def test_graft_mismatch_lists_paths_and_shapes(pipeline, tmp_path, capsys):
  """An LM with hidden 32 does not fit a classifier with hidden 16: every bad path is named."""
  work = tmp_path / "run"
  code, _, err = run(capsys, "finetune", *CLF_ARGS, "--config.model.hidden_size=16",
                     "--init-from", pipeline["lm"], "--workdir", work)
  _assert_user_error(code, err, "encoder/layer_0/hh/kernel", "(32, 128)", "(16, 64)",
                     "encoder/layer_0/ih/kernel", one_line=False)
  assert not work.exists()


def test_evaluate_workdir_without_config(tmp_path, capsys):
  work = tmp_path / "not_a_run"
  work.mkdir()
  code, _, err = run(capsys, "evaluate", "--workdir", work)
  _assert_user_error(code, err, "config.json", str(work))
  assert list(work.iterdir()) == []


# --- quickstart -------------------------------------------------------------------------------


def test_quickstart_prints_table_and_summary(tmp_path, capsys):
  work = tmp_path / "qs"
  code, out, err = run(capsys, "quickstart", "--workdir", work, "--noprogress",
                       *tiny("--config.pretrain."), "--config.pretrain.train.max_steps=6",
                       *tiny("--config.finetune."), "--config.finetune.train.num_epochs=1")
  assert code == 0, err
  table = out[out.index("jaxlm quickstart"):]
  for needle in ("LM test perplexity", "unigram baseline", "pretrained LM", "from scratch",
                 "majority class"):
    assert needle in table, needle
  summary = json.loads((work / "summary.json").read_text())
  assert summary["lm"]["test_perplexity"] > 1 and summary["lm"]["unigram_perplexity"] > 1
  for part in ("classifier_pretrained", "classifier_scratch"):
    assert 0 <= summary[part]["test_accuracy"] <= 1
  assert summary["classifier_pretrained"]["init_from"] == str(work / "lm")
  assert summary["classifier_scratch"]["init_from"] is None
  for part in ("lm", "classifier_pretrained", "classifier_scratch"):
    assert (work / part / "summary.json").exists() and (work / part / "metrics.png").exists()
  assert (work / "classifier_pretrained" / "graft_report.txt").exists()


@pytest.mark.parametrize("command,flags", [
    ("pretrain", ["--config:", "--workdir:", "--config.KEY=VALUE"]),
    ("finetune", ["--init-from:", "--[no]progress:"]),
    ("evaluate", ["--split:", "--max_examples:", "--which:"]),
])
def test_command_help_lists_its_flags(capsys, tmp_path, command, flags):
  """`jaxlm COMMAND --help` prints the command's usage and flags and runs nothing."""
  code, out, err = run(capsys, command, "--help", "--workdir", tmp_path / "never")
  assert code == 0 and out.startswith(f"usage: jaxlm {command} "), (out, err)
  assert all(f in out for f in flags), out
  assert not (tmp_path / "never").exists()


def test_bad_choice_fails_before_reading_data(tmp_path, capsys):
  """An invalid enum value is one line naming the key and the choices, before any data is read."""
  work = tmp_path / "run"
  code, _, err = run(capsys, "pretrain", *LM_ARGS, "--config.model.output=softmax",
                     f"--config.data.source=jsonl:{tmp_path / 'no_such_folder'}", "--workdir", work)
  _assert_user_error(code, err, "config.model.output='softmax'", "full, sampled, adaptive")
  assert not work.exists()


@pytest.mark.parametrize("content,needles", [
    (None, ["cannot load --config", "No such file"]),
    ("def get_config(:\n", ["line 1", "invalid syntax"]),
])
def test_missing_or_broken_config_file(tmp_path, capsys, content, needles):
  config, work = tmp_path / "my_config.py", tmp_path / "run"
  if content is not None:
    config.write_text(content)
  code, _, err = run(capsys, "pretrain", "--config", config, "--workdir", work)
  _assert_user_error(code, err, str(config), *needles)
  assert not work.exists()


def test_keep_epoch_checkpoints_keeps_every_epoch_end(tmp_path):
  """ULMFiT-style LM snapshots: a 3-epoch run keeps each epoch's last step, not only the latest."""
  args = [a for a in LM_ARGS if not a.startswith("--config.train.max_steps")]
  workdir = tmp_path / "lm"
  assert cli.main(["jaxlm", "pretrain", *args, "--config.train.num_epochs=3",
                   "--config.train.max_to_keep=1", "--config.train.keep_epoch_checkpoints=True",
                   "--workdir", str(workdir)]) == 0
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  per_epoch = json.loads((workdir / "summary.json").read_text())["steps"] // 3
  assert steps == [per_epoch, 2 * per_epoch, 3 * per_epoch]
