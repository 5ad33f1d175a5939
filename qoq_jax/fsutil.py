"""Writing output directories safely: the one helper both converters use.

    check_output_dir(out, expected_bytes)   refuse early (before hours of quantization) an
                                            output that cannot be written: a symlink, a file in
                                            the way, a non-empty directory, a parent that is not
                                            writable, too little free space
    remove_stale_partials(out)              hidden partial directories of `out` left by a
                                            killed run (SIGKILL, power loss)
    atomic_directory(out)                   a hidden sibling `.OUT.partial-PID-XXXX` that becomes
                                            `out` only if the block succeeds; removed otherwise
    capture_stderr(), write_error(out, e)   silence what background writers print (Orbax,
                                            tensorstore) and turn a failed write into one line

Every refusal is an OutputDirError (an OSError whose text is one line that names the path).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

PARTIAL = ".partial-"


class OutputDirError(OSError):
    """An output path that cannot be written, or a write that failed (one-line message)."""

    def __init__(self, message: str, err: int | None = None):
        super().__init__(message)
        self.errno = err


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes (for an unprivileged user) on the filesystem holding `path`."""
    return shutil.disk_usage(path).free


def format_bytes(n: float) -> str:
    if n < 1 << 20:
        return f"{int(n)} bytes"
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    raise AssertionError


def _absolute(out: str | os.PathLike) -> Path:
    """Absolute path without resolving symlinks (`out` itself may be one, which we refuse)."""
    return Path(os.path.abspath(os.fspath(out)))


def _existing_ancestor(path: Path) -> Path:
    anc = path
    while not anc.exists() and not anc.is_symlink():
        anc = anc.parent
    return anc


def check_output_dir(out: str | os.PathLike, expected_bytes: int | None = None) -> Path:
    """Check that a new directory can be written at `out`; returns its absolute path.

    `out` may not exist (missing parents are created later) or be an empty directory. With
    expected_bytes, the filesystem that will hold it must have that much free space."""
    given = Path(out)
    out = _absolute(out)
    if out.is_symlink():
        raise OutputDirError(f"{given} is a symbolic link (to {os.readlink(out)}); give the "
                             f"real directory's path")
    if out.exists():
        if not out.is_dir():
            raise OutputDirError(f"{given} exists and is a file, not a directory",
                                 errno.EEXIST)
        try:
            entries = next(os.scandir(out), None)
        except OSError as e:
            raise OutputDirError(f"cannot read {given}: {e.strerror}", e.errno) from None
        if entries is not None:
            raise OutputDirError(f"{given} already exists and is not empty", errno.ENOTEMPTY)
    anc = _existing_ancestor(out.parent)
    if not anc.is_dir():
        raise OutputDirError(f"cannot create {given}: {anc} is not a directory", errno.ENOTDIR)
    try:  # a real probe: permissions, read-only mounts, root, ACLs all answer alike
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=anc)
        os.rmdir(probe)
    except OSError as e:
        raise OutputDirError(f"cannot write {given}: {anc} is not writable ({e.strerror})",
                             e.errno) from None
    if expected_bytes is not None:
        free = free_bytes(anc)
        if free < expected_bytes:
            raise OutputDirError(
                f"not enough free space for {given}: it needs about "
                f"{format_bytes(expected_bytes)}, {format_bytes(free)} free in {anc}",
                errno.ENOSPC)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def partial_dirs(out: str | os.PathLike) -> list[Path]:
    """The hidden partial directories of `out` that exist now (any process's)."""
    out = _absolute(out)
    if not out.parent.is_dir():
        return []
    prefix = f".{out.name}{PARTIAL}"
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix))


def remove_stale_partials(out: str | os.PathLike) -> list[Path]:
    """Remove partial directories of `out` whose writer is gone; returns what was removed.

    A partial directory is named `.OUT.partial-PID-XXXX`; one whose PID still runs (a
    conversion writing the same output right now) is left alone. Older names without a PID
    are stale by construction."""
    removed = []
    prefix = f".{_absolute(out).name}{PARTIAL}"
    for p in partial_dirs(out):
        m = re.match(r"(\d+)-", p.name[len(prefix):])
        if m and (int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1)))):
            continue  # being written now (by this process or another)
        _remove_tree(p)
        if not p.exists():
            removed.append(p)
    return removed


