"""StreamDiffusion's stream-batch denoiser, in plain torch.

Each frame enters at the first timestep of ``t_index_list``; the latents of
earlier frames sit in a buffer one step further along, so one UNet call
denoises every step of the pipeline at once and each call emits one
finished frame (Kodaira et al., "StreamDiffusion", 2023). Residual CFG
("RCFG") replaces the negative-prompt UNet pass by a "virtual" residual
noise kept in ``stock_noise``: ``self`` never runs the negative prompt,
``initialize`` runs it for the first step only, ``full`` runs it for every
step (classic CFG).

The model is reached only through ``NoisePredictor``, so the engine can put
ControlNets, compiled graphs or TensorRT behind it. ``denoise`` is a
generator that yields each :class:`UNetCall` it needs and takes the noise
prediction back, so :func:`drive_together` can run the calls of several
streams (channels sharing one model) as one batched UNet call.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from worker.engines.base import EngineError


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning for a batch: embeddings, plus SDXL's pooled embeds and time ids (both or neither)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    @staticmethod
    def concat(conds: Sequence[Conditioning]) -> Conditioning:
        """The rows of several conditionings, in order (streams batched together)."""
        if len(conds) == 1:
            return conds[0]
        return Conditioning(
            torch.cat([c.embeds for c in conds]),
            _cat_rows([c.pooled for c in conds]),
            _cat_rows([c.time_ids for c in conds]),
        )

    def repeat(self, n: int) -> Conditioning:
        def rows(t: torch.Tensor) -> torch.Tensor:
            return t.repeat(n, *[1] * (t.dim() - 1))

        return Conditioning(
            rows(self.embeds),
            None if self.pooled is None else rows(self.pooled),
            None if self.time_ids is None else rows(self.time_ids),
        )

    def cat(self, other: Conditioning) -> Conditioning:
        return Conditioning(
            torch.cat([self.embeds, other.embeds]),
            _cat_rows([self.pooled, other.pooled]),
            _cat_rows([self.time_ids, other.time_ids]),
        )

    def added_cond_kwargs(self) -> dict[str, torch.Tensor] | None:
        """The UNet's ``added_cond_kwargs`` (SDXL only)."""
        if self.pooled is None or self.time_ids is None:
            return None
        return {"text_embeds": self.pooled, "time_ids": self.time_ids}


