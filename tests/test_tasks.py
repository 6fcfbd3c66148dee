"""Task routes (contract part B): create, list, read, start, progress, session, finish, cancel."""

import re
import uuid

import pytest
from sqlalchemy import update

from models import Task, db, stamp

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TASK_KEYS = {"id", "agentId", "task", "status", "priority", "progress", "output", "failureReason",
             "claudeSessionId", "createdAt", "lastUpdatedAt", "finishedAt"}
LOG_KEYS = {"id", "eventType", "agentId", "taskId", "oldValue", "newValue", "metadata", "createdAt"}
OLD = "2020-01-01T00:00:00.000Z"
TERMINAL = ("completed", "failed", "cancelled")
NOT_FOUND = {"error": "Task not found"}


# ---------------------------------------------------------------- helpers


def create(api, **body):
    """Create a task through the API and return its JSON."""
    r = api.post("/api/tasks", json={"task": "do it", **body})
    assert r.status_code == 201, r.json
    return r.json


def read(api, task_id):
    """GET a task with its logs."""
    r = api.get(f"/api/tasks/{task_id}")
    assert r.status_code == 200, r.json
    return r.json


def without_logs(task):
    """The task object of a GET answer, without its log."""
    return {k: v for k, v in task.items() if k != "logs"}


def set_columns(app, task_id, **values):
    """Test setup: write task columns directly (statuses not reachable through the API, ages)."""
    with app.app_context():
        table = Task.__table__
        db.session.execute(update(table).where(table.c.id == task_id).values(**values))
        db.session.commit()


def task_in(app, api, status, agent="a1"):
    """A task of agent (None: no agent) stored with the given status; returns its id."""
    task = create(api, agentId=agent) if agent else create(api)
    values = {"status": status}
    if status in TERMINAL:
        values["finished_at"] = OLD
    set_columns(app, task["id"], **values)
    return task["id"]


def assert_task(task):
    """A task object: exactly the contract's fields, every timestamp in the one shape."""
    assert set(task) == TASK_KEYS
    assert uuid.UUID(task["id"]).version == 4
    for key in ("createdAt", "lastUpdatedAt"):
        assert STAMP.match(task[key]), task[key]
    if task["finishedAt"] is not None:
        assert STAMP.match(task["finishedAt"]), task["finishedAt"]


def assert_error(r, status):
    """An error answer: the status and a JSON {"error": <text>}."""
    assert r.status_code == status, r.json
    assert set(r.json) == {"error"}
    assert isinstance(r.json["error"], str) and r.json["error"]


def status_logs(task):
    """(oldValue, newValue) of a task's status-change entries, oldest first."""
    return [(e["oldValue"], e["newValue"]) for e in task["logs"] if e["eventType"] == "task_status_change"]


# ---------------------------------------------------------------- POST /api/tasks


@pytest.mark.parametrize("agent, status", [("a1", "pending"), (None, "unassigned")])
def test_create_task(api, agent, status):
    before = stamp()
    body = {"task": "write tests"} | ({"agentId": agent} if agent else {})
    r = api.post("/api/tasks", json=body)
    after = stamp()
    assert r.status_code == 201, r.json
    task = r.json
    assert_task(task)
    assert task | {"id": None, "createdAt": None, "lastUpdatedAt": None} == {
        "id": None, "agentId": agent, "task": "write tests", "status": status, "priority": 50,
        "progress": None, "output": None, "failureReason": None, "claudeSessionId": None,
        "createdAt": None, "lastUpdatedAt": None, "finishedAt": None,
    }
    assert before <= task["createdAt"] == task["lastUpdatedAt"] <= after
    stored = read(api, task["id"])
    assert without_logs(stored) == task
    assert stored["logs"] == []


