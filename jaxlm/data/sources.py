"""Data sources: a source string in, a list of `Record(text, label)` out.

Why one module: every later stage (tokenizer, batching, training) sees only records, so adding a
dataset format means adding one `Source` here and nothing anywhere else. Sources only read; they
never write, download or cache anything.

Source strings (`open_source(spec)`):
  * `synthetic` or `synthetic:seed=3,train=2000,test=500,unsup=10000` - the embedded offline
    corpus (`jaxlm.data.synthetic`); splits train, test, unsup; 2 classes.
  * `jsonl:DIR` - DIR/{split}.jsonl or DIR/{split}.jsonl.gz (UTF-8, one JSON object per line,
    blank lines skipped). A record is `{"text", "label"}` or AG-News-style
    `{"title", "description", "label"}`, whose text is `title + " " + description`.
    `num_classes` is None until a split is read, then 1 + the largest label seen so far (read the
    labeled splits first, or pass `num_classes=` to `read` to validate against a known count).
  * `aclimdb:DIR` - the unpacked aclImdb_v1 folder: DIR/train/{neg,pos,unsup}/ID_RATING.txt and
    DIR/test/{neg,pos}/. Splits train, test, unsup; neg=0, pos=1, unsup=-1; records are ordered
    neg then pos, each by numeric ID (the same order as the JSON-lines copy RESULTS.md's runs read).
  * `csv:FILE` or `csv:DIR` - AG-News-style CSV rows `"class index","title","description"` (or
    `"class index","text"`), class index 1..K -> label 0..K-1; a header row is skipped. A FILE is
    one split named after its stem (`test.csv` -> `test`); a DIR holds {split}.csv files.
    `num_classes` is the number of lines of a `classes.txt` beside the data, else 4 (AG News).
  * `tfds:NAME` - a *prepared* TensorFlow Datasets dataset, read through `tfds.data_source`
    (array_record format; reading needs no TensorFlow). `data_dir` defaults to tfds' own
    (`$TFDS_DATA_DIR` or ~/tensorflow_datasets). Text is the `text` feature or
    `title + " " + description`; for imdb_reviews the split `unsup` means `unsupervised`.

Several splits are joined with `+` ("train+unsup") and read in that order. A label of -1 means
unlabeled. Every bad input raises one `DataError` naming the file and the line or record.
"""

import csv
import dataclasses
import gzip
import io
import json
import os
import re
import zlib

from jaxlm.data import synthetic
from jaxlm.errors import DataError

SOURCE_KINDS = ("synthetic", "jsonl:DIR", "aclimdb:DIR", "csv:FILE", "tfds:NAME")


@dataclasses.dataclass(frozen=True)
class Record:
  """One example: its text and its class (-1 when unlabeled)."""
  text: str
  label: int


class Source:
  """Base class: `read` joins `+` splits and validates labels; subclasses read one split.

  Subclasses implement `splits()` and `_read_one(split) -> (records, locate)`, where
  `locate(i)` names the file and line of record i for error messages.
  """

  name = ""
  num_classes = None

  def splits(self):
    raise NotImplementedError

  def read(self, split, num_classes=None):
    """Records of `split` ("train", "train+unsup", ...), labels checked against the classes."""
    num_classes = num_classes if num_classes is not None else self.num_classes
    records = []
    for part in split_parts(split, self.name):
      part_records, locate = self._read_one(part)
      validate_labels(part_records, num_classes, locate)
      records.extend(part_records)
    return records

  def _read_one(self, split):
    raise NotImplementedError

  def _check_split(self, split):
    available = self.splits()
    if split not in available:
      raise DataError(f"{self.name}: no split {split!r}; available splits: "
                      f"{', '.join(available) or '(none)'}")

  def __repr__(self):
    return f"{type(self).__name__}({self.name!r})"


def split_parts(split, where="split"):
  """'train+unsup' -> ['train', 'unsup']; an empty part is an error, not silently dropped."""
  parts = [p.strip() for p in str(split).split("+")]
  if not all(parts):
    raise DataError(f"{where}: bad split {split!r}; use names joined by '+', e.g. 'train+unsup'")
  return parts


