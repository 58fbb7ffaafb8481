"""Flower's deployment runtime on one machine, without Docker.

:class:`LocalDeployment` starts the topology of ``docker-compose.yml`` as real processes on
127.0.0.1: one ``flower-superlink`` and N ``flower-supernode`` processes, each with its own
``FLWR_HOME``, port and log file in a run directory. In the default ``subprocess`` isolation
the SuperLink and every SuperNode spawn their own ``flower-superexec``, which starts the
ServerApp and one ClientApp process per message; with ``isolation="process"`` the launcher
starts those SuperExecs itself, as the compose file does. Optional TLS (a throw-away CA) and
SuperNode authentication (EC keys registered with ``flwr supernode register``) mirror the
compose overlays in ``deploy/``.

:meth:`LocalDeployment.run` submits the app with ``flwr run`` through a connection of its own
``config.toml`` and reads the run's real status with ``flwr ls`` (``flwr run --stream`` exits
0 even when the run fails). :meth:`LocalDeployment.stop` stops every process the deployment
started, the SuperExecs and app processes included: they all inherit an environment tag, and
each gets SIGTERM (process groups first) and SIGKILL after a grace period. Used as a context
manager, the deployment is stopped on errors and on KeyboardInterrupt too. Finding the
spawned processes by their tag needs Linux's ``/proc``; elsewhere only the process groups
are signalled and Flower's own parent-process watch stops the SuperExecs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..security.keydir import KeyDir
from .launch import APP_DIR, RunOutcome, flower_env, format_run_config, free_port, run_status

#: Environment variable that marks every process of one deployment (value: its tag).
TAG_VARIABLE = "FLWR_ROBUST_DEPLOYMENT"
#: Name of the SuperLink connection in the deployment's CLI ``config.toml``.
CONNECTION = "flwr-robust-local"
STATE_FILE = "deployment.json"
#: Node roles, as :func:`flwr_robust.apps.client.role_of` reads them from the node config.
ROLES = ("honest", "byzantine")
ISOLATIONS = ("subprocess", "process")
HOST = "127.0.0.1"

_PROC = Path("/proc")


class DeploymentError(RuntimeError):
    """A deployment step failed (a process died, a node did not come online, a key could
    not be created or registered)."""


# ------------------------------------------------------------------------------ nodes
@dataclass(frozen=True)
class NodeSpec:
    """One SuperNode: its data partition, its role and, for a Byzantine node, its attack."""

    partition_id: int
    role: str = "honest"
    attack: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"node role must be one of {ROLES}, got {self.role!r}")
        if (self.role == "byzantine") != bool(self.attack):
            raise ValueError("a Byzantine node needs an attack, and an honest node has none")
        if self.attack:
            from ..attacks import available_attacks  # lazy: imports scipy

            if self.attack not in available_attacks():
                raise ValueError(
                    f"unknown attack {self.attack!r}; available: {', '.join(available_attacks())}"
                )

    def node_config(self, num_partitions: int, keys: NodeKeyPaths | None = None) -> dict[str, Any]:
        """The ``--node-config`` values; ``keys`` adds the key paths the client mod reads
        (:mod:`flwr_robust.security.mod`)."""
        config: dict[str, Any] = {
            "partition-id": self.partition_id,
            "num-partitions": num_partitions,
            "role": self.role,
        }
        if self.attack:
            config["attack"] = self.attack
        if keys is not None:
            config["signing-key"] = str(keys.signing_key)
            config["server-public-key"] = str(keys.server_public_key)
        return config


def plan_nodes(num_nodes: int, byzantine: int = 0, attack: str = "scale") -> list[NodeSpec]:
    """``num_nodes`` nodes with partitions ``0..num_nodes-1``; the last ``byzantine`` of
    them run ``attack``."""
    if num_nodes < 1 or not 0 <= byzantine <= num_nodes:
        raise ValueError(
            f"need 1 <= nodes and 0 <= byzantine <= nodes, got {num_nodes}, {byzantine}"
        )
    return [
        NodeSpec(i, "byzantine", attack) if i >= num_nodes - byzantine else NodeSpec(i)
        for i in range(num_nodes)
    ]


# ------------------------------------------------------ keys and certificates on disk
# Each writer lays its files out per machine (or container), so that every component gets
# only the directory it needs: the compose files mount exactly these subdirectories.
@dataclass(frozen=True)
class NodeKeyPaths:
    """A node's signing key and the server's public key (node config ``signing-key`` and
    ``server-public-key``)."""

    signing_key: Path
    server_public_key: Path


@dataclass(frozen=True)
class DeploymentKeys:
    """Signing keys per machine: ``server/`` holds ``server.key`` and ``truststore.json``
    (the ServerApp's run config ``keys-dir``), ``node-<i>/`` holds ``client.key`` and
    ``server.pub`` (node *i*'s); ``all/`` holds everything as ``flwr-robust keys init``
    wrote it, to keep offline."""

    root: Path

    NODE_KEY = "client.key"
    SERVER_PUBLIC_KEY = "server.pub"

    @property
    def all(self) -> KeyDir:
        """The complete ``keys init`` directory."""
        return KeyDir(Path(self.root) / "all")

    @property
    def server_dir(self) -> Path:
        """The ServerApp's ``keys-dir``."""
        return Path(self.root) / "server"

    def node_dir(self, partition_id: int) -> Path:
        """Node ``partition_id``'s directory."""
        return Path(self.root) / f"node-{partition_id}"

    def node(self, partition_id: int) -> NodeKeyPaths:
        """Node ``partition_id``'s key paths."""
        directory = self.node_dir(partition_id)
        return NodeKeyPaths(directory / self.NODE_KEY, directory / self.SERVER_PUBLIC_KEY)


def write_deployment_keys(root: Path, num_nodes: int) -> DeploymentKeys:
    """Create signing keys for a server and ``num_nodes`` nodes (as ``flwr-robust keys
    init`` does) and lay them out per machine (see :class:`DeploymentKeys`); overwrites."""
    from ..security.keydir import init_key_dir

    keys = DeploymentKeys(Path(root))
    try:
        init_key_dir(keys.all.root, num_nodes, force=True)
    except (OSError, ValueError) as exc:
        raise DeploymentError(f"creating the signing keys failed: {exc}") from exc
    keys.server_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(keys.all.server_key, keys.server_dir)
    shutil.copy2(keys.all.truststore, keys.server_dir)
    for i in range(num_nodes):
        paths = keys.node(i)
        paths.signing_key.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(keys.all.client_key(f"client-{i}"), paths.signing_key)
        shutil.copy2(keys.all.server_pub, paths.server_public_key)
    return keys


@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's ``superlink/`` (``ca.crt``, ``server.pem``, ``server.key``) and
    everybody else's ``ca/ca.crt`` (SuperNodes, SuperExecs, the ``flwr`` CLI)."""

    root: Path

    @property
    def superlink_dir(self) -> Path:
        """What the SuperLink mounts."""
        return Path(self.root) / "superlink"

    @property
    def ca_cert(self) -> Path:
        """The CA certificate that clients of the SuperLink trust."""
        return Path(self.root) / "ca" / "ca.crt"

    def superlink_args(self, directory: Path | None = None) -> list[str]:
        """``flower-superlink`` TLS flags, for the files in ``directory`` (default: here)."""
        directory = self.superlink_dir if directory is None else directory
        return [
            "--ssl-ca-certfile",
            str(directory / "ca.crt"),
            "--ssl-certfile",
            str(directory / "server.pem"),
            "--ssl-keyfile",
            str(directory / "server.key"),
        ]


def write_tls_certificates(
    root: Path, hosts: Sequence[str] = ("localhost", HOST), days: int = 365
) -> TlsFiles:
    """Create a throw-away CA and a SuperLink certificate valid for ``hosts`` (DNS names or
    IP addresses, all in the subject alternative names), laid out as :class:`TlsFiles`
    (``server.key`` with mode 0600; the CA key is not kept). For tests and demonstrations:
    on real machines use certificates from your own CA."""
    files = TlsFiles(Path(root))
    files.superlink_dir.mkdir(parents=True, exist_ok=True)
    files.ca_cert.parent.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flwr-robust demo CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    files.ca_cert.write_bytes(ca_pem)
    (files.superlink_dir / "ca.crt").write_bytes(ca_pem)
    (files.superlink_dir / "server.pem").write_bytes(
        server_cert.public_bytes(serialization.Encoding.PEM)
    )
    _write_private(
        files.superlink_dir / "server.key",
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
    )
    return files


@dataclass(frozen=True)
class AuthKeys:
    """Flower SuperNode authentication keys: ``supernode-<i>/auth.key`` (node *i*'s private
    key, OpenSSH ECDSA P-384) and ``public/supernode-<i>.pub`` (to register them all)."""

    root: Path

    PRIVATE_KEY = "auth.key"

    def node_dir(self, partition_id: int) -> Path:
        """What node ``partition_id`` mounts."""
        return Path(self.root) / f"supernode-{partition_id}"

    def private_key(self, partition_id: int) -> Path:
        """Node ``partition_id``'s ``--auth-supernode-private-key``."""
        return self.node_dir(partition_id) / self.PRIVATE_KEY

    @property
    def public_dir(self) -> Path:
        """The public keys, for ``flwr supernode register``."""
        return Path(self.root) / "public"

    def public_key(self, partition_id: int) -> Path:
        """Node ``partition_id``'s public key."""
        return self.public_dir / f"supernode-{partition_id}.pub"


def write_auth_keys(root: Path, num_nodes: int) -> AuthKeys:
    """Create one SuperNode authentication key pair per node, laid out as
    :class:`AuthKeys` (what ``ssh-keygen -t ecdsa -b 384`` would write); overwrites."""
    keys = AuthKeys(Path(root))
    keys.public_dir.mkdir(parents=True, exist_ok=True)
    for i in range(num_nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        keys.node_dir(i).mkdir(parents=True, exist_ok=True)
        _write_private(
            keys.private_key(i),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
        )
        keys.public_key(i).write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            + b"\n"
        )
    return keys


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)


# -------------------------------------------------------------------------- processes
def _stat(pid: int) -> tuple[str, int] | None:
    """State letter and start time (clock ticks after boot) of ``pid`` from /proc."""
    try:
        fields = (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[19])


def _procfs() -> bool:
    return (_PROC / "self" / "stat").exists()


def process_alive(pid: int, start: int | None = None) -> bool:
    """Whether ``pid`` runs (zombies count as gone); with ``start``, only if it is still
    the process that started then (guards against PID reuse)."""
    if not _procfs():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # it exists, under another user
            pass
        return True
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z" and (start is None or stat[1] == start)


def tagged_processes(tag: str) -> dict[int, int]:
    """PID -> start time of every live process whose environment carries ``tag`` in
    :data:`TAG_VARIABLE` (Linux; empty elsewhere)."""
    if not _procfs():
        return {}
    needle = f"{TAG_VARIABLE}={tag}".encode()
    found = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] != "Z":
                found[int(entry.name)] = stat[1]
    return found


