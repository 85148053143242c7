"""The one training loop: epochs of jitted steps, progress, periodic eval, metrics and checkpoints.

Everything with a side effect happens here (or in the CLI): the steps it calls are pure. The loop is
task-agnostic: a `Task` (jaxlm/tasks.py) supplies the batches, the loss and how to read metrics, and
a freezing strategy supplies one train step per epoch. Rerunning on the same workdir resumes from
the latest checkpoint: same params, optimizer state, RNG, epoch and position in the epoch's batch
order.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxlm import distributed, metrics as metrics_lib, tracking
from jaxlm.errors import ConfigError, JaxlmError
from jaxlm.train import prefetch, signals, strategies


class DivergenceError(JaxlmError):
  """Training met a non-finite loss or gradient norm (and was told to stop on it)."""


@dataclasses.dataclass
class Devices:
  """Data parallelism over a 1-D mesh: params replicated, batches split along their first axis.

  The mesh spans the devices of every process of a multi-host run (jaxlm/distributed.py): each
  process passes the same global batch and the same params, and transfers only what its own
  devices hold.
  """
  mesh: jax.sharding.Mesh

  @classmethod
  def create(cls, num_devices: int = 0) -> "Devices":
    return cls(jax.sharding.Mesh(np.array(distributed.mesh_devices(num_devices)), ("data",)))

  @property
  def count(self) -> int:
    return self.mesh.devices.size

  def replicated(self, tree):
    return self._put(tree, jax.sharding.PartitionSpec())

  def shard_batch(self, batch):
    return self._put(batch, jax.sharding.PartitionSpec("data"))

  def _put(self, tree, spec):
    sharding = jax.sharding.NamedSharding(self.mesh, spec)
    if distributed.multiprocess():
      return distributed.put(tree, sharding)
    return jax.device_put(tree, sharding)

  def check_batch_size(self, batch_size: int, key: str) -> None:
    if batch_size % self.count:
      raise ConfigError(f"config.{key}={batch_size} is not divisible by the {self.count} devices "
                        "in use; change it or set config.train.num_devices")


@dataclasses.dataclass
class Hooks:
  """What the loop asks of the task and the strategy, besides the batches."""
  train_step_for_epoch: Callable[[int], Callable]   # strategy: one jitted step per phase
  evaluate: Callable[[Any], dict]                   # TrainState -> summarized eval metrics
  tokens_in: Callable[[dict], float]                # batch -> tokens processed (for tokens/s)
  carry_init: Callable[[], Any] | None = None       # stream-mode LM state between batches
  select_metric: str | None = None                  # keep the best checkpoint by this eval metric
  select_mode: str = "max"                          # "max" (accuracy) or "min" (loss)
  on_state_for_epoch: Callable[[int, Any], Any] | None = None  # e.g. new optimizer state on unfreeze
  learning_rate: Callable[[int], float] | None = None  # the optimizer's schedule, for logging


def fit(*, config, state, batches, hooks: Hooks, checkpointer, writer: metrics_lib.MetricsWriter,
        devices: Devices, meta: dict | None = None, carry: Any = None, progress: bool = True,
        verbose: bool = True):
  """Trains until config.train.num_epochs (or max_steps); returns (state, last eval metrics).

  `meta` is what the checkpoint restored (epoch, data position); None starts from scratch.
  `carry` is the stream-mode LSTM state the checkpoint restored: a run resumed mid-epoch goes on
  from it, as the uninterrupted run would (each epoch otherwise starts from `hooks.carry_init`).

  Failure handling: a batch with a non-finite loss or gradient norm leaves the state untouched
  (jaxlm/train/steps.py); with `train.on_nonfinite='stop'` the run stops at once with a
  DivergenceError naming the step and batch, with `'skip'` it goes on and counts skipped batches
  (up to `train.max_nonfinite_batches`). SIGINT/SIGTERM finish the current step, save, and raise
  `signals.Interrupted`. Checkpoints are also written every `train.checkpoint_every_minutes`, so
  a killed run loses at most that much work whatever its step cadence.

  Throughput: step metrics stay on the device until a step that logs, evaluates or saves
  (`metrics.StepWindow`), and a thread prepares the next `train.prefetch_batches` batches and their
  transfer while a step runs (jaxlm/train/prefetch.py), so the host never waits for each step.
  The non-finite check reads each step's flag at those steps, so a 'stop' may compute up to
  `log_every_steps - 1` more steps (never saved) before it stops naming the first bad one;
  `train.sync_every_step=True` fetches every step's metrics at once instead (slower).

  Each train row also has `learning_rate`: the schedule's rate at that step (the top layer
  group's with discriminative rates); rows also go to TensorBoard (jaxlm/tracking.py).
  """
  tcfg = config.train
  meta = dict(meta or {})
  if meta.get("batches"):
    batches.set_state(meta["batches"])
  best = meta.get("best")
  last_eval: dict = meta.get("last_eval", {})
  skipped = int(meta.get("skipped_batches", 0))
  on_nonfinite = tcfg.get("on_nonfinite", "stop")
  max_nonfinite = int(tcfg.get("max_nonfinite_batches", 20))
  save_every_seconds = 60.0 * float(tcfg.get("checkpoint_every_minutes", 10.0) or 0.0)
  step = int(jax.device_get(state.step))
  last_saved = {"step": step, "time": time.monotonic()}
  # Wall-clock of training summed over every process that worked on the run (a resumed run
  # reports the whole run's, not only its last leg's).
  seconds_before, started = float(meta.get("train_seconds", 0.0)), time.monotonic()
  steps_per_epoch = batches.num_batches_per_epoch
  # In a multi-host run only process 0 shows progress and prints (jaxlm/distributed.py).
  primary = distributed.is_primary()
  progress = progress and primary

  def say(message: str) -> None:  # `verbose=False` (the Python API): the bars only
    if primary and verbose:
      bar.write(message)

  def due(every: int, epoch_done: bool) -> bool:  # every == 0: at the end of each epoch only
    return epoch_done or step >= max_steps or (every > 0 and step % every == 0)

  max_steps = tcfg.max_steps or tcfg.num_epochs * steps_per_epoch
  # The optimizer's own schedule (jaxlm/commands.py passes the one it built the optimizer with;
  # otherwise config.optim over the run's length); the top group's multiplier is 1.
  schedule = hooks.learning_rate or (
      strategies.make_schedule(config.optim, max_steps) if "optim" in config else None)
  depth = int(tcfg.get("prefetch_batches", 2))
  sync_every_step = bool(tcfg.get("sync_every_step", False))
  window = metrics_lib.StepWindow()
  last = {}  # the latest fetched step: its grad norm and the schedule count it was applied at
  # purge_step (a resumed run): TensorBoard hides what the interrupted run logged after its checkpoint.
  board = tracking.TensorBoardWriter.open(writer.path.parent, enabled=tcfg.get("tensorboard", True),
                                          purge_step=step + 1 if step else None)

  def emit(record: dict) -> None:
    writer.write(record)
    board.write(record)

  def save():
    record = {"epoch": batches.epoch, "batches": batches.get_state(), "last_eval": last_eval,
              "best": best, "skipped_batches": skipped,
              "train_seconds": seconds_before + time.monotonic() - started}
    # Rank a step for "best" only when it improved the selection metric, so ties (e.g. the extra
    # eval at a max_steps stop) never replace the earlier best: the checkpointer's best step and
    # `best["step"]` agree, and a resumed run selects exactly what an uninterrupted one does.
    improved = best is not None and best["step"] == step
    checkpointer.save(step, state_dict(state, carry), record,
                      metrics=last_eval if improved else None)
    last_saved.update(step=step, time=time.monotonic())
    board.flush()

  def saved_note():
    steps = checkpointer.all_steps()
    return f"last checkpoint: step {steps[-1]}" if steps else "no checkpoint was written yet"

  def diverged(batch_metrics, step, epoch, index):
    return DivergenceError(
        f"step {step}: non-finite loss or gradient norm (grad norm "
        f"{float(batch_metrics['grad_norm']):.4g}) on batch {index + 1} of epoch {epoch + 1}; "
        f"training stopped without applying it ({saved_note()}). "
        "Lower config.optim.learning_rate (or raise optim.grad_clip), or set "
        "config.train.on_nonfinite=skip to skip such batches")

  def drain():
    """Fetches the pending steps' metrics (one transfer) into the logging window's sums, in step
    order, acting on each non-finite batch as the step that met it would have."""
    nonlocal total, skipped
    for (at, epoch, index), batch_metrics in window.fetch():
      # The schedule counts steps, skipped batches included (steps.with_schedule_of).
      last.update(grad_norm=float(batch_metrics["grad_norm"]), count=at - 1)
      if float(batch_metrics["nonfinite"]):
        skipped += 1
        if on_nonfinite == "stop" or skipped > max_nonfinite:
          bar.close()
          checkpointer.wait_until_finished()
          error = diverged(batch_metrics, at, epoch, index)
          if on_nonfinite != "stop":
            error = DivergenceError(f"{skipped} batches skipped for non-finite values (more than "
                                    f"config.train.max_nonfinite_batches={max_nonfinite}); "
                                    f"the last: {error}")
          raise error
        say(f"step {at}: skipped batch {index + 1} of epoch {epoch + 1} (non-finite "
            f"loss or gradient norm; {skipped} skipped so far)")
      total = metrics_lib.accumulate(total, {k: v for k, v in batch_metrics.items()
                                             if k not in ("grad_norm", "nonfinite")})

  with signals.StopRequest() as stop, contextlib.ExitStack() as cleanup:
    cleanup.callback(board.close)
    while batches.epoch < tcfg.num_epochs and step < max_steps:
      epoch = batches.epoch
      train_step = hooks.train_step_for_epoch(epoch)
      if hooks.on_state_for_epoch is not None:
        state = hooks.on_state_for_epoch(epoch, state)
      resumed_mid_epoch = carry is not None and batches.index > 0
      if not resumed_mid_epoch:
        carry = hooks.carry_init() if hooks.carry_init else None
      total, tokens, t0 = None, 0.0, time.perf_counter()
      bar = tqdm(total=steps_per_epoch, initial=batches.index, desc=f"epoch {epoch + 1}/{tcfg.num_epochs}",
                 disable=not progress, dynamic_ncols=True, mininterval=1.0)
      stream = cleanup.enter_context(prefetch.EpochPrefetch(batches, epoch, devices.shard_batch,
                                                            depth))
      for batch, device_batch in stream:
        index = (batches.index - 1) % steps_per_epoch  # this batch's position in its epoch
        state, batch_metrics, carry = train_step(state, device_batch, carry)
        step += 1
        window.add((step, epoch, index), batch_metrics)
        epoch_done = batches.epoch != epoch
        tokens += hooks.tokens_in(batch)
        bar.update(1)
        # Also at max_steps: a run stopped there must not drop its last, partial logging window.
        log_due = step % tcfg.log_every_steps == 0 or epoch_done or step >= max_steps
        eval_due = due(tcfg.eval_every_steps, epoch_done)
        if sync_every_step or log_due or eval_due:
          drain()
        if log_due:
          summary = metrics_lib.summarize(total)
          elapsed = time.perf_counter() - t0
          summary.update(tokens_per_sec=tokens / max(elapsed, 1e-9), grad_norm=last["grad_norm"])
          if schedule is not None:
            summary["learning_rate"] = float(schedule(last["count"]))
          if skipped:
            summary["skipped_batches"] = skipped
          bar.set_postfix(_postfix(summary, last_eval), refresh=False)
          emit({"step": step, "epoch": epoch + 1, "split": "train", **_scalars(summary)})
          total, tokens, t0 = None, 0.0, time.perf_counter()
        if eval_due:
          last_eval = hooks.evaluate(state)
          if last_eval:
            emit({"step": step, "epoch": epoch + 1, "split": "valid", **_scalars(last_eval)})
            say(f"step {step}: valid " + ", ".join(f"{k} {v:.4g}" for k, v in _scalars(last_eval).items()
                                                          if k != "count"))
          if hooks.select_metric and last_eval:
            # The better metric wins; a tie goes to the lower validation loss (small validation
            # sets make accuracy ties common, and loss separates them).
            value, loss = last_eval[hooks.select_metric], last_eval.get("loss", float("inf"))
            sign = 1.0 if hooks.select_mode == "max" else -1.0
            if best is None or (sign * value, -loss) > (sign * best["value"],
                                                        -best.get("loss", float("inf"))):
              best = {"value": value, "loss": loss, "step": step, "epoch": epoch + 1}
        # A background save that failed (a full disk) stops the run here, not one interval later.
        checkpointer.check_for_errors()
        overdue = save_every_seconds > 0 and time.monotonic() - last_saved["time"] >= save_every_seconds
        # Every process saves at the same steps (orbax's save is collective) and stops at the same
        # step, whichever process's clock or signal asked for it.
        overdue, signum = distributed.agree(overdue, stop.signum or 0)
        if signum and not stop.signum:
          stop.signum = signum
        if due(tcfg.checkpoint_every_steps, epoch_done) or overdue or signum:
          drain()  # a checkpoint never holds a state past a non-finite batch that should stop it
          save()
        if signum:
          bar.close()
          checkpointer.wait_until_finished()
          raise signals.Interrupted(
              f"stopped by {stop.name} at step {step} (epoch {epoch + 1}); checkpoint saved in "
              f"{checkpointer.directory}; rerun the same command to resume", stop.signum)
        if step >= max_steps:
          break
      bar.close()
  checkpointer.wait_until_finished()
  return state, {"last_eval": last_eval, "best": best, "step": step, "epoch": batches.epoch,
                 "skipped_batches": skipped,
                 "train_seconds": seconds_before + time.monotonic() - started}


def state_dict(state, carry: Any = None) -> dict:
  """The checkpointed form of a TrainState: a plain dict, as jaxlm/checkpoint.py stores it.

  Stream-mode LM training also stores `carry`, the LSTM state the next batch starts from: without
  it a resumed run would restart that state at zero and diverge from the uninterrupted run. A
  model with batch statistics stores them as `model_state` (other runs' checkpoints lack the key).
  """
  out = {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}
  if state.model_state:
    out["model_state"] = state.model_state
  if carry is not None:
    out["carry"] = carry
  return out


def _scalars(summary: dict) -> dict:
  return {k: v for k, v in summary.items() if isinstance(v, (int, float))}


def _postfix(summary: dict, last_eval: dict | None = None) -> dict:
  """Progress-bar fields: this logging window's train metrics, then the latest held-out ones
  (for a sampled-softmax LM the held-out perplexity is the only perplexity there is)."""
  keys = ("loss", "perplexity", "accuracy", "tokens_per_sec")
  out = {k.replace("tokens_per_sec", "tok/s"): f"{summary[k]:.4g}" for k in keys if k in summary}
  short = {"perplexity": "valid_ppl", "accuracy": "valid_acc"}
  out.update({short[k]: f"{v:.4g}" for k, v in (last_eval or {}).items() if k in short})
  return out
