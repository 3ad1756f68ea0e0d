"""`serving.batch` without Ray or servers: manifests (JSON Lines, CSV), row ids, image sources,
and whole runs against an in-process fake of the farm's HTTP API (resume, retries, stop)."""

from __future__ import annotations

import io
import json
import os
import threading
import time

import pytest

from serving import batch
from serving.batch import (
    ImageLimits,
    ManifestRow,
    RowError,
    StorageScope,
    UsageError,
    assign_ids,
    check_row,
    parse_manifest,
    read_image,
    read_manifest,
    run_batch,
)
from serving.client import FarmClientError
from serving.storage import LocalStorage
from tests.helpers import make_image


def png(width=96, height=80, seed=0) -> bytes:
    buf = io.BytesIO()
    make_image(width, height, seed).save(buf, "PNG")
    return buf.getvalue()


# --- manifests ---------------------------------------------------------------------------------


def test_jsonl_rows_keep_their_line_numbers_and_bad_lines_are_rows_with_an_error():
    text = '\n'.join([
        '{"image": "a.png", "prompt": "waves"}',
        '',
        '{"image": "b.png", "prompt": "cat", "num_frames": 8}',
        '{broken',
        '["a", "list"]',
        '   ',
        '{"image": "c.png", "prompt": "x"}',
    ])
    rows = parse_manifest(text, "jsonl")
    assert [r.line for r in rows] == [1, 3, 4, 5, 7]
    assert rows[1].fields == {"image": "b.png", "prompt": "cat", "num_frames": 8}
    assert rows[2].fields is None and "not valid JSON" in rows[2].error
    assert rows[3].fields is None and "JSON object" in rows[3].error


def test_csv_rows_start_lines_multiline_cells_empty_cells_and_extra_cells():
    text = (
        "image,prompt,num_frames,preset\n"
        "a.png,waves,8,fast\n"
        "\n"
        'b.png,"a cat,\nturning",,\n'
        "c.png,x,8,fast,surplus\n"
        "d.png,y\n"
    )
    rows = parse_manifest(text, "csv")
    assert [r.line for r in rows] == [2, 4, 6, 7]
    assert rows[0].fields == {"image": "a.png", "prompt": "waves", "num_frames": "8", "preset": "fast"}
    assert rows[1].fields == {"image": "b.png", "prompt": "a cat,\nturning"}  # empty cells: left out
    assert rows[2].fields is None and "5 cells" in rows[2].error
    assert rows[3].fields == {"image": "d.png", "prompt": "y"}


@pytest.mark.parametrize("header, message", [("image,prompt,image", "repeats image"),
                                             ("image,,prompt", "empty column name")])
def test_csv_header_mistakes_are_usage_errors(header, message):
    with pytest.raises(UsageError, match=message):
        parse_manifest(header + "\na.png,b,c\n", "csv")


def test_format_from_suffix_or_content_and_missing_manifest(tmp_path):
    (tmp_path / "m.txt").write_text('{"image": "a.png", "prompt": "p"}\n')
    (tmp_path / "m2.txt").write_text("image,prompt\na.png,p\n")
    (tmp_path / "m.csv").write_text("\ufeffimage,prompt\na.png,p\n")  # a BOM from a spreadsheet
    assert read_manifest(tmp_path / "m.txt")[0].fields == {"image": "a.png", "prompt": "p"}
    assert read_manifest(tmp_path / "m2.txt")[0].fields == {"image": "a.png", "prompt": "p"}
    assert read_manifest(tmp_path / "m.csv")[0].fields == {"image": "a.png", "prompt": "p"}
    with pytest.raises(UsageError, match="no manifest"):
        read_manifest(tmp_path / "nope.jsonl")


# --- rows: validation, images, ids -------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path):
    root = tmp_path / "work"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(png(seed=1))
    (root / "img" / "b.png").write_bytes(png(seed=2))
    (root / "corrupt.png").write_bytes(png()[:200])
    (tmp_path / "outside.png").write_bytes(png(seed=3))
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    return root


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(tmp_path / "store")


def _check(rows, root, storage, spool, **kw):
    kw.setdefault("scope", StorageScope.admin())
    checked = [check_row(m, root=root, storage=storage, limits=ImageLimits(), spool=spool, **kw) for m in rows]
    assign_ids(checked)
    return checked


def _rows(*fields):
    return [ManifestRow(i + 1, f) for i, f in enumerate(fields)]


