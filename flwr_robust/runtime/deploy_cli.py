"""``flwr-robust deploy``: Flower's deployment runtime on this machine, without Docker.

Actions: ``local`` starts a SuperLink and SuperNodes (some Byzantine) as real processes on
127.0.0.1, runs the app with ``flwr run``, prints each round's kept and rejected nodes and
stops everything; ``up`` starts the same topology and leaves it running, ``run`` runs the app
on it, ``down`` stops it. ``keys``, ``certs`` and ``auth-keys`` write signing keys, TLS
certificates and SuperNode authentication keys laid out per machine, and ``register``
registers SuperNode public keys with a SuperLink (the compose files run them as one-shot
services). See :mod:`flwr_robust.runtime.deploy` and ``docs/deployment.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr_robust.runtime.deploy import LocalDeployment, NodeSpec

DEFAULT_DIR = Path(tempfile.gettempdir()) / "flwr-robust-deploy"


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], name: str
) -> argparse.ArgumentParser:
    """Register the ``deploy`` command under ``name``."""
    parser = subparsers.add_parser(
        name,
        help="run the app on real SuperLink/SuperNode processes on this machine",
        description="Flower's deployment runtime on 127.0.0.1 without Docker: one SuperLink, "
        "N SuperNodes (the last --byzantine of them attacking), each with its own port, "
        "FLWR_HOME and log file.",
    )
    actions = parser.add_subparsers(dest="deploy_action", metavar="ACTION", required=True)

    local = actions.add_parser(
        "local",
        help="start, run the app once, print the rounds, stop",
        description="Start the topology, run the app with `flwr run`, print each round's "
        "accuracy and kept/rejected nodes, and stop every process (also on Ctrl-C). Exit "
        "status 0 when the run completed.",
    )
    _add_topology(local)
    _add_run(local)
    local.add_argument(
        "--dir", type=Path, help="run directory for logs and keys (default: a new temporary one)"
    )
    local.set_defaults(handler=_reporting(_local))

    up = actions.add_parser(
        "up",
        help="start the topology and leave it running",
        description="Start the topology in the background and record it in "
        "DIR/deployment.json for `deploy run` and `deploy down`.",
    )
    _add_topology(up)
    _add_dir(up)
    up.set_defaults(handler=_reporting(_up))

    run = actions.add_parser("run", help="run the app on a topology started with `up`")
    _add_run(run)
    _add_dir(run)
    run.set_defaults(handler=_reporting(_run))

    down = actions.add_parser("down", help="stop a topology started with `up`")
    _add_dir(down)
    down.set_defaults(handler=_reporting(_down))

    keys = actions.add_parser(
        "keys",
        help="signing keys laid out per machine",
        description="Run `flwr-robust keys init DIR/all` and copy DIR/server/ (server.key, "
        "truststore.json: the ServerApp's keys-dir) and DIR/node-<i>/ (client.key, server.pub: "
        "node i's signing-key and server-public-key). Keeps existing keys unless --force.",
    )
    keys.add_argument("dir", type=Path, metavar="DIR")
    keys.add_argument("--nodes", type=int, required=True, help="number of SuperNodes")
    keys.add_argument("--force", action="store_true", help="replace existing keys")
    keys.set_defaults(handler=_reporting(_keys))

    certs = actions.add_parser(
        "certs",
        help="TLS certificates from a throw-away CA (demonstrations)",
        description="Write DIR/superlink/ (ca.crt, server.pem, server.key) for the SuperLink "
        "and DIR/ca/ca.crt for everybody else. Keeps existing files unless --force.",
    )
    certs.add_argument("dir", type=Path, metavar="DIR")
    certs.add_argument(
        "--host",
        action="append",
        help="DNS name or IP address of the SuperLink (repeat; default: superlink, localhost "
        "and 127.0.0.1)",
    )
    certs.add_argument("--force", action="store_true", help="replace existing certificates")
    certs.set_defaults(handler=_reporting(_certs))

    auth = actions.add_parser(
        "auth-keys",
        help="SuperNode authentication keys",
        description="Write DIR/supernode-<i>/auth.key (node i's --auth-supernode-private-key) "
        "and DIR/public/supernode-<i>.pub (for `deploy register`). Keeps existing keys "
        "unless --force.",
    )
    auth.add_argument("dir", type=Path, metavar="DIR")
    auth.add_argument("--nodes", type=int, required=True, help="number of SuperNodes")
    auth.add_argument("--force", action="store_true", help="replace existing keys")
    auth.set_defaults(handler=_reporting(_auth_keys))

    register = actions.add_parser(
        "register",
        help="register SuperNode public keys with a SuperLink",
        description="Wait for the SuperLink, then `flwr supernode register` every DIR/*.pub "
        "(keys registered already are fine).",
    )
    register.add_argument("dir", type=Path, metavar="DIR", help="directory of *.pub files")
    register.add_argument("--superlink", required=True, metavar="HOST:PORT")
    register.add_argument("--root-certificates", type=Path, required=True, metavar="CA_CERT")
    register.add_argument("--timeout", type=float, default=300.0, help="seconds to wait")
    register.set_defaults(handler=_reporting(_register))
    return parser


def _reporting(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``handler``, printing a :class:`~flwr_robust.runtime.deploy.DeploymentError` and exiting 1
    instead of raising it."""

    def run(args: argparse.Namespace) -> int:
        from flwr_robust.runtime.deploy import DeploymentError

        try:
            return handler(args)
        except DeploymentError as exc:
            print(f"flwr-robust: error: {exc}", file=sys.stderr)
            return 1

    return run


