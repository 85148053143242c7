"""Backward models: `data.reverse` reads every text last token first, in training, evaluation and
prediction alike, and a graft refuses to mix directions."""
import numpy as np

from jaxlm import config as config_lib, tasks, tokenizers
from cli_helpers import run
from test_cli import CLF_ARGS, LM_ARGS


def _tokenizer():
  cfg = config_lib.lm_config().tokenizer
  return tokenizers.build_tokenizer(cfg, ["a b c d e", "c d e f"])


def test_encode_reverses_each_text_and_batches_follow():
  config, tok = config_lib.lm_config(), _tokenizer()
  texts = ["a b c d e", "f e d"]
  forward = tasks.encode(config, tok, texts)
  config.data.reverse = True
  backward = tasks.encode(config, tok, texts)
  for f, b in zip(forward, backward):
    np.testing.assert_array_equal(f[::-1], b)
  config.data.update(batch_size=2, buckets=(8,), max_len=8)
  batch = next(iter(tasks.lm_batches(config, tok, texts, shuffle=False, seed=0).epoch_batches()))
  row = [int(i) for i in batch["inputs"][0] if i != tok.pad_id]
  assert row == [tok.bos_id, *backward[0].tolist()]  # <bos> then the text backwards


def test_a_backward_lm_grafts_only_into_a_backward_classifier(tmp_path, capsys):
  lm = tmp_path / "lm_bwd"
  code, _, err = run(capsys, "pretrain", *LM_ARGS, "--config.data.reverse=True", "--workdir", lm)
  assert code == 0, err
  code, _, err = run(capsys, "finetune", *CLF_ARGS, "--init-from", lm, "--workdir", tmp_path / "fwd")
  assert code == 2 and "data.reverse=True" in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / "fwd" / "checkpoints").exists()
  code, _, err = run(capsys, "finetune", *CLF_ARGS, "--config.data.reverse=True", "--init-from", lm,
                     "--workdir", tmp_path / "bwd")
  assert code == 0, err


def test_head_tail_truncation_keeps_both_ends():
  from jaxlm import batching
  seq = np.arange(100)
  np.testing.assert_array_equal(batching.truncated(seq, 8, "head"), np.arange(8))
  np.testing.assert_array_equal(batching.truncated(seq, 8, "tail"), np.arange(92, 100))
  np.testing.assert_array_equal(batching.truncated(seq, 8, "head_tail"), [0, 1, 94, 95, 96, 97, 98, 99])
  np.testing.assert_array_equal(batching.truncated(seq[:5], 8, "head_tail"), seq[:5])
  config = config_lib.classifier_config()
  config.data.update(truncate="head_tail", max_len=8, buckets=(8,), batch_size=2)
  tok = _tokenizer()
  records = [tasks.sources.Record(" ".join(["a"] * 20 + ["f"] * 10), 1), tasks.sources.Record("c", 0)]
  batch = next(iter(tasks.classification_batches(config, tok, records, shuffle=False,
                                                 seed=0).epoch_batches()))
  first = batch["tokens"][0].tolist()
  assert first[:2] == [tok.encode("a")[0]] * 2 and first[2:] == [tok.encode("f")[0]] * 6
  assert int(batch["lengths"][0]) == 8


def test_a_backward_classifier_reads_the_same_part_of_a_long_text():
  """Truncation picks the tokens in reading order; reversing comes after, so a forward and a
  backward model of an ensemble see the same window of a long review."""
  tok = _tokenizer()
  text = " ".join(["a"] * 6 + ["b"] * 6 + ["c"] * 6)
  cases = [(how, max_len) for how in ("head", "tail", "head_tail") for max_len in (8, 12, None)]
  for how, max_len in cases:  # max_len above the largest bucket (or none): the bucket cuts
    config = config_lib.classifier_config()
    config.data.update(truncate=how, max_len=max_len, buckets=(8,), batch_size=1)
    records = [tasks.sources.Record(text, 1)]
    fwd = next(iter(tasks.classification_batches(config, tok, records, shuffle=False,
                                                 seed=0).epoch_batches()))["tokens"][0]
    config.data.reverse = True
    bwd = next(iter(tasks.classification_batches(config, tok, records, shuffle=False,
                                                 seed=0).epoch_batches()))["tokens"][0]
    np.testing.assert_array_equal(bwd, fwd[::-1], err_msg=f"{how} max_len={max_len}")
