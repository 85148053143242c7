"""Safetensors interop of ULMFiT's batch-normalised head (`model.head_batchnorm=True`).

What could go wrong, and is checked: the running averages left out of the export (PyTorch would
then normalise by its initial 0 and 1), the head's layers under the plain MLP head's indices, a
`num_batches_tracked` that strict `load_state_dict` refuses, the averages lost or misplaced on the
way back into jaxlm, and an export of such a run no longer grafting its LM part. The run is
trained for a few steps so that its statistics are far from their initial values; every
comparison is against torch itself (tests/test_export.py says why).

torch is a test extra that CI installs; `importorskip` is only a guard.
"""
import json
import shutil

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import safetensors.torch  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from cli_helpers import run  # noqa: E402
from jaxlm import checkpoint, cli, commands, config as config_lib, interop, models  # noqa: E402
from jaxlm import params as P  # noqa: E402
from jaxlm.errors import CheckpointError  # noqa: E402
from test_export import CLF_ARGS, LENGTHS, batch, torch_logits  # noqa: E402

HIDDEN, HEAD = 16, 8
STEPS = 4
BN_NAMES = ["head.0", "head.4"]  # BatchNorm1d(features), BatchNorm1d(head_hidden)


def bn_config(**train):
  """A tiny 2-layer lstm_classifier with ULMFiT's concat pooling and batch-normalised head."""
  config = config_lib.classifier_config("lstm_classifier")
  config.data.update(source="synthetic:train=80,test=40,unsup=160", batch_size=8,
                     eval_batch_size=8, buckets=(48,), max_len=48, num_labeled=0,
                     valid_fraction=0.2, test_max_examples=16)
  config.tokenizer.vocab_size = 200
  config.model.update(embed_dim=12, hidden_size=HIDDEN, num_layers=2, pooling="concat",
                      head_hidden=HEAD, head_batchnorm=True, head_dropout=0.1)
  config.optim.update(learning_rate=3e-3, schedule="constant")
  config.train.update(**{"num_devices": 1, "num_epochs": 1, "max_steps": STEPS,
                         "eval_max_batches": 2, **train})
  return config


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory):
  """The BN classifier trained STEPS steps, exported through the CLI."""
  root = tmp_path_factory.mktemp("export_bn")
  commands.finetune(bn_config(), root / "clf", progress=False)
  assert cli.main(["jaxlm", "export", str(root / "clf"), "--format", "safetensors"]) == 0
  return root


def _stats(model_state):
  return P.flatten(jax.device_get(model_state))


def test_export_holds_the_head_as_batchnorm1d_modules(bn_run):
  export = bn_run / "clf" / "export"
  params, model_state = checkpoint.restore_variables(bn_run / "clf", which="best")
  meta = json.loads((export / "config.json").read_text())
  step = meta["checkpoint"]["step"]
  assert 0 < step <= STEPS
  arch = meta["torch"]
  assert arch["head_batchnorm"] is True and arch["head_dropout"] == 0.1
  assert arch["batchnorm"] == {"eps": 1e-5, "momentum": 0.1}
  assert arch["features"] == 3 * HIDDEN and arch["head_hidden"] == HEAD
  tensors = load_file(export / "model.safetensors")
  head = {n for n in tensors if n.startswith("head.")}
  assert head == {f"{m}.{t}" for m in BN_NAMES for t in ("weight", "bias", "running_mean",
                                                         "running_var", "num_batches_tracked")} | {
      f"{m}.{t}" for m in ("head.2", "head.6") for t in ("weight", "bias")}
  for name in BN_NAMES:  # the train steps the statistics were updated in, as PyTorch counts
    counter = tensors[f"{name}.num_batches_tracked"]
    assert counter.dtype == np.int64 and counter.shape == () and int(counter) == step
  stats = _stats(model_state)
  for name, module in zip(BN_NAMES, ("bn_in", "bn_hidden")):
    mean, var = stats[f"batch_stats/head/{module}/mean"], stats[f"batch_stats/head/{module}/var"]
    assert not np.allclose(mean, 0.0, atol=1e-3) and not np.allclose(var, 1.0, atol=1e-3)  # trained
    np.testing.assert_array_equal(tensors[f"{name}.running_mean"], mean)
    np.testing.assert_array_equal(tensors[f"{name}.running_var"], var)
    np.testing.assert_array_equal(tensors[f"{name}.weight"], params["head"][module]["scale"])
  np.testing.assert_array_equal(tensors["head.2.weight"], np.asarray(params["head"]["hidden"]["kernel"]).T)
  np.testing.assert_array_equal(tensors["head.6.weight"], np.asarray(params["head"]["out"]["kernel"]).T)


