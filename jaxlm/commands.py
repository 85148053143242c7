"""What each `jaxlm` command does, as plain functions (the CLI only parses flags and calls these).

Bad input fails before anything is written: the config is validated and the data read and tokenized
before the workdir is touched, so a typo in a source string leaves no half-made run behind. A
workdir that already holds checkpoints is resumed, with the tokenizer saved in it.
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import time

import jax
import numpy as np

from jaxlm import checkpoint, config as config_lib, graft, metrics, params as params_lib
from jaxlm import baseline, distributed, files, tasks, tokenizers
from jaxlm.errors import ConfigError, GraftError
from jaxlm.train import loop, steps, strategies


_verbose = True  # the CLI prints its progress lines; the Python API turns them off (`verbosity`)


@contextlib.contextmanager
def verbosity(verbose: bool):
  """Whether commands (and the training loop under them) print their progress lines while inside:
  the Python API (jaxlm/api.py) runs them quietly and returns what they would have printed."""
  global _verbose
  before, _verbose = _verbose, bool(verbose)
  try:
    yield
  finally:
    _verbose = before


def _log(msg: str) -> None:
  if _verbose and distributed.is_primary():  # a multi-host run prints once (jaxlm/distributed.py)
    print(msg, flush=True)


def _latest_step(workdir: pathlib.Path):
  if not (workdir / "checkpoints").is_dir():
    return None
  with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
    return ckpt.latest_step()


# What a run writes in its workdir; `--overwrite` removes exactly these before starting over.
RUN_FILES = ("checkpoints", "tokenizer", "config.json", "summary.json", "metrics.jsonl",
             "metrics.png", "graft_report.txt", "graft_report.json", "tensorboard")


def _prepare(config, workdir: pathlib.Path, kinds: tuple[str, ...], tokenizer=None,
             overwrite=False):
  """Validated config + task; the tokenizer is the workdir's when resuming, else `tokenizer` (the
  pretrained model's, when grafting) or a new one trained on the train split.

  A workdir is one run: resuming with a config that differs in anything but the RESUMABLE_KEYS
  (jaxlm/config.py) is refused, listing the changes, unless `overwrite` starts over. The test
  split is read here too, so a bad one fails before training, not after it.
  """
  config_lib.validate(config)
  if config.task not in kinds:
    raise ConfigError(f"config.task={config.task!r}, but this command trains a {' or '.join(kinds)}; "
                      f"use a config built on jaxlm.config.{kinds[0]}_config() (see configs/)")
  resuming = _latest_step(workdir) is not None and not overwrite
  if resuming:
    changes = config_lib.changed_keys(checkpoint.load_config(workdir), config)
    if changes:
      raise ConfigError(f"{workdir} holds a run with another config ({'; '.join(changes)}); "
                        "resume with the same config, use another --workdir, or pass --overwrite "
                        "to start over")
    tokenizer = tokenizers.load_tokenizer(workdir / "tokenizer")
  task = tasks.build_task(config, tokenizer)
  tasks.read_split(config, config.data.test_split, labeled=task.kind.labeled,
                   max_examples=config.data.test_max_examples)
  return task, resuming


def _start_over(workdir: pathlib.Path) -> None:
  """`--overwrite`: removes the previous run's files (and nothing else) from the workdir."""
  import shutil
  for name in RUN_FILES:
    path = workdir / name
    if path.is_dir():
      shutil.rmtree(path)
    elif path.exists():
      path.unlink()


def _schedule_change(saved, config) -> str:
  """A resumed run may change its length (RESUMABLE_KEYS), but a decaying schedule is a function
  of the length: say that the rate now follows the new one rather than continuing the old."""
  keys = ("num_epochs", "max_steps")
  old, new = ([int(c.train.get(k) or 0) for k in keys] for c in (saved, config))
  if old == new or config.optim.schedule == "constant":
    return ""
  change = "; ".join(f"train.{k} {a} -> {b}" for k, a, b in zip(keys, old, new) if a != b)
  return (f"; {change}: the {config.optim.schedule} learning-rate schedule now spans the new "
          "length, so the rate jumps to where that schedule is at this step")


