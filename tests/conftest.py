"""Test-wide setup: simulate several CPU devices so multi-device code paths run without accelerators.

The flag must be set before jax is imported anywhere; single-device code still runs on device 0.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def pytest_configure(config):
  """A session-local persistent compilation cache: the CLI and loop tests build fresh jitted
  closures for identical tiny models, so jit's in-memory cache never hits, but their HLO is the same;
  this turns those repeated compiles (most of those tests' time) into cache reads. Nothing outlives
  the session."""
  import tempfile

  import jax
  jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="jaxlm-test-xla-"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
