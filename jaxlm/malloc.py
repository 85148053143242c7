"""Process-wide glibc malloc settings for training on CPU: one arena, no mmap, no trim.

Why: a CPU train step frees and reallocates the same large buffers every step. By default glibc
returns them to the OS (mmapped blocks, trimmed per-thread arenas), so the next step page-faults
them in again (BENCHMARKS.md, 2026-11-30, 2 cores AMD EPYC): an IMDB LM step (configs/imdb_lm.py
shapes) took 82-88k minor page faults and 567-586 ms with glibc's defaults, 0 faults and 487-524
ms with these settings. It is the same as starting Python with `MALLOC_ARENA_MAX=1
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>`, but it must happen before the threads that
allocate exist, so the `jaxlm` CLI calls `tune()` first thing, before jax starts.

The cost is memory: nothing freed goes back to the OS, so a process keeps its peak. That peak was
the exact evaluation softmax's [B, T, V] logits (the IMDB LM's first 200 steps plus its test pass:
7.7 GB resident, 2.3 GB with glibc's defaults); evaluation now computes them in 16 MB chunks
(jaxlm/models/lm.py), and a 60-step IMDB LM run with evaluations and its test pass peaks at 2.0-2.3
GB with these settings, 1.6-1.7 GB without (BENCHMARKS.md, 2026-12-01). A model whose train step itself
needs large buffers keeps them (a full-softmax step over 20k words: 1.5 GB of temporaries).

Why not mmap only the large blocks (`M_MMAP_THRESHOLD`, e.g. 64 MB), so one-off buffers go back:
XLA:CPU allocates a step's temporaries as one block (318 MB for the IMDB LM's train step), so
every step's block is over such a threshold and is mapped and faulted in anew; measured (that
run, 64 MB): 5.0 M minor faults instead of 0.45-0.53 M, the lowest steps/s of the runs, and the
peak of glibc's defaults. `JAXLM_MALLOC=default` leaves the allocator alone (0.3-0.6 GB less at
the peak, for 11-13x the page faults). Not glibc (macOS, musl): nothing to do.
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
