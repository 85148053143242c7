"""`jaxlm inspect`: counts, bytes and subtree totals, strategy marks, tree diffs, every kind of PATH.

One tiny LSTM LM (2 layers, so 4 layer groups) is pretrained for a few steps and grafted into a
classifier, once per module; the strategy expectations are written out by path and layer depth,
not recomputed with the freezing code under test.
"""
import json
import pathlib

import pytest

from jaxlm import checkpoint, commands, config as config_lib, inspection, params as P
from jaxlm.errors import ConfigError
from cli_helpers import run

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
TINY = dict(
    data=dict(source="synthetic:train=80,test=40,unsup=160", batch_size=8, eval_batch_size=8,
              buckets=(48,), max_len=48, test_max_examples=16),
    tokenizer=dict(vocab_size=100), model=dict(embed_dim=8, hidden_size=16, num_layers=2),
    train=dict(num_devices=1, max_steps=3, num_epochs=1, eval_max_batches=2))


def tiny_config(part):
  config = config_lib.get_config(CONFIGS / "quickstart.py", part)
  for block, values in TINY.items():
    config[block].update(values)
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("inspect")
  lm, clf = root / "lm", root / "clf"
  commands.pretrain(tiny_config("pretrain"), lm, progress=False)
  commands.finetune(tiny_config("finetune"), clf, init_from=lm, progress=False)
  return {"lm": lm, "clf": clf}


def test_counts_bytes_and_subtree_totals(runs):
  ins = inspection.inspect(runs["lm"])
  params = checkpoint.restore_params(runs["lm"])  # the real arrays, to check the metadata against
  arrays = P.flatten(params)
  assert ins.kind == "workdir" and ins.model == "lstm_lm" and ins.step == 3
  assert "(latest)" in ins.source  # an LM's default checkpoint: its latest
  assert [leaf.path for leaf in ins.leaves] == list(arrays)
  assert ins.parameters == P.count_params(params) > 0
  for leaf in ins.leaves:
    array = arrays[leaf.path]
    assert leaf.shape == array.shape and leaf.dtype == str(array.dtype)
    assert leaf.count == array.size and leaf.bytes == array.size * array.dtype.itemsize
    assert leaf.trainable is None and leaf.lr_multiplier is None  # no strategy, no marks
  assert ins.bytes == sum(a.size * a.dtype.itemsize for a in arrays.values())
  subtrees = {s.path: s for s in ins.subtrees}
  assert {"embed", "encoder", "encoder/layer_0", "encoder/layer_1", "decoder"} <= set(subtrees)
  for path, s in subtrees.items():
    under = [a for p, a in arrays.items() if p.startswith(path + "/")]
    assert (s.arrays, s.count, s.bytes) == (len(under), sum(a.size for a in under),
                                            sum(a.nbytes for a in under)), path
  top = [s for s in ins.subtrees if "/" not in s.path]
  assert sum(s.count for s in top) == ins.parameters


def test_head_marks_only_the_head(runs):
  ins = inspection.inspect(runs["clf"], strategy="head")
  assert "(best)" in ins.source  # a classifier's default checkpoint: its best by validation
  heads = [l for l in ins.leaves if l.path.startswith("head/")]
  assert heads and len(heads) < len(ins.leaves)
  for leaf in ins.leaves:
    is_head = leaf.path.startswith("head/")
    assert leaf.trainable is is_head, leaf.path
    assert leaf.lr_multiplier == (1.0 if is_head else 0.0), leaf.path
  assert ins.trainable_parameters == sum(l.count for l in heads)
  subtrees = {s.path: s for s in ins.subtrees}
  assert subtrees["head"].trainable == subtrees["head"].count
  assert subtrees["encoder"].trainable == 0 and subtrees["embed"].trainable == 0


def _trainable_groups(ins):
  return {l.path.split("/")[0] + ("/" + l.path.split("/")[1] if l.path.startswith("encoder") else "")
          for l in ins.leaves if l.trainable}