@pytest.mark.parametrize("body, agent, priority", [
    ({"agentId": None}, None, 50),
    ({"priority": None}, None, 50),
    ({"priority": 0}, None, 0),
    ({"priority": 100}, None, 100),
    ({"priority": 73, "agentId": "a" * 256}, "a" * 256, 73),
    ({"agentId": "agent-é-✓"}, "agent-é-✓", 50),
])
def test_create_task_optional_fields(api, body, agent, priority):
    r = api.post("/api/tasks", json={"task": "t", **body})
    assert r.status_code == 201, r.json
    assert (r.json["agentId"], r.json["priority"]) == (agent, priority)
    assert r.json["status"] == ("pending" if agent else "unassigned")
    assert without_logs(read(api, r.json["id"])) == r.json


@pytest.mark.parametrize("text", ["x", "x" * 65536, "línea 1\nlínea 2 ✓"])
def test_create_task_text_bounds(api, text):
    r = api.post("/api/tasks", json={"task": text})
    assert r.status_code == 201, r.json
    assert read(api, r.json["id"])["task"] == text


def test_create_ignores_server_owned_and_unknown_fields(api):
    sent = {"task": "t", "agentId": "a1", "id": "my-own-id", "status": "completed", "createdAt": OLD,
            "lastUpdatedAt": OLD, "finishedAt": OLD, "progress": "p", "output": "o",
            "failureReason": "f", "claudeSessionId": "c", "extra": {"x": 1}}
    r = api.post("/api/tasks", json=sent)
    assert r.status_code == 201, r.json
    task = r.json
    assert_task(task)
    assert task["id"] != "my-own-id"
    assert task["status"] == "pending"
    assert task["createdAt"] != OLD and task["lastUpdatedAt"] != OLD
    assert [task[k] for k in ("finishedAt", "progress", "output", "failureReason", "claudeSessionId")] == [None] * 5
    assert without_logs(read(api, task["id"])) == task
    assert api.get("/api/tasks/my-own-id").json == NOT_FOUND


@pytest.mark.parametrize("body, field", [
    ({}, "task"),
    ({"task": None}, "task"),
    ({"task": ""}, "task"),
    ({"task": "x" * 65537}, "task"),
    ({"task": 5}, "task"),
    ({"task": ["t"]}, "task"),
    ({"task": "t", "priority": -1}, "priority"),
    ({"task": "t", "priority": 101}, "priority"),
    ({"task": "t", "priority": "50"}, "priority"),
    ({"task": "t", "priority": 50.5}, "priority"),
    ({"task": "t", "priority": True}, "priority"),
    ({"task": "t", "agentId": ""}, "agentId"),
    ({"task": "t", "agentId": "a/b"}, "agentId"),
    ({"task": "t", "agentId": "."}, "agentId"),
    ({"task": "t", "agentId": ".."}, "agentId"),
    ({"task": "t", "agentId": "a" * 257}, "agentId"),
    ({"task": "t", "agentId": 7}, "agentId"),
    ({"task": "t", "agentId": "a\nb"}, "agentId"),
    ({"task": "t", "agentId": "a\x85b"}, "agentId"),
])
def test_create_task_validation(api, body, field):
    r = api.post("/api/tasks", json=body)
    assert r.status_code == 400, r.json
    assert r.json["error"].startswith("Validation error: ")
    assert field in r.json["details"]
    assert api.get("/api/tasks").json == {"tasks": [], "total": 0}


@pytest.mark.parametrize("data", ["[]", '"t"', "1", "{bad json"])
def test_create_task_body_not_an_object(api, data):
    r = api.post("/api/tasks", data=data, content_type="application/json")
    assert_error(r, 400)
    assert api.get("/api/tasks").json == {"tasks": [], "total": 0}


# ---------------------------------------------------------------- GET /api/tasks


def test_list_empty(api):
    r = api.get("/api/tasks")
    assert r.status_code == 200
    assert r.json == {"tasks": [], "total": 0}


