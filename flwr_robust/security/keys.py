"""Signing keys: generation, PEM/OpenSSH loading, PEM saving, key ids, sign and verify.

Three algorithms are supported, named as everywhere in this package:

- ``"ed25519"`` (default): Ed25519 (RFC 8032).
- ``"ecdsa-p256"``: ECDSA on NIST P-256 with SHA-256, DER-encoded signatures.
- ``"ecdsa-p384"``: ECDSA on NIST P-384 with SHA-384, DER-encoded signatures (the curve of
  Flower's SuperNode authentication keys, so such a key can double as the signing key).

Key files are written as PEM: private keys PKCS#8 (unencrypted unless a password is given,
mode 0600), public keys SubjectPublicKeyInfo. Loading also accepts OpenSSH keys
(``ssh-keygen -t ecdsa -b 384`` or ``-t ed25519``), the format Flower uses.

The key id is the lowercase hex of the first 16 bytes (128 bits) of SHA-256 over the DER
SubjectPublicKeyInfo of the public key (32 hex characters). It is a lookup handle: every
verification uses the public key stored under the id, never the id alone.
"""

import hashlib
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from flwr_robust._files import atomic_write
from flwr_robust.security.errors import KeyFileError, UnsupportedKeyError

ED25519 = "ed25519"
ECDSA_P256 = "ecdsa-p256"
ECDSA_P384 = "ecdsa-p384"
ALGORITHMS = (ED25519, ECDSA_P256, ECDSA_P384)
DEFAULT_ALGORITHM = ED25519
KEY_ID_BYTES = 16

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey

# algorithm -> (curve class, hash class) for ECDSA
_ECDSA: dict[str, tuple[type[ec.EllipticCurve], type[hashes.HashAlgorithm]]] = {
    ECDSA_P256: (ec.SECP256R1, hashes.SHA256),
    ECDSA_P384: (ec.SECP384R1, hashes.SHA384),
}
_CURVE_NAMES: dict[str, str] = {str(curve.name): name for name, (curve, _) in _ECDSA.items()}
_OPENSSH_PRIVATE = b"-----BEGIN OPENSSH PRIVATE KEY-----"
_OPENSSH_PUBLIC = (b"ssh-ed25519 ", b"ecdsa-sha2-")


def check_algorithm(algorithm: str) -> str:
    """Return ``algorithm`` if supported, else raise :class:`UnsupportedKeyError`."""
    if algorithm not in ALGORITHMS:
        raise UnsupportedKeyError(
            f"unsupported signing algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}"
        )
    return algorithm


def generate_private_key(algorithm: str = DEFAULT_ALGORITHM) -> PrivateKey:
    """Generate a new private key for ``algorithm``."""
    check_algorithm(algorithm)
    if algorithm == ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    curve, _ = _ECDSA[algorithm]
    return ec.generate_private_key(curve())


def algorithm_of(key: object) -> str:
    """Return the algorithm name of a private or public key.

    Raises :class:`UnsupportedKeyError` naming the key type (or curve) when unsupported.
    """
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return ED25519
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        try:
            return _CURVE_NAMES[str(key.curve.name)]
        except KeyError:
            raise UnsupportedKeyError(
                f"unsupported elliptic curve {key.curve.name!r} ({type(key).__name__}); "
                "expected secp256r1 (P-256) or secp384r1 (P-384)"
            ) from None
    raise UnsupportedKeyError(
        f"unsupported key type {type(key).__name__}; expected an Ed25519 key or an ECDSA "
        "P-256/P-384 key"
    )


def public_key_of(key: PrivateKey | PublicKey) -> PublicKey:
    """Return the public key of a private key (a public key is returned as is)."""
    algorithm_of(key)
    if isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        return key.public_key()
    return key


def key_id(key: PrivateKey | PublicKey) -> str:
    """Return the stable key id: hex of SHA-256(DER SubjectPublicKeyInfo)[:16]."""
    der = public_key_of(key).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()[:KEY_ID_BYTES].hex()


def sign(private_key: PrivateKey, message: bytes) -> bytes:
    """Sign ``message`` with the algorithm of ``private_key``."""
    algorithm = algorithm_of(private_key)
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign(message)
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise UnsupportedKeyError(f"cannot sign with a public key ({type(private_key).__name__})")
    _, hash_cls = _ECDSA[algorithm]
    return private_key.sign(message, ec.ECDSA(hash_cls()))


def verify(public_key: PublicKey, signature: bytes, message: bytes) -> bool:
    """Return whether ``signature`` is valid for ``message`` under ``public_key``."""
    algorithm = algorithm_of(public_key)
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            _, hash_cls = _ECDSA[algorithm]
            public_key.verify(signature, message, ec.ECDSA(hash_cls()))
        else:
            raise UnsupportedKeyError(
                f"cannot verify with a private key ({type(public_key).__name__})"
            )
    except InvalidSignature:
        return False
    return True


def private_key_to_pem(key: PrivateKey, password: bytes | None = None) -> bytes:
    """Serialize a private key as PKCS#8 PEM, encrypted with ``password`` if given."""
    algorithm_of(key)
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def public_key_to_pem(key: PrivateKey | PublicKey) -> bytes:
    """Serialize the public key of ``key`` as SubjectPublicKeyInfo PEM."""
    return public_key_of(key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_key_from_bytes(data: bytes, password: bytes | None = None) -> PrivateKey:
    """Parse a private key from PEM (PKCS#8 or traditional) or OpenSSH bytes."""
    key: Any
    try:
        if data.lstrip().startswith(_OPENSSH_PRIVATE):
            key = serialization.load_ssh_private_key(data, password)
        else:
            key = serialization.load_pem_private_key(data, password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"cannot parse private key: {exc}") from exc
    algorithm_of(key)
    return key


def public_key_from_bytes(data: bytes) -> PublicKey:
    """Parse a public key from PEM (SubjectPublicKeyInfo) or a one-line OpenSSH key."""
    key: Any
    try:
        if data.lstrip().startswith(_OPENSSH_PUBLIC):
            key = serialization.load_ssh_public_key(data.strip())
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"cannot parse public key: {exc}") from exc
    algorithm_of(key)
    return key


def save_private_key(key: PrivateKey, path: str | Path, password: bytes | None = None) -> None:
    """Write a private key as PKCS#8 PEM with mode 0600 (atomically)."""
    atomic_write(Path(path), private_key_to_pem(key, password), mode=0o600)


def save_public_key(key: PrivateKey | PublicKey, path: str | Path) -> None:
    """Write the public key of ``key`` as SubjectPublicKeyInfo PEM with mode 0644."""
    atomic_write(Path(path), public_key_to_pem(key), mode=0o644)


def load_private_key(path: str | Path, password: bytes | None = None) -> PrivateKey:
    """Load a private key file (PEM or OpenSSH)."""
    try:
        return private_key_from_bytes(Path(path).read_bytes(), password)
    except (KeyFileError, UnsupportedKeyError) as exc:
        raise type(exc)(f"{path}: {exc}") from exc


def load_public_key(path: str | Path) -> PublicKey:
    """Load a public key file (PEM or OpenSSH)."""
    try:
        return public_key_from_bytes(Path(path).read_bytes())
    except (KeyFileError, UnsupportedKeyError) as exc:
        raise type(exc)(f"{path}: {exc}") from exc
