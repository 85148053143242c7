"""The Python API (jaxlm/api.py) called as a notebook calls it: configs as dicts, results returned.

One tiny LSTM LM is pretrained, a classifier grafted from it and a one-arm comparison run per
module, all through `jaxlm.*`; every test then checks what came back against what the workdir and
the CLI's own functions say, and that nothing was printed on the way.
"""
import json
import math
import pathlib
import subprocess
import sys

import ml_collections
import pytest

import jaxlm
from jaxlm import commands
from jaxlm.data import sources
from jaxlm.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = "synthetic:train=80,test=40,unsup=160"
TINY = {"data": {"source": SOURCE, "batch_size": 8, "eval_batch_size": 8, "buckets": [48],
                 "max_len": 48},
        "tokenizer.vocab_size": 200, "model.embed_dim": 16, "model.hidden_size": 32,
        "model.num_layers": 1, "train.num_devices": 1}


# --- configs ------------------------------------------------------------------------------------


def test_import_jaxlm_is_light():
  """The API is imported on first use: `import jaxlm` (and so the CLI's startup) loads no jax."""
  code = "import sys, jaxlm; print('jax' in sys.modules, callable(jaxlm.pretrain))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["False", "True"]


def test_get_config_by_name_part_and_path_with_overrides():
  by_name = jaxlm.get_config("quickstart:finetune", {"train.num_epochs": 2, "data": {"max_len": 40}})
  by_part = jaxlm.get_config("quickstart", {"train": {"num_epochs": 2}, "data.max_len": 40},
                             part="finetune")
  by_path = jaxlm.get_config(ROOT / "configs" / "quickstart.py", {"train.num_epochs": 2,
                                                                  "data.max_len": 40}, "finetune")
  for config in (by_name, by_part, by_path):
    assert config.task == "classifier" and config.train.num_epochs == 2
    assert config.data.max_len == 40 and config.model.hidden_size == 128  # the rest as shipped
  both = jaxlm.get_config("quickstart", {"pretrain.train.max_steps": 7})
  assert both.pretrain.train.max_steps == 7 and both.finetune.train.max_steps == 0
  assert jaxlm.get_config("imdb_lm", {"data.buckets": [32, 64]}).data.buckets == (32, 64)


def test_get_config_copies_a_configdict_and_locks_the_result():
  base = jaxlm.get_config("quickstart:pretrain")
  changed = jaxlm.get_config(base, {"optim.learning_rate": 1e-4})
  assert changed.optim.learning_rate == 1e-4 and base.optim.learning_rate == 3e-3
  with pytest.raises(AttributeError):  # locked, as the CLI's: a typo is no new field
    changed.train.num_epoch = 3


@pytest.mark.parametrize("overrides,needles", [
    ({"train.num_epoch": 2}, ["'train.num_epoch'", "config.train has no 'num_epoch'",
                              "did you mean 'train.num_epochs'"]),
    ({"trian": {"seed": 1}}, ["'trian'", "the config has no 'trian'", "'train'"]),
    ({"train.num_epochs.x": 1}, ["'train.num_epochs.x'", "config.train.num_epochs is a value"]),
    ({"train.num_epochs": "two"}, ["config.train.num_epochs='two'", "expected int", "got str"]),
    ({"train": 3}, ["config.train is a block of keys"]),
    ({"model": {"hidden_sise": 8}}, ["'model.hidden_sise'", "did you mean 'model.hidden_size'"]),
])
def test_bad_overrides_are_one_line_config_errors_naming_the_key(overrides, needles):
  with pytest.raises(ConfigError) as e:
    jaxlm.get_config("quickstart:finetune", overrides)
  assert "\n" not in str(e.value)
  for needle in needles:
    assert needle in str(e.value), (needle, str(e.value))


def test_a_bad_override_fails_before_the_workdir_is_made(tmp_path):
  with pytest.raises(ConfigError, match="optim.learning_rat'"):
    jaxlm.finetune("quickstart:finetune", tmp_path / "clf", overrides={"optim.learning_rat": 1.0})
  assert not (tmp_path / "clf").exists()


