"""Unit tests for pipeline.video: MP4s a browser plays, checked the way a user's tools see them.

The encoder is the ffmpeg bundled in the imageio-ffmpeg wheel; the checker is the system's
``ffprobe`` (Debian's ``ffmpeg`` package, installed by ``make sysdeps``). These tests fail, not
skip, without ffprobe: an unchecked encoder is worse than a red test.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import video
from pipeline.video import encode_mp4, ffmpeg_exe, poster_jpeg, video_filename

W, H, FPS, COUNT = 64, 48, 8, 9


# --- helpers ----------------------------------------------------------------------------------


def ffprobe_exe() -> str:
    exe = shutil.which("ffprobe")
    if exe is None:
        pytest.fail(
            "ffprobe is not on PATH; the video tests need it to check the MP4s. Install it with "
            "`make sysdeps` (or `apt-get install -y ffmpeg`).",
            pytrace=False,
        )
    return exe


def probe(path: Path) -> dict:
    """The first video stream as ffprobe reports it, frames counted by decoding."""
    out = subprocess.run(
        [
            ffprobe_exe(),
            *("-v", "error", "-select_streams", "v:0", "-count_frames"),
            "-show_entries",
            "stream=codec_name,pix_fmt,width,height,r_frame_rate,nb_read_frames",
            *("-of", "json", str(path)),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    (stream,) = json.loads(out.stdout)["streams"]
    return stream


def decode(path: Path, width: int, height: int) -> np.ndarray:
    """The MP4's frames as (F, H, W, 3) uint8, decoded by the bundled ffmpeg."""
    out = subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return np.frombuffer(out.stdout, dtype=np.uint8).reshape(-1, height, width, 3)


def top_level_boxes(data: bytes) -> list[str]:
    """Types of the MP4's top-level boxes, in file order."""
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1:
            (size,) = struct.unpack(">Q", data[offset + 8 : offset + 16])
        elif size == 0:
            size = len(data) - offset
        assert size >= 8, f"bad box size {size} at {offset}"
        boxes.append(kind.decode("latin-1"))
        offset += size
    return boxes


def gradient(count: int = COUNT, width: int = W, height: int = H) -> np.ndarray:
    """(F, H, W, 3) uint8 frames that differ from frame to frame."""
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        frames[i, ..., 0] = (x * 4 + i * 16) % 256
        frames[i, ..., 1] = (y * 5) % 256
        frames[i, ..., 2] = (i * 28) % 256
    return frames


def solid(color: tuple[int, int, int], count: int = COUNT) -> np.ndarray:
    return np.broadcast_to(np.array(color, dtype=np.uint8), (count, H, W, 3)).copy()


def leftovers(directory: Path, keep: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != keep)


# --- encode_mp4 -------------------------------------------------------------------------------


def test_bundled_ffmpeg_is_used() -> None:
    exe = Path(ffmpeg_exe())
    assert exe.is_file() and exe.stat().st_mode & stat.S_IXUSR
    assert "imageio_ffmpeg" in str(exe) or "IMAGEIO_FFMPEG_EXE" in os.environ


