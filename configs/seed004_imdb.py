"""Seed 004, step 2: the pretrained transformer (configs/seed004_pretrain.py) fine-tuned on IMDB
with each strategy, side by side:

    jaxlm compare --config configs/seed004_imdb.py --init-from runs/seed004_pretrain \
        --workdir runs/seed004_compare --strategies scratch,full,head,top_k=1,gradual

or one strategy at a time (`head` = final layer only, `top_k` = the top K blocks and a new head):

    jaxlm finetune --config configs/seed004_imdb.py --init-from runs/seed004_pretrain \
        --workdir runs/seed004_full --config.finetune.strategy=full

The graft copies every layer but the topic head and starts a new one-logit head (BCE), with a
graft report. The model block must match the pretrained one (the graft names any mismatch); the
IMDB source defaults to `tfds:imdb_reviews` (`aclimdb:PATH` reads the downloaded aclImdb folder).
"""
from jaxlm.config import classifier_config


def get_config():
  config = classifier_config("transformer_classifier")
  config.data.source = "tfds:imdb_reviews"
  config.data.train_split = "train"
  config.data.valid_fraction = 0.1
  config.data.batch_size = 32
  config.data.eval_batch_size = 64
  config.data.max_len = 256
  config.data.buckets = (64, 128, 256)
  config.tokenizer.update(kind="sentencepiece", vocab_size=16_000, model_type="unigram",
                          lowercase=True)  # used only from scratch; a graft reuses the source's
  config.model.update(d_model=128, num_heads=4, num_layers=2, ffn_dim=512, max_len=512,
                      dropout=0.1, positional="sinusoidal", norm="pre", pooling="mean",
                      loss="bce", num_classes=2)
  config.optim.update(name="adamw", learning_rate=5e-4, schedule="stlr", weight_decay=0.01,
                      grad_clip=1.0)
  config.train.update(num_epochs=3, log_every_steps=50)
  config.finetune.update(strategy="full", top_k=1, select_metric="accuracy")
  return config
