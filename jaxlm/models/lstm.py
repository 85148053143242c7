"""LSTM layers parameterised exactly like PyTorch's `nn.LSTM`.

Why this layout: pretrained weights, parity tests and benchmarks all compare against PyTorch, so a
layer holds `ih/{kernel [in,4H], bias [4H]}` (= `weight_ih.T`, `bias_ih`) and
`hh/{kernel [H,4H], bias [4H]}` (= `weight_hh.T`, `bias_hh`), gate order i, f, g, o.

Why it is fast on CPU:
- The input projection of all time steps is one large matmul outside the recurrence (both biases
  are folded into it); only `h @ W_hh` and the gate nonlinearities run step by step.
- `impl='fused'` (default) runs the recurrence with a `jax.custom_vjp`: its backward is one reverse
  `lax.scan` that only produces the gate gradients and the recurrent `dh`, and `dW_hh` is computed
  as one einsum over all steps afterwards. Autodiff of a scan instead accumulates `dW_hh` inside the
  loop, one small matmul per step: a seed-003 train step measured 0.62-0.73 s that way and
  0.54 s fused, on this CPU.
- On CPU, in float32 (a bf16 layer's too, upcast: see Mixed precision), the fused recurrence's
  two loops run in `jaxlm.kernels` (a C++ XLA FFI kernel: per step one BLAS sgemm over the rows
  inside their length and one vectorised gate pass, split over XLA's threads) instead of as
  `lax.scan`s, whose small per-step operations XLA:CPU runs one by one. Same residuals, same
  gradients (tested against the scans); `lax.platform_dependent` keeps the scans for GPU and TPU,
  so one jitted function serves all three.
- `impl='scan'` is the plain `flax.linen.scan` recurrence (weights broadcast, scanned over time),
  differentiated by autodiff. It is the reference the fused path is tested against and what the
  design card describes; both give the same numbers.

Length awareness: given `lengths [B]`, a row's carry stops updating after its last valid step, so
the final state is the state at the last valid step (like PyTorch packed sequences, in both
directions), and outputs past a row's length are exactly 0. A reverse layer therefore starts at
step `length-1` of each row, like a packed bidirectional PyTorch LSTM.

States are `(c, h)` tuples, each `[B, H]` (flax's LSTMCell convention).

Mixed precision (`dtype=jnp.bfloat16`, params float32): the input projection (the larger matmul,
`[T*B, E] x [E, 4H]`) and the layer's outputs are bf16 on every platform. The recurrence follows
the impl: `scan` computes it in bf16 everywhere, and so does `fused` on GPU/TPU; on CPU the fused
recurrence runs in the kernel, which is float32-only, so there it is upcast (the float32 W_hh,
the bf16 projections and state) and its outputs cast back to bf16. Why not a bf16 XLA scan on
CPU: it is the slow path the kernel replaced, and CPUs without bf16 instructions (most) gain
nothing from bf16 arithmetic; the memory a bf16 run saves elsewhere (embeddings, outputs,
softmax inputs) it still saves.
"""
import functools
import math
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import kernels

Array = jax.Array
State = Tuple[Array, Array]  # (c, h)

IMPLS = ("fused", "scan")


def torch_uniform(hidden_size: int) -> Callable:
  """PyTorch's LSTM init, U(-1/sqrt(H), 1/sqrt(H)) for every weight and bias.

  Why: a model trained with the same init as the PyTorch reference behaves the same early on,
  which makes side-by-side training curves comparable.
  """
  bound = 1.0 / math.sqrt(hidden_size)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class _Affine(nn.Module):
  """Holds `kernel [in, features]` and `bias [features]` (nn.Dense's names) and returns them.

  Why not nn.Dense: the layer needs the raw weights (to fold biases, apply weight drop, and hand
  W_hh to the fused recurrence), while keeping the same parameter paths as nn.Dense.
  """
  features: int
  init_fn: Callable
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, in_features: int) -> Tuple[Array, Array]:
    kernel = self.param("kernel", self.init_fn, (in_features, self.features), self.param_dtype)
    bias = self.param("bias", self.init_fn, (self.features,), self.param_dtype)
    return kernel, bias


def _gate_scale(hidden: int, dtype) -> np.ndarray:
  """0.5 on the sigmoid gates (i, f, o), 1 on the tanh gate (g)."""
  half = np.full((hidden,), 0.5)
  return np.concatenate([half, half, np.ones((hidden,)), half]).astype(dtype)


