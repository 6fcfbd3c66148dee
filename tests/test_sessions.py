"""Contract part A: every active-session route, through HTTP."""

import re
import uuid
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pytest
from sqlalchemy import update

import sessions as sessions_module
from conftest import Api, make_app, wipe
from models import ActiveSession, db, stamp

BASE = "/api/active-sessions"
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FIELDS = ("id", "agentId", "taskId", "triggerType", "inboxMessageId", "taskDescription",
          "runnerSessionId", "providerSessionId", "runtimeInstanceId", "startedAt", "lastHeartbeatAt")
OPTIONAL = ("taskId", "inboxMessageId", "runnerSessionId", "runtimeInstanceId", "taskDescription")


def check_session(s):
    """Every session answer has all 11 fields and well-shaped server-made values."""
    assert set(FIELDS) <= set(s), s
    assert uuid.UUID(s["id"]).version == 4 and str(uuid.UUID(s["id"])) == s["id"]
    assert STAMP.match(s["startedAt"]) and STAMP.match(s["lastHeartbeatAt"]), s
    return s


def create(api, **fields):
    """Create a session (agent-1 / task_assigned unless given) and return it."""
    body = {"agentId": "agent-1", "triggerType": "task_assigned", **fields}
    r = api.post(BASE, json=body)
    assert r.status_code == 201, r.json
    return check_session(r.json["session"])


def listed(api, query=""):
    """The stored sessions, as GET /api/active-sessions returns them."""
    r = api.get(BASE + query)
    assert r.status_code == 200, r.json
    return [check_session(s) for s in r.json["sessions"]]


def fetch(api, session_id):
    """One stored session by id, or None."""
    r = api.get(f"{BASE}/{session_id}")
    assert r.status_code in (200, 404), r.json
    return check_session(r.json["session"]) if r.status_code == 200 else None


def set_columns(app, session_id, **values):
    """Test setup: write columns straight into the database (e.g. make a session old)."""
    table = ActiveSession.__table__
    with app.app_context():
        db.session.execute(update(table).where(table.c.id == session_id).values(**values))
        db.session.commit()


def ago(**delta):
    """A stored timestamp that far in the past."""
    return stamp(datetime.now(timezone.utc) - timedelta(**delta))


# --- create -------------------------------------------------------------------------------


def test_create_minimal(api):
    """201 with all 11 fields, nulls as null, startedAt == lastHeartbeatAt == now."""
    before = stamp()
    r = api.post(BASE, json={"agentId": "agent-1", "triggerType": "task_assigned"})
    after = stamp()
    assert r.status_code == 201
    assert list(r.json) == ["session"]
    s = check_session(r.json["session"])
    assert {k: s[k] for k in FIELDS if k not in ("id", "startedAt", "lastHeartbeatAt")} == {
        "agentId": "agent-1", "taskId": None, "triggerType": "task_assigned", "inboxMessageId": None,
        "taskDescription": None, "runnerSessionId": None, "providerSessionId": None,
        "runtimeInstanceId": None,
    }
    assert s["startedAt"] == s["lastHeartbeatAt"]
    assert before <= s["startedAt"] <= after
    assert fetch(api, s["id"]) == s
    assert listed(api) == [s]


def test_create_all_fields(api):
    body = {"agentId": "agent-1", "triggerType": "task_resumed", "taskId": "task-1",
            "inboxMessageId": "inbox-1", "runnerSessionId": "runner-1", "runtimeInstanceId": "rt-1",
            "taskDescription": "Fix the bug\n\twith tabs and é ü 日本"}
    s = create(api, **body)
    assert {k: s[k] for k in body} == body
    assert s["providerSessionId"] is None
    assert fetch(api, s["id"]) == s


