"""Side-by-side train-step throughput: jaxlm's TransformerClassifier vs the same PyTorch model.

Why side by side in one run: this shared 2-core machine is noisy, so only numbers measured in the
same process, alternating between models, compare (the machinery lives in scripts/bench_lm.py and
is reused: allocator flag, thread setup, step timing, the matmul rate, machine info).

A "step" is one jitted `value_and_grad` of the BCE-with-logits loss plus an optax Adam update, with
the train state donated (PyTorch: forward, backward, torch.optim.Adam.step). Same shapes, fp32,
the same dropout (0.1 on embeddings, after attention and in/after the FFN; none on attention
weights, our default), ragged lengths (uniform in [T/4, T], key padding masked) and masked mean
pooling everywhere. Rows:
- `jaxlm post` / `jaxlm pre`: TransformerClassifier with norm='post' (torch's default) / 'pre'.
- `flax naive` (`--naive`): a plain Flax encoder (nn.MultiHeadDotProductAttention, separate q/k/v
  projections, post-norm), what a straightforward port would write.
- `torch post` / `torch pre`: nn.Embedding + nn.TransformerEncoder(batch_first, norm_first=False /
  True with a final LayerNorm) + masked mean + nn.Linear, torch.optim.Adam.

GF/s counts matmul flops only (see `train_matmul_flops`) so it compares with the plain 1024^2
matmul measured in the same run (`% mm`). `--breakdown` profiles our post-norm step and sums the
time of its XLA ops by the part of the model they come from.

Usage:
  .venv/bin/python scripts/bench_transformer.py --naive --rounds 3 --steps 5
  .venv/bin/python scripts/bench_transformer.py --configs seed004 --breakdown
"""
import argparse
import collections
import glob
import math
import os
import re
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lm  # noqa: E402  (first: allocator and thread setup before jax/torch start threads)
from bench_lm import (ALLOCATOR_FLAG, classifier_lengths, machine_info, matmul_gflops,  # noqa: E402
                      time_steps)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

from jaxlm.models.classifiers import masked_pool  # noqa: E402
from jaxlm.models.transformer import TransformerClassifier, sinusoidal_positions  # noqa: E402

CONFIGS = {
    "seed004": dict(vocab=16000, d=128, heads=4, layers=2, ffn=512, batch=32, steps=256),
    "large": dict(vocab=16000, d=256, heads=8, layers=4, ffn=1024, batch=32, steps=256),
}


def train_matmul_flops(cfg):
  """Matmul flops of one train step, padding included (attention is dense over T).

  Per layer, forward, with N = B*T tokens: QKV 2*N*d*3d + output projection 2*N*d*d
  + FFN 2 * 2*N*d*ffn + scores QK^T 2*B*T*T*d + weighted values PV 2*B*T*T*d
  = 2*N*d*(4d + 2*ffn) + 4*B*T^2*d. Backward = 2x forward (input and weight gradients; the
  embedding is trained, so layer 0 needs its input gradient too) -> x3. The embedding lookup, its
  scatter-add gradient and the [d,1] head are ~0 matmul flops.
  """
  n, d, t = cfg["batch"] * cfg["steps"], cfg["d"], cfg["steps"]
  layer = 2 * n * d * (4 * d + 2 * cfg["ffn"]) + 4 * cfg["batch"] * t * t * d
  return 3 * cfg["layers"] * layer


def batch(cfg, seed=0):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, cfg["vocab"], (cfg["batch"], cfg["steps"]))
  lengths = classifier_lengths(dict(batch=cfg["batch"], bptt=cfg["steps"], ragged=True))
  labels = rng.randint(0, 2, (cfg["batch"],)).astype(np.float32)
  return tokens, lengths, labels


# ----------------------------------------------------------------------------------------------
# JAX side.


class NaiveEncoderClassifier(nn.Module):
  """The straightforward Flax port: nn.MultiHeadDotProductAttention (separate q/k/v projections),
  post-norm, a [B,1,1,T] key padding mask, masked mean pooling."""
  cfg: dict
  dropout: float

  @nn.compact
  def __call__(self, tokens, lengths, *, deterministic=True):
    c = self.cfg
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=deterministic)
    x = nn.Embed(c["vocab"], c["d"])(tokens) * math.sqrt(c["d"])
    x = drop(x + sinusoidal_positions(tokens.shape[1], c["d"])[None])
    mask = (jnp.arange(tokens.shape[1])[None, :] < lengths[:, None])[:, None, None, :]
    for _ in range(c["layers"]):
      y = nn.MultiHeadDotProductAttention(c["heads"], deterministic=True)(x, mask=mask)
      x = nn.LayerNorm(1e-5)(x + drop(y))
      y = nn.Dense(c["d"])(drop(nn.relu(nn.Dense(c["ffn"])(x))))
      x = nn.LayerNorm(1e-5)(x + drop(y))
    return nn.Dense(1)(masked_pool(x, None, lengths, "mean"))