def test_list_order_oldest_first_then_id(app, api):
    ids = [create(api, agentId=f"a{i}")["id"] for i in range(5)]
    times = ["2024-01-01T00:00:02.000Z", "2024-01-01T00:00:01.000Z", "2024-01-01T00:00:03.000Z",
             "2024-01-01T00:00:03.000Z", "2024-01-01T00:00:03.000Z"]
    for task_id, created in zip(ids, times):
        set_columns(app, task_id, created_at=created)
    r = api.get("/api/tasks")
    assert r.status_code == 200
    assert [t["id"] for t in r.json["tasks"]] == [ids[1], ids[0], *sorted(ids[2:])]
    assert r.json["total"] == 5
    for task in r.json["tasks"]:
        assert_task(task)
        assert without_logs(read(api, task["id"])) == task


@pytest.fixture
def mixed(app, api):
    """Tasks of several agents and statuses, in creation order: (agent, status) -> id."""
    made = {}
    for i, (agent, status) in enumerate([
        ("a1", "pending"), ("a1", "in_progress"), ("a2", "pending"), (None, "unassigned"),
        ("a1", "completed"), ("a2", "paused"), ("a2", "failed"),
    ]):
        task_id = task_in(app, api, status, agent)
        set_columns(app, task_id, created_at=f"2024-01-01T00:00:0{i}.000Z")
        made[(agent, status)] = task_id
    return made


@pytest.mark.parametrize("query, expected", [
    ("", list(range(7))),
    ("?agentId=", list(range(7))),
    ("?agentId=a1", [0, 1, 4]),
    ("?agentId=a2", [2, 5, 6]),
    ("?agentId=nobody", []),
    ("?status=pending", [0, 2]),
    ("?status=pending,paused", [0, 2, 5]),
    ("?status=completed,failed,cancelled", [4, 6]),
    ("?status=unassigned", [3]),
    ("?status=cancelled", []),
    ("?agentId=a2&status=pending,failed", [2, 6]),
    ("?agentId=a1&status=in_progress", [1]),
])
def test_list_filters(api, mixed, query, expected):
    ids = list(mixed.values())
    r = api.get(f"/api/tasks{query}")
    assert r.status_code == 200, r.json
    assert [t["id"] for t in r.json["tasks"]] == [ids[i] for i in expected]
    assert r.json["total"] == len(expected)


@pytest.mark.parametrize("query, expected, total", [
    ("?limit=2", [0, 1], 7),
    ("?limit=2&offset=1", [1, 2], 7),
    ("?offset=5", [5, 6], 7),
    ("?offset=7", [], 7),
    ("?offset=1000000000", [], 7),
    ("?limit=1000", list(range(7)), 7),
    ("?limit=1&offset=1&agentId=a2", [5], 3),
    ("?limit=1&status=pending,paused", [0], 3),
])
def test_list_paging_total_counts_all_matches(api, mixed, query, expected, total):
    ids = list(mixed.values())
    r = api.get(f"/api/tasks{query}")
    assert r.status_code == 200, r.json
    assert [t["id"] for t in r.json["tasks"]] == [ids[i] for i in expected]
    assert r.json["total"] == total


def test_list_default_limit_is_100(api):
    ids = [create(api, priority=i % 101)["id"] for i in range(101)]
    r = api.get("/api/tasks")
    assert r.status_code == 200
    assert len(r.json["tasks"]) == 100
    assert r.json["total"] == 101
    listed = [t["id"] for t in r.json["tasks"]]
    rest = api.get("/api/tasks?offset=100").json
    assert rest["total"] == 101
    assert sorted(listed + [t["id"] for t in rest["tasks"]]) == sorted(ids)


@pytest.mark.parametrize("query, field", [
    ("status=bogus", "status"),
    ("status=PENDING", "status"),
    ("status=pending,bogus", "status"),
    ("status=,", "status"),
    ("limit=0", "limit"),
    ("limit=1001", "limit"),
    ("limit=abc", "limit"),
    ("limit=-1", "limit"),
    ("limit=1.5", "limit"),
    ("offset=-1", "offset"),
    ("offset=1000000001", "offset"),
])
def test_list_bad_query(api, mixed, query, field):
    r = api.get(f"/api/tasks?{query}")
    assert r.status_code == 400, r.json
    assert r.json["error"].startswith("Validation error: ")
    assert field in r.json["details"]