def test_create_ignores_server_owned_and_unknown_fields(api):
    """id, timestamps and providerSessionId come from the server; extras are dropped."""
    sent_id = str(uuid.uuid4())
    before = stamp()
    s = create(api, id=sent_id, startedAt="2000-01-01T00:00:00.000Z",
               lastHeartbeatAt="2999-01-01T00:00:00.000Z", providerSessionId="prov-1",
               status="done", extra={"nested": [1, 2]}, model="opus")
    assert s["id"] != sent_id
    assert s["providerSessionId"] is None
    assert s["startedAt"] == s["lastHeartbeatAt"]
    assert before <= s["startedAt"] <= stamp()
    assert not {"status", "extra", "model"} & set(s)
    assert fetch(api, s["id"]) == s
    assert fetch(api, sent_id) is None


@pytest.mark.parametrize("field", OPTIONAL)
def test_create_optional_null_counts_as_absent(api, field):
    s = create(api, **{field: None})
    assert s[field] is None
    assert fetch(api, s["id"])[field] is None


def test_create_makes_fresh_ids(api):
    ids = {create(api)["id"] for _ in range(5)}
    assert len(ids) == 5
    assert {s["id"] for s in listed(api)} == ids


def test_create_duplicate_task_id_conflicts(api):
    """409 with an error and the session holding the taskId; nothing else stored."""
    first = create(api, taskId="task-1")
    r = api.post(BASE, json={"agentId": "agent-2", "triggerType": "task_resumed", "taskId": "task-1"})
    assert r.status_code == 409
    assert isinstance(r.json["error"], str) and r.json["error"]
    assert r.json["session"] == first
    assert listed(api) == [first]


def test_create_after_delete_reuses_task_id(api):
    first = create(api, taskId="task-1")
    assert api.delete(f"{BASE}/{first['id']}").json == {"deleted": True}
    second = create(api, taskId="task-1")
    assert second["id"] != first["id"]
    assert listed(api) == [second]


def test_many_sessions_without_task_id(api):
    made = [create(api), create(api, taskId=None), create(api, agentId="agent-2")]
    assert {s["id"] for s in listed(api)} == {s["id"] for s in made}


def test_create_accepts_bounds(api):
    """Ids of 256 code points and a 4096-char description are accepted and kept exactly."""
    body = {"agentId": "é" * 256, "triggerType": "t" * 256, "taskId": "日" * 256,
            "taskDescription": "d" * 4096}
    s = create(api, **body)
    assert fetch(api, s["id"]) == s
    assert (s["agentId"], s["triggerType"], s["taskId"], s["taskDescription"]) == (
        "é" * 256, "t" * 256, "日" * 256, "d" * 4096)


@pytest.mark.parametrize("task_id", ["task 1", "a?b#c%d&e=f", "é日本 ü", "...", "a.b", "-", "x" * 256, "a\\b"])
def test_every_accepted_task_id_is_addressable(api, task_id):
    """Whatever id a create accepts works in every path and query that names it."""
    s = create(api, taskId=task_id)
    path = quote(task_id, safe="")
    assert api.put(f"{BASE}/heartbeat/{path}").json == {"updated": True}
    assert api.put(f"{BASE}/provider-session/{path}", json={"providerSessionId": "p-1"}).json == {"updated": True}
    assert [x["id"] for x in listed(api, "?taskId=" + path)] == [s["id"]]
    assert api.delete(f"{BASE}/by-task/{path}").json == {"deleted": True}
    assert listed(api) == []


# --- list ---------------------------------------------------------------------------------


def test_list_empty(api):
    r = api.get(BASE)
    assert r.status_code == 200
    assert r.json == {"sessions": []}


# Characters JSON encoders treat differently: quotes, escapes, controls, non-BMP, separators.
AWKWARD = "q\"b\\s/ \n\r\t\b\f \x01\x1f\x7f\x80\x9f é日 😀 \u2028\u2029 \ufeff </script> \\u0041"


