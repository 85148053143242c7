"""The CPU LSTM recurrence kernel (`lstm_cpu.cc`): built on first use, registered with XLA FFI.

Why a kernel: on XLA:CPU a scanned LSTM step is a chain of small separately-run operations, and at
language-model shapes that per-operation cost made jaxlm's train step slower than PyTorch's (whose
CPU LSTM is a library kernel). `lstm_cpu.cc` runs each step as one BLAS sgemm (OpenBLAS from the
`scipy-openblas32` wheel) over the rows still inside their length (so padding costs nothing, as
with PyTorch's packed sequences) and one vectorised gate pass. It is used only on CPU, for float32:
`jaxlm.models.lstm` selects it with `lax.platform_dependent`, so the same jitted function runs the
XLA scan on GPU and TPU.

Sharding: XLA cannot split a custom call, so under a multi-device CPU mesh (data parallelism over
simulated or real CPU devices) each device runs the call on the whole gathered batch: correct
(tested), but that part of the step does not get faster with more CPU devices.

Build: `g++` compiles the source into `$JAXLM_CACHE_DIR` (default `~/.cache/jaxlm`), keyed by a hash
of the source, the jax version and the CPU, so a rebuild happens only when one of them changes
(~3 s). Set `JAXLM_LSTM_KERNEL=0` to use the XLA scan on CPU too. If the build fails, jaxlm warns
once, names the compiler's error, and falls back to the XLA scan: slower, same numbers.
"""
import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("lstm_cpu.cc")
_TARGETS = {"forward_train": "JaxlmLstmForwardTrain", "forward_infer": "JaxlmLstmForwardInfer",
            "backward": "JaxlmLstmBackward"}
_PREFIX = "jaxlm_lstm_"


def _cpu_model() -> str:
  """The CPU's model and feature flags: the build uses -march=native, so a cache shared between
  machines (a network home directory) must not hand one CPU's library to another."""
  try:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.machine() + platform.processor()
  wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
  return "\n".join(dict.fromkeys(wanted))  # first of each: every core repeats them


def _build_command(out: Path):
  import scipy_openblas32 as blas  # the BLAS the kernel links; a declared dependency
  flags = ["-std=c++17", "-O3", "-march=native", "-fPIC", "-fopenmp-simd",
           # -ffast-math only to compile (it lets gcc call libmvec's vector tanh); linking
           # with it would pull in crtfastmath, which flushes denormals process-wide.
           "-ffast-math"]
  obj = out.with_suffix(".o")
  compile_cmd = ["g++", *flags, f"-I{blas.get_include_dir()}", f"-I{jax.ffi.include_dir()}",
                 "-c", str(SOURCE), "-o", str(obj)]
  link_cmd = ["g++", "-shared", str(obj), "-o", str(out), f"-L{blas.get_lib_dir()}",
              f"-l{blas.get_library()}", f"-Wl,-rpath,{blas.get_lib_dir()}", "-lmvec", "-lm"]
  return compile_cmd, link_cmd


def _library_path() -> Path:
  key = hashlib.sha256()
  key.update(SOURCE.read_bytes())
  key.update(jax.__version__.encode())
  key.update(_cpu_model().encode())
  cache = Path(os.environ.get("JAXLM_CACHE_DIR", Path.home() / ".cache" / "jaxlm"))
  return cache / "kernels" / f"lstm_cpu-{key.hexdigest()[:16]}.so"


def _build(out: Path) -> None:
  """Compiles into a temporary directory beside `out`, then renames: never a half-written .so."""
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    tmp_out = Path(tmp) / out.name
    for cmd in _build_command(tmp_out):
      proc = subprocess.run(cmd, capture_output=True, text=True)
      if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} ... failed:\n{proc.stderr.strip()[-2000:]}")
    os.replace(tmp_out, out)


_registered = []  # the loaded library, once per process: XLA keeps the handlers by name


def _register(path: Path) -> None:
  if _registered:
    return
  lib = ctypes.cdll.LoadLibrary(str(path))
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(_PREFIX + name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform="cpu")
  _registered.append(lib)


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """Builds (once per machine) and registers the kernel; False if disabled or it cannot build."""
  if os.environ.get("JAXLM_LSTM_KERNEL", "1") == "0":
    return False
  try:
    path = _library_path()
    if not path.exists():
      _build(path)
    _register(path)
  except Exception as e:  # noqa: BLE001 - any failure means: use the XLA scan instead
    warnings.warn(f"jaxlm: the CPU LSTM kernel is unavailable, using the XLA scan instead "
                  f"(slower, same results). Cause: {e}", RuntimeWarning, stacklevel=2)
    return False
  return True


def _f32(shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def forward(xz, mask, w_hh, c0, h0, *, reverse: bool, save_residuals: bool):
  """`(ys, c, h)`, plus `(h_prev, c_prev, acts, tc)` with `save_residuals` (see lstm_cpu.cc).

  `mask` is a float32 `[T, B]` (1 on valid steps).
  """
  T, B, G = xz.shape
  H = G // 4
  outs = [_f32((T, B, H)), _f32((B, H)), _f32((B, H))]
  if save_residuals:
    outs += [_f32((T, B, H)), _f32((T, B, H)), _f32((T, B, G)), _f32((T, B, H))]
  name = _PREFIX + ("forward_train" if save_residuals else "forward_infer")
  return jax.ffi.ffi_call(name, tuple(outs), vmap_method="sequential")(
      xz, mask, w_hh, c0, h0, reverse=np.int64(reverse))


def backward(w_hh, mask, c_prev, acts, tcs, dys, dc_last, dh_last, *, reverse: bool):
  """`(dz [T,B,4H], dc0, dh0)`: the gradients of the gate pre-activations and initial state."""
  T, B, G = acts.shape
  H = G // 4
  outs = (_f32((T, B, G)), _f32((B, H)), _f32((B, H)))
  return jax.ffi.ffi_call(_PREFIX + "backward", outs, vmap_method="sequential")(
      w_hh, mask, c_prev, acts, tcs, dys, dc_last, dh_last, reverse=np.int64(reverse))
