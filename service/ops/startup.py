"""Starting the service as an operator configured it: the database, the listening ports and the
folders, each problem an operator can fix turned into a SetupError of one line saying what is wrong
and what to do. Anything else is a bug, and keeps its traceback."""

from __future__ import annotations

import errno
import logging
import re
import socket
import stat
from pathlib import Path

from alembic.migration import MigrationContext
from alembic.util.exc import CommandError
from sqlalchemy import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from service.errors import SetupError
from service.store.database import Database

log = logging.getLogger(__name__)

_FIX_URL = "fix --database-url (e.g. sqlite:////var/lib/strokegate/strokegate.db or postgresql://user@host:5432/strokegate)"


def shown_url(url: str) -> str:
    """``url`` fit for a message: its password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def open_database(url: str) -> Database:
    """The database at ``url``, its schema migrated to the latest version; SetupError when the URL,
    the driver, the server, the database or the file is not usable."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise SetupError(f"--database-url {shown_url(url)!r} is not a database URL: {_FIX_URL}") from None
    shown = shown_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise SetupError(f"--database-url {shown} names no file (an in-memory database loses everything at exit): {_FIX_URL}")
    try:
        db = Database(url)
    except NoSuchModuleError:
        raise SetupError(f"--database-url {shown}: no database kind {parsed.drivername!r}; StrokeGate runs on sqlite and postgresql: {_FIX_URL}") from None
    except ImportError as error:
        raise SetupError(f"--database-url {shown}: its driver is not installed ({error}); StrokeGate runs on sqlite and "
                         f"postgresql (psycopg, installed with it): {_FIX_URL}") from None
    try:
        with db.engine.connect() as connection:
            before = MigrationContext.configure(connection).get_current_revision()
        db.upgrade()
        with db.engine.connect() as connection:
            after = MigrationContext.configure(connection).get_current_revision()
    except DBAPIError as error:
        db.dispose()
        raise SetupError(_database_problem(parsed, shown, error)) from None
    except CommandError as error:
        db.dispose()
        raise SetupError(f"the database at {shown} has a schema this version does not know ({error}): run the StrokeGate "
                         "version that wrote it, or give another database") from None
    if after != before:
        log.info("database %s: schema migrated from revision %s to %s", shown, before or "(empty)", after)
    return db


def _database_problem(parsed, shown: str, error: DBAPIError) -> str:  # noqa: ANN001 - a sqlalchemy URL
    text = str(error.orig or error)
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database).resolve()
        if "unable to open" in text:
            return (f"cannot open the SQLite database {path}: its folder {path.parent} does not exist or this user "
                    "cannot write there; create the folder or choose another path in --database-url")
        if "readonly" in text or "read-only" in text:
            return f"the SQLite database {path} is read-only for this user: make it writable or choose another path"
        return f"cannot use the SQLite database {path}: {text.splitlines()[0]}"
    where = f"{parsed.host or 'localhost'}:{parsed.port or 5432}"
    if "Connection refused" in text:
        return f"cannot connect to the database server at {where} (connection refused): start it, or {_FIX_URL}"
    if "does not exist" in text and "database" in text:
        name = parsed.database
        return f"database {name!r} does not exist on {where}: create it (createdb -h {parsed.host or 'localhost'} {name}) or {_FIX_URL}"
    if "resolve host" in text or "Name or service not known" in text:
        return f"cannot find the database host {parsed.host!r}: {_FIX_URL}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error.orig).__name__)
    return f"cannot use the database at {shown}: {first}; check the server, the user's rights and --database-url"


def check_broker(url: str, timeout_s: float = 5.0) -> None:
    """SetupError unless the message broker at ``url`` (job_queue celery) accepts a connection."""
    from kombu import Connection

    shown = shown_url(url)
    try:
        connection = Connection(url, connect_timeout=timeout_s)
    except Exception as error:  # noqa: BLE001 - kombu raises many types for a malformed URL
        raise SetupError(f"broker_url {shown!r} is not a broker URL ({error}): give amqp://user:password@host:5672//") from None
    try:
        connection.ensure_connection(max_retries=1, timeout=timeout_s)
    except Exception as error:  # noqa: BLE001 - refused, unknown host, wrong credentials, timeout
        text = str(error) or type(error).__name__
        if "ACCESS_REFUSED" in text or "login" in text.lower():
            why = "user or password refused"
        elif "refused" in text.lower():
            why = "connection refused"
        else:
            why = text.splitlines()[0]
        raise SetupError(f"cannot reach the message broker at {shown} ({why}): start RabbitMQ, or fix broker_url "
                         "(STROKEGATE_BROKER_URL, e.g. amqp://user:password@rabbitmq:5672//), or set job_queue "
                         "to database") from None
    finally:
        connection.release()


def bind(host: str, port: int, what: str, option: str) -> socket.socket:
    """A listening TCP socket on ``host``:``port``; SetupError when it cannot be had."""
    try:
        return socket.create_server((host, port), backlog=64)
    except OSError as error:
        raise SetupError(port_problem(error, host, port, what, option)) from None


def port_problem(error: OSError, host: str, port: int, what: str, option: str) -> str:
    """Why ``what`` cannot listen on ``host``:``port`` and what to do; ``option`` names the setting."""
    if error.errno == errno.EADDRINUSE:
        return f"{what} port {port} is in use by another program: stop it, or choose another port ({option})"
    if error.errno == errno.EACCES:
        return f"{what} port {port} needs privileges this user lacks: use a port above 1023 ({option})"
    if error.errno == errno.EADDRNOTAVAIL or isinstance(error, socket.gaierror):
        return f"{what} address {host!r} is not an address of this machine: use one of its addresses, or 0.0.0.0 for all"
    return f"cannot listen for {what} on {host}:{port} ({error.strerror or error}): check {option} and the address"


def private_folder(path: Path, what: str, setting: str) -> None:
    """Create ``path`` readable by this user only (0700); warn when an existing one is open to others."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as error:
        raise SetupError(f"cannot create the {what} folder {path} ({error.strerror or error}): choose a folder this user "
                         f"can write ({setting})") from None
    if mode & 0o077:
        log.warning("the %s folder %s is open to other users (mode %04o): chmod 700 %s", what, path, mode, path)