@pytest.mark.parametrize("fields, code, field, words", [
    ({"image": "img/a.png"}, "invalid_request", "prompt", "'prompt' is required"),
    ({"image": "img/a.png", "prompt": "p", "num_frames": 64}, "invalid_request", "num_frames", "between 8 and 32"),
    ({"image": "img/a.png", "prompt": "p", "strength": 0.5}, "invalid_request", "strength", "unknown field 'strength'"),
    ({"prompt": "p"}, "invalid_request", "image", "'image' is required"),
    ({"image": "missing.png", "prompt": "p"}, "image_not_found", "image", "no image file"),
    ({"image": "../outside.png", "prompt": "p"}, "image_outside_working_dir", "image", "outside"),
    ({"image": "link.png", "prompt": "p"}, "image_outside_working_dir", "image", "outside"),
    ({"image": "corrupt.png", "prompt": "p"}, "corrupt_image", "image", "corrupt"),
    ({"image": "ftp://host/a.png", "prompt": "p"}, "bad_image_source", "image", "unsupported image source"),
    ({"image": "s3://nope.png", "prompt": "p"}, "image_not_found", "image", "no object"),
    ({"image": "img", "prompt": "p"}, "image_not_found", "image", "directory"),
    ({"image": "img/a.png", "prompt": "p", "id": ""}, None, None, None),  # an empty id: derived
    ({"image": "img/a.png", "prompt": "p", "id": {"x": 1}}, "invalid_request", "id", "'id' must be"),
    # reuse and webhooks: checked as POST /v1/jobs checks them
    ({"image": "img/a.png", "prompt": "p", "reuse": "maybe"}, "invalid_request", "reuse", "true or false"),
    ({"image": "img/a.png", "prompt": "p", "webhook": "ftp://hooks.example.com/h"}, "invalid_request", "webhook",
     "https://"),
    ({"image": "img/a.png", "prompt": "p", "webhook": "https://127.0.0.1:9/h"}, "egress_refused", "webhook",
     "loopback"),
    ({"image": "img/a.png", "prompt": "p", "webhook": ["x"]}, "invalid_request", "webhook", "must be a URL"),
    ({"image": "img/a.png", "prompt": "p", "webhook_events": "failed"}, "invalid_request", "webhook_events",
     "needs a 'webhook'"),
    ({"image": "img/a.png", "prompt": "p", "webhook": "https://127.0.0.1:9/h", "webhook_events": "sometimes"},
     "invalid_request", "webhook_events", "must name events"),
])
def test_bad_rows_are_invalid_with_code_field_and_message(workdir, storage, tmp_path, fields, code, field, words):
    [row] = _check(_rows(fields), workdir, storage, tmp_path)
    if code is None:
        assert row.status == "pending" and len(row.id) == 16
        return
    assert row.status == "invalid", row.record()
    assert row.error["code"] == code and row.error["field"] == field
    assert words in row.error["message"]


def test_absolute_paths_inside_the_working_dir_are_fine_outside_not(workdir, storage, tmp_path):
    inside, outside = _check(_rows({"image": str(workdir / "img/a.png"), "prompt": "p"},
                                   {"image": str(tmp_path / "outside.png"), "prompt": "p"}), workdir, storage, tmp_path)
    assert inside.status == "pending" and inside.image_path == (workdir / "img/a.png").resolve()
    assert outside.status == "invalid" and outside.error["code"] == "image_outside_working_dir"


def test_s3_keys_are_read_from_the_farms_storage_and_spooled(workdir, storage, tmp_path):
    storage.put_bytes("uploads/cat.png", png(seed=7))
    spool = tmp_path / "spool"
    spool.mkdir()
    [row] = _check(_rows({"image": "s3://uploads/cat.png", "prompt": "p"}), workdir, storage, spool)
    assert row.status == "pending" and row.image_path.parent == spool
    assert row.image_path.read_bytes() == png(seed=7)
    with pytest.raises(RowError, match="bad storage key") as err:
        read_image("s3://../x.png", root=workdir, storage=storage, limits=ImageLimits(), scope=StorageScope.admin())
    assert err.value.status == "invalid" and err.value.code == "bad_image_source"


def test_images_over_the_farms_limit_are_refused(workdir, storage):
    limits = ImageLimits(max_bytes=1024)
    with pytest.raises(RowError, match="at most") as err:
        read_image("img/a.png", root=workdir, storage=storage, limits=limits)
    assert err.value.code == "image_too_large"


