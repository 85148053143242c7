"""jaxlm: pretrain an LSTM LM, graft it into a classifier, fine-tune, evaluate."""

__version__ = "0.1.0"
