"""The MLflow store: opened safely by concurrent processes, and checked before any compute.

A new sqlite store is created (its schema migrated) by the first MlflowClient that touches it. Two
processes doing that at once break each other, so every client of the project is made by
`open_client`, which holds an exclusive lock on `<db>.lock` (flock, dropped by the OS if the process
dies) while the client opens the database. `check_store` and `check_writable` return problems as
sentences naming the key, the problem and the fix; they never wait on MLflow's retries.
"""
from __future__ import annotations

import base64
import fcntl
import os
import sqlite3
import tempfile
import urllib.error
import urllib.request
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
    from omegaconf import DictConfig

SQLITE = "sqlite:///"
SQLITE_HEADER = b"SQLite format 3\x00"
HTTP_TIMEOUT_S = 3.0
ACCEPTED = ("sqlite:///path/to/mlflow.db (a file; sqlite:////abs/path for an absolute path), "
            "http(s)://host:port (an MLflow server), postgresql://, mysql://, mssql:// (a database server), "
            "databricks")
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql", "databricks")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI; None for other stores and in-memory databases."""
    if not uri.startswith(SQLITE):
        return None
    path = unquote(uri[len(SQLITE):].split("?", 1)[0])
    return Path(path) if path and path != ":memory:" else None


@contextmanager
def store_lock(db: Path) -> Iterator[None]:
    """Hold the exclusive lock of the store `db` (the file `<db>.lock` beside it)."""
    try:
        fd = os.open(db.with_name(db.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a folder nobody may write to: no one can create or migrate a store there either
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def open_client(uri: str) -> MlflowClient:
    """An MlflowClient on `uri`; a sqlite store is created or migrated by one process at a time."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is None:
        return MlflowClient(tracking_uri=uri)
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401 - imported before the lock: it is held briefly

    db.parent.mkdir(parents=True, exist_ok=True)
    with store_lock(db):
        return MlflowClient(tracking_uri=uri)  # builds the store: creates and migrates the schema


def check_tracking(cfg: DictConfig) -> list[str]:
    """The problems of the run's MLflow store (none when tracking=none)."""
    from ablate.tracking.mlflow import resolve_uri

    return check_store(resolve_uri(cfg)) if cfg.tracking.name == "mlflow" else []


def check_store(uri: str) -> list[str]:
    """What keeps `uri` from serving as the MLflow store now, one sentence per problem."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "sqlite":
        return _check_sqlite(uri)
    if scheme in ("http", "https"):
        return _check_server(uri)
    if uri == "databricks" or scheme.split("+", 1)[0] in DATABASE_SCHEMES:
        return []
    if scheme in ("", "file"):
        return _check_folder_store(uri)
    return [f"tracking.uri={uri}: unknown scheme '{scheme}'; use one of: {ACCEPTED}"]


def check_writable(path: Path, key: str) -> list[str]:
    """Create the folder `path` if missing and check that a file can be written in it."""
    problem = _unwritable(Path(path))
    return [f"{key}: {problem}; point {key} at a writable folder"] if problem else []


def _unwritable(path: Path) -> str | None:
    """Why no file can be written in the folder `path` (created if missing), or None."""
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"the folder {path} cannot be created ({err.strerror})"
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"the folder {path} is not writable ({err.strerror})"
    return None


def _check_sqlite(uri: str) -> list[str]:
    db = sqlite_path(uri)
    if db is None:
        if uri in ("sqlite://", "sqlite:///:memory:"):
            return []
        return [f"tracking.uri={uri}: a sqlite URI has three slashes before the path; "
                f"write tracking.uri=sqlite:///{uri.split(':', 1)[1].lstrip('/')}"]
    if db.is_dir():
        return [f"tracking.uri={uri}: {db} is a folder; name a database file in it, "
                f"e.g. tracking.uri=sqlite:///{(db / 'mlflow.db').resolve()}"]
    problem = _unwritable(db.parent)  # SQLite writes its journal beside the database
    if problem:
        return [f"tracking.uri={uri}: {problem}; point tracking.uri at a file in a writable folder"]
    if not db.exists():
        return []
    if not os.access(db, os.R_OK | os.W_OK, effective_ids=os.access in os.supports_effective_ids):
        return [f"tracking.uri={uri}: the database file {db} is read-only; make it writable "
                f"(chmod u+rw {db}) or point tracking.uri at another file"]
    with open(db, "rb") as f:
        head = f.read(len(SQLITE_HEADER))
    if head and head != SQLITE_HEADER:
        return [f"tracking.uri={uri}: {db} is not a SQLite database; point tracking.uri at an MLflow "
                f"store or at a new file (e.g. tracking.uri=sqlite:///{db.parent.resolve()}/mlflow.db)"]
    with store_lock(db):  # not while another process creates or migrates it
        return _check_schema(uri, db)


def _check_schema(uri: str, db: Path) -> list[str]:
    """The database is MLflow's, and no half-finished schema migration left `_alembic_tmp_*` tables
    (they break every later open). Opened for writing (the file is known writable): a run killed
    mid-write leaves a hot journal that SQLite rolls back on the first open able to write, and a
    read-only open would refuse that store instead."""
    try:
        with closing(sqlite3.connect(db, timeout=10)) as con:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    except sqlite3.Error as err:
        if "locked" in str(err):
            return []  # busy with a long write: it is a working database
        return [f"tracking.uri={uri}: {db} cannot be read as a SQLite database ({err}); point tracking.uri "
                "at an MLflow store or at a new file"]
    if tables and not {"experiments", "alembic_version"} & set(tables):
        return [f"tracking.uri={uri}: {db} is a SQLite database of something else (tables: "
                f"{', '.join(sorted(tables)[:5])}); point tracking.uri at an MLflow store or at a new file"]
    stale = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if stale:
        return [f"tracking.uri={uri}: an interrupted schema migration left the table(s) {', '.join(stale)} in "
                f"{db}; back the file up, drop them (sqlite3 {db} 'DROP TABLE {stale[0]}') and run "
                f"'mlflow db upgrade {uri}', or point tracking.uri at a new file"]
    return []


def _check_folder_store(uri: str) -> list[str]:
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE

    path = Path(unquote(urlsplit(uri).path) if uri.startswith("file:") else uri)
    if MLFLOW_ALLOW_FILE_STORE.get():  # the user opted in to MLflow's folder store
        return check_writable(path, "tracking.uri")
    db = (path if path.suffix == ".db" else path.parent / "mlflow.db").resolve()
    return [f"tracking.uri={uri}: MLflow 3 no longer opens a folder as a store; use a SQLite file, "
            f"e.g. tracking.uri=sqlite:///{db} (to bring runs over from an existing folder store: "
            f"mlflow migrate-filestore --source {path.resolve()} --target sqlite:///{db})"]


def _check_server(uri: str) -> list[str]:
    """One request each, no retries: /health (is it up?) and one API call (host and credentials)."""
    base = uri.rstrip("/")
    try:
        urllib.request.urlopen(base + "/health", timeout=HTTP_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        pass  # a server answered
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return [f"tracking.uri={uri} is unreachable ({reason}); start the MLflow server, fix the address, "
                "or use tracking=none"]
    request = urllib.request.Request(base + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default",
                                     headers=_auth_headers())
    try:
        urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S).close()
    except urllib.error.HTTPError as err:
        body = err.read(200).decode("utf-8", "replace")
        if err.code == 401:
            return [f"tracking.uri={uri} asks for credentials; set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"]
        if err.code == 403 and "Host" in body:
            return [f"tracking.uri={uri}: the server refuses this Host header; start it with "
                    f"--allowed-hosts '{urlsplit(uri).netloc}'"]
        if err.code == 403:
            return [f"tracking.uri={uri}: the server refuses these credentials (403); check "
                    "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"]
    except (urllib.error.URLError, OSError) as err:
        return [f"tracking.uri={uri} stopped answering ({getattr(err, 'reason', err)}); check the server"]
    return []


def _auth_headers() -> dict[str, str]:
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}
