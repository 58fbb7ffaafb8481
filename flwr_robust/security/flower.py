"""Flower adapters of the security core; the only module of the package that imports flwr.

:func:`arrayrecord_digest` digests a Flower ``ArrayRecord`` straight from its serialized
arrays, without converting them to numpy: :func:`flwr_robust.records.arrayrecord_views` parses
each ``.npy`` header and gives zero-copy views of ``Array.data``, which are hashed in place. The result equals :func:`~.digest.digest_arrays` of the same
arrays, and ``ArrayRecord(list_of_ndarrays)`` digests like :func:`~.digest.digest_ndarrays`.

The digest covers the record's names, their order and every array, so a record whose entries
were reordered (which Flower's legacy API would turn into swapped layers) no longer verifies.
"""

from flwr.app import ArrayRecord

from flwr_robust.records import MalformedArray, arrayrecord_views
from flwr_robust.security.digest import digest_arrays
from flwr_robust.security.errors import DigestError


def arrayrecord_digest(record: ArrayRecord) -> bytes:
    """Digest an ``ArrayRecord`` exactly like the numpy path, without deserializing it."""
    try:
        views = arrayrecord_views(record)
    except MalformedArray as exc:
        raise DigestError(str(exc)) from exc
    return digest_arrays(views)