def test_encode_mp4_is_browser_playable(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    info = encode_mp4(gradient(), path, FPS)

    assert info == {
        "path": str(path),
        "bytes": path.stat().st_size,
        "frames": COUNT,
        "width": W,
        "height": H,
        "fps": FPS,
        "codec": "h264",
        "pix_fmt": "yuv420p",
    }
    assert info["bytes"] > 0
    stream = probe(path)
    assert stream["codec_name"] == "h264"
    assert stream["pix_fmt"] == "yuv420p"
    assert (stream["width"], stream["height"]) == (W, H)
    assert stream["r_frame_rate"] == f"{FPS}/1"
    assert int(stream["nb_read_frames"]) == COUNT
    assert leftovers(tmp_path, "out.mp4") == []  # no temporary file left behind


def test_faststart_puts_moov_before_mdat(tmp_path: Path) -> None:
    path = tmp_path / "fast.mp4"
    encode_mp4(gradient(), path, FPS)
    data = path.read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat")
    boxes = top_level_boxes(data)
    assert boxes[0] == "ftyp"
    assert boxes.index("moov") < boxes.index("mdat"), boxes


def test_colours_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "red.mp4"
    encode_mp4(solid((255, 0, 0)), path, FPS)
    frames = decode(path, W, H)
    assert frames.shape == (COUNT, H, W, 3)
    r, g, b = frames.reshape(-1, 3).mean(axis=0)
    assert r > 240 and g < 15 and b < 15, (r, g, b)


def test_frame_content_round_trips(tmp_path: Path) -> None:
    src = gradient()
    path = tmp_path / "gradient.mp4"
    encode_mp4(src, path, FPS, crf=10)
    frames = decode(path, W, H)
    # Frame order kept and content close (yuv420p subsamples colour; compare frame means).
    diff = np.abs(frames.astype(float).mean(axis=(1, 2)) - src.astype(float).mean(axis=(1, 2)))
    assert diff.max() < 6, diff


def test_float_frames_are_rounded_and_clipped(tmp_path: Path) -> None:
    frames = np.full((3, H, W, 3), 0.5, dtype=np.float32)
    frames[:, :, : W // 2] = -0.7  # clipped to 0
    frames[:, :, W // 2 :, 0] = 1.9  # clipped to 1
    path = tmp_path / "float.mp4"
    info = encode_mp4(frames.astype(np.float64), path, 4)
    assert info["frames"] == 3 and probe(path)["nb_read_frames"] == "3"
    decoded = decode(path, W, H).astype(float)
    left = decoded[:, 8:-8, 4 : W // 2 - 8].mean(axis=(0, 1, 2))
    right = decoded[:, 8:-8, W // 2 + 8 : -4].mean(axis=(0, 1, 2))
    assert np.all(left < 6), left
    assert right[0] > 240 and abs(right[1] - 128) < 8 and abs(right[2] - 128) < 8, right


def test_list_of_pil_images(tmp_path: Path) -> None:
    images = [Image.new("RGB", (W, H), (0, 0, 255)), Image.new("RGBA", (W, H), (0, 0, 255, 255))]
    info = encode_mp4(images, tmp_path / "pil.mp4", 2)
    assert (info["frames"], info["width"], info["height"]) == (2, W, H)
    assert decode(tmp_path / "pil.mp4", W, H).reshape(-1, 3).mean(axis=0)[2] > 240


def test_replaces_an_existing_file_only_on_success(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "v.mp4"
    path.write_bytes(b"old")
    encode_mp4(gradient(2), path, FPS)
    assert probe(path)["nb_read_frames"] == "2"

    previous = path.read_bytes()
    fake = tmp_path / "fake-ffmpeg"
    fake.write_text("#!/bin/sh\ncat >/dev/null\necho 'fake: the disk caught fire' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(video, "ffmpeg_exe", lambda: str(fake))
    with pytest.raises(RuntimeError, match="exit status 3.*the disk caught fire"):
        encode_mp4(gradient(), path, FPS)
    assert path.read_bytes() == previous
    assert leftovers(tmp_path, "v.mp4") == ["fake-ffmpeg"]


def test_ffmpeg_dying_early_reports_its_stderr_not_a_broken_pipe(tmp_path, monkeypatch) -> None:
    fake = tmp_path / "fake-ffmpeg"
    fake.write_text("#!/bin/sh\necho \"Unknown encoder 'libx264'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(video, "ffmpeg_exe", lambda: str(fake))
    big = np.zeros((20, 256, 256, 3), dtype=np.uint8)  # far more than a pipe buffer
    with pytest.raises(RuntimeError, match="Unknown encoder 'libx264'"):
        encode_mp4(big, tmp_path / "x.mp4", FPS)
    assert leftovers(tmp_path, "fake-ffmpeg") == []


def test_real_ffmpeg_failure_quotes_its_stderr(tmp_path: Path, monkeypatch) -> None:
    # Let an x264 preset that does not exist through our check, so the real ffmpeg refuses it.
    monkeypatch.setattr(video, "X264_PRESETS", (*video.X264_PRESETS, "bogus"))
    with pytest.raises(RuntimeError, match=r"ffmpeg failed \(exit status [1-9]\d*\).*bogus"):
        encode_mp4(gradient(), tmp_path / "x.mp4", FPS, preset="bogus")
    assert list(tmp_path.iterdir()) == []


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        encode_mp4(gradient(), tmp_path / "missing-dir" / "x.mp4", FPS)
    assert not (tmp_path / "missing-dir").exists()


@pytest.mark.parametrize("size", [(65, 48), (64, 47)])
def test_odd_size_is_refused(tmp_path: Path, size: tuple[int, int]) -> None:
    width, height = size
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros((2, height, width, 3), np.uint8), tmp_path / "x.mp4", FPS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "frames,match",
    [
        (np.zeros((0, H, W, 3), np.uint8), "no frames"),
        ([], "no frames"),
        (np.zeros((H, W, 3), np.uint8), "shape"),
        (np.zeros((2, H, W, 4), np.uint8), "shape"),
        (np.zeros((2, H, W, 3), np.int32), "dtype"),
        ([Image.new("RGB", (W, H)), Image.new("RGB", (W + 2, H))], "same size"),
        ("frames.png", "array or a sequence"),
    ],
    ids=["zero-frames", "empty-list", "3d", "rgba", "int32", "mixed-sizes", "str"],
)
def test_bad_frames_are_refused(tmp_path: Path, frames, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_mp4(frames, tmp_path / "x.mp4", FPS)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"fps": 0}, "fps"),
        ({"fps": 121}, "fps"),
        ({"fps": 8.5}, "fps"),
        ({"fps": True}, "fps"),
        ({"fps": 8, "crf": 52}, "crf"),
        ({"fps": 8, "preset": "warp9; rm -rf /"}, "preset"),
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_mp4(gradient(1), tmp_path / "x.mp4", **kwargs)


def test_fps_bounds_are_accepted(tmp_path: Path) -> None:
    for fps in (1, 120):
        path = tmp_path / f"{fps}.mp4"
        encode_mp4(gradient(1), path, fps, preset="ultrafast")
        assert probe(path)["r_frame_rate"] == f"{fps}/1"


# --- names and posters ------------------------------------------------------------------------


def test_video_filename_format_and_uniqueness() -> None:
    pattern = re.compile(r"video_\d{8}_\d{6}_[0-9a-f]{8}\.mp4")
    names = [video_filename() for _ in range(1000)]
    assert all(pattern.fullmatch(n) for n in names), names[:3]
    assert len(set(names)) == 1000


def test_video_filename_with_time_and_id() -> None:
    when = datetime(2024, 3, 9, 7, 5, 1)
    assert video_filename(when, "DEADBEEF") == "video_20240309_070501_deadbeef.mp4"
    assert video_filename(when).startswith("video_20240309_070501_")
    for bad in ("abc", "0123456789", "../../x", "ghijklmn"):
        with pytest.raises(ValueError):
            video_filename(when, bad)


def test_poster_jpeg_is_the_first_frame() -> None:
    frames = np.concatenate([solid((255, 0, 0), 1), solid((0, 0, 255), 1)])
    for source in (frames, frames[0], Image.fromarray(frames[0]), frames.astype(float) / 255):
        data = poster_jpeg(source)
        assert data[:3] == b"\xff\xd8\xff"
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and img.size == (W, H) and img.mode == "RGB"
        r, g, b = np.asarray(img).reshape(-1, 3).mean(axis=0)
        assert r > 240 and g < 15 and b < 15, (r, g, b)
