"""The MLflow store: concurrent processes on a new store, and the checks made before any compute."""
import http.server
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
from conftest import FORKED

from ablate.tracking.store import check_store, check_writable, open_client

PROCESSES, ROUNDS = 4, 2  # each round: a new store, created by whichever process gets there first


def _open_log_close(index, uris, barrier, results):
    """One process: on each new store, at the same moment as the others, make a run and log a metric."""
    from ablate.tracking.mlflow import MlflowTracker

    for round_, uri in enumerate(uris):
        barrier.wait(timeout=120)
        try:
            tracker = MlflowTracker(uri, "ablate", f"job {index}", tags={"job": str(index)})
            tracker.log_metrics({"m": float(index)}, step=0)
            tracker.finish()
            results.put((round_, index, None))
        except Exception as err:  # noqa: BLE001 - the test reports every failure
            results.put((round_, index, f"{type(err).__name__}: {str(err)[:160]}"))


@pytest.mark.slow
def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    uris = [f"sqlite:///{tmp_path}/round{r}/mlflow.db" for r in range(ROUNDS)]
    barrier, results = FORKED.Barrier(PROCESSES), FORKED.Queue()  # imports done before: the opens really race
    workers = [FORKED.Process(target=_open_log_close, args=(i, uris, barrier, results)) for i in range(PROCESSES)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=300) for _ in range(PROCESSES * ROUNDS)]
    for worker in workers:
        worker.join(timeout=60)
    failures = [o for o in outcomes if o[2] is not None]
    assert not failures, f"{len(failures)}/{len(outcomes)} failed: {failures[:3]}"
    for uri in uris:  # every store is complete and usable afterwards
        client = open_client(uri)
        runs = client.search_runs([client.get_experiment_by_name("ablate").experiment_id])
        assert sorted(r.data.metrics["m"] for r in runs) == [float(i) for i in range(PROCESSES)]
        assert all(r.info.status == "FINISHED" for r in runs)


def _sweep_config(tmp_path, *overrides):
    from ablate.config import compose

    return compose([f"hydra.sweep.dir={tmp_path}/sweep", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                    *overrides], return_hydra_config=True)


def test_a_parent_run_that_cannot_be_made_stops_the_multirun(tmp_path, monkeypatch, capsys):
    """Hydra turns a callback's Exception into a warning; the sweep's callback must stop the multirun."""
    from hydra._internal.callbacks import Callbacks

    from ablate.tracking import mlflow as tracking

    def refuse(*args, **kwargs):
        raise RuntimeError("the store is busy")

    monkeypatch.setattr(tracking.MlflowTracker, "__init__", refuse)
    cfg = _sweep_config(tmp_path)
    with pytest.raises(SystemExit) as stop:
        Callbacks(cfg).on_multirun_start(config=cfg)  # as Hydra calls it, with its exception handling
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "parent MLflow run could not be created" in err and "the store is busy" in err
    assert not (tmp_path / "sweep" / "parent_run_id").exists()


@pytest.mark.parametrize("children", [[], ["FINISHED", "FINISHED"], ["FINISHED", "FAILED"]])
def test_a_parent_run_is_named_in_the_sweep_folder_and_ends_as_its_children_did(children, store, tmp_path):
    from hydra._internal.callbacks import Callbacks

    from ablate.tracking.mlflow import PARENT_TAG

    cfg = _sweep_config(tmp_path, "attention=mha")
    callbacks = Callbacks(cfg)
    callbacks.on_multirun_start(config=cfg)
    run_id = (tmp_path / "sweep" / "parent_run_id").read_text()
    client = open_client(store)
    for status in children:
        child = client.create_run(client.get_run(run_id).info.experiment_id, tags={PARENT_TAG: run_id})
        client.set_terminated(child.info.run_id, status)
    callbacks.on_multirun_end(config=cfg)
    run = client.get_run(run_id)
    assert run.data.tags["ablate.sweep"].endswith(" attention=mha")
    # a sweep without children, or with a child that did not finish, did not succeed
    assert run.info.status == ("FINISHED" if children and set(children) == {"FINISHED"} else "FAILED")
    assert run.data.metrics.get("sweep/runs", 0) == len(children)


