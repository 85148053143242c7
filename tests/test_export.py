"""Safetensors interop (jaxlm/interop.py): jaxlm -> PyTorch and PyTorch -> jaxlm give the same outputs.

Why round trips through torch itself: a name or a transpose that is wrong in both directions would
pass a jaxlm-only round trip. So an exported run is loaded into the PyTorch reference model
(nn.Embedding + nn.LSTM + nn.Linear, nn.TransformerEncoder) and compared with jaxlm on the same
padded batch, and PyTorch-initialised models saved with safetensors are imported into jaxlm and
compared the other way. Then `finetune --init-from` an export, and the errors a user can cause.

torch is a test extra that CI installs; `importorskip` is only a guard.
"""
import json
import pathlib
import shutil

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import safetensors.torch  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from cli_helpers import run  # noqa: E402
from jaxlm import checkpoint, cli, commands, config as config_lib, interop, models  # noqa: E402
from jaxlm import params as P, tokenizers  # noqa: E402
from jaxlm.errors import CheckpointError  # noqa: E402

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
SOURCE = "synthetic:train=80,test=40,unsup=160"
TINY = [f"--config.{k}={v}" for k, v in [
    ("data.source", SOURCE), ("data.batch_size", 8), ("data.eval_batch_size", 8),
    ("data.buckets", "(48,)"), ("data.max_len", 48), ("tokenizer.vocab_size", 200),
    ("model.embed_dim", 16), ("model.hidden_size", 32), ("model.num_layers", 2),
    ("train.num_devices", 1)]]
LM_ARGS = ["--config", f"{CONFIGS}/quickstart.py:pretrain", *TINY, "--config.train.max_steps=6",
           "--config.data.test_max_examples=10", "--noprogress"]
CLF_ARGS = ["--config", f"{CONFIGS}/quickstart.py:finetune", *TINY,
            "--config.train.num_epochs=1", "--noprogress"]
LENGTHS = np.array([9, 4, 6, 1], np.int32)  # >= 1: PyTorch packs (and masks attention) by them


def batch(vocab, seed=0, steps=9):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, vocab, (len(LENGTHS), steps)).astype(np.int32),
          rng.integers(0, vocab, (len(LENGTHS), steps)).astype(np.int32))


def torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.from_numpy(tokens).long(), torch.from_numpy(LENGTHS).long()).numpy()


def masked_nll(logits, targets):
  """Per-token cross-entropy of torch logits, zero past each length (jaxlm's LM contract)."""
  with torch.no_grad():
    nll = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).flatten(0, 1), torch.from_numpy(targets).long().flatten(),
        reduction="none").reshape(targets.shape).numpy()
  return np.where(np.arange(targets.shape[1])[None] < LENGTHS[:, None], nll, 0.0)


def assert_user_error(code, err, *needles):
  assert code == 2 and "Traceback" not in err, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and ": error: " in lines[0], err
  for needle in needles:
    assert needle in err, (needle, err)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
  """A tiny 2-layer LM, pretrained and exported through the CLI."""
  root = tmp_path_factory.mktemp("export")
  assert cli.main(["jaxlm", "pretrain", *LM_ARGS, "--workdir", str(root / "lm")]) == 0
  assert cli.main(["jaxlm", "export", str(root / "lm"), "--format", "safetensors"]) == 0
  return root


