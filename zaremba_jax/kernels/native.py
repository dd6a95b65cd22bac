"""Products on the CPU where XLA's are slow, for the recurrence's steps: bfloat16 products that read
the weights as bfloat16, and float32 products of one or a few rows.

XLA's CPU backend has no bfloat16 matrix-vector product: it converts bfloat16 weights to float32
and runs a float32 one, so a batch-1 step in bfloat16 reads W_hh's float32 bytes, no fewer than in
float32; and its products of a few rows (an evaluation step's [20, H] x [H, 4H]) run at a third of
this CPU's rate in bfloat16, half in float32 (docs/performance.md). The products in
`native_products.cc`, called through XLA's FFI, run with AVX-512 (bfloat16: AVX512-BF16, reading the
bfloat16 bytes) on XLA's intra-op threads:

  matvec(w_NxK, h_K) = W h      vecmat(h_K, w_KxN) = h W      matmul(h_BxK, pairs(w_KxN)) = h W
  matvec_f32(w_NxK, h_K) = W h   matmul_f32(h_BxK, w_KxN) = h W

In bfloat16 h is rounded to bfloat16 and the products and sums are float32: XLA's bfloat16 dot's
numbers up to the order of the sums, as the float32 products' are XLA's float32 dot's.

Two steps, so that planning never builds anything: `offers()` says, without building, which
precisions' products the library would offer here (Linux on x86-64, a C++ compiler, the CPU
features of each precision's kernels: float32 AVX-512F, bfloat16 also avx512_bf16; none with
ZAREMBA_JAX_NATIVE=0), and `load()`, called only for a plan that uses them, compiles the library
with the system's C++ compiler (a few seconds, once) into a cache folder keyed by the source and
the jax version ($ZAREMBA_JAX_CACHE, else ~/.cache/zaremba_jax) and registers the kernels of the
offered precisions; it returns why that failed, or None. `reset()` forgets what this process
loaded, so that the next `load()` looks at the environment again.
"""

import ctypes
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

from absl import logging
import jax
import jax.numpy as jnp

SOURCE = pathlib.Path(__file__).with_name("native_products.cc")
# The whole file is built for what the float32 kernels need; the bfloat16 ones are compiled for
# their instructions function by function (native_products.cc).
FLAGS = ("-O3", "-DNDEBUG", "-std=c++17", "-shared", "-fPIC", "-mavx512f")
# The CPU features (as /proc/cpuinfo names them) each precision's kernels run on.
CPU_FEATURES = {"float32": ("avx512f",),
                "bfloat16": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")}


def _cpu_features() -> frozenset[str]:
  try:
    cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return frozenset()
  flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
  return frozenset(flags.split())


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def missing(precision: str) -> str | None:
  """Why the library would not offer `precision`'s products here, or None; builds nothing."""
  if os.environ.get("ZAREMBA_JAX_NATIVE", "1") == "0":
    return "ZAREMBA_JAX_NATIVE=0"
  if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
    return f"{platform.system()} on {platform.machine()}, not Linux on x86-64"
  absent = [name for name in CPU_FEATURES[precision] if name not in _cpu_features()]
  if absent:
    return f"this CPU has no {', '.join(absent)}"
  if _compiler() is None:
    return "no C++ compiler (g++, c++ or clang++; or set CXX)"
  return None


def offers() -> frozenset[str]:
  """The precisions ("float32", "bfloat16") whose products the library would offer here, decided
  without building it (`load` builds it)."""
  return frozenset(precision for precision in CPU_FEATURES if missing(precision) is None)


def _cache_folder() -> pathlib.Path:
  root = os.environ.get("ZAREMBA_JAX_CACHE") or pathlib.Path.home() / ".cache" / "zaremba_jax"
  key = hashlib.sha256(SOURCE.read_bytes() + jax.__version__.encode()
                       + " ".join(FLAGS).encode()).hexdigest()[:16]
  return pathlib.Path(root) / f"native-{key}"


def _build(compiler: str) -> pathlib.Path:
  """The compiled library, from the cache or compiled now (into a temporary name, then renamed,
  so that processes building at once never load a half-written file)."""
  folder = _cache_folder()
  library = folder / "libzaremba_native_products.so"
  if library.exists():
    return library
  folder.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=folder, suffix=".so", delete=False) as out:
    partial = pathlib.Path(out.name)
  try:
    command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(partial)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    if result.returncode != 0:
      raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    os.replace(partial, library)
  finally:
    partial.unlink(missing_ok=True)
  return library


def _register(library_path: pathlib.Path, precisions: frozenset[str]) -> dict[str, str]:
  """Registers the library's kernels (as its `zaremba_kernels()` lists them) of these precisions;
  returns {target: precision} of every kernel it lists."""
  library = ctypes.cdll.LoadLibrary(str(library_path))
  library.zaremba_kernels.restype = ctypes.c_char_p
  listed = dict(line.split() for line in library.zaremba_kernels().decode().splitlines())
  for target, precision in listed.items():
    if precision in precisions:
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)),
                                  platform="cpu")
  return listed


_loaded = {}  # this process's `load()` once it has run: why not (or None), what it registered


