"""LSTM language model (AWD-LSTM style) with a full, sampled or adaptive softmax output.

Why several outputs: on a CPU the output layer, not the LSTM, decides what a step costs (a Dense
to a 10k-25k vocabulary plus its softmax is ~75% of a step, BENCHMARKS.md). So:
- `output='full'`: exact softmax over the vocabulary, train and eval.
- `output='sampled'`: sampled softmax during training (shared log-uniform negatives, log-Q
  corrected, accidental hits removed); a biased but cheap training loss. Evaluation
  (`deterministic=True`) always uses the full softmax, so reported perplexities are exact.
  Assumes ids are ordered by frequency (the word tokenizer's vocabulary is, after the specials).
  The output bias starts at the proposal's log-probabilities (see SoftmaxDecoder).
- `output='adaptive'`: adaptive softmax (Grave et al. 2017): a head over the frequent words plus
  one logit per tail cluster, tails through a projection `div_value**(i+1)` times smaller. It is a
  different, exactly normalised model, so train and eval NLL are both exact likelihoods.
  Each tail runs only on the rows whose target falls in it (see AdaptiveSoftmax.nll).

The exact NLL of `deterministic=True` calls (evaluation, the test pass) runs over row chunks of
the flattened [B*T, H] hidden states, at most `eval_chunk_bytes` (16 MB) of float32 logits at a
time, for every output: a [B, T, V] softmax over a 20k vocabulary is 0.65 GB per buffer, and it
set the process's peak memory (LSTMLanguageModel._exact_nll). Training steps are not chunked,
except the adaptive output's rarely taken dense fallback (_dense_tail_term).

Submodules: `embed` (nn.Embed), `encoder` (LSTMEncoder), `decoder`:
- full/sampled, untied: `decoder/{kernel [H,V], bias [V]}` (nn.Dense's names and layout).
- tied: `decoder/bias [V]` (+ `decoder/proj/kernel [H,E]` when hidden_size != embed_dim); the
  output matrix is `embed/embedding`.
- adaptive: `decoder/head/{kernel,bias}`, `decoder/tail_i/{proj/kernel, out/{kernel,bias}}`.

Dropout (AWD-LSTM names in brackets), all with the 'dropout' rng and only when not deterministic:
`dropout_words` [dropoute] drops whole words' embeddings, `dropout_embed` [dropouti] on the
embedding outputs, `dropout_hidden` [dropouth] between LSTM layers, `dropout_output` [dropout] on
the last LSTM output, `weight_drop` [wdrop] DropConnect on W_hh. With `variational=True` the
masks are shared over time steps. The sampled softmax draws its negatives from the 'dropout' rng
too, so a train step needs no extra rng stream.

Mixed precision (`dtype=jnp.bfloat16`; params stay `param_dtype`, float32): the embedding
lookup, the LSTM's outputs and the output layer's operands are bf16, but every output matmul
accumulates in float32 (`preferred_element_type`) and the softmax, log-Q corrections and NLL are
float32, so logits are never rounded to bf16 and the loss is float32. The recurrence itself is
float32 on CPU under `impl='fused'` (jaxlm/models/lstm.py, Mixed precision). The final state is
returned in float32.
"""
import functools
import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.models.lstm import LSTMEncoder

Array = jax.Array
OUTPUTS = ("full", "sampled", "adaptive")


def _wide(dtype):
  """The dtype a softmax input is accumulated in: float32 for bf16/f16 compute (float64 stays)."""
  return jnp.promote_types(dtype, jnp.float32)


def _logits_dot(a: Array, b: Array) -> Array:
  """`a @ b` with operands in the compute dtype and products accumulated (and returned) in at
  least float32: a bf16 model's logits are never rounded to bf16 before the softmax."""
  return jnp.dot(a, b, preferred_element_type=_wide(a.dtype))


def _dense_kw(dtype) -> dict:
  """nn.Dense arguments of a layer whose outputs are logits: compute in `dtype`, return float32
  (like `_logits_dot`); `dtype=None` keeps nn.Dense's own promotion."""
  if dtype is None or jnp.dtype(dtype).itemsize >= 4:
    return dict(dtype=dtype)
  return dict(dtype=dtype, dot_general=functools.partial(jax.lax.dot_general,
                                                         preferred_element_type=jnp.float32))


