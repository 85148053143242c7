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
from jaxlm.config import get_config as shipped_config


def get_config():
  """The pretraining config's data shapes, tokenizer and model (the graft needs the same model),
  with IMDB's data, a one-logit head and a fine-tuning schedule."""
  config = shipped_config("seed004_pretrain")
  config.data.update(source="tfds:imdb_reviews", train_split="train", valid_fraction=0.1)
  config.model.update(loss="bce", num_classes=2)  # tokenizer: used only from scratch
  config.optim.update(name="adamw", learning_rate=5e-4, schedule="stlr", warmup_steps=0,
                      weight_decay=0.01, grad_clip=1.0)
  config.train.update(num_epochs=3, log_every_steps=50)
  config.finetune.update(strategy="full", top_k=1, select_metric="accuracy")
  return config
