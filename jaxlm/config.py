"""Config schema: every field a run can set, with its default, in one place.

Config files in `configs/` start from `lm_config()` or `classifier_config()` and change only what
differs, as the Flax examples do with `get_config()`. Command-line overrides
(`--config.optim.learning_rate=3e-4`) are applied by ml_collections before `validate` runs, so a typo
in a key fails at once with the list of valid keys instead of being ignored.
"""
from __future__ import annotations

import importlib.machinery
import importlib.resources
import importlib.util
import inspect
import pathlib

import ml_collections

from jaxlm.errors import ConfigError


def _config_dir():
  """The shipped configs: `jaxlm/configs` in an installed package (a wheel maps the top-level
  configs/ there, pyproject.toml), else configs/ of the checkout jaxlm is imported from (an
  editable install), so that configs/ is the one copy and a wheel still carries it."""
  packaged = importlib.resources.files(__package__) / "configs"
  if packaged.is_dir():
    return packaged
  return pathlib.Path(__file__).resolve().parent.parent / "configs"


CONFIG_DIR = _config_dir()  # a pathlib.Path, or an importlib.resources Traversable (zipped install)


def _data() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      source="synthetic",      # synthetic | jsonl:DIR | aclimdb:DIR | csv:FILE | tfds:NAME
      train_split="train",     # several splits join with '+', e.g. 'train+unsup'
      test_split="test",
      test_max_examples=0,     # 0 = the whole test split; else a seeded random subset of this size
      valid_fraction=0.1,      # seeded hold-out carved from the train split
      num_labeled=0,           # classifier: use only this many labeled examples (0 = all)
      batch_size=32,
      eval_batch_size=64,
      max_len=256,             # tokens per example; longer ones are truncated (clf) or chunked (LM)
      truncate="head",         # classifier: which max_len tokens of a longer text: head | tail | head_tail
      buckets=(64, 128, 256),  # padded lengths: few shapes, few recompiles
      lm_mode="review",        # review: <bos> w1..wn <eos> per review | stream: contiguous text, BPTT
      bptt=64,                 # stream mode window length
      reverse=False,           # read every text last token first (a backward LM / classifier)
  ))


def _tokenizer() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      kind="word",             # word | sentencepiece
      vocab_size=10_000,       # word: most frequent words kept (specials extra); sp: total pieces
      min_freq=1,
      lowercase=True,
      specials=("<unk>", "<pad>", "<bos>", "<eos>"),
      model_type="unigram",    # sentencepiece: unigram | bpe
  ))


def _optim() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="adam",             # adam | adamw | sgd
      learning_rate=1e-3,
      schedule="constant",     # constant | cosine | stlr (slanted triangular) | linear_warmup
      warmup_steps=0,
      stlr_cut_frac=0.1,
      stlr_ratio=32.0,
      schedule_per_phase=False,  # gradual unfreezing: restart the schedule at every phase (ULMFiT)
      grad_clip=1.0,           # global norm over trainable leaves; 0 = off
      weight_decay=0.0,
      b1=0.9,
      b2=0.999,
  ))


def _train() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      seed=0,
      num_epochs=1,
      max_steps=0,             # 0 = run num_epochs; else stop after this many steps
      eval_every_steps=0,      # 0 = once per epoch
      checkpoint_every_steps=0,  # 0 = once per epoch
      log_every_steps=20,
      max_to_keep=2,
      keep_epoch_checkpoints=False,  # also keep every epoch's last checkpoint (LM snapshots)
      eval_max_batches=0,      # 0 = whole held-out split
      num_devices=0,           # data parallelism over this many devices; 0 = all visible
      checkpoint_every_minutes=10.0,  # also save when this much time passed since the last save
      on_nonfinite="stop",     # a non-finite loss/grad norm: stop (error) | skip (the batch)
      max_nonfinite_batches=20,  # on_nonfinite=skip: stop after skipping more than this many
      tensorboard=True,        # also write metrics to {workdir}/tensorboard/ (if tensorboardX is installed)
      prefetch_batches=2,      # batches a thread prepares (and transfers) ahead of the step; 0 = off
      sync_every_step=False,   # fetch metrics every step (stops on the exact non-finite step; slower)
  ))


def _model(name: str) -> ml_collections.ConfigDict:
  """The `config.model` block of model `name`, as its family declares it (jaxlm/models/)."""
  from jaxlm import models
  return models.family_of(name).config_block(name)


def lm_config(model: str = "lstm_lm") -> ml_collections.ConfigDict:
  """Defaults of a language-model pretraining run (seed 001)."""
  config = ml_collections.ConfigDict()
  config.task = "lm"
  config.data = _data()
  config.data.train_split = "train+unsup"
  config.data.valid_fraction = 0.02
  config.tokenizer = _tokenizer()
  config.model = _model(model)
  config.optim = _optim()
  config.train = _train()
  return config