def _add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help=f"run directory (default: {DEFAULT_DIR})"
    )


def _add_topology(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=5, help="SuperNodes (default: 5)")
    parser.add_argument(
        "--byzantine", type=int, default=1, help="Byzantine nodes among them (default: 1)"
    )
    parser.add_argument("--attack", default="scale", help="their attack (default: scale)")
    parser.add_argument(
        "--signing", action="store_true", help="sign models and updates (keys in DIR/keys)"
    )
    parser.add_argument("--tls", action="store_true", help="TLS with a throw-away CA")
    parser.add_argument(
        "--supernode-auth", action="store_true", help="Flower's SuperNode authentication (--tls)"
    )
    parser.add_argument(
        "--isolation",
        choices=("subprocess", "process"),
        default="subprocess",
        help="'process' starts a separate flower-superexec per component, as the compose file",
    )
    parser.add_argument(
        "--startup-timeout", type=float, default=180.0, help="seconds to wait for the nodes"
    )


def _add_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=3, help="server rounds (default: 3)")
    parser.add_argument(
        "--strategy", default="multi_krum", help="aggregation rule (default: multi_krum)"
    )
    parser.add_argument(
        "--run-config",
        action="append",
        default=[],
        metavar="'KEY=VALUE ...'",
        help="more run config, TOML values as for `flwr run` (strings in quotes); "
        "'num-malicious' defaults to the number of Byzantine nodes",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds before the run is stopped"
    )


def _topology(args: argparse.Namespace, run_dir: Path) -> LocalDeployment:
    from flwr_robust.runtime.deploy import LocalDeployment, plan_nodes

    return LocalDeployment(
        run_dir,
        plan_nodes(args.nodes, args.byzantine, args.attack),
        signing=args.signing,
        tls=args.tls,
        supernode_auth=args.supernode_auth,
        isolation=args.isolation,
        startup_timeout=args.startup_timeout,
    )


