"""Database tables, the engine set-up per backend, timestamps and the one field list per object."""

import fcntl
import json
import os
import threading
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

import orjson
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Index, Integer, String, Text, delete, event, func, insert, inspect, literal_column, select, text, update
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import FunctionElement


class Base(DeclarativeBase):
    """Declarative base shared by every table."""


db = SQLAlchemy(model_class=Base)

# Ids and timestamps are compared and ordered as text; PostgreSQL must order them byte-wise
# like SQLite does, whatever the database's locale, so text order stays time order.
Key = Text().with_variant(Text(collation="C"), "postgresql")
Stamp = String(24).with_variant(String(24, collation="C"), "postgresql")

TERMINAL = ("completed", "failed", "cancelled")
STATUSES = ("unassigned", "pending", "in_progress", "paused") + TERMINAL


def stamp(moment=None):
    """Return a UTC time as YYYY-MM-DDTHH:MM:SS.mmmZ, the one shape every timestamp has."""
    moment = moment or datetime.now(timezone.utc)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


def new_id():
    """Return a fresh UUID v4 as text."""
    return str(uuid.uuid4())


class SessionFields:
    """The columns an active session and an ended one share."""

    agent_id: Mapped[str] = mapped_column(Key, index=True)
    trigger_type: Mapped[str] = mapped_column(Text)
    inbox_message_id: Mapped[str | None] = mapped_column(Key)
    task_description: Mapped[str | None] = mapped_column(Text)
    runner_session_id: Mapped[str | None] = mapped_column(Key)
    provider_session_id: Mapped[str | None] = mapped_column(Key)
    runtime_instance_id: Mapped[str | None] = mapped_column(Key)
    started_at: Mapped[str] = mapped_column(Stamp)
    # Deliberately not indexed: every heartbeat rewrites it, and an index page per heartbeat
    # cost ~40% of the write; the age scans (cleanup, sweep) read a table of live sessions only.
    last_heartbeat_at: Mapped[str] = mapped_column(Stamp)


class ActiveSession(SessionFields, Base):
    """A runner working on something right now."""

    __tablename__ = "active_sessions"
    id: Mapped[str] = mapped_column(Key, primary_key=True)
    # UNIQUE decides duplicates: two creates racing for one taskId cannot both insert.
    task_id: Mapped[str | None] = mapped_column(Key, unique=True)
    # The session's fields that never change after create, already encoded: the text of a
    # JSON object without its closing brace. A listing appends the two fields that do change
    # instead of encoding eleven per row (10,000 rows: ~12 ms against ~22 ms for json_object).
    listing_head: Mapped[str | None] = mapped_column(Text)


# Newest first, ties by id: the listing's order, straight off the index.
Index("ix_active_sessions_order", ActiveSession.started_at.desc(), ActiveSession.id)


class SessionHistory(SessionFields, Base):
    """A session that ended: its 11 fields plus when and why."""

    __tablename__ = "session_history"
    # The ended session's own id: a session can end only once, so two sweepers cannot both record it.
    id: Mapped[str] = mapped_column(Key, primary_key=True)
    task_id: Mapped[str | None] = mapped_column(Key, index=True)
    ended_at: Mapped[str] = mapped_column(Stamp)
    end_reason: Mapped[str] = mapped_column(String(32))
    __table_args__ = (Index("ix_session_history_order", ended_at.desc(), id),)


class Task(Base):
    """A unit of work an agent claims, runs and finishes."""

    __tablename__ = "tasks"
    id: Mapped[str] = mapped_column(Key, primary_key=True)
    agent_id: Mapped[str | None] = mapped_column(Key, index=True)
    task: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)
    priority: Mapped[int] = mapped_column(Integer)
    progress: Mapped[str | None] = mapped_column(Text)
    output: Mapped[str | None] = mapped_column(Text)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    claude_session_id: Mapped[str | None] = mapped_column(Key)
    created_at: Mapped[str] = mapped_column(Stamp)
    last_updated_at: Mapped[str] = mapped_column(Stamp)
    finished_at: Mapped[str | None] = mapped_column(Stamp)
    __table_args__ = (Index("ix_tasks_order", created_at, id),)


class TaskLog(Base):
    """One event in a task's history; seq keeps insertion order within a millisecond."""

    __tablename__ = "task_logs"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(Key, unique=True)
    event_type: Mapped[str] = mapped_column(Text)
    agent_id: Mapped[str | None] = mapped_column(Key)
    task_id: Mapped[str] = mapped_column(Key, index=True)
    old_value: Mapped[str | None] = mapped_column(Text)
    new_value: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[str | None] = mapped_column("metadata", Text)
    created_at: Mapped[str] = mapped_column(Stamp)