@pytest.mark.parametrize("page", ["", "?limit=10", "?agentId=%C3%A9-%F0%9F%98%80"])
def test_list_returns_every_character_as_created(api, page):
    """The listing is encoded by the database (json_object / json_build_object): same text as create."""
    s = create(api, agentId="é-😀", taskId="t-é😀\\\"", taskDescription=AWKWARD, runnerSessionId="r\u2028")
    assert s["taskDescription"] == AWKWARD
    assert listed(api, page) == [s] == [fetch(api, s["id"])]
    # The fields that change after create are encoded apart from the stored head: change both.
    provider = "p-\"\\ é😀\u2028<script>"
    r = api.put(f"{BASE}/provider-session/{quote(s['taskId'], safe='')}", json={"providerSessionId": provider})
    assert r.json == {"updated": True}
    assert api.put(f"{BASE}/heartbeat/{quote(s['taskId'], safe='')}").json == {"updated": True}
    after = fetch(api, s["id"])
    assert after["providerSessionId"] == provider and after["lastHeartbeatAt"] >= s["lastHeartbeatAt"]
    assert listed(api, page) == [after]


def test_list_order_newest_first_ties_by_id(app, api):
    made = [create(api, taskId=f"t{i}") for i in range(5)]
    starts = ["2026-01-01T00:00:00.000Z", "2026-01-02T00:00:00.000Z", "2026-01-02T00:00:00.000Z",
              "2026-01-02T00:00:00.000Z", "2026-01-01T00:00:00.001Z"]
    for s, start in zip(made, starts):
        set_columns(app, s["id"], started_at=start, last_heartbeat_at=start)
    tied = sorted(s["id"] for s in made[1:4])
    assert [s["id"] for s in listed(api)] == tied + [made[4]["id"], made[0]["id"]]


def test_list_filter_agent_exact(api):
    a1 = create(api, agentId="agent-1")
    create(api, agentId="Agent-1")
    create(api, agentId="agent-10")
    create(api, agentId="agent")
    assert listed(api, "?agentId=agent-1") == [a1]
    assert listed(api, "?agentId=nobody") == []


def test_list_empty_agent_filter_is_no_filter(api):
    made = [create(api, agentId="agent-1"), create(api, agentId="agent-2")]
    assert sorted(s["id"] for s in listed(api, "?agentId=")) == sorted(s["id"] for s in made)
    assert api.get(BASE + "?agentId=").json == api.get(BASE).json


@pytest.mark.parametrize("key, value", [("taskId", "t-2"), ("runtimeInstanceId", "rt-2"),
                                        ("triggerType", "pool_tasks_available")])
def test_list_other_filters(api, key, value):
    create(api, taskId="t-1", runtimeInstanceId="rt-1", triggerType="task_assigned")
    wanted = create(api, taskId="t-2", runtimeInstanceId="rt-2", triggerType="pool_tasks_available")
    assert listed(api, f"?{key}={value}") == [wanted]
    assert listed(api, f"?{key}={value}x") == []


def test_list_filters_combine(api):
    wanted = create(api, agentId="agent-1", runtimeInstanceId="rt-1")
    create(api, agentId="agent-1", runtimeInstanceId="rt-2")
    create(api, agentId="agent-2", runtimeInstanceId="rt-1")
    assert listed(api, "?agentId=agent-1&runtimeInstanceId=rt-1") == [wanted]


def test_list_paging(app, api):
    made = [create(api, taskId=f"t{i}") for i in range(5)]
    for i, s in enumerate(made):
        set_columns(app, s["id"], started_at=f"2026-01-01T00:00:0{i}.000Z")
    newest_first = [s["id"] for s in reversed(made)]
    for query, ids in [("?limit=2", newest_first[:2]), ("?limit=2&offset=2", newest_first[2:4]),
                       ("?offset=4", newest_first[4:]), ("?offset=5", []), ("?limit=1000&offset=0", newest_first)]:
        r = api.get(BASE + query)
        assert r.status_code == 200, (query, r.json)
        assert set(r.json) == {"sessions", "total"}
        assert [s["id"] for s in r.json["sessions"]] == ids, query
        assert r.json["total"] == 5
    assert "total" not in api.get(BASE).json


def test_list_paging_total_counts_matches_only(api):
    for i in range(3):
        create(api, agentId="agent-1", taskId=f"a{i}")
    create(api, agentId="agent-2")
    r = api.get(BASE + "?agentId=agent-1&limit=1")
    assert r.status_code == 200
    assert len(r.json["sessions"]) == 1 and r.json["total"] == 3