def jax_model(cfg, kind, dropout):
  if kind == "naive":
    return NaiveEncoderClassifier(cfg, dropout)
  return TransformerClassifier(cfg["vocab"], cfg["d"], cfg["heads"], cfg["layers"], cfg["ffn"],
                               max_len=cfg["steps"], dropout=dropout, norm=kind)


def jax_parts(cfg, kind, dropout):
  """(loss_fn(params, key), params, optimizer) of one model on the benchmark batch."""
  model = jax_model(cfg, kind, dropout)
  tokens, lengths, labels = (jnp.asarray(a) for a in batch(cfg))
  tokens, lengths = tokens.astype(jnp.int32), lengths.astype(jnp.int32)
  params = model.init(jax.random.key(0), tokens, lengths)["params"]

  def loss_fn(p, key):
    logits = model.apply({"params": p}, tokens, lengths, deterministic=False,
                         rngs={"dropout": key})
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits[:, 0], labels))

  return loss_fn, params, optax.adam(1e-3)


def jax_step(cfg, kind, dropout):
  loss_fn, params, tx = jax_parts(cfg, kind, dropout)

  def step(p, o, key):
    key, sub = jax.random.split(key)
    loss, g = jax.value_and_grad(loss_fn)(p, sub)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, key, loss

  step = jax.jit(step, donate_argnums=(0, 1, 2))
  state = [params, tx.init(params), jax.random.key(1)]

  def run():
    state[0], state[1], state[2], loss = step(*state)
    return loss

  return run, step, state


# ----------------------------------------------------------------------------------------------
# PyTorch side.


class TorchClassifier(torch.nn.Module):
  def __init__(self, cfg, norm_first, dropout):
    super().__init__()
    d = cfg["d"]
    self.embed = torch.nn.Embedding(cfg["vocab"], d)
    layer = torch.nn.TransformerEncoderLayer(d, cfg["heads"], cfg["ffn"], dropout=dropout,
                                             batch_first=True, norm_first=norm_first)
    self.encoder = torch.nn.TransformerEncoder(
        layer, cfg["layers"], norm=torch.nn.LayerNorm(d) if norm_first else None,
        enable_nested_tensor=False)
    for lay in self.encoder.layers:
      lay.self_attn.dropout = 0.0  # as ours: no dropout on the attention weights
    self.head = torch.nn.Linear(d, 1)
    self.register_buffer("pos", torch.from_numpy(sinusoidal_positions(cfg["steps"], d)))
    self.scale = math.sqrt(d)

  def forward(self, tokens, lengths):
    pad = torch.arange(tokens.shape[1])[None, :] >= lengths[:, None]
    x = self.embed(tokens) * self.scale + self.pos[: tokens.shape[1]]
    y = self.encoder(x, src_key_padding_mask=pad)
    mean = (y * (~pad)[..., None]).sum(1) / lengths[:, None]
    return self.head(mean)[:, 0]


def torch_step(cfg, norm_first, dropout):
  torch.manual_seed(0)
  model = TorchClassifier(cfg, norm_first, dropout).train()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  tokens, lengths, labels = (torch.from_numpy(np.asarray(a)) for a in batch(cfg))
  tokens, lengths = tokens.long(), lengths.long()

  def run():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(tokens, lengths), labels)
    loss.backward()
    opt.step()
    return loss

  return run


# ----------------------------------------------------------------------------------------------
# Where our step's time goes: profile it, sum XLA op durations by the module they come from.

CATEGORIES = (  # first match on the op's source path (HLO metadata op_name) wins
    ("dropout (rng + masks)", r"Dropout"),
    ("attention core (QK^T, softmax, PV)", r"/attn/(?!qkv|out)"),
    ("QKV + output projections", r"/attn/(qkv|out)"),
    ("FFN matmuls + activation", r"/ffn_"),
    ("LayerNorms", r"/norm_|final_norm"),
    ("embedding gather + grad", r"/embed/"),
    ("Adam update, loss", r"^(?!.*TransformerClassifier)"),
)


