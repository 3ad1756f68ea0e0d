"""Bad input against the live farm (`sim` model): property-based (hypothesis) and schema-driven
(schemathesis against the farm's own OpenAPI document).

Whatever a client sends (random JSON for any field, wrong types, huge, unicode or control-character
prompts, random bytes or broken images, bad base64, odd content types, multipart oddities,
path-traversal-looking job ids, odd query parameters) the farm answers a 4xx with
`{"error": {"code", "message", "field"}}` and a message a person can read, never a 5xx, and keeps
running; a valid request is accepted (202).
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import urllib.parse
import zlib

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from pipeline.errors import I2VError
from pipeline.images import load_image
from pipeline.request import parse_params
from serving.api import app as farm_app
from tests.integration.conftest import deploy, png_bytes, undeploy

WORKERS = {"12gb": {"min_replicas": 1, "max_replicas": 1}, "24gb": {"min_replicas": 1, "max_replicas": 1}}
EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
MAX_IMAGE_BYTES = 2 * 2**20  # small, so "too large" bodies stay cheap to send


@pytest.fixture(scope="module")
def farm(ray_cluster, tmp_path_factory):
    # jobs that get through run in a blink (sim_time_scale tiny); the backlog never refuses them
    farm = deploy(ray_cluster, tmp_path_factory.mktemp("bad-input"), workers=WORKERS, sim_time_scale=0.0001,
                  backlog_limit=10_000, max_image_bytes=MAX_IMAGE_BYTES)
    yield farm
    for job in _unfinished(farm):  # leave nothing queued behind
        farm.cancel(job["id"])
    undeploy()


def _unfinished(farm) -> list[dict]:
    jobs = []
    for status in ("queued", "running"):
        r = farm.session.get(farm.url + "/v1/jobs", params={"status": status, "limit": 500}, timeout=30)
        jobs += r.json()["jobs"]
    return jobs


# --- what every answer must look like ---------------------------------------------------------


def check_answer(r, *, valid: bool | None = None) -> None:
    """Never a 5xx; a 4xx carries the error document; `valid`: a request that must be accepted.
    (`r`: a requests response, or schemathesis' own, whose headers are lists.)"""
    where = f"{r.request.method} {r.request.url[:200]} -> {r.status_code}: {r.text[:500]}"
    if currently_in_test_context():
        event(f"HTTP {r.status_code}")  # pytest --hypothesis-show-statistics shows the mix
    assert r.status_code < 500, where
    if valid is True:
        assert r.status_code in (202, 429), where
    if r.status_code >= 400:
        ctype = r.headers.get("content-type", "")
        assert (ctype[0] if isinstance(ctype, list) else ctype).startswith("application/json"), where
        body = json.loads(r.content)
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}, where
        err = body["error"]
        assert isinstance(err["code"], str) and err["code"], where
        assert isinstance(err["message"], str) and err["message"].strip(), where
        assert err["field"] is None or isinstance(err["field"], str), where
        if r.status_code == 429:
            retry_after = r.headers["retry-after"]
            assert int(retry_after[0] if isinstance(retry_after, list) else retry_after) >= 1, where
        if valid is False:
            assert r.status_code != 202, where
    elif valid is False:
        raise AssertionError(f"an invalid request was accepted: {where}")


def expect_valid(fields: dict, image: bytes | None) -> bool | None:
    """Our own oracle: True if the farm must accept this, False if it must refuse it."""
    if image is None:
        return False
    try:
        parse_params(fields)
        load_image(image, max_bytes=MAX_IMAGE_BYTES)
    except I2VError:
        return False
    except Exception:  # noqa: BLE001 - the oracle cannot tell (e.g. a value pydantic chokes on)
        return None
    return True


# --- strategies ---------------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=10)

VALID = {
    "prompt": st.sampled_from(["waves rolling in", "A cat turning its head to the left", "  zoom  "]),
    "negative_prompt": st.sampled_from(["", "blurry", "text, watermark"]),
    "preset": st.sampled_from(["fast", "standard", "high"]),
    "resolution": st.sampled_from(["512p", "768p", "1024p"]),
    "num_frames": st.integers(8, 32),
    "fps": st.integers(1, 60),
    "target_fps": st.integers(1, 60),
    "num_inference_steps": st.integers(1, 200),
    "guidance_scale": st.floats(1.0, 30.0),
    "seed": st.integers(0, 2**32 - 1),
    "scheduler": st.sampled_from(["ddim", "dpmsolver++", "unipc"]),
    "priority": st.sampled_from(["low", "normal", "high"]),
}

