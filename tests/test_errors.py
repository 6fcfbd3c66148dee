"""Contract part C: bad input on every route that takes a body, and the JSON shape of every error."""

import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import update

from models import ActiveSession, Task, db, stamp

BASE = "/api/active-sessions"
MISSING = object()
OLD = stamp(datetime.now(timezone.utc) - timedelta(hours=2))


def assert_error(r, status):
    """An error answer: the status, JSON with a non-empty "error" string, never HTML."""
    assert r.status_code == status, (r.status_code, r.data[:300])
    assert r.mimetype == "application/json"
    assert isinstance(r.json, dict) and isinstance(r.json["error"], str) and r.json["error"]
    assert b"<html" not in r.data.lower() and b"traceback" not in r.data.lower()


def backdate(app, table, row_id, **values):
    """Test setup: write columns straight into the database."""
    with app.app_context():
        db.session.execute(update(table).where(table.c.id == row_id).values(**values))
        db.session.commit()


@pytest.fixture
def world(app, api):
    """A stale session (agent-1, task-1) and a stale in-progress task of agent-1: a valid
    request to any route below would change something."""
    s = api.post(BASE, json={"agentId": "agent-1", "taskId": "task-1", "triggerType": "task_assigned"})
    assert s.status_code == 201
    backdate(app, ActiveSession.__table__, s.json["session"]["id"], started_at=OLD, last_heartbeat_at=OLD)
    task = api.post("/api/tasks", json={"task": "do it", "agentId": "agent-1"}).json
    assert api.post(f"/api/tasks/{task['id']}/start", agent="agent-1").status_code == 200
    backdate(app, Task.__table__, task["id"], last_updated_at=OLD)
    return {"task": task["id"]}


def snapshot(api, world):
    """Everything stored: sessions, tasks, and the world task with its log."""
    return (api.get(BASE).json, api.get("/api/tasks").json, api.get(f"/api/tasks/{world['task']}").json)


# name: (method, path, valid body, X-Agent-ID, success status, status with no body)
ROUTES = {
    "create-session": ("POST", BASE, {"agentId": "agent-2", "triggerType": "task_assigned", "taskId": "task-2",
                                      "inboxMessageId": "in-1", "runnerSessionId": "run-1",
                                      "runtimeInstanceId": "rt-1", "taskDescription": "d"}, None, 201, 400),
    "provider-session": ("PUT", f"{BASE}/provider-session/task-1", {"providerSessionId": "p-1"}, None, 200, 400),
    "cleanup": ("POST", f"{BASE}/cleanup", {"agentId": "agent-1", "maxAgeMinutes": 30}, None, 200, 200),
    "recover": ("POST", f"{BASE}/recover-orphaned-tasks", {"agentId": "agent-1", "minAgeSeconds": 60},
                "agent-1", 200, 400),
    "create-task": ("POST", "/api/tasks", {"task": "t", "agentId": "agent-1", "priority": 50}, None, 201, 400),
    "progress": ("POST", "/api/tasks/{task}/progress", {"progress": "p"}, None, 200, 400),
    "task-session": ("PUT", "/api/tasks/{task}/session", {"claudeSessionId": "c-1"}, None, 200, 400),
    "finish": ("POST", "/api/tasks/{task}/finish", {"status": "completed", "output": "o", "failureReason": "f"},
               "agent-1", 200, 400),
}
# Routes that take no body but must still refuse a bad one: (method, path, X-Agent-ID, success status).
BODYLESS = {
    "delete": ("DELETE", f"{BASE}/{{session}}", None, 200),
    "delete-by-task": ("DELETE", f"{BASE}/by-task/task-1", None, 200),
    "heartbeat": ("PUT", f"{BASE}/heartbeat/task-1", None, 200),
    "start": ("POST", "/api/tasks/{task}/start", "agent-1", 200),
    "cancel": ("POST", "/api/tasks/{task}/cancel", None, 200),
}
EVERY = {**{k: (m, p, a, s) for k, (m, p, _, a, s, _) in ROUTES.items()}, **BODYLESS}


def send(api, world, name, body=MISSING, **kwargs):
    """Call a route of ROUTES or BODYLESS; body is JSON, or raw bytes via data=."""
    method, path, agent, _ = EVERY[name]
    found = api.get(BASE + "?taskId=task-1").json["sessions"]
    session_id = found[0]["id"] if found else "gone"  # an earlier request of the test deleted it
    path = path.replace("{task}", world["task"]).replace("{session}", session_id)
    if body is not MISSING:  # the stdlib encoder: it also writes integers beyond 64 bits
        kwargs.update(data=json.dumps(body), content_type="application/json")
    return api.call(method, path, agent=agent, **kwargs)


