"""Issue 14 in a real browser (Debian's chromium via Playwright, as tests/e2e/test_web.py): the page
signs in with a session cookie that is not the token and signs out for real, a hostile page on
another loopback port (same site, another origin) cannot sign the browser in with the attacker's
token nor frame the farm, and the page and `/docs` run under the farm's CSP with nothing from a CDN."""

from __future__ import annotations

import json
import time

import pytest
import requests

from serving.auth import COOKIE
from tests.helpers import http_server
from tests.integration.conftest import deploy_secured, undeploy


@pytest.fixture(scope="module")
def secured(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web-security")
    limits = {"rate_per_min": 100, "max_active": 10}
    farm, tokens, _ = deploy_secured(ray_cluster, tmp, {"alice": limits, "mallory": limits},
                                     workers={"12gb": {"min_replicas": 1, "max_replicas": 1}})
    yield farm, tokens
    undeploy()




@pytest.fixture
def hostile():
    """A page on another loopback port: `serve(html)` returns its URL."""
    pages: dict[str, bytes] = {}

    def respond(path: str):
        body = pages.get(path.split("?")[0], b"")
        return (200 if body else 404), {"Content-Type": "text/html"}, body

    server, _, url = http_server(respond)

    def serve(name: str, html: str) -> str:
        pages["/" + name] = html.encode()
        return f"{url}/{name}"

    yield serve
    server.shutdown()
    server.server_close()


def _csp_errors(page) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    return errors


def _session_cookies(context, farm_url):
    return [c for c in context.cookies(farm_url) if c["name"] == COOKIE]


def test_page_signs_in_with_a_session_and_signs_out(secured, browser):
    from playwright.sync_api import expect

    farm, tokens = secured
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    csp = _csp_errors(page)
    page.goto(farm.url + "/")
    expect(page.locator("#login")).to_be_visible()
    page.fill("#token", tokens["alice"])
    page.click("#login button[type=submit]")
    expect(page.locator("#signed-in")).to_contain_text("Signed in as alice")
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#priority option[value=high]")).to_be_disabled()
    [cookie] = _session_cookies(context, farm.url)
    assert cookie["value"] != tokens["alice"] and tokens["alice"] not in cookie["value"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # scripts never see it
    assert page.evaluate("fetch('v1/me').then(r => r.json())")["name"] == "alice"
    stolen = cookie["value"]

    page.get_by_role("button", name="Sign out").click()
    expect(page.locator("#login")).to_be_visible()
    assert not _session_cookies(context, farm.url)
    assert requests.get(farm.url + "/v1/me", cookies={COOKIE: stolen}, timeout=10).status_code == 401
    assert csp == [], csp
    context.close()


def test_a_hostile_page_cannot_sign_the_browser_in(secured, browser, hostile):
    farm, tokens = secured
    attacker = tokens["mallory"]
    login = farm.url + "/v1/login"
    attacks = {
        # text/plain needs no CORS preflight: the classic login CSRF
        "fetch-text.html": f"""<script>fetch({json.dumps(login)}, {{method: "POST", mode: "no-cors",
            credentials: "include", headers: {{"Content-Type": "text/plain"}},
            body: JSON.stringify({{token: {json.dumps(attacker)}}})}}).finally(() => document.title = "sent")</script>""",
        "form-text.html": f"""<form method="post" enctype="text/plain" action="{login}">
            <input name='{{"token": "{attacker}", "x": "' value='"}}'></form><script>document.forms[0].submit()</script>""",
        "form-urlencoded.html": f"""<form method="post" action="{login}"><input name="token" value="{attacker}">
            </form><script>document.forms[0].submit()</script>""",
        "fetch-urlencoded.html": f"""<script>fetch({json.dumps(login)}, {{method: "POST", mode: "no-cors",
            credentials: "include", body: new URLSearchParams({{token: {json.dumps(attacker)}}})}})
            .finally(() => document.title = "sent")</script>""",
    }
    for name, html in attacks.items():
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(hostile(name, f"<!doctype html><title>cats</title>{html}"))
        deadline = time.monotonic() + 10
        while page.title() == "cats" and "form" not in name and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # a form navigation has landed by now
        assert not _session_cookies(context, farm.url), f"{name}: the browser was signed in as the attacker"
        page.goto(farm.url + "/")
        assert page.evaluate("fetch('v1/me').then(r => r.status)") == 401, name
        context.close()


def test_the_farm_cannot_be_framed(secured, browser, hostile):
    farm, _ = secured
    context = browser.new_context()
    page = context.new_page()
    messages: list[str] = []
    page.on("console", lambda m: messages.append(m.text))
    page.goto(hostile("frame.html", f'<!doctype html><iframe id="f" src="{farm.url}/"></iframe>'))
    time.sleep(2)
    frame = page.frames[1]
    assert "input-title" not in frame.content(), "the farm's page rendered inside another site's frame"
    context.close()


def test_docs_render_from_the_farm_under_its_csp(secured, browser):
    from playwright.sync_api import expect

    farm, _ = secured
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    csp = _csp_errors(page)
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.goto(farm.url + "/docs")
    expect(page.locator(".opblock-summary-path", has_text="/v1/jobs").first).to_be_visible()
    foreign = [u for u in urls if not u.startswith(farm.url) and not u.startswith("data:")]
    assert foreign == [] and csp == [], (foreign, csp)
    context.close()
