"""``flwr-robust keys``: create keys and manage the server's trust store.

Actions: ``init`` (server key pair, N client key pairs, trust store), ``add`` (register a
public key or generate a new client key), ``revoke`` (by exact name or full key id) and
``show``. The directory layout is described in :mod:`flwr_robust.security.keydir`; every
action warns on stderr about group- or world-writable parts of it.
"""

import argparse
import sys
from collections.abc import Sequence

from flwr_robust.security.keydir import KeyDir, check_client_name, init_key_dir, make_key_dirs
from flwr_robust.security.keys import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    algorithm_of,
    generate_private_key,
    key_id,
    load_public_key,
    save_private_key,
    save_public_key,
)
from flwr_robust.security.truststore import TrustEntry, TrustStore


def add_parser(
    subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]", name: str
) -> argparse.ArgumentParser:
    """Register the ``keys`` command under ``name``."""
    parser = subparsers.add_parser(
        name,
        help="create signing keys and manage the trust store",
        description="Create signing keys (Ed25519, ECDSA P-256/P-384) and manage the server's "
        "trust store of client keys.",
    )
    actions = parser.add_subparsers(dest="keys_action", metavar="ACTION", required=True)

    init = actions.add_parser(
        "init",
        help="create a server key pair, N client key pairs and a trust store",
        description="Layout: DIR/server.key, DIR/server.pub, DIR/truststore.json, "
        "DIR/clients/client-<i>.key and .pub. Private keys are written with mode 0600.",
    )
    init.add_argument("dir", metavar="DIR", help="keys directory (created if missing)")
    init.add_argument("--clients", type=int, required=True, metavar="N", help="client key pairs")
    _add_algorithm(init)
    init.add_argument("--force", action="store_true", help="overwrite existing key files")
    init.set_defaults(handler=_init)

    add = actions.add_parser("add", help="add a client public key to the trust store")
    add.add_argument("dir", metavar="DIR", help="keys directory")
    source = add.add_mutually_exclusive_group(required=True)
    source.add_argument("--public-key", metavar="FILE", help="public key file (PEM or OpenSSH)")
    source.add_argument(
        "--generate", metavar="NAME", help="generate clients/NAME.key and .pub, and add it"
    )
    add.add_argument("--name", help="name of the key given with --public-key")
    _add_algorithm(add, " (with --generate)")
    add.set_defaults(handler=_add)

    revoke = actions.add_parser("revoke", help="revoke a client key")
    revoke.add_argument("dir", metavar="DIR", help="keys directory")
    revoke.add_argument(
        "key",
        metavar="KEY_ID_OR_NAME",
        help="the full key id (32 hex digits) or the exact name; prefixes are not accepted",
    )
    revoke.set_defaults(handler=_revoke)

    show = actions.add_parser("show", help="list the server key and the trust store")
    show.add_argument("dir", metavar="DIR", help="keys directory")
    show.set_defaults(handler=_show)
    return parser


def _add_algorithm(parser: argparse.ArgumentParser, suffix: str = "") -> None:
    parser.add_argument(
        "--algorithm",
        choices=ALGORITHMS,
        default=DEFAULT_ALGORITHM,
        help=f"key algorithm (default: {DEFAULT_ALGORITHM}){suffix}",
    )


def _init(args: argparse.Namespace) -> int:
    layout, server = init_key_dir(args.dir, args.clients, args.algorithm, args.force)
    print(f"server key {key_id(server)} ({args.algorithm}): {layout.server_key}")
    print(f"{args.clients} client key(s) in {layout.clients}, trust store {layout.truststore}")
    _warn_permissions(layout)
    return 0


def _warn_permissions(layout: KeyDir) -> None:
    for message in layout.permission_warnings():
        print(f"flwr-robust: warning: {message}", file=sys.stderr)


def _load_store(layout: KeyDir) -> TrustStore:
    _warn_permissions(layout)
    if not layout.truststore.exists():
        raise ValueError(
            f"no trust store at {layout.truststore} (run 'flwr-robust keys init' first)"
        )
    return TrustStore.load(layout.truststore)


def _add(args: argparse.Namespace) -> int:
    layout = KeyDir(args.dir)
    store = _load_store(layout)
    if args.public_key is not None:
        public_key = load_public_key(args.public_key)
        if layout.server_pub.exists() and key_id(public_key) == key_id(
            load_public_key(layout.server_pub)
        ):
            raise ValueError(
                f"refusing to add {args.public_key}: it is the server's public key "
                f"{key_id(public_key)} ({layout.server_pub}); each client needs its own key"
            )
        entry = store.add(public_key, args.name)
    else:
        if args.name is not None:
            raise ValueError("--name goes with --public-key; --generate takes the name itself")
        name = check_client_name(args.generate)
        paths = [layout.client_key(name), layout.client_pub(name)]
        if any(path.exists() for path in paths):
            raise ValueError(f"refusing to overwrite existing key file {paths[0]}")
        private = generate_private_key(args.algorithm)
        entry = store.add(private.public_key(), name)
        make_key_dirs(layout)
        save_private_key(private, paths[0])
        save_public_key(private, paths[1])
    store.save()
    print(f"added key {entry.key_id} ({entry.algorithm}, {entry.name or 'unnamed'})")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    store = _load_store(KeyDir(args.dir))
    entry = store.find(args.key)
    if entry.revoked:
        print(f"key {entry.key_id} ({entry.name or 'unnamed'}) was already revoked")
        return 0
    entry = store.revoke(entry.key_id)
    store.save()
    print(f"revoked key {entry.key_id} ({entry.name or 'unnamed'})")
    return 0


def _show(args: argparse.Namespace) -> int:
    layout = KeyDir(args.dir)
    if layout.server_pub.exists():
        server = load_public_key(layout.server_pub)
        print(f"server key: {key_id(server)} ({algorithm_of(server)})")
    else:
        print(f"server key: none ({layout.server_pub} missing)")
    store = _load_store(layout)
    _print_table(
        ("KEY ID", "NAME", "ALGORITHM", "STATUS", "ADDED"), [_row(entry) for entry in store]
    )
    return 0


def _row(entry: TrustEntry) -> tuple[str, ...]:
    status = f"revoked {entry.revoked_at:%Y-%m-%d}" if entry.revoked_at else "active"
    return (entry.key_id, entry.name or "-", entry.algorithm, status, f"{entry.added_at:%Y-%m-%d}")


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        sys.stdout.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")