@pytest.mark.parametrize("query", ["limit=1", "limit=1000", "offset=0", "offset=1000000000"])
def test_list_paging_bounds_accepted(api, query):
    create(api)
    r = api.get(f"{BASE}?{query}")
    assert r.status_code == 200
    assert r.json["total"] == 1


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=-1", "limit=abc", "limit=1.5", "limit=%201",
                                   "offset=-1", "offset=1000000001", "offset=x", "offset=1e3"])
def test_list_paging_out_of_bounds(api, query):
    r = api.get(f"{BASE}?{query}")
    assert r.status_code == 400
    assert r.json["error"].startswith("Validation error: ")
    assert list(r.json["details"]) == [query.split("=")[0]]


# --- get one ------------------------------------------------------------------------------


def test_get_session(api):
    s = create(api, taskId="task-1")
    r = api.get(f"{BASE}/{s['id']}")
    assert r.status_code == 200
    assert r.json == {"session": s}


def test_get_unknown_session(api):
    r = api.get(f"{BASE}/{uuid.uuid4()}")
    assert r.status_code == 404
    assert isinstance(r.json["error"], str)


# --- delete -------------------------------------------------------------------------------


def test_delete_by_id(api):
    s, other = create(api, taskId="t1"), create(api, taskId="t2")
    r = api.delete(f"{BASE}/{s['id']}")
    assert r.status_code == 200
    assert r.json == {"deleted": True}
    assert fetch(api, s["id"]) is None
    assert listed(api) == [other]
    assert api.delete(f"{BASE}/{s['id']}").json == {"deleted": False}


def test_delete_by_task(api):
    s, other = create(api, taskId="t1"), create(api, taskId="t2")
    r = api.delete(f"{BASE}/by-task/t1")
    assert r.status_code == 200
    assert r.json == {"deleted": True}
    assert listed(api) == [other]
    assert api.delete(f"{BASE}/by-task/t1").json == {"deleted": False}
    assert fetch(api, s["id"]) is None


@pytest.mark.parametrize("path", [f"{BASE}/{uuid.uuid4()}", f"{BASE}/by-task/unknown", f"{BASE}/by-task",
                                  f"{BASE}/cleanup", f"{BASE}/heartbeat", f"{BASE}/provider-session",
                                  f"{BASE}/recover-orphaned-tasks"])
def test_delete_unknown_is_false(api, path):
    """Literal segments only win for their own methods: DELETE .../cleanup is the id "cleanup"."""
    s = create(api, taskId="by-task")
    r = api.delete(path)
    assert r.status_code == 200
    assert r.json == {"deleted": False}
    assert listed(api) == [s]


# --- heartbeat ----------------------------------------------------------------------------


def test_heartbeat_updates_last_heartbeat_only(app, api):
    s = create(api, taskId="task-1", runtimeInstanceId="rt-1", taskDescription="x")
    old = "2026-01-01T00:00:00.000Z"
    set_columns(app, s["id"], started_at=old, last_heartbeat_at=old)
    before = stamp()
    r = api.put(f"{BASE}/heartbeat/task-1")
    assert r.status_code == 200
    assert r.json == {"updated": True}
    after = fetch(api, s["id"])
    assert before <= after["lastHeartbeatAt"] <= stamp()
    assert after["startedAt"] == old
    assert {k: v for k, v in after.items() if k not in ("startedAt", "lastHeartbeatAt")} == {
        k: v for k, v in s.items() if k not in ("startedAt", "lastHeartbeatAt")}


def test_heartbeat_unknown_creates_nothing(api):
    s = create(api, taskId="task-1")
    r = api.put(f"{BASE}/heartbeat/task-2")
    assert r.status_code == 200
    assert r.json == {"updated": False}
    assert listed(api) == [s]


def test_heartbeat_never_moves_backwards(app, api):
    s = create(api, taskId="task-1")
    future = "2999-01-01T00:00:00.000Z"
    set_columns(app, s["id"], last_heartbeat_at=future)
    assert api.put(f"{BASE}/heartbeat/task-1").json == {"updated": True}
    assert fetch(api, s["id"])["lastHeartbeatAt"] == future


