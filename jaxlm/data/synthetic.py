"""A seeded, offline corpus of movie-review-like text whose sentiment depends on word order.

Why it exists: the quickstart (pretrain an LM -> graft -> fine-tune) must run on a machine with no
internet in about two minutes on two CPU cores, and it must still show the effect the library is
about: language-model pretraining helps when only a few hundred labels are available. So the
labels follow a rule a sequence model can learn, but a bag of words cannot fully capture.

Output format: lowercase words and punctuation separated by single spaces
("the plot was not bad . the acting was superb !"), so any tokenizer splits it the same way.

Grammar (one review = several sentences, 20-80 words):

  review    := filler{1,2} opinions filler{0,1}    (more filler if < 20 words, less if > 80)
  opinions  := shuffled sentences of the kinds below: simple | contrast | verdict
  filler    := neutral sentence about the film: genre, director, cast, story, where it was watched
  clause    := "the" ASPECT VERB ["not" | "never"] [INTENSIFIER] ADJECTIVE
               | "the" ASPECT VERB [INTENSIFIER] ADJECTIVE "and" ADJECTIVE   (same polarity)
  simple    := clause END
  contrast  := clause ", but" clause END  |  "although" clause "," clause END
  END       := "!" if the sentence ends with a positive adjective, else "."  (surface cue only:
               "the plot was not bad ." is positive, "the plot was not good !" negative)
  verdict   := "overall it is" ["not"] "a" [INTENSIFIER] ADJECTIVE GENRE "."

Semantics (`sentiment_of` implements exactly this, reading only the text):
  * an adjective has polarity +1 (good, superb, ...) or -1 (dull, awful, ...); a clause counts
    once, by its first adjective ("great and fun" = +1);
  * "not"/"never" before it flips the polarity ("not bad" is positive);
  * an intensifier doubles the weight of a non-negated adjective ("extremely good" = +2,
    "not very good" = -1);
  * in a contrast sentence only the second clause counts (after "but", or the main clause after
    "although ... ,");
  * the review is positive when the sum over sentences is > 0 (generation never produces 0).

Review kinds (fractions of all reviews; labels are balanced exactly in every pair of reviews):
  * plain (~72%): 4-7 simple opinions of the review's polarity (+ sometimes a verdict); a bag of
    words gets these right.
  * negation (~14%): 3-5 negated opinions only ("the plot was not bad"), sometimes a negated
    verdict; a bag of words gets these mostly wrong.
  * contrast (~14%): 2-3 sentences "the plot was dull , but the acting was superb ." or
    "although ..."; equally many positive and negative adjectives, so a bag of words guesses.
The last two (~28%) hinge on order, so a bag of words scores clearly below the rule (~0.8).
Only 8 adjectives per polarity, and every opinion of a review (the second clause of a contrast,
the meaning of a negated one) has the review's polarity: a language model predicts the next
adjective well only if it tracks the review's sentiment across sentences (and flips it after
"but" / "not"), which is exactly the state the classifier needs, so pretraining pays off.

Determinism: every split draws from its own `numpy.random.RandomState([seed, split_index])`
stream (a legacy generator whose stream numpy guarantees across versions and machines); no
Python `hash()` is involved. Reviews are generated one after another from that stream, so the
first N reviews of a split are the same whatever the total requested.
"""

import numpy as np

DEFAULT_SEED = 0
DEFAULT_SIZES = {"train": 5000, "test": 2000, "unsup": 20000}
SPLITS = ("train", "test", "unsup")
NUM_CLASSES = 2

