"""Transformer-encoder classifier (seed 004): embed + positions -> encoder -> masked pooling -> head.

Why these choices:
- Batch-first `[B,T,D]` and attention through `jax.nn.dot_product_attention` with
  `key_value_seq_lengths`: each example attends only to itself and only to its valid positions,
  so padding (any token id past a length, any amount of it) never changes a logit.
- One fused QKV projection laid out like PyTorch's `in_proj_weight.T` (q, k, v along the 3d axis,
  heads contiguous inside each): a single `[d,3d]` matmul instead of three, and a PyTorch
  `nn.TransformerEncoderLayer` converts one-to-one.
- `norm='post'` is PyTorch's `nn.TransformerEncoderLayer` default; `norm='pre'` (default here)
  trains more stably and ends with the usual final LayerNorm (`encoder/final_norm`).
- Embeddings are scaled by sqrt(d_model) (Vaswani et al.): `nn.Embed`'s init has std
  1/sqrt(d_model), so scaled token vectors and sinusoids have the same magnitude.
- Compute runs in `dtype` (bfloat16 allowed); LayerNorm statistics, softmax, pooling and the head
  run in float32. Parameters stay `param_dtype`.

Parameter tree (freezing groups and grafting use these paths): `embed/embedding`,
`pos_embed/embedding` (learned positions only), `cls` (CLS pooling only),
`encoder/layer_{i}/{attn/qkv, attn/out, ffn_in, ffn_out, norm_attn, norm_ffn}`,
`encoder/final_norm` (pre-norm only), `head`.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.models.classifiers import masked_pool

Array = jax.Array
POOLINGS = ("mean", "max", "cls")
POSITIONALS = ("sinusoidal", "learned")
NORMS = ("pre", "post")
ACTIVATIONS = {"relu": nn.relu, "gelu": lambda x: nn.gelu(x, approximate=False)}


def sinusoidal_positions(length: int, d: int) -> np.ndarray:
  """Vaswani et al.'s fixed table `[length, d]`: sin on even dims, cos on odd dims.

  numpy, not jnp: it is a constant of the traced program, computed once at trace time.
  """
  pos = np.arange(length, dtype=np.float64)[:, None]
  freq = np.exp(np.arange(0, d, 2, dtype=np.float64) * (-math.log(10000.0) / d))
  table = np.zeros((length, d), np.float64)
  table[:, 0::2] = np.sin(pos * freq)
  table[:, 1::2] = np.cos(pos * freq[: d // 2])
  return table.astype(np.float32)


class SelfAttention(nn.Module):
  """Multi-head self-attention over each row's first `lengths` positions (keys past it masked).

  Without attention dropout this is `jax.nn.dot_product_attention` (XLA's einsum + f32 softmax);
  with it, the same computation written out so the weights can be dropped.
  """
  num_heads: int
  attention_dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, lengths: Array, *, deterministic: bool) -> Array:
    b, t, d = x.shape
    heads = self.num_heads
    dense = lambda n, name, **kw: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                           name=name, **kw)
    # torch initialises in_proj_weight with xavier_uniform over the whole [3d,d] matrix.
    qkv = dense(3 * d, "qkv", kernel_init=nn.initializers.xavier_uniform())(x)
    q, k, v = jnp.moveaxis(qkv.reshape(b, t, 3, heads, d // heads), 2, 0)  # each [B,T,H,d/H]
    if self.attention_dropout == 0.0 or deterministic:
      y = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
    else:
      logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32)
      logits = logits / math.sqrt(d // heads)
      valid = jnp.arange(t)[None, None, None, :] < lengths[:, None, None, None]
      weights = jax.nn.softmax(jnp.where(valid, logits, -1e30), axis=-1)
      weights = nn.Dropout(self.attention_dropout)(weights, deterministic=False)
      y = jnp.einsum("bhqk,bkhc->bqhc", weights.astype(v.dtype), v)
    return dense(d, "out")(y.reshape(b, t, d))


class EncoderLayer(nn.Module):
  """PyTorch's `nn.TransformerEncoderLayer`: attention then FFN, each with dropout and a residual,
  LayerNorm after each residual (`post`) or before each sublayer (`pre`, torch's norm_first)."""
  num_heads: int
  ffn_dim: int
  dropout: float = 0.1
  attention_dropout: float = 0.0
  norm: str = "pre"
  activation: str = "relu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, lengths: Array, *, deterministic: bool) -> Array:
    d = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=deterministic)
    norm_attn = nn.LayerNorm(self.layer_norm_eps, name="norm_attn", **kw)
    norm_ffn = nn.LayerNorm(self.layer_norm_eps, name="norm_ffn", **kw)
    attn = SelfAttention(self.num_heads, self.attention_dropout, name="attn", **kw)

    def ffn(y):
      y = ACTIVATIONS[self.activation](nn.Dense(self.ffn_dim, name="ffn_in", **kw)(y))
      return drop(nn.Dense(d, name="ffn_out", **kw)(drop(y)))

    if self.norm == "pre":
      x = x + drop(attn(norm_attn(x), lengths, deterministic=deterministic))
      return x + ffn(norm_ffn(x))
    x = norm_attn(x + drop(attn(x, lengths, deterministic=deterministic)))
    return norm_ffn(x + ffn(x))


class Encoder(nn.Module):
  """`num_layers` EncoderLayers (`layer_{i}`), plus `final_norm` after the last for pre-norm."""
  num_layers: int
  num_heads: int
  ffn_dim: int
  dropout: float = 0.1
  attention_dropout: float = 0.0
  norm: str = "pre"
  activation: str = "relu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, lengths: Array, *, deterministic: bool) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = EncoderLayer(self.num_heads, self.ffn_dim, self.dropout, self.attention_dropout,
                       self.norm, self.activation, self.layer_norm_eps, name=f"layer_{i}",
                       **kw)(x, lengths, deterministic=deterministic)
    if self.norm == "pre":
      x = nn.LayerNorm(self.layer_norm_eps, name="final_norm", **kw)(x)
    return x


