"""Concurrency against a real gunicorn with several workers, on SQLite and PostgreSQL."""

import http.client
import json
import random
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import requests

from server import Server, assert_clean_log, reset_postgres, run_threads

pytestmark = pytest.mark.slow

KEY = "concurrency-test-key-0123456789"
SESSIONS = "/api/active-sessions"


class Backend:
    """A database for gunicorn tests: its URL and how to put it back to 'never used'."""

    def __init__(self, name, url, sqlite_path=None):
        self.name, self.url, self.sqlite_path = name, url, sqlite_path
        self.reset()

    def reset(self):
        """Delete the database: remove the SQLite files, or drop and recreate the PG schema."""
        if self.sqlite_path is None:
            reset_postgres(self.url)
            return
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(str(self.sqlite_path) + suffix).unlink(missing_ok=True)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request, tmp_path):
    """An empty database per test: a temporary SQLite file, or the run's PostgreSQL database."""
    if request.param == "sqlite":
        path = tmp_path / "service.db"
        yield Backend("sqlite", f"sqlite:///{path}", sqlite_path=path)
        return
    backend = Backend("postgresql", request.getfixturevalue("pg_url"))
    yield backend
    backend.reset()


# --- a. simultaneous creates for one taskId ---------------------------------------------------


def test_simultaneous_creates_for_one_task(backend, tmp_path):
    """20 creates released together for one taskId: one 201, nineteen 409s naming that session."""
    count = 20
    with Server(tmp_path, backend.url, key=KEY, workers=4) as srv:
        for round_ in range(3):
            task_id = f"contested-{round_}-{uuid.uuid4()}"
            barrier = threading.Barrier(count)

            def create(i):
                conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
                try:
                    conn.connect()  # every thread holds its own open connection before the release
                    body = json.dumps({"agentId": f"agent-{i}", "taskId": task_id, "triggerType": "task_assigned"})
                    headers = {**srv.headers(), "Content-Type": "application/json"}
                    barrier.wait(timeout=30)
                    conn.request("POST", SESSIONS, body=body, headers=headers)
                    resp = conn.getresponse()
                    return resp.status, resp.getheader("Content-Type"), resp.read()
                finally:
                    conn.close()

            answers = run_threads(count, create)
            statuses = Counter(status for status, _, _ in answers)
            assert statuses == {201: 1, 409: count - 1}, (statuses, answers)
            assert all(ctype.startswith("application/json") for _, ctype, _ in answers)
            bodies = [(status, json.loads(raw)) for status, _, raw in answers]
            created = next(body["session"] for status, body in bodies if status == 201)
            assert created["taskId"] == task_id
            for status, body in bodies:
                if status == 409:
                    assert set(body) == {"error", "session"}, body
                    assert isinstance(body["error"], str) and body["error"]
                    assert body["session"] == created

            listed = requests.get(srv.url(SESSIONS), headers=srv.headers(), timeout=10)
            assert listed.status_code == 200
            mine = [s for s in listed.json()["sessions"] if s["taskId"] == task_id]
            assert mine == [created]
        assert_clean_log(srv)


# --- b. mixed traffic ---------------------------------------------------------------------------


class Traffic:
    """One thread's HTTP client: its own connection, every answer checked for the shared rules."""

    def __init__(self, srv, failures, agent=None):
        self.srv, self.failures, self.agent = srv, failures, agent
        self.http = requests.Session()
        self.calls = 0

    def call(self, method, path, body=None, agent=None, as_agent=True):
        """Send one request; record a failure for 5xx, a non-JSON answer or 'database is locked'."""
        who = (agent or self.agent) if as_agent else None
        self.calls += 1
        try:
            resp = self.http.request(method, self.srv.url(path), json=body,
                                     headers=self.srv.headers(agent=who), timeout=30)
        except requests.RequestException as exc:
            self.failures.append(f"{method} {path}: {exc!r}")
            return None, None
        text = resp.text
        problem = None
        if resp.status_code >= 500:
            problem = "5xx"
        elif "database is locked" in text.lower():
            problem = "database is locked"
        elif not resp.headers.get("Content-Type", "").startswith("application/json"):
            problem = "not JSON"
        if problem is None:
            try:
                return resp.status_code, resp.json()
            except ValueError:
                problem = "unparsable JSON"
        self.failures.append(f"{problem}: {method} {path} -> {resp.status_code} {text[:300]!r}")
        return resp.status_code, None

    def expect(self, wanted, method, path, body=None, **kw):
        """call(), and record a failure unless the status is one of wanted."""
        status, data = self.call(method, path, body, **kw)
        if status is not None and data is not None and status not in wanted:
            self.failures.append(f"unexpected {status} for {method} {path}: {data}")
            return status, None
        return status, data

    def close(self):
        self.http.close()