def _total_steps(config, task) -> int:
  per_epoch = task.train_batches.num_batches_per_epoch
  return config.train.max_steps or config.train.num_epochs * per_epoch


def train(config, workdir, *, kinds=("lm", "classifier"), init_params=None, graft_map=None,
          tokenizer=None, progress=True, overwrite=False) -> dict:
  """Shared by pretrain and finetune: build, (resume,) fit, evaluate the best or last state.

  `init_params` (grafted by `graft_map`, an assignment map) start a new run; a resumed run reads
  its own checkpoint instead. The workdir is locked (jaxlm/files.py) from here until the caller
  releases `run["lock"]`, after its test pass."""
  workdir = pathlib.Path(workdir)
  task, resuming = _prepare(config, workdir, kinds, tokenizer, overwrite)
  created = not workdir.exists()
  # A multi-host run: every process has read the workdir before process 0, alone, locks and
  # changes it (jaxlm/distributed.py).
  distributed.barrier("jaxlm: prepared")
  lock = files.WorkdirLock(workdir, ConfigError)
  distributed.once(lock.acquire)
  try:
    if overwrite:
      distributed.once(_start_over, workdir)
    run = _train_locked(config, workdir, task, resuming, init_params, graft_map, progress)
  except BaseException:
    lock.release()
    if created and distributed.is_primary() and workdir.is_dir() and not any(workdir.iterdir()):
      workdir.rmdir()  # a run that failed before writing anything leaves no workdir behind
    raise
  run["lock"] = lock
  return run


