"""Transformer-encoder classifier (seed 004): embed + positions -> encoder -> pooling -> head.

Why these choices:
- Batch-first `[B,T,D]`, attention per example with a key mask from `lengths`: each example
  attends only to itself and only to its valid positions, and pooling counts valid positions
  only, so padding (any token id past a length, any amount of it) never changes a logit.
- One fused QKV parameter laid out like PyTorch's `in_proj_weight.T` (q, k, v along the 3d axis,
  heads contiguous inside each), so a PyTorch `nn.TransformerEncoderLayer` converts one-to-one.
- Written for XLA on CPU, where a train step is matmul-bound (see SelfAttention, QKVProjection
  and Dropout for what measured faster; scripts/bench_transformer.py compares with PyTorch).
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


def _mix32(h: Array) -> Array:
  """lowbias32 (C. Wellons' hash-prospector): a uint32 -> uint32 bijection with full avalanche."""
  h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
  h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


class Dropout(nn.Module):
  """Inverted dropout keyed by the 'dropout' rng, like nn.Dropout, with counter-hashed masks.

  Why: on CPU, generating the random bits, not applying the mask, is what nn.Dropout costs: one
  20-round threefry per element, 11-13% of a seed-004 train step. Here the 'dropout' rng draws
  two 32-bit keys per call and each element's bits are a keyed two-round integer hash of its
  index, ~15x cheaper (dropout's share of the step drops to ~1%). Masks are as reproducible as
  nn.Dropout's (same rng, same mask) and `rate` is exact to 2^-32. Bit balance, lag and cross-key
  correlations and byte chi-square look like independent uniform bits; it is a dropout-mask
  generator, not a general-purpose PRNG.
  """
  rate: float

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    if x.size >= 2 ** 32:
      raise ValueError(f"Dropout: {x.size} elements do not fit a 32-bit counter")
    keys = jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32)
    index = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape)
    bits = _mix32(_mix32(index ^ keys[0]) ^ keys[1])
    keep = bits >= np.uint32(round(self.rate * 2 ** 32))
    return jnp.where(keep, x * (1.0 / (1.0 - self.rate)), 0).astype(x.dtype)


class QKVProjection(nn.Module):
  """One `[d,3d]` kernel (+ `[3d]` bias) laid out like torch's `in_proj_weight.T`, applied as three
  `[d,d]` matmuls straight into `[B,T,heads,d/heads]` q, k and v.

  Why three matmuls on one parameter: the fused `[B,T,3d]` output has to be split and copied into
  three contiguous tensors forwards and concatenated backwards; three matmuls writing q, k, v
  directly made the attention block ~15% faster on CPU (a seed-004 train step ~3%). The
  parameter stays fused, so PyTorch weights convert one-to-one.
  """
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array, Array]:
    d = x.shape[-1]
    # torch initialises in_proj_weight with xavier_uniform over the whole [3d,d] matrix.
    kernel = self.param("kernel", nn.initializers.xavier_uniform(), (d, 3 * d), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (3 * d,), self.param_dtype)
    shape = (self.num_heads, d // self.num_heads)
    x = x.astype(self.dtype)
    parts = []
    for i in range(3):
      w = kernel[:, i * d:(i + 1) * d].reshape(d, *shape).astype(self.dtype)
      parts.append(jnp.einsum("btd,dnh->btnh", x, w)
                   + bias[i * d:(i + 1) * d].reshape(shape).astype(self.dtype))
    return tuple(parts)


class SelfAttention(nn.Module):
  """Multi-head self-attention over each row's first `lengths` positions (keys past it masked).

  Computes what `jax.nn.dot_product_attention(q, k, v, bias=key_mask)` does (f32 scores and
  softmax, per example), written out for XLA on CPU, where the [B,heads,T,T] tensors' memory
  passes, not their flops, are the cost: q is scaled instead of the scores, and the softmax is
  normalised after the weighted sum, `(exp(s - max) @ v) / rowsum`, as flash attention does, so
  no normalised [B,heads,T,T] copy is written. In a seed-004 train step, `jax.nn.
  dot_product_attention` with `key_value_seq_lengths=` cost 5% more, with `bias=` 8% more than the
  plain softmax written out, which cost 2-7% more than this. Attention dropout drops the
  unnormalised weights (the same as dropping normalised ones). Masked keys get -1e30, so a row
  without any valid key attends uniformly instead of producing NaN (its pooled output is masked).
  """
  num_heads: int
  attention_dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, lengths: Array, *, deterministic: bool) -> Array:
    b, t, d = x.shape
    q, k, v = QKVProjection(self.num_heads, self.dtype, self.param_dtype, name="qkv")(x)
    key_bias = jnp.where(jnp.arange(t)[None, :] < lengths[:, None], 0.0, -1e30)  # [B,T] f32
    scores = jnp.einsum("btnh,bsnh->bnts", q * (1.0 / math.sqrt(d // self.num_heads)), k,
                        preferred_element_type=jnp.float32) + key_bias[:, None, None, :]
    weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
    total = jnp.einsum("bnts->btn", weights)[..., None]  # [B,T,heads,1]
    weights = Dropout(self.attention_dropout)(weights, deterministic=deterministic)
    y = jnp.einsum("bnts,bsnh->btnh", weights.astype(v.dtype), v) / total.astype(v.dtype)
    return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name="out")(
        y.reshape(b, t, d))


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
    drop = lambda y: Dropout(self.dropout)(y, deterministic=deterministic)
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
  (float32). `T` may not exceed `max_len` (the learned table has one more row for the CLS slot).
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
      # std 1: the scale of a token vector after the sqrt(d) scaling.
      cls = self.param("cls", nn.initializers.normal(1.0), (d,), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, d)), x], 1)
      lengths = lengths + 1
    steps = x.shape[1]
    if self.positional == "learned":  # BERT's init: positions start small next to the tokens
      pos = nn.Embed(self.max_len + (self.pooling == "cls"), d, name="pos_embed",
                     embedding_init=nn.initializers.normal(0.02), **kw)(jnp.arange(steps))
    else:
      pos = jnp.asarray(sinusoidal_positions(steps, d), self.dtype)
    x = Dropout(self.dropout)(x + pos[None], deterministic=deterministic)
    x = Encoder(self.num_layers, self.num_heads, self.ffn_dim, self.dropout,
                self.attention_dropout, self.norm, self.activation, self.layer_norm_eps,
                name="encoder", **kw)(x, lengths, deterministic=deterministic)
    x = x.astype(jnp.float32)
    if self.pooling == "cls":
      features = x[:, 0]
    else:
      features = masked_pool(x, None, lengths, self.pooling)
    return nn.Dense(self.num_outputs, param_dtype=self.param_dtype, name="head")(features)
