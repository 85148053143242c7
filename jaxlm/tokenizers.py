"""Tokenizers: text -> int32 token ids, with a vocabulary that is saved beside every checkpoint.

Two kinds share one interface (`vocab_size`, `pad_id`, `unk_id`, `bos_id`, `eos_id`, `encode`,
`encode_batch`, `decode`, `save`), so batching and models never ask which one they got:

- `WordTokenizer`: a regex word splitter close to torchtext's `basic_english` (what the seeds used)
  with a frequency-ranked vocabulary. It is pure Python `re` + dict lookups, which tokenizes and
  encodes the 25,000 IMDB training reviews in a few seconds.
- `SentencePieceTokenizer`: unigram or BPE subwords trained in memory with sentencepiece; no unknown
  words, a smaller vocabulary for the same coverage.

Both use the same special ids (<unk>=0 <pad>=1 <bos>=2 <eos>=3 by default), so a batch pipeline or a
grafted embedding table does not depend on the tokenizer kind. `save` writes `tokenizer.json`
(+ `spm.model`) atomically; `load_tokenizer` restores exactly what was saved, so a reloaded run
encodes every text to the same ids.
"""
from __future__ import annotations

import collections
import hashlib
import io
import itertools
import json
import os
import pathlib
import re
from typing import Iterable, Iterator, Sequence

import numpy as np

from jaxlm.files import atomic_write
from jaxlm.errors import CheckpointError, ConfigError, DataError

DEFAULT_SPECIALS = ("<unk>", "<pad>", "<bos>", "<eos>")
CONFIG_FILE = "tokenizer.json"
SPM_FILE = "spm.model"
FORMAT_VERSION = 1

# IMDB reviews carry HTML line breaks (`<br />`); they are layout, not words.
_BREAK_TAG = re.compile(r"<br\s*/?>", re.IGNORECASE)
# A word is a run of letters/digits that may contain inner apostrophes ("don't", "it's", "90's"
# stay one word, which keeps them frequent enough to be in the vocabulary); every other
# non-space character (punctuation, quotes, symbols) is a token of its own, as in basic_english
# (which, unlike this, cuts "don't" into "don ' t").
_TOKEN = re.compile(r"\w+(?:['\u2019]\w+)*|[^\w\s]")
# A lone surrogate is a valid Python str (JSON's "\ud800" escape decodes to one) but no UTF-8:
# sentencepiece cannot take it and a vocabulary holding it cannot be saved.
_SURROGATE = re.compile("[\ud800-\udfff]")


def strip_markup(text: str) -> str:
  """Replaces `<br />` line-break tags by spaces and lone surrogates by U+FFFD (both tokenizers
  see the same clean text, which always encodes to UTF-8)."""
  return _SURROGATE.sub("\ufffd", _BREAK_TAG.sub(" ", text))


def _check_can_add(name: str, token_id: int | None) -> None:
  if token_id is None:
    raise ConfigError(f"the tokenizer vocabulary has no {name} token, so add_{name[1:-1]}=True "
                      f"cannot be used; add {name} to config.tokenizer.specials")


class _Tokenizer:
  """What both tokenizers share: single-text encoding and the <bos>/<eos> availability check."""

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    return self.encode_batch([text], add_bos=add_bos, add_eos=add_eos)[0]

  def _check_specials(self, add_bos: bool, add_eos: bool) -> None:
    if add_bos:
      _check_can_add("<bos>", self.bos_id)
    if add_eos:
      _check_can_add("<eos>", self.eos_id)


# ----------------------------------------------------------------------------------------------
# Word tokenizer
# ----------------------------------------------------------------------------------------------