def _train_locked(config, workdir, task, resuming, init_params, graft_map, progress) -> dict:
  distributed.check_same({"batch": task.example_batch(),
                          "batches": np.int64(task.train_batches.num_batches_per_epoch)},
                         "the training batches (data or tokenizer)")
  devices = loop.Devices.create(config.train.num_devices)
  devices.check_batch_size(config.data.batch_size, "data.batch_size")
  devices.check_batch_size(config.data.eval_batch_size, "data.eval_batch_size")
  seed = config.train.seed
  params, model_state = task.init_variables(seed)  # model_state: batch statistics, or {}
  report = None
  if init_params is not None and not resuming:
    params, report = graft.graft(init_params, params, graft_map)
  plan = strategies.make_strategy(config.get("finetune"), params, task.family)
  total_steps = _total_steps(config, task)
  starts = strategies.phase_starts(plan, task.train_batches.num_batches_per_epoch, total_steps)
  optimizers = {}

  def optimizer(epoch):
    phase = plan.phase(epoch)
    if phase not in optimizers:
      optimizers[phase] = strategies.build_optimizer(config.optim, params, plan, epoch, total_steps,
                                                     starts)
    return optimizers[phase]

  state = steps.create_state(params, optimizer(0), seed, model_state)
  select = task.kind.select_metric(config)  # None (LMs): keep the latest
  select_mode = config_lib.SELECT_MODES[select] if select else "max"
  per_epoch = task.train_batches.num_batches_per_epoch
  epoch_ends = [e * per_epoch for e in range(1, config.train.num_epochs + 1)
                if e * per_epoch <= total_steps]
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.train.max_to_keep,
                                 keep_steps=epoch_ends if config.train.get(
                                     "keep_epoch_checkpoints", False) else (),
                                 best_metric=select, best_mode=select_mode)
  meta, carry = None, None
  if resuming:
    carry_init = task.carry_init()
    restored, meta = _restore_any_phase(ckpt, params, plan, optimizer, seed,
                                        carry_init() if carry_init else None, model_state)
    carry = restored.pop("carry", None)
    if carry is not None:  # rows of the carried state go where the rows of the batches go
      carry = devices.shard_batch(carry)
    state = steps.TrainState(**restored)
    note = _schedule_change(checkpoint.load_config(workdir), config)
    # The resumable keys it changed: what runs now.
    distributed.once(checkpoint.save_config, workdir, config)
    _log(f"resuming {workdir} from step {int(state.step)} (epoch {meta.get('epoch', 0) + 1}){note}")
  else:
    distributed.once(_write_run_files, workdir, config, task.tokenizer, report)
  state = devices.replicated(state)

  train_steps = {}

  def train_step_for_epoch(epoch):
    phase = plan.phase(epoch)
    if phase not in train_steps:
      train_steps[phase] = steps.make_train_step(task.loss_fn, optimizer(epoch),
                                                 plan.trainable_mask(params, epoch))
    return train_steps[phase]

  def on_state_for_epoch(epoch, state):
    if plan.num_phases == 1 or epoch == 0 or plan.phase(epoch) == plan.phase(epoch - 1):
      return state
    _log(f"epoch {epoch + 1}: training groups {', '.join(plan.trainable_groups(epoch))}")
    opt_state = strategies.transfer_opt_state(state.opt_state, optimizer(epoch), state.params)
    return state.replace(opt_state=devices.replicated(opt_state))

  eval_step = steps.make_eval_step(task.loss_fn)

  def evaluate(state):
    if task.valid_batches is None:
      return {}
    carry = task.carry_init(task.valid_batches.batch_size)() if task.stream else None
    return tasks.evaluate_batches(eval_step, state.params, task.valid_batches.epoch_batches(),
                                  devices, carry=carry, max_batches=config.train.eval_max_batches,
                                  model_state=state.model_state)

  hooks = loop.Hooks(
      train_step_for_epoch=train_step_for_epoch, evaluate=evaluate, tokens_in=task.tokens_in,
      carry_init=task.carry_init(), on_state_for_epoch=on_state_for_epoch,
      select_metric=select, select_mode=select_mode,
      learning_rate=strategies.make_schedule(config.optim, total_steps, starts))
  writer = metrics.MetricsWriter(workdir)
  if resuming:
    writer.rewind(int(jax.device_get(state.step)))
  _log(f"{task.kind.name} ({config.model.name}): {params_lib.count_params(params):,} parameters, "
       f"{params_lib.count_params(_trainable(params, plan))} trainable, {task.info}, "
       f"{task.train_batches.num_batches_per_epoch} batches/epoch on {devices.count} "
       f"{jax.devices()[0].platform} device(s)")
  state, result = loop.fit(config=config, state=state, batches=task.train_batches, hooks=hooks,
                           checkpointer=ckpt, writer=writer, devices=devices, meta=meta,
                           carry=carry, progress=progress, verbose=_verbose)
  writer.plot(workdir / "metrics.png", ["loss", task.kind.plot_metric, "learning_rate"])
  ckpt.close()
  return {"task": task, "state": state, "result": result, "devices": devices,
          "eval_step": eval_step, "workdir": workdir, "plan": plan}


def _write_run_files(workdir, config, tokenizer, report) -> None:
  """What a new run writes beside its checkpoints (process 0 of a multi-host run)."""
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoint.save_config(workdir, config)
  tokenizer.save(workdir / "tokenizer")
  if report is not None:
    (workdir / "graft_report.txt").write_text(report.format() + "\n")
    checkpoint.write_json_atomic(workdir / "graft_report.json", report.to_dict())
    _log(report.format())


def _trainable(params, plan, epoch: int = 0):
  """The leaves that train in `epoch` under `plan` (for parameter counts)."""
  mask = plan.trainable_mask(params, epoch)
  return [leaf for leaf, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]


