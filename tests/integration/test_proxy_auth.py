"""Issue 14 item 7: `auth: auto` on loopback makes every caller an admin, so a request that came
through a reverse proxy (it carries X-Forwarded-For, Forwarded or X-Real-IP) is refused, unless the
operator turned access control off on purpose (`auth: off`)."""

from __future__ import annotations

import pytest
import requests

from tests.integration.conftest import deploy, undeploy

WORKERS = {"12gb": {"min_replicas": 1, "max_replicas": 1}}
PROXIED = [{"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9;proto=https"},
           {"X-Real-IP": "203.0.113.9"}]


@pytest.fixture
def farm_with(ray_cluster, tmp_path):
    def make(**settings):
        return deploy(ray_cluster, tmp_path, workers=WORKERS, **settings)
    yield make
    undeploy()


def test_auto_mode_refuses_proxied_requests(farm_with):
    farm = farm_with()  # auth: auto on 127.0.0.1: tokens off
    assert requests.get(farm.url + "/v1/jobs", timeout=10).status_code == 200
    assert requests.get(farm.url + "/v1/me", timeout=10).json() == {"name": "anonymous", "admin": True,
                                                                     "max_priority": "high"}
    for headers in PROXIED:
        for method, path in [("GET", "/v1/jobs"), ("GET", "/"), ("POST", "/v1/jobs"), ("GET", "/v1/me")]:
            r = requests.request(method, farm.url + path, headers=headers, timeout=10)
            assert r.status_code == 403, (headers, path)
            err = r.json()["error"]
            assert err["code"] == "proxy_without_auth" and "I2V_AUTH=on" in err["message"]
    assert requests.get(farm.url + "/healthz", headers=PROXIED[0], timeout=10).status_code == 200


def test_auth_off_is_the_operators_choice(farm_with):
    farm = farm_with(auth="off", api_docs=False)
    for headers in PROXIED:
        assert requests.get(farm.url + "/v1/jobs", headers=headers, timeout=10).status_code == 200
    # api_docs: false turns the swagger page (and its assets) off; the OpenAPI document stays
    assert requests.get(farm.url + "/docs", timeout=10).status_code == 404
    assert requests.get(farm.url + "/docs/swagger-ui-bundle.js", timeout=10).status_code == 404
    assert requests.get(farm.url + "/openapi.json", timeout=10).status_code == 200