def _cell(z: Array, c_prev: Array):
  """Gate nonlinearities for pre-activations `z [B,4H]` (i, f, g, o).

  One tanh over all four gates, using sigmoid(x) = 0.5 * tanh(0.5 * x) + 0.5 (an exact identity):
  XLA:CPU's logistic is not vectorised like its tanh, and the gate math alone took ~6x longer
  with three sigmoids and a tanh (76 ms vs 13 ms for 256 steps of [64, 1024], this machine).
  Returns (activations [B,4H] = sigmoid(i), sigmoid(f), tanh(g), sigmoid(o); c; tanh(c); h).
  """
  scale = _gate_scale(c_prev.shape[-1], np.float32)
  # jnp constants in z's dtype: numpy's `1.0 - bfloat16 array` would promote to float32.
  s, shift = jnp.asarray(scale, z.dtype), jnp.asarray(1.0 - scale, z.dtype)
  a = jnp.tanh(z * s) * s + shift
  i, f, g, o = jnp.split(a, 4, axis=-1)
  c = f * c_prev + i * g
  tc = jnp.tanh(c)
  return a, c, tc, o * tc


def _step(w_hh: Array, carry: State, xz: Array, m: Optional[Array]):
  """One recurrent step: returns the new carry and this step's output.

  Masked rows (`m` False) keep their carry and output 0.
  """
  c, h = carry
  z = xz + jnp.dot(h, w_hh)
  _, c_new, _, h_new = _cell(z, c)
  if m is None:
    return (c_new, h_new), h_new
  mm = m[:, None]
  return ((jnp.where(mm, c_new, c), jnp.where(mm, h_new, h)),
          jnp.where(mm, h_new, jnp.zeros_like(h_new)))


def _recurrence_plain(xz, mask, w_hh, c0, h0, reverse):
  xs = (xz, mask)

  def body(carry, x):
    return _step(w_hh, carry, x[0], x[1])

  (c, h), ys = jax.lax.scan(body, (c0, h0), xs, reverse=reverse)
  return ys, c, h


def _scan_forward(xz, mask, w_hh, c0, h0, reverse):
  """The XLA forward of the fused recurrence: outputs and the residuals its backward needs."""
  def body(carry, x):
    c, h = carry
    xz_t, m = x
    z = xz_t + jnp.dot(h, w_hh)
    acts, c_new, tc, h_new = _cell(z, c)
    res = (h, c, acts, tc)  # h_prev, c_prev, gate activations, tanh(c_new)
    if m is None:
      return (c_new, h_new), (h_new, res)
    mm = m[:, None]
    new = (jnp.where(mm, c_new, c), jnp.where(mm, h_new, h))
    return new, (jnp.where(mm, h_new, jnp.zeros_like(h_new)), res)

  (c, h), (ys, res) = jax.lax.scan(body, (c0, h0), (xz, mask), reverse=reverse)
  return (ys, c, h), res


def _scan_backward(w_hh, mask, c_prev, acts, tcs, dys, dc_last, dh_last, reverse):
  """The XLA backward: gate pre-activation gradients `dz [T,B,4H]`, `dc0`, `dh0`."""
  w_t = w_hh.T

  def body(carry, x):
    dc, dh = carry
    dy, cp, act, tc, m = x
    i, f, g, o = jnp.split(act, 4, axis=-1)
    if m is None:
      dhn = dh + dy
      dcn = dc
    else:
      mm = m[:, None]
      zero = jnp.zeros_like(dh)
      dhn = jnp.where(mm, dh + dy, zero)
      dcn = jnp.where(mm, dc, zero)
    do = dhn * tc
    dcn = dcn + dhn * o * (1.0 - tc * tc)
    dz = jnp.concatenate([
        dcn * g * i * (1.0 - i),
        dcn * cp * f * (1.0 - f),
        dcn * i * (1.0 - g * g),
        do * o * (1.0 - o),
    ], axis=-1)
    dc_prev = dcn * f
    dh_prev = jnp.dot(dz, w_t)
    if m is not None:
      # A masked step passed its carry through unchanged; so does its gradient.
      dc_prev = jnp.where(mm, dc_prev, dc)
      dh_prev = jnp.where(mm, dh_prev, dh)
    return (dc_prev, dh_prev), dz

  (dc0, dh0), dzs = jax.lax.scan(
      body, (dc_last, dh_last), (dys, c_prev, acts, tcs, mask), reverse=not reverse)
  return dzs, dc0, dh0