def _restore_any_phase(ckpt, params, plan, optimizer, seed, carry=None, model_state=None):
  """Restores the latest checkpoint with the optimizer state of the phase that wrote it.

  A gradual-unfreezing run stopped in epoch k saved the optimizer state of phase k (other groups,
  other Adam states), so the phase-0 template would not fit. Each phase's template is tried in
  turn; a mismatch is detected from checkpoint metadata before any array is read. A damaged latest
  step falls back to the newest that loads, whichever phase wrote it (Checkpointer.restore_any).
  """
  templates = (loop.state_dict(steps.create_state(params, optimizer(epoch), seed, model_state),
                               carry)
               for epoch in range(plan.num_phases))  # epoch e < num_phases starts phase e
  return ckpt.restore_any(templates)


def pretrain(config, workdir, *, progress=True, overwrite=False) -> dict:
  """Train a model from scratch to graft from: seed 001's LSTM LM (test perplexity beside a
  unigram baseline) or seed 004's transformer as a topic classifier (test accuracy)."""
  run = train(config, workdir, progress=progress, overwrite=overwrite)
  try:
    return _pretrain_summary(config, run)
  finally:
    run["lock"].release()


def _pretrain_summary(config, run) -> dict:
  if run["task"].kind.name == "classifier":
    return _classifier_summary(config, run, None, command="pretrain")
  task, devices = run["task"], run["devices"]
  test = lm_test_metrics(config, task, run["eval_step"], run["state"].params, devices)
  summary = {"command": "pretrain", "workdir": str(run["workdir"]), **test,
             "valid": run["result"]["last_eval"], "steps": run["result"]["step"],
             "train_seconds": run["result"]["train_seconds"], "parameters":
             params_lib.count_params(run["state"].params), "vocab_size": task.tokenizer.vocab_size}
  distributed.once(checkpoint.write_json_atomic, run["workdir"] / "summary.json", summary)
  per_word = tasks.per_word_phrase({k.removeprefix("test_"): v for k, v in test.items()})
  _log(f"test perplexity {test['test_perplexity']:.2f} (unigram baseline "
       f"{test['unigram_perplexity']:.2f}) over {test['test_tokens']:,} tokens{per_word}")
  return summary


def lm_test_metrics(config, task, eval_step, params, devices) -> dict:
  """Perplexity on the test split's text (never trained on) and an add-one unigram baseline."""
  records = tasks.read_split(config, config.data.test_split, labeled=False,
                             max_examples=config.data.test_max_examples)
  batches = task.kind.batches(config, task.tokenizer, records, shuffle=False, seed=0,
                              batch_size=config.data.eval_batch_size)
  carry = task.carry_init(batches.batch_size)() if task.stream else None
  test = tasks.evaluate_batches(eval_step, params, batches.epoch_batches(), devices, carry=carry)
  unigram = metrics.unigram_perplexity([task.train_batches.target_ids()], [batches.target_ids()],
                                       task.tokenizer.vocab_size)
  words = task.kind.text_metrics(config, task.tokenizer, records, batches, test)
  return {"test_perplexity": test["perplexity"], "test_loss": test["loss"],
          "test_tokens": int(test["count"]), "test_reviews": len(records),
          "unigram_perplexity": unigram, **{f"test_{k}": v for k, v in words.items()}}


