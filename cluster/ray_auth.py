"""Ray's own authentication for the clusters the farm starts: one cluster token, in a 0600 file.

Every Ray process listens on TCP: the GCS, each raylet and object manager, each worker's core
worker, the dashboard and its agents, and each Ray Serve replica's inter-deployment gRPC server
(bound to all interfaces by Ray, `[::]:0`; it unpickles what it is sent). With Ray's token
authentication (`RAY_AUTH_MODE=token`) each of these refuses a request that does not carry the
cluster token (`authorization: Bearer TOKEN`): `UNAUTHENTICATED` for gRPC, 401/403 for HTTP.

The farm keeps the token in one file (`ray_token` beside the job store, or `ray_token_file`),
created on first start with 256 random bits, written atomically with mode 0600 and never logged
or printed. Ray's processes read it from `RAY_AUTH_TOKEN_PATH`; `enable()` sets that and
`RAY_AUTH_MODE=token` in this process's environment before Ray starts, so Ray's processes and
anything launched from here (`ray job submit`, job drivers) inherit it. An operator's shell gets
the same two variables (`shell_env()`), never the token itself.

    path = ensure_token_file(token_path(settings))
    saved = enable(path)       # before ray.init / starting nodes
    ...
    restore(saved)             # after the cluster is gone (tests)

`ray_auth: off` (`disable()`) starts Ray without authentication (`RAY_AUTH_MODE=disabled`), as
Ray did before 2.52: anyone who reaches a Ray port can run code as the farm's user.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

logger = logging.getLogger(__name__)

TOKEN_FILE_NAME = "ray_token"
MODE_VAR = "RAY_AUTH_MODE"
PATH_VAR = "RAY_AUTH_TOKEN_PATH"
TOKEN_VAR = "RAY_AUTH_TOKEN"
_VARS = (MODE_VAR, PATH_VAR, TOKEN_VAR)

OFF_WARNING = (
    "Ray token authentication is OFF (ray_auth: off): every Ray port of this farm (GCS, raylets, "
    "workers, Serve replicas, dashboard) accepts requests without a credential, and anyone who can "
    "reach one can run code as this user. Use it only on a machine nobody else can reach."
)


def token_path(settings) -> Path:
    """The farm's Ray token file: `settings.ray_token_file`, else `ray_token` beside the job store."""
    if getattr(settings, "ray_token_file", ""):
        return Path(settings.ray_token_file).expanduser().resolve()
    return Path(settings.job_db).expanduser().resolve().parent / TOKEN_FILE_NAME


def ensure_token_file(path: str | os.PathLike) -> Path:
    """Create the token file (0600, random, atomically) unless it exists; returns its absolute path.

    An existing file is kept (a restarted farm keeps its token, joined nodes keep working); one
    readable by group or others is made 0600 (with a warning naming the file, not its content).
    An empty one is an error: Ray would refuse to start with it.
    """
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        _write_new(path)
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"Ray token file {path} is not a regular file")
    if st.st_mode & 0o077:
        logger.warning("Ray token file %s was readable by others (mode %o); made it 0600", path, st.st_mode & 0o777)
        os.chmod(path, 0o600)
    if not read_token(path):
        raise ValueError(f"Ray token file {path} is empty; delete it and a new token is made on the next start")
    return path


def _write_new(path: Path) -> None:
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` makes: 256 bits
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # never replaces a token another process wrote meanwhile
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("created the Ray cluster token file %s (0600)", path)


def read_token(path: str | os.PathLike) -> str:
    """The token in `path` (for tests and for Ray clients that need the header value)."""
    return Path(path).read_text().strip()


def enable(path: str | os.PathLike) -> dict:
    """Token auth for this process and every process started from it; returns what to `restore()`.

    Sets `RAY_AUTH_MODE=token` and `RAY_AUTH_TOKEN_PATH=path` and drops `RAY_AUTH_TOKEN` (it would
    win over the file, and the farm's nodes must all use the file's token), then makes an
    already-imported Ray read them again.
    """
    path = Path(path).absolute()
    saved = _save()
    if os.environ.get(TOKEN_VAR):
        logger.warning("%s is set; the farm's Ray cluster uses the token file %s instead", TOKEN_VAR, path)
    os.environ.pop(TOKEN_VAR, None)
    os.environ[MODE_VAR] = "token"
    os.environ[PATH_VAR] = str(path)
    _refresh_ray()
    return saved


def disable() -> dict:
    """Ray without authentication (`ray_auth: off`), warned about loudly; returns what to `restore()`."""
    saved = _save()
    for var in (PATH_VAR, TOKEN_VAR):
        os.environ.pop(var, None)
    os.environ[MODE_VAR] = "disabled"  # Ray >= 2.52 would otherwise turn tokens on for ray.init()
    _refresh_ray()
    logger.warning(OFF_WARNING)
    return saved


def restore(saved: dict) -> None:
    """Put back the environment `enable()`/`disable()` changed."""
    if not saved:
        return
    for var, value in saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    _refresh_ray()


def shell_env(path: str | os.PathLike) -> str:
    """`RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=PATH`: what an operator's shell needs (never the token)."""
    return f"{MODE_VAR}=token {PATH_VAR}={Path(path).absolute()}"


def is_enabled() -> bool:
    """Whether Ray in this process runs in token mode."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return is_token_auth_enabled()


def _save() -> dict:
    return {var: os.environ.get(var) for var in _VARS}


def _refresh_ray() -> None:
    """Ray caches its config (auth mode) and the token in C++; make it read the environment again."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # Ray not installed (unit tests of the deploy files): the environment is enough
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
