"""Layout of a keys directory, as written by ``flwr-robust keys init``::

    DIR/
      server.key             server private key (PKCS#8 PEM, mode 0600): server only
      server.pub             server public key (SPKI PEM): every client
      truststore.json        client public keys allowed to sign updates: server only
      clients/
        client-0.key         client private key (mode 0600): that client only
        client-0.pub         its public key
        ...

In deployment, copy to each machine only what it needs (server: ``server.key`` and
``truststore.json``; client *i*: ``server.pub`` and ``clients/client-i.key``).

Whoever can write the directory or one of these files can swap a key or add one to the trust
store: :meth:`KeyDir.permission_warnings` names those that are group- or world-writable.
"""

import re
import stat
from dataclasses import dataclass
from pathlib import Path

from flwr_robust.security.keys import (
    DEFAULT_ALGORITHM,
    PrivateKey,
    generate_private_key,
    save_private_key,
    save_public_key,
)
from flwr_robust.security.truststore import TrustStore

_CLIENT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_client_name(name: str) -> str:
    """Return ``name`` if usable as a key file name, else raise ``ValueError``."""
    if not _CLIENT_NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid client name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class KeyDir:
    """Paths inside a keys directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def server_key(self) -> Path:
        """The server's private key."""
        return self.root / "server.key"

    @property
    def server_pub(self) -> Path:
        """The server's public key."""
        return self.root / "server.pub"

    @property
    def truststore(self) -> Path:
        """The trust store of client keys."""
        return self.root / "truststore.json"

    @property
    def clients(self) -> Path:
        """The directory of client key pairs."""
        return self.root / "clients"

    def client_key(self, name: str) -> Path:
        """The private key of client ``name`` (e.g. ``client-0``)."""
        return self.clients / f"{check_client_name(name)}.key"

    def client_pub(self, name: str) -> Path:
        """The public key of client ``name``."""
        return self.clients / f"{check_client_name(name)}.pub"

    def permission_warnings(self) -> list[str]:
        """One message per existing directory or file of this layout (the directory,
        ``clients/``, the server key pair, the trust store and the client key pairs) that is
        group- or world-writable."""
        paths = [self.root, self.clients, self.server_key, self.server_pub, self.truststore]
        if self.clients.is_dir():
            paths += sorted(self.clients.glob("*.key")) + sorted(self.clients.glob("*.pub"))
        warnings = []
        for path in paths:
            try:
                mode = stat.S_IMODE(path.stat().st_mode)
            except OSError:  # absent (or unreachable): nothing to protect here
                continue
            if mode & 0o022:
                who = {0o020: "its group", 0o002: "all users"}.get(mode & 0o022, "everyone")
                warnings.append(
                    f"{path} is writable by {who} (mode {mode:04o}), who could replace keys or "
                    f"trust entries; run 'chmod go-w {path}'"
                )
        return warnings


def make_key_dirs(layout: KeyDir) -> None:
    """Create the directory and ``clients/`` if missing, never group- or world-writable."""
    layout.root.mkdir(mode=0o755, parents=True, exist_ok=True)
    layout.clients.mkdir(mode=0o755, exist_ok=True)


def init_key_dir(
    directory: str | Path, clients: int, algorithm: str = DEFAULT_ALGORITHM, force: bool = False
) -> tuple[KeyDir, PrivateKey]:
    """Create a server key pair, ``clients`` client key pairs (``client-0`` ...) and a trust
    store of the client keys under ``directory`` (the layout of :class:`KeyDir`); return the
    layout and the server key. Refuses to overwrite existing key files unless ``force``."""
    layout = KeyDir(Path(directory))
    if clients < 0:
        raise ValueError(f"--clients must be >= 0, got {clients}")
    names = [f"client-{i}" for i in range(clients)]
    targets = [layout.server_key, layout.server_pub, layout.truststore]
    targets += [path for n in names for path in (layout.client_key(n), layout.client_pub(n))]
    existing = [str(path) for path in targets if path.exists()]
    if existing and not force:
        raise ValueError(
            f"refusing to overwrite {len(existing)} existing file(s), e.g. {existing[0]} "
            "(use --force)"
        )
    make_key_dirs(layout)
    server = generate_private_key(algorithm)
    save_private_key(server, layout.server_key)
    save_public_key(server, layout.server_pub)
    store = TrustStore()
    for name in names:
        client = generate_private_key(algorithm)
        save_private_key(client, layout.client_key(name))
        save_public_key(client, layout.client_pub(name))
        store.add(client.public_key(), name)
    store.save(layout.truststore)
    return layout, server
