"""Hostile text, fuzzed with hypothesis, through every layer a user's text reaches.

Why: reviews and `jaxlm predict` input come from files and pipes nobody cleaned. Empty and
whitespace-only texts, control characters and NUL, emoji, right-to-left scripts, combining marks,
CJK and Devanagari, lone surrogates (a Python str can hold one: JSON's "\\ud800" escape, or
`surrogateescape` from argv) and invalid UTF-8 bytes must never crash the tokenizers, break the
batch contract (fixed shapes, lengths >= 1), make a training loss non-finite, or cost `predict`
its one-JSON-line-per-input-line promise. Megabyte-long texts must be truncated, not blow up.

Example counts are bounded (about 30 s of CPU time for the file, most of it the fixture's two tiny
training runs); every input tried is counted and the totals are printed at the end (and written
to `<pytest basetemp>/fuzz_inputs.json`).
"""
import io
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxlm import batching, cli, commands
from jaxlm.data import synthetic
from jaxlm.errors import ConfigError, DataError
from jaxlm.tokenizers import SentencePieceTokenizer, WordTokenizer, load_tokenizer
from jaxlm.train import steps

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
REPO = CONFIGS.parent

# -- counting ----------------------------------------------------------------------------------

TRIED = {"examples": 0, "texts": 0}


def _tried(texts) -> None:
  """One generated example holding `texts` (each string or stdin line counts as one text)."""
  TRIED["examples"] += 1
  TRIED["texts"] += len(texts)


@pytest.fixture(scope="module", autouse=True)
def report_counts(request, tmp_path_factory):
  yield
  line = (f"test_fuzz: {TRIED['examples']} generated examples, {TRIED['texts']} hostile texts "
          "tried in total")
  path = tmp_path_factory.getbasetemp() / "fuzz_inputs.json"
  path.write_text(json.dumps(TRIED))
  plugins = request.config.pluginmanager
  reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
  if reporter is not None and capture is not None:
    with capture.global_and_fixture_disabled():  # shown without -s
      reporter.write_line(f"\n{line} ({path})")


def fuzz(max_examples: int):
  """Bounded, deadline-free, nothing written into the repository (no example database)."""
  return settings(max_examples=max_examples, deadline=None, database=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.function_scoped_fixture,
                                         HealthCheck.large_base_example])


# -- hostile text --------------------------------------------------------------------------------

WORDS = ["great", "film", "not", "bad", "the", "plot", "was", "superb", "!", ",", ".", "<br />",
         "don't", "GREAT", "Film"]
WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u200b\u2028\u2029\u3000\ufeff"


def _chars(lo, hi, size=8):
  return st.text(st.characters(min_codepoint=lo, max_codepoint=hi), max_size=size)