@contextmanager
def unprivileged():
    """Permissions as an ordinary user sees them (root may write anywhere)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def shared():
    """A folder that an unprivileged user may enter (pytest's own base folder is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="ablate-store-"))
    folder.chmod(0o755)
    yield folder
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(folder)


def _one(problems, *words):
    assert len(problems) == 1, problems
    for word in ("tracking.uri", *words):
        assert word in problems[0], problems[0]
    return problems[0]


def test_a_new_store_and_a_working_store_pass(tmp_path, store):
    uri = f"sqlite:///{tmp_path}/new/folder/mlflow.db"
    assert check_store(uri) == []
    assert (tmp_path / "new" / "folder").is_dir()
    open_client(store).create_experiment("x")
    assert check_store(store) == []
    assert check_store("sqlite://") == [] and check_store("postgresql://db.lan/mlflow") == []


def test_a_folder_as_the_sqlite_file_is_refused_at_once(tmp_path):
    start = time.monotonic()
    message = _one(check_store(f"sqlite:///{tmp_path}"), str(tmp_path), "is a folder", f"{tmp_path}/mlflow.db")
    assert time.monotonic() - start < 1, message


def test_a_file_that_is_not_an_mlflow_database_is_refused(tmp_path):
    (tmp_path / "notes.db").write_text("a text file, not a store\n" * 10)
    _one(check_store(f"sqlite:///{tmp_path}/notes.db"), "notes.db", "not a SQLite database")
    (tmp_path / "empty.db").touch()  # SQLite makes an empty file a new database
    assert check_store(f"sqlite:///{tmp_path}/empty.db") == []
    with closing(sqlite3.connect(tmp_path / "other.db")) as con:
        con.execute("CREATE TABLE invoices (id INTEGER)")
        con.commit()
    _one(check_store(f"sqlite:///{tmp_path}/other.db"), "something else", "invoices")


def test_a_store_left_half_migrated_is_refused_with_the_repair(tmp_path, store):
    db = tmp_path / "mlflow.db"  # the store's file
    with closing(sqlite3.connect(db)) as con:
        con.execute("CREATE TABLE _alembic_tmp_experiments (x INTEGER)")
        con.commit()
    _one(check_store(f"sqlite:///{db}"), "_alembic_tmp_experiments", "mlflow db upgrade", "new file")


def _write_and_die(db):
    """Change the store inside a transaction and die before committing it: a kill -9 mid-write."""
    con = sqlite3.connect(db)
    con.execute("PRAGMA cache_size = 1")  # a small cache spills changed pages into the file before the commit
    con.execute("BEGIN IMMEDIATE")
    con.executemany("INSERT INTO experiments (name, lifecycle_stage) VALUES (?, 'active')",
                    [(f"half-written {i} " + "x" * 200,) for i in range(2000)])
    con.execute("UPDATE experiments SET name = 'renamed' WHERE experiment_id = 0")
    os._exit(9)


def test_a_store_left_mid_write_by_a_killed_run_passes_and_is_rolled_back(tmp_path, store):
    db = tmp_path / "mlflow.db"
    open_client(store).create_experiment("kept")
    proc = FORKED.Process(target=_write_and_die, args=(db,))
    proc.start()
    proc.join()
    assert proc.exitcode == 9
    assert (tmp_path / "mlflow.db-journal").exists()  # the hot journal a killed writer leaves behind
    assert check_store(store) == []
    names = {e.name for e in open_client(store).search_experiments()}
    assert "kept" in names and "renamed" not in names and not [n for n in names if n.startswith("half-written")]


def test_a_read_only_database_file_is_refused(shared):
    db = shared / "mlflow.db"
    sqlite3.connect(db).close()
    db.write_bytes(b"SQLite format 3\x00" + bytes(84))
    db.chmod(0o444)
    shared.chmod(0o777)
    with unprivileged():
        problems = check_store(f"sqlite:///{db}")
    _one(problems, str(db), "read-only", "chmod")


def test_a_store_in_a_folder_that_is_not_writable_is_refused(shared):
    folder = shared / "locked"
    folder.mkdir(mode=0o555)
    folder.chmod(0o555)
    with unprivileged():
        problems = check_store(f"sqlite:///{folder}/mlflow.db")
        writable = check_writable(folder / "checkpoints", "train.checkpoint_dir")
    _one(problems, str(folder), "not writable")
    assert len(writable) == 1 and "train.checkpoint_dir" in writable[0] and "cannot be created" in writable[0]


def test_check_writable_makes_the_folder_and_refuses_files_and_locked_folders(tmp_path, shared):
    assert check_writable(tmp_path / "a" / "b", "paths.output_dir") == []
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
    (tmp_path / "file").write_text("x")
    (problem,) = check_writable(tmp_path / "file", "paths.output_dir")
    assert "paths.output_dir" in problem and "is a file" in problem
    folder = shared / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    with unprivileged():
        (problem,) = check_writable(folder, "paths.output_dir")
    assert "paths.output_dir" in problem and "not writable" in problem


@pytest.mark.parametrize("uri", ["file:///{tmp}/mlruns", "{tmp}/mlruns", "file:{tmp}/mlruns", "mlruns"])
def test_folder_stores_are_refused_with_the_sqlite_form(uri, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    message = _one(check_store(uri.format(tmp=tmp_path)), "MLflow 3", "migrate-filestore")
    assert f"tracking.uri=sqlite:///{tmp_path}/mlflow.db" in message, message


def test_a_folder_store_passes_when_mlflow_is_told_to_allow_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    assert check_store(uri) == []
    open_client(uri).create_experiment("folder")  # MLflow accepts it too


def test_unknown_schemes_are_refused_listing_the_accepted_forms():
    _one(check_store("ftp://example/store"), "unknown scheme 'ftp'", "sqlite:///", "http(s)://")
    _one(check_store("sqlite:/relative.db"), "three slashes")


def test_an_unreachable_server_is_refused_without_retries():
    start = time.monotonic()
    _one(check_store("http://127.0.0.1:9"), "unreachable", "tracking=none")
    assert time.monotonic() - start < 5


class _Server(http.server.BaseHTTPRequestHandler):
    api_status, api_body = 200, b"{}"

    def do_GET(self):  # noqa: N802 - the name http.server calls
        status, body = (200, b"OK") if self.path == "/health" else (self.api_status, self.api_body)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,body,words", [
    (200, b"{}", None),
    (404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST"}', None),
    (403, b"Invalid Host header - possible DNS rebinding attack detected", ["--allowed-hosts"]),
    (401, b"You are not authenticated.", ["MLFLOW_TRACKING_USERNAME"]),
])
def test_a_server_that_answers_is_checked_for_host_and_credentials(status, body, words):
    handler = type("Handler", (_Server,), {"api_status": status, "api_body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        problems = check_store(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        thread.join()
    if words is None:
        assert problems == []
    else:
        _one(problems, *words)


def test_the_run_refuses_a_folder_store_before_any_compute(tmp_path):
    from ablate.config import compose
    from ablate.validate import ConfigError, check_io

    cfg = compose([f"tracking.uri=sqlite:///{tmp_path}", "train=smoke"])
    start = time.monotonic()
    with pytest.raises(ConfigError, match="is a folder"):
        check_io(cfg)
    assert time.monotonic() - start < 5
