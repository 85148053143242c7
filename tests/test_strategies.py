"""Freezing strategies: frozen means bit-identical, momentless, decay-free and outside the clip norm.

The train step below is the pattern jaxlm/train/steps.py follows: differentiate the trainable
partition only, hand the optimizer full-tree grads with zeros where frozen leaves are.
"""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxlm import params as P
from jaxlm.models import FAMILIES
from jaxlm.errors import ConfigError
from jaxlm.models.classifiers import SentimentNet
from jaxlm.train import strategies as S

LSTM = FAMILIES["lstm"]
GROUPS = ("embed", "encoder/layer_0", "encoder/layer_1", "head")


def optim_cfg(**overrides):
  cfg = dict(name="adamw", learning_rate=1e-2, schedule="constant", warmup_steps=0,
             stlr_cut_frac=0.1, stlr_ratio=32.0, grad_clip=0.5, weight_decay=0.1, b1=0.9, b2=0.999)
  return ml_collections.ConfigDict(dict(cfg, **overrides))


def finetune_cfg(strategy, top_k=1, decay=1.0):
  return ml_collections.ConfigDict(dict(strategy=strategy, top_k=top_k,
                                        discriminative_decay=decay))


@pytest.fixture(scope="module")
def setup():
  model = SentimentNet(vocab_size=30, embed_dim=6, hidden_size=5, num_layers=2)
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, 30, size=(4, 7)).astype(np.int32),
           "lengths": np.array([7, 2, 5, 3], np.int32),
           "labels": np.array([0, 1, 1, 0], np.int32)}
  params = model.init(jax.random.key(0), batch["tokens"], batch["lengths"])["params"]
  return model, params, batch


def loss_fn(model):
  def loss(params, batch):
    logits = model.apply({"params": params}, batch["tokens"], batch["lengths"])[:, 0]
    return optax.sigmoid_binary_cross_entropy(logits, batch["labels"].astype(jnp.float32)).mean()
  return loss


def make_step(model, tx, mask):
  """The example train step: grads of the trainable partition only."""
  loss = loss_fn(model)

  @jax.jit
  def step(params, opt_state, batch):
    trainable, frozen = S.split_params(params, mask)
    grads = jax.grad(lambda t: loss(S.merge_params(t, frozen), batch))(trainable)
    full = S.merge_params(grads, S.zeros_like_frozen(frozen))
    updates, opt_state = tx.update(full, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, grads

  return step


def run(model, params, batch, strategy, epoch=0, steps=3, top_k=1, decay=1.0, **optim):
  plan = S.make_strategy(finetune_cfg(strategy, top_k, decay), params, LSTM)
  tx = S.build_optimizer(optim_cfg(**optim), params, plan, epoch, total_steps=10)
  mask = plan.trainable_mask(params, epoch)
  step = make_step(model, tx, mask)
  state = tx.init(params)
  new = params
  for _ in range(steps):
    new, state, grads = step(new, state, batch)
  return plan, mask, new, state, grads


CASES = [("full", 0, {}), ("head", 0, {}), ("top_k", 0, {"top_k": 1}), ("top_k", 0, {"top_k": 2}),
         ("gradual", 0, {}), ("gradual", 1, {}), ("gradual", 2, {"decay": 2.6}),
         ("head", 0, {"name": "adam"}), ("gradual", 1, {"name": "sgd", "decay": 2.6})]


@pytest.mark.parametrize("strategy,epoch,kw", CASES)
def test_frozen_bit_identical_trainable_changed(setup, strategy, epoch, kw):
  model, params, batch = setup
  plan, mask, new, _, grads = run(model, params, batch, strategy, epoch, **kw)
  flat_mask, before, after = P.flatten(mask), P.flatten(params), P.flatten(new)
  assert any(flat_mask.values())
  for path, trains in flat_mask.items():
    if trains:
      assert not np.array_equal(before[path], after[path]), f"{path} did not change"
    else:
      assert np.array_equal(before[path], after[path]), f"frozen {path} changed"
  # The grads pytree holds exactly the trainable leaves.
  assert sorted(P.flatten(grads)) == sorted(p for p, m in flat_mask.items() if m)


def test_layer_groups_and_gradual_order(setup):
  _, params, _ = setup
  assert LSTM.layer_groups(params).names == GROUPS
  plan = S.make_strategy(finetune_cfg("gradual"), params, LSTM)
  assert [plan.trainable_groups(e) for e in range(6)] == [
      ("head",), ("encoder/layer_1", "head"), ("encoder/layer_0", "encoder/layer_1", "head"),
      GROUPS, GROUPS, GROUPS]
  assert plan.num_phases == 4 and plan.phase(9) == 3
  assert S.make_strategy(finetune_cfg("head"), params, LSTM).trainable_groups(5) == ("head",)
  assert S.make_strategy(finetune_cfg("top_k", 2), params, LSTM).trainable_groups() == GROUPS[1:]
  assert S.make_strategy(finetune_cfg("full"), params, LSTM).trainable_groups() == GROUPS
  bi = {"encoder": {"layer_0": {"fwd": {"k": 0}, "bwd": {"k": 0}}, "layer_10": {"x": {"k": 0}},
                    "layer_2": {"x": {"k": 0}}}, "head": {"k": 0}, "embed": {"e": 0}}
  assert LSTM.layer_groups(bi).names == ("embed", "encoder/layer_0", "encoder/layer_2", "encoder/layer_10",
                                "head")


def test_strategy_config_errors(setup):
  _, params, _ = setup
  with pytest.raises(ConfigError, match="strategy"):
    S.make_strategy(finetune_cfg("freeze_all"), params, LSTM)
  with pytest.raises(ConfigError, match="top_k"):
    S.make_strategy(finetune_cfg("top_k", top_k=4), params, LSTM)
  with pytest.raises(ConfigError, match="head"):
    S.make_strategy(finetune_cfg("head"), {"embed": {"e": 0}, "decoder": {"k": 0}}, LSTM)


def adam_states(opt_state):
  return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]


