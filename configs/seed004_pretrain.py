"""Seed 004, step 1: a transformer encoder classifier pretrained as a topic classifier on a
general-domain corpus (AG News: 4 topics), with a SentencePiece vocabulary trained on that corpus.

    jaxlm pretrain --config configs/seed004_pretrain.py --workdir runs/seed004_pretrain

The default source is `tfds:ag_news_subset` (120,000 train / 7,600 test records). 20 Newsgroups
(20 topics) works the same way from JSON lines:

    jaxlm pretrain --config configs/seed004_pretrain.py --workdir runs/seed004_20ng \
        --config.data.source=jsonl:PATH/20newsgroups --config.model.num_classes=20

The tokenizer is trained on the pretraining text only: the classifier it is grafted into
(configs/seed004_imdb.py) reads IMDB with the same pieces, as seed 004 transfers a general-domain
model to a new domain (sub-word pieces cover words the topic corpus never used).
"""
from jaxlm.config import classifier_config


def get_config():
  config = classifier_config("transformer_classifier")
  config.data.source = "tfds:ag_news_subset"
  config.data.train_split = "train"
  config.data.valid_fraction = 0.05
  config.data.batch_size = 32
  config.data.eval_batch_size = 64
  config.data.max_len = 256
  config.data.buckets = (64, 128, 256)
  config.tokenizer.update(kind="sentencepiece", vocab_size=16_000, model_type="unigram",
                          lowercase=True)
  config.model.update(d_model=128, num_heads=4, num_layers=2, ffn_dim=512, max_len=512,
                      dropout=0.1, positional="sinusoidal", norm="pre", pooling="mean",
                      loss="softmax", num_classes=4)
  config.optim.update(name="adamw", learning_rate=1e-3, schedule="cosine", warmup_steps=200,
                      weight_decay=0.01, grad_clip=1.0)
  config.train.update(num_epochs=10, log_every_steps=50)
  config.finetune.update(strategy="full", select_metric="accuracy")
  return config
