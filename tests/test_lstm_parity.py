"""Numerical parity of jaxlm's LSTM stack with PyTorch (`nn.LSTM`, `nn.Embedding`, `nn.Linear`).

Why float64 for the 1e-5 bound: float32 runs of two different implementations (different matmul
blocking and summation order) agree only to ~1e-6..1e-5 in outputs and somewhat worse in
gradients through long recurrences, so the strict relative bound 1e-5 is checked in float64 in
both frameworks, and float32 is checked separately with a looser bound (1e-4) so that the dtype
we actually train in is covered too. Padded batches are compared against pack_padded_sequence:
final states at each row's last valid step, outputs zero past the length.

torch is a test/benchmark extra that CI installs; `importorskip` is only a guard.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxlm import interop, models  # noqa: E402
from jaxlm.models.lm import LSTMLanguageModel, perplexity  # noqa: E402
from jaxlm.models.lstm import LSTMEncoder  # noqa: E402

LSTM = models.FAMILIES["lstm"]  # its torch names: the converter `jaxlm export` uses

B, T, E, H, V = 3, 9, 5, 6, 17
LENGTHS = np.array([9, 4, 6], np.int64)


@pytest.fixture
def x64():
  """float64 only inside the test that asks for it: other tests keep jax's float32 default."""
  with jax.enable_x64(True):
    yield


def rel_err(a, b):
  """max |a - b| / max |b|: a relative error that does not blow up on entries near zero."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def torch_lstm_from(params, num_layers, bidirectional, dtype):
  """nn.LSTM holding the encoder's weights, copied by the library's converter (jaxlm/interop.py:
  kernels transposed, a bidirectional layer's `bwd` into the `_reverse` weights)."""
  lstm = torch.nn.LSTM(E, H, num_layers, batch_first=True, bidirectional=bidirectional)
  lstm = lstm.to(dtype)
  interop.load_into_torch(torch.nn.ModuleDict({"lstm": lstm}),
                          interop.to_torch({"encoder": params}, LSTM))
  return lstm


def torch_grads_as_jax_tree(lstm, template):
  """PyTorch's weight gradients rearranged into jaxlm's param tree by the library's converter."""
  grads = {f"lstm.{name}": p.grad.numpy() for name, p in lstm.named_parameters()}
  return interop.from_torch(grads, {"encoder": template}, LSTM)["encoder"]


def _loss_weights(shape, seed):
  return np.random.RandomState(seed).randn(*shape)


def run_encoder_case(num_layers, bidirectional, padded, impl, dtype, tol):
  jdtype = jnp.float64 if dtype == "float64" else jnp.float32
  tdtype = torch.float64 if dtype == "float64" else torch.float32
  rng = np.random.RandomState(0)
  x = rng.randn(B, T, E).astype(dtype)
  lengths = LENGTHS if padded else None
  enc = LSTMEncoder(num_layers, H, bidirectional=bidirectional, impl=impl, param_dtype=jdtype)
  params = enc.init(jax.random.key(1), jnp.asarray(x))["params"]
  dirs = 2 if bidirectional else 1
  w_out = _loss_weights((B, T, H * dirs), 2).astype(dtype)
  w_h = _loss_weights((B, H * dirs), 3).astype(dtype)
  w_c = _loss_weights((B, H * dirs), 4).astype(dtype)

  # PyTorch reference.
  lstm = torch_lstm_from(params, num_layers, bidirectional, tdtype)
  xt = torch.tensor(x, requires_grad=True)
  if padded:
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        xt, torch.tensor(LENGTHS), batch_first=True, enforce_sorted=False)
    out, (hn, cn) = lstm(packed)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
  else:
    out, (hn, cn) = lstm(xt)
  # torch: [layers*dirs, B, H] -> per layer [B, H*dirs] (directions concatenated, fwd first).
  hn_l = hn.reshape(num_layers, dirs, B, H).permute(0, 2, 1, 3).reshape(num_layers, B, H * dirs)
  cn_l = cn.reshape(num_layers, dirs, B, H).permute(0, 2, 1, 3).reshape(num_layers, B, H * dirs)
  t_loss = ((out * torch.tensor(w_out)).sum() + (hn_l[-1] * torch.tensor(w_h)).sum()
            + (cn_l[0] * torch.tensor(w_c)).sum())
  t_loss.backward()

  # jaxlm.
  def loss(p, xj):
    y, state = enc.apply({"params": p}, xj, None if lengths is None else jnp.asarray(lengths))
    return (jnp.sum(y * w_out) + jnp.sum(state[-1][1] * w_h) + jnp.sum(state[0][0] * w_c),
            (y, state))

  (j_loss, (y, state)), (g_params, g_x) = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True)(params, jnp.asarray(x))

  assert y.dtype == jdtype
  assert rel_err(y, out.detach().numpy()) <= tol
  if padded:
    for b, n in enumerate(LENGTHS):
      assert np.all(np.asarray(y)[b, n:] == 0.0)
  for i in range(num_layers):
    c, h = state[i]
    assert rel_err(h, hn_l[i].detach().numpy()) <= tol
    assert rel_err(c, cn_l[i].detach().numpy()) <= tol
  assert rel_err(j_loss, t_loss.item()) <= tol
  assert rel_err(g_x, xt.grad.numpy()) <= tol
  t_grads = torch_grads_as_jax_tree(lstm, params)
  flat_j = jax.tree_util.tree_leaves_with_path(g_params)
  flat_t = dict(jax.tree_util.tree_leaves_with_path(t_grads))
  assert len(flat_j) == len(flat_t) == num_layers * dirs * 4
  for path, g in flat_j:
    err = rel_err(g, flat_t[path])
    assert err <= tol, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"