# ---------------------------------------------------------------- GET /api/tasks/{id}


@pytest.mark.parametrize("task_id", ["nope", str(uuid.uuid4()), "%00", "a" * 300])
def test_get_unknown_task(api, task_id):
    r = api.get(f"/api/tasks/{task_id}")
    assert r.status_code == 404
    assert r.json == NOT_FOUND


def test_get_task_logs_oldest_first(api):
    task = create(api, agentId="a1")
    assert api.post(f"/api/tasks/{task['id']}/start", agent="a1").status_code == 200
    assert api.post(f"/api/tasks/{task['id']}/progress", agent="a1", json={"progress": "half"}).status_code == 200
    assert api.post(f"/api/tasks/{task['id']}/finish", agent="a1", json={"status": "completed"}).status_code == 200
    stored = read(api, task["id"])
    assert_task(without_logs(stored))
    logs = stored["logs"]
    for entry in logs:
        assert set(entry) == LOG_KEYS
        assert STAMP.match(entry["createdAt"])
        assert entry["eventType"] == "task_status_change"
        assert (entry["agentId"], entry["taskId"], entry["metadata"]) == ("a1", task["id"], None)
    assert [(e["oldValue"], e["newValue"]) for e in logs] == [("pending", "in_progress"), ("in_progress", "completed")]
    assert logs[0]["createdAt"] <= logs[1]["createdAt"]
    assert len({e["id"] for e in logs}) == 2


# ---------------------------------------------------------------- unknown task on every route


ROUTES = [
    ("post", "start", {}),
    ("post", "progress", {"json": {"progress": "p"}}),
    ("put", "session", {"json": {"claudeSessionId": "c1"}}),
    ("post", "finish", {"json": {"status": "completed"}}),
    ("post", "cancel", {}),
]
BAD = {
    "start": {},
    "progress": {"json": {"progress": 5}},
    "session": {"json": {}},
    "finish": {"json": {"status": "bogus", "output": 1}},
    "cancel": {"data": "{bad json", "content_type": "application/json"},
}


@pytest.mark.parametrize("method, action, kwargs", ROUTES)
@pytest.mark.parametrize("agent", [None, "a1"])
@pytest.mark.parametrize("bad_body", [False, True])
def test_unknown_task_is_404_first(api, method, action, kwargs, agent, bad_body):
    kwargs = BAD[action] if bad_body else kwargs
    r = getattr(api, method)(f"/api/tasks/{uuid.uuid4()}/{action}", agent=agent, **kwargs)
    assert r.status_code == 404
    assert r.json == NOT_FOUND
    assert api.get("/api/tasks").json == {"tasks": [], "total": 0}


# ---------------------------------------------------------------- start


@pytest.mark.parametrize("owner, status", [(None, "unassigned"), ("a1", "pending"), ("a1", "paused")])
def test_start(app, api, owner, status):
    task_id = task_in(app, api, status, owner)
    set_columns(app, task_id, last_updated_at=OLD)
    before = stamp()
    r = api.post(f"/api/tasks/{task_id}/start", agent="a1")
    after = stamp()
    assert r.status_code == 200, r.json
    task = r.json
    assert_task(task)
    assert (task["status"], task["agentId"], task["finishedAt"]) == ("in_progress", "a1", None)
    assert before <= task["lastUpdatedAt"] <= after
    stored = read(api, task_id)
    assert without_logs(stored) == task
    assert len(stored["logs"]) == 1
    entry = stored["logs"][0]
    assert (entry["eventType"], entry["agentId"], entry["taskId"], entry["oldValue"], entry["newValue"]) == (
        "task_status_change", "a1", task_id, status, "in_progress")
    assert before <= entry["createdAt"] <= after


