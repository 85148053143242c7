"""The model-family contract: what the shared machinery needs to know about a family of models.

Config validation, `init`, freezing strategies, grafting and weight decay are shared by every model;
what differs between families (an LSTM stack, a transformer encoder) is declared here, once, by the
family, instead of being guessed from parameter names:

- its `config.model` block (`config_block`: every field with its default) and `validate(config)`;
- `build(model_cfg, vocab_size)`: the pure linen module;
- `init_args(task_kind, batch)`: the positional arguments `model.init` takes for an example batch;
- `group_rules`: its layer groups bottom to top, as rules on parameter paths (freezing strategies
  and discriminative rates work on these groups; a path no rule claims is an error, not a guess);
- `graft_maps`: named assignment maps (jaxlm/graft.py) and `default_graft_map` to pick one from
  the source and target runs;
- `decays(path, leaf)`: which leaves weight decay applies to (by rule: arrays of rank >= 2, i.e.
  kernels and embeddings, never biases or LayerNorm scales);
- `torch_names` and `torch_architecture(model_cfg, vocab_size)`: its PyTorch counterpart (the
  state_dict name of every param and the torch modules' arguments), for jaxlm/interop.py.

A family is one file (jaxlm/models/lstm_family.py, jaxlm/models/transformer_family.py) plus one line
in `jaxlm.models.FAMILIES`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from jaxlm import params as P
from jaxlm.errors import ConfigError, GraftError

# What every classifier's model block has besides its family's fields: the output and its loss.
CLASSIFIER_FIELDS = dict(
    loss="bce",              # bce: one logit, BCE-with-logits | softmax: num_classes logits
    num_classes=2,
)
LOSSES = ("bce", "softmax")

# `config.model.dtype`, the compute dtype of every family (params and optimizer state stay
# float32). No float16: without loss scaling, which jaxlm does not implement, its gradients
# underflow; bfloat16 has float32's exponent range and needs none.
DTYPES = ("float32", "bfloat16")

# A classifier's weights into a new classifier: everything but the old head, which is initialised
# afresh (its output size is the old task's number of classes). Shared by every family.
CLASSIFIER_TO_CLASSIFIER = [
    (r"^head/.*", None),
    (r"^(.*)$", r"\1"),
]


def torch_linear(path: str, torch_name: str, weight: str = "kernel") -> list[tuple[str, str]]:
  """`torch_names` rules of one flax module (`kernel`/`scale`/`embedding` and `bias`) that is one
  torch module (`weight` and `bias`): nn.Dense <-> nn.Linear, nn.LayerNorm <-> nn.LayerNorm."""
  return [(rf"^{path}/{weight}$", f"{torch_name}.weight"), (rf"^{path}/bias$", f"{torch_name}.bias")]


@dataclasses.dataclass(frozen=True)
class LayerGroups:
  """A param tree's layer groups: `names` bottom to top, and the group of every leaf path."""
  names: tuple[str, ...]
  of_path: Mapping[str, str]

  def group_of(self, path: str) -> str:
    return self.of_path[path]


def groups_by_rules(params, rules: Sequence[tuple[str, str]], family: str) -> LayerGroups:
  """Layer groups from `(regex on the path, group name)` rules, first match wins.

  Groups rank by the index of the rule that made them, then by the first integer in the group
  name (so `encoder/layer_10` sits above `encoder/layer_2`). A group name may use the regex's
  groups (`encoder/layer_\\1`).
  """
  compiled = [(re.compile(pattern), name) for pattern, name in rules]
  of_path, rank = {}, {}
  for path in P.flatten(params):
    for i, (rx, name) in enumerate(compiled):
      match = rx.search(path)
      if match:
        group = match.expand(name)
        number = re.search(r"\d+", group)
        rank.setdefault(group, (i, int(number.group()) if number else 0, group))
        of_path[path] = group
        break
    else:
      raise ConfigError(f"parameter {path} belongs to no layer group of the {family} family "
                        f"(rules: {', '.join(p for p, _ in rules)})")
  return LayerGroups(tuple(sorted(rank, key=rank.get)), of_path)


