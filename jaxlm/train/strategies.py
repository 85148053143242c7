"""Freezing strategies, discriminative learning rates and schedules, all expressed with optax.

Layer groups, bottom to top, are declared by the model's family (jaxlm/models/family.py), e.g.
`embed`, `encoder/layer_0` .. `encoder/layer_{n-1}`, `head` for both the LSTM and the transformer
families; a strategy only counts groups from the top, so it works for any family.

What "frozen" means here, and why each piece is needed (see STYLE.md, known pitfalls):
- the train step differentiates only the trainable partition (`split_params` / `merge_params`), so
  the backward pass of a frozen subtree is never built. `set_to_zero` alone would still compute it;
- the optimizer is an `optax.partition` over labels: every trainable group gets its own Adam, every
  frozen leaf gets `set_to_zero()`. Partition masks the other leaves with `optax.MaskedNode`, so a
  frozen leaf has no Adam moments and never sees weight decay;
- global-norm clipping is `optax.masked` to the trainable leaves, so frozen gradients cannot
  dominate the norm (the zeros the step puts there would not anyway, but the mask makes it a
  property of the optimizer, not of the caller).

Gradual unfreezing changes the mask per epoch. Choice: one optimizer per phase (mask and labels are
static structure, so each phase jits once) plus `transfer_opt_state`, which carries every state leaf
whose path exists in both phases. Because each group owns its Adam (moments *and* step count), a
group that keeps training continues exactly, a newly unfrozen group starts fresh with correct bias
correction, and the learning-rate schedule, which counts global steps outside the partition, goes
on where it was. A single Adam shared by all groups could not do both: its one step count would be
wrong for either the old or the new leaves.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from jaxlm import params as P
from jaxlm.errors import ConfigError
from jaxlm.models.family import LayerGroups, ModelFamily

STRATEGIES = ("full", "head", "top_k", "gradual")
FROZEN = "frozen"


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which groups train in which epoch, and each group's learning-rate multiplier.

  `lr_multipliers[g] = discriminative_decay ** -(distance of g from the top group)`: ULMFiT's
  lr^(l-1) = lr^l / 2.6 with decay 2.6; 1.0 turns it off.
  """
  strategy: str
  layers: LayerGroups
  family: ModelFamily           # declares the groups and where weight decay applies
  top_k: int = 1
  discriminative_decay: float = 1.0

  @property
  def groups(self) -> tuple[str, ...]:
    return self.layers.names

  def group_of(self, path: str) -> str:
    return self.layers.group_of(path)

  def trainable_groups(self, epoch: int = 0) -> tuple[str, ...]:
    """Groups that train in `epoch` (0-based), bottom to top."""
    n = len(self.groups)
    if self.strategy == "full":
      count = n
    elif self.strategy == "head":
      count = 1
    elif self.strategy == "top_k":
      count = 1 + self.top_k  # the head plus top_k groups below it (config.finetune.top_k)
    else:  # gradual: epoch 0 the top group only, one more group from the top each epoch
      count = epoch + 1
    return self.groups[max(0, n - count):]

  def trainable_mask(self, params, epoch: int = 0):
    """Bool pytree like `params`: True where the leaf trains in `epoch`."""
    trainable = set(self.trainable_groups(epoch))
    return P.map_with_path(lambda path, _: self.group_of(path) in trainable, params)

  def labels(self, params, epoch: int = 0):
    """Optimizer partition labels: the group name of trainable leaves, `FROZEN` otherwise."""
    trainable = set(self.trainable_groups(epoch))
    return P.map_with_path(
        lambda path, _: self.group_of(path) if self.group_of(path) in trainable else FROZEN, params)

  @property
  def lr_multipliers(self) -> dict[str, float]:
    top = len(self.groups) - 1
    return {g: float(self.discriminative_decay) ** -(top - i) for i, g in enumerate(self.groups)}

  @property
  def num_phases(self) -> int:
    """Epochs after which the mask stops changing (1 for all but `gradual`)."""
    return len(self.groups) if self.strategy == "gradual" else 1

  def phase(self, epoch: int) -> int:
    """Epochs with the same phase share a mask, an optimizer and a jitted step."""
    return min(epoch, self.num_phases - 1)


