"""ULMFiT's classifier recipe on IMDB (Howard & Ruder 2018), grafted from `configs/imdb_lm.py`.

    jaxlm finetune --config configs/imdb_ulmfit.py --init-from runs/imdb_lm \
        --workdir runs/imdb_ulmfit --config.data.source=jsonl:../shared/data/imdb

SentimentNet's data, model sizes and graft, with ULMFiT's choices: concat pooling ([last, max,
mean] over valid steps) into a 50-unit hidden layer, gradual unfreezing (epoch 1 the head, then one
more layer group per epoch from the top), discriminative rates (each group 1/2.6 of the one above)
and the slanted triangular schedule over the whole run.
"""
from jaxlm.config import CONFIG_DIR, load_config_file


def get_config():
  config = load_config_file(CONFIG_DIR / "imdb_sentiment_net.py")
  config.model.update(pooling="concat", head_hidden=50)
  config.optim.update(learning_rate=4e-3, schedule="stlr", grad_clip=1.0)
  config.train.update(num_epochs=4)  # head, +layer_1, +layer_0, +embed
  config.finetune.update(strategy="gradual", discriminative_decay=2.6)
  return config
