"""Metrics: summed on device per batch, normalised on the host, written as JSON lines and plotted.

Train and eval steps return small dicts of *sums* (`loss_sum`, `weight_sum`, `correct`, ...), so
metrics of batches with padding rows or tokens combine exactly: the mean over real tokens is
sum(loss) / sum(weights), never a mean of per-batch means.

Train-step metrics stay on the device between logging steps (`StepWindow`): fetching them every
step would make the host wait for each step before it can dispatch the next one.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pathlib
from typing import Iterable, Mapping

import numpy as np

from jaxlm import distributed, files
from jaxlm.errors import CheckpointError

log = logging.getLogger(__name__)


def perplexity(nll_sum: float, token_count: float) -> float:
  """exp(mean negative log-likelihood over real target tokens); inf when the mean overflows."""
  if token_count <= 0:
    raise ValueError("perplexity needs at least one real target token")
  mean = nll_sum / token_count
  return math.exp(mean) if mean < 700 else math.inf


def accumulate(total: dict | None, batch_metrics: Mapping) -> dict:
  """Adds one batch's metric sums (device or numpy scalars/arrays) into a host-side total."""
  batch = {k: np.asarray(v, dtype=np.float64) for k, v in batch_metrics.items()}
  if total is None:
    return batch
  return {k: total[k] + batch[k] for k in total}


class StepWindow:
  """Train-step metrics held as the device arrays the steps returned, until the loop needs numbers.

  `float(x)` or `np.asarray(x)` of a step's output blocks until that step has run, so pulling the
  metrics of every step to the host serialises host work (the next batch, the next dispatch) with
  device compute. The loop `add`s each step's metrics with a tag (its step, epoch and batch) and
  `fetch`es all pending steps in one transfer when it logs, evaluates or saves; the steps' own
  `nonfinite` flags then tell it which step went wrong.
  """

  def __init__(self):
    self._pending: list[tuple[object, Mapping]] = []

  def __len__(self) -> int:
    return len(self._pending)

  def add(self, tag, batch_metrics: Mapping) -> None:
    self._pending.append((tag, batch_metrics))

  def fetch(self) -> list[tuple[object, dict]]:
    """The pending `(tag, metrics as numpy)` in step order; the window is empty afterwards."""
    import jax
    pending, self._pending = self._pending, []
    values = jax.device_get([dict(m) for _, m in pending])  # starts every copy, then waits once
    return [(tag, m) for (tag, _), m in zip(pending, values)]


def summarize(total: Mapping) -> dict:
  """Turns metric sums into the numbers users read: loss, perplexity (LM), accuracy (classifier).

  Sums from sampled-softmax training (`sampled_batches`) get no perplexity: exp of a sampled loss
  is not one, and printing it beside real held-out perplexities would mislead.
  """
  weight = float(total["weight_sum"])
  out = {"loss": float(total["loss_sum"]) / max(weight, 1e-12), "count": weight}
  if "correct" in total:
    out["accuracy"] = float(total["correct"]) / max(weight, 1e-12)
  elif not total.get("sampled_batches"):
    out["perplexity"] = perplexity(float(total["loss_sum"]), weight)
  if "confusion" in total:
    out["confusion"] = np.asarray(total["confusion"]).astype(int).tolist()
  return out


def probability_scores(probs: np.ndarray, labels: np.ndarray) -> dict:
  """Accuracy, mean log loss and confusion matrix of [N, classes] probabilities: how an ensemble
  and the linear baseline, which give probabilities rather than batch sums, are scored."""
  labels = np.asarray(labels)
  k = probs.shape[1]
  predicted = np.argmax(probs, axis=1)
  confusion = np.zeros((k, k), int)
  np.add.at(confusion, (labels, predicted), 1)
  picked = np.clip(probs[np.arange(len(labels)), labels], 1e-15, 1.0)
  return {"accuracy": float(np.mean(predicted == labels)), "loss": float(-np.mean(np.log(picked))),
          "count": float(len(labels)), "confusion": confusion.tolist()}


def unigram_perplexity(train_ids: Iterable[np.ndarray], test_ids: Iterable[np.ndarray],
                       vocab_size: int) -> float:
  """Perplexity of an add-one-smoothed unigram model: the floor an LM must beat to mean anything."""
  counts = np.ones(vocab_size, dtype=np.float64)
  for ids in train_ids:
    counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
  log_probs = np.log(counts / counts.sum())
  nll, n = 0.0, 0
  for ids in test_ids:
    nll -= log_probs[ids].sum()
    n += len(ids)
  return perplexity(nll, n)


