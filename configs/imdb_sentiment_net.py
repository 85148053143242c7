"""Seed 002: GluonNLP's SentimentNet on IMDB, its embedding and 2-layer encoder grafted from
`configs/imdb_lm.py`, mean pooling over valid steps, one sigmoid output.

    jaxlm finetune --config configs/imdb_sentiment_net.py --init-from runs/imdb_lm \
        --workdir runs/imdb_sentnet --config.data.source=jsonl:PATH/imdb

Model sizes must match the LM's (the graft checks and names any mismatch). Training follows the
seed: every weight fine-tuned from the first step at one rate (GluonNLP: lr 5e-3, no freezing);
here Adam with a slanted triangular schedule peaking at 3e-3, gradient clipping, 3 epochs.
ULMFiT's recipe is `--config.finetune.strategy=gradual --config.finetune.discriminative_decay=2.6`
(RESULTS.md: with concat pooling its head-only first epoch did not learn here).
"""
from jaxlm.config import classifier_config


def get_config():
  config = classifier_config()
  config.data.source = "tfds:imdb_reviews"
  config.data.train_split = "train"
  config.data.valid_fraction = 0.1
  config.data.batch_size = 64
  config.data.max_len = 400
  config.data.buckets = (64, 128, 256, 400)
  config.tokenizer.vocab_size = 20_000
  config.tokenizer.min_freq = 3
  config.model.update(name="sentiment_net", embed_dim=256, hidden_size=256, num_layers=2,
                      pooling="mean", loss="bce", dropout_embed=0.1, dropout_hidden=0.2,
                      dropout_output=0.3)
  config.optim.update(learning_rate=3e-3, schedule="stlr", grad_clip=1.0)
  config.train.update(num_epochs=3, log_every_steps=50)
  config.finetune.update(strategy="full", discriminative_decay=1.0)
  return config