# Compute dtypes the CPU kernel serves. It computes in float32 only: a bfloat16 or float16
# recurrence is upcast to it on CPU (see _fused_recurrence).
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _use_kernel(dtype) -> bool:
  """The CPU kernel serves float32 and, upcast, bf16/f16; float64, or a machine where it cannot
  build, uses XLA."""
  return jnp.dtype(dtype) in KERNEL_DTYPES and kernels.available()


def _kernel_on_cpu(dtype, kernel_fn, scan_fn):
  """`kernel_fn()` where this runs on CPU and the kernel applies, else `scan_fn()`; the choice
  between CPU and GPU/TPU is made per device inside the jitted function."""
  if not _use_kernel(dtype):
    return scan_fn()
  return jax.lax.platform_dependent(cpu=kernel_fn, default=scan_fn)


def _float_mask(mask, xz):
  if mask is None:
    return jnp.ones(xz.shape[:2], jnp.float32)
  return mask.astype(jnp.float32)


def _f32(*arrays):
  return tuple(a.astype(jnp.float32) for a in arrays)


@functools.lru_cache(maxsize=None)
def _fused_recurrence(reverse: bool):
  """Builds the custom-VJP recurrence for one direction.

  Signature: `(xz [T,B,4H], mask [T,B] bool | None, w_hh [H,4H], c0, h0) -> (ys [T,B,H], c, h)`;
  `xz` already contains both biases. Time-major because scan iterates over axis 0. On CPU the
  forward and backward loops run in the `jaxlm.kernels` kernel, elsewhere as `lax.scan`s; both
  compute the same residuals and gradients, and `lax.platform_dependent` picks per device, so one
  jitted function serves CPU, GPU and TPU.

  Dtypes: the scans compute in `xz.dtype` (the layer's compute dtype; `w_hh` arrives in its
  param dtype and is cast). The kernel is float32-only, so with a bfloat16 `xz` the CPU branch
  upcasts `xz`, `w_hh` (the float32 param itself) and the state, runs the recurrence and its
  backward in float32, and casts the outputs (and the cotangents of `xz` and the state) back to
  `xz.dtype`. The two branches of the platform switch must return one type, so whenever the
  kernel is in play the residuals are float32 on every platform (a GPU/TPU bf16 run then keeps
  its LSTM residuals at float32 size); `dW_hh` is accumulated in float32 too.
  """

  @jax.custom_vjp
  def recurrence(xz, mask, w_hh, c0, h0):
    dt = xz.dtype

    def kernel():
      outs = kernels.forward(*_f32(xz), _float_mask(mask, xz), *_f32(w_hh, c0, h0),
                             reverse=reverse, save_residuals=False)
      return tuple(o.astype(dt) for o in outs)

    return _kernel_on_cpu(
        dt, kernel, lambda: _recurrence_plain(xz, mask, w_hh.astype(dt), c0, h0, reverse))

  def fwd(xz, mask, w_hh, c0, h0):
    dt = xz.dtype
    res_dtype = jnp.float32 if _use_kernel(dt) else dt

    def kernel():
      ys, c, h, *res = kernels.forward(*_f32(xz), _float_mask(mask, xz), *_f32(w_hh, c0, h0),
                                       reverse=reverse, save_residuals=True)
      return (ys.astype(dt), c.astype(dt), h.astype(dt)), tuple(res)

    def scan():
      outs, res = _scan_forward(xz, mask, w_hh.astype(dt), c0, h0, reverse)
      return outs, tuple(r.astype(res_dtype) for r in res)

    outs, res = _kernel_on_cpu(dt, kernel, scan)
    return outs, (w_hh, mask, res)

  def bwd(saved, cts):
    w_hh, mask, (h_prev, c_prev, acts, tcs) = saved
    dys, dc_last, dh_last = cts
    dt, res_dtype = dys.dtype, acts.dtype

    def kernel():
      return tuple(kernels.backward(*_f32(w_hh), _float_mask(mask, acts), c_prev, acts, tcs,
                                    *_f32(dys, dc_last, dh_last), reverse=reverse))

    def scan():
      out = _scan_backward(w_hh.astype(dt), mask, c_prev.astype(dt), acts.astype(dt),
                           tcs.astype(dt), dys, dc_last, dh_last, reverse)
      return tuple(o.astype(res_dtype) for o in out)

    dzs, dc0, dh0 = _kernel_on_cpu(dt, kernel, scan)
    # The weight gradient of every step at once: one [H, T*B] x [T*B, 4H] matmul.
    hdim, gdim = h_prev.shape[-1], dzs.shape[-1]
    dw = jnp.dot(h_prev.reshape(-1, hdim).T, dzs.reshape(-1, gdim))
    dmask = None if mask is None else np.zeros(mask.shape, dtype=jax.dtypes.float0)
    return dzs.astype(dt), dmask, dw.astype(w_hh.dtype), dc0.astype(dt), dh0.astype(dt)

  recurrence.defvjp(fwd, bwd)
  return recurrence


