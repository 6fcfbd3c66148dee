"""Every protected route refuses a missing or wrong key; CORS only for configured origins."""

import pytest
from sqlalchemy.exc import OperationalError

import sessions

from conftest import KEY, make_app, wipe

PUBLIC = {"/health"}


def routes(app):
    """Every (method, concrete path) in the URL map, ids filled in."""
    for rule in app.url_map.iter_rules():
        path = rule.rule
        for arg in rule.arguments:
            path = path.replace(f"<{arg}>", "some-id")
        for method in sorted(rule.methods - {"OPTIONS"}):
            yield method, path


def test_every_protected_route_refuses_missing_and_wrong_keys(app, client):
    checked = 0
    for method, path in routes(app):
        if path in PUBLIC or path.startswith("/static"):
            continue
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                        {"Authorization": KEY}):
            r = client.open(path, method=method, headers=headers, json={"agentId": "a"})
            assert r.status_code == 401, (method, path, headers)
            assert r.headers["WWW-Authenticate"] == "Bearer"
            if method != "HEAD":
                assert r.json == {"error": "Unauthorized"}
            assert KEY not in r.get_data(as_text=True)
        checked += 1
    assert checked >= 16  # the contract's routes and HEAD variants are all in the map


def test_health_is_public_and_reveals_no_config(client):
    r = client.get("/health")
    assert r.status_code == 200
    assert set(r.json) == {"status", "version"} and r.json["status"] == "ok"


@pytest.mark.parametrize("error", [RuntimeError("Traceback SELECT secret"),
                                   OperationalError("SELECT secret", {}, Exception("database is locked"))])
def test_errors_carry_no_trace_or_database_text(app, client, monkeypatch, error):
    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr(sessions, "stamp", boom)
    r = client.post("/api/active-sessions", json={"agentId": "a", "triggerType": "x"},
                    headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code in (500, 503) and set(r.json) == {"error"}
    assert "secret" not in r.get_data(as_text=True) and "Traceback" not in r.get_data(as_text=True)
    if r.status_code == 503:
        assert r.headers["Retry-After"] == "1"


def test_request_size_limit_is_enforced_before_reading(client):
    r = client.post("/api/tasks", data=b"x" * (1024 * 1024 + 1), content_type="application/json",
                    headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and "error" in r.json


def test_cors_off_by_default(client):
    r = client.get("/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers
    r = client.options("/api/active-sessions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers


@pytest.fixture
def cors_app(database_url, tmp_path):
    app = make_app(database_url, tmp_path, CORS_ORIGINS=["https://dash.example"])
    yield app
    wipe(app)


def test_cors_allows_only_configured_origins(cors_app):
    client = cors_app.test_client()
    pre = client.options("/api/active-sessions", headers={
        "Origin": "https://dash.example", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 200
    assert pre.headers["Access-Control-Allow-Origin"] == "https://dash.example"
    assert "X-Agent-ID" in pre.headers["Access-Control-Allow-Headers"]
    assert "Access-Control-Allow-Credentials" not in pre.headers
    other = client.get("/api/active-sessions", headers={"Origin": "https://evil.example",
                                                        "Authorization": f"Bearer {KEY}"})
    assert other.status_code == 200 and "Access-Control-Allow-Origin" not in other.headers
    ok = client.get("/api/active-sessions", headers={"Origin": "https://dash.example",
                                                     "Authorization": f"Bearer {KEY}"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://dash.example"
    assert "Origin" in ok.headers.get("Vary", "")