def breakdown(cfg, dropout, steps=3):
  run, step, state = jax_step(cfg, "post", dropout)
  for _ in range(2):
    run().block_until_ready()
  hlo = step.lower(*state).compile().as_text()
  source = {}  # fused op name -> op_name metadata of its root
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]+)\"", line)
    if m:
      source.setdefault(m.group(1), m.group(2))
  logdir = tempfile.mkdtemp(prefix="bench-transformer-")
  with jax.profiler.trace(logdir):
    for _ in range(steps):
      run().block_until_ready()
  data = jax.profiler.ProfileData.from_file(
      glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0])
  totals = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if line.name == "python":
        continue
      for event in line.events:
        if event.name not in source:
          continue
        path = source[event.name]
        cat = next((c for c, rx in CATEGORIES if re.search(rx, path)), "other")
        totals[cat] += event.duration_ns
  total = sum(totals.values())
  print(f"\nbreakdown of `jaxlm post` ({steps} profiled steps): XLA op time per step, summed over "
        f"threads (ops of one step run on up to {bench_lm.NUM_THREADS} threads)")
  print("| part | ms/step | share |\n|---|---:|---:|")
  for cat, ns in totals.most_common():
    print(f"| {cat} | {ns / steps / 1e6:.1f} | {100 * ns / total:.0f}% |")
  print(f"| total | {total / steps / 1e6:.1f} | |")


# ----------------------------------------------------------------------------------------------


def bench(name, cfg, runners, rounds, steps):
  """Alternating rounds: each round times `steps` steps of every runner in turn."""
  times = {label: [] for label, _, _ in runners}
  for _, run, sync in runners:
    sync(run())  # compile / warm up
    sync(run())
  rates = []
  for _ in range(rounds):
    rates.append(matmul_gflops())
    for label, run, sync in runners:
      times[label] += time_steps(run, steps, sync)[0]
  rate = statistics.median(rates)
  flops, tokens = train_matmul_flops(cfg), cfg["batch"] * cfg["steps"]
  print(f"\n### {name}: V {cfg['vocab']}, d {cfg['d']}, {cfg['heads']} heads, {cfg['layers']} "
        f"layers, FFN {cfg['ffn']}, B {cfg['batch']}, T {cfg['steps']}; "
        f"{flops / 1e9:.1f} GFLOP/step; matmul {rate:.0f} GFLOP/s (rounds: "
        f"{', '.join(f'{r:.0f}' for r in rates)})")
  print("| model | ms/step | tokens/s | GFLOP/s | % of matmul | torch (same norm) / this |")
  print("|---|---:|---:|---:|---:|---:|")
  med = {label: statistics.median(t) for label, t in times.items()}
  for label, _, _ in runners:
    ref = med.get("torch " + ("pre" if label.endswith("pre") else "post"))
    print(f"| {label} | {med[label] * 1e3:.0f} | {tokens / med[label]:.0f} | "
          f"{flops / med[label] / 1e9:.1f} | {100 * flops / med[label] / 1e9 / rate:.0f}% | "
          f"{ref / med[label]:.2f}x |")
  sys.stdout.flush()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[ALLOCATOR_FLAG])
  parser.add_argument("--configs", default="seed004,large",
                      help="comma list of: " + ",".join(CONFIGS))
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--dropout", type=float, default=0.1)
  parser.add_argument("--naive", action="store_true", help="add the plain-Flax encoder row")
  parser.add_argument("--no-pre", action="store_true", help="skip the pre-norm rows")
  parser.add_argument("--breakdown", action="store_true",
                      help="also profile our post-norm step and print where its time goes")
  args = parser.parse_args()

  print(machine_info())
  print(f"rounds={args.rounds} steps/round={args.steps} allocator={args.allocator} "
        f"dropout={args.dropout}; median step time")
  jax_sync, torch_sync = (lambda x: x.block_until_ready()), (lambda x: x.item())
  for name in args.configs.split(","):
    cfg = CONFIGS[name]
    norms = ("post",) if args.no_pre else ("post", "pre")
    runners = [(f"jaxlm {n}", jax_step(cfg, n, args.dropout)[0], jax_sync) for n in norms]
    if args.naive:
      runners.append(("flax naive post", jax_step(cfg, "naive", args.dropout)[0], jax_sync))
    runners += [(f"torch {n}", torch_step(cfg, n == "pre", args.dropout), torch_sync)
                for n in norms]
    bench(name, cfg, runners, args.rounds, args.steps)
    if args.breakdown:
      breakdown(cfg, args.dropout)
  print(f"\n{machine_info().splitlines()[-1].replace('uptime', 'uptime after')}")


if __name__ == "__main__":
  main()
