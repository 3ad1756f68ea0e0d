"""Private files (`serving.files`): the farm's directories and files get the `file_mode` setting
(0600 -> dirs 0700; 0640 -> 0750), whatever the umask it was started with: storage, the job store
and its WAL, the spool, the job manager's inbox, and the umask every farm process sets."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from serving.config import load_settings
from serving.files import atomic_copy, atomic_write, dir_mode_for, make_dirs, umask_for, wider_than
from serving.job_store import JobStore
from serving.storage import LocalStorage, open_storage
from serving.uploader import Spool

JOB = "0123456789abcdef0123456789abcdef"
MODES = [0o600, 0o640]


@pytest.fixture
def loose_umask():
    """Start as a default shell would (umask 022: new files 0644, dirs 0755); restore afterwards."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def assert_tree(root: Path, file_mode: int, *, exact: bool = True) -> list[Path]:
    """Every path under root is at most the mode (and, with `exact`, exactly it). Returns them."""
    assert wider_than(root, file_mode) == []
    paths = [p for p in root.rglob("*")]
    if exact:
        for p in paths:
            want = dir_mode_for(file_mode) if p.is_dir() else file_mode
            assert mode(p) == want, (p, oct(mode(p)), oct(want))
    return paths


def test_modes_and_umasks_follow_file_mode():
    assert [dir_mode_for(m) for m in (0o600, 0o640, 0o660)] == [0o700, 0o750, 0o770]
    assert [umask_for(m) for m in (0o600, 0o640, 0o660)] == [0o077, 0o027, 0o007]
    for value, bits in (("0600", 0o600), ("0640", 0o640), ("660", 0o660)):
        s = load_settings({"file_mode": value}, env={})
        assert (s.file_mode_bits, s.dir_mode_bits) == (bits, dir_mode_for(bits))
    assert load_settings(env={"I2V_FILE_MODE": "0640"}).file_mode_bits == 0o640
    for bad in ("0644", "0700", "0400", "rw", "0666"):
        with pytest.raises(ValueError, match="file_mode"):
            load_settings({"file_mode": bad}, env={})


