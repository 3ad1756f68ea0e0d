"""Encoding generated frames as an MP4 that plays in every browser.

A job's result is an H.264 / yuv420p MP4 with the index (``moov``) at the front
(``-movflags +faststart``), so a browser can start playing it while it downloads. Frames are
piped as raw RGB into the ffmpeg that ships inside the ``imageio-ffmpeg`` wheel, so encoding
works on a fresh machine with nothing installed system-wide. The file is written under a
temporary name next to the destination and renamed into place, so no reader (the storage
uploader, the web page, a person) ever sees a half-written MP4.

Also here: the file name results are stored under (:func:`video_filename`) and a poster JPEG of
the first frame for lists and the web page (:func:`poster_jpeg`).
"""

from __future__ import annotations

import io
import itertools
import os
import re
import secrets
import subprocess
import threading
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Final, Union

import imageio_ffmpeg
import numpy as np
from PIL import Image

__all__ = ["encode_mp4", "ffmpeg_exe", "poster_jpeg", "video_filename"]

Frames = Union[np.ndarray, Sequence[Image.Image], Sequence[np.ndarray]]
"""(F, H, W, 3) uint8 or float in [0, 1], or a sequence of PIL images / (H, W, 3) arrays."""

MIN_FPS: Final = 1
MAX_FPS: Final = 120
X264_PRESETS: Final = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
)
_STDERR_TAIL: Final = 4000  # characters of ffmpeg's stderr quoted in an error
_SHORT_ID: Final = re.compile(r"[0-9a-f]{8}")


def ffmpeg_exe() -> str:
    """Path of the ffmpeg bundled in the imageio-ffmpeg wheel (``IMAGEIO_FFMPEG_EXE`` overrides)."""
    return imageio_ffmpeg.get_ffmpeg_exe()


def encode_mp4(
    frames: Frames,
    path: str | os.PathLike[str],
    fps: int,
    *,
    crf: int = 18,
    preset: str = "medium",
) -> dict:
    """Encode ``frames`` as an H.264 yuv420p MP4 at ``path``, atomically.

    Args:
        frames: (F, H, W, 3) ``uint8`` array, or a float array in [0, 1] (rounded to 8 bits,
            out-of-range values clipped, NaN as 0), or a sequence of PIL images or (H, W, 3)
            arrays of one size. F >= 1; H and W even (yuv420p subsamples colour 2x2).
        path: destination file; its directory must exist (FileNotFoundError otherwise). An
            existing file is replaced only when encoding succeeds.
        fps: frames per second of the video, 1..120.
        crf: x264 constant rate factor, 0 (lossless) .. 51; 18 is visually lossless.
        preset: x264 speed/size trade-off, ``ultrafast`` .. ``placebo``.

    Returns:
        ``{"path", "bytes", "frames", "width", "height", "fps", "codec": "h264",
        "pix_fmt": "yuv420p"}``.

    Raises:
        ValueError: bad frames (shape, dtype, odd size, none), fps, crf or preset.
        FileNotFoundError: the directory of ``path`` does not exist.
        RuntimeError: ffmpeg failed; the message ends with the tail of its stderr.
    """
    video = _as_uint8_frames(frames)
    count, height, width, _ = video.shape
    if width % 2 or height % 2:
        raise ValueError(f"frame size {width}x{height} must be even in both dimensions (yuv420p)")
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)):
        raise ValueError(f"fps must be an integer, not {fps!r}")
    if not MIN_FPS <= fps <= MAX_FPS:
        raise ValueError(f"fps must be in {MIN_FPS}..{MAX_FPS}, got {fps}")
    if isinstance(crf, bool) or not isinstance(crf, (int, np.integer)) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an integer in 0..51, got {crf!r}")
    if preset not in X264_PRESETS:
        raise ValueError(f"preset must be one of {', '.join(X264_PRESETS)}; got {preset!r}")

    dest = Path(path)
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"cannot write {dest}: directory {dest.parent} does not exist")
    # Same directory, so the final os.replace is an atomic rename on one file system. The name
    # is hidden and unique; ffmpeg creates it, so it gets the usual permissions (umask).
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.part")
    cmd = [
        ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(int(fps)),
        "-i", "-",
        "-an", "-c:v", "libx264", "-preset", preset, "-crf", str(int(crf)),
        "-pix_fmt", "yuv420p", "-movflags", "+faststart",
        "-f", "mp4", str(tmp),
    ]  # fmt: skip
    try:
        _run_ffmpeg(cmd, video)
        size = tmp.stat().st_size
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)  # after a failure; a no-op after the rename
    return {
        "path": str(dest),
        "bytes": size,
        "frames": int(count),
        "width": int(width),
        "height": int(height),
        "fps": int(fps),
        "codec": "h264",
        "pix_fmt": "yuv420p",
    }