def classifier_config(model: str = "sentiment_net") -> ml_collections.ConfigDict:
  """Defaults of a classifier run (seeds 000, 002, 003, 004): from scratch or grafted.

  `model` picks the model and with it the `config.model` block: `sentiment_net` (mean pooling,
  seed 002), `lstm_classifier` (last state, seed 003), `transformer_classifier` (seed 004).
  """
  config = ml_collections.ConfigDict()
  config.task = "classifier"
  config.data = _data()
  config.tokenizer = _tokenizer()
  config.model = _model(model)
  config.optim = _optim()
  config.train = _train()
  config.train.num_epochs = 3
  config.finetune = ml_collections.ConfigDict(dict(
      strategy="full",         # full | head | top_k | gradual
      top_k=1,                 # top_k: this many layer groups below the head also train
      discriminative_decay=1.0,  # ULMFiT uses 2.6: lr / decay**depth per layer group; 1 = off
      select_metric="accuracy",  # best checkpoint by this validation metric: accuracy | loss
      graft_map="auto",        # --init-from: auto (from the source and target runs) or a map the
                               # model's family declares (e.g. lm_to_bidirectional)
  ))
  # A linear model on the same labelled records beside every result (jaxlm/baseline.py): NB-weighted
  # logistic regression on 1-2-grams, ~30 s on IMDB's 22,500 reviews (scikit-learn extra).
  config.baseline = ml_collections.ConfigDict(dict(
      kind="nb_logreg",        # nb_logreg | tfidf_logreg | none
      ngram_max=2,             # n-grams 1..ngram_max
      C=1.0,                   # inverse L2 strength of the logistic regression
  ))
  return config


def shipped_configs() -> list[str]:
  """Names of the configs that come with jaxlm (`imdb_lm`, `quickstart`, ...): `--config NAME`."""
  return sorted(f.name[:-3] for f in CONFIG_DIR.iterdir()
                if f.name.endswith(".py") and not f.name.startswith("_"))


def get_config(name_or_path: str | pathlib.Path,
               part: str | None = None) -> ml_collections.ConfigDict:
  """The config `--config NAME_OR_PATH[:part]` means, for the CLI and Python code alike.

  An existing file wins; otherwise a name (`imdb_lm`, with or without `.py`) is one of
  `shipped_configs()`, read from the installed package, so a pip-installed jaxlm needs no checkout.
  `part` picks one part of a multi-part config (`quickstart`: `pretrain` | `finetune`).
  """
  path = pathlib.Path(name_or_path)
  if path.is_file():
    return load_config_file(path, part)
  name = path.name[:-3] if path.name.endswith(".py") else path.name
  if str(name_or_path) in (name, path.name) and name in shipped_configs():
    with importlib.resources.as_file(CONFIG_DIR / f"{name}.py") as shipped:
      return load_config_file(shipped, part, label=name)
  raise ConfigError(f"{name_or_path}: No such file, and no shipped config of that name (shipped: "
                    f"{', '.join(shipped_configs())})")


def load_config_file(path: str | pathlib.Path, part: str | None = None, *,
                     label: str | None = None) -> ml_collections.ConfigDict:
  """Loads `get_config()` (or `get_config(part)`) from a config file, as ml_collections' --config
  flag does; a part the file does not have is an error naming the parts it has."""
  path = pathlib.Path(path)
  label = label or str(path)
  if not path.is_file():
    raise ConfigError(f"{label}: No such file")
  # A SourceFileLoader, as ml_collections uses: a config file need not end in .py.
  loader = importlib.machinery.SourceFileLoader(f"jaxlm_config_{path.stem}", str(path))
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
  loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{label} defines no get_config()")
  if part is None:
    return module.get_config()
  if not inspect.signature(module.get_config).parameters:
    raise ConfigError(f"{label}:{part}: {label} has no parts")
  config = module.get_config(part)
  parts = [k for k, v in config.items() if isinstance(v, ml_collections.ConfigDict) and "task" in v]
  if "task" not in config and parts:  # e.g. quickstart.py returns every part for an unknown one
    raise ConfigError(f"{label}:{part}: no such part (parts: {', '.join(parts)})")
  return config


# Validation metrics that can select the best checkpoint, and which direction is better.
SELECT_MODES = {"accuracy": "max", "loss": "min"}

