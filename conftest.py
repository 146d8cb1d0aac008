"""Root pytest configuration (applies to tests/ and to the doctests in mmjax/).

Eight virtual CPU devices, set before jax is imported anywhere, so multi-device code is tested on any machine.

One persistent XLA compilation cache per test session, shared by the xdist workers and by the processes the tests
start (notebook kernels, CLI runs, multi-host workers inherit the environment): many tests compile the same programs
(the same tiny configs in several tests, float32 and float64 twins), and a cache hit skips XLA's compilation. The
directory is made here, in the session's first process, before the workers start, and removed at the end. A cache
entry is keyed by the program, the compile options, the XLA flags and the jax/jaxlib versions, so a hit runs the
executable a fresh compilation would have produced. Set ``JAX_COMPILATION_CACHE_DIR`` to use another directory (it is
then kept), or to ``""`` to compile everything afresh.
"""

import importlib.util
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MPLBACKEND", "Agg")

_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="mmjax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    if importlib.util.find_spec("filelock") is not None:
        # a size bound turns on jax's file lock, so a worker never reads an entry another is still writing
        os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))


def pytest_unconfigure(config):
    if _OWN_CACHE is not None and not hasattr(config, "workerinput"):  # the session's first process made it
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