def valid(name):
    return dict(ROUTES[name][2]) if name in ROUTES else {}


# --- the valid requests really change something (so "nothing changed" below means something) --


@pytest.mark.parametrize("name", [n for n in EVERY if n != "start"])  # start: a no-op on the caller's own task
def test_valid_request_changes_something(api, world, name):
    before = snapshot(api, world)
    r = send(api, world, name, valid(name))
    assert r.status_code == EVERY[name][3], r.json
    assert snapshot(api, world) != before


# --- field validation ---------------------------------------------------------------------

BAD_ID = ["", 123, 1.5, True, [], {}, ["a"], "x" * 257, "a/b", "/", "a\x00b", "\x00", "a\x01b", "tab\tid",
          "new\nline", "a\x1fb", "a\x7fb", "a\x85b", "a\x9fb", ".", ".."]
BAD_REQUIRED = [MISSING, None]


def text_cases(lo, hi, required):
    cases = [5, 1.5, True, ["x"], {"x": 1}, "x" * (hi + 1), "a\x00b", "\x00"]
    if lo:
        cases.append("")
    return cases + (BAD_REQUIRED if required else [])


def int_cases(lo, hi):
    return ["30", "", 30.5, True, False, [30], {"n": 30}, lo - 1, hi + 1, -(10**30), 10**30]


FIELD_CASES = {
    "create-session": {
        "agentId": BAD_ID + BAD_REQUIRED, "triggerType": text_cases(1, 256, True), "taskId": BAD_ID,
        "inboxMessageId": BAD_ID, "runnerSessionId": BAD_ID, "runtimeInstanceId": BAD_ID,
        "taskDescription": text_cases(0, 4096, False),
    },
    "provider-session": {"providerSessionId": BAD_ID + BAD_REQUIRED},
    "cleanup": {"agentId": BAD_ID, "maxAgeMinutes": int_cases(1, 525600)},
    "recover": {"agentId": BAD_ID + BAD_REQUIRED, "minAgeSeconds": int_cases(1, 31536000)},
    "create-task": {"task": text_cases(1, 65536, True), "agentId": BAD_ID, "priority": int_cases(0, 100)},
    "progress": {"progress": text_cases(1, 65536, True)},
    "task-session": {"claudeSessionId": BAD_ID + BAD_REQUIRED},
    "finish": {"status": ["", "cancelled", "pending", "COMPLETED", 1, True] + BAD_REQUIRED,
               "output": text_cases(0, 65536, False), "failureReason": text_cases(0, 65536, False)},
}


def case_id(value):
    if value is MISSING:
        return "missing"
    text = repr(value)
    return text if len(text) < 20 else f"{text[:12]}..len{len(text)}"


@pytest.mark.parametrize("name, field", [(n, f) for n, fields in FIELD_CASES.items() for f in fields])
def test_bad_field_is_400_and_changes_nothing(api, world, subtests, name, field):
    """Missing, null, empty, wrong type, out of bounds, too long, "/", control characters, "." and "..", NUL."""
    before = snapshot(api, world)
    for value in FIELD_CASES[name][field]:
        with subtests.test(value=case_id(value)):
            body = valid(name)
            if value is MISSING:
                del body[field]
            else:
                body[field] = value
            r = send(api, world, name, body)
            assert_error(r, 400)
            assert r.json["error"].startswith("Validation error: ")
            assert list(r.json["details"]) == [field]
            messages = r.json["details"][field]
            assert isinstance(messages, list) and messages and all(isinstance(m, str) for m in messages)
            assert snapshot(api, world) == before


def test_several_bad_fields_are_all_reported(api, world):
    r = send(api, world, "create-session", {"agentId": "", "triggerType": 1, "taskId": "a/b"})
    assert_error(r, 400)
    assert set(r.json["details"]) == {"agentId", "triggerType", "taskId"}


@pytest.mark.parametrize("name, field, value", [
    ("create-session", "taskDescription", "line\nbreak\ttab\r\x1b[0m \x7f é"),
    ("create-session", "taskDescription", "x" * 4096),
    ("create-session", "taskDescription", ""),
    ("create-session", "agentId", "a" * 256),
    ("create-session", "triggerType", "t" * 256),
    ("cleanup", "maxAgeMinutes", 1), ("cleanup", "maxAgeMinutes", 525600),
    ("recover", "minAgeSeconds", 1), ("recover", "minAgeSeconds", 31536000),
    ("create-task", "priority", 0), ("create-task", "priority", 100),
])
def test_edge_values_are_accepted(api, world, name, field, value):
    """Control characters other than NUL are fine in free text; bounds are inclusive."""
    body = {**valid(name), field: value}
    r = send(api, world, name, body)
    assert r.status_code == ROUTES[name][4], r.json