def _full_nll(logits: Array, targets: Array) -> Array:
  """Per-token NLL of a full softmax, numerically stable (logsumexp - target logit)."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse - tgt


def log_uniform_log_prob(ids: Array, vocab_size: int) -> Array:
  """log Q(k) of the log-uniform (Zipf) proposal P(k) = log((k+2)/(k+1)) / log(V+1)."""
  ids = ids.astype(jnp.float32)
  return jnp.log(jnp.log1p(1.0 / (ids + 1.0)) / math.log(vocab_size + 1.0))


def sample_log_uniform(key, num_sampled: int, vocab_size: int) -> Array:
  """Draw ids from the log-uniform proposal by inverting its CDF (with replacement)."""
  u = jax.random.uniform(key, (num_sampled,))
  ids = jnp.floor(jnp.exp(u * math.log(vocab_size + 1.0))).astype(jnp.int32) - 1
  return jnp.clip(ids, 0, vocab_size - 1)


class SoftmaxDecoder(nn.Module):
  """Full (and sampled) softmax output layer; optionally tied to the embedding matrix."""
  vocab_size: int
  hidden_size: int
  embed_dim: int
  tied: bool = False
  num_sampled: int = 0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def setup(self):
    if self.tied:
      if self.hidden_size != self.embed_dim:
        self.proj = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    else:
      bound = 1.0 / math.sqrt(self.hidden_size)  # nn.Linear's default init
      self.kernel = self.param("kernel", _uniform(bound), (self.hidden_size, self.vocab_size),
                               self.param_dtype)
    # Sampled training starts the model at its proposal: bias = log Q(v). With a zero bias the
    # log-Q-corrected logit of a rare negative (-log Q ~ 12 for a 20k vocabulary) dwarfs every
    # other candidate, so whichever rare word is drawn dominates the gradient of all rows at once;
    # the IMDB LM then got worse than a unigram model (held-out perplexity 1,462 after 400 steps,
    # RESULTS.md). Starting at Q makes every importance weight ~1 and the estimator well behaved.
    bias_init = (_log_uniform_init(self.vocab_size) if self.num_sampled > 0
                 else nn.initializers.zeros)
    self.bias = self.param("bias", bias_init, (self.vocab_size,), self.param_dtype)

  def _features_and_weights(self, h, embedding):
    """Returns (features [..., D], output matrix W [D, V] or None, embedding [V, D] or None)."""
    if self.tied:
      if self.hidden_size != self.embed_dim:
        h = self.proj(h)
      return h, None, embedding
    return h, self.kernel, None

  @property
  def logits_width(self) -> int:
    """Widest logits row `nll` builds at evaluation (the chunk size is derived from it)."""
    return self.vocab_size

  def logits(self, h: Array, embedding: Optional[Array] = None) -> Array:
    h, w, emb = self._features_and_weights(h, embedding)
    if w is not None:
      out = _logits_dot(h, w.astype(h.dtype))
    else:
      out = _logits_dot(h, emb.astype(h.dtype).T)
    return out.astype(jnp.float32) + self.bias.astype(jnp.float32)

  def nll(self, h, targets, embedding=None, *, deterministic=True):
    if deterministic or self.num_sampled <= 0:
      return _full_nll(self.logits(h, embedding), targets)
    return self._sampled_nll(h, targets, embedding)

  def _sampled_nll(self, h, targets, embedding):
    """Sampled softmax: one set of K negatives for the whole batch, log-Q corrected.

    Why shared negatives: the sampled logits are then one [N, D] x [D, K] matmul instead of a
    gather per token. Accidental hits (a negative equal to the target) are masked out.
    """
    V = self.vocab_size
    h, w, emb = self._features_and_weights(h, embedding)
    samples = sample_log_uniform(self.make_rng("dropout"), self.num_sampled, V)
    if w is not None:
      w_s = jnp.take(w, samples, axis=1)                       # [D, K]
      w_t = jnp.take(w, targets, axis=1)                       # [D, N]
      s_logits = _logits_dot(h, w_s.astype(h.dtype))
      t_logits = jnp.einsum("nd,dn->n", h, w_t.astype(h.dtype),
                            preferred_element_type=_wide(h.dtype))
    else:
      e_s = jnp.take(emb, samples, axis=0)                     # [K, D]
      e_t = jnp.take(emb, targets, axis=0)                     # [N, D]
      s_logits = _logits_dot(h, e_s.astype(h.dtype).T)
      t_logits = jnp.einsum("nd,nd->n", h, e_t.astype(h.dtype),
                            preferred_element_type=_wide(h.dtype))
    b = self.bias.astype(jnp.float32)
    s_logits = (s_logits.astype(jnp.float32) + b[samples]
                - log_uniform_log_prob(samples, V))
    t_logits = (t_logits.astype(jnp.float32) + b[targets]
                - log_uniform_log_prob(targets, V))
    hit = samples[None, :] == targets[:, None]
    s_logits = jnp.where(hit, -1e30, s_logits)
    all_logits = jnp.concatenate([t_logits[..., None], s_logits], axis=-1)
    return jax.nn.logsumexp(all_logits, axis=-1) - t_logits


def _log_uniform_init(vocab_size):
  def init(key, shape, dtype=jnp.float32):
    del key
    return log_uniform_log_prob(jnp.arange(shape[0]), vocab_size).astype(dtype)
  return init


def _uniform(bound):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class _Tail(nn.Module):
  """One adaptive-softmax tail cluster: H -> d (no bias) -> cluster size."""
  dim: int
  size: int
  param_dtype: Any = jnp.float32
  dtype: Any = None

  def setup(self):
    self.proj = nn.Dense(self.dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    self.out = nn.Dense(self.size, param_dtype=self.param_dtype, **_dense_kw(self.dtype))

  def __call__(self, h):
    return self.out(self.proj(h)).astype(jnp.float32)


class AdaptiveSoftmax(nn.Module):
  """Adaptive softmax (Grave et al.): exact, normalised log-probs at a fraction of the flops.

  `cutoffs` are increasing ids `0 < c_1 < ... < V`; the head covers `[0, c_1)` plus one logit
  per tail cluster `[c_i, c_{i+1})`, whose projection has `hidden_size / div_value**(i+1)` dims.
  """
  vocab_size: int
  hidden_size: int
  cutoffs: Sequence[int]
  div_value: float = 4.0
  param_dtype: Any = jnp.float32
  dtype: Any = None

  def setup(self):
    cuts = list(self.cutoffs)
    if not cuts or cuts != sorted(cuts) or cuts[0] <= 0 or cuts[-1] >= self.vocab_size:
      raise ValueError(f"adaptive cutoffs must increase within (0, {self.vocab_size}): {cuts}")
    bounds = cuts + [self.vocab_size]
    self.head = nn.Dense(cuts[0] + len(cuts), param_dtype=self.param_dtype,
                         **_dense_kw(self.dtype))
    self.tail = [
        _Tail(max(1, int(self.hidden_size // (self.div_value ** (i + 1)))),
              bounds[i + 1] - bounds[i], self.param_dtype, self.dtype)
        for i in range(len(cuts))]

  @property
  def logits_width(self) -> int:
    """Widest logits row `nll` builds: the head, or a tail on its dense path."""
    bounds = list(self.cutoffs) + [self.vocab_size]
    return max([bounds[0] + len(self.cutoffs)] + [b - a for a, b in zip(bounds, bounds[1:])])

  def log_probs(self, h: Array) -> Array:
    """Full-vocabulary log-probabilities [..., V] (they sum to 1 in probability)."""
    c0 = self.cutoffs[0]
    head = jax.nn.log_softmax(self.head(h).astype(jnp.float32), axis=-1)
    parts = [head[..., :c0]]
    for i, tail in enumerate(self.tail):
      parts.append(head[..., c0 + i:c0 + i + 1] + jax.nn.log_softmax(tail(h), axis=-1))
    return jnp.concatenate(parts, axis=-1)

  def logits(self, h, embedding=None):
    return self.log_probs(h)

  def nll(self, h, targets, embedding=None, *, deterministic=True):
    """-log p(target) for `h [N, H]`, `targets [N]`: head term plus, for tail words, the
    within-cluster term, computed with logsumexp (the [N, V] log-probs are never built).

    Why gathered: a tail term is only needed for the tokens whose target lies in that cluster
    (~15% and ~5% of English text for a 2k/8k split), so the tail runs on those rows only, like
    PyTorch's AdaptiveLogSoftmaxWithLoss. jit needs static shapes, so each tail gathers into a
    fixed capacity (`_tail_capacity`); a batch with more members than that takes the dense path
    (every row through the tail) instead, chosen at run time with `lax.cond`. Both paths are
    exact; which one ran never changes the result.
    """
    c0 = self.cutoffs[0]
    bounds = list(self.cutoffs) + [self.vocab_size]
    head_logits = self.head(h).astype(jnp.float32)
    head_lse = jax.nn.logsumexp(head_logits, axis=-1)
    # Head index of the target: the word itself, or its cluster's logit.
    cluster = jnp.searchsorted(jnp.asarray(self.cutoffs), targets, side="right")  # 0 = head
    head_idx = jnp.where(cluster == 0, targets, c0 + cluster - 1)
    nll = head_lse - jnp.take_along_axis(head_logits, head_idx[..., None], -1)[..., 0]
    for i, tail in enumerate(self.tail):
      local = jnp.clip(targets - bounds[i], 0, bounds[i + 1] - bounds[i] - 1)
      member = cluster == i + 1
      if self.is_initializing():  # creates the tail's params; shapes only
        nll = nll + jnp.where(member, _tail_nll(tail(h), local), 0.0)
        continue
      weights = _tail_weights(tail)
      capacity = _tail_capacity(h.shape[0], bounds[i], bounds[i + 1], self.vocab_size)
      if capacity >= h.shape[0]:
        term = _dense_tail_term(weights, h, local, member)
      else:
        # Under autodiff, lax.cond makes both branches return the union of their residuals, so
        # the gathered branch could carry zero-filled [N, cluster] logits of the dense one.
        # Rematerialised branches keep only their inputs (measured: a few % faster, not more).
        term = jax.lax.cond(
            jnp.sum(member) <= capacity,
            jax.checkpoint(functools.partial(_gathered_tail_term, capacity=capacity)),
            jax.checkpoint(_dense_tail_term), weights, h, local, member)
      nll = nll + term
    return nll


def _tail_weights(tail: _Tail):
  """(proj kernel, out kernel, out bias) of a bound tail, as arrays for plain-jax control flow."""
  return (tail.proj.variables["params"]["kernel"], tail.out.variables["params"]["kernel"],
          tail.out.variables["params"]["bias"])


def _tail_logits(weights, h):
  proj, out, bias = weights
  return (_logits_dot(jnp.dot(h, proj.astype(h.dtype)), out.astype(h.dtype)).astype(jnp.float32)
          + bias.astype(jnp.float32))


def _tail_nll(logits, local):
  return (jax.nn.logsumexp(logits, axis=-1)
          - jnp.take_along_axis(logits, local[..., None], -1)[..., 0])


def _dense_tail_term(weights, h, local, member):
  """The tail term of every row, in row chunks of <= EVAL_CHUNK_BYTES logits.

  Why chunks, in training too: XLA sizes a step's temporaries for both branches of the
  `lax.cond` in AdaptiveSoftmax.nll, so this rarely taken fallback's [N, cluster] logits and
  their gradient (0.8 GB for the IMDB LM's 12k-word tail) were held by every adaptive train step.
  The branch is rematerialised anyway, so per-chunk remat only repeats its forward pass.
  """
  rows = chunk_rows(EVAL_CHUNK_BYTES, weights[1].shape[-1], h.shape[0])
  chunk_nll = lambda h_chunk, local_chunk: _tail_nll(_tail_logits(weights, h_chunk), local_chunk)
  if rows < h.shape[0]:
    return jnp.where(member, map_row_chunks(jax.checkpoint(chunk_nll), rows, h, local), 0.0)
  return jnp.where(member, chunk_nll(h, local), 0.0)


def _gathered_tail_term(weights, h, local, member, *, capacity):
  (rows,) = jnp.nonzero(member, size=capacity, fill_value=0)
  valid = jnp.arange(capacity) < jnp.sum(member)
  term = _tail_nll(_tail_logits(weights, h[rows]), local[rows])
  return jnp.zeros(h.shape[0], jnp.float32).at[rows].add(jnp.where(valid, term, 0.0))


def _tail_capacity(num_rows: int, lo: int, hi: int, vocab_size: int) -> int:
  """Rows a tail gathers: 1.5x the Zipf share of ids [lo, hi) plus 16 (real text has fewer tail
  words than Zipf predicts; a batch over capacity falls back to the dense path, still exact)."""
  share = math.log((hi + 1) / (lo + 1)) / math.log(vocab_size + 1)
  return min(num_rows, int(math.ceil(1.5 * share * num_rows)) + 16)


# Float32 logits an exact (evaluation) NLL holds at once; LSTMLanguageModel.eval_chunk_bytes.
EVAL_CHUNK_BYTES = 16 * 2**20


def chunk_rows(budget_bytes: int, width: int, num_rows: int) -> int:
  """Rows per chunk: the largest power of two (at least 8) whose float32 [rows, width] logits fit
  `budget_bytes`, at most `num_rows`; `num_rows` (one chunk) when the budget is 0."""
  if budget_bytes <= 0:
    return num_rows
  fit = max(1, budget_bytes // (4 * max(1, width)))
  return min(num_rows, max(8, 1 << (fit.bit_length() - 1)))


def map_row_chunks(fn, rows: int, h: Array, targets: Array) -> Array:
  """`fn(h_chunk [rows, D], targets_chunk [rows]) -> [rows]` over consecutive row chunks, one at a
  time (lax.map), concatenated to [N]. The last chunk is padded with zero rows (target id 0) and
  their results dropped, so any N works."""
  n = h.shape[0]
  num_chunks = -(-n // rows)
  pad = num_chunks * rows - n
  if pad:
    h = jnp.concatenate([h, jnp.zeros((pad,) + h.shape[1:], h.dtype)])
    targets = jnp.concatenate([targets, jnp.zeros((pad,), targets.dtype)])
  out = jax.lax.map(lambda args: fn(*args),
                    (h.reshape(num_chunks, rows, -1), targets.reshape(num_chunks, rows)))
  return out.reshape(-1)[:n]


class LSTMLanguageModel(nn.Module):
  """Embedding -> LSTMEncoder -> output layer; returns per-token NLL.

  `__call__(inputs [B,T], targets [B,T], lengths=None, *, deterministic=True, initial_state=None)`
  -> `(nll [B,T] float32, final_state)`. With `lengths`, nll is 0 past each row's length and the
  final state is the state at the last real step. `method='logits'` (same arguments minus
  targets) -> `(logits [B,T,V] float32, final_state)`; for the adaptive output these are
  normalised log-probabilities (that method does build all of them).
  `eval_chunk_bytes`: the logits a deterministic NLL holds at once (0: one unchunked softmax).
  """
  vocab_size: int
  embed_dim: int = 400
  hidden_size: int = 1150
  num_layers: int = 3
  dropout_embed: float = 0.0
  dropout_hidden: float = 0.0
  dropout_output: float = 0.0
  dropout_words: float = 0.0
  weight_drop: float = 0.0
  variational: bool = True
  tie_weights: bool = False
  output: str = "full"
  num_sampled: int = 1024
  adaptive_cutoffs: Sequence[int] = ()
  adaptive_div_value: float = 4.0
  impl: str = "fused"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  eval_chunk_bytes: int = EVAL_CHUNK_BYTES

  def setup(self):
    if self.output not in OUTPUTS:
      raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
    self.embed = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype,
                          param_dtype=self.param_dtype, embedding_init=_uniform(0.1))
    self.encoder = LSTMEncoder(self.num_layers, self.hidden_size, dropout=self.dropout_hidden,
                               variational=self.variational, weight_drop=self.weight_drop,
                               impl=self.impl, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.output == "adaptive":
      if self.tie_weights:
        raise ValueError("tie_weights is not supported with output='adaptive'")
      self.decoder = AdaptiveSoftmax(self.vocab_size, self.hidden_size,
                                     tuple(self.adaptive_cutoffs), self.adaptive_div_value,
                                     self.param_dtype, self.dtype)
    else:
      self.decoder = SoftmaxDecoder(
          self.vocab_size, self.hidden_size, self.embed_dim, tied=self.tie_weights,
          num_sampled=self.num_sampled if self.output == "sampled" else 0,
          dtype=self.dtype, param_dtype=self.param_dtype)
    dims = (1,) if self.variational else ()
    self.drop_embed = nn.Dropout(self.dropout_embed, broadcast_dims=dims)
    self.drop_output = nn.Dropout(self.dropout_output, broadcast_dims=dims)

  def _hidden(self, inputs, lengths, deterministic, initial_state):
    x = self.embed(inputs)
    if self.dropout_words > 0.0 and not deterministic:
      keep = 1.0 - self.dropout_words
      word_keep = jax.random.bernoulli(self.make_rng("dropout"), keep, (self.vocab_size,))
      x = x * (word_keep[inputs][..., None] / keep).astype(x.dtype)
    x = self.drop_embed(x, deterministic=deterministic)
    h, state = self.encoder(x, lengths, deterministic=deterministic, initial_state=initial_state)
    h = self.drop_output(h, deterministic=deterministic)
    # The state leaves in float32 (or the wider param dtype) whatever the compute dtype, so a
    # stream-mode carry keeps one dtype from batch to batch; a bf16 value upcast is exact.
    state = jax.tree.map(lambda s: s.astype(_wide(s.dtype)), state)
    return h, state

  def _embedding(self):
    return self.embed.embedding if self.tie_weights else None

  def __call__(self, inputs: Array, targets: Array, lengths: Optional[Array] = None, *,
               deterministic: bool = True, initial_state=None) -> Tuple[Array, Any]:
    h, state = self._hidden(inputs, lengths, deterministic, initial_state)
    # The output layer works on [B*T, H]: XLA:CPU runs some 3-D dots (e.g. a [B,T,16] x [16,V]
    # adaptive tail) ~10x slower than the same 2-D matmul.
    h, flat_targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if deterministic:
      nll = self._exact_nll(h, flat_targets)
    else:
      # Training is not chunked: under autodiff a chunk's logits must be recomputed in the
      # backward pass (one more [N, H] x [H, V] matmul per step, ~1/3 of a full-softmax output
      # layer's cost), and the sampled output's largest buffer is only [N, K].
      nll = self.decoder.nll(h, flat_targets, self._embedding(), deterministic=False)
    nll = nll.reshape(targets.shape).astype(jnp.float32)
    if lengths is not None:
      valid = jnp.arange(inputs.shape[1])[None, :] < jnp.asarray(lengths)[:, None]
      nll = jnp.where(valid, nll, 0.0)
    return nll, state

  def _exact_nll(self, h: Array, targets: Array) -> Array:
    """The exact (evaluation) NLL of `h [N, H]`, in row chunks of <= `eval_chunk_bytes` logits.

    Why chunks: at the IMDB LM's shapes (N = 64 x 128 rows, a 20k vocabulary) the unchunked
    softmax builds two [N, V] float32 buffers, 1.25 GB of the eval step's 1.3 GB of temporaries
    (XLA's compiled memory analysis), and with the CLI's allocator (jaxlm/malloc.py) a process
    never returns them. Chunked it is ~10 MB of logits at a time, the same numbers (each row's
    NLL is computed from that row alone) and about the same speed (BENCHMARKS.md).
    """
    embedding = self._embedding()
    rows = chunk_rows(self.eval_chunk_bytes, self.decoder.logits_width, h.shape[0])
    if rows >= h.shape[0] or self.is_initializing():
      return self.decoder.nll(h, targets, embedding)
    decoder, params = self.decoder.clone(parent=None), self.decoder.variables["params"]

    def chunk_nll(h_chunk, targets_chunk):
      return decoder.apply({"params": params}, h_chunk, targets_chunk, embedding, method="nll")

    # Rematerialised: differentiated (tests, a user's jax.grad of an eval-mode call), lax.map
    # would stack every chunk's softmax residuals, i.e. the whole [N, V] again.
    return map_row_chunks(jax.checkpoint(chunk_nll), rows, h, targets)

  def logits(self, inputs: Array, lengths: Optional[Array] = None, *,
             deterministic: bool = True, initial_state=None) -> Tuple[Array, Any]:
    h, state = self._hidden(inputs, lengths, deterministic, initial_state)
    logits = self.decoder.logits(h.reshape(-1, h.shape[-1]), self._embedding())
    return logits.reshape(h.shape[:-1] + logits.shape[-1:]), state


def perplexity(nll_sum, token_count) -> float:
  """exp(total NLL / number of real tokens): the corpus perplexity, not a mean of batch ones.

  Why sums: averaging per-batch perplexities (or per-batch mean NLLs over batches with different
  numbers of real tokens) biases the result; accumulate `sum(nll * weights)` and `sum(weights)`.
  """
  nll_sum = float(nll_sum)
  token_count = float(token_count)
  if token_count <= 0:
    raise ValueError(f"perplexity needs at least one token, got token_count={token_count}")
  return float(np.exp(nll_sum / token_count))