def test_exported_lm_gives_pytorch_the_same_logits_and_nll(lm):
  export = lm / "lm" / "export"
  config, tokenizer, model, params, _ = commands._load_run(lm / "lm", "latest")
  tensors = load_file(export / "model.safetensors")
  assert sorted(tensors) == sorted(
      ["embedding.weight", "decoder.weight", "decoder.bias"]
      + [f"lstm.{w}_{m}_l{i}" for i in (0, 1) for w in ("weight", "bias") for m in ("ih", "hh")])
  assert tensors["lstm.weight_ih_l1"].shape == (4 * 32, 32)  # torch's [4H, in], gates i, f, g, o
  np.testing.assert_array_equal(tensors["decoder.weight"], np.asarray(params["decoder"]["kernel"]).T)
  meta = json.loads((export / "config.json").read_text())
  assert meta["task"] == "lm" and meta["model"]["hidden_size"] == 32
  assert meta["torch"]["lstm"] == {"input_size": 16, "hidden_size": 32, "num_layers": 2,
                                   "batch_first": True, "bidirectional": False, "dropout": 0.1}
  assert meta["checkpoint"]["step"] == 6 and meta["vocab_size"] == tokenizer.vocab_size
  assert (export / "vocab.txt").read_text().splitlines() == tokenizer.itos

  inputs, targets = batch(tokenizer.vocab_size)
  ours, _ = model.apply({"params": params}, inputs, LENGTHS, method="logits")
  nll, _ = model.apply({"params": params}, inputs, targets, LENGTHS)
  theirs = torch_logits(interop.build_torch_model(export), inputs)
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(nll), masked_nll(theirs, targets), rtol=1e-5, atol=1e-5)


def test_export_reads_back_bit_identical_from_folder_and_file(lm):
  export = lm / "lm" / "export"
  original = P.flatten(checkpoint.restore_params(lm / "lm", which="latest"))
  for source in (export, export / "model.safetensors"):
    read = interop.read_export(source)
    assert read.config.model.name == "lstm_lm" and read.tokenizer().vocab_size == read.vocab_size
    back = P.flatten(read.params())
    assert back.keys() == original.keys()
    for path, value in original.items():
      np.testing.assert_array_equal(back[path], value, err_msg=path)


def test_tokenizer_from_vocab_txt_and_config_checks(lm, tmp_path):
  """A folder made from PyTorch may hold only vocab.txt: it is read as a word vocabulary with the
  specials its config.json names; a config.json that contradicts itself is one error."""
  export, bare = lm / "lm" / "export", tmp_path / "bare"
  shutil.copytree(export, bare, ignore=shutil.ignore_patterns("tokenizer"))
  original = interop.read_export(export).tokenizer()
  tokenizer = interop.read_export(bare).tokenizer()
  assert tokenizer.itos == original.itos and tokenizer.specials == original.specials
  text = "the movie was not good at all"
  np.testing.assert_array_equal(tokenizer.encode(text), original.encode(text))
  (bare / "vocab.txt").write_text("hello\n" + (export / "vocab.txt").read_text())
  with pytest.raises(CheckpointError, match="must start with its specials"):
    interop.read_export(bare).tokenizer()
  meta = json.loads((bare / "config.json").read_text())
  (bare / "config.json").write_text(json.dumps(dict(meta, task="classifier")))
  with pytest.raises(CheckpointError, match="task='classifier'"):
    interop.read_export(bare)


def test_finetune_init_from_an_export_grafts_and_trains(lm, capsys):
  """The export is a graft source like a workdir: same graft map, its tokenizer, and (with the
  encoder frozen) its exact weights in the fine-tuned checkpoint."""
  export, work = lm / "lm" / "export", lm / "clf"
  code, out, err = run(capsys, "finetune", *CLF_ARGS, "--config.finetune.strategy=head",
                       "--init-from", export, "--workdir", work)
  assert code == 0, err
  report = json.loads((work / "graft_report.json").read_text())
  assert report["sources"]["encoder/layer_1/hh/kernel"] == "encoder/layer_1/hh/kernel"
  assert report["sources"]["embed/embedding"] == "embed/embedding"
  assert {l["path"] for l in report["dropped"]} == {"decoder/kernel", "decoder/bias"}
  assert {l["path"] for l in report["initialised"]} == {"head/kernel", "head/bias"}
  summary = json.loads((work / "summary.json").read_text())
  assert summary["init_from"] == str(export) and summary["steps"] > 0
  assert (json.loads((work / "tokenizer" / "tokenizer.json").read_text())
          == json.loads((export / "tokenizer" / "tokenizer.json").read_text()))
  tuned = P.flatten(checkpoint.restore_params(work, which="latest"))
  exported = P.flatten(interop.read_export(export).params())
  for path in ("embed/embedding", "encoder/layer_0/ih/kernel", "encoder/layer_1/hh/bias"):
    np.testing.assert_array_equal(tuned[path], exported[path], err_msg=path)  # frozen: as grafted