def make_strategy(finetune_cfg, params, family: ModelFamily) -> Plan:
  """Plan from `config.finetune` (strategy, top_k, discriminative_decay) over the layer groups
  `family` declares for `params`; `finetune_cfg=None` means full training."""
  cfg = finetune_cfg if finetune_cfg is not None else {}
  get = cfg.get
  strategy = get("strategy", "full")
  if strategy not in STRATEGIES:
    raise ConfigError(f"config.finetune.strategy={strategy!r} is not one of {', '.join(STRATEGIES)}")
  layers = family.layer_groups(params)
  groups = layers.names
  if strategy in ("head", "top_k") and groups[-1] != "head":
    raise ConfigError(f"config.finetune.strategy={strategy!r} needs a 'head' module; the model has "
                      f"layer groups {', '.join(groups)}")
  top_k = int(get("top_k", 1))
  if strategy == "top_k" and not 0 <= top_k < len(groups):
    raise ConfigError(f"config.finetune.top_k={top_k} must be in [0, {len(groups) - 1}] for layer "
                      f"groups {', '.join(groups)}")
  decay = float(get("discriminative_decay", 1.0))
  if decay <= 0:
    raise ConfigError(f"config.finetune.discriminative_decay must be > 0, got {decay}")
  return Plan(strategy, layers, family, top_k, decay)


# --- schedules -------------------------------------------------------------------------------


def stlr_schedule(peak: float, total_steps: int, cut_frac: float = 0.1,
                  ratio: float = 32.0) -> optax.Schedule:
  """ULMFiT slanted triangular lr: peak/ratio -> peak over cut_frac of the steps, then back down.

  Howard & Ruder (2018), eq. 3: cut = floor(T * cut_frac); the value at step T is peak/ratio again.
  """
  total_steps = max(int(total_steps), 1)
  cut = max(int(total_steps * cut_frac), 1)
  low = peak / ratio
  return optax.join_schedules(
      [optax.linear_schedule(low, peak, cut),
       optax.linear_schedule(peak, low, max(total_steps - cut, 1))],
      [cut])


def phase_starts(plan: "Plan", steps_per_epoch: int, total_steps: int) -> list[int]:
  """Global step at which each phase of `plan` begins (gradual unfreezing: one per epoch until
  every group trains), the run's end excluded: [0] for a single-phase strategy."""
  starts = [0]
  for epoch in range(1, plan.num_phases):
    step = epoch * steps_per_epoch
    if step >= total_steps:
      break
    starts.append(step)
  return starts


def make_schedule(optim_cfg, total_steps: int, phase_starts: list[int] | None = None) -> optax.Schedule:
  """`config.optim.schedule` as an optax schedule of the global step (also for logging the lr).

  With `optim.schedule_per_phase` and `phase_starts` (see `phase_starts`), the schedule starts
  again at every phase of a gradual unfreezing, over that phase's steps: ULMFiT fits each stage
  with its own slanted triangle. Otherwise one schedule spans the run.
  """
  if optim_cfg.get("schedule_per_phase", False) and phase_starts and len(phase_starts) > 1:
    ends = list(phase_starts[1:]) + [max(int(total_steps), phase_starts[-1] + 1)]
    parts = [make_schedule(optim_cfg, end - start) for start, end in zip(phase_starts, ends)]
    return optax.join_schedules(parts, list(phase_starts[1:]))
  lr = float(optim_cfg.learning_rate)
  kind = optim_cfg.get("schedule", "constant")
  warmup = int(optim_cfg.get("warmup_steps", 0))
  if kind == "constant":
    return optax.constant_schedule(lr)
  if kind == "stlr":
    return stlr_schedule(lr, total_steps, optim_cfg.get("stlr_cut_frac", 0.1),
                         optim_cfg.get("stlr_ratio", 32.0))
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup,
                                              max(int(total_steps), warmup + 1))
  if kind == "linear_warmup":
    return optax.linear_schedule(0.0, lr, max(warmup, 1))
  raise ConfigError(f"config.optim.schedule={kind!r} is not one of constant, stlr, cosine, "
                    "linear_warmup")


# --- optimizer -------------------------------------------------------------------------------


def decay_mask(params, family: ModelFamily):
  """Where weight decay applies, by the family's rule (kernels and embeddings; not biases or
  LayerNorm scales: the usual AdamW exclusion)."""
  return P.map_with_path(family.decays, params)


