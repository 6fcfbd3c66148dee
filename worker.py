"""The gunicorn worker: sync, but a stalled client is dropped, and malformed HTTP gets a JSON refusal.

gunicorn's own sync worker waits on a silent client until the worker timeout kills it, so a
few half-sent requests stall every worker; it refuses malformed HTTP with an HTML page, and
logs the offending request text, which may hold the key. This worker gives each connection
CLIENT_TIMEOUT_SECONDS to send its request, answers protocol errors with the service's JSON
shape, and logs only the kind of error.
"""

import errno
import json
import os

from gunicorn import http, sock, util
from gunicorn.http import errors
from gunicorn.workers.sync import SyncWorker

CLIENT_TIMEOUT = float(os.environ.get("CLIENT_TIMEOUT_SECONDS") or 10)
QUIET_ERRNOS = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)

# gunicorn's parse errors that have a status of their own; every other one is a 400.
REFUSALS = (
    (errors.LimitRequestLine, 414, "URI Too Long", "Request line too long"),
    (errors.LimitRequestHeaders, 431, "Request Header Fields Too Large", "Request headers too large"),
    (errors.UnsupportedTransferCoding, 501, "Not Implemented", "Unsupported transfer coding"),
    (errors.ExpectationFailed, 417, "Expectation Failed", "Unsupported Expect header"),
    (errors.ForbiddenProxyRequest, 403, "Forbidden", "Proxy request not allowed"),
    (errors.ConfigurationProblem, 500, "Internal Server Error", "Internal server error"),
    (errors.ParseException, 400, "Bad Request", "Malformed HTTP request"),
)


def refusal(exc):
    """(status, reason, message) for an error raised while reading or answering a request."""
    for kind, status, reason, message in REFUSALS:
        if isinstance(exc, kind):
            return status, reason, message
    return 500, "Internal Server Error", "Internal server error"


class Worker(SyncWorker):
    """gunicorn's sync worker with a client deadline and JSON refusals."""

    def accept(self, listener):
        client, addr = listener.accept()
        # Also bounds reading the body inside the app (answered 400) and writing the answer.
        client.settimeout(CLIENT_TIMEOUT)
        util.close_on_exec(client)
        self.handle(listener, client, addr)

    def handle(self, listener, client, addr):
        """Read one request and answer it; a client that stalls or goes away is just closed."""
        linger = True  # after an answer, wait (briefly) for the client to close first
        try:
            if self.cfg.is_ssl:
                client = sock.ssl_wrap_socket(client, self.cfg)
            request = next(http.get_parser(self.cfg, client, addr))
            self.handle_request(listener, request, client, addr)
        except (errors.NoMoreData, StopIteration):
            pass  # the client left before sending a request, or the answer is complete
        except TimeoutError:
            linger = False
            self.log.info("closed a connection idle for over %g s", CLIENT_TIMEOUT)
        except OSError as e:
            if e.errno not in QUIET_ERRNOS:
                self.log.warning("socket error: %s", e.strerror or type(e).__name__)
        except Exception as e:  # noqa: BLE001 - every other failure is answered below
            self.handle_error(None, client, addr, e)
        finally:
            if linger:
                util.close_graceful(client, timeout=min(2.0, CLIENT_TIMEOUT))
            else:
                client.close()

    def handle_error(self, req, client, addr, exc):
        """Answer {"error": ...} JSON; log the kind of error only, never the request's text."""
        status, reason, message = refusal(exc)
        if status == 500:
            self.log.error("error handling a request: %s", type(exc).__name__)
        else:
            self.log.warning("refused a malformed request (%s): %s", status, type(exc).__name__)
        body = json.dumps({"error": message}).encode()
        head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        try:
            util.write_nonblock(client, head + body)
        except OSError:
            pass  # the client is gone