def load() -> str | None:
  """Builds the library (or finds it in the cache) and registers its kernels of the precisions
  `offers()` gives, once per process; returns why they cannot run here, or None when they can."""
  if not _loaded:
    precisions = offers()
    reason, listed = (None if precisions else missing("float32")), {}
    if precisions:
      try:
        listed = _register(_build(_compiler()), precisions)
      except (OSError, RuntimeError, AttributeError, ValueError,
              subprocess.SubprocessError) as error:
        logging.warning("the recurrence keeps XLA's slower products: the native kernels did "
                        "not build (%s)", error)
        reason = f"the build failed: {error}"
    _loaded.update(reason=reason, precisions=precisions, listed=listed)
  return _loaded["reason"]


def reset():
  """Forgets this process's `load()` (what it registered stays registered with XLA), so that the
  next one looks at the environment, the CPU and the cache folder again."""
  _loaded.clear()


def _call(target, shape, *args):
  reason = load()  # registers the targets on first use
  precision = _loaded["listed"].get(target)
  if reason is None and precision not in _loaded["precisions"]:
    reason = missing(precision) if precision else f"the library has no {target}"
  if reason is not None:
    raise RuntimeError(f"the native products cannot run here: {reason}; use a plan without them")
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")(*args)


def _dot(a, b):  # XLA's bfloat16 product with float32 sums, for the gradients
  return jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                 preferred_element_type=jnp.float32)


@jax.custom_vjp
def matvec(w_NxK, h_K):
  """W h in float32 from a bfloat16 W [N, K] and a float32 h [K]."""
  return _call("zaremba_bf16_matvec", w_NxK.shape[:1], w_NxK.astype(jnp.bfloat16),
               h_K.astype(jnp.float32))


@jax.custom_vjp
def vecmat(h_K, w_KxN):
  """h W in float32 from a float32 h [K] and a bfloat16 W [K, N]."""
  return _call("zaremba_bf16_vecmat", w_KxN.shape[1:], h_K.astype(jnp.float32),
               w_KxN.astype(jnp.bfloat16))


# The kernels run forward only; a gradient through them (a batch-1 bfloat16 training window)
# is XLA's, in bfloat16 products as training's.
matvec.defvjp(lambda w, h: (matvec(w, h), (w, h)),
              lambda res, dy: (jnp.outer(dy, res[1]).astype(res[0].dtype),
                               _dot(dy, res[0]).astype(res[1].dtype)))
vecmat.defvjp(lambda h, w: (vecmat(h, w), (h, w)),
              lambda res, dy: (_dot(res[1], dy).astype(res[0].dtype),
                               jnp.outer(res[0], dy).astype(res[1].dtype)))


def pairs(w_KxN):
  """W [K, N] as the row pairs `matmul` reads, [ceil(K/2), N, 2] bfloat16: element [p, n] holds
  W[2p, n] and W[2p + 1, n] (a zero row pads an odd K). Made once per call, outside the loop."""
  k, n = w_KxN.shape
  w = jnp.pad(w_KxN.astype(jnp.bfloat16), ((0, k % 2), (0, 0)))
  return w.reshape(-1, 2, n).transpose(0, 2, 1)


def _unpair(pairs_PxNx2, k):
  return pairs_PxNx2.transpose(0, 2, 1).reshape(-1, pairs_PxNx2.shape[1])[:k]


@jax.custom_vjp
def matmul(h_BxK, pairs_PxNx2):
  """h W in float32 from a float32 h [B, K] and W as `pairs(W)`."""
  return _call("zaremba_bf16_matmul", (h_BxK.shape[0], pairs_PxNx2.shape[1]),
               h_BxK.astype(jnp.float32), pairs_PxNx2.astype(jnp.bfloat16))


def _matmul_bwd(res, dy_BxN):
  h_BxK, pairs_PxNx2 = res
  w_KxN = _unpair(pairs_PxNx2, h_BxK.shape[1])
  dw_KxN = _dot(h_BxK.T, dy_BxN)
  return (_dot(dy_BxN, w_KxN.T).astype(h_BxK.dtype),
          pairs(dw_KxN).astype(pairs_PxNx2.dtype))


matmul.defvjp(lambda h, p: (matmul(h, p), (h, p)), _matmul_bwd)


@jax.custom_vjp
def matmul_f32(h_BxK, w_KxN):
  """h W in float32 (a few rows of h: an evaluation step's)."""
  return _call("zaremba_f32_matmul", (h_BxK.shape[0], w_KxN.shape[1]),
               h_BxK.astype(jnp.float32), w_KxN.astype(jnp.float32))


matmul_f32.defvjp(lambda h, w: (matmul_f32(h, w), (h, w)),
                  lambda res, dy: (dy @ res[1].T, res[0].T @ dy))


@jax.custom_vjp
def matvec_f32(w_NxK, h_K):
  """W h in float32."""
  return _call("zaremba_f32_matvec", w_NxK.shape[:1], w_NxK.astype(jnp.float32),
               h_K.astype(jnp.float32))


matvec_f32.defvjp(lambda w, h: (matvec_f32(w, h), (w, h)),
                  lambda res, dy: (jnp.outer(dy, res[1]), dy @ res[0]))