def test_heartbeat_accepts_empty_json_body(app, api):
    s = create(api, taskId="task-1")
    old = ago(minutes=5)
    set_columns(app, s["id"], last_heartbeat_at=old)
    assert api.put(f"{BASE}/heartbeat/task-1", json={}).json == {"updated": True}
    assert fetch(api, s["id"])["lastHeartbeatAt"] > old


# --- provider session ---------------------------------------------------------------------


def test_provider_session_sets_that_field_only(api):
    s = create(api, taskId="task-1", runnerSessionId="runner-1")
    r = api.put(f"{BASE}/provider-session/task-1", json={"providerSessionId": "claude-abc"})
    assert r.status_code == 200
    assert r.json == {"updated": True}
    assert fetch(api, s["id"]) == {**s, "providerSessionId": "claude-abc"}
    r = api.put(f"{BASE}/provider-session/task-1", json={"providerSessionId": "claude-def"})
    assert r.json == {"updated": True}
    assert fetch(api, s["id"])["providerSessionId"] == "claude-def"


def test_provider_session_unknown_task(api):
    s = create(api, taskId="task-1")
    r = api.put(f"{BASE}/provider-session/task-2", json={"providerSessionId": "claude-abc"})
    assert r.status_code == 200
    assert r.json == {"updated": False}
    assert listed(api) == [s]


@pytest.mark.parametrize("body", [None, {}, {"providerSessionId": None}, {"providerSessionId": ""},
                                  {"providerSessionId": 5}, {"providerSessionId": "a/b"}, {"claudeSessionId": "x"}])
def test_provider_session_validation(api, body):
    s = create(api, taskId="task-1")
    r = api.put(f"{BASE}/provider-session/task-1", json=body)
    assert r.status_code == 400
    assert r.json["error"].startswith("Validation error: ")
    assert "providerSessionId" in r.json["details"]
    assert fetch(api, s["id"]) == s


# --- cleanup ------------------------------------------------------------------------------


@pytest.fixture
def aged(app, api):
    """Four sessions: agent-1 and agent-2 each have one 45 minutes old and one fresh."""
    made = {}
    for agent in ("agent-1", "agent-2"):
        for age in ("old", "fresh"):
            made[agent, age] = create(api, agentId=agent, taskId=f"{agent}-{age}")
        set_columns(app, made[agent, "old"]["id"], last_heartbeat_at=ago(minutes=45))
        made[agent, "old"] = fetch(api, made[agent, "old"]["id"])
    return made


def remaining(api):
    return sorted(s["taskId"] for s in listed(api))


@pytest.mark.parametrize("kwargs", [{}, {"json": {}}, {"json": {"agentId": None, "maxAgeMinutes": None}},
                                    {"data": b"", "content_type": "text/plain"}, {"json": {"unknown": 1}}])
def test_cleanup_defaults_remove_every_old_session(api, aged, kwargs):
    r = api.post(f"{BASE}/cleanup", **kwargs)
    assert r.status_code == 200
    assert r.json == {"cleaned": 2}
    assert remaining(api) == ["agent-1-fresh", "agent-2-fresh"]


def test_cleanup_max_age_alone(app, api, aged):
    set_columns(app, aged["agent-2", "fresh"]["id"], last_heartbeat_at=ago(minutes=10))
    r = api.post(f"{BASE}/cleanup", json={"maxAgeMinutes": 5})
    assert r.json == {"cleaned": 3}
    assert remaining(api) == ["agent-1-fresh"]
    assert api.post(f"{BASE}/cleanup", json={"maxAgeMinutes": 525600}).json == {"cleaned": 0}


def test_cleanup_agent_alone_removes_all_of_its_sessions(api, aged):
    r = api.post(f"{BASE}/cleanup", json={"agentId": "agent-1"})
    assert r.status_code == 200
    assert r.json == {"cleaned": 2}
    assert remaining(api) == ["agent-2-fresh", "agent-2-old"]