@pytest.mark.parametrize("file_mode", MODES)
def test_apply_umask_makes_what_any_library_creates_private(tmp_path, file_mode):
    """In a fresh process started with umask 022: after apply_umask, plain open()/mkdir() (what
    ffmpeg, SQLite, tempfile do) give at most the configured modes."""
    code = textwrap.dedent(f"""
        import os, sys
        os.umask(0o022)
        from serving.config import load_settings
        from serving.files import apply_umask
        old = apply_umask(load_settings({{"file_mode": "{file_mode:o}"}}, env={{}}))
        open(sys.argv[1] + "/plain.txt", "w").write("x")
        os.mkdir(sys.argv[1] + "/plain-dir")
        print(oct(old), oct(os.umask(0)))
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0o22", oct(umask_for(file_mode))]
    assert mode(tmp_path / "plain.txt") == file_mode
    assert mode(tmp_path / "plain-dir") == dir_mode_for(file_mode)


@pytest.mark.parametrize("file_mode", MODES)
def test_atomic_writes_and_make_dirs_use_the_mode_whatever_the_umask(tmp_path, loose_umask, file_mode):
    root = tmp_path / "root"
    make_dirs(root / "a" / "b", dir_mode_for(file_mode))
    atomic_write(root / "a" / "b" / "f.json", "{}", file_mode)
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100_000)
    assert mode(src) == 0o644  # the loose umask is in effect
    atomic_copy(src, root / "a" / "copy.bin", file_mode)
    atomic_write(root / "a" / "copy.bin", b"again", file_mode)  # replacing keeps the mode
    paths = assert_tree(root, file_mode)
    assert len(paths) == 4 and not [p for p in paths if ".tmp" in p.name]
    # an existing directory keeps its mode unless the farm owns it by name (tighten)
    (tmp_path / "old").mkdir(mode=0o755)
    make_dirs(tmp_path / "old", 0o700)
    assert mode(tmp_path / "old") == 0o755
    make_dirs(tmp_path / "old", 0o700, tighten=True)
    assert mode(tmp_path / "old") == 0o700


@pytest.mark.parametrize("file_mode", MODES)
def test_local_storage_writes_job_prefixes_and_files_with_the_mode(tmp_path, loose_umask, file_mode):
    settings = load_settings({"storage_url": f"file://{tmp_path / 'outputs'}", "file_mode": f"{file_mode:o}"},
                             env={})
    store = open_storage(settings)
    store.ensure_ready()
    video = tmp_path / "video.mp4"
    video.write_bytes(b"\0" * 5000)
    store.put_file(f"jobs/2026/01/01/{JOB}/video.mp4", video)
    store.put_bytes(f"jobs/2026/01/01/{JOB}/params.json", b"{}")
    store.put_bytes("batches/m/summary.jsonl", b"{}\n")
    paths = assert_tree(tmp_path / "outputs", file_mode)
    assert mode(tmp_path / "outputs") == dir_mode_for(file_mode)
    assert sum(p.is_file() for p in paths) == 3
    assert LocalStorage(tmp_path / "x").file_mode == 0o600  # the default


@pytest.mark.parametrize("file_mode", MODES)
def test_job_store_database_wal_and_shm_have_the_mode(tmp_path, loose_umask, file_mode):
    db = tmp_path / "state" / "jobs.sqlite3"
    store = JobStore(db, file_mode=file_mode)
    store.create({"id": "job001", "status": "queued", "created_at": "2026-01-01T00:00:00", "params": {}})
    store.update("job001", status="running")
    names = sorted(p.name for p in store.files())
    assert names == ["jobs.sqlite3", "jobs.sqlite3-shm", "jobs.sqlite3-wal"]
    assert_tree(tmp_path / "state", file_mode)
    store.close()


def test_a_job_store_made_world_readable_by_an_older_farm_is_tightened(tmp_path, loose_umask):
    db = tmp_path / "jobs.sqlite3"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    assert mode(db) == 0o644
    store = JobStore(db)
    store.create({"id": "job001", "status": "queued", "created_at": "2026-01-01T00:00:00", "params": {}})
    assert {p.name: mode(p) for p in store.files()} == {"jobs.sqlite3": 0o600, "jobs.sqlite3-wal": 0o600,
                                                       "jobs.sqlite3-shm": 0o600}


@pytest.mark.parametrize("file_mode", MODES)
def test_the_spool_and_what_it_uploads_have_the_mode(tmp_path, loose_umask, file_mode):
    store = LocalStorage(tmp_path / "outputs", file_mode=file_mode)
    spool_root = tmp_path / "spool"
    spool_root.mkdir(mode=0o755)  # left by an older farm: the spool is the farm's own, tightened
    spool = Spool(spool_root, store, file_mode=file_mode)
    render = spool_root / ".render-x"
    render.mkdir()
    video = render / "video.mp4"
    video.write_bytes(b"\0" * 1000)  # as ffmpeg would make it under a loose umask: 0644
    prefix = f"jobs/2026/01/01/{JOB}/"
    spool.add(JOB, prefix, {"video.mp4": video, "params.json": b"{}", "input.png": b"png"}, {"r": 1})
    render.rmdir()
    assert mode(spool_root) == dir_mode_for(file_mode)
    assert_tree(spool_root, file_mode, exact=False)  # the lock file is 0600 in either mode
    assert json.loads((spool.job_dir(JOB) / "manifest.json").read_text())["job_id"] == JOB
    spool.upload(JOB)
    assert_tree(tmp_path / "outputs", file_mode)
    spool.remove(JOB)


@pytest.mark.parametrize("file_mode", MODES)
def test_the_job_manager_sets_the_umask_and_keeps_the_inbox_and_store_private(tmp_path, file_mode):
    """A JobManager built in a process started with umask 022 (as a Serve replica is): its process
    umask follows file_mode, and the store, its WAL and the accepted inputs are private."""
    code = textwrap.dedent(f"""
        import asyncio, io, json, os, sys
        from pathlib import Path
        os.umask(0o022)
        from serving.config import load_settings
        from serving.manager import JobManager
        from tests.helpers import make_image

        async def main():
            root = sys.argv[1]
            settings = load_settings({{"model": "sim", "job_db": root + "/state/jobs.sqlite3",
                                       "storage_url": "file://" + root + "/outputs", "file_mode": "{file_mode:o}",
                                       "workers": {{"12gb": {{"min_replicas": 0, "max_replicas": 1}}}}}}, env={{}})
            manager = JobManager(settings.resolved().model_dump(), {{}})
            manager._loop_task.cancel()
            buf = io.BytesIO()
            make_image(96, 80, 1).save(buf, "PNG")
            reply = await manager.submit({{"prompt": "p", "num_frames": 8, "num_inference_steps": 2}},
                                         buf.getvalue(), "png", 96, 80)
            assert "job" in reply, reply
            open(root + "/state/made-by-a-library.txt", "w").write("x")
            modes = {{str(p.relative_to(root)): oct(p.stat().st_mode & 0o777) for p in Path(root).rglob("*")}}
            print(json.dumps(modes))  # while the store is open: its -wal and -shm exist
            print(oct(os.umask(0)))

        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == oct(umask_for(file_mode))
    modes = json.loads(out.stdout.splitlines()[-2])
    files, dirs = oct(file_mode), oct(dir_mode_for(file_mode))
    assert {k: v for k, v in modes.items() if not k.startswith("state/inbox/")} == {
        "state": dirs, "state/inbox": dirs, "state/jobs.sqlite3": files, "state/jobs.sqlite3-wal": files,
        "state/jobs.sqlite3-shm": files, "state/made-by-a-library.txt": files}
    assert [v for k, v in modes.items() if k.startswith("state/inbox/")] == [files]  # the accepted input