class WordTokenizer(_Tokenizer):
  """Regex word tokenizer with a frequency-ranked vocabulary.

  The vocabulary (`itos`) is the specials in order followed by words; unknown words map to
  `<unk>`, which is therefore required among the specials. Build one from texts with
  `WordTokenizer.train`.
  """

  kind = "word"

  def __init__(self, itos: Sequence[str], *, specials: Sequence[str] = DEFAULT_SPECIALS,
               lowercase: bool = True, options: dict | None = None):
    specials = tuple(specials)
    if "<unk>" not in specials:
      raise ConfigError(f"config.tokenizer.specials={specials!r} must contain '<unk>' "
                        "(unknown words need an id)")
    if len(set(specials)) != len(specials):
      raise ConfigError(f"config.tokenizer.specials={specials!r} has duplicates")
    if tuple(itos[:len(specials)]) != specials:
      raise ConfigError("a word vocabulary must start with its specials "
                        f"{specials!r}, got {tuple(itos[:len(specials)])!r}")
    self.itos = list(itos)
    self.stoi = {token: i for i, token in enumerate(self.itos)}
    if len(self.stoi) != len(self.itos):
      raise ConfigError("the word vocabulary has duplicate entries")
    self.specials = specials
    self.lowercase = bool(lowercase)
    self.options = dict(options or {})
    self.unk_id = self.stoi["<unk>"]
    self.pad_id = self.stoi.get("<pad>")
    self.bos_id = self.stoi.get("<bos>")
    self.eos_id = self.stoi.get("<eos>")

  @property
  def vocab_size(self) -> int:
    return len(self.itos)

  def __repr__(self):
    return f"WordTokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase})"

  # -- training -----------------------------------------------------------------------------

  @classmethod
  def train(cls, texts: Iterable[str], *, max_size: int | None = 25_000, min_freq: int = 1,
            specials: Sequence[str] = DEFAULT_SPECIALS, lowercase: bool = True) -> "WordTokenizer":
    """Counts words in `texts` and keeps the `max_size` most frequent ones with >= `min_freq`.

    Ties are broken alphabetically so the same texts always give the same vocabulary, whatever
    their order. `max_size` counts words only (specials are extra), as torchtext's `max_size`:
    with specials ('<unk>', '<pad>') and 25,000 words the vocabulary has 25,002 entries.
    """
    if max_size is not None and max_size < 0:
      raise ConfigError("config.tokenizer.vocab_size must be >= 0 for a word tokenizer, "
                        f"got {max_size}")
    if min_freq < 1:
      raise ConfigError(f"config.tokenizer.min_freq must be >= 1, got {min_freq}")
    specials = tuple(specials)
    counts = collections.Counter()
    num_texts = 0
    for text in texts:
      counts.update(_tokenize(text, lowercase))
      num_texts += 1
    if not counts:
      raise DataError(f"cannot build a word vocabulary: the training corpus ({num_texts} texts) "
                      "has no words")
    reserved = set(specials)
    kept = (item for item in counts.items() if item[1] >= min_freq and item[0] not in reserved)
    ranked = sorted(kept, key=lambda item: (-item[1], item[0]))
    if max_size is not None:
      ranked = ranked[:max_size]
    options = dict(max_size=max_size, min_freq=min_freq)
    return cls(list(specials) + [word for word, _ in ranked], specials=specials,
               lowercase=lowercase, options=options)

  # -- encoding -----------------------------------------------------------------------------

  def tokenize(self, text: str) -> list[str]:
    """The word strings of `text` (before vocabulary lookup)."""
    return _tokenize(text, self.lowercase)

  def encode_batch(self, texts: Iterable[str], add_bos: bool = False,
                   add_eos: bool = False) -> list[np.ndarray]:
    """Encodes many texts with one flat lookup and one array, split into per-text views."""
    self._check_specials(add_bos, add_eos)
    get, unk = self.stoi.get, self.unk_id
    head = [self.bos_id] if add_bos else []
    tail = [self.eos_id] if add_eos else []
    flat: list[int] = []
    ends: list[int] = []
    for text in texts:
      flat.extend(head)
      flat.extend([get(token, unk) for token in _tokenize(text, self.lowercase)])
      flat.extend(tail)
      ends.append(len(flat))
    ids = np.array(flat, dtype=np.int32)
    return np.split(ids, ends[:-1]) if ends else []

  def decode(self, ids: Iterable[int]) -> str:
    """Space-joined words; `<pad>` is dropped (it is never part of a text)."""
    return " ".join(self.itos[int(i)] for i in ids if int(i) != self.pad_id)

  # -- persistence --------------------------------------------------------------------------

  def save(self, directory: str | os.PathLike) -> None:
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    options = dict(self.options, lowercase=self.lowercase, specials=list(self.specials))
    payload = dict(format_version=FORMAT_VERSION, kind=self.kind, options=options, vocab=self.itos)
    atomic_write(directory / CONFIG_FILE, json.dumps(payload, ensure_ascii=False).encode("utf-8"))

  @classmethod
  def _from_saved(cls, payload: dict, directory: pathlib.Path) -> "WordTokenizer":
    options = dict(payload["options"])
    lowercase = options.pop("lowercase")
    specials = options.pop("specials")
    return cls(payload["vocab"], specials=specials, lowercase=lowercase, options=options)