# --- malformed bodies ---------------------------------------------------------------------

MALFORMED = [b"{", b'{"agentId": }', b"{'agentId': 'a'}", b'{"a": 1,}', b"\xff\xfe", b'{"a": "\xff"}',
             b"[1,", b"nul", b'{"a": 1} {"b": 2}', b"\x00", b'{"a": 01}', b'{"taskDescription": "\\ud800"}',
             b'{"agentId": "\xed\xa0\x80"}']
NOT_OBJECT = [b"[]", b'[{"agentId": "agent-1"}]', b'"agentId"', b"1", b"-1.5", b"true", b"false", b"null"]
NON_FINITE = [b'{"maxAgeMinutes": NaN}', b'{"x": Infinity}', b'{"x": -Infinity}', b"NaN", b'{"x": 1e999}']


LEAVES = {"number": 1, "null": None, "string": "x", "empty-list": [], "empty-object": {}}


def nest(levels, leaf):
    """A value with exactly `levels` levels of arrays and objects (alternating) around leaf."""
    value = leaf
    for i in range(levels - (1 if isinstance(leaf, (list, dict)) else 0)):
        value = [value] if i % 2 else {"k": value}
    return value


def accepted(name, r):
    """The body got through parsing and validation: success, or, when a test repeats a request,
    the 409 that comes after validation (taskId taken, task already ended)."""
    allowed = {EVERY[name][3]} | ({409} if name in ("create-session", "finish", "cancel") else set())
    assert r.status_code in allowed, (r.status_code, r.json)


@pytest.mark.parametrize("name", EVERY)
def test_bad_json_is_400(api, world, subtests, name):
    """Malformed JSON, a body that is not an object (also null), NaN and Infinity."""
    before = snapshot(api, world)
    for raw in MALFORMED + NOT_OBJECT + NON_FINITE:
        with subtests.test(raw=raw[:30]):
            assert_error(send(api, world, name, data=raw, content_type="application/json"), 400)
            assert snapshot(api, world) == before


@pytest.mark.parametrize("name", EVERY)
def test_json_nested_33_deep_is_400(api, world, subtests, name):
    before = snapshot(api, world)
    for leaf in LEAVES:
        with subtests.test(leaf=leaf):
            r = send(api, world, name, {**valid(name), "extra": nest(32, LEAVES[leaf])})  # body object + 32 = 33
            assert_error(r, 400)
            assert r.json == {"error": "JSON nested deeper than 32 levels"}
    for raw in (b"[" * 33 + b"]" * 33, b"[" * 100000 + b"]" * 100000, b'{"a":' * 5000 + b"1" + b"}" * 5000):
        with subtests.test(raw=raw[:10]):
            assert_error(send(api, world, name, data=raw, content_type="application/json"), 400)
    assert snapshot(api, world) == before


@pytest.mark.parametrize("name", EVERY)
def test_json_nested_32_deep_is_accepted(api, world, subtests, name):
    for leaf in LEAVES:
        with subtests.test(leaf=leaf):
            accepted(name, send(api, world, name, {**valid(name), "extra": nest(31, LEAVES[leaf])}))


# --- content types and sizes --------------------------------------------------------------


@pytest.mark.parametrize("name", EVERY)
def test_non_json_content_type_is_415(api, world, subtests, name):
    before = snapshot(api, world)
    for content_type in ["text/plain", "text/json", "application/xml", "application/x-json", "application/jsonx",
                         "application/x-www-form-urlencoded", "text/plain; charset=utf-8", "json"]:
        with subtests.test(content_type=content_type):
            assert_error(send(api, world, name, data=json.dumps(valid(name)), content_type=content_type), 415)
            assert snapshot(api, world) == before


@pytest.mark.parametrize("name", EVERY)
def test_json_content_types_are_accepted(api, world, subtests, name):
    """application/json with parameters, application/*+json, and no Content-Type at all."""
    for content_type in ["application/json; charset=utf-8", "application/json;charset=UTF-8", "Application/JSON",
                         "application/vnd.foo+json", "application/merge-patch+json; charset=utf-8", None]:
        with subtests.test(content_type=content_type):
            accepted(name, send(api, world, name, data=json.dumps(valid(name)).encode(), content_type=content_type))


