"""Malformed HTTP, long lines, chunked bodies and stalled clients, against a real gunicorn."""

import json
import socket
import time

import pytest
import requests

from server import Server, assert_clean_log, run_threads

pytestmark = pytest.mark.slow
KEY = "protocol-test-key-0123456789"
BASE = "/api/active-sessions"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """One server for the module; each test's requests are independent."""
    log_dir = tmp_path_factory.mktemp("protocol")
    with Server(log_dir, f"sqlite:///{log_dir / 'p.db'}", key=KEY, workers=2, CLIENT_TIMEOUT_SECONDS=1) as server:
        yield server
        output = assert_clean_log(server)
    assert KEY not in output


def raw(srv, data, timeout=10):
    """Send bytes on a new connection; return (status, headers text, body bytes) of the answer."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as conn:
        conn.sendall(data)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, _, headers = head.decode("latin-1").partition("\r\n")
    return int(status_line.split()[1]), headers.lower(), body


def request_bytes(line, *headers, body=b""):
    return (line + "\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode("latin-1") + body


AUTH = f"Authorization: Bearer {KEY}"
MALFORMED = {
    "control character in a header": (request_bytes(f"GET {BASE} HTTP/1.1", "Host: x", AUTH + "\x01"), 400),
    "header line without a colon": (request_bytes(f"GET {BASE} HTTP/1.1", "Host: x", AUTH.replace(":", "")), 400),
    "key as a header name": (request_bytes(f"GET {BASE} HTTP/1.1", "Host: x", f"Bearer {KEY}: x"), 400),
    "folded header": (request_bytes(f"GET {BASE} HTTP/1.1", "Host: x", AUTH, " folded"), 400),
    "lower-case method": (request_bytes(f"get {BASE} HTTP/1.1", "Host: x", AUTH), 400),
    "raw non-ASCII byte in the path": (request_bytes(f"GET {BASE}/\xe9?token={KEY} HTTP/1.1", "Host: x"), 400),
    "bad HTTP version": (request_bytes(f"GET {BASE} HTTP/9.x", "Host: x", AUTH), 400),
    "request line over 8190 bytes": (request_bytes(f"GET {BASE}?k={KEY}&pad={'a' * 9000} HTTP/1.1", "Host: x"), 414),
    "header over 8190 bytes": (request_bytes(f"GET {BASE} HTTP/1.1", "Host: x", AUTH, "X-Pad: " + "a" * 9000), 431),
    "more than 100 headers": (request_bytes(f"GET {BASE} HTTP/1.1", "Host: x", AUTH,
                                            *(f"X-H{i}: {i}" for i in range(120))), 431),
    "bad chunk size": (request_bytes(f"POST {BASE} HTTP/1.1", "Host: x", AUTH, "Transfer-Encoding: chunked",
                                     body=b"zz\r\n{}\r\n0\r\n\r\n"), 400),
}


@pytest.mark.parametrize("data, status", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_http_gets_a_json_error_without_the_key(srv, data, status):
    got, headers, body = raw(srv, data)
    assert got == status, body[:300]
    assert "content-type: application/json" in headers
    answer = json.loads(body)
    assert set(answer) == {"error"} and answer["error"]
    assert KEY.encode() not in body and b"<html" not in body.lower()


def test_longest_valid_query_is_served(srv):
    """Two filters of 256 four-byte characters each, percent-encoded: over 6 KB of request line."""
    long_id = "\U0001F600" * 256
    made = requests.post(srv.url(BASE), headers=srv.headers(), timeout=10,
                         json={"agentId": long_id, "taskId": long_id, "triggerType": "x"})
    assert made.status_code == 201
    for path in (BASE, BASE + "/history"):
        r = requests.get(srv.url(path), params={"agentId": long_id, "taskId": long_id}, headers=srv.headers(),
                         timeout=10)
        assert r.status_code == 200, r.text[:300]
    assert requests.get(srv.url(BASE), params={"agentId": long_id, "taskId": long_id}, headers=srv.headers(),
                        timeout=10).json()["sessions"] == [made.json()["session"]]


def chunked(srv, payload):
    """POST a session body as one chunk of a chunked request."""
    return raw(srv, request_bytes(f"POST {BASE} HTTP/1.1", "Host: x", AUTH, "Content-Type: application/json",
                                  "Transfer-Encoding: chunked",
                                  body=f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n"))


def test_chunked_body_over_the_limit_is_refused(srv):
    small = chunked(srv, b'{"agentId": "chunk-agent", "taskId": "chunk-small", "triggerType": "t"}')
    assert small[0] == 201
    padded = b'{"agentId": "chunk-agent", "taskId": "chunk-big", "triggerType": "t"}' + b" " * (2 * 1024 * 1024)
    status, headers, body = chunked(srv, padded)
    assert status == 413 and "error" in json.loads(body)
    listed = requests.get(srv.url(BASE), params={"agentId": "chunk-agent"}, headers=srv.headers(), timeout=10)
    assert [s["taskId"] for s in listed.json()["sessions"]] == ["chunk-small"]


def test_stalled_clients_do_not_stall_the_service(srv):
    """More half-sent requests than workers: each is dropped after the client deadline (1 s
    here), no worker is killed, and the service answers everyone else meanwhile."""
    stalled = []
    try:
        for i in range(6):
            conn = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            if i % 2:
                conn.sendall(request_bytes(f"POST {BASE} HTTP/1.1", "Host: x", AUTH, "Content-Length: 100",
                                           "Content-Type: application/json", body=b'{"ag'))
            else:
                conn.sendall(f"GET {BASE} HTTP/1.1\r\nHost: x\r\n".encode())
            stalled.append(conn)
        time.sleep(0.2)
        t0 = time.monotonic()
        answers = run_threads(8, lambda i: requests.get(srv.url("/health"), timeout=15).status_code)
        waited = time.monotonic() - t0
        assert answers == [200] * 8
        # Without the deadline every worker would hang until gunicorn kills it (30 s).
        assert waited < 10, f"the service stalled {waited:.1f} s behind half-sent requests"
        for conn in stalled:
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
            if answer:  # a request whose body never came is answered, as JSON
                head, _, body = answer.partition(b"\r\n\r\n")
                assert head.split()[1] == b"400" and "error" in json.loads(body), answer[:300]
    finally:
        for conn in stalled:
            conn.close()
    assert "WORKER TIMEOUT" not in srv.output()