def test_start_unassigned_by_any_agent(app, api):
    task_id = create(api)["id"]
    r = api.post(f"/api/tasks/{task_id}/start", agent="someone-else")
    assert r.status_code == 200, r.json
    assert read(api, task_id)["agentId"] == "someone-else"


def test_start_repeat_is_a_no_op(app, api):
    task_id = create(api, agentId="a1")["id"]
    assert api.post(f"/api/tasks/{task_id}/start", agent="a1").status_code == 200
    set_columns(app, task_id, last_updated_at=OLD)
    before = read(api, task_id)
    r = api.post(f"/api/tasks/{task_id}/start", agent="a1")
    assert r.status_code == 200, r.json
    assert r.json == without_logs(before)
    assert r.json["lastUpdatedAt"] == OLD
    assert read(api, task_id) == before
    assert len(before["logs"]) == 1


@pytest.mark.parametrize("headers", [{}, {"X-Agent-ID": ""}])
def test_start_needs_agent_header(app, api, headers):
    task_id = create(api)["id"]
    before = read(api, task_id)
    r = api.post(f"/api/tasks/{task_id}/start", headers=headers)
    assert_error(r, 400)
    assert read(api, task_id) == before


@pytest.mark.parametrize("owner, status", [
    ("a2", "pending"), ("a2", "in_progress"), ("a2", "paused"), ("A1", "pending"),
    ("a1", "completed"), ("a1", "failed"), ("a1", "cancelled"), ("a2", "completed"), (None, "cancelled"),
])
def test_start_conflict(app, api, owner, status):
    task_id = task_in(app, api, status, owner)
    before = read(api, task_id)
    r = api.post(f"/api/tasks/{task_id}/start", agent="a1")
    assert_error(r, 409)
    assert read(api, task_id) == before


def test_start_terminal_without_header_is_400(app, api):
    task_id = task_in(app, api, "completed", "a1")
    before = read(api, task_id)
    assert_error(api.post(f"/api/tasks/{task_id}/start"), 400)
    assert read(api, task_id) == before


# ---------------------------------------------------------------- progress


@pytest.mark.parametrize("status, logged", [("pending", True), ("paused", True), ("in_progress", False)])
@pytest.mark.parametrize("agent", ["a1", None])
def test_progress(app, api, status, logged, agent):
    task_id = task_in(app, api, status, "a1")
    set_columns(app, task_id, last_updated_at=OLD)
    before = stamp()
    r = api.post(f"/api/tasks/{task_id}/progress", agent=agent, json={"progress": "step 2 of 3"})
    after = stamp()
    assert r.status_code == 200, r.json
    assert r.json == {"success": True}
    stored = read(api, task_id)
    assert_task(without_logs(stored))
    assert (stored["progress"], stored["status"], stored["agentId"]) == ("step 2 of 3", "in_progress", "a1")
    assert before <= stored["lastUpdatedAt"] <= after
    assert status_logs(stored) == ([(status, "in_progress")] if logged else [])
    assert len(stored["logs"]) == (1 if logged else 0)


def test_progress_replaces_text(app, api):
    task_id = task_in(app, api, "in_progress", "a1")
    for text in ("one", "x" * 65536, "three"):
        r = api.post(f"/api/tasks/{task_id}/progress", agent="a1", json={"progress": text})
        assert r.status_code == 200, r.json
        assert read(api, task_id)["progress"] == text


@pytest.mark.parametrize("caller", ["a2", "A1"])
def test_progress_other_agent_is_403(app, api, caller):
    task_id = task_in(app, api, "in_progress", "a1")
    before = read(api, task_id)
    r = api.post(f"/api/tasks/{task_id}/progress", agent=caller, json={"progress": "p"})
    assert_error(r, 403)
    assert read(api, task_id) == before


