"""POST /api/active-sessions/recover-orphaned-tasks: the orphan predicate, the reset, its log and its checks."""

import re
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import update

import sessions
from models import Task, db, stamp

URL = "/api/active-sessions/recover-orphaned-tasks"
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TASK_KEYS = {"id", "agentId", "task", "status", "priority", "progress", "output", "failureReason",
             "claudeSessionId", "createdAt", "lastUpdatedAt", "finishedAt"}
FORBIDDEN = {"error": "Can only recover orphaned tasks for the calling agent"}
NOTHING = {"recovered": 0, "tasks": []}


# ---------------------------------------------------------------- helpers


def ago(seconds, moment=None):
    """The timestamp of `seconds` before moment (default: now)."""
    return stamp((moment or datetime.now(timezone.utc)) - timedelta(seconds=seconds))


def set_columns(app, task_id, **values):
    """Test setup: write task columns directly (ages, states the API cannot reach)."""
    with app.app_context():
        table = Task.__table__
        db.session.execute(update(table).where(table.c.id == task_id).values(**values))
        db.session.commit()


def read(api, task_id):
    """GET a task with its logs."""
    r = api.get(f"/api/tasks/{task_id}")
    assert r.status_code == 200, r.json
    return r.json


def wire(agent):
    """An agent id as a server hands its UTF-8 header bytes to WSGI (latin-1 text)."""
    return agent.encode().decode("latin-1")


def claimed(app, api, agent="a1", age=3600, text="job", **columns):
    """A task agent created and started (in_progress), last updated `age` seconds ago."""
    r = api.post("/api/tasks", json={"task": text, "agentId": agent, "priority": 7})
    assert r.status_code == 201, r.json
    task_id = r.json["id"]
    r = api.post(f"/api/tasks/{task_id}/start", headers={"X-Agent-ID": wire(agent)})
    assert r.status_code == 200, r.json
    set_columns(app, task_id, last_updated_at=ago(age), **columns)
    return task_id


def register(api, task_id, agent="a1"):
    """Register an active session for a task."""
    r = api.post("/api/active-sessions", json={"agentId": agent, "taskId": task_id, "triggerType": "task_assigned"})
    assert r.status_code == 201, r.json
    return r.json["session"]


def recover(api, agent="a1", **body):
    """Call recover as agent for agent's own tasks; check the answer's shape and return it."""
    r = api.post(URL, agent=agent, json={"agentId": agent, **body})
    assert r.status_code == 200, r.json
    assert set(r.json) == {"recovered", "tasks"}
    assert r.json["recovered"] == len(r.json["tasks"])
    for task in r.json["tasks"]:
        assert set(task) == TASK_KEYS
    return r.json


def assert_recovered(api, before, after_task, t0, t1, agent="a1"):
    """after_task is `before` reset to pending now, stored so, with one recovery log entry added."""
    assert after_task == {k: v for k, v in before.items() if k != "logs"} | {
        "status": "pending", "lastUpdatedAt": after_task["lastUpdatedAt"]}
    assert STAMP.match(after_task["lastUpdatedAt"])
    assert t0 <= after_task["lastUpdatedAt"] <= t1
    assert (after_task["agentId"], after_task["claudeSessionId"], after_task["finishedAt"]) == (agent, None, None)
    stored = read(api, after_task["id"])
    assert {k: v for k, v in stored.items() if k != "logs"} == after_task
    assert stored["logs"][:-1] == before["logs"]
    entry = stored["logs"][-1]
    assert entry | {"id": None, "createdAt": None} == {
        "id": None, "eventType": "task_status_change", "agentId": agent, "taskId": after_task["id"],
        "oldValue": "in_progress", "newValue": "pending", "metadata": {"orphanedInProgressRecovery": True},
        "createdAt": None,
    }
    assert entry["metadata"]["orphanedInProgressRecovery"] is True  # a JSON true, not 1 or "true"
    assert STAMP.match(entry["createdAt"])
    assert t0 <= entry["createdAt"] <= t1


# ---------------------------------------------------------------- the predicate


def _other_agent(app, api):
    return claimed(app, api, agent="a2")


def _status(status):
    def make(app, api):
        return claimed(app, api, status=status)
    return make


def _claude_session(app, api):
    return claimed(app, api, claude_session_id="claude-1")


def _finished(app, api):
    return claimed(app, api, finished_at=ago(10))


def _too_recent(app, api):
    return claimed(app, api, age=30)


def _just_updated(app, api):
    return claimed(app, api, age=0)


def _own_session(app, api):
    task_id = claimed(app, api)
    register(api, task_id, agent="a1")
    return task_id


def _session_of_other_agent(app, api):
    task_id = claimed(app, api)
    register(api, task_id, agent="someone-else")
    return task_id


