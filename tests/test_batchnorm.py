"""ULMFiT's batch-normalised classifier head (`config.model.head_batchnorm`), end to end.

What could go wrong, and is checked: filler rows of a partial batch leaking into the statistics;
evaluation depending on the other rows of its batch (batch statistics instead of running
averages); statistics lost by a checkpoint, a resume or a non-finite batch; a frozen strategy, the
end-of-run test pass, `evaluate`, `predict` or `jaxlm.load` applying the model without them.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import api, batching, checkpoint, commands, graft, models, params as P, tasks
from jaxlm.models.classifiers import MLPHead
from jaxlm.models.lstm_family import LM_TO_CLASSIFIER
from jaxlm.train import steps
from cli_helpers import run
from test_loop import clf_config, lm_config

HIDDEN = 8


def bn_config(**train):
  """test_loop's tiny classifier (8 batches of 8 per epoch) with ULMFiT's concat pooling and head."""
  config = clf_config(**train)
  config.model.update(pooling="concat", head_hidden=HIDDEN, head_batchnorm=True)
  return config


def _stats(model_state):
  return P.flatten(jax.device_get(model_state))


def _assert_equal_trees(a, b):
  a, b = P.flatten(jax.device_get(a)), P.flatten(jax.device_get(b))
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=path)


# --- the model and the steps ----------------------------------------------------------------


def _model_and_loss(dropout=0.0):
  config = bn_config()
  config.model.update(dropout_embed=dropout, dropout_hidden=dropout, dropout_output=dropout,
                      head_dropout=dropout)
  family = models.family_of(config.model.name)
  model = family.build(config.model, 40)
  loss = tasks.TASKS["classifier"].loss(config, model)
  return config, family, model, loss


def _batch(ids, batch_size, labels=None):
  """A real ClassificationBatches batch of `ids` (filler rows when batch_size > len(ids))."""
  labels = np.arange(len(ids)) % 2 if labels is None else labels
  batches = batching.ClassificationBatches(ids, np.asarray(labels, np.int32), batch_size=batch_size,
                                           buckets=(16,), max_len=16, pad_id=0, shuffle=False)
  return next(iter(batches.epoch_batches()))


def _ids(rng, n):
  return [rng.integers(3, 40, rng.integers(2, 15)).astype(np.int32) for _ in range(n)]


def test_a_model_without_batchnorm_has_no_model_state():
  config = clf_config()
  config.model.update(pooling="concat", head_hidden=HIDDEN)  # the old MLP head
  family = models.family_of(config.model.name)
  batch = _batch(_ids(np.random.default_rng(0), 5), 8)
  variables = family.build(config.model, 40).init(jax.random.key(0),
                                                 *family.init_args("classifier", batch))
  assert list(variables) == ["params"]
  assert sorted(variables["params"]["head"]) == ["hidden", "out"]


def test_filler_rows_stay_out_of_the_statistics():
  """5 real rows in a batch of 8 update the running averages exactly as those 5 rows alone do,
  whatever the filler rows hold; without the row mask they would not."""
  config, family, model, loss = _model_and_loss()
  rng = np.random.default_rng(0)
  ids = _ids(rng, 5)
  partial, alone = _batch(ids, 8), _batch(ids, 5)
  assert partial["weights"].tolist() == [1] * 5 + [0] * 3
  params, state0 = steps.split_variables(model.init(jax.random.key(0),
                                                    *family.init_args("classifier", alone)))
  key = jax.random.key(1)
  update = jax.jit(lambda batch: loss(params, batch, None, key, True, model_state=state0)[3])
  with_filler, real_only = _stats(update(partial)), _stats(update(alone))
  garbage = dict(partial, tokens=partial["tokens"].copy(), lengths=partial["lengths"].copy())
  garbage["tokens"][5:] = rng.integers(3, 40, garbage["tokens"][5:].shape)
  garbage["lengths"][5:] = 16
  with_garbage = _stats(update(garbage))
  assert with_filler.keys() == real_only.keys() == {
      "batch_stats/head/bn_in/mean", "batch_stats/head/bn_in/var",
      "batch_stats/head/bn_hidden/mean", "batch_stats/head/bn_hidden/var"}
  for path in real_only:
    assert not np.allclose(real_only[path], _stats(state0)[path])  # the batch moved them
    np.testing.assert_allclose(with_filler[path], real_only[path], rtol=1e-6, atol=1e-7, err_msg=path)
    np.testing.assert_allclose(with_garbage[path], real_only[path], rtol=1e-6, atol=1e-7)
  # Control: the same batch with every row weighted 1 gives other statistics.
  unmasked = _stats(update(dict(garbage, weights=np.ones(8, np.float32))))
  assert not np.allclose(unmasked["batch_stats/head/bn_in/mean"],
                         real_only["batch_stats/head/bn_in/mean"], atol=1e-4)


def test_training_batches_never_hold_a_lone_row_but_evaluation_sees_every_example():
  """One real row has batch variance 0 and gets no gradient through the normalisation (PyTorch
  refuses such a batch): a BN head's training batches drop a bucket's lone remainder row."""
  config = bn_config()
  config.data.update(batch_size=4, buckets=(8,), max_len=8)
  tok = _tokenizer_for(config)
  records = [tasks.sources.Record("a b c", i % 2) for i in range(9)]  # 2 full batches + 1 row
  train = tasks.classification_batches(config, tok, records, shuffle=True, seed=0)
  assert [int(b["weights"].sum()) for b in train.iter_epoch(0)] == [4, 4]
  held_out = tasks.classification_batches(config, tok, records, shuffle=False, seed=0)
  assert sorted(int(b["weights"].sum()) for b in held_out.iter_epoch(0)) == [1, 4, 4]
  config.model.head_batchnorm = False
  plain = tasks.classification_batches(config, tok, records, shuffle=True, seed=0)
  assert sorted(int(b["weights"].sum()) for b in plain.iter_epoch(0)) == [1, 4, 4]


def _tokenizer_for(config):
  from jaxlm import tokenizers
  return tokenizers.build_tokenizer(config.tokenizer, ["a b c d"])


def _trained_state(model, family, loss, steps_=3):
  """Params and statistics after a few real train steps (running averages away from 0 and 1)."""
  rng = np.random.default_rng(1)
  batch = _batch(_ids(rng, 8), 8)
  params, model_state = steps.split_variables(
      model.init(jax.random.key(0), *family.init_args("classifier", batch)))
  import optax
  tx = optax.adam(1e-2)
  state = steps.create_state(params, tx, 0, model_state)
  train_step = steps.make_train_step(loss, tx)
  for _ in range(steps_):
    state, metrics, _ = train_step(state, _batch(_ids(rng, 8), 8))
  return state, metrics


def test_evaluation_uses_the_running_averages():
  """An eval-mode output depends on its row alone (and on the stored averages): a row scores the
  same alone, among other rows, or beside filler; train mode (batch statistics) does not."""
  config, family, model, loss = _model_and_loss()
  state, _ = _trained_state(model, family, loss)
  variables = {"params": state.params, **state.model_state}
  rng = np.random.default_rng(2)
  ids = _ids(rng, 6)
  full, first = _batch(ids, 6), _batch(ids[:1], 4)  # row 0 alone, with 3 filler rows
  apply = jax.jit(lambda v, b: model.apply(v, b["tokens"], b["lengths"], b["weights"]))
  np.testing.assert_allclose(apply(variables, first)[0], apply(variables, full)[0], atol=1e-6)
  others = _batch([ids[0]] + _ids(rng, 5), 6)
  np.testing.assert_allclose(apply(variables, others)[0], apply(variables, full)[0], atol=1e-6)
  # The averages are what it reads: other statistics, other logits.
  moved = jax.tree.map(lambda a: a + 0.5, state.model_state)
  assert not np.allclose(apply({"params": state.params, **moved}, full), apply(variables, full))
  train = lambda b: model.apply(variables, b["tokens"], b["lengths"], b["weights"],
                                deterministic=False, mutable=["batch_stats"])[0]
  assert not np.allclose(train(others)[0], train(full)[0], atol=1e-4)


def test_eval_step_matches_torch_batchnorm1d_in_eval_mode():
  """The head in eval mode = PyTorch's BatchNorm1d -> Dropout -> Linear -> ReLU -> BatchNorm1d ->
  Dropout -> Linear (fastai's PoolingLinearClassifier) in eval mode, from the same running stats."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(3)
  features, outputs = 12, 3
  head = MLPHead(HIDDEN, outputs, dropout=0.2, batchnorm=True, last_dropout=0.1)
  x = rng.normal(size=(5, features)).astype(np.float32)
  variables = jax.tree.map(np.asarray, head.init(jax.random.key(0), x))
  params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), variables["params"])
  stats = {name: {"mean": rng.normal(size=(d,)).astype(np.float32),
                  "var": rng.uniform(0.2, 3.0, size=(d,)).astype(np.float32)}
           for name, d in (("bn_in", features), ("bn_hidden", HIDDEN))}
  ours = np.asarray(head.apply({"params": params, "batch_stats": stats}, x))

  ref = torch.nn.Sequential(torch.nn.BatchNorm1d(features), torch.nn.Dropout(0.2),
                            torch.nn.Linear(features, HIDDEN), torch.nn.ReLU(),
                            torch.nn.BatchNorm1d(HIDDEN), torch.nn.Dropout(0.1),
                            torch.nn.Linear(HIDDEN, outputs))
  t = lambda a: torch.from_numpy(np.array(a))
  with torch.no_grad():
    for i, name in ((0, "bn_in"), (4, "bn_hidden")):
      ref[i].weight.copy_(t(params[name]["scale"]))
      ref[i].bias.copy_(t(params[name]["bias"]))
      ref[i].running_mean.copy_(t(stats[name]["mean"]))
      ref[i].running_var.copy_(t(stats[name]["var"]))
    for i, name in ((2, "hidden"), (6, "out")):
      ref[i].weight.copy_(t(params[name]["kernel"].T))
      ref[i].bias.copy_(t(params[name]["bias"]))
    expected = ref.eval()(t(x)).numpy()
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_a_non_finite_batch_keeps_the_statistics():
  config, family, model, loss = _model_and_loss()
  state, _ = _trained_state(model, family, loss, steps_=1)
  import optax
  train_step = steps.make_train_step(loss, optax.adam(1e-2))
  before = jax.device_get(state.model_state)
  batch = _batch(_ids(np.random.default_rng(4), 8), 8)
  poisoned = dict(state.params, embed={"embedding": state.params["embed"]["embedding"] * jnp.nan})
  copy = jax.tree.map(jnp.copy, state)  # the step donates its state
  bad, metrics, _ = train_step(state.replace(params=poisoned), batch)
  assert float(metrics["nonfinite"]) == 1.0
  _assert_equal_trees(bad.model_state, before)
  good, metrics, _ = train_step(copy, batch)  # control: a finite batch moves them
  assert float(metrics["nonfinite"]) == 0.0
  assert not np.allclose(_stats(good.model_state)["batch_stats/head/bn_in/mean"],
                         _stats(before)["batch_stats/head/bn_in/mean"])