def _cat_rows(parts: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """One optional field of several conditionings, rows concatenated; None when they lack it."""
    tensors = [t for t in parts if t is not None]
    if not tensors:
        return None
    if len(tensors) != len(parts):
        raise EngineError("conditionings with and without SDXL's pooled embeds cannot be batched")
    return torch.cat(tensors)


class NoisePredictor(Protocol):
    """Predicts noise (epsilon) for ``latents`` at ``timesteps``.

    ``steps`` holds each row's position in ``t_index_list`` (for ControlNet's
    guidance window); ``num_steps`` is the length of that list.
    """

    def __call__(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        steps: torch.Tensor,
        num_steps: int,
        cond: Conditioning,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class UNetCall:
    """One noise prediction a stream needs: latent rows at their timesteps, with matching conditioning.

    ``steps`` holds each row's position in ``t_index_list``; ``num_steps`` is that list's length.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    steps: torch.Tensor
    num_steps: int
    cond: Conditioning


#: ``StreamDenoiser.denoise``: yields UNet calls, is sent their noise predictions, returns the finished x0
Denoising = Generator[UNetCall, torch.Tensor, torch.Tensor]


def run_alone(denoising: Denoising, predict: NoisePredictor) -> torch.Tensor:
    """Drive one stream's denoising with ``predict``."""
    return drive_together([denoising], lambda calls: [predict(*_args(call)) for _, call in calls])[0]


def drive_together(
    denoisings: Sequence[Denoising],
    predict: Callable[[list[tuple[int, UNetCall]]], list[torch.Tensor]],
) -> list[torch.Tensor]:
    """Drive several streams in lockstep: each round, one ``predict`` for the calls of all running streams.

    ``predict`` gets ``(stream index, call)`` pairs in stream order and returns one prediction per call;
    a batched predictor concatenates them into one UNet call. Returns each stream's x0, in order.
    """
    results: dict[int, torch.Tensor] = {}
    pending: dict[int, UNetCall] = {}

    def advance(index: int, eps: torch.Tensor | None) -> None:
        denoising = denoisings[index]
        try:
            pending[index] = next(denoising) if eps is None else denoising.send(eps)
        except StopIteration as finished:
            pending.pop(index, None)
            results[index] = finished.value

    for index in range(len(denoisings)):
        advance(index, None)
    while pending:
        calls = list(pending.items())
        for (index, _), eps in zip(calls, predict(calls), strict=True):
            advance(index, eps)
    return [results[i] for i in range(len(denoisings))]


def _args(call: UNetCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, Conditioning]:
    return (call.latents, call.timesteps, call.steps, call.num_steps, call.cond)


class Scheduler(Protocol):
    """The part of diffusers' ``LCMScheduler`` the stream uses."""

    alphas_cumprod: torch.Tensor
    timesteps: torch.Tensor

    def set_timesteps(
        self, num_inference_steps: int, device: torch.device, original_inference_steps: int
    ) -> None: ...

    def get_scalings_for_boundary_condition_discrete(self, timestep: int) -> tuple[float, float]: ...


@dataclass(frozen=True)
class StreamConfig:
    """What fixes the stream's tensor shapes; changing any of it needs a new stream."""

    latent_shape: tuple[int, int, int]  # (channels, height, width)
    frame_buffer_size: int = 1
    use_denoising_batch: bool = True
    consistency_boundary: bool = True  # LCM's c_skip/c_out; False: turbo models predict x0 directly


def unet_batch_sizes(
    num_steps: int, frame_buffer_size: int, cfg_type: str, guidance_scale: float, batched: bool
) -> frozenset[int]:
    """Every batch size the denoiser calls the UNet with (compiled UNets are specialised to them)."""
    fbs = frame_buffer_size
    cfg = cfg_type if guidance_scale > 1.0 else "none"
    rows = num_steps * fbs if batched else fbs
    if cfg == "full":
        return frozenset({2 * rows})
    if cfg == "initialize":
        if batched:
            return frozenset({rows + fbs})
        return frozenset(
            {2 * fbs, fbs} if num_steps > 1 else {2 * fbs}
        )  # the negative prompt on step one only
    return frozenset({rows})


class StreamDenoiser:
    """Stream-batch denoising state for one stream: schedule, noise, latent buffer, guidance."""

    def __init__(
        self,
        predict: NoisePredictor | None,
        scheduler: Scheduler,
        config: StreamConfig,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self._predict = predict
        self._scheduler = scheduler
        self.config = config
        self._device = device
        self._dtype = dtype
        self.do_add_noise = True
        self._fbs = config.frame_buffer_size
        self._num_steps = 0
        self._cfg_type = "none"
        self._guidance_scale = 1.0
        self.delta = 1.0
        self._cond: Conditioning | None = None
        self._uncond: Conditioning | None = None
        self._batch_cond: Conditioning | None = None
        self.init_noise: torch.Tensor | None = None
        self._buffer: torch.Tensor | None = None
        self._stock_noise: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        """Denoising steps per frame (``len(t_index_list)``)."""
        return self._num_steps

    @property
    def _noise(self) -> torch.Tensor:
        if self.init_noise is None:
            raise EngineError("the stream needs set_noise before use")
        return self.init_noise

    @property
    def _positive(self) -> Conditioning:
        if self._cond is None:
            raise EngineError("the stream needs set_guidance before use")
        return self._cond

    @property
    def _negative(self) -> Conditioning:
        if self._uncond is None:  # set_guidance asks for it whenever cfg_type runs the negative prompt
            raise EngineError(f"cfg_type {self._cfg_type!r} needs negative-prompt conditioning")
        return self._uncond

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """Shape of the noise ``set_noise`` wants: one latent per step and buffered frame."""
        return (self._num_steps * self._fbs, *self.config.latent_shape)

    def set_schedule(self, t_index_list: Sequence[int], num_inference_steps: int) -> None:
        """Pick the timesteps; keeps the latent buffer unless the number of steps changes.

        Indices index LCM's ``num_inference_steps``-step schedule as in
        StreamDiffusion; an index equal to ``num_inference_steps`` means its last step.
        """
        scheduler = self._scheduler
        scheduler.set_timesteps(
            num_inference_steps, self._device, original_inference_steps=max(50, num_inference_steps)
        )
        last = len(scheduler.timesteps) - 1
        timesteps = [int(scheduler.timesteps[min(i, last)]) for i in t_index_list]
        if len(timesteps) != self._num_steps:
            self._num_steps = len(timesteps)
            self._batch_cond = None
            self.reset()
        alphas = scheduler.alphas_cumprod.to(torch.float64)[timesteps]
        if self.config.consistency_boundary:
            skip_out = [scheduler.get_scalings_for_boundary_condition_discrete(t) for t in timesteps]
        else:
            skip_out = [(0.0, 1.0)] * len(timesteps)
        rows = self._fbs if self.config.use_denoising_batch else 1
        self._timesteps = self._per_row(torch.tensor(timesteps), rows)
        self._steps = self._per_row(torch.arange(len(timesteps)), rows)
        self._alpha = self._per_row(alphas.sqrt(), rows).view(-1, 1, 1, 1)
        self._beta = self._per_row((1 - alphas).sqrt(), rows).view(-1, 1, 1, 1)
        self._c_skip = self._per_row(torch.tensor([float(s) for s, _ in skip_out]), rows).view(-1, 1, 1, 1)
        self._c_out = self._per_row(torch.tensor([float(o) for _, o in skip_out]), rows).view(-1, 1, 1, 1)

    def set_noise(self, noise: torch.Tensor) -> None:
        """The fixed noise (from the seed) used to re-noise latents at every step."""
        if tuple(noise.shape) != self.noise_shape:
            raise EngineError(f"noise of shape {tuple(noise.shape)} given, {self.noise_shape} needed")
        self.init_noise = noise.to(self._device, self._dtype)

    def set_guidance(
        self,
        cond: Conditioning,
        uncond: Conditioning | None,
        cfg_type: str,
        guidance_scale: float,
        delta: float,
    ) -> None:
        """Set the prompt conditioning and how guidance runs; guidance is on only when scale > 1."""
        self._cfg_type = cfg_type if guidance_scale > 1.0 else "none"
        if self._cfg_type in ("initialize", "full") and uncond is None:
            raise EngineError(f"cfg_type {cfg_type!r} needs negative-prompt conditioning")
        self._guidance_scale = guidance_scale
        self.delta = delta
        self._cond, self._uncond = cond, uncond
        self._batch_cond = None

    def reset(self) -> None:
        """Forget earlier frames: empty latent buffer and residual noise."""
        self._buffer = None
        self._stock_noise = None

    def add_noise(self, latents: torch.Tensor) -> torch.Tensor:
        """Noise clean image latents to the first timestep (img2img entry point)."""
        return self._alpha[0] * latents + self._beta[0] * self._noise_block(0)

    def first_step_noise(self) -> torch.Tensor:
        """The seed's noise for the first step: the starting latents of txt2img."""
        return self._noise_block(0)

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor) -> torch.Tensor:
        """Denoise ``frame_buffer_size`` latents at the first timestep with the stream's own predictor."""
        if self._predict is None:
            raise EngineError("this stream has no predictor of its own: drive denoise() instead")
        return run_alone(self.denoise(x_t), self._predict)

    def denoise(self, x_t: torch.Tensor) -> Denoising:
        """Denoise ``frame_buffer_size`` latents at the first timestep; yields its UNet calls, returns x0."""
        if self.init_noise is None or self._cond is None:
            raise EngineError("the stream needs set_schedule, set_noise and set_guidance before use")
        if self.config.use_denoising_batch:
            return (yield from self._batched(x_t))
        return (yield from self._sequential(x_t))

    def _batched(self, x_t: torch.Tensor) -> Denoising:
        fbs, n = self._fbs, self._num_steps
        noise = self._noise
        if self._stock_noise is None:
            self._stock_noise = torch.zeros_like(noise)
        if n > 1:
            if self._buffer is None:
                self._buffer = torch.zeros_like(noise[fbs:])
            x_t = torch.cat([x_t, self._buffer])
            self._stock_noise = torch.cat([noise[:fbs], self._stock_noise[:-fbs]])
        eps, self._stock_noise = yield from self._guided_eps(
            x_t, self._timesteps, self._steps, self._stock_noise, self._batched_cond()
        )
        x0 = self._x0(eps, x_t, self._alpha, self._beta, self._c_skip, self._c_out)
        if self._cfg_type in ("self", "initialize"):
            self._stock_noise = self._next_stock_noise(eps, self._stock_noise)
        if n == 1:
            return x0
        renoised = self._alpha[fbs:] * x0[:-fbs]
        if self.do_add_noise:
            renoised = renoised + self._beta[fbs:] * noise[fbs:]
        self._buffer = renoised
        return x0[-fbs:]

    def _next_stock_noise(self, eps: torch.Tensor, stock_noise: torch.Tensor) -> torch.Tensor:
        """RCFG's residual noise for the next frame: the seed noise plus this step's correction."""
        fbs, noise = self._fbs, self._noise
        delta_x = self._x0(eps, self._beta * stock_noise, self._alpha, self._beta, self._c_skip, self._c_out)
        ones = torch.ones_like(self._alpha[:fbs])
        delta_x = delta_x * torch.cat([self._alpha[fbs:], ones]) / torch.cat([self._beta[fbs:], ones])
        return torch.cat([noise[fbs:], noise[:fbs]]) + delta_x

    def _sequential(self, x_t: torch.Tensor) -> Denoising:
        """One UNet call per step (``use_denoising_batch=False``): no buffer, same schedule."""
        x0 = x_t
        for step in range(self._num_steps):
            at = slice(step, step + 1)
            stock = self._noise_block(step)
            rows = torch.full((self._fbs,), step, device=self._device, dtype=torch.long)
            timesteps = self._timesteps[at].repeat(self._fbs)
            cond = self._sequential_cond(first=step == 0)
            eps, _ = yield from self._guided_eps(x_t, timesteps, rows, stock, cond, initialize=step == 0)
            x0 = self._x0(eps, x_t, self._alpha[at], self._beta[at], self._c_skip[at], self._c_out[at])
            if step + 1 < self._num_steps:
                x_t = self._alpha[step + 1] * x0
                if self.do_add_noise:
                    x_t = x_t + self._beta[step + 1] * self._noise_block(step + 1)
        return x0

    def _guided_eps(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        steps: torch.Tensor,
        stock_noise: torch.Tensor,
        cond: Conditioning,
        initialize: bool = True,
    ) -> Generator[UNetCall, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Guided noise prediction, and the residual noise it used.

        With ``initialize`` the first frames' residual noise becomes the real
        negative-prompt prediction, which is why the residual is returned.
        """
        fbs, cfg = self._fbs, self._cfg_type
        if cfg == "full":
            x_t, timesteps, steps = (torch.cat([v, v]) for v in (x_t, timesteps, steps))
        elif cfg == "initialize" and initialize:
            x_t, timesteps, steps = (torch.cat([v[:fbs], v]) for v in (x_t, timesteps, steps))
        eps = yield UNetCall(x_t, timesteps, steps, self._num_steps, cond)
        if cfg == "none":
            return eps, stock_noise
        if cfg == "full":
            uncond, text = eps.chunk(2)
        else:
            text = eps
            if cfg == "initialize" and initialize:
                text = eps[fbs:]
                stock_noise = torch.cat([eps[:fbs], stock_noise[fbs:]])
            uncond = self.delta * stock_noise
        return uncond + self._guidance_scale * (text - uncond), stock_noise

    @staticmethod
    def _x0(
        eps: torch.Tensor,
        x_t: torch.Tensor,
        alpha: torch.Tensor,
        beta: torch.Tensor,
        c_skip: torch.Tensor,
        c_out: torch.Tensor,
    ) -> torch.Tensor:
        """Consistency-model step: the denoised estimate from an epsilon prediction."""
        return c_out * ((x_t - beta * eps) / alpha) + c_skip * x_t

    def _batched_cond(self) -> Conditioning:
        """Conditioning rows matching the batch layout ``_guided_eps`` builds (cached)."""
        if self._batch_cond is None:
            rows = self._num_steps * self._fbs
            cond = self._positive.repeat(rows)
            if self._cfg_type == "full":
                cond = self._negative.repeat(rows).cat(cond)
            elif self._cfg_type == "initialize":
                cond = self._negative.repeat(self._fbs).cat(cond)
            self._batch_cond = cond
        return self._batch_cond

    def _sequential_cond(self, first: bool) -> Conditioning:
        cond = self._positive.repeat(self._fbs)
        if self._cfg_type == "full" or (self._cfg_type == "initialize" and first):
            cond = self._negative.repeat(self._fbs).cat(cond)
        return cond

    def _noise_block(self, step: int) -> torch.Tensor:
        return self._noise[step * self._fbs : (step + 1) * self._fbs]

    def _per_row(self, values: torch.Tensor, rows: int) -> torch.Tensor:
        """One value per step, repeated for each frame that step holds, on the model's device."""
        values = values.repeat_interleave(rows).to(self._device)
        return values.to(self._dtype) if values.is_floating_point() else values