def test_gradual_unfreezes_one_group_per_epoch(runs):
  first = inspection.inspect(runs["clf"], strategy="gradual", epoch=0)
  second = inspection.inspect(runs["clf"], strategy="gradual", epoch=1)
  last = inspection.inspect(runs["clf"], strategy="gradual", epoch=3)
  assert _trainable_groups(first) == {"head"}
  assert _trainable_groups(second) == {"head", "encoder/layer_1"}
  assert _trainable_groups(last) == {"head", "encoder/layer_1", "encoder/layer_0", "embed"}
  assert first.trainable_parameters < second.trainable_parameters < last.trainable_parameters
  assert last.trainable_parameters == last.parameters
  assert "in epoch 2 (--epoch 1)" in inspection.format_inspection(second)


def test_discriminative_multipliers_are_decay_to_the_depth(runs):
  depth = {"head": 0, "encoder/layer_1": 1, "encoder/layer_0": 2, "embed": 3}
  ins = inspection.inspect(runs["clf"], strategy="discriminative=2.6")
  assert ins.strategy == "discriminative=2.6" and ins.trainable_parameters == ins.parameters
  groups = set()
  for leaf in ins.leaves:
    groups.add(leaf.group)
    assert leaf.lr_multiplier == pytest.approx(2.6 ** -depth[leaf.group]), leaf.path
  assert groups == set(depth)
  # top_k=1: the head and the group below it train, at multiplier 1 (no decay in that arm).
  top = inspection.inspect(runs["clf"], strategy="top_k=1")
  assert {l.group for l in top.leaves if l.trainable} == {"head", "encoder/layer_1"}
  assert {l.lr_multiplier for l in top.leaves if l.trainable} == {1.0}


def test_diff_of_an_lm_and_its_grafted_classifier(runs):
  d = inspection.diff(runs["lm"], runs["clf"])
  assert d.removed and all(l.path.startswith("decoder/") for l in d.removed)
  assert d.added and all(l.path.startswith("head/") for l in d.added)
  shared = {l.path for l in d.shared}
  assert "embed/embedding" in shared and d.changed == []
  lm = inspection.inspect(runs["lm"])
  assert shared == {l.path for l in lm.leaves if l.path.startswith(("embed/", "encoder/"))}
  text = inspection.format_diff(d)
  assert any(line.split()[:2] == ["removed", "decoder"] for line in text.splitlines()), text
  assert any(line.split()[:2] == ["shared", "encoder"] for line in text.splitlines()), text
  # A wider classifier changes the encoder's shapes: listed leaf by leaf with both shapes.
  wide = tiny_config("finetune")
  wide.model.hidden_size = 24
  d2 = inspection.diff(runs["clf"], wide)
  changed = {a.path: (a.shape, b.shape) for a, b in d2.changed}
  assert changed["encoder/layer_0/hh/kernel"] == ((16, 64), (24, 96))
  assert "embed/embedding" in {l.path for l in d2.shared}


def test_checkpoint_step_and_config_paths(runs):
  step_dir = runs["lm"] / "checkpoints" / "3"
  by_step = inspection.inspect(step_dir)
  assert by_step.kind == "checkpoint" and by_step.step == 3
  assert by_step.leaves == inspection.inspect(runs["lm"]).leaves
  with pytest.raises(ConfigError, match="step 3"):
    inspection.inspect(step_dir, step=2)
  # A config file and a shipped config's name: abstract params with the config's vocabulary.
  seed003 = inspection.inspect(CONFIGS / "seed003_lstm.py")
  assert seed003.kind == "config" and seed003.parameters == 2_867_049 and seed003.step is None
  assert inspection.inspect("seed003_lstm").leaves == seed003.leaves
  part = inspection.inspect(f"{CONFIGS / 'quickstart.py'}:finetune", strategy=inspection.RUN_CONFIG)
  assert part.model == "sentiment_net" and part.strategy == "full (the config's)"
  # A ConfigDict: the tiny classifier's config builds the workdir's shapes (its tokenizer kept
  # the full 100 words + 4 specials).
  assert inspection.inspect(tiny_config("finetune")).leaves == inspection.inspect(runs["clf"]).leaves


def _one_line_error(code, err, *needles):
  assert code == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxlm inspect: error: "), err
  for needle in needles:
    assert needle in lines[0], (needle, err)


