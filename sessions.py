"""Active-session routes: register, heartbeat, list, end, clean up, and recover orphaned tasks."""

from datetime import datetime, timedelta, timezone

from flask import Blueprint, current_app
from sqlalchemy import and_, case, exists, insert, select, update
from sqlalchemy.exc import IntegrityError
from werkzeug.exceptions import Forbidden, NotFound

from auth import caller_agent, check_owner
from models import (
    HISTORY_COLUMNS, HISTORY_KEYS, SESSION_COLUMNS, SESSION_FIELDS, SESSION_KEYS, TASK_COLUMNS,
    TASK_KEYS, ActiveSession, SessionHistory, Task, as_dicts, column_values, end_sessions, new_id,
    select_page, stamp, status_log, transaction,
)
from schemas import (
    cleanup_schema, history_query, is_id, load_body, load_query, provider_session_schema, read_json, recover_schema,
    session_create_schema, session_list_query,
)

bp = Blueprint("sessions", __name__, url_prefix="/api/active-sessions")
S = ActiveSession.__table__
T = Task.__table__
H = SessionHistory.__table__
RECOVER_FORBIDDEN = "Can only recover orphaned tasks for the calling agent"
OWNER_FORBIDDEN = "X-Agent-ID names another agent than the session's"


def _find(conn, where):
    """Return the session matching where as a dict, or None."""
    row = conn.execute(select(*SESSION_COLUMNS).where(where)).first()
    return dict(zip(SESSION_KEYS, row)) if row else None


def _change(action, where):
    """Apply action(conn, where) -> rows touched to the session matching where, honouring X-Agent-ID.

    One write statement in the common case; only when it touched nothing does a read
    tell "not yours" (403, nothing changed) from "not there" (False).
    """
    caller = caller_agent()
    with transaction(write=True) as conn:
        owned = where if caller is None else and_(where, S.c.agent_id == caller)
        if action(conn, owned):
            return True
        if caller is not None and conn.execute(select(S.c.id).where(where)).first():
            raise Forbidden(OWNER_FORBIDDEN)
        return False


def _updater(**values):
    """An action for _change that sets values on the matched session."""
    return lambda conn, where: conn.execute(update(S).where(where).values(**values)).rowcount


def _ender(reason):
    """An action for _change that ends the matched session, recording it in history."""
    return lambda conn, where: end_sessions(conn, where, reason, stamp())


def _by_task(task_id):
    """The where-clause of the session holding a taskId (None for ids no create accepts)."""
    return S.c.task_id == task_id if is_id(task_id) else None


def _filters(table, query, names):
    """Equality filters for the query keys present, by JSON name."""
    columns = dict((name, column) for name, column in SESSION_FIELDS)
    return [table.c[columns[name].name] == query[name] for name in names if name in query]


@bp.get("")
def list_sessions():
    """List sessions, newest startedAt first; filters and paging are optional."""
    query = load_query(session_list_query)
    where = _filters(S, query, ("agentId", "taskId", "runtimeInstanceId", "triggerType"))
    stmt = select(*SESSION_COLUMNS).order_by(S.c.started_at.desc(), S.c.id)
    with transaction() as conn:
        if "limit" not in query and "offset" not in query:
            return {"sessions": as_dicts(SESSION_KEYS, conn.execute(stmt.where(*where)))}
        sessions, total = select_page(conn, SESSION_KEYS, stmt, where, query.get("limit", 1000),
                                      query.get("offset", 0))
    return {"sessions": sessions, "total": total}


@bp.get("/history")
def list_history():
    """Ended sessions, newest endedAt first, with filters and paging."""
    query = load_query(history_query)
    stmt = select(*HISTORY_COLUMNS).order_by(H.c.ended_at.desc(), H.c.id)
    with transaction() as conn:
        sessions, total = select_page(conn, HISTORY_KEYS, stmt, _filters(H, query, ("agentId", "taskId")),
                                      query.get("limit", 100), query.get("offset", 0))
    return {"sessions": sessions, "total": total}


@bp.get("/<session_id>")
def get_session(session_id):
    """One session by id."""
    with transaction() as conn:
        found = _find(conn, S.c.id == session_id) if is_id(session_id) else None
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
            with transaction(write=True) as conn:
                conn.execute(insert(S).values(column_values(SESSION_FIELDS, session)))
            return {"session": session}, 201
        except IntegrityError:
            with transaction() as conn:
                existing = _find(conn, S.c.task_id == session["taskId"])
            if existing:
                return {"error": "A session already exists for this taskId", "session": existing}, 409
    return {"error": "A session already exists for this taskId"}, 409


@bp.delete("/<session_id>")
def delete_session(session_id):
    """End a session by its id."""
    read_json()
    deleted = is_id(session_id) and _change(_ender("deleted"), S.c.id == session_id)
    return {"deleted": deleted}


@bp.delete("/by-task/<task_id>")
def delete_session_by_task(task_id):
    """End the session that holds a taskId."""
    read_json()
    where = _by_task(task_id)
    return {"deleted": where is not None and _change(_ender("deleted_by_task"), where)}


@bp.put("/heartbeat/<task_id>")
def heartbeat(task_id):
    """Mark a task's session alive now; never creates a row, never moves time backwards."""
    read_json()
    where = _by_task(task_id)
    if where is None:
        return {"updated": False}
    now = stamp()
    later = case((S.c.last_heartbeat_at < now, now), else_=S.c.last_heartbeat_at)
    return {"updated": _change(_updater(last_heartbeat_at=later), where)}


@bp.put("/provider-session/<task_id>")
def set_provider_session(task_id):
    """Record the LLM provider's session id on a task's session."""
    data = load_body(provider_session_schema)
    where = _by_task(task_id)
    action = _updater(provider_session_id=data["providerSessionId"])
    return {"updated": where is not None and _change(action, where)}


@bp.post("/cleanup")
def cleanup_sessions():
    """Remove stale sessions, or an agent's sessions (none in multi-runtime mode)."""
    data = load_body(cleanup_schema)
    agent = data.get("agentId")
    where = []
    if agent is not None:
        check_owner(agent, OWNER_FORBIDDEN)
        if current_app.config["MULTI_RUNTIME_ENABLED"]:
            return {"cleaned": 0}  # other runner processes share this agent id
        where.append(S.c.agent_id == agent)
    if agent is None or "maxAgeMinutes" in data:
        minutes = data.get("maxAgeMinutes", 30)
        where.append(S.c.last_heartbeat_at < stamp(datetime.now(timezone.utc) - timedelta(minutes=minutes)))
    with transaction(write=True) as conn:
        cleaned = end_sessions(conn, and_(*where), "cleanup" if agent is None else "agent_cleanup", stamp())
    return {"cleaned": cleaned}


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
