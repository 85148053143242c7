"""ULMFiT's classifier on IMDB: `imdb_sentiment_net.py` with concat pooling and an MLP head.

    jaxlm finetune --config configs/imdb_ulmfit.py --init-from runs/imdb_lm \
        --workdir runs/imdb_ulmfit --config.data.source=jsonl:../shared/data/imdb

Same graft, tokenizer, strategy (gradual unfreezing, discriminative rates / 2.6 per group, slanted
triangular schedule) and budget as SentimentNet; only the pooling ([last, max, mean] over valid
steps, Howard & Ruder 2018) and the 50-unit hidden layer of the head differ, so the two runs
compare pooling heads on the same LM.
"""
from jaxlm.config import CONFIG_DIR, load_config_file


def get_config():
  config = load_config_file(CONFIG_DIR / "imdb_sentiment_net.py")
  config.model.update(pooling="concat", head_hidden=50)
  return config
