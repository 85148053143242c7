"""Tests of jaxlm.data.synthetic: deterministic, balanced, several hundred words, and a label
that a bag of words cannot fully recover (the property the quickstart relies on)."""


import numpy as np
import pytest

from jaxlm.data import synthetic


@pytest.fixture(scope="module")
def train_test():
  return synthetic.generate("train", 3000), synthetic.generate("test", 1000)


def test_deterministic_and_seeded():
  first = synthetic.generate("train", 50, seed=7)
  assert first == synthetic.generate("train", 50, seed=7)
  assert first[0] != synthetic.generate("train", 50, seed=8)[0]
  assert synthetic.generate("train", 20, seed=7)[0] == first[0][:20]  # prefix-stable


def test_known_first_review_is_stable_across_machines():
  # Pinned text: a change here means every saved quickstart result changes; do it on purpose.
  texts, labels = synthetic.generate("train", 1)
  assert texts[0].startswith("the film runs almost three hours . most of it was shot in the desert .")
  assert labels == [synthetic.sentiment_of(texts[0])]


def test_splits_are_disjoint_streams_and_balanced(train_test):
  (train, train_labels), (test, test_labels) = train_test
  assert not set(train) & set(test)
  assert train_labels.count(1) == train_labels.count(0) == 1500
  assert test_labels.count(1) == test_labels.count(0) == 500
  unsup_texts, unsup_labels = synthetic.generate("unsup", 100)
  assert set(unsup_labels) == {-1}
  assert not set(unsup_texts) & set(train)
  with pytest.raises(ValueError, match="unknown synthetic split"):
    synthetic.generate("validation")


def test_lengths_and_vocabulary(train_test):
  (train, _), _ = train_test
  lengths = [len(t.split()) for t in train]
  assert 20 <= min(lengths) and max(lengths) <= 80
  used = {w for t in train for w in t.split()}
  assert used <= set(synthetic.vocabulary())
  assert 250 <= len(used) <= 999  # several hundred words


def test_rule_is_order_aware():
  rule = synthetic.sentiment_of
  assert rule("the plot was good .") == 1
  assert rule("the plot was not good .") == 0
  assert rule("the plot was not bad .") == 1
  assert rule("the plot was dull , but the acting was superb .") == 1
  assert rule("the acting was superb , but the plot was dull .") == 0
  assert rule("although the acting was superb , the plot was dull .") == 0
  assert rule("the plot was dull . the acting was extremely good .") == 1
  assert rule("the plot was dull . the acting was not very good .") == 0
  # Same bag of words, different order, different label:
  assert rule("the plot was not good , but the acting was bad .") == 0
  assert rule("the plot was bad , but the acting was not good .") == 0
  assert rule("the plot was good , but the acting was not bad .") == 1


def test_labels_follow_the_rule(train_test):
  (train, labels), _ = train_test
  assert [synthetic.sentiment_of(t) for t in train] == labels


def _bag_of_words(texts, vocab):
  x = np.zeros((len(texts), len(vocab)), np.float32)
  for i, text in enumerate(texts):
    x[i, [vocab[w] for w in text.split()]] = 1.0
  return x


def test_bag_of_words_is_clearly_worse_than_the_rule(train_test):
  """Naive Bayes on word presence: closed form, so the test stays fast on a busy machine
  (it scores ~0.80 here)."""
  (train, y_train), (test, y_test) = train_test
  vocab = {w: i for i, w in enumerate(synthetic.vocabulary())}
  x_train, x_test = _bag_of_words(train, vocab), _bag_of_words(test, vocab)
  y_train, y_test = np.array(y_train), np.array(y_test)
  pos = x_train[y_train == 1].sum(0) + 1.0
  neg = x_train[y_train == 0].sum(0) + 1.0
  log_ratio = np.log(pos / pos.sum()) - np.log(neg / neg.sum())
  bow = np.mean(((x_test * log_ratio).sum(1) > 0) == y_test)
  rule = np.mean(np.array([synthetic.sentiment_of(t) for t in test]) == y_test)
  assert rule == 1.0
  assert 0.6 < bow < 0.85, bow  # learnable from words, but ~25% needs word order


def test_default_corpus_sizes():
  sizes = {split: len(synthetic.generate(split)[0]) for split in synthetic.SPLITS}
  assert sizes == synthetic.DEFAULT_SIZES