def finetune(config, workdir, *, init_from=None, tokenizer_from=None, progress=True,
             overwrite=False, linear_baseline=None) -> dict:
  """Seeds 000/002/003/004: graft a pretrained run (optional), train with a freezing strategy,
  test the best state.

  The graft map is `config.finetune.graft_map`, or with `auto` the one the model's family picks
  for the source run (an LM into a classifier, a classifier into a classifier with a new head).
  `tokenizer_from` (a workdir) reuses its tokenizer without its weights: a from-scratch control
  that differs from the grafted run in nothing but the initialisation. `linear_baseline`: a
  result of `baseline.for_config` on the same data (compare's arms, the quickstart's two
  classifiers share one), instead of fitting it again.
  """
  config_lib.validate(config)
  init_params = tokenizer = graft_map = None
  from jaxlm import interop
  if tokenizer_from is not None:
    tokenizer = (interop.read_export(tokenizer_from).tokenizer() if interop.is_export(tokenizer_from)
                 else tokenizers.load_tokenizer(pathlib.Path(tokenizer_from) / "tokenizer"))
  if init_from is not None and interop.is_export(init_from):
    # A safetensors export (jaxlm export, or PyTorch weights with its config.json): same graft
    # maps and tokenizer reuse as a workdir; its config is checked before any weight is read.
    init_from = pathlib.Path(init_from)
    export = interop.read_export(init_from)
    graft_map = _graft_map(export.config, config, init_from)
    init_params, tokenizer = export.params(), export.tokenizer()
  elif init_from is not None:
    init_from = pathlib.Path(init_from)
    source_config = checkpoint.load_config(init_from)
    graft_map = _graft_map(source_config, config, init_from)
    # A run that selects a best checkpoint (a pretrained classifier) grafts from it; an LM from
    # its latest.
    selects = tasks.TASKS[source_config.task].select_metric(source_config) is not None
    init_params = checkpoint.restore_params(init_from, which="best" if selects else "latest")
    # The classifier must read text exactly as the pretrained model did: it reuses its tokenizer.
    tokenizer = tokenizers.load_tokenizer(init_from / "tokenizer")
  run = train(config, workdir, kinds=("classifier",), init_params=init_params,
              graft_map=graft_map, tokenizer=tokenizer, progress=progress, overwrite=overwrite)
  try:
    return _classifier_summary(config, run, init_from, tokenizer_from=tokenizer_from,
                               linear_baseline=linear_baseline)
  finally:
    run["lock"].release()


def _graft_map(source_config, config, init_from):
  """The assignment map from the run (or export) in `init_from` into `config`'s model (same
  family only)."""
  from jaxlm import models
  reverse, source_reverse = config.data.get("reverse", False), source_config.data.get("reverse", False)
  if reverse != source_reverse:  # a backward LM's weights read text last token first
    raise ConfigError(f"{init_from} was trained with data.reverse={source_reverse}, this run has "
                      f"data.reverse={reverse}: a grafted model must read text in the same direction "
                      f"(--config.data.reverse={source_reverse})")
  family = models.family_of(config.model.name)
  source_family = models.family_of(source_config.model.name)
  if source_family is not family:
    raise GraftError(f"{init_from} holds a {source_config.model.name} ({source_family.name} family); "
                     f"it cannot graft into {config.model.name} ({family.name} family)")
  name = config.finetune.get("graft_map", "auto")
  if name == "auto":
    name = family.default_graft_map(source_config, config)
  return family.graft_map(name)


def _classifier_summary(config, run, init_from, command="finetune", tokenizer_from=None,
                        linear_baseline=None) -> dict:
  workdir, task, devices = run["workdir"], run["task"], run["devices"]
  best = run["result"]["best"]
  params, model_state = run["state"].params, run["state"].model_state
  if best is not None:  # read onto this process's device: spread over the mesh again
    params, model_state = devices.replicated(checkpoint.restore_variables(workdir, which="best"))
  test = classifier_split_metrics(config, task, run["eval_step"], params, devices,
                                  config.data.test_split, model_state)
  plan = run["plan"]
  summary = {"command": command, "workdir": str(workdir), "init_from": str(init_from) if init_from else None,
             "model": config.model.name, "strategy": config.finetune.strategy, "best_valid": best,
             "test_accuracy": test["accuracy"], "test_loss": test["loss"], "test_confusion": test["confusion"],
             "test_examples": int(test["count"]), "majority_accuracy": test["majority_accuracy"],
             "steps": run["result"]["step"], "train_seconds": run["result"]["train_seconds"],
             "parameters": params_lib.count_params(params),
             "trainable_parameters": params_lib.count_params(_trainable(params, plan)),
             "trainable_parameters_last_epoch": params_lib.count_params(
                 _trainable(params, plan, config.train.num_epochs - 1)),
             "train_records": task.info["train_records"],
             "tokenizer_from": str(tokenizer_from or init_from) if (tokenizer_from or init_from)
                               else None}
  summary["linear_baseline"] = linear_baseline or baseline.for_config(config)
  distributed.once(checkpoint.write_json_atomic, workdir / "summary.json", summary)
  _log(f"test accuracy {test['accuracy']:.4f} (majority class {test['majority_accuracy']:.4f}) "
       f"on {int(test['count']):,} examples; best valid {best}; "
       f"{baseline.describe(summary['linear_baseline'])}")
  return summary