POSITIVE = ("good", "great", "superb", "excellent", "wonderful", "brilliant", "charming", "fun")
NEGATIVE = ("bad", "dull", "boring", "awful", "terrible", "weak", "clumsy", "silly")
INTENSIFIERS = (
  "very", "extremely", "really", "truly", "incredibly", "remarkably", "genuinely", "so",
  "absolutely",
)
NEGATORS = ("not", "never")
ASPECTS = (
  "plot", "story", "acting", "cast", "script", "dialogue", "soundtrack", "music", "score",
  "cinematography", "pacing", "ending", "direction", "editing", "visual effects", "characters",
  "humor", "lead performance", "camera work", "set design", "costumes", "final act", "opening",
  "screenplay", "villain", "romance", "action scenes", "photography",
)
VERBS = ("was", "is", "felt", "seemed", "looked", "came across as")
GENRES = (
  "thriller", "comedy", "drama", "western", "horror film", "romance", "musical", "documentary",
  "science fiction film", "war film", "mystery", "crime story", "family film", "biopic",
  "animated film", "adventure film",
)
FIRST_NAMES = (
  "maria", "john", "akira", "fatima", "pierre", "olga", "james", "chen", "lucia", "david",
  "amara", "henrik", "sofia", "raj", "emma", "tomas", "yuki", "carlos", "nadia", "peter",
  "grace", "omar", "ingrid", "marco", "helen", "kofi", "anna", "victor", "leila", "samuel",
)
LAST_NAMES = (
  "lopez", "smith", "tanaka", "haddad", "dubois", "petrova", "walker", "wang", "rossi", "cohen",
  "okafor", "larsen", "moreau", "patel", "brown", "novak", "sato", "garcia", "kowalski", "fischer",
  "kelly", "mansour", "berg", "romano", "murphy", "mensah", "schmidt", "ivanov", "karimi", "hughes",
)
OCCUPATIONS = (
  "teacher", "detective", "soldier", "nurse", "farmer", "lawyer", "pilot", "student",
  "journalist", "painter", "chef", "boxer", "priest", "mechanic", "scientist", "singer",
)
EVENTS = (
  "moves to a small town", "loses a brother", "falls in love", "returns home after the war",
  "searches for a missing sister", "tries to save a family restaurant",
  "discovers an old secret", "joins a travelling circus", "plans a bank robbery",
  "raises a child alone", "starts a new job", "meets an old friend", "builds a boat",
  "runs for mayor", "hides from the police",
)
PLACES = (
  "paris", "london", "a small village", "the desert", "new york", "tokyo", "rome", "a ship",
  "a hospital", "the mountains", "berlin", "a farm", "chicago", "an island", "the suburbs",
)
ROLES = (
  "villain", "hero", "mother", "father", "best friend", "captain", "doctor", "boss", "neighbor",
  "sheriff", "teacher", "mentor",
)
WHEN = (
  "last night", "last weekend", "on a plane", "with my family", "at the cinema", "on television",
  "twice", "after reading the book", "at a festival", "on a rainy sunday",
)
RELATIONS = ("sister", "brother", "friends", "coworkers", "parents", "cousin", "roommate")
DURATIONS = ("ninety minutes", "two hours", "almost three hours", "barely eighty minutes")

_POLARITY = {**{w: 1 for w in POSITIVE}, **{w: -1 for w in NEGATIVE}}
_POSITIVE_SET = frozenset(POSITIVE)
_SPLIT_INDEX = {name: i for i, name in enumerate(SPLITS)}
_BLOCK = 1 << 16

# Kind probabilities (cumulative thresholds over one uniform draw).
_KINDS = (("plain", 0.72), ("negation", 0.86), ("contrast", 1.0))


class _Draws:
  """Uniform floats from a RandomState, drawn in blocks: per-call numpy overhead would dominate."""

  def __init__(self, seed, stream):
    self._rng = np.random.RandomState([seed, stream])
    self._buf = []
    self._pos = 0

  def uniform(self):
    if self._pos == len(self._buf):
      self._buf = self._rng.random_sample(_BLOCK).tolist()
      self._pos = 0
    self._pos += 1
    return self._buf[self._pos - 1]

  def choice(self, options):
    return options[int(self.uniform() * len(options))]

  def chance(self, p):
    return self.uniform() < p

  def count(self, low, high):
    """An integer in [low, high]."""
    return low + int(self.uniform() * (high - low + 1))

  def shuffle(self, items):
    for i in range(len(items) - 1, 0, -1):
      j = int(self.uniform() * (i + 1))
      items[i], items[j] = items[j], items[i]


def _name(d):
  return f"{d.choice(FIRST_NAMES)} {d.choice(LAST_NAMES)}"


def _filler(d):
  """One neutral sentence: it carries no sentiment word, only movie-ish context."""
  k = d.count(0, 7)
  if k == 0:
    return f"i watched this {d.choice(GENRES)} {d.choice(WHEN)} ."
  if k == 1:
    return f"it was directed by {_name(d)} and stars {_name(d)} and {_name(d)} ."
  if k == 2:
    return (f"the story is set in {d.choice(PLACES)} and follows a {d.choice(OCCUPATIONS)} who "
            f"{d.choice(EVENTS)} .")
  if k == 3:
    return f"{_name(d)} plays the {d.choice(ROLES)} ."
  if k == 4:
    return f"the film runs {d.choice(DURATIONS)} ."
  if k == 5:
    return f"my {d.choice(RELATIONS)} wanted to see this {d.choice(GENRES)} ."
  if k == 6:
    return f"most of it was shot in {d.choice(PLACES)} ."
  return f"{_name(d)} wrote the script after working as a {d.choice(OCCUPATIONS)} ."


def _adjective(d, polarity):
  return d.choice(POSITIVE if polarity > 0 else NEGATIVE)


def _clause(d, value, negated=False, intensified=None):
  """'the ASPECT VERB [not] [very] ADJ' whose meaning has the sign of `value`."""
  if intensified is None:
    intensified = d.chance(0.25)
  words = ["the", d.choice(ASPECTS), d.choice(VERBS)]
  if negated:  # "never" only reads well without an intensifier
    words.append("not" if intensified else d.choice(NEGATORS))
  if intensified:
    words.append(d.choice(INTENSIFIERS))
  words.append(_adjective(d, -value if negated else value))
  if not negated and d.chance(0.5):  # "great and fun": a second adjective of the same polarity
    words += ["and", _adjective(d, value)]
  return " ".join(words)


def _end(sentence):
  """Sentence terminator: "!" after a positive adjective, "." otherwise (see the grammar)."""
  return sentence + (" !" if sentence.rsplit(" ", 1)[-1] in _POSITIVE_SET else " .")


