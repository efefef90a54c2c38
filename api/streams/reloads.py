"""Following the reload a params change starts, so a stream shows the params that really serve.

A change of model, size and the like builds a new pipeline on the worker
while the old one keeps serving (``worker/pipeline.py``). The worker reports
``reloading`` with the params version, then ``ready`` once the new pipeline
serves, or an ``error`` with ``reload_failed`` when it could not be built:
then the old pipeline goes on, with the hot fields of the change applied and
its reload fields as before. Daydream's rule is the same: "if a reload fails,
keep the previous params running and report the error in status".
:func:`watch_reload` reads those reports (and the results' params versions)
from an in-process relay session; :func:`serving_after_failure` says which
params serve after a failure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from relay.hub import Delivery
from relay.local import Closed, Events
from wire.messages import Report, ReportEvent
from wire.relay_messages import ChannelState, Status
from worker.engines.diffusion.params import DiffusionParams, reload_fields


@dataclass(frozen=True)
class ReloadFailure:
    """Which params version failed to load, why, and the changes that did not take."""

    version: int
    error: str
    rejected: dict[str, Any]
    time: float

    def to_json(self) -> dict[str, Any]:
        return {
            "params_version": self.version,
            "error": self.error,
            "rejected_params": self.rejected,
            "time": int(self.time * 1000),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReloadFailure:
        return cls(data["params_version"], data["error"], data["rejected_params"], data["time"] / 1000)


def needs_reload(serving: dict[str, Any], new: dict[str, Any]) -> set[str]:
    """The fields of ``new`` the worker can only take by building a new pipeline."""
    return reload_fields(_diffusion(serving), _diffusion(new))


def serving_after_failure(serving: dict[str, Any], failed: dict[str, Any]) -> dict[str, Any]:
    """The params running after ``failed`` could not load: its hot fields, ``serving``'s reload fields.

    The engine applies a change's hot fields at once and keeps its reload
    fields until the new pipeline is ready, so that is what runs when it never is.
    """
    kept = needs_reload(serving, failed)
    return {**failed, **{name: serving[name] for name in kept if name in serving}}


def rejected_changes(serving: dict[str, Any], failed: dict[str, Any]) -> dict[str, Any]:
    """The reload fields ``failed`` wanted to change: what did not take."""
    return {name: failed.get(name) for name in sorted(needs_reload(serving, failed))}


async def watch_reload(events: Events, version: int) -> tuple[bool, str] | None:
    """Follow the reload of params ``version`` to its end: ``(True, "")`` once it serves,
    ``(False, why)`` when it failed, None when that cannot be known (the channel
    closed or lost its worker; a new worker loads the channel's params afresh).

    It serves once the worker says the reload it started for ``version`` is
    ready, or once a result made with ``version`` (or newer) comes out: an
    engine that takes the change without a reload (the filter engine) says
    nothing else. A reload the worker reports for another version (an older
    one finishing) is not this one's outcome.
    """
    ours = False
    async for event in events:
        if isinstance(event, Delivery):
            if event.frame.params_version >= version:
                return True, ""
            continue
        if isinstance(event, Closed):
            return None
        if isinstance(event, Status) and event.state is not ChannelState.ASSIGNED:
            return None  # waiting for a worker, or idle: the next worker loads the params afresh
        if not isinstance(event, Report):
            continue
        if event.event is ReportEvent.RELOADING:
            ours = event.data.get("version") == version
        elif ours and event.event is ReportEvent.READY:
            return True, ""
        elif (
            event.event is ReportEvent.ERROR
            and event.data.get("reload_failed")
            and event.data.get("version", version if ours else None) == version  # older workers: no version
        ):
            return False, event.message or "the reload failed"
    return None


def failure(version: int, error: str, serving: dict[str, Any], failed: dict[str, Any]) -> ReloadFailure:
    return ReloadFailure(version, error, rejected_changes(serving, failed), time.time())


def _diffusion(params: dict[str, Any]) -> DiffusionParams:
    return DiffusionParams.model_validate(
        {k: v for k, v in params.items() if k in DiffusionParams.model_fields}
    )
