"""The learning task of the bundled apps: offline datasets and partitioners (:mod:`.data`),
small torch models (:mod:`.models`) and local training and evaluation (:mod:`.training`)."""
