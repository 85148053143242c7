"""Benchmark of the input side: reading a source, training and applying the tokenizers, batching.

    python scripts/bench_data.py --source jsonl:PATH/imdb [--split train]

Prints wall-clock seconds per stage (the issue's bar: tokenizing all 25,000 IMDB training reviews
takes seconds, not minutes). A script, not a timed test: timings depend on the machine and load.
"""
import argparse
import os
import time

import ml_collections

from jaxlm import batching, tokenizers
from jaxlm.data import sources


def timed(label, fn):
  start = time.perf_counter()
  out = fn()
  print(f"{label:<44} {time.perf_counter() - start:8.2f} s", flush=True)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", default="synthetic")
  parser.add_argument("--split", default="train")
  parser.add_argument("--sentencepiece", action="store_true", help="also train an 8k BPE model")
  args = parser.parse_args()
  print(f"machine: {os.cpu_count()} cpus; source {args.source} split {args.split}")
  records = timed(f"read {args.source}:{args.split}", lambda: sources.open_source(args.source).read(args.split))
  texts = [r.text for r in records]
  print(f"  {len(texts):,} records")
  cfg = ml_collections.ConfigDict(dict(kind="word", vocab_size=25_000, min_freq=1, lowercase=True,
                                       specials=("<unk>", "<pad>"), model_type="unigram"))
  tok = timed("word vocabulary (25k) from all texts", lambda: tokenizers.build_tokenizer(cfg, texts))
  ids = timed("word encode_batch of all texts", lambda: tok.encode_batch(texts))
  print(f"  {sum(len(i) for i in ids):,} tokens, vocab {tok.vocab_size:,}")
  if args.sentencepiece:
    sp_cfg = ml_collections.ConfigDict(dict(kind="sentencepiece", vocab_size=8000, min_freq=1,
                                            lowercase=True, specials=(), model_type="bpe"))
    sp = timed("sentencepiece BPE 8k training", lambda: tokenizers.build_tokenizer(sp_cfg, texts))
    timed("sentencepiece encode_batch of all texts", lambda: sp.encode_batch(texts))
  labels = [max(r.label, 0) for r in records]
  import numpy as np
  batches = timed("classification batches (64, buckets 128/256/400)", lambda: list(
      batching.ClassificationBatches(ids, np.array(labels), 64, buckets=(128, 256, 400), max_len=400,
                                     pad_id=tok.pad_id, shuffle=True, seed=0).iter_epoch(0)))
  print(f"  {len(batches)} batches")


if __name__ == "__main__":
  main()