class _ScanStep(nn.Module):
  """The body `nn.scan` iterates: no params of its own, W_hh arrives broadcast."""

  @nn.compact
  def __call__(self, carry, xs, w_hh):
    xz, m = xs
    return _step(w_hh, carry, xz, m)


def length_mask(lengths: Optional[Array], num_steps: int) -> Optional[Array]:
  """`[T, B]` bool, True on valid steps (time-major, as the recurrences consume it)."""
  if lengths is None:
    return None
  return jnp.arange(num_steps)[:, None] < jnp.asarray(lengths)[None, :]


class LSTMLayer(nn.Module):
  """One LSTM layer in one direction, PyTorch `nn.LSTM` parameterisation.

  Attributes:
    hidden_size: H.
    reverse: process the sequence right to left (the backward half of a bidirectional layer).
    impl: 'fused' (custom-VJP recurrence, faster backward) or 'scan' (nn.scan + autodiff).
    weight_drop: AWD-LSTM DropConnect rate on W_hh; one mask per forward pass, shared by all
      steps and rows, only when not deterministic (needs the 'dropout' rng).
    time_major: inputs/outputs are `[T, B, ...]` instead of `[B, T, ...]` (the encoder uses it to
      avoid transposing between layers).
    dtype: computation dtype (None: promote inputs and params). With bfloat16, `impl='scan'`
      runs the recurrence in bf16 everywhere; `impl='fused'` does on GPU/TPU, while on CPU its
      kernel runs the recurrence in float32 (the input projection stays bf16).
    param_dtype: parameter dtype.
    kernel_init: init for all weights and biases; default PyTorch's U(+-1/sqrt(H)).

  `__call__(x, lengths=None, *, initial_state=None, deterministic=True) -> (outputs, (c, h))`.
  """
  hidden_size: int
  reverse: bool = False
  impl: str = "fused"
  weight_drop: float = 0.0
  time_major: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Optional[Callable] = None

  @nn.compact
  def __call__(self, x: Array, lengths: Optional[Array] = None, *,
               initial_state: Optional[State] = None,
               deterministic: bool = True) -> Tuple[Array, State]:
    if self.impl not in IMPLS:
      raise ValueError(f"LSTMLayer.impl must be one of {IMPLS}, got {self.impl!r}")
    H = self.hidden_size
    init = self.kernel_init or torch_uniform(H)
    w_ih, b_ih = _Affine(4 * H, init, self.param_dtype, name="ih")(x.shape[-1])
    w_hh, b_hh = _Affine(4 * H, init, self.param_dtype, name="hh")(H)

    dtype = self.dtype or jnp.result_type(x.dtype, w_ih.dtype)
    # W_hh stays in its param dtype: the fused recurrence casts it itself (its CPU kernel runs
    # a bf16 layer's recurrence in float32, on the float32 weights), the scan below casts it.
    x, w_ih = x.astype(dtype), w_ih.astype(dtype)
    bias = (b_ih + b_hh).astype(dtype)

    if self.weight_drop > 0.0 and not deterministic:
      keep = 1.0 - self.weight_drop
      drop_key = self.make_rng("dropout")
      w_mask = jax.random.bernoulli(drop_key, keep, w_hh.shape)
      w_hh = jnp.where(w_mask, w_hh / keep, jnp.zeros_like(w_hh))

    # All steps' input projections in one 2-D matmul, time-major for the scan. (Transposing x
    # first is cheaper than letting the dot emit a transposed [T,B,4H]; XLA:CPU runs a
    # "bte,eg->tbg" einsum ~3x slower than the flat matmul.)
    if not self.time_major:
      x = jnp.swapaxes(x, 0, 1)
    T, B = x.shape[0], x.shape[1]
    xz = (jnp.dot(x.reshape(T * B, -1), w_ih) + bias).reshape(T, B, 4 * H)
    mask = length_mask(lengths, T)

    if initial_state is None:
      c0 = jnp.zeros((B, H), dtype)
      h0 = jnp.zeros((B, H), dtype)
    else:
      c0, h0 = (s.astype(dtype) for s in initial_state)

    if self.impl == "fused":
      ys, c, h = _fused_recurrence(bool(self.reverse))(xz, mask, w_hh, c0, h0)
    else:
      scan = nn.scan(_ScanStep, variable_broadcast="params", split_rngs={"params": False},
                     in_axes=(0, nn.broadcast), out_axes=0, reverse=self.reverse)
      (c, h), ys = scan(name="recurrence")((c0, h0), (xz, mask), w_hh.astype(dtype))

    if not self.time_major:
      ys = jnp.swapaxes(ys, 0, 1)
    return ys, (c, h)