@dataclass
class ProcessRecord:
    """A process the deployment started itself (the leader of its own process group)."""

    name: str
    pid: int
    start: int | None
    log: str

    def alive(self) -> bool:
        """Whether this very process still runs."""
        return process_alive(self.pid, self.start)

    def signal_group(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process group this process leads (if it still runs)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)


def _log_tail(path: str | Path, lines: int = 30) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------------- deployment
def write_cli_config(home: Path, address: str, ca_cert: Path | None = None) -> None:
    """Write ``home/config.toml`` with the default connection :data:`CONNECTION` to the
    SuperLink at ``address``: TLS trusting ``ca_cert``, or insecure without one."""
    security = f'root-certificates = "{ca_cert}"' if ca_cert is not None else "insecure = true"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\n{security}\n'
    )


def wait_for_superlink(
    address: str,
    ca_cert: Path | None = None,
    timeout: float = 180.0,
    check: Callable[[], None] | None = None,
) -> None:
    """Wait until the SuperLink at ``address`` answers its ``/health`` endpoint (HTTPS
    trusting ``ca_cert`` when given); ``check`` runs between attempts and may raise."""
    url = f"{'https' if ca_cert else 'http'}://{address}/health"
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url, timeout=2.0, context=context) as response,
        ):
            if response.status == 200:
                return
        if time.monotonic() > deadline:
            raise DeploymentError(f"the SuperLink did not answer on {url} within {timeout:.0f} s")
        time.sleep(0.5)