def _group_tx(optim_cfg, multiplier: float, wd_mask) -> optax.GradientTransformation:
  """One group's update before the global schedule: Adam(W)/SGD, weight decay, lr multiplier."""
  name = optim_cfg.get("name", "adam")
  wd = float(optim_cfg.get("weight_decay", 0.0))
  decay = [optax.add_decayed_weights(wd, mask=wd_mask)] if wd > 0 else []
  if name == "adamw":  # decoupled decay, scaled by the lr like optax.adamw / torch AdamW
    core = [optax.scale_by_adam(optim_cfg.get("b1", 0.9), optim_cfg.get("b2", 0.999)), *decay]
  elif name == "adam":  # L2 added to the gradient, like torch.optim.Adam(weight_decay=...)
    core = [*decay, optax.scale_by_adam(optim_cfg.get("b1", 0.9), optim_cfg.get("b2", 0.999))]
  elif name == "sgd":
    core = decay
  else:
    raise ConfigError(f"config.optim.name={name!r} is not one of adam, adamw, sgd")
  if multiplier != 1.0:
    core.append(optax.scale(multiplier))
  return optax.chain(*core) if core else optax.identity()


def build_optimizer(optim_cfg, params, plan: Plan, epoch: int = 0, total_steps: int = 1,
                    phase_starts: list[int] | None = None) -> optax.GradientTransformation:
  """The optimizer of `epoch`'s phase: clip(trainable) -> partition(groups | frozen) -> schedule.

  `total_steps` is the length of the whole run (the STLR/cosine horizon), `phase_starts` where
  its phases begin (for `optim.schedule_per_phase`). The schedule's step count is global: carry
  it across phases with `transfer_opt_state`.
  """
  mask = plan.trainable_mask(params, epoch)
  wd_mask = decay_mask(params, plan.family)
  multipliers = plan.lr_multipliers
  transforms = {g: _group_tx(optim_cfg, multipliers[g], wd_mask)
                for g in plan.trainable_groups(epoch)}
  transforms[FROZEN] = optax.set_to_zero()
  clip = float(optim_cfg.get("grad_clip", 0.0) or 0.0)
  return optax.chain(
      optax.masked(optax.clip_by_global_norm(clip), mask) if clip > 0 else optax.identity(),
      optax.partition(transforms, plan.labels(params, epoch)),
      optax.scale_by_learning_rate(make_schedule(optim_cfg, total_steps, phase_starts)),
  )


def transfer_opt_state(old_state, new_tx: optax.GradientTransformation, params):
  """State of `new_tx` that continues `old_state` wherever both have the same leaf.

  Leaves are matched by pytree key path (e.g. `[1].inner_states['head']...mu['head']['kernel']`)
  and shape: groups trained in both phases keep moments and counts, the global schedule count
  carries over, newly unfrozen groups start from `new_tx.init`.
  """
  old = {jax.tree_util.keystr(path): leaf
         for path, leaf in jax.tree_util.tree_leaves_with_path(old_state)}

  def pick(path, fresh):
    prev = old.get(jax.tree_util.keystr(path))
    if prev is not None and jnp.shape(prev) == jnp.shape(fresh) and prev.dtype == fresh.dtype:
      return prev
    return fresh

  return jax.tree_util.tree_map_with_path(pick, new_tx.init(params))


# --- differentiating only the trainable partition ---------------------------------------------


def split_params(params, mask):
  """`(trainable, frozen)`: two trees like `params` with `None` where the other half's leaves are.

  `jax.grad` of a function of `trainable` returns grads with the same `None`s, i.e. only trainable
  leaves; `mask=None` means everything trains.
  """
  if mask is None:
    return params, jax.tree.map(lambda _: None, params)
  trainable = jax.tree.map(lambda p, m: p if m else None, params, mask)
  frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
  return trainable, frozen


def merge_params(a, b):
  """Leafwise `a if a is not None else b`: undoes `split_params`."""
  return jax.tree.map(lambda x, y: y if x is None else x, a, b, is_leaf=lambda x: x is None)


def zeros_like_frozen(frozen):
  """Zeros where `frozen` has leaves, for the optimizer's full-tree `update`.

  They only feed `set_to_zero` and the masked-out side of clipping, so XLA drops them under jit.
  """
  return jax.tree.map(jnp.zeros_like, frozen)
