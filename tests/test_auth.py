"""Contract part C: the bearer key, public routes, failing closed, and the generated key."""

import base64
import io
import os
import stat

import pytest

import auth
from app import create_app
from conftest import KEY, make_app, wipe
from models import create_schema

BASE = "/api/active-sessions"
UNAUTHORIZED = {"error": "Unauthorized"}
# (method, path, JSON body) for every protected route, plus an unknown one: all fail closed.
PROTECTED = [
    ("GET", BASE, None),
    ("HEAD", BASE, None),
    ("POST", BASE, {"agentId": "agent-1", "triggerType": "t", "taskId": "task-1"}),
    ("GET", f"{BASE}/some-id", None),
    ("DELETE", f"{BASE}/some-id", None),
    ("DELETE", f"{BASE}/by-task/task-1", None),
    ("PUT", f"{BASE}/heartbeat/task-1", None),
    ("PUT", f"{BASE}/provider-session/task-1", {"providerSessionId": "p"}),
    ("POST", f"{BASE}/cleanup", None),
    ("POST", f"{BASE}/recover-orphaned-tasks", {"agentId": "agent-1"}),
    ("GET", "/api/tasks", None),
    ("POST", "/api/tasks", {"task": "t"}),
    ("GET", "/api/tasks/some-id", None),
    ("POST", "/api/tasks/some-id/cancel", None),
    ("GET", "/api/nope", None),
    ("PATCH", BASE, None),
]


def assert_unauthorized(r):
    assert r.status_code == 401, (r.status_code, r.data)
    assert r.headers["WWW-Authenticate"] == "Bearer"
    if r.request.method != "HEAD":
        assert r.json == UNAUTHORIZED


def stored(app):
    """The sessions in the database, read with the right key."""
    return app.test_client().get(BASE, headers={"Authorization": f"Bearer {app.config['API_KEY']}"}).json


@pytest.fixture
def session(api):
    """One session for task-1, so that a write that got through would show."""
    r = api.post(BASE, json={"agentId": "agent-1", "triggerType": "t", "taskId": "task-1"})
    assert r.status_code == 201
    return r.json["session"]


@pytest.mark.parametrize("method, path, body", PROTECTED)
def test_no_authorization_is_401(app, client, session, method, path, body):
    before = stored(app)
    assert_unauthorized(client.open(path, method=method, json=body))
    assert stored(app) == before


BAD_HEADERS = [
    "Bearer wrong-key",
    f"Bearer {KEY}x",
    f"Bearer {KEY[:-1]}",
    f"Bearer {KEY.upper()}",
    f"Bearer x{KEY}",
    f"Bearer {KEY} {KEY}",
    f"Basic {base64.b64encode(f'user:{KEY}'.encode()).decode()}",
    f"Basic {KEY}",
    f"Token {KEY}",
    f"Bearer: {KEY}",
    f"Bearer{KEY}",
    f"{KEY}",
    f"Bearer {KEY}, Bearer {KEY}",
    "Bearer",
    "Bearer ",
    "",
    "Bearer None",
]


@pytest.mark.parametrize("header", BAD_HEADERS)
def test_wrong_credentials_are_401(app, client, session, subtests, header):
    before = stored(app)
    for method, path, body in PROTECTED:
        with subtests.test(method=method, path=path):
            assert_unauthorized(client.open(path, method=method, json=body, headers={"Authorization": header}))
    assert stored(app) == before


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_scheme_is_case_insensitive(client, scheme):
    r = client.get(BASE, headers={"Authorization": f"{scheme} {KEY}"})
    assert r.status_code == 200
    assert r.json == {"sessions": []}
    r = client.post(BASE, headers={"Authorization": f"{scheme} {KEY}"}, json={"agentId": "a", "triggerType": "t"})
    assert r.status_code == 201
    assert client.get(BASE, headers={"Authorization": f"Bearer {KEY}"}).json["sessions"] == [r.json["session"]]


@pytest.mark.parametrize("query", ["key", "api_key", "apiKey", "apikey", "token", "access_token", "auth",
                                   "bearer", "Authorization"])
def test_key_in_query_string_is_not_accepted(app, client, query):
    assert_unauthorized(client.get(f"{BASE}?{query}={KEY}"))
    assert_unauthorized(client.post(f"{BASE}/cleanup?{query}={KEY}"))
    assert_unauthorized(client.get(f"{BASE}?{query}=Bearer%20{KEY}"))