def test_row_ids_are_stable_and_follow_the_render_not_the_format(workdir, storage, tmp_path):
    jsonl = parse_manifest('{"image": "img/a.png", "prompt": "waves", "num_frames": 8, "preset": "fast"}\n'
                           '{"image": "img/b.png", "prompt": "cat"}\n', "jsonl")
    csv_ = parse_manifest("prompt,image,preset,num_frames,priority\ncat,img/b.png,,,low\n"
                          "waves,img/a.png,fast,8,\n", "csv")
    a, b = _check(jsonl, workdir, storage, tmp_path)
    b2, a2 = _check(csv_, workdir, storage, tmp_path)
    assert (a.id, b.id) == (a2.id, b2.id)  # same content, other format, other order, other priority
    again = _check(jsonl, workdir, storage, tmp_path)
    assert [r.id for r in again] == [a.id, b.id]
    # a preset and the fields it stands for are the same render
    [explicit] = _check(_rows({"image": "img/a.png", "prompt": "waves", "resolution": "512p", "num_frames": 8,
                               "num_inference_steps": 30, "guidance_scale": 9, "fps": 8}), workdir, storage, tmp_path)
    assert explicit.id == a.id
    # the prompt or the image's bytes make another row
    [other] = _check(_rows({"image": "img/a.png", "prompt": "waves!", "preset": "fast", "num_frames": 8}),
                     workdir, storage, tmp_path)
    assert other.id != a.id
    (workdir / "img" / "a.png").write_bytes(png(seed=9))
    [changed] = _check(jsonl[:1], workdir, storage, tmp_path)
    assert changed.id != a.id


@pytest.fixture
def hooks_dns():
    """`hooks.example.com` resolves to a public address (no real DNS in unit tests)."""
    from serving import egress

    old = egress.set_resolver(lambda host, port: {"hooks.example.com": ["93.184.215.14"]}.get(host, []))
    yield
    egress.set_resolver(old)


def test_rows_carry_reuse_and_webhooks_which_do_not_change_their_id(workdir, storage, tmp_path, hooks_dns):
    csv_ = parse_manifest("image,prompt,reuse,webhook,webhook_events\n"
                          "img/a.png,waves,false,https://hooks.example.com/h,\"failed,succeeded\"\n"
                          "img/a.png,waves,,,\n"
                          "img/b.png,cat,true,https://hooks.example.com/h,all\n", "csv")
    hooked, plain, kept = _check(csv_, workdir, storage, tmp_path)
    assert hooked.status == plain.status == kept.status == "pending"
    assert hooked.fields["reuse"] is False and hooked.fields["webhook"] == "https://hooks.example.com/h"
    assert hooked.fields["webhook_events"] == ["succeeded", "failed"]
    assert "reuse" not in plain.fields and "webhook" not in plain.fields  # the farm's defaults
    assert "reuse" not in kept.fields and kept.fields["webhook_events"] == ["succeeded", "failed", "canceled"]
    # the same render: the same digest; the repeat is numbered as any repeat is
    assert hooked.digest == plain.digest and plain.id == hooked.id + "-2"
    [unresolved] = _check(_rows({"image": "img/a.png", "prompt": "p", "webhook": "https://nowhere.example.com/h"}),
                          workdir, storage, tmp_path)
    assert (unresolved.status, unresolved.error["field"]) == ("invalid", "webhook")


def test_a_run_submits_reuse_and_webhooks_and_reports_bad_ones_per_row(workdir, farm, storage, hooks_dns):
    rows = [{"image": "img/a.png", "prompt": "fresh", "reuse": False},
            {"image": "img/b.png", "prompt": "hooked", "webhook": "https://hooks.example.com/h",
             "webhook_events": ["failed"]},
            {"image": "img/a.png", "prompt": "inside", "webhook": "https://169.254.169.254/latest"},
            {"image": "img/b.png", "prompt": "plain"}]
    code, lines, summary, log = _run(workdir, farm, storage, _manifest(workdir, rows))
    assert code == 0, log
    assert [(l["status"], (l["error"] or {}).get("code")) for l in lines] == [
        ("succeeded", None), ("succeeded", None), ("invalid", "egress_refused"), ("succeeded", None)]
    assert lines[2]["error"]["field"] == "webhook" and "line 3" in log
    sent = {j["params"]["prompt"]: j["params"] for j in farm.jobs.values()}
    assert set(sent) == {"fresh", "hooked", "plain"}
    assert sent["fresh"]["reuse"] is False and "webhook" not in sent["fresh"]
    assert (sent["hooked"]["webhook"], sent["hooked"]["webhook_events"]) == ("https://hooks.example.com/h", ["failed"])
    assert not {"reuse", "webhook", "webhook_events"} & set(sent["plain"])