# One definition of each object's JSON fields, in answer order: (JSON name, column).
# A session's fields that change after create come last: the listing appends them to listing_head.
SESSION_FIELDS = tuple(
    zip(
        ("id", "agentId", "taskId", "triggerType", "inboxMessageId", "taskDescription",
         "runnerSessionId", "runtimeInstanceId", "startedAt", "providerSessionId", "lastHeartbeatAt"),
        (ActiveSession.__table__.c[name] for name in (
            "id", "agent_id", "task_id", "trigger_type", "inbox_message_id", "task_description",
            "runner_session_id", "runtime_instance_id", "started_at", "provider_session_id",
            "last_heartbeat_at")),
    )
)
SESSION_CHANGING = SESSION_FIELDS[-2:]  # providerSessionId, lastHeartbeatAt
SESSION_FIXED = SESSION_FIELDS[:-2]
HISTORY_FIELDS = tuple(
    (name, SessionHistory.__table__.c[column.name]) for name, column in SESSION_FIELDS
) + (("endedAt", SessionHistory.__table__.c.ended_at), ("endReason", SessionHistory.__table__.c.end_reason))
TASK_FIELDS = tuple(
    zip(
        ("id", "agentId", "task", "status", "priority", "progress", "output", "failureReason",
         "claudeSessionId", "createdAt", "lastUpdatedAt", "finishedAt"),
        (Task.__table__.c[name] for name in (
            "id", "agent_id", "task", "status", "priority", "progress", "output", "failure_reason",
            "claude_session_id", "created_at", "last_updated_at", "finished_at")),
    )
)
LOG_FIELDS = tuple(
    zip(
        ("id", "eventType", "agentId", "taskId", "oldValue", "newValue", "metadata", "createdAt"),
        (TaskLog.__table__.c[name] for name in (
            "id", "event_type", "agent_id", "task_id", "old_value", "new_value", "metadata",
            "created_at")),
    )
)
SESSION_COLUMNS = tuple(column for _, column in SESSION_FIELDS)
TASK_COLUMNS = tuple(column for _, column in TASK_FIELDS)
LOG_COLUMNS = tuple(column for _, column in LOG_FIELDS)
HISTORY_COLUMNS = tuple(column for _, column in HISTORY_FIELDS)
SESSION_KEYS = tuple(name for name, _ in SESSION_FIELDS)
HISTORY_KEYS = tuple(name for name, _ in HISTORY_FIELDS)
TASK_KEYS = tuple(name for name, _ in TASK_FIELDS)
LOG_KEYS = tuple(name for name, _ in LOG_FIELDS)


def _sql_function(name, doc, **templates):
    """A SQL function whose text differs by dialect; each template gets the compiled arguments."""
    element = type(name, (FunctionElement,), {"type": Text(), "inherit_cache": True, "__doc__": doc})
    for dialect, template in templates.items():
        compiles(element, dialect)(
            lambda e, compiler, _template=template, **kw: _template.format(compiler.process(e.clauses, **kw)))
    return element


row_json = _sql_function("row_json", "The text of a JSON object built by the database from (name, value) pairs.",
                         sqlite="json_object({})", postgresql="json_build_object({})::text")
json_text = _sql_function("json_text", "One value as JSON text (a quoted string, or null), made by the database.",
                          sqlite="json_quote({})", postgresql="coalesce(to_json({})::text, 'null')")


def json_pairs(fields):
    """(name, column) fields as row_json's arguments; the names are our own constants."""
    return [part for name, column in fields for part in (literal_column(f"'{name}'"), column)]


def listing_head(session):
    """A JSON-shaped session's listing_head: its fixed fields encoded, without the closing brace."""
    return orjson.dumps({name: session[name] for name, _ in SESSION_FIXED}).decode()[:-1]


def as_dicts(keys, rows):
    """Turn rows selected in field-list order into JSON-ready dicts (the fast path for lists)."""
    return [dict(zip(keys, row)) for row in rows]


def select_page(conn, keys, stmt, where, limit, offset):
    """Run a listing with filters and paging; return (rows as dicts, total matches)."""
    items = as_dicts(keys, conn.execute(stmt.where(*where).limit(limit).offset(offset)))
    table = stmt.get_final_froms()[0]
    total = conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()
    return items, total


def column_values(fields, obj):
    """Map a JSON-shaped dict onto column names, for inserts."""
    return {column.name: obj[name] for name, column in fields}


def status_log(task_id, agent_id, old, new, now, meta=None):
    """The INSERT of one task_status_change entry in a task's log."""
    return insert(TaskLog.__table__).values(
        id=new_id(), event_type="task_status_change", agent_id=agent_id, task_id=task_id,
        old_value=old, new_value=new, metadata=json.dumps(meta) if meta is not None else None,
        created_at=now,
    )


class _WriterTurn:
    """One SQLite database's writer turn in this process: a thread lock, then a flock."""

    def __init__(self, path):
        self.lock = threading.Lock()  # flock is per open file: threads sharing the descriptor need their own lock
        self.fd = os.open(path + "-writer", os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self):
        self.lock.acquire()
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self.lock.release()
            raise

    def __exit__(self, *exc):
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self.lock.release()


