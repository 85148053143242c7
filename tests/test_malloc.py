"""jaxlm.malloc.tune(): freed large buffers are reused instead of page-faulted in again.

In a subprocess, because the settings are process-wide and must precede the threads that allocate.
"""
import os
import subprocess
import sys

SCRIPT = """
import ctypes, resource
from jaxlm import malloc
tuned = malloc.tune()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20                              # a 64 MB buffer, as a train step frees and reallocates

def use_once():                           # malloc + write + free, no madvise (numpy would ask
  p = libc.malloc(n)                      # for huge pages and hide the faults)
  ctypes.memset(p, 1, n)
  libc.free(p)

use_once()                                # first touch: faults either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  use_once()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

def _faults(setting):
  env = dict(os.environ, JAXLM_MALLOC=setting)
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  return out[0] == "True", int(out[1])


def test_tuned_allocator_reuses_freed_buffers():
  tuned, faults = _faults("tuned")
  assert tuned
  assert faults < 1_000  # 5 x 16,384 pages would be 81,920


def test_default_allocator_is_left_alone_and_faults():
  tuned, faults = _faults("default")
  assert not tuned
  assert faults > 50_000