# prompts: unicode of every kind, lone surrogates, control characters, far too long
weird_text = st.one_of(
    st.text(max_size=300),
    st.text(st.characters(codec=None, categories=["Cs", "Cc", "Cf", "Co", "Zl", "Zp"]), min_size=1, max_size=20),
    st.text(st.characters(), min_size=1990, max_size=2010),
    st.sampled_from(["\u202egnp.exe", "🐈‍⬛ turning 🌊", "漢字テスト", "a\x00b", "\ud800", "x\udfff",
                     "e\u0301" * 500, "\x7f", "\r\n\t", " ", "../../etc/passwd", "'; DROP TABLE jobs; --"]),
)


def _png(width=96, height=80) -> bytes:
    return png_bytes(width, height)


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixels are a tiny zlib stream)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = zlib.compress(b"\0" * 1024, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _real_bomb_png() -> bytes:
    """A genuine 6000x6000 PNG (36 MP, at the limit) of a flat colour: tiny file, big decode."""
    buf = io.BytesIO()
    Image.new("L", (6000, 6000), 7).save(buf, "PNG", optimize=True)
    return buf.getvalue()


SOME_IMAGES = [
    _png(), _png(64, 64), _png(256, 64), _png(300, 70),  # fine, fine, 4:1 fine, 4.3:1 refused
    _png(63, 200), _png()[:60], _png()[:-20], b"", b"GIF89a" + b"\0" * 50, b"BM" + b"\0" * 60,
    b"%PDF-1.4 nothing", b"\xff\xd8\xff\xe0" + b"\0" * 30, b"RIFF\0\0\0\0WEBPVP8 " + b"\0" * 20,
    _bomb_png(100_000, 100_000), _bomb_png(6001, 6000), _bomb_png(0, 10), _bomb_png(2**31 - 1, 1),
    b"\0\0\0\x1cftypavif" + b"\0" * 40, _png() + b"trailing garbage",
]

images = st.one_of(st.sampled_from(SOME_IMAGES), st.binary(max_size=300),
                   st.binary(min_size=8, max_size=200).map(lambda b: b"\x89PNG\r\n\x1a\n" + b))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


image_values = st.one_of(
    images.map(b64),
    images.map(lambda d: "data:image/png;base64," + b64(d)),
    st.text(max_size=100),  # not base64 at all
    images.map(lambda d: b64(d)[:-1] if len(d) > 3 else "==="),  # bad padding
    images.map(lambda d: "\n".join(b64(d)[i:i + 76] for i in range(0, len(b64(d)), 76))),  # wrapped
    json_values,
)


@st.composite
def json_bodies(draw):
    body = {}
    for name, valid in VALID.items():
        choice = draw(st.sampled_from(["absent", "valid", "valid", "random"]))
        if choice == "valid":
            body[name] = draw(valid)
        elif choice == "random":
            body[name] = draw(weird_text if "prompt" in name else json_values)
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(min_size=1, max_size=12))] = draw(json_values)  # an unknown field
    if draw(st.integers(0, 9)) > 0:
        body["image"] = draw(image_values)
    return body


# --- JSON submissions ---------------------------------------------------------------------------


@EXAMPLES
@given(body=json_bodies())
def test_json_submissions_never_5xx(farm, body):
    r = farm.session.post(farm.url + "/v1/jobs", data=json.dumps(body), timeout=60,
                          headers={"Content-Type": "application/json"})
    fields = {k: v for k, v in body.items() if k != "image"}
    image = body.get("image")
    decoded = None
    if isinstance(image, str) and image:
        try:
            decoded = base64.b64decode(image.partition(",")[2] if image.startswith("data:") else image,
                                       validate=True)
        except ValueError:
            decoded = None
    check_answer(r, valid=expect_valid(fields, decoded))


def _encoded(fmt: str, width: int, height: int, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), "white" if mode != "P" else 3).save(buf, fmt)
    return buf.getvalue()


valid_images = st.builds(_encoded, st.sampled_from(["PNG", "JPEG", "WEBP"]), st.integers(64, 400),
                         st.integers(64, 400), st.sampled_from(["RGB", "L"])).filter(
    lambda data: expect_valid({"prompt": "x"}, data))


def _fits_12gb_24gb(fields: dict) -> bool:
    """This farm has 12gb and 24gb workers: from 1024p x 27 frames the calibrated cost model needs
    more than 24 GiB (1024p x 32 ran out of memory on a 24 GB card), so such a request is refused
    with 422 no_class_fits, as it should be; the valid requests drawn here stay at <= 24 frames."""
    return not (fields.get("resolution") == "1024p" and fields.get("num_frames", 24) > 24)