class _NoTurn:
    """Other backends need no writer turn."""

    def __enter__(self):
        pass

    def __exit__(self, *exc):
        pass


_NO_TURN = _NoTurn()
_turns = {}  # (pid, database path) -> _WriterTurn, opened after any fork
_turns_guard = threading.Lock()


def writer_turn(engine):
    """This database's writer turn (a context manager): threads of this process, then other processes.

    SQLite's busy handler polls with sleeps of 1 ms and longer, so writers of several
    workers contending for its lock spend most of their time asleep. A blocking flock on a
    file beside the database hands the turn over the moment it is released. The kernel drops
    the flock of a killed process.
    """
    path = engine.url.database
    if engine.dialect.name != "sqlite" or not path or path == ":memory:":
        return _NO_TURN
    key = (os.getpid(), path)
    turn = _turns.get(key)
    if turn is None:
        with _turns_guard:
            turn = _turns.get(key) or _turns.setdefault(key, _WriterTurn(path))
    return turn


@contextmanager
def transaction(write=False):
    """Yield a connection inside one transaction; write=True takes SQLite's write lock up front.

    A read followed by a write in a deferred SQLite transaction fails at once with
    "database is locked" when another writer got in between; BEGIN IMMEDIATE waits instead.
    """
    if not write:
        with db.engine.connect() as conn, conn.begin():
            yield conn
        return
    with writer_turn(db.engine), db.engine.connect() as conn:
        conn.execution_options(immediate=True)
        with conn.begin():
            yield conn


def _sqlite_connect(dbapi_conn, _record, busy_ms):
    """Set up every new SQLite connection: our own BEGINs, WAL, busy timeout, foreign keys."""
    dbapi_conn.isolation_level = None  # pysqlite's implicit BEGIN is replaced by _sqlite_begin
    cursor = dbapi_conn.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {int(busy_ms)}")
    cursor.execute("PRAGMA journal_mode = WAL")
    # With WAL, NORMAL survives any process crash; only power loss may drop the last commits.
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _sqlite_begin(conn):
    """Start each SQLite transaction ourselves, IMMEDIATE when the caller will write."""
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")


def configure_engine(engine, busy_ms):
    """Install the per-connection settings a backend needs on a fresh engine."""
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", lambda c, r: _sqlite_connect(c, r, busy_ms))
        event.listen(engine, "begin", _sqlite_begin)


class SchemaVersion(Base):
    """Which step of MIGRATIONS the database has reached (one row)."""

    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)


def _create(*models):
    """A migration step that creates tables as their models define them."""
    return lambda conn: Base.metadata.create_all(conn, tables=[m.__table__ for m in models])


def _add_listing_head(conn):
    """Add active_sessions.listing_head where step 1 made the table without it, and fill it."""
    S = ActiveSession.__table__
    if "listing_head" not in {c["name"] for c in inspect(conn).get_columns(S.name)}:
        conn.execute(text("ALTER TABLE active_sessions ADD COLUMN listing_head TEXT"))
    # A JSON object of the fixed fields, minus its closing brace (the last value is a quoted stamp).
    head = func.rtrim(row_json(*json_pairs(SESSION_FIXED)), "}")
    conn.execute(update(S).where(S.c.listing_head.is_(None)).values(listing_head=head))


# Append only: step N brings a database from version N-1 to N. Step 1 creates tables in the
# models' current shape, so a later step that changes a table must work on either shape.
MIGRATIONS = (
    _create(ActiveSession, Task, TaskLog),  # 1: the first release
    _create(SessionHistory),  # 2: ended sessions
    lambda conn: conn.execute(text("DROP INDEX IF EXISTS ix_active_sessions_last_heartbeat_at")),  # 3
    _add_listing_head,  # 4: pre-encoded fixed fields for fast listings
)


def _version(conn):
    """The schema version; a database with tables but no version table is the first release."""
    tables = inspect(conn)
    if tables.has_table(SchemaVersion.__tablename__):
        return conn.execute(select(SchemaVersion.version)).scalar() or 0
    return 1 if tables.has_table(ActiveSession.__tablename__) else 0


def create_schema():
    """Create or upgrade the schema in place; safe when several processes start at once."""
    with transaction(write=True) as conn:
        if conn.dialect.name == "postgresql":
            # Serialise concurrent upgraders; released when this transaction ends.
            conn.execute(text("SELECT pg_advisory_xact_lock(72616001)"))
        # On SQLite, BEGIN IMMEDIATE already made this the only writer.
        current = _version(conn)
        for step in MIGRATIONS[current:]:
            step(conn)
        if current < len(MIGRATIONS):
            SchemaVersion.__table__.create(conn, checkfirst=True)
            conn.execute(delete(SchemaVersion))
            conn.execute(insert(SchemaVersion).values(version=len(MIGRATIONS)))
