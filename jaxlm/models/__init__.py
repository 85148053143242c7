"""Pure Flax linen modules, grouped in model families (jaxlm/models/family.py).

`FAMILIES` is the registry: a new family is one file implementing `ModelFamily` and one line here.
`family_of(name)` finds the family of a `config.model.name`; `build_model` builds it.
"""
from __future__ import annotations

import ml_collections

from jaxlm.errors import ConfigError
from jaxlm.models.family import ModelFamily


def _registry() -> dict[str, ModelFamily]:
  from jaxlm.models.lstm_family import LSTMFamily
  from jaxlm.models.transformer_family import TransformerFamily
  return {family.name: family for family in (LSTMFamily(), TransformerFamily())}


FAMILIES: dict[str, ModelFamily] = _registry()


def model_names() -> dict[str, str]:
  """Every `config.model.name` -> the name of its family."""
  return {model: f.name for f in FAMILIES.values() for model in f.models}


def family_of(model_name: str) -> ModelFamily:
  names = model_names()
  if model_name not in names:
    raise ConfigError(f"config.model.name={model_name!r} is not one of {', '.join(names)}")
  return FAMILIES[names[model_name]]


def build_model(model_cfg: ml_collections.ConfigDict, vocab_size: int):
  """The model named by `model_cfg.name`, sized for a tokenizer with `vocab_size` ids."""
  return family_of(model_cfg.name).build(model_cfg, vocab_size)