def validate_labels(records, num_classes, where):
  """Raises DataError at the first label that is not an int in [-1, num_classes).

  `where` is a string (records are then named "WHERE record I") or a function i -> location.
  `num_classes=None` only checks the type and the lower bound.
  """
  locate = where if callable(where) else (lambda i: f"{where} record {i + 1}")
  for i, record in enumerate(records):
    label = record.label
    if type(label) is not int:  # bool, float and str labels are all mistakes
      raise DataError(f"{locate(i)}: label {label!r} is not an integer")
    if label < -1 or (num_classes is not None and label >= num_classes):
      valid = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
      raise DataError(f"{locate(i)}: label {label} is outside the classes ({valid}, or -1 for "
                      f"unlabeled)")


def open_source(spec, data_dir=None):
  """Parses a source string (see the module docstring); `data_dir` is only used by tfds."""
  kind, _, arg = str(spec).partition(":")
  kind = kind.strip().lower()
  if kind == "synthetic":
    return SyntheticSource(spec, arg)
  openers = {"jsonl": JsonlSource, "aclimdb": AclImdbSource, "csv": CsvSource}
  if kind in openers or kind == "tfds":
    if not arg.strip():
      raise DataError(f"data source {spec!r} needs an argument after ':' "
                      f"(valid: {', '.join(SOURCE_KINDS)})")
    if kind == "tfds":
      return TfdsSource(spec, arg.strip(), data_dir=data_dir)
    return openers[kind](spec, os.path.expanduser(arg.strip()))
  raise DataError(f"unknown data source {spec!r}; valid kinds: {', '.join(SOURCE_KINDS)}")


def load_texts_and_labels(spec, split, num_classes=None):
  """Convenience: (texts, labels) lists of `split` of the source `spec`."""
  records = open_source(spec).read(split, num_classes=num_classes)
  return [r.text for r in records], [r.label for r in records]


# ---------------------------------------------------------------------------------------------
# Shared file helpers


def _read_utf8(path):
  """Whole file (gunzipped if *.gz) as text; errors name the file and the line."""
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        raw = f.read()
    else:
      with open(path, "rb") as f:
        raw = f.read()
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise DataError(f"{path}: not a valid gzip file ({e})") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    raise DataError(f"{path}: line {line}: byte {column} of the line (file offset {e.start}) is "
                    f"not valid UTF-8 ({raw[e.start:e.start + 1]!r}); re-encode the file as "
                    f"UTF-8") from None


def _require_dir(path, spec):
  if not os.path.isdir(path):
    raise DataError(f"{spec}: folder {path} does not exist")


# ---------------------------------------------------------------------------------------------
# synthetic


class SyntheticSource(Source):
  """The embedded corpus; `synthetic:seed=3,train=2000` overrides the seed or split sizes."""

  def __init__(self, spec, options=""):
    self.name = spec
    self.num_classes = synthetic.NUM_CLASSES
    self.seed = synthetic.DEFAULT_SEED
    self.sizes = dict(synthetic.DEFAULT_SIZES)
    self._parse_options(options)

  def _parse_options(self, options):
    valid = ("seed",) + synthetic.SPLITS
    for item in filter(None, (o.strip() for o in options.split(","))):
      key, eq, value = item.partition("=")
      key = key.strip()
      if key not in valid or not eq:
        raise DataError(f"{self.name}: bad option {item!r}; valid: "
                        f"{', '.join(k + '=INT' for k in valid)}")
      try:
        number = int(value)
      except ValueError:
        raise DataError(f"{self.name}: option {key} needs an integer, got {value!r}") from None
      if number < 0:
        raise DataError(f"{self.name}: option {key} must be >= 0, got {number}")
      if key == "seed":
        self.seed = number
      else:
        self.sizes[key] = number

  def splits(self):
    return list(synthetic.SPLITS)

  def _read_one(self, split):
    self._check_split(split)
    texts, labels = synthetic.generate(split, self.sizes[split], seed=self.seed)
    records = [Record(t, l) for t, l in zip(texts, labels)]
    return records, lambda i: f"{self.name} split {split} review {i + 1}"


