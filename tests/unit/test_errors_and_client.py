"""Issue 17: one error type (`pipeline.errors.I2VError`: code, message, field, HTTP status,
Retry-After) from the job manager's replies to the API's JSON error body; the one JSON body parser
of `serving.api`; one HTTP client (`serving.client.FarmClient`, its `Reply`) that the harness's
readiness wait uses, against real loopback HTTP servers."""

from __future__ import annotations

import asyncio
import json

import pytest

from pipeline.errors import I2VError, InvalidImage, InvalidRequest
from serving import api, bodies, harness, manager
from serving.client import FarmClient, FarmClientError, Reply
from tests.helpers import http_server


def _body(response) -> dict:
    return json.loads(response.body)


def test_an_error_crosses_the_manager_boundary_and_keeps_status_code_field_and_retry_after():
    exc = I2VError("the farm is busy", code="backlogged", http_status=429, retry_after=12)
    reply = manager._error_reply(exc)
    assert reply == {"error": {"code": "backlogged", "message": "the farm is busy", "field": None},
                     "status": 429, "retry_after": 12}
    again = I2VError.from_reply(json.loads(json.dumps(reply)))  # as Ray would carry it: plain data
    assert (again.code, again.message, again.field, again.http_status, again.retry_after) == (
        "backlogged", "the farm is busy", None, 429, 12)
    with pytest.raises(I2VError) as raised:
        api._reply(reply)
    assert raised.value.http_status == 429 and raised.value.headers() == {"Retry-After": "12"}
    assert api._reply({"job": {"id": "x"}, "created": True}) == {"job": {"id": "x"}, "created": True}


def test_without_retry_after_the_reply_has_no_such_key_and_no_header():
    reply = I2VError("no job abc", code="not_found", http_status=404).reply()
    assert reply == {"error": {"code": "not_found", "message": "no job abc", "field": None}, "status": 404}
    assert I2VError.from_reply(reply).headers() is None


@pytest.mark.parametrize("exc, status, code, field", [
    (InvalidRequest("num_frames: too many", field="num_frames"), 422, "invalid_request", "num_frames"),
    (InvalidImage("not an image"), 400, "invalid_image", "image"),
    (InvalidImage("too large", code="image_too_large", http_status=413), 413, "image_too_large", "image"),
    (I2VError("token may not", code="priority_not_allowed", http_status=403, field="priority"), 403,
     "priority_not_allowed", "priority"),
    (I2VError("plain"), 400, "error", None),
])
def test_the_api_answers_every_error_with_its_status_and_the_json_error_body(exc, status, code, field):
    response = asyncio.run(api._i2v_error(None, exc))
    assert response.status_code == status
    assert _body(response) == {"error": {"code": code, "message": exc.message, "field": field}}
    assert "retry-after" not in response.headers


def test_the_api_sends_retry_after_of_a_manager_refusal():
    exc = I2VError.from_reply({"error": {"code": "too_many_active_jobs", "message": "wait", "field": None},
                               "status": 429, "retry_after": 30})
    response = asyncio.run(api._i2v_error(None, exc))
    assert response.status_code == 429 and response.headers["retry-after"] == "30"
    assert _body(response)["error"]["code"] == "too_many_active_jobs"


def test_one_json_body_parser():  # serving.bodies, used by every route that reads JSON
    assert bodies.json_body(b'{"a": 1}') == {"a": 1}
    assert bodies.json_body(b"", empty={}) == {}
    for body, message in [(b"", "the JSON body must be an object"), (b"[1]", "the JSON body must be an object"),
                          (b"{nope", "the body is not valid JSON: "),
                          (b"[" * 100_000, "the body is not valid JSON")]:
        with pytest.raises(I2VError) as raised:
            bodies.json_body(body)
        assert raised.value.code == "invalid_json" and raised.value.http_status == 400
        assert raised.value.message.startswith(message), raised.value.message
    with pytest.raises(I2VError, match="^the body is not valid JSON or form data$"):
        bodies.json_body(b"{nope", invalid="the body is not valid JSON or form data", objects=False)
    assert bodies.json_body(b'"tok"', objects=False) == "tok"


