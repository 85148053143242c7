"""Pure train and eval steps, jitted once per model, optimizer and trainable mask.

A step is `train_step(state, batch, carry) -> (state, metrics, carry)`:
- `state` is a `TrainState` pytree (step, params, opt_state, rng, model_state) and is donated, so
  params are updated in place on every backend;
- `batch` is a dict of arrays (see jaxlm/batching.py), sharded along its leading axis when several
  devices are used - the same code runs on one CPU, 8 simulated CPUs, a GPU or a TPU slice;
- `carry` is the LSTM state carried between consecutive batches in stream-mode LM training
  (None otherwise);
- `metrics` are sums (see jaxlm/metrics.py), normalised on the host.

Losses are written once per task (`lm_loss`, `classifier_loss`) and plugged into the same step
builder. Freezing works by differentiating only the trainable partition of the params: frozen
leaves enter the loss as constants, so XLA never builds their backward pass.

`model_state` holds a model's variables that are not params - the running averages (`batch_stats`)
of ULMFiT's batch-normalised head, `{}` for every other model. The train step updates them from
each batch (as PyTorch's BatchNorm does in train mode, also while a frozen strategy keeps the
head's params fixed); evaluation reads them and changes nothing.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from jaxlm.train import strategies


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so checkpoints need no typed-key support
  # Non-param collections, e.g. {"batch_stats": ...}; {} (checkpoints of such runs lack it).
  model_state: Any = flax.struct.field(default_factory=dict)


def create_state(params, tx: optax.GradientTransformation, seed: int,
                 model_state=None) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)), model_state=model_state or {})


def split_variables(variables) -> tuple[Any, dict]:
  """`model.init`'s variables -> (params, model_state: every other collection)."""
  return variables["params"], {k: v for k, v in variables.items() if k != "params"}


# A loss function maps (params, batch, carry, rng, train) -> (loss_sum, metric sums, new carry).
# Given `model_state=` (a dict, maybe {}), it applies the model with those collections too and,
# as flax's `apply(mutable=...)` does, also returns them: updated when training, as given otherwise.
LossFn = Callable[..., tuple]


def _apply(model, params, model_state, args, train, rng):
  """`model.apply` with `model_state`'s collections, mutable when training: (output, new state)."""
  variables = {"params": params, **(model_state or {})}
  kwargs = dict(deterministic=not train, rngs={"dropout": rng} if train else None)
  if train and model_state:
    return model.apply(variables, *args, mutable=list(model_state), **kwargs)
  return model.apply(variables, *args, **kwargs), model_state


def lm_loss(model) -> LossFn:
  """Per-token NLL summed over real (weight 1) target tokens; padding contributes nothing.

  A sampled-softmax model's training NLL is not a likelihood (eval steps use the exact softmax),
  so its train metrics carry `sampled_batches` and are reported as a loss, never as perplexity.
  """
  sampled = getattr(model, "output", "full") == "sampled"

  def loss(params, batch, carry, rng, train, model_state=None):
    nll, final_state = model.apply(
        {"params": params, **(model_state or {})}, batch["inputs"], batch["targets"],
        batch["lengths"], deterministic=not train, initial_state=carry,
        rngs={"dropout": rng} if train else None)
    weights = batch["weights"]
    loss_sum = jnp.sum(nll * weights)
    metrics = {"loss_sum": loss_sum, "weight_sum": jnp.sum(weights)}
    if sampled and train:
      metrics["sampled_batches"] = jnp.ones((), jnp.float32)
    new_carry = None if carry is None else jax.lax.stop_gradient(final_state)
    out = loss_sum, metrics, new_carry
    return out if model_state is None else (*out, model_state)

  return loss