def classifier_split_metrics(config, task, eval_step, params, devices, split,
                             model_state=None) -> dict:
  out = task.kind.evaluate(config, task.tokenizer, task.model, params, devices, split,
                           max_examples=config.data.test_max_examples, eval_step=eval_step,
                           model_state=model_state)
  # The confusion matrix's rows count the split's labels: the share of the train split's most
  # common label is what always predicting it would score.
  label_counts = np.sum(out["confusion"], axis=1)
  out["majority_accuracy"] = float(label_counts[int(np.argmax(task.info["label_counts"]))]
                                   / max(1, np.sum(label_counts)))
  return out


def _load_run(workdir, which, step=None):
  """(config, tokenizer, model, params, model_state) of a workdir's checkpoint; `model_state` is a
  batch-normalised head's running averages (`{}` for other models), which applying it needs."""
  workdir = pathlib.Path(workdir)
  config = checkpoint.load_config(workdir)
  tokenizer = tokenizers.load_tokenizer(workdir / "tokenizer")
  from jaxlm import models
  family = models.family_of(config.model.name)
  model = family.build(config.model, tokenizer.vocab_size)
  params, model_state = checkpoint.restore_variables(workdir, step=step, which=which)
  return config, tokenizer, model, params, model_state


def evaluate(workdir, *, split="test", which="best", max_examples=0, step=None,
             with_linear=False) -> dict:
  """Accuracy, loss and confusion matrix (classifier) or perplexity (LM) from the workdir alone.

  `max_examples` > 0: a seeded random subset of the split (the same one for the same number).
  `step`: that checkpoint instead of the `which` one; if it is damaged that is the error, where
  `which` falls back to the newest step that loads.
  Several classifier workdirs (`A,B` or a list) are evaluated as an ensemble (jaxlm/ensemble.py);
  `with_linear` adds the first one's linear n-gram model as a member.
  """
  from jaxlm import ensemble
  if len(ensemble.members(workdir)) > 1 or with_linear:
    if step is not None:
      raise ConfigError("--step names one checkpoint; an ensemble uses each member's --which one")
    out = ensemble.evaluate(workdir, split=split, which=which, max_examples=max_examples,
                            with_linear=with_linear)
    for m in out["members"]:
      _log(f"  member {m['workdir']}: accuracy {m['accuracy']:.4f}, loss {m['loss']:.4f}")
    _log(f"{split}: ensemble of {len(out['members'])}: accuracy {out['accuracy']:.4f}, loss "
         f"{out['loss']:.4f} on {int(out['count']):,} examples")
    return out
  config, tokenizer, model, params, model_state = _load_run(workdir, which, step)
  kind = tasks.TASKS[config.task]
  out = kind.evaluate(config, tokenizer, model, params, loop.Devices.create(1), split,
                      max_examples=max_examples, model_state=model_state)
  _log(f"{split}: {kind.describe(out)}")
  if "confusion" in out:
    _log("confusion matrix (rows = label, columns = prediction):")
    for i, row in enumerate(out["confusion"]):
      _log(f"  {i}: " + " ".join(f"{v:7d}" for v in row))
  return out


# Line ends to `str.splitlines` and some JSON-lines readers, though JSON leaves them raw.
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _json_line(obj) -> str:
  """Strict JSON (NaN -> null) on one line that is valid UTF-8 even with ensure_ascii=False: a lone
  surrogate (a str may hold one, UTF-8 cannot) becomes its JSON escape instead of crashing the
  print, and Unicode line separators are escaped so that one answer is one line for any reader."""
  line = json.dumps(files.strict_json(obj), ensure_ascii=False, allow_nan=False)
  return line.encode("utf-8", "backslashreplace").decode("utf-8").translate(_LINE_BREAKS)