def test_cli_table_json_and_diff(runs, capsys):
  code, out, err = run(capsys, "inspect", runs["clf"], "--strategy", "head")
  assert code == 0, err
  lines = out.splitlines()
  assert lines[0].startswith("sentiment_net (classifier): ") and "train" in lines[1]
  embedding = next(l for l in lines if l.strip().startswith("embedding"))
  assert "(104, 8)" in embedding and "float32" in embedding and "frozen" in embedding
  ins = inspection.inspect(runs["clf"], strategy="head")
  assert f"total: {ins.parameters:,} parameters" in out
  assert f"trainable under head: {ins.trainable_parameters:,} parameters" in out
  code, out, err = run(capsys, "inspect", runs["clf"], "--strategy", "gradual", "--epoch", "1",
                       "--json")
  assert code == 0, err
  data = json.loads(out)
  assert data == json.loads(json.dumps(inspection.inspect(runs["clf"], strategy="gradual",
                                                          epoch=1).to_dict()))
  code, out, err = run(capsys, "inspect", runs["lm"], "--diff", runs["clf"], "--json")
  assert code == 0, err
  counts = json.loads(out)["counts"]
  assert counts["added"]["arrays"] == 2 and counts["removed"]["arrays"] == 2  # kernel + bias each
  code, out, err = run(capsys, "inspect", "--workdir", runs["lm"], "--step", "3")  # the old flags
  assert code == 0 and "checkpoint step 3" in out, err


@pytest.mark.parametrize("args,needles", [
    (["no/such/run"], ["no/such/run", "no such workdir", "seed003_lstm"]),
    (["WORKDIR", "--step", "99"], ["no checkpoint for step 99", "available steps: [3]"]),
    (["CLF", "--strategy", "top_k=9"], ["--strategy top_k=9", "must be in [0, 3]"]),
    (["WORKDIR", "--strategy", "bogus"], ["'bogus' is not a strategy"]),
    (["WORKDIR", "--strategy", "head"], ["strategy='head' needs a 'head' module"]),  # an LM
    (["WORKDIR", "--strategy", "config"], ["has no config.finetune"]),
    (["WORKDIR", "--diff", "WORKDIR", "--strategy", "head"], ["takes no --strategy"]),
    (["WORKDIR", "WORKDIR"], ["takes one PATH, got 2"]),
    (["WORKDIR", "--config", "seed003_lstm"], ["needs one PATH", "got 2"]),
    ([], ["needs one PATH", "got 0"]),
    (["quickstart"], ["config quickstart has several parts", "NAME:finetune"]),
    (["--config", "quickstart"], ["several parts"]),
])
def test_cli_errors_are_one_line(runs, capsys, args, needles):
  args = [{"WORKDIR": runs["lm"], "CLF": runs["clf"]}.get(a, a) for a in args]
  code, _, err = run(capsys, "inspect", *args)
  _one_line_error(code, err, *needles)


def test_a_safetensors_export(runs, tmp_path):
  """An export (jaxlm/interop.py) reads back as the same tree as the checkpoint it was made of."""
  interop = pytest.importorskip("jaxlm.interop")
  interop.export(runs["clf"], tmp_path / "export")
  for path in (tmp_path / "export", tmp_path / "export" / "model.safetensors"):
    ins = inspection.inspect(path, strategy="head")
    assert ins.kind == "export" and ins.model == "sentiment_net"
    assert [(l.path, l.shape, l.dtype) for l in ins.leaves] == [
        (l.path, l.shape, l.dtype) for l in inspection.inspect(runs["clf"]).leaves]
    assert {l.group for l in ins.leaves if l.trainable} == {"head"}


# --- a model state: ULMFiT's batch-normalised head ----------------------------------------------


def bn_config():
  config = tiny_config("finetune")
  config.model.update(head_hidden=4, head_batchnorm=True)
  return config


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory):
  """The tiny classifier with a batch-normalised head, trained 3 steps from scratch."""
  work = tmp_path_factory.mktemp("inspect_bn") / "clf"
  commands.finetune(bn_config(), work, progress=False)
  return work


STATS = [("batch_stats/head/bn_in/mean", (16,)), ("batch_stats/head/bn_in/var", (16,)),
         ("batch_stats/head/bn_hidden/mean", (4,)), ("batch_stats/head/bn_hidden/var", (4,))]


