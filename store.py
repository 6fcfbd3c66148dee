"""Active-session statements: built once in Core, compiled once per dialect, run on raw DBAPI cursors.

Heartbeats, registrations, ends and listings are the hot paths; going through SQLAlchemy's
per-execute machinery cost several times the database work itself. Statements are still
written in Core (so both backends get correct SQL) and keyed by the shape of their filters.
"""

import os

import orjson
from sqlalchemy import bindparam, case, delete, event, func, insert, literal_column, select, update
from sqlalchemy.exc import DBAPIError

from models import (
    SESSION_CHANGING, SESSION_COLUMNS, SESSION_FIELDS, SESSION_KEYS, ActiveSession, SessionHistory, column_values,
    db, json_text, listing_head, writer_turn,
)

S = ActiveSession.__table__
H = SessionHistory.__table__
_MATCH = {
    "id": S.c.id == bindparam("id"),
    "task_id": S.c.task_id == bindparam("task_id"),
    "agent_id": S.c.agent_id == bindparam("agent_id"),
    "runtime_instance_id": S.c.runtime_instance_id == bindparam("runtime_instance_id"),
    "trigger_type": S.c.trigger_type == bindparam("trigger_type"),
    "cutoff": S.c.last_heartbeat_at < bindparam("cutoff"),
}
_COMPILED = {}  # (statement key, dialect name) -> (sql, bind names in order, or None for named)


def _where(names):
    return [_MATCH[name] for name in names]


def _shape(kind, match, extra=()):
    """A statement key: what it does, on which filters; the filters in a fixed order."""
    return (kind, tuple(sorted(match)), tuple(extra))


def _session_json():
    """A session as JSON text: its stored head, then the fields that change after create,
    encoded by the database (the names are our own constants, written into the SQL as literals)."""
    expr = S.c.listing_head
    for name, column in SESSION_CHANGING:
        expr = expr + literal_column(f"""',"{name}":'""") + json_text(column)
    return expr + literal_column("'}'")


SESSION_JSON = _session_json()


def _listed(columns, names, paged):
    stmt = select(*columns).where(*_where(names)).order_by(S.c.started_at.desc(), S.c.id)
    return stmt.limit(bindparam("limit")).offset(bindparam("offset")) if paged else stmt


_BUILD = {
    "select": lambda names, _: _listed(SESSION_COLUMNS, names, paged=False),
    "page_json": lambda names, _: _listed((SESSION_JSON,), names, paged=True),
    "select_json": lambda names, _: _listed((SESSION_JSON,), names, paged=False),
    "count": lambda names, _: select(func.count()).select_from(S).where(*_where(names)),
    "insert": lambda names, _: insert(S).values(
        {c.name: bindparam(c.name) for c in (*SESSION_COLUMNS, S.c.listing_head)}),
    "set": lambda names, columns: update(S).where(*_where(names)).values(
        {column: bindparam(f"new_{column}") for column in columns}),
    # Never moves time backwards, even between app servers whose clocks differ.
    "touch": lambda names, _: update(S).where(*_where(names)).values(last_heartbeat_at=case(
        (S.c.last_heartbeat_at < bindparam("now"), bindparam("now")), else_=S.c.last_heartbeat_at)),
    "end": lambda names, _: delete(S).where(*_where(names)).returning(*SESSION_COLUMNS),
    "record": lambda names, _: insert(H).values({c.name: bindparam(c.name) for c in H.columns}),
    "prune": lambda names, _: delete(H).where(H.c.ended_at < bindparam("cutoff")),
    "count_old": lambda names, _: select(func.count()).select_from(H).where(H.c.ended_at < bindparam("cutoff")),
}


class Tx:
    """One transaction on a raw DBAPI cursor."""

    def __init__(self, cursor, dialect):
        self.cursor = cursor
        self.dialect = dialect

    def run(self, shape, params, many=False):
        """Execute the statement of this shape with params (a dict, or a list of dicts if many)."""
        hit = _COMPILED.get((shape, self.dialect.name))
        if hit is None:
            compiled = _BUILD[shape[0]](shape[1], shape[2]).compile(dialect=self.dialect)
            hit = (compiled.string, compiled.positiontup if compiled.positional else None)
            _COMPILED[(shape, self.dialect.name)] = hit
        sql, order = hit
        if order is not None:
            params = [tuple(p[n] for n in order) for p in params] if many else tuple(params[n] for n in order)
        if many:
            self.cursor.executemany(sql, params)
        else:
            self.cursor.execute(sql, params)
        return self.cursor