def transformer_workdir(workdir, vocab=40, **model):
  """A tiny transformer classifier's workdir, written as a run writes it (config.json, tokenizer,
  one checkpoint) with initialised weights: what export reads, without a training run's compiles
  (the LM above is a trained run)."""
  config = config_lib.classifier_config("transformer_classifier")
  config.model.update(dict(d_model=16, num_heads=2, num_layers=2, ffn_dim=32, max_len=64,
                           loss="softmax", num_classes=3), **model)
  tokenizer = tokenizers.WordTokenizer(
      list(tokenizers.DEFAULT_SPECIALS) + [f"w{i}" for i in range(vocab - 4)])
  model = models.build_model(config.model, vocab)
  tokens, _ = batch(vocab)
  params = jax.jit(model.init)(jax.random.key(3), tokens, LENGTHS)["params"]
  checkpoint.save_config(workdir, config)
  tokenizer.save(workdir / "tokenizer")
  with checkpoint.Checkpointer(workdir, async_save=False) as ckpt:
    ckpt.save(1, {"params": params})
  return model, params


def test_exported_transformer_gives_pytorch_the_same_logits(tmp_path):
  """Post-norm with learned positions and a CLS token: the names the pre-norm parity test in
  tests/test_transformer.py does not reach (pos_embedding, cls_token, norm1/norm2 after)."""
  model, params = transformer_workdir(tmp_path / "run", norm="post", positional="learned",
                                      pooling="cls")
  out = interop.export(tmp_path / "run", tmp_path / "exported")
  meta = json.loads((tmp_path / "exported" / "config.json").read_text())
  assert out["step"] == meta["checkpoint"]["step"] == 1
  assert meta["torch"]["encoder_layer"]["norm_first"] is False and meta["torch"]["positions"] == 65
  tensors = load_file(tmp_path / "exported" / "model.safetensors")
  assert {"cls_token", "pos_embedding.weight", "encoder.layers.1.self_attn.in_proj_weight",
          "encoder.layers.0.norm2.weight", "head.weight"} <= set(tensors)
  assert "encoder.norm.weight" not in tensors  # post-norm has no final LayerNorm
  np.testing.assert_array_equal(
      tensors["encoder.layers.1.self_attn.in_proj_weight"],
      np.asarray(params["encoder"]["layer_1"]["attn"]["qkv"]["kernel"]).T)  # [3d, d], q, k, v
  tokens, _ = batch(40, seed=1)
  ours = jax.jit(model.apply)({"params": params}, tokens, LENGTHS)
  theirs = torch_logits(interop.build_torch_model(tmp_path / "exported"), tokens)
  assert theirs.shape == (len(LENGTHS), 3)
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-5, atol=1e-5)


# --- PyTorch -> jaxlm ------------------------------------------------------------------------

IMPORTS = {
    # A tied LM whose hidden size differs from its embedding (decoder.weight is the embedding,
    # through `proj`): safetensors.torch.save_model stores the shared matrix once.
    "tied_lm": ("lm", dict(name="lstm_lm", embed_dim=8, hidden_size=12, num_layers=2,
                           tie_weights=True)),
    "bidirectional_concat_mlp": ("classifier", dict(
        name="lstm_classifier", embed_dim=8, hidden_size=12, num_layers=2, bidirectional=True,
        pooling="concat", head_hidden=6, loss="softmax", num_classes=3)),
    "transformer_pre_norm": ("classifier", dict(
        name="transformer_classifier", d_model=16, num_heads=4, num_layers=2, ffn_dim=24,
        max_len=16, norm="pre", pooling="mean", activation="gelu", loss="bce", num_classes=2)),
}


