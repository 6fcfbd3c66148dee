"""Property-based fuzzing of every route against the contract (hypothesis).

Each example sends one generated request, valid or not (bodies, path ids, query strings,
headers), and checks the answer: never a 5xx, always a JSON object, exactly the shape the
contract gives for its status, the status a model of the contract predicts from the state
read just before, and a refused (4xx) or read-only request changes nothing.

The fixtures are function-scoped, so examples of one test share a database: every
prediction is made from a snapshot taken inside the example, never from earlier examples.
"""

import json
import logging
import math
import re
import uuid
from datetime import datetime, timedelta, timezone
from unittest.mock import ANY
from urllib.parse import parse_qsl, quote

import pytest
from flask import request, request_finished
from hypothesis import HealthCheck, Phase, event, given, settings, strategies as st
from sqlalchemy import delete, func, select, update

from conftest import KEY
from models import ActiveSession, SessionHistory, Task, TaskLog, db

# ---------------------------------------------------------------- the contract's shapes

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SESSION_KEYS = {"id", "agentId", "taskId", "triggerType", "inboxMessageId", "taskDescription",
                "runnerSessionId", "providerSessionId", "runtimeInstanceId", "startedAt", "lastHeartbeatAt"}
HISTORY_KEYS = SESSION_KEYS | {"endedAt", "endReason"}
TASK_KEYS = {"id", "agentId", "task", "status", "priority", "progress", "output", "failureReason",
             "claudeSessionId", "createdAt", "lastUpdatedAt", "finishedAt"}
LOG_KEYS = {"id", "eventType", "agentId", "taskId", "oldValue", "newValue", "metadata", "createdAt"}
TERMINAL = ("completed", "failed", "cancelled")
STATUSES = ("unassigned", "pending", "in_progress", "paused") + TERMINAL
SUCCESS = {  # endpoint -> its one success status
    "sessions.create_session": 201, "tasks.create_task": 201,
}
CONTROL = "".join(chr(c) for c in (*range(0x20), *range(0x7F, 0xA0)))
NOT_AN_ID = object()  # a caller whose X-Agent-ID cannot be an agent id: it equals no agent

FUZZ = settings(
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink),
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.large_base_example,
                           HealthCheck.filter_too_much],
)


def is_id(value):
    """The contract's id rule: 1-256 code points, no '/', no control characters, not '.' or '..'."""
    return (isinstance(value, str) and 0 < len(value) <= 256 and "/" not in value
            and value not in (".", "..") and not set(value) & set(CONTROL))


def stamp(moment):
    """The contract's timestamp shape, for a moment."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def assert_stamp(value):
    assert isinstance(value, str) and STAMP.match(value), value


def assert_uuid4(value):
    assert isinstance(value, str) and str(uuid.UUID(value)) == value and uuid.UUID(value).version == 4, value


def assert_session(s, keys=SESSION_KEYS):
    assert isinstance(s, dict) and set(s) == keys, s
    assert_uuid4(s["id"])
    assert is_id(s["agentId"]) and isinstance(s["triggerType"], str) and s["triggerType"]
    for key in ("taskId", "inboxMessageId", "runnerSessionId", "providerSessionId", "runtimeInstanceId"):
        assert s[key] is None or is_id(s[key]), (key, s[key])
    assert s["taskDescription"] is None or isinstance(s["taskDescription"], str)
    assert_stamp(s["startedAt"])
    assert_stamp(s["lastHeartbeatAt"])
    assert s["startedAt"] <= s["lastHeartbeatAt"]


def assert_history(s):
    assert_session(s, HISTORY_KEYS)
    assert_stamp(s["endedAt"])
    assert isinstance(s["endReason"], str) and s["endReason"]


def assert_task(t, keys=TASK_KEYS):
    assert isinstance(t, dict) and set(t) == keys, t
    assert_uuid4(t["id"])
    assert t["agentId"] is None or is_id(t["agentId"])
    assert isinstance(t["task"], str) and t["task"]
    assert t["status"] in STATUSES
    assert type(t["priority"]) is int and 0 <= t["priority"] <= 100
    for key in ("progress", "output", "failureReason"):
        assert t[key] is None or isinstance(t[key], str)
    assert t["claudeSessionId"] is None or is_id(t["claudeSessionId"])
    assert_stamp(t["createdAt"])
    assert_stamp(t["lastUpdatedAt"])
    assert t["createdAt"] <= t["lastUpdatedAt"]
    if t["status"] in TERMINAL:
        assert_stamp(t["finishedAt"])
    else:
        assert t["finishedAt"] is None


def assert_task_with_logs(t):
    assert_task({k: v for k, v in t.items() if k != "logs"})
    assert "logs" in t and isinstance(t["logs"], list)
    for entry in t["logs"]:
        assert set(entry) == LOG_KEYS, entry
        assert entry["taskId"] == t["id"]
        assert entry["metadata"] is None or isinstance(entry["metadata"], dict)
        assert_stamp(entry["createdAt"])
    assert [e["createdAt"] for e in t["logs"]] == sorted(e["createdAt"] for e in t["logs"])


def assert_small(body, **types):
    """{"deleted"}, {"updated"}, ...: exactly those keys, of exactly those types."""
    assert set(body) == set(types), body
    for key, kind in types.items():
        assert type(body[key]) is kind, body


def assert_success(endpoint, body):
    """The documented success shape of each route."""
    if endpoint == "health":
        assert set(body) == {"status", "version"} and body["status"] == "ok"
        assert isinstance(body["version"], str)
    elif endpoint in ("sessions.list_sessions", "sessions.list_history"):
        assert "sessions" in body and set(body) <= {"sessions", "total"}, body
        assert isinstance(body["sessions"], list)
        check = assert_history if endpoint == "sessions.list_history" else assert_session
        for s in body["sessions"]:
            check(s)
        if "total" in body:
            assert type(body["total"]) is int and body["total"] >= len(body["sessions"])
    elif endpoint in ("sessions.get_session", "sessions.create_session"):
        assert set(body) == {"session"}, body
        assert_session(body["session"])
    elif endpoint in ("sessions.delete_session", "sessions.delete_session_by_task"):
        assert_small(body, deleted=bool)
    elif endpoint in ("sessions.heartbeat", "sessions.set_provider_session"):
        assert_small(body, updated=bool)
    elif endpoint == "sessions.cleanup_sessions":
        assert_small(body, cleaned=int)
        assert body["cleaned"] >= 0
    elif endpoint == "sessions.recover_orphaned_tasks":
        assert_small(body, recovered=int, tasks=list)
        assert body["recovered"] == len(body["tasks"])
        for t in body["tasks"]:
            assert_task(t)
            assert t["status"] == "pending"
        assert [(t["createdAt"], t["id"]) for t in body["tasks"]] == sorted(
            (t["createdAt"], t["id"]) for t in body["tasks"])
    elif endpoint == "tasks.list_tasks":
        assert set(body) == {"tasks", "total"}, body
        for t in body["tasks"]:
            assert_task(t)
        assert type(body["total"]) is int and body["total"] >= len(body["tasks"])
    elif endpoint == "tasks.get_task":
        assert_task_with_logs(body)
    elif endpoint in ("tasks.create_task", "tasks.start_task", "tasks.set_task_session", "tasks.cancel_task"):
        assert_task(body)
    elif endpoint == "tasks.report_progress":
        assert body == {"success": True}
    elif endpoint == "tasks.finish_task":
        assert set(body) == {"success", "task"} and body["success"] is True, body
        assert_task(body["task"])
    else:
        raise AssertionError(f"a success from an endpoint the contract does not have: {endpoint}")


def assert_error(status, body, headers, endpoint):
    """The documented error shape of each status."""
    assert isinstance(body.get("error"), str) and body["error"].strip(), body
    if status == 400:
        if body["error"].startswith("Validation error: ") or "details" in body:
            assert set(body) == {"error", "details"}, body
            assert body["error"].startswith("Validation error: ")
            assert isinstance(body["details"], dict) and body["details"], body
            for field, messages in body["details"].items():
                assert isinstance(field, str)
                assert isinstance(messages, list) and messages and all(isinstance(m, str) for m in messages)
        else:
            assert set(body) == {"error"}, body
    elif status == 401:
        assert body == {"error": "Unauthorized"}
        assert headers.get("WWW-Authenticate") == "Bearer"
    elif status == 409 and endpoint == "sessions.create_session":
        assert set(body) == {"error", "session"}, body
        assert_session(body["session"])
    else:
        assert set(body) == {"error"}, body
        if status == 405:
            assert headers.get("Allow"), "405 without Allow"


class Answer:
    """What came back: status, parsed JSON body, headers and the endpoint that served it."""

    def __init__(self, status, body, headers, endpoint):
        self.status, self.body, self.headers, self.endpoint = status, body, headers, endpoint

    def __repr__(self):
        return f"<{self.status} {self.endpoint} {self.body!r}>"[:2000]


class Wire:
    """Sends requests through the test client and checks every answer's shape."""

    def __init__(self, app):
        self.app = app
        self.client = app.test_client()
        self.endpoint = None
        self.failures = []
        self.size = 0

    def _finished(self, sender, response, **extra):
        self.endpoint = request.endpoint

    def send(self, method, path, query="", headers=(), body=None, content_type=None):
        """One request; returns its checked Answer."""
        self.endpoint = None
        self.failures.clear()
        r = self.client.open(path, method=method, query_string=query, headers=list(headers),
                             data=body, content_type=content_type)
        raw = r.get_data()
        context = f"{method} {path!r} ?{query!r} {list(headers)!r} body={body[:300] if body else body!r}"
        assert r.status_code < 500, (context, r.status_code, raw[:500], self.failures)
        if method == "HEAD" or (method == "OPTIONS" and r.status_code == 200):
            assert raw == b"", context
            if method == "OPTIONS":
                assert r.headers.get("Allow"), context
            return Answer(r.status_code, None, r.headers, self.endpoint)
        assert r.mimetype == "application/json", (context, r.status_code, r.content_type, raw[:300])
        data = json.loads(raw)
        assert isinstance(data, dict), (context, data)
        assert KEY not in raw.decode("utf-8", "replace")
        answer = Answer(r.status_code, data, r.headers, self.endpoint)
        if r.status_code < 300:
            assert r.status_code == SUCCESS.get(self.endpoint, 200), (context, answer)
            assert_success(self.endpoint, data)
        else:
            assert_error(r.status_code, data, r.headers, self.endpoint)
        return answer

    def get_ok(self, path, query=""):
        answer = self.send("GET", path, query, AUTH)
        assert answer.status == 200, answer
        return answer.body

    def state(self):
        """Everything a request could change: sessions and tasks as the API shows them, and how many
        history rows and task log entries there are (rows that are only ever added)."""
        tasks = self.get_ok("/api/tasks", "limit=1000")
        assert tasks["total"] <= 1000, "snapshot would be incomplete"
        with self.app.app_context():
            counts = db.session.execute(select(
                select(func.count()).select_from(SessionHistory.__table__).scalar_subquery(),
                select(func.count()).select_from(TaskLog.__table__).scalar_subquery())).one()
            db.session.remove()
        state = {"sessions": self.get_ok("/api/active-sessions")["sessions"], "tasks": tasks["tasks"],
                 "counts": tuple(counts)}
        self.size = len(state["sessions"]) + len(state["tasks"]) + counts[0]
        return state

    def history(self):
        """Every ended session, newest first."""
        history = self.get_ok("/api/active-sessions/history", "limit=1000")
        assert history["total"] <= 1000, "snapshot would be incomplete"
        return history["sessions"]

    def trim(self, most=40):
        """Start an example on an emptied database once earlier examples left many rows (speed only:
        every prediction comes from the snapshot taken inside the example)."""
        if self.size > most:
            with self.app.app_context():
                for model in (TaskLog, SessionHistory, ActiveSession, Task):
                    db.session.execute(delete(model.__table__))
                db.session.commit()
            self.size = 0