def _overrides(args: argparse.Namespace, deployment: LocalDeployment) -> dict[str, Any]:
    from flwr.common.config import parse_config_args

    byzantine = sum(node.role == "byzantine" for node in deployment.nodes)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return {
        "strategy": args.strategy,
        "num-server-rounds": args.rounds,
        "num-malicious": byzantine,
        "results-file": str(deployment.run_dir / f"results-{stamp}.jsonl"),
        **parse_config_args(args.run_config),
    }


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit, so that the deployment is stopped as on Ctrl-C."""

    def leave(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _local(args: argparse.Namespace) -> int:
    run_dir = args.dir or Path(tempfile.mkdtemp(prefix="flwr-robust-deploy-"))
    deployment = _topology(args, run_dir)
    overrides = _overrides(args, deployment)
    deployment.check_run_config(deployment.run_config(overrides))
    print(f"starting {len(deployment.nodes)} SuperNodes; logs in {deployment.logs_dir}")
    try:
        with _sigterm_as_exit(), deployment:
            code = _run_and_report(deployment, overrides, args.timeout)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    finally:  # also when SIGTERM ends the command
        print(f"stopped; logs, keys and results are in {deployment.run_dir}")
    return code


def _up(args: argparse.Namespace) -> int:
    deployment = _topology(args, args.dir)
    with _sigterm_as_exit():
        deployment.start()
    security = "TLS" if deployment.tls else "insecure"
    print(
        f"SuperLink at {deployment.address} ({security}), {len(deployment.nodes)} SuperNodes "
        f"online; logs in {deployment.logs_dir}"
    )
    for node in deployment.nodes:
        print(
            f"  partition {node.partition_id}: {node.role}"
            + (f" ({node.attack})" if node.attack else "")
        )
    print(
        f"run the app:  flwr-robust deploy run --dir {deployment.run_dir} --rounds 3\n"
        f"or with flwr: FLWR_HOME={deployment.home('cli')} flwr run {deployment.app_dir} "
        f'flwr-robust-local --stream --run-config "..."\n'
        f"stop it:      flwr-robust deploy down --dir {deployment.run_dir}"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    from flwr_robust.runtime.deploy import LocalDeployment

    deployment = LocalDeployment.attach(args.dir)
    if not deployment.running:
        raise ValueError(f"the deployment in {args.dir} is not running (`deploy up` first)")
    return _run_and_report(deployment, _overrides(args, deployment), args.timeout)


def _down(args: argparse.Namespace) -> int:
    from flwr_robust.runtime.deploy import LocalDeployment

    deployment = LocalDeployment.attach(args.dir)
    left = deployment.stop()
    if left:
        print(f"still running after SIGKILL: {left}", file=sys.stderr)
        return 1
    print(f"stopped the deployment in {deployment.run_dir}")
    return 0


def _run_and_report(deployment: LocalDeployment, overrides: dict[str, Any], timeout: float) -> int:
    outcome = deployment.run(overrides, timeout=timeout, echo=sys.stdout)
    results = Path(overrides["results-file"])
    if results.exists():
        records = [json.loads(line) for line in results.read_text().splitlines() if line]
        _print_rounds(records, {n.partition_id: n for n in deployment.nodes})
    print(f"run {outcome.run_id}: {outcome.status}; results in {results}")
    if not outcome.ok:
        print(f"flwr-robust: the run did not complete: {outcome.status_details}", file=sys.stderr)
        return 1
    return 0


def _print_rounds(records: Sequence[dict[str, Any]], nodes: dict[int, NodeSpec]) -> None:
    """One line per round: accuracy, kept partitions, rejected partitions and why."""

    def label(node_id: str, partitions: dict[str, int]) -> str:
        partition = partitions.get(str(node_id))
        if partition is None:
            return f"node {node_id}"
        return f"p{partition}" + (" (byzantine)" if nodes[partition].role == "byzantine" else "")

    print(f"{'ROUND':<6}{'ACCURACY':<10}{'KEPT':<24}REJECTED")
    for record in records:
        partitions = record.get("partitions", {})
        kept = " ".join(label(str(n), partitions) for n in record.get("kept", [])) or "-"
        rejected = (
            "; ".join(
                f"{label(n, partitions)}: {reason[:70]}"
                for n, reason in record.get("rejected", {}).items()
            )
            or "-"
        )
        accuracy = "-" if record.get("accuracy") is None else f"{record['accuracy']:.4f}"
        print(f"{record['round']:<6}{accuracy:<10}{kept:<24}{rejected}")


def _keys(args: argparse.Namespace) -> int:
    from flwr_robust.runtime.deploy import DeploymentKeys, write_deployment_keys

    if DeploymentKeys(args.dir).server_dir.exists() and not args.force:
        print(f"signing keys exist in {args.dir}; kept")
        return 0
    keys = write_deployment_keys(args.dir, args.nodes)
    print(
        f"signing keys for the server ({keys.server_dir}) and {args.nodes} nodes "
        f"({keys.node_dir(0).name} ...) in {args.dir}"
    )
    return 0


def _certs(args: argparse.Namespace) -> int:
    from flwr_robust.runtime.deploy import TlsFiles, write_tls_certificates

    if TlsFiles(args.dir).ca_cert.exists() and not args.force:
        print(f"certificates exist in {args.dir}; kept")
        return 0
    hosts = args.host or ["superlink", "localhost", "127.0.0.1"]
    files = write_tls_certificates(args.dir, hosts)
    print(
        f"SuperLink certificate for {', '.join(hosts)} in {files.superlink_dir}; "
        f"CA certificate {files.ca_cert}"
    )
    return 0


def _auth_keys(args: argparse.Namespace) -> int:
    from flwr_robust.runtime.deploy import AuthKeys, write_auth_keys

    if AuthKeys(args.dir).public_dir.exists() and not args.force:
        print(f"SuperNode authentication keys exist in {args.dir}; kept")
        return 0
    keys = write_auth_keys(args.dir, args.nodes)
    print(
        f"{args.nodes} SuperNode authentication key pairs in {args.dir}; public keys in "
        f"{keys.public_dir}"
    )
    return 0


def _register(args: argparse.Namespace) -> int:
    from flwr_robust.runtime.deploy import register_supernode, wait_for_superlink, write_cli_config
    from flwr_robust.runtime.launch import flower_env

    public_keys = sorted(args.dir.glob("*.pub"))
    if not public_keys:
        raise ValueError(f"no *.pub files in {args.dir}")
    wait_for_superlink(args.superlink, args.root_certificates, args.timeout)
    with tempfile.TemporaryDirectory(prefix="flwr-home-") as home:
        write_cli_config(Path(home), args.superlink, args.root_certificates.resolve())
        for public_key in public_keys:
            new = register_supernode(flower_env(Path(home)), public_key)
            print(f"{public_key.name}: {'registered' if new else 'registered already'}")
    return 0
