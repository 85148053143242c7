"""Every shipped config, traced with abstract shapes through model init and one train step.

Why: a config is code that only runs for real hours into a job on real data. `jax.eval_shape`
traces the same init and jitted train step with no data, no tokenizer and no FLOPs, so a config
whose model, optimizer or freezing strategy does not fit together fails here in seconds.
"""
import contextlib
import importlib.util
import io
import pathlib

import jax
import numpy as np
import pytest

from jaxlm import cli, commands, config as config_lib, models, tasks
from jaxlm import params as params_lib
from jaxlm.train import steps, strategies

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def _load_module(path):
  spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _shipped_configs():
  """(id, config): one per config file, or one per part (`file.py:part`) for multi-part files."""
  out = []
  for path in sorted(CONFIG_DIR.glob("*.py")):
    module = _load_module(path)
    config = module.get_config()
    if "task" in config:
      out.append((path.name, config))
      continue
    parts = [k for k, v in config.items() if hasattr(v, "keys") and "task" in v]
    assert parts, f"{path} has neither config.task nor parts with one"
    for part in parts:
      out.append((f"{path.name}:{part}", module.get_config(part)))
  return out


CONFIGS = _shipped_configs()


def test_quickstart_parts_are_discovered():
  ids = [i for i, _ in CONFIGS]
  assert "quickstart.py:pretrain" in ids and "quickstart.py:finetune" in ids
  assert {"imdb_lm.py", "imdb_sentiment_net.py", "seed003_lstm.py"} <= set(ids)


def _abstract_batch(config):
  """The largest batch a run can see: config.data.batch_size rows of the largest bucket (or bptt)."""
  b = config.data.batch_size
  i32, f32 = np.int32, np.float32
  s = jax.ShapeDtypeStruct
  if config.task == "lm":
    t = config.data.bptt if config.data.lm_mode == "stream" else max(config.data.buckets)
    return {"inputs": s((b, t), i32), "targets": s((b, t), i32), "weights": s((b, t), f32),
            "lengths": s((b,), i32)}
  t = max(config.data.buckets)
  return {"tokens": s((b, t), i32), "lengths": s((b,), i32), "labels": s((b,), i32),
          "weights": s((b,), f32)}


@pytest.mark.parametrize("name,config", CONFIGS, ids=[i for i, _ in CONFIGS])
def test_config_init_and_train_step_shapes(name, config):
  config_lib.validate(config)
  vocab_size = commands._vocab_size_for(config)
  family = models.family_of(config.model.name)
  model = family.build(config.model, vocab_size)
  batch = _abstract_batch(config)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  init = lambda b: model.init(rngs, *family.init_args(config.task, b))
  loss_fn = tasks.TASKS[config.task].loss(config, model)
  params, model_state = steps.split_variables(jax.eval_shape(init, batch))  # + batch statistics
  width = config.model.get("embed_dim", config.model.get("d_model"))
  assert params["embed"]["embedding"].shape == (vocab_size, width)

  plan = strategies.make_strategy(config.get("finetune"), params, models.family_of(config.model.name))
  carry = None
  if config.task == "lm" and config.data.lm_mode == "stream":
    carry = models.family_of(config.model.name).initial_carry(config.model, config.data.batch_size)
  # Every phase of a gradual strategy has its own optimizer and jitted step: trace each.
  for epoch in range(plan.num_phases):
    tx = strategies.build_optimizer(config.optim, params, plan, epoch, total_steps=1000)
    state = jax.eval_shape(lambda p, s: steps.create_state(p, tx, config.train.seed, s), params,
                           model_state)
    train_step = steps.make_train_step(loss_fn, tx, plan.trainable_mask(params, epoch))
    new_state, metrics, _ = jax.eval_shape(train_step, state, batch, carry)
    same = jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype),
                        state.params, new_state.params)
    assert all(jax.tree.leaves(same)), f"{name}: train step changes param shapes (epoch {epoch})"
    assert jax.tree.structure(new_state.opt_state) == jax.tree.structure(state.opt_state)
    assert jax.tree.structure(new_state.model_state) == jax.tree.structure(state.model_state)
    assert metrics["loss_sum"].shape == () and metrics["grad_norm"].shape == ()
    if config.task == "classifier":
      k = config.model.num_classes
      assert metrics["confusion"].shape == (k, k)


def test_inspect_seed003_reports_seed_parameter_count(capsys):
  """Seed 003's baseline has exactly 2,867,049 parameters (25,002-word vocab, embed 100, LSTM 256)."""
  assert cli.main(["jaxlm", "inspect", "--config", str(CONFIG_DIR / "seed003_lstm.py")]) == 0
  out = capsys.readouterr().out
  assert "total: 2,867,049 parameters" in out
  embedding = next(line for line in out.splitlines() if line.strip().startswith("embedding "))
  # the leaf `embed/embedding`, indented under its subtree `embed`
  assert embedding.startswith("  embedding ") and "(25002, 100)" in embedding


def test_inspect_applies_overrides(capsys):
  """Overrides reach the model (and main runs twice in one process without flag clashes)."""
  args = ["jaxlm", "inspect", "--config", str(CONFIG_DIR / "seed003_lstm.py")]
  assert cli.main(args + ["--config.model.hidden_size=8"]) == 0
  out = capsys.readouterr().out
  # 25002*100 + (100+8)*32 + 2*32 + 8 + 1
  expected = 25002 * 100 + (100 + 8) * 32 + 2 * 32 + 8 + 1
  assert f"total: {expected:,} parameters" in out


def test_negative_test_subset_is_a_config_error():
  from jaxlm.errors import ConfigError
  config = config_lib.lm_config()
  config.data.test_max_examples = -5
  with pytest.raises(ConfigError, match="test_max_examples"):
    config_lib.validate(config)