class _Failures(logging.Handler):
    """Collects the app's logged exceptions, to show the cause of an unexpected 5xx."""

    def __init__(self, wire):
        super().__init__(logging.ERROR)
        self.wire = wire

    def emit(self, record):
        self.wire.failures.append(self.format(record))


@pytest.fixture
def wire(app):
    """A Wire on the test app, with the endpoint of each answer and the app's errors captured."""
    w = Wire(app)
    handler = _Failures(w)
    logger = logging.getLogger("app")
    logger.addHandler(handler)
    request_finished.connect(w._finished, app, weak=False)
    yield w
    request_finished.disconnect(w._finished, app)
    logger.removeHandler(handler)


def unchanged(before, after):
    """Whether two state() snapshots agree (a history listing added to one is not compared)."""
    return all(before[key] == after[key] for key in ("sessions", "tasks", "counts"))


def set_task(app, task_id, **values):
    """Test setup straight in the database: statuses and ages the API cannot produce."""
    with app.app_context():
        db.session.execute(update(Task.__table__).where(Task.__table__.c.id == task_id).values(**values))
        db.session.commit()


# ---------------------------------------------------------------- generators

AUTH = (("Authorization", f"Bearer {KEY}"),)
AGENTS = ("agent-1", "agent-2", "Agent-1", "ägent ü", "エージェント", "a" * 256)
TASK_IDS = ("task-1", "task-2", "Task-1", "ø", "%41", "...", "by-task", "history", "a b")
LONG = {n: "x" * n for n in (256, 257, 4096, 4097, 65536, 65537)}

id_char = st.characters(exclude_categories=("Cs",), exclude_characters=CONTROL + "/")
plain_text_chars = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
plain_text = st.text(plain_text_chars, max_size=16)
lone_surrogate = st.builds(lambda a, s, b: a + s + b, st.text(id_char, max_size=3),
                           st.characters(categories=("Cs",)), st.text(id_char, max_size=3))
valid_id = st.one_of(
    st.sampled_from(AGENTS + TASK_IDS),
    st.text(id_char, min_size=1, max_size=12).filter(lambda s: s not in (".", "..")),
    st.sampled_from((LONG[256], "é" * 256, "😀" * 256, " ", "...", ". .")),
)
bad_id_text = st.one_of(
    st.sampled_from(("", ".", "..", LONG[257], "😀" * 257, "a/b", "/", "a\x00b", "\x00", "a\nb", "\x7f",
                     "\x9f", "tab\there", "../x")),
    st.builds(lambda a, c, b: a + c + b, st.text(id_char, max_size=4), st.sampled_from(CONTROL + "/"),
              st.text(id_char, max_size=4)),
)
wrong_type = st.one_of(
    st.integers(-(10**20), 10**20), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
    st.lists(st.integers(0, 9), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(0, 9), max_size=2),
)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20),
                      st.floats(allow_nan=False, allow_infinity=False), plain_text)
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(plain_text, c, max_size=3),
                          max_leaves=8)
# Bodies that break JSON itself, not a field: 400 without "details".
NONFINITE = st.sampled_from((float("nan"), float("inf"), float("-inf")))


# A field spec: (kind, required, *args). A drawn value carries its verdict:
# "ok" (valid), "bad" (a validation error naming the field), "json" (400, JSON itself is bad),
# "any" (the contract leaves it open: success or a 400).
def field_values(kind, required, *args):
    """Values for one body field by verdict: {"ok": ..., "bad": ..., "any": ..., "json": ...}."""
    if kind == "id":
        ok = valid_id
        bad = bad_id_text | wrong_type
        other = None
    elif kind == "text":
        lo, hi = args
        ok = st.one_of(st.text(plain_text_chars, min_size=lo, max_size=min(hi, 16)),
                       st.sampled_from(("x" * hi, "é" * min(hi, 4096), "a\tb\u2028c\U0001f600")))
        bad = st.sampled_from([LONG.get(hi + 1, "x" * (hi + 1))] + ([""] if lo else [])) | wrong_type
        other = st.builds(lambda a, b: a + "\x00" + b, plain_text, plain_text)  # NUL: PostgreSQL text cannot hold it
    elif kind == "int":
        lo, hi = args
        ok = st.one_of(st.integers(lo, hi), st.sampled_from((lo, hi)))
        bad = st.one_of(st.sampled_from((lo - 1, hi + 1, True, False, 30.5, -0.5, "30", str(lo), "", [lo], {"n": lo})),
                        st.integers(max_value=lo - 1, min_value=-(10**30)),
                        st.integers(min_value=hi + 1, max_value=10**30),
                        st.integers(lo, hi).map(str))
        other = st.sampled_from((float(lo), float(hi), 1e2))  # 30.0: integral, but not an integer literal
    else:  # enum
        (values,) = args
        ok = st.sampled_from(values)
        bad = st.sampled_from(("", "COMPLETED", "pending", "in_progress", "cancelled", "done")) | wrong_type
        other = None
    if not required:
        ok = ok | st.none()  # an optional null counts as not given
    else:
        bad = bad | st.none()  # a required null is a validation error
    return {"ok": ok, "bad": bad, "any": other, "json": lone_surrogate | NONFINITE}


