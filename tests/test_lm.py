"""Behaviour of LSTMLanguageModel and LSTMEncoder that the rest of jaxlm relies on.

Shapes under jit/eval_shape, tied weights, the cheap outputs agreeing with the full softmax at
eval, length awareness and carrying state across BPTT windows (stream-mode LM training).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm.models.lm import LSTMLanguageModel
from jaxlm.models.lstm import LSTMEncoder, LSTMLayer

B, T, V, E, H = 3, 8, 40, 12, 16


def _batch(seed=0, t=T):
  rng = np.random.RandomState(seed)
  return (jnp.asarray(rng.randint(0, V, (B, t)), jnp.int32),
          jnp.asarray(rng.randint(0, V, (B, t)), jnp.int32))


def _init(model, inputs, targets):
  return model.init(jax.random.key(0), inputs, targets)["params"]


@pytest.mark.parametrize("output,extra", [
    ("full", {}), ("sampled", {"num_sampled": 8}), ("adaptive", {"adaptive_cutoffs": (10, 25)})])
def test_shapes_under_jit_and_eval_shape(output, extra):
  model = LSTMLanguageModel(V, E, H, 2, dropout_embed=0.1, dropout_hidden=0.2,
                            dropout_output=0.3, weight_drop=0.2, output=output, **extra)
  inputs, targets = _batch()
  params = jax.eval_shape(lambda: _init(model, inputs, targets))
  assert params["embed"]["embedding"].shape == (V, E)
  assert params["encoder"]["layer_1"]["hh"]["kernel"].shape == (H, 4 * H)
  params = _init(model, inputs, targets)

  @jax.jit
  def train_apply(p, rng):
    return model.apply({"params": p}, inputs, targets, jnp.array([T, 5, 1]),
                       deterministic=False, rngs={"dropout": rng})

  nll, state = train_apply(params, jax.random.key(1))
  assert nll.shape == (B, T) and nll.dtype == jnp.float32
  assert np.all(np.isfinite(nll))
  assert len(state) == 2 and all(c.shape == h.shape == (B, H) for c, h in state)
  out = jax.eval_shape(lambda p: model.apply({"params": p}, inputs, method="logits"), params)
  assert out[0].shape == (B, T, V)


def test_tied_weights_share_the_embedding():
  inputs, targets = _batch()
  same = LSTMLanguageModel(V, E, E, 1, tie_weights=True)
  params = _init(same, inputs, targets)
  assert set(params["decoder"]) == {"bias"}
  logits, _ = same.apply({"params": params}, inputs, method="logits")
  h, _ = LSTMEncoder(1, E).apply({"params": params["encoder"]},
                                 params["embed"]["embedding"][inputs])
  expected = h @ params["embed"]["embedding"].T + params["decoder"]["bias"]
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
  # Gradient of the output flows into the embedding even for rows never used as inputs.
  unused = sorted(set(range(V)) - set(np.asarray(inputs).ravel().tolist()))
  grads = jax.grad(lambda p: same.apply({"params": p}, inputs, targets)[0].sum())(params)
  assert np.all(np.abs(np.asarray(grads["embed"]["embedding"])[unused]).sum(-1) > 0)

  proj = LSTMLanguageModel(V, E, H, 1, tie_weights=True)
  params = _init(proj, inputs, targets)
  assert params["decoder"]["proj"]["kernel"].shape == (H, E)
  assert "kernel" not in params["decoder"]


def test_sampled_softmax_eval_equals_full():
  inputs, targets = _batch()
  full = LSTMLanguageModel(V, E, H, 1)
  sampled = LSTMLanguageModel(V, E, H, 1, output="sampled", num_sampled=8)
  params = _init(full, inputs, targets)
  assert jax.tree.structure(params) == jax.tree.structure(_init(sampled, inputs, targets))
  nll_full, _ = full.apply({"params": params}, inputs, targets)
  nll_eval, _ = sampled.apply({"params": params}, inputs, targets)
  np.testing.assert_array_equal(nll_full, nll_eval)
  nll_train, _ = sampled.apply({"params": params}, inputs, targets, deterministic=False,
                               rngs={"dropout": jax.random.key(2)})
  # The sampled loss normalises over 1 + K candidates only, so it is a smaller, different number.
  assert np.all(np.isfinite(nll_train)) and not np.allclose(nll_train, nll_full)
  assert np.all(np.asarray(nll_train) >= 0)


def test_adaptive_softmax_is_normalised_and_exact():
  inputs, targets = _batch()
  model = LSTMLanguageModel(V, E, H, 1, output="adaptive", adaptive_cutoffs=(10, 25))
  params = _init(model, inputs, targets)
  logp, _ = model.apply({"params": params}, inputs, method="logits")
  np.testing.assert_allclose(jnp.exp(logp).sum(-1), 1.0, rtol=1e-5)
  nll, _ = model.apply({"params": params}, inputs, targets)
  expected = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(nll, expected, rtol=1e-5, atol=1e-6)
  # Train mode is the same exact likelihood (no dropout configured here).
  nll_train, _ = model.apply({"params": params}, inputs, targets, deterministic=False,
                             rngs={"dropout": jax.random.key(2)})
  np.testing.assert_allclose(nll_train, nll, rtol=1e-6)


@pytest.mark.parametrize("impl", ["fused", "scan"])
def test_padding_longer_does_not_change_real_tokens(impl):
  model = LSTMLanguageModel(V, E, H, 2, impl=impl)
  inputs, targets = _batch()
  lengths = jnp.array([T, 5, 2])
  params = _init(model, inputs, targets)
  nll, state = model.apply({"params": params}, inputs, targets, lengths)
  pad = jnp.full((B, 5), 1, jnp.int32)  # any ids: they lie past every length
  nll_long, state_long = model.apply({"params": params}, jnp.concatenate([inputs, pad], 1),
                                     jnp.concatenate([targets, pad], 1), lengths)
  np.testing.assert_allclose(nll_long[:, :T], nll, rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(nll_long[:, T:]) == 0)
  assert np.all(np.asarray(nll)[1, 5:] == 0) and np.all(np.asarray(nll)[2, 2:] == 0)
  for (c, h), (c2, h2) in zip(state, state_long):
    np.testing.assert_allclose(c2, c, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(h2, h, rtol=1e-6, atol=1e-7)
  # A row alone with its own length gives the same numbers as inside the padded batch.
  row, _ = model.apply({"params": params}, inputs[1:2, :5], targets[1:2, :5])
  np.testing.assert_allclose(row[0], nll[1, :5], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["fused", "scan"])
def test_initial_state_carries_across_windows(impl):
  model = LSTMLanguageModel(V, E, H, 2, impl=impl)
  inputs, targets = _batch(t=2 * T)
  params = _init(model, inputs, targets)
  whole, state_whole = model.apply({"params": params}, inputs, targets)
  first, state = model.apply({"params": params}, inputs[:, :T], targets[:, :T])
  second, state2 = model.apply({"params": params}, inputs[:, T:], targets[:, T:],
                               initial_state=state)
  np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole, rtol=1e-5, atol=1e-6)
  for (c, h), (c2, h2) in zip(state_whole, state2):
    np.testing.assert_allclose(c2, c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h2, h, rtol=1e-5, atol=1e-6)


def test_fused_and_scan_agree_with_weight_drop_and_reverse():
  """Both recurrences give the same outputs and gradients, with every option switched on."""
  x = jnp.asarray(np.random.RandomState(0).randn(B, T, E), jnp.float32)
  lengths = jnp.array([T, 3, 6])
  state0 = (jnp.full((B, H), 0.1), jnp.full((B, H), -0.2))
  results = []
  for impl in ("fused", "scan"):
    layer = LSTMLayer(H, reverse=True, impl=impl, weight_drop=0.3)
    params = layer.init(jax.random.key(0), x)["params"]

    def loss(p, x):
      y, (c, h) = layer.apply({"params": p}, x, lengths, initial_state=state0,
                              deterministic=False, rngs={"dropout": jax.random.key(5)})
      return jnp.sum(jnp.sin(y)) + jnp.sum(c * h), y

    (_, y), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    results.append((y, g))
  (y0, g0), (y1, g1) = results
  np.testing.assert_allclose(y0, y1, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_dropout_is_variational_and_deterministic_flag_works():
  model = LSTMLanguageModel(V, E, H, 2, dropout_embed=0.5, dropout_hidden=0.5,
                            dropout_output=0.5, weight_drop=0.5, dropout_words=0.1)
  inputs, targets = _batch()
  params = _init(model, inputs, targets)
  a, _ = model.apply({"params": params}, inputs, targets)
  b, _ = model.apply({"params": params}, inputs, targets)
  np.testing.assert_array_equal(a, b)
  c, _ = model.apply({"params": params}, inputs, targets, deterministic=False,
                     rngs={"dropout": jax.random.key(1)})
  d, _ = model.apply({"params": params}, inputs, targets, deterministic=False,
                     rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(c, d)
  assert not np.allclose(a, c)
  with pytest.raises(Exception):  # no 'dropout' rng in train mode
    model.apply({"params": params}, inputs, targets, deterministic=False)


@pytest.mark.parametrize("tail_share", [0.03, 0.9], ids=["gathered", "dense_fallback"])
def test_adaptive_gathered_tails_are_exact_in_value_and_gradient(tail_share):
  """Tail terms run on gathered rows when the members fit the capacity, densely otherwise;
  both must equal the reference -log p(target) from the full log-probs, gradients included."""
  from jaxlm.models.lm import AdaptiveSoftmax, _tail_capacity
  vocab, hidden, rows, cutoffs = 200, 16, 512, (50, 120)
  rng = np.random.RandomState(0)
  h = jnp.asarray(rng.randn(rows, hidden), jnp.float32)
  in_tail = rng.rand(rows) < tail_share
  targets = jnp.asarray(np.where(in_tail, rng.randint(50, vocab, rows), rng.randint(0, 50, rows)))
  members = int(np.sum(np.asarray(targets) >= 50))
  capacity = _tail_capacity(rows, 50, 120, vocab) + _tail_capacity(rows, 120, vocab, vocab)
  assert (members < capacity / 2) if tail_share < 0.5 else (members > capacity)
  model = AdaptiveSoftmax(vocab, hidden, cutoffs)
  params = model.init(jax.random.key(0), h, targets, method=model.nll)["params"]

  def loss(p, x):
    return jnp.sum(model.apply({"params": p}, x, targets, method=model.nll))

  def reference(p, x):
    logp = model.apply({"params": p}, x, method=model.log_probs)
    return -jnp.sum(jnp.take_along_axis(logp, targets[:, None], -1))

  np.testing.assert_allclose(jax.jit(loss)(params, h), reference(params, h), rtol=1e-5)
  got, want = jax.grad(loss, (0, 1))(params, h), jax.grad(reference, (0, 1))(params, h)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def _zipf_markov_corpus(vocab, n, seed=0):
  """Token ids of a Markov chain whose ids are frequency-ordered like a word vocabulary: each
  word has 3 Zipf-drawn successors, and 10% of the time a Zipf-drawn word comes next."""
  rng = np.random.RandomState(seed)

  def zipf(size):
    u = rng.uniform(size=size)
    return np.clip(np.floor(np.exp(u * np.log(vocab + 1.0))).astype(np.int64) - 1, 0, vocab - 1)

  successors = zipf(vocab * 3).reshape(vocab, 3)
  ids = np.empty(n, np.int64)
  ids[0] = 0
  jumps, picks, noise = rng.rand(n), rng.randint(3, size=n), zipf(n)
  for i in range(1, n):
    ids[i] = noise[i] if jumps[i] < 0.1 else successors[ids[i - 1], picks[i]]
  return ids


def test_sampled_softmax_starts_at_its_proposal():
  """At init every log-Q-corrected candidate logit is ~0, so the sampled loss is ~log(1 + K)."""
  vocab, k = 400, 64
  ids = _zipf_markov_corpus(vocab, 2000)
  x, y = (jnp.asarray(ids[o:o + 512].reshape(16, 32)) for o in (0, 1))
  model = LSTMLanguageModel(vocab, 32, 32, 1, output="sampled", num_sampled=k)
  params = _init(model, x, y)
  nll, _ = model.apply({"params": params}, x, y, deterministic=False,
                       rngs={"dropout": jax.random.key(3)})
  # Accidental hits leave fewer than K negatives for frequent targets, hence the lower bound.
  assert np.log(k + 1) - 0.15 < float(jnp.mean(nll)) < np.log(k + 1) + 0.05


def test_sampled_softmax_training_nearly_matches_full_softmax():
  """Trained with the sampled loss, the full-softmax held-out NLL gets within 0.25 nats of the
  same model trained with the full softmax (a zero-initialised output bias misses by ~0.5)."""
  vocab, batch, steps = 400, (16, 32), 200
  ids = _zipf_markov_corpus(vocab, 60_000)
  n = batch[0] * batch[1]

  def window(offset):
    return (jnp.asarray(ids[offset:offset + n].reshape(batch)),
            jnp.asarray(ids[offset + 1:offset + 1 + n].reshape(batch)))

  held_out = [window(50_000 + j * n) for j in range(8)]
  counts = np.bincount(ids[:50_000], minlength=vocab) + 1.0
  unigram = float(np.mean([-np.log(counts / counts.sum())[np.asarray(y)].mean()
                           for _, y in held_out]))
  results = {}
  for output in ("sampled", "full"):
    model = LSTMLanguageModel(vocab, 32, 32, 1, output=output, num_sampled=64)
    params = _init(model, *window(0))
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(p, o, x, y, key, model=model, tx=tx):
      loss = lambda p: model.apply({"params": p}, x, y, deterministic=False,
                                   rngs={"dropout": key})[0].mean()
      updates, o = tx.update(jax.grad(loss)(p), o, p)
      return optax.apply_updates(p, updates), o

    for s in range(steps):
      params, opt_state = step(params, opt_state, *window((s * n) % 48_000), jax.random.key(s))
    evaluate = jax.jit(lambda p, x, y, model=model: model.apply({"params": p}, x, y)[0].mean())
    results[output] = float(np.mean([evaluate(params, x, y) for x, y in held_out]))
  assert results["full"] < unigram - 1.5  # the chain is learnable
  assert results["sampled"] < results["full"] + 0.25, results


@pytest.mark.parametrize("output,extra,rows", [
    ("full", {}, 8), ("full", {"tie_weights": True}, 8), ("sampled", {"num_sampled": 8}, 8),
    ("adaptive", {"adaptive_cutoffs": (10, 25)}, 8),     # every tail chunk on its dense path
    ("adaptive", {"adaptive_cutoffs": (10, 25)}, 64)],   # capacity < rows: gathered tails
    ids=["full", "tied", "sampled", "adaptive_dense", "adaptive_gathered"])
def test_chunked_exact_nll_equals_unchunked_in_value_and_gradient(output, extra, rows):
  """The exact (eval) NLL runs over row chunks of the flattened hidden states; it must equal the
  unchunked softmax, gradients included (the chunks are rematerialised under autodiff), with a
  last chunk that is only partly filled and rows past their lengths."""
  from jaxlm.models.lm import chunk_rows
  inputs, targets = _batch(t=T + 1) if rows == 8 else (  # 27 rows; 24 x 25 = 600 rows
      jnp.tile(a, (8, 1)) for a in _batch(t=25))
  lengths = jnp.asarray([inputs.shape[1]] + [5] * (inputs.shape[0] - 1))
  kind = dict(output=output, **extra)
  reference = LSTMLanguageModel(V, E, H, 1, eval_chunk_bytes=0, **kind)
  width = 15 if output == "adaptive" else V  # adaptive: max(head 10 + 2, tails 15 and 15)
  chunked = LSTMLanguageModel(V, E, H, 1, eval_chunk_bytes=rows * 4 * width, **kind)
  assert chunk_rows(chunked.eval_chunk_bytes, width, 10**6) == rows
  assert inputs.size % rows != 0
  params = _init(reference, inputs, targets)

  def loss(model):
    return lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, inputs, targets, lengths)[0]))

  want, want_grad = jax.value_and_grad(loss(reference))(params)
  got, got_grad = jax.jit(jax.value_and_grad(loss(chunked)))(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  nll_ref, _ = reference.apply({"params": params}, inputs, targets, lengths)
  nll, _ = chunked.apply({"params": params}, inputs, targets, lengths)
  np.testing.assert_allclose(nll, nll_ref, rtol=1e-5, atol=1e-6)
  for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_chunked_eval_bounds_the_compiled_temporaries():
  """What the chunks are for: the eval step's XLA temporaries no longer grow with [N, V]
  (unchunked, the IMDB LM's eval step held 1.25 GB of logits; BENCHMARKS.md)."""
  from jaxlm.models.lm import EVAL_CHUNK_BYTES, chunk_rows
  assert chunk_rows(EVAL_CHUNK_BYTES, 20_004, 64 * 128) == 128  # the IMDB LM: 10 MB chunks
  assert chunk_rows(0, 20_004, 64 * 128) == 64 * 128
  vocab, rows = 4096, 8 * 64                                     # unchunked: 8 MB of logits
  inputs = jnp.asarray(np.random.RandomState(0).randint(0, vocab, (8, 64)), jnp.int32)
  temps = {}
  for budget in (0, 2**18):
    model = LSTMLanguageModel(vocab, 16, 16, 1, eval_chunk_bytes=budget)
    params = _init(model, inputs, inputs)
    nll = lambda p, model=model: jnp.sum(model.apply({"params": p}, inputs, inputs)[0])
    temps[budget] = [jax.jit(f).lower(params).compile().memory_analysis().temp_size_in_bytes
                     for f in (nll, jax.grad(nll))]
  logits_bytes = 4 * rows * vocab
  assert all(t >= logits_bytes for t in temps[0]), temps
  assert all(t < logits_bytes / 4 for t in temps[2**18]), temps


def test_adaptive_dense_fallback_chunks_are_exact(monkeypatch):
  """The dense fallback of a tail (every row through it) also runs in row chunks, in training
  too; chunked and whole must agree in value and gradient."""
  from jaxlm.models import lm
  rng = np.random.RandomState(0)
  rows, hidden, dim, size = 100, 16, 4, 30
  h = jnp.asarray(rng.randn(rows, hidden), jnp.float32)
  weights = tuple(jnp.asarray(rng.randn(*s) * 0.3, jnp.float32)
                  for s in ((hidden, dim), (dim, size), (size,)))
  local = jnp.asarray(rng.randint(0, size, rows))
  member = jnp.asarray(rng.rand(rows) < 0.5)

  def loss(w, x):
    return jnp.sum(jnp.sin(lm._dense_tail_term(w, x, local, member)))

  want, want_grad = jax.value_and_grad(loss, (0, 1))(weights, h)
  monkeypatch.setattr(lm, "EVAL_CHUNK_BYTES", 16 * 4 * size)  # 16-row chunks, a partial last one
  assert lm.chunk_rows(lm.EVAL_CHUNK_BYTES, size, rows) == 16
  got, got_grad = jax.jit(jax.value_and_grad(loss, (0, 1)))(weights, h)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