class tx:
    """with tx(write=False) as t: one transaction on a raw DBAPI cursor (t is a Tx).

    write=True waits for the writer turn and takes SQLite's write lock up front (BEGIN
    IMMEDIATE). DBAPI errors come out as SQLAlchemy's (IntegrityError, OperationalError...),
    like every other path, so one set of error handlers serves both. A class, not a
    generator: heartbeats run through here, and each generator layer cost microseconds.
    """

    __slots__ = ("write", "engine", "turn", "conn")

    def __init__(self, write=False):
        self.write = write

    def __enter__(self):
        self.engine = engine = db.engine
        self.turn = writer_turn(engine) if self.write else None
        if self.turn is not None:
            self.turn.__enter__()
        try:
            self.conn = _checkout(engine)
            cursor = self.conn.cursor()
            if self.write and engine.dialect.name == "sqlite":
                cursor.execute("BEGIN IMMEDIATE")  # a lone read needs no BEGIN: it is its own snapshot
            return Tx(cursor, engine.dialect)
        except BaseException as err:
            self._end(err)
            self._translate(err)
            raise

    def __exit__(self, kind, err, trace):
        if err is None:
            try:
                self.conn.commit()
            except BaseException as failed:
                self._end(failed)
                self._translate(failed)
                raise
        self._end(err)
        if err is not None:
            self._translate(err)
        return False

    def _translate(self, err):
        """Raise a DBAPI error again as SQLAlchemy's; leave anything else to propagate."""
        dbapi = self.engine.dialect.dbapi
        if isinstance(err, dbapi.Error):
            raise DBAPIError.instance(None, None, err, dbapi.Error) from err

    def _end(self, err):
        """Roll back after an error, give the connection back (or drop a broken one), end the turn."""
        try:
            conn = getattr(self, "conn", None)
            if conn is not None:
                dbapi, sqlite = self.engine.dialect.dbapi, self.engine.dialect.name == "sqlite"
                if err is not None:
                    _rollback(conn, dbapi)
                # A broken server connection must not be used again.
                broken = isinstance(err, dbapi.OperationalError) and not sqlite
                _checkin(self.engine, conn, broken)
                self.conn = None
        finally:
            if self.turn is not None:
                self.turn.__exit__(None, None, None)


def _rollback(conn, dbapi):
    try:
        conn.rollback()
    except dbapi.Error:
        pass  # the connection is gone; closing it below is all that is left


_KEEP_IDLE = 8  # idle SQLite connections a process keeps per database


def _idle(engine):
    """This process's idle SQLite connections of an engine; closed when the engine is disposed.

    SQLAlchemy's pool checkout and checkin cost ~12 us a request, most of a heartbeat's own
    Python time; a list per process costs nothing. The connections come from the pool (so
    they get its connect-time PRAGMAs) and are detached from it. Keyed by pid: a forked child
    never uses, nor closes, its parent's connections.
    """
    state = engine.__dict__.get("_idle_sqlite")
    if state is None or state[0] != os.getpid():
        state = engine.__dict__["_idle_sqlite"] = (os.getpid(), [])
        event.listen(engine, "engine_disposed", _close_idle)
    return state[1]


def _close_idle(engine):
    state = engine.__dict__.pop("_idle_sqlite", None)
    if state is not None and state[0] == os.getpid():
        for conn in state[1]:
            conn.close()


def _checkout(engine):
    """A DBAPI connection: an idle SQLite one of this process, else one from the pool."""
    if engine.dialect.name != "sqlite":
        return engine.raw_connection()
    try:
        return _idle(engine).pop()
    except IndexError:
        fairy = engine.raw_connection()
        fairy.detach()
        return fairy.dbapi_connection


def _checkin(engine, conn, broken=False):
    """Give a connection back: to the idle list (SQLite) or the pool; a broken one is dropped."""
    if engine.dialect.name != "sqlite":
        if broken:
            conn.invalidate()
        conn.close()
        return
    idle = _idle(engine)
    if len(idle) < _KEEP_IDLE:
        idle.append(conn)
    else:
        conn.close()


def insert_session(t, session):
    """Insert a session given as its JSON-shaped dict."""
    t.run(_shape("insert", ()), {**column_values(SESSION_FIELDS, session), "listing_head": listing_head(session)})


def find(t, **match):
    """The first session matching, as a JSON-ready dict, or None."""
    row = t.run(_shape("select", match), match).fetchone()
    return dict(zip(SESSION_KEYS, row)) if row else None


def listing_json(t, limit=None, offset=0, **match):
    """Sessions matching, newest first, as an encoded JSON array; paged when limit is given."""
    if limit is None:
        cursor = t.run(_shape("select_json", match), match)
    else:
        cursor = t.run(_shape("page_json", match), {**match, "limit": limit, "offset": offset})
    # A Fragment is embedded as is by orjson, the app's JSON encoder.
    return orjson.Fragment("[" + ",".join([row for (row,) in cursor.fetchall()]) + "]")


def count(t, **match):
    """How many sessions match."""
    return t.run(_shape("count", match), match).fetchone()[0]


def set_fields(t, values, **match):
    """Set column values on the matching sessions; return how many matched."""
    params = {**match, **{f"new_{column}": value for column, value in values.items()}}
    return t.run(_shape("set", match, sorted(values)), params).rowcount


def touch(t, now, **match):
    """Move the matching sessions' lastHeartbeatAt to now (never back); return how many matched."""
    return t.run(_shape("touch", match), {**match, "now": now}).rowcount


def end(t, reason, now, **match):
    """Delete the matching sessions and record each in history; return how many ended.

    DELETE ... RETURNING decides which rows this call ended: a concurrent call that deletes
    the same row gets nothing back, so no session is recorded twice.
    """
    if not match:
        raise ValueError("end() needs a filter: it never deletes every session by accident")
    names = [column.name for column in SESSION_COLUMNS]
    ended = t.run(_shape("end", match), match).fetchall()
    if ended:
        t.run(_shape("record", ()), [
            {**dict(zip(names, row)), "ended_at": now, "end_reason": reason} for row in ended
        ], many=True)
    return len(ended)


def old_history(t, cutoff):
    """How many ended sessions are older than cutoff."""
    return t.run(_shape("count_old", ()), {"cutoff": cutoff}).fetchone()[0]


def prune_history(t, cutoff):
    """Delete history older than cutoff."""
    t.run(_shape("prune", ()), {"cutoff": cutoff})
