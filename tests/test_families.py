"""The model-family contract (jaxlm/models/family.py) and its promise of backward compatibility.

Why these tests: the shared machinery (config validation, init, freezing, grafting, weight decay)
must ask the family, never guess from names. So every family is checked against the same contract,
a toy third family defined here trains through the real commands after one registry line, and
workdirs written by jaxlm 0.1.0 (tests/fixtures/workdirs_v0_1, before families existed) still
evaluate, resume and graft.
"""
import json
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import checkpoint, commands, config as config_lib, models, params as P
from jaxlm.errors import ConfigError, GraftError
from jaxlm.models.family import ModelFamily
from jaxlm.train import strategies

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "workdirs_v0_1"
SOURCE = "synthetic:train=80,test=40,unsup=160"


def tiny_data(config, max_len=32):
  config.data.update(source=SOURCE, batch_size=8, eval_batch_size=8, buckets=(max_len,),
                     max_len=max_len, valid_fraction=0.2)
  config.tokenizer.vocab_size = 60
  config.train.update(num_devices=1, log_every_steps=2, num_epochs=1)
  return config


def tiny_transformer(**model):
  config = tiny_data(config_lib.classifier_config("transformer_classifier"))
  config.model.update(dict(dict(d_model=16, num_heads=2, num_layers=2, ffn_dim=32, max_len=64),
                           **model))
  config.optim.update(name="adamw", learning_rate=3e-3, weight_decay=0.01)
  return config


def abstract_params(config):
  return commands._abstract_params(config, 64)


EVERY_MODEL = [(name, kind) for f in models.FAMILIES.values() for name, kind in f.models.items()]


@pytest.mark.parametrize("name,kind", EVERY_MODEL, ids=[n for n, _ in EVERY_MODEL])
def test_every_model_meets_the_contract(name, kind):
  """Config block validates, the model builds and inits from its family's init args, every leaf
  has a layer group, and weight decay spares every rank-1 leaf (biases, LayerNorm scales)."""
  config = (config_lib.lm_config if kind == "lm" else config_lib.classifier_config)(name)
  config_lib.validate(config)
  family = models.family_of(name)
  params = abstract_params(config)
  groups = family.layer_groups(params)
  flat = P.flatten(params)
  assert set(groups.of_path) == set(flat)
  assert groups.names[0] == "embed" and groups.names[-1] in ("head", "decoder")
  decay = P.flatten(strategies.decay_mask(params, family))
  for path, leaf in flat.items():
    assert decay[path] == (len(leaf.shape) >= 2), path


def test_transformer_groups_and_decay_by_rule():
  config = tiny_transformer(positional="learned", pooling="cls", norm="pre")
  family = models.family_of("transformer_classifier")
  params = abstract_params(config)
  groups = family.layer_groups(params)
  assert groups.names == ("embed", "encoder/layer_0", "encoder/layer_1", "head")
  assert {p for p, g in groups.of_path.items() if g == "embed"} == {
      "embed/embedding", "pos_embed/embedding", "cls"}
  assert groups.group_of("encoder/final_norm/scale") == "head"
  decay = P.flatten(strategies.decay_mask(params, family))
  assert decay["encoder/layer_0/attn/qkv/kernel"] and decay["embed/embedding"]
  assert not decay["encoder/layer_0/norm_attn/scale"] and not decay["cls"]
  assert not decay["encoder/layer_0/attn/qkv/bias"]


def test_config_errors_name_the_key():
  config = tiny_transformer()
  config.model.hidden_size = 8  # an LSTM field on a transformer
  with pytest.raises(ConfigError, match="config.model.hidden_size is not a field"):
    config_lib.validate(config)
  config = tiny_transformer(d_model=18, num_heads=4)
  with pytest.raises(ConfigError, match="divisible"):
    config_lib.validate(config)
  config = tiny_transformer(max_len=16)
  with pytest.raises(ConfigError, match="config.model.max_len"):
    config_lib.validate(config)
  config = config_lib.lm_config()
  config.model.name = "sentiment_net"
  with pytest.raises(ConfigError, match="classifier model"):
    config_lib.validate(config)
  config = tiny_transformer()
  config.finetune.graft_map = "lm_to_classifier"
  with pytest.raises(ConfigError, match="graft maps: classifier_to_classifier"):
    config_lib.validate(config)


def test_a_leaf_outside_every_rule_is_an_error():
  family = models.family_of("sentiment_net")
  with pytest.raises(ConfigError, match="adapter/kernel belongs to no layer group"):
    family.layer_groups({"embed": {"embedding": np.zeros((2, 2))}, "adapter": {"kernel": np.zeros(2)}})


# --- a third family: one class and one registry line ----------------------------------------


class BagOfEmbeddings(nn.Module):
  """Mean of the valid tokens' embeddings -> Dense: the smallest honest text classifier."""
  vocab_size: int
  embed_dim: int
  num_outputs: int

  @nn.compact
  def __call__(self, tokens, lengths, *, deterministic=True):
    x = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(tokens)
    valid = (jnp.arange(tokens.shape[1])[None, :] < lengths[:, None])[..., None]
    pooled = jnp.sum(jnp.where(valid, x, 0), 1) / jnp.maximum(lengths, 1)[:, None]
    return nn.Dense(self.num_outputs, name="head")(pooled)