# ---------------------------------------------------------------------------------------------
# jsonl


class JsonlSource(Source):
  """DIR/{split}.jsonl[.gz]; parsed in one json.loads call (fast), per line only on error."""

  def __init__(self, spec, directory):
    self.name = spec
    self.directory = directory
    self._max_label = -1

  @property
  def num_classes(self):
    return self._max_label + 1 if self._max_label >= 0 else None

  def splits(self):
    _require_dir(self.directory, self.name)
    names = set()
    for entry in os.listdir(self.directory):
      for suffix in (".jsonl", ".jsonl.gz"):
        if entry.endswith(suffix) and len(entry) > len(suffix):
          names.add(entry[:-len(suffix)])
    return sorted(names)

  def _path(self, split):
    self._check_split(split)
    plain = os.path.join(self.directory, f"{split}.jsonl")
    both = [p for p in (plain, plain + ".gz") if os.path.isfile(p)]
    if len(both) == 2:
      raise DataError(f"{self.name}: both {both[0]} and {both[1]} exist; keep one")
    return both[0]

  def _read_one(self, split):
    path = self._path(split)
    lines = _read_utf8(path).split("\n")
    numbers = [i + 1 for i, line in enumerate(lines) if line and not line.isspace()]
    if not numbers:
      raise DataError(f"{path}: file is empty (no records)")
    objects = _parse_json_lines(path, [lines[n - 1] for n in numbers], numbers)
    records = [_jsonl_record(obj, path, n) for obj, n in zip(objects, numbers)]
    labels = (r.label for r in records if type(r.label) is int)  # bad ones fail validation
    self._max_label = max(self._max_label, max(labels, default=-1))
    return records, lambda i: f"{path}: line {numbers[i]}"


def _parse_json_lines(path, lines, numbers):
  """All lines as JSON values; one joined parse is ~3x faster than a loop of json.loads."""
  try:
    objects = json.loads("[" + ",".join(lines) + "]")
    if len(objects) == len(lines):
      return objects
  except json.JSONDecodeError:
    pass
  objects = []
  for line, number in zip(lines, numbers):
    try:
      objects.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: line {number}: invalid JSON ({e.msg} at column {e.colno})") from None
  return objects


def _jsonl_record(obj, path, number):
  """One decoded JSON object -> Record; the label is validated later with the classes."""
  where = f"{path}: line {number}"
  if not isinstance(obj, dict):
    raise DataError(f"{where}: expected a JSON object with text and label, got "
                    f"{type(obj).__name__}")
  if "text" in obj:
    text = obj["text"]
  elif "title" in obj and "description" in obj:
    text = _join_title(obj["title"], obj["description"], where)
  else:
    raise DataError(f"{where}: record has no text (needs \"text\" or \"title\" and "
                    f"\"description\"); keys: {', '.join(sorted(obj)) or '(none)'}")
  if not isinstance(text, str) or not text.strip():
    raise DataError(f"{where}: text must be a non-empty string, got {text!r:.60}")
  if "label" not in obj:
    raise DataError(f"{where}: record has no \"label\" (use -1 for unlabeled)")
  return Record(text, obj["label"])


def _join_title(title, description, where):
  if not isinstance(title, str) or not isinstance(description, str):
    raise DataError(f"{where}: title and description must be strings")
  return f"{title} {description}".strip()


# ---------------------------------------------------------------------------------------------
# aclimdb

_ACLIMDB_LAYOUT = {"train": ("neg", "pos"), "test": ("neg", "pos"), "unsup": ("unsup",)}
_ACLIMDB_LABELS = {"neg": 0, "pos": 1, "unsup": -1}
_ACLIMDB_NAME = re.compile(r"^(\d+)_(\d+)\.txt$")


