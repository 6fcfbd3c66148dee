"""Task routes: the small task model that orphan recovery acts on and test harnesses drive."""

import json

from flask import Blueprint
from sqlalchemy import insert, select, update
from werkzeug.exceptions import BadRequest, Conflict, Forbidden, NotFound

from auth import NOT_AN_ID, caller_agent, check_owner
from models import (
    LOG_COLUMNS, LOG_KEYS, TASK_COLUMNS, TASK_FIELDS, TASK_KEYS, TERMINAL, Task, TaskLog, as_dicts,
    column_values, new_id, select_page, stamp, status_log, transaction,
)
from schemas import (
    is_id, load_body, load_query, read_json, task_create_schema, task_finish_schema, task_list_query,
    task_progress_schema, task_session_schema,
)

bp = Blueprint("tasks", __name__, url_prefix="/api/tasks")
T = Task.__table__
L = TaskLog.__table__
NOT_YOURS = "X-Agent-ID names another agent than the task's"


def _read(conn, task_id, lock=False):
    """Return a task as a dict, or None; lock=True holds its row until the transaction ends."""
    stmt = select(*TASK_COLUMNS).where(T.c.id == task_id)
    row = conn.execute(stmt.with_for_update() if lock else stmt).first()
    return dict(zip(TASK_KEYS, row)) if row else None


def _existing(task_id):
    """Answer 404 for an unknown task before anything else is checked (tasks are never deleted)."""
    with transaction() as conn:
        if not (is_id(task_id) and conn.execute(select(T.c.id).where(T.c.id == task_id)).first()):
            raise NotFound("Task not found")


def _required_agent():
    """The caller's X-Agent-ID where a route needs one (400 without it)."""
    agent = caller_agent()
    if agent is None:
        raise BadRequest("X-Agent-ID header is required")
    if agent == NOT_AN_ID:
        raise BadRequest("X-Agent-ID is not a valid agent id")
    return agent


def _transition(task_id, decide):
    """Lock a task, let decide(task, now) check it and return the changes, apply them, log status.

    decide raises for 403/409 and returns None for a no-op; the answer is the task after.
    """
    now = stamp()
    with transaction(write=True) as conn:
        task = _read(conn, task_id, lock=True)
        changes = decide(task, now)
        if changes is None:
            return task
        changes["lastUpdatedAt"] = now
        columns = {column.name: changes[name] for name, column in TASK_FIELDS if name in changes}
        conn.execute(update(T).where(T.c.id == task_id).values(columns))
        if changes.get("status", task["status"]) != task["status"]:
            conn.execute(status_log(task_id, changes.get("agentId", task["agentId"]), task["status"],
                                    changes["status"], now))
        task.update(changes)
        return task


def _check_owner(task):
    """403 when X-Agent-ID names another agent than the task's; a task with no agent is open."""
    if task["agentId"] is not None:
        check_owner(task["agentId"], NOT_YOURS)


def _not_terminal(task):
    """409 for a task that already ended."""
    if task["status"] in TERMINAL:
        raise Conflict(f"Task is already {task['status']}")


@bp.post("")
def create_task():
    """Create a task: pending when it names an agent, else unassigned."""
    data = load_body(task_create_schema)
    now = stamp()
    task = {name: None for name in TASK_KEYS}
    task.update(id=new_id(), agentId=data.get("agentId"), task=data["task"], priority=data["priority"],
                status="pending" if data.get("agentId") else "unassigned", createdAt=now, lastUpdatedAt=now)
    with transaction(write=True) as conn:
        conn.execute(insert(T).values(column_values(TASK_FIELDS, task)))
    return task, 201


@bp.get("")
def list_tasks():
    """List tasks, oldest first, with filters and paging; total counts every match."""
    query = load_query(task_list_query)
    where = []
    if "agentId" in query:
        where.append(T.c.agent_id == query["agentId"])
    if "status" in query:
        where.append(T.c.status.in_(query["status"]))
    stmt = select(*TASK_COLUMNS).order_by(T.c.created_at, T.c.id)
    with transaction() as conn:
        tasks, total = select_page(conn, TASK_KEYS, stmt, where, query.get("limit", 100), query.get("offset", 0))
    return {"tasks": tasks, "total": total}


@bp.get("/<task_id>")
def get_task(task_id):
    """One task with its log, oldest entry first."""
    _existing(task_id)
    with transaction() as conn:
        task = _read(conn, task_id)
        logs = as_dicts(LOG_KEYS, conn.execute(
            select(*LOG_COLUMNS).where(L.c.task_id == task_id).order_by(L.c.created_at, L.c.seq)))
    for entry in logs:
        entry["metadata"] = json.loads(entry["metadata"]) if entry["metadata"] else None
    task["logs"] = logs
    return task


@bp.post("/<task_id>/start")
def start_task(task_id):
    """Claim a task for the calling agent and mark it in progress."""
    _existing(task_id)
    read_json()
    agent = _required_agent()

    def decide(task, now):
        _not_terminal(task)
        mine = task["agentId"] == agent
        if task["status"] == "in_progress" and mine:
            return None
        if task["status"] != "unassigned" and not mine:
            raise Conflict(f"Task is {task['status']} for another agent")
        return {"status": "in_progress", "agentId": agent}

    return _transition(task_id, decide)


@bp.post("/<task_id>/progress")
def report_progress(task_id):
    """Record progress text; the task is in progress from then on."""
    _existing(task_id)
    data = load_body(task_progress_schema)

    def decide(task, now):
        _check_owner(task)
        _not_terminal(task)
        return {"progress": data["progress"], "status": "in_progress"}

    _transition(task_id, decide)
    return {"success": True}


@bp.put("/<task_id>/session")
def set_task_session(task_id):
    """Record the provider session id a task runs under."""
    _existing(task_id)
    data = load_body(task_session_schema)

    def decide(task, now):
        _check_owner(task)
        return {"claudeSessionId": data["claudeSessionId"]}

    return _transition(task_id, decide)


@bp.post("/<task_id>/finish")
def finish_task(task_id):
    """End a task as completed or failed; only its own agent may."""
    _existing(task_id)
    data = load_body(task_finish_schema)
    agent = _required_agent()

    def decide(task, now):
        if task["agentId"] != agent:
            raise Forbidden("Only the task's agent can finish it")
        _not_terminal(task)
        changes = {"status": data["status"], "finishedAt": now}
        changes.update((key, data[key]) for key in ("output", "failureReason") if key in data)
        return changes

    return {"success": True, "task": _transition(task_id, decide)}


@bp.post("/<task_id>/cancel")
def cancel_task(task_id):
    """Cancel a task that has not ended."""
    _existing(task_id)
    read_json()

    def decide(task, now):
        _check_owner(task)
        _not_terminal(task)
        return {"status": "cancelled", "finishedAt": now}

    return _transition(task_id, decide)
