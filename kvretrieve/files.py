"""Files kvretrieve writes for later runs (converted GGUF models, saved prefills): where they live, and
how they are written so that no interruption leaves one that looks whole.

Each is built in a temporary folder beside its final name and renamed into place when complete. The
folder is named .tmp-PID@HOST-XXXXXXXX, so that a later run can tell whether the process that made it
is gone: Ctrl-C, SIGTERM and SIGHUP remove it on the way out (terminations_unwind), and what a
SIGKILL, a crash or a power cut leaves is swept by the next run (sweep_stale_temporaries). One whose
owner cannot be checked (another host sharing the cache, an unreadable name) is left alone while it
may still be written.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".tmp-"
STALE_AFTER_S = 6 * 3600  # conversions and saves take minutes, not hours


def cache_root() -> Path:
    """$KVRETRIEVE_CACHE, else $XDG_CACHE_HOME/kvretrieve, else ~/.cache/kvretrieve."""
    if os.environ.get("KVRETRIEVE_CACHE"):
        return Path(os.environ["KVRETRIEVE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvretrieve"


def free_disk_bytes(folder: Path) -> int:
    """Free space on the disk that holds `folder` (or would: its nearest existing parent)."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def store_dir() -> Path:
    """Where disk stores (RetrievalConfig(store="disk")) make their segment files, unlinked at once."""
    return cache_root() / "stores"


def temporary_dir(parent: Path) -> Path:
    """A new temporary folder in `parent` (made if missing) whose name says which process owns it."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}@{socket.gethostname()}-", dir=parent))


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename the finished folder tmp to final, replacing what final held (a rename cannot replace a
    folder with contents: the old one moves aside first and is removed after)."""
    old = None
    if final.exists():
        old = tmp.with_name(tmp.name + "-old")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _owner_gone(path: Path, now: float) -> bool:
    pid, _, rest = path.name[len(TMP_PREFIX):].partition("@")
    host = rest.rpartition("-")[0]
    if pid.isdigit() and host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
    try:
        return now - path.stat().st_mtime > STALE_AFTER_S
    except OSError:
        return False


def sweep_stale_temporaries(root: Path) -> None:
    """Remove the temporary folders in root whose process was killed, which nothing else would delete."""
    try:
        candidates = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX) and p.is_dir()]
    except OSError:
        return
    now = time.time()
    for path in candidates:
        if _owner_gone(path, now):
            shutil.rmtree(path, ignore_errors=True)


class _Terminated(BaseException):
    """Raised by the handler terminations_unwind installs; a BaseException so that no `except
    Exception` on the way swallows it."""


@contextmanager
def terminations_unwind(stopped: Exception):
    """SIGTERM and SIGHUP end a process on the spot, skipping every finally block. Inside this block
    they raise instead, so the finally blocks run; once the block has unwound the signal is raised
    again for the handler it would have met (by default the process still dies of it), and where the
    process survives it, `stopped` is raised. Only the main thread can handle signals; elsewhere the
    block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def handler(signum, frame):
        if not caught:  # a second signal must not cut the cleanup the first one started
            caught.append(signum)
            raise _Terminated(signum)

    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):  # no SIGHUP on Windows
        old = None if sig is None else signal.getsignal(sig)
        if old is signal.SIG_DFL or callable(old):  # an ignored signal stays ignored
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    except _Terminated:
        pass
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if caught:
        signal.raise_signal(caught[0])
        raise stopped
