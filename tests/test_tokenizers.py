"""Tokenizers: splitting, vocabulary rules, special ids, save/load round trips and errors."""
import json

import ml_collections
import numpy as np
import pytest

from jaxlm.errors import CheckpointError, ConfigError, DataError
from jaxlm.tokenizers import (SentencePieceTokenizer, WordTokenizer, build_tokenizer,
                              load_tokenizer)

TEXTS = [
    "This movie was great! I don't think it's bad.<br /><br />Really, GREAT.",
    "A terrible film... the plot (if any) was dull; the acting: worse.",
    "Great acting, great story. Don't miss it!",
    "I didn't like it. The ending was \"meh\" <br/> and slow.",
] * 5


def _cfg(**overrides):
  cfg = ml_collections.ConfigDict(dict(kind="word", vocab_size=10_000, min_freq=1, lowercase=True,
                                       specials=("<unk>", "<pad>", "<bos>", "<eos>"),
                                       model_type="unigram"))
  cfg.update(overrides)
  return cfg


# -- word tokenizer ---------------------------------------------------------------------------


def test_word_split_strips_breaks_lowercases_and_keeps_contractions():
  tok = WordTokenizer.train(TEXTS)
  assert tok.tokenize(TEXTS[0]) == [
      "this", "movie", "was", "great", "!", "i", "don't", "think", "it's", "bad", ".",
      "really", ",", "great", "."]
  assert tok.tokenize("'quoted' (x)") == ["'", "quoted", "'", "(", "x", ")"]
  assert "<br" not in " ".join(tok.tokenize("a<br />b<BR/>c"))
  cased = WordTokenizer.train(TEXTS, lowercase=False)
  assert cased.tokenize("GREAT Film") == ["GREAT", "Film"]


def test_word_vocab_order_specials_frequency_then_alphabetical():
  tok = WordTokenizer.train(["b a c", "c b", "c d e"], max_size=3)
  # c:3, b:2, then a/d/e tie at 1 -> alphabetical, cut at 3 words.
  assert tok.itos == ["<unk>", "<pad>", "<bos>", "<eos>", "c", "b", "a"]
  assert (tok.unk_id, tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.vocab_size == 7
  # Input order does not matter.
  assert WordTokenizer.train(["c d e", "c b", "b a c"], max_size=3).itos == tok.itos


def test_word_min_freq_and_unknowns():
  tok = WordTokenizer.train(["a a b", "a c"], min_freq=2)
  assert tok.itos[4:] == ["a"]
  np.testing.assert_array_equal(tok.encode("a b zebra"), [4, 0, 0])


def test_word_specials_configurable_and_missing_bos_eos_are_none():
  tok = WordTokenizer.train(TEXTS, specials=("<unk>", "<pad>"))
  assert (tok.unk_id, tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, None, None)
  with pytest.raises(ConfigError, match="<bos>"):
    tok.encode("great", add_bos=True)
  with pytest.raises(ConfigError, match="<unk>"):
    WordTokenizer.train(TEXTS, specials=("<pad>",))


def test_word_vocab_size_is_words_plus_specials():
  # 25,000 words + 2 specials is what seed 003's parameter count assumes.
  texts = [" ".join(f"w{i}" for i in range(30_000))]
  tok = WordTokenizer.train(texts, max_size=25_000, specials=("<unk>", "<pad>"))
  assert tok.vocab_size == 25_002


def test_word_encode_bos_eos_dtype_and_batch_matches_single():
  tok = WordTokenizer.train(TEXTS)
  ids = tok.encode("great movie", add_bos=True, add_eos=True)
  assert ids.dtype == np.int32
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) == 4
  batch = tok.encode_batch(TEXTS[:4] + [""])
  assert len(batch) == 5 and batch[-1].shape == (0,)
  for text, got in zip(TEXTS[:4], batch):
    np.testing.assert_array_equal(got, tok.encode(text))
  assert tok.encode_batch([]) == []
  assert tok.decode(tok.encode("great movie !")) == "great movie !"
  assert tok.decode([tok.pad_id, *tok.encode("great")]) == "great"


# -- sentencepiece ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def sp_tok(request):
  return SentencePieceTokenizer.train(TEXTS, vocab_size=60, model_type=request.param)


