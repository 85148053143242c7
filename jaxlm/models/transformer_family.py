"""The transformer family (seed 004): `transformer_classifier`, jaxlm/models/transformer.py.

It is pretrained as a classifier on a general-domain corpus (a topic classifier on AG News or
20 Newsgroups) and grafted into a new classifier whose head starts fresh (`classifier_to_classifier`).
Layer groups bottom to top: `embed` (token embedding, learned positions, the CLS token), each
`encoder/layer_i`, then `head` (the Dense and, for pre-norm, the final LayerNorm that feeds it).
"""
from __future__ import annotations

from jaxlm.errors import ConfigError
from jaxlm.models.family import CLASSIFIER_TO_CLASSIFIER, ModelFamily


class TransformerFamily(ModelFamily):
  name = "transformer"
  models = {"transformer_classifier": "classifier"}
  group_rules = (
      (r"^(embed|pos_embed)/|^cls$", "embed"),
      (r"^encoder/(layer_\d+)/", r"encoder/\1"),
      (r"^encoder/final_norm/|^head/", "head"),
  )
  graft_maps = {"classifier_to_classifier": CLASSIFIER_TO_CLASSIFIER}

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
                         ("activation", ("relu", "gelu"))):
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
        pooling=cfg.pooling, activation=cfg.activation)
