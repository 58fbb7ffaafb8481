"""ClientApp: trains a small torch model on the node's partition, honestly or as a configured
Byzantine attacker, for Message-API and legacy servers alike (run config ``api``); verifies
the server's signature and signs its updates when run config ``signing`` is on."""

from flwr.app import Context, Message
from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype
from flwr.clientapp import ClientApp

from flwr_robust.apps import client
from flwr_robust.privacy import local_dp_mod
from flwr_robust.security.mod import fault_injection_mod, integrity_mod

# fault_injection_mod is inert unless run config 'integrity-faults' names this node (tests).
# local_dp_mod (inert unless 'dp-clip' and 'dp-noise-multiplier' are set) comes after
# integrity_mod: it sees the reply first, so the noised update is the one that gets signed.
app = ClientApp(mods=[fault_injection_mod, integrity_mod, local_dp_mod])


def _legacy(message: Message, context: Context) -> bool:
    """Whether ``message`` is a legacy-API instruction: read from its records (an experiment
    batch runs legacy and Message-API cells under one base run config), else from ``api``."""
    names = set(message.content.keys())
    if names & {"fitins.parameters", "evaluateins.parameters"}:
        return True
    if "arrays" in names:
        return False
    return context.run_config.get("api", "message") == "legacy"


@app.train()
def train(message: Message, context: Context) -> Message:
    """Local training on the node's partition."""
    if _legacy(message, context):
        return handle_legacy_message_from_msgtype(client.legacy_client_fn, message, context)
    return client.train_reply(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluation of the received global model on the node's validation split."""
    if _legacy(message, context):
        return handle_legacy_message_from_msgtype(client.legacy_client_fn, message, context)
    return client.evaluate_reply(message, context)


@app.query()
def query(message: Message, context: Context) -> Message:
    """The node's partition id (the server's evaluation roster)."""
    return client.roster_reply(message, context)
