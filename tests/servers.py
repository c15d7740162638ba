"""A PostgreSQL instance and a RabbitMQ node of the tests' own, for the tests that restart
or kill servers (tests/faults): each started on free loopback ports, with its data,
configuration and logs in a directory of its own under BASE, restarted and killed there,
and removed afterwards. The machine's own servers (and their data) are never touched.

PostgreSQL: `initdb` (trust authentication) and `pg_ctl`, found on PATH or under
/usr/lib/postgresql/*/bin. RabbitMQ: `rabbitmq-server -detached` with a node name, ports,
configuration file, plugins file, Erlang cookie and directories of its own, driven with
`rabbitmqctl -n NODE`. Run as root, each runs as its service's user (`postgres`,
`rabbitmq`), as PostgreSQL refuses to run as root; otherwise as the current user.

A run that died before removing its servers (SIGKILLed, say) leaves its directory behind;
the next run stops the servers recorded there and removes it (see `remove_stale`)."""

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE = Path(tempfile.gettempdir()) / f"leadrouter-test-servers-{os.getuid()}"
START_SECONDS = 120


def _first(*candidates: str | None) -> str | None:
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _pg_bin(tool: str) -> str | None:
    versions = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return _first(shutil.which(tool), *reversed(versions))


def _rabbit_bin(tool: str) -> str | None:
    # The package's own scripts first: /usr/sbin's wrappers switch user with `su`, which
    # drops the environment that names our node.
    return _first(
        f"/usr/lib/rabbitmq/bin/{tool}",
        *sorted(glob.glob(f"/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/{tool}")),
        shutil.which(tool),
    )


def _service_user(name: str) -> pwd.struct_passwd | None:
    """Whom a server runs as: the service's user when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def unavailable() -> str | None:
    """Why this machine cannot run servers of the tests' own, or None."""
    for tool in ("initdb", "pg_ctl"):
        if _pg_bin(tool) is None:
            return f"PostgreSQL's {tool} was not found (PATH, /usr/lib/postgresql/*/bin)"
    for tool in ("rabbitmq-server", "rabbitmqctl"):
        if _rabbit_bin(tool) is None:
            return f"RabbitMQ's {tool} was not found"
    if os.geteuid() == 0 and _service_user("postgres") is None:
        return "running as root, and there is no `postgres` user to run PostgreSQL as"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill_if_ours(pid_file: Path, marker: str) -> None:
    """SIGKILL the process a pid file names, if it is still the one we started (its
    command line or environment mentions `marker`, our directory): pids are reused."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    proc = Path(f"/proc/{pid}")
    try:
        seen = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
    except OSError:
        return
    if marker.encode() in seen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class _Server:
    user: pwd.struct_passwd | None

    def __init__(self, directory: Path, service: str) -> None:
        self.dir = directory
        self.user = _service_user(service)
        self.dir.mkdir(mode=0o700)
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)

    def _run(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 120,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        return subprocess.run(
            args,
            env=env,
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            **kwargs,
        )

    def _write(self, path: Path, text: str, mode: int = 0o600) -> None:
        path.write_text(text)
        path.chmod(mode)
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)


class OwnPostgres(_Server):
    """A PostgreSQL instance: `initdb` into its directory, `pg_ctl` on a port of its own."""

    def __init__(self, directory: Path, options: str = "") -> None:
        super().__init__(directory, "postgres")
        self.port = free_port()
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._pg_ctl = _pg_bin("pg_ctl") or "pg_ctl"
        # Its own socket directory and loopback only; no fsync: nothing here outlives it.
        self._options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
            f" -c max_connections=200 {options}"
        ).strip()

    def start(self) -> None:
        self._run(
            _pg_bin("initdb") or "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self._ctl("start")

    def start_standby_of(self, primary: "OwnPostgres") -> None:
        """A streaming standby of `primary` (which needs wal_level replica, the default,
        and replication allowed, as `initdb -A trust` does): `pg_basebackup -R` copies
        its data and writes the connection to it; then it starts on a port of its own."""
        try:
            self._run(
                _pg_bin("pg_basebackup") or "pg_basebackup",
                "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
                "-D", str(self.data), "-R", "-X", "stream", "--no-sync",
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"pg_basebackup: {exc.stderr}") from exc
        self.data.chmod(0o700)
        self._ctl("start")

    def promote(self) -> None:
        """The standby becomes a primary (waits until it takes writes)."""
        self._ctl("promote")

    def restart(self) -> None:
        """A clean restart (`-m fast`: sessions are ended, as a service restart does)."""
        self._ctl("restart", "-m", "fast")

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would; `start_again` recovers."""
        _kill_if_ours(self.data / "postmaster.pid", str(self.dir))

    def start_again(self) -> None:
        self._ctl("start")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self._pg_ctl, "-D", str(self.data), "stop", "-m", "immediate", "-w")
        _kill_if_ours(self.data / "postmaster.pid", str(self.dir))

    def stop_clean(self) -> None:
        """A clean stop (`-m fast`), as an operator takes a primary down: its standby has
        received everything committed before it goes."""
        self._ctl("stop", "-m", "fast")

    def _ctl(self, *args: str) -> None:
        try:
            self._run(
                self._pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                "-o", self._options, *args,
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"pg_ctl {args[0]}: {exc.stderr}\n{self._tail()}") from exc

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text()[-2000:]
        return ""