@EXAMPLES
@given(fields=st.fixed_dictionaries({}, optional=VALID).filter(lambda f: "prompt" in f and _fits_12gb_24gb(f)),
       image=valid_images, multipart=st.booleans())
def test_valid_requests_are_accepted(farm, fields, image, multipart):
    if multipart:
        r = farm.session.post(farm.url + "/v1/jobs", data={k: str(v) for k, v in fields.items()},
                              files={"image": ("in", image, "application/octet-stream")}, timeout=60)
    else:
        r = farm.session.post(farm.url + "/v1/jobs", json={**fields, "image": b64(image)}, timeout=60)
    check_answer(r, valid=True)
    assert r.status_code == 202, r.text
    params = r.json()["params"]
    for name, value in fields.items():
        want = value.strip() if name == "prompt" else value
        assert params[name] == pytest.approx(want) if name == "guidance_scale" else params[name] == want, name


@EXAMPLES
@given(prompt=weird_text, negative=weird_text)
def test_unicode_and_control_character_prompts(farm, prompt, negative):
    r = farm.session.post(farm.url + "/v1/jobs", data=json.dumps({"prompt": prompt, "negative_prompt": negative,
                                                                  "image": b64(_png())}),
                          headers={"Content-Type": "application/json"}, timeout=60)
    check_answer(r, valid=expect_valid({"prompt": prompt, "negative_prompt": negative}, _png()))
    if r.status_code == 202:  # stored and shown back as sent (stripped)
        assert r.json()["params"]["prompt"] == prompt.strip()


@EXAMPLES
@given(image=images)
def test_any_bytes_as_the_image(farm, image):
    r = farm.session.post(farm.url + "/v1/jobs", data={"prompt": "waves"}, timeout=60,
                          files={"image": ("x.png", image, "image/png")})
    check_answer(r, valid=expect_valid({"prompt": "waves"}, image))
    if r.status_code >= 400:
        assert r.json()["error"]["field"] == "image", r.text


# --- multipart and content types ----------------------------------------------------------------