# --- a pipeline, as notebook cells ----------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """pretrain -> finetune --init-from -> compare (head), each with progress bars on, as a notebook
  calls them; `printed` is everything they wrote to stdout."""
  root = tmp_path_factory.mktemp("api")
  lm_dir, clf_dir, cmp_dir = root / "lm", root / "clf", root / "cmp"
  with pytest.MonkeyPatch.context() as mp:
    import io
    stdout = io.StringIO()
    mp.setattr(sys, "stdout", stdout)
    lm = jaxlm.pretrain("quickstart:pretrain", lm_dir,
                        overrides={**TINY, "train.max_steps": 6, "data.test_max_examples": 30})
    clf = jaxlm.finetune("quickstart:finetune", clf_dir, init_from=lm_dir,
                         overrides={**TINY, "train.num_epochs": 1})
    cmp = jaxlm.compare("quickstart:finetune", cmp_dir, init_from=lm_dir, strategies="head",
                        overrides={**TINY, "train.num_epochs": 1})
  return {"lm_dir": lm_dir, "clf_dir": clf_dir, "cmp_dir": cmp_dir, "lm": lm, "clf": clf,
          "cmp": cmp, "printed": stdout.getvalue()}


def test_results_are_returned_not_printed(runs):
  assert runs["printed"] == ""
  assert runs["lm"] == json.loads((runs["lm_dir"] / "summary.json").read_text())
  assert runs["lm"]["steps"] == 6 and runs["lm"]["test_reviews"] == 30
  assert 1 < runs["lm"]["test_perplexity"] < runs["lm"]["vocab_size"] + 10


def test_finetune_returns_its_summary_and_graft_report(runs):
  clf, clf_dir = runs["clf"], runs["clf_dir"]
  stored = json.loads((clf_dir / "summary.json").read_text())
  assert {k: v for k, v in clf.items() if k != "graft_report"} == stored
  assert clf["init_from"] == str(runs["lm_dir"])
  report = clf["graft_report"]
  assert report == json.loads((clf_dir / "graft_report.json").read_text())
  assert "embed/embedding" in {leaf["path"] for leaf in report["copied"]}
  assert {leaf["path"] for leaf in report["initialised"]} == {"head/bias", "head/kernel"}
  assert json.loads((clf_dir / "config.json").read_text())["model"]["hidden_size"] == 32


def test_evaluate_returns_the_test_figures_of_the_best_checkpoint(runs, capsys):
  out = jaxlm.evaluate(runs["clf_dir"])
  assert capsys.readouterr().out == ""
  assert out["accuracy"] == pytest.approx(runs["clf"]["test_accuracy"])
  assert out["records"] == 40 and sum(map(sum, out["confusion"])) == 40
  jaxlm.evaluate(runs["clf_dir"], verbose=True)  # the CLI's lines, on request
  assert "test: accuracy" in capsys.readouterr().out


def test_compare_returns_compare_json_and_formats_its_table(runs):
  cmp = runs["cmp"]
  assert cmp == json.loads((runs["cmp_dir"] / "compare.json").read_text())
  assert [arm["name"] for arm in cmp["arms"]] == ["head"]
  assert cmp["arms"][0]["trainable_parameters"] == 33  # the head of a 32-unit encoder, one logit
  table = jaxlm.format_compare(cmp)
  assert table == (runs["cmp_dir"] / "compare.md").read_text()
  assert "| head | pretrained |" in table
  assert (runs["cmp_dir"] / "compare.png").stat().st_size > 0
  from jaxlm import compare  # still the module, which the API's function shares a name with
  assert compare.parse_strategies("head")[0].name == "head" and jaxlm.compare is compare


def test_load_predicts_what_the_cli_predicts(runs, capsys):
  run = jaxlm.load(runs["clf_dir"])
  assert run.task == "classifier" and run.config.model.name == "sentiment_net"
  assert run.tokenizer.vocab_size == runs["lm"]["vocab_size"]
  assert run.summary == json.loads((runs["clf_dir"] / "summary.json").read_text())
  assert repr(run) == f"Run({str(runs['clf_dir'])!r}: classifier, sentiment_net, 9,697 parameters)"
  texts = ["not good at all , but the acting was superb !", "", "the plot was dull ."]
  answers = run.predict(texts)
  assert capsys.readouterr().out == ""
  assert answers == commands.predict(runs["clf_dir"], texts)  # what `jaxlm predict` prints
  printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert printed == answers
  for a in answers:
    assert a["label"] in (0, 1) and 0.5 <= a["probability"] <= 1
  single = run.predict("superb")  # one string is one text, not a list of characters
  assert len(single) == 1 and single[0]["text"] == "superb"
  with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
    run.predict(["fine", 3])
  logits = run.model.apply({"params": run.params}, *_encoded(run, texts[2]))
  p1 = 1 / (1 + math.exp(-float(logits[0, 0])))  # the plain Flax model, one BCE logit
  assert max(p1, 1 - p1) == pytest.approx(answers[2]["probability"], rel=1e-5)


def _encoded(run, text):
  import numpy as np
  ids = run.tokenizer.encode_batch([text])[0]
  return np.asarray([ids], np.int32), np.asarray([len(ids)], np.int32)


def test_load_an_lm_scores_texts_as_evaluate_does(runs):
  run = jaxlm.load(runs["lm_dir"])
  assert run.task == "lm"
  with pytest.raises(ConfigError, match=r"holds a lm run: predict needs a classifier.*perplexity"):
    run.predict(["good"])
  texts = [r.text for r in sources.open_source(SOURCE).read("test")]
  mine = run.perplexity(texts)
  split = jaxlm.evaluate(runs["lm_dir"], split="test")  # the whole split: 40 reviews
  assert mine["records"] == split["records"] == 40
  assert mine["count"] == split["count"]
  assert mine["perplexity"] == pytest.approx(split["perplexity"], rel=1e-5)
  assert 1 < run.perplexity("the plot was good .")["perplexity"] < 250
  with pytest.raises(ConfigError, match="holds a classifier run: perplexity needs"):
    jaxlm.load(runs["clf_dir"]).perplexity(["good"])


def test_inspect_and_diff(runs):
  ins = jaxlm.inspect(runs["clf_dir"], strategy="head")
  assert ins.parameters == 9_697 and ins.trainable_parameters == 33
  assert "sentiment_net (classifier)" in jaxlm.format_inspection(ins)
  d = jaxlm.diff(runs["lm_dir"], runs["clf_dir"])
  assert {leaf.path for leaf in d.added} == {"head/bias", "head/kernel"}
  assert "removed" in jaxlm.format_inspection(d)