def test_cleanup_agent_and_max_age(api, aged):
    r = api.post(f"{BASE}/cleanup", json={"agentId": "agent-1", "maxAgeMinutes": 30})
    assert r.status_code == 200
    assert r.json == {"cleaned": 1}
    assert remaining(api) == ["agent-1-fresh", "agent-2-fresh", "agent-2-old"]


def test_cleanup_unknown_agent_removes_nothing(api, aged):
    assert api.post(f"{BASE}/cleanup", json={"agentId": "agent-9"}).json == {"cleaned": 0}
    assert len(listed(api)) == 4


def test_cleanup_older_is_strict(app, api, monkeypatch):
    """A heartbeat exactly maxAgeMinutes old stays; one millisecond older goes."""
    moment = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return moment

    for task, beat in [("edge", "2026-03-01T11:30:00.000Z"), ("older", "2026-03-01T11:29:59.999Z"),
                       ("newer", "2026-03-01T11:30:00.001Z")]:
        set_columns(app, create(api, taskId=task)["id"], last_heartbeat_at=beat)
    monkeypatch.setattr(sessions_module, "datetime", Frozen)
    assert api.post(f"{BASE}/cleanup").json == {"cleaned": 1}
    assert remaining(api) == ["edge", "newer"]
    assert api.post(f"{BASE}/cleanup", json={"agentId": "agent-1", "maxAgeMinutes": 30}).json == {"cleaned": 0}


@pytest.mark.parametrize("value", [0, -1, -30, 525601, 10**12, "30", 30.5, True, False, [30], {"m": 30}, ""])
def test_cleanup_bad_max_age(api, aged, value):
    before = listed(api)
    for body in ({"maxAgeMinutes": value}, {"agentId": "agent-1", "maxAgeMinutes": value}):
        r = api.post(f"{BASE}/cleanup", json=body)
        assert r.status_code == 400, (value, r.json)
        assert r.json["error"].startswith("Validation error: ")
        assert list(r.json["details"]) == ["maxAgeMinutes"]
    assert listed(api) == before


def test_cleanup_json_null_body(api, aged):
    before = listed(api)
    r = api.post(f"{BASE}/cleanup", data="null", content_type="application/json")
    assert r.status_code == 400
    assert isinstance(r.json["error"], str)
    assert listed(api) == before


@pytest.mark.parametrize("flag", ["1", "true", "TRUE", "True"])
def test_multi_runtime_flag_from_environment(database_url, tmp_path, monkeypatch, flag):
    monkeypatch.setenv("MULTI_RUNTIME_ENABLED", flag)
    multi = make_app(database_url, tmp_path)
    try:
        assert multi.config["MULTI_RUNTIME_ENABLED"] is True
    finally:
        wipe(multi)


@pytest.mark.parametrize("flag", ["0", "false", "", "no", "yes"])
def test_multi_runtime_flag_off(database_url, tmp_path, monkeypatch, flag):
    monkeypatch.setenv("MULTI_RUNTIME_ENABLED", flag)
    single = make_app(database_url, tmp_path)
    try:
        assert single.config["MULTI_RUNTIME_ENABLED"] is False
    finally:
        wipe(single)


@pytest.fixture
def multi_api(database_url, tmp_path):
    """An app in multi-runtime mode, with two agents' old and fresh sessions."""
    multi = make_app(database_url, tmp_path, MULTI_RUNTIME_ENABLED=True)
    api = Api(multi.test_client())
    for agent in ("agent-1", "agent-2"):
        create(api, agentId=agent, taskId=f"{agent}-fresh")
        set_columns(multi, create(api, agentId=agent, taskId=f"{agent}-old")["id"], last_heartbeat_at=ago(hours=2))
    yield api
    wipe(multi)


@pytest.mark.parametrize("body", [{"agentId": "agent-1"}, {"agentId": "agent-1", "maxAgeMinutes": 30}])
def test_multi_runtime_agent_cleanup_removes_nothing(multi_api, body):
    before = listed(multi_api)
    for agent in (None, "agent-1"):
        r = multi_api.post(f"{BASE}/cleanup", json=body, agent=agent)
        assert r.status_code == 200
        assert r.json == {"cleaned": 0}
    assert listed(multi_api) == before