@st.composite
def multipart_bodies(draw):
    """A multipart body built by hand: any part names, filenames, types, duplicates, text or files."""
    boundary = draw(st.sampled_from(["b0undary", "x" * 70, "----WebKitFormBoundary7MA4YWxkTrZu0gW"]))
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.one_of(st.sampled_from([*VALID, "image", "image"]), st.text(max_size=10)))
        name = name.replace('"', "").replace("\r", "").replace("\n", "")
        value = draw(st.one_of(st.sampled_from(SOME_IMAGES), st.binary(max_size=60),
                               st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass"))))
        disposition = f'form-data; name="{name}"'
        if draw(st.booleans()):
            filename = draw(st.sampled_from(["in.png", "../../etc/passwd", "..\\..\\win.ini", "", "a/b/c.png",
                                             "\u202egnp.exe", "x" * 300, "%2e%2e%2f"]))
            disposition += f'; filename="{filename}"'
        head = f"Content-Disposition: {disposition}\r\n"
        if draw(st.booleans()):
            head += f"Content-Type: {draw(st.sampled_from(['image/png', 'text/plain', 'application/x-evil', '']))}\r\n"
        parts.append(f"--{boundary}\r\n{head}\r\n".encode("utf-8", "surrogatepass") + value + b"\r\n")
    body = b"".join(parts)
    if draw(st.integers(0, 4)) > 0:
        body += f"--{boundary}--\r\n".encode()
    ctype = draw(st.sampled_from([f"multipart/form-data; boundary={boundary}", "multipart/form-data",
                                  "multipart/form-data; boundary=other", f'multipart/form-data; boundary="{boundary}"',
                                  f"MULTIPART/FORM-DATA; boundary={boundary}"]))
    return ctype, body


@EXAMPLES
@given(body=multipart_bodies())
def test_multipart_oddities_never_5xx(farm, body):
    ctype, data = body
    r = farm.session.post(farm.url + "/v1/jobs", data=data, headers={"Content-Type": ctype}, timeout=60)
    check_answer(r)


CONTENT_TYPES = ["text/plain", "application/octet-stream", "image/png", "application/xml", "application/json",
                 "APPLICATION/JSON", "application/json; charset=utf-16", "application/x-www-form-urlencoded",
                 "multipart/form-data", "multipart/mixed; boundary=x", "application/jsonp", "*/*", ";;;", "",
                 "application/json-seq", "text/json", "application/json;;", "multipart/form-data; boundary="]


@EXAMPLES
@given(ctype=st.sampled_from(CONTENT_TYPES)
       | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40),  # any valid header value
       data=st.binary(max_size=200) | st.just(json.dumps({"prompt": "x", "image": b64(_png())}).encode()))
def test_any_content_type_and_body(farm, ctype, data):
    r = farm.session.post(farm.url + "/v1/jobs", data=data, headers={"Content-Type": ctype}, timeout=60)
    check_answer(r)


# --- URLs and query parameters ------------------------------------------------------------------

TRAVERSALS = ["..%2F..%2Fetc", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "..", ".", "%00", "a%00b", "%2F", "%5C..%5C",
              "....%2F%2F", "%C0%AE%C0%AE", "%252e%252e%252f", "0" * 32, "f" * 32, "F" * 32, "g" * 32, "0" * 33,
              "%ff%fe", "%ud800", "jobs%2F..%2Finbox", "~root", "*", "%20", "x" * 5000]


@EXAMPLES
@given(job_id=st.sampled_from(TRAVERSALS)
       | st.text(min_size=1, max_size=60).map(lambda t: urllib.parse.quote(t, safe="")),
       tail=st.sampled_from(["", "/video", "/poster", "/events", "/cancel", "/video/..%2F..%2Fjobs.sqlite3"]))
def test_job_urls_never_reach_files_or_5xx(farm, job_id, tail):
    url = f"{farm.url}/v1/jobs/{job_id}{tail}"
    method = "POST" if tail == "/cancel" else "GET"
    r = farm.session.request(method, url, timeout=60, allow_redirects=False)
    check_answer(r)
    if r.status_code == 307:  # trailing-slash redirects (`/v1/jobs/.` -> the list, `x//` -> `x`) stay in the API
        location = urllib.parse.urlsplit(r.headers["location"])
        assert location.netloc in ("", urllib.parse.urlsplit(farm.url).netloc), (url, r.headers)
        assert location.path.startswith("/v1/jobs") and ".." not in location.path.replace("....", ""), (url, r.headers)
    else:
        assert r.status_code in (404, 405, 422), (url, r.status_code, r.text[:300])


EDGE_NUMBERS = [str(n) for n in (-1, 0, 1, 500, 501, 2**31, 2**63 - 1, 2**63, 2**64, 10**30)] + [
    "1e3", "0x10", "1.5", "NaN", "inf", "-0", " 7", "٣", "", "null"]


@EXAMPLES
@given(params=st.dictionaries(st.sampled_from(["status", "limit", "cursor", "x", "status[]"]),
                              st.sampled_from(EDGE_NUMBERS) | st.text(max_size=30)
                              | st.integers(-(2**70), 2**70).map(str), max_size=4))
def test_list_query_parameters(farm, params):
    r = farm.session.get(farm.url + "/v1/jobs", params=params, timeout=60)
    check_answer(r)


@pytest.mark.parametrize("cursor", [str(2**63 - 1), str(2**63), str(10**30)])
def test_list_cursor_beyond_a_database_integer_is_a_422_not_a_500(farm, cursor):
    r = farm.session.get(farm.url + "/v1/jobs", params={"cursor": cursor}, timeout=60)
    check_answer(r)
    assert r.status_code == (200 if int(cursor) < 2**63 else 422), r.text


@EXAMPLES
@given(body=json_values | st.dictionaries(st.sampled_from([*VALID, "width", "height", "image"]),
                                          json_values | st.integers(-5, 200_000)))
def test_estimate_with_random_bodies(farm, body):
    r = farm.session.post(farm.url + "/v1/estimate", data=json.dumps(body), timeout=60,
                          headers={"Content-Type": "application/json"})
    check_answer(r)


@EXAMPLES
@given(path=st.sampled_from(["/ui/..%2Fapi.py", "/ui/..%2F..%2Fpyproject.toml", "/ui/%2e%2e/manager.py",
                             "/ui/app.js%00.html", "/ui/.", "/ui/index.html/", "/ui/" + "a" * 300,
                             "/v1/../v1/jobs", "/%2e%2e/%2e%2e/etc/passwd", "/v1/jobs/../../etc/passwd"])
       | st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF), max_size=40).map(
           lambda t: "/" + urllib.parse.quote(t, safe="/")))
def test_paths_never_serve_files_outside_the_web_page(farm, path):
    r = farm.session.get(farm.url + path, timeout=60, allow_redirects=False)
    check_answer(r)
    assert b"import " not in r.content and b"[project]" not in r.content and b"root:" not in r.content


# --- one-off cases ------------------------------------------------------------------------------


