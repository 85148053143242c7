"""PyTorch interop through safetensors: a run's weights under PyTorch module names, and back.

Why safetensors: it is the format PyTorch users load without unpickling code (`safetensors.torch.
load_file`, `load_model`, Hugging Face), and it is plain named arrays, which a jaxlm param tree
is too. Why PyTorch names: jaxlm's models are parameterised like their PyTorch counterparts
(jaxlm/models/lstm.py: nn.LSTM's layout and gate order i, f, g, o; jaxlm/models/transformer.py:
one fused QKV laid out as in_proj_weight transposed), so a conversion is renaming plus
transposing flax's `[in, out]` kernels into torch's `[out, in]` weights, nothing else. Each model
family declares its names (`ModelFamily.torch_names`, `torch_architecture`); nothing here guesses
from a path.

`jaxlm export WORKDIR --format safetensors` writes a folder:

    model.safetensors  the checkpoint's params under torch state_dict names (metadata format=pt),
                       and a batch-normalised head's running averages as BatchNorm1d buffers
                       (`running_mean`, `running_var`, `num_batches_tracked`)
    config.json        {"format": "jaxlm-safetensors", "task", "model" (the run's config.model),
                        "tokenizer" (its config block), "data" ({"reverse"}: the reading
                        direction), "vocab_size", "torch" (the PyTorch modules' constructor
                        arguments), "checkpoint" (the step exported)}
    tokenizer/         the run's jaxlm tokenizer (what `--init-from` reads text with)
    vocab.txt          one token per line, line i is id i (for PyTorch code)

`--init-from` takes such a folder or a `.safetensors` file with its config.json beside it, also
one written from PyTorch (torch names, a config.json with `task`, `model`, `vocab_size`).
`read_export(...).variables()` gives the params and the model state (batch statistics) back.
`build_torch_model` is a reference PyTorch model for an export (torch is imported only there
and in `load_into_torch`: it stays an optional extra); tests/test_export.py compares jaxlm with
it, and the parity tests (tests/test_lstm_parity.py, tests/test_transformer.py) copy weights with
the converters below.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import re
import shutil
from typing import Any, Mapping

import ml_collections
import numpy as np

from jaxlm import checkpoint, files, params as P, tokenizers
from jaxlm.errors import CheckpointError, ConfigError

FORMAT, FORMAT_VERSION = "jaxlm-safetensors", 1
WEIGHTS, CONFIG, VOCAB, TOKENIZER = "model.safetensors", "config.json", "vocab.txt", "tokenizer"
FORMATS = ("safetensors",)


# --- param tree <-> torch names --------------------------------------------------------------

# PyTorch's BatchNorm counts the batches its running averages saw in this int64 buffer beside them.
RUNNING_MEAN, BATCHES_TRACKED = ".running_mean", ".num_batches_tracked"


def _flat_variables(params, model_state=None) -> dict[str, Any]:
  """The params' leaves by path, then the model state's by path with its collection first
  (`batch_stats/head/bn_in/mean`): one namespace, since no param path starts with a collection."""
  return {**P.flatten(params), **P.flatten(model_state or {})}


def torch_names(params, family, model_state=None) -> dict[str, tuple[str, ...]]:
  """Every leaf path of `params` (and of `model_state`, as `batch_stats/...`) -> the torch names
  it may have (the first is what export writes), from the family's `torch_names` rules; a leaf no
  rule names is an error. A rule's optional third element is a pattern some path of the tree
  must match for the rule to apply (a layer named alike in two head layouts)."""
  flat = _flat_variables(params, model_state)
  rules = []
  for pattern, names, *when in family.torch_names:
    if when and not any(re.search(when[0], path) for path in flat):
      continue
    rules.append((re.compile(pattern), (names,) if isinstance(names, str) else tuple(names)))
  out = {}
  for path in flat:
    for rx, names in rules:
      match = rx.search(path)
      if match:
        out[path] = tuple(match.expand(name) for name in names)
        break
    else:
      raise ConfigError(f"{'parameter' if path in P.flatten(params) else 'model state'} {path} "
                        f"has no PyTorch name in the {family.name} family (ModelFamily.torch_names)")
  return out


def _is_kernel(path: str) -> bool:
  return path.rsplit(P.SEP, 1)[-1] == "kernel"  # flax's [in, out]; torch's weight is [out, in]


def to_torch(params, family, model_state=None, *, batches_tracked: int = 0) -> dict[str, np.ndarray]:
  """A jaxlm param tree (and model state) -> `{torch name: numpy array}` (kernels transposed,
  C-contiguous). Each BatchNorm's running averages get PyTorch's `num_batches_tracked` beside them
  (int64 `batches_tracked`), which its strict `load_state_dict` expects."""
  names = torch_names(params, family, model_state)
  out = {}
  for path, leaf in _flat_variables(params, model_state).items():
    array = np.asarray(leaf)
    name = names[path][0]
    out[name] = np.ascontiguousarray(array.T if _is_kernel(path) else array)
    if name.endswith(RUNNING_MEAN):
      out[name[:-len(RUNNING_MEAN)] + BATCHES_TRACKED] = np.array(batches_tracked, np.int64)
  return out


def from_torch(tensors: Mapping[str, Any], template, family, where: str = "the tensors"):
  """`{torch name: array}` -> a param tree shaped like `template` (arrays or ShapeDtypeStructs),
  cast to its dtypes. Missing names, shapes that do not fit and tensors nothing uses fail with one
  line; an unused tensor equal to a used one is a tied copy (an LM's decoder.weight) and is fine."""
  return variables_from_torch(tensors, template, {}, family, where)[0]


def variables_from_torch(tensors: Mapping[str, Any], template, state_template, family,
                         where: str = "the tensors") -> tuple[Any, dict]:
  """`from_torch` for params and model state: (params like `template`, model state like
  `state_template`, e.g. `{"batch_stats": ...}`). A BatchNorm's `num_batches_tracked` is read
  with its running averages and dropped (jaxlm's averages need no count)."""
  names, problems, out, used = torch_names(template, family, state_template), [], {}, {}
  for path, leaf in _flat_variables(template, state_template).items():
    name = next((n for n in names[path] if n in tensors), None)
    if name is None:
      problems.append(f"{names[path][0]} (for {path}) is missing")
      continue
    array = np.asarray(tensors[name])
    array = array.T if _is_kernel(path) else array
    if array.shape != P.shape_of(leaf):
      shape = tuple(reversed(P.shape_of(leaf))) if _is_kernel(path) else P.shape_of(leaf)
      problems.append(f"{name} has shape {tuple(np.shape(tensors[name]))}, the model needs {shape}")
      continue
    out[path] = array.astype(leaf.dtype, copy=False)
    used[name] = array
  counters = {u[:-len(RUNNING_MEAN)] + BATCHES_TRACKED for u in used if u.endswith(RUNNING_MEAN)}
  unused = [n for n in tensors if n not in used and n not in counters
            and not any(np.shape(tensors[n]) == np.shape(tensors[u])
                        and np.array_equal(tensors[n], tensors[u]) for u in used)]
  problems += [f"{n} is not a parameter of the model" for n in unused]
  if problems:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise CheckpointError(f"{where} do not fit the {family.name} model: "
                          + "; ".join(problems[:3]) + more)
  tree = P.unflatten(out)
  params = {k: v for k, v in tree.items() if k not in state_template}
  return params, {k: tree[k] for k in state_template if k in tree}


def load_into_torch(module, tensors: Mapping[str, Any]):
  """Copies `{torch name: numpy array}` into a torch module's parameters (cast to their dtype);
  strict, except that a parameter tied to one that was loaded (a tied decoder) need not be given."""
  torch = _torch()
  state = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}  # a writable copy
  missing, unexpected = module.load_state_dict(state, strict=False)
  named = dict(module.named_parameters(remove_duplicate=False))
  loaded = [named[k] for k in state if k in named]
  missing = [k for k in missing if not any(named.get(k) is p for p in loaded)]
  if missing or unexpected:
    raise CheckpointError(f"the tensors do not fit {type(module).__name__}: missing "
                          f"{missing or 'none'}, unexpected {unexpected or 'none'}")
  return module