def test_batch_statistics_are_listed_apart_from_the_parameters(bn_run):
  ins = inspection.inspect(bn_run)
  params, model_state = checkpoint.restore_variables(bn_run, which="best")
  stats = P.flatten(model_state)
  assert sorted((l.path, l.shape) for l in ins.model_state) == sorted(STATS)
  for leaf in ins.model_state:
    array = stats[leaf.path]
    assert leaf.dtype == str(array.dtype) == "float32" and leaf.trainable is False
    assert leaf.count == array.size and leaf.bytes == array.nbytes and leaf.lr_multiplier is None
  assert ins.model_state_values == sum(a.size for a in stats.values()) == 40
  assert ins.model_state_bytes == 160
  # Not parameters: the parameter list and count are the params' alone.
  assert [l.path for l in ins.leaves] == list(P.flatten(params))
  assert ins.parameters == P.count_params(params)
  assert not any(l.path.startswith("batch_stats") for l in ins.leaves)
  subtrees = {s.path: s for s in ins.model_state_subtrees}
  assert (subtrees["batch_stats/head"].arrays, subtrees["batch_stats/head"].count) == (4, 40)
  assert (subtrees["batch_stats/head/bn_hidden"].count, subtrees["batch_stats"].bytes) == (8, 160)
  # A model without statistics has none; a config builds the same (abstract) ones.
  plain = inspection.inspect(tiny_config("finetune"))
  assert plain.model_state == [] and plain.model_state_values == 0
  abstract = inspection.inspect(bn_config())
  assert abstract.kind == "config" and abstract.model_state == ins.model_state


def test_strategy_marks_ignore_the_statistics(bn_run):
  ins = inspection.inspect(bn_run, strategy="head")
  heads = [l for l in ins.leaves if l.path.startswith("head/")]
  assert {l.path for l in heads} >= {"head/bn_in/scale", "head/bn_hidden/bias", "head/out/kernel"}
  assert all(l.trainable for l in heads) and not any(
      l.trainable for l in ins.leaves if not l.path.startswith("head/"))
  assert ins.trainable_parameters == sum(l.count for l in heads)  # no statistic among them
  assert [l.trainable for l in ins.model_state] == [False] * 4
  gradual = inspection.inspect(bn_run, strategy="gradual", epoch=3)
  assert gradual.trainable_parameters == gradual.parameters
  assert gradual.model_state == ins.model_state


def test_cli_table_and_json_show_the_statistics(bn_run, capsys):
  code, out, err = run(capsys, "inspect", bn_run, "--strategy", "head")
  assert code == 0, err
  ins = inspection.inspect(bn_run, strategy="head")
  lines = out.splitlines()
  params_total = lines.index(next(l for l in lines if l.startswith("total: ")))
  assert lines[params_total] == (f"total: {ins.parameters:,} parameters in {len(ins.leaves)} "
                                 f"arrays, {ins.bytes:,} bytes ({inspection.human_bytes(ins.bytes)})")
  assert f"trainable under head: {ins.trainable_parameters:,} parameters" in out
  state = lines[params_total:]
  assert any(l.startswith("model state (non-trainable") for l in state), out
  assert "total model state: 40 values in 4 arrays, 160 bytes (160 B)" in state
  mean = next(l for l in state if l.strip().startswith("mean") and "(16,)" in l)
  assert mean.split()[1:] == ["(16,)", "float32", "16", "64", "B"]
  assert not any("bn_in" in l and "mean" in l for l in lines[:params_total])
  code, out, err = run(capsys, "inspect", bn_run, "--json")
  assert code == 0, err
  data = json.loads(out)
  assert data["model_state_values"] == 40 and data["model_state_bytes"] == 160
  assert [(s["path"], tuple(s["shape"]), s["trainable"]) for s in data["model_state"]] == [
      (l.path, l.shape, False) for l in inspection.inspect(bn_run).model_state]
  assert data["parameters"] == ins.parameters
  # Without statistics the table has no such section.
  code, out, err = run(capsys, "inspect", "seed003_lstm")
  assert code == 0 and "total: " in out and "model state" not in out, err


def test_a_batchnorm_export_lists_its_statistics(bn_run, tmp_path):
  interop = pytest.importorskip("jaxlm.interop")
  interop.export(bn_run, tmp_path / "export")
  ins = inspection.inspect(tmp_path / "export", strategy="head")
  direct = inspection.inspect(bn_run)
  assert ins.kind == "export" and ins.model_state == direct.model_state
  assert [(l.path, l.shape) for l in ins.leaves] == [(l.path, l.shape) for l in direct.leaves]
  assert ins.model_state_values == 40
