"""Helpers shared by tests (import as `from tests.helpers import ...`)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import PIL.Image
import pytest


def make_image(width: int = 96, height: int = 80, seed: int = 0) -> PIL.Image.Image:
    """A small deterministic test picture with structure (not flat noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], axis=-1)
    noise = rng.integers(0, 40, size=(height, width, 3))
    return PIL.Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def require_tool(name: str) -> str:
    """Path of a system tool the tests use; fails (never skips) with how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"'{name}' is not installed: run `make sysdeps` (Debian package ffmpeg)")
    return path


def ffprobe(path) -> dict:
    """Stream facts of the first video stream, with an exact frame count."""
    exe = require_tool("ffprobe")
    out = subprocess.run(
        [exe, "-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries",
         "stream=codec_name,pix_fmt,width,height,r_frame_rate,nb_read_frames", "-of", "json", str(path)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout)["streams"][0]


def http_server(respond):
    """A loopback HTTP server on a free port, serving GETs from a daemon thread.

    `respond(path) -> (status, headers, body)`. Returns (server, seen, base URL); `seen` lists
    each request as {"path", lower-cased header: value}. Call `server.shutdown()` and
    `server.server_close()` when done."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
            status, headers, body = respond(self.path)
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen, f"http://127.0.0.1:{server.server_address[1]}"


def webhook_receiver(respond=lambda seen: 200, port: int = 0):
    """A loopback HTTP server that takes POSTs (a webhook receiver) on `port` (0: a free one).

    `respond(seen) -> status` (or `(status, JSON body)`) decides each answer (`seen` includes this
    request). Returns (server,
    seen, base URL); `seen` lists each request as {"path", "body" (bytes), "headers" (lower-cased
    names), "at" (time.time())}. Call `server.shutdown()` and `server.server_close()` when done."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append({"path": self.path, "body": body, "at": time.time(),
                         "headers": {k.lower(): v for k, v in self.headers.items()}})
            status, reply = respond(seen), b""
            if isinstance(status, tuple):
                status, reply = status[0], json.dumps(status[1]).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(reply)))
            if reply:
                self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen, f"http://127.0.0.1:{server.server_address[1]}"