def any_field_value(spec):
    """(value, verdict) for one field, over every verdict."""
    values = field_values(*spec)
    verdicts = ("ok", "bad", "bad", "json") + (("any",) if values["any"] is not None else ())
    return st.sampled_from(verdicts).flatmap(lambda verdict: values[verdict].map(lambda v: (v, verdict)))


SERVER_OWNED = st.fixed_dictionaries({}, optional={
    "id": st.sampled_from(("client-id", str(uuid.uuid4()))),
    "startedAt": st.just("1999-01-01T00:00:00.000Z"), "lastHeartbeatAt": st.just("1999-01-01T00:00:00.000Z"),
    "createdAt": st.just("1999-01-01T00:00:00.000Z"), "lastUpdatedAt": st.just("2999-01-01T00:00:00.000Z"),
    "finishedAt": st.just("1999-01-01T00:00:00.000Z"), "providerSessionId": st.just("client-provider"),
    "claudeSessionId": st.just("client-claude"), "status": st.sampled_from(STATUSES), "logs": st.just([]),
})


def walk(value):
    """Yield (depth, node) for every node of a JSON value (keys included), without recursion."""
    stack = [(1, value)]
    while stack:
        depth, node = stack.pop()
        yield depth, node
        if isinstance(node, dict):
            for k, v in node.items():
                stack.append((depth + 1, k))
                stack.append((depth + 1, v))
        elif isinstance(node, list):
            stack.extend((depth + 1, v) for v in node)


def json_broken(value):
    """Whether a body cannot be valid JSON for the service: NaN/Infinity, lone surrogates, > 32 levels."""
    for depth, node in walk(value):
        if isinstance(node, float) and not math.isfinite(node):
            return True
        if isinstance(node, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in node):
            return True
        if isinstance(node, (dict, list)) and depth > 32:
            return True
    return False


def nest(depth, leaf=1):
    value = leaf
    for _ in range(depth):
        value = {"k": value}
    return value


class Body:
    """A generated body: the bytes sent, the Content-Type, and the verdict of the contract."""

    def __init__(self, raw, content_type=None, verdict="ok", fields=None, bad=()):
        self.raw, self.content_type, self.verdict = raw, content_type, verdict
        self.fields = fields or {}  # the schema fields given (not null), with their values
        self.bad = tuple(bad)  # fields that must appear in a validation error's details

    def __repr__(self):
        return f"Body({self.raw[:200] if self.raw else self.raw!r}, {self.content_type!r}, {self.verdict})"


def encode(value, ascii_only):
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


JSON_TYPES = (None, "application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
              "application/vnd.api+json", "application/merge-patch+json")
OTHER_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
               "application/jsonx", "application/json-seq", "text/json", "application/xml", "json")


@st.composite
def bodies(draw, schema):
    """A body for a route whose JSON fields are schema ({name: field spec}); mostly well-formed."""
    # Hypothesis favours the first element of a sampled_from: here, and below, the common case.
    mode = draw(st.sampled_from(("valid",) * 8 + ("fuzz",) * 5 + ("none", "empty", "non-object", "raw")))
    content_type = draw(st.sampled_from(JSON_TYPES))
    if mode == "none":
        return Body(None, None, "ok" if not any(s[1] for s in schema.values()) else "bad",
                    bad=[n for n, s in schema.items() if s[1]])
    if mode == "empty":
        # An empty body is no body, whatever its type (not multipart: the test client would fill it in).
        ct = draw(st.sampled_from(JSON_TYPES + OTHER_TYPES[:2] + OTHER_TYPES[3:]))
        return Body(b"", ct, "ok" if not any(s[1] for s in schema.values()) else "bad",
                    bad=[n for n, s in schema.items() if s[1]])
    if mode == "non-object":
        value = draw(st.one_of(st.none(), st.booleans(), st.integers(), plain_text,
                               st.lists(json_value, max_size=3), st.just([{}])))
        return Body(encode(value, draw(st.booleans())), content_type, "json")
    if mode == "raw":
        raw = draw(st.sampled_from((b"{", b"}", b"{'a': 1}", b'{"a":}', b"\xff\xfe{}", b"{\"a\": \"\xed\xa0\x80\"}",
                                    b"[" * 40 + b"]" * 40, b"{" * 5, b"NaN", b'{"n": NaN}', b'{"n": Infinity}',
                                    b'{"n": -Infinity}', b'{"n": 1e400}', b"nul", b"\x00", b'{"a":1}x',
                                    b'{"a":1}{"b":2}', b"\"\\ud800\"", b'{"a":"\\ud800"}'))
                   | st.binary(min_size=1, max_size=20).filter(lambda b: not _parses_to_object(b)))
        return Body(raw, content_type, "json")
    obj, given, bad, verdicts = {}, {}, [], []
    for name, spec in schema.items():
        present = (mode == "valid" and spec[1]) or draw(st.sampled_from((True, True, True, False)))
        if not present:
            if spec[1]:
                bad.append(name)
                verdicts.append("bad")
            continue
        if mode == "valid":
            value = (draw(field_values(*spec)["ok"]), "ok")
        else:
            value = draw(any_field_value(spec))
        obj[name] = value[0]
        verdicts.append(value[1])
        if value[1] == "bad":
            bad.append(name)
        if value[0] is not None:
            given[name] = value[0]
    extras = draw(st.one_of(st.just({}), SERVER_OWNED,
                            st.dictionaries(plain_text.filter(lambda k: k not in schema), json_value, max_size=3)))
    if mode == "fuzz" and draw(st.sampled_from((False,) * 9 + (True,))):
        extras["deep"] = nest(draw(st.sampled_from((30, 31, 32, 33, 40, 2000))))
    for key, value in extras.items():
        if key not in schema:  # a server-owned name may be a field of this route: then it is drawn above
            obj[key] = value
    if json_broken(obj):
        verdict = "json"
    elif "bad" in verdicts:
        verdict = "bad"
    elif "any" in verdicts or _depth(obj) == 32:
        verdict = "any"
    else:
        verdict = "ok"
    try:
        raw = encode(obj, draw(st.booleans()))
    except RecursionError:
        raw = b'{"deep": ' + b'{"k": ' * 2000 + b"1" + b"}" * 2001
    return Body(raw, content_type, verdict, given, bad)


def _depth(value):
    return max(depth for depth, node in walk(value) if isinstance(node, (dict, list)))


def _parses_to_object(raw):
    try:
        return isinstance(json.loads(raw), dict)
    except ValueError:
        return False


def with_foreign_type(body, draw):
    """Sometimes declare a non-empty body with a Content-Type that is not JSON: 415."""
    if body.raw and draw(st.sampled_from((False,) * 11 + (True,))):
        return Body(body.raw, draw(st.sampled_from(OTHER_TYPES)), "415")
    return body


# X-Agent-ID: (header value as the server hands it over, the caller it stands for)
def _agent_header(agent):
    return agent.encode("utf-8").decode("latin-1")


JUNK_AGENT = st.sampled_from(("/", ".", "..", "a/b", "\xff\xfe", "\xc3", "x" * 300, "\x01", "a\x7fb", "é€", "a\x00b"))


