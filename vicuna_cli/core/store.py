"""Where vicuna keeps things, and how it writes them so an interruption never leaves half a file."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stale temp files are then left alone
    fcntl = None  # type: ignore[assignment]

from .errors import VicunaError


def vicuna_home() -> Path:
    """The user cache: `$VICUNA_HOME`, default `~/.cache/vicuna`."""
    return Path(os.environ.get("VICUNA_HOME") or Path.home() / ".cache" / "vicuna").expanduser()


def models_dir() -> Path:
    return vicuna_home() / "models"


def umask() -> int:
    """The process umask, read without changing it where /proc says it (os.umask can only be read
    by setting it, which would briefly affect files other threads create)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def ensure_writable(directory: Path, what: str = "output") -> None:
    """Create `directory` and prove a file can be made in it, or raise a VicunaError naming why.

    Commands call this before any slow loading, so a bad -o fails in a second, not after the model.
    A real file is created because permission bits lie (root ignores them, ACLs and read-only
    mounts override them).
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".vicuna-write-test.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        blocker = next((p for p in [directory, *directory.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a directory" if blocker else (exc.strerror or str(exc))
        raise VicunaError(f"cannot write the {what} in {directory}: {why}",
                          hint="choose another -o, or fix the folder's permissions") from None


class AtomicFile:
    """A temp file beside `path` (`.NAME.XXXX.partial`) that `commit()` renames into place.

    Until then the target is untouched, so Ctrl-C or a crash never leaves half a file. The final
    file gets the mode a plain open() would give it (0666 less the umask), not mkstemp's 0600.
    The temp file is flock'ed while this process lives, so `remove_stale_partials` can tell one
    left by a killed run from one another run is still writing.
    """

    def __init__(self, path: Path, mode: str = "wb", buffering: int = -1, encoding: str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.file: IO = os.fdopen(fd, mode, buffering=buffering, encoding=encoding)

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            os.fchmod(self.file.fileno(), 0o666 & ~umask())
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        self.file.close()

    def discard(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)

    def __enter__(self) -> IO:
        return self.file

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.discard() if exc_type else self.commit()


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same folder and a rename."""
    with AtomicFile(path, "w", encoding="utf-8") as f:
        f.write(text)


def remove_stale_partials(path: Path, report: Callable[[str], None]) -> int:
    """Delete the temp files of `path` left by killed runs (their lock is free); returns how
    many bytes were freed. Each removal is reported: nothing disappears silently."""
    freed = 0
    if fcntl is None:
        return freed
    path = Path(path)
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        try:
            with open(leftover, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live run: not stale
                size = os.fstat(f.fileno()).st_size
                os.unlink(leftover)
        except BlockingIOError:
            continue
        except (FileNotFoundError, IsADirectoryError):
            continue
        freed += size
        report(f"removed {leftover} ({human_size(size)}), left by an interrupted run")
    return freed


@contextlib.contextmanager
def exclusive(lock_path: Path, what: str, waiting: Callable[[str], None]) -> Iterator[None]:
    """Hold an flock on `lock_path` (which records our pid) while the block runs. When another
    process holds it, `waiting` is told who, and this waits for it to finish."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+", encoding="ascii") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                waiting(f"another run (pid {holder}) is writing {what}; waiting for it to finish")
                fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)  # the lock file stays: deleting it would race a waiter that opened it


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp dir beside `target`; on success it is renamed to `target`, on failure removed.

    A reader therefore sees either no `target` or a complete one, never a half-written one. The
    final dir gets the mode a plain mkdir would give it, not mkdtemp's 0700.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