class OwnRabbitMQ(_Server):
    """A RabbitMQ node of its own name, ports, configuration and Erlang cookie."""

    def __init__(self, directory: Path, cookie: str | None = None) -> None:
        super().__init__(directory, "rabbitmq")
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"leadrouter-test-{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.pid_file = self.dir / "rabbitmq.pid"
        home = self.dir / "home"
        home.mkdir()
        if self.user is not None:
            os.chown(home, self.user.pw_uid, self.user.pw_gid)
        # The CLI and the node find each other with this cookie, not the machine's.
        # Nodes of one cluster share theirs.
        self._write(home / ".erlang.cookie", cookie or secrets.token_hex(16).upper(), 0o400)
        # The machine's configuration pins the standard port and its env file the node
        # name: this node reads neither.
        self._write(self.dir / "rabbitmq.conf", f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
        self._write(self.dir / "rabbitmq-env.conf", "")
        self._write(self.dir / "enabled_plugins", "[].\n")  # no management listener
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(home),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def start(self) -> None:
        self._run(_rabbit_bin("rabbitmq-server") or "rabbitmq-server", "-detached", env=self.env)
        # The node registers a moment after the command returns: until then the CLI
        # cannot find it at all.
        deadline = time.monotonic() + START_SECONDS
        while True:
            result = self.ctl("await_startup", "--timeout", "30", check=False)
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ node {self.node} did not start: {result.stderr}")
            time.sleep(0.5)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run(
            _rabbit_bin("rabbitmqctl") or "rabbitmqctl",
            "-q",
            "-n",
            self.node,
            *args,
            env=self.env,
            check=check,
        )

    def restart(self) -> None:
        """The RabbitMQ application stopped and started in the running node: every
        connection is closed, durable queues and their messages survive."""
        self.ctl("stop_app")
        self.ctl("start_app")
        self.ctl("await_startup")

    def kill(self) -> None:
        _kill_if_ours(self.pid_file, str(self.dir))

    def join(self, other: "OwnRabbitMQ") -> None:
        """Join the cluster `other` belongs to (this node's own data is reset)."""
        self.ctl("stop_app")
        self.ctl("reset")
        self.ctl("join_cluster", other.node)
        self.ctl("start_app")
        self.ctl("await_startup")

    def shutdown(self) -> None:
        """Stop the node cleanly, as an operator does (its quorum queue leaders move to
        other nodes first); `start` brings it back into its cluster."""
        self.ctl("shutdown", "--timeout", "60")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.ctl("shutdown", "--timeout", "30")
        _kill_if_ours(self.pid_file, str(self.dir))


@dataclass
class OwnServers:
    postgres: OwnPostgres
    rabbitmq: OwnRabbitMQ


def _run_directory() -> Path:
    BASE.mkdir(mode=0o755, exist_ok=True)
    run = Path(tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=BASE))
    run.chmod(0o755)  # the servers' users reach their own directories through it
    return run