# What is drawn never depends on the database (hypothesis replays draws): an X-Agent-ID choice
# says "the owner" and is resolved against the snapshot afterwards.
AGENT_CHOICES = st.one_of(
    st.just(("absent", None)), st.just(("empty", None)), st.just(("owner", None)), st.just(("owner", None)),
    st.sampled_from(AGENTS).map(lambda a: ("agent", a)), JUNK_AGENT.map(lambda a: ("junk", a)),
)


def agent_header(choice, owner):
    """(X-Agent-ID headers, the caller they declare) for a drawn choice; owner None: some other agent."""
    kind, value = choice
    if kind == "absent":
        return (), None
    if kind == "empty":
        return (("X-Agent-ID", ""),), None
    if kind == "junk":
        return (("X-Agent-ID", value),), NOT_AN_ID
    usable = isinstance(owner, str) and is_id(owner) and not any(0xD800 <= ord(c) <= 0xDFFF for c in owner)
    agent = value if kind == "agent" else owner if usable else "agent-2"
    return (("X-Agent-ID", _agent_header(agent)),), agent


GOOD_AUTH = st.sampled_from((f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {KEY}", f"BeArEr {KEY}")).map(
    lambda v: (("Authorization", v),))
BAD_AUTH = st.one_of(
    st.just(()),
    st.sampled_from(("", "Bearer", "Bearer ", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Basic {KEY}", KEY,
                     f"Token {KEY}", "Bearer wrong", f"Bearer {KEY.upper()}", f"Bearer {KEY} extra",
                     f"Bearer\t{KEY}", f"Bearer{KEY}", _agent_header(f"Bearer {KEY}é"), "Bearer \xff\xfe",
                     _agent_header("Bearer ключ"), f"{KEY} Bearer")).map(lambda v: (("Authorization", v),)),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=40).map(
        lambda v: (("Authorization", v),)),
    st.just((("Authorization", f"Bearer {KEY}"), ("Authorization", f"Bearer {KEY}"))),
    st.just((("Authorization", f"Bearer {KEY}"), ("Authorization", "Bearer wrong"))),
)


def mostly(common, rare, times=6):
    """Draw from common about times in times + 1, else from rare."""
    return st.sampled_from((True,) * times + (False,)).flatmap(lambda c: common if c else rare)


def auth():
    """(headers, whether they carry the key): mostly the key, sometimes not."""
    return mostly(GOOD_AUTH.map(lambda h: (h, True)), BAD_AUTH.map(lambda h: (h, False)))


# ---------------------------------------------------------------- path ids and query strings

JUNK_PATH_IDS = ("", ".", "..", "%", "%2F", "%25", "a/b", "/", "../..", "by-task", "heartbeat", "cleanup",
                 "history", "recover-orphaned-tasks", "provider-session", "x" * 3000, "?", "#", "a?b=c",
                 ";", "\x00", "\x7f", "é", "😀", "\u202e", " ", "%00", "~", "*")


class Known:
    """A drawn "one of the ids that exist", resolved against the snapshot (index i)."""

    def __init__(self, i):
        self.i = i

    def __repr__(self):
        return f"Known({self.i})"


def path_ids():
    """Path ids: known ones (so routes hit rows), the pools, arbitrary text, and junk."""
    known = st.integers(0, 2**16).map(Known)
    return mostly(known, st.one_of(st.sampled_from(TASK_IDS + AGENTS), valid_id, st.sampled_from(JUNK_PATH_IDS),
                                   st.text(max_size=20), lone_surrogate), times=2)


def resolve(pick, known):
    """The id a path_ids() draw stands for: even Known picks take known[0], odd ones any known id."""
    if not isinstance(pick, Known):
        return pick
    known = [k for k in known if k is not None]
    if not known:
        return "no-such-id"
    return known[0] if pick.i % 2 == 0 else known[pick.i % len(known)]


def segment(value):
    """A path segment carrying value exactly (percent-encoded UTF-8)."""
    return quote(value.encode("utf-8", "surrogatepass"), safe="")


def delivered(value):
    """The id the app receives for a segment() of value (the server decodes with replacement)."""
    return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def routable(value):
    """Whether value, as one segment, keeps the request on the route it was meant for."""
    return value != "" and "/" not in delivered(value)


QUERY_JUNK_KEYS = ("foo", "AGENTID", "agentid", "limit ", "Limit", "api_key", "token", "", "status[]")
INT_JUNK = ("", "-1", "0", "1", "+5", " 5", "5 ", "1.5", "1e3", "0x10", "٣", "５", "007", "1000", "1001",
            "1000000000", "1000000001", "99999999999999999999", "abc", "null", "true", "[]", "%00")


@st.composite
def queries(draw, keys):
    """A query string over the route's keys ({key: value strategy}) and junk keys: (text, pairs or None)."""
    pairs = []
    for key, values in keys.items():
        for _ in range(draw(st.sampled_from((0, 0, 1, 1, 1, 2)))):
            pairs.append((key, draw(values)))
    for _ in range(draw(st.sampled_from((0, 0, 0, 1, 2)))):
        pairs.append((draw(st.sampled_from(QUERY_JUNK_KEYS) | plain_text),
                      draw(st.sampled_from(INT_JUNK) | plain_text | st.just(KEY))))
    if draw(st.sampled_from((False,) * 14 + (True,))):  # bytes no form encoder makes: the server replaces them
        junk = draw(st.sampled_from(("limit=%ff", "%zz=1", "&&&", "=", "limit", "agentId=%C3", "a=%00&b",
                                     "offset=1&offset=x", "limit=%31%30")))
        text = "&".join([f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs] + [junk])
        return text, None
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs), dict(
        parse_qsl("&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs[::-1]),
                  keep_blank_values=True))


def query_int(lo, hi):
    return st.one_of(st.integers(lo, hi).map(str), st.sampled_from(INT_JUNK), st.integers().map(str), plain_text)


def int_verdict(value, lo, hi):
    """ok / bad / any for a query integer: plain digits in bounds are the only sure yes."""
    if value == "":
        return "any"
    if re.fullmatch(r"0|[1-9][0-9]{0,11}", value):
        return "ok" if lo <= int(value) <= hi else "bad"
    if re.fullmatch(r"\s*[+-]?[0-9]+\s*", value, re.ASCII):
        return "bad" if int(value.strip()) < lo or int(value.strip()) > hi else "any"
    return "any" if any(c.isdigit() for c in value) else "bad"


def id_verdict(value):
    if value == "":
        return "empty"
    return "ok" if is_id(value) else "invalid"


def paging(query, default_limit):
    """(verdicts of limit/offset, limit, offset) from a parsed query."""
    verdicts, limit, offset = [], default_limit, 0
    if "limit" in query:
        verdicts.append(int_verdict(query["limit"], 1, 1000))
        if verdicts[-1] == "ok":
            limit = int(query["limit"])
    if "offset" in query:
        verdicts.append(int_verdict(query["offset"], 0, 10**9))
        if verdicts[-1] == "ok":
            offset = int(query["offset"])
    return verdicts, limit, offset


def expect_query(answer, verdicts):
    """A query with a sure-bad value is a 400; one with only sure-good values is not."""
    if "bad" in verdicts:
        assert answer.status == 400, answer
    elif all(v == "ok" for v in verdicts):
        assert answer.status == 200, answer


# ---------------------------------------------------------------- the model's predictions


def body_status(body, statuses_after):
    """The status a body forces (415, 400) or, if it is acceptable, the statuses the route gives."""
    if body.verdict == "415":
        return {415}
    if body.verdict == "json":
        return {400}
    if body.verdict == "bad":
        return {400}
    if body.verdict == "any":
        return {400} | statuses_after
    return statuses_after


def check_status(answer, expected, body=None):
    assert answer.status in expected, (answer, expected, body)
    if answer.status == 400 and body is not None and body.verdict == "bad":
        assert "details" in answer.body, (answer, body)
        for name in body.bad:
            assert name in answer.body["details"], (name, answer, body)
    if answer.status == 400 and body is not None and body.verdict == "json":
        assert "details" not in answer.body, answer


def owner_status(owner, caller):
    """Session ownership: a caller naming another agent is refused; an operator is not."""
    return 403 if caller is not None and caller != owner else 200