def test_grafting_an_lm_initialises_the_new_head_and_its_statistics():
  config = bn_config()
  family = models.family_of(config.model.name)
  batch = _batch(_ids(np.random.default_rng(5), 4), 4)
  params, model_state = steps.split_variables(family.build(config.model, 40).init(
      jax.random.key(0), *family.init_args("classifier", batch)))
  lm_cfg = lm_config().model
  lm = family.build(lm_cfg, 40)
  lm_params = lm.init(jax.random.key(1), batch["tokens"], batch["tokens"], batch["lengths"])["params"]
  grafted, report = graft.graft(lm_params, params, LM_TO_CLASSIFIER)
  initialised = {leaf.path for leaf in report.initialised}
  assert {"head/bn_in/scale", "head/bn_in/bias", "head/bn_hidden/scale"} <= initialised
  assert not any(p.startswith(("embed", "encoder")) for p in initialised)
  stats = _stats(model_state)  # fresh: PyTorch's initial running mean 0 and variance 1
  assert all(np.all(v == 0) for k, v in stats.items() if k.endswith("mean"))
  assert all(np.all(v == 1) for k, v in stats.items() if k.endswith("var"))


# --- config ---------------------------------------------------------------------------------


def test_config_errors_name_the_key(tmp_path, capsys):
  from test_cli import CLF_ARGS
  code, _, err = run(capsys, "finetune", *CLF_ARGS, "--config.model.head_batchnorm=True",
                     "--config.model.head_hidden=0", "--workdir", tmp_path / "w")
  assert code == 2 and "config.model.head_batchnorm=True needs an MLP head" in err
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1
  code, _, err = run(capsys, "finetune", *CLF_ARGS, "--config.model.head_hidden=4",
                     "--config.model.head_dropout=1.5", "--workdir", tmp_path / "w")
  assert code == 2 and "config.model.head_dropout must be in [0, 1)" in err
  assert not (tmp_path / "w").exists()