@pytest.mark.parametrize("headers", [
    [("Authorization", f"Bearer {KEY}"), ("Authorization", f"Bearer {KEY}")],
    [("Authorization", f"Bearer {KEY}"), ("Authorization", "Bearer wrong")],
    [("Authorization", "Bearer wrong"), ("Authorization", f"Bearer {KEY}")],
    [("Authorization", f"Bearer {KEY}"), ("Authorization", "")],
])
def test_two_authorization_headers_are_401(app, client, session, headers):
    before = stored(app)
    assert_unauthorized(client.get(BASE, headers=headers))
    assert_unauthorized(client.delete(f"{BASE}/by-task/task-1", headers=headers))
    assert stored(app) == before


@pytest.fixture
def unicode_app(database_url, tmp_path):
    app = make_app(database_url, tmp_path, API_KEY="kéy-ü")
    yield app
    wipe(app)


def test_non_ascii_key_matches_its_utf8_bytes(unicode_app):
    """WSGI hands headers over as latin-1 text: the UTF-8 bytes of the key arrive that way."""
    client = unicode_app.test_client()
    r = client.get(BASE, headers={"Authorization": "Bearer " + "kéy-ü".encode().decode("latin-1")})
    assert r.status_code == 200
    assert r.json == {"sessions": []}


@pytest.mark.parametrize("sent", ["kéy-ü", "key-u", "k?y-?", "kéy-ü".encode().decode("latin-1")[:-1], "kéy-ü".upper()])
def test_non_ascii_key_refuses_other_bytes(unicode_app, sent):
    """The key's latin-1 bytes, a transliteration or a prefix never match."""
    assert_unauthorized(unicode_app.test_client().get(BASE, headers={"Authorization": f"Bearer {sent}"}))


@pytest.fixture
def keyless(database_url, tmp_path, monkeypatch):
    """Apps with no key configured anywhere: not in the environment, the config or the instance folder."""
    monkeypatch.delenv("AGENT_SWARM_API_KEY", raising=False)
    monkeypatch.delenv("API_KEY", raising=False)
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path / "instance"))
    made = []

    def build(**config):
        app = make_app(database_url, tmp_path, **{"API_KEY": None, **config})
        made.append(app)
        return app

    yield build
    for app in made:
        wipe(app)


@pytest.mark.parametrize("configured", [None, ""])
def test_no_key_configured_fails_closed(keyless, subtests, configured):
    app = keyless(API_KEY=configured)
    assert not app.config["API_KEY"]
    client = app.test_client()
    for header in [None, "Bearer ", "Bearer None", "Bearer null", f"Bearer {KEY}", "Bearer", "Bearer \"\""]:
        for method, path, body in PROTECTED:
            with subtests.test(header=header, method=method, path=path):
                headers = {"Authorization": header} if header is not None else {}
                assert_unauthorized(client.open(path, method=method, json=body, headers=headers))
    assert not os.path.exists(os.path.join(app.instance_path, "api_key"))


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}"}])
@pytest.mark.parametrize("path", ["/health", "/health/"])
def test_health_is_public_and_reveals_nothing(client, headers, path):
    r = client.get(path, headers=headers)
    assert r.status_code == 200
    assert set(r.json) == {"status", "version"}
    assert r.json["status"] == "ok"
    assert isinstance(r.json["version"], str) and r.json["version"]
    head = client.head(path, headers=headers)
    assert head.status_code == 200 and head.data == b""


def test_health_on_keyless_app_is_public(keyless):
    r = keyless().test_client().get("/health")
    assert r.status_code == 200
    assert r.json["status"] == "ok"


@pytest.mark.parametrize("path", [BASE, f"{BASE}/some-id", f"{BASE}/cleanup", f"{BASE}/heartbeat/task-1",
                                  f"{BASE}/by-task/task-1", "/api/tasks", "/health"])