class AclImdbSource(Source):
  """The original aclImdb_v1 tree, one review per ID_RATING.txt file."""

  def __init__(self, spec, directory):
    self.name = spec
    self.directory = directory
    self.num_classes = 2

  def _folder(self, split, label_name):
    top = "train" if split == "unsup" else split
    return os.path.join(self.directory, top, label_name)

  def splits(self):
    _require_dir(self.directory, self.name)
    return [split for split, labels in _ACLIMDB_LAYOUT.items()
            if all(os.path.isdir(self._folder(split, name)) for name in labels)]

  def _read_one(self, split):
    self._check_split(split)
    records, paths = [], []
    for label_name in _ACLIMDB_LAYOUT[split]:
      for path in _review_files(self._folder(split, label_name)):
        text = _read_utf8(path)
        if not text.strip():
          raise DataError(f"{path}: file is empty (no review text)")
        records.append(Record(text, _ACLIMDB_LABELS[label_name]))
        paths.append(path)
    return records, lambda i: paths[i]


def _review_files(folder):
  """ID_RATING.txt files sorted by numeric ID; hidden files are ignored, other names rejected."""
  numbered = []
  for entry in os.listdir(folder):
    if entry.startswith("."):
      continue
    match = _ACLIMDB_NAME.match(entry)
    if not match:
      raise DataError(f"{os.path.join(folder, entry)}: unexpected file; aclImdb reviews are "
                      f"named ID_RATING.txt")
    numbered.append((int(match.group(1)), entry))
  if not numbered:
    raise DataError(f"{folder}: folder has no review files")
  return [os.path.join(folder, entry) for _, entry in sorted(numbered)]


# ---------------------------------------------------------------------------------------------
# csv


class CsvSource(Source):
  """AG-News-style CSV: a single FILE (one split) or a DIR of {split}.csv files."""

  def __init__(self, spec, path):
    self.name = spec
    self.path = path
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    self.num_classes = _count_classes(os.path.join(folder, "classes.txt")) or 4

  def splits(self):
    if os.path.isfile(self.path):
      return [_csv_split_name(os.path.basename(self.path))]
    if not os.path.isdir(self.path):
      raise DataError(f"{self.name}: file {self.path} does not exist")
    return sorted(_csv_split_name(e) for e in os.listdir(self.path) if e.endswith(".csv"))

  def _read_one(self, split):
    self._check_split(split)
    path = self.path if os.path.isfile(self.path) else os.path.join(self.path, f"{split}.csv")
    records, numbers = [], []
    reader = csv.reader(io.StringIO(_read_utf8(path), newline=""))
    try:
      for row in reader:
        if not any(field.strip() for field in row):
          continue
        record = _csv_record(row, path, reader.line_num, first=not numbers and not records)
        if record is not None:
          records.append(record)
          numbers.append(reader.line_num)
    except csv.Error as e:
      raise DataError(f"{path}: line {reader.line_num}: bad CSV ({e})") from None
    if not records:
      raise DataError(f"{path}: file is empty (no records)")
    return records, lambda i: f"{path}: line {numbers[i]}"


def _csv_split_name(filename):
  return filename[:-len(".csv")] if filename.endswith(".csv") else os.path.splitext(filename)[0]


def _csv_record(row, path, line, first):
  """A row -> Record (label = class index - 1), or None for a header row."""
  where = f"{path}: line {line}"
  if len(row) not in (2, 3):
    raise DataError(f"{where}: expected 3 columns (class index, title, description) or 2 "
                    f"(class index, text), got {len(row)}")
  try:
    class_index = int(row[0])
  except ValueError:
    if first:
      return None  # a header such as "Class Index,Title,Description"
    raise DataError(f"{where}: class index {row[0]!r} is not an integer") from None
  if class_index < 1:
    raise DataError(f"{where}: class index {class_index} must be 1 or more (1 = first class)")
  text = " ".join(field for field in row[1:] if field).strip()
  if not text:
    raise DataError(f"{where}: record has no text")
  return Record(text, class_index - 1)


