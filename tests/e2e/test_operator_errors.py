"""Mistakes a new operator makes with `strokegate serve`: each ends in one line on stderr saying what
is wrong and what to do, and a non-zero exit, never a traceback or a service running half-started."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from service.ops.startup import open_database

STROKEGATE = Path(sys.executable).parent / "strokegate"
POSTGRES = "postgresql://postgres@127.0.0.1:5432"
pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(tmp_path: Path, *options: str) -> subprocess.Popen:
    """`strokegate serve` with ``options``, started."""
    command = [str(STROKEGATE), "serve", "--spool-dir", str(tmp_path / "spool"), "--results-dir", str(tmp_path / "results"),
               "--port", "0", "--http-port", str(free_port()), *options]
    if "--database-url" not in options:
        command += ["--database-url", f"sqlite:///{tmp_path / 'strokegate.db'}"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env={**os.environ, "COLUMNS": "80"})


def ended(process: subprocess.Popen) -> tuple[int, list[str], str]:
    """Exit code, stderr lines and stdout of a ``serve`` that must end by itself."""
    try:
        stdout, stderr = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    return process.returncode, stderr.splitlines(), stdout


def assert_one_line(code: int, lines: list[str], stdout: str, *words: str) -> None:
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("strokegate: "), lines
    assert all(word in lines[0] for word in words), lines[0]
    assert "Traceback" not in stdout and "listening" not in stdout


@pytest.mark.parametrize(("url", "words"), [
    ("not a url", ("is not a database URL", "--database-url")),
    ("mysql://strokegate@localhost/strokegate", ("driver is not installed", "sqlite and postgresql")),
    ("oracle+nosuch://x@y/z", ("no database kind", "sqlite and postgresql")),
    ("sqlite:///{file}/strokegate.db", ("cannot open the SQLite database", "create the folder or choose another path")),
])
def test_a_bad_database_url_is_explained_in_one_line(tmp_path: Path, url: str, words: tuple[str, ...]) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    assert_one_line(*ended(serve(tmp_path, "--database-url", url.format(file=tmp_path / "file"))), *words)


def test_a_refused_database_port_is_explained_in_one_line(tmp_path: Path) -> None:
    url = f"postgresql://postgres:secret@127.0.0.1:{free_port()}/strokegate"
    code, lines, stdout = ended(serve(tmp_path, "--database-url", url))
    assert_one_line(code, lines, stdout, "connection refused", "start it, or fix --database-url")
    assert "secret" not in lines[0]  # the password is hidden


def test_a_missing_postgres_database_is_explained_in_one_line(tmp_path: Path) -> None:
    try:
        psycopg.connect(f"{POSTGRES}/postgres", connect_timeout=3).close()
    except psycopg.Error:
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    name = f"strokegate_missing_{uuid.uuid4().hex[:8]}"
    assert_one_line(*ended(serve(tmp_path, "--database-url", f"{POSTGRES}/{name}")), f"database '{name}' does not exist", "createdb")


def test_a_dicom_or_http_port_in_use_ends_the_start_in_one_line(tmp_path: Path) -> None:
    for name in ("dicom", "http"):
        (tmp_path / name).mkdir()
        open_database(f"sqlite:///{tmp_path / name / 'strokegate.db'}").dispose()  # migrated already: nothing else to say
    with socket.create_server(("127.0.0.1", 0)) as other_program:
        taken = str(other_program.getsockname()[1])
        dicom = serve(tmp_path / "dicom", "--port", taken)
        http = serve(tmp_path / "http", "--http-port", taken)  # side by side: quicker
        assert_one_line(*ended(dicom), f"DICOM port {taken} is in use", "--port")
        assert_one_line(*ended(http), f"HTTP port {taken} is in use", "--http-port")


def worker(tmp_path: Path, *options: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`strokegate worker` with ``options`` (job_queue celery unless ``env`` says otherwise), started."""
    command = [str(STROKEGATE), "worker", "--spool-dir", str(tmp_path / "spool"), "--results-dir", str(tmp_path / "results"), *options]
    if "--database-url" not in options:
        command += ["--database-url", f"sqlite:///{tmp_path / 'strokegate.db'}"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env={**os.environ, "COLUMNS": "80", "STROKEGATE_JOB_QUEUE": "celery", **(env or {})})


def rabbitmq_available() -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", 5672)) == 0


def test_a_worker_without_a_broker_ends_in_one_line(tmp_path: Path) -> None:
    assert_one_line(*ended(worker(tmp_path, "--broker-url", f"amqp://guest:guest@127.0.0.1:{free_port()}//")),
                    "cannot reach the message broker", "connection refused", "broker_url")


def test_a_worker_with_a_wrong_broker_password_ends_in_one_line_without_showing_it(tmp_path: Path) -> None:
    if not rabbitmq_available():
        pytest.skip("RabbitMQ is not reachable on 127.0.0.1:5672")
    code, lines, stdout = ended(worker(tmp_path, "--broker-url", "amqp://guest:not-the-password@127.0.0.1:5672//"))
    assert_one_line(code, lines, stdout, "user or password refused", "broker_url")
    assert "not-the-password" not in lines[0]


def test_a_worker_without_its_database_ends_in_one_line(tmp_path: Path) -> None:
    if not rabbitmq_available():
        pytest.skip("RabbitMQ is not reachable on 127.0.0.1:5672")
    assert_one_line(*ended(worker(tmp_path, "--database-url", f"postgresql://strokegate@127.0.0.1:{free_port()}/strokegate")),
                    "cannot connect to the database server", "connection refused")


def test_a_worker_for_the_embedded_job_queue_says_how_to_configure_it(tmp_path: Path) -> None:
    assert_one_line(*ended(worker(tmp_path, env={"STROKEGATE_JOB_QUEUE": "database"})), "set job_queue to celery")


def test_serve_on_celery_without_a_broker_ends_in_one_line(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [str(STROKEGATE), "serve", "--spool-dir", str(tmp_path / "spool"), "--results-dir", str(tmp_path / "results"),
         "--port", "0", "--http-port", str(free_port()), "--database-url", f"sqlite:///{tmp_path / 'strokegate.db'}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "COLUMNS": "80", "STROKEGATE_JOB_QUEUE": "celery",
             "STROKEGATE_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{port}//"},
    )
    assert_one_line(*ended(process), "cannot reach the message broker", "or set job_queue to database")
