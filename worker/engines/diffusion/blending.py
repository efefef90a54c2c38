"""Weighted blends of tensors, shared by prompt embeddings and seed noises."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.engines.base import EngineError


def normalize_weights(weights: Sequence[float], normalize: bool) -> list[float]:
    """Scale weights to sum to 1 when asked, so a blend keeps the inputs' magnitude."""
    if not normalize:
        return list(weights)
    total = sum(weights)
    if total <= 0:
        raise EngineError("weights must sum to a positive number to be normalized")
    return [w / total for w in weights]


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation along the last dim; lerp where the vectors are nearly parallel."""
    a32, b32 = a.float(), b.float()
    dot = (a32 * b32).sum(-1, keepdim=True) / (
        a32.norm(dim=-1, keepdim=True) * b32.norm(dim=-1, keepdim=True) + 1e-8
    )
    theta = torch.acos(dot.clamp(-1.0, 1.0))
    sin = torch.sin(theta)
    parallel = sin.abs() < 1e-4
    safe_sin = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, torch.full_like(sin, 1.0 - t), torch.sin((1.0 - t) * theta) / safe_sin)
    wb = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * theta) / safe_sin)
    return (wa * a32 + wb * b32).to(a.dtype)


def blend(tensors: Sequence[torch.Tensor], weights: Sequence[float], method: str) -> torch.Tensor:
    """Weighted sum (``linear``) or chained slerp (``slerp``) of same-shaped tensors.

    Slerp folds the inputs in one by one, each with its share of the weight
    seen so far, so two inputs give the plain ``slerp(a, b, w_b / (w_a + w_b))``.
    """
    if len(tensors) == 1:
        return tensors[0] * weights[0] if method == "linear" else tensors[0]
    if method == "linear":
        return sum((t * w for t, w in zip(tensors, weights, strict=True)), torch.zeros_like(tensors[0]))
    result, seen = tensors[0], weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        seen += weight
        result = slerp(result, tensor, weight / seen if seen else 0.5)
    return result


def seed_noise(
    seeds: Sequence[tuple[int, float]], shape: Sequence[int], method: str, normalize: bool
) -> torch.Tensor:
    """Gaussian noise for ``shape`` from one seed or a weighted blend of several.

    Drawn on the CPU so a seed gives the same noise on every device.
    """
    noises = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)) for seed, _ in seeds]
    weights = normalize_weights([w for _, w in seeds], normalize)
    return blend(noises, weights, method)
