"""Issue 14 item 3: `FarmClient` (`i2v-farm submit --wait`) must not hand the farm's token to the
host a redirect points at (the video's presigned S3 URL). Two loopback HTTP servers on different
ports (different origins): the farm redirects, the other records what it was sent."""

from __future__ import annotations

import pytest

from serving.client import FarmClient
from tests.helpers import http_server

TOKEN = "i2v_secret-token-of-alice"


def _server(handler_fn):
    return http_server(handler_fn)


@pytest.fixture
def servers():
    store, store_seen, store_url = _server(lambda path: (200, {"Content-Type": "video/mp4"}, b"MP4DATA"))

    def farm_answer(path):
        if path.endswith("/video"):
            return 307, {"Location": f"{store_url}/bucket/video.mp4?X-Amz-Signature=abc"}, b""
        if path.endswith("/poster"):
            return 307, {"Location": "/v1/files/poster.jpg"}, b""  # same origin
        return 200, {"Content-Type": "image/jpeg"}, b"JPEG"

    farm, farm_seen, farm_url = _server(farm_answer)
    yield farm_url, farm_seen, store_seen
    farm.shutdown()
    store.shutdown()


def test_the_token_is_not_sent_along_a_redirect_to_another_origin(servers):
    farm_url, farm_seen, store_seen = servers
    client = FarmClient(farm_url, token=TOKEN)
    assert client.video("0" * 32) == b"MP4DATA"
    assert farm_seen[-1]["authorization"] == f"Bearer {TOKEN}"
    [fetched] = store_seen
    assert "X-Amz-Signature" in fetched["path"]
    assert "authorization" not in fetched and "cookie" not in fetched
    assert not any(TOKEN in v for v in fetched.values())


def test_the_token_follows_a_redirect_within_the_farm(servers):
    farm_url, farm_seen, store_seen = servers
    client = FarmClient(farm_url, token=TOKEN)
    assert client.call("GET", "/v1/jobs/x/poster") == b"JPEG"
    assert [s["path"] for s in farm_seen] == ["/v1/jobs/x/poster", "/v1/files/poster.jpg"]
    assert all(s["authorization"] == f"Bearer {TOKEN}" for s in farm_seen) and store_seen == []