SHARED_TASKS = [f"shared-task-{n}" for n in range(4)]


def keeper(t, deadline, record):
    """An agent that never ends a session: everything it creates must still be there at the end.

    It also owns tasks: 'protected' ones get a session before they start (recovery must
    never touch them), 'orphans' are started with no session (recovery may reset them).
    """
    created, protected, orphans, recovered = {}, [], [], Counter()
    for n in range(3):
        status, task = t.expect({201}, "POST", "/api/tasks", {"task": f"protected {n}", "agentId": t.agent})
        if task is None:
            continue
        status, data = t.expect({201}, "POST", SESSIONS,
                                {"agentId": t.agent, "taskId": task["id"], "triggerType": "task_assigned"})
        if data is not None:
            created[data["session"]["id"]] = task["id"]
            protected.append(task["id"])
        t.expect({200}, "POST", f"/api/tasks/{task['id']}/start")
    for n in range(3):
        status, task = t.expect({201}, "POST", "/api/tasks", {"task": f"orphan {n}", "agentId": t.agent})
        if task is not None:
            t.expect({200}, "POST", f"/api/tasks/{task['id']}/start")
            orphans.append(task["id"])
    last_start = time.monotonic()
    n = 0
    while time.monotonic() < deadline and n < 2000:
        n += 1
        task_id = None if n % 5 == 0 else f"{t.agent}-task-{n}"
        status, data = t.expect({201}, "POST", SESSIONS, {
            "agentId": t.agent, "taskId": task_id, "triggerType": "pool_tasks_available",
            "runtimeInstanceId": f"rt-{n % 3}", "taskDescription": "keep me"})
        if data is not None:
            created[data["session"]["id"]] = task_id
        if task_id is not None:
            status, data = t.expect({200}, "PUT", f"{SESSIONS}/heartbeat/{task_id}")
            if data is not None and data != {"updated": True}:
                t.failures.append(f"heartbeat of a live session: {data}")
            status, data = t.expect({200}, "PUT", f"{SESSIONS}/provider-session/{task_id}",
                                    {"providerSessionId": f"prov-{n}"})
            if data is not None and data != {"updated": True}:
                t.failures.append(f"provider-session of a live session: {data}")
        if n % 4 == 0:
            for task_id in recover(t, protected, recovered):
                # Claim it again, so it may be orphaned (and recovered) once more.
                t.expect({200}, "POST", f"/api/tasks/{task_id}/start")
                last_start = time.monotonic()
        if n % 6 == 0:
            t.expect({200}, "GET", f"{SESSIONS}?agentId={t.agent}")
    # However slow the run was: once every orphan's last claim is over a second old, one more
    # recovery must reset them all (checked by the test), and still none of the protected tasks.
    time.sleep(max(0.0, last_start + 1.1 - time.monotonic()))
    recover(t, protected, recovered)
    record.update(kind="keeper", agent=t.agent, live=created, protected=protected, orphans=orphans,
                  recovered=recovered)


def recover(t, protected, recovered):
    """Recover t's orphaned tasks (minAgeSeconds 1); check and count them; return their ids."""
    status, data = t.expect({200}, "POST", f"{SESSIONS}/recover-orphaned-tasks",
                            {"agentId": t.agent, "minAgeSeconds": 1})
    ids = []
    for task in (data or {}).get("tasks", []):
        recovered[task["id"]] += 1
        if task["id"] in protected:
            t.failures.append(f"recovered a task that has a session: {task}")
        elif task["status"] != "pending" or task["agentId"] != t.agent:
            t.failures.append(f"recovered task not pending for its agent: {task}")
        else:
            ids.append(task["id"])
    return ids


