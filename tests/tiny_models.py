"""Tiny random-weight Stable Diffusion models, saved the way the hub lays them out.

No weights can be downloaded here, so tests build SD and SDXL pipelines,
a TAESD-style tiny VAE, a ControlNet and a LoRA from small configs and save
them with ``save_pretrained``; the engine then loads them through its real
``from_pretrained`` code with ``model_id`` set to the local path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    VitPoseBackboneConfig,
    VitPoseConfig,
    VitPoseForPoseEstimation,
)

TEXT_DIM = 32


@dataclass(frozen=True)
class TinyModels:
    """Paths of the saved tiny models."""

    sd: Path  # StableDiffusionPipeline directory (SD 1.x/2.x layout)
    sdxl: Path  # StableDiffusionXLPipeline directory
    tiny_vae: Path  # AutoencoderTiny directory (stands in for madebyollin/taesd)
    controlnet: Path  # ControlNetModel directory matching ``sd``
    lora: Path  # LoRA .safetensors file for ``sd``'s UNet
    ip_adapter: Path  # a directory laid out like h94/IP-Adapter, matching ``sd`` and ``sdxl``
    depth: Path  # a Depth Anything model (stands in for depth-anything/Depth-Anything-V2-Small-hf)
    hed: Path  # a directory with ControlNetHED.pth (stands in for lllyasviel/Annotators)
    pose: Path  # a ViTPose model (stands in for usyd-community/vitpose-base-simple)

    def fast_params(self, size: int = 384, **params: Any) -> dict[str, Any]:
        """Stream params quick on a CPU: ``sd`` with the tiny VAE, no LCM LoRA, two steps,
        ``size`` x ``size``; ``params`` override them."""
        return {
            "model_id": str(self.sd),
            "vae_id": str(self.tiny_vae),
            "use_lcm_lora": False,
            "width": size,
            "height": size,
            "t_index_list": [10, 30],
            **params,
        }


def build_tiny_models(root: Path) -> TinyModels:
    """Build and save every tiny model under ``root`` (a few seconds on a CPU), the same every time."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _build(root)


def _build(root: Path) -> TinyModels:
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_tokenizer()
    sd = StableDiffusionPipeline(
        vae=_kl_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        unet=_unet(cross_attention_dim=TEXT_DIM),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.save_pretrained(root / "tiny-sd")
    sdxl = StableDiffusionXLPipeline(
        vae=_kl_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer))),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=_unet(cross_attention_dim=2 * TEXT_DIM, xl=True),
        scheduler=_scheduler(),
    )
    sdxl.save_pretrained(root / "tiny-sdxl")
    _tiny_vae().save_pretrained(root / "tiny-taesd")
    _controlnet(sd.unet).save_pretrained(root / "tiny-controlnet")
    lora = _save_lora(sd.unet, root / "tiny-lora")
    _save_ip_adapter(sd.unet, root / "tiny-ip-adapter" / "models", "ip-adapter_sd15.safetensors")
    _save_ip_adapter(sdxl.unet, root / "tiny-ip-adapter" / "sdxl_models", "ip-adapter_sdxl.safetensors")
    _depth_model().save_pretrained(root / "tiny-depth")
    (root / "tiny-hed").mkdir(exist_ok=True)
    torch.save(_hed_state_dict(), root / "tiny-hed" / "ControlNetHED.pth")
    _pose_model().save_pretrained(root / "tiny-pose")
    return TinyModels(
        sd=root / "tiny-sd",
        sdxl=root / "tiny-sdxl",
        tiny_vae=root / "tiny-taesd",
        controlnet=root / "tiny-controlnet",
        lora=lora,
        ip_adapter=root / "tiny-ip-adapter",
        depth=root / "tiny-depth",
        hed=root / "tiny-hed",
        pose=root / "tiny-pose",
    )


def byte_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer whose vocab is every byte, with no merges.

    Real CLIP vocabularies can't be downloaded here; token ids stay valid for any CLIP text encoder.
    """
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in (_byte_symbol(b) for b in range(256)):
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _byte_symbol(value: int) -> str:
    """GPT-2's printable stand-in for a byte, as byte-level BPE spells it."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    if value in printable:
        return chr(value)
    return chr(256 + sum(1 for b in range(value) if b not in printable))


def _text_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_DIM,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _unet(cross_attention_dim: int, xl: bool = False) -> UNet2DConditionModel:
    extra = {}
    if xl:
        extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + TEXT_DIM,
        }
    return UNet2DConditionModel(
        sample_size=48,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=(
            "DownBlock2D",
            "DownBlock2D",
            "CrossAttnDownBlock2D",
        ),  # attention at 1/4 latent size only
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        **extra,
    )


