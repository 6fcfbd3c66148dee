"""Ended sessions: history on every kind of end, the expiry sweep, and pruning."""

import pytest
from sqlalchemy import update

from models import ActiveSession, SessionHistory, db, stamp
from sweep import sweep_once

OLD = "2020-01-01T00:00:00.000Z"


def register(api, agent="a1", task="t1", **extra):
    r = api.post("/api/active-sessions", json={"agentId": agent, "taskId": task, "triggerType": "task_assigned", **extra})
    assert r.status_code == 201, r.json
    return r.json["session"]


def age(app, table, column, value, **where):
    """Test setup: move a timestamp into the past, straight in the database."""
    with app.app_context():
        stmt = update(table.__table__).values({column: value})
        for key, val in where.items():
            stmt = stmt.where(table.__table__.c[key] == val)
        db.session.execute(stmt)
        db.session.commit()


def history(api, query=""):
    r = api.get("/api/active-sessions/history" + query)
    assert r.status_code == 200, r.json
    return r.json


@pytest.mark.parametrize("end, reason", [
    (lambda api, s: api.delete(f"/api/active-sessions/{s['id']}"), "deleted"),
    (lambda api, s: api.delete("/api/active-sessions/by-task/t1"), "deleted_by_task"),
    (lambda api, s: api.post("/api/active-sessions/cleanup", json={"agentId": "a1"}), "agent_cleanup"),
])
def test_each_end_is_recorded_with_its_reason(api, end, reason):
    session = register(api, taskDescription="work")
    assert end(api, session).status_code == 200
    body = history(api)
    assert body["total"] == 1
    (ended,) = body["sessions"]
    assert {k: ended[k] for k in session} == session
    assert ended["endReason"] == reason
    assert ended["endedAt"] >= session["lastHeartbeatAt"]
    assert api.get("/api/active-sessions").json == {"sessions": []}


def test_stale_cleanup_records_cleanup(app, api):
    register(api, task="old")
    register(api, task="fresh")
    age(app, ActiveSession, "last_heartbeat_at", OLD, task_id="old")
    assert api.post("/api/active-sessions/cleanup").json == {"cleaned": 1}
    body = history(api)
    assert [(s["taskId"], s["endReason"]) for s in body["sessions"]] == [("old", "cleanup")]


def test_refused_or_missing_ends_record_nothing(api):
    register(api)
    assert api.delete("/api/active-sessions/by-task/t1", agent="someone-else").status_code == 403
    assert api.delete("/api/active-sessions/nope").json == {"deleted": False}
    assert history(api) == {"sessions": [], "total": 0}


def test_history_order_filters_and_paging(api):
    for n in range(5):
        register(api, agent=f"a{n % 2}", task=f"t{n}")
        api.delete(f"/api/active-sessions/by-task/t{n}")
    body = history(api)
    assert body["total"] == 5
    ended = [s["endedAt"] for s in body["sessions"]]
    assert ended == sorted(ended, reverse=True)
    assert {s["taskId"] for s in history(api, "?agentId=a0")["sessions"]} == {"t0", "t2", "t4"}
    assert [s["taskId"] for s in history(api, "?taskId=t3")["sessions"]] == ["t3"]
    page = history(api, "?limit=2&offset=1")
    assert page["total"] == 5 and page["sessions"] == body["sessions"][1:3]


@pytest.mark.parametrize("query", ["?limit=0", "?limit=1001", "?offset=-1", "?limit=x", "?agentId=a/b"])
def test_history_bad_query_is_400(api, query):
    r = api.get("/api/active-sessions/history" + query)
    assert r.status_code == 400 and r.json["error"].startswith("Validation error")


def test_history_is_protected(client):
    assert client.get("/api/active-sessions/history").status_code == 401


def test_sweep_expires_silent_sessions_and_prunes_history(app, api):
    register(api, task="silent")
    register(api, task="alive")
    register(api, task="ended-long-ago")
    api.delete("/api/active-sessions/by-task/ended-long-ago")
    age(app, ActiveSession, "last_heartbeat_at", OLD, task_id="silent")
    age(app, SessionHistory, "ended_at", OLD, task_id="ended-long-ago")
    with app.app_context():
        assert sweep_once(ttl_minutes=30, history_days=7) == 1
        assert sweep_once(ttl_minutes=30, history_days=7) == 0
    assert [s["taskId"] for s in api.get("/api/active-sessions").json["sessions"]] == ["alive"]
    body = history(api)
    assert [(s["taskId"], s["endReason"]) for s in body["sessions"]] == [("silent", "expired")]
    assert body["sessions"][0]["lastHeartbeatAt"] == OLD


def test_sweep_keeps_sessions_within_ttl(app, api):
    register(api)
    recent = stamp()
    age(app, ActiveSession, "last_heartbeat_at", recent)
    with app.app_context():
        assert sweep_once(ttl_minutes=1, history_days=7) == 0
    assert len(api.get("/api/active-sessions").json["sessions"]) == 1