class BiLSTMLayer(nn.Module):
  """A bidirectional layer: children `fwd` and `bwd` (both LSTMLayer), outputs concatenated.

  Why one module with two children rather than `layer_0` + `layer_0_reverse`: the freezing
  strategies treat `encoder/layer_i` as one group, so both directions of a layer freeze together.
  State is `(c, h)` with the directions concatenated: `[B, 2H]` each (fwd first).
  """
  hidden_size: int
  impl: str = "fused"
  weight_drop: float = 0.0
  time_major: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Optional[Callable] = None

  @nn.compact
  def __call__(self, x, lengths=None, *, initial_state=None, deterministic=True):
    kw = dict(impl=self.impl, weight_drop=self.weight_drop, time_major=self.time_major,
              dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    H = self.hidden_size
    s_f = s_b = None
    if initial_state is not None:
      c0, h0 = initial_state
      s_f, s_b = (c0[:, :H], h0[:, :H]), (c0[:, H:], h0[:, H:])
    y_f, (c_f, h_f) = LSTMLayer(H, reverse=False, name="fwd", **kw)(
        x, lengths, initial_state=s_f, deterministic=deterministic)
    y_b, (c_b, h_b) = LSTMLayer(H, reverse=True, name="bwd", **kw)(
        x, lengths, initial_state=s_b, deterministic=deterministic)
    return (jnp.concatenate([y_f, y_b], axis=-1),
            (jnp.concatenate([c_f, c_b], axis=-1), jnp.concatenate([h_f, h_b], axis=-1)))


class LSTMEncoder(nn.Module):
  """A stack of LSTM layers: submodules `layer_0 .. layer_{n-1}`.

  Attributes:
    num_layers, hidden_size: as nn.LSTM.
    dropout: dropout on the outputs of every layer but the last (nn.LSTM's `dropout`).
    bidirectional: each `layer_i` is a BiLSTMLayer with children `fwd`/`bwd`; outputs `[B,T,2H]`.
    variational: AWD-LSTM variational dropout, one mask per sequence shared over time steps
      (per-step masks otherwise).
    weight_drop: AWD-LSTM DropConnect rate on each layer's W_hh.
    impl: 'fused' | 'scan', see LSTMLayer.

  `__call__(x [B,T,E], lengths [B] | None, *, deterministic=True, initial_state=None)`
  -> `(outputs [B,T,H*dirs], final_state)`; outputs past a row's length are 0, `final_state` is a
  tuple over layers of `(c, h)` at each row's last valid step. `initial_state` has the same form.
  Dropout uses the 'dropout' rng.
  """
  num_layers: int
  hidden_size: int
  dropout: float = 0.0
  bidirectional: bool = False
  variational: bool = False
  weight_drop: float = 0.0
  impl: str = "fused"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Optional[Callable] = None

  @nn.compact
  def __call__(self, x: Array, lengths: Optional[Array] = None, *, deterministic: bool = True,
               initial_state=None):
    if initial_state is not None and len(initial_state) != self.num_layers:
      raise ValueError(f"initial_state has {len(initial_state)} layers, expected {self.num_layers}")
    layer_cls = BiLSTMLayer if self.bidirectional else LSTMLayer
    kw = dict(impl=self.impl, weight_drop=self.weight_drop, time_major=True, dtype=self.dtype,
              param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    # Time-major inside the stack: one transpose in, one out, none between layers.
    h = jnp.swapaxes(x, 0, 1)
    states = []
    for i in range(self.num_layers):
      if i > 0 and self.dropout > 0.0:
        dims = (0,) if self.variational else ()
        h = nn.Dropout(self.dropout, broadcast_dims=dims)(h, deterministic=deterministic)
      h, state = layer_cls(self.hidden_size, name=f"layer_{i}", **kw)(
          h, lengths, initial_state=None if initial_state is None else initial_state[i],
          deterministic=deterministic)
      states.append(state)
    return jnp.swapaxes(h, 0, 1), tuple(states)