SESSION_SCHEMA = {
    "agentId": ("id", True), "triggerType": ("text", True, 1, 256), "taskId": ("id", False),
    "inboxMessageId": ("id", False), "runnerSessionId": ("id", False), "runtimeInstanceId": ("id", False),
    "taskDescription": ("text", False, 0, 4096),
}
PROVIDER_SCHEMA = {"providerSessionId": ("id", True)}
CLEANUP_SCHEMA = {"agentId": ("id", False), "maxAgeMinutes": ("int", False, 1, 525600)}
RECOVER_SCHEMA = {"agentId": ("id", True), "minAgeSeconds": ("int", False, 1, 31536000)}
TASK_SCHEMA = {"task": ("text", True, 1, 65536), "agentId": ("id", False), "priority": ("int", False, 0, 100)}
PROGRESS_SCHEMA = {"progress": ("text", True, 1, 65536)}
TASK_SESSION_SCHEMA = {"claudeSessionId": ("id", True)}
FINISH_SCHEMA = {"status": ("enum", True, ("completed", "failed")), "output": ("text", False, 0, 65536),
                 "failureReason": ("text", False, 0, 65536)}

SESSION_ROUTES = ("list", "list", "get", "history", "create", "create", "create", "delete", "delete_by_task",
                  "heartbeat", "provider", "provider", "cleanup", "recover", "health")


# ---------------------------------------------------------------- the session routes


def _session_setup(wire, draw):
    """Sometimes register a session first, so routes meet both known and unknown rows."""
    if draw(st.sampled_from((True, True, False))):
        body = {"agentId": draw(st.sampled_from(AGENTS)), "triggerType": "task_assigned",
                "taskId": draw(st.sampled_from(TASK_IDS + (None,)))}
        answer = wire.send("POST", "/api/active-sessions", headers=AUTH, body=encode(body, True))
        assert answer.status in (201, 409), answer


@settings(FUZZ, max_examples=400)
@given(data=st.data())
def test_fuzz_session_routes(wire, data):
    """The 8 active-session routes, GET {id}, history and /health, with generated requests."""
    draw = data.draw
    wire.trim()
    route = draw(st.sampled_from(SESSION_ROUTES), label="route")
    _session_setup(wire, draw)
    before = wire.state()
    if route == "history":
        before["history"] = wire.history()
    sessions = before["sessions"]
    auth_headers, authorised = draw(auth(), label="auth")
    trailing = draw(st.sampled_from(("",) * 7 + ("/",)))
    body = Body(None)
    query, parsed = "", {}
    agent_choice = draw(AGENT_CHOICES, label="X-Agent-ID")
    method, target_id = "GET", None

    if route == "health":
        method, path = draw(st.sampled_from(("GET", "HEAD"))), "/health"
    elif route in ("list", "history"):
        method = draw(st.sampled_from(("GET",) * 5 + ("HEAD",)))
        keys = {"agentId": st.sampled_from(AGENTS + ("",)) | valid_id | bad_id_text,
                "limit": query_int(1, 1000), "offset": query_int(0, 10**9),
                # Filters the README adds beyond the contract: only robustness is checked for them.
                "taskId": st.sampled_from(TASK_IDS + ("",)) | valid_id | bad_id_text}
        if route == "list":
            keys["runtimeInstanceId"] = valid_id | bad_id_text
            keys["triggerType"] = plain_text | st.just("a\x00b")
        query, parsed = draw(queries(keys), label="query")
        path = "/api/active-sessions" + ("/history" if route == "history" else "")
    elif route == "get":
        method = draw(st.sampled_from(("GET", "GET", "HEAD")))
        target_id = resolve(draw(path_ids(), label="id"), [s["id"] for s in sessions[::-1]])
        path = f"/api/active-sessions/{segment(target_id)}"
    elif route == "create":
        method, path = "POST", "/api/active-sessions"
        body = with_foreign_type(draw(bodies(SESSION_SCHEMA), label="body"), draw)
    elif route in ("delete", "delete_by_task", "heartbeat", "provider"):
        known = [s["id"] if route == "delete" else s["taskId"] for s in sessions[::-1]]
        target_id = resolve(draw(path_ids(), label="id"), known)
        prefix = {"delete": "", "delete_by_task": "by-task/", "heartbeat": "heartbeat/",
                  "provider": "provider-session/"}[route]
        method = "DELETE" if route.startswith("delete") else "PUT"
        path = f"/api/active-sessions/{prefix}{segment(target_id)}"
        body = with_foreign_type(draw(bodies(PROVIDER_SCHEMA if route == "provider" else {}), label="body"), draw)
    elif route == "cleanup":
        method, path = "POST", "/api/active-sessions/cleanup"
        body = with_foreign_type(draw(bodies(CLEANUP_SCHEMA), label="body"), draw)
    else:
        method, path = "POST", "/api/active-sessions/recover-orphaned-tasks"
        body = with_foreign_type(draw(bodies(RECOVER_SCHEMA), label="body"), draw)

    owner = body.fields.get("agentId") if route in ("cleanup", "recover") else None
    if route in ("delete", "delete_by_task", "heartbeat", "provider"):
        key = "id" if route == "delete" else "taskId"
        owner = next((s["agentId"] for s in sessions if s[key] == target_id), None)
    agent_h, caller = agent_header(agent_choice, owner)
    headers = auth_headers + agent_h
    answer = wire.send(method, path + trailing, query, headers, body.raw, body.content_type)
    event(f"{route} -> {answer.status}")
    after = wire.state()

    if route == "health":
        assert answer.status == 200 and answer.endpoint == "health"
        return
    if not authorised:
        assert answer.status == 401 or target_id is not None and not routable(target_id), answer
        assert unchanged(before, after)
        return
    if answer.status >= 400 or method in ("GET", "HEAD"):
        assert unchanged(before, after), ("a refused or read-only request changed state", answer)
    if target_id is not None and not routable(target_id):
        return  # the id left its segment: any route may answer, shapes were checked
    if target_id is not None:
        target_id = delivered(target_id)
    endpoint = {"list": "sessions.list_sessions", "history": "sessions.list_history",
                "get": "sessions.get_session", "create": "sessions.create_session",
                "delete": "sessions.delete_session", "delete_by_task": "sessions.delete_session_by_task",
                "heartbeat": "sessions.heartbeat", "provider": "sessions.set_provider_session",
                "cleanup": "sessions.cleanup_sessions",
                "recover": "sessions.recover_orphaned_tasks"}[route]
    if route == "get" and target_id == "history":
        endpoint = "sessions.list_history"  # the literal segment wins for GET
    assert answer.endpoint == endpoint, (answer, endpoint)

    if route in ("list", "history"):
        _check_session_listing(route, answer, parsed, before)
    elif route == "get":
        found = [s for s in sessions if s["id"] == target_id]
        if target_id == "history":
            assert answer.status == 200
        elif found:
            assert answer.status == 200 and (method == "HEAD" or answer.body == {"session": found[0]}), answer
        else:
            assert answer.status == 404, answer
    elif route == "create":
        task_id = body.fields.get("taskId")
        holder = [s for s in sessions if task_id is not None and s["taskId"] == task_id]
        check_status(answer, body_status(body, {409} if holder else {201}), body)
        if answer.status == 409:
            assert answer.body["session"] == holder[0]
        if answer.status == 201:
            made = answer.body["session"]
            for name in SESSION_KEYS - {"id", "providerSessionId", "startedAt", "lastHeartbeatAt"}:
                assert made[name] == body.fields.get(name), (name, made, body)
            assert made["providerSessionId"] is None and made["startedAt"] == made["lastHeartbeatAt"]
            assert made["id"] not in {s["id"] for s in sessions} and made["startedAt"] >= max(
                [s["startedAt"] for s in sessions], default="")
            assert made in after["sessions"] and len(after["sessions"]) == len(sessions) + 1
    elif route in ("delete", "delete_by_task", "heartbeat", "provider"):
        key = "id" if route == "delete" else "taskId"
        found = [s for s in sessions if s[key] == target_id]
        status = owner_status(found[0]["agentId"], caller) if found else 200
        check_status(answer, body_status(body, {status}), body)
        if answer.status == 200:
            result = answer.body["deleted" if route.startswith("delete") else "updated"]
            assert result is bool(found), (answer, found)
            if not found:
                assert unchanged(before, after)
            elif route.startswith("delete"):
                assert found[0]["id"] not in {s["id"] for s in after["sessions"]}
                assert len(after["sessions"]) == len(sessions) - 1
                assert after["counts"][0] == before["counts"][0] + 1
                assert {**found[0], "endedAt": ANY, "endReason": ANY} in wire.history()
            else:
                (now,) = [s for s in after["sessions"] if s["id"] == found[0]["id"]]
                assert now["lastHeartbeatAt"] >= found[0]["lastHeartbeatAt"]
                changed = {"providerSessionId", "lastHeartbeatAt"} if route == "provider" else {"lastHeartbeatAt"}
                assert {k: v for k, v in now.items() if k not in changed} == {
                    k: v for k, v in found[0].items() if k not in changed}
                if route == "provider":
                    assert now["providerSessionId"] == body.fields["providerSessionId"]
                    assert now["lastHeartbeatAt"] == found[0]["lastHeartbeatAt"]
    elif route == "cleanup":
        agent = body.fields.get("agentId")
        status = owner_status(agent, caller) if agent is not None else 200
        check_status(answer, body_status(body, {status}), body)
        if answer.status == 200:
            mine = [s for s in sessions if agent is None or s["agentId"] == agent]
            if agent is not None and "maxAgeMinutes" not in body.fields:
                assert answer.body["cleaned"] == len(mine), (answer, mine)
                assert not [s for s in after["sessions"] if s["agentId"] == agent]
            else:
                assert answer.body["cleaned"] <= len(mine)
                if "maxAgeMinutes" not in body.fields:  # default 30 minutes: every session here is newer
                    assert answer.body["cleaned"] == 0
            assert len(after["sessions"]) == len(sessions) - answer.body["cleaned"]
    elif route == "recover":
        agent = body.fields.get("agentId")
        check_status(answer, body_status(body, {200 if caller == agent else 403}), body)
        if answer.status == 403:
            assert answer.body == {"error": "Can only recover orphaned tasks for the calling agent"}
        if answer.status == 200:
            assert all(t["agentId"] == agent for t in answer.body["tasks"])