NEAR_ORPHANS = {
    "other agent": _other_agent,
    "status pending": _status("pending"),
    "status paused": _status("paused"),
    "status unassigned": _status("unassigned"),
    "status completed": _status("completed"),
    "status failed": _status("failed"),
    "status cancelled": _status("cancelled"),
    "claudeSessionId set": _claude_session,
    "finishedAt set": _finished,
    "updated 30s ago": _too_recent,
    "updated now": _just_updated,
    "own active session": _own_session,
    "active session of another agent": _session_of_other_agent,
}


@pytest.mark.parametrize("make_near", NEAR_ORPHANS.values(), ids=NEAR_ORPHANS.keys())
def test_only_the_true_orphan_is_recovered(app, api, make_near):
    orphan_id = claimed(app, api, text="the orphan")
    near_id = make_near(app, api)
    orphan_before, near_before = read(api, orphan_id), read(api, near_id)
    sessions_before = api.get("/api/active-sessions").json
    t0 = stamp()
    body = recover(api, minAgeSeconds=60)
    t1 = stamp()
    assert body["recovered"] == 1
    assert [t["id"] for t in body["tasks"]] == [orphan_id]
    assert_recovered(api, orphan_before, body["tasks"][0], t0, t1)
    assert read(api, near_id) == near_before
    assert api.get("/api/active-sessions").json == sessions_before


def test_session_protects_until_removed(app, api):
    task_id = claimed(app, api)
    register(api, task_id, agent="a2")
    before = read(api, task_id)
    assert recover(api) == NOTHING
    assert read(api, task_id) == before
    assert api.delete(f"/api/active-sessions/by-task/{task_id}").json == {"deleted": True}
    t0 = stamp()
    body = recover(api)
    t1 = stamp()
    assert body["recovered"] == 1
    assert_recovered(api, before, body["tasks"][0], t0, t1)


def test_another_agents_orphans_are_never_touched(app, api):
    mine = [claimed(app, api, agent="a1") for _ in range(2)]
    theirs = [claimed(app, api, agent="a2") for _ in range(2)]
    theirs_before = [read(api, t) for t in theirs]
    body = recover(api, agent="a1")
    assert sorted(t["id"] for t in body["tasks"]) == sorted(mine)
    assert [read(api, t) for t in theirs] == theirs_before
    body = recover(api, agent="a2")
    assert sorted(t["id"] for t in body["tasks"]) == sorted(theirs)
    assert {read(api, t)["status"] for t in mine + theirs} == {"pending"}


def test_age_is_strictly_older_than_the_cutoff(app, api, monkeypatch):
    frozen = datetime(2031, 5, 6, 7, 8, 9, 500000, tzinfo=timezone.utc)

    class FrozenClock(datetime):
        """datetime whose now() is fixed, so the cutoff is known to the millisecond."""

        @classmethod
        def now(cls, tz=None):
            return frozen

    at_cutoff = claimed(app, api)
    set_columns(app, at_cutoff, last_updated_at=ago(60, frozen))
    past_cutoff = claimed(app, api)
    set_columns(app, past_cutoff, last_updated_at=ago(60.001, frozen))
    at_before = read(api, at_cutoff)
    monkeypatch.setattr(sessions, "datetime", FrozenClock)
    body = recover(api, minAgeSeconds=60)
    assert [t["id"] for t in body["tasks"]] == [past_cutoff]
    assert body["tasks"][0]["lastUpdatedAt"] == stamp(frozen) == "2031-05-06T07:08:09.500Z"
    assert read(api, past_cutoff)["logs"][-1]["createdAt"] == stamp(frozen)
    assert read(api, at_cutoff) == at_before


# ---------------------------------------------------------------- minAgeSeconds


@pytest.mark.parametrize("extra", [{}, {"minAgeSeconds": None}])
def test_min_age_defaults_to_60(app, api, extra):
    old_enough = claimed(app, api, age=90)
    too_young = claimed(app, api, age=30)
    young_before = read(api, too_young)
    body = recover(api, **extra)
    assert [t["id"] for t in body["tasks"]] == [old_enough]
    assert read(api, too_young) == young_before


@pytest.mark.parametrize("min_age, age, recovered", [
    (1, 5, True),
    (1, 0, False),
    (1800, 3600, True),
    (7200, 3600, False),
    (31536000, 3600, False),
    (31536000, 31536000 + 3600, True),
])
def test_min_age_bounds_and_effect(app, api, min_age, age, recovered):
    task_id = claimed(app, api, age=age)
    before = read(api, task_id)
    body = recover(api, minAgeSeconds=min_age)
    assert [t["id"] for t in body["tasks"]] == ([task_id] if recovered else [])
    stored = read(api, task_id)
    if recovered:
        assert stored["status"] == "pending"
    else:
        assert stored == before


# ---------------------------------------------------------------- the answer