@pytest.mark.parametrize("status", TERMINAL)
def test_progress_terminal_is_409(app, api, status):
    task_id = task_in(app, api, status, "a1")
    before = read(api, task_id)
    r = api.post(f"/api/tasks/{task_id}/progress", agent="a1", json={"progress": "p"})
    assert_error(r, 409)
    assert read(api, task_id) == before


@pytest.mark.parametrize("body", [{}, {"progress": None}, {"progress": ""}, {"progress": "x" * 65537},
                                  {"progress": 5}, {"progress": ["p"]}])
@pytest.mark.parametrize("owner, status, caller", [
    ("a1", "in_progress", "a1"), ("a1", "in_progress", "a2"), ("a1", "completed", "a2")])
def test_progress_validation_before_403_and_409(app, api, body, owner, status, caller):
    task_id = task_in(app, api, status, owner)
    before = read(api, task_id)
    r = api.post(f"/api/tasks/{task_id}/progress", agent=caller, json=body)
    assert r.status_code == 400, r.json
    assert r.json["error"].startswith("Validation error: ")
    assert "progress" in r.json["details"]
    assert read(api, task_id) == before


def test_progress_terminal_of_other_agent_is_403(app, api):
    task_id = task_in(app, api, "failed", "a1")
    before = read(api, task_id)
    assert_error(api.post(f"/api/tasks/{task_id}/progress", agent="a2", json={"progress": "p"}), 403)
    assert read(api, task_id) == before


# ---------------------------------------------------------------- PUT session


@pytest.mark.parametrize("agent", ["a1", None])
@pytest.mark.parametrize("session_id", ["claude-1", "c" * 256])
def test_set_session(app, api, agent, session_id):
    task_id = task_in(app, api, "in_progress", "a1")
    set_columns(app, task_id, last_updated_at=OLD)
    logs_before = read(api, task_id)["logs"]
    before = stamp()
    r = api.put(f"/api/tasks/{task_id}/session", agent=agent, json={"claudeSessionId": session_id})
    after = stamp()
    assert r.status_code == 200, r.json
    task = r.json
    assert_task(task)
    assert (task["claudeSessionId"], task["status"], task["agentId"]) == (session_id, "in_progress", "a1")
    assert before <= task["lastUpdatedAt"] <= after
    stored = read(api, task_id)
    assert without_logs(stored) == task
    assert stored["logs"] == logs_before


def test_set_session_never_touches_active_sessions(app, api):
    task_id = task_in(app, api, "in_progress", "a1")
    r = api.post("/api/active-sessions", json={"agentId": "a1", "taskId": task_id, "triggerType": "task_assigned"})
    assert r.status_code == 201, r.json
    session = r.json["session"]
    r = api.put(f"/api/tasks/{task_id}/session", agent="a1", json={"claudeSessionId": "claude-1"})
    assert r.status_code == 200, r.json
    assert api.get("/api/active-sessions").json == {"sessions": [session]}
    assert session["providerSessionId"] is None
    # ...and the other way round: a session's provider id never becomes the task's.
    r = api.put(f"/api/active-sessions/provider-session/{task_id}", agent="a1", json={"providerSessionId": "prov-9"})
    assert r.json == {"updated": True}
    assert read(api, task_id)["claudeSessionId"] == "claude-1"


@pytest.mark.parametrize("caller", ["a2", "A1"])
def test_set_session_other_agent_is_403(app, api, caller):
    task_id = task_in(app, api, "in_progress", "a1")
    before = read(api, task_id)
    r = api.put(f"/api/tasks/{task_id}/session", agent=caller, json={"claudeSessionId": "c1"})
    assert_error(r, 403)
    assert read(api, task_id) == before


@pytest.mark.parametrize("body", [{}, {"claudeSessionId": None}, {"claudeSessionId": ""},
                                  {"claudeSessionId": "a/b"}, {"claudeSessionId": ".."},
                                  {"claudeSessionId": "c" * 257}, {"claudeSessionId": 5},
                                  {"claudeSessionId": "c\x7f"}])
