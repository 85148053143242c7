"""The IMDB LM at ULMFiT's size, for a GPU or TPU: AWD-LSTM's widths and dropouts, 10 epochs.

    jaxlm pretrain --config configs/imdb_lm_large.py --workdir runs/lm_large \
        --config.data.source=tfds:imdb_reviews
    jaxlm pretrain --config configs/imdb_lm_large.py --workdir runs/lm_large_bwd \
        --config.data.source=tfds:imdb_reviews --config.data.reverse=True

`configs/imdb_lm.py` (embedding 256, 2 x 256 LSTM) is sized for 2 CPU cores; this is the model
the published IMDB results use (Merity et al.'s AWD-LSTM as in ULMFiT: embedding 400, 3 layers
of 1,150 units, rounded here to 1,152; SA-LSTM's single layer has 1,024), trained on train +
unsup only, the test reviews never seen. RESULTS.md ("IMDB: ULMFiT") gives its measured step
time on CPU and why this is a GPU/TPU config. Fine-tune it with `configs/imdb_ulmfit_large.py`.
"""
from jaxlm import config as config_lib


def get_config():
  config = config_lib.get_config("imdb_lm")
  config.tokenizer.vocab_size = 30_000   # ULMFiT keeps up to 60k words seen >= 3 times
  config.model.update(embed_dim=400, hidden_size=1152, num_layers=3, dropout_embed=0.1,
                      dropout_hidden=0.3, dropout_output=0.4, dropout_words=0.05,
                      weight_drop=0.5, variational=True, output="sampled", num_sampled=2048)
  config.optim.update(learning_rate=2e-3, schedule="cosine", warmup_steps=500, grad_clip=0.25)
  config.train.update(num_epochs=10, max_steps=0, eval_every_steps=2_000,
                      checkpoint_every_steps=1_000)
  return config
