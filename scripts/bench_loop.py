"""Steps/s of the real training loop (jaxlm/train/loop.py) with and without its throughput settings.

Variants, in one process, on the same task, the same jitted step and one continuing train state,
alternating round by round (this 2-core machine is shared and noisy: only numbers measured side
by side compare):

  old       train.sync_every_step=True,  train.prefetch_batches=0: every step's metrics fetched to
            the host at once, the next batch built and transferred after that (the loop before)
  new       the defaults: metrics stay on the device until a logging/eval/checkpoint step, a
            thread prepares the next 2 batches and their transfer while the step runs
  sync      (--all) new, but fetching every step: what prefetching alone gives
  prefetch  (--all) new, but without the prefetch thread: what deferred fetching alone gives

A round runs `--steps` steps of `loop.fit` per variant: the config's logging cadence, no
checkpoint writes, no evaluation, no TensorBoard (each is the same in every variant). The time is
the wall clock of the `fit` call, so a variant that ends with steps still queued on the device
gets no credit for them (the last step always fetches its metrics). It also times building one
host batch, the part prefetching can hide.

Usage:
  .venv/bin/python scripts/bench_loop.py --config imdb_lm --source jsonl:PATH --rounds 5 --steps 40
  .venv/bin/python scripts/bench_loop.py --config quickstart:pretrain --all
(PATH: a folder of train/test/unsup `.jsonl.gz` files; the default source is the config's own.)
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

# Before jax is imported: the tests' simulated multi-device flag must not leak into timings.
os.environ.pop("XLA_FLAGS", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jaxlm import malloc  # noqa: E402

malloc.tune()  # what the jaxlm CLI does first (jaxlm/malloc.py)

import jax  # noqa: E402

from jaxlm import config as config_lib, metrics, tasks  # noqa: E402
from jaxlm.train import loop, steps, strategies  # noqa: E402

VARIANTS = {
    "old": dict(sync_every_step=True, prefetch_batches=0),
    "new": dict(sync_every_step=False, prefetch_batches=2),
    "sync": dict(sync_every_step=True, prefetch_batches=2),
    "prefetch": dict(sync_every_step=False, prefetch_batches=0),
}


class NoCheckpoints:
  """What `loop.fit` asks of a checkpointer, keeping nothing: saves are not what is measured."""
  directory = "(none)"

  def save(self, *args, **kwargs):
    pass

  def wait_until_finished(self):
    pass

  def check_for_errors(self):
    pass

  def all_steps(self):
    return []


def build(name: str, source: str | None, train_split: str | None):
  config = config_lib.get_config(*name.split(":", 1))
  if source:
    config.data.source = source
  if train_split:
    config.data.train_split = train_split
  config.train.update(num_devices=1, tensorboard=False, eval_every_steps=0,
                      checkpoint_every_steps=0, checkpoint_every_minutes=0.0)
  config_lib.validate(config)
  t0 = time.perf_counter()
  task = tasks.build_task(config)
  print(f"task: {task.info} in {time.perf_counter() - t0:.0f} s; "
        f"{task.train_batches.num_batches_per_epoch} batches/epoch", flush=True)
  return config, task


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="imdb_lm", help="a shipped config or file (NAME[:part])")
  parser.add_argument("--source", default=None, help="override config.data.source, e.g. jsonl:PATH")
  parser.add_argument("--train-split", default=None, help="override config.data.train_split")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=40, help="steps per variant per round")
  parser.add_argument("--warmup", type=int, default=10, help="steps before timing (compiles)")
  parser.add_argument("--all", action="store_true", help="also time each change alone")
  args = parser.parse_args()

  config, task = build(args.config, args.source, args.train_split)
  devices = loop.Devices.create(1)
  seed = config.train.seed
  params = task.init_params(seed)
  plan = strategies.make_strategy(config.get("finetune"), params, task.family)
  horizon = 10 ** 6  # the schedule's length: irrelevant to speed
  tx = strategies.build_optimizer(config.optim, params, plan, 0, horizon)
  train_step = steps.make_train_step(task.loss_fn, tx, plan.trainable_mask(params, 0))
  state = devices.replicated(steps.create_state(params, tx, seed))
  hooks = loop.Hooks(train_step_for_epoch=lambda epoch: train_step, evaluate=lambda p: {},
                     tokens_in=task.tokens_in, carry_init=task.carry_init())
  batches = task.train_batches
  workdir = tempfile.mkdtemp(prefix="jaxlm-bench-loop-")
  writer = metrics.MetricsWriter(workdir)
  config.train.num_epochs = 10 ** 6  # max_steps ends every call

  def run(variant: str, count: int) -> float:
    nonlocal state
    config.train.update(**VARIANTS[variant])
    config.train.max_steps = int(jax.device_get(state.step)) + count
    start = time.perf_counter()
    state, _ = loop.fit(config=config, state=state, batches=batches, hooks=hooks,
                        checkpointer=NoCheckpoints(), writer=writer, devices=devices,
                        progress=False)
    return count / (time.perf_counter() - start)

  # Build-only cost of a host batch: what the prefetch thread takes off the loop's path.
  t0 = time.perf_counter()
  for i in range(20):
    batches.batch(0, i % batches.num_batches_per_epoch)
  build_ms = (time.perf_counter() - t0) / 20 * 1e3

  run("new", args.warmup)  # compiles every bucket shape met so far
  names = ["old", "new"] + (["sync", "prefetch"] if args.all else [])
  rates = {n: [] for n in names}
  for r in range(args.rounds):
    order = names if r % 2 == 0 else names[::-1]
    for name in order:
      rates[name].append(run(name, args.steps))
    print(f"round {r + 1}: " + ", ".join(f"{n} {rates[n][-1]:.3f}" for n in names) + " steps/s",
          flush=True)

  cpu = platform.processor() or platform.machine()
  print(f"\n{args.config} ({config.model.name}, batch {config.data.batch_size}), "
        f"{args.rounds} rounds x {args.steps} steps, log_every_steps={config.train.log_every_steps}, "
        f"{os.cpu_count()} cores {cpu}, load average {os.getloadavg()[0]:.1f}")
  print(f"host batch build: {build_ms:.2f} ms")
  for name in names:
    print(f"{name:>9}: median {statistics.median(rates[name]):.3f} steps/s "
          f"({1e3 / statistics.median(rates[name]):.0f} ms/step)")
  paired = [b / a for a, b in zip(rates["old"], rates["new"])]
  print(f"new / old per round: {', '.join(f'{x:.3f}' for x in paired)} "
        f"(median {statistics.median(paired):.3f})")


if __name__ == "__main__":
  main()
