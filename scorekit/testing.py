"""Tiny diffusers pipelines with random weights for tests, benchmarks and trying the API without a download:
a Stable-Diffusion-style text-to-image pipeline (CLIP text encoder, a tokenizer from a small vocabulary written
here, AutoencoderKL, UNet2DConditionModel), its SDXL counterpart (two text encoders, size/crop
micro-conditioning), a DiT pipeline, a class-conditional UNet2DModel and an LDM with a
VQModel. Each builder saves its pipeline with ``save_pretrained`` and returns it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["WORDS", "tiny_tokenizer", "tiny_vae", "scheduler", "tiny_sd", "tiny_sdxl", "tiny_dit", "tiny_unet",
           "tiny_ldm"]

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "green", "big", "small", "tree", "house"]


def tiny_tokenizer(directory: Path, max_length: int = 12):
    """A CLIPTokenizer over :data:`WORDS` from a vocab.json and merges.txt written to ``directory``."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    chars = sorted({c for w in WORDS for c in w})
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for w in WORDS:  # merge each word left to right into one token
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            merges.append(f"{a} {b}")
            vocab.setdefault(a + b, len(vocab))
            pieces = [a + b, *pieces[2:]]
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length)


def tiny_vae(latent_channels: int = 4, seed: int = 1, **config: Any):
    """An AutoencoderKL with a downsampling factor of 2; ``config`` sets further options (``scaling_factor``,
    ``force_upcast``, ``latents_mean`` / ``latents_std``, ...)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16,
                         **config).eval()


def scheduler(name: str = "linear", prediction_type: str = "epsilon", cls: str = "DDIMScheduler", **kw):
    """A scheduler with one of the test schedules: ``linear``, ``scaled_linear``, ``cosine`` or ``zero_snr``
    (scaled-linear rescaled to zero terminal SNR)."""
    import diffusers

    schedules = {
        "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
        "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        "cosine": dict(beta_schedule="squaredcos_cap_v2"),
        "zero_snr": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
    }
    extra = {"clip_sample": False} if cls in ("DDIMScheduler", "DDPMScheduler") else {}
    return getattr(diffusers, cls)(num_train_timesteps=1000, prediction_type=prediction_type,
                                   **schedules[name], **extra, **kw)


def _clip_config(tokenizer: Any, hidden_size: int, **kw: Any):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1, **kw)


def tiny_sd(directory: Path, schedule: str = "scaled_linear", prediction_type: str = "epsilon", seed: int = 0):
    """A Stable-Diffusion-style pipeline saved to ``directory``; returns the loaded pipeline."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = tiny_tokenizer(directory / "_vocab")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, 16)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8).eval()
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler(schedule, prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl(directory: Path, seed: int = 0, vae: dict[str, Any] | None = None, refiner: bool = False):
    """A StableDiffusionXLPipeline saved to ``directory``; returns the loaded pipeline.

    As SDXL base is built: a CLIPTextModel (hidden size 16) and a CLIPTextModelWithProjection (hidden size 24,
    projection 8) whose penultimate hidden states are concatenated into the UNet's 40-dim cross-attention
    input; the second encoder's pooled projection and the six size/crop time ids (each embedded in
    ``addition_time_embed_dim = 4``) form its ``text_time`` added embedding (8 + 6 * 4 inputs); the first block
    has no attention; an AutoencoderKL with SDXL's ``scaling_factor`` 0.13025 (``vae`` adds config); and
    SDXL's EulerDiscreteScheduler (scaled-linear betas 0.00085..0.012, leading spacing, steps_offset 1).
    Latents are 4 x 8 x 8, images 16 x 16.

    ``refiner=True`` builds the SDXL refiner's layout instead, a ``StableDiffusionXLImg2ImgPipeline`` with only
    the second text encoder (the UNet's cross-attention input is its 24 dims) and ``requires_aesthetics_score``:
    five time ids, original size, crop and the aesthetic score (8 + 5 * 4 inputs).
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = tiny_tokenizer(directory / "_vocab"), tiny_tokenizer(directory / "_vocab_2")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, 16)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, 24, projection_dim=8)).eval()
    time_dim, ids = 4, 5 if refiner else 6
    states = text_encoder_2.config.hidden_size + (0 if refiner else text_encoder.config.hidden_size)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=states,
                                attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
                                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                                projection_class_embeddings_input_dim=text_encoder_2.config.projection_dim + ids * time_dim,
                                ).eval()
    sched = scheduler("scaled_linear", cls="EulerDiscreteScheduler", timestep_spacing="leading", steps_offset=1)
    autoencoder = tiny_vae(scaling_factor=0.13025, **(vae or {}))
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(vae=autoencoder, text_encoder=None, text_encoder_2=text_encoder_2,
                                                tokenizer=None, tokenizer_2=tokenizer_2, unet=unet, scheduler=sched,
                                                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                                add_watermarker=False)
    else:
        pipe = StableDiffusionXLPipeline(vae=autoencoder, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=sched,
                                         add_watermarker=False)
    pipe.save_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_dit(directory: Path, seed: int = 0):
    """A DiT pipeline (class-conditional transformer with a learned variance, AutoencoderKL)."""
    from diffusers import DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    pipe = DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=scheduler("linear", cls="DDIMScheduler"))
    pipe.save_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_unet(channels: int = 1, num_class_embeds: int | None = None, seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       num_class_embeds=num_class_embeds).eval()


def tiny_ldm(directory: Path, seed: int = 0):
    """An LDMPipeline: a VQModel autoencoder and an unconditional UNet2DModel on its latents."""
    from diffusers import LDMPipeline, VQModel

    torch.manual_seed(seed)
    vqvae = VQModel(in_channels=3, out_channels=3, latent_channels=3, num_vq_embeddings=16,
                    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                    layers_per_block=1, norm_num_groups=4, sample_size=16).eval()
    pipe = LDMPipeline(vqvae=vqvae, unet=tiny_unet(3, seed=seed), scheduler=scheduler("linear"))
    pipe.save_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    return pipe