# --- runs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gradual_runs(tmp_path_factory):
  """A 3-epoch gradual-unfreezing BN run, and the same run stopped at step 12 and rerun."""
  root = tmp_path_factory.mktemp("bn_gradual")
  config = lambda **train: _gradual(bn_config(num_epochs=3, **train))
  one_go, resumed = root / "one_go", root / "resumed"
  full = commands.finetune(config(), one_go, progress=False)
  commands.finetune(config(max_steps=12), resumed, progress=False)
  with checkpoint.Checkpointer(resumed, read_only=True) as ckpt:
    stopped = ckpt.restore_variables(12)
  rest = commands.finetune(config(), resumed, progress=False)
  return dict(one_go=one_go, resumed=resumed, full=full, rest=rest, stopped=stopped)


def _gradual(config):
  config.finetune.update(strategy="gradual", discriminative_decay=2.6)
  return config


def test_statistics_are_checkpointed_and_a_resumed_run_is_bit_identical(gradual_runs):
  r = gradual_runs
  init = tasks.build_task(bn_config()).init_variables(0)[1]
  _, stopped_state = r["stopped"]
  # The step-12 checkpoint holds statistics that training moved.
  assert not np.allclose(_stats(stopped_state)["batch_stats/head/bn_in/mean"],
                         _stats(init)["batch_stats/head/bn_in/mean"])
  for which in ("latest", "best"):
    a = checkpoint.restore_variables(r["one_go"], which=which)
    b = checkpoint.restore_variables(r["resumed"], which=which)
    _assert_equal_trees(a, b)
  # Every train row (a row per step) and eval equal; the stopped leg also evaluated at step 12.
  strip = lambda rows: [{k: v for k, v in row.items() if k != "tokens_per_sec"} for row in rows
                        if row.get("step") != 12 or row.get("split") != "valid"]
  read = lambda w: strip(map(json.loads, (w / "metrics.jsonl").read_text().splitlines()))
  assert len(read(r["one_go"])) == 24 + 3 and read(r["one_go"]) == read(r["resumed"])
  assert r["full"]["test_accuracy"] == r["rest"]["test_accuracy"]
  assert r["full"]["test_loss"] == r["rest"]["test_loss"]


