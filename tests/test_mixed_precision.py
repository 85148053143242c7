"""Mixed precision: `config.model.dtype='bfloat16'` computes in bf16 and keeps float32 params,
gradients, updates and optimizer state, for every model; the loss is float32; a bf16 run trains,
evaluates and resumes through the commands.

How compute is checked (so that a model quietly computing in float32 fails): the dtypes of module
outputs (`capture_intermediates`) and the operand dtypes of every matmul (`dot_general`) in the
traced forward program. The only float32 matmuls allowed are a classifier's head (pooled features,
by design) and, on CPU, the LSTM kernel's recurrence (a custom call, checked separately).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import checkpoint, commands, config as config_lib, models
from jaxlm.errors import ConfigError
from jaxlm.models.lstm import LSTMEncoder
from jaxlm.train import steps, strategies
from cli_helpers import run

BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
SOURCE = "synthetic:train=80,test=40,unsup=160"
# (model name, lm output): every model of every family, every LM output layer.
MODELS = [("lstm_lm", "full"), ("lstm_lm", "sampled"), ("lstm_lm", "adaptive"),
          ("sentiment_net", None), ("lstm_classifier", None), ("transformer_classifier", None)]
# Trained through the commands (test_bf16_lm_pretrains_...); the others by the train step alone.
CLI_RUNS = [("lstm_lm", "full"), ("sentiment_net", None)]


def tiny_config(name, output=None, dtype="bfloat16"):
  """A seconds-long run of `name` on the synthetic corpus (as tests/test_loop.py's)."""
  config = config_lib.lm_config(name) if name == "lstm_lm" else config_lib.classifier_config(name)
  config.data.update(source=SOURCE, batch_size=8, eval_batch_size=8, buckets=(48,), max_len=48)
  config.tokenizer.vocab_size = 200
  if name == "transformer_classifier":
    config.model.update(d_model=16, num_heads=2, num_layers=1, ffn_dim=32, max_len=48)
  else:
    config.model.update(embed_dim=16, hidden_size=32, num_layers=1)
  if output is not None:
    config.model.update(output=output, num_sampled=32, adaptive_cutoffs=(60,))
  if name == "lstm_lm":
    config.data.update(train_split="unsup", valid_fraction=0.1)
  config.model.dtype = dtype
  config.train.update(num_devices=1, log_every_steps=1, seed=0)
  return config


def _batch(kind, vocab, rng):
  tokens = rng.integers(4, vocab, (8, 12)).astype(np.int32)
  lengths = np.array([12, 9, 5, 1, 12, 3, 7, 12], np.int32)
  weights = (np.arange(12)[None, :] < lengths[:, None]).astype(np.float32)
  if kind == "lm":
    return dict(inputs=tokens, targets=np.roll(tokens, -1, 1), lengths=lengths, weights=weights)
  return dict(tokens=tokens, lengths=lengths, labels=rng.integers(0, 2, 8).astype(np.int32),
              weights=np.ones(8, np.float32))


def _subjaxprs(value):
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _subjaxprs(v)


def _eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in it (scan bodies, cond branches,
  custom_vjp calls, remat, pjit): both branches of the LSTM's CPU/GPU platform switch included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in _subjaxprs(value):
        yield from _eqns(sub)


def _matmul_dtypes(fn, *args):
  """[(lhs dtype, rhs dtype)] of every dot_general in `fn`'s traced program."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return [tuple(v.aval.dtype for v in e.invars) for e in _eqns(jaxpr)
          if e.primitive.name == "dot_general"]


def _kernel_calls(fn, *args):
  """Operand dtypes of every call of the CPU LSTM kernel in `fn`'s program."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return [{v.aval.dtype for v in e.invars} for e in _eqns(jaxpr)
          if e.primitive.name == "ffi_call" and "jaxlm_lstm" in e.params["target_name"]]


