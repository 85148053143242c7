"""ULMFiT's classifier on IMDB, grafted from `configs/imdb_lm.py`'s LM (Howard & Ruder 2018).

    jaxlm finetune --config configs/imdb_ulmfit.py --init-from runs/imdb_lm \
        --workdir runs/imdb_ulmfit --config.data.source=jsonl:PATH/imdb

A backward model is the same with `--config.data.reverse=True`, grafted from an LM pretrained with
it; `jaxlm evaluate --workdir FWD,BWD` scores the pair's averaged probabilities.

The recipe, piece by piece (RESULTS.md measures each):
  * the LM's embedding and 2-layer LSTM, AWD-LSTM dropouts (variational, DropConnect on W_hh);
  * concat pooling [last, max, mean] over the valid steps of the whole review;
  * the head ULMFiT builds: BatchNorm -> dropout -> Dense(50) -> ReLU -> BatchNorm -> dropout ->
    Dense(1), its batch statistics in the train state (filler rows of a partial batch excluded);
  * gradual unfreezing (head; + top LSTM layer; + bottom layer; + embedding), discriminative
    rates (each group below the top at lr / 2.6^depth), a slanted triangular schedule that starts
    again at every unfreezing (`optim.schedule_per_phase`), as ULMFiT fits each stage on its own;
  * reviews read whole up to 1,024 tokens (98.9% of the IMDB train reviews; mean 270), longer
    ones keep their first quarter and last three quarters (`data.truncate=head_tail`), in place
    of ULMFiT's BPT3C windows: the LSTM runs over the full sequence on one device either way.
Model sizes must match the LM's (the graft checks them and names any mismatch).
"""
from jaxlm.config import classifier_config


def get_config():
  config = classifier_config("lstm_classifier")
  config.data.source = "tfds:imdb_reviews"
  config.data.train_split = "train"
  config.data.valid_fraction = 0.1
  config.data.batch_size = 32
  config.data.eval_batch_size = 64
  config.data.max_len = 1024
  config.data.truncate = "head_tail"
  config.data.buckets = (128, 256, 512, 1024)
  config.tokenizer.vocab_size = 20_000   # the LM's tokenizer is reused; these only document it
  config.tokenizer.min_freq = 3
  config.model.update(embed_dim=256, hidden_size=256, num_layers=2, pooling="concat",
                      loss="bce", variational=True, weight_drop=0.2, dropout_embed=0.1,
                      dropout_hidden=0.2, dropout_output=0.2, head_hidden=50, head_batchnorm=True,
                      head_dropout=0.1)
  config.optim.update(name="adam", learning_rate=4e-3, schedule="stlr", schedule_per_phase=True,
                      grad_clip=1.0, b1=0.8, b2=0.99)
  config.train.update(num_epochs=5, log_every_steps=50)
  config.finetune.update(strategy="gradual", discriminative_decay=2.6, select_metric="accuracy")
  return config