def churner(t, deadline, record):
    """An agent that creates and ends its own sessions; it alone knows which are live."""
    live = {}  # session id -> taskId
    n = 0
    while time.monotonic() < deadline and n < 2000:
        n += 1
        task_id = f"{t.agent}-task-{n}"
        status, data = t.expect({201}, "POST", SESSIONS, {"agentId": t.agent, "taskId": task_id,
                                                          "triggerType": "task_assigned"})
        if data is not None:
            live[data["session"]["id"]] = task_id
        step = n % 6
        if step == 1 and live:  # end one by id
            session_id = random.choice(list(live))
            status, data = t.expect({200}, "DELETE", f"{SESSIONS}/{session_id}")
            if data is not None:
                if data != {"deleted": True}:
                    t.failures.append(f"delete of a live session by id: {data}")
                live.pop(session_id)
        elif step == 2 and live:  # end one by task, after a heartbeat
            session_id = random.choice(list(live))
            t.expect({200}, "PUT", f"{SESSIONS}/heartbeat/{live[session_id]}")
            status, data = t.expect({200}, "DELETE", f"{SESSIONS}/by-task/{live[session_id]}")
            if data is not None:
                if data != {"deleted": True}:
                    t.failures.append(f"delete of a live session by task: {data}")
                live.pop(session_id)
        elif step == 3:  # this agent's older sessions: none is a minute old
            status, data = t.expect({200}, "POST", f"{SESSIONS}/cleanup", {"agentId": t.agent, "maxAgeMinutes": 1})
            if data is not None and data != {"cleaned": 0}:
                t.failures.append(f"cleanup of fresh sessions removed some: {data}")
        elif step == 4:  # operator cleanup of stale sessions: none is stale
            t.expect({200}, "POST", f"{SESSIONS}/cleanup", as_agent=False)
        elif step == 5 and n % 12 == 5:  # all of this agent's sessions
            status, data = t.expect({200}, "POST", f"{SESSIONS}/cleanup", {"agentId": t.agent})
            if data is not None:
                if data != {"cleaned": len(live)}:
                    t.failures.append(f"cleanup by agent: {data}, expected {len(live)}")
                live.clear()
        elif step == 0:  # a deleted session is gone for good
            status, data = t.expect({200}, "PUT", f"{SESSIONS}/heartbeat/{t.agent}-task-gone-{n}")
            if data is not None and data != {"updated": False}:
                t.failures.append(f"heartbeat of an unknown task: {data}")
    record.update(kind="churner", agent=t.agent, live=live)


def contender(t, deadline, record):
    """Agents fighting over a few shared taskIds, ending each other's sessions as operators."""
    n = 0
    while time.monotonic() < deadline and n < 2000:
        n += 1
        task_id = random.choice(SHARED_TASKS)
        status, data = t.expect({201, 409}, "POST", SESSIONS,
                                {"agentId": t.agent, "taskId": task_id, "triggerType": "task_resumed"})
        if data is not None and status == 409 and "session" in data and data["session"]["taskId"] != task_id:
            t.failures.append(f"409 names another task's session: {data}")
        if data is not None and "session" in data and n % 3 == 0:
            t.expect({200}, "DELETE", f"{SESSIONS}/{data['session']['id']}", as_agent=False)
        elif n % 3 == 1:
            t.expect({200}, "DELETE", f"{SESSIONS}/by-task/{random.choice(SHARED_TASKS)}", as_agent=False)
        else:
            t.expect({200}, "PUT", f"{SESSIONS}/heartbeat/{random.choice(SHARED_TASKS)}", as_agent=False)
    record.update(kind="contender", agent=t.agent)


def reader(t, deadline, record):
    """Operators and dashboards: lists, task churn, recoveries of agents with nothing to recover."""
    n = 0
    while time.monotonic() < deadline and n < 2000:
        n += 1
        step = n % 5
        if step == 0:
            status, data = t.expect({200}, "GET", SESSIONS, as_agent=False)
            if data is not None and not isinstance(data.get("sessions"), list):
                t.failures.append(f"list without sessions: {data}")
        elif step == 1:
            t.expect({200}, "GET", f"{SESSIONS}?limit=50&offset=0", as_agent=False)
        elif step == 2:
            status, task = t.expect({201}, "POST", "/api/tasks", {"task": "pool work"}, as_agent=False)
            if task is not None:
                t.expect({200}, "POST", f"/api/tasks/{task['id']}/start")
                t.expect({200}, "GET", f"/api/tasks/{task['id']}", as_agent=False)
        elif step == 3:
            t.expect({200}, "POST", f"{SESSIONS}/recover-orphaned-tasks", {"agentId": t.agent})
        else:
            t.expect({200}, "GET", "/api/tasks?status=in_progress,pending&limit=20", as_agent=False)
    record.update(kind="reader", agent=t.agent)


ROLES = (keeper, churner, contender, reader)


def test_mixed_traffic(backend, tmp_path):
    """32 threads of every kind of request for a few seconds: no 5xx, no lock errors, no lost rows."""
    threads, seconds = 32, 6.0
    failures = []
    records = [dict() for _ in range(threads)]
    calls = [0] * threads
    with Server(tmp_path, backend.url, key=KEY, workers=4) as srv:
        deadline = time.monotonic() + seconds
        barrier = threading.Barrier(threads)

        def run(i):
            role = ROLES[i % len(ROLES)]
            t = Traffic(srv, failures, agent=f"{role.__name__}-{i}-{uuid.uuid4().hex[:6]}")
            try:
                barrier.wait(timeout=30)
                role(t, deadline, records[i])
            finally:
                calls[i] = t.calls
                t.close()

        run_threads(threads, run, timeout=seconds + 90)
        assert not failures, f"{len(failures)} failures, first ones:\n" + "\n".join(failures[:20])

        listed = requests.get(srv.url(SESSIONS), headers=srv.headers(), timeout=30)
        assert listed.status_code == 200
        stored = {}
        for session in listed.json()["sessions"]:
            stored.setdefault(session["agentId"], {})[session["id"]] = session["taskId"]
        for record in records:
            if record["kind"] in ("keeper", "churner"):
                # Exactly what the agent created and did not end: nothing lost, nothing extra.
                assert stored.get(record["agent"], {}) == record["live"], record["agent"]
        keepers = [r for r in records if r["kind"] == "keeper"]
        assert all(r["live"] for r in keepers)
        for record in keepers:
            assert record["orphans"] and set(record["recovered"]) == set(record["orphans"]), record
            for task_id, status in [(i, "in_progress") for i in record["protected"]] + [
                    (i, "pending") for i in record["orphans"]]:
                task = requests.get(srv.url(f"/api/tasks/{task_id}"), headers=srv.headers(), timeout=10).json()
                assert task["status"] == status, task
        assert sum(calls) > 300, f"only {sum(calls)} requests in {seconds} s"
        assert_clean_log(srv)


