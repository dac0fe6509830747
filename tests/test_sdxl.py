"""Stable Diffusion XL through ``from_diffusers``, against ``StableDiffusionXLPipeline`` run on the same tiny random
weights (:func:`scorekit.testing.tiny_sdxl`) and the same initial latents: the converged probability-flow ODE
with classifier-free guidance, the two-encoder prompt embeddings, the pooled embedding and the size/crop time
ids the pipeline feeds its UNet, per-sample prompts, and the VAE decode (float16 upcast, latent statistics)."""

import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from test_pipelines import converged_ode, gen, rel_mad, trailing_ddim

from scorekit import from_diffusers, tweedie_denoise
from scorekit.testing import tiny_sdxl

PROMPTS = ["a photo of a cat", "a red dog"]
# per-channel latent statistics, as some SDXL-architecture VAEs set them
STATS = dict(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 2.0, 1.5, 0.8])


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl") / "pipe"
    tiny_sdxl(path)
    return path


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl_stats") / "pipe"
    tiny_sdxl(path, vae=STATS)
    return path


def load(path, dtype=torch.float32):
    pipe = StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=dtype, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_inputs(pipe, steps: int = 1, **kw):
    """The conditioning ``StableDiffusionXLPipeline`` feeds its UNet (guided: ``[uncond, cond]`` stacked)."""
    seen = {}

    def grab(_pipe, _i, _t, tensors):
        seen.update(tensors)
        return {}

    pipe(num_inference_steps=steps, output_type="latent", callback_on_step_end=grab,
         callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds", "add_time_ids"], **kw)
    return seen


def pipeline_images(pipe, z):
    """The pipeline's own decode of latents ``z`` (swapped in after its one step), as images in [0, 1]."""
    def swap(_pipe, _i, _t, tensors):
        return {"latents": z.to(tensors["latents"].dtype)}

    return pipe("a cat", num_inference_steps=1, guidance_scale=1.0, callback_on_step_end=swap, output_type="pt").images


# -- sampling ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("negative", [None, "a blue tree"])
def test_sdxl_with_guidance_lands_on_the_pipeline(sdxl_dir, negative):
    """Converged ODE vs a 1000-step trailing DDIM (eta 0) in the pipeline: within 1% relative mean absolute
    difference. Without a negative prompt the unconditional branch is SDXL's zeroed embedding."""
    pipe = load(sdxl_dir)
    pipe.scheduler = trailing_ddim(pipe.scheduler.config)
    model = from_diffusers(sdxl_dir)
    assert model.data_shape == (4, 8, 8) and model.requires_condition
    x_T = torch.randn(2, *model.data_shape, generator=gen(5))
    ref = pipe(PROMPTS, negative_prompt=None if negative is None else [negative] * 2, guidance_scale=3.0,
               num_inference_steps=1000, latents=x_T.clone(), output_type="latent", eta=0.0).images
    with torch.no_grad():
        ours = converged_ode(model.condition(prompt=PROMPTS, negative_prompt=negative, guidance_scale=3.0), model, x_T)
    assert rel_mad(ours, ref) < 0.01


# -- conditioning --------------------------------------------------------------------------------------
def stacked(cond, *keys):
    """The ``[uncond, cond]`` stack the guided pipeline feeds its UNet, of one entry of our conditioning."""
    def get(branch):
        for k in keys:
            branch = branch[k]
        return branch
    return torch.cat([get(cond.uncond), get(cond.cond)])


def assert_fed_as_the_pipeline_does(cond, seen):
    torch.testing.assert_close(stacked(cond, "encoder_hidden_states"), seen["prompt_embeds"], rtol=0, atol=0)
    torch.testing.assert_close(stacked(cond, "added_cond_kwargs", "text_embeds"), seen["add_text_embeds"], rtol=0,
                               atol=0)
    torch.testing.assert_close(stacked(cond, "added_cond_kwargs", "time_ids"), seen["add_time_ids"], rtol=0, atol=0)


@pytest.mark.parametrize("negative, size", [(None, None), ("a blue tree", (32, 48))])
def test_conditioning_is_what_the_pipeline_feeds_its_unet(sdxl_dir, negative, size):
    """Both encoders' penultimate states, the pooled projection and the time ids (original size, crop (0, 0),
    target size) of the pipeline's defaults for the model's height and width, in both guidance branches."""
    pipe = load(sdxl_dir)
    h, w = size or (16, 16)
    model = from_diffusers(sdxl_dir, **({} if size is None else dict(height=h, width=w)))
    cond = model.condition(prompt=PROMPTS, negative_prompt=negative, guidance_scale=2.0).conditioning
    seen = unet_inputs(pipe, prompt=PROMPTS, negative_prompt=None if negative is None else [negative] * 2,
                       guidance_scale=2.0, **({} if size is None else dict(height=h, width=w)))

    assert_fed_as_the_pipeline_does(cond, seen)
    assert cond.cond["added_cond_kwargs"]["time_ids"].tolist() == [[h, w, 0, 0, h, w]] * 2
    assert cond.cond["encoder_hidden_states"].shape == (2, 12, 16 + 24)  # both encoders' states, concatenated
    if negative is None:  # force_zeros_for_empty_prompt
        assert not cond.uncond["encoder_hidden_states"].any() and not cond.uncond["added_cond_kwargs"]["text_embeds"].any()


SDXL_EXTRA = dict(prompt_2=["a dog", "a tree"], negative_prompt_2="ugly", original_size=(64, 32),
                  crops_coords_top_left=(4, 8), target_size=(16, 24), negative_original_size=(8, 8),
                  negative_crops_coords_top_left=(2, 2), negative_target_size=(16, 16))


@pytest.mark.parametrize("extra", [SDXL_EXTRA, {"prompt_2": "a dog", "original_size": (48, 48)}],
                         ids=["all", "some"])
def test_sdxl_keywords_are_the_pipelines(sdxl_dir, extra):
    """``prompt_2`` / ``negative_prompt_2`` (the second encoder's prompts) and the size and crop micro-conditioning
    of both branches, against what the pipeline feeds its UNet for the same keywords; without the negative sizes
    the unconditional branch takes the prompt's time ids, as in the pipeline."""
    pipe, model = load(sdxl_dir), from_diffusers(sdxl_dir)
    cond = model.condition(prompt=PROMPTS, negative_prompt="a blue tree", guidance_scale=2.0, **extra).conditioning
    # the pipeline takes a string prompt_2 beside a list of prompts as one prompt (and fails): ours means it for each
    lists = {k: [v] * 2 if k.startswith(("prompt", "negative_prompt")) and isinstance(v, str) else v
             for k, v in extra.items()}
    seen = unet_inputs(pipe, prompt=PROMPTS, negative_prompt=["a blue tree"] * 2, guidance_scale=2.0, **lists)
    for key, ours in (("prompt_embeds", stacked(cond, "encoder_hidden_states")),
                      ("add_text_embeds", stacked(cond, "added_cond_kwargs", "text_embeds"))):
        torch.testing.assert_close(ours, seen[key], rtol=0, atol=0)
    # the time ids from a one-prompt call: for more prompts the pipeline stacks [negative, prompt] ids and repeats
    # them per prompt, [n, p, n, p], against its [n, n, p, p] embeddings, so with negative sizes of their own its
    # second unconditional row gets the prompt's ids; each of our branches keeps its own
    one = unet_inputs(pipe, prompt=PROMPTS[:1], negative_prompt="a blue tree", guidance_scale=2.0,
                      **{k: v[:1] if isinstance(v, list) else v for k, v in lists.items()})["add_time_ids"]
    for branch, row in ((cond.uncond, one[0]), (cond.cond, one[1])):
        torch.testing.assert_close(branch["added_cond_kwargs"]["time_ids"], row.expand(2, -1), rtol=0, atol=0)
    plain = model.condition(prompt=PROMPTS, negative_prompt="a blue tree", guidance_scale=2.0).conditioning
    # the second encoder's half of the states (its 24 channels) changes with prompt_2, the first encoder's does not
    states, before = cond.cond["encoder_hidden_states"], plain.cond["encoder_hidden_states"]
    torch.testing.assert_close(states[..., :16], before[..., :16], rtol=0, atol=0)
    assert rel_mad(states[..., 16:], before[..., 16:]) > 0.01
    ids = cond.cond["added_cond_kwargs"]["time_ids"][0].tolist()
    assert ids == [*extra["original_size"], *extra.get("crops_coords_top_left", (0, 0)),
                   *extra.get("target_size", (16, 16))]


def test_sdxl_keywords_bad_input(sdxl_dir, tmp_path):
    from scorekit.testing import tiny_sd

    model = from_diffusers(sdxl_dir)
    with pytest.raises(ValueError, match="negative_original_size= and negative_target_size= go together"):
        model.condition(prompt=PROMPTS, guidance_scale=2.0, negative_original_size=(8, 8))
    with pytest.raises(ValueError, match=r"original_size= must be two integers >= 1 \(pixels"):
        model.condition(prompt=PROMPTS, original_size=(0, 16))
    with pytest.raises(ValueError, match=r"crops_coords_top_left= must be two integers >= 0"):
        model.condition(prompt=PROMPTS, crops_coords_top_left=(1.5, 0))
    with pytest.raises(ValueError, match="got 2 prompts but 3 prompt_2 prompts"):
        model.condition(prompt=PROMPTS, prompt_2=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"go with prompt=: the pipeline builds them"):
        model.condition(encoder_hidden_states=torch.zeros(2, 12, 40), original_size=(16, 16))
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['prompt_3'\]"):
        model.condition(prompt=PROMPTS, prompt_3="x")
    tiny_sd(tmp_path / "sd")
    with pytest.raises(ValueError, match=r"\['prompt_2'\] are Stable Diffusion XL keywords .* this UNet2DConditionModel"):
        from_diffusers(tmp_path / "sd").condition(prompt="a cat", prompt_2="a dog")


@pytest.fixture(scope="module")
def refiner_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl_refiner") / "pipe"
    tiny_sdxl(path, refiner=True)
    return path


def refiner_unet_inputs(path, **kw):
    """What ``StableDiffusionXLImg2ImgPipeline`` (the refiner) feeds its UNet for one image's prompt."""
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(path, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=gen(11))
    return unet_inputs(pipe, steps=2, image=image, strength=0.5, **kw)


@pytest.mark.parametrize("extra", [{}, dict(aesthetic_score=7.5, negative_aesthetic_score=1.0, original_size=(64, 32),
                                            crops_coords_top_left=(4, 8), negative_original_size=(8, 8),
                                            negative_crops_coords_top_left=(2, 2))], ids=["defaults", "all"])
def test_refiner_conditioning_is_the_img2img_pipelines(refiner_dir, extra):
    """The SDXL refiner (second text encoder only, aesthetic-score time ids): the prompt embeddings, the pooled
    embedding and each branch's (original size, crop, aesthetic score) ids, against the pipeline's."""
    model = from_diffusers(refiner_dir)
    assert model.requires_condition and model.aesthetic
    cond = model.condition(prompt="a cat", negative_prompt="a blue tree", guidance_scale=2.0, **extra).conditioning
    seen = refiner_unet_inputs(refiner_dir, prompt="a cat", negative_prompt="a blue tree", guidance_scale=2.0, **extra)
    assert_fed_as_the_pipeline_does(cond, seen)
    assert cond.cond["encoder_hidden_states"].shape == (1, 12, 24)
    score = extra.get("aesthetic_score", 6.0), extra.get("negative_aesthetic_score", 2.5)
    assert [cond.cond["added_cond_kwargs"]["time_ids"][0, -1].item(),
            cond.uncond["added_cond_kwargs"]["time_ids"][0, -1].item()] == list(score)
    with torch.no_grad():  # and it samples: the guided score is finite and moves with the aesthetic score
        x, t = torch.randn(1, 4, 8, 8, generator=gen(12)), torch.tensor([0.3])
        a = model.condition(prompt="a cat", guidance_scale=2.0, **extra)(x, t)
        b = model.condition(prompt="a cat", guidance_scale=2.0, **{**extra, "aesthetic_score": 3.0})(x, t)
    assert torch.isfinite(a).all() and rel_mad(a, b) > 1e-3


def test_refiner_bad_keywords(refiner_dir, sdxl_dir):
    with pytest.raises(ValueError, match="the SDXL refiner's time ids hold no target size"):
        from_diffusers(refiner_dir).condition(prompt="a cat", target_size=(16, 16))
    with pytest.raises(ValueError, match="aesthetic_score must be"):
        from_diffusers(refiner_dir).condition(prompt="a cat", aesthetic_score=-1.0)
    with pytest.raises(ValueError, match=r"aesthetic_score= is for the SDXL refiner"):
        from_diffusers(sdxl_dir).condition(prompt="a cat", aesthetic_score=6.0)


def test_precomputed_embeddings_give_the_same_score(sdxl_dir):
    model = from_diffusers(sdxl_dir)
    score = model.condition(prompt=PROMPTS, guidance_scale=2.0)
    cond, uncond = score.conditioning.cond, score.conditioning.uncond
    x, t = torch.randn(2, 4, 8, 8, generator=gen(6)), torch.tensor([0.6, 0.3])
    with torch.no_grad():
        a = score(x, t)
        b = model.condition(encoder_hidden_states=cond["encoder_hidden_states"],
                            added_cond_kwargs=cond["added_cond_kwargs"],
                            negative_encoder_hidden_states=uncond["encoder_hidden_states"],
                            negative_added_cond_kwargs=uncond["added_cond_kwargs"], guidance_scale=2.0)(x, t)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass negative_added_cond_kwargs="):
        model.condition(encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=cond["added_cond_kwargs"],
                        negative_encoder_hidden_states=uncond["encoder_hidden_states"], guidance_scale=2.0)


def test_batch_rule_with_per_sample_prompts(sdxl_dir):
    model = from_diffusers(sdxl_dir)
    score = model.condition(prompt=PROMPTS, negative_prompt="a blue tree", guidance_scale=2.5)
    x, t = torch.randn(2, 4, 8, 8, generator=gen(7)), torch.tensor([0.7, 0.2])
    with torch.no_grad():
        one = score(x, t)
        three = score(x.repeat(3, 1, 1, 1), t.repeat(3))
        torch.testing.assert_close(three, one.repeat(3, 1, 1, 1), rtol=1e-5, atol=1e-5)
        # each sample keeps its own prompt: swapping the prompts swaps the scores
        swapped = model.condition(prompt=PROMPTS[::-1], negative_prompt="a blue tree", guidance_scale=2.5)(x.flip(0), t.flip(0))
        torch.testing.assert_close(swapped, one.flip(0), rtol=1e-5, atol=1e-5)
        assert rel_mad(one[0], swapped[0]) > 0.01
        torch.testing.assert_close(score.denoise(x, t), tweedie_denoise(model.condition(
            prompt=PROMPTS, negative_prompt="a blue tree", guidance_scale=2.5), model.sde, x, t))
    with pytest.raises(ValueError, match="batch of 3 samples does not fit a conditioning of batch 2"):
        score(torch.randn(3, 4, 8, 8), torch.full((3,), 0.5))


# -- the autoencoder -----------------------------------------------------------------------------------
@pytest.mark.parametrize("stats", [False, True], ids=["plain", "latent_stats"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_decode_is_the_pipelines_decode(sdxl_dir, stats_dir, stats, dtype):
    """``model.decode`` against the pipeline's output for the same latents: SDXL's scaling factor, the per-channel
    latent statistics when the VAE has them, and a float16 VAE upcast to float32 (force_upcast) as the pipeline
    does, with the VAE left in float16 and gradients flowing through the decode."""
    path = stats_dir if stats else sdxl_dir
    pipe, model = load(path, dtype), from_diffusers(path, dtype=dtype)
    z = torch.randn(2, 4, 8, 8, generator=gen(8)).to(dtype).float()  # latents the pipeline holds exactly
    ref = pipeline_images(pipe, z)
    with torch.no_grad():
        torch.testing.assert_close((model.decode(z) / 2 + 0.5).clamp(0, 1), ref, rtol=0, atol=1e-6)
    if dtype == torch.float16:
        ae = model.autoencoder
        assert next(ae.parameters()).dtype == torch.float16
        mean, std = ((torch.tensor(STATS[k]).view(1, 4, 1, 1) for k in STATS) if stats else (0.0, 1.0))
        with torch.no_grad():  # in float16 itself the decode is off by float16's rounding
            half = ae.decode((z * std / pipe.vae.config.scaling_factor + mean).half()).sample.float()
        assert (((half / 2 + 0.5).clamp(0, 1) - ref).abs().max()) > 1e-4
        z.requires_grad_(True)
        model.decode(z).square().sum().backward()
        assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_encode_is_the_img2img_pipelines_encode(stats_dir, dtype):
    """``model.encode`` against ``StableDiffusionXLImg2ImgPipeline``'s latents of the same images and draw: the
    inverse normalisation ``(z - mean) * scaling / std``, in float32 (force_upcast) for a float16 VAE."""
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(load(stats_dir, dtype))
    model = from_diffusers(stats_dir, dtype=dtype)
    images = (torch.rand(2, 3, 16, 16, generator=gen(9)) * 2 - 1).to(dtype).float()
    ref = img2img.prepare_latents(images, None, 2, 1, dtype, "cpu", generator=gen(10), add_noise=False)
    with torch.no_grad():
        ours = model.encode(images, generator=gen(10))
    # the pipeline normalises in float16 after the float32 encode
    tol = 0 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(ours, ref.float(), rtol=tol, atol=tol)
    assert next(model.autoencoder.parameters()).dtype == dtype


# -- bad input -----------------------------------------------------------------------------------------
def test_bad_prompts_are_refused(sdxl_dir):
    model = from_diffusers(sdxl_dir)
    with pytest.raises(ValueError, match="2 prompts but 3 negative prompts"):
        model.condition(prompt=["a", "b"], negative_prompt=["x", "y", "z"], guidance_scale=2.0)
    with pytest.raises(ValueError, match="prompt= must be a string or a non-empty list of strings"):
        model.condition(prompt=[], guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"prompt= must be a string or a non-empty list of strings \(one per sample\), got 3"):
        model.condition(prompt=3)
    with pytest.raises(ValueError, match="negative_prompt= must be a string or a non-empty list of strings"):
        model.condition(prompt=["a cat"], negative_prompt=[None], guidance_scale=2.0)
    with pytest.raises(ValueError, match="negative_prompt= needs prompt= as well"):
        model.condition(negative_prompt="a dog", guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"conditional: call model.condition\(...\) \(prompt="):
        model(torch.randn(1, 4, 8, 8), torch.tensor([0.5]))


# -- the command line --------------------------------------------------------------------------------
def test_sample_cli_second_prompts(sdxl_dir, tmp_path, capsys):
    """``scorekit sample --prompt-2 / --negative-prompt-2`` bind the same conditioning as ``model.condition``; on a
    pipeline with one text encoder they are refused, naming the flags, and nothing is written."""
    from scorekit.cli import main
    from scorekit.sampling import condition_score
    from scorekit.testing import tiny_sd

    model = from_diffusers(sdxl_dir)
    ours = condition_score(model, prompt="a cat", negative_prompt="a tree", prompt_2="a dog",
                           negative_prompt_2="ugly", guidance_scale=2.0).conditioning
    ref = model.condition(prompt="a cat", negative_prompt="a tree", prompt_2="a dog", negative_prompt_2="ugly",
                          guidance_scale=2.0).conditioning
    torch.testing.assert_close(stacked(ours, "encoder_hidden_states"), stacked(ref, "encoder_hidden_states"),
                               rtol=0, atol=0)
    plain = model.condition(prompt="a cat", negative_prompt="a tree", guidance_scale=2.0).conditioning
    assert rel_mad(stacked(ours, "encoder_hidden_states"), stacked(plain, "encoder_hidden_states")) > 1e-3
    tiny_sd(tmp_path / "sd")
    out = tmp_path / "x.png"
    assert main(["sample", "--checkpoint", str(tmp_path / "sd"), "--prompt", "a cat", "--prompt-2", "a dog",
                 "--steps", "2", "--n", "1", "--device", "cpu", "--no-progress", "--out", str(out)]) == 2
    assert "--prompt-2 / --negative-prompt-2 are the second text encoder's prompts" in capsys.readouterr().err
    assert not out.exists()