def _check_session_listing(route, answer, parsed, before):
    """The list and history answers: filters, order and paging, against the snapshot."""
    if parsed is None:
        return
    verdicts, limit, offset = paging(parsed, 1000 if route == "list" else 100)
    paging_verdicts = list(verdicts)
    rows = before["sessions"] if route == "list" else before["history"]  # history: read before the request
    for key in ("agentId", "taskId"):
        if key in parsed:
            verdict = id_verdict(parsed[key])
            if verdict == "ok":
                rows = [r for r in rows if r[key] == parsed[key]]
            elif verdict == "invalid":
                rows = []
                verdicts.append("any")  # a filter no id can match: 400, or nothing found
    if route == "list" and (parsed.get("runtimeInstanceId") or parsed.get("triggerType")):
        verdicts.append("any")
    expect_query(answer, verdicts)
    if answer.status != 200 or answer.body is None:
        return
    if route == "list" and (parsed.get("taskId") or parsed.get("runtimeInstanceId") or parsed.get("triggerType")):
        return  # filters beyond the contract: their results are the README's business
    if route == "list":
        ordered = sorted(rows, key=lambda s: s["id"])
        ordered.sort(key=lambda s: s["startedAt"], reverse=True)
        assert rows == ordered, "sessions are newest startedAt first, ties by id"
        if not any(key in parsed for key in ("limit", "offset")):
            assert "total" not in answer.body and answer.body["sessions"] == rows, answer
            return
        if paging_verdicts and all(v == "ok" for v in paging_verdicts):
            assert answer.body.get("total") == len(rows), answer
    elif "total" in answer.body:
        assert answer.body["total"] == len(rows), answer
    if all(v == "ok" for v in paging_verdicts):
        assert answer.body["sessions"] == rows[offset:offset + limit], (answer, parsed)


# ---------------------------------------------------------------- the task routes

TASK_ROUTES = ("create", "create", "list", "list", "get", "start", "start", "progress", "session", "finish",
               "finish", "cancel")
SETUPS = ("unassigned", "none", "pending", "in_progress", "paused", "in_progress_no_agent", "completed",
          "failed", "cancelled", "orphan", "orphan", "orphan_with_session")


def _task_setup(wire, draw):
    """Create one task in a drawn state (via the API where it can, else the database); return it."""
    kind = draw(st.sampled_from(SETUPS), label="setup")
    if kind == "none":
        return None
    owner = None if kind in ("unassigned", "in_progress_no_agent") else draw(st.sampled_from(AGENTS))
    body = {"task": "fuzz", **({"agentId": owner} if owner else {})}
    answer = wire.send("POST", "/api/tasks", headers=AUTH, body=encode(body, True))
    assert answer.status == 201, answer
    task_id = answer.body["id"]
    as_owner = AUTH + (("X-Agent-ID", _agent_header(owner or "x")),)
    if kind in ("in_progress", "completed", "failed", "orphan", "orphan_with_session"):
        assert wire.send("POST", f"/api/tasks/{segment(task_id)}/start", headers=as_owner).status == 200
    if kind in ("completed", "failed"):
        done = wire.send("POST", f"/api/tasks/{segment(task_id)}/finish", headers=as_owner,
                         body=encode({"status": kind}, True))
        assert done.status == 200, done
    if kind == "cancelled":
        assert wire.send("POST", f"/api/tasks/{segment(task_id)}/cancel", headers=AUTH).status == 200
    if kind == "paused":
        set_task(wire.app, task_id, status="paused")
    if kind == "in_progress_no_agent":
        set_task(wire.app, task_id, status="in_progress")
    if kind.startswith("orphan"):
        set_task(wire.app, task_id, created_at="2020-01-01T00:00:00.000Z", last_updated_at="2020-01-01T00:00:00.000Z")
    if kind == "orphan_with_session":  # a registered session protects its task from recovery
        held = wire.send("POST", "/api/active-sessions", headers=AUTH,
                         body=encode({"agentId": owner, "triggerType": "task_resumed", "taskId": task_id}, True))
        assert held.status == 201, held
    return task_id