def remove_stale() -> None:
    """Stop the servers of earlier runs whose test process is gone, and remove their
    directories."""
    if not BASE.is_dir():
        return
    for run in BASE.glob("run-*-*"):
        try:
            pid = int(run.name.split("-")[1])
        except ValueError:
            continue
        if Path(f"/proc/{pid}").exists():
            continue  # that run is still going
        for pid_file in [*run.glob("*/data/postmaster.pid"), *run.glob("*/rabbitmq.pid")]:
            _kill_if_ours(pid_file, str(run))
        shutil.rmtree(run, ignore_errors=True)


@contextlib.contextmanager
def own_servers() -> Iterator[OwnServers]:
    """Start a PostgreSQL instance and a RabbitMQ node of our own (in parallel); stop
    and remove both on exit, also when starting fails halfway."""
    remove_stale()
    run = _run_directory()
    postgres = OwnPostgres(run / "postgres")
    rabbitmq = OwnRabbitMQ(run / "rabbitmq")
    try:
        with contextlib.ExitStack() as started:
            started.callback(postgres.stop)
            started.callback(rabbitmq.stop)
            with ThreadPoolExecutor(2) as pool:
                for future in [pool.submit(postgres.start), pool.submit(rabbitmq.start)]:
                    future.result()
            yield OwnServers(postgres, rabbitmq)
    finally:
        shutil.rmtree(run, ignore_errors=True)


@dataclass
class OwnCluster:
    """Three RabbitMQ nodes of one cluster, and a PostgreSQL primary with a streaming
    standby: the servers of tests/cluster."""

    rabbitmq: list[OwnRabbitMQ]
    primary: OwnPostgres
    standby: OwnPostgres

    @property
    def amqp_urls(self) -> list[str]:
        return [node.url for node in self.rabbitmq]

    @property
    def database_url(self) -> str:
        """Both servers, libpq-style: whichever takes writes."""
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
        return f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write"


def cluster_unavailable() -> str | None:
    """Why this machine cannot run tests/cluster's servers, or None."""
    if problem := unavailable():
        return problem
    if _pg_bin("pg_basebackup") is None:
        return "PostgreSQL's pg_basebackup was not found"
    return None


@contextlib.contextmanager
def own_cluster(nodes: int = 3) -> Iterator[OwnCluster]:
    """Start `nodes` RabbitMQ nodes and join them into one cluster, and a PostgreSQL
    primary with a standby streaming from it (synchronously: a commit is on both before it
    returns, so a failover loses nothing committed); stop and remove them all on exit,
    also when starting fails halfway."""
    remove_stale()
    run = _run_directory()
    cookie = secrets.token_hex(16).upper()
    rabbits = [OwnRabbitMQ(run / f"rabbitmq-{n}", cookie) for n in range(1, nodes + 1)]
    primary = OwnPostgres(run / "primary", "-c synchronous_standby_names='*'")
    standby = OwnPostgres(run / "standby")
    try:
        with contextlib.ExitStack() as started:
            for server in [primary, standby, *rabbits]:
                started.callback(server.stop)
            with ThreadPoolExecutor(nodes + 1) as pool:

                def postgres() -> None:
                    primary.start()
                    standby.start_standby_of(primary)

                futures = [pool.submit(postgres), *(pool.submit(r.start) for r in rabbits)]
                for future in futures:
                    future.result()
            for node in rabbits[1:]:
                node.join(rabbits[0])
            yield OwnCluster(rabbits, primary, standby)
    finally:
        shutil.rmtree(run, ignore_errors=True)