@pytest.fixture
def farm_like():
    answers = {
        "/readyz": (200, {"Content-Type": "application/json"}, b'{"status": "ready", "replicas": {"12gb": 1}}'),
        "/v1/jobs/bad": (422, {"Content-Type": "application/json", "Retry-After": "3"},
                         b'{"error": {"code": "invalid_request", "message": "fps: too high", "field": "fps"}}'),
        "/text": (200, {"Content-Type": "text/plain"}, b"hello"),
    }
    server, seen, url = http_server(lambda path: answers.get(path, (503, {"Content-Type": "application/json"},
                                                                    b'{"error": {"message": "models loading"}}')))
    yield url, seen
    server.shutdown()
    server.server_close()


def test_reply_reads_like_a_response_and_unpacks_as_before(farm_like):
    url, seen = farm_like
    client = FarmClient(url, token="t0k")
    r = client.request("GET", "/v1/jobs/bad")
    assert isinstance(r, Reply) and r.status_code == 422 and r.status == 422
    assert r.json()["error"]["field"] == "fps" and "fps: too high" in r.text
    assert r.headers["retry-after"] == "3" and r.headers.get("RETRY-AFTER") == "3"  # case-insensitive
    status, payload, headers = r  # what serving.batch unpacks
    assert status == 422 and payload == r.payload and headers["Retry-After"] == "3"
    text = client.request("GET", "/text")
    assert text.payload == b"hello" and text.text == "hello"
    assert seen[0]["authorization"] == "Bearer t0k"
    with pytest.raises(FarmClientError) as raised:
        client.call("GET", "/v1/jobs/bad")
    assert (raised.value.code, raised.value.field) == ("invalid_request", "fps")
    assert raised.value.message == "fps: too high"


def test_the_harness_waits_for_readiness_through_the_client(farm_like):
    url, seen = farm_like
    assert harness.readyz(url) == (200, {"status": "ready", "replicas": {"12gb": 1}})
    assert "authorization" not in seen[-1]
    assert harness.wait_ready(url, {"12gb": 1}, timeout=5) == {"status": "ready", "replicas": {"12gb": 1}}
    with pytest.raises(harness.FarmNotReady, match="replicas"):
        harness.wait_ready(url, {"12gb": 2}, timeout=0.5, poll=0.1)
    assert harness.readyz(url + "/down") == (503, "models loading")
    status, message = harness.readyz("http://127.0.0.1:9")  # nothing listens on the discard port
    assert status == 0 and "cannot reach the farm" in message


# --- the manager reads job-store rows as JobRecords (restart recovery) ---------------------------


def test_recovery_reads_rows_as_job_records_keeping_fields_it_does_not_know(tmp_path):
    from serving.jobs import JobRecordError
    from tests.unit.test_manager import Farm, run_async

    @run_async
    async def scenario():
        old = Farm(tmp_path, replicas={"12gb": 0, "24gb": 0})
        kept, broken = await old.submit(), await old.submit()
        # fields other features add to a record (and a record from a newer farm) ride along
        old.mgr.store.update(kept["id"], webhook={"url": "https://example.invalid/hook"}, lora=None,
                             added_later={"x": 1})
        await old.close()

        new = Farm(tmp_path, replicas={"12gb": 0, "24gb": 0})
        assert new.queued("12gb") == [kept["id"], broken["id"]]
        rec = new.record(kept["id"])
        assert rec["status"] == "queued" and rec["added_later"] == {"x": 1} and rec["webhook"]["url"]
        new.mgr.store.update(broken["id"], estimate="not an estimate")
        await new.close()

        with pytest.raises(JobRecordError, match="estimate"):  # says which field, not a KeyError
            Farm(tmp_path, replicas={"12gb": 0, "24gb": 0})

    scenario()
