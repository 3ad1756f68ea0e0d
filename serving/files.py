"""Private files: the farm's directories and files are its user's only (or a group's), never the world's.

The job store (and its WAL), the inbox of accepted inputs, results under `outputs/`, `params.json`,
the workers' spool and batch summaries hold callers' images, prompts and videos. The `file_mode`
setting (`I2V_FILE_MODE`, default `0600`) is the mode of every file the farm writes; directories
get x wherever r is set (`0600` -> `0700`, `0640` -> `0750`, `0660` -> `0770`: a shared group).

Three layers, so that nothing depends on one of them alone:
* `apply_umask(settings)` at the start of every farm process (API ingress, job manager, workers,
  the batch driver, the CLI that starts the farm): whatever a library creates (ffmpeg's output,
  SQLite's -wal/-shm, temporary directories) gets no more than the configured mode;
* the farm's own writes go through `atomic_write`/`atomic_copy` (a temporary file created with
  the mode, fsync'ed, renamed into place) and `make_dirs` (each missing directory with the dir
  mode), with an explicit chmod, so they are right even where the umask is looser;
* files a library creates on its own get an explicit chmod (`set_mode`, e.g. the SQLite files).

Existing directories that the farm did not create keep their mode (tighten an old `outputs/`
once with `chmod -R go-rwx outputs`); the directories the farm owns by name (the inbox, the
spool) are tightened on every start.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any

DEFAULT_FILE_MODE = 0o600


def file_mode_of(settings: Any = None) -> int:
    """The file mode from settings (`file_mode_bits`), an int, or the default 0o600."""
    if settings is None:
        return DEFAULT_FILE_MODE
    if isinstance(settings, int):
        return settings
    bits = getattr(settings, "file_mode_bits", None)
    if bits is None:
        raise TypeError(f"no file mode in {settings!r}")
    return int(bits)


def dir_mode_for(file_mode: int) -> int:
    """x wherever r is set: 0o600 -> 0o700, 0o640 -> 0o750, 0o660 -> 0o770."""
    return file_mode | ((file_mode & 0o444) >> 2)


def umask_for(file_mode: int) -> int:
    """The umask that lets new files/directories get at most these modes: 0o600 -> 0o077,
    0o640 -> 0o027, 0o660 -> 0o007."""
    return 0o777 & ~dir_mode_for(file_mode)


def apply_umask(settings: Any = None) -> int:
    """Set this process's umask from `file_mode` (call first thing in every farm process).
    Returns the previous umask."""
    return os.umask(umask_for(file_mode_of(settings)))


def set_mode(path: str | os.PathLike, mode: int) -> bool:
    """chmod `path` if it exists (and is ours to change). Returns whether it exists."""
    try:
        os.chmod(path, mode)
        return True
    except FileNotFoundError:
        return False
    except PermissionError:  # not the owner (a shared mount): leave it
        return True


def make_dirs(path: str | os.PathLike, dir_mode: int = 0o700, *, tighten: bool = False) -> Path:
    """Create `path` and its missing parents, each with `dir_mode` (exactly, whatever the umask).
    Directories that exist keep their mode, unless `tighten` (then `path` itself gets `dir_mode`)."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, dir_mode)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue
        os.chmod(d, dir_mode)
    if tighten and not missing:
        set_mode(path, dir_mode)
    return path


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_new(path: Path, mode: int) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        os.fchmod(fd, mode)  # exactly the mode, whatever the umask
    except BaseException:
        os.close(fd)
        raise
    return fd


def atomic_write(path: str | os.PathLike, data: bytes | str, mode: int = DEFAULT_FILE_MODE, *,
                 durable: bool = True) -> Path:
    """Write `data` to `path` all or nothing: a temporary file beside it, created with `mode`,
    written, fsync'ed (`durable`), renamed over `path` (and the directory fsync'ed)."""
    payload = data.encode() if isinstance(data, str) else data
    return _atomic(path, lambda f: f.write(payload), mode, durable)


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike, mode: int = DEFAULT_FILE_MODE, *,
                durable: bool = True) -> Path:
    """Copy the file `source` to `path` the same way as `atomic_write` (streamed, any size)."""
    def copy(f) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f, 2**20)

    return _atomic(path, copy, mode, durable)


def _atomic(path: str | os.PathLike, fill, mode: int, durable: bool) -> Path:
    path = Path(path)
    tmp = _temp_name(path)
    fd = _open_new(tmp, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


def wider_than(root: str | os.PathLike, file_mode: int) -> list[tuple[str, str]]:
    """Every file or directory under `root` (itself included) whose mode allows more than
    `file_mode` (files) or its dir mode (directories): [(path, octal mode)]. For checks and tests."""
    allowed_file, allowed_dir = file_mode, dir_mode_for(file_mode)
    out = []
    root = Path(root)
    for p in [root, *root.rglob("*")]:
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            continue
        mode = stat.S_IMODE(st.st_mode)
        allowed = allowed_dir if stat.S_ISDIR(st.st_mode) else allowed_file
        if mode & ~allowed:
            out.append((str(p), oct(mode)))
    return out
