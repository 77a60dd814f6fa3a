"""A throwaway PostgreSQL server for tests: its own cluster in a temporary directory, on a free
port of 127.0.0.1, trust authentication on loopback, gone at the end.

    reason = unavailable()              # None, or why the tests must skip
    with PostgresServer() as pg:        # initdb + pg_ctl start -w (about 1.5 s)
        url = pg.url()                  # postgresql+psycopg://postgres@127.0.0.1:PORT/votes
        pg.restart(mode="immediate")    # same data directory, same port
        pg.query("SELECT count(*) FROM votes")
    # stopped and deleted here (and at interpreter exit, if a test died half-way)

The server binaries are found with ``pg_config --bindir``, else under
``/usr/lib/postgresql/<version>/bin`` (newest first), else beside ``initdb`` on ``PATH``
(``$PG_BINDIR`` overrides all three). PostgreSQL refuses to run as root: as root, ``initdb``,
``pg_ctl`` and the server run as the ``postgres`` account (or ``nobody``) through ``setpriv``,
and the cluster's directory is theirs. Durability settings are relaxed for speed
(``fsync=off``): a stopped or killed *server* loses no committed transaction that way (the
kernel still holds its WAL), only a crash of the whole machine would.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.helpers.net import free_port

#: the superuser initdb makes (trust authentication: no password)
SUPERUSER = "postgres"
#: server settings: loopback only, quick and small
SERVER_OPTIONS = ("-c fsync=off -c full_page_writes=off -c synchronous_commit=on "
                  "-c shared_buffers=32MB -c max_connections=100 -c log_min_messages=warning")
_BINARIES = ("initdb", "pg_ctl", "postgres")


def _has_binaries(d: Path) -> bool:
    return all((d / b).is_file() and os.access(d / b, os.X_OK) for b in _BINARIES)


def find_bindir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres`` (None: not installed)."""
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    if shutil.which("pg_config"):
        try:
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.strip()
            candidates.append(Path(out))
        except (OSError, subprocess.SubprocessError):
            pass

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb") or "").resolve().parent)
    return next((c for c in candidates if _has_binaries(c)), None)


def _server_account() -> pwd.struct_passwd | None:
    """As root: the account the server runs as (``postgres``, else ``nobody``)."""
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def _drop_privileges() -> list[str]:
    """The command prefix that runs a program as the server's account ([] unless root)."""
    if os.geteuid() != 0:
        return []
    acct = _server_account()
    if acct is None:
        raise RuntimeError("running as root and there is no postgres or nobody account")
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={acct.pw_uid}", f"--regid={acct.pw_gid}", "--clear-groups",
                "--"]
    if shutil.which("runuser"):
        return ["runuser", "-u", acct.pw_name, "--"]
    raise RuntimeError("running as root and neither setpriv nor runuser is installed")


def _reachable(d: Path) -> bool:
    """Whether any account may pass through ``d`` and each folder above it (o+x)."""
    return all(p.stat().st_mode & 0o001 for p in (d.resolve(), *d.resolve().parents))


