"""Tests of jaxlm.data.sources: every source kind on tiny files built in tmp_path, `+` splits,
and every user error with a message that names the file and the line.

Nothing here downloads: tfds is exercised through `tfds.testing.mock_data` (USE_CODE policy,
which needs no metadata files and no TensorFlow) and an empty data_dir.
"""

import gzip
import json
import os

import pytest

from jaxlm.data import sources, synthetic
from jaxlm.data.sources import Record, open_source
from jaxlm.errors import DataError, JaxlmError

# A JSON-lines copy of aclImdb on this machine, if any (`JAXLM_IMDB_JSONL=DIR`): the one test that
# reads real data checks its split sizes; without it that test is skipped.
SHARED_IMDB = os.environ.get("JAXLM_IMDB_JSONL", "")


def write_jsonl(path, rows, gz=False):
  text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  if gz:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


def write_aclimdb(root):
  """A tiny aclImdb tree; ids out of lexical order (10 < 9 as strings) to test numeric sort."""
  files = {
    "train/neg/10_2.txt": "neg ten", "train/neg/9_1.txt": "neg nine",
    "train/pos/0_9.txt": "pos zero", "train/pos/2_7.txt": "pos two",
    "train/unsup/1_0.txt": "unsup one", "train/unsup/0_0.txt": "unsup zero",
    "test/neg/0_3.txt": "test neg", "test/pos/0_8.txt": "test pos Ünïcode",
  }
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
  (root / "train" / "urls_pos.txt").write_text("ignored")
  return root


def raises(fn, *fragments):
  """Calls fn, expects a DataError whose message holds every fragment; returns the message."""
  with pytest.raises(DataError) as info:
    fn()
  message = str(info.value)
  for fragment in fragments:
    assert str(fragment) in message, message
  return message


# ---------------------------------------------------------------------------------------------
# jsonl


def test_jsonl_plain_and_gz_splits_and_plus(tmp_path):
  write_jsonl(tmp_path / "train.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
  write_jsonl(tmp_path / "unsup.jsonl.gz", [{"text": "über", "label": -1}], gz=True)
  source = open_source(f"jsonl:{tmp_path}")
  assert source.splits() == ["train", "unsup"]
  assert source.num_classes is None  # unknown until read
  assert source.read("train") == [Record("good", 1), Record("bad", 0)]
  assert source.num_classes == 2
  both = source.read("train+unsup")
  assert [r.text for r in both] == ["good", "bad", "über"]
  assert [r.label for r in both] == [1, 0, -1]


def test_jsonl_ag_news_style_and_blank_lines(tmp_path):
  path = tmp_path / "test.jsonl"
  path.write_text('{"title": "Fears for pension", "description": "Unions say", "label": 2}\n'
                  '\n  \n'
                  '{"title": "Win", "description": "Team wins", "label": 1}\r\n', encoding="utf-8")
  source = open_source(f"jsonl:{tmp_path}")
  assert source.read("test") == [Record("Fears for pension Unions say", 2),
                                 Record("Win Team wins", 1)]
  assert source.num_classes == 3


def test_jsonl_errors_name_file_and_line(tmp_path):
  source = open_source(f"jsonl:{tmp_path}")
  good = '{"text": "ok", "label": 0}\n'
  cases = {
    "badjson": (good + '{"text": "x", "label": 1\n', "line 2", "invalid JSON"),
    "notext": (good + good + '{"label": 1}\n', "line 3", "no text"),
    "nolabel": ('{"text": "x"}\n', "line 1", "no \"label\""),
    "strlabel": (good + '{"text": "x", "label": "1"}\n', "line 2", "not an integer"),
    "floatlabel": ('{"text": "x", "label": 1.0}\n', "line 1", "not an integer"),
    "boollabel": ('{"text": "x", "label": true}\n', "line 1", "not an integer"),
    "neglabel": ('{"text": "x", "label": -2}\n', "line 1", "outside the classes"),
    "emptytext": ('{"text": "  ", "label": 0}\n', "line 1", "non-empty string"),
    "notobject": ('[1, 2]\n', "line 1", "JSON object"),
    "twoperline": ('{"text": "a", "label": 0}, {"text": "b", "label": 0}\n', "line 1", "JSON"),
    "empty": ("\n\n", "empty"),
  }
  for split, (content, *fragments) in cases.items():
    (tmp_path / f"{split}.jsonl").write_text(content, encoding="utf-8")
    raises(lambda: source.read(split), f"{split}.jsonl", *fragments)


def test_jsonl_label_outside_configured_classes(tmp_path):
  write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 4}])
  source = open_source(f"jsonl:{tmp_path}")
  raises(lambda: source.read("train", num_classes=4), "train.jsonl: line 2", "label 4",
         "0..3")
  assert len(source.read("train", num_classes=5)) == 2


