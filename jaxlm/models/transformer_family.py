"""The transformer family (seed 004): `transformer_classifier`, jaxlm/models/transformer.py.

It is pretrained as a classifier on a general-domain corpus (a topic classifier on AG News or
20 Newsgroups) and grafted into a new classifier whose head starts fresh (`classifier_to_classifier`).
Layer groups bottom to top: `embed` (token embedding, learned positions, the CLS token), each
`encoder/layer_i`, then `head` (the Dense and, for pre-norm, the final LayerNorm that feeds it).
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxlm.errors import ConfigError
from jaxlm.models.family import CLASSIFIER_TO_CLASSIFIER, DTYPES, ModelFamily
from jaxlm.models.family import torch_linear


# PyTorch names (jaxlm/interop.py): nn.Embedding `embedding` (and `pos_embedding` for learned
# positions), the CLS vector `cls_token`, nn.TransformerEncoder `encoder` (the fused QKV kernel is
# in_proj_weight transposed; norm1/norm2 are norm_attn/norm_ffn; pre-norm's final LayerNorm is
# `encoder.norm`) and nn.Linear `head`.
_LAYER = r"encoder/layer_(\d+)"
TORCH_NAMES = [
    (r"^embed/embedding$", "embedding.weight"),
    (r"^pos_embed/embedding$", "pos_embedding.weight"),
    (r"^cls$", "cls_token"),
    (rf"^{_LAYER}/attn/qkv/kernel$", r"encoder.layers.\1.self_attn.in_proj_weight"),
    (rf"^{_LAYER}/attn/qkv/bias$", r"encoder.layers.\1.self_attn.in_proj_bias"),
    *torch_linear(f"{_LAYER}/attn/out", r"encoder.layers.\1.self_attn.out_proj"),
    *torch_linear(f"{_LAYER}/ffn_in", r"encoder.layers.\1.linear1"),
    *torch_linear(f"{_LAYER}/ffn_out", r"encoder.layers.\1.linear2"),
    *torch_linear(f"{_LAYER}/norm_attn", r"encoder.layers.\1.norm1", weight="scale"),
    *torch_linear(f"{_LAYER}/norm_ffn", r"encoder.layers.\1.norm2", weight="scale"),
    *torch_linear("encoder/final_norm", "encoder.norm", weight="scale"),
    *torch_linear("head", "head"),
]


class TransformerFamily(ModelFamily):
  name = "transformer"
  models = {"transformer_classifier": "classifier"}
  group_rules = (
      (r"^(embed|pos_embed)/|^cls$", "embed"),
      (r"^encoder/(layer_\d+)/", r"encoder/\1"),
      (r"^encoder/final_norm/|^head/", "head"),
  )
  graft_maps = {"classifier_to_classifier": CLASSIFIER_TO_CLASSIFIER}
  torch_names = TORCH_NAMES

  def fields(self, model_name):
    return dict(
        d_model=128,
        num_heads=4,
        num_layers=2,
        ffn_dim=512,
        max_len=512,               # positions the model can take (data.max_len must fit)
        dropout=0.1,
        attention_dropout=0.0,
        positional="sinusoidal",   # sinusoidal | learned
        norm="pre",                # pre (pre-LN) | post (torch nn.TransformerEncoderLayer default)
        pooling="mean",            # mean | max | cls (over valid positions only)
        activation="relu",         # relu | gelu
        dtype="float32",           # compute dtype: float32 | bfloat16 (params stay float32)
    )

  def validate(self, config):
    super().validate(config)
    model_cfg = config.model
    from jaxlm.models import transformer as T
    for key in ("d_model", "num_heads", "num_layers", "ffn_dim", "max_len"):
      if model_cfg[key] < 1:
        raise ConfigError(f"config.model.{key} must be >= 1, got {model_cfg[key]}")
    if model_cfg.d_model % model_cfg.num_heads:
      raise ConfigError(f"config.model.d_model={model_cfg.d_model} is not divisible by "
                        f"config.model.num_heads={model_cfg.num_heads}")
    for key, allowed in (("positional", T.POSITIONALS), ("norm", T.NORMS), ("pooling", T.POOLINGS),
                         ("activation", ("relu", "gelu")), ("dtype", DTYPES)):
      if model_cfg[key] not in allowed:
        raise ConfigError(f"config.model.{key}={model_cfg[key]!r} is not one of {', '.join(allowed)}")
    positions = config.data.max_len + (model_cfg.pooling == "cls")
    if positions > model_cfg.max_len:
      raise ConfigError(f"config.data.max_len={config.data.max_len} needs {positions} positions but "
                        f"config.model.max_len={model_cfg.max_len}")
    for key in ("dropout", "attention_dropout"):
      if not 0.0 <= model_cfg[key] < 1.0:
        raise ConfigError(f"config.model.{key} must be in [0, 1), got {model_cfg[key]}")

  def build(self, model_cfg, vocab_size):
    from jaxlm.models import transformer as T
    cfg = model_cfg
    return T.TransformerClassifier(
        vocab_size=vocab_size, d_model=cfg.d_model, num_heads=cfg.num_heads,
        num_layers=cfg.num_layers, ffn_dim=cfg.ffn_dim, max_len=cfg.max_len,
        num_outputs=1 if cfg.loss == "bce" else cfg.num_classes, dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout, positional=cfg.positional, norm=cfg.norm,
        pooling=cfg.pooling, activation=cfg.activation, dtype=jnp.dtype(cfg.dtype))

  def torch_architecture(self, model_cfg, vocab_size):
    """nn.TransformerEncoderLayer's dropout is also its attention dropout; both are off in
    evaluation, where the two models agree."""
    cfg = model_cfg
    return dict(module="transformer_classifier",
                embedding=dict(num_embeddings=vocab_size, embedding_dim=cfg.d_model),
                encoder_layer=dict(d_model=cfg.d_model, nhead=cfg.num_heads,
                                   dim_feedforward=cfg.ffn_dim, dropout=cfg.dropout,
                                   activation=cfg.activation, layer_norm_eps=1e-5,
                                   batch_first=True, norm_first=cfg.norm == "pre"),
                num_layers=cfg.num_layers, final_norm=cfg.norm == "pre",
                positional=cfg.positional, positions=cfg.max_len + (cfg.pooling == "cls"),
                pooling=cfg.pooling, num_outputs=1 if cfg.loss == "bce" else cfg.num_classes)