class BagFamily(ModelFamily):
  name = "bag"
  models = {"bag_classifier": "classifier"}
  group_rules = ((r"^embed/", "embed"), (r"^head/", "head"))

  def fields(self, model_name):
    return dict(embed_dim=8)

  def build(self, model_cfg, vocab_size):
    return BagOfEmbeddings(vocab_size, model_cfg.embed_dim,
                           1 if model_cfg.loss == "bce" else model_cfg.num_classes)


def test_a_new_family_trains_through_the_shared_machinery(tmp_path, monkeypatch):
  monkeypatch.setitem(models.FAMILIES, "bag", BagFamily())
  config = tiny_data(config_lib.classifier_config("bag_classifier"))
  scratch = commands.finetune(config, tmp_path / "scratch", progress=False)
  assert scratch["model"] == "bag_classifier" and scratch["trainable_parameters"] > 0
  config.finetune.strategy = "head"
  grafted = commands.finetune(config, tmp_path / "head", init_from=tmp_path / "scratch",
                              progress=False)
  before = checkpoint.restore_params(tmp_path / "scratch", which="best")
  after = checkpoint.restore_params(tmp_path / "head", which="latest")
  np.testing.assert_array_equal(before["embed"]["embedding"], after["embed"]["embedding"])
  assert grafted["trainable_parameters"] == 8 + 1
  report = json.loads((tmp_path / "head" / "graft_report.json").read_text())
  assert [l["path"] for l in report["dropped"]] == ["head/bias", "head/kernel"]


# --- the transformer through pretrain -> graft -> strategies ----------------------------------


@pytest.fixture(scope="module")
def pretrained_transformer(tmp_path_factory):
  root = tmp_path_factory.mktemp("transformer")
  config = tiny_transformer(loss="softmax", num_classes=2)
  config.train.num_epochs = 2
  summary = commands.pretrain(config, root / "pre", progress=False)
  assert summary["command"] == "pretrain" and 0 <= summary["test_accuracy"] <= 1
  return root


# `head` trains the Dense and the pre-norm final LayerNorm feeding it (the family's head group).
@pytest.mark.parametrize("strategy,frozen", [("head", ("embed/", "encoder/layer_")),
                                             ("top_k", ("embed/", "encoder/layer_0/"))])
def test_transformer_frozen_leaves_stay_bit_identical(pretrained_transformer, strategy, frozen):
  root = pretrained_transformer
  config = tiny_transformer(loss="bce")
  config.finetune.update(strategy=strategy, top_k=1)
  work = root / strategy
  summary = commands.finetune(config, work, init_from=root / "pre", progress=False)
  source = P.flatten(checkpoint.restore_params(root / "pre", which="best"))
  tuned = P.flatten(checkpoint.restore_params(work, which="latest"))
  report = json.loads((work / "graft_report.json").read_text())
  assert {l["path"] for l in report["initialised"]} == {"head/kernel", "head/bias"}
  for path, value in tuned.items():
    if path.startswith(frozen):
      np.testing.assert_array_equal(value, source[path], err_msg=path)
    elif path.startswith("head/kernel"):
      assert value.shape == (16, 1)
  changed = [p for p in tuned if p in source and not np.array_equal(tuned[p], source[p])]
  assert changed and not any(p.startswith(frozen) for p in changed)
  assert summary["trainable_parameters"] < summary["parameters"]


def test_cross_family_graft_is_refused(pretrained_transformer, tmp_path):
  config = tiny_data(config_lib.classifier_config())
  with pytest.raises(GraftError, match="transformer family"):
    commands.finetune(config, tmp_path / "x", init_from=pretrained_transformer / "pre",
                      progress=False)
  assert not (tmp_path / "x").exists()


# --- workdirs written by jaxlm 0.1.0 --------------------------------------------------------


@pytest.fixture
def legacy(tmp_path):
  shutil.copytree(FIXTURES, tmp_path / "v0", dirs_exist_ok=False)
  return tmp_path / "v0"


def test_legacy_workdirs_evaluate(legacy):
  lm = commands.evaluate(legacy / "lm", which="latest", max_examples=16)
  assert 1 < lm["perplexity"] < 100
  clf = commands.evaluate(legacy / "clf")
  assert clf["count"] == 40 and 0 <= clf["accuracy"] <= 1


def test_legacy_workdirs_resume(legacy):
  config = checkpoint.load_config(legacy / "lm")
  config.train.max_steps = 6
  summary = commands.pretrain(config, legacy / "lm", progress=False)
  assert summary["steps"] == 6
  rows = [json.loads(l) for l in (legacy / "lm" / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["step"] == 6
  config = checkpoint.load_config(legacy / "clf")
  config.train.num_epochs = 2
  summary = commands.finetune(config, legacy / "clf", progress=False)
  assert summary["steps"] == 8


def test_legacy_lm_grafts_into_a_new_classifier(legacy, tmp_path):
  config = checkpoint.load_config(legacy / "clf")  # the sizes the fixture LM was trained with
  config.model.bidirectional = True  # the family picks lm_to_bidirectional by itself
  commands.finetune(config, tmp_path / "bi", init_from=legacy / "lm", progress=False)
  report = json.loads((tmp_path / "bi" / "graft_report.json").read_text())
  assert report["sources"]["encoder/layer_0/fwd/hh/kernel"] == "encoder/layer_0/hh/kernel"
  assert any(l["path"].startswith("encoder/layer_0/bwd/") for l in report["initialised"])