@pytest.mark.parametrize("caller", ["a1", "a2"])
def test_set_session_validation(app, api, body, caller):
    task_id = task_in(app, api, "in_progress", "a1")
    before = read(api, task_id)
    r = api.put(f"/api/tasks/{task_id}/session", agent=caller, json=body)
    assert r.status_code == 400, r.json
    assert r.json["error"].startswith("Validation error: ")
    assert "claudeSessionId" in r.json["details"]
    assert read(api, task_id) == before


# ---------------------------------------------------------------- finish


@pytest.mark.parametrize("status, extra", [
    ("completed", {}),
    ("completed", {"output": "all done"}),
    ("completed", {"output": "x" * 65536, "failureReason": None}),
    ("failed", {"failureReason": "boom"}),
    ("failed", {"output": "", "failureReason": "f" * 65536}),
])
@pytest.mark.parametrize("from_status", ["in_progress", "pending"])
def test_finish(app, api, status, extra, from_status):
    task_id = task_in(app, api, from_status, "a1")
    set_columns(app, task_id, last_updated_at=OLD)
    before = stamp()
    r = api.post(f"/api/tasks/{task_id}/finish", agent="a1", json={"status": status, **extra})
    after = stamp()
    assert r.status_code == 200, r.json
    assert set(r.json) == {"success", "task"}
    assert r.json["success"] is True
    task = r.json["task"]
    assert_task(task)
    assert (task["status"], task["agentId"]) == (status, "a1")
    assert task["output"] == extra.get("output")
    assert task["failureReason"] == extra.get("failureReason")
    assert STAMP.match(task["finishedAt"])
    assert before <= task["finishedAt"] <= after
    assert before <= task["lastUpdatedAt"] <= after
    stored = read(api, task_id)
    assert without_logs(stored) == task
    assert status_logs(stored) == [(from_status, status)]
    assert stored["logs"][0]["agentId"] == "a1"


@pytest.mark.parametrize("headers", [{}, {"X-Agent-ID": ""}])
def test_finish_needs_agent_header(app, api, headers):
    task_id = task_in(app, api, "in_progress", "a1")
    before = read(api, task_id)
    r = api.post(f"/api/tasks/{task_id}/finish", headers=headers, json={"status": "completed"})
    assert_error(r, 400)
    assert read(api, task_id) == before


@pytest.mark.parametrize("owner, status, caller", [
    ("a1", "in_progress", "a2"), ("a1", "in_progress", "A1"), (None, "unassigned", "a1"),
    ("a1", "completed", "a2"), ("a1", "cancelled", "a2"),
])
def test_finish_not_the_tasks_agent_is_403(app, api, owner, status, caller):
    task_id = task_in(app, api, status, owner)
    before = read(api, task_id)
    r = api.post(f"/api/tasks/{task_id}/finish", agent=caller, json={"status": "completed"})
    assert_error(r, 403)
    assert read(api, task_id) == before


@pytest.mark.parametrize("status", TERMINAL)
@pytest.mark.parametrize("new", ["completed", "failed"])
def test_finish_terminal_is_409(app, api, status, new):
    task_id = task_in(app, api, status, "a1")
    before = read(api, task_id)
    r = api.post(f"/api/tasks/{task_id}/finish", agent="a1", json={"status": new, "output": "again"})
    assert_error(r, 409)
    assert read(api, task_id) == before


@pytest.mark.parametrize("body, field", [
    ({}, "status"),
    ({"status": None}, "status"),
    ({"status": "cancelled"}, "status"),
    ({"status": "in_progress"}, "status"),
    ({"status": "COMPLETED"}, "status"),
    ({"status": 1}, "status"),
    ({"status": "completed", "output": "x" * 65537}, "output"),
    ({"status": "completed", "output": 5}, "output"),
    ({"status": "failed", "failureReason": "x" * 65537}, "failureReason"),
    ({"status": "failed", "failureReason": ["f"]}, "failureReason"),
])
@pytest.mark.parametrize("owner, status, caller", [
    ("a1", "in_progress", "a1"), ("a1", "in_progress", "a2"), ("a1", "completed", "a2"), ("a1", "failed", "a1")])