def _float_leaves(tree):
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def test_dtype_is_a_validated_model_field(tmp_path, capsys):
  for name, _ in MODELS:
    config = tiny_config(name, dtype="float32")
    default = (config_lib.lm_config(name) if name == "lstm_lm"
               else config_lib.classifier_config(name)).model.dtype
    assert default == "float32"
    config.model.dtype = "float16"
    with pytest.raises(ConfigError, match=r"config.model.dtype='float16' is not one of "
                                          r"float32, bfloat16"):
      config_lib.validate(config)
  # On the command line: one line, exit 2, before any data is read.
  code, _, err = run(capsys, "pretrain", "--config", "quickstart:pretrain",
                     "--config.model.dtype=float16", "--workdir", tmp_path / "run")
  assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
  assert "config.model.dtype='float16' is not one of float32, bfloat16" in err
  assert not (tmp_path / "run").exists()


def _setup(name, output=None, dtype="bfloat16", *, concrete=False):
  """(family, kind, model, batch, args, params, tx, state, loss_fn), built as a run builds them:
  the family from the validated config, the real optimizer and train state (jaxlm/train/).
  Abstract (jax.eval_shape: dtypes and shapes, nothing computed) unless `concrete`."""
  config = tiny_config(name, output, dtype)
  config_lib.validate(config)
  config.optim.update(learning_rate=2e-2)
  family = models.family_of(name)
  kind = family.models[name]
  model = family.build(config.model, 204)
  batch = _batch(kind, 204, np.random.default_rng(0))
  args = family.init_args(kind, batch)
  init = lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                            *args)["params"]
  # jitted: an eager init compiles every small op on its own (10+ s for these models).
  params = jax.jit(init)() if concrete else jax.eval_shape(init)
  plan = strategies.make_strategy(config.get("finetune"), params, family)
  tx = strategies.build_optimizer(config.optim, params, plan, 0, total_steps=10)
  make_state = lambda p: steps.create_state(p, tx, seed=0)
  state = jax.jit(make_state)(params) if concrete else jax.eval_shape(make_state, params)
  loss_fn = (steps.lm_loss(model) if kind == "lm" else
             steps.classifier_loss(model, config.model.loss, config.model.num_classes))
  return family, kind, model, batch, args, params, tx, state, loss_fn


@pytest.mark.parametrize("name,output", MODELS)
def test_bf16_compute_with_float32_params_grads_updates_and_optimizer_state(name, output):
  """Dtypes are read off the traced programs (jax.eval_shape, make_jaxpr): exactly what the jitted
  step would run, without compiling it; the runs below execute them."""
  family, kind, model, batch, args, params, tx, state, loss_fn = _setup(name, output)
  assert {x.dtype for x in jax.tree.leaves(params)} == {F32}
  assert {x.dtype for x in _float_leaves(state.opt_state)} == {F32}

  def probe(params, opt_state, batch):
    def objective(p):
      loss_sum, metrics, _ = loss_fn(p, batch, None, jax.random.key(2), True)
      return loss_sum / metrics["weight_sum"]
    loss, grads = jax.value_and_grad(objective)(params)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    _, inter = model.apply({"params": params}, *args, capture_intermediates=True,
                           mutable=["intermediates"])
    return loss, grads, updates, new_opt_state, inter["intermediates"]

  loss, grads, updates, new_opt_state, inter = jax.eval_shape(probe, params, state.opt_state, batch)
  assert loss.dtype == F32
  for tree in (grads, updates, new_opt_state):
    assert {x.dtype for x in _float_leaves(tree)} == {F32}

  # Activations: bf16 inside, float32 where the loss starts.
  assert inter["embed"]["__call__"][0].dtype == BF16
  if family.name == "lstm":
    encoder_out, _ = inter["encoder"]["__call__"][0]
    assert encoder_out.dtype == BF16
    assert inter["encoder"]["layer_0"]["__call__"][0][0].dtype == BF16
  else:
    assert inter["encoder"]["layer_0"]["__call__"][0].dtype == BF16
    assert {a.dtype for a in inter["encoder"]["layer_0"]["attn"]["qkv"]["__call__"][0]} == {BF16}
  out = inter["__call__"][0]
  if kind == "lm":
    nll, state_out = out
    assert nll.dtype == F32
    assert {s.dtype for s in jax.tree.leaves(state_out)} == {F32}  # one carry dtype in stream mode
  else:
    assert out.dtype == F32 and inter["head"]["__call__"][0].dtype == F32

  # Every matmul of the train-mode forward takes bf16 operands, but a classifier's head.
  def forward(p):
    return loss_fn(p, batch, None, jax.random.key(2), True)[0]
  matmuls = _matmul_dtypes(forward, params)
  f32_matmuls = [m for m in matmuls if m != (BF16, BF16)]
  assert len(matmuls) - len(f32_matmuls) >= 2
  assert f32_matmuls == ([] if kind == "lm" else [(F32, F32)])
  if family.name == "lstm":  # the CPU recurrence: the float32 kernel (jaxlm/models/lstm.py)
    calls = _kernel_calls(forward, params)
    assert calls and all(c == {F32} for c in calls)


