"""jaxlm: pretrain an LSTM LM, graft it into a classifier, fine-tune, evaluate.

The Python API (jaxlm/api.py), for notebooks and scripts: `get_config`, `pretrain`, `finetune`,
`compare`, `evaluate`, `quickstart` return what the CLI commands print; `load(workdir)` gives a
run's model, params, tokenizer and config with `predict(texts)`; `inspect` and `diff` the parameter
trees. They are imported on first use, so `import jaxlm` (and the CLI's `--help`) stays fast.
"""

__version__ = "0.1.0"

_API = ("get_config", "apply_overrides", "pretrain", "finetune", "compare", "evaluate",
        "quickstart", "load", "Run", "format_quickstart", "format_compare", "inspect", "diff",
        "format_inspection")
__all__ = list(_API)


def __getattr__(name: str):
  if name == "compare":  # also a submodule: the module is callable as the API function
    import importlib
    return importlib.import_module("jaxlm.compare")
  if name in _API:
    from jaxlm import api
    return getattr(api, name)
  raise AttributeError(f"module 'jaxlm' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_API))