def test_gradual_trains_with_batchnorm(gradual_runs):
  """The gradual run learned (valid loss fell) and its last epoch trained every group."""
  rows = [json.loads(l) for l in (gradual_runs["one_go"] / "metrics.jsonl").read_text().splitlines()]
  valid = [row["loss"] for row in rows if row.get("split") == "valid"]
  assert len(valid) == 3 and valid[-1] < valid[0]
  assert gradual_runs["full"]["trainable_parameters_last_epoch"] == gradual_runs["full"]["parameters"]


def test_evaluate_predict_and_load_use_the_statistics(gradual_runs, capsys):
  """`jaxlm evaluate`, `jaxlm predict` and `jaxlm.load(...).predict` of the BN workdir reproduce the
  summary's test accuracy; without the running averages the probabilities differ."""
  work, summary = gradual_runs["one_go"], gradual_runs["full"]
  evaluated = commands.evaluate(work)
  assert evaluated["accuracy"] == summary["test_accuracy"]
  np.testing.assert_allclose(evaluated["loss"], summary["test_loss"], rtol=1e-6)
  config = checkpoint.load_config(work)
  records = tasks.read_split(config, config.data.test_split, labeled=True)
  texts, labels = [r.text for r in records], np.array([r.label for r in records])
  predicted = commands.predict(work, texts)
  capsys.readouterr()
  assert np.mean([p["label"] for p in predicted] == labels) == summary["test_accuracy"]
  # Its probabilities give the summary's test log loss (accuracy alone could be the majority's).
  p_true = [p["probability"] if p["label"] == y else 1 - p["probability"]
            for p, y in zip(predicted, labels)]
  np.testing.assert_allclose(-np.mean(np.log(p_true)), summary["test_loss"], rtol=1e-5)
  loaded = api.load(work)
  assert sorted(_stats(loaded.model_state)) == sorted(_stats(gradual_runs["stopped"][1]))
  assert loaded.predict(texts) == predicted
  code, out, err = run(capsys, "evaluate", "--workdir", work)
  assert code == 0, err
  assert f"accuracy {summary['test_accuracy']:.4f}" in out
  fresh = P.unflatten({k: np.zeros_like(v) if k.endswith("mean") else np.ones_like(v)
                       for k, v in _stats(loaded.model_state).items()})  # as initialised
  naive = commands.class_probabilities(config, loaded.tokenizer, loaded.model, loaded.params,
                                       texts, fresh)
  used = commands.class_probabilities(config, loaded.tokenizer, loaded.model, loaded.params,
                                      texts, loaded.model_state)
  assert not np.allclose(naive, used, atol=1e-3)


