"""Grafting: what is copied, initialised and dropped is reported; every misfit is listed at once."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import params as P
from jaxlm.errors import GraftError
from jaxlm.graft import Leaf, graft
from jaxlm.models.lstm_family import LM_TO_BIDIRECTIONAL, LM_TO_CLASSIFIER
from jaxlm.models.classifiers import LSTMClassifier, SentimentNet
from jaxlm.models.lm import LSTMLanguageModel


def lm_tree(vocab=20, embed=4, hidden=3, layers=2, seed=0):
  """An LM-shaped param tree (numpy, as a restored checkpoint gives it)."""
  rng = np.random.default_rng(seed)
  tree = {"embed": {"embedding": rng.normal(size=(vocab, embed)).astype(np.float32)},
          "encoder": {}, "decoder": {"kernel": rng.normal(size=(hidden, vocab)).astype(np.float32),
                                     "bias": np.zeros(vocab, np.float32)}}
  for i in range(layers):
    width = embed if i == 0 else hidden
    tree["encoder"][f"layer_{i}"] = {
        "ih": {"kernel": rng.normal(size=(width, 4 * hidden)).astype(np.float32),
               "bias": np.zeros(4 * hidden, np.float32)},
        "hh": {"kernel": rng.normal(size=(hidden, 4 * hidden)).astype(np.float32),
               "bias": np.zeros(4 * hidden, np.float32)}}
  return tree


def classifier_tree(**kw):
  tree = lm_tree(seed=1, **kw)
  del tree["decoder"]
  tree["head"] = {"kernel": np.ones((tree["encoder"]["layer_0"]["hh"]["kernel"].shape[0], 1),
                                    np.float32), "bias": np.zeros(1, np.float32)}
  return tree


def test_copy_drop_initialise_report():
  source, target = lm_tree(), classifier_tree()
  params, report = graft(source, target, LM_TO_CLASSIFIER)
  flat, src, tgt = P.flatten(params), P.flatten(source), P.flatten(target)
  copied = {l.path for l in report.copied}
  assert copied == {p for p in src if not p.startswith("decoder/")}
  assert [l.path for l in report.initialised] == ["head/bias", "head/kernel"]  # jax key order
  assert {l.path for l in report.dropped} == {"decoder/kernel", "decoder/bias"}
  assert report.unmatched == []
  assert Leaf("embed/embedding", (20, 4), "float32") in report.copied
  for path in copied:
    assert flat[path] is src[path]  # the source array itself
  for path in ("head/kernel", "head/bias"):
    assert flat[path] is tgt[path]  # fresh init kept
  assert set(flat) == set(tgt)
  text = report.format()
  assert "9 copied, 2 newly initialised, 2 dropped" in text
  assert "dropped by rule" in text and "head/kernel" in text
  data = json.loads(report.to_json())
  assert data["initialised"][1] == {"path": "head/kernel", "shape": [3, 1], "dtype": "float32"}
  assert len(data["copied"]) == 9 and len(data["dropped"]) == 2


def test_renaming_rule_and_first_match_wins():
  source = {"rnn": {"layer_0": {"w": np.ones((2, 2), np.float32)}}, "emb": {"t": np.ones(3)}}
  target = {"encoder": {"layer_0": {"w": np.zeros((2, 2), np.float32)}}, "embed": {"t": np.zeros(3)}}
  rules = [(r"^rnn/", "encoder/"), (r"^rnn/.*", None), (r"^emb/(.*)", r"embed/\1")]
  params, report = graft(source, target, rules)
  np.testing.assert_array_equal(params["encoder"]["layer_0"]["w"], 1.0)
  np.testing.assert_array_equal(params["embed"]["t"], 1.0)
  assert report.sources == {"encoder/layer_0/w": "rnn/layer_0/w", "embed/t": "emb/t"}
  assert "<- rnn/layer_0/w" in report.format()


def test_strict_unmatched_source_leaves():
  source, target = lm_tree(), classifier_tree()
  rules = LM_TO_CLASSIFIER[:2]  # no rule for the decoder
  with pytest.raises(GraftError) as err:
    graft(source, target, rules)
  assert "decoder/kernel" in str(err.value) and "decoder/bias" in str(err.value)
  _, report = graft(source, target, rules, strict=False)
  assert sorted(report.unmatched) == ["decoder/bias", "decoder/kernel"]
  assert "no rule matched" in report.format()


def test_vocabulary_mismatch_lists_paths_shapes_and_hint():
  with pytest.raises(GraftError) as err:
    graft(lm_tree(vocab=20), classifier_tree(vocab=25), LM_TO_CLASSIFIER)
  msg = str(err.value)
  assert "embed/embedding (20, 4) -> embed/embedding (25, 4)" in msg
  assert "vocabulary" in msg and "1 source leaves" in msg


def test_hidden_size_mismatch_lists_every_path():
  with pytest.raises(GraftError) as err:
    graft(lm_tree(hidden=3), classifier_tree(hidden=5), LM_TO_CLASSIFIER)
  msg = str(err.value)
  offending = [p for p in P.flatten(lm_tree()) if p.startswith("encoder/")]
  assert len(offending) == 8 and f"{len(offending)} source leaves" in msg
  for path in offending:
    assert path in msg
  assert "encoder/layer_0/hh/kernel (3, 12) -> encoder/layer_0/hh/kernel (5, 20)" in msg
  assert "hidden_size" in msg


def test_layer_count_mismatch():
  with pytest.raises(GraftError) as err:
    graft(lm_tree(layers=3), classifier_tree(layers=2), LM_TO_CLASSIFIER)
  msg = str(err.value)
  for leaf in ("ih/kernel", "ih/bias", "hh/kernel", "hh/bias"):
    assert f"encoder/layer_2/{leaf}" in msg
  assert "no such target path" in msg and "num_layers" in msg
  # Fewer source layers is not an error, but the report says which layer starts fresh.
  _, report = graft(lm_tree(layers=1), classifier_tree(layers=2), LM_TO_CLASSIFIER)
  assert {l.path.split("/")[1] for l in report.initialised if l.path.startswith("encoder/")} == {
      "layer_1"}


def test_dtype_mismatch_and_duplicate_target():
  target = classifier_tree()
  source = jax.tree.map(lambda x: x.astype(np.float16), lm_tree())
  with pytest.raises(GraftError, match="dtype mismatch"):
    graft(source, target, LM_TO_CLASSIFIER)
  rules = [(r"^embed/.*", "head/bias"), (r".*", None)]
  with pytest.raises(GraftError, match="already assigned"):
    graft({"embed": {"a": np.zeros(1, np.float32), "b": np.zeros(1, np.float32)}}, target, rules)


def _init(model, tokens, lengths):
  return model.init(jax.random.key(0), tokens, lengths)["params"]


@pytest.mark.parametrize("cls,kw", [
    (LSTMClassifier, dict(pooling="last")),
    (SentimentNet, dict(pooling="mean", head_hidden=4)),
    (SentimentNet, dict(pooling="concat", dropout_output=0.3)),
])
def test_end_to_end_from_language_model(cls, kw):
  tokens = np.array([[2, 5, 7, 1, 1], [3, 4, 1, 1, 1]], np.int32)
  lengths = np.array([3, 2], np.int32)
  lm = LSTMLanguageModel(vocab_size=30, embed_dim=6, hidden_size=5, num_layers=2)
  lm_params = lm.init(jax.random.key(1), tokens, tokens, lengths)["params"]
  lm_params = jax.tree.map(np.asarray, lm_params)  # as restored from disk
  model = cls(vocab_size=30, embed_dim=6, hidden_size=5, num_layers=2, **kw)
  params, report = graft(lm_params, _init(model, tokens, lengths), LM_TO_CLASSIFIER)
  flat = P.flatten(params)
  for path, value in P.flatten(lm_params).items():
    if path.startswith(("embed/", "encoder/")):
      np.testing.assert_array_equal(flat[path], value)
  assert {l.path.split("/")[0] for l in report.initialised} == {"head"}
  assert {l.path.split("/")[0] for l in report.dropped} == {"decoder"}
  logits = jax.jit(model.apply)({"params": params}, tokens, lengths)
  assert logits.shape == (2, 1) and bool(jnp.all(jnp.isfinite(logits)))
  # The grafted encoder computes what the LM's encoder computes.
  lm_hidden, _ = lm.apply({"params": lm_params}, tokens, lengths,
                          method=lambda m, t, l: m.encoder(m.embed(t), l))
  if kw["pooling"] == "last":
    expected = lm_hidden[np.arange(2), lengths - 1] @ flat["head/kernel"] + flat["head/bias"]
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_lm_with_different_tokenizer_is_refused():
  tokens, lengths = np.ones((1, 3), np.int32), np.array([3], np.int32)
  lm = LSTMLanguageModel(vocab_size=30, embed_dim=6, hidden_size=5, num_layers=1)
  lm_params = lm.init(jax.random.key(1), tokens, tokens, lengths)["params"]
  model = LSTMClassifier(vocab_size=40, embed_dim=6, hidden_size=5, num_layers=1)
  with pytest.raises(GraftError, match=r"embed/embedding \(30, 6\) -> embed/embedding \(40, 6\)"):
    graft(lm_params, _init(model, tokens, lengths), LM_TO_CLASSIFIER)


def test_unidirectional_lm_into_bidirectional_classifier():
  tokens, lengths = np.ones((1, 3), np.int32), np.array([3], np.int32)
  lm = LSTMLanguageModel(vocab_size=30, embed_dim=6, hidden_size=5, num_layers=2)
  lm_params = lm.init(jax.random.key(1), tokens, tokens, lengths)["params"]
  model = SentimentNet(vocab_size=30, embed_dim=6, hidden_size=5, bidirectional=True)
  target = _init(model, tokens, lengths)
  with pytest.raises(GraftError, match="lm_to_bidirectional"):
    graft(lm_params, target, LM_TO_CLASSIFIER)
  with pytest.raises(GraftError, match="shape mismatch"):  # layer_1's input is 2H wide
    graft(lm_params, target, LM_TO_BIDIRECTIONAL)
  one_layer = SentimentNet(vocab_size=30, embed_dim=6, hidden_size=5, num_layers=1,
                           bidirectional=True)
  params, report = graft(lm_params, _init(one_layer, tokens, lengths),
                         [(r"^encoder/layer_1/", None), *LM_TO_BIDIRECTIONAL])
  np.testing.assert_array_equal(params["encoder"]["layer_0"]["fwd"]["hh"]["kernel"],
                                lm_params["encoder"]["layer_0"]["hh"]["kernel"])
  assert {l.path for l in report.initialised if "/bwd/" in l.path} == {
      f"encoder/layer_0/bwd/{m}/{k}" for m in ("ih", "hh") for k in ("kernel", "bias")}