def test_multi_runtime_agent_cleanup_still_validates_and_checks_owner(multi_api):
    before = listed(multi_api)
    r = multi_api.post(f"{BASE}/cleanup", json={"agentId": "agent-1", "maxAgeMinutes": 0})
    assert r.status_code == 400
    assert list(r.json["details"]) == ["maxAgeMinutes"]
    r = multi_api.post(f"{BASE}/cleanup", json={"agentId": "a/b"}, agent="agent-1")
    assert r.status_code == 400
    assert list(r.json["details"]) == ["agentId"]
    r = multi_api.post(f"{BASE}/cleanup", json={"agentId": "agent-1"}, agent="agent-2")
    assert r.status_code == 403
    assert isinstance(r.json["error"], str)
    assert listed(multi_api) == before


def test_multi_runtime_global_cleanup_still_works(multi_api):
    assert multi_api.post(f"{BASE}/cleanup").json == {"cleaned": 2}
    assert remaining(multi_api) == ["agent-1-fresh", "agent-2-fresh"]


# --- ownership ----------------------------------------------------------------------------

OWNED_ACTIONS = {
    "delete": lambda api, s, **kw: api.delete(f"{BASE}/{s['id']}", **kw),
    "delete-by-task": lambda api, s, **kw: api.delete(f"{BASE}/by-task/{s['taskId']}", **kw),
    "heartbeat": lambda api, s, **kw: api.put(f"{BASE}/heartbeat/{s['taskId']}", **kw),
    "provider-session": lambda api, s, **kw: api.put(f"{BASE}/provider-session/{s['taskId']}",
                                                     json={"providerSessionId": "p-1"}, **kw),
}
SUCCESS = {"delete": {"deleted": True}, "delete-by-task": {"deleted": True},
           "heartbeat": {"updated": True}, "provider-session": {"updated": True}}


@pytest.mark.parametrize("action", OWNED_ACTIONS)
@pytest.mark.parametrize("caller", ["agent-2", "Agent-1", "agent-1 x", "agent", "ag\u00e9nt-\u00fc"])
def test_other_agent_is_forbidden(app, api, action, caller):
    s = create(api, taskId="task-1")
    set_columns(app, s["id"], last_heartbeat_at=ago(minutes=1))
    s = fetch(api, s["id"])
    r = OWNED_ACTIONS[action](api, s, agent=caller)
    assert r.status_code == 403
    assert isinstance(r.json["error"], str)
    assert listed(api) == [s]


@pytest.mark.parametrize("action", OWNED_ACTIONS)
@pytest.mark.parametrize("caller", [None, "", "agent-1"])
def test_owner_or_operator_may_act(api, action, caller):
    """The session's own agent, no header, or an empty header (absent) all act."""
    s = create(api, taskId="task-1")
    r = OWNED_ACTIONS[action](api, s, agent=caller)
    assert r.status_code == 200
    assert r.json == SUCCESS[action]


@pytest.mark.parametrize("action", OWNED_ACTIONS)
def test_unicode_agent_matches_utf8_header(api, action):
    """X-Agent-ID is compared on its UTF-8 decoding; the latin-1 reading of the bytes never matches."""
    s = create(api, agentId="agént-ü", taskId="task-1")
    assert OWNED_ACTIONS[action](api, s, agent="agént-ü").status_code == 403
    assert listed(api) == [s]
    r = OWNED_ACTIONS[action](api, s, agent="agént-ü".encode().decode("latin-1"))
    assert r.status_code == 200
    assert r.json == SUCCESS[action]


@pytest.mark.parametrize("action", OWNED_ACTIONS)
def test_other_agent_on_unknown_session_is_false(api, action):
    ghost = {"id": str(uuid.uuid4()), "taskId": "ghost"}
    r = OWNED_ACTIONS[action](api, ghost, agent="agent-2")
    assert r.status_code == 200
    assert r.json == {k: False for k in SUCCESS[action]}