def test_deeply_nested_json_is_a_400(farm):
    for body in ("[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000):
        for path in ("/v1/jobs", "/v1/estimate"):
            r = farm.session.post(farm.url + path, data=body, headers={"Content-Type": "application/json"},
                                  timeout=60)
            check_answer(r)
            assert r.status_code == 400, r.text


def test_a_body_too_large_is_refused_before_it_is_read(farm):
    limit = MAX_IMAGE_BYTES * 4 // 3 + 2**20
    for ctype in ("application/json", "multipart/form-data; boundary=zz"):
        # declared too large: 413 from the header
        r = farm.session.post(farm.url + "/v1/jobs", data=b"x" * (limit + 10), headers={"Content-Type": ctype},
                              timeout=60)
        check_answer(r)
        assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large", r.text
        assert r.json()["error"]["field"] == "image" and "MiB" in r.json()["error"]["message"]

    # chunked (no Content-Length): the size cannot be checked first, so it is refused unread. (Ray
    # Serve's proxy reads request bodies eagerly: reading a chunked one up to the limit was not
    # enough, a 300 MiB upload grew the proxy and the API replica by ~200 MiB each.)
    def chunks():
        for _ in range(300):
            yield b"x" * 2**20

    for ctype, path in (("application/json", "/v1/jobs"), ("multipart/form-data; boundary=zz", "/v1/jobs"),
                        ("application/json", "/v1/estimate")):
        try:
            r = farm.session.post(farm.url + path, data=chunks(), headers={"Content-Type": ctype}, timeout=60)
        except requests.ConnectionError:
            continue  # the farm answered and closed while the client was still sending: fine
        check_answer(r)
        assert r.status_code == 411 and r.json()["error"]["code"] == "length_required", (path, r.text[:300])
        assert "Content-Length" in r.json()["error"]["message"]


def test_decompression_bombs_are_refused_from_the_header(farm):
    for data, status in ((_bomb_png(100_000, 100_000), 413), (_bomb_png(6001, 6000), 413)):
        started = time.monotonic()
        r = farm.session.post(farm.url + "/v1/jobs", data={"prompt": "x"}, files={"image": ("b.png", data)},
                              timeout=60)
        check_answer(r)
        assert r.status_code == status and r.json()["error"]["code"] == "image_too_large", r.text
        assert "pixels" in r.json()["error"]["message"]
        assert time.monotonic() - started < 10


def test_idempotency_key_oddities(farm):
    body = {"prompt": "waves", "image": b64(_png()), "num_inference_steps": 2}
    for key in ("k" * 8000, "é-ключ", " ", "\t", "../../inbox/x", "a'b\"c;--"):
        headers = {"Idempotency-Key": key.encode("utf-8").decode("latin-1")}  # as raw bytes on the wire
        try:
            r1 = farm.session.post(farm.url + "/v1/jobs", json=body, headers=headers, timeout=60)
        except requests.exceptions.InvalidHeader:
            continue  # not even sendable
        check_answer(r1)
        if r1.status_code == 202:
            r2 = farm.session.post(farm.url + "/v1/jobs", json=body, headers=headers, timeout=60)
            assert r2.status_code == 200 and r2.json()["id"] == r1.json()["id"], (key[:20], r2.text[:300])


def test_the_farm_is_still_healthy_after_all_that(farm):
    assert farm.session.get(farm.url + "/healthz", timeout=30).json() == {"status": "ok"}
    job = farm.submit_ok(num_inference_steps=2, preset="fast")
    assert farm.wait(job["id"], timeout=60)["status"] == "succeeded"


# --- schemathesis: the farm's own OpenAPI document --------------------------------------------

# The document the farm serves at /openapi.json, built from the ingress's routes (checked below to
# be what the live farm serves). Loaded at import, so schemathesis makes one test per operation
# (its lazy `from_fixture` loader does not work with pytest 9).
openapi = schemathesis.openapi.from_dict(farm_app.openapi())
openapi.config.generation.update(max_examples=50, deterministic=True)


def test_the_served_openapi_document_is_the_one_fuzzed(farm):
    served = farm.session.get(farm.url + "/openapi.json", timeout=30).json()
    # The one difference: Ray Serve pickles the FastAPI app into the replica, where the `Query(...)`
    # parameters' "no example" sentinel no longer compares identical and shows as `"example": {}`.
    for op in served["paths"].values():
        for method in op.values():
            for param in method.get("parameters", []):
                if param.get("example") == {}:
                    del param["example"]
    assert served == farm_app.openapi()


@openapi.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_operations_never_5xx(case, farm):
    """Every documented operation, with data that fits the schema and data that does not."""
    response = case.call(base_url=farm.url, timeout=60)
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
    if response.status_code >= 400:
        check_answer(response)