@pytest.mark.parametrize("name", EVERY)
def test_empty_body_is_no_body(api, world, subtests, name):
    """An empty body is "no body" whatever its Content-Type: never 415, never malformed JSON."""
    for content_type in ["text/plain", "application/xml", "application/json", None]:
        with subtests.test(content_type=content_type):
            r = send(api, world, name, data=b"", content_type=content_type)
            if name in ROUTES and ROUTES[name][5] == 400:
                assert_error(r, 400)
                assert r.json["error"].startswith("Validation error: ")
            else:
                accepted(name, r)


def test_body_over_one_mib_is_413(api, world, subtests):
    before = snapshot(api, world)
    for name in EVERY:
        with subtests.test(name=name):
            head = json.dumps({**valid(name), "pad": ""})[:-2].encode()
            r = send(api, world, name, data=head + b"x" * (1024 * 1024) + b'"}', content_type="application/json")
            assert_error(r, 413)
            assert snapshot(api, world) == before


def test_body_of_exactly_one_mib_is_accepted(api, world):
    head = b'{"agentId": "agent-1", "pad": "'
    body = head + b"x" * (1024 * 1024 - len(head) - 2) + b'"}'
    assert len(body) == 1024 * 1024
    r = send(api, world, "cleanup", data=body, content_type="application/json")
    assert r.status_code == 200
    assert r.json == {"cleaned": 1}


# --- routing errors -----------------------------------------------------------------------


def test_unknown_route_is_404_json(api, subtests):
    for path in ["/", "/api", "/api/nope", "/favicon.ico", f"{BASE}/a/b", f"{BASE}/a/b/c", f"{BASE}/by-task/a/b",
                 f"{BASE}/heartbeat/a/b", "/api/tasks/x/y", "/api/tasks/x/start/more", "/health/x",
                 "/API/active-sessions"]:
        for method in ("GET", "POST", "PUT", "DELETE"):
            with subtests.test(method=method, path=path):
                assert_error(api.call(method, path), 404)


def test_literal_segments_fall_through_to_get_by_id(api, subtests):
    """GET on a literal segment that has no GET is a lookup of that id: 404, not 405."""
    for segment in ("cleanup", "heartbeat", "provider-session", "recover-orphaned-tasks", "by-task"):
        with subtests.test(segment=segment):
            r = api.get(f"{BASE}/{segment}")
            assert_error(r, 404)


WRONG_METHODS = [
    ("PATCH", BASE, {"GET", "HEAD", "POST"}),
    ("PUT", BASE, {"GET", "HEAD", "POST"}),
    ("DELETE", BASE, {"GET", "HEAD", "POST"}),
    ("POST", f"{BASE}/some-id", {"GET", "HEAD", "DELETE"}),
    ("PATCH", f"{BASE}/some-id/", {"GET", "HEAD", "DELETE"}),
    ("PUT", f"{BASE}/cleanup", {"POST", "GET", "HEAD", "DELETE"}),
    ("GET", f"{BASE}/by-task/task-1", {"DELETE"}),
    ("PUT", f"{BASE}/by-task/task-1", {"DELETE"}),
    ("POST", f"{BASE}/heartbeat/task-1", {"PUT"}),
    ("GET", f"{BASE}/heartbeat/task-1", {"PUT"}),
    ("DELETE", f"{BASE}/provider-session/task-1", {"PUT"}),
    ("POST", "/health", {"GET", "HEAD"}),
    ("DELETE", "/api/tasks", {"GET", "HEAD", "POST"}),
    ("GET", "/api/tasks/x/finish", {"POST"}),
]


def test_wrong_method_is_405_with_allow(api, subtests):
    for method, path, allowed in WRONG_METHODS:
        with subtests.test(method=method, path=path):
            r = api.call(method, path)
            assert_error(r, 405)
            allow = {m.strip() for m in r.headers["Allow"].split(",")}
            assert allowed <= allow and method not in allow


# --- weird ids in paths and queries -------------------------------------------------------

WEIRD = ["%00", "a%00b", "x" * 300, "%C3%A9" * 300, "%C3%A9%E6%97%A5", "%FF", "%C3%28", "a%0Ab", "a%01b",
         "%7F", "%C2%85", "%2E", "%2E%2E", "%20", "%25", "%E2%80%8B", "%F0%9F%98%80", "%ED%A0%80"]