def test_pytorch_in_eval_mode_gives_jaxlm_evaluation_logits(bn_run):
  """Strict `load_state_dict` into nn.Embedding + nn.LSTM + concat pooling + ULMFiT's head, in
  eval mode: jaxlm's evaluation-mode logits (running averages, not the batch's statistics)."""
  export = bn_run / "clf" / "export"
  config, tokenizer, model, params, model_state = commands._load_run(bn_run / "clf", "best")
  reference = interop.build_torch_model(export, load_weights=False)
  assert [type(m) for m in reference.head] == [
      torch.nn.BatchNorm1d, torch.nn.Dropout, torch.nn.Linear, torch.nn.ReLU,
      torch.nn.BatchNorm1d, torch.nn.Dropout, torch.nn.Linear]
  assert reference.head[1].p == config.model.dropout_output and reference.head[5].p == 0.1
  result = reference.load_state_dict(safetensors.torch.load_file(export / "model.safetensors"),
                                     strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  reference.eval()
  tokens, _ = batch(tokenizer.vocab_size, seed=4)
  ours = np.asarray(jax.jit(model.apply)({"params": params, **model_state}, tokens, LENGTHS))
  theirs = torch_logits(reference, tokens)
  assert theirs.shape == ours.shape == (len(LENGTHS), 1)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
  # build_torch_model's own loading gives the same model.
  np.testing.assert_allclose(torch_logits(interop.build_torch_model(export), tokens), theirs,
                             rtol=0, atol=0)
  # The statistics matter: jaxlm with the initial averages (0, 1) is another model.
  fresh = jax.tree.map(np.asarray, model_state)
  fresh = P.unflatten({k: np.zeros_like(v) if k.endswith("mean") else np.ones_like(v)
                       for k, v in P.flatten(fresh).items()})
  naive = np.asarray(model.apply({"params": params, **fresh}, tokens, LENGTHS))
  assert not np.allclose(naive, theirs, atol=1e-3)


def test_export_reads_back_params_and_statistics_bit_identical(bn_run):
  export = bn_run / "clf" / "export"
  params, model_state = checkpoint.restore_variables(bn_run / "clf", which="best")
  read = interop.read_export(export)
  back_params, back_state = read.variables()
  for original, back in ((params, back_params), (model_state, back_state)):
    original, back = P.flatten(jax.device_get(original)), P.flatten(back)
    assert original.keys() == back.keys()
    for path, value in original.items():
      np.testing.assert_array_equal(back[path], value, err_msg=path)
  assert sorted(P.flatten(back_state)) == [
      "batch_stats/head/bn_hidden/mean", "batch_stats/head/bn_hidden/var",
      "batch_stats/head/bn_in/mean", "batch_stats/head/bn_in/var"]
  assert P.flatten(read.params()).keys() == P.flatten(back_params).keys()


def test_pytorch_trained_batchnorm_statistics_import_with_the_same_outputs(tmp_path):
  """The other direction: a PyTorch model whose BatchNorm1d buffers moved in train mode, saved
  with safetensors.torch.save_model, imports into jaxlm with the same eval-mode logits."""
  vocab = 30
  family = models.family_of("lstm_classifier")
  model_cfg = family.complete(ml_collections.ConfigDict(dict(
      name="lstm_classifier", embed_dim=8, hidden_size=12, num_layers=2, bidirectional=True,
      pooling="concat", head_hidden=6, head_batchnorm=True, loss="softmax", num_classes=3)))
  meta = {"task": "classifier", "model": model_cfg.to_dict(), "vocab_size": vocab,
          "torch": family.torch_architecture(model_cfg, vocab)}
  torch.manual_seed(0)
  reference = interop.build_torch_model(meta, load_weights=False).train()
  with torch.no_grad():
    for seed in range(3):  # train-mode passes move the running averages
      tokens, _ = batch(vocab, seed=10 + seed)
      reference(torch.from_numpy(tokens).long(), torch.from_numpy(LENGTHS).long())
  reference.eval()
  assert int(reference.head[0].num_batches_tracked) == 3
  assert not torch.allclose(reference.head[4].running_var, torch.ones(6))
  safetensors.torch.save_model(reference, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(meta))

  params, model_state = interop.read_export(tmp_path).variables()
  np.testing.assert_array_equal(model_state["batch_stats"]["head"]["bn_hidden"]["var"],
                                reference.head[4].running_var.numpy())
  tokens, _ = batch(vocab, seed=2)
  ours = family.build(model_cfg, vocab).apply({"params": params, **model_state}, tokens, LENGTHS)
  np.testing.assert_allclose(np.asarray(ours), torch_logits(reference, tokens), rtol=1e-5, atol=1e-5)
  # And back: the same names and values (the counters included).
  saved = load_file(tmp_path / "model.safetensors")
  again = interop.to_torch(params, family, model_state, batches_tracked=3)
  assert again.keys() == saved.keys()
  for name, value in again.items():
    np.testing.assert_array_equal(value, saved[name], err_msg=name)


def test_finetune_init_from_a_batchnorm_export_grafts_its_lm_part(bn_run):
  """A classifier export grafts like a classifier workdir (classifier_to_classifier): the
  encoder and embedding come from it, the head and its statistics start fresh."""
  export, work = bn_run / "clf" / "export", bn_run / "regraft"
  config = bn_config(max_steps=2)
  config.finetune.strategy = "head"  # the grafted part stays exactly as exported
  summary = commands.finetune(config, work, init_from=export, progress=False)
  assert summary["init_from"] == str(export) and summary["steps"] == 2
  report = json.loads((work / "graft_report.json").read_text())
  assert report["sources"]["encoder/layer_1/hh/kernel"] == "encoder/layer_1/hh/kernel"
  assert {l["path"] for l in report["initialised"]} == {
      f"head/{m}/{p}" for m, p in [("bn_in", "scale"), ("bn_in", "bias"), ("hidden", "kernel"),
                                   ("hidden", "bias"), ("bn_hidden", "scale"),
                                   ("bn_hidden", "bias"), ("out", "kernel"), ("out", "bias")]}
  tuned, tuned_state = checkpoint.restore_variables(work, which="latest")
  exported, exported_state = interop.read_export(export).variables()
  tuned, exported = P.flatten(tuned), P.flatten(exported)
  for path in ("embed/embedding", "encoder/layer_0/ih/kernel", "encoder/layer_1/hh/bias"):
    np.testing.assert_array_equal(tuned[path], exported[path], err_msg=path)
  # The new head's statistics are its own: two steps from (0, 1), not the exported ones.
  assert not np.allclose(_stats(tuned_state)["batch_stats/head/bn_in/mean"],
                         _stats(exported_state)["batch_stats/head/bn_in/mean"])


def test_statistics_that_do_not_fit_fail_with_one_line(bn_run, tmp_path, capsys):
  export = bn_run / "clf" / "export"
  tensors = load_file(export / "model.safetensors")
  lacking = tmp_path / "lacking"
  shutil.copytree(export, lacking)
  save_file({k: v for k, v in tensors.items() if k != "head.4.running_var"},
            lacking / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=r"head\.4\.running_var \(for batch_stats/head/"
                                            r"bn_hidden/var\) is missing"):
    interop.read_export(lacking).variables()
  work = tmp_path / "run"
  code, _, err = run(capsys, "finetune", *CLF_ARGS, "--init-from", lacking, "--workdir", work)
  assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
  assert "head.4.running_var" in err and not work.exists()
  # Read as params only, the statistics (and their counters) are tensors nothing uses: an error.
  family = models.family_of("lstm_classifier")
  template = interop.abstract_variables(interop.read_export(export).config, len(
      (export / "vocab.txt").read_text().splitlines()))[0]
  with pytest.raises(CheckpointError, match=r"head\.0\.num_batches_tracked is not a parameter"):
    interop.from_torch(tensors, template, family)