@pytest.mark.parametrize("strategy,epoch", [("head", 0), ("top_k", 0), ("gradual", 1), ("full", 0)])
def test_no_adam_moments_for_frozen_leaves(setup, strategy, epoch):
  _, params, _ = setup
  plan = S.make_strategy(finetune_cfg(strategy), params, LSTM)
  state = S.build_optimizer(optim_cfg(), params, plan, epoch).init(params)
  trainable = {p for p, m in P.flatten(plan.trainable_mask(params, epoch)).items() if m}
  mu_paths = [p for s in adam_states(state) for p in P.flatten(s.mu)]
  nu_paths = [p for s in adam_states(state) for p in P.flatten(s.nu)]
  assert sorted(mu_paths) == sorted(nu_paths) == sorted(trainable)  # one Adam per group, no overlap
  moment_size = sum(P.count_params(s.mu) + P.count_params(s.nu) for s in adam_states(state))
  assert moment_size == 2 * sum(np.size(P.flatten(params)[p]) for p in trainable)


def test_clip_norm_ignores_frozen_leaves():
  params = {"embed": {"embedding": jnp.zeros((100, 10))}, "head": {"kernel": jnp.zeros((2, 2))}}
  plan = S.make_strategy(finetune_cfg("head"), params, LSTM)
  tx = S.build_optimizer(optim_cfg(name="sgd", learning_rate=1.0, grad_clip=1.0, weight_decay=0.0),
                         params, plan)
  # Even if a caller passes real frozen grads, they neither update nor enter the norm.
  small = {"embed": {"embedding": jnp.full((100, 10), 1e3)}, "head": {"kernel": jnp.full((2, 2), 0.2)}}
  updates, _ = tx.update(small, tx.init(params), params)
  np.testing.assert_array_equal(updates["head"]["kernel"], -small["head"]["kernel"])  # norm 0.4 < 1
  np.testing.assert_array_equal(updates["embed"]["embedding"], 0.0)
  big = {"embed": small["embed"], "head": {"kernel": jnp.full((2, 2), 1.0)}}  # head norm 2
  updates, _ = tx.update(big, tx.init(params), params)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.5, rtol=1e-6)


def test_discriminative_learning_rates_scale_updates_by_group(setup):
  _, params, _ = setup
  plan = S.make_strategy(finetune_cfg("full", decay=2.6), params, LSTM)
  tx = S.build_optimizer(optim_cfg(name="sgd", learning_rate=0.1, grad_clip=0.0, weight_decay=0.0),
                         params, plan)
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(ones, tx.init(params), params)
  for path, update in P.flatten(updates).items():
    depth = len(GROUPS) - 1 - GROUPS.index(plan.group_of(path))
    np.testing.assert_allclose(update, -0.1 / 2.6 ** depth, rtol=1e-6)