def _count_classes(path):
  if not os.path.isfile(path):
    return None
  return sum(1 for line in _read_utf8(path).split("\n") if line.strip()) or None


# ---------------------------------------------------------------------------------------------
# tfds

_TFDS_SPLIT_ALIASES = {"imdb_reviews": {"unsup": "unsupervised"}}
_TFDS_NUM_CLASSES = {"imdb_reviews": 2, "ag_news_subset": 4}


def _tfds_help(name):
  return (f"prepare it once on a machine with internet: `pip install jaxlm[tfds]` then "
          f"`tfds build {name} --file_format=array_record` (and copy the data dir here), or use "
          f"an offline source such as `jsonl:DIR` or `aclimdb:DIR`")


class TfdsSource(Source):
  """A prepared tfds dataset read by random access; tensorflow_datasets is imported lazily."""

  def __init__(self, spec, dataset, data_dir=None):
    self.name = spec
    self.dataset = dataset
    self.data_dir = data_dir
    self._base = dataset.split("/")[0].split(":")[0]
    self._builder = None
    self.num_classes = _TFDS_NUM_CLASSES.get(self._base)

  def _get_builder(self):
    if self._builder is None:
      import tensorflow_datasets as tfds  # slow import, only when tfds is used
      try:
        self._builder = tfds.builder(self.dataset, data_dir=self.data_dir)
      except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"{self.name}: tfds has no dataset named {self.dataset!r}") from None
      if self.num_classes is None:
        self.num_classes = _tfds_label_classes(self._builder.info.features)
    return self._builder

  def splits(self):
    names = list(self._get_builder().info.splits)
    if not names:
      raise DataError(f"{self.name}: dataset is not prepared in {self._builder.data_dir}; "
                      f"{_tfds_help(self.dataset)}")
    return sorted(names)

  def _read_one(self, split):
    import tensorflow_datasets as tfds
    self._get_builder()
    tfds_split = _TFDS_SPLIT_ALIASES.get(self._base, {}).get(split, split)
    try:
      source = tfds.data_source(self.dataset, split=tfds_split, data_dir=self.data_dir,
                                download=False)
    # Not prepared (here, or not as array_record): tfds raises one of these, depending on what
    # is missing; KeyError is "splits is empty" when only the dataset's folder exists.
    except (NotImplementedError, FileNotFoundError, AssertionError, OSError, KeyError) as e:
      raise DataError(f"{self.name}: cannot read split {split!r}: the dataset is not prepared "
                      f"in {self._builder.data_dir} in array_record format; "
                      f"{_tfds_help(self.dataset)}. tfds said: "
                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    except ValueError as e:
      raise DataError(f"{self.name}: cannot read split {split!r}: {e}") from None
    where = lambda i: f"{self.name} split {split} example {i}"
    return [_tfds_record(ex, where, i) for i, ex in enumerate(_all_examples(source))], where


def _tfds_label_classes(features):
  """num_classes of a ClassLabel `label` feature, else None (e.g. regression datasets)."""
  try:
    return int(features["label"].num_classes)
  except (KeyError, AttributeError, TypeError):
    return None


def _all_examples(source):
  """Examples in index order (random-access sources have no cheaper ordered scan)."""
  for i in range(len(source)):
    yield source[i]


def _tfds_text(value, where):
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{where}: text is not valid UTF-8 at byte {e.start}") from None
  if hasattr(value, "item"):  # numpy scalar
    return _tfds_text(value.item(), where)
  return str(value)


def _tfds_record(example, where_fn, i):
  where = where_fn(i)
  if "text" in example:
    text = _tfds_text(example["text"], where)
  elif "title" in example and "description" in example:
    text = (f"{_tfds_text(example['title'], where)} "
            f"{_tfds_text(example['description'], where)}").strip()
  else:
    raise DataError(f"{where}: no text feature (needs 'text' or 'title'+'description'); "
                    f"features: {', '.join(sorted(example))}")
  if "label" not in example:
    raise DataError(f"{where}: no 'label' feature; features: {', '.join(sorted(example))}")
  return Record(text, int(example["label"]))