def _tokenize(text: str, lowercase: bool) -> list[str]:
  text = strip_markup(text)
  return _TOKEN.findall(text.lower() if lowercase else text)


# ----------------------------------------------------------------------------------------------
# SentencePiece tokenizer
# ----------------------------------------------------------------------------------------------


class SentencePieceTokenizer(_Tokenizer):
  """A sentencepiece unigram/BPE model held as serialized bytes (no files needed to use it)."""

  kind = "sentencepiece"

  def __init__(self, model_proto: bytes, options: dict | None = None):
    import sentencepiece as spm
    self.model_proto = bytes(model_proto)
    self.options = dict(options or {})
    self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
    self.unk_id = _id_or_none(self._sp.unk_id())
    self.pad_id = _id_or_none(self._sp.pad_id())
    self.bos_id = _id_or_none(self._sp.bos_id())
    self.eos_id = _id_or_none(self._sp.eos_id())

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def __repr__(self):
    return (f"SentencePieceTokenizer(vocab_size={self.vocab_size}, "
            f"model_type={self.options.get('model_type')!r})")

  @classmethod
  def train(cls, texts: Iterable[str], *, vocab_size: int = 8000, model_type: str = "unigram",
            lowercase: bool = False, input_sentence_size: int = 1_000_000,
            max_sentence_length: int = 1 << 16, seed: int = 0) -> "SentencePieceTokenizer":
    """Trains in memory from an iterator of texts (each text is one sentencepiece "sentence").

    `hard_vocab_limit=False` lets a small corpus yield fewer pieces than asked instead of failing.
    Large corpora are subsampled to `input_sentence_size` texts with sentencepiece's shuffling,
    seeded so training is repeatable. `max_sentence_length` (bytes) is raised from sentencepiece's
    4,192 so long reviews are not silently skipped. Lowercasing is done by the model's own
    normaliser (`nmt_nfkc_cf`), so it also applies when encoding.
    """
    import sentencepiece as spm
    if model_type not in ("unigram", "bpe"):
      raise ConfigError(f"config.tokenizer.model_type={model_type!r} is not one of unigram, bpe")
    if vocab_size < 5:
      raise ConfigError(f"config.tokenizer.vocab_size={vocab_size} is too small for sentencepiece "
                        "(4 specials + pieces)")
    sentences = _nonempty_clean_texts(texts)
    try:
      first = next(sentences)
    except StopIteration:
      raise DataError("cannot train sentencepiece: the training corpus has no non-empty "
                      "text") from None
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=itertools.chain([first], sentences), model_writer=model,
          model_type=model_type, vocab_size=vocab_size, hard_vocab_limit=False,
          unk_id=0, pad_id=1, bos_id=2, eos_id=3,
          unk_piece="<unk>", pad_piece="<pad>", bos_piece="<bos>", eos_piece="<eos>",
          normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
          input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
          max_sentence_length=max_sentence_length, character_coverage=0.9995,
          minloglevel=2)
    except RuntimeError as e:
      raise ConfigError(f"sentencepiece training failed (vocab_size={vocab_size}, "
                        f"model_type={model_type}): {e}") from None
    options = dict(vocab_size=vocab_size, model_type=model_type, lowercase=lowercase,
                   input_sentence_size=input_sentence_size, seed=seed)
    return cls(model.getvalue(), options)

  def encode_batch(self, texts: Iterable[str], add_bos: bool = False,
                   add_eos: bool = False) -> list[np.ndarray]:
    self._check_specials(add_bos, add_eos)
    clean = [strip_markup(text) for text in texts]
    if not clean:
      return []
    pieces = self._sp.encode(clean, out_type=int, add_bos=add_bos, add_eos=add_eos)
    return [np.asarray(ids, dtype=np.int32) for ids in pieces]

  def decode(self, ids: Iterable[int]) -> str:
    """Detokenized text; control tokens (<pad>, <bos>, <eos>) decode to nothing."""
    return self._sp.decode([int(i) for i in ids])

  def save(self, directory: str | os.PathLike) -> None:
    """Writes `spm.model` first and `tokenizer.json` last: a folder with a `tokenizer.json` is
    complete, and the recorded hash catches a model file replaced or truncated afterwards."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / SPM_FILE, self.model_proto)
    payload = dict(format_version=FORMAT_VERSION, kind=self.kind, options=self.options,
                   model_file=SPM_FILE, model_sha256=hashlib.sha256(self.model_proto).hexdigest())
    atomic_write(directory / CONFIG_FILE, json.dumps(payload, ensure_ascii=False).encode("utf-8"))

  @classmethod
  def _from_saved(cls, payload: dict, directory: pathlib.Path) -> "SentencePieceTokenizer":
    path = directory / payload["model_file"]
    try:
      model_proto = path.read_bytes()
    except OSError as e:
      raise CheckpointError(f"tokenizer model {path} cannot be read: {e.strerror or e}") from None
    if hashlib.sha256(model_proto).hexdigest() != payload["model_sha256"]:
      raise CheckpointError(f"tokenizer model {path} does not match the hash in "
                            f"{directory / CONFIG_FILE} (file replaced or corrupt)")
    return cls(model_proto, payload["options"])


def _id_or_none(token_id: int) -> int | None:
  return None if token_id < 0 else int(token_id)


def _nonempty_clean_texts(texts: Iterable[str]) -> Iterator[str]:
  for text in texts:
    text = strip_markup(text).strip()
    if text:
      yield text


# ----------------------------------------------------------------------------------------------
# Building, saving and loading
# ----------------------------------------------------------------------------------------------

Tokenizer = WordTokenizer | SentencePieceTokenizer
_KINDS = {cls.kind: cls for cls in (WordTokenizer, SentencePieceTokenizer)}


def build_tokenizer(cfg, texts: Iterable[str]) -> Tokenizer:
  """Trains the tokenizer that `config.tokenizer` describes on `texts`.

  `cfg` may be the tokenizer section itself or a whole run config (its `.tokenizer` is used).
  Missing fields take the defaults of `jaxlm.config`.
  """
  if "tokenizer" in cfg and not isinstance(cfg["tokenizer"], (str, bytes)):
    cfg = cfg["tokenizer"]
  kind = cfg.get("kind", "word")
  vocab_size = cfg.get("vocab_size", None)
  lowercase = bool(cfg.get("lowercase", True))
  if kind == "word":
    return WordTokenizer.train(texts, max_size=vocab_size, min_freq=int(cfg.get("min_freq", 1)),
                               specials=tuple(cfg.get("specials", DEFAULT_SPECIALS)),
                               lowercase=lowercase)
  if kind == "sentencepiece":
    return SentencePieceTokenizer.train(texts, vocab_size=int(vocab_size or 8000),
                                        model_type=cfg.get("model_type", "unigram"),
                                        lowercase=lowercase)
  raise ConfigError(f"config.tokenizer.kind={kind!r} is not one of {', '.join(_KINDS)}")


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
  """Restores a tokenizer written by `save`; any missing or unreadable file is a CheckpointError."""
  directory = pathlib.Path(directory)
  path = directory / CONFIG_FILE
  if not path.is_file():
    raise CheckpointError(f"no tokenizer in {directory}: {path} does not exist")
  try:
    payload = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"tokenizer file {path} cannot be read: {e}") from None
  kind = payload.get("kind") if isinstance(payload, dict) else None
  if kind not in _KINDS:
    raise CheckpointError(f"tokenizer file {path} has unknown kind {kind!r} "
                          f"(expected one of {', '.join(_KINDS)})")
  try:
    return _KINDS[kind]._from_saved(payload, directory)
  except (KeyError, TypeError, ValueError, ConfigError) as e:
    raise CheckpointError(f"tokenizer file {path} is incomplete or corrupt: {e!r}") from None