# --- export ----------------------------------------------------------------------------------


def export(workdir, out=None, *, which: str | None = None, step: int | None = None,
           fmt: str = "safetensors") -> dict:
  """Writes `workdir`'s checkpoint (`step`, or `which`: best for a run that selects one, else
  latest, as `--init-from` picks) as an export folder, by default `WORKDIR/export`.

  A batch-normalised head's running averages go with it as its BatchNorm1d buffers, and
  `num_batches_tracked` is the exported step: every train step put one batch through the head in
  train mode (PyTorch counts the same way; it reads the count only with `momentum=None`). A batch
  skipped for non-finite values (`train.on_nonfinite=skip`) is counted although it left them as
  they were."""
  from jaxlm import models, tasks
  if fmt not in FORMATS:
    raise ConfigError(f"--format={fmt!r} is not one of {', '.join(FORMATS)}")
  workdir = pathlib.Path(workdir)
  config = checkpoint.load_config(workdir)
  family = models.family_of(config.model.name)
  tokenizer = tokenizers.load_tokenizer(workdir / TOKENIZER)
  arch = family.torch_architecture(config.model, tokenizer.vocab_size)  # before reading weights
  out = workdir / "export" if out is None else pathlib.Path(out)
  if out.resolve() == workdir.resolve() or (out / "checkpoints").exists():
    raise ConfigError(f"--out {out} holds a run (its config.json and tokenizer would be "
                      "replaced): export into another folder")
  if which is None:
    which = "best" if tasks.TASKS[config.task].select_metric(config) else "latest"
  chosen = which if step is None else "by number"
  with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
    # By number, so config.json names the step exported: a damaged one is the error (pass
    # --step to export another) instead of an older step standing in for it.
    if step is None:
      step = ckpt.best_step() if which == "best" else None
      step = ckpt.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoints in {workdir / 'checkpoints'} to export")
    params, model_state = ckpt.restore_variables(step)
  tensors = to_torch(params, family, model_state, batches_tracked=int(step))
  from safetensors.numpy import save
  # format=pt: what safetensors.torch and Hugging Face loaders expect of a torch state dict.
  files.atomic_write(out / WEIGHTS, save(tensors, metadata={"format": "pt"}))
  shutil.rmtree(out / TOKENIZER, ignore_errors=True)
  tokenizer.save(out / TOKENIZER)
  files.atomic_write(out / VOCAB, "".join(f"{t}\n" for t in _vocab(tokenizer)).encode("utf-8"))
  checkpoint.write_json_atomic(out / CONFIG, {
      "format": FORMAT, "format_version": FORMAT_VERSION, "task": config.task,
      "model": config.model.to_dict(), "tokenizer": config.tokenizer.to_dict(),
      # How the model reads text: a backward LM (data.reverse) grafts only into one that does too.
      "data": {"reverse": bool(config.data.get("reverse", False))},
      "vocab_size": tokenizer.vocab_size, "torch": arch,
      "checkpoint": {"step": int(step), "chosen": chosen}})
  stats = f" + {P.count_params(model_state):,} running statistics" if model_state else ""
  print(f"exported {workdir} step {step} ({chosen}) to {out}: {WEIGHTS} "
        f"({len(tensors)} tensors, {P.count_params(params):,} parameters{stats}), {CONFIG}, "
        f"{TOKENIZER}/, {VOCAB}", flush=True)
  return {"out": str(out), "step": int(step), "tensors": len(tensors)}


