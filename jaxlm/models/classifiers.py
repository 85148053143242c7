"""Sequence classifiers: embed -> LSTM encoder -> masked pooling -> head.

Submodules `embed` (nn.Embed) and `encoder` (LSTMEncoder) have the language model's names and
classes, so an LM's weights graft in by path (jaxlm/graft.py); `head` is new.

Mixed precision (`dtype=jnp.bfloat16`): the embedding lookup and the encoder compute in bf16 (the
recurrence itself in float32 on CPU under `impl='fused'`, jaxlm/models/lstm.py); pooling, the
head and the logits are float32, as in the transformer classifier. Params stay `param_dtype`.

Padding never changes an output: the encoder stops every row at its length (its final state is
the state at the last valid step, outputs past it are 0), and every pooling applies the length
mask itself rather than trusting zeros (a max over zeros is not a max over the row).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models.lstm import LSTMEncoder

Array = jax.Array
POOLINGS = ("last", "mean", "max", "concat")


def masked_pool(outputs: Array, last: Array, lengths: Array, pooling: str) -> Array:
  """Pools encoder `outputs [B,T,D]` over each row's valid steps only.

  `last [B,D]` is the encoder's final hidden state (for a bidirectional encoder: forward at the
  last valid step, backward at step 0). `concat` is ULMFiT's `[last, max, mean]`.
  """
  if pooling == "last":
    return last
  valid = (jnp.arange(outputs.shape[1])[None, :] < lengths[:, None])[..., None]  # [B,T,1]
  count = jnp.maximum(lengths, 1).astype(outputs.dtype)[:, None]
  mean = jnp.sum(jnp.where(valid, outputs, 0), axis=1) / count
  if pooling == "mean":
    return mean
  neg_inf = jnp.finfo(outputs.dtype).min
  peak = jnp.max(jnp.where(valid, outputs, neg_inf), axis=1)
  peak = jnp.where(lengths[:, None] > 0, peak, 0)  # an empty row pools to 0, not to -inf
  if pooling == "max":
    return peak
  if pooling == "concat":
    return jnp.concatenate([last, peak, mean], axis=-1)
  raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


class MLPHead(nn.Module):
  """ULMFiT-style head: dropout -> Dense(hidden) -> ReLU -> dropout -> Dense(num_outputs), or with
  `batchnorm` ULMFiT's own: BatchNorm -> dropout -> Dense(hidden) -> ReLU -> BatchNorm -> dropout
  -> Dense(num_outputs) (fastai's PoolingLinearClassifier, `dropout` then `last_dropout`).

  Batch norm keeps running averages in the `batch_stats` collection: training (`deterministic=
  False`) normalises by the batch's statistics and updates them, so it must be applied with
  `mutable=["batch_stats"]`; evaluation normalises by the running averages, so an example's output
  never depends on the other rows of its batch. `weights [B]` (a batch's example weights) keeps the
  rows weighted 0, the filler rows of a partial batch, out of the statistics. Momentum and epsilon
  are PyTorch's BatchNorm1d defaults (0.1 and 1e-5; flax's `momentum` is 1 - PyTorch's); unlike
  PyTorch, the running variance is updated with the biased batch variance (flax's choice).
  """
  hidden: int
  num_outputs: int
  dropout: float = 0.0
  batchnorm: bool = False
  last_dropout: float = 0.0   # before the last Dense with `batchnorm` (without it: `dropout`)

  @nn.compact
  def __call__(self, x, weights=None, *, deterministic=True):
    if not self.batchnorm:
      x = nn.Dense(self.hidden, name="hidden")(x)
      x = nn.Dropout(self.dropout)(nn.relu(x), deterministic=deterministic)
      return nn.Dense(self.num_outputs, name="out")(x)
    mask = None if weights is None else (weights > 0)[:, None]
    norm = lambda name: nn.BatchNorm(use_running_average=deterministic, momentum=0.9,
                                     epsilon=1e-5, use_fast_variance=False, name=name)
    x = nn.Dropout(self.dropout)(norm("bn_in")(x, mask=mask), deterministic=deterministic)
    x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
    x = nn.Dropout(self.last_dropout)(norm("bn_hidden")(x, mask=mask), deterministic=deterministic)
    return nn.Dense(self.num_outputs, name="out")(x)


class LSTMClassifier(nn.Module):
  """Seeds 000/003: embed -> LSTMEncoder -> last valid hidden state -> Dense(num_outputs).

  `num_outputs` is 1 for BCE-with-logits, num_classes for softmax cross-entropy. Other poolings
  and an MLP head (`head_hidden > 0`) are options; `SentimentNet` is this with mean pooling.
  Dropout: `dropout_embed` on embeddings, `dropout_hidden` between LSTM layers (nn.LSTM's
  `dropout`), `dropout_output` on the pooled features; `variational` shares the embedding and
  between-layer masks over time and `weight_drop` is DropConnect on W_hh, as in the LM (AWD-LSTM).
  All need the 'dropout' rng when training. `dtype` is the compute dtype (None: the params').
  `head_batchnorm` makes the MLP head ULMFiT's batch-normalised one (MLPHead): `dropout_output`
  then moves after its first BatchNorm and `head_dropout` sits before its last Dense.

  `__call__(tokens [B,T], lengths [B], weights [B] | None, *, deterministic=True) -> logits
  [B, num_outputs]` (float32 for a bf16 `dtype`); `weights` (0 for filler rows) only matters to a
  batch-normalised head in training.
  """
  vocab_size: int
  embed_dim: int = 100
  hidden_size: int = 256
  num_layers: int = 1
  num_outputs: int = 1
  bidirectional: bool = False
  pooling: str = "last"
  dropout_embed: float = 0.0
  dropout_hidden: float = 0.0
  dropout_output: float = 0.0
  head_hidden: int = 0
  head_batchnorm: bool = False
  head_dropout: float = 0.0
  variational: bool = False
  weight_drop: float = 0.0
  impl: str = "fused"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array, lengths: Array, weights: Array | None = None, *,
               deterministic: bool = True) -> Array:
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
    lengths = jnp.asarray(lengths, jnp.int32)
    x = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="embed")(tokens)
    dims = (1,) if self.variational else ()
    x = nn.Dropout(self.dropout_embed, broadcast_dims=dims)(x, deterministic=deterministic)
    outputs, states = LSTMEncoder(
        self.num_layers, self.hidden_size, dropout=self.dropout_hidden,
        bidirectional=self.bidirectional, variational=self.variational,
        weight_drop=self.weight_drop, impl=self.impl, dtype=self.dtype,
        param_dtype=self.param_dtype, name="encoder")(x, lengths, deterministic=deterministic)
    # Pooling (a mean over up to max_len steps) and the head in float32, whatever the compute dtype.
    wide = lambda a: a.astype(jnp.promote_types(a.dtype, jnp.float32))
    features = masked_pool(wide(outputs), wide(states[-1][1]), lengths, self.pooling)
    if self.head_batchnorm:  # ULMFiT's order: BatchNorm before the features' dropout
      return MLPHead(self.head_hidden, self.num_outputs, self.dropout_output, batchnorm=True,
                     last_dropout=self.head_dropout, name="head")(
                         features, weights, deterministic=deterministic)
    features = nn.Dropout(self.dropout_output)(features, deterministic=deterministic)
    if self.head_hidden > 0:
      return MLPHead(self.head_hidden, self.num_outputs, self.dropout_output, name="head")(
          features, deterministic=deterministic)
    return nn.Dense(self.num_outputs, param_dtype=self.param_dtype, name="head")(features)


class SentimentNet(LSTMClassifier):
  """Seed 002 (GluonNLP): the LM's embedding and 2-layer LSTM, mean over valid steps, dropout,
  Dense to one logit (sigmoid/BCE) or num_classes."""
  num_layers: int = 2
  pooling: str = "mean"