def _kl_vae() -> AutoencoderKL:
    """Four blocks, so it downsamples by 8 like the real SD VAE."""
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
    )


def _tiny_vae() -> AutoencoderTiny:
    return AutoencoderTiny(
        encoder_block_out_channels=(4, 4, 4, 4),
        decoder_block_out_channels=(4, 4, 4, 4),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    )


def _controlnet(unet: UNet2DConditionModel) -> ControlNetModel:
    """A ControlNet whose zero-initialised output convs get random weights, so it has an effect."""
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(conv.weight, std=0.5)
    return controlnet


def _save_lora(unet: UNet2DConditionModel, folder: Path) -> Path:
    """Save a rank-2 LoRA on the UNet's attention projections with random (non-zero) weights."""
    unet = UNet2DConditionModel.from_config(unet.config)
    unet.add_adapter(
        LoraConfig(
            r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
        )
    )
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder / "pytorch_lora_weights.safetensors"


def _save_ip_adapter(unet: UNet2DConditionModel, folder: Path, weight_name: str) -> None:
    """A regular IP-Adapter for ``unet`` in h94/IP-Adapter's layout: ``folder`` holds it and its
    image encoder.

    The adapter file is what diffusers' ``load_ip_adapter`` reads: ``image_proj.*`` maps the image
    embedding to four text-like tokens; ``ip_adapter.{1,3,5...}.to_{k,v}_ip.weight`` are the extra
    key/value projections of each cross-attention layer, numbered in ``attn_processors`` order.
    """
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=TEXT_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=TEXT_DIM,
        )
    )
    encoder.save_pretrained(folder / "image_encoder")
    dim = unet.config.cross_attention_dim
    weights = {
        "image_proj.proj.weight": torch.randn(4 * dim, TEXT_DIM) * 0.5,
        "image_proj.proj.bias": torch.zeros(4 * dim),
        "image_proj.norm.weight": torch.ones(dim),
        "image_proj.norm.bias": torch.zeros(dim),
    }
    cross_attentions = [
        name.removesuffix(".processor") for name in unet.attn_processors if name.endswith("attn2.processor")
    ]
    for index, name in enumerate(cross_attentions):
        hidden = unet.get_submodule(name).to_k.out_features
        for projection in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{2 * index + 1}.{projection}.weight"] = torch.randn(hidden, dim) * 0.5
    save_file(weights, folder / weight_name)


def _depth_model() -> DepthAnythingForDepthEstimation:
    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        patch_size=14,
        image_size=56,
        out_features=["stage1", "stage2"],
        reshape_hidden_states=False,
    )
    return DepthAnythingForDepthEstimation(
        DepthAnythingConfig(
            backbone_config=backbone,
            reassemble_hidden_size=32,
            neck_hidden_sizes=[16, 32],
            reassemble_factors=[2, 1],
            fusion_hidden_size=16,
            head_hidden_size=8,
        )
    )


def _pose_model() -> VitPoseForPoseEstimation:
    """ViTPose's layout (backbone, simple decoder, 17 COCO heatmaps) at 64x48 input instead of 256x192."""
    backbone = VitPoseBackboneConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=[64, 48],
        patch_size=[16, 16],
        out_indices=[2],
    )
    return VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, num_labels=17))


def _hed_state_dict() -> dict[str, torch.Tensor]:
    """ControlNetHED.pth's keys and layout (``norm``, ``block{1-5}.convs.{i}``, ``block{1-5}.projection``)
    with the real depths (2, 2, 3, 3, 3 convolutions) at a sixteenth of the real widths."""
    state = {"norm": torch.rand(1, 3, 1, 1) * 128}
    channels = 3
    for block, (width, depth) in enumerate([(4, 2), (8, 2), (16, 3), (32, 3), (32, 3)], start=1):
        for index in range(depth):
            state[f"block{block}.convs.{index}.weight"] = torch.randn(width, channels, 3, 3) * 0.05
            state[f"block{block}.convs.{index}.bias"] = torch.zeros(width)
            channels = width
        state[f"block{block}.projection.weight"] = torch.randn(1, width, 1, 1) * 0.5
        state[f"block{block}.projection.bias"] = torch.zeros(1)
    return state


def _scheduler() -> EulerDiscreteScheduler:
    """sd-turbo's scheduler config (the engine converts it to an LCMScheduler)."""
    return EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        timestep_spacing="trailing",
    )