def test_repeated_rows_get_numbered_ids_and_a_repeated_explicit_id_is_invalid(workdir, storage, tmp_path):
    same = {"image": "img/a.png", "prompt": "waves"}
    rows = _check(_rows(same, {"id": "sku-1", **same}, same, {"id": "sku-1", "image": "img/b.png", "prompt": "x"},
                        {"id": 42, "image": "img/b.png", "prompt": "x"}), workdir, storage, tmp_path)
    assert rows[2].id == rows[0].id + "-2"
    assert rows[1].id == "sku-1" and rows[1].status == "pending"
    assert rows[3].status == "invalid" and rows[3].error["code"] == "duplicate_id"
    assert "line 2" in rows[3].error["message"]
    assert rows[4].id == "42"


# --- whole runs against a fake farm ------------------------------------------------------------


class FakeFarm:
    """The farm's HTTP API as `FarmClient.request` sees it, in process."""

    url = "http://fake-farm"

    def __init__(self, storage: LocalStorage):
        self.storage = storage
        self.jobs: dict[str, dict] = {}
        self.keys: dict[str, str] = {}
        self.posts = 0
        self.created = 0
        self.fail_prompts: set[str] = set()
        self.busy_answers = 0  # the next N submissions answer 429
        self.down = False
        self.hold = threading.Event()  # jobs stay running until set
        self.hold.set()
        self.refuse: dict[str, tuple[int, str]] = {}  # prompt -> (status, code)
        self.me = {"name": "anonymous", "admin": True, "max_priority": "high"}  # GET /v1/me
        self.lock = threading.Lock()

    def request(self, method, path, body=None, headers=None):
        if self.down:
            raise FarmClientError("cannot reach the farm at http://fake-farm: Connection refused")
        with self.lock:
            if method == "GET" and path == "/v1/info":
                return 200, {"image": {"max_bytes": 20 * 2**20, "max_pixels": 36_000_000, "min_side": 64}}, {}
            if method == "GET" and path == "/v1/me":
                return 200, dict(self.me), {}
            if method == "POST" and path == "/v1/jobs":
                return self._submit(body, headers or {})
            if method == "GET" and path.startswith("/v1/jobs/"):
                return self._get(path.rsplit("/", 1)[1])
        return 404, {"error": {"code": "not_found", "message": path}}, {}

    def _submit(self, body, headers):
        self.posts += 1
        assert body["image"] and "id" not in body
        if self.busy_answers:
            self.busy_answers -= 1
            return 429, {"error": {"code": "backlogged", "message": "full"}}, {"Retry-After": "1"}
        if body["prompt"] in self.refuse:
            status, code = self.refuse[body["prompt"]]
            return status, {"error": {"code": code, "message": f"{code}!", "field": None}}, {}
        key = headers.get("Idempotency-Key")
        if key in self.keys:
            return 200, self.jobs[self.keys[key]], {}
        job_id = f"{len(self.jobs) + 1:032x}"
        self.created += 1
        self.jobs[job_id] = {"id": job_id, "status": "queued", "vram_class": "12gb", "params": {**body, "seed": 7},
                             "created_at": "2026-01-01T00:00:00+00:00", "timings": {}, "result": None, "error": None}
        self.jobs[job_id]["params"].pop("image")
        self.keys[key] = job_id
        return 202, self.jobs[job_id], {}

    def _get(self, job_id):
        job = self.jobs.get(job_id)
        if job is None:
            return 404, {"error": {"code": "not_found", "message": "no job"}}, {}
        if job["status"] == "queued":
            job["status"] = "running"
        elif job["status"] == "running" and self.hold.is_set():
            if job["params"]["prompt"] in self.fail_prompts:
                job.update(status="failed", error={"code": "out_of_memory", "message": "ran out of memory"})
            else:
                key = f"jobs/2026/01/01/{job_id}/video.mp4"
                self.storage.put_bytes(key, b"\x00\x00\x00\x18ftypmp42")
                job.update(status="succeeded", result={"key": key}, timings={"total": 0.1})
        return 200, dict(job), {}


@pytest.fixture
def farm(storage):
    return FakeFarm(storage)


def _manifest(workdir, rows, name="m.jsonl"):
    path = workdir / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(workdir, farm, storage, manifest, **kw):
    out = io.StringIO()
    kw.setdefault("poll_s", 0.01)
    code = run_batch(manifest, client=farm, storage=storage, root=workdir, out=out, **kw)
    lines = [json.loads(line) for line in storage.get_bytes("batches/m/summary.jsonl").decode().splitlines()]
    counts = json.loads(storage.get_bytes("batches/m/summary.json"))
    return code, lines, counts, out.getvalue()


VALID = [{"image": "img/a.png", "prompt": "waves", "preset": "fast"},
         {"image": "img/b.png", "prompt": "cat", "num_frames": 8, "id": "sku-2"},
         {"image": "img/a.png", "prompt": "zoom", "resolution": "768p"}]