def note_stale_partials(out: str | os.PathLike, file=None) -> list[Path]:
    """remove_stale_partials, with one note per directory on stderr."""
    removed = remove_stale_partials(out)
    for p in removed:
        print(f"note: removed {p}, left by an interrupted earlier run", file=file or sys.stderr)
    return removed


@contextlib.contextmanager
def defer_sigint() -> Iterator[None]:
    """Keep Ctrl-C from interrupting clean-up (a second Ctrl-C is ignored meanwhile)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if old is None else old)


def _remove_tree(path: Path, attempts: int = 20) -> None:
    """rmtree that also wins against a writer finishing its last files meanwhile."""
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists() and not path.is_symlink():
            return
        time.sleep(0.05)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh hidden sibling directory that becomes `out` only if the block succeeds.

    On any failure (an exception, KeyboardInterrupt) the partial directory is removed, and so
    are the parent directories this call created. Whoever writes into it from other threads
    must have finished before the block exits (see checkpoint.save)."""
    out = check_output_dir(out)
    created = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    tmp = None
    try:
        for d in reversed(created):
            d.mkdir()
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL}{os.getpid()}-",
                                    dir=out.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked above), or rmdir fails and nothing is lost
        os.replace(tmp, out)
    except BaseException:
        with defer_sigint():
            if tmp is not None:
                _remove_tree(tmp)
            for d in created:
                with contextlib.suppress(OSError):
                    d.rmdir()
        raise


def output_name(path: str | os.PathLike) -> Path:
    """The final output of a path inside a partial directory (for messages), else the path."""
    p = _absolute(path)
    for anc in (p, *p.parents):
        m = re.fullmatch(rf"\.(.+){re.escape(PARTIAL)}[^/]*", anc.name)
        if m:
            return anc.parent / m.group(1)
    return p


@contextlib.contextmanager
def capture_stderr() -> Iterator[list[str]]:
    """Redirect file descriptor 2 (Python, C++ and background threads alike) to a temporary
    file for the block. Yields a list that holds the captured text afterwards."""
    captured: list[str] = []
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield captured
        return
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield captured
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            captured.append(f.read().decode("utf-8", "replace"))


def _errnos(e: BaseException) -> Iterator[tuple[int | None, str]]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield getattr(e, "errno", None), str(e)
        e = e.__cause__ or e.__context__


def summarize(e: BaseException, limit: int = 300) -> str:
    """One line of an exception's text (tensorstore appends pages of JSON spec)."""
    text = str(e)
    for cut in (" [tensorstore_spec=", " See full TensorStore details"):
        text = text.split(cut)[0]
    text = text.strip()
    text = text.splitlines()[0] if text else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _disk_full(e: BaseException) -> tuple[bool, bool]:
    codes = list(_errnos(e))
    full = any(n == errno.ENOSPC or "No space left on device" in s or "StorageFull" in s
               or "os_error_code='28'" in s for n, s in codes)
    quota = any(n == errno.EDQUOT or "Disk quota exceeded" in s or "QuotaExceeded" in s
                for n, s in codes)
    return full, quota


def is_disk_full(e: BaseException) -> bool:
    """Whether an exception (or one it chains) reports a full disk or an exceeded quota."""
    return any(_disk_full(e))


def write_error(out: str | os.PathLike, e: BaseException) -> OutputDirError:
    """One-line error for a failed write of `out` (a full disk is named as such)."""
    out = output_name(out)
    codes = list(_errnos(e))
    full, quota = _disk_full(e)
    if full or quota:
        anc = _existing_ancestor(out)
        try:
            free = format_bytes(free_bytes(anc))
        except OSError:
            free = "unknown"
        what = "no space left on device" if full else "disk quota exceeded"
        return OutputDirError(f"{what} while writing {out}: {free} free",
                              errno.ENOSPC if full else errno.EDQUOT)
    err = next((n for n, _ in codes if isinstance(n, int)), None)
    return OutputDirError(f"cannot write {out}: {summarize(e)}", err)