def test_jsonl_non_utf8_names_line_and_byte(tmp_path):
  (tmp_path / "train.jsonl").write_bytes(b'{"text": "ok", "label": 0}\n{"text": "caf\xe9", '
                                         b'"label": 1}\n')
  raises(lambda: open_source(f"jsonl:{tmp_path}").read("train"), "train.jsonl: line 2",
         "byte 14", "not valid UTF-8")


def test_jsonl_missing_folder_split_and_bad_gzip(tmp_path):
  raises(lambda: open_source(f"jsonl:{tmp_path / 'nope'}").read("train"), "nope",
         "does not exist")
  write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}])
  write_jsonl(tmp_path / "test.jsonl", [{"text": "a", "label": 0}])
  raises(lambda: open_source(f"jsonl:{tmp_path}").read("train+unsup"), "no split 'unsup'",
         "available splits: test, train")
  raises(lambda: open_source(f"jsonl:{tmp_path}").read("train+"), "bad split")
  (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
  raises(lambda: open_source(f"jsonl:{tmp_path}").read("broken"), "broken.jsonl.gz",
         "not a valid gzip")
  write_jsonl(tmp_path / "test.jsonl.gz", [{"text": "a", "label": 0}], gz=True)
  raises(lambda: open_source(f"jsonl:{tmp_path}").read("test"), "both", "keep one")


# ---------------------------------------------------------------------------------------------
# aclimdb


def test_aclimdb_order_labels_and_splits(tmp_path):
  source = open_source(f"aclimdb:{write_aclimdb(tmp_path)}")
  assert source.splits() == ["train", "test", "unsup"]
  assert source.num_classes == 2
  assert source.read("train") == [Record("neg nine", 0), Record("neg ten", 0),
                                  Record("pos zero", 1), Record("pos two", 1)]
  assert source.read("test") == [Record("test neg", 0), Record("test pos Ünïcode", 1)]
  assert [r.text for r in source.read("train+unsup")][-2:] == ["unsup zero", "unsup one"]
  assert {r.label for r in source.read("unsup")} == {-1}


def test_aclimdb_errors(tmp_path):
  root = write_aclimdb(tmp_path)
  raises(lambda: open_source(f"aclimdb:{tmp_path / 'missing'}").read("train"), "missing",
         "does not exist")
  (root / "train" / "pos" / "3_8.txt").write_bytes(b"fine\nbad \xff byte")
  raises(lambda: open_source(f"aclimdb:{root}").read("train"), "3_8.txt", "line 2",
         "not valid UTF-8")
  (root / "train" / "pos" / "3_8.txt").write_text("")
  raises(lambda: open_source(f"aclimdb:{root}").read("train"), "3_8.txt", "empty")
  (root / "train" / "pos" / "3_8.txt").unlink()
  (root / "train" / "pos" / "notes.txt").write_text("x")
  raises(lambda: open_source(f"aclimdb:{root}").read("train"), "notes.txt", "ID_RATING.txt")
  (root / "train" / "pos" / "notes.txt").unlink()
  for path in (root / "test" / "pos").iterdir():
    path.unlink()
  (root / "test" / "pos").rmdir()
  raises(lambda: open_source(f"aclimdb:{root}").read("test"), "no split 'test'",
         "available splits: train, unsup")


# ---------------------------------------------------------------------------------------------
# csv


AG_CSV = ('"3","Wall St. Bears Claw Back","Reuters - Short-sellers, ""quoted"" text"\n'
          '"4","Multi\nline title","desc"\n'
          '"1","World news","Something happened"\n')


def test_csv_file_and_dir(tmp_path):
  (tmp_path / "test.csv").write_text(AG_CSV, encoding="utf-8")
  source = open_source(f"csv:{tmp_path / 'test.csv'}")
  assert source.splits() == ["test"]
  assert source.num_classes == 4
  assert source.read("test") == [
    Record('Wall St. Bears Claw Back Reuters - Short-sellers, "quoted" text', 2),
    Record("Multi\nline title desc", 3), Record("World news Something happened", 0)]
  (tmp_path / "train.csv").write_text('Class Index,Title,Description\n2,"Sports","Win"\n')
  (tmp_path / "classes.txt").write_text("World\nSports\nBusiness\nSci/Tech\nExtra\n")
  folder = open_source(f"csv:{tmp_path}")
  assert folder.splits() == ["test", "train"]
  assert folder.num_classes == 5
  assert folder.read("train+test")[0] == Record("Sports Win", 1)
  assert len(folder.read("train+test")) == 4


def test_csv_errors_name_file_and_line(tmp_path):
  cases = {
    "cols.csv": ('"1","a","b"\n"2","only","three","four"\n', "line 2", "columns"),
    "label.csv": ('"1","a","b"\n"x","a","b"\n', "line 2", "not an integer"),
    "zero.csv": ('"0","a","b"\n', "line 1", "1 or more"),
    "range.csv": ('"1","a","b"\n\n"5","a","b"\n', "line 3", "label 4", "outside"),
    "notext.csv": ('"1","",""\n', "line 1", "no text"),
    "empty.csv": ("", "empty"),
  }
  for name, (content, *fragments) in cases.items():
    (tmp_path / name).write_text(content, encoding="utf-8")
    split = name[:-4]
    raises(lambda: open_source(f"csv:{tmp_path / name}").read(split), name, *fragments)
  (tmp_path / "latin.csv").write_bytes(b'"1","a","b"\n"2","caf\xe9","x"\n')
  raises(lambda: open_source(f"csv:{tmp_path / 'latin.csv'}").read("latin"), "latin.csv",
         "line 2", "not valid UTF-8")
  raises(lambda: open_source(f"csv:{tmp_path / 'label.csv'}").read("train"), "no split 'train'",
         "available splits: label")
  raises(lambda: open_source(f"csv:{tmp_path / 'nope.csv'}").read("nope"), "nope.csv",
         "does not exist")


# ---------------------------------------------------------------------------------------------
# synthetic and spec parsing


def test_synthetic_source_defaults_and_options():
  source = open_source("synthetic")
  assert source.splits() == ["train", "test", "unsup"]
  assert source.num_classes == 2
  train = source.read("train")
  assert len(train) == synthetic.DEFAULT_SIZES["train"]
  assert {r.label for r in train} == {0, 1}
  small = open_source("synthetic:seed=0,train=10,unsup=4")
  assert small.read("train") == train[:10]  # prefix-stable
  assert [r.label for r in small.read("train+unsup")][-4:] == [-1] * 4
  assert open_source("synthetic:seed=1,train=10").read("train") != train[:10]
  raises(lambda: open_source("synthetic:color=3"), "bad option", "seed=INT")
  raises(lambda: open_source("synthetic:train=many"), "integer")
  raises(lambda: open_source("synthetic").read("validation"), "no split 'validation'",
         "train, test, unsup")


def test_unknown_kind_lists_valid_ones():
  message = raises(lambda: open_source("parquet:/data"), "unknown data source", "parquet")
  for kind in ("synthetic", "jsonl:DIR", "aclimdb:DIR", "csv:FILE", "tfds:NAME"):
    assert kind in message
  raises(lambda: open_source("jsonl:"), "needs an argument")
  assert issubclass(DataError, JaxlmError)


def test_validate_labels_helper():
  records = [Record("a", 0), Record("b", -1), Record("c", 2)]
  sources.validate_labels(records, 3, "mine")
  raises(lambda: sources.validate_labels(records, 2, "mine"), "mine record 3", "label 2")


def test_load_texts_and_labels(tmp_path):
  write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 1}])
  assert sources.load_texts_and_labels(f"jsonl:{tmp_path}", "train") == (["a"], [1])


