"""Checkpoint round trips must be bit-identical, device-agnostic and loud when they do not fit.

The train state mimics a fine-tuning run: Adam moments for trainable leaves only (optax masks and
multi_transform leave MaskedNode/EmptyState holes that must survive the trip) and a typed PRNG key.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm import checkpoint
from jaxlm.checkpoint import Checkpointer
from jaxlm.errors import CheckpointError, ConfigError


def make_params(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return {
      "embed": {"embedding": jax.random.normal(k[0], (11, 4))},
      "encoder": {"layer_0": {"ih": {"kernel": jax.random.normal(k[1], (4, 8)),
                                     "bias": jnp.zeros(8)},
                              "hh": {"kernel": jax.random.normal(k[2], (2, 8)),
                                     "bias": jnp.zeros(8)}}},
      "head": {"kernel": jax.random.normal(k[3], (2, 1)), "bias": jnp.zeros(1)},
  }


def make_tx():
  """Frozen embedding, AdamW on the encoder, Adam on the head (masked), global-norm clipping."""
  labels = {"embed": {"embedding": "frozen"},
            "encoder": jax.tree.map(lambda _: "encoder", make_params()["encoder"]),
            "head": {"kernel": "head", "bias": "head"}}
  head_only = jax.tree.map(lambda label: label == "head", labels)
  return optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.multi_transform({"frozen": optax.set_to_zero(), "encoder": optax.adamw(1e-2),
                             "head": optax.masked(optax.adam(1e-2), head_only)}, labels))


@jax.jit
def _make_state(step, seed):
  params, tx = make_params(seed), make_tx()
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.sin(p) + 0.1, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return {"step": jnp.asarray(step, jnp.int32), "params": params, "opt_state": opt_state,
          "rng": jax.random.fold_in(jax.random.key(seed), step)}


def make_state(step=0, seed=0):
  """A state after one optimizer update, so moments and counts are not just zeros (jitted:
  eager optax would compile op by op)."""
  return _make_state(step, seed)


def abstract_state():
  return jax.eval_shape(make_state)


def assert_trees_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert y.dtype == x.dtype
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_bit_identical_with_masked_opt_state(tmp_path):
  state = make_state(step=3)
  meta = {"epoch": 2, "iterator": {"position": 17, "order": [3, 1, 2]},
          "metrics": {"loss": np.float32(1.5), "accuracy": jnp.asarray(0.75)}}
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.save(3, state, meta)
    restored, restored_meta = ckpt.restore(abstract_state())
  assert_trees_identical(restored, state)
  assert restored_meta == {"epoch": 2, "iterator": {"position": 17, "order": [3, 1, 2]},
                           "metrics": {"loss": 1.5, "accuracy": 0.75}}
  holes = lambda tree: [x for x in jax.tree.leaves(tree, is_leaf=_is_hole) if _is_hole(x)]
  assert len(holes(restored)) == len(holes(state)) > 0


def _is_hole(x):
  return isinstance(x, (optax.MaskedNode, optax.EmptyState))


def test_latest_step_and_max_to_keep(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=2, async_save=False) as ckpt:
    assert ckpt.latest_step() is None
    for step in range(1, 6):
      ckpt.save(step, make_state(step))
    assert ckpt.all_steps() == [4, 5]
    assert ckpt.latest_step() == 5
    assert not ckpt.save(5, make_state(5))  # not after the latest: skipped, as orbax does
    with pytest.raises(CheckpointError, match="step 5 already exists"):
      ckpt.save(5, make_state(5), force=True)


def test_keep_steps_outlive_the_latest_window(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=1, keep_steps=[2, 4], async_save=False) as ckpt:
    for step in range(1, 7):
      ckpt.save(step, make_state(step))
    assert ckpt.all_steps() == [2, 4, 6]
  # Retention is the current run's: a rerun without them lets them go, as with max_to_keep.
  with Checkpointer(tmp_path, max_to_keep=1, async_save=False) as ckpt:
    ckpt.save(7, make_state(7))
    assert ckpt.all_steps() == [7]


def test_resume_restores_the_latest_step(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, make_state(3), {"epoch": 1})
    ckpt.save(6, make_state(6), {"epoch": 2})
  with Checkpointer(tmp_path) as ckpt:  # a new process resuming the run
    assert ckpt.latest_step() == 6
    state, meta = ckpt.restore(abstract_state())
  assert int(state["step"]) == 6 and meta == {"epoch": 2}
  assert_trees_identical(state, make_state(6))


def test_an_interrupted_save_is_never_the_latest(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, make_state(3))
  partial = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1234"  # what a crash leaves
  (partial / "state").mkdir(parents=True)
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [3]
    state, _ = ckpt.restore(abstract_state())
  assert int(state["step"]) == 3


@pytest.mark.parametrize("mode,values,best", [("max", [0.5, 0.9, 0.6, 0.7], 2),
                                              ("min", [0.5, 0.9, 0.2, 0.7], 3)])
def test_best_checkpoint_is_kept_beside_the_latest(tmp_path, mode, values, best):
  with Checkpointer(tmp_path, max_to_keep=1, best_metric="val", best_mode=mode) as ckpt:
    for step, value in enumerate(values, start=1):
      ckpt.save(step, make_state(step), metrics={"val": value, "loss": 1.0})
    assert ckpt.all_steps() == sorted({best, 4})
    assert ckpt.best_step() == best
    state, _ = ckpt.restore(abstract_state(), which="best")
  assert int(state["step"]) == best
  # A later run that does not name the metric (resume) keeps the best all the same.
  with Checkpointer(tmp_path, max_to_keep=1) as ckpt:
    ckpt.save(5, make_state(5))
    ckpt.save(6, make_state(6))
    assert ckpt.all_steps() == [best, 6]
    assert ckpt.best_step() == best
  params = checkpoint.restore_params(tmp_path, which="best")
  assert_trees_identical(params, make_state(best)["params"])


def test_best_falls_back_to_latest_without_a_metric(tmp_path):
  with Checkpointer(tmp_path, best_metric="accuracy") as ckpt:
    ckpt.save(1, make_state(1), metrics={"loss": 2.0})  # no accuracy: not ranked
    ckpt.save(2, make_state(2))
    assert ckpt.best_step() is None
    state, _ = ckpt.restore(abstract_state(), which="best")
  assert int(state["step"]) == 2


def test_restore_params_reads_only_params(tmp_path):
  state = make_state(4)
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(4, state)
    ckpt.save(8, make_state(8))
  params = checkpoint.restore_params(tmp_path, step=4)
  assert_trees_identical(params, state["params"])
  for leaf in jax.tree.leaves(params):
    assert isinstance(leaf, jax.Array)
    assert leaf.sharding.device_set == {jax.devices()[0]}
  assert_trees_identical(checkpoint.restore_params(tmp_path), make_state(8)["params"])


def test_errors_name_the_path_and_the_way_out(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(CheckpointError, match=r"no checkpoints in .*nowhere.*jaxlm pretrain"):
    checkpoint.restore_params(missing)
  assert not missing.exists()  # reading never creates a workdir
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match="no checkpoints in"):
      ckpt.restore(abstract_state())
    ckpt.save(3, make_state(3))
    ckpt.save(6, make_state(6))
    with pytest.raises(CheckpointError, match=r"step 5 .*available steps: \[3, 6\]"):
      ckpt.restore(abstract_state(), step=5)
    with pytest.raises(ConfigError, match="'latest' or 'best'"):
      ckpt.restore(abstract_state(), which="newest")


def test_a_template_that_does_not_fit_lists_every_path(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, make_state(1))
    template = make_state()
    template["params"]["head"]["kernel"] = jnp.zeros((3, 1))
    template["params"]["head"]["extra"] = jnp.zeros(2)
    template["step"] = jnp.asarray(0, jnp.float32)
    with pytest.raises(CheckpointError) as info:
      ckpt.restore(template)
  message = str(info.value)
  assert "does not fit the model" in message
  assert "params/head/extra: in the model, not in the checkpoint" in message
  assert "params/head/kernel: checkpoint (2, 1) float32, model (3, 1) float32" in message
  assert "step: checkpoint () int32, model () float32" in message
  # an optimizer that is not the one saved: its paths are listed too
  with Checkpointer(tmp_path) as ckpt:
    template = make_state()
    template["opt_state"] = optax.sgd(0.1).init(template["params"])
    with pytest.raises(CheckpointError, match="opt_state/1/inner_states/encoder.*not in the model"):
      ckpt.restore(template)


def _mesh_replicated(tree):
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  return jax.device_put(tree, NamedSharding(mesh, P()))


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")
@pytest.mark.parametrize("saved_on_mesh", [False, True])
def test_restore_onto_another_device_layout(tmp_path, saved_on_mesh):
  state = make_state(5)
  on_mesh = _mesh_replicated(state)
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(5, on_mesh if saved_on_mesh else state)
    template = make_state() if saved_on_mesh else _mesh_replicated(make_state())
    restored, _ = ckpt.restore(template)
  assert_trees_identical(restored, state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(template)):
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim)


def test_write_json_atomic_replaces_whole_files(tmp_path):
  path = tmp_path / "run" / "summary.json"
  checkpoint.write_json_atomic(path, {"accuracy": np.float32(0.5), "steps": [1, 2]})
  checkpoint.write_json_atomic(path, {"accuracy": 0.75})
  assert json.loads(path.read_text()) == {"accuracy": 0.75}
  with pytest.raises(CheckpointError, match="summary.json"):
    checkpoint.write_json_atomic(path, {"bad": object()})
  assert json.loads(path.read_text()) == {"accuracy": 0.75}  # old file intact
  assert [p.name for p in path.parent.iterdir()] == ["summary.json"]  # no temp files left


def test_config_round_trip_and_errors(tmp_path):
  config = ml_collections.ConfigDict({"task": "lm", "model": {"hidden_size": 8, "dims": (1, 2)},
                                      "optim": {"lr": 1e-3}})
  checkpoint.save_config(tmp_path, config)
  loaded = checkpoint.load_config(tmp_path)
  assert isinstance(loaded, ml_collections.ConfigDict)
  assert loaded.model.hidden_size == 8 and loaded.optim.lr == 1e-3
  assert list(loaded.model.dims) == [1, 2]
  with pytest.raises(CheckpointError, match=r"other.config\.json does not exist"):
    checkpoint.load_config(tmp_path / "other")
  (tmp_path / "config.json").write_text('{"task": "lm",')
  with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON \(line 1"):
    checkpoint.load_config(tmp_path)


def test_relative_workdir(tmp_path, monkeypatch):
  """`--workdir runs/x` is relative; orbax needs absolute paths, so the Checkpointer resolves it."""
  monkeypatch.chdir(tmp_path)
  state = {"step": np.int32(1), "params": {"w": np.ones((2, 3), np.float32)}}
  with Checkpointer("runs/rel", async_save=True) as ckpt:
    ckpt.save(1, state)
  assert (tmp_path / "runs" / "rel" / "checkpoints" / "1").is_dir()
  params = checkpoint.restore_params("runs/rel")
  np.testing.assert_array_equal(np.asarray(params["w"]), state["params"]["w"])