PIECES = st.one_of(
    st.sampled_from(WORDS),
    st.text(st.sampled_from(WHITESPACE), max_size=8),
    st.text(st.characters(categories=["Cc"]), max_size=8),          # control characters, NUL
    st.just("\x00"),
    _chars(0x1F300, 0x1FAFF, 4),                                     # emoji
    st.sampled_from(["👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "\u2764\ufe0f", "\U0001F600"]),
    _chars(0x0590, 0x06FF),                                          # Hebrew, Arabic
    st.sampled_from(["\u200e", "\u200f", "\u202a", "\u202e", "\u2066", "\u2069", "שלום", "مرحبا"]),
    st.text(st.characters(categories=["Mn", "Me"]), max_size=6),    # combining marks
    st.sampled_from(["e\u0301", "Z\u0351\u0362\u0337\u0300", "\u0301"]),
    _chars(0x4E00, 0x9FFF),                                          # CJK
    _chars(0x0900, 0x097F),                                          # Devanagari
    st.integers(0xD800, 0xDFFF).map(chr),                            # a lone surrogate
    st.binary(max_size=12).map(lambda b: b.decode("utf-8", "replace")),          # bad bytes, read
    st.binary(max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape")),  # bad bytes, argv
    st.text(max_size=10),
)
HOSTILE = st.lists(PIECES, max_size=8).map("".join)
TEXTS = st.lists(HOSTILE, min_size=1, max_size=8)

# About a megabyte each (in UTF-8), of the kinds that stress a tokenizer differently.
MEGABYTE = {
    "words": "great film ! " * 80_000,
    "one_word": "x" * 1_000_000,
    "emoji": "\U0001F600" * 250_000,
    "cjk": "中文" * 170_000,
    "arabic": "مرحبا " * 90_000,
    "combining": "e" + "\u0301" * 500_000,
    "nul": "\x00" * 1_000_000,
    "spaces": " " * 1_000_000,
    "breaks": "<br />" * 170_000,
}


# -- a tiny trained pipeline -------------------------------------------------------------------

SOURCE = "synthetic:train=80,test=24,unsup=120"


def _tiny():
  return [f"--config.{k}={v}" for k, v in [
      ("data.source", SOURCE), ("data.batch_size", 8), ("data.eval_batch_size", 8),
      ("data.buckets", "(32,)"), ("data.max_len", 32), ("tokenizer.vocab_size", 200),
      ("model.embed_dim", 16), ("model.hidden_size", 16), ("model.num_layers", 1),
      ("train.num_devices", 1)]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """pretrain -> finetune, once for the module (sentencepiece gets its own tokenizer below: a
  second trained run would double the fixture's time for the same predict code path)."""
  root = tmp_path_factory.mktemp("fuzz")
  lm, clf = root / "lm", root / "clf"
  assert cli.main(["jaxlm", "pretrain", "--config", f"{CONFIGS}/quickstart.py:pretrain", *_tiny(),
                   "--config.train.max_steps=4", "--config.data.test_max_examples=8",
                   "--noprogress", "--workdir", str(lm)]) == 0
  assert cli.main(["jaxlm", "finetune", "--config", f"{CONFIGS}/quickstart.py:finetune", *_tiny(),
                   "--config.train.num_epochs=1", "--noprogress", "--init-from", str(lm),
                   "--workdir", str(clf)]) == 0
  return {"word": clf}


@pytest.fixture(scope="module")
def toks(runs):
  """The run's own word tokenizer and both sentencepiece kinds, trained on the same corpus."""
  corpus, _ = synthetic.generate("train", 80)
  return {"word": load_tokenizer(runs["word"] / "tokenizer"),
          "unigram": SentencePieceTokenizer.train(corpus, vocab_size=100, model_type="unigram"),
          "bpe": SentencePieceTokenizer.train(corpus, vocab_size=100, model_type="bpe")}


# -- tokenizers --------------------------------------------------------------------------------


def _check_ids(tok, ids):
  assert isinstance(ids, np.ndarray) and ids.dtype == np.int32 and ids.ndim == 1
  assert ((ids >= 0) & (ids < tok.vocab_size)).all(), ids


def _check_decode(tok, ids):
  text = tok.decode(ids)
  assert isinstance(text, str)
  text.encode("utf-8")  # what decode gives is printable and savable: no lone surrogate


@fuzz(200)
@given(texts=TEXTS, bos=st.booleans(), eos=st.booleans())
def test_tokenizers_encode_and_decode_anything(toks, texts, bos, eos):
  _tried(texts)
  for tok in toks.values():
    batch = tok.encode_batch(texts, add_bos=bos, add_eos=eos)
    assert len(batch) == len(texts)
    for text, ids in zip(texts, batch):
      _check_ids(tok, ids)
      np.testing.assert_array_equal(ids, tok.encode(text, add_bos=bos, add_eos=eos))
      if bos:
        assert ids[0] == tok.bos_id
      if eos:
        assert ids[-1] == tok.eos_id
      _check_decode(tok, ids)


@fuzz(15)
@given(texts=st.lists(HOSTILE, max_size=6))
def test_tokenizers_train_save_load_on_hostile_corpus(tmp_path_factory, texts):
  """A corpus with hostile texts trains, saves (lone surrogates used to fail both), and reloads
  to the same ids."""
  _tried(texts)
  corpus = texts + ["the plot was great !", "a dull film ."]
  trained = [WordTokenizer.train(corpus)]
  for model_type in ("unigram", "bpe"):
    try:
      trained.append(SentencePieceTokenizer.train(corpus, vocab_size=60, model_type=model_type))
    except ConfigError as e:  # more distinct characters than pieces: a one-line user error
      assert "smaller than required_chars" in str(e) and "\n" not in str(e)
  for tok in trained:
    where = tmp_path_factory.mktemp("tok")
    tok.save(where)
    again = load_tokenizer(where)
    for a, b in zip(tok.encode_batch(corpus), again.encode_batch(corpus)):
      _check_ids(tok, a)
      np.testing.assert_array_equal(a, b)
      _check_decode(again, b)


# -- batching ----------------------------------------------------------------------------------


BUCKETS = st.sampled_from([None, (4,), (8, 16), (2, 5, 64)])


@fuzz(150)
@given(texts=TEXTS, batch_size=st.integers(1, 5), max_len=st.integers(1, 40), buckets=BUCKETS,
       truncate=st.sampled_from(["head", "tail"]), drop=st.booleans(), shuffle=st.booleans(),
       kind=st.sampled_from(["word", "unigram", "bpe"]))
def test_classification_batches_keep_their_contract(toks, texts, batch_size, max_len, buckets,
                                                    truncate, drop, shuffle, kind):
  _tried(texts)
  tok = toks[kind]
  ids = tok.encode_batch(texts)
  labels = np.arange(len(ids)) % 2
  try:
    batches = batching.ClassificationBatches(
        ids, labels, batch_size, buckets=buckets, max_len=max_len, pad_id=tok.pad_id,
        shuffle=shuffle, seed=1, drop_remainder=drop, truncate=truncate, include_index=True)
  except DataError:
    assert drop  # only a drop_remainder plan can be left without one full batch
    return
  cap = batches.buckets[-1]
  assert cap <= max_len
  seen = []
  for batch in batches.epoch_batches():
    width = batch["tokens"].shape[1]
    assert batch["tokens"].shape == (batch_size, width) and width in batches.buckets
    assert batch["tokens"].dtype == np.int32 and batch["lengths"].dtype == np.int32
    assert ((batch["lengths"] >= 1) & (batch["lengths"] <= width)).all()
    assert ((batch["tokens"] >= 0) & (batch["tokens"] < tok.vocab_size)).all()
    for row, example in enumerate(batch["index"]):
      if example < 0:
        assert batch["weights"][row] == 0
        continue
      seq = ids[example]
      kept = seq[:cap] if truncate == "head" else seq[max(len(seq) - cap, 0):]
      assert batch["lengths"][row] == max(len(kept), 1) and batch["weights"][row] == 1
      np.testing.assert_array_equal(batch["tokens"][row, :len(kept)], kept)
      assert (batch["tokens"][row, len(kept):] == tok.pad_id).all()
      seen.append(int(example))
  assert len(seen) == len(set(seen))
  if not drop:
    assert sorted(seen) == list(range(len(ids)))


@fuzz(100)
@given(texts=TEXTS, batch_size=st.integers(1, 4), max_len=st.integers(1, 24), buckets=BUCKETS,
       markers=st.sampled_from([(True, True), (True, False), (False, True), (False, False)]),
       long_text=st.sampled_from(["chunk", "truncate"]), kind=st.sampled_from(["word", "bpe"]))
def test_review_lm_batches_keep_their_contract(toks, texts, batch_size, max_len, buckets, markers,
                                               long_text, kind):
  _tried(texts)
  tok = toks[kind]
  ids = tok.encode_batch(texts)
  bos = tok.bos_id if markers[0] else None
  eos = tok.eos_id if markers[1] else None
  try:
    batches = batching.ReviewLMBatches(ids, batch_size, pad_id=tok.pad_id, bos_id=bos, eos_id=eos,
                                       buckets=buckets, max_len=max_len, shuffle=True, seed=2,
                                       long_text=long_text)
  except DataError:
    assert all(len(x) + (bos is not None) + (eos is not None) < 2 for x in ids)
    return
  predicted = 0
  for batch in batches.epoch_batches():
    width = batch["inputs"].shape[1]
    assert width in batches.buckets and width <= max_len
    for key in ("inputs", "targets", "weights"):
      assert batch[key].shape == (batch_size, width)
    assert ((batch["lengths"] >= 1) & (batch["lengths"] <= width)).all()
    assert ((batch["targets"] >= 0) & (batch["targets"] < tok.vocab_size)).all()
    real = batch["weights"].sum(axis=1)
    assert ((real == batch["lengths"]) | ((real == 0) & (batch["lengths"] == 1))).all()
    predicted += int(real.sum())
  assert predicted == len(batches.target_ids())
  if long_text == "chunk":  # chunking loses no target
    markers_len = (bos is not None) + (eos is not None)
    assert predicted == sum(max(len(x) + markers_len - 1, 0) for x in ids)


@fuzz(100)
@given(texts=TEXTS, batch_size=st.integers(1, 4), bptt=st.integers(1, 12),
       random_offset=st.booleans(), drop=st.booleans(), kind=st.sampled_from(["word", "unigram"]))
def test_stream_lm_batches_keep_their_contract(toks, texts, batch_size, bptt, random_offset, drop,
                                               kind):
  _tried(texts)
  tok = toks[kind]
  ids = tok.encode_batch(texts)
  try:
    batches = batching.StreamLMBatches(ids, batch_size, bptt, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                       random_offset=random_offset, seed=3, drop_remainder=drop)
  except DataError:  # only when the rows are too short for one window
    stream = sum(len(x) + 1 for x in ids)
    row_len = (stream - (bptt - 1 if random_offset else 0)) // batch_size
    assert row_len - 1 < (bptt if drop else 1)
    return
  for epoch in (0, 1):
    for batch in batches.epoch_batches(epoch):
      for key in ("inputs", "targets", "weights"):
        assert batch[key].shape == (batch_size, bptt)
      assert (batch["lengths"] == bptt).all()
      assert ((batch["inputs"] >= 0) & (batch["inputs"] < tok.vocab_size)).all()
      assert batch["weights"][:, 0].all()  # every window predicts at least one token


def test_megabyte_texts_are_encoded_and_truncated(toks):
  """Each tokenizer takes a megabyte of each kind; batching keeps max_len tokens of it."""
  _tried(list(MEGABYTE))
  for name, tok in toks.items():
    for kind, text in MEGABYTE.items():
      start = time.perf_counter()
      ids = tok.encode(text)
      _check_ids(tok, ids)
      batches = batching.ClassificationBatches([ids, ids[:3]], [1, 0], 2, buckets=(16, 64),
                                               max_len=16, pad_id=tok.pad_id, shuffle=False)
      (batch,) = list(batches.epoch_batches())
      assert batch["tokens"].shape == (2, 16)
      assert list(batch["lengths"]) == [min(max(len(ids), 1), 16), max(min(len(ids), 3), 1)]
      lm = batching.ReviewLMBatches([ids], 1, pad_id=tok.pad_id, bos_id=tok.bos_id,
                                    eos_id=tok.eos_id, buckets=(16,), max_len=16, shuffle=False,
                                    long_text="truncate")
      assert lm.num_batches_per_epoch == 1 and lm.batch(0, 0)["inputs"].shape == (1, 16)
      _check_decode(tok, ids[:1000])
      assert time.perf_counter() - start < 20, (name, kind)


# -- a jitted train step -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer(runs):
  """The word run's classifier with a fresh Adam state, carried across examples (the buffers are
  donated each step): hostile batches one after another, as a training run would see them."""
  config, tokenizer, model, params, _ = commands._load_run(runs["word"], "latest")
  tx = optax.adam(1e-2)
  loss_fn = steps.classifier_loss(model, config.model.loss, config.model.num_classes)
  return {"tokenizer": tokenizer, "step": steps.make_train_step(loss_fn, tx),
          "state": steps.create_state(jax.tree.map(np.array, params), tx, 0)}


@fuzz(30)
@given(texts=st.lists(HOSTILE, min_size=1, max_size=4), labels=st.lists(st.integers(0, 1),
                                                                           min_size=4, max_size=4))
def test_train_step_on_hostile_batches_has_a_finite_loss(trainer, texts, labels):
  _tried(texts)
  tok = trainer["tokenizer"]
  ids = tok.encode_batch(texts)
  batches = batching.ClassificationBatches(ids, labels[:len(ids)], 4, buckets=(16,), max_len=16,
                                           pad_id=tok.pad_id, shuffle=False)
  (batch,) = list(batches.epoch_batches())  # one shape for every example: one compile
  trainer["state"], metrics, _ = trainer["step"](trainer["state"], batch)
  assert float(metrics["nonfinite"]) == 0.0
  loss = float(metrics["loss_sum"]) / float(metrics["weight_sum"])
  assert np.isfinite(loss) and float(metrics["weight_sum"]) == len(ids)
  assert np.isfinite(float(metrics["grad_norm"]))


# -- predict -----------------------------------------------------------------------------------


def _parse_lines(out: str, expected_texts):
  """stdout is exactly one strict-JSON line per input text, in order, and valid UTF-8."""
  out.encode("utf-8")
  assert out == "" or out.endswith("\n")
  lines = out.split("\n")[:-1] if out else []
  assert len(lines) == len(expected_texts), (len(lines), len(expected_texts))
  answers = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
             for line in lines]
  # JSON has no lone surrogates: a text holding a high and a low surrogate as two code points
  # is written as two \u escapes, which every JSON reader joins into the one character they
  # encode. That is the text a reader gets back; compare with it.
  as_json_reads = [json.loads(json.dumps(t)) for t in expected_texts]
  assert [a["text"] for a in answers] == as_json_reads
  for a in answers:
    assert a["label"] in (0, 1) and (a["probability"] is None or 0.5 <= a["probability"] <= 1)
  return answers


@fuzz(10)
@given(texts=st.lists(HOSTILE, min_size=1, max_size=8))
def test_predict_prints_one_json_line_per_text(runs, capsys, texts):
  _tried(texts)
  capsys.readouterr()
  got = commands.predict(runs["word"], texts, which="latest")
  out, _ = capsys.readouterr()
  assert [g["text"] for g in got] == texts
  _parse_lines(out, texts)


def test_predict_megabyte_and_empty_texts(runs, capsys):
  texts = ["", " ", "\x00", "great film"] + list(MEGABYTE.values())
  _tried(texts)
  capsys.readouterr()
  commands.predict(runs["word"], texts, which="latest")
  out, _ = capsys.readouterr()
  _parse_lines(out, texts)
  assert commands.predict(runs["word"], [], which="latest") == []
  assert capsys.readouterr().out == ""


def _expected_lines(data: bytes) -> list[str]:
  """What `jaxlm predict` must answer for stdin bytes: lines split at b"\\n" only, a final
  newline ending (not starting) a line, CRLF's "\\r" dropped, invalid UTF-8 replaced by U+FFFD."""
  lines = data.split(b"\n")
  if lines[-1] == b"":
    lines.pop()
  return [(line[:-1] if line.endswith(b"\r") else line).decode("utf-8", "replace")
          for line in lines]


LINE_BYTES = st.one_of(st.binary(max_size=16),
                       HOSTILE.map(lambda s: s.encode("utf-8", "surrogatepass")))


@fuzz(8)
@given(lines=st.lists(LINE_BYTES, max_size=6), newline=st.sampled_from([b"\n", b"\r\n"]),
       final_newline=st.booleans())
def test_cli_predict_stdin_bytes(runs, capsys, monkeypatch, lines, newline, final_newline):
  data = newline.join(lines) + (newline if final_newline and lines else b"")
  expected = _expected_lines(data)
  _tried(expected)
  monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
  capsys.readouterr()
  assert cli.main(["jaxlm", "predict", "--workdir", str(runs["word"]), "--which", "latest"]) == 0
  out, err = capsys.readouterr()
  assert "Traceback" not in err
  _parse_lines(out, expected)


def test_real_cli_predict_on_hostile_stdin_pipe(runs):
  """`python -m jaxlm.cli predict` with bytes piped in and an ASCII locale: invalid UTF-8 becomes
  U+FFFD and is never echoed raw, blank lines get an answer, CRLF and LF both end a line, a lone
  CR / form feed / U+2028 / NEL stay inside theirs, a megabyte line is answered too."""
  lines = [b"a wonderful, moving film", b"", b"\xff\xfe\xfd broken bytes", b"nul\x00inside",
           b"  \t ", b"\xed\xa0\x80 an encoded surrogate \xc0\xaf overlong",
           "中文 हिन्दी مرحبا שלום 😀 e\u0301 \u202eevil".encode(), b"lone\rcarriage return",
           "form\x0cfeed \x85 nel \u2028 ls \u2029 ps".encode(), b"\x80", b"",
           ("great film " * 100_000).encode(), b"not good at all"]
  data = b"\r\n".join(lines[:6]) + b"\r\n" + b"\n".join(lines[6:])  # no final newline
  expected = _expected_lines(data)
  assert len(expected) == len(lines)
  _tried(expected)
  env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONIOENCODING="ascii")
  proc = subprocess.run([sys.executable, "-m", "jaxlm.cli", "predict", "--workdir",
                         str(runs["word"]), "--which", "latest"], input=data, capture_output=True,
                        cwd=REPO, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")[-2000:]
  out = proc.stdout.decode("utf-8")  # strict: valid UTF-8, so no input byte was echoed raw
  answers = _parse_lines(out, expected)
  assert answers[2]["text"].startswith("\ufffd\ufffd\ufffd") and answers[1]["text"] == ""