# ---------------------------------------------------------------------------------------------
# tfds (mocked: nothing is downloaded or prepared)


def test_tfds_mock_imdb_and_ag_news():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    imdb = open_source("tfds:imdb_reviews")
    records = imdb.read("train+unsup")  # 'unsup' is an alias of tfds' 'unsupervised'
    assert len(records) == 6
    assert all(isinstance(r.text, str) and r.text for r in records)
    assert all(type(r.label) is int and 0 <= r.label < 2 for r in records)
    assert imdb.num_classes == 2
    ag = open_source("tfds:ag_news_subset")
    ag_records = ag.read("test")
    assert ag.num_classes == 4
    assert len(ag_records) == 3 and all(" " in r.text for r in ag_records)


def test_tfds_bytes_values_are_decoded():
  record = sources._tfds_record({"text": "héllo".encode(), "label": 1}, lambda i: "x", 0)
  assert record == Record("héllo", 1)
  raises(lambda: sources._tfds_record({"text": b"\xff", "label": 0}, lambda i: "ex 7", 0),
         "ex 7", "UTF-8")
  raises(lambda: sources._tfds_record({"words": "a", "label": 0}, lambda i: "ex 7", 0),
         "no text feature", "words")


def test_tfds_not_prepared_explains_how(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  data_dir = tmp_path / "tfds"
  source = open_source("tfds:imdb_reviews", data_dir=str(data_dir))
  for fn in (source.splits, lambda: source.read("train")):
    raises(fn, "not prepared", "pip install jaxlm[tfds]", "tfds build imdb_reviews",
           "jsonl:", "aclimdb:")
  assert not data_dir.exists()  # nothing written, nothing downloaded



def test_tfds_empty_splits_explains_how(monkeypatch):
  """With the default data dir, tfds reports an unprepared dataset as KeyError('... `splits` is
  empty ...') (seen here with TFDS_DATA_DIR set); that is the same one-line user error."""
  tfds = pytest.importorskip("tensorflow_datasets")

  def unprepared(*args, **kwargs):
    raise KeyError("Trying to access `splits['train']` but `splits` is empty.")

  monkeypatch.setattr(tfds, "data_source", unprepared)
  raises(lambda: open_source("tfds:imdb_reviews").read("train"), "not prepared",
         "tfds build imdb_reviews", "splits")
  raises(lambda: open_source("tfds:no_such_dataset_xyz").read("train"), "no_such_dataset_xyz")


# ---------------------------------------------------------------------------------------------
# the real shared data (optional)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_IMDB or not os.path.isdir(SHARED_IMDB),
                    reason="set JAXLM_IMDB_JSONL=DIR to check a JSON-lines IMDB copy")
def test_shared_imdb_counts():
  source = open_source(f"jsonl:{SHARED_IMDB}")
  counts = {split: len(source.read(split)) for split in ("train", "test", "unsup")}
  assert counts == {"train": 25000, "test": 25000, "unsup": 50000}
  assert source.num_classes == 2