def unavailable() -> str | None:
    """Why a throwaway PostgreSQL cannot run here (None: it can)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -r requirements.txt)"
    if find_bindir() is None:
        return ("PostgreSQL server binaries not found (pg_config --bindir, "
                "/usr/lib/postgresql/*/bin, PATH): apt-get install postgresql")
    try:
        _drop_privileges()
    except RuntimeError as e:
        return str(e)
    return None


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory (see the module docstring).

    Args:
        database: the database :meth:`start` creates and :meth:`url` names.
        base_dir: where the temporary directory goes (default: the system's, ``/tmp``, which
            the server's account can reach when running as root).
    """

    def __init__(self, database: str = "votes", base_dir: str | Path | None = None) -> None:
        self.bindir = find_bindir()
        if self.bindir is None:
            raise RuntimeError(unavailable() or "no PostgreSQL binaries")
        self.database = database
        self._prefix = _drop_privileges()
        if base_dir is None and self._prefix and not _reachable(Path(tempfile.gettempdir())):
            base_dir = "/tmp"  # $TMPDIR is private to root: the server's account needs a way in
        self.root = Path(tempfile.mkdtemp(prefix="pgtest-", dir=base_dir))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "server.log"
        self.port = 0
        self.running = False
        self._owner = os.getpid()
        self._closed = False
        if self._prefix:  # the server's account owns its directory
            acct = _server_account()
            assert acct is not None
            os.chown(self.root, acct.pw_uid, acct.pw_gid)
        atexit.register(self.close)

    # ------------------------------------------------------------------------------ commands

    def _run(self, tool: str, *args: str, timeout: float = 60) -> str:
        cmd = [*self._prefix, str(self.bindir / tool), *args]
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
        for k in ("PGDATA", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD"):
            env.pop(k, None)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                           cwd=self.root)
        if p.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.is_file() else ""
            raise RuntimeError(f"{tool} {' '.join(args[:3])}... failed ({p.returncode}): "
                               f"{p.stdout[-1000:]}{p.stderr[-2000:]}\nserver log:\n{tail}")
        return p.stdout

    def _initdb(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth-local=trust",
                  "--auth-host=trust", "--encoding=UTF8", "--locale=C", "--no-sync",
                  "--no-instructions")
        self.sockets.mkdir()
        if self._prefix:
            acct = _server_account()
            assert acct is not None
            os.chown(self.sockets, acct.pw_uid, acct.pw_gid)

    def _pg_ctl_start(self) -> None:
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} "
                f"-c unix_socket_directories={self.sockets} {SERVER_OPTIONS}")
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t",
                  "60", "-o", opts)
        self.running = True

    # ------------------------------------------------------------------------------ life

    def start(self) -> PostgresServer:
        """initdb (first time), start on a free port (the same port after a stop), wait until
        it accepts connections, and create :attr:`database` (first time)."""
        if self._closed:
            raise RuntimeError("this server was closed")
        if self.running:
            return self
        first = not self.data.exists()
        if first:
            self._initdb()
        if self.port:
            self._pg_ctl_start()
        else:
            for attempt in range(3):  # a free port can be taken before the server binds it
                self.port = free_port()
                try:
                    self._pg_ctl_start()
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
        if first:
            self.execute(f'CREATE DATABASE "{self.database}"', database="postgres")
        return self

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m <mode>``: ``smart`` waits for clients, ``fast`` disconnects them
        (rolling back what is open), ``immediate`` kills the server (a crash: recovery from
        the WAL at the next start)."""
        if self.running:
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60")
            self.running = False

    def restart(self, mode: str = "fast", down_s: float = 0.0) -> float:
        """Stop (``mode``), stay down ``down_s`` seconds, start again on the same port and
        data; returns the seconds the server did not answer (about)."""
        t0 = time.monotonic()
        self.stop(mode)
        if down_s:
            time.sleep(down_s)
        self.start()
        return time.monotonic() - t0

    def close(self) -> None:
        """Stop the server (immediately) and delete its directory; idempotent."""
        if self._closed or os.getpid() != self._owner:  # not in a forked child
            return
        self._closed = True
        try:
            if self.running:
                try:
                    self.stop("fast")
                except (RuntimeError, subprocess.SubprocessError):
                    self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            atexit.unregister(self.close)

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ clients

    def url(self, database: str | None = None) -> str:
        """The SQLAlchemy URL of a database of this server (default :attr:`database`)."""
        return (f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/"
                f"{database or self.database}")

    def dsn(self, database: str | None = None) -> str:
        """The libpq connection string (for psycopg itself)."""
        return (f"host=127.0.0.1 port={self.port} user={SUPERUSER} "
                f"dbname={database or self.database} connect_timeout=10")

    def execute(self, sql: str, params: Any = None, database: str | None = None) -> None:
        """Run one statement outside a transaction (``CREATE DATABASE`` works)."""
        import psycopg

        with psycopg.connect(self.dsn(database), autocommit=True) as conn:
            conn.execute(sql, params)

    def query(self, sql: str, params: Any = None, database: str | None = None) -> list[tuple]:
        """The rows of one query."""
        import psycopg

        with psycopg.connect(self.dsn(database)) as conn:
            return list(conn.execute(sql, params).fetchall())

    def create_database(self, name: str) -> str:
        """A new empty database on this server; its SQLAlchemy URL."""
        self.execute(f'CREATE DATABASE "{name}"', database="postgres")
        return self.url(name)