def test_head_strategy_trains_the_head_and_its_statistics_only(tmp_path):
  config = bn_config(num_epochs=1)
  config.finetune.strategy = "head"
  summary = commands.finetune(config, tmp_path / "head", progress=False)
  init_params, init_state = tasks.build_task(bn_config()).init_variables(0)
  params, model_state = checkpoint.restore_variables(tmp_path / "head")
  before, after = P.flatten(init_params), P.flatten(params)
  for path in before:
    moved = not np.array_equal(before[path], after[path])
    assert moved == path.startswith("head/"), path
  for path, value in _stats(model_state).items():  # frozen or not, train mode updates them
    assert not np.allclose(value, _stats(init_state)[path]), path
  assert summary["trainable_parameters"] == sum(np.size(v) for k, v in before.items()
                                                if k.startswith("head/"))


def test_export_carries_the_statistics(gradual_runs, capsys, tmp_path):
  """`jaxlm export` writes the running averages as BatchNorm1d buffers (the PyTorch parity of the
  exported head is tests/test_export_batchnorm.py's)."""
  code, out, err = run(capsys, "export", gradual_runs["one_go"], "--format", "safetensors",
                       "--out", tmp_path / "x")
  assert code == 0, err
  from jaxlm import interop
  _, exported = interop.read_export(tmp_path / "x").variables()
  _assert_equal_trees(exported, checkpoint.restore_variables(gradual_runs["one_go"], which="best")[1])
