import os
import sys
import tempfile
from pathlib import Path

import pytest

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


def _release_compiled_programs() -> None:
    """Drop the compiled programs nothing needs any more: JAX's caches, the engines no test
    holds (their runners' executables; engines can sit in reference cycles until a full
    collection), runner.SHARED_EXECUTABLES."""
    import gc

    import jax

    from qoq_jax.runner import SHARED_EXECUTABLES

    SHARED_EXECUTABLES.clear()
    jax.clear_caches()
    gc.collect()


def _mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return f.read().count(b"\n")
    except OSError:  # not Linux
        return 0


# Every XLA:CPU executable keeps memory mappings of its JIT code (a default engine's 10
# programs: ~4,700), and a process may have 65,530 (vm.max_map_count); at the limit XLA's LLVM
# JIT fails ("Cannot allocate memory", reproduced by filling the mappings first). Workers that
# kept what they compiled reached 41,000 mappings in one group of test files (2026-12-07), and
# workers died inside XLA late in long runs (2026-12-03/04/07). So compiled programs are
# released after every test module, and after any test that leaves more than this many.
MAPPINGS_HIGH = 30_000


@pytest.fixture(autouse=True, scope="module")
def _release_after_each_module():
    yield
    _release_compiled_programs()


@pytest.fixture(autouse=True)
def _release_when_mappings_run_high():
    yield
    if _mappings() > MAPPINGS_HIGH:
        _release_compiled_programs()
