"""The LSTM family (seeds 000-003): `lstm_lm`, `sentiment_net`, `lstm_classifier`.

All three share the submodules `embed` (nn.Embed) and `encoder` (LSTMEncoder, `layer_0..`), so an
LM's weights graft into a classifier by path. Layer groups bottom to top: `embed`, each
`encoder/layer_i` (both directions of a bidirectional layer together), then the LM's `decoder` or
the classifier's `head`.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxlm.errors import ConfigError
from jaxlm.models.classifiers import POOLINGS
from jaxlm.models.family import CLASSIFIER_TO_CLASSIFIER, DTYPES, ModelFamily
from jaxlm.models.family import torch_linear
from jaxlm.models.lm import OUTPUTS
from jaxlm.models.lstm import IMPLS

LM_TO_CLASSIFIER = [
    (r"^embed/(.*)", r"embed/\1"),
    (r"^encoder/(.*)", r"encoder/\1"),
    (r"^decoder/.*", None),
]

# A (forward) LM into a bidirectional classifier: the LM fills the forward direction, `bwd` starts
# fresh (ULMFiT would graft a second, backward LM into it).
LM_TO_BIDIRECTIONAL = [
    (r"^embed/(.*)", r"embed/\1"),
    (r"^encoder/(layer_\d+)/(.*)", r"encoder/\1/fwd/\2"),
    (r"^decoder/.*", None),
]

# PyTorch names (jaxlm/interop.py): nn.Embedding `embedding`, nn.LSTM `lstm` (gate order i, f, g, o
# as here; a bidirectional layer's `bwd` is torch's `_reverse`), the LM's nn.Linear `decoder` (tied:
# its weight is the embedding, which safetensors.torch.save_model stores as decoder.weight alone;
# `proj` maps hidden_size to embed_dim first when they differ) or the classifier's nn.Linear
# `head`, for an MLP head nn.Sequential(Linear, ReLU, Dropout, Linear): `head.0`, `head.3`. ULMFiT's
# batch-normalised head is nn.Sequential(BatchNorm1d, Dropout, Linear, ReLU, BatchNorm1d, Dropout,
# Linear) (fastai's order): `head.0`, `head.2`, `head.4`, `head.6`; its running averages (the
# `batch_stats` collection, paths `batch_stats/...`) are the BatchNorm1d buffers `running_mean` and
# `running_var`. Its Dense layers have the plain MLP head's paths, so their rules carry a third
# element: they apply only in a tree with a path matching it (one with `head/bn_in`).
_BN_HEAD = r"^head/bn_in/"
TORCH_NAMES = [
    (r"^embed/embedding$", ("embedding.weight", "decoder.weight")),
    (r"^encoder/layer_(\d+)/(?:fwd/)?(ih|hh)/kernel$", r"lstm.weight_\2_l\1"),
    (r"^encoder/layer_(\d+)/(?:fwd/)?(ih|hh)/bias$", r"lstm.bias_\2_l\1"),
    (r"^encoder/layer_(\d+)/bwd/(ih|hh)/kernel$", r"lstm.weight_\2_l\1_reverse"),
    (r"^encoder/layer_(\d+)/bwd/(ih|hh)/bias$", r"lstm.bias_\2_l\1_reverse"),
    (r"^decoder/proj/kernel$", "proj.weight"),
    *torch_linear("head/bn_in", "head.0", weight="scale"),
    *torch_linear("head/bn_hidden", "head.4", weight="scale"),
    (r"^batch_stats/head/bn_in/mean$", "head.0.running_mean"),
    (r"^batch_stats/head/bn_in/var$", "head.0.running_var"),
    (r"^batch_stats/head/bn_hidden/mean$", "head.4.running_mean"),
    (r"^batch_stats/head/bn_hidden/var$", "head.4.running_var"),
    *[(path, name, _BN_HEAD) for path, name in torch_linear("head/hidden", "head.2")
      + torch_linear("head/out", "head.6")],
    *torch_linear("decoder", "decoder"), *torch_linear("head/hidden", "head.0"),
    *torch_linear("head/out", "head.3"), *torch_linear("head", "head"),
]

_SHARED = dict(embed_dim=128, hidden_size=256, num_layers=2, dropout_embed=0.1, dropout_hidden=0.2,
               weight_drop=0.0,     # AWD-LSTM's DropConnect on each layer's W_hh
               impl="fused",        # fused (custom-VJP recurrence; the CPU kernel) | scan (nn.scan)
               dtype="float32")     # compute dtype: float32 | bfloat16 (params stay float32; on
                                    # CPU the fused recurrence runs in float32 either way)


class LSTMFamily(ModelFamily):
  name = "lstm"
  models = {"lstm_lm": "lm", "sentiment_net": "classifier", "lstm_classifier": "classifier"}
  group_rules = (
      (r"^embed/", "embed"),
      (r"^encoder/(layer_\d+)/", r"encoder/\1"),
      (r"^decoder/", "decoder"),
      (r"^head/", "head"),
  )
  graft_maps = {"lm_to_classifier": LM_TO_CLASSIFIER, "lm_to_bidirectional": LM_TO_BIDIRECTIONAL,
                "classifier_to_classifier": CLASSIFIER_TO_CLASSIFIER}
  torch_names = TORCH_NAMES

  def fields(self, model_name):
    if model_name == "lstm_lm":
      return dict(_SHARED, dropout_output=0.2, tie_weights=False,
                  dropout_words=0.0,           # drop whole word types (embedding rows) per batch
                  variational=True,            # one dropout mask per sequence, shared over time
                  output="full",               # full | sampled | adaptive
                  num_sampled=1024, adaptive_cutoffs=(2000, 10000))
    return dict(_SHARED, bidirectional=False,
                pooling="mean" if model_name == "sentiment_net" else "last",  # last|mean|max|concat
                dropout_output=0.3, variational=False,
                head_hidden=0,                 # 0 = one Dense; >0 = ULMFiT-style MLP head
                # ULMFiT's batch-normalised MLP head (needs head_hidden > 0): BatchNorm ->
                # dropout_output -> Dense -> ReLU -> BatchNorm -> head_dropout -> Dense
                head_batchnorm=False, head_dropout=0.1)

  def validate(self, config):
    super().validate(config)
    model_cfg = config.model
    for key in ("embed_dim", "hidden_size", "num_layers"):
      if model_cfg[key] < 1:
        raise ConfigError(f"config.model.{key} must be >= 1, got {model_cfg[key]}")
    choices = {"output": OUTPUTS} if model_cfg.name == "lstm_lm" else {"pooling": POOLINGS}
    choices["impl"] = IMPLS
    choices["dtype"] = DTYPES
    for key, allowed in choices.items():
      if model_cfg[key] not in allowed:
        raise ConfigError(f"config.model.{key}={model_cfg[key]!r} is not one of {', '.join(allowed)}")
    if model_cfg.name != "lstm_lm":
      self._validate_head(model_cfg)

  @staticmethod
  def _validate_head(model_cfg):
    batchnorm = model_cfg.head_batchnorm
    if not isinstance(batchnorm, bool):
      raise ConfigError(f"config.model.head_batchnorm must be True or False, got {batchnorm!r}")
    if batchnorm and model_cfg.head_hidden < 1:
      raise ConfigError("config.model.head_batchnorm=True needs an MLP head: set "
                        "config.model.head_hidden > 0 (ULMFiT uses 50)")
    if not 0.0 <= model_cfg.head_dropout < 1.0:
      raise ConfigError(f"config.model.head_dropout must be in [0, 1), got {model_cfg.head_dropout}")

  def build(self, model_cfg, vocab_size):
    from jaxlm.models import classifiers, lm
    cfg = model_cfg
    if cfg.name == "lstm_lm":
      return lm.LSTMLanguageModel(
          vocab_size=vocab_size, embed_dim=cfg.embed_dim, hidden_size=cfg.hidden_size,
          num_layers=cfg.num_layers, dropout_embed=cfg.dropout_embed,
          dropout_hidden=cfg.dropout_hidden, dropout_output=cfg.dropout_output,
          tie_weights=cfg.tie_weights, output=cfg.output, num_sampled=cfg.num_sampled,
          adaptive_cutoffs=tuple(cfg.adaptive_cutoffs), dropout_words=cfg.dropout_words,
          weight_drop=cfg.weight_drop, variational=cfg.variational, impl=cfg.impl,
          dtype=jnp.dtype(cfg.dtype))
    cls = classifiers.LSTMClassifier if cfg.name == "lstm_classifier" else classifiers.SentimentNet
    return cls(
        vocab_size=vocab_size, embed_dim=cfg.embed_dim, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers, num_outputs=1 if cfg.loss == "bce" else cfg.num_classes,
        bidirectional=cfg.bidirectional, pooling=cfg.pooling, dropout_embed=cfg.dropout_embed,
        dropout_hidden=cfg.dropout_hidden, dropout_output=cfg.dropout_output,
        head_hidden=cfg.head_hidden, head_batchnorm=cfg.head_batchnorm,
        head_dropout=cfg.head_dropout, variational=cfg.variational, weight_drop=cfg.weight_drop,
        impl=cfg.impl, dtype=jnp.dtype(cfg.dtype))

  def init_args(self, task_kind, batch):
    """A classifier also takes the batch's example weights: a batch-normalised head keeps the
    filler rows (weight 0) of a partial batch out of its statistics."""
    args = super().init_args(task_kind, batch)
    return args if task_kind == "lm" else (*args, batch.get("weights"))

  def initial_carry(self, model_cfg, batch_size):
    """All-zero LSTM state, a (c, h) pair per layer: the start of stream-mode LM training."""
    zeros = jnp.zeros((batch_size, model_cfg.hidden_size), jnp.float32)
    return tuple((zeros, zeros) for _ in range(model_cfg.num_layers))

  def default_graft_map(self, source_cfg, target_cfg):
    name = super().default_graft_map(source_cfg, target_cfg)
    if name == "lm_to_classifier" and target_cfg.model.get("bidirectional", False):
      return "lm_to_bidirectional"
    return name

  def torch_architecture(self, model_cfg, vocab_size):
    cfg = model_cfg
    if cfg.name == "lstm_lm" and cfg.output == "adaptive":
      raise ConfigError("config.model.output='adaptive' has no PyTorch counterpart to export to "
                        "(nn.AdaptiveLogSoftmaxWithLoss has no tail biases); export a full or "
                        "sampled LM")
    bidirectional = bool(cfg.get("bidirectional", False))
    arch = dict(embedding=dict(num_embeddings=vocab_size, embedding_dim=cfg.embed_dim),
                lstm=dict(input_size=cfg.embed_dim, hidden_size=cfg.hidden_size,
                          num_layers=cfg.num_layers, batch_first=True, bidirectional=bidirectional,
                          dropout=cfg.dropout_hidden if cfg.num_layers > 1 else 0.0))
    if cfg.name == "lstm_lm":  # a sampled LM is a full softmax at evaluation: the same Linear
      proj = cfg.tie_weights and cfg.hidden_size != cfg.embed_dim
      return dict(arch, module="lstm_lm", tie_weights=cfg.tie_weights, proj=proj,
                  decoder=dict(in_features=cfg.embed_dim if cfg.tie_weights else cfg.hidden_size,
                               out_features=vocab_size))
    width = cfg.hidden_size * (2 if bidirectional else 1) * (3 if cfg.pooling == "concat" else 1)
    arch = dict(arch, module="lstm_classifier", pooling=cfg.pooling, features=width,
                head_hidden=cfg.head_hidden, dropout_output=cfg.dropout_output,
                num_outputs=1 if cfg.loss == "bce" else cfg.num_classes)
    if cfg.get("head_batchnorm", False):  # MLPHead's BatchNorm: PyTorch's defaults
      arch.update(head_batchnorm=True, head_dropout=cfg.head_dropout,
                  batchnorm=dict(eps=1e-5, momentum=0.1))
    return arch