_CHOICES = {
    "tokenizer.kind": ("word", "sentencepiece"),
    "data.lm_mode": ("review", "stream"),
    "optim.name": ("adam", "adamw", "sgd"),
    "optim.schedule": ("constant", "cosine", "stlr", "linear_warmup"),
    "train.on_nonfinite": ("stop", "skip"),
    "data.truncate": ("head", "tail", "head_tail"),   # jaxlm/batching.py TRUNCATIONS
}


def _get(config, dotted):
  node = config
  for key in dotted.split("."):
    node = node[key]
  return node


def _owned_choices() -> dict:
  """Choices whose lists live with the code that implements them (one list each), checked here
  too so that a bad value fails before any data is read, not minutes into a run."""
  from jaxlm.train.strategies import STRATEGIES
  return {"finetune.strategy": STRATEGIES, "tokenizer.model_type": ("unigram", "bpe"),
          "finetune.select_metric": tuple(SELECT_MODES)}


def _has(config, dotted) -> bool:
  node = config
  for key in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      return False
    node = node[key]
  return True


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the values a run cannot start without; raises one ConfigError naming the key."""
  for key, choices in {**_CHOICES, **_owned_choices()}.items():
    if not _has(config, key):
      continue  # e.g. finetune exists only in classifier configs
    value = _get(config, key)
    if value not in choices:
      raise ConfigError(f"config.{key}={value!r} is not one of {', '.join(choices)}")
  from jaxlm import models, tasks
  if config.get("task") not in tasks.TASKS:
    raise ConfigError(f"config.task={config.get('task')!r} is not one of {', '.join(tasks.TASKS)}")
  family = models.family_of(config.model.name)
  if family.models[config.model.name] != config.task:
    raise ConfigError(f"config.model.name={config.model.name!r} is a {family.models[config.model.name]} "
                      f"model, but config.task={config.task!r}")
  family.validate(config)
  if config.get("baseline") is not None:
    from jaxlm import baseline
    baseline.validate(config.baseline)
  graft_map = (config.get("finetune") or {}).get("graft_map", "auto")
  if graft_map != "auto":
    family.graft_map(graft_map)  # raises, naming the family's maps
  for key in ("data.batch_size", "data.max_len", "train.num_epochs"):
    if _get(config, key) < 1:
      raise ConfigError(f"config.{key} must be >= 1, got {_get(config, key)}")
  if not 0.0 <= config.data.valid_fraction < 1.0:
    raise ConfigError(f"config.data.valid_fraction must be in [0, 1), got {config.data.valid_fraction}")
  if config.train.get("prefetch_batches", 0) < 0:
    raise ConfigError(f"config.train.prefetch_batches must be >= 0 (0 = off), "
                      f"got {config.train.prefetch_batches}")
  if config.data.get("test_max_examples", 0) < 0:
    raise ConfigError(f"config.data.test_max_examples must be >= 0 (0 = the whole test split), "
                      f"got {config.data.test_max_examples}")
  return config


# Keys a resumed run may change: how long it runs, how often it evaluates, logs and saves, how it
# evaluates and on how many devices. Anything else (a learning rate, a dropout, the vocabulary)
# would silently make the rest of the run a different experiment.
RESUMABLE_KEYS = (
    "train.num_epochs", "train.max_steps", "train.eval_every_steps", "train.checkpoint_every_steps",
    "train.checkpoint_every_minutes", "train.log_every_steps", "train.eval_max_batches",
    "train.max_to_keep", "train.keep_epoch_checkpoints", "train.num_devices", "train.on_nonfinite", "train.max_nonfinite_batches",
    "train.tensorboard", "train.prefetch_batches", "train.sync_every_step",  # same numbers either way
    "data.eval_batch_size", "data.test_split", "data.test_max_examples",
    "baseline.kind", "baseline.ngram_max", "baseline.C",  # scored after training, never trained on
)


def flat_keys(tree: dict, prefix: str = "") -> dict:
  """A nested config dict (as in config.json) -> `{'a.b.c': value}`, tuples as lists."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flat_keys(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out


def changed_keys(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[str]:
  """`key: old -> new` for every key of `config` that differs from the run's saved config.json,
  ignoring RESUMABLE_KEYS. A key the saved config lacks (written before the key existed) counts
  as its default."""
  import json
  new = flat_keys(json.loads(config.to_json_best_effort()))
  old = flat_keys(json.loads(saved.to_json_best_effort()))
  make = lm_config if config.get("task") == "lm" else classifier_config
  defaults = flat_keys(json.loads(make(config.model.name).to_json_best_effort()))
  changes = []
  for key, value in new.items():
    if key in RESUMABLE_KEYS:
      continue
    before = old.get(key, defaults.get(key))
    if before != value:
      changes.append(f"{key}: {before!r} -> {value!r}")
  return changes
