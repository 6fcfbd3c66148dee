"""The application factory: configuration, error handling, CLI commands and start-up work."""

import logging
import os
import sys

import orjson
from flask import Flask, current_app, request
from flask.json.provider import JSONProvider
from marshmallow import ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError
from werkzeug.exceptions import HTTPException

import sessions
import tasks
from auth import configured_key, ensure_key, require_key, stored_key
from models import configure_engine, create_schema, db
from sweep import start_sweeper

VERSION = "0.1.0"
log = logging.getLogger(__name__)


class OrjsonProvider(JSONProvider):
    """Fast JSON that keeps our field order."""

    def dumps(self, obj, **kwargs):
        return orjson.dumps(obj).decode()

    def loads(self, s, **kwargs):
        return orjson.loads(s)

    def response(self, *args, **kwargs):
        obj = args[0] if len(args) == 1 else (args or kwargs)
        return self._app.response_class(orjson.dumps(obj), mimetype="application/json")


class IgnoreTrailingSlash:
    """WSGI middleware: /path/ is /path on every route, with no redirect."""

    def __init__(self, wsgi_app):
        self.wsgi_app = wsgi_app

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if len(path) > 1 and path.endswith("/"):
            environ["PATH_INFO"] = path[:-1]
        return self.wsgi_app(environ, start_response)


def _flag(value):
    """Read an on/off environment variable: 1 or true, any case."""
    return str(value or "").strip().lower() in ("1", "true")


def settings(instance_path, env=os.environ):
    """Configuration from environment variables (each documented in the README)."""
    return {
        "SQLALCHEMY_DATABASE_URI": _database_url(env.get("DATABASE_URL"), instance_path),
        "API_KEY": configured_key(env),
        "MULTI_RUNTIME_ENABLED": _flag(env.get("MULTI_RUNTIME_ENABLED")),
        "MAX_CONTENT_LENGTH": int(env.get("MAX_BODY_BYTES") or 1024 * 1024),
        "SQLITE_BUSY_TIMEOUT_MS": int(env.get("SQLITE_BUSY_TIMEOUT_MS") or 5000),
        "SESSION_TTL_MINUTES": float(env.get("SESSION_TTL_MINUTES") or 30),
        "SWEEP_INTERVAL_SECONDS": float(env.get("SWEEP_INTERVAL_SECONDS") or 90),
        "HISTORY_DAYS": float(env.get("HISTORY_DAYS") or 7),
        "CORS_ORIGINS": [o.strip() for o in env.get("CORS_ORIGINS", "").split(",") if o.strip()],
    }


def _database_url(url, instance_path):
    """Default to a SQLite file in the instance folder; plain postgresql:// means psycopg 3."""
    if not url:
        return "sqlite:///" + os.path.join(instance_path, "sessions.db")
    if url.startswith(("postgres://", "postgresql://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def cors(response):
    """after_request: let configured origins (none by default) call the API from a browser.

    The key travels in a header, never a cookie, so no credentials mode: an origin is only
    ever echoed when it is on the list, and "*" stays a literal wildcard.
    """
    origin = request.headers.get("Origin")
    allowed = current_app.config["CORS_ORIGINS"]
    if origin and allowed and (origin in allowed or "*" in allowed):
        response.headers["Access-Control-Allow-Origin"] = "*" if "*" in allowed else origin
        response.headers.add("Vary", "Origin")
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = "GET, HEAD, POST, PUT, DELETE"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, X-Agent-ID"
            response.headers["Access-Control-Max-Age"] = "600"
    return response


def _error(status, message, **extra):
    return {"error": message, **extra}, status


def register_errors(app):
    """Every error becomes {"error": ...} JSON, keeping headers such as Allow and WWW-Authenticate."""

    @app.errorhandler(HTTPException)
    def http_error(e):
        response = e.get_response()
        # Werkzeug's stock descriptions are HTML-page prose; its short name reads better.
        message = e.name if e.description == type(e).description else e.description
        response.set_data(orjson.dumps({"error": message}))
        response.content_type = "application/json"
        return response

    @app.errorhandler(ValidationError)
    def validation_error(e):
        messages = e.messages if isinstance(e.messages, dict) else {"_body": e.messages}
        summary = "; ".join(f"{field}: {' '.join(map(str, msgs)) if isinstance(msgs, list) else msgs}"
                            for field, msgs in messages.items())
        return _error(400, f"Validation error: {summary}", details=messages)

    @app.errorhandler(OperationalError)
    def database_busy(e):
        log.warning("database unavailable: %s", type(e.orig).__name__)
        body, status = _error(503, "Database busy or unavailable, retry shortly")
        return body, status, {"Retry-After": "1"}

    @app.errorhandler(DBAPIError)
    @app.errorhandler(Exception)
    def internal_error(e):
        log.exception("unhandled error")
        return _error(500, "Internal server error")


def create_app(config=None):
    """Build the app. Does no start-up work (schema, key generation): see prepare()."""
    app = Flask(__name__, instance_path=os.environ.get("INSTANCE_PATH") or None)
    # "//" in a path is no route (404 JSON), not Werkzeug's HTML 308 to another resource.
    app.url_map.merge_slashes = False
    app.config.update(settings(app.instance_path))
    app.config.update(config or {})
    if not app.config["API_KEY"]:
        app.config["API_KEY"] = stored_key(app)
    app.json = OrjsonProvider(app)
    db.init_app(app)
    with app.app_context():
        configure_engine(db.engine, app.config["SQLITE_BUSY_TIMEOUT_MS"])
    app.before_request(require_key)
    if _flag(os.environ.get("START_SWEEPER")):
        app.before_request(lambda: start_sweeper(app) and None)
    app.after_request(cors)
    app.register_blueprint(sessions.bp)
    app.register_blueprint(tasks.bp)
    app.add_url_rule("/health", "health", lambda: {"status": "ok", "version": VERSION})
    register_errors(app)
    register_commands(app)
    app.wsgi_app = IgnoreTrailingSlash(app.wsgi_app)
    return app


def prepare(app):
    """Start-up work, once per start and before any fork: key and schema, then no open connection."""
    ensure_key(app)
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite:///"):
        os.makedirs(app.instance_path, exist_ok=True)
    with app.app_context():
        create_schema()
        db.engine.dispose()  # no pooled connection may cross into forked workers


def register_commands(app):
    """flask --app app init-db."""

    @app.cli.command("init-db")
    def init_db_command():
        """Create the database tables if they are missing."""
        with app.app_context():
            create_schema()
        print("Database ready.")


app = create_app()

def serve(server):
    """python app.py [granian]: start-up work once, then serve in this process or under Granian."""
    prepare(app)
    host, port = os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "3013"))
    if server != "granian":
        start_sweeper(app)
        app.run(host=host, port=port, threaded=True)
        return
    from granian import Granian
    from granian.constants import Interfaces

    os.environ["START_SWEEPER"] = "1"  # Granian has no post-fork hook: workers start theirs lazily
    workers = int(os.environ.get("WEB_CONCURRENCY") or (os.cpu_count() or 1) + 1)
    Granian("app:app", address=host, port=port, interface=Interfaces.WSGI, workers=workers,
            respawn_failed_workers=True, log_access=_flag(os.environ.get("ACCESS_LOG"))).serve()


if __name__ == "__main__":
    serve(sys.argv[1] if len(sys.argv) > 1 else "werkzeug")
