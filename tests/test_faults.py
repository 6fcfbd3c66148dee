"""Faults against a real gunicorn: a 60 s storm, kill -9 of a worker and of the whole server,
and the races the contract settles (recover vs register, cleanup vs heartbeat, heartbeat vs delete).

Every request goes to 127.0.0.1 and is bounded by a timeout; every loop by a count and a deadline.
Figures (req/s, restart time, outcome counts) are printed: run with -s to see them.
"""

import http.client
import json
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timezone

import pytest
from sqlalchemy import create_engine, text

from server import Server, assert_clean_log, reset_postgres, run_threads

pytestmark = pytest.mark.slow

KEY = "faults-test-key-0123456789"
SESSIONS = "/api/active-sessions"
# The issue asks for 60 s; STORM_SECONDS may shorten it for a local run, never by default.
STORM_SECONDS = float(os.environ.get("STORM_SECONDS") or 60)
STORM_CLIENTS = 64
LIVE_CAP = 25  # a storm client ends sessions instead of creating more beyond this many
# The one error line gunicorn writes when a worker is killed -9; the kill test expects it.
WORKER_KILLED = "was sent SIGKILL! Perhaps out of memory?"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request, tmp_path):
    """An empty database for one test: a temporary SQLite file, or the run's PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'service.db'}"
        return
    url = request.getfixturevalue("pg_url")
    reset_postgres(url)
    yield url
    reset_postgres(url)


# --- a client that tells "never sent" from "answer lost" -------------------------------------


class Refused(Exception):
    """The connection was refused: the request never reached a server, so it did nothing."""


class Lost(Exception):
    """The request may have been sent but no answer came: it may or may not have happened."""


class Answer:
    """One HTTP answer: status, JSON body (None if not JSON), and client-side wall-clock times."""

    def __init__(self, status, content_type, raw, sent, received):
        self.status, self.raw, self.sent, self.received = status, raw, sent, received
        self.data = None
        if (content_type or "").startswith("application/json"):
            try:
                self.data = json.loads(raw)
            except ValueError:
                pass

    def problem(self):
        """What breaks the shared rules: a 5xx (503 included), a lock error, a non-JSON answer."""
        if self.status >= 500:
            return f"{self.status}"
        if b"database is locked" in self.raw.lower():
            return "database is locked"
        if self.data is None:
            return "not JSON"
        return None

    def __repr__(self):
        return f"<{self.status} {self.raw[:200]!r}>"


class Client:
    """One HTTP connection of its own (sync workers close it after each answer; it reopens)."""

    def __init__(self, port, key=KEY, timeout=30):
        self.port, self.key, self.timeout = port, key, timeout
        self.http = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def connect(self):
        """Open the connection now (before a barrier), so the request itself is all that is left."""
        try:
            self.http.connect()
        except OSError as exc:
            self.http.close()
            raise Refused(repr(exc)) from exc

    def call(self, method, path, body=None, agent=None):
        """Send one request; raise Refused (never sent) or Lost (fate unknown) on a broken connection."""
        headers = {"Authorization": f"Bearer {self.key}"}
        if agent is not None:
            headers["X-Agent-ID"] = agent
        payload = None
        if body is not None:
            payload = json.dumps(body)
            headers["Content-Type"] = "application/json"
        if self.http.sock is None:
            self.connect()
        sent = time.time()
        try:
            self.http.request(method, path, body=payload, headers=headers)
            resp = self.http.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.http.close()
            raise Lost(repr(exc)) from exc
        answer = Answer(resp.status, resp.getheader("Content-Type"), raw, sent, time.time())
        if resp.will_close:
            self.http.close()
        return answer

    def close(self):
        self.http.close()


def fetch(port, method, path, body=None, agent=None):
    """One request on a connection of its own, closed afterwards."""
    client = Client(port)
    try:
        return client.call(method, path, body, agent=agent)
    finally:
        client.close()


def when(stamp):
    """A contract timestamp as POSIX seconds."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def stamp_of(moment):
    """POSIX seconds as a contract timestamp."""
    moment = datetime.fromtimestamp(moment, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class Ledger:
    """What a group of client threads saw: request counts and every broken rule, thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.failures = []
        self.requests = Counter()

    def fail(self, message):
        with self.lock:
            self.failures.append(message)

    def count(self, kind):
        with self.lock:
            self.requests[kind] += 1

    def check(self):
        assert not self.failures, f"{len(self.failures)} failures, first ones:\n" + "\n".join(
            self.failures[:25])


# --- storm ----------------------------------------------------------------------------------


def route(method, path):
    """A request's kind for the traffic mix: its method and path without ids or query."""
    parts = path.split("?")[0].split("/")[2:]
    if parts[0] == "active-sessions" and len(parts) > 1:
        kept = parts[1] if parts[1] in ("heartbeat", "provider-session", "by-task", "cleanup", "history",
                                        "recover-orphaned-tasks") else "{id}"
        parts = parts[:1] + [kept]
    elif parts[0] == "tasks" and len(parts) > 1:
        parts = ["tasks", "{id}"] + parts[2:]
    return f"{method} /{'/'.join(parts)}"


class StormAgent:
    """One storm client: its own agent id, its own connections, and the sessions it alone ends.

    Only this thread touches its agent's sessions, so at any moment the server must list
    exactly `live` (plain sessions) plus `guards` (sessions that protect a claimed task).
    """

    def __init__(self, servers, ledger, rng):
        self.agent = f"storm-{uuid.uuid4()}"
        self.clients = [Client(srv.port) for srv in servers]
        self.ledger, self.rng = ledger, rng
        self.live = {}  # session id -> taskId (None for sessions without a task)
        self.guards = {}  # session id -> id of the in_progress task it protects
        self.orphans = set()  # tasks claimed with no session: recovery may reset them
        self.recovered = set()
        self.ended = {}  # session id -> the endReason its acknowledged end must have recorded
        self.n = 0

    def call(self, method, path, body=None, operator=False, want=(200,)):
        """One request to a random server; a broken rule is recorded and answers None."""
        client = self.rng.choice(self.clients)
        self.ledger.count(route(method, path))
        try:
            answer = client.call(method, path, body, agent=None if operator else self.agent)
        except (Refused, Lost) as exc:
            self.ledger.fail(f"{method} {path}: connection failed: {exc}")
            time.sleep(0.05)
            return None
        problem = answer.problem() or (None if answer.status in want else f"unexpected {answer.status}")
        if problem:
            self.ledger.fail(f"{problem}: {method} {path} {body} -> {answer!r}")
            return None
        return answer.data

    def expect(self, data, wanted, what):
        if data is not None and data != wanted:
            self.ledger.fail(f"{self.agent} {what}: got {data}, expected {wanted}")

    def step(self):
        """One request of a weighted mix of everything a runner, an operator and a dashboard do."""
        self.n += 1
        r = self.rng.random()
        with_task = [sid for sid, task in self.live.items() if task is not None]
        if r < 0.28:
            if len(self.live) >= LIVE_CAP:
                return self.delete()
            return self.create()
        if r < 0.46:
            if not with_task:
                return self.create()
            task = self.live[self.rng.choice(with_task)]
            return self.expect(self.call("PUT", f"{SESSIONS}/heartbeat/{task}"), {"updated": True}, "heartbeat")
        if r < 0.53:
            if not with_task:
                return self.create()
            task = self.live[self.rng.choice(with_task)]
            data = self.call("PUT", f"{SESSIONS}/provider-session/{task}", {"providerSessionId": f"p-{self.n}"})
            return self.expect(data, {"updated": True}, "provider-session")
        if r < 0.66:
            return self.delete()
        if r < 0.69:  # this agent's sessions silent for over a minute: there are none
            data = self.call("POST", f"{SESSIONS}/cleanup", {"agentId": self.agent, "maxAgeMinutes": 1})
            return self.expect(data, {"cleaned": 0}, "cleanup of fresh sessions")
        if r < 0.70:  # all of this agent's sessions
            data = self.call("POST", f"{SESSIONS}/cleanup", {"agentId": self.agent})
            self.expect(data, {"cleaned": len(self.live) + len(self.guards)}, "cleanup by agent")
            if data is not None:
                self.ended.update(dict.fromkeys(self.expected(), "agent_cleanup"))
                self.live.clear()
                self.orphans.update(self.guards.values())  # their tasks lost their protection
                self.guards.clear()
            return None
        if r < 0.73:  # an operator's sweep of everything silent for an hour: nothing is
            data = self.call("POST", f"{SESSIONS}/cleanup", {"maxAgeMinutes": 60}, operator=True)
            return self.expect(data, {"cleaned": 0}, "operator cleanup")
        if r < 0.77:
            return self.recover()
        if r < 0.80:
            return self.claim_task()
        if r < 0.90:
            return self.check_listing()
        if r < 0.92:
            if not self.live:
                return self.create()
            sid = self.rng.choice(list(self.live))
            data = self.call("GET", f"{SESSIONS}/{sid}")
            if data is not None and (data["session"]["id"], data["session"]["taskId"]) != (sid, self.live[sid]):
                self.ledger.fail(f"GET session {sid}: {data}")
            return None
        if r < 0.94:
            return self.call("GET", f"{SESSIONS}/history?agentId={self.agent}&limit=5")
        if r < 0.955:
            path = self.rng.choice((SESSIONS, f"{SESSIONS}?limit=50&offset=0"))
            return self.call("GET", path, operator=True)
        data = self.call("PUT", f"{SESSIONS}/heartbeat/{self.agent}-never-{self.n}")
        return self.expect(data, {"updated": False}, "heartbeat of an unknown task")

    def create(self):
        task = None if self.rng.random() < 0.2 else f"{self.agent}-t{self.n}"
        data = self.call("POST", SESSIONS, {"agentId": self.agent, "taskId": task, "triggerType": "task_assigned",
                                            "runtimeInstanceId": f"rt-{self.n % 3}"}, want=(201,))
        if data is not None:
            session = data["session"]
            if (session["agentId"], session["taskId"]) != (self.agent, task):
                self.ledger.fail(f"create answered {session}")
            self.live[session["id"]] = task

    def delete(self):
        if not self.live:
            return self.create()
        sid = self.rng.choice(list(self.live))
        if self.live[sid] is not None and self.rng.random() < 0.4:
            data, reason = self.call("DELETE", f"{SESSIONS}/by-task/{self.live[sid]}"), "deleted_by_task"
        else:
            data, reason = self.call("DELETE", f"{SESSIONS}/{sid}"), "deleted"
        self.expect(data, {"deleted": True}, "delete of a live session")
        if data is not None:
            self.live.pop(sid)
            self.ended[sid] = reason
        return None

    def claim_task(self):
        """Create a task for this agent and claim it, half the time under a session registered first."""
        task = self.call("POST", "/api/tasks", {"task": "storm work", "agentId": self.agent}, want=(201,))
        if task is None:
            return
        guarded = self.rng.random() < 0.5
        if guarded:
            data = self.call("POST", SESSIONS, {"agentId": self.agent, "taskId": task["id"],
                                                "triggerType": "task_assigned"}, want=(201,))
            if data is None:
                return
            self.guards[data["session"]["id"]] = task["id"]
        started = self.call("POST", f"/api/tasks/{task['id']}/start")
        if started is not None and not guarded:
            self.orphans.add(task["id"])

    def recover(self):
        data = self.call("POST", f"{SESSIONS}/recover-orphaned-tasks", {"agentId": self.agent, "minAgeSeconds": 1})
        for task in (data or {}).get("tasks", []):
            if task["id"] not in self.orphans:
                self.ledger.fail(f"recovered a task that was not orphaned: {task}")
            elif task["status"] != "pending" or task["agentId"] != self.agent:
                self.ledger.fail(f"recovered task not pending for its agent: {task}")
            self.orphans.discard(task["id"])
            self.recovered.add(task["id"])

    def expected(self):
        return {**self.live, **self.guards}

    def check_listing(self):
        """The agent's own list, from either server, is exactly what it created and did not end."""
        data = self.call("GET", f"{SESSIONS}?agentId={self.agent}")
        if data is not None:
            listed = {s["id"]: s["taskId"] for s in data["sessions"]}
            expected = self.expected()
            if listed != expected:
                self.ledger.fail(f"{self.agent} lists {len(listed)} sessions, expected {len(expected)}: "
                                 f"missing {set(expected) - set(listed)}, extra {set(listed) - set(expected)}")

    def close(self):
        for client in self.clients:
            client.close()


def storm(servers, seconds, clients=STORM_CLIENTS):
    """Run `clients` storm agents for `seconds` spread over servers; return (agents, ledger, elapsed)."""
    ledger = Ledger()
    agents = [StormAgent(servers, ledger, random.Random(i)) for i in range(clients)]
    barrier = threading.Barrier(clients + 1)
    box = {}

    def run(i):
        agent = agents[i]
        try:
            barrier.wait(timeout=30)
            deadline = box["deadline"]
            for _ in range(200_000):
                if time.monotonic() >= deadline:
                    break
                agent.step()
        finally:
            agent.close()

    def release():
        box["deadline"] = time.monotonic() + seconds
        barrier.wait(timeout=30)

    threading.Thread(target=release, daemon=True).start()
    start = time.monotonic()
    run_threads(clients, run, timeout=seconds + 120)
    return agents, ledger, time.monotonic() - start


def check_final_state(srv, agents):
    """Per agent: the full list holds exactly what it created and did not end, history exactly what
    it ended (with the reason), guarded tasks still run and recovered ones are pending."""
    listing = fetch(srv.port, "GET", SESSIONS)
    assert listing.status == 200 and listing.problem() is None, listing
    stored = {}
    for session in listing.data["sessions"]:
        stored.setdefault(session["agentId"], {})[session["id"]] = session["taskId"]
    mine = {agent.agent for agent in agents}
    assert set(stored) <= mine, set(stored) - mine
    for agent in agents:
        assert stored.get(agent.agent, {}) == agent.expected(), agent.agent
    client = Client(srv.port)
    for agent in agents:
        tasks = client.call("GET", f"/api/tasks?agentId={agent.agent}&limit=1000").data["tasks"]
        status = {task["id"]: task["status"] for task in tasks}
        for task_id in agent.guards.values():
            assert status[task_id] == "in_progress", (agent.agent, task_id)
        for task_id in agent.recovered:
            assert status[task_id] == "pending", (agent.agent, task_id)
        history = client.call("GET", f"{SESSIONS}/history?agentId={agent.agent}&limit=1000").data
        assert {h["id"]: h["endReason"] for h in history["sessions"]} == agent.ended, agent.agent
    client.close()
    return len(listing.data["sessions"])


def test_storm(database, tmp_path):
    """64 clients for 60 s of mixed traffic: one 4-worker server on SQLite, two sharing PostgreSQL.

    No 5xx, no lock error, no connection error; every create answered 201 and not ended is
    listed at the end, per agent, exactly.
    """
    count = 1 if database.startswith("sqlite") else 2
    servers = [Server(tmp_path, database, key=KEY, workers=4, name=f"storm-{i}") for i in range(count)]
    try:
        for srv in servers:
            srv.start()
        agents, ledger, elapsed = storm(servers, STORM_SECONDS)
        ledger.check()
        total = sum(ledger.requests.values())
        remaining = check_final_state(servers[0], agents)
        print(f"\nSTORM {database.split(':')[0]} x{count} servers: {len(agents)} clients, {elapsed:.1f} s, "
              f"{total} requests, {total / elapsed:.0f} req/s, {remaining} sessions left; "
              f"mix {dict(ledger.requests.most_common())}")
        assert total > 20 * STORM_SECONDS, f"only {total} requests in {elapsed:.1f} s"
        for srv in servers:
            assert_clean_log(srv)
    finally:
        for srv in servers:
            srv.stop()


# --- kill -9: a worker, then the whole server -------------------------------------------------


class KillAgent:
    """A client that lives through crashes: every taskId it tried is live, gone or unknown.

    live: a create answered 201 and no end was answered since. gone: an end was answered, or
    the create was refused (never sent). unknown: the answer was lost, so it may exist or not.
    """

    def __init__(self, port, ledger, rng):
        self.agent = f"kill-{uuid.uuid4()}"
        self.client = Client(port)
        self.ledger, self.rng = ledger, rng
        self.state = {}  # taskId -> "live" | "gone" | "unknown"
        self.sid = {}  # taskId -> session id, for acknowledged creates
        self.ended = set()  # tasks whose acknowledged session an answered end removed
        self.broken = []  # (wall time, "refused" | "lost", request) for every failed connection
        self.acked = []  # wall times of answered requests
        self.n = 0

    def call(self, method, path, body=None, operator=False, want=(200,)):
        """Answer ("ok", data), ("refused"/"lost", None), or ("bad", None) for a broken rule."""
        try:
            answer = self.client.call(method, path, body, agent=None if operator else self.agent)
        except (Refused, Lost) as exc:
            kind = "refused" if isinstance(exc, Refused) else "lost"
            self.broken.append((time.time(), kind, f"{method} {path}: {exc}"))
            time.sleep(0.1)  # the server is down: retry gently, as a runner would
            return kind, None
        self.acked.append(answer.received)
        problem = answer.problem() or (None if answer.status in want else f"unexpected {answer.status}")
        if problem:
            self.ledger.fail(f"{problem}: {method} {path} {body} -> {answer!r}")
            return "bad", None
        return "ok", answer.data

    def expect(self, data, wanted, what):
        if data is not None and data != wanted:
            self.ledger.fail(f"{self.agent} {what}: got {data}, expected {wanted}")

    def tasks(self, state):
        return [task for task, s in self.state.items() if s == state]

    def step(self):
        self.n += 1
        r = self.rng.random()
        live = self.tasks("live")
        if r < 0.40 and len(live) < 20 or not live:
            return self.create()
        if r < 0.62:
            _, data = self.call("PUT", f"{SESSIONS}/heartbeat/{self.rng.choice(live)}")
            return self.expect(data, {"updated": True}, "heartbeat of an acknowledged session")
        if r < 0.67:
            _, data = self.call("PUT", f"{SESSIONS}/provider-session/{self.rng.choice(live)}",
                                      {"providerSessionId": f"p-{self.n}"})
            return self.expect(data, {"updated": True}, "provider-session of an acknowledged session")
        if r < 0.85:
            return self.delete(live)
        if r < 0.93:
            return self.check_listing()
        if r < 0.96:
            _, data = self.call("POST", f"{SESSIONS}/cleanup", {"agentId": self.agent, "maxAgeMinutes": 1})
            return self.expect(data, {"cleaned": 0}, "cleanup of fresh sessions")
        if r < 0.98:
            _, data = self.call("POST", f"{SESSIONS}/cleanup", {"maxAgeMinutes": 60}, operator=True)
            return self.expect(data, {"cleaned": 0}, "operator cleanup")
        return self.cleanup_all()

    def create(self):
        task = f"{self.agent}-t{self.n}"
        self.state[task] = "unknown"
        outcome, data = self.call("POST", SESSIONS, {"agentId": self.agent, "taskId": task,
                                                     "triggerType": "task_assigned"}, want=(201,))
        if outcome == "ok":
            self.state[task] = "live"
            self.sid[task] = data["session"]["id"]
        elif outcome == "refused":
            self.state[task] = "gone"

    def delete(self, live):
        unknown = self.tasks("unknown")
        task = self.rng.choice(unknown) if unknown and self.rng.random() < 0.3 else self.rng.choice(live)
        if task in self.sid and self.rng.random() < 0.5:
            outcome, data = self.call("DELETE", f"{SESSIONS}/{self.sid[task]}")
        else:
            outcome, data = self.call("DELETE", f"{SESSIONS}/by-task/{task}")
        if outcome == "ok":
            if self.state[task] == "live":
                self.expect(data, {"deleted": True}, "delete of an acknowledged session")
                self.ended.add(task)
            self.state[task] = "gone"  # answered: whatever existed is ended now
        elif outcome == "lost":
            self.state[task] = "unknown"

    def cleanup_all(self):
        live, unknown = self.tasks("live"), self.tasks("unknown")
        outcome, data = self.call("POST", f"{SESSIONS}/cleanup", {"agentId": self.agent})
        if outcome == "ok":
            if not len(live) <= data["cleaned"] <= len(live) + len(unknown):
                self.ledger.fail(f"cleanup by agent: {data}, {len(live)} live, {len(unknown)} unknown")
            for task in live + unknown:
                self.state[task] = "gone"
            self.ended.update(live)
        elif outcome == "lost":
            for task in live:
                self.state[task] = "unknown"

    def compare(self, listed):
        """listed: taskId -> session id as the server has them for this agent. Return the problems."""
        problems = []
        for task, state in self.state.items():
            if state == "live" and listed.get(task) != self.sid[task]:
                problems.append(f"acknowledged session lost: {task} {self.sid[task]}")
            if state == "gone" and task in listed:
                problems.append(f"ended or never-sent session present: {task}")
        problems += [f"session never asked for: {task}" for task in set(listed) - set(self.state)]
        return problems

    def check_listing(self):
        outcome, data = self.call("GET", f"{SESSIONS}?agentId={self.agent}")
        if outcome == "ok":
            for problem in self.compare({s["taskId"]: s["id"] for s in data["sessions"]}):
                self.ledger.fail(f"{self.agent} mid-run: {problem}")


def stable_port():
    """A free port below the ephemeral range.

    While a server is down, hammering a port inside that range can make a client's socket
    connect to itself (TCP simultaneous open) and hold the port the restart needs.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as fh:
        low = int(fh.read().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 10000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range")


def wait_for(predicate, timeout, interval=0.01):
    """Poll predicate until it returns a truthy value or timeout passes; return that value or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


def test_kill_worker_then_server(database, tmp_path):
    """Under load, kill -9 one worker, later the whole server, and restart it on the same database.

    Nothing acknowledged is lost or resurrected; no answer is a 5xx; connections fail only
    around the kills; the restarted server answers an authenticated request quickly.
    """
    clients = 24
    ledger = Ledger()
    srv = Server(tmp_path, database, key=KEY, workers=4, name="kill", port=stable_port())
    agents = [KillAgent(srv.port, ledger, random.Random(i)) for i in range(clients)]
    stop = threading.Event()
    marks = {}

    def run(i):
        agent = agents[i]
        try:
            for _ in range(100_000):
                if stop.is_set():
                    break
                agent.step()
        except Exception as exc:  # noqa: BLE001 - a client that died must fail the test
            ledger.fail(f"{agent.agent} stopped: {exc!r}")
        finally:
            agent.client.close()

    def probe():
        """An authenticated request; True once it is answered 200."""
        client = Client(srv.port, timeout=5)
        try:
            client.connect()
            marks.setdefault("port_open", time.monotonic())
            return client.call("GET", f"{SESSIONS}?agentId=probe").status == 200
        except (Refused, Lost):
            return False
        finally:
            client.close()

    try:
        srv.start()
        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(4)
            workers = srv.worker_pids()
            assert len(workers) == 4, workers
            victim = random.choice(workers)
            marks["worker_kill"] = time.time()
            os.kill(victim, signal.SIGKILL)
            respawned = wait_for(lambda: (lambda now: len(now) == 4 and victim not in now)(srv.worker_pids()), 15)
            marks["respawned"] = time.time()
            assert respawned, f"worker {victim} was not replaced: {srv.worker_pids()}"
            time.sleep(4)

            marks["server_kill"] = time.time()
            srv.kill()
            spawned = time.monotonic()
            srv.start(wait=False)
            assert wait_for(probe, 10, interval=0.005), f"no answer within 10 s of the restart:\n{srv.output()}"
            marks["first_answer_mono"] = time.monotonic()
            restart_seconds = marks["first_answer_mono"] - spawned
            marks["first_answer"] = time.time()
            time.sleep(5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        ledger.check()

        # Connections failed only while a worker died or the server was down.
        windows = [(marks["worker_kill"], marks["respawned"] + 1.0),
                   (marks["server_kill"], marks["first_answer"] + 1.0)]
        broken = [b for agent in agents for b in agent.broken]
        outside = [b for b in broken if not any(lo <= b[0] <= hi for lo, hi in windows)]
        assert not outside, outside[:10]
        after_restart = sum(1 for agent in agents for t in agent.acked if t > marks["first_answer"])
        assert after_restart > 50, f"clients got only {after_restart} answers after the restart"

        # The final state: every acknowledged session there, every ended one gone, unknowns either way.
        listing = fetch(srv.port, "GET", SESSIONS)
        assert listing.status == 200, listing
        stored = {}
        for session in listing.data["sessions"]:
            stored.setdefault(session["agentId"], {})[session["taskId"]] = session["id"]
        assert set(stored) <= {agent.agent for agent in agents}
        problems = [p for agent in agents for p in agent.compare(stored.get(agent.agent, {}))]
        assert not problems, problems[:20]
        # History: every acknowledged end recorded; no acknowledged live session ever ended.
        for agent in agents:
            history = fetch(srv.port, "GET", f"{SESSIONS}/history?agentId={agent.agent}&limit=1000")
            ended = {h["id"] for h in history.data["sessions"]}
            assert {agent.sid[t] for t in agent.ended} <= ended, agent.agent
            assert not {agent.sid[t] for t, s in agent.state.items() if s == "live"} & ended, agent.agent

        states = Counter(s for agent in agents for s in agent.state.values())
        unknown_present = sum(1 for agent in agents for task, s in agent.state.items()
                              if s == "unknown" and task in stored.get(agent.agent, {}))
        kinds = Counter((kind, "worker" if t < windows[0][1] else "server") for agent in agents
                        for t, kind, _ in agent.broken)
        print(f"\nKILL {database.split(':')[0]}: restart to first authenticated 200: {restart_seconds:.2f} s "
              f"(port open after {marks['port_open'] - spawned:.2f} s); "
              f"worker respawned in {marks['respawned'] - marks['worker_kill']:.2f} s; "
              f"{sum(len(a.acked) for a in agents)} answers; task states {dict(states)}; "
              f"unknown creates found present {unknown_present}; failed connections {dict(kinds)}")
        assert restart_seconds < 10
        # Workers fork with the app already imported, so they answer as soon as the port is open
        # (when each imported it after the fork, that alone took 1-3 s on 2 cores).
        assert marks["first_answer_mono"] - marks["port_open"] < 1.0, marks
        log = assert_clean_log(srv, allowed=(WORKER_KILLED,))
        assert log.count(WORKER_KILLED) == 1, log[-4000:]
    finally:
        stop.set()
        srv.stop()


# --- races the contract settles ---------------------------------------------------------------


def race(port, actors, timeout=60):
    """Run each actor(client) in its own thread on its own open connection, released together.

    An actor returns a list of Answers; race returns one list per actor.
    """
    barrier = threading.Barrier(len(actors))

    def run(i):
        client = Client(port)
        try:
            client.connect()
            barrier.wait(timeout=30)
            return actors[i](client)
        finally:
            client.close()

    return run_threads(len(actors), run, timeout)


def request(method, path, body=None, agent=None, delay=0.0):
    """An actor that waits delay seconds after the release, then sends one request."""

    def act(client):
        time.sleep(delay)
        return [client.call(method, path, body, agent=agent)]

    return act


def jitter(rng):
    """A start delay that lets either side win: none, a little, or clearly later."""
    return rng.choice((0.0, rng.uniform(0, 0.004), 0.025))


def ok(answer, status=200):
    """Assert an answer follows the shared rules and has the status; return its body."""
    assert answer.problem() is None and answer.status == status, answer
    return answer.data


def test_race_recover_vs_register(database, tmp_path):
    """recover-orphaned-tasks (twice) racing a session registration for the orphaned task.

    Guaranteed: a session answered 201 before the recovery began (by the client's clock, or
    the recovery's own server timestamp) protects its task; a recovery that ended before the
    registration was sent did recover it; the two recoveries never both recover it; the task's
    state and log agree with the answers.
    """
    rounds = 100
    rng = random.Random(1)
    with Server(tmp_path, database, key=KEY, workers=4) as srv:
        api = Client(srv.port)
        setups = []
        for r in range(rounds):
            agent = f"recover-{r}-{uuid.uuid4().hex[:8]}"
            task = ok(api.call("POST", "/api/tasks", {"task": "race", "agentId": agent}), 201)
            assert ok(api.call("POST", f"/api/tasks/{task['id']}/start", agent=agent))["status"] == "in_progress"
            setups.append((agent, task["id"]))
        time.sleep(1.1)  # every task is now older than minAgeSeconds=1
        outcomes = Counter()
        for agent, task_id in setups:
            register = {"agentId": agent, "taskId": task_id, "triggerType": "task_assigned"}
            recover = {"agentId": agent, "minAgeSeconds": 1}
            (reg,), (rec1,), (rec2,) = race(srv.port, [
                request("POST", SESSIONS, register, agent=agent, delay=jitter(rng)),
                request("POST", f"{SESSIONS}/recover-orphaned-tasks", recover, agent=agent, delay=jitter(rng)),
                request("POST", f"{SESSIONS}/recover-orphaned-tasks", recover, agent=agent, delay=jitter(rng)),
            ])
            session = ok(reg, 201)["session"]
            hits = [rec for rec in (rec1, rec2) if ok(rec)["recovered"]]
            assert len(hits) <= 1, (rec1, rec2)
            if hits:
                (recovered,) = hits[0].data["tasks"]
                assert (recovered["id"], recovered["status"], recovered["agentId"]) == (task_id, "pending", agent)
                # The registration had committed before the recovery started: it had to protect the task.
                assert not reg.received < hits[0].sent, (reg.received, hits[0].sent)
                assert not reg.received < when(recovered["lastUpdatedAt"]), (reg.received, recovered, session)
                outcomes["recovered"] += 1
            else:
                for rec in (rec1, rec2):
                    assert not rec.received < reg.sent, "a recovery before the registration found nothing"
                outcomes["protected"] += 1
            task = ok(api.call("GET", f"/api/tasks/{task_id}"))
            recoveries = [e for e in task["logs"] if e["metadata"] == {"orphanedInProgressRecovery": True}]
            assert task["status"] == ("pending" if hits else "in_progress"), task
            assert len(recoveries) == len(hits), task
        api.close()
        print(f"\nRACE recover/register {database.split(':')[0]}: {dict(outcomes)}")
        assert outcomes["recovered"] and outcomes["protected"], outcomes
        assert_clean_log(srv)


def age_sessions(database, prefix, moment):
    """Set lastHeartbeatAt (and startedAt) of the sessions of agents named prefix* to moment, in the DB."""
    engine = create_engine(database, connect_args={"timeout": 30} if database.startswith("sqlite") else {})
    try:
        with engine.begin() as conn:
            return conn.execute(text(
                "UPDATE active_sessions SET last_heartbeat_at = :t, started_at = :t WHERE agent_id LIKE :p"),
                {"t": moment, "p": prefix + "%"}).rowcount
    finally:
        engine.dispose()


def test_race_cleanup_vs_heartbeat(database, tmp_path):
    """An agent's cleanup (maxAgeMinutes=1) of its stale sessions racing a heartbeat on each.

    A heartbeat answered updated:true keeps its row: the cleanup removes only rows stale when
    it commits. Every row it did remove is one whose heartbeat answered false, recorded once in
    history with its stale lastHeartbeatAt; a cleanup answered before a heartbeat was sent wins.
    """
    rounds, per_round = 60, 4
    rng = random.Random(2)
    prefix = f"cleanup-race-{uuid.uuid4().hex[:8]}-"
    with Server(tmp_path, database, key=KEY, workers=4) as srv:
        api = Client(srv.port)
        setups = []
        for r in range(rounds):
            agent = f"{prefix}{r}"
            tasks = [f"{agent}-t{k}" for k in range(per_round)]
            for task in tasks:
                ok(api.call("POST", SESSIONS, {"agentId": agent, "taskId": task, "triggerType": "t"}), 201)
            setups.append((agent, tasks))
        # Five minutes of silence: stale for a 1-minute cleanup, far from the sweeper's 30-minute TTL.
        aged = stamp_of(time.time() - 300)
        assert age_sessions(database, prefix, aged) == rounds * per_round
        outcomes = Counter()
        for r, (agent, tasks) in enumerate(setups):
            who = agent if r % 2 else None  # runners and operators
            answers = race(srv.port, [
                request("POST", f"{SESSIONS}/cleanup", {"agentId": agent, "maxAgeMinutes": 1}, agent=who,
                        delay=jitter(rng)),
            ] + [request("PUT", f"{SESSIONS}/heartbeat/{task}", agent=who, delay=jitter(rng)) for task in tasks])
            cleanup, beats = answers[0][0], [a[0] for a in answers[1:]]
            cleaned = ok(cleanup)["cleaned"]
            updated = {task: ok(beat)["updated"] for task, beat in zip(tasks, beats)}
            listed = {s["taskId"]: s for s in ok(api.call("GET", f"{SESSIONS}?agentId={agent}"))["sessions"]}
            history = ok(api.call("GET", f"{SESSIONS}/history?agentId={agent}"))["sessions"]
            for task, beat in zip(tasks, beats):
                if updated[task]:
                    assert task in listed, f"heartbeat answered true but the row was cleaned: {task}"
                    assert listed[task]["lastHeartbeatAt"] > aged, listed[task]
                    outcomes["heartbeat won"] += 1
                else:
                    assert task not in listed, listed[task]
                    outcomes["cleanup won"] += 1
                if cleanup.received < beat.sent:
                    assert not updated[task], "a heartbeat after the cleanup's answer found a stale row"
                if beat.received < cleanup.sent:
                    assert updated[task], "a heartbeat before the cleanup found nothing"
            assert cleaned == sum(not v for v in updated.values()) == per_round - len(listed) == len(history)
            for entry in history:
                assert (entry["endReason"], entry["lastHeartbeatAt"]) == ("agent_cleanup", aged), entry
                assert updated[entry["taskId"]] is False, entry
        api.close()
        print(f"\nRACE cleanup/heartbeat {database.split(':')[0]}: {dict(outcomes)}")
        assert outcomes["heartbeat won"] and outcomes["cleanup won"], outcomes
        assert_clean_log(srv)


def test_race_heartbeat_vs_delete(database, tmp_path):
    """Deletes (by id and by task) racing heartbeats and provider-session updates on one session.

    Exactly one delete answers true; after its answer no update answers true; no sequence of
    updates sees the session again once it saw it gone; it ends exactly once in history and
    is never listed again.
    """
    rounds = 60
    rng = random.Random(3)
    with Server(tmp_path, database, key=KEY, workers=4) as srv:
        api = Client(srv.port)
        outcomes = Counter()
        for r in range(rounds):
            agent = f"delete-race-{r}-{uuid.uuid4().hex[:8]}"
            task = f"{agent}-task"
            sid = ok(api.call("POST", SESSIONS, {"agentId": agent, "taskId": task, "triggerType": "t"}), 201)[
                "session"]["id"]

            def updates(path, body, who, count=6):
                def act(client):
                    time.sleep(rng.uniform(0, 0.002))
                    return [client.call("PUT", path, body, agent=who) for _ in range(count)]
                return act

            delay = rng.uniform(0, 0.012)
            actors = [
                request("DELETE", f"{SESSIONS}/{sid}", agent=agent if r % 2 else None, delay=delay),
                request("DELETE", f"{SESSIONS}/by-task/{task}", delay=rng.uniform(0, 0.012)),
                updates(f"{SESSIONS}/heartbeat/{task}", None, agent),
                updates(f"{SESSIONS}/heartbeat/{task}", None, None),
                updates(f"{SESSIONS}/heartbeat/{task}", None, agent),
                updates(f"{SESSIONS}/provider-session/{task}", {"providerSessionId": f"p-{r}"}, agent),
            ]
            results = race(srv.port, actors)
            deletes = [results[0][0], results[1][0]]
            verdicts = [ok(d)["deleted"] for d in deletes]
            assert sorted(verdicts) == [False, True], deletes
            winner = deletes[verdicts.index(True)]
            for sequence in results[2:]:
                seen = [ok(a)["updated"] for a in sequence]
                # Once gone, gone for good: no true after a false.
                assert seen == sorted(seen, reverse=True), seen
                for answer, value in zip(sequence, seen):
                    if answer.sent > winner.received:
                        assert value is False, "an update after the delete's answer found the session"
                    outcomes["updated" if value else "gone"] += 1
            assert api.call("GET", f"{SESSIONS}/{sid}").status == 404
            assert ok(api.call("GET", f"{SESSIONS}?agentId={agent}"))["sessions"] == []
            assert ok(api.call("PUT", f"{SESSIONS}/heartbeat/{task}")) == {"updated": False}
            history = ok(api.call("GET", f"{SESSIONS}/history?taskId={task}"))["sessions"]
            reason = "deleted" if verdicts[0] else "deleted_by_task"
            assert [(h["id"], h["endReason"]) for h in history] == [(sid, reason)], history
            outcomes[reason] += 1
        api.close()
        print(f"\nRACE heartbeat/delete {database.split(':')[0]}: {dict(outcomes)}")
        assert outcomes["updated"] and outcomes["gone"], outcomes
        assert_clean_log(srv)
