"""From a config to everything a run needs: records, tokenizer, batches, model and loss.

This is the data flow config -> source -> tokenizer -> batches -> model in one readable place. A
task kind (`LMTask`, `ClassifierTask`; `config.task` names one in `TASKS`) says what differs between
pretraining a language model and training a classifier: which records it keeps, how it batches
them, its loss, its metrics and test report. The model comes from its family (jaxlm/models/), and
the loop (jaxlm/train/loop.py) treats every task alike.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from jaxlm import batching, models, tokenizers
from jaxlm.data import sources
from jaxlm.errors import DataError
from jaxlm.train import steps


class TaskKind:
  """What a kind of task does with a config; stateless (one instance per kind in `TASKS`)."""
  name = ""
  labeled = False            # keeps only labeled records (and checks their labels)
  plot_metric = "loss"       # drawn beside the loss in metrics.png

  def loss(self, config, model) -> steps.LossFn:
    raise NotImplementedError

  def batches(self, config, tokenizer, records: list, *, shuffle: bool, seed: int,
              batch_size: int | None = None):
    raise NotImplementedError

  def train_records(self, config, records: list) -> list:
    return records

  def tokens_in(self, batch: dict) -> float:
    raise NotImplementedError

  def select_metric(self, config) -> str | None:
    """Validation metric that picks the best checkpoint; None keeps the latest."""
    return None

  def stream(self, config) -> bool:
    return False

  def describe(self, metrics: dict) -> str:
    raise NotImplementedError

  def info(self, config, train: list) -> dict:
    return {}

  def evaluate(self, config, tokenizer, model, params, devices, split: str, *,
               max_examples: int = 0, eval_step=None, model_state=None) -> dict:
    """Metrics of `params` (and `model_state`, a batch-normalised head's running averages) on
    `split` of the config's source, from the config alone (no train data is read): what
    `jaxlm evaluate` and the end-of-run test pass share."""
    records = read_split(config, split, labeled=self.labeled, max_examples=max_examples)
    return self.evaluate_records(config, tokenizer, model, params, devices, records,
                                 eval_step=eval_step, model_state=model_state)

  def evaluate_records(self, config, tokenizer, model, params, devices, records: list, *,
                       eval_step=None, model_state=None) -> dict:
    """Metrics of `params` on `records` (a split's, or the texts given to
    `jaxlm.load(workdir).perplexity`)."""
    batches = self.batches(config, tokenizer, records, shuffle=False, seed=0,
                           batch_size=config.data.eval_batch_size)
    eval_step = eval_step or steps.make_eval_step(self.loss(config, model))
    carry = None
    if self.stream(config):
      carry = models.family_of(config.model.name).initial_carry(config.model, batches.batch_size)
    out = evaluate_batches(eval_step, params, batches.epoch_batches(), devices, carry=carry,
                           model_state=model_state)
    out["records"] = len(records)
    out.update(self.text_metrics(config, tokenizer, records, batches, out))
    return out

  def text_metrics(self, config, tokenizer, records, batches, out) -> dict:
    """Metrics that need the held-out text beside the batch sums (none by default)."""
    return {}


class LMTask(TaskKind):
  """Seed 001: next-token prediction on text (labels ignored); perplexity."""
  name = "lm"
  plot_metric = "perplexity"

  def loss(self, config, model):
    return steps.lm_loss(model)

  def batches(self, config, tokenizer, records, *, shuffle, seed, batch_size=None):
    return lm_batches(config, tokenizer, [r.text for r in records], shuffle=shuffle, seed=seed,
                      batch_size=batch_size)

  def tokens_in(self, batch):
    return float(np.sum(batch["weights"]))

  def stream(self, config):
    return config.data.lm_mode == "stream"

  def text_metrics(self, config, tokenizer, records, batches, out) -> dict:
    """Perplexity per whitespace word and the share of `<unk>` targets: what makes LMs with
    different vocabularies (a word list, SentencePiece pieces) comparable on the same text.

    exp(total NLL / (words + one <eos> per text)): per-review batches predict every token of each
    text once, and its <eos>, so the total is the NLL of the whole text under any tokenizer. A
    word-level LM still gets its `<unk>` targets for the price of one class (`unk_rate` says how
    often). Stream batches drop the tail that fills no row: no per-word figure for them.
    """
    if self.stream(config) or tokenizer.bos_id is None or tokenizer.eos_id is None:
      return {}
    words = sum(len(r.text.split()) for r in records) + len(records)
    targets = batches.target_ids()
    unk = float(np.mean(targets == tokenizer.unk_id)) if tokenizer.unk_id is not None else 0.0
    from jaxlm import metrics as metrics_lib
    return {"words": words, "word_perplexity": metrics_lib.perplexity(
        out["loss"] * out["count"], words), "unk_rate": unk}

  def describe(self, m):
    return (f"perplexity {m['perplexity']:.3f}, loss {m['loss']:.4f} over {int(m['count']):,} "
            f"tokens{per_word_phrase(m)}")


def per_word_phrase(m: dict) -> str:
  """'; per word P over W words, <unk> U of targets' from `LMTask.text_metrics`'s keys, or ''."""
  if "word_perplexity" not in m:
    return ""
  return (f"; per word {m['word_perplexity']:.2f} over {m['words']:,} words, <unk> "
          f"{m['unk_rate']:.2%} of targets")


class ClassifierTask(TaskKind):
  """Seeds 000/002/003/004: labeled records (optionally a seeded subset); accuracy, confusion."""
  name = "classifier"
  labeled = True
  plot_metric = "accuracy"

  def loss(self, config, model):
    family = models.family_of(config.model.name)
    return steps.classifier_loss(model, config.model.loss, config.model.num_classes,
                                 inputs=lambda batch: family.init_args(self.name, batch))

  def batches(self, config, tokenizer, records, *, shuffle, seed, batch_size=None):
    return classification_batches(config, tokenizer, records, shuffle=shuffle, seed=seed,
                                  batch_size=batch_size)

  def train_records(self, config, records):
    if not config.data.num_labeled:
      return records
    order = np.random.default_rng(config.train.seed + 17).permutation(len(records))
    return [records[i] for i in sorted(order[:config.data.num_labeled])]

  def tokens_in(self, batch):
    return float(np.sum(batch["lengths"] * (batch["weights"] > 0)))

  def select_metric(self, config):
    return config.finetune.select_metric

  def describe(self, m):
    return f"accuracy {m['accuracy']:.4f}, loss {m['loss']:.4f} on {int(m['count']):,} examples"

  def info(self, config, train):
    return {"label_counts": np.bincount([r.label for r in train],
                                        minlength=config.model.num_classes).tolist()}


TASKS: dict[str, TaskKind] = {kind.name: kind for kind in (LMTask(), ClassifierTask())}


@dataclasses.dataclass
class Task:
  """One run's task: its kind, tokenizer, model (and family), loss and batches."""
  kind: TaskKind
  config: Any
  tokenizer: Any
  family: models.ModelFamily
  model: Any
  loss_fn: steps.LossFn
  train_batches: Any                # resumable iterator (jaxlm/batching.py)
  valid_batches: Any                # held-out batches for model selection / periodic eval
  info: dict = dataclasses.field(default_factory=dict)

  @property
  def stream(self) -> bool:
    """Stream-mode LM: the recurrent state is carried across batches."""
    return self.kind.stream(self.config)

  def example_batch(self) -> dict:
    # Random access: iterating would advance the train iterator, and training would skip batch 0.
    return self.train_batches.batch(0, 0)

  def init_params(self, seed: int):
    return self.init_variables(seed)[0]

  def init_variables(self, seed: int):
    """(params, model_state): the model's initial variables, split as TrainState holds them."""
    rngs = {"params": jax.random.key(seed), "dropout": jax.random.key(seed + 1)}
    args = self.family.init_args(self.kind.name, self.example_batch())
    return steps.split_variables(self.model.init(rngs, *args))

  def tokens_in(self, batch: dict) -> float:
    return self.kind.tokens_in(batch)

  def carry_init(self, batch_size: int | None = None) -> Callable | None:
    """Zero recurrent state for stream mode; `batch_size` defaults to the train batches' (eval
    batches may be of another size, config.data.eval_batch_size)."""
    if not self.stream:
      return None
    batch_size = batch_size or self.train_batches.batch_size
    return lambda: self.family.initial_carry(self.config.model, batch_size)


def build_task(config, tokenizer=None) -> Task:
  """The task `config.task` names: records read and split, tokenizer trained (unless given),
  model built by its family, batches made."""
  kind = TASKS[config.task]
  seed = config.train.seed
  records = read_split(config, config.data.train_split, labeled=kind.labeled)
  train, valid = split_train_valid(kind.train_records(config, records),
                                   config.data.valid_fraction, seed)
  if tokenizer is None:
    tokenizer = tokenizers.build_tokenizer(config.tokenizer, [r.text for r in train])
  family = models.family_of(config.model.name)
  model = family.build(config.model, tokenizer.vocab_size)
  return Task(
      kind=kind, config=config, tokenizer=tokenizer, family=family, model=model,
      loss_fn=kind.loss(config, model),
      train_batches=kind.batches(config, tokenizer, train, shuffle=True, seed=seed),
      valid_batches=kind.batches(config, tokenizer, valid, shuffle=False, seed=seed,
                                 batch_size=config.data.eval_batch_size) if valid else None,
      info={"train_records": len(train), "valid_records": len(valid), **kind.info(config, train)})


def split_train_valid(records: list, fraction: float, seed: int) -> tuple[list, list]:
  """A seeded hold-out of `fraction` of the records; the rest keep their original order."""
  if fraction <= 0:
    return records, []
  order = np.random.default_rng(seed).permutation(len(records))
  n_valid = max(1, int(round(fraction * len(records))))
  valid_idx = set(order[:n_valid].tolist())
  train = [r for i, r in enumerate(records) if i not in valid_idx]
  valid = [records[i] for i in sorted(valid_idx)]
  return train, valid


def read_split(config, split: str, *, labeled: bool, max_examples: int = 0) -> list:
  """Records of `split` (e.g. 'train+unsup'); `labeled` keeps only labeled records and checks that
  every label is one of the configured classes (the error names the file and record).

  `max_examples` > 0 keeps a seeded random subset of that size, in the source's order: a test
  figure on a CPU budget that is still an unbiased sample of the whole split (and says so).
  """
  source = sources.open_source(config.data.source)
  if not labeled:
    records = source.read(split)
  else:
    records = [r for r in source.read(split, num_classes=config.model.num_classes) if r.label >= 0]
    if not records:
      raise DataError(f"{config.data.source} split {split!r} has no labeled records")
  if 0 < max_examples < len(records):
    keep = np.sort(np.random.default_rng(0).choice(len(records), max_examples, replace=False))
    records = [records[i] for i in keep]
  return records


def encode(config, tokenizer, texts: list[str], max_len: int | None = None) -> list[np.ndarray]:
  """Token ids of each text, in reading order, or last token first with `data.reverse` (a
  backward model: ULMFiT pairs a forward and a backward LM and averages their classifiers).

  `max_len` (classifiers: the length their batches cut to, see `classifier_length`) cuts each
  text by `data.truncate` *before* it is reversed, so a forward and a backward model read the same
  part of a long text.
  """
  ids = tokenizer.encode_batch(texts)
  if config.data.get("reverse", False):
    how = config.data.get("truncate", "head")
    ids = [(batching.truncated(row, max_len, how) if max_len else row)[::-1].copy() for row in ids]
  return ids


def lm_batches(config, tokenizer, texts: list[str], *, shuffle: bool, seed: int,
               batch_size: int | None = None):
  ids = encode(config, tokenizer, texts)
  batch_size = batch_size or config.data.batch_size
  if config.data.lm_mode == "stream":
    return batching.StreamLMBatches(ids, batch_size=batch_size, bptt=config.data.bptt,
                                    eos_id=tokenizer.eos_id, seed=seed)
  return batching.ReviewLMBatches(ids, batch_size=batch_size, buckets=tuple(config.data.buckets),
                                  max_len=config.data.max_len, pad_id=tokenizer.pad_id,
                                  bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                                  shuffle=shuffle, seed=seed)


def classifier_length(config) -> int | None:
  """The length a classifier's batches cut a text to: `data.max_len` or the largest bucket,
  whichever is smaller (`batching.effective_buckets`); None when neither is set."""
  limits = [int(x) for x in (config.data.max_len, max(config.data.buckets or (), default=0)) if x]
  return min(limits) if limits else None


def classification_batches(config, tokenizer, records: list, *, shuffle: bool, seed: int,
                           batch_size: int | None = None, include_index: bool = False):
  """Training batches (`shuffle`) of a batch-normalised head never hold a single real row: its
  batch variance would be 0 and the row's gradient too (PyTorch refuses such a batch)."""
  ids = encode(config, tokenizer, [r.text for r in records], max_len=classifier_length(config))
  min_rows = 2 if shuffle and config.model.get("head_batchnorm", False) else 1
  labels = np.array([r.label for r in records], dtype=np.int32)
  return batching.ClassificationBatches(ids, labels, batch_size=batch_size or config.data.batch_size,
                                        buckets=tuple(config.data.buckets), max_len=config.data.max_len,
                                        pad_id=tokenizer.pad_id, shuffle=shuffle, seed=seed,
                                        truncate=config.data.get("truncate", "head"),
                                        include_index=include_index, min_rows=min_rows)


def evaluate_batches(eval_step, params, batch_iter, devices, *, carry=None, max_batches: int = 0,
                     model_state=None) -> dict:
  """Sums an eval step's metrics over batches and summarizes them (see jaxlm/metrics.py)."""
  from jaxlm import metrics as metrics_lib
  total = None
  for i, batch in enumerate(batch_iter):
    if max_batches and i >= max_batches:
      break
    batch_metrics, carry = eval_step(params, devices.shard_batch(batch), carry, model_state)
    total = metrics_lib.accumulate(total, batch_metrics)
  if total is None:
    raise DataError("evaluation got no batches: the held-out split is empty")
  return metrics_lib.summarize(total)
