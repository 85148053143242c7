"""Side-by-side train-step throughput: jaxlm LSTM models vs the equivalent PyTorch models.

Why side by side in one run: this 2-core machine is shared and noisy, so only numbers measured
in the same process, alternating between frameworks, are comparable. Each config runs R rounds;
a round times K jax steps then K torch steps; we report the median step time of each framework.

What a "step" is: one jitted `value_and_grad` of the mean token NLL plus an optax Adam update
(PyTorch: forward, backward, torch.optim.Adam.step), batch and shapes identical, fp32.
GFLOP/s counts only matmul flops (LSTM + output layer, x3 for forward+backward) so it is
comparable with the plain matmul measured in the same run. `pf` is minor page faults per step.

The allocator: by default the whole process runs with the malloc settings the `jaxlm` CLI uses
(jaxlm/malloc.py), so both frameworks reuse freed memory instead of page-faulting it in again;
with glibc's defaults PyTorch's step time swung by up to 1.7x between identical runs depending on
allocation history. `--allocator glibc` measures the process default instead.

Usage:
  .venv/bin/python scripts/bench_lm.py                      # all configs
  .venv/bin/python scripts/bench_lm.py --configs seed001 --rounds 5 --steps 5
"""
import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

# Before jax is imported: the tests' simulated multi-device flag must not leak into timings.
os.environ.pop("XLA_FLAGS", None)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jaxlm import malloc  # noqa: E402


# `--allocator` is read before anything else: it must take effect before jax or torch start
# threads. main()'s parser inherits it.
ALLOCATOR_FLAG = argparse.ArgumentParser(add_help=False)
ALLOCATOR_FLAG.add_argument(
    "--allocator", choices=("tuned", "glibc"), default="tuned",
    help="tuned: the settings the jaxlm CLI applies (jaxlm/malloc.py), here for both frameworks; "
         "glibc: the process default")
if ALLOCATOR_FLAG.parse_known_args()[0].allocator == "tuned" and not malloc.tune():
  raise SystemExit("--allocator tuned needs glibc's mallopt; use --allocator glibc")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import flax.linen as nn  # noqa: E402

from jaxlm.models.lm import LSTMLanguageModel  # noqa: E402
from jaxlm.models.lstm import LSTMEncoder  # noqa: E402

import torch  # noqa: E402

NUM_THREADS = len(os.sched_getaffinity(0))
torch.set_num_threads(NUM_THREADS)

# name: (vocab, embed, hidden, layers, batch, bptt, output, extra)
LM_CONFIGS = {
    "small": dict(vocab=1000, embed=64, hidden=128, layers=1, batch=32, bptt=64),
    # = configs/quickstart.py:pretrain (its synthetic corpus has 286 words + 4 specials).
    "quickstart": dict(vocab=290, embed=64, hidden=128, layers=2, batch=32, bptt=96),
    "seed001": dict(vocab=10000, embed=128, hidden=256, layers=1, batch=32, bptt=64),
    # = configs/imdb_lm.py: 20,000 words + 4 specials, batch 64 x 128-step windows (its output is
    # sampled; the cutoffs are its adaptive alternative).
    "imdb": dict(vocab=20004, embed=256, hidden=256, layers=2, batch=64, bptt=128,
                 cutoffs=(2000, 8000)),
    # = configs/imdb_lm_large.py: ULMFiT's widths (the GPU/TPU config), sampled with 2,048.
    "imdb_large": dict(vocab=30004, embed=400, hidden=1152, layers=3, batch=64, bptt=128,
                       cutoffs=(2000, 10000), num_sampled=2048),
}