BAD = [{"image": "img/a.png"}, {"image": "nope.png", "prompt": "x"}]


def test_a_run_renders_valid_rows_reports_bad_ones_and_a_rerun_renders_nothing(workdir, farm, storage):
    manifest = _manifest(workdir, VALID + BAD)
    code, lines, summary, log = _run(workdir, farm, storage, manifest, concurrency=2, priority="low")
    assert code == 0, log
    assert summary["counts"] == {"rows": 5, "succeeded": 3, "failed": 0, "invalid": 2, "skipped": 0,
                                 "running": 0, "pending": 0}
    assert summary["finished"] and summary["exit_code"] == 0
    assert [(l["line"], l["status"]) for l in lines] == [(1, "succeeded"), (2, "succeeded"), (3, "succeeded"),
                                                         (4, "invalid"), (5, "invalid")]
    assert lines[1]["id"] == "sku-2" and lines[3]["error"]["field"] == "prompt"
    for line in lines[:3]:
        assert storage.exists(line["video_key"]) and line["job_id"] and line["seed"] == 7
    assert all(j["params"]["priority"] == "low" for j in farm.jobs.values())
    assert "3 succeeded, 0 failed, 2 invalid, 0 skipped" in log and "line 4" in log
    assert farm.created == 3

    code, lines, summary, log = _run(workdir, farm, storage, manifest, concurrency=2)
    assert code == 0 and farm.created == 3 and farm.posts == 3  # nothing submitted again
    assert summary["counts"]["skipped"] == 3 and summary["counts"]["succeeded"] == 0
    assert sorted(l["video_key"] for l in lines[:3]) == sorted(j["result"]["key"] for j in farm.jobs.values())


def test_a_failed_row_exits_1_and_the_next_run_tries_a_fresh_job_up_to_max_attempts(workdir, farm, storage):
    manifest = _manifest(workdir, VALID[:2])
    farm.fail_prompts.add("cat")
    code, lines, summary, _ = _run(workdir, farm, storage, manifest, max_attempts=2)
    assert code == 1 and summary["counts"]["failed"] == 1
    failed = lines[1]
    assert failed["status"] == "failed" and failed["error"]["code"] == "out_of_memory" and failed["attempt"] == 1
    code, lines, _, _ = _run(workdir, farm, storage, manifest, max_attempts=2)  # attempt 2: a new job
    assert code == 1 and farm.created == 3 and lines[1]["attempt"] == 2
    code, lines, _, log = _run(workdir, farm, storage, manifest, max_attempts=2)  # no third attempt
    assert code == 1 and farm.created == 3 and "not retried" in lines[1]["error"]["message"]
    assert lines[1]["failures"] == 2 and lines[1]["error"]["code"] == "out_of_memory"
    farm.fail_prompts.clear()
    code, lines, summary, _ = _run(workdir, farm, storage, manifest, max_attempts=3)
    assert code == 0 and farm.created == 4 and lines[1]["status"] == "succeeded" and lines[1]["attempt"] == 3


def test_busy_farm_waits_retry_after_and_refusals_are_invalid(workdir, farm, storage):
    manifest = _manifest(workdir, VALID[:1] + [{"image": "img/b.png", "prompt": "huge"}])
    farm.busy_answers = 1
    farm.refuse["huge"] = (422, "no_class_fits")
    t0 = time.monotonic()
    code, lines, summary, _ = _run(workdir, farm, storage, manifest, concurrency=1)
    assert time.monotonic() - t0 >= 1.0  # Retry-After: 1
    assert code == 0 and lines[0]["status"] == "succeeded"
    assert lines[1]["status"] == "invalid" and lines[1]["error"]["code"] == "no_class_fits"


def test_farm_down_at_start_is_a_usage_error_and_later_fails_rows_not_the_run(workdir, farm, storage):
    manifest = _manifest(workdir, VALID)
    farm.down = True
    with pytest.raises(UsageError, match="does not answer"):
        run_batch(manifest, client=farm, storage=storage, root=workdir, out=io.StringIO(), connect_timeout=0)

    farm.down = False
    real_submit = farm._submit

    def submit_then_go_down(body, headers):
        reply = real_submit(body, headers)
        farm.down = True  # the first row got in; then the farm goes away
        return reply

    farm._submit = submit_then_go_down
    code, lines, summary, log = _run(workdir, farm, storage, manifest, concurrency=1, unreachable_timeout=0)
    assert code == 1 and summary["counts"]["failed"] == 3
    assert all(l["error"]["code"] == "farm_unreachable" for l in lines)
    assert lines[0]["job_id"]  # it was accepted: the next run picks that job up under the same key
    farm.down = False
    farm._submit = real_submit
    code, lines, summary, _ = _run(workdir, farm, storage, manifest)
    assert code == 0 and farm.created == 3 and summary["counts"]["succeeded"] == 3