class ModelFamily:
  """Base of every family; subclasses set the class attributes and implement `build`."""
  name: str = ""
  # config.model.name -> the task kind it serves ("lm" or "classifier")
  models: Mapping[str, str] = {}
  group_rules: Sequence[tuple[str, str]] = ()
  graft_maps: Mapping[str, Sequence[tuple[str, str | None]]] = {
      "classifier_to_classifier": CLASSIFIER_TO_CLASSIFIER}
  # PyTorch state_dict names of the params, for safetensors export and import (jaxlm/interop.py):
  # `(regex on the path, name)` rules, first match wins, `\1` works. A tuple of names lists the
  # ones an import accepts, the first being what export writes. A third element, a regex, makes
  # the rule apply only when some path of the tree matches it (two head layouts sharing paths).
  # Leaves named `kernel` (flax's [in, out]) are transposed into torch's [out, in]. Model-state
  # leaves (`batch_stats/...`) are named by rules on their own paths. Empty: no PyTorch counterpart.
  torch_names: Sequence[tuple[str, str | tuple[str, ...]]] = ()

  # -- config ------------------------------------------------------------------------------
  def fields(self, model_name: str) -> dict[str, Any]:
    """The family's own fields of `model_name`'s block, with defaults (without `name`)."""
    raise NotImplementedError

  def config_block(self, model_name: str) -> ml_collections.ConfigDict:
    """`config.model` for `model_name`: its name, the family's fields, and for classifiers the
    output/loss fields."""
    block = dict(name=model_name, **self.fields(model_name))
    if self.models[model_name] == "classifier":
      block.update(CLASSIFIER_FIELDS)
    return ml_collections.ConfigDict(block)

  def validate(self, config) -> None:
    """Unknown keys and bad values of `config.model` (and its fit with `config.data`) fail with one
    line naming the key."""
    model_cfg = config.model
    expected = self.config_block(model_cfg.name)
    unknown = sorted(set(model_cfg.keys()) - set(expected.keys()))
    if unknown:
      raise ConfigError(f"config.model.{unknown[0]} is not a field of model {model_cfg.name!r} "
                        f"({self.name} family); its fields: {', '.join(sorted(expected.keys()))}")
    if self.models[model_cfg.name] == "classifier":
      loss, n = model_cfg.get("loss", "bce"), model_cfg.get("num_classes", 2)
      if loss not in LOSSES:
        raise ConfigError(f"config.model.loss={loss!r} is not one of {', '.join(LOSSES)}")
      if loss == "bce" and n != 2:
        raise ConfigError(f"config.model.loss='bce' needs num_classes=2; use loss='softmax' for {n} "
                          "classes")

  def complete(self, model_cfg) -> ml_collections.ConfigDict:
    """`model_cfg` with the defaults of fields it lacks (a config.json written before a field
    existed still builds the same model)."""
    block = self.config_block(model_cfg.name)
    block.update(model_cfg.to_dict())
    return block

  # -- model -------------------------------------------------------------------------------
  def build(self, model_cfg, vocab_size: int):
    raise NotImplementedError

  def init_args(self, task_kind: str, batch: Mapping[str, Any]) -> tuple:
    """Positional arguments of `model.init` / `model.apply` for a batch (jaxlm/batching.py)."""
    if task_kind == "lm":
      return batch["inputs"], batch["targets"], batch["lengths"]
    return batch["tokens"], batch["lengths"]

  def initial_carry(self, model_cfg, batch_size: int):
    """State carried between consecutive LM batches in stream mode; None if the family has none."""
    raise ConfigError(f"the {self.name} family has no recurrent state: data.lm_mode='stream' "
                      "needs an LSTM language model")

  # -- shared machinery's questions ---------------------------------------------------------
  def layer_groups(self, params) -> LayerGroups:
    return groups_by_rules(params, self.group_rules, self.name)

  def decays(self, path: str, leaf) -> bool:
    """Weight decay on kernels and embeddings (rank >= 2), not on biases or norm scales."""
    return np.ndim(leaf) >= 2

  def graft_map(self, name: str):
    if name not in self.graft_maps:
      raise ConfigError(f"config.finetune.graft_map={name!r} is not one of the {self.name} family's "
                        f"graft maps: {', '.join(self.graft_maps)}")
    return self.graft_maps[name]

  def torch_architecture(self, model_cfg, vocab_size: int) -> dict:
    """Constructor arguments of the equivalent PyTorch modules: what an export's config.json
    tells a PyTorch user (jaxlm.interop.build_torch_model builds from them)."""
    raise ConfigError(f"the {self.name} family has no PyTorch counterpart to export to")

  def default_graft_map(self, source_cfg, target_cfg) -> str:
    """The graft map for a source run's config into a target config, chosen from their tasks."""
    source_kind = self.models.get(source_cfg.model.name)
    if source_kind == "classifier":
      return "classifier_to_classifier"
    if "lm_to_classifier" not in self.graft_maps:
      raise GraftError(f"the {self.name} family has no graft map from a {source_kind} run; its maps: "
                       f"{', '.join(self.graft_maps)}")
    return "lm_to_classifier"
