"""The job manager's records are typed (`serving.jobs.JobRecord`; `serving/manager/records.py`):
what it writes is checked before the job store gets it (a misspelt key, a wrong status or a value
of the wrong type is refused and nothing is written), and what it reads back is a `JobRecord`, so
a row that is not a job record fails where it is read, naming the field, instead of reaching a
client. No Ray: the fake workers of test_manager.py over a real job store."""

from __future__ import annotations

import pytest

from serving.jobs import JobRecordError
from tests.unit.test_manager import IMAGE, SMALL, Farm, done, run_async, started


@run_async
async def test_a_misspelt_key_or_a_wrong_status_is_refused_before_anything_is_written(tmp_path):
    farm = Farm(tmp_path, replicas={"12gb": 0, "24gb": 0})
    job = await farm.submit()
    before = farm.record(job["id"])

    with pytest.raises(JobRecordError, match=r"bad change to job record '\w+': statsu: not a field of a job record"):
        farm.mgr._update(job["id"], statsu="failed")
    with pytest.raises(JobRecordError, match=r"status: Input should be 'queued', 'running', 'succeeded'"):
        farm.mgr._update(job["id"], status="done", finished_at="2026-01-01T00:00:00+00:00")
    with pytest.raises(JobRecordError, match=r"progress\.step: Input should be a valid integer.*; nodee: not a"):
        farm.mgr._defer(job["id"], progress={"step": "two", "total": 4}, nodee="n1")
    farm.mgr.store.flush()
    assert farm.record(job["id"]) == before  # none of it was written, deferred or not

    rec = farm.mgr._update(job["id"], note="checked", progress={"step": 1, "total": 4})
    assert (rec.status, rec.note, rec.progress) == ("queued", "checked", {"step": 1, "total": 4})
    assert farm.record(job["id"]) == {**before, "note": "checked", "progress": {"step": 1, "total": 4}}
    await farm.close()


@run_async
async def test_a_new_record_with_a_misspelt_key_is_never_created_nor_queued(tmp_path):
    farm = Farm(tmp_path, replicas={"12gb": 0, "24gb": 0})
    with pytest.raises(JobRecordError, match=r"webhok: not a field of a job record"):
        farm.mgr._submit(dict(SMALL), IMAGE, "png", 512, 512, None, "alice", None,
                         extra={"webhok": {"url": "https://example.test/hook", "events": ["succeeded"]}})
    assert farm.mgr.store.counts()["queued"] == 0 and farm.queued("12gb") == []
    assert list(farm.mgr.inbox.iterdir()) == []  # its input is not left behind
    job = await farm.submit(owner="alice")  # the same request, spelt right, is a job
    assert farm.queued("12gb") == [job["id"]] and farm.record(job["id"])["owner"] == "alice"
    await farm.close()


@run_async
async def test_views_show_the_stored_record_and_refuse_a_row_that_is_not_a_job(tmp_path):
    farm = Farm(tmp_path)
    job = await farm.submit()
    assert await farm.tick() == [(job["id"], "12gb")]
    await farm.end(job["id"], started(node="node-3"), done(key="jobs/v/video.mp4"))
    # a field this version does not name (an older or newer farm's) is kept, as stored
    farm.mgr.store.update(job["id"], legacy_field={"kept": True})
    stored = farm.record(job["id"])
    view = await farm.mgr.get(job["id"])
    want = {k: v for k, v in stored.items() if k != "seq"}
    want["estimate"] = {k: v for k, v in stored["estimate"].items() if k != "seconds_by_class"}
    assert view == want and view["legacy_field"] == {"kept": True} and view["status"] == "succeeded"
    assert (await farm.mgr.list())["jobs"] == [view]
    payload = farm.mgr._webhook_payload(job["id"])  # what a webhook POSTs: the view and its links
    assert {k: v for k, v in payload.items() if k not in ("links", "result")} == {
        k: v for k, v in view.items() if k != "result"}
    assert payload["result"]["key"] == "jobs/v/video.mp4" and payload["links"]["self"] == f"/v1/jobs/{job['id']}"

    # a row that is not a job record (written past the manager's checks) fails where it is read
    farm.mgr.store.update(job["id"], estimate=None)
    with pytest.raises(JobRecordError, match=rf"malformed job record '{job['id']}': estimate: Input should be"):
        await farm.mgr.get(job["id"])
    with pytest.raises(JobRecordError, match=r"estimate"):
        await farm.mgr.list()
    await farm.close()

