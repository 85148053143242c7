"""Pure Flax linen modules; `build_model` turns `config.model` into one of them.

All models share the submodule names `embed` and `encoder`, so an LM's weights graft into a
classifier by path (see jaxlm/graft.py).
"""
from __future__ import annotations

import ml_collections

from jaxlm.errors import ConfigError


def build_model(model_cfg: ml_collections.ConfigDict, vocab_size: int):
  """The model named by `model_cfg.name`, sized for a tokenizer with `vocab_size` ids."""
  from jaxlm.models import classifiers, lm  # deferred: keeps `import jaxlm.models` cheap

  name = model_cfg.name
  if name == "lstm_lm":
    return lm.LSTMLanguageModel(
        vocab_size=vocab_size, embed_dim=model_cfg.embed_dim, hidden_size=model_cfg.hidden_size,
        num_layers=model_cfg.num_layers, dropout_embed=model_cfg.dropout_embed,
        dropout_hidden=model_cfg.dropout_hidden, dropout_output=model_cfg.dropout_output,
        tie_weights=model_cfg.tie_weights, output=model_cfg.output,
        num_sampled=model_cfg.num_sampled, adaptive_cutoffs=tuple(model_cfg.adaptive_cutoffs))
  if name in ("lstm_classifier", "sentiment_net"):
    cls = classifiers.LSTMClassifier if name == "lstm_classifier" else classifiers.SentimentNet
    num_outputs = 1 if model_cfg.loss == "bce" else model_cfg.num_classes
    return cls(
        vocab_size=vocab_size, embed_dim=model_cfg.embed_dim, hidden_size=model_cfg.hidden_size,
        num_layers=model_cfg.num_layers, num_outputs=num_outputs,
        bidirectional=model_cfg.bidirectional, pooling=model_cfg.pooling,
        dropout_embed=model_cfg.dropout_embed, dropout_hidden=model_cfg.dropout_hidden,
        dropout_output=model_cfg.dropout_output, head_hidden=model_cfg.head_hidden)
  raise ConfigError(f"config.model.name={name!r} is not one of lstm_lm, lstm_classifier, sentiment_net")
