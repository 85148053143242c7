"""Parameter trees as flat `'a/b/c'` paths: the one naming shared by graft, strategies and inspect.

Grafting, freezing and `jaxlm inspect` all talk about parameters by path (`encoder/layer_0/ih/kernel`),
so the path convention lives here once. Paths join the nested dict keys with `/`. `None` is an empty
subtree to jax, so the halves of a `strategies.split_params` flatten to exactly the leaves they hold.
"""
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

SEP = "/"


def path_str(keypath) -> str:
  """jax key path -> `'a/b/c'` (dict keys, attribute names and sequence indices alike)."""
  parts = []
  for key in keypath:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return SEP.join(parts)


def flatten(params) -> dict[str, Any]:
  """Nested dict (or FrozenDict) of arrays -> `{'a/b/c': array}`, in jax's leaf order."""
  return {path_str(kp): leaf for kp, leaf in jax.tree_util.tree_leaves_with_path(params)}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten`: `{'a/b/c': x}` -> `{'a': {'b': {'c': x}}}` (plain dicts)."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split(SEP)
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def map_with_path(fn, params):
  """`fn(path, leaf)` over every leaf, keeping `params`' containers (masks and labels match it)."""
  return jax.tree_util.tree_map_with_path(lambda kp, leaf: fn(path_str(kp), leaf), params)


def count_params(params: Mapping[str, Any]) -> int:
  """Total number of scalars (what PyTorch users compare as `sum(p.numel() ...)`)."""
  return int(sum(int(np.prod(np.shape(leaf))) for leaf in flatten(params).values()))


class ParamRow(NamedTuple):
  path: str
  shape: tuple[int, ...]
  dtype: str
  count: int


def param_table(params: Mapping[str, Any]) -> list[ParamRow]:
  """One row per leaf: path, shape, dtype, count (for `jaxlm inspect` and graft reports)."""
  return [ParamRow(path, shape_of(leaf), dtype_of(leaf), int(np.prod(shape_of(leaf))))
          for path, leaf in flatten(params).items()]


def shape_of(leaf) -> tuple[int, ...]:
  return tuple(int(d) for d in np.shape(leaf))


def dtype_of(leaf) -> str:
  """dtype name without converting the leaf (jax arrays, numpy arrays, ShapeDtypeStructs)."""
  return str(leaf.dtype) if hasattr(leaf, "dtype") else str(np.asarray(leaf).dtype)


def format_table(rows: list[ParamRow]) -> str:
  """Aligned text table of `param_table` rows with a total line."""
  header = ("path", "shape", "dtype", "count")
  body = [(r.path, str(r.shape), r.dtype, f"{r.count:,}") for r in rows]
  total = ("total", "", "", f"{sum(r.count for r in rows):,}")
  widths = [max(len(row[i]) for row in [header, *body, total]) for i in range(4)]

  def fmt(row):
    cells = (cell.rjust(w) if i == 3 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
    return "  ".join(cells).rstrip()

  rule = "-" * len(fmt(header))
  return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(total)])