def test_cors_preflight_is_public(client, path):
    r = client.options(path, headers={"Origin": "https://dashboard.example",
                                      "Access-Control-Request-Method": "POST",
                                      "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status_code in (200, 204)
    assert "Allow" in r.headers or "Access-Control-Allow-Methods" in r.headers


def test_key_never_appears_in_answers(app, client, api, session):
    """Successes and every kind of error: the key is in no body and no header."""
    answers = [
        api.get(BASE), api.get(f"{BASE}/{session['id']}"), api.get("/api/nope"), api.call("PATCH", BASE),
        api.post(BASE, json={"agentId": "agent-9", "triggerType": "t", "taskId": "task-1"}),  # 409
        api.post(BASE, json={"agentId": "/", "triggerType": KEY * 20}),  # 400 with details
        api.post(BASE, data=KEY, content_type="text/plain"),  # 415
        api.post(BASE, data=KEY, content_type="application/json"),  # malformed
        api.post(BASE, data=b"x" * (1024 * 1024 + 1), content_type="application/json"),  # 413
        api.put("/api/active-sessions/heartbeat/task-1", agent="agent-2"),  # 403
        client.get(BASE), client.get(BASE, headers={"Authorization": f"Bearer {KEY}x"}),
        client.get(BASE, headers={"Authorization": f"Basic {KEY}"}), client.get(f"{BASE}?key={KEY}"),
        client.get("/health"), client.options(BASE),
    ]
    assert {r.status_code for r in answers} >= {200, 400, 401, 403, 404, 405, 409, 413, 415}
    for r in answers:
        assert KEY.encode() not in r.data, (r.status_code, r.data[:200])
        assert all(KEY not in value for _, value in r.headers.items())


# --- the generated key --------------------------------------------------------------------


def test_generated_key_is_kept_shown_once_and_works(keyless, tmp_path, monkeypatch):
    app = keyless()
    assert app.config["API_KEY"] is None and app.instance_path == str(tmp_path / "instance")
    out = io.StringIO()
    auth.ensure_key(app, out=out)
    key_file = tmp_path / "instance" / "api_key"
    key = key_file.read_text().strip()
    assert len(key) >= 32
    assert app.config["API_KEY"] == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert out.getvalue().count(key) == 1
    client = app.test_client()
    assert client.get(BASE, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert_unauthorized(client.get(BASE))
    assert_unauthorized(client.get(BASE, headers={"Authorization": f"Bearer {KEY}"}))

    # A restart: a fresh app object that finds no key at creation, with the same instance folder.
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path / "elsewhere"))
    again = keyless()
    assert again.config["API_KEY"] is None and again.instance_path == str(tmp_path / "instance")
    out = io.StringIO()
    auth.ensure_key(again, out=out)
    assert out.getvalue() == ""
    assert again.config["API_KEY"] == key
    assert key_file.read_text().strip() == key
    r = again.test_client().get(BASE, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200
    assert r.json == {"sessions": []}


def test_stored_key_is_read_at_creation(keyless, tmp_path):
    """An app created after the key was generated picks it up without ensure_key."""
    first = keyless()
    auth.ensure_key(first, out=io.StringIO())
    second = keyless()
    assert second.config["API_KEY"] == first.config["API_KEY"]
    r = second.test_client().get(BASE, headers={"Authorization": f"Bearer {first.config['API_KEY']}"})
    assert r.status_code == 200


def test_configured_key_is_never_replaced_or_shown(database_url, tmp_path):
    app = make_app(database_url, tmp_path)
    out = io.StringIO()
    auth.ensure_key(app, out=out)
    assert out.getvalue() == ""
    assert app.config["API_KEY"] == KEY
    assert not (tmp_path / "instance" / "api_key").exists()
    wipe(app)


@pytest.mark.parametrize("env, expected", [
    ({"AGENT_SWARM_API_KEY": "first", "API_KEY": "second"}, "first"),
    ({"API_KEY": "second"}, "second"),
    ({"AGENT_SWARM_API_KEY": "", "API_KEY": "second"}, "second"),
])
def test_key_from_environment(database_url, tmp_path, monkeypatch, env, expected):
    """AGENT_SWARM_API_KEY wins over API_KEY; an empty one counts as unset."""
    monkeypatch.delenv("AGENT_SWARM_API_KEY", raising=False)
    monkeypatch.delenv("API_KEY", raising=False)
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path / "instance"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url, "TESTING": True})
    try:
        client = app.test_client()
        with app.app_context():
            create_schema()
        assert client.get(BASE, headers={"Authorization": f"Bearer {expected}"}).status_code == 200
        for other in {"first", "second"} - {expected}:
            assert_unauthorized(client.get(BASE, headers={"Authorization": f"Bearer {other}"}))
    finally:
        wipe(app)