def test_recovered_tasks_sorted_by_created_at_then_id(app, api):
    ids = [claimed(app, api, text=f"job {i}") for i in range(5)]
    created = ["2024-01-01T00:00:03.000Z", "2024-01-01T00:00:01.000Z", "2024-01-01T00:00:02.000Z",
               "2024-01-01T00:00:02.000Z", "2024-01-01T00:00:02.000Z"]
    for task_id, at in zip(ids, created):
        set_columns(app, task_id, created_at=at)
    befores = {task_id: read(api, task_id) for task_id in ids}
    t0 = stamp()
    body = recover(api)
    t1 = stamp()
    assert body["recovered"] == 5
    assert [t["id"] for t in body["tasks"]] == [ids[1], *sorted(ids[2:]), ids[0]]
    for task in body["tasks"]:
        assert_recovered(api, befores[task["id"]], task, t0, t1)


def test_second_call_recovers_nothing(app, api):
    task_id = claimed(app, api)
    assert recover(api)["recovered"] == 1
    after_first = read(api, task_id)
    assert len(after_first["logs"]) == 2
    r = api.post(URL, agent="a1", json={"agentId": "a1"})
    assert r.status_code == 200
    assert r.json == NOTHING
    assert read(api, task_id) == after_first


def test_nothing_to_recover(app, api):
    r = api.post(URL, agent="a1", json={"agentId": "a1", "minAgeSeconds": 60})
    assert r.status_code == 200
    assert r.json == NOTHING


def test_recovered_task_can_be_claimed_again(app, api):
    task_id = claimed(app, api)
    recover(api)
    r = api.post(f"/api/tasks/{task_id}/start", agent="a1")
    assert r.status_code == 200, r.json
    assert r.json["status"] == "in_progress"
    assert [(e["oldValue"], e["newValue"]) for e in read(api, task_id)["logs"]] == [
        ("pending", "in_progress"), ("in_progress", "pending"), ("pending", "in_progress")]


def test_utf8_agent_id(app, api):
    agent = "agent-é-✓"
    task_id = claimed(app, api, agent=agent)
    r = api.post(URL, headers={"X-Agent-ID": wire(agent)}, json={"agentId": agent})
    assert r.status_code == 200, r.json
    assert [t["id"] for t in r.json["tasks"]] == [task_id]
    assert r.json["tasks"][0]["agentId"] == agent


# ---------------------------------------------------------------- validation, then the caller check


@pytest.mark.parametrize("body, field", [
    ({}, "agentId"),
    ({"agentId": None}, "agentId"),
    ({"agentId": ""}, "agentId"),
    ({"agentId": 5}, "agentId"),
    ({"agentId": "a/b"}, "agentId"),
    ({"agentId": ".."}, "agentId"),
    ({"agentId": "a" * 257}, "agentId"),
    ({"minAgeSeconds": 60}, "agentId"),
    ({"agentId": "a1", "minAgeSeconds": 0}, "minAgeSeconds"),
    ({"agentId": "a1", "minAgeSeconds": -5}, "minAgeSeconds"),
    ({"agentId": "a1", "minAgeSeconds": 31536001}, "minAgeSeconds"),
    ({"agentId": "a1", "minAgeSeconds": "60"}, "minAgeSeconds"),
    ({"agentId": "a1", "minAgeSeconds": 1.5}, "minAgeSeconds"),
    ({"agentId": "a1", "minAgeSeconds": True}, "minAgeSeconds"),
    ({"agentId": "a1", "minAgeSeconds": [60]}, "minAgeSeconds"),
])
@pytest.mark.parametrize("caller", [None, "a1", "a2"])
def test_validation_comes_first(app, api, body, field, caller):
    task_id = claimed(app, api)
    before = read(api, task_id)
    r = api.post(URL, agent=caller, json=body)
    assert r.status_code == 400, r.json
    assert r.json["error"].startswith("Validation error: ")
    assert field in r.json["details"]
    assert read(api, task_id) == before


@pytest.mark.parametrize("kwargs", [
    {},
    {"data": "null", "content_type": "application/json"},
    {"data": "[]", "content_type": "application/json"},
    {"data": "{bad", "content_type": "application/json"},
])
def test_missing_or_bad_body_is_400(app, api, kwargs):
    task_id = claimed(app, api)
    before = read(api, task_id)
    r = api.post(URL, **kwargs)
    assert r.status_code == 400, r.json
    assert isinstance(r.json["error"], str)
    assert read(api, task_id) == before


@pytest.mark.parametrize("headers", [{}, {"X-Agent-ID": ""}, {"X-Agent-ID": "a2"}, {"X-Agent-ID": "A1"},
                                     {"X-Agent-ID": "a1x"}, {"X-Agent-ID": "a/1"}])
@pytest.mark.parametrize("extra", [{}, {"minAgeSeconds": 60}])
def test_caller_must_be_the_agent(app, api, headers, extra):
    task_id = claimed(app, api)
    before = read(api, task_id)
    r = api.post(URL, headers=headers, json={"agentId": "a1", **extra})
    assert r.status_code == 403
    assert r.json == FORBIDDEN
    assert read(api, task_id) == before