def test_cleanup_by_agent_ownership(api, aged):
    before = listed(api)
    r = api.post(f"{BASE}/cleanup", json={"agentId": "agent-1"}, agent="agent-2")
    assert r.status_code == 403
    assert isinstance(r.json["error"], str)
    assert listed(api) == before
    r = api.post(f"{BASE}/cleanup", json={"agentId": "agent-1"}, agent="agent-1")
    assert r.json == {"cleaned": 2}
    assert remaining(api) == ["agent-2-fresh", "agent-2-old"]


def test_cleanup_without_agent_is_not_an_ownership_check(api, aged):
    """Only cleanup-by-agent checks X-Agent-ID; a stale sweep works for any caller."""
    assert api.post(f"{BASE}/cleanup", agent="agent-2").json == {"cleaned": 2}
    assert remaining(api) == ["agent-1-fresh", "agent-2-fresh"]


# --- paths and timestamps -----------------------------------------------------------------


@pytest.mark.parametrize("method, path, body, status, expect", [
    ("POST", f"{BASE}/", {"agentId": "a", "triggerType": "t"}, 201, None),
    ("GET", f"{BASE}/", None, 200, None),
    ("GET", f"{BASE}/?agentId=agent-1", None, 200, None),
    ("GET", f"{BASE}/{{id}}/", None, 200, None),
    ("PUT", f"{BASE}/heartbeat/task-1/", None, 200, {"updated": True}),
    ("PUT", f"{BASE}/provider-session/task-1/", {"providerSessionId": "p"}, 200, {"updated": True}),
    ("POST", f"{BASE}/cleanup/", {"agentId": "agent-1"}, 200, {"cleaned": 1}),
    ("DELETE", f"{BASE}/by-task/task-1/", None, 200, {"deleted": True}),
    ("DELETE", f"{BASE}/{{id}}/", None, 200, {"deleted": True}),
    ("POST", f"{BASE}/recover-orphaned-tasks/", {"agentId": "agent-1"}, 200, {"recovered": 0, "tasks": []}),
])
def test_trailing_slash_works(api, method, path, body, status, expect):
    s = create(api, taskId="task-1")
    r = api.call(method, path.replace("{id}", s["id"]), json=body, agent="agent-1")
    assert r.status_code == status, r.json
    assert r.headers.get("Location") is None
    if expect is not None:
        assert r.json == expect
    elif method == "GET":
        assert r.json in ({"session": s}, {"sessions": [s]})


@pytest.mark.parametrize("path", [BASE, f"{BASE}/", f"{BASE}?agentId=agent-1&limit=5", f"{BASE}/{{id}}",
                                  f"{BASE}/{{id}}/"])
def test_head_works_where_get_does(api, path):
    s = create(api)
    path = path.replace("{id}", s["id"])
    get, head = api.get(path), api.call("HEAD", path)
    assert head.status_code == get.status_code == 200
    assert head.data == b""
    assert head.headers["Content-Type"] == get.headers["Content-Type"] == "application/json"
    assert int(head.headers["Content-Length"]) == len(get.data)


def test_head_unknown_session_is_404(api):
    assert api.call("HEAD", f"{BASE}/{uuid.uuid4()}").status_code == 404


def test_timestamps_have_one_shape_everywhere(app, api):
    """Create, get, list and the 409 answer all carry YYYY-MM-DDTHH:MM:SS.mmmZ."""
    s = create(api, taskId="task-1")
    old = ago(minutes=1)
    set_columns(app, s["id"], last_heartbeat_at=old)
    assert api.put(f"{BASE}/heartbeat/task-1").json == {"updated": True}
    answers = [fetch(api, s["id"]), *listed(api), *api.get(BASE + "?limit=1").json["sessions"],
               api.post(BASE, json={"agentId": "a", "triggerType": "t", "taskId": "task-1"}).json["session"]]
    for session in answers:
        assert STAMP.match(session["startedAt"]) and STAMP.match(session["lastHeartbeatAt"]), session
    assert answers[0]["lastHeartbeatAt"] > old