def test_sentencepiece_special_ids_match_word_tokenizer(sp_tok):
  assert (sp_tok.unk_id, sp_tok.pad_id, sp_tok.bos_id, sp_tok.eos_id) == (0, 1, 2, 3)
  ids = sp_tok.encode("great movie", add_bos=True, add_eos=True)
  assert ids.dtype == np.int32 and ids[0] == 2 and ids[-1] == 3
  assert sp_tok.decode(sp_tok.encode("great movie")) == "great movie"
  assert 4 < sp_tok.vocab_size <= 60


def test_sentencepiece_strips_breaks_and_is_deterministic(sp_tok):
  a = sp_tok.encode("great<br />movie")
  np.testing.assert_array_equal(a, sp_tok.encode("great movie"))
  again = SentencePieceTokenizer.train(TEXTS, vocab_size=60,
                                       model_type=sp_tok.options["model_type"])
  assert again.model_proto == sp_tok.model_proto


def test_sentencepiece_lowercase_option():
  tok = SentencePieceTokenizer.train(TEXTS, vocab_size=60, lowercase=True)
  np.testing.assert_array_equal(tok.encode("GREAT Movie"), tok.encode("great movie"))


# -- build / save / load ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["word", "sentencepiece"])
def test_build_save_load_round_trip(tmp_path, kind):
  tok = build_tokenizer(_cfg(kind=kind, vocab_size=50), TEXTS)
  tok.save(tmp_path / "tok")
  assert (tmp_path / "tok" / "tokenizer.json").is_file()
  assert not [p for p in (tmp_path / "tok").iterdir() if p.name.endswith(".tmp")]
  loaded = load_tokenizer(tmp_path / "tok")
  assert type(loaded) is type(tok)
  assert loaded.vocab_size == tok.vocab_size
  assert (loaded.unk_id, loaded.pad_id, loaded.bos_id, loaded.eos_id) == (
      tok.unk_id, tok.pad_id, tok.bos_id, tok.eos_id)
  probe = TEXTS + ["Unseen WORDS here, zebra!"]
  for a, b in zip(tok.encode_batch(probe, add_bos=True), loaded.encode_batch(probe, add_bos=True)):
    np.testing.assert_array_equal(a, b)


def test_build_accepts_whole_run_config_and_word_options():
  run = ml_collections.ConfigDict(dict(tokenizer=_cfg(vocab_size=3, specials=("<unk>", "<pad>"))))
  tok = build_tokenizer(run, TEXTS)
  assert isinstance(tok, WordTokenizer) and tok.vocab_size == 5
  assert tok.bos_id is None


def test_build_errors():
  with pytest.raises(ConfigError, match="kind"):
    build_tokenizer(_cfg(kind="bytes"), TEXTS)
  with pytest.raises(DataError):
    build_tokenizer(_cfg(), [])
  with pytest.raises(DataError):
    build_tokenizer(_cfg(kind="sentencepiece", vocab_size=50), ["", "<br />"])
  with pytest.raises(ConfigError, match="model_type"):
    build_tokenizer(_cfg(kind="sentencepiece", model_type="char"), TEXTS)


def test_load_errors_name_the_path(tmp_path):
  with pytest.raises(CheckpointError, match=str(tmp_path / "nothing")):
    load_tokenizer(tmp_path / "nothing")
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="bad"):
    load_tokenizer(tmp_path / "bad")
  (tmp_path / "bad" / "tokenizer.json").write_text(json.dumps({"kind": "word"}))
  with pytest.raises(CheckpointError, match="corrupt"):
    load_tokenizer(tmp_path / "bad")
  (tmp_path / "bad" / "tokenizer.json").write_text(json.dumps({"kind": "bytes"}))
  with pytest.raises(CheckpointError, match="kind"):
    load_tokenizer(tmp_path / "bad")


def test_load_sentencepiece_detects_missing_or_changed_model(tmp_path):
  SentencePieceTokenizer.train(TEXTS, vocab_size=60).save(tmp_path)
  model = tmp_path / "spm.model"
  model.write_bytes(model.read_bytes()[:-10])
  with pytest.raises(CheckpointError, match="spm.model"):
    load_tokenizer(tmp_path)
  model.unlink()
  with pytest.raises(CheckpointError, match="spm.model"):
    load_tokenizer(tmp_path)