def test_a_stopped_run_keeps_what_finished_and_the_next_run_renders_nothing_twice(workdir, farm, storage):
    manifest = _manifest(workdir, VALID)
    farm.hold.clear()  # jobs stay running
    stop = threading.Event()
    result = {}
    t = threading.Thread(target=lambda: result.update(code=run_batch(
        manifest, client=farm, storage=storage, root=workdir, out=io.StringIO(), stop=stop, concurrency=2,
        poll_s=0.01)))
    t.start()
    deadline = time.monotonic() + 10
    while farm.created < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stop.set()
    t.join(10)
    assert result["code"] == 143
    lines = [json.loads(line) for line in storage.get_bytes("batches/m/summary.jsonl").decode().splitlines()]
    summary = json.loads(storage.get_bytes("batches/m/summary.json"))
    assert summary["stopped"] and not summary["finished"]
    assert sorted(l["status"] for l in lines) == ["pending", "running", "running"]
    assert all(l["job_id"] for l in lines if l["status"] == "running")
    farm.hold.set()
    code, lines, summary, _ = _run(workdir, farm, storage, manifest)
    assert code == 0 and summary["counts"]["succeeded"] == 3 and farm.created == 3  # the 2 picked up again


def test_a_job_that_failed_after_its_run_stopped_is_tried_again_under_the_next_key(workdir, farm, storage):
    manifest = _manifest(workdir, VALID[:1])
    farm.hold.clear()
    stop = threading.Event()
    t = threading.Thread(target=run_batch, args=(manifest,), kwargs=dict(
        client=farm, storage=storage, root=workdir, out=io.StringIO(), stop=stop, poll_s=0.01))
    t.start()
    deadline = time.monotonic() + 10
    while farm.created < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stop.set()
    t.join(10)
    [job_id] = farm.jobs
    farm.fail_prompts.add("waves")
    farm.hold.set()
    farm._get(job_id)
    assert farm._get(job_id)[1]["status"] == "failed"  # while no batch ran
    farm.fail_prompts.clear()
    code, lines, _, _ = _run(workdir, farm, storage, manifest)
    assert code == 0 and farm.created == 2
    assert lines[0]["status"] == "succeeded" and lines[0]["attempt"] == 2 and lines[0]["failures"] == 1


def test_row_timeout_fails_the_row_and_the_next_run_picks_its_job_up(workdir, farm, storage):
    manifest = _manifest(workdir, VALID[:1])
    farm.hold.clear()
    code, lines, _, log = _run(workdir, farm, storage, manifest, row_timeout=0.2)
    assert code == 1 and lines[0]["error"]["code"] == "row_timeout" and lines[0]["job_status"] == "running"
    farm.hold.set()
    code, lines, _, _ = _run(workdir, farm, storage, manifest)
    assert code == 0 and farm.created == 1 and lines[0]["status"] == "succeeded"


def test_a_deleted_video_renders_again_and_a_changed_image_is_a_new_row(workdir, farm, storage):
    manifest = _manifest(workdir, VALID[:2])
    _, lines, _, _ = _run(workdir, farm, storage, manifest)
    storage.delete_prefix(lines[0]["video_key"].rsplit("/", 1)[0] + "/")
    code, lines, summary, _ = _run(workdir, farm, storage, manifest)
    assert code == 0 and farm.created == 3 and lines[0]["status"] == "succeeded" and lines[0]["attempt"] == 2
    assert lines[1]["status"] == "skipped"
    (workdir / "img" / "b.png").write_bytes(png(seed=11))
    code, lines, summary, _ = _run(workdir, farm, storage, manifest)
    # sku-2 keeps its id, but its content changed: rendered again
    assert farm.created == 4 and lines[1]["id"] == "sku-2" and lines[1]["status"] == "succeeded"