@pytest.mark.parametrize("name,output", [m for m in MODELS if m not in CLI_RUNS])
def test_bf16_trains(name, output):
  """The models the CLI runs below do not train: the real jitted train step, 8 steps on one
  batch; the state stays float32 and the loss falls."""
  *_, batch, _, _, tx, state, loss_fn = _setup(name, output, concrete=True)
  train_step = steps.make_train_step(loss_fn, tx)
  losses = []
  for _ in range(8):
    state, metrics, _ = train_step(state, batch)
    losses.append(float(metrics["loss_sum"] / metrics["weight_sum"]))
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {F32}
  assert {x.dtype for x in _float_leaves(state.opt_state)} == {F32}
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses


def test_float32_config_computes_in_float32():
  """The matmul check above can fail: the same program with dtype=float32 has no bf16 matmul."""
  *_, batch, _, params, _, _, loss_fn = _setup("lstm_lm", "full", dtype="float32")
  matmuls = _matmul_dtypes(lambda p: loss_fn(p, batch, None, jax.random.key(2), True)[0], params)
  assert matmuls and all(m == (F32, F32) for m in matmuls)


def test_bf16_lstm_fused_on_cpu_matches_the_bf16_scan():
  """impl='fused' in bf16: on CPU its recurrence runs in the float32 kernel, on other platforms
  (and with impl='scan' everywhere) in bf16. Outputs and gradients agree with the bf16 scan and
  with float32 to bf16 precision; lowered for CUDA the program has no kernel call."""
  x = jax.random.normal(jax.random.key(0), (4, 9, 8))
  lengths = jnp.array([9, 4, 1, 7])
  results = {}
  # One param tree for every impl and dtype (float32 params; the scan adds no params).
  params = jax.jit(LSTMEncoder(1, 16, bidirectional=True).init)(jax.random.key(1), x, lengths)
  for impl, dtype in (("fused", jnp.bfloat16), ("scan", jnp.bfloat16), ("fused", jnp.float32)):
    enc = LSTMEncoder(1, 16, bidirectional=True, impl=impl, dtype=dtype)

    def loss(p, x):
      ys, state = enc.apply(p, x, lengths)
      return jnp.sum(ys.astype(jnp.float32) ** 2) + jnp.sum(state[-1][0].astype(jnp.float32))

    value, (g_p, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    assert {g.dtype for g in jax.tree.leaves(g_p)} == {F32} and g_x.dtype == F32
    results[impl, jnp.dtype(dtype).name] = (value, g_p, g_x)
    if impl == "fused" and dtype == jnp.bfloat16:
      cpu = jax.jit(jax.grad(loss)).trace(params, x).lower(lowering_platforms=("cpu",)).as_text()
      cuda = jax.jit(jax.grad(loss)).trace(params, x).lower(lowering_platforms=("cuda",)).as_text()
      assert "jaxlm_lstm_forward_train" in cpu and "jaxlm_lstm_backward" in cpu
      assert "jaxlm_lstm" not in cuda and "bf16" in cuda
  ref = results["fused", "float32"]
  for key in (("fused", "bfloat16"), ("scan", "bfloat16")):
    got = results[key]
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=3e-2)
    for a, b in zip(jax.tree.leaves(got[1:]), jax.tree.leaves(ref[1:])):
      scale = float(np.max(np.abs(np.asarray(b)))) + 1e-6
      assert float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / scale < 5e-2, key