def classifier_loss(model, loss_kind: str, num_classes: int, inputs=None) -> LossFn:
  """BCE-with-logits on one logit (seeds 002/003) or softmax cross-entropy (seed 000).

  `inputs(batch)` are the model's positional arguments (its family's `init_args`; by default
  tokens and lengths): an LSTM classifier also takes the example weights, which keep the filler
  rows of a partial batch out of a batch-normalised head's statistics.
  """
  inputs = inputs or (lambda batch: (batch["tokens"], batch["lengths"]))

  def loss(params, batch, carry, rng, train, model_state=None):
    logits, new_state = _apply(model, params, model_state, inputs(batch), train, rng)
    labels, weights = batch["labels"], batch["weights"]
    if loss_kind == "bce":
      logit = logits[:, 0]
      per_example = optax.sigmoid_binary_cross_entropy(logit, labels.astype(logit.dtype))
      predictions = (logit > 0).astype(jnp.int32)
    else:
      per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      predictions = jnp.argmax(logits, axis=-1)
    loss_sum = jnp.sum(per_example * weights)
    confusion = jnp.zeros((num_classes, num_classes), jnp.float32).at[labels, predictions].add(weights)
    metrics = {"loss_sum": loss_sum, "weight_sum": jnp.sum(weights),
               "correct": jnp.sum((predictions == labels) * weights), "confusion": confusion}
    out = loss_sum, metrics, carry
    return out if model_state is None else (*out, jax.lax.stop_gradient(new_state))

  return loss


def _is_schedule_state(path, value) -> bool:
  """Matches the count of optax's `ScaleByScheduleState` (its path's last key names the state)."""
  return getattr(path[-1], "tuple_name", None) == "ScaleByScheduleState"


def with_schedule_of(kept, updated):
  """`kept` (the optimizer state a skipped batch left as it was) with the learning-rate schedule's
  count of `updated` (one step on).

  The schedule stays a function of the global step: a phase of a gradual unfreezing with
  `optim.schedule_per_phase` restarts on its epoch's first batch however many batches were
  skipped before it. Adam's own count (its bias correction) stays: no update was applied.
  """
  count = optax.tree.get(updated, "count", default=None, filtering=_is_schedule_state)
  return kept if count is None else optax.tree.set(kept, _is_schedule_state, count=count)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, trainable_mask=None):
  """Builds the jitted train step; `trainable_mask` (a bool pytree like params) freezes the rest.

  A batch whose loss or gradient norm is not finite changes nothing: params, optimizer state and
  model state (batch statistics) keep their values (a select, exact otherwise; only the
  learning-rate schedule moves on, see `with_schedule_of`) and its metrics are zeros except
  `nonfinite` = 1, so the state the loop may checkpoint is never poisoned. The loop decides
  whether that stops the run or only skips the batch (`config.train.on_nonfinite`).
  """

  def train_step(state: TrainState, batch, carry=None):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    trainable, frozen = strategies.split_params(state.params, trainable_mask)

    def objective(trainable_params):
      params = strategies.merge_params(trainable_params, frozen)
      loss_sum, metrics, new_carry, model_state = loss_fn(params, batch, carry, rng, True,
                                                          model_state=state.model_state)
      return loss_sum / jnp.maximum(metrics["weight_sum"], 1.0), (metrics, new_carry, model_state)

    (loss, (metrics, new_carry, model_state)), grads = jax.value_and_grad(
        objective, has_aux=True)(trainable)
    grads = strategies.merge_params(grads, strategies.zeros_like_frozen(frozen))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), with_schedule_of(
        keep(opt_state, state.opt_state), opt_state)
    model_state = keep(model_state, state.model_state)
    metrics = jax.tree.map(lambda m: jnp.where(finite, m, jnp.zeros_like(m)), metrics)
    metrics = dict(metrics, grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32))
    if new_carry is not None and carry is not None:
      new_carry = keep(new_carry, carry)
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                          model_state=model_state)
    return state, metrics, new_carry

  return jax.jit(train_step, donate_argnums=(0,))


def make_eval_step(loss_fn: LossFn):
  """Jitted eval step: deterministic forward pass (batch norm from its running averages in
  `model_state`), metric sums only."""

  def eval_step(params, batch, carry=None, model_state=None):
    _, metrics, new_carry, _ = loss_fn(params, batch, carry, None, False,
                                       model_state=model_state or {})
    return metrics, new_carry

  return jax.jit(eval_step)