@pytest.fixture
def keep_umask():
    """`main()` sets the process umask (`file_mode`); put pytest's back afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def test_main_usage_errors_exit_2(tmp_path, monkeypatch, capsys, keep_umask):
    monkeypatch.chdir(tmp_path)
    assert batch.main(["missing.jsonl"]) == 2
    assert "no manifest" in capsys.readouterr().err
    (tmp_path / "m.jsonl").write_text("\n")
    monkeypatch.setenv("I2V_STORAGE_URL", f"file://{tmp_path / 'store'}")
    assert batch.main(["m.jsonl"]) == 2
    assert "no rows" in capsys.readouterr().err
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "prompt": "p"}\n')
    assert batch.main(["m.jsonl", "--url", "http://127.0.0.1:9", "--connect-timeout", "0", "--poll", "0.1"]) == 2
    assert "does not answer" in capsys.readouterr().err  # --poll at its floor is fine
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.setenv("I2V_STORAGE_URL", "file://./outputs")
    assert batch.main(["m.jsonl"]) == 2
    assert "temporary working directory" in capsys.readouterr().err


@pytest.mark.parametrize("poll", ["0", "0.01", "-1", "nan", "inf"])
def test_poll_below_the_floor_is_a_usage_error_before_anything_runs(tmp_path, monkeypatch, capsys, poll):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "prompt": "p"}\n')
    monkeypatch.setenv("I2V_STORAGE_URL", f"file://{tmp_path / 'store'}")
    # a farm that is not there: were the poll accepted, the run would get as far as "does not answer"
    assert batch.main(["m.jsonl", "--poll", poll, "--url", "http://127.0.0.1:9", "--connect-timeout", "0"]) == 2
    err = capsys.readouterr().err
    assert f"--poll must be at least {batch.MIN_POLL_S:g} seconds" in err and "does not answer" not in err
    assert not (tmp_path / "store").exists()  # refused before storage was opened


def test_run_batch_refuses_a_zero_poll(workdir, farm, storage):
    with pytest.raises(UsageError, match="poll_s must be"):
        run_batch(_manifest(workdir, VALID), client=farm, storage=storage, root=workdir, out=io.StringIO(), poll_s=0)
    assert farm.posts == 0


# --- whose s3:// keys, and egress -----------------------------------------------------------------

ALICE_JOB, BOB_JOB = "a1" * 16, "b0" * 16


class Identity:
    """The two farm calls the scope makes (`GET /v1/me`, `GET /v1/jobs/<id>`), as one caller sees them."""

    url = "http://fake-farm"

    def __init__(self, name="alice", admin=False, me_status=200):
        self.name, self.admin, self.me_status = name, admin, me_status
        self.jobs = {ALICE_JOB: "alice", BOB_JOB: "bob"}
        self.calls: list[str] = []

    def request(self, method, path, body=None, headers=None):
        self.calls.append(path)
        if path == "/v1/me":
            if self.me_status != 200:
                return self.me_status, {"error": {"code": "x", "message": "no"}}, {}
            return 200, {"name": self.name, "admin": self.admin, "max_priority": "normal"}, {}
        job_id = path.rsplit("/", 1)[1]
        owner = self.jobs.get(job_id)
        if owner is None or not (self.admin or owner == self.name):
            return 404, {"error": {"code": "not_found", "message": "no job"}}, {}
        return 200, {"id": job_id, "owner": owner, "created_at": "2026-01-01T10:00:00+00:00",
                     "prefix": f"jobs/2026/01/01/{job_id}/"}, {}


@pytest.fixture
def stored(storage):
    for key, seed in (("uploads/alice/a.png", 1), ("uploads/bob/b.png", 2), ("uploads/top.png", 3),
                      (f"jobs/2026/01/01/{ALICE_JOB}/input.png", 4), (f"jobs/2026/01/01/{BOB_JOB}/input.png", 5)):
        storage.put_bytes(key, png(seed=seed))
    return storage


def _read(key, stored, workdir, scope):
    return read_image("s3://" + key, root=workdir, storage=stored, limits=ImageLimits(), scope=scope)


def test_s3_keys_only_within_the_callers_uploads_and_jobs(stored, workdir):
    alice = Identity("alice")
    scope = StorageScope(alice)
    assert _read("uploads/alice/a.png", stored, workdir, scope) == png(seed=1)
    assert _read(f"jobs/2026/01/01/{ALICE_JOB}/input.png", stored, workdir, scope) == png(seed=4)
    for key, words in (("uploads/bob/b.png", "uploads/alice/"),
                       ("uploads/bob/missing.png", "uploads/alice/"),  # not "not found": existence is not told
                       ("uploads/top.png", "uploads/alice/"),
                       ("uploads/alicex/a.png", "uploads/alice/"),
                       ("batches/m/summary.jsonl", "uploads/alice/"),
                       (f"jobs/2026/01/01/{BOB_JOB}/input.png", f"job {BOB_JOB} is not one of 'alice'"),
                       (f"jobs/2026/01/02/{ALICE_JOB}/input.png", "is not one of"),  # not that job's prefix
                       ):
        with pytest.raises(RowError) as err:
            _read(key, stored, workdir, scope)
        assert (err.value.status, err.value.code, err.value.field) == ("invalid", "image_forbidden", "image"), key
        assert words in err.value.message and f"s3://{key} is not yours" in err.value.message
    for key in ("uploads/alice/../bob/b.png", "uploads/alice//a.png", "./uploads/alice/a.png", "uploads/alice/"):
        with pytest.raises(RowError) as err:
            _read(key, stored, workdir, scope)
        assert err.value.code == "bad_image_source", key
    # the farm is asked once who the caller is, and once per job
    assert alice.calls.count("/v1/me") == 1 and alice.calls.count(f"/v1/jobs/{BOB_JOB}") == 1


def test_an_admin_token_reads_any_key_and_without_a_caller_none(stored, workdir):
    scope = StorageScope(Identity("ops", admin=True))
    assert _read("uploads/bob/b.png", stored, workdir, scope) == png(seed=2)
    assert _read(f"jobs/2026/01/01/{ALICE_JOB}/input.png", stored, workdir, scope) == png(seed=4)
    with pytest.raises(RowError, match="no object"):
        _read("uploads/none.png", stored, workdir, scope)
    for scope, words in ((StorageScope(Identity(me_status=401)), "valid token"),
                         (StorageScope(Identity(me_status=404)), "does not say who"),
                         (StorageScope.nobody(), "not yours"),
                         (None, "not yours")):
        with pytest.raises(RowError, match=words) as err:
            _read("uploads/alice/a.png", stored, workdir, scope)
        assert err.value.code == "image_forbidden"


def test_a_run_refuses_other_callers_keys_and_inside_urls_as_row_errors(workdir, farm, stored):
    farm.me = {"name": "alice", "admin": False, "max_priority": "normal"}
    rows = [{"image": "s3://uploads/alice/a.png", "prompt": "mine"},
            {"image": "s3://uploads/bob/b.png", "prompt": "theirs"},
            {"image": "http://127.0.0.1:8000/metrics", "prompt": "the farm's own metrics"},
            {"image": "http://169.254.169.254/latest/meta-data/iam/", "prompt": "metadata"},
            {"image": "img/a.png", "prompt": "local"}]
    code, lines, summary, log = _run(workdir, farm, stored, _manifest(workdir, rows))
    assert code == 0, log
    assert [(l["status"], (l["error"] or {}).get("code")) for l in lines] == [
        ("succeeded", None), ("invalid", "image_forbidden"), ("invalid", "egress_refused"),
        ("invalid", "egress_refused"), ("succeeded", None)]
    assert "loopback" in lines[2]["error"]["message"] and "metadata" in lines[3]["error"]["message"]
    assert farm.posts == 2 and {j["params"]["prompt"] for j in farm.jobs.values()} == {"mine", "local"}
    assert "s3://uploads/bob/b.png is not yours" in log and "egress refused" in log


def test_the_batch_reads_egress_allow_from_its_environment():
    settings = batch.batch_settings({"I2V_EGRESS_ALLOW": "127.0.0.1, images.internal,10.0.0.0/8"})
    assert settings.egress_allow == ["127.0.0.1", "images.internal", "10.0.0.0/8"]
    policy = batch.EgressPolicy.from_settings(settings)
    policy.check_address("127.0.0.1", "127.0.0.1")
    policy.check_address("images.internal", "192.168.0.4")
    with pytest.raises(batch.EgressRefused):
        policy.check_address("127.0.0.2", "127.0.0.2")
    assert batch.batch_settings({}).egress_allow == []


def test_retry_after_in_seconds_or_as_an_http_date():
    import datetime
    import email.utils

    from serving.batch.farm import _retry_after

    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=30)
    assert 25 <= _retry_after({"Retry-After": email.utils.format_datetime(soon, usegmt=True)}) <= 31
    assert _retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 1.0  # past: at once (1 s)
    assert _retry_after({"Retry-After": "12"}) == 12.0 and _retry_after({"Retry-After": "999"}) == 60.0
    assert _retry_after({"Retry-After": "soon"}) == _retry_after({}) == _retry_after({"Retry-After": "nan"}) == 5.0


def test_a_stop_while_rows_are_checked_submits_nothing_and_says_so(workdir, farm, storage):
    manifest = _manifest(workdir, VALID)
    stop = threading.Event()
    stop.set()  # as a SIGTERM that lands while the rows are being checked
    out = io.StringIO()
    code = run_batch(manifest, client=farm, storage=storage, root=workdir, out=out, stop=stop)
    assert code == 143 and farm.created == 0
    assert "stopped while checking rows" in out.getvalue() and "nothing was submitted" in out.getvalue()
    assert not storage.exists("batches/m/summary.json")  # a previous run's summary would be left as it was