def register_supernode(env: Mapping[str, str], public_key: Path) -> bool:
    """Register a SuperNode's public key with ``flwr supernode register`` on the default
    connection of ``env``'s FLWR_HOME. Returns False if it was registered already."""
    done = subprocess.run(
        [_executable("flwr"), "supernode", "register", str(public_key), "--format", "json"],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        reply = json.loads(done.stdout)
    except json.JSONDecodeError:
        reply = {"error-message": done.stdout + done.stderr}
    if reply.get("success"):
        return True
    message = str(reply.get("error-message", ""))
    if "already in use" in message:  # [code: 23] Public key already in use.
        return False
    raise DeploymentError(f"`flwr supernode register {public_key}` failed: {message}")


class LocalDeployment:
    """SuperLink and SuperNodes as real processes on 127.0.0.1 (see the module docstring).

    Parameters
    ----------
    run_dir : Path
        Directory for logs, FLWR_HOMEs, keys, certificates, the SuperLink database and
        ``deployment.json``. Must lie outside ``app_dir`` (``flwr run`` packs the app
        directory into the app bundle).
    nodes : sequence of NodeSpec
        The SuperNodes; partition ids must be ``0..N-1``.
    signing : bool
        Create signing keys with ``flwr-robust keys init`` in ``run_dir/keys``, give each
        node its key paths in the node config, and turn run config ``signing`` on.
    tls : bool
        Serve the SuperLink over TLS with a throw-away CA (``run_dir/tls``).
    supernode_auth : bool
        Flower's SuperNode authentication (needs ``tls``): one EC key per node, registered
        with ``flwr supernode register`` before the node starts.
    isolation : {"subprocess", "process"}
        ``process`` starts a separate ``flower-superexec`` per SuperLink and SuperNode, as in
        ``docker-compose.yml``.
    startup_timeout : float
        Seconds to wait for the SuperLink to answer and every node to come online.
    """

    def __init__(
        self,
        run_dir: Path,
        nodes: Sequence[NodeSpec],
        *,
        signing: bool = False,
        tls: bool = False,
        supernode_auth: bool = False,
        isolation: str = "subprocess",
        app_dir: Path = APP_DIR,
        startup_timeout: float = 180.0,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.app_dir = Path(app_dir).resolve()
        self.nodes = sorted(nodes, key=lambda node: node.partition_id)
        if [node.partition_id for node in self.nodes] != list(range(len(self.nodes))):
            raise ValueError("node partition ids must be 0..N-1, each once")
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
        if supernode_auth and not tls:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses it without)")
        if self.run_dir.is_relative_to(self.app_dir):
            raise ValueError(
                f"run directory {self.run_dir} lies inside the app directory {self.app_dir}; "
                "`flwr run` would pack it into the app bundle"
            )
        self.signing = signing
        self.tls = tls
        self.supernode_auth = supernode_auth
        self.isolation = isolation
        self.startup_timeout = startup_timeout
        self.tag = uuid.uuid4().hex
        self.superlink_port = 0
        self.node_ports: list[int] = []
        self.processes: list[ProcessRecord] = []
        self.seen: dict[int, int | None] = {}
        self._children: list[subprocess.Popen[bytes]] = []

    # -- paths
    @property
    def logs_dir(self) -> Path:
        """One log file per process, and one per ``flwr run``."""
        return self.run_dir / "logs"

    @property
    def keys(self) -> DeploymentKeys:
        """The signing keys (with ``signing``)."""
        return DeploymentKeys(self.run_dir / "keys")

    @property
    def tls_files(self) -> TlsFiles:
        """CA and SuperLink certificates (with ``tls``)."""
        return TlsFiles(self.run_dir / "tls")

    @property
    def auth_keys(self) -> AuthKeys:
        """SuperNode authentication keys (with ``supernode_auth``)."""
        return AuthKeys(self.run_dir / "supernode-auth")

    def home(self, name: str) -> Path:
        """The FLWR_HOME of one process (``cli`` for the ``flwr`` command line)."""
        return self.run_dir / "homes" / name

    @property
    def address(self) -> str:
        """The SuperLink's address (Fleet, Control and Runtime APIs share one port)."""
        return f"{HOST}:{self.superlink_port}"

    def cli_env(self) -> dict[str, str]:
        """Environment for ``flwr`` commands against this deployment."""
        return self._env("cli")

    def _env(self, name: str) -> dict[str, str]:
        home = self.home(name)
        home.mkdir(parents=True, exist_ok=True)
        return flower_env(home, {TAG_VARIABLE: self.tag})

    # -- lifecycle
    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether any process the deployment started itself still runs."""
        return any(record.alive() for record in self.processes)

    def start(self) -> Self:
        """Start the SuperLink and the SuperNodes; return once every node is online.

        Stops whatever it started and raises :class:`DeploymentError` when a process exits
        early or a node does not come online within ``startup_timeout``.
        """
        state = self.run_dir / STATE_FILE
        if state.exists() and LocalDeployment.attach(self.run_dir).running:
            raise DeploymentError(
                f"a deployment from {self.run_dir} is still running; stop it "
                "first (`flwr-robust deploy down`)"
            )
        try:
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            if self.signing:
                write_deployment_keys(self.keys.root, len(self.nodes))
            if self.tls:
                write_tls_certificates(self.tls_files.root)
            if self.supernode_auth:
                write_auth_keys(self.auth_keys.root, len(self.nodes))
            self.superlink_port = free_port()
            self._spawn("superlink", self._superlink_command())
            if self.isolation == "process":
                self._spawn("superexec-serverapp", self._superexec_command(self.superlink_port))
            ca_cert = self.tls_files.ca_cert if self.tls else None
            wait_for_superlink(self.address, ca_cert, self.startup_timeout, self._check_processes)
            write_cli_config(self.home("cli"), self.address, ca_cert)
            for node in self.nodes:
                port = free_port()
                while port == self.superlink_port or port in self.node_ports:
                    port = free_port()  # not bound yet by a process still starting
                self.node_ports.append(port)
                if self.supernode_auth:
                    register_supernode(self.cli_env(), self.auth_keys.public_key(node.partition_id))
                self._spawn(f"supernode-{node.partition_id}", self._supernode_command(node, port))
                if self.isolation == "process":
                    self._spawn(
                        f"superexec-clientapp-{node.partition_id}",
                        self._superexec_command(port, tls=False),
                    )
            self._wait_for_nodes()
            self.save_state()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 15.0) -> list[int]:
        """Stop every process of the deployment: SIGTERM to the process groups of the
        processes it started (nodes first), SIGKILL to anything of the deployment still
        alive after ``grace`` seconds. Returns the PIDs still alive at the end (normally
        none) and removes ``deployment.json`` when none is."""
        self._observe()
        for record in reversed(self.processes):
            record.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self._observe() and time.monotonic() < deadline:
            time.sleep(0.2)
        for record in self.processes:
            record.signal_group(signal.SIGKILL)
        for pid, start in self._observe().items():
            if process_alive(pid, start):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while (left := self._observe()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for child in self._children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1.0)
        if not left:
            (self.run_dir / STATE_FILE).unlink(missing_ok=True)
        return sorted(left)

    def _observe(self) -> dict[int, int | None]:
        """Record the deployment's live processes in :attr:`seen`; return them."""
        for child in self._children:
            child.poll()  # reap exited children so they do not linger as zombies
        live: dict[int, int | None] = {
            record.pid: record.start for record in self.processes if record.alive()
        }
        live.update(tagged_processes(self.tag))
        self.seen.update(live)
        return live

    # -- state for `deploy up` / `deploy down`
    def save_state(self) -> None:
        """Write ``deployment.json``, from which :meth:`attach` rebuilds the deployment."""
        state = {
            "tag": self.tag,
            "app_dir": str(self.app_dir),
            "nodes": [asdict(node) for node in self.nodes],
            "signing": self.signing,
            "tls": self.tls,
            "supernode_auth": self.supernode_auth,
            "isolation": self.isolation,
            "superlink_port": self.superlink_port,
            "node_ports": self.node_ports,
            "processes": [asdict(record) for record in self.processes],
        }
        (self.run_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def attach(cls, run_dir: Path) -> LocalDeployment:
        """The deployment described by ``run_dir/deployment.json``."""
        path = Path(run_dir) / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"no deployment in {run_dir} ({STATE_FILE} missing)")
        state = json.loads(path.read_text())
        deployment = cls(
            Path(run_dir),
            [NodeSpec(**node) for node in state["nodes"]],
            signing=state["signing"],
            tls=state["tls"],
            supernode_auth=state["supernode_auth"],
            isolation=state["isolation"],
            app_dir=Path(state["app_dir"]),
        )
        deployment.tag = state["tag"]
        deployment.superlink_port = state["superlink_port"]
        deployment.node_ports = state["node_ports"]
        deployment.processes = [ProcessRecord(**record) for record in state["processes"]]
        return deployment

    # -- commands
    def _superlink_command(self) -> list[str]:
        command = [_executable("flower-superlink"), *self._tls_server_args()]
        command += ["--host", HOST, "--port", str(self.superlink_port)]
        command += ["--isolation", self.isolation, "--database", str(self.run_dir / "superlink.db")]
        command += ["--disable-runtime-dependency-installation"]
        if self.supernode_auth:
            command.append("--enable-supernode-auth")
        return command

    def _supernode_command(self, node: NodeSpec, port: int) -> list[str]:
        keys = self.keys.node(node.partition_id) if self.signing else None
        config = node.node_config(len(self.nodes), keys)
        command = [_executable("flower-supernode"), *self._tls_client_args()]
        command += ["--superlink", self.address, "--host", HOST, "--port", str(port)]
        command += ["--isolation", self.isolation, "--node-config", format_run_config(config)]
        if self.supernode_auth:
            command += [
                "--auth-supernode-private-key",
                str(self.auth_keys.private_key(node.partition_id)),
            ]
        return command

    def _superexec_command(self, port: int, tls: bool = True) -> list[str]:
        """A SuperExec for ``isolation="process"``; only the SuperLink's Runtime API uses
        TLS (a SuperNode's Runtime API stays local to its machine)."""
        security = self._tls_client_args() if tls else ["--insecure"]
        return [
            _executable("flower-superexec"),
            *security,
            "--runtime-api-address",
            f"{HOST}:{port}",
        ]

    def _tls_server_args(self) -> list[str]:
        return self.tls_files.superlink_args() if self.tls else ["--insecure"]

    def _tls_client_args(self) -> list[str]:
        return ["--root-certificates", str(self.tls_files.ca_cert)] if self.tls else ["--insecure"]

    def _spawn(self, name: str, command: list[str]) -> None:
        log = self.logs_dir / f"{name}.log"
        with log.open("ab") as stream:
            stream.write(f"$ {shlex.join(command)}\n".encode())
            stream.flush()
            child = subprocess.Popen(
                command,
                env=self._env(name),
                stdin=subprocess.DEVNULL,
                stdout=stream,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._children.append(child)
        stat = _stat(child.pid)
        self.processes.append(ProcessRecord(name, child.pid, stat[1] if stat else None, str(log)))
        self.save_state()  # at once, so that `deploy down` finds a half-started deployment

    def _flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_executable("flwr"), *args],
            env=self.cli_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _check_processes(self) -> None:
        for record in self.processes:
            if not record.alive():
                raise DeploymentError(
                    f"{record.name} (pid {record.pid}) exited; last lines of {record.log}:\n"
                    + _log_tail(record.log)
                )

    def online_nodes(self) -> int:
        """Number of SuperNodes the SuperLink lists as online (``flwr supernode ls``)."""
        done = self._flwr("supernode", "ls", CONNECTION, "--format", "json")
        try:
            nodes = json.loads(done.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return 0
        return sum(node.get("status") == "online" for node in nodes)

    def _wait_for_nodes(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while (online := self.online_nodes()) < len(self.nodes):
            self._check_processes()
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"only {online} of {len(self.nodes)} SuperNodes came "
                    f"online within {self.startup_timeout:.0f} s"
                )
            time.sleep(1.0)

    # -- runs
    def run_config(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The run config :meth:`run` submits: every node awaited, the Byzantine partitions
        as the server's ground truth, signing with this deployment's keys, then
        ``overrides``."""
        config: dict[str, Any] = {"min-available-nodes": len(self.nodes)}
        byzantine = [node for node in self.nodes if node.role == "byzantine"]
        if byzantine:
            config["byzantine-ids"] = ",".join(str(node.partition_id) for node in byzantine)
            config["attack"] = byzantine[0].attack
        if self.signing:
            config.update({"signing": True, "keys-dir": str(self.keys.server_dir)})
        config.update(overrides or {})
        return config

    def check_run_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The fused run config the apps will see (pyproject defaults + ``config``),
        validated: unknown keys, invalid settings, and a rule that needs more clients than
        there are nodes raise ``ValueError`` before anything runs."""
        from flwr.common.config import get_fused_config_from_dir

        from ..aggregation import get_aggregator
        from ..apps.settings import RunSettings

        try:
            fused = get_fused_config_from_dir(self.app_dir, dict(config))
        except ValueError as exc:
            raise ValueError(
                f"run config: {exc} (every key must be declared in [tool.flwr.app.config] of "
                f"{self.app_dir / 'pyproject.toml'})"
            ) from exc
        settings = RunSettings.from_run_config(fused)
        needed = get_aggregator(settings.strategy, **settings.rule_params(fused)).min_clients()
        if needed > len(self.nodes):
            raise ValueError(
                f"strategy {settings.strategy!r} with these parameters needs at least {needed} "
                f"clients, the deployment has {len(self.nodes)} nodes (add nodes, or lower "
                "'num-malicious'; Multi-Krum can also select fewer with 'num-selected')"
            )
        return fused

    def run(
        self,
        overrides: Mapping[str, Any] | None = None,
        *,
        timeout: float = 900.0,
        echo: TextIO | None = None,
    ) -> RunOutcome:
        """Run the app with ``flwr run`` and wait for its end.

        ``overrides`` are run-config values on top of :meth:`run_config`. The output goes to
        ``logs/flwr-run-<k>.log`` (and to ``echo`` as it arrives). A run still going after
        ``timeout`` seconds, or interrupted, is stopped with ``flwr stop``.
        """
        config = self.run_config(overrides)
        self.check_run_config(config)
        log = self.logs_dir / f"flwr-run-{len(list(self.logs_dir.glob('flwr-run-*.log'))) + 1}.log"
        command = [
            _executable("flwr"),
            "run",
            str(self.app_dir),
            CONNECTION,
            "--stream",
            "--run-config",
            format_run_config(config),
        ]
        lines: list[str] = []
        with (
            log.open("w") as stream,
            subprocess.Popen(
                command,
                env=self.cli_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            ) as process,
        ):
            reader = threading.Thread(
                target=_pump, args=(process.stdout, lines, stream, echo), daemon=True
            )
            reader.start()
            deadline = time.monotonic() + timeout
            try:
                while process.poll() is None and time.monotonic() < deadline:
                    self._observe()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(timeout=1.0)
            finally:
                if process.poll() is None:
                    lines.append(
                        f"deploy: stopping the run after {timeout:.0f} s or an interrupt\n"
                    )
                    self._stop_run(_run_id("".join(lines)))
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                reader.join(timeout=10)
        output = "".join(lines)
        run_id = _run_id(output)
        status, details = ("unknown", "no run id in the output")
        if run_id is not None:
            status, details = run_status(_executable("flwr"), run_id, self.cli_env())
        return RunOutcome(process.returncode, output, run_id, status, details)

    def _stop_run(self, run_id: int | None) -> None:
        if run_id is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._flwr("stop", str(run_id), CONNECTION, timeout=30.0)


def _run_id(output: str) -> int | None:
    match = re.search(r"Successfully started run (\d+)", output)
    return int(match.group(1)) if match else None


def _pump(source: Iterator[str], lines: list[str], log: TextIO, echo: TextIO | None) -> None:
    for line in source:
        lines.append(line)
        log.write(line)
        log.flush()
        if echo is not None:
            echo.write(line)
            echo.flush()


def _executable(name: str) -> str:
    """``name`` from this interpreter's environment, else from PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name