def _train_losses(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if r.get("split") == "train"]


def _assert_loss_falls(losses, epochs=None, ratio=0.8):
  """The last steps' (or epoch's) mean train loss is well below the first ones'."""
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses))
  if epochs:
    means = losses.reshape(epochs, -1).mean(axis=1)
    first, last = means[0], means[-1]
  else:
    first, last = losses[:3].mean(), losses[-3:].mean()
  assert last < ratio * first, losses


def _assert_float32_checkpoint(workdir):
  params = checkpoint.restore_params(workdir)
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}


# Small enough to overfit in a few epochs: 32 labeled train records (4 batches), 43 LM reviews.
SMALL = "synthetic:train=40,test=16,unsup=48"


def _small(config, epochs):
  config.data.update(source=SMALL, valid_fraction=0.2)
  for key in ("dropout_embed", "dropout_hidden", "dropout_output", "dropout"):
    if key in config.model:
      config.model[key] = 0.0
  config.optim.update(learning_rate=1e-2)
  config.train.update(num_epochs=epochs)
  return config


def test_bf16_lm_pretrains_evaluates_resumes_and_grafts(tmp_path):
  """Through the commands: a bf16 LSTM LM pretrained to step 12, resumed to 24 and evaluated; a
  bf16 sentiment_net fine-tuned on its tokenizer (from scratch: a 24-step LM's features do not
  speed up 20 steps of fine-tuning, in float32 either) and evaluated; one grafted from it.
  Losses fall, every checkpoint holds float32, and the resume restores the checkpointed optimizer
  state into the run's float32 template (jaxlm/checkpoint.py refuses to cast a leaf)."""
  def lm(max_steps):
    config = _small(tiny_config("lstm_lm", "full"), epochs=10)
    config.data.update(train_split="train", valid_fraction=0.1)
    config.train.update(max_steps=max_steps, eval_every_steps=12, checkpoint_every_steps=12)
    return config

  assert commands.pretrain(lm(12), tmp_path / "lm", progress=False)["steps"] == 12
  summary = commands.pretrain(lm(24), tmp_path / "lm", progress=False)
  assert summary["steps"] == 24
  losses = _train_losses(tmp_path / "lm")
  assert len(losses) == 24  # one row per step: the resume neither replayed nor skipped a step
  _assert_loss_falls(losses, ratio=0.85)  # from ln(V) = 5.3 to below 4.5
  assert summary["test_perplexity"] < summary["vocab_size"] / 2
  _assert_float32_checkpoint(tmp_path / "lm")
  out = commands.evaluate(tmp_path / "lm", split="test", which="latest")
  assert out["perplexity"] == pytest.approx(summary["test_perplexity"], rel=1e-4)

  clf = _small(tiny_config("sentiment_net"), epochs=5)
  ft = commands.finetune(clf, tmp_path / "clf", tokenizer_from=tmp_path / "lm", progress=False)
  _assert_loss_falls(_train_losses(tmp_path / "clf"), epochs=5)
  _assert_float32_checkpoint(tmp_path / "clf")
  out = commands.evaluate(tmp_path / "clf", split="test")
  assert out["accuracy"] == pytest.approx(ft["test_accuracy"])
  assert out["loss"] == pytest.approx(ft["test_loss"], rel=1e-4)

  clf.train.num_epochs = 1
  commands.finetune(clf, tmp_path / "graft", init_from=tmp_path / "lm", progress=False)
  report = json.loads((tmp_path / "graft" / "graft_report.json").read_text())
  copied = {leaf["path"]: leaf["dtype"] for leaf in report["copied"]}
  assert copied["encoder/layer_0/hh/kernel"] == copied["embed/embedding"] == "float32"
  _assert_float32_checkpoint(tmp_path / "graft")
