"""API tokens: hashed at rest, verified, limited; access on by default beyond loopback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from serving.auth import RateLimiter, TokenStore, auth_enabled, hash_token


def test_auth_is_on_by_default_beyond_loopback():
    assert not auth_enabled("auto", "127.0.0.1") and not auth_enabled("auto", "localhost")
    assert auth_enabled("auto", "0.0.0.0") and auth_enabled("auto", "10.1.2.3")
    assert auth_enabled("on", "127.0.0.1") and not auth_enabled("off", "0.0.0.0")


def test_tokens_are_stored_hashed_and_verified(tmp_path):
    store = TokenStore(tmp_path / "tokens.json")
    token = store.create("alice", rate_per_min=5, max_active=2)
    assert token.startswith("i2v_") and len(token) > 40
    text = (tmp_path / "tokens.json").read_text()
    assert token not in text and hash_token(token) in text
    assert stat.S_IMODE(os.stat(tmp_path / "tokens.json").st_mode) == 0o600
    caller = store.verify(token)
    assert (caller.name, caller.admin, caller.rate_per_min, caller.max_active) == ("alice", False, 5, 2)
    assert store.verify(token + "x") is None and store.verify("") is None and store.verify(None) is None
    with pytest.raises(ValueError, match="exists"):
        store.create("alice")
    with pytest.raises(ValueError):
        store.create("bad name!")
    # another process (the CLI) revokes it; this store sees the change
    time.sleep(0.01)
    assert TokenStore(tmp_path / "tokens.json").revoke("alice")
    assert store.verify(token) is None


def test_rate_limiter_is_a_token_bucket():
    from serving.auth import Caller

    limiter = RateLimiter()
    caller = Caller("c", False, rate_per_min=3, max_active=10)
    assert [limiter.take(caller) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take(caller)
    assert 19 <= wait <= 20.5  # one submission per 20 s refills
    other = Caller("d", False, rate_per_min=3, max_active=10)
    assert limiter.take(other) == 0.0  # per caller


def test_token_command_creates_lists_and_revokes(tmp_path):
    env = {**os.environ, "I2V_TOKENS_FILE": str(tmp_path / "t.json")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "serving.cli", "token", *a], env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    made = run("create", "ops", "--admin", "--rate", "10")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    entries = json.loads((tmp_path / "t.json").read_text())
    assert entries[0]["name"] == "ops" and entries[0]["admin"] and token not in json.dumps(entries)
    listed = run("list")
    assert "ops\tadmin\t10/min" in listed.stdout and token not in listed.stdout
    assert run("revoke", "ops").returncode == 0
    gone = run("revoke", "ops")
    assert gone.returncode == 2 and "no token named 'ops'" in gone.stderr
