"""A Flower user's quickstart, Message API: FedAvg swapped for flwr-robust's Krum by
changing the import only. Node 0 sends a boosted update, which Krum leaves out."""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from flwr_robust.strategy import Krum  # was: from flwr.serverapp.strategy import Krum

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    strategy = Krum(num_malicious_nodes=1, fraction_evaluate=0.0)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros(8, dtype=np.float32)]),
        num_rounds=int(context.run_config["num-server-rounds"]),
    )


@client.train()
def train(msg: Message, context: Context) -> Message:
    weights = msg.content["arrays"].to_numpy_ndarrays()
    node = int(context.node_config["partition-id"])
    step = 1000.0 if node == 0 else 1.0 + 0.01 * node
    updated = [w + np.float32(step) for w in weights]
    content = RecordDict(
        {"arrays": ArrayRecord(updated), "metrics": MetricRecord({"num-examples": 10})}
    )
    return Message(content=content, reply_to=msg)
