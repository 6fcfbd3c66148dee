"""Fixtures: an app per test on a temporary SQLite file, and on PostgreSQL when TEST_DATABASE_URL is set."""

import os
import uuid

import pytest
from sqlalchemy import create_engine, text

from app import create_app
from models import Base, create_schema, db

KEY = "test-key-0123456789"


def pg_admin_url():
    """TEST_DATABASE_URL with the psycopg 3 driver, or None where PostgreSQL is not offered."""
    url = os.environ.get("TEST_DATABASE_URL")
    if not url:
        return None
    return "postgresql+psycopg://" + url.split("://", 1)[1]


@pytest.fixture(scope="session")
def pg_url():
    """A PostgreSQL database of this test run's own, dropped at the end."""
    admin_url = pg_admin_url()
    if admin_url is None:
        if os.environ.get("REQUIRE_POSTGRES"):
            pytest.fail("REQUIRE_POSTGRES is set but TEST_DATABASE_URL is not")
        pytest.skip("PostgreSQL tests need TEST_DATABASE_URL")
    name = f"sessions_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield admin_url.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    """Each test runs once per backend; PostgreSQL skips cleanly without TEST_DATABASE_URL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return request.getfixturevalue("pg_url")


def make_app(database_url, tmp_path, **config):
    """An app on database_url with the test key and its schema; the caller disposes it."""
    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url, "API_KEY": KEY, "TESTING": True, **config})
    app.instance_path = str(tmp_path / "instance")
    with app.app_context():
        create_schema()
    return app


def wipe(app):
    """Leave the database empty for the next test and close every pooled connection."""
    with app.app_context():
        if db.engine.dialect.name == "postgresql":
            with db.engine.begin() as conn:
                conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        db.engine.dispose()


@pytest.fixture
def app(database_url, tmp_path):
    """The service on a fresh database."""
    app = make_app(database_url, tmp_path)
    yield app
    wipe(app)


@pytest.fixture
def client(app):
    """A test client sending no credentials."""
    return app.test_client()


class Api:
    """A test client that sends the key, and X-Agent-ID when agent= is given."""

    def __init__(self, client):
        self.client = client

    def call(self, method, path, agent=None, headers=None, **kwargs):
        sent = {"Authorization": f"Bearer {KEY}"}
        if agent is not None:
            sent["X-Agent-ID"] = agent
        sent.update(headers or {})
        return self.client.open(path, method=method, headers=sent, **kwargs)

    def get(self, path, **kw):
        return self.call("GET", path, **kw)

    def post(self, path, **kw):
        return self.call("POST", path, **kw)

    def put(self, path, **kw):
        return self.call("PUT", path, **kw)

    def delete(self, path, **kw):
        return self.call("DELETE", path, **kw)


@pytest.fixture
def api(client):
    """An authenticated client."""
    return Api(client)


@pytest.fixture
def runner(app):
    """Flask's CLI runner for the app."""
    return app.test_cli_runner()


__all__ = ["Api", "Base", "KEY", "make_app", "wipe"]
