"""Bearer-key check for every protected route, the generated key, and the caller's agent id."""

import hmac
import os
import secrets
import sys

from flask import current_app, request
from schemas import is_id
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Forbidden, Unauthorized

KEY_FILE = "api_key"
PUBLIC_ENDPOINTS = frozenset({"health", "static"})
# What a header that cannot be an agent id (bad UTF-8, control characters...) stands for:
# "/" is never a valid id, so it owns nothing and is safe to send to any database.
NOT_AN_ID = "/"


def key_path(app):
    """Where a generated key is kept: the instance folder, so it survives restarts."""
    return os.path.join(app.instance_path, KEY_FILE)


def configured_key(environ):
    """The key from AGENT_SWARM_API_KEY, else API_KEY; None when neither is set."""
    return environ.get("AGENT_SWARM_API_KEY") or environ.get("API_KEY") or None


def stored_key(app):
    """Read a key generated on an earlier start, if there is one."""
    try:
        with open(key_path(app), encoding="utf-8") as fh:
            return fh.read().strip() or None
    except FileNotFoundError:
        return None


def ensure_key(app, out=sys.stderr):
    """Make sure the app has a key: generate, persist and show one once when none exists."""
    if app.config.get("API_KEY"):
        return
    key = stored_key(app)
    if key is None:
        os.makedirs(app.instance_path, exist_ok=True)
        candidate = secrets.token_urlsafe(32)
        try:
            # O_EXCL: of two processes starting at once, exactly one writes (and shows) the key.
            fd = os.open(key_path(app), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = stored_key(app)
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(candidate + "\n")
            key = candidate
            print(
                f"\n  Generated an API key (shown only this once; kept in {key_path(app)}):\n\n"
                f"      {key}\n\n  Send it as: Authorization: Bearer <key>\n",
                file=out, flush=True,
            )
    app.config["API_KEY"] = key


def _bearer_token(header):
    """Return the token of 'Bearer <token>' (scheme in any case), or None."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return token.strip()


def require_key():
    """before_request hook: refuse every non-public request without the right key (fails closed)."""
    if request.method == "OPTIONS" or request.endpoint in PUBLIC_ENDPOINTS:
        return
    expected = current_app.config.get("API_KEY")
    # Two Authorization headers reach us joined by a comma, so they never equal the key.
    token = _bearer_token(request.headers.get("Authorization", ""))
    # The server hands headers over as latin-1 text of the raw bytes: compare those bytes
    # with the key's UTF-8 bytes, in constant time.
    if not expected or token is None or not hmac.compare_digest(
        token.encode("latin-1", "replace"), expected.encode("utf-8")
    ):
        raise Unauthorized("Unauthorized", www_authenticate=WWWAuthenticate("Bearer"))


def caller_agent():
    """The X-Agent-ID header decoded as UTF-8, or None when absent or empty.

    A header that could not be an agent id is present but equals none: NOT_AN_ID.
    """
    raw = request.headers.get("X-Agent-ID", "")
    if not raw:
        return None
    try:
        agent = raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return NOT_AN_ID
    return agent if is_id(agent) else NOT_AN_ID


def check_owner(owner, message="X-Agent-ID names another agent"):
    """Refuse (403) a caller whose X-Agent-ID names another agent than owner; operators pass."""
    agent = caller_agent()
    if agent is not None and agent != owner:
        raise Forbidden(message)