@settings(FUZZ, max_examples=400)
@given(data=st.data())
def test_fuzz_task_routes(wire, data):
    """The 8 task routes, plus orphan recovery against tasks in every state."""
    draw = data.draw
    wire.trim()
    task_id = _task_setup(wire, draw)
    before = wire.state()
    tasks = {t["id"]: t for t in before["tasks"]}
    route = draw(st.sampled_from(TASK_ROUTES + ("recover",)), label="route")
    auth_headers, authorised = draw(auth(), label="auth")
    trailing = draw(st.sampled_from(("",) * 7 + ("/",)))
    agent_choice = draw(AGENT_CHOICES, label="X-Agent-ID")
    owner = tasks[task_id]["agentId"] if task_id else None
    body, query, parsed, target = Body(None), "", {}, None
    method = "POST"

    if route == "create":
        path = "/api/tasks"
        body = with_foreign_type(draw(bodies(TASK_SCHEMA), label="body"), draw)
    elif route == "list":
        method, path = draw(st.sampled_from(("GET",) * 5 + ("HEAD",))), "/api/tasks"
        statuses = st.one_of(st.sampled_from(STATUSES), st.lists(st.sampled_from(STATUSES), min_size=1, max_size=3)
                             .map(",".join), st.sampled_from(("", "done", "PENDING", "pending,done", ",", "pending,",
                                                              " pending", "pending, failed")), plain_text)
        keys = {"agentId": st.sampled_from(AGENTS + ("",)) | valid_id | bad_id_text,
                "status": statuses, "limit": query_int(1, 1000), "offset": query_int(0, 10**9)}
        query, parsed = draw(queries(keys), label="query")
    elif route == "recover":
        path = "/api/active-sessions/recover-orphaned-tasks"
        body = with_foreign_type(draw(bodies(RECOVER_SCHEMA), label="body"), draw)
        if draw(st.booleans(), label="recover for the task's agent") and owner:
            body = Body(encode({"agentId": owner, "minAgeSeconds": 60}, True), None, "ok",
                        {"agentId": owner, "minAgeSeconds": 60})
            agent_choice = ("owner", None)
        else:
            owner = body.fields.get("agentId")
    else:
        target = resolve(draw(path_ids(), label="id"), [task_id] + list(tasks)[::-1])
        owner = tasks[target]["agentId"] if target in tasks else None
        if route == "get":
            method = draw(st.sampled_from(("GET", "GET", "HEAD")))
            path = f"/api/tasks/{segment(target)}"
        else:
            method = "PUT" if route == "session" else "POST"
            path = f"/api/tasks/{segment(target)}/{route}"
            schema = {"progress": PROGRESS_SCHEMA, "session": TASK_SESSION_SCHEMA, "finish": FINISH_SCHEMA}
            body = with_foreign_type(draw(bodies(schema.get(route, {})), label="body"), draw)

    agent_h, caller = agent_header(agent_choice, owner)
    sent_at = datetime.now(timezone.utc)
    answer = wire.send(method, path + trailing, query, auth_headers + agent_h, body.raw, body.content_type)
    event(f"{route} -> {answer.status}")
    answered_at = datetime.now(timezone.utc)
    after = wire.state()
    if not authorised:
        assert answer.status == 401 or target is not None and not routable(target), answer
        assert unchanged(before, after)
        return
    if answer.status >= 400 or method in ("GET", "HEAD"):
        assert unchanged(before, after), ("a refused or read-only request changed state", answer)
    if target is not None and not routable(target):
        return
    endpoint = {"create": "tasks.create_task", "list": "tasks.list_tasks", "get": "tasks.get_task",
                "start": "tasks.start_task", "progress": "tasks.report_progress",
                "session": "tasks.set_task_session", "finish": "tasks.finish_task", "cancel": "tasks.cancel_task",
                "recover": "sessions.recover_orphaned_tasks"}[route]
    assert answer.endpoint == endpoint, (answer, endpoint)

    if route == "create":
        check_status(answer, body_status(body, {201}), body)
        if answer.status == 201:
            made = answer.body
            assert made["task"] == body.fields["task"] and made["agentId"] == body.fields.get("agentId")
            assert made["priority"] == body.fields.get("priority", 50)
            assert made["status"] == ("pending" if made["agentId"] is not None else "unassigned")
            assert made["createdAt"] == made["lastUpdatedAt"] and made["id"] not in tasks
            assert made["progress"] is made["output"] is made["failureReason"] is made["claudeSessionId"] is None
            assert after["tasks"] == before["tasks"] + [made]
        return
    if route == "list":
        _check_task_listing(answer, parsed, before)
        return
    if route == "recover":
        agent = body.fields.get("agentId")
        check_status(answer, body_status(body, {200 if caller == agent else 403}), body)
        if answer.status == 200:
            age = timedelta(seconds=body.fields.get("minAgeSeconds", 60))
            held = {s["taskId"] for s in before["sessions"]}
            candidates = [t for t in before["tasks"] if t["agentId"] == agent and t["status"] == "in_progress"
                          and t["claudeSessionId"] is None and t["finishedAt"] is None and t["id"] not in held]
            must = {t["id"] for t in candidates if t["lastUpdatedAt"] < stamp(sent_at - age)}
            may = {t["id"]: t for t in candidates if t["lastUpdatedAt"] < stamp(answered_at - age)}
            got = answer.body["tasks"]
            assert must <= {t["id"] for t in got} <= set(may), (answer, must, may)
            for new in got:
                old = may[new["id"]]
                assert new == {**old, "status": "pending", "lastUpdatedAt": new["lastUpdatedAt"]}
                assert new["lastUpdatedAt"] > old["lastUpdatedAt"]
                assert new in after["tasks"]
            assert after["counts"][1] == before["counts"][1] + len(got)
            if not got:
                assert unchanged(before, after)
        return

    target = delivered(target)
    task = tasks.get(target)
    if task is None:
        assert answer.status == 404 and answer.body in (None, {"error": "Task not found"}), answer
        return
    if route == "get":
        assert answer.status == 200, answer
        if answer.body is not None:
            assert {k: v for k, v in answer.body.items() if k != "logs"} == task
        return
    terminal = task["status"] in TERMINAL
    other = task["agentId"] is not None and caller is not None and caller != task["agentId"]
    if route == "start":
        if caller is None:
            then = {400}
        elif terminal:
            then = {409} | ({400} if caller is NOT_AN_ID else set())
        elif caller is NOT_AN_ID:
            then = {400, 409}
        elif task["status"] == "unassigned" or task["agentId"] == caller:
            then = {200}
        elif task["agentId"] is None:
            then = {200, 409}  # in progress without an agent: the contract does not say
        else:
            then = {409}
    elif route == "finish":
        if caller is None:
            then = {400}
        elif caller is NOT_AN_ID:
            then = {400, 403}
        elif caller != task["agentId"]:
            then = {403}
        else:
            then = {409} if terminal else {200}
    elif route == "session":
        then = {403} if other else {200}
    else:  # progress, cancel
        then = {403} if other else {409} if terminal else {200}
    check_status(answer, body_status(body, then), body)
    if answer.status != 200:
        return
    (now,) = [t for t in after["tasks"] if t["id"] == target]
    assert now["lastUpdatedAt"] >= task["lastUpdatedAt"]
    # Every status change writes one log entry, and nothing else does.
    assert after["counts"][1] == before["counts"][1] + (now["status"] != task["status"])
    if route == "start":
        assert answer.body == now and now["status"] == "in_progress" and now["agentId"] == caller
        if task["status"] == "in_progress":
            assert now == task, "starting one's own running task again is a no-op"
    elif route == "progress":
        assert now["status"] == "in_progress" and now["progress"] == body.fields["progress"]
    elif route == "session":
        assert answer.body == now and now["claudeSessionId"] == body.fields["claudeSessionId"]
        assert now["status"] == task["status"]
    elif route == "finish":
        assert answer.body["task"] == now and now["status"] == body.fields["status"]
        for key in ("output", "failureReason"):
            assert now[key] == body.fields.get(key, task[key])
    else:
        assert answer.body == now and now["status"] == "cancelled"


def _check_task_listing(answer, parsed, before):
    """GET /api/tasks: filters, order and paging, against the snapshot."""
    if parsed is None:
        return
    verdicts, limit, offset = paging(parsed, 100)
    exact = all(v == "ok" for v in verdicts)
    rows = before["tasks"]
    if "agentId" in parsed:
        verdict = id_verdict(parsed["agentId"])
        if verdict == "ok":
            rows = [t for t in rows if t["agentId"] == parsed["agentId"]]
        elif verdict == "invalid":
            rows = []
            verdicts.append("any")
    if parsed.get("status", "") != "":
        parts = parsed["status"].split(",")
        if all(p in STATUSES for p in parts):
            rows = [t for t in rows if t["status"] in parts]
        elif any(p.strip() and p.strip() not in STATUSES for p in parts):
            verdicts.append("bad")  # unknown status: 400
        else:
            verdicts.append("any")  # "pending," or " pending": the contract leaves it open
            rows = None
    expect_query(answer, verdicts)
    if answer.status == 200 and answer.body is not None and rows is not None:
        assert rows == sorted(rows, key=lambda t: (t["createdAt"], t["id"])), "oldest first, then id"
        assert answer.body["total"] == len(rows), (answer, parsed)
        if exact:
            assert answer.body["tasks"] == rows[offset:offset + limit], (answer, parsed)


# ---------------------------------------------------------------- any method, any path, any headers