def test_weight_decay_skips_biases_and_frozen_leaves(setup):
  _, params, _ = setup
  plan = S.make_strategy(finetune_cfg("top_k", 1), params, LSTM)
  tx = S.build_optimizer(optim_cfg(grad_clip=0.0, weight_decay=0.5), params, plan)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  mask = P.flatten(plan.trainable_mask(params))
  for path, update in P.flatten(updates).items():
    decays = mask[path] and not path.endswith("bias")
    assert bool(np.any(update != 0)) == decays, path


def test_stlr_schedule_values():
  lr, total, cut = 0.01, 1000, 100
  schedule = S.make_schedule(optim_cfg(schedule="stlr", learning_rate=lr), total)
  for step, value in [(0, lr / 32), (50, (lr / 32 + lr) / 2), (cut, lr), (550, (lr / 32 + lr) / 2),
                      (total, lr / 32), (2 * total, lr / 32)]:
    np.testing.assert_allclose(schedule(step), value, rtol=1e-5, err_msg=f"step {step}")
  for t in range(0, total + 1, 37):  # ULMFiT eq. 3
    p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / 0.1 - 1))
    np.testing.assert_allclose(schedule(t), lr * (1 + p * 31) / 32, rtol=1e-5)


def test_schedule_per_phase_restarts_at_each_unfreezing(setup):
  _, params, _ = setup
  plan = S.make_strategy(finetune_cfg("gradual"), params, LSTM)  # 4 groups: 4 phases
  starts = S.phase_starts(plan, steps_per_epoch=100, total_steps=600)
  assert starts == [0, 100, 200, 300]  # the last phase runs epochs 4-6
  assert S.phase_starts(plan, 100, 250) == [0, 100, 200]  # a max_steps cut ends the run early
  assert S.phase_starts(S.make_strategy(finetune_cfg("full"), params, LSTM), 100, 600) == [0]
  lr = 0.01
  per_phase = S.make_schedule(optim_cfg(schedule="stlr", learning_rate=lr, schedule_per_phase=True),
                              600, starts)
  # Each phase is its own slanted triangle over its own steps: 100, 100, 100, then 300.
  for start, length in [(0, 100), (100, 100), (200, 100), (300, 300)]:
    one = S.make_schedule(optim_cfg(schedule="stlr", learning_rate=lr), length)
    for t in (0, length // 10, length // 2, length - 1):
      np.testing.assert_allclose(per_phase(start + t), one(t), rtol=1e-5, err_msg=f"{start}+{t}")
  # Off (the default): one triangle over the run, whatever the phases.
  whole = S.make_schedule(optim_cfg(schedule="stlr", learning_rate=lr), 600, starts)
  np.testing.assert_allclose(whole(60), lr, rtol=1e-5)


def test_schedule_drives_the_update():
  params = {"head": {"kernel": jnp.zeros((2,))}}
  plan = S.make_strategy(finetune_cfg("full"), params, LSTM)
  tx = S.build_optimizer(optim_cfg(name="sgd", schedule="stlr", learning_rate=1.0, grad_clip=0.0,
                                   weight_decay=0.0), params, plan, total_steps=100)
  state, ones = tx.init(params), {"head": {"kernel": jnp.ones((2,))}}
  seen = []
  for _ in range(12):
    updates, state = tx.update(ones, state, params)
    seen.append(float(-updates["head"]["kernel"][0]))
  np.testing.assert_allclose(seen, [1 / 32 + t * (1 - 1 / 32) / 10 if t <= 10 else
                                    1 - (t - 10) * (1 - 1 / 32) / 90 for t in range(12)], rtol=1e-5)


def test_a_skipped_batch_moves_the_schedule_and_nothing_else():
  """`train.on_nonfinite=skip`: the schedule is a function of the global step, so a phase of
  `optim.schedule_per_phase` still restarts on its epoch's first batch; Adam's bias-correction
  count and moments stay where the last applied update left them."""
  from jaxlm.train import steps
  params = {"head": {"kernel": jnp.ones((2,))}}
  plan = S.make_strategy(finetune_cfg("full"), params, LSTM)
  tx = S.build_optimizer(optim_cfg(schedule="stlr", grad_clip=0.0, weight_decay=0.0), params,
                         plan, total_steps=100)

  def loss(params, batch, carry, rng, train, model_state=None):
    value = jnp.sum(params["head"]["kernel"] ** 2) * batch["scale"]
    return value, {"weight_sum": jnp.ones(())}, carry, model_state

  step = steps.make_train_step(loss, tx)
  state = steps.create_state(params, tx, seed=0)
  state, _, _ = step(state, {"scale": jnp.ones(())})
  before = jax.device_get(state)
  state, metrics, _ = step(state, {"scale": jnp.array(jnp.nan)})
  assert float(metrics["nonfinite"]) == 1.0
  schedule_count = lambda s: int(s.opt_state[-1].count)  # build_optimizer's last: the schedule
  assert schedule_count(before) == 1 and schedule_count(state) == 2 and int(state.step) == 2
  np.testing.assert_array_equal(state.params["head"]["kernel"], before.params["head"]["kernel"])
  adam = lambda s: [a for a in jax.tree.leaves(
      s.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
      if isinstance(a, optax.ScaleByAdamState)]
  for new, old in zip(adam(state), adam(before), strict=True):
    assert int(new.count) == int(old.count) == 1
    np.testing.assert_array_equal(new.mu["head"]["kernel"], old.mu["head"]["kernel"])


def test_frozen_grads_are_not_computed(setup):
  model, params, batch = setup
  loss = loss_fn(model)

  def grad_jaxpr(strategy, epoch=0):
    mask = S.make_strategy(finetune_cfg(strategy), params, LSTM).trainable_mask(params, epoch)
    trainable, frozen = S.split_params(params, mask)
    return str(jax.make_jaxpr(jax.grad(lambda t: loss(S.merge_params(t, frozen), batch)))(trainable))

  def scans(jaxpr):
    return len(re.findall(r"\bscan\[", jaxpr))

  # The embedding's gradient is a scatter-add into the table: absent unless the embedding trains.
  assert "scatter-add" in grad_jaxpr("full")
  assert "scatter-add" not in grad_jaxpr("gradual", 2)
  # Each LSTM layer runs one forward scan, and a backward scan only if a trainable leaf lies at or
  # below it: the backward pass stops at the lowest trainable layer.
  assert scans(grad_jaxpr("head")) == 2        # forward only
  assert scans(grad_jaxpr("gradual", 1)) == 3  # + backward through layer_1
  assert scans(grad_jaxpr("full")) == 4        # + backward through layer_0


def test_opt_state_survives_gradual_unfreezing(setup):
  model, params, batch = setup
  plan = S.make_strategy(finetune_cfg("gradual", decay=2.6), params, LSTM)
  cfg = optim_cfg(schedule="stlr")
  tx0 = S.build_optimizer(cfg, params, plan, 0, total_steps=10)
  new, state0 = params, tx0.init(params)
  step0 = make_step(model, tx0, plan.trainable_mask(params, 0))
  for _ in range(2):
    new, state0, _ = step0(new, state0, batch)
  tx1 = S.build_optimizer(cfg, params, plan, 1, total_steps=10)
  state1 = S.transfer_opt_state(state0, tx1, new)
  head0 = state0[1].inner_states["head"].inner_state[0]
  head1 = state1[1].inner_states["head"].inner_state[0]
  assert int(head1.count) == 2
  for a, b in zip(jax.tree.leaves((head0.mu, head0.nu)), jax.tree.leaves((head1.mu, head1.nu))):
    np.testing.assert_array_equal(a, b)
  fresh = state1[1].inner_states["encoder/layer_1"].inner_state[0]
  assert int(fresh.count) == 0 and all(not np.any(x) for x in jax.tree.leaves(fresh.mu))
  assert int(state1[2].count) == 2  # the global schedule goes on
  mask1 = plan.trainable_mask(params, 1)
  before = P.flatten(new)
  after, _, _ = make_step(model, tx1, mask1)(new, state1, batch)
  for path, trains in P.flatten(mask1).items():
    assert np.array_equal(before[path], P.flatten(after)[path]) != trains, path


def test_split_merge_roundtrip(setup):
  _, params, _ = setup
  mask = S.make_strategy(finetune_cfg("top_k", 1), params, LSTM).trainable_mask(params)
  trainable, frozen = S.split_params(params, mask)
  assert len(P.flatten(trainable)) + len(P.flatten(frozen)) == len(P.flatten(params))
  merged = S.merge_params(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  all_trainable, nothing = S.split_params(params, None)
  assert all_trainable is params and jax.tree.leaves(nothing) == []
