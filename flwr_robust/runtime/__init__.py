"""Running federations: ``flwr run`` from Python (:mod:`.launch`), real SuperLink and
SuperNode processes on this machine (:mod:`.deploy`, :mod:`.deploy_cli`) and the demo
(:mod:`.demo`)."""