def num_sampled(cfg):
  return cfg.get("num_sampled") or min(1024, cfg["vocab"] // 4)


def zipf_ids(rng, vocab, shape):
  """Token ids with a word-like (log-uniform / Zipf) frequency distribution, id 0 most frequent.

  Why not uniform ids: the adaptive and sampled outputs' cost and PyTorch's adaptive softmax
  (which only runs a tail for the tokens in it) depend on how often tail words occur; uniform
  ids would make 80% of the targets rare words, which no real corpus does.
  """
  u = rng.uniform(size=shape)
  return np.clip(np.floor(np.exp(u * np.log(vocab + 1.0))).astype(np.int64) - 1, 0, vocab - 1)


def adaptive_cutoffs(cfg):
  """The config's cutoffs, else a head of the most frequent 2k words (1/5 of a small vocab) and
  tails split at 10k."""
  if "cutoffs" in cfg:
    return tuple(cfg["cutoffs"])
  vocab = cfg["vocab"]
  if vocab <= 2000:
    return (vocab // 5, vocab // 2)
  return (2000, 10000) if vocab > 10000 else (2000, vocab // 2)


# ----------------------------------------------------------------------------------------------
# JAX side.


def jax_lm_step(cfg, output, seed=0):
  extra = {}
  if output == "adaptive":
    extra = dict(output="adaptive", adaptive_cutoffs=adaptive_cutoffs(cfg))
  elif output == "sampled":
    extra = dict(output="sampled", num_sampled=num_sampled(cfg))
  model = LSTMLanguageModel(cfg["vocab"], cfg["embed"], cfg["hidden"], cfg["layers"], **extra)
  rng = np.random.RandomState(seed)
  shape = (cfg["batch"], cfg["bptt"])
  inputs = jnp.asarray(zipf_ids(rng, cfg["vocab"], shape), jnp.int32)
  targets = jnp.asarray(zipf_ids(rng, cfg["vocab"], shape), jnp.int32)
  params = model.init(jax.random.key(0), inputs, targets)["params"]
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  def loss_fn(p, key):
    nll, _ = model.apply({"params": p}, inputs, targets, deterministic=False,
                         rngs={"dropout": key})
    return jnp.mean(nll)

  @jax.jit
  def step(p, o, key):
    loss, g = jax.value_and_grad(loss_fn)(p, key)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  state = {"p": params, "o": opt_state, "k": jax.random.key(1)}

  def run():
    state["k"], sub = jax.random.split(state["k"])
    state["p"], state["o"], loss = step(state["p"], state["o"], sub)
    return loss

  return run


def classifier_lengths(cfg):
  """Every row full length, or (`ragged`) seeded lengths uniform in [bptt/4, bptt], as reviews of
  one length bucket are: seed 003 trains on packed sequences, so padding should cost nothing."""
  if not cfg.get("ragged"):
    return np.full((cfg["batch"],), cfg["bptt"], np.int64)
  return np.random.RandomState(1).randint(cfg["bptt"] // 4, cfg["bptt"] + 1, cfg["batch"])


def jax_classifier_step(cfg):
  """Seed-003 shapes: embed -> 1-layer LSTM -> Dense(1) on the last state, BCE, Adam."""

  class Classifier(nn.Module):
    @nn.compact
    def __call__(self, tokens, lengths):
      x = nn.Embed(cfg["vocab"], cfg["embed"])(tokens)
      _, state = LSTMEncoder(1, cfg["hidden"])(x, lengths)
      return nn.Dense(1)(state[-1][1])[:, 0]

  model = Classifier()
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(0, cfg["vocab"], (cfg["batch"], cfg["bptt"])), jnp.int32)
  lengths = jnp.asarray(classifier_lengths(cfg), jnp.int32)
  labels = jnp.asarray(rng.randint(0, 2, (cfg["batch"],)), jnp.float32)
  params = model.init(jax.random.key(0), tokens, lengths)["params"]
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(p, o):
    def loss_fn(p):
      return jnp.mean(optax.sigmoid_binary_cross_entropy(model.apply({"params": p}, tokens,
                                                                      lengths), labels))
    loss, g = jax.value_and_grad(loss_fn)(p)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  state = {"p": params, "o": opt_state}

  def run():
    state["p"], state["o"], loss = step(state["p"], state["o"])
    return loss

  return run


# ----------------------------------------------------------------------------------------------
# PyTorch side: the best ordinary practice (cuDNN-style nn.LSTM on padded batches, fused loss).


class TorchLM(torch.nn.Module):
  def __init__(self, cfg, output):
    super().__init__()
    self.output = output
    self.vocab = cfg["vocab"]
    self.num_sampled = num_sampled(cfg)
    self.embed = torch.nn.Embedding(cfg["vocab"], cfg["embed"])
    self.lstm = torch.nn.LSTM(cfg["embed"], cfg["hidden"], cfg["layers"], batch_first=True)
    if output == "adaptive":
      self.decoder = torch.nn.AdaptiveLogSoftmaxWithLoss(
          cfg["hidden"], cfg["vocab"], list(adaptive_cutoffs(cfg)), div_value=4.0)
    else:
      self.decoder = torch.nn.Linear(cfg["hidden"], cfg["vocab"])
    v = self.vocab
    self.log_q = torch.log(torch.log1p(1.0 / (torch.arange(v, dtype=torch.float32) + 1.0))
                           / np.log(v + 1.0))

  def forward(self, inputs, targets):
    h, _ = self.lstm(self.embed(inputs))
    h = h.reshape(-1, h.shape[-1])
    t = targets.reshape(-1)
    if self.output == "adaptive":
      return self.decoder(h, t).loss
    if self.output == "full":
      return torch.nn.functional.cross_entropy(self.decoder(h), t)
    # Sampled softmax, same algorithm as jaxlm (shared log-uniform negatives, log-Q, hits).
    # F.embedding for the row gathers: its backward is far faster than index_put (w[t]).
    u = torch.rand(self.num_sampled)
    s = (torch.exp(u * np.log(self.vocab + 1.0)).floor().long() - 1).clamp(0, self.vocab - 1)
    w, b = self.decoder.weight, self.decoder.bias
    emb = torch.nn.functional.embedding
    s_logits = h @ emb(s, w).T + b[s] - self.log_q[s]
    t_logits = (h * emb(t, w)).sum(-1) + b[t] - self.log_q[t]
    s_logits = s_logits.masked_fill(s[None, :] == t[:, None], -1e30)
    logits = torch.cat([t_logits[:, None], s_logits], 1)
    return (torch.logsumexp(logits, 1) - t_logits).mean()


def torch_lm_step(cfg, output):
  torch.manual_seed(0)
  model = TorchLM(cfg, output)
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  rng = np.random.RandomState(0)
  shape = (cfg["batch"], cfg["bptt"])
  inputs = torch.tensor(zipf_ids(rng, cfg["vocab"], shape))
  targets = torch.tensor(zipf_ids(rng, cfg["vocab"], shape))

  def run():
    opt.zero_grad(set_to_none=True)
    loss = model(inputs, targets)
    loss.backward()
    opt.step()
    return loss

  return run


def torch_classifier_step(cfg):
  torch.manual_seed(0)
  embed = torch.nn.Embedding(cfg["vocab"], cfg["embed"])
  lstm = torch.nn.LSTM(cfg["embed"], cfg["hidden"], batch_first=True)
  head = torch.nn.Linear(cfg["hidden"], 1)
  params = list(embed.parameters()) + list(lstm.parameters()) + list(head.parameters())
  opt = torch.optim.Adam(params, lr=1e-3)
  rng = np.random.RandomState(0)
  tokens = torch.tensor(rng.randint(0, cfg["vocab"], (cfg["batch"], cfg["bptt"])))
  labels = torch.tensor(rng.randint(0, 2, (cfg["batch"],)), dtype=torch.float32)

  lengths = torch.tensor(classifier_lengths(cfg))

  def run():
    opt.zero_grad(set_to_none=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(embed(tokens), lengths, batch_first=True,
                                                     enforce_sorted=False)
    _, (hn, _) = lstm(packed)  # each row's state at its last valid step
    loss = torch.nn.functional.binary_cross_entropy_with_logits(head(hn[-1])[:, 0], labels)
    loss.backward()
    opt.step()
    return loss

  return run


# ----------------------------------------------------------------------------------------------


def lm_matmul_flops(cfg, output):
  """Matmul flops of one train step (forward x3 for forward + backward)."""
  n = cfg["batch"] * cfg["bptt"]
  e, h, v = cfg["embed"], cfg["hidden"], cfg["vocab"]
  lstm = sum(2 * n * ((e if i == 0 else h) + h) * 4 * h for i in range(cfg["layers"]))
  if output == "full":
    out = 2 * n * h * v
  elif output == "sampled":
    out = 2 * n * h * (num_sampled(cfg) + 1)
  elif output == "adaptive":
    cuts = list(adaptive_cutoffs(cfg)) + [v]
    out = 2 * n * h * (cuts[0] + len(cuts) - 1)
    for i in range(len(cuts) - 1):
      d = int(h // 4 ** (i + 1))
      out += 2 * n * (h * d + d * (cuts[i + 1] - cuts[i]))
  else:
    out = 0
  return 3 * (lstm + out)


def time_steps(run, steps, sync):
  """Step times, and the minor page faults of these steps (fresh pages from the allocator)."""
  times = []
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(steps):
    t0 = time.perf_counter()
    sync(run())
    times.append(time.perf_counter() - t0)
  return times, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def matmul_gflops(n=1024, reps=10):
  a = jnp.asarray(np.random.RandomState(0).randn(n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = min(time_steps(lambda: f(a), reps, lambda x: x.block_until_ready())[0])
  return 2 * n ** 3 / best / 1e9


def machine_info():
  cpu = "unknown"
  with open("/proc/cpuinfo") as fh:
    for line in fh:
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  return (f"nproc={os.cpu_count()} usable={NUM_THREADS} cpu={cpu!r} python={platform.python_version()} "
          f"jax={jax.__version__} torch={torch.__version__} torch_threads={torch.get_num_threads()}\n"
          f"uptime: {load}")


def bench(name, jax_run, torch_run, flops, tokens, rounds, steps):
  for run, sync in ((jax_run, lambda x: x.block_until_ready()), (torch_run, lambda x: x.item())):
    sync(run())  # compile / warm up
    sync(run())
  tj, tt, fj, ft = [], [], 0, 0
  for _ in range(rounds):
    times, faults = time_steps(jax_run, steps, lambda x: x.block_until_ready())
    tj, fj = tj + times, fj + faults
    times, faults = time_steps(torch_run, steps, lambda x: x.item())
    tt, ft = tt + times, ft + faults
  mj, mt = statistics.median(tj), statistics.median(tt)
  n = rounds * steps
  print(f"{name:24s} jax {mj * 1e3:8.1f} ms {tokens / mj:9.0f} tok/s {flops / mj / 1e9:6.1f} GF/s "
        f"{fj / n / 1e3:5.1f}k pf | torch {mt * 1e3:8.1f} ms {tokens / mt:9.0f} tok/s "
        f"{flops / mt / 1e9:6.1f} GF/s {ft / n / 1e3:5.1f}k pf | jax/torch speed {mt / mj:5.2f}x",
        flush=True)
  return mj, mt


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[ALLOCATOR_FLAG])
  parser.add_argument("--configs", default="quickstart,seed001,imdb,seed003,seed003ragged",
                      help="comma list of: " + ",".join(list(LM_CONFIGS) +
                                                       ["seed003", "seed003ragged"]))
  parser.add_argument("--outputs", default="full,adaptive,sampled")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()

  print(machine_info())
  print(f"matmul 1024^2 fp32 (jax): {matmul_gflops():.0f} GFLOP/s")
  print(f"rounds={args.rounds} steps/round={args.steps} allocator={args.allocator}; median step "
        f"time; GF/s = matmul flops of the step / time; pf = minor page faults per step")
  for name in args.configs.split(","):
    if name in ("seed003", "seed003ragged"):
      cfg = dict(vocab=25002, embed=100, hidden=256, batch=64, bptt=256,
                 ragged=name == "seed003ragged")
      n = int(classifier_lengths(cfg).sum())  # tokens: valid steps only
      flops = 3 * 2 * n * (cfg["embed"] + cfg["hidden"]) * 4 * cfg["hidden"]
      bench(f"{name} classifier", jax_classifier_step(cfg), torch_classifier_step(cfg), flops, n,
            args.rounds, args.steps)
      continue
    cfg = LM_CONFIGS[name]
    for output in args.outputs.split(","):
      bench(f"{name} {output}", jax_lm_step(cfg, output), torch_lm_step(cfg, output),
            lm_matmul_flops(cfg, output), cfg["batch"] * cfg["bptt"], args.rounds, args.steps)
  print(f"uptime after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
  main()