class MetricsWriter:
  """Appends one JSON object per line to `{workdir}/metrics.jsonl` and plots it to PNG.

  Appending keeps every earlier line intact when a run is resumed; each line is flushed as written,
  so an interrupted run loses at most the line being written. A resumed run first `rewind`s to its
  checkpoint's step: the lines an interrupted run wrote after that step are replayed, not doubled.

  A crash mid-write leaves a last line without its newline: readers drop it (with a warning) and
  the first write or `rewind` removes it from the file, so it neither blocks later runs nor glues
  onto the next record. A garbled line anywhere else is not a crash's doing; it is an error naming
  the file and line.

  In a multi-host run only process 0 writes (and plots); every process can read.
  """

  def __init__(self, workdir: str | os.PathLike, filename: str = "metrics.jsonl"):
    self.path = pathlib.Path(workdir) / filename
    self._tail_checked = False

  @property
  def _writes(self) -> bool:
    return distributed.is_primary()

  def write(self, record: Mapping) -> None:
    if not self._writes:
      return
    if not self._tail_checked:
      self._drop_partial_tail()
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(files.strict_json(_jsonable(record)), allow_nan=False) + "\n")

  def rewind(self, step: int) -> int:
    """Drops the records after `step` and a partial last line (atomically); returns how many
    records were dropped."""
    if not self._writes:
      return 0
    records, partial = self._read()
    keep = [r for r in records if r.get("step", 0) <= step]
    if len(keep) < len(records) or partial:
      files.atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode("utf-8"))
    self._tail_checked = True
    return len(records) - len(keep)

  def read(self) -> list[dict]:
    """The records, in file order; a partial last line (an interrupted write) is left out."""
    return self._read()[0]

  def _read(self) -> tuple[list[dict], bool]:
    """(records, whether a partial last line was dropped); CheckpointError for a garbled line."""
    if not self.path.exists():
      return [], False
    lines = self.path.read_bytes().split(b"\n")
    # The text after the last newline is a whole record only if it parses: a crash can cut a
    # line anywhere, even between a complete object and its newline.
    tail, lines = lines[-1], lines[:-1]
    records = []
    for number, line in enumerate(lines, start=1):
      if line.strip():
        record = _parse_line(line)
        if record is None:
          raise CheckpointError(f"{self.path} line {number} is not a JSON object: "
                                f"{line[:60].decode('utf-8', 'replace')!r}; fix or delete that line")
        records.append(record)
    if not tail.strip():
      return records, False
    record = _parse_line(tail)
    if record is not None:
      return records + [record], False
    log.warning("%s: dropped the partial last line %d (an interrupted write): %r", self.path,
                len(lines) + 1, tail[:60].decode("utf-8", "replace"))
    return records, True

  def _drop_partial_tail(self) -> None:
    """Before the first append: a file not ending in a newline gets one (its last record is whole)
    or loses its partial last line, so the next record starts on a line of its own."""
    self._tail_checked = True
    try:
      with open(self.path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
          return
    except (FileNotFoundError, OSError):  # no file yet, or an empty one
      return
    records, _ = self._read()
    files.atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))

  def plot(self, png_path: str | os.PathLike, keys: Iterable[str]) -> pathlib.Path | None:
    """One panel per metric key, train and eval curves over steps; returns the PNG path."""
    if not self._writes:
      return None
    records = self.read()
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
      return None
    # A bare Figure, not pyplot: writing a PNG must not switch the backend of the process (a
    # notebook's inline plots) as matplotlib.use("Agg") would.
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5 * len(keys), 3.5))
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys):
      for split in sorted({r.get("split", "train") for r in records}):
        points = [(r["step"], r[key]) for r in records
                  if r.get("split", "train") == split and key in r and math.isfinite(r[key])]
        if points:
          steps, values = zip(*points)
          ax.plot(steps, values, marker="o" if split != "train" else None, label=split)
      ax.set_xlabel("step")
      ax.set_title(key)
      if key == "perplexity":
        ax.set_yscale("log")
      ax.legend()
    fig.tight_layout()
    png_path = pathlib.Path(png_path)
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, png_path)
    return png_path


def _parse_line(line: bytes) -> dict | None:
  """The JSON object on one line of metrics.jsonl; None if it is not one."""
  try:
    record = json.loads(line.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError):
    return None
  return record if isinstance(record, dict) else None


def _jsonable(value):
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if hasattr(value, "item") and getattr(value, "shape", None) == ():
    return value.item()
  return value
