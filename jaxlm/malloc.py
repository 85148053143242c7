"""Process-wide glibc malloc settings for training on CPU: one arena, no mmap, no trim.

Why: a CPU train step frees and reallocates the same large buffers every step. By default glibc
returns them to the OS (mmapped blocks, trimmed per-thread arenas), so the next step page-faults
them in again (BENCHMARKS.md, 2026-11-30, 2 cores AMD EPYC): an IMDB LM step (configs/imdb_lm.py
shapes) took 82-88k minor page faults and 567-586 ms with glibc's defaults, 0 faults and 487-524
ms with these settings. It is the same as starting Python with `MALLOC_ARENA_MAX=1
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>`, but it must happen before the threads that
allocate exist, so the `jaxlm` CLI calls `tune()` first thing, before jax starts.

The cost is memory: nothing freed goes back to the OS, and the heap's peak grows (the first 200
steps of the IMDB LM plus its test pass peaked at 7.7 GB resident instead of 2.3 GB).
`JAXLM_MALLOC=default` leaves the allocator alone. Not glibc (macOS, musl): nothing to do.
"""
import ctypes
import ctypes.util
import os

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def tune() -> bool:
  """Applies the settings; True if they are in effect."""
  if os.environ.get("JAXLM_MALLOC", "tuned") == "default":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
  return all(mallopt(option, value) == 1 for option, value in settings)
