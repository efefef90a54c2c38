"""Compatibility layers for the protocols of the seed projects (``/work/shared/seeds``).

Real clients were written against those projects, so each module here
speaks its seed's wire format exactly and maps it onto the relay: a client
session is a held relay channel, its frames go to a worker through an
in-process producer, and results come back through the same hub slots
(latest frame wins) as for every other peer.

* :mod:`api.seeds.ws000` - seed 000's ``/ws`` (typed JSON control + binary frames)
* :mod:`api.seeds.ws001` - seed 001's ``/api/ws/{userId}`` frame loop
* :mod:`api.seeds.routes` - seed 001's HTTP side and the router to include
"""
