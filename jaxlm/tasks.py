"""From a config to everything a run needs: records, tokenizer, batches, model and loss.

This is the data flow config -> source -> tokenizer -> batches -> model in one readable place. The
LM and classifier tasks differ only in which records they keep, how they batch and which loss they
plug into the shared train step; the loop (jaxlm/train/loop.py) treats them alike.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import batching, models, tokenizers
from jaxlm.data import sources
from jaxlm.errors import DataError
from jaxlm.train import steps


@dataclasses.dataclass
class Task:
  kind: str                         # 'lm' | 'classifier'
  tokenizer: Any
  model: Any
  loss_fn: steps.LossFn
  train_batches: Any                # resumable iterator (jaxlm/batching.py)
  valid_batches: Any                # held-out batches for model selection / periodic eval
  stream: bool = False              # stream-mode LM: carry the LSTM state across batches
  info: dict = dataclasses.field(default_factory=dict)

  def example_batch(self) -> dict:
    # Random access: iterating would advance the train iterator, and training would skip batch 0.
    return self.train_batches.batch(0, 0)

  def init_params(self, seed: int):
    batch = self.example_batch()
    rngs = {"params": jax.random.key(seed), "dropout": jax.random.key(seed + 1)}
    if self.kind == "lm":
      variables = self.model.init(rngs, batch["inputs"], batch["targets"], batch["lengths"])
    else:
      variables = self.model.init(rngs, batch["tokens"], batch["lengths"])
    return variables["params"]

  def tokens_in(self, batch: dict) -> float:
    if self.kind == "lm":
      return float(np.sum(batch["weights"]))
    return float(np.sum(batch["lengths"] * (batch["weights"] > 0)))

  def carry_init(self, batch_size: int | None = None) -> Callable | None:
    """Zero LSTM state for stream mode; `batch_size` defaults to the train batches' (eval batches
    may be of another size, config.data.eval_batch_size)."""
    if not self.stream:
      return None
    batch_size = batch_size or self.train_batches.batch_size
    return lambda: zero_state(self.model, batch_size)


def zero_state(model_cfg, batch_size: int):
  """All-zero LSTM state, a (c, h) pair per layer: the start of stream-mode LM training."""
  zeros = jnp.zeros((batch_size, model_cfg.hidden_size), jnp.float32)
  return tuple((zeros, zeros) for _ in range(model_cfg.num_layers))


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


def lm_batches(config, tokenizer, texts: list[str], *, shuffle: bool, seed: int,
               batch_size: int | None = None):
  ids = tokenizer.encode_batch(texts)
  batch_size = batch_size or config.data.batch_size
  if config.data.lm_mode == "stream":
    return batching.StreamLMBatches(ids, batch_size=batch_size, bptt=config.data.bptt,
                                    eos_id=tokenizer.eos_id, seed=seed)
  return batching.ReviewLMBatches(ids, batch_size=batch_size, buckets=tuple(config.data.buckets),
                                  max_len=config.data.max_len, pad_id=tokenizer.pad_id,
                                  bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                                  shuffle=shuffle, seed=seed)


def classification_batches(config, tokenizer, records: list, *, shuffle: bool, seed: int,
                           batch_size: int | None = None):
  ids = tokenizer.encode_batch([r.text for r in records])
  labels = np.array([r.label for r in records], dtype=np.int32)
  return batching.ClassificationBatches(ids, labels, batch_size=batch_size or config.data.batch_size,
                                        buckets=tuple(config.data.buckets), max_len=config.data.max_len,
                                        pad_id=tokenizer.pad_id, shuffle=shuffle, seed=seed)


def lm_task(config, tokenizer=None) -> Task:
  """Seed 001: LM on the train split's text (labels ignored); held-out text for periodic eval."""
  seed = config.train.seed
  records = read_split(config, config.data.train_split, labeled=False)
  train, valid = split_train_valid(records, config.data.valid_fraction, seed)
  train_texts = [r.text for r in train]
  if tokenizer is None:
    tokenizer = tokenizers.build_tokenizer(config.tokenizer, train_texts)
  model = models.build_model(config.model, tokenizer.vocab_size)
  return Task(
      kind="lm", tokenizer=tokenizer, model=model, loss_fn=steps.lm_loss(model),
      train_batches=lm_batches(config, tokenizer, train_texts, shuffle=True, seed=seed),
      valid_batches=lm_batches(config, tokenizer, [r.text for r in valid], shuffle=False, seed=seed,
                               batch_size=config.data.eval_batch_size) if valid else None,
      stream=config.data.lm_mode == "stream",
      info={"train_records": len(train), "valid_records": len(valid)})


def classifier_task(config, tokenizer=None) -> Task:
  """Seeds 000/002/003: labeled train records, optionally a small subset, and a seeded valid split."""
  seed = config.train.seed
  records = read_split(config, config.data.train_split, labeled=True)
  if config.data.num_labeled:
    order = np.random.default_rng(seed + 17).permutation(len(records))[:config.data.num_labeled]
    records = [records[i] for i in sorted(order)]
  train, valid = split_train_valid(records, config.data.valid_fraction, seed)
  if tokenizer is None:
    tokenizer = tokenizers.build_tokenizer(config.tokenizer, [r.text for r in train])
  model = models.build_model(config.model, tokenizer.vocab_size)
  loss_fn = steps.classifier_loss(model, config.model.loss, config.model.num_classes)
  return Task(
      kind="classifier", tokenizer=tokenizer, model=model, loss_fn=loss_fn,
      train_batches=classification_batches(config, tokenizer, train, shuffle=True, seed=seed),
      valid_batches=classification_batches(config, tokenizer, valid, shuffle=False, seed=seed,
                                           batch_size=config.data.eval_batch_size) if valid else None,
      info={"train_records": len(train), "valid_records": len(valid),
            "label_counts": np.bincount([r.label for r in train],
                                        minlength=config.model.num_classes).tolist()})


def build_task(config, tokenizer=None) -> Task:
  return lm_task(config, tokenizer) if config.task == "lm" else classifier_task(config, tokenizer)


def evaluate_batches(eval_step, params, batch_iter, devices, *, carry=None, max_batches: int = 0) -> dict:
  """Sums an eval step's metrics over batches and summarizes them (see jaxlm/metrics.py)."""
  from jaxlm import metrics as metrics_lib
  total = None
  for i, batch in enumerate(batch_iter):
    if max_batches and i >= max_batches:
      break
    batch_metrics, carry = eval_step(params, devices.shard_batch(batch), carry)
    total = metrics_lib.accumulate(total, batch_metrics)
  if total is None:
    raise DataError("evaluation got no batches: the held-out split is empty")
  return metrics_lib.summarize(total)