def predict(workdir, texts, *, which="best", step=None, with_linear=False) -> list[dict]:
  """Label and probability for each text, one JSON line each and in order (an empty text too),
  from the workdir alone; several workdirs (`A,B`) average their probabilities (an ensemble),
  `with_linear` with the first one's linear n-gram model as a member."""
  from jaxlm import ensemble
  if len(ensemble.members(workdir)) > 1 or with_linear:
    if step is not None:
      raise ConfigError("--step names one checkpoint; an ensemble uses each member's --which one")
    texts = list(texts)
    probs, _ = ensemble.probabilities(workdir, texts, which=which, linear=with_linear or None)
    out = prediction_rows(texts, probs)
  else:
    config, tokenizer, model, params, model_state = _load_run(workdir, which, step)
    if config.task != "classifier":
      raise ConfigError(f"{workdir} holds a {config.task} run; predict needs a classifier workdir")
    out = classify(config, tokenizer, model, params, texts, model_state)
  for row in out:
    print(_json_line(row), flush=True)
  return out


def classify(config, tokenizer, model, params, texts, model_state=None) -> list[dict]:
  """`{"text", "label", "probability"}` for each text, in order: what `predict` prints, for a run
  already in memory (`jaxlm.load(workdir).predict`)."""
  texts = list(texts)
  return prediction_rows(texts, class_probabilities(config, tokenizer, model, params, texts,
                                                    model_state))


def prediction_rows(texts, probs) -> list[dict]:
  """`{"text", "label", "probability"}` per text: the most probable class and its probability."""
  return [{"text": t, "label": int(np.argmax(row)), "probability": float(np.max(row))}
          for t, row in zip(texts, probs)]


def class_probabilities(config, tokenizer, model, params, texts, model_state=None) -> np.ndarray:
  """[len(texts), classes] float64 probabilities, rows in the order of `texts`, the texts read as
  training read them (the run's tokenizer, data.reverse, data.truncate, max_len); `model_state`
  (a batch-normalised head's running averages) is applied with the params."""
  texts = list(texts)
  probs = np.zeros((len(texts), max(2, config.model.num_classes)), np.float64)
  if not texts:
    return probs
  from jaxlm.data.sources import Record
  # Same bucketed shapes as evaluation: one jitted forward per bucket, not one per text length.
  batches = tasks.classification_batches(config, tokenizer, [Record(t, 0) for t in texts],
                                         shuffle=False, seed=0,
                                         batch_size=config.data.eval_batch_size, include_index=True)
  forward = jax.jit(lambda p, s, tokens, lengths: model.apply({"params": p, **s}, tokens, lengths))
  for batch in batches.epoch_batches():
    logits = np.asarray(forward(params, model_state or {}, batch["tokens"], batch["lengths"]),
                        np.float64)
    if config.model.loss == "bce":
      p1 = 1.0 / (1.0 + np.exp(-logits[:, 0]))
      batch_probs = np.stack([1.0 - p1, p1], axis=1)
    else:
      batch_probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    real = batch["index"] >= 0
    probs[batch["index"][real]] = batch_probs[real]
  return probs


def inspect(config=None, workdir=None, *, path=None, **options) -> dict:
  """Parameter tree of one of: `path` (a workdir, checkpoint step, config file or name), a config
  or a workdir; `options` as `jaxlm.inspection.command` (strategy, epoch, other, step, which)."""
  from jaxlm import inspection
  given = [s for s in (path, config, workdir) if s is not None]
  if len(given) != 1:
    raise ConfigError(f"jaxlm inspect needs one PATH ({inspection.SOURCE_KINDS}), --config or "
                      f"--workdir; got {len(given)}")
  return inspection.command(given[0], **options)