def video_filename(now: datetime | None = None, short_id: str | None = None) -> str:
    """A result file name: ``video_YYYYMMDD_HHMMSS_<8 hex>.mp4``.

    ``now`` defaults to the current UTC time (a given ``now`` is formatted as is). ``short_id``
    (8 hex digits, e.g. the start of a job id) defaults to an id that never repeats within this
    process and is random across processes.
    """
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d_%H%M%S")
    if short_id is None:
        short_id = _next_short_id()
    else:
        short_id = short_id.lower()
        if not _SHORT_ID.fullmatch(short_id):
            raise ValueError(f"short_id must be 8 hex digits, got {short_id!r}")
    return f"video_{stamp}_{short_id}.mp4"


def poster_jpeg(frame: Image.Image | np.ndarray | Frames) -> bytes:
    """The first frame as a JPEG (quality 90): a still for job lists and the web page.

    ``frame`` is one frame (a PIL image, an (H, W, 3) array) or anything :func:`encode_mp4`
    takes, of which the first frame is used.
    """
    if isinstance(frame, Image.Image) or (isinstance(frame, np.ndarray) and frame.ndim == 3):
        frame = [frame]
    first = _as_uint8_frames(frame)[0]
    buf = io.BytesIO()
    Image.fromarray(first).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# --- internals --------------------------------------------------------------------------------


def _as_uint8_frames(frames: Frames) -> np.ndarray:
    """Frames as one C-contiguous (F, H, W, 3) uint8 array."""
    if isinstance(frames, np.ndarray):
        array = frames
    elif isinstance(frames, Sequence) and not isinstance(frames, (str, bytes)):
        if len(frames) == 0:
            raise ValueError("no frames to encode")
        items = [
            np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else np.asarray(f)
            for f in frames
        ]
        shapes = {item.shape for item in items}
        if len(shapes) != 1:
            raise ValueError(f"all frames must have the same size, got shapes {sorted(shapes)}")
        array = np.stack(items)
    else:
        raise ValueError(
            f"frames must be an array or a sequence of images, not {type(frames).__name__}"
        )

    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"frames must have shape (F, H, W, 3), got {array.shape}")
    if array.shape[0] < 1:
        raise ValueError("no frames to encode")
    if array.shape[1] < 1 or array.shape[2] < 1:
        raise ValueError(f"frames must not be empty, got shape {array.shape}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating):
        scaled = np.nan_to_num(array.astype(np.float32), nan=0.0) * 255.0
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    raise ValueError(f"frames must be uint8 or float in [0, 1], got dtype {array.dtype}")


def _run_ffmpeg(cmd: list[str], video: np.ndarray) -> None:
    """Pipe ``video`` frame by frame into ffmpeg's stdin; raise RuntimeError if it fails.

    stderr is drained by a thread while frames are written, so a chatty ffmpeg cannot fill the
    pipe and deadlock. If ffmpeg exits early the write fails with BrokenPipeError; the error
    raised then quotes what ffmpeg said, not the broken pipe.
    """
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stderr is not None
    stderr_chunks: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(proc.stderr, stderr_chunks), daemon=True)
    reader.start()
    broken_pipe = False
    try:
        try:
            for frame in video:
                proc.stdin.write(frame.data)  # contiguous (H, W, 3) view: no copy
            proc.stdin.close()
        except BrokenPipeError:
            broken_pipe = True
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        returncode = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        reader.join()

    if returncode != 0 or broken_pipe:
        stderr = b"".join(stderr_chunks).decode("utf-8", "replace").strip()
        tail = stderr[-_STDERR_TAIL:] or "(no output on stderr)"
        count, height, width, _ = video.shape
        raise RuntimeError(
            f"ffmpeg failed (exit status {returncode}) encoding {count} frame"
            f"{'' if count == 1 else 's'} of {width}x{height}: {tail}"
        )


def _drain(stream: IO[bytes], chunks: list[bytes]) -> None:
    with stream:
        for chunk in iter(lambda: stream.read(8192), b""):
            chunks.append(chunk)


_short_id_counter = itertools.count(secrets.randbits(32))
_short_id_key = secrets.randbits(32)


def _next_short_id() -> str:
    """8 hex digits, distinct for 2**32 calls in a process, unpredictable-looking.

    A counter (``next()`` on ``itertools.count`` is atomic under the GIL) scrambled by a
    bijection on 32 bits: multiplying by an odd constant, then xor with a per-process key.
    """
    n = next(_short_id_counter) & 0xFFFFFFFF
    return f"{((n * 0x9E3779B1) & 0xFFFFFFFF) ^ _short_id_key:08x}"