def test_weird_path_ids_are_false_or_404(api, world, subtests):
    """NUL, 300 chars, unicode, bad UTF-8, control characters, "." and "..": never a 500."""
    before = snapshot(api, world)
    for raw in WEIRD:
        with subtests.test(raw=raw[:20]):
            assert_error(api.get(f"{BASE}/{raw}"), 404)
            assert api.call("HEAD", f"{BASE}/{raw}").status_code == 404
            for method, path, key in [("DELETE", f"{BASE}/{raw}", "deleted"),
                                      ("DELETE", f"{BASE}/by-task/{raw}", "deleted"),
                                      ("PUT", f"{BASE}/heartbeat/{raw}", "updated")]:
                for agent in (None, "agent-1"):
                    r = api.call(method, path, agent=agent)
                    assert r.status_code == 200, (method, path, r.data)
                    assert r.json == {key: False}
            r = api.put(f"{BASE}/provider-session/{raw}", json={"providerSessionId": "p-1"}, agent="agent-1")
            assert r.status_code == 200
            assert r.json == {"updated": False}
            assert_error(api.get(f"/api/tasks/{raw}"), 404)
            assert_error(api.post(f"/api/tasks/{raw}/cancel"), 404)
            assert snapshot(api, world) == before


def test_slash_in_path_id_never_500(api, world, subtests):
    """An encoded "/" splits the path: no route (404) or no such id (false), never a 500."""
    before = snapshot(api, world)
    for raw in ["a%2Fb", "..%2F..", "%2F", "x%2F" * 100]:
        for method, path in [("GET", f"{BASE}/{raw}"), ("DELETE", f"{BASE}/{raw}"),
                             ("DELETE", f"{BASE}/by-task/{raw}"), ("PUT", f"{BASE}/heartbeat/{raw}"),
                             ("GET", f"/api/tasks/{raw}")]:
            with subtests.test(method=method, path=path[:60]):
                r = api.call(method, path)
                if r.status_code == 200:
                    assert r.json in ({"deleted": False}, {"updated": False})
                else:
                    assert_error(r, 404)
    assert snapshot(api, world) == before


def test_weird_query_values_are_400(api, subtests):
    for path, query in [(p, q) for p in ("/api/active-sessions", "/api/tasks") for q in (
            "agentId=a%00b", "agentId=a%2Fb", "agentId=" + "x" * 257, "agentId=%2E%2E", "limit=%00",
            "offset=%FF")] + [("/api/active-sessions", "taskId=%01"), ("/api/active-sessions", "triggerType=%00"),
                              ("/api/tasks", "status=%00")]:
        with subtests.test(path=path, query=query[:30]):
            r = api.get(f"{path}?{query}")
            assert_error(r, 400)
            assert r.json["error"].startswith("Validation error: ")


def test_odd_but_valid_query_values_match_nothing(api, subtests):
    for query in ["agentId=%C3%A9%E6%97%A5", "agentId=%FF", "triggerType=a%0Ab", "runtimeInstanceId=%20"]:
        with subtests.test(query=query):
            r = api.get(f"{BASE}?{query}")
            assert r.status_code == 200
            assert r.json == {"sessions": []}


@pytest.fixture
def busy_app(tmp_path):
    """The service on SQLite with a 100 ms busy timeout."""
    from conftest import make_app, wipe

    app = make_app(f"sqlite:///{tmp_path / 'busy.db'}", tmp_path, SQLITE_BUSY_TIMEOUT_MS=100)
    yield app
    wipe(app)


@pytest.mark.parametrize("method, path, body", [
    ("PUT", f"{BASE}/heartbeat/task-1", None),
    ("POST", BASE, {"agentId": "agent-2", "taskId": "task-2", "triggerType": "x"}),
    ("DELETE", f"{BASE}/by-task/task-1", None),
    ("POST", f"{BASE}/cleanup", {"agentId": "agent-1"}),
    ("POST", "/api/tasks", {"task": "t"}),
])
def test_database_held_by_another_writer_answers_503_then_recovers(busy_app, method, path, body):
    """A write lock held past the busy timeout: 503 with Retry-After, nothing changed, and the
    connection that waited serves the next request once the lock is gone."""
    import sqlite3

    from conftest import Api

    api = Api(busy_app.test_client())
    assert api.post(BASE, json={"agentId": "agent-1", "taskId": "task-1", "triggerType": "x"}).status_code == 201
    before = api.get(BASE).json
    holder = sqlite3.connect(busy_app.config["SQLALCHEMY_DATABASE_URI"].removeprefix("sqlite:///"),
                             isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        r = api.call(method, path, json=body)
        assert_error(r, 503)
        assert r.headers["Retry-After"] == "1"
        assert "locked" not in r.json["error"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert api.get(BASE).json == before
    assert api.call(method, path, json=body).status_code in (200, 201)
    assert api.put(f"{BASE}/heartbeat/task-1").status_code == 200
