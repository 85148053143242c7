"""Seed 003's baseline: embedding 100 -> 1-layer LSTM 256 -> last valid state -> 1 logit, BCE.

Vocabulary: the 25,000 most frequent training words plus <unk> and <pad> (25,002 ids), so
`jaxlm inspect --config configs/seed003_lstm.py` reports 2,867,049 trainable parameters, as the
seed does. Adam 1e-3, 10 epochs, best epoch by validation accuracy.
"""
from jaxlm.config import classifier_config


def get_config():
  config = classifier_config()
  config.data.source = "tfds:imdb_reviews"
  config.data.train_split = "train"
  config.data.valid_fraction = 0.3   # seed 003 carves 30% of train for validation
  config.data.batch_size = 64
  config.data.max_len = 400            # 90% of IMDB reviews fit; seed 003 used full length
  config.data.buckets = (128, 256, 400)
  config.tokenizer.update(kind="word", vocab_size=25_000, min_freq=1, specials=("<unk>", "<pad>"))
  config.model.update(name="lstm_classifier", embed_dim=100, hidden_size=256, num_layers=1,
                      pooling="last", loss="bce", dropout_embed=0.0, dropout_hidden=0.0,
                      dropout_output=0.0)
  config.optim.update(name="adam", learning_rate=1e-3, schedule="constant", grad_clip=0.0)
  config.train.update(num_epochs=10, log_every_steps=50)
  return config
