"""The CPU LSTM kernel (jaxlm/kernels): it builds, it is what a CPU train step runs, and it computes
exactly what the XLA recurrence computes (outputs, final states and every gradient), including
padded rows, reverse direction, initial states, uneven thread chunks and sharded batches.

The XLA recurrence is itself checked against torch.nn.LSTM (test_lstm_parity.py), whose float32
tests now run through this kernel too.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import kernels
from jaxlm.models import lstm
from jaxlm.models.lstm import LSTMEncoder, LSTMLayer


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture
def xla_only(monkeypatch):
  """Within the fixture, fused recurrences trace to the XLA scans (as on GPU/TPU)."""
  def use(flag):
    monkeypatch.setattr(lstm, "_use_kernel", (lambda dtype: False) if not flag else
                        (lambda dtype: jnp.dtype(dtype) == jnp.float32 and kernels.available()))
  return use


def test_kernel_builds_on_this_machine():
  """Not skippable: CI machines have g++, and without the kernel CPU training is slower."""
  assert kernels.available()


def _loss_and_grads(module, params, x, lengths, init):
  def loss(params, x, init):
    ys, state = module.apply(params, x, lengths, initial_state=init)
    flat = jax.tree.leaves(state)
    # Weights every output and state entry differently, so no gradient is symmetric by accident.
    return (jnp.sum(ys * jnp.sin(3.0 * ys + 0.5)) +
            sum(jnp.sum(s * jnp.cos(s + i)) for i, s in enumerate(flat)))
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, x, init)
  outputs = jax.jit(lambda p, x, s: module.apply(p, x, lengths, initial_state=s))(params, x, init)
  return outputs, value, grads


# Lengths: none (every step of every row runs), ragged (each step's sgemm runs on a subset of
# rows, one row never runs), short (the last steps have no row left at all).
LENGTHS = {"none": None, "ragged": [11, 4, 1, 0, 9], "short": [6, 4, 1, 0, 2]}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("hidden", [8, 65])  # 65: two chunks of 32 and 33 units
def test_layer_kernel_equals_xla(xla_only, reverse, lengths, hidden):
  B, T, E = 5, 11, 7
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, E))
  padded = LENGTHS[lengths] is not None
  lengths = jnp.array(LENGTHS[lengths]) if padded else None
  init = tuple(jax.random.normal(jax.random.PRNGKey(i), (B, hidden)) for i in (2, 3))
  layer = LSTMLayer(hidden, reverse=reverse)
  params = layer.init(jax.random.PRNGKey(1), x)
  xla_only(True)
  got = _loss_and_grads(layer, params, x, lengths, init)
  xla_only(False)
  want = _loss_and_grads(layer, params, x, lengths, init)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape
    assert rel_err(g, w) < 2e-6
  if padded:  # outputs past a row's length are exactly zero in both
    ys = np.asarray(got[0][0])
    assert np.all(ys[3] == 0.0) and np.all(ys[1, 4:] == 0.0)


def test_bidirectional_stack_kernel_equals_xla(xla_only):
  B, T, E, H = 4, 13, 6, 40
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, E))
  lengths = jnp.array([13, 7, 2, 10])
  encoder = LSTMEncoder(num_layers=2, hidden_size=H, bidirectional=True)
  params = encoder.init(jax.random.PRNGKey(1), x)
  init = tuple((jax.random.normal(jax.random.PRNGKey(10 + i), (B, 2 * H)),
                jax.random.normal(jax.random.PRNGKey(20 + i), (B, 2 * H))) for i in range(2))
  xla_only(True)
  got = _loss_and_grads(encoder, params, x, lengths, init)
  xla_only(False)
  want = _loss_and_grads(encoder, params, x, lengths, init)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel_err(g, w) < 2e-6


def _hlo(fn, *args, platforms):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=platforms).as_text()


def test_cpu_step_calls_the_kernel_and_other_platforms_do_not():
  """One jitted function: on CPU it calls the kernel (forward and backward); lowered for TPU or
  CUDA it is the plain XLA scan, so the same code runs there."""
  x = jnp.ones((2, 5, 3))
  layer = LSTMLayer(8)
  params = layer.init(jax.random.PRNGKey(0), x)
  grad = jax.grad(lambda p, x: jnp.sum(layer.apply(p, x)[0] ** 2))
  cpu = _hlo(grad, params, x, platforms=("cpu",))
  assert "jaxlm_lstm_forward_train" in cpu and "jaxlm_lstm_backward" in cpu
  for platform in ("tpu", "cuda"):
    text = _hlo(grad, params, x, platforms=(platform,))
    assert "jaxlm_lstm" not in text and "while" in text


def test_inference_uses_the_kernel_without_residuals():
  x = jnp.ones((2, 5, 3))
  layer = LSTMLayer(8)
  params = layer.init(jax.random.PRNGKey(0), x)
  text = _hlo(lambda p, x: layer.apply(p, x)[0], params, x, platforms=("cpu",))
  assert "jaxlm_lstm_forward_infer" in text and "jaxlm_lstm_forward_train" not in text


def test_bfloat16_runs_the_kernel_in_float32():
  """The kernel is float32-only: a bf16 layer's recurrence is upcast to it on CPU (its numbers and
  dtypes: tests/test_mixed_precision.py)."""
  x = jnp.ones((2, 5, 3), jnp.bfloat16)
  layer = LSTMLayer(8, dtype=jnp.bfloat16)
  params = layer.init(jax.random.PRNGKey(0), x)
  text = _hlo(lambda p, x: layer.apply(p, x)[0], params, x, platforms=("cpu",))
  assert "jaxlm_lstm_forward_infer" in text


def test_sharded_batch_equals_single_device():
  """Data-parallel training shards the batch over devices (4 simulated CPU devices here)."""
  devices = jax.devices()[:4]
  assert len(devices) == 4
  B, T, E, H = 8, 6, 5, 16
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, E))
  lengths = jnp.array([6, 3, 5, 1, 6, 2, 4, 6])
  encoder = LSTMEncoder(num_layers=2, hidden_size=H)
  params = encoder.init(jax.random.PRNGKey(1), x)
  grad = jax.jit(jax.grad(lambda p, x, n: jnp.sum(encoder.apply(p, x, n)[0] ** 2)))
  want = grad(params, x, lengths)
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicate = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  got = grad(jax.device_put(params, replicate), jax.device_put(x, shard),
             jax.device_put(lengths, shard))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel_err(g, w) < 2e-6


def test_disabled_by_environment(monkeypatch):
  monkeypatch.setenv("JAXLM_LSTM_KERNEL", "0")
  kernels.available.cache_clear()
  try:
    assert not kernels.available()
  finally:
    monkeypatch.delenv("JAXLM_LSTM_KERNEL")
    kernels.available.cache_clear()
    assert kernels.available()


def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
  """A machine without a working compiler trains on the XLA scan, after one warning naming why;
  no partial library is left in the cache."""
  monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path))
  monkeypatch.setattr(kernels, "_build_command",
                      lambda out: [["g++", "-x", "c++", "-c", "/nonexistent/lstm.cc", "-o",
                                    str(out)]])
  kernels.available.cache_clear()
  try:
    with pytest.warns(RuntimeWarning, match="CPU LSTM kernel is unavailable.*failed"):
      assert not kernels.available()
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      assert not kernels.available()  # cached: no second warning
    assert not list(tmp_path.rglob("*.so"))
  finally:
    kernels.available.cache_clear()


def test_nan_inputs_propagate():
  """Compiled with -ffast-math (for the vector tanh): a NaN must still reach the loss, not vanish."""
  x = jnp.ones((2, 5, 3)).at[1, 2, 0].set(jnp.nan)
  layer = LSTMLayer(8)
  params = layer.init(jax.random.PRNGKey(0), jnp.ones((2, 5, 3)))
  ys, (c, h) = jax.jit(layer.apply)(params, x)
  assert not np.isnan(np.asarray(ys[0])).any()  # the other row is untouched
  assert np.isnan(np.asarray(ys[1, 2:])).all() and np.isnan(np.asarray(h[1])).all()
  grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x)[0])))(params)
  assert all(np.isnan(np.asarray(g)).any() for g in jax.tree.leaves(grads))