class TransformerClassifier(nn.Module):
  """Seed 004: tokens -> embed*sqrt(d) + positions -> dropout -> encoder -> pooling -> Dense.

  `pooling`: `mean` / `max` over each row's valid positions (an empty row pools to 0), or `cls`:
  a learned token prepended at position 0 whose final state is the feature. `num_outputs` is 1 for
  BCE-with-logits, num_classes for softmax cross-entropy. Dropout needs the 'dropout' rng.

  `__call__(tokens [B,T] int, lengths [B] int, *, deterministic=True) -> logits [B, num_outputs]`
  (float32). `T` (+1 with CLS) may not exceed `max_len`.
  """
  vocab_size: int
  d_model: int = 128
  num_heads: int = 4
  num_layers: int = 2
  ffn_dim: int = 512
  max_len: int = 512
  num_outputs: int = 1
  dropout: float = 0.1
  attention_dropout: float = 0.0
  positional: str = "sinusoidal"
  norm: str = "pre"
  pooling: str = "mean"
  activation: str = "relu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _check(self, steps: int):
    for name, value, allowed in (("pooling", self.pooling, POOLINGS),
                                 ("positional", self.positional, POSITIONALS),
                                 ("norm", self.norm, NORMS),
                                 ("activation", self.activation, tuple(ACTIVATIONS))):
      if value not in allowed:
        raise ValueError(f"TransformerClassifier.{name} must be one of {allowed}, got {value!r}")
    if self.d_model % self.num_heads:
      raise ValueError(f"TransformerClassifier: d_model={self.d_model} is not divisible by "
                       f"num_heads={self.num_heads}")
    if steps > self.max_len:
      raise ValueError(f"TransformerClassifier: input has {steps} time steps but max_len is "
                       f"{self.max_len}; truncate the batches or raise model max_len")

  @nn.compact
  def __call__(self, tokens: Array, lengths: Array, *, deterministic: bool = True) -> Array:
    self._check(tokens.shape[1])
    d = self.d_model
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    x = nn.Embed(self.vocab_size, d, name="embed", **kw)(tokens) * math.sqrt(d)
    if self.pooling == "cls":
      cls = self.param("cls", nn.initializers.normal(1.0), (d,), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, d)), x], 1)
      lengths = lengths + 1
    steps = x.shape[1]
    if self.positional == "learned":
      pos = nn.Embed(self.max_len + (self.pooling == "cls"), d, name="pos_embed",
                     embedding_init=nn.initializers.normal(0.02), **kw)(jnp.arange(steps))
    else:
      pos = jnp.asarray(sinusoidal_positions(steps, d), self.dtype)
    x = nn.Dropout(self.dropout)(x + pos[None], deterministic=deterministic)
    x = Encoder(self.num_layers, self.num_heads, self.ffn_dim, self.dropout,
                self.attention_dropout, self.norm, self.activation, self.layer_norm_eps,
                name="encoder", **kw)(x, lengths, deterministic=deterministic)
    x = x.astype(jnp.float32)
    if self.pooling == "cls":
      features = x[:, 0]
    else:
      features = masked_pool(x, None, lengths, self.pooling)
    return nn.Dense(self.num_outputs, param_dtype=self.param_dtype, name="head")(features)