@pytest.mark.parametrize("case", list(IMPORTS))
def test_pytorch_initialised_model_imports_with_the_same_outputs(case, tmp_path):
  task, block = IMPORTS[case]
  vocab = 30
  family = models.family_of(block["name"])
  model_cfg = family.complete(ml_collections.ConfigDict(block))
  meta = {"task": task, "model": model_cfg.to_dict(), "vocab_size": vocab,
          "torch": family.torch_architecture(model_cfg, vocab)}
  torch.manual_seed(0)
  reference = interop.build_torch_model(meta, load_weights=False)  # torch's own initialisation
  safetensors.torch.save_model(reference, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(meta))
  if case == "tied_lm":
    assert "embedding.weight" not in load_file(tmp_path / "model.safetensors")

  params = interop.read_export(tmp_path).params()
  model = family.build(model_cfg, vocab)
  tokens, targets = batch(vocab, seed=2)
  theirs = torch_logits(reference, tokens)
  if task == "lm":
    ours, _ = model.apply({"params": params}, tokens, LENGTHS, method="logits")
    nll, _ = model.apply({"params": params}, tokens, targets, LENGTHS)
    np.testing.assert_allclose(np.asarray(nll), masked_nll(theirs, targets), rtol=1e-5, atol=1e-5)
  else:
    ours = model.apply({"params": params}, tokens, LENGTHS)
  assert np.asarray(ours).shape == theirs.shape
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-5, atol=1e-5)
  # And back: the imported tree exports to the names and values torch saved.
  saved = load_file(tmp_path / "model.safetensors")
  for name, value in interop.to_torch(params, family).items():
    np.testing.assert_array_equal(value, saved.get(name, saved.get("decoder.weight")), err_msg=name)


# --- what a user can get wrong: one line, exit 2, nothing written ------------------------------


def test_init_from_bad_exports_fails_with_one_line(lm, tmp_path, capsys):
  export = lm / "lm" / "export"
  garbage = tmp_path / "garbage"
  garbage.mkdir()
  (garbage / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
  shutil.copy(export / "config.json", garbage / "config.json")
  lonely = tmp_path / "lonely"
  lonely.mkdir()
  shutil.copy(export / "model.safetensors", lonely / "weights.safetensors")
  resized = tmp_path / "resized"
  shutil.copytree(export, resized)
  meta = json.loads((resized / "config.json").read_text())
  meta["model"]["hidden_size"] = 16
  (resized / "config.json").write_text(json.dumps(meta))
  cases = [(garbage, ["model.safetensors", "is not a safetensors file"]),
           (lonely / "weights.safetensors", [str(lonely / "config.json"), "does not exist"]),
           (resized, ["lstm.weight_hh_l0 has shape (128, 32), the model needs (64, 16)"])]
  for source, needles in cases:
    work = tmp_path / f"run_{source.name}"
    code, _, err = run(capsys, "finetune", *CLF_ARGS, "--init-from", source, "--workdir", work)
    assert_user_error(code, err, *needles)
    assert not work.exists()


def test_export_errors(lm, tmp_path, capsys):
  code, _, err = run(capsys, "export", lm / "lm", "--out", lm / "lm")
  assert_user_error(code, err, "holds a run")
  code, _, err = run(capsys, "export", tmp_path / "not_a_run")
  assert_user_error(code, err, "config.json")
  code, _, err = run(capsys, "export", lm / "lm", "--format", "onnx")
  assert code == 2 and "safetensors" in err
  code, _, err = run(capsys, "export", lm / "lm", "--step", 99, "--out", tmp_path / "x")
  assert_user_error(code, err, "step 99")
  assert not (tmp_path / "x").exists()
  code, out, _ = run(capsys, "export", "--help")
  assert code == 0 and out.startswith("usage: jaxlm export WORKDIR") and "--out" in out
