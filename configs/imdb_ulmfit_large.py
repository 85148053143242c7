"""ULMFiT's classifier (`configs/imdb_ulmfit.py`'s recipe) at the size of `configs/imdb_lm_large.py`.

    jaxlm finetune --config configs/imdb_ulmfit_large.py --init-from runs/lm_large \
        --workdir runs/ulmfit_large --config.data.source=tfds:imdb_reviews
    # the backward model: --init-from runs/lm_large_bwd --config.data.reverse=True; then
    # jaxlm evaluate --workdir runs/ulmfit_large,runs/ulmfit_large_bwd

The sizes must match the LM's (the graft checks them); everything else is the recipe measured on
CPU in RESULTS.md, with ULMFiT's stronger dropouts for the wider encoder.
"""
from jaxlm import config as config_lib


def get_config():
  config = config_lib.get_config("imdb_ulmfit")
  config.tokenizer.vocab_size = 30_000
  config.model.update(embed_dim=400, hidden_size=1152, num_layers=3, weight_drop=0.5,
                      dropout_embed=0.1, dropout_hidden=0.3, dropout_output=0.4)
  return config