def _vocab(tokenizer) -> list[str]:
  if isinstance(tokenizer, tokenizers.WordTokenizer):
    return list(tokenizer.itos)
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
  return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


# --- import ----------------------------------------------------------------------------------


def is_export(path) -> bool:
  """Whether `--init-from PATH` names an export (a file, or a folder with model.safetensors)
  rather than a workdir."""
  path = pathlib.Path(path)
  return path.is_file() or (path / WEIGHTS).is_file()


@dataclasses.dataclass
class Export:
  """An export read back: `config` (task + completed model block + tokenizer block) is read at
  once, the weights and tokenizer only when asked for."""
  weights: pathlib.Path
  config: ml_collections.ConfigDict
  vocab_size: int

  @property
  def folder(self) -> pathlib.Path:
    return self.weights.parent

  def params(self):
    """The weights as a jaxlm param tree (numpy), checked against the config's model."""
    return self.variables()[0]

  def variables(self) -> tuple[Any, dict]:
    """(params, model_state) as numpy trees, checked against the config's model: `model_state`
    is a batch-normalised head's running averages (`{"batch_stats": ...}`), `{}` without one."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from jaxlm import models
    try:
      tensors = load_file(self.weights)
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f"{self.weights} is not a safetensors file: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    family = models.family_of(self.config.model.name)
    template, state_template = abstract_variables(self.config, self.vocab_size)
    return variables_from_torch(tensors, template, state_template, family,
                                where=f"the tensors of {self.weights} (with its {CONFIG})")

  def tokenizer(self):
    """The jaxlm tokenizer in `tokenizer/`, else a word vocabulary from `vocab.txt` (specials
    first, as config.json's tokenizer block or jaxlm's defaults say)."""
    folder, block = self.folder, self.config.get("tokenizer") or {}
    if (folder / TOKENIZER / tokenizers.CONFIG_FILE).is_file():
      tokenizer = tokenizers.load_tokenizer(folder / TOKENIZER)
    elif (folder / VOCAB).is_file() and block.get("kind", "word") == "word":
      itos = (folder / VOCAB).read_text(encoding="utf-8").split("\n")[:-1]
      try:
        tokenizer = tokenizers.WordTokenizer(
            itos, specials=tuple(block.get("specials", tokenizers.DEFAULT_SPECIALS)),
            lowercase=bool(block.get("lowercase", True)))
      except ConfigError as e:
        raise CheckpointError(f"{folder / VOCAB}: {e}") from None
    else:
      raise CheckpointError(f"{folder} has no tokenizer: neither {TOKENIZER}/"
                            f"{tokenizers.CONFIG_FILE} nor a word vocabulary {VOCAB}")
    if tokenizer.vocab_size != self.vocab_size:
      raise CheckpointError(f"the tokenizer in {folder} has {tokenizer.vocab_size} ids, its "
                            f"{CONFIG} says vocab_size={self.vocab_size}")
    return tokenizer


def abstract_variables(config, vocab_size: int) -> tuple[Any, dict]:
  """(params, model_state) of the config's model as ShapeDtypeStructs (jax.eval_shape of its
  init, as `commands._abstract_params`, keeping every collection): what an export must hold."""
  import jax

  from jaxlm import models
  from jaxlm.train import steps
  family = models.family_of(config.model.name)
  model = family.build(config.model, vocab_size)
  batch = {key: jax.ShapeDtypeStruct((2, 8), np.int32) for key in ("tokens", "inputs", "targets")}
  batch["lengths"] = jax.ShapeDtypeStruct((2,), np.int32)
  args = family.init_args(config.task, batch)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  return steps.split_variables(jax.eval_shape(lambda *a: model.init(rngs, *a), *args))


def read_export(path) -> Export:
  """The export at `path` (a folder holding model.safetensors, or a .safetensors file) with the
  config.json beside it; a missing or unusable config.json is one CheckpointError."""
  from jaxlm import models
  path = pathlib.Path(path)
  weights = path if path.is_file() else path / WEIGHTS
  config_path = weights.parent / CONFIG
  if not config_path.is_file():
    raise CheckpointError(f"{config_path} does not exist: {weights.name} needs the config.json "
                          "that `jaxlm export` writes beside it (task, model, vocab_size)")
  try:
    raw = json.loads(config_path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{config_path} is not valid JSON: {e}") from None
  missing = [k for k in ("task", "model", "vocab_size") if not isinstance(raw, dict) or k not in raw]
  if missing or not isinstance(raw["model"], dict) or "name" not in raw["model"]:
    raise CheckpointError(f"{config_path} lacks {', '.join(missing) or 'model.name'}: an export's "
                          "config.json holds task, model (with its name) and vocab_size")
  family = models.family_of(raw["model"]["name"])
  kind = family.models[raw["model"]["name"]]
  if raw["task"] != kind or not isinstance(raw["vocab_size"], int) or raw["vocab_size"] < 1:
    raise CheckpointError(f"{config_path}: task={raw['task']!r} and vocab_size="
                          f"{raw['vocab_size']!r} do not describe a {raw['model']['name']} "
                          f"(task {kind!r}, a positive vocab_size)")
  config = ml_collections.ConfigDict({"task": raw["task"], "model": raw["model"],
                                      "tokenizer": raw.get("tokenizer") or {},
                                      "data": raw.get("data") or {"reverse": False}})
  config.model = family.complete(config.model)
  return Export(weights, config, raw["vocab_size"])


# --- a reference PyTorch model ---------------------------------------------------------------


def _torch():
  try:
    import torch
  except ImportError:
    raise ConfigError("build_torch_model needs PyTorch, which jaxlm does not install: "
                      "pip install torch==2.13.0 (the `torch` extra's version)") from None
  return torch


def build_torch_model(source, *, load_weights: bool = True):
  """The PyTorch model of an export (`source`: its folder, its .safetensors file, or its
  config.json as a dict), in eval mode, with the export's weights unless `load_weights=False`
  (then torch's own initialisation). An example of using an export from PyTorch, and the
  reference the round-trip tests compare jaxlm with.

  Calling it: `model(tokens [B,T] long, lengths [B] long)` -> LM logits [B,T,V] (positions past
  a length see zero LSTM outputs, as in jaxlm) or classifier logits [B, num_outputs]. Lengths
  must be >= 1 (PyTorch packs sequences and masks attention by them).
  """
  if isinstance(source, Mapping):
    config, weights = dict(source), None
  else:
    path = pathlib.Path(source)
    weights = path if path.is_file() else path / WEIGHTS
    config = json.loads((weights.parent / CONFIG).read_text(encoding="utf-8"))
  arch = config["torch"]
  model = _torch_classes()[arch["module"]](arch)
  if load_weights:
    if weights is None:
      raise ConfigError("build_torch_model: weights come from an export folder or file, not a dict")
    from safetensors.numpy import load_file
    load_into_torch(model, load_file(weights))
  return model.eval()


@functools.lru_cache(maxsize=None)
def _torch_classes() -> dict:
  torch = _torch()
  nn = torch.nn

  def run_lstm(lstm, x, lengths):
    """nn.LSTM over packed sequences: outputs zero past each length, final states at it."""
    if lengths is None:
      return lstm(x)
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True,
                                               enforce_sorted=False)
    out, state = lstm(packed)
    out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return out, state

  def pool(outputs, last, lengths, pooling):
    """jaxlm.models.classifiers.masked_pool in torch."""
    if pooling == "last":
      return last
    valid = (torch.arange(outputs.shape[1])[None, :] < lengths[:, None])[..., None]
    mean = (outputs * valid).sum(1) / lengths.clamp(min=1)[:, None].to(outputs.dtype)
    if pooling == "mean":
      return mean
    peak = outputs.masked_fill(~valid, torch.finfo(outputs.dtype).min).amax(1)
    peak = torch.where(lengths[:, None] > 0, peak, torch.zeros_like(peak))
    return peak if pooling == "max" else torch.cat([last, peak, mean], -1)

  class LSTMLanguageModel(nn.Module):
    """nn.Embedding -> nn.LSTM -> (proj ->) nn.Linear, like jaxlm.models.lm.LSTMLanguageModel."""

    def __init__(self, arch):
      super().__init__()
      self.embedding = nn.Embedding(**arch["embedding"])
      self.lstm = nn.LSTM(**arch["lstm"])
      if arch["proj"]:
        self.proj = nn.Linear(arch["lstm"]["hidden_size"], arch["embedding"]["embedding_dim"],
                              bias=False)
      self.decoder = nn.Linear(**arch["decoder"])
      if arch["tie_weights"]:
        self.decoder.weight = self.embedding.weight

    def forward(self, tokens, lengths=None):
      out, _ = run_lstm(self.lstm, self.embedding(tokens), lengths)
      return self.decoder(self.proj(out) if hasattr(self, "proj") else out)

  class LSTMClassifier(nn.Module):
    """nn.Embedding -> nn.LSTM -> pooling -> nn.Linear (or an MLP), like jaxlm's LSTMClassifier.

    With `head_batchnorm` the head is ULMFiT's (fastai's PoolingLinearClassifier): BatchNorm1d ->
    Dropout -> Linear -> ReLU -> BatchNorm1d -> Dropout -> Linear, and the features' dropout is
    its first Dropout. In eval mode it equals jaxlm's; training it in PyTorch updates the running
    variance with the unbiased batch variance, where jaxlm (flax) uses the biased one."""

    def __init__(self, arch):
      super().__init__()
      self.arch = arch
      self.embedding = nn.Embedding(**arch["embedding"])
      self.lstm = nn.LSTM(**arch["lstm"])
      if arch.get("head_batchnorm", False):
        features, hidden, bn = arch["features"], arch["head_hidden"], arch["batchnorm"]
        self.dropout = nn.Identity()
        self.head = nn.Sequential(
            nn.BatchNorm1d(features, **bn), nn.Dropout(arch["dropout_output"]),
            nn.Linear(features, hidden), nn.ReLU(), nn.BatchNorm1d(hidden, **bn),
            nn.Dropout(arch["head_dropout"]), nn.Linear(hidden, arch["num_outputs"]))
        return
      self.dropout = nn.Dropout(arch["dropout_output"])
      if arch["head_hidden"] > 0:
        self.head = nn.Sequential(nn.Linear(arch["features"], arch["head_hidden"]), nn.ReLU(),
                                  nn.Dropout(arch["dropout_output"]),
                                  nn.Linear(arch["head_hidden"], arch["num_outputs"]))
      else:
        self.head = nn.Linear(arch["features"], arch["num_outputs"])

    def forward(self, tokens, lengths):
      out, (h, _) = run_lstm(self.lstm, self.embedding(tokens), lengths)
      last = torch.cat([h[-2], h[-1]], -1) if self.arch["lstm"]["bidirectional"] else h[-1]
      return self.head(self.dropout(pool(out, last, lengths, self.arch["pooling"])))

  class TransformerClassifier(nn.Module):
    """Embedding * sqrt(d) + positions -> nn.TransformerEncoder (key padding mask) -> pooling ->
    nn.Linear, like jaxlm.models.transformer.TransformerClassifier."""

    def __init__(self, arch):
      super().__init__()
      self.arch, d = arch, arch["embedding"]["embedding_dim"]
      self.embedding = nn.Embedding(**arch["embedding"])
      if arch["positional"] == "learned":
        self.pos_embedding = nn.Embedding(arch["positions"], d)
      if arch["pooling"] == "cls":
        self.cls_token = nn.Parameter(torch.randn(d))
      self.encoder = nn.TransformerEncoder(
          nn.TransformerEncoderLayer(**arch["encoder_layer"]), arch["num_layers"],
          norm=nn.LayerNorm(d) if arch["final_norm"] else None, enable_nested_tensor=False)
      self.head = nn.Linear(d, arch["num_outputs"])

    def forward(self, tokens, lengths):
      from jaxlm.models.transformer import sinusoidal_positions
      d = self.embedding.embedding_dim
      x = self.embedding(tokens) * math.sqrt(d)
      if self.arch["pooling"] == "cls":
        x = torch.cat([self.cls_token.expand(x.shape[0], 1, d), x], 1)
        lengths = lengths + 1
      steps = x.shape[1]
      if self.arch["positional"] == "learned":
        x = x + self.pos_embedding(torch.arange(steps))
      else:
        x = x + torch.from_numpy(sinusoidal_positions(steps, d)).to(x.dtype)
      pad = torch.arange(steps)[None, :] >= lengths[:, None]
      y = self.encoder(x, src_key_padding_mask=pad)
      features = y[:, 0] if self.arch["pooling"] == "cls" else pool(
          y, None, lengths, self.arch["pooling"])
      return self.head(features)

  return {"lstm_lm": LSTMLanguageModel, "lstm_classifier": LSTMClassifier,
          "transformer_classifier": TransformerClassifier}
