"""TransformerClassifier: padding and batch invariance, PyTorch parity, parameter layout, dtypes."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxlm import interop, models, params as P
from jaxlm.models.transformer import (NORMS, POOLINGS, POSITIONALS, Dropout,
                                      TransformerClassifier, sinusoidal_positions)

VOCAB = 50


def _model(**kw):
  base = dict(vocab_size=VOCAB, d_model=16, num_heads=4, num_layers=2, ffn_dim=32, max_len=32,
              num_outputs=3, dropout=0.0)
  return TransformerClassifier(**{**base, **kw})


def _init(model, seed, tokens, lengths):
  """Jitted: one compile instead of one per op of an eager init."""
  return jax.jit(model.init)(jax.random.key(seed), tokens, lengths)["params"]


def _batch(rng, lengths=(7, 1, 3, 0, 5), steps=7):
  tokens = rng.integers(0, VOCAB, size=(len(lengths), steps)).astype(np.int32)
  return tokens, np.asarray(lengths, np.int32)


@pytest.mark.parametrize("positional", POSITIONALS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("pooling", POOLINGS)
def test_padding_does_not_change_logits(pooling, norm, positional):
  rng = np.random.default_rng(0)
  model = _model(pooling=pooling, norm=norm, positional=positional)
  tokens, lengths = _batch(rng)  # includes an all-padding row (length 0)
  params = _init(model, 1, tokens, lengths)
  apply = jax.jit(model.apply)
  logits = apply({"params": params}, tokens, lengths)
  assert logits.shape == (5, 3) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  # Longer, filled with arbitrary ids (not a pad id), and the original tail past each length
  # changed too: nothing past a length may count.
  padded = np.concatenate([tokens, rng.integers(0, VOCAB, size=(5, 9)).astype(np.int32)], 1)
  for row, n in enumerate(lengths):
    padded[row, n:] = rng.integers(0, VOCAB, size=padded.shape[1] - n)
  np.testing.assert_allclose(apply({"params": params}, padded, lengths), logits, atol=1e-5)


def test_examples_do_not_see_each_other():
  rng = np.random.default_rng(2)
  model = _model()
  tokens, lengths = _batch(rng, lengths=(7, 2, 5, 4, 6, 1))
  params = _init(model, 0, tokens, lengths)
  perm = rng.permutation(len(lengths))
  apply = jax.jit(model.apply)
  logits = apply({"params": params}, tokens, lengths)
  np.testing.assert_allclose(apply({"params": params}, tokens[perm], lengths[perm]),
                             np.asarray(logits)[perm], atol=1e-6)
  # Permutation alone would not catch attention across the batch axis (that is permutation
  # equivariant too): changing one example must leave every other example's logits alone.
  changed = tokens.copy()
  changed[0] = (changed[0] + 1) % VOCAB
  other = np.asarray(apply({"params": params}, changed, lengths))
  np.testing.assert_allclose(other[1:], np.asarray(logits)[1:], atol=1e-6)
  assert not np.allclose(other[0], np.asarray(logits)[0])


# ---------------------------------------------------------------------------------------------
# PyTorch parity: nn.TransformerEncoder with the same weights gives the same logits.


def torch_encoder_to_params(embed: torch.nn.Embedding, encoder: torch.nn.TransformerEncoder,
                            head: torch.nn.Linear, template) -> dict:
  """PyTorch embedding + `nn.TransformerEncoder` + Linear -> TransformerClassifier params, by the
  library's converter (jaxlm/interop.py, the transformer family's torch names).

  One-to-one: `in_proj_weight [3d,d]` (q,k,v stacked, heads contiguous) transposes into
  `attn/qkv/kernel [d,3d]`; norm1/norm2 are norm_attn/norm_ffn; `encoder.norm` is final_norm.
  """
  module = torch.nn.ModuleDict({"embedding": embed, "encoder": encoder, "head": head})
  tensors = {name: t.detach().numpy() for name, t in module.state_dict().items()}
  return interop.from_torch(tensors, template, models.FAMILIES["transformer"])


def _torch_model(vocab, d, heads, ffn, layers, outputs, norm_first):
  torch.manual_seed(0)
  embed = torch.nn.Embedding(vocab, d)
  layer = torch.nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
  encoder = torch.nn.TransformerEncoder(layer, layers,
                                        norm=torch.nn.LayerNorm(d) if norm_first else None,
                                        enable_nested_tensor=False)
  head = torch.nn.Linear(d, outputs)
  for m in (embed, encoder, head):
    m.eval()
  return embed, encoder, head


def _torch_logits(embed, encoder, head, tokens, lengths):
  """Scaled embedding + sinusoids -> encoder with a key padding mask -> mean over valid steps."""
  d, steps = embed.embedding_dim, tokens.shape[1]
  pad = torch.arange(steps)[None, :] >= lengths[:, None]
  with torch.no_grad():
    x = embed(tokens) * math.sqrt(d) + torch.from_numpy(sinusoidal_positions(steps, d))
    y = encoder(x, src_key_padding_mask=pad)
    mean = (y * (~pad)[..., None]).sum(1) / lengths[:, None]
    return head(mean).numpy()


@pytest.mark.parametrize("norm", NORMS)
def test_matches_pytorch_transformer_encoder(norm):
  vocab, d, heads, ffn, layers, outputs = 60, 32, 4, 64, 2, 3
  torch_parts = _torch_model(vocab, d, heads, ffn, layers, outputs, norm_first=norm == "pre")
  rng = np.random.default_rng(0)
  tokens, lengths = _batch(rng, lengths=(11, 3, 7, 1), steps=11)
  tokens = tokens % vocab
  model = TransformerClassifier(vocab, d, heads, layers, ffn, max_len=16, num_outputs=outputs,
                                dropout=0.0, norm=norm)
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens, lengths)["params"]
  params = torch_encoder_to_params(*torch_parts, shapes)
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(params)))
  ours = jax.jit(model.apply)({"params": params}, tokens, lengths)
  theirs = _torch_logits(*torch_parts, torch.from_numpy(tokens).long(),
                         torch.from_numpy(lengths).long())
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5, rtol=1e-5)


def test_parameter_count_matches_pytorch():
  vocab, d, heads, ffn, layers, outputs = 1000, 64, 4, 256, 2, 2
  model = TransformerClassifier(vocab, d, heads, layers, ffn, num_outputs=outputs, norm="post",
                                positional="sinusoidal", pooling="mean")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 3), jnp.int32),
                          jnp.ones((2,), jnp.int32))["params"]
  parts = _torch_model(vocab, d, heads, ffn, layers, outputs, norm_first=False)
  assert P.count_params(shapes) == sum(p.numel() for m in parts for p in m.parameters())
  paths = set(P.flatten(shapes))
  assert {"embed/embedding", "encoder/layer_1/attn/qkv/kernel", "encoder/layer_1/attn/out/bias",
          "encoder/layer_0/ffn_in/kernel", "encoder/layer_0/ffn_out/bias",
          "encoder/layer_0/norm_attn/scale", "encoder/layer_0/norm_ffn/bias",
          "head/kernel"} <= paths
  assert not any(p.startswith(("pos_embed", "cls", "encoder/final_norm")) for p in paths)


def test_optional_parameters():
  shapes = jax.eval_shape(_model(positional="learned", pooling="cls", norm="pre").init,
                          jax.random.key(0), jnp.zeros((2, 3), jnp.int32),
                          jnp.ones((2,), jnp.int32))["params"]
  assert shapes["pos_embed"]["embedding"].shape == (33, 16)  # max_len + 1 for the CLS slot
  assert shapes["cls"].shape == (16,)
  assert shapes["encoder"]["final_norm"]["scale"].shape == (16,)


def test_sinusoidal_positions():
  table = sinusoidal_positions(5, 6)
  assert table.shape == (5, 6)
  np.testing.assert_allclose(table[:, 0], np.sin(np.arange(5)), atol=1e-6)
  np.testing.assert_allclose(table[:, 1], np.cos(np.arange(5)), atol=1e-6)
  np.testing.assert_allclose(table[3, 4], np.sin(3 / 10000 ** (4 / 6)), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Training mechanics.


def test_jit_grad_and_dropout():
  rng = np.random.default_rng(3)
  model = _model(dropout=0.2, attention_dropout=0.1, pooling="cls", positional="learned",
                 num_layers=1)  # one layer: each dropout site adds its own threefry to compile
  tokens, lengths = _batch(rng)
  params = _init(model, 0, tokens, lengths)
  labels = jnp.asarray([0, 1, 2, 0, 1])

  @jax.jit
  def loss_and_grad(p, key):
    def loss(p):
      logits = model.apply({"params": p}, tokens, lengths, deterministic=False,
                           rngs={"dropout": key})
      return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(5), labels])
    return jax.value_and_grad(loss)(p)

  value, grads = loss_and_grad(params, jax.random.key(1))
  assert np.isfinite(float(value))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["encoder"]["layer_0"]["attn"]["qkv"]["kernel"]).sum()) > 0

  apply = jax.jit(model.apply, static_argnames="deterministic")
  run = lambda seed, det: np.asarray(apply({"params": params}, tokens, lengths, deterministic=det,
                                           rngs={"dropout": jax.random.key(seed)}))
  assert not np.allclose(run(1, False), run(2, False))
  np.testing.assert_array_equal(run(1, True), run(2, True))


def test_dropout_rate_scale_and_keys():
  x = jnp.ones((1000, 200), jnp.float32)
  drop = jax.jit(lambda key: Dropout(0.25).apply({}, x, deterministic=False,
                                                 rngs={"dropout": key}))
  a, b = np.asarray(drop(jax.random.key(0))), np.asarray(drop(jax.random.key(1)))
  for y in (a, b):
    assert abs((y == 0).mean() - 0.25) < 0.005
    assert abs((y == 0).mean(axis=0).std() - np.sqrt(0.25 * 0.75 / 1000)) < 0.003  # no stripes
    np.testing.assert_allclose(y[y != 0], 1 / 0.75, rtol=1e-6)
  assert abs(np.corrcoef((a == 0).ravel(), (b == 0).ravel())[0, 1]) < 0.01  # keys independent
  np.testing.assert_array_equal(np.asarray(drop(jax.random.key(0))), a)  # same rng, same mask
  assert Dropout(0.25).apply({}, x, deterministic=True) is x


def test_bfloat16_compute_float32_params():
  rng = np.random.default_rng(4)
  model = _model(dtype=jnp.bfloat16, norm="post")
  tokens, lengths = _batch(rng)
  params = _init(model, 0, tokens, lengths)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))

  @jax.jit
  def run(p):
    logits, state = model.apply({"params": p}, tokens, lengths, capture_intermediates=True)
    grads = jax.grad(lambda p: model.apply({"params": p}, tokens, lengths).sum())(p)
    return logits, state["intermediates"], grads

  logits, inter, grads = run(params)
  q, k, v = inter["encoder"]["layer_0"]["attn"]["qkv"]["__call__"][0]
  assert q.dtype == k.dtype == v.dtype == jnp.bfloat16
  assert inter["encoder"]["layer_1"]["__call__"][0].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  assert all(g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all()
             for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_longer_than_max_len_raises(pooling):
  model = _model(max_len=8, pooling=pooling)
  init = lambda steps: jax.eval_shape(model.init, jax.random.key(0),
                                      jnp.zeros((2, steps), jnp.int32), jnp.ones((2,), jnp.int32))
  init(8)  # max_len steps fit (the CLS slot has its own position)
  with pytest.raises(ValueError, match="9 time steps but max_len is 8"):
    init(9)


def test_bad_options_raise():
  init = lambda model: jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32),
                                      jnp.ones((1,), jnp.int32))
  with pytest.raises(ValueError, match="pooling must be one of"):
    init(_model(pooling="last"))
  with pytest.raises(ValueError, match="not divisible"):
    init(_model(num_heads=3))