# --- c. cold starts -----------------------------------------------------------------------------


def test_cold_start_serves_first_request(backend, tmp_path):
    """Five starts on a deleted database: each serves its first authenticated create and list."""
    for attempt in range(5):
        backend.reset()
        with Server(tmp_path, backend.url, key=KEY, workers=4, name=f"cold-{attempt}") as srv:
            created = requests.post(srv.url(SESSIONS), headers=srv.headers(), timeout=30, json={
                "agentId": "cold-agent", "taskId": f"cold-{attempt}", "triggerType": "task_assigned"})
            assert created.status_code == 201, (created.text, srv.output())
            listed = requests.get(srv.url(SESSIONS), headers=srv.headers(), timeout=30)
            assert listed.status_code == 200, (listed.text, srv.output())
            assert listed.json()["sessions"] == [created.json()["session"]]
            # Then every worker (a burst spreads over them) sees the same schema and row.
            lists = run_threads(12, lambda i: requests.get(srv.url(SESSIONS), headers=srv.headers(), timeout=30))
            for answer in lists:
                assert answer.status_code == 200, answer.text
                assert answer.json()["sessions"] == [created.json()["session"]]
            # A worker that crashed while booting (and was replaced) would only show here.
            assert_clean_log(srv)


# --- d. generated key ---------------------------------------------------------------------------


def _check_key_works(srv, key, wrong):
    """20 concurrent requests with key succeed (spread over the workers); wrong and query keys get 401."""

    def call(i):
        if i % 2:
            return requests.get(srv.url(SESSIONS), headers=srv.headers(key=key), timeout=30).status_code
        return requests.post(srv.url(SESSIONS), headers=srv.headers(key=key), timeout=30, json={
            "agentId": f"key-agent-{i}", "triggerType": "task_assigned"}).status_code

    assert sorted(run_threads(20, call)) == [200] * 10 + [201] * 10
    for headers, url in (
        ({"Authorization": f"Bearer {wrong}"}, SESSIONS),
        ({}, f"{SESSIONS}?api_key={key}&key={wrong}"),
        ({"Authorization": f"Bearer {key}x"}, SESSIONS),
    ):
        answer = requests.get(srv.url(url), headers=headers, timeout=10)
        assert answer.status_code == 401
        assert answer.json() == {"error": "Unauthorized"}
        assert key not in answer.text and wrong not in answer.text


@pytest.mark.parametrize("workers", [4, 1])
def test_generated_key(tmp_path, workers):
    """No key configured: one is generated, shown once, kept, shared by every worker and restart.

    One worker is its own case: then the master does not import the app, and the key is
    generated by the start-up child and read from the file by the worker.
    """
    database = tmp_path / "service.db"
    instance = tmp_path / "fresh-instance"
    wrong = "wrong-" + uuid.uuid4().hex
    url = f"sqlite:///{database}"
    with Server(tmp_path, url, key=None, instance_path=instance, name="first", workers=workers,
                ACCESS_LOG=1) as srv:
        key_file = instance / "api_key"
        assert key_file.exists()
        assert (key_file.stat().st_mode & 0o777) == 0o600
        key = key_file.read_text().strip()
        assert len(key) >= 32
        _check_key_works(srv, key, wrong)
        first_log = assert_clean_log(srv)
    assert first_log.count(key) == 1, first_log
    assert wrong not in first_log
    assert '"GET /api/active-sessions"' in first_log  # the access log really was on

    with Server(tmp_path, url, key=None, instance_path=instance, name="second", workers=workers,
                ACCESS_LOG=1) as srv:
        _check_key_works(srv, key, wrong)
        second_log = assert_clean_log(srv)
    assert key_file.read_text().strip() == key
    assert key not in second_log, second_log
    assert wrong not in second_log
    assert "Generated" not in second_log
    assert '"POST /api/active-sessions"' in second_log
