"""Request bodies of the ``/v1/streams`` API, validated as Daydream does (extra fields: 422)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from media import rtmp
from media.fit import FitMode
from worker.engines.diffusion.params import DiffusionParams

#: ``pipeline`` values clients send; all run the StreamDiffusion engine.
PIPELINES = frozenset(
    {"streamdiffusion", "streamdiffusion-sdxl", "streamdiffusion-sdxl-faceid", "streamdiffusion-sd15"}
)
#: the deprecated ``pipeline_id`` form and the model each one implies
PIPELINE_IDS = {
    "pip_SD-turbo": "stabilityai/sd-turbo",
    "pip_SDXL-turbo": "stabilityai/sdxl-turbo",
    "pip_SD15": "Lykon/dreamshaper-8",
    "pip_SDXL-turbo-faceid": "stabilityai/sdxl-turbo",
}


class StreamParams(DiffusionParams):
    """A stream's params: the engine's, plus how input of another aspect ratio reaches the stream's size.

    ``fit`` (crop or pad, :mod:`media.fit`) is ours; left out, the server's
    ``pipeline.fit`` applies. Hot: the next frame uses it.
    """

    fit: FitMode | None = None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def rtmp_target(url: str | None) -> str | None:
    """A usable RTMP URL, or None for "" and null (no output).

    Checked here, before anything is stored: a URL the output process would
    refuse must never reach the store (it would refuse again at every start).
    """
    if not url:
        return None
    rtmp.validate_rtmp_url(url)  # TargetError is a ValueError: pydantic answers 422 naming the field
    return url


#: ``output_rtmp_url`` in request bodies
RtmpUrl = Annotated[str | None, AfterValidator(rtmp_target)]


class CreateStream(_Body):
    pipeline: str | None = None
    params: StreamParams | None = None
    name: str | None = Field(default=None, max_length=256)
    output_rtmp_url: RtmpUrl = None
    pipeline_id: str | None = None
    pipeline_params: StreamParams | None = None

    @model_validator(mode="before")
    @classmethod
    def _implied_model(cls, data: Any) -> Any:
        """``pipeline_params`` are checked against the model ``pipeline_id`` implies, not the default
        (an SDXL ControlNet is valid under ``pip_SDXL-turbo``)."""
        if not isinstance(data, dict):
            return data
        pipeline_id = data.get("pipeline_id")
        model = PIPELINE_IDS.get(pipeline_id) if isinstance(pipeline_id, str) else None
        given = data.get("pipeline_params") or {}  # pipeline_id alone: the model is all it says
        if model is None or not isinstance(given, dict) or "model_id" in given:
            return data
        return {**data, "pipeline_params": {"model_id": model, **given}}

    @model_validator(mode="after")
    def _one_form(self) -> CreateStream:
        if self.pipeline is None and self.pipeline_id is None:
            raise ValueError("'pipeline' is required")
        if self.pipeline is not None and self.pipeline not in PIPELINES:
            raise ValueError(f"unknown pipeline {self.pipeline!r}; use 'streamdiffusion'")
        if self.pipeline_id is not None and self.pipeline_id not in PIPELINE_IDS:
            raise ValueError(f"unknown pipeline_id {self.pipeline_id!r}")
        if self.pipeline is not None and self.params is None:
            raise ValueError("'params' is required")
        return self

    def given_params(self) -> dict[str, Any]:
        """Only the params the client set, so server defaults can fill the rest."""
        params = self.params if self.params is not None else self.pipeline_params
        return {} if params is None else params.model_dump(mode="json", include=params.model_fields_set)


class UpdateStream(_Body):
    pipeline: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    name: str | None = Field(default=None, max_length=256)
    #: "" or null stops the RTMP output; left out, it stays as it is
    output_rtmp_url: RtmpUrl = None

    def rtmp_change(self) -> str | None:
        """What :meth:`StreamManager.update` takes: None to leave the output alone, "" to stop it."""
        if "output_rtmp_url" not in self.model_fields_set:
            return None
        return self.output_rtmp_url or ""

    @field_validator("pipeline")
    @classmethod
    def _known_pipeline(cls, value: str | None) -> str | None:
        if value is not None and value not in PIPELINES:
            raise ValueError(f"unknown pipeline {value!r}; use 'streamdiffusion'")
        return value
