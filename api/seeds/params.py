"""Params sent by seed clients, checked against the engine's own model.

Seed clients send loose objects (the seed 001 frontend sends every field of
its form on every frame; seed 000 sends a ``settings`` object), so the rules
here are tolerant where the seeds' own servers were and strict where a bad
value could reach the worker:

* keys ``DiffusionParams`` does not know are ignored and reported, as the
  seeds' pydantic models ignored extras;
* known keys are validated with ``DiffusionParams`` (types, ranges);
* a new ``num_inference_steps`` without a ``t_index_list`` rescales the
  current list, so ``{"num_inference_steps": 4}`` (seed 001's own example)
  stays valid instead of failing the ``t_index_list <= steps`` rule;
* fields that need an engine reload (model, size, mode...) cannot change
  during a session: sessions are anonymous, and a reload stalls the stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from worker.engines.diffusion.params import DiffusionParams, reload_fields


class ParamsError(ValueError):
    """Params a client may not apply; ``str()`` is the message it is sent."""

    def __init__(self, message: str, field_name: str | None = None) -> None:
        super().__init__(message)
        self.field = field_name


@dataclass(frozen=True)
class Merged:
    """The effective params after a patch, and what the patch did."""

    params: dict[str, Any]
    changed: bool
    ignored: list[str] = field(default_factory=list)


def initial_params(defaults: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Full effective params: DiffusionParams defaults < server defaults < ``overrides``."""
    return _validate({**(defaults or {}), **overrides})


def merge_params(current: Mapping[str, Any], patch: Any) -> Merged:
    """Apply ``patch`` (a client's JSON object) to ``current``; raise ``ParamsError`` if refused."""
    if not isinstance(patch, Mapping):
        raise ParamsError("params must be a JSON object")
    known = DiffusionParams.model_fields
    ignored = sorted(str(key) for key in patch if key not in known)
    updates = {key: value for key, value in patch.items() if key in known}
    if "num_inference_steps" in updates and "t_index_list" not in updates:
        rescaled = _rescaled_indices(current, updates["num_inference_steps"])
        if rescaled is not None:
            updates["t_index_list"] = rescaled
    merged = _validate({**current, **updates})
    needs = reload_fields(
        DiffusionParams.model_validate(dict(current)), DiffusionParams.model_validate(merged)
    )
    if needs:
        names = ", ".join(sorted(needs))
        raise ParamsError(f"{names} cannot change during a session", min(needs))
    return Merged(merged, merged != dict(current), ignored)


def _rescaled_indices(current: Mapping[str, Any], steps: Any) -> list[int] | None:
    """``t_index_list`` moved to the same relative positions of a new step count."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        return None  # validation reports the bad value itself
    old_steps = int(current.get("num_inference_steps", 50))
    indices = [int(t) for t in current.get("t_index_list", [])]
    if steps == old_steps or not indices:
        return None
    return [min(steps, t * steps // max(old_steps, 1)) for t in indices]


def _validate(params: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return DiffusionParams.model_validate(dict(params)).model_dump(mode="json")
    except ValidationError as exc:
        error = exc.errors()[0]
        name = ".".join(str(part) for part in error["loc"] if not _union_branch(part)) or None
        where = f"parameter {name!r}" if name else "params"
        raise ParamsError(f"invalid {where}: {error['msg']}", name) from None


def _union_branch(part: str | int) -> bool:
    """pydantic names the branch of a union it tried (``str``, ``list[...]``); clients need the field."""
    return isinstance(part, str) and (part in _SCALARS or "[" in part or "-" in part)


_SCALARS = frozenset({"str", "int", "float", "bool", "none"})
