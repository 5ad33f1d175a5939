import os
import sys
import tempfile
from pathlib import Path

# Tests run on CPU (CI and the development machines have no GPU). A GPU run sets it itself.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

# One on-disk compilation cache for the subprocesses the tests start (CLIs, the server, the
# notebook's kernel, the multi-device suite): each loads the programs another one compiled.
# Cached executables are keyed by the program, the options and the jax version, so they never
# change a result; the engine counts a load from the cache as a compile all the same.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(tempfile.gettempdir()) / f"qoq-jax-tests-xla-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# A size limit turns on JAX's file lock around every read and write of the cache (without it an
# entry is written in place, and a process could read half of one).
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(32 << 30))



def pytest_configure(config):
    """The pytest workers themselves do not use the on-disk cache (the subprocesses keep it):
    XLA:CPU aborted workers while serializing an executable for it (three CI and clean-clone
    runs, late in long workers; scripts/run_tests.sh also runs the suite in groups of fresh
    workers for the same reason)."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
