"""Classifier shapes, parameter layout (seed 003's exact count) and padding invariance."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import params as P
from jaxlm.models.classifiers import POOLINGS, LSTMClassifier, SentimentNet, masked_pool
from jaxlm.models.lstm import LSTMEncoder


def _batch(rng, batch=4, steps=7, vocab=50):
  tokens = rng.integers(0, vocab, size=(batch, steps)).astype(np.int32)
  lengths = np.array([steps, 1, 3, 5][:batch], np.int32)
  return tokens, lengths


def test_seed_003_parameter_count():
  model = LSTMClassifier(vocab_size=25_002, embed_dim=100, hidden_size=256, num_layers=1,
                         num_outputs=1)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 3), jnp.int32),
                          jnp.ones((2,), jnp.int32))["params"]
  assert P.count_params(shapes) == 2_867_049
  assert P.count_params(shapes["embed"]) == 2_500_200
  assert P.count_params(shapes["encoder"]) == 366_592  # both biases, like torch.nn.LSTM
  assert P.count_params(shapes["head"]) == 257
  assert sorted(P.flatten(shapes)) == [
      "embed/embedding", "encoder/layer_0/hh/bias", "encoder/layer_0/hh/kernel",
      "encoder/layer_0/ih/bias", "encoder/layer_0/ih/kernel", "head/bias", "head/kernel"]


def test_param_table_rows():
  rows = P.param_table({"a": {"w": np.zeros((2, 3), np.float32)}, "b": np.zeros((4,), np.int32)})
  assert rows == [P.ParamRow("a/w", (2, 3), "float32", 6), P.ParamRow("b", (4,), "int32", 4)]
  assert "total" in P.format_table(rows) and "10" in P.format_table(rows)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_padding_does_not_change_logits(pooling, bidirectional):
  rng = np.random.default_rng(0)
  model = LSTMClassifier(vocab_size=50, embed_dim=8, hidden_size=6, num_layers=2, num_outputs=3,
                         bidirectional=bidirectional, pooling=pooling, head_hidden=5)
  tokens, lengths = _batch(rng)
  params = model.init(jax.random.key(1), tokens, lengths)["params"]
  # Longer padding, filled with arbitrary tokens (not the pad id): nothing past a length may count.
  garbage = rng.integers(0, 50, size=(tokens.shape[0], 6)).astype(np.int32)
  padded = np.concatenate([tokens, garbage], axis=1)
  # Also change the original tokens past each row's length.
  scrambled = padded.copy()
  for row, n in enumerate(lengths):
    scrambled[row, n:] = rng.integers(0, 50, size=padded.shape[1] - n)
  apply = jax.jit(model.apply)
  logits = apply({"params": params}, tokens, lengths)
  assert logits.shape == (4, 3)
  np.testing.assert_allclose(apply({"params": params}, padded, lengths), logits, atol=1e-6)
  np.testing.assert_allclose(apply({"params": params}, scrambled, lengths), logits, atol=1e-6)


def test_masked_pool_matches_manual_reductions():
  rng = np.random.default_rng(0)
  outputs = rng.normal(size=(3, 5, 2)).astype(np.float32) - 3.0  # all negative: max over 0s is wrong
  lengths = np.array([5, 2, 1])
  last = rng.normal(size=(3, 2)).astype(np.float32)
  for row, n in enumerate(lengths):
    outputs[row, n:] = 0.0
  mean = masked_pool(outputs, last, lengths, "mean")
  peak = masked_pool(outputs, last, lengths, "max")
  for row, n in enumerate(lengths):
    np.testing.assert_allclose(mean[row], outputs[row, :n].mean(0), rtol=1e-6)
    np.testing.assert_allclose(peak[row], outputs[row, :n].max(0))
  concat = masked_pool(outputs, last, lengths, "concat")
  np.testing.assert_allclose(concat, np.concatenate([last, peak, mean], -1))


def test_last_pooling_is_the_output_at_the_last_valid_step():
  rng = np.random.default_rng(0)
  model = LSTMClassifier(vocab_size=50, embed_dim=8, hidden_size=6, num_layers=2)
  tokens, lengths = _batch(rng)
  params = model.init(jax.random.key(0), tokens, lengths)["params"]
  x = nn.Embed(50, 8).apply({"params": params["embed"]}, tokens)
  outputs, state = LSTMEncoder(2, 6).apply({"params": params["encoder"]}, x, lengths)
  last = outputs[np.arange(4), lengths - 1]
  np.testing.assert_allclose(state[-1][1], last, atol=1e-6)
  expected = last @ params["head"]["kernel"] + params["head"]["bias"]
  np.testing.assert_allclose(model.apply({"params": params}, tokens, lengths), expected, atol=1e-5)


def test_sentiment_net_defaults_and_dropout():
  rng = np.random.default_rng(0)
  model = SentimentNet(vocab_size=50, embed_dim=8, hidden_size=6, dropout_embed=0.2,
                       dropout_hidden=0.2, dropout_output=0.5)
  assert (model.num_layers, model.pooling, model.num_outputs) == (2, "mean", 1)
  tokens, lengths = _batch(rng)
  params = model.init(jax.random.key(0), tokens, lengths)["params"]
  assert set(params) == {"embed", "encoder", "head"}
  assert set(params["encoder"]) == {"layer_0", "layer_1"}
  eval_logits = model.apply({"params": params}, tokens, lengths)
  np.testing.assert_array_equal(eval_logits, model.apply({"params": params}, tokens, lengths))
  train_logits = model.apply({"params": params}, tokens, lengths, deterministic=False,
                             rngs={"dropout": jax.random.key(3)})
  assert eval_logits.shape == train_logits.shape == (4, 1)
  assert not np.allclose(eval_logits, train_logits)
