"""Active-session routes: register, heartbeat, list, end, clean up, and recover orphaned tasks."""

from datetime import datetime, timedelta, timezone

from flask import Blueprint, current_app
from sqlalchemy import and_, exists, select, update
from sqlalchemy.exc import IntegrityError
from werkzeug.exceptions import Forbidden, NotFound

import store
from auth import caller_agent, check_owner
from models import (
    HISTORY_COLUMNS, HISTORY_KEYS, SESSION_FIELDS, SESSION_KEYS, TASK_COLUMNS, TASK_KEYS, ActiveSession,
    SessionHistory, Task, as_dicts, new_id, select_page, stamp, status_log, transaction,
)
from schemas import (
    cleanup_schema, history_query, is_id, load_body, load_query, provider_session_schema, read_json,
    recover_schema, session_create_schema, session_list_query,
)

bp = Blueprint("sessions", __name__, url_prefix="/api/active-sessions")
S = ActiveSession.__table__
T = Task.__table__
H = SessionHistory.__table__
RECOVER_FORBIDDEN = "Can only recover orphaned tasks for the calling agent"
OWNER_FORBIDDEN = "X-Agent-ID names another agent than the session's"
DUPLICATE = "A session already exists for this taskId"
# JSON filter name -> column name, for the listing's query parameters.
FILTERS = {name: column.name for name, column in SESSION_FIELDS
           if name in ("agentId", "taskId", "runtimeInstanceId", "triggerType")}


def _change(action, **match):
    """Apply action(tx, **match) -> rows touched to one session, honouring X-Agent-ID.

    One write statement in the common case; only when it touched nothing does a read
    tell "not yours" (403, nothing changed) from "not there" (False). Ids no create
    accepts name nothing, and never reach the database.
    """
    if not all(is_id(value) for value in match.values()):
        return False
    caller = caller_agent()
    with store.tx(write=True) as t:
        if action(t, **match) if caller is None else action(t, agent_id=caller, **match):
            return True
        if caller is not None and store.find(t, **match):
            raise Forbidden(OWNER_FORBIDDEN)
        return False


@bp.get("")
def list_sessions():
    """List sessions, newest startedAt first; filters and paging are optional."""
    query = load_query(session_list_query)
    match = {column: query[name] for name, column in FILTERS.items() if name in query}
    with store.tx() as t:
        if "limit" not in query and "offset" not in query:
            return {"sessions": store.listing_json(t, **match)}
        sessions = store.listing_json(t, query.get("limit", 1000), query.get("offset", 0), **match)
        return {"sessions": sessions, "total": store.count(t, **match)}


@bp.get("/history")
def list_history():
    """Ended sessions, newest endedAt first, with filters and paging."""
    query = load_query(history_query)
    where = [H.c[FILTERS[name]] == query[name] for name in ("agentId", "taskId") if name in query]
    stmt = select(*HISTORY_COLUMNS).order_by(H.c.ended_at.desc(), H.c.id)
    with transaction() as conn:
        sessions, total = select_page(conn, HISTORY_KEYS, stmt, where, query.get("limit", 100),
                                      query.get("offset", 0))
    return {"sessions": sessions, "total": total}


@bp.get("/<session_id>")
def get_session(session_id):
    """One session by id."""
    found = None
    if is_id(session_id):
        with store.tx() as t:
            found = store.find(t, id=session_id)
    if found is None:
        raise NotFound("Session not found")
    return {"session": found}


@bp.post("")
def create_session():
    """Register a session; a taskId that already has one answers 409 with that session."""
    data = load_body(session_create_schema)
    now = stamp()
    session = {name: data.get(name) for name in SESSION_KEYS}
    session.update(id=new_id(), providerSessionId=None, startedAt=now, lastHeartbeatAt=now)
    for _ in range(2):  # the holder may vanish between our failed insert and the lookup
        try:
            with store.tx(write=True) as t:
                store.insert_session(t, session)
            return {"session": session}, 201
        except IntegrityError:  # the UNIQUE taskId decides, not a prior read
            with store.tx() as t:
                existing = store.find(t, task_id=session["taskId"])
            if existing:
                return {"error": DUPLICATE, "session": existing}, 409
    return {"error": DUPLICATE}, 409


@bp.delete("/<session_id>")
def delete_session(session_id):
    """End a session by its id."""
    read_json()
    return {"deleted": _change(lambda t, **m: store.end(t, "deleted", stamp(), **m), id=session_id)}


@bp.delete("/by-task/<task_id>")
def delete_session_by_task(task_id):
    """End the session that holds a taskId."""
    read_json()
    return {"deleted": _change(lambda t, **m: store.end(t, "deleted_by_task", stamp(), **m), task_id=task_id)}


@bp.put("/heartbeat/<task_id>")
def heartbeat(task_id):
    """Mark a task's session alive now; never creates a row, never moves time backwards."""
    read_json()
    return {"updated": _change(lambda t, **m: store.touch(t, stamp(), **m), task_id=task_id)}


@bp.put("/provider-session/<task_id>")
def set_provider_session(task_id):
    """Record the LLM provider's session id on a task's session."""
    values = {"provider_session_id": load_body(provider_session_schema)["providerSessionId"]}
    return {"updated": _change(lambda t, **m: store.set_fields(t, values, **m), task_id=task_id)}


@bp.post("/cleanup")
def cleanup_sessions():
    """Remove stale sessions, or an agent's sessions (none in multi-runtime mode)."""
    data = load_body(cleanup_schema)
    match = {}
    if "agentId" in data:
        check_owner(data["agentId"], OWNER_FORBIDDEN)
        if current_app.config["MULTI_RUNTIME_ENABLED"]:
            return {"cleaned": 0}  # other runner processes share this agent id
        match["agent_id"] = data["agentId"]
    if not match or "maxAgeMinutes" in data:
        age = timedelta(minutes=data.get("maxAgeMinutes", 30))
        match["cutoff"] = stamp(datetime.now(timezone.utc) - age)
    reason = "agent_cleanup" if "agentId" in data else "cleanup"
    with store.tx(write=True) as t:
        return {"cleaned": store.end(t, reason, stamp(), **match)}


@bp.post("/recover-orphaned-tasks")
def recover_orphaned_tasks():
    """Put the caller's claimed-but-never-run tasks back to pending, in one atomic step."""
    data = load_body(recover_schema)
    agent = data["agentId"]
    if caller_agent() != agent:
        raise Forbidden(RECOVER_FORBIDDEN)
    moment = datetime.now(timezone.utc)
    now, cutoff = stamp(moment), stamp(moment - timedelta(seconds=data["minAgeSeconds"]))
    orphaned = and_(
        T.c.agent_id == agent, T.c.status == "in_progress", T.c.claude_session_id.is_(None),
        T.c.finished_at.is_(None), T.c.last_updated_at < cutoff, ~exists().where(S.c.task_id == T.c.id),
    )
    # One UPDATE decides and resets: a session registered before it protects its task, and a
    # concurrent second call finds the rows already pending.
    stmt = update(T).where(orphaned).values(status="pending", last_updated_at=now).returning(*TASK_COLUMNS)
    with transaction(write=True) as conn:
        tasks = as_dicts(TASK_KEYS, conn.execute(stmt))
        for task in tasks:
            conn.execute(status_log(task["id"], agent, "in_progress", "pending", now,
                                    {"orphanedInProgressRecovery": True}))
    tasks.sort(key=lambda t: (t["createdAt"], t["id"]))
    return {"recovered": len(tasks), "tasks": tasks}