def test_finish_validation_before_403_and_409(app, api, body, field, owner, status, caller):
    task_id = task_in(app, api, status, owner)
    before = read(api, task_id)
    r = api.post(f"/api/tasks/{task_id}/finish", agent=caller, json=body)
    assert r.status_code == 400, r.json
    assert r.json["error"].startswith("Validation error: ")
    assert field in r.json["details"]
    assert read(api, task_id) == before


# ---------------------------------------------------------------- cancel


@pytest.mark.parametrize("owner, status, caller", [
    ("a1", "in_progress", "a1"), ("a1", "pending", None), ("a1", "paused", "a1"), (None, "unassigned", None),
])
def test_cancel(app, api, owner, status, caller):
    task_id = task_in(app, api, status, owner)
    set_columns(app, task_id, last_updated_at=OLD)
    before = stamp()
    r = api.post(f"/api/tasks/{task_id}/cancel", agent=caller)
    after = stamp()
    assert r.status_code == 200, r.json
    task = r.json
    assert_task(task)
    assert (task["status"], task["agentId"]) == ("cancelled", owner)
    assert before <= task["finishedAt"] <= after
    assert before <= task["lastUpdatedAt"] <= after
    stored = read(api, task_id)
    assert without_logs(stored) == task
    assert status_logs(stored) == [(status, "cancelled")]
    assert len(stored["logs"]) == 1


@pytest.mark.parametrize("status", ["in_progress", "completed"])
@pytest.mark.parametrize("caller", ["a2", "A1"])
def test_cancel_other_agent_is_403(app, api, status, caller):
    task_id = task_in(app, api, status, "a1")
    before = read(api, task_id)
    assert_error(api.post(f"/api/tasks/{task_id}/cancel", agent=caller), 403)
    assert read(api, task_id) == before


@pytest.mark.parametrize("status", TERMINAL)
@pytest.mark.parametrize("caller", ["a1", None])
def test_cancel_terminal_is_409(app, api, status, caller):
    task_id = task_in(app, api, status, "a1")
    before = read(api, task_id)
    assert_error(api.post(f"/api/tasks/{task_id}/cancel", agent=caller), 409)
    assert read(api, task_id) == before


def test_cancel_bad_body_before_403(app, api):
    task_id = task_in(app, api, "in_progress", "a1")
    before = read(api, task_id)
    r = api.post(f"/api/tasks/{task_id}/cancel", agent="a2", data="{bad json", content_type="application/json")
    assert_error(r, 400)
    assert read(api, task_id) == before


# ---------------------------------------------------------------- a whole life


def test_lifecycle_logs_every_status_change_once(app, api):
    task_id = create(api)["id"]
    steps = [
        ("post", "start", "a1", {}, ("unassigned", "in_progress")),
        ("post", "start", "a1", {}, None),
        ("post", "progress", "a1", {"json": {"progress": "p"}}, None),
        ("put", "session", "a1", {"json": {"claudeSessionId": "c1"}}, None),
        ("post", "finish", "a1", {"json": {"status": "failed", "failureReason": "r"}}, ("in_progress", "failed")),
    ]
    expected = []
    for method, action, agent, kwargs, change in steps:
        r = getattr(api, method)(f"/api/tasks/{task_id}/{action}", agent=agent, **kwargs)
        assert r.status_code == 200, (action, r.json)
        if change:
            expected.append(change)
        assert status_logs(read(api, task_id)) == expected
    stored = read(api, task_id)
    assert (stored["status"], stored["progress"], stored["claudeSessionId"], stored["failureReason"]) == (
        "failed", "p", "c1", "r")
    assert len(stored["logs"]) == 2