TEMPLATES = ("/health", "/api/active-sessions", "/api/active-sessions/{}", "/api/active-sessions/history",
             "/api/active-sessions/by-task/{}", "/api/active-sessions/heartbeat/{}",
             "/api/active-sessions/provider-session/{}", "/api/active-sessions/cleanup",
             "/api/active-sessions/recover-orphaned-tasks", "/api/tasks", "/api/tasks/{}", "/api/tasks/{}/start",
             "/api/tasks/{}/progress", "/api/tasks/{}/session", "/api/tasks/{}/finish", "/api/tasks/{}/cancel",
             "/api/active-sessions/by-task", "/api/active-sessions/heartbeat", "/api/tasks/{}/{}", "/", "/api",
             "/api/{}", "/static/{}", "/api/active-sessions/{}/{}", "//api/tasks", "/api//tasks", "/{}")
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE")
# For each literal path: the methods the contract defines there. Under /api/active-sessions/ a
# method a literal segment does not define falls through to the {id} route (GET, HEAD, DELETE).
BY_ID = {"GET", "HEAD", "DELETE"}
DEFINED = {
    "/health": {"GET", "HEAD"}, "/api/active-sessions": {"GET", "HEAD", "POST"},
    "/api/active-sessions/history": BY_ID, "/api/active-sessions/cleanup": BY_ID | {"POST"},
    "/api/active-sessions/recover-orphaned-tasks": BY_ID | {"POST"}, "/api/active-sessions/by-task": BY_ID,
    "/api/active-sessions/heartbeat": BY_ID, "/api/tasks": {"GET", "HEAD", "POST"},
}


@settings(FUZZ, max_examples=250)
@given(data=st.data())
def test_fuzz_any_method_path_and_headers(wire, data):
    """Arbitrary method, path, headers and body: always JSON, the right shape, never a 5xx."""
    draw = data.draw
    wire.trim()
    before = wire.state()
    template = draw(st.sampled_from(TEMPLATES), label="template")
    raw_segments = draw(st.booleans(), label="raw segments")
    parts = []
    for _ in range(template.count("{}")):
        value = resolve(draw(path_ids(), label="segment"), ["agent-1", "task-1"])
        raw = raw_segments and not set(value) & set("?#") and value == delivered(value)
        parts.append(value if raw else segment(value))
    path = template.format(*parts) + ("/" if draw(st.integers(0, 5)) == 0 else "")
    method = draw(st.sampled_from(METHODS), label="method")
    auth_headers, authorised = draw(auth(), label="auth")
    agent_h, _ = agent_header(draw(AGENT_CHOICES, label="X-Agent-ID"), None)
    extra = draw(st.lists(st.tuples(st.sampled_from(("Accept", "X-Forwarded-For", "Origin",
                                                     "Content-Encoding", "Transfer-Encoding-Junk", "Cookie")),
                                    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)),
                          max_size=2), label="headers")
    body = draw(bodies(draw(st.sampled_from((SESSION_SCHEMA, TASK_SCHEMA, CLEANUP_SCHEMA, {})))), label="body")
    key_in_query = draw(st.sampled_from(("", f"api_key={KEY}", f"key={KEY}", f"token={KEY}", "access_token=x")))
    headers = auth_headers + agent_h + tuple(extra)
    answer = wire.send(method, path, key_in_query, headers, body.raw, body.content_type)
    event(f"{method} -> {answer.status}")
    after = wire.state()
    if answer.status >= 400 or method in ("GET", "HEAD", "OPTIONS"):
        assert unchanged(before, after), ("a refused or read-only request changed state", answer)
    literal = path[:-1] if len(path) > 1 and path.endswith("/") else path  # one trailing slash is ignored
    if literal == "/health" and method in ("GET", "HEAD"):
        assert answer.status == 200, answer
    elif method == "OPTIONS":
        assert answer.status in (200, 404), answer
    elif not authorised:
        # Unknown routes and methods may be told apart before or after the key check.
        assert answer.status in (401, 404, 405), answer
        if literal in DEFINED and method in DEFINED[literal]:
            assert answer.status == 401, answer
    elif literal in DEFINED and method not in DEFINED[literal]:
        assert answer.status == 405 and set(answer.headers["Allow"].replace(" ", "").split(",")) >= DEFINED[literal]
    if method == "TRACE" or method == "PATCH":
        assert answer.status in (401, 404, 405), answer


# ---------------------------------------------------------------- raw bodies on every body-reading route

BODY_ROUTES = (("POST", "/api/active-sessions"), ("DELETE", "/api/active-sessions/{s}"),
               ("DELETE", "/api/active-sessions/by-task/{t}"), ("PUT", "/api/active-sessions/heartbeat/{t}"),
               ("PUT", "/api/active-sessions/provider-session/{t}"), ("POST", "/api/active-sessions/cleanup"),
               ("POST", "/api/active-sessions/recover-orphaned-tasks"), ("POST", "/api/tasks"),
               ("POST", "/api/tasks/{k}/start"), ("POST", "/api/tasks/{k}/progress"), ("PUT", "/api/tasks/{k}/session"),
               ("POST", "/api/tasks/{k}/finish"), ("POST", "/api/tasks/{k}/cancel"))
PAYLOADS = st.one_of(
    st.sampled_from((b"{", b"[1,", b"\xff", b"\x00", b"null", b"[]", b"\"s\"", b"1", b"true", b'{"a":NaN}',
                     b'{"a":Infinity}', b'{"a":"\\ud800"}', b'{"a":"\xed\xa0\x80"}', b"\xef\xbb\xbf{}", b" {} ",
                     b"{}", b'{"a":1,"a":2}', b"[" * 100000 + b"]" * 100000, b"{\"a\":" * 33 + b"1" + b"}" * 33,
                     b"{\"a\":" * 31 + b"1" + b"}" * 31, b"x" * (1024 * 1024 + 1),
                     b'{"pad": "' + b"x" * (1024 * 1024) + b'"}')),
    st.binary(max_size=64),
    st.builds(lambda v: json.dumps(v).encode(), json_value),
)


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_fuzz_raw_bodies_and_content_types(wire, data):
    """Malformed, huge, deep and mistyped bodies on every route that reads one, against a real row."""
    draw = data.draw
    wire.trim()
    created = wire.send("POST", "/api/active-sessions", headers=AUTH, body=encode(
        {"agentId": "agent-1", "triggerType": "t", "taskId": str(uuid.uuid4())}, True))
    task = wire.send("POST", "/api/tasks", headers=AUTH, body=encode({"task": "t", "agentId": "agent-1"}, True))
    assert created.status == 201 and task.status == 201
    session = created.body["session"]
    before = wire.state()
    method, template = draw(st.sampled_from(BODY_ROUTES), label="route")
    path = template.format(s=segment(session["id"]), t=segment(session["taskId"]), k=segment(task.body["id"]))
    raw = draw(PAYLOADS, label="payload")
    content_type = draw(st.sampled_from(JSON_TYPES + OTHER_TYPES), label="content type")
    agent = (("X-Agent-ID", "agent-1"),) if draw(st.booleans()) else ()
    answer = wire.send(method, path, "", AUTH + agent, raw, content_type)
    event(f"{method} -> {answer.status}")
    after = wire.state()
    if answer.status >= 400:
        assert unchanged(before, after), ("a refused request changed state", answer)
    is_json = content_type is None or content_type.split(";")[0].strip().lower() in (
        "application/json", "application/vnd.api+json", "application/merge-patch+json")
    if len(raw) > 1024 * 1024:
        assert answer.status in ((413,) if is_json else (413, 415)), answer
    elif raw and not is_json:
        assert answer.status == 415, answer
    elif raw and not raw.startswith(b"\xef\xbb\xbf"):  # a BOM: the contract leaves it open
        try:
            value = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            value = None  # not JSON
        if not isinstance(value, dict) or json_broken(value):
            assert answer.status == 400 and "details" not in answer.body, answer


# ---------------------------------------------------------------- regressions found by fuzzing


@pytest.mark.parametrize("method, path", [
    ("GET", "/api//tasks"), ("POST", "/api//active-sessions"), ("POST", "/api/tasks//start"),
    ("DELETE", "/api/active-sessions//x"), ("PUT", "/api/active-sessions/heartbeat//t"), ("GET", "//health"),
])
def test_double_slash_is_no_route_not_an_html_redirect(wire, method, path):
    """Found by fuzzing: Werkzeug merged "//" with an HTML 308 to another resource (e.g. task "start")."""
    answer = wire.send(method, path, headers=AUTH)
    assert answer.status == 404 and answer.body == {"error": "Not Found"}