def _vocab_size_for(config) -> int:
  specials = len(config.tokenizer.specials) if config.tokenizer.kind == "word" else 0
  return config.tokenizer.vocab_size + specials


def _abstract_params(config, vocab_size: int):
  """Shapes and dtypes of the config's params, without computing any (jax.eval_shape)."""
  from jaxlm import models
  family = models.family_of(config.model.name)
  model = family.build(config.model, vocab_size)
  batch = {"tokens": jax.ShapeDtypeStruct((2, 8), np.int32),
           "inputs": jax.ShapeDtypeStruct((2, 8), np.int32),
           "targets": jax.ShapeDtypeStruct((2, 8), np.int32),
           "lengths": jax.ShapeDtypeStruct((2,), np.int32)}
  args = family.init_args(config.task, batch)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  # The abstract arrays must be arguments of eval_shape: a closure would hand them to the model
  # as if they were concrete arrays.
  return jax.eval_shape(lambda *a: model.init(rngs, *a), *args)["params"]


def quickstart(config, workdir, *, progress=True) -> dict:
  """Pretrain -> graft -> fine-tune on few labels, vs the same classifier from scratch; one table."""
  workdir = pathlib.Path(workdir)
  t0 = time.perf_counter()
  lm = pretrain(config.pretrain, workdir / "lm", progress=progress)
  pre = finetune(config.finetune, workdir / "classifier_pretrained", init_from=workdir / "lm",
                 progress=progress)
  scratch = finetune(config.finetune, workdir / "classifier_scratch", progress=progress,
                     linear_baseline=pre["linear_baseline"])  # the same labels: fitted once
  summary = {"lm": lm, "classifier_pretrained": pre, "classifier_scratch": scratch,
             "labeled_examples": pre["train_records"], "seconds": time.perf_counter() - t0}
  checkpoint.write_json_atomic(workdir / "summary.json", summary)
  metrics.MetricsWriter(workdir).write({"lm_test_perplexity": lm["test_perplexity"],
                                        "unigram_perplexity": lm["unigram_perplexity"],
                                        "pretrained_test_accuracy": pre["test_accuracy"],
                                        "scratch_test_accuracy": scratch["test_accuracy"],
                                        "majority_accuracy": pre["majority_accuracy"]})
  _log(format_quickstart_table(summary))
  return summary


def format_quickstart_table(s: dict) -> str:
  lm, pre, scratch = s["lm"], s["classifier_pretrained"], s["classifier_scratch"]
  rows = [
      ("LM test perplexity", f"{lm['test_perplexity']:.2f}", "unigram baseline", f"{lm['unigram_perplexity']:.2f}"),
      (f"classifier, pretrained LM ({s['labeled_examples']} labels)", f"{pre['test_accuracy']:.2%}",
       "majority class", f"{pre['majority_accuracy']:.2%}"),
      (f"classifier, from scratch ({s['labeled_examples']} labels)", f"{scratch['test_accuracy']:.2%}",
       "majority class", f"{scratch['majority_accuracy']:.2%}"),
  ]
  lin = pre.get("linear_baseline") or {}
  if "accuracy" in lin:  # trained on the same labelled examples, scored on the same test split
    rows.append((f"linear n-gram model ({s['labeled_examples']} labels)", f"{lin['accuracy']:.2%}",
                 "majority class", f"{pre['majority_accuracy']:.2%}"))
  width = max(len(r[0]) for r in rows)
  lines = ["", "=" * (width + 44), f"{'jaxlm quickstart':<{width}}  {'result':>10}    {'baseline':<18}{'':>10}",
           "-" * (width + 44)]
  lines += [f"{a:<{width}}  {b:>10}    {c:<18}{d:>10}" for a, b, c, d in rows]
  lines += ["=" * (width + 44), f"total {s['seconds']:.0f} s; details in summary.json, metrics.jsonl"]
  return "\n".join(lines)
