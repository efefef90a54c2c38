"""Relay nodes joined over NATS (``--nats``): one stream across producers, workers and viewers
on different nodes.

- :mod:`relay.cluster.messages`: subjects and the JSON the nodes exchange (no I/O);
- :mod:`relay.cluster.view`: which nodes are alive and what their workers hold (no I/O);
- :mod:`relay.cluster.backplane`: the NATS connection, the only module here doing I/O.

nats-py is an optional dependency (``pip install .[cluster]``): it is imported
only when a relay starts with a NATS URL.
"""
