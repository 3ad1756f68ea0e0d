"""The job manager and live previews, without Ray (the fake workers of test_manager.py): only the
latest preview of a running job is kept, in memory, never in the job store, and it is gone when
the job ends."""

from __future__ import annotations

import json

from serving.jobs import PreviewEvent, WorkerEventError, parse_worker_event
from tests.unit.test_manager import Farm, done, progress, run_async, started


def preview(step: int, image: bytes, total: int = 4, seconds: float = 0.01) -> dict:
    return PreviewEvent(step=step, total=total, image=image, seconds=seconds).to_dict()


def _metric(farm, name: str) -> float:
    return farm.mgr.metrics.registry.get_sample_value(name, {"vram_class": "12gb"}) or 0.0


def test_preview_events_parse_and_refuse_what_is_malformed():
    ev = parse_worker_event(preview(2, b"\xff\xd8jpeg"))
    assert isinstance(ev, PreviewEvent) and (ev.step, ev.total, ev.image, ev.media_type) == (
        2, 4, b"\xff\xd8jpeg", "image/jpeg")
    try:
        parse_worker_event({"event": "preview", "step": 1, "total": 4})
    except WorkerEventError as exc:
        assert "malformed worker event 'preview': image: Field required" in str(exc)
    else:
        raise AssertionError("a preview without an image was accepted")


@run_async
async def test_only_the_latest_preview_is_kept_in_memory_until_the_job_ends(tmp_path):
    farm = Farm(tmp_path)
    job = await farm.submit()
    job_id = job["id"]
    assert await farm.tick() == [(job_id, "12gb")]
    assert await farm.mgr.preview(job_id) is None  # running, nothing yet
    await farm.feed(job_id, started(), progress(1), preview(1, b"IMG-FIRST-7f3a"), progress(2),
                    preview(2, b"IMG-SECOND-7f3a", seconds=0.03))

    latest = await farm.mgr.preview(job_id)
    assert latest == {"step": 2, "total": 4, "seq": 2, "media_type": "image/jpeg", "image": b"IMG-SECOND-7f3a"}
    view = await farm.mgr.get(job_id)
    assert view["preview"] == {"step": 2, "total": 4, "seq": 2}  # no image in the job's JSON
    stored = json.dumps(farm.record(job_id), default=str)
    assert "preview" not in farm.record(job_id) and "IMG-SECOND" not in stored and "IMG-FIRST" not in stored
    assert _metric(farm, "i2v_previews_total") == 2
    assert abs(_metric(farm, "i2v_preview_seconds_sum") - 0.04) < 1e-9

    await farm.end(job_id, progress(3), preview(3, b"IMG-THIRD-7f3a"), progress(4), done())
    assert farm.status(job_id) == "succeeded"
    assert await farm.mgr.preview(job_id) is None
    view = await farm.mgr.get(job_id)
    assert "preview" not in view and "IMG-THIRD" not in json.dumps(farm.record(job_id), default=str)
    assert _metric(farm, "i2v_previews_total") == 3
    await farm.close()
