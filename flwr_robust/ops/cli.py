"""``flwr-robust audit``: check audit logs and checkpoints after (or during) a run.

Actions: ``verify FILE`` checks an audit log's hash chain and model lineage (see
:mod:`flwr_robust.ops.audit`); ``checkpoints DIR`` lists the checkpoints of a directory and checks
each one's digest (see :mod:`flwr_robust.ops.checkpoint`). Both print a summary and exit 0 when
everything verifies, 1 when something does not, 2 on usage or I/O errors.
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_BROKEN, EXIT_ERROR = 0, 1, 2


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], name: str
) -> argparse.ArgumentParser:
    """Register the ``audit`` command under ``name``."""
    parser = subparsers.add_parser(
        name,
        help="verify audit logs and checkpoints",
        description="Verify a run's audit log (hash chain, model lineage) and checkpoints. "
        "Exit status: 0 verified, 1 broken, 2 usage or I/O error.",
    )
    actions = parser.add_subparsers(dest="audit_action", metavar="ACTION", required=True)

    verify = actions.add_parser(
        "verify",
        help="check an audit log's hash chain and model lineage",
        description="Check every line of a JSONL audit log: canonical form, hash, chain and "
        "model lineage. Prints one summary line.",
    )
    verify.add_argument("file", metavar="FILE", help="the audit log (JSONL)")
    verify.add_argument(
        "--head",
        metavar="HASH",
        help="expected hash of the last line, kept elsewhere: detects lines cut from the end",
    )
    verify.set_defaults(handler=_verify)

    checkpoints = actions.add_parser(
        "checkpoints",
        help="list checkpoints and check their digests",
        description="List the checkpoints of a directory (round, status, digest, time) and "
        "check that each file matches its recorded digest.",
    )
    checkpoints.add_argument("dir", metavar="DIR", help="the checkpoint directory")
    checkpoints.set_defaults(handler=_checkpoints)
    return parser


def _error(message: object) -> int:
    print(f"flwr-robust: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _verify(args: argparse.Namespace) -> int:
    from .audit import verify_audit_log

    try:
        result = verify_audit_log(args.file, expected_head=args.head)
    except OSError as exc:
        return _error(exc)
    print(result.summary())
    return EXIT_OK if result.ok else EXIT_BROKEN


def _checkpoints(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, CheckpointStore

    store = CheckpointStore(args.dir, keep_last=None)
    if not store.directory.is_dir():
        return _error(f"{args.dir} is not a directory")
    rows, broken = [], 0
    try:
        for bad in (False, True):
            for server_round in store.rounds(bad=bad):
                status = "bad" if bad else "good"
                try:
                    checkpoint = store.load(server_round, bad=bad)
                except CheckpointError as exc:
                    broken += 1
                    rows.append((str(server_round), status, "INVALID", str(exc)))
                    continue
                meta = checkpoint.metadata
                rows.append((str(server_round), status, checkpoint.digest, str(meta.get("time"))))
    except OSError as exc:
        return _error(exc)
    rows.sort(key=lambda row: int(row[0]))
    header = ("ROUND", "STATUS", "DIGEST", "TIME")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    print(f"{args.dir}: {len(rows)} checkpoints, {broken} invalid")
    return EXIT_BROKEN if broken else EXIT_OK
