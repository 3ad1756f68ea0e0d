"""The farm's Ray cluster token (cluster/ray_auth.py) and what `i2v-farm up` says about auth (no Ray)."""

from __future__ import annotations

import argparse
import os
import stat
import threading

import pytest

from cluster import ray_auth
from serving import launcher
from serving.config import load_settings


@pytest.fixture
def refreshes(monkeypatch):
    """Ray's in-process config is left alone (a shared test cluster may be running in this process)."""
    calls = []
    monkeypatch.setattr(ray_auth, "_refresh_ray", lambda: calls.append(dict(os.environ)))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"):
        monkeypatch.setenv(var, "")  # recorded, so whatever a test sets is put back afterwards
        monkeypatch.delenv(var)
    return calls


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_token_file_is_made_0600_with_256_random_bits_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        path = ray_auth.ensure_token_file(tmp_path / "state" / "ray_token")
    finally:
        os.umask(old)
    assert path == tmp_path / "state" / "ray_token" and mode(path) == 0o600
    assert mode(path.parent) == 0o700
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) and token != ray_auth.read_token(
        ray_auth.ensure_token_file(tmp_path / "other"))
    assert [p.name for p in path.parent.iterdir()] == ["ray_token"]  # no temporary file left


def test_an_existing_token_is_kept_and_a_loose_mode_tightened(tmp_path):
    path = tmp_path / "ray_token"
    path.write_text("abc123\n")
    os.chmod(path, 0o644)
    assert ray_auth.ensure_token_file(path) == path
    assert path.read_text() == "abc123\n" and ray_auth.read_token(path) == "abc123" and mode(path) == 0o600


def test_an_empty_token_file_is_an_error(tmp_path):
    (tmp_path / "ray_token").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        ray_auth.ensure_token_file(tmp_path / "ray_token")


def test_concurrent_first_starts_agree_on_one_token(tmp_path):
    path = tmp_path / "ray_token"
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(ray_auth.read_token(ray_auth.ensure_token_file(path))))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 1 and len(seen) == 8


def test_token_path_defaults_beside_the_job_store(tmp_path):
    settings = load_settings({"job_db": str(tmp_path / "db" / "jobs.sqlite3")}, env={})
    assert ray_auth.token_path(settings) == tmp_path / "db" / "ray_token"
    settings = load_settings({"ray_token_file": str(tmp_path / "t")}, env={})
    assert ray_auth.token_path(settings) == tmp_path / "t"
    assert load_settings(env={"I2V_RAY_TOKEN_FILE": "/x/t", "I2V_RAY_AUTH": "off"}).ray_auth == "off"


def test_enable_sets_the_environment_children_inherit_and_restore_puts_it_back(tmp_path, refreshes, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "operator-token")
    saved = ray_auth.enable(tmp_path / "ray_token")
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "ray_token")
    assert "RAY_AUTH_TOKEN" not in os.environ  # it would win over the file
    assert refreshes and refreshes[-1]["RAY_AUTH_MODE"] == "token"  # Ray re-read its config
    ray_auth.restore(saved)
    assert os.environ["RAY_AUTH_TOKEN"] == "operator-token"
    assert "RAY_AUTH_MODE" not in os.environ and "RAY_AUTH_TOKEN_PATH" not in os.environ


def test_disable_says_so_and_sets_ray_auth_mode_disabled(refreshes, caplog):
    saved = ray_auth.disable()
    try:
        assert os.environ["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN_PATH" not in os.environ
        assert "OFF" in caplog.text and "run code" in caplog.text
    finally:
        ray_auth.restore(saved)
    assert "RAY_AUTH_MODE" not in os.environ


def test_shell_env_names_the_file_never_the_token(tmp_path):
    path = ray_auth.ensure_token_file(tmp_path / "ray_token")
    line = ray_auth.shell_env(path)
    assert line == f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={path}"
    assert ray_auth.read_token(path) not in line


# --- `i2v-farm up`: the banner and --trust-proxy ---------------------------------------------------

def up_args(*argv):
    parser = argparse.ArgumentParser(prog="i2v-farm")
    launcher.add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["up", *argv])


def test_trust_proxy_takes_cidrs_and_addresses():
    assert up_args("--trust-proxy", "10.0.0.0/8, 127.0.0.1").trusted_proxies == ["10.0.0.0/8", "127.0.0.1/32"]
    assert up_args().trusted_proxies is None  # the setting (I2V_TRUSTED_PROXIES) then decides
    for bad in ("proxy.internal", "10.0.0.0/99", ","):
        with pytest.raises(SystemExit):
            up_args("--trust-proxy", bad)


def test_banner_says_who_is_admin_when_api_tokens_are_off():
    auto = launcher.api_auth_banner(load_settings(env={}))
    assert auto == ("API tokens off: listening on 127.0.0.1 only; every local caller is admin. Behind a "
                    "reverse proxy or on a network use --host 0.0.0.0 / I2V_AUTH=on with tokens")
    off = launcher.api_auth_banner(load_settings({"auth": "off", "host": "0.0.0.0"}, env={}))
    assert "every caller that reaches 0.0.0.0:8000 is admin" in off


def test_up_sets_up_ray_auth_and_prints_the_file_never_the_token(tmp_path, refreshes, capsys):
    settings = load_settings({"job_db": str(tmp_path / "jobs.sqlite3")}, env={}).resolved()
    path = launcher._setup_ray_auth(settings)
    assert path == tmp_path / "ray_token" and mode(path) == 0o600
    out = capsys.readouterr().out
    assert f"Ray: token authentication on (token file {path})" in out
    hint = launcher._ray_shell_hint("http://127.0.0.1:8265", path)
    assert f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={path}" in hint and "ray job submit" in hint
    assert ray_auth.read_token(path) not in out + hint
    assert os.environ["RAY_AUTH_MODE"] == "token"


def test_up_with_ray_auth_off_warns(tmp_path, refreshes, capsys):
    settings = load_settings({"job_db": str(tmp_path / "jobs.sqlite3"), "ray_auth": "off"}, env={}).resolved()
    assert launcher._setup_ray_auth(settings) is None
    assert "WARNING" in capsys.readouterr().out and os.environ["RAY_AUTH_MODE"] == "disabled"
    assert not (tmp_path / "ray_token").exists()
