"""Test-wide setup: simulate several CPU devices so multi-device code paths run without accelerators.

The flag must be set before jax is imported anywhere; single-device code still runs on device 0.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