CASES = [(n, bi, padded) for n in (1, 2) for bi in (False, True) for padded in (False, True)]


@pytest.mark.parametrize("num_layers,bidirectional,padded", CASES)
def test_encoder_matches_torch_float64(x64, num_layers, bidirectional, padded):
  run_encoder_case(num_layers, bidirectional, padded, "fused", "float64", 1e-5)


@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
def test_scan_impl_matches_torch_float64(x64, num_layers, bidirectional):
  """The nn.scan reference path, on padded batches (its masked branch is the one that differs)."""
  run_encoder_case(num_layers, bidirectional, True, "scan", "float64", 1e-5)


@pytest.mark.parametrize("num_layers,bidirectional,padded", [(1, False, False), (2, True, True)])
def test_encoder_matches_torch_float32(num_layers, bidirectional, padded):
  run_encoder_case(num_layers, bidirectional, padded, "fused", "float32", 1e-4)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_language_model_matches_torch_float64(x64, num_layers, tie):
  """Embedding + LSTM + Linear (optionally tied) vs the same PyTorch model, padded batch."""
  hidden = E if tie else H
  rng = np.random.RandomState(0)
  inputs = rng.randint(0, V, (B, T))
  targets = rng.randint(0, V, (B, T))
  model = LSTMLanguageModel(V, E, hidden, num_layers, tie_weights=tie, param_dtype=jnp.float64)
  params = model.init(jax.random.key(0), jnp.asarray(inputs), jnp.asarray(targets))["params"]

  # PyTorch model with the same weights.
  emb = torch.nn.Embedding(V, E).double()
  lstm = torch.nn.LSTM(E, hidden, num_layers, batch_first=True).double()
  lin = torch.nn.Linear(hidden, V).double()
  if tie:
    lin.weight = emb.weight
  interop.load_into_torch(torch.nn.ModuleDict({"embedding": emb, "lstm": lstm, "decoder": lin}),
                          interop.to_torch(params, LSTM))  # tied: decoder.weight is the embedding
  packed = torch.nn.utils.rnn.pack_padded_sequence(
      emb(torch.tensor(inputs)), torch.tensor(LENGTHS), batch_first=True, enforce_sorted=False)
  out, (hn, cn) = lstm(packed)
  out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
  t_nll = torch.nn.functional.cross_entropy(
      lin(out).reshape(B * T, V), torch.tensor(targets).reshape(-1), reduction="none").reshape(B, T)
  valid = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
  t_nll = torch.where(valid, t_nll, torch.zeros_like(t_nll))
  t_nll.sum().backward()

  def loss(p):
    nll, state = model.apply({"params": p}, jnp.asarray(inputs), jnp.asarray(targets),
                             jnp.asarray(LENGTHS))
    return jnp.sum(nll), (nll, state)

  (_, (nll, state)), grads = jax.value_and_grad(loss, has_aux=True)(params)
  assert nll.dtype == jnp.float32  # the contract: nll is float32 even in a float64 model
  assert rel_err(nll, t_nll.detach().numpy()) <= 1e-5
  assert rel_err(state[-1][1], hn[-1].detach().numpy()) <= 1e-5
  assert rel_err(state[-1][0], cn[-1].detach().numpy()) <= 1e-5

  # The float32 nll cast limits nothing here: gradients flow in float64.
  expected = {"embed": emb.weight.grad.numpy(), "decoder_bias": lin.bias.grad.numpy()}
  if not tie:
    expected["decoder_kernel"] = lin.weight.grad.numpy().T
  assert rel_err(grads["embed"]["embedding"], expected["embed"]) <= 1e-5
  assert rel_err(grads["decoder"]["bias"], expected["decoder_bias"]) <= 1e-5
  if not tie:
    assert rel_err(grads["decoder"]["kernel"], expected["decoder_kernel"]) <= 1e-5
  for i in range(num_layers):
    g = grads["encoder"][f"layer_{i}"]
    assert rel_err(g["ih"]["kernel"], getattr(lstm, f"weight_ih_l{i}").grad.numpy().T) <= 1e-5
    assert rel_err(g["hh"]["kernel"], getattr(lstm, f"weight_hh_l{i}").grad.numpy().T) <= 1e-5
    assert rel_err(g["ih"]["bias"], getattr(lstm, f"bias_ih_l{i}").grad.numpy()) <= 1e-5
    assert rel_err(g["hh"]["bias"], getattr(lstm, f"bias_hh_l{i}").grad.numpy()) <= 1e-5


def test_perplexity_by_hand_with_padding():
  """ppl = exp(sum(nll * weights) / sum(weights)); padding carries weight 0 and must not count."""
  model = LSTMLanguageModel(V, E, H, 1)
  rng = np.random.RandomState(3)
  inputs = jnp.asarray(rng.randint(0, V, (B, T)))
  targets = jnp.asarray(rng.randint(0, V, (B, T)))
  lengths = jnp.asarray(LENGTHS)
  params = model.init(jax.random.key(0), inputs, targets)["params"]
  nll, _ = model.apply({"params": params}, inputs, targets, lengths)
  logits, _ = model.apply({"params": params}, inputs, lengths, method="logits")
  weights = (np.arange(T)[None, :] < LENGTHS[:, None]).astype(np.float32)

  # By hand, in numpy float64: log-softmax of the logits, real tokens only.
  lg = np.asarray(logits, np.float64)
  logp = lg - lg.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  tok_nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  expected = np.exp((tok_nll * weights).sum() / weights.sum())

  got = perplexity(np.sum(np.asarray(nll, np.float64) * weights), weights.sum())
  assert got == pytest.approx(expected, rel=1e-5)
  with pytest.raises(ValueError):
    perplexity(1.0, 0)
