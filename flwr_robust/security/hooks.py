"""Server-side integrity as strategy hooks (both Flower APIs, any aggregation rule).

- :class:`SignGlobalModel` signs every train/evaluate instruction: the global model's digest,
  the final config sent with it (after every other hook added its entries), the run and the
  round.
- :class:`VerifyUpdateSignatures` rejects, before aggregation, every training reply that is
  unsigned, signed by an unknown or revoked key, forged or altered (arrays or metrics such as
  ``num-examples``), replayed from another run or round, trained on another global model, or
  a second update under one key; accepted replies get the signer's key id as their stable
  identity, which stateful rules key their state by. Evaluation replies are checked the
  same way (their metrics and count, signed for purpose ``evaluation``), so no client can
  report an accuracy it did not sign.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..strategy.hooks import StrategyHook

if TYPE_CHECKING:
    from ..strategy.engine import ClientReply
from .digest import cached_digest, digest_arrays
from .errors import DigestError
from .keys import PrivateKey, key_id
from .signing import NO_ARRAYS_DIGEST, Purpose, sign_global_model
from .truststore import TrustStore
from .verifier import Reply, verify_replies

logger = logging.getLogger("flwr.robust")


class SignGlobalModel(StrategyHook):
    """Adds the server's signature (``frs-*`` config entries) to every instruction.

    Parameters
    ----------
    private_key : PrivateKey
        The server key (Ed25519 or ECDSA P-256/P-384).
    run_id : int
        The Flower run id, bound into every signature so instructions of one run cannot be
        replayed into another.
    """

    def __init__(self, private_key: PrivateKey, run_id: int) -> None:
        self.private_key = private_key
        self.run_id = int(run_id)
        self.key_id = key_id(private_key)

    def seal_instruction(
        self,
        server_round: int,
        purpose: str,
        global_arrays: dict[str, np.ndarray],
        config: Mapping[str, Any],
    ) -> dict[str, Any]:
        """The signature over the model and the final config (run by the strategy after
        every hook's :meth:`~StrategyHook.on_instruction`)."""
        bundle = sign_global_model(
            self.private_key,
            run_id=self.run_id,
            server_round=server_round,
            arrays_digest=cached_digest(global_arrays),
            config=config,
            instruction=purpose,
        )
        return dict(bundle.to_config())


class VerifyUpdateSignatures(StrategyHook):
    """Rejects training replies whose signature does not prove an honest provenance.

    The trust store file is re-read between rounds when it changed (key rotation and
    revocation without a restart); an unreadable new version is logged and the previous
    keys stay in force. Rejection reasons are the verifier's codes (``unsigned``,
    ``bad-signature``, ``unknown-key``, ``revoked-key``, ``wrong-algorithm``, ``wrong-run``,
    ``replayed-round``, ``stale-base``, ``duplicate-key``, ...); ``counts`` totals them.

    Parameters
    ----------
    trust_store : TrustStore
        Which client keys may send updates.
    run_id : int
        The Flower run id the updates must be signed for.
    """

    def __init__(self, trust_store: TrustStore, run_id: int) -> None:
        self.trust_store = trust_store
        self.run_id = int(run_id)
        self.counts: Counter[str] = Counter()

    def on_replies(
        self,
        server_round: int,
        global_arrays: dict[str, np.ndarray],
        replies: Sequence[ClientReply],
    ) -> dict[int, str]:
        return self._verify(server_round, global_arrays, replies, Purpose.UPDATE)

    def on_evaluation_replies(
        self,
        server_round: int,
        global_arrays: dict[str, np.ndarray],
        replies: Sequence[ClientReply],
    ) -> dict[int, str]:
        return self._verify(server_round, global_arrays, replies, Purpose.EVALUATION)

    def _verify(
        self,
        server_round: int,
        global_arrays: dict[str, np.ndarray],
        replies: Sequence[ClientReply],
        purpose: Purpose,
    ) -> dict[int, str]:
        self._reload(server_round)
        received = [
            Reply(
                client=reply.node_id,
                arrays_digest=(
                    NO_ARRAYS_DIGEST if purpose is Purpose.EVALUATION
                    else _digest_or_none(reply.arrays)
                ),
                metrics=dict(reply.signed_content),
                signature=reply.signature,
            )
            for reply in replies
        ]
        verdicts = verify_replies(
            received,
            trust_store=self.trust_store,
            run_id=self.run_id,
            server_round=server_round,
            base_digest=cached_digest(global_arrays),
            purpose=purpose,
        )
        rejected = {}
        for reply, verdict in zip(replies, verdicts, strict=True):
            if verdict.accepted:
                reply.identity = f"key:{verdict.key_id}"
            else:
                self.counts[str(verdict.reason)] += 1
                rejected[reply.node_id] = f"{verdict.reason}: {verdict.detail}"
        return rejected

    def _reload(self, server_round: int) -> None:
        """Re-read a changed trust store; on any failure keep the last good keys."""
        try:
            if self.trust_store.reload_if_changed():
                logger.info("round %d: trust store reloaded", server_round)
        except Exception as exc:  # noqa: BLE001 - a broken store must never stop a round
            logger.error(
                "round %d: trust store not reloaded, keeping the last good keys: %s: %s",
                server_round, type(exc).__name__, exc,
            )


def _digest_or_none(arrays: Mapping[str, np.ndarray] | None) -> bytes | None:
    if arrays is None:
        return None
    try:
        return digest_arrays(arrays)
    except DigestError:
        return None