def _contrast(d, y):
  """Second clause (polarity y) dominates; the first has the opposite meaning."""
  first = _clause(d, -y, negated=d.chance(0.2))
  second = _clause(d, y, negated=d.chance(0.2))
  if d.chance(0.6):
    return _end(f"{first} , but {second}")
  return _end(f"although {first} , {second}")


def _verdict(d, y, negated):
  genre = d.choice(GENRES)
  if negated:
    return f"overall it is not a {_adjective(d, -y)} {genre} ."
  intens = f"{d.choice(INTENSIFIERS)} " if d.chance(0.3) else ""
  return f"overall it is a {intens}{_adjective(d, y)} {genre} ."


def _opinions(d, y, kind):
  """Opinion sentences whose rule value sums to the sign of y (y is +1 or -1)."""
  if kind == "plain":
    out = [_end(_clause(d, y, intensified=d.chance(0.15))) for _ in range(d.count(4, 6))]
    if d.chance(0.3):
      out.append(_verdict(d, y, negated=False))
    return out
  if kind == "negation":
    out = [_end(_clause(d, y, negated=True)) for _ in range(d.count(3, 5))]
    if d.chance(0.3):
      out.append(_verdict(d, y, negated=True))
    return out
  return [_contrast(d, y) for _ in range(d.count(2, 3))]


def _kind(d):
  u = d.uniform()
  for name, threshold in _KINDS:
    if u < threshold:
      return name
  return _KINDS[-1][0]


def _review(d, y):
  """One review of polarity y in {+1, -1}, between 20 and 80 words."""
  opinions = _opinions(d, y, _kind(d))
  d.shuffle(opinions)
  intro = [_filler(d) for _ in range(d.count(1, 2))]
  outro = [_filler(d)] if d.chance(0.2) else []
  while _words(intro + opinions + outro) < 20:
    intro.append(_filler(d))
  while _words(intro + opinions + outro) > 80 and len(intro) + len(outro) > 1:
    (outro or intro).pop()
  return " ".join(intro + opinions + outro)


def _words(sentences):
  return sum(len(s.split()) for s in sentences)


def generate(split, num_examples=None, *, seed=DEFAULT_SEED):
  """Returns (texts, labels) for a split; labels are 0/1, or -1 for every `unsup` review.

  Reviews come in pairs with one positive and one negative in random order, so any even-sized
  prefix is exactly balanced and stays stable when more reviews are requested.
  """
  if split not in _SPLIT_INDEX:
    raise ValueError(f"unknown synthetic split {split!r}; valid: {', '.join(SPLITS)}")
  n = DEFAULT_SIZES[split] if num_examples is None else int(num_examples)
  d = _Draws(seed, _SPLIT_INDEX[split])
  texts, labels = [], []
  while len(texts) < n:
    pair = [1, -1] if d.chance(0.5) else [-1, 1]
    for y in pair[:n - len(texts)]:
      texts.append(_review(d, y))
      labels.append(1 if y > 0 else 0)
  if split == "unsup":
    labels = [-1] * len(texts)
  return texts, labels


def _clause_value(words):
  """Rule value of one clause: adjective polarity, flipped by a negator, doubled if intensified."""
  for i, word in enumerate(words):
    polarity = _POLARITY.get(word)
    if polarity is None:
      continue
    before = words[max(0, i - 2):i]
    if any(w in NEGATORS for w in before):
      return -polarity
    if i > 0 and words[i - 1] in INTENSIFIERS:
      return 2 * polarity
    return polarity
  return 0


def _sentence_value(words):
  """Contrast sentences count only their dominant (second) clause."""
  if "but" in words:
    return _clause_value(words[words.index("but") + 1:])
  if words and words[0] == "although" and "," in words:
    return _clause_value(words[words.index(",") + 1:])
  return _clause_value(words)


def sentiment_score(text):
  """Sum of the rule values of all sentences (see the module docstring)."""
  words = text.split()
  total, start = 0, 0
  for i, word in enumerate(words):
    if word in (".", "!"):
      total += _sentence_value(words[start:i])
      start = i + 1
  return total + _sentence_value(words[start:])


def sentiment_of(text):
  """The grammar's own, order-aware label of a review: 1 positive, 0 negative."""
  return 1 if sentiment_score(text) > 0 else 0


def vocabulary():
  """Every word the grammar can emit (sorted), for tests and tokenizer sizing."""
  pools = (POSITIVE, NEGATIVE, INTENSIFIERS, NEGATORS, ASPECTS, VERBS, GENRES, FIRST_NAMES,
           LAST_NAMES, OCCUPATIONS, EVENTS, PLACES, ROLES, WHEN, RELATIONS, DURATIONS)
  words = {w for pool in pools for phrase in pool for w in phrase.split()}
  templates = (
    "i watched this it was directed by and stars the story is set in follows a who plays film runs "
    "my wanted to see most of shot wrote script after working as , but although . ! overall is "
    "not an"
  )
  return sorted(words | set(templates.split()))
