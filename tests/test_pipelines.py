"""Pretrained diffusers pipelines of every common kind, against diffusers' own pipelines and schedulers run on
the same weights and the same initial noise: any schedule, conditioning, classifier-free guidance, latents."""

import warnings

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, StableDiffusionPipeline

from samplers import ode_sample
from scorekit import DiscreteVPSDE, from_diffusers, tweedie_denoise
from scorekit.pretrained import PretrainedScoreModel
from scorekit.testing import scheduler, tiny_dit, tiny_ldm, tiny_sd, tiny_unet

SCHEDULER_CLASSES = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                     "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                     "DEISMultistepScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                     "UniPCMultistepScheduler"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rel_mad(a, b):
    """Relative mean absolute difference."""
    return float((a - b).abs().mean() / b.abs().mean())


def trailing_ddim(config, **kw):
    """diffusers' DDIM with trailing spacing and the clean-sample last step (eta 0 at step time)."""
    return DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, **kw)


def converged_ode(score, model, x_T):
    """scorekit's probability-flow ODE (dopri5, tight tolerance) to the table's first step, then its x0."""
    eps = model.sde.sampling_eps
    x = ode_sample(score, model.sde, None, x_T=x_T, eps=eps, rtol=1e-5, atol=1e-5)
    return tweedie_denoise(score, model.sde, x, eps)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "pipe"
    tiny_sd(path)
    return path


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "pipe"
    tiny_dit(path)
    return path


# -- the table ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", SCHEDULER_CLASSES)
def test_every_scheduler_class_with_the_same_betas_gives_the_same_score(cls):
    unet = tiny_unet(3)
    ref = from_diffusers((unet, scheduler("scaled_linear", cls="DDPMScheduler")))
    model = from_diffusers((unet, scheduler("scaled_linear", cls=cls)))
    assert isinstance(model, PretrainedScoreModel) and isinstance(model.sde, DiscreteVPSDE)
    assert model.sde == ref.sde
    x, t = torch.randn(3, 3, 8, 8, generator=gen(1)), torch.tensor([0.9995, 0.4217, 0.0013])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), ref(x, t), rtol=0, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_score_at_the_scheduler_timesteps_is_the_converted_prediction(prediction_type):
    """Cosine table: at t_k = (k + 1) / N the network sees k and its output is converted with abar_k."""
    unet, sched = tiny_unet(3).double(), scheduler("cosine", prediction_type)
    model = from_diffusers((unet, sched))
    abar = torch.cumprod(1 - sched.betas.double(), 0)
    k = torch.tensor([0, 17, 500, 998])
    x = torch.randn(4, 3, 8, 8, generator=gen(2), dtype=torch.float64)
    with torch.no_grad():
        out = unet(x, k).sample
        score = model(x, (k + 1).double() / 1000)
    a, s = abar[k].sqrt()[:, None, None, None], (1 - abar[k]).sqrt()[:, None, None, None]
    eps = {"epsilon": out, "v_prediction": s * x + a * out, "sample": (x - a * out) / s}[prediction_type]
    torch.testing.assert_close(score, -eps / s, rtol=1e-4, atol=1e-4)
    # between steps the network sees the fractional timestep
    with torch.no_grad():
        mid = model.raw(x, (k + 1.5).double() / 1000)
        torch.testing.assert_close(mid, unet(x, k.double() + 0.5).sample)


@pytest.mark.parametrize("schedule, prediction_type", [("linear", "epsilon"), ("scaled_linear", "epsilon"),
                                                       ("zero_snr", "v_prediction")])
def test_converged_ode_lands_on_diffusers_ddim(schedule, prediction_type):
    """scorekit's converged ODE vs a 1000-step DDIM (trailing spacing, eta 0) on a UNet whose outputs are not a
    trained noise estimate, same weights and initial noise: within 1% relative mean absolute difference."""
    unet, sched = tiny_unet(3), trailing_ddim(scheduler(schedule, prediction_type).config)
    model = from_diffusers((unet, sched))
    x_T = torch.randn(2, 3, 8, 8, generator=gen(3))
    sched.set_timesteps(1000)
    x = x_T.clone()
    with torch.no_grad():
        for k in sched.timesteps:
            x = sched.step(unet(x, k).sample, k, x, eta=0.0).prev_sample
    assert rel_mad(converged_ode(model, model, x_T), x) < 0.01


def test_zero_terminal_snr_starts_at_the_standard_normal():
    model = from_diffusers((tiny_unet(3), scheduler("zero_snr", "v_prediction")))
    alpha, sigma = model.sde.marginal_coeffs(torch.ones(1))
    assert float(alpha) == 0.0 and float(sigma) == 1.0
    # at t = T the score is exactly that of N(0, I) and the model's x0 is minus its v output
    x = torch.randn(2, 3, 8, 8, generator=gen(4))
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.ones(2)), -x)
        torch.testing.assert_close(model.denoise(x, torch.ones(2)), -model.net(x, torch.full((2,), 999.0)).sample)


def test_sampling_flags_are_warned_about():
    with pytest.warns(UserWarning, match="clip_sample=True.*unclipped"):
        from_diffusers((tiny_unet(), diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=True)))
    with pytest.warns(UserWarning, match="thresholding=True"):
        from_diffusers((tiny_unet(), diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False,
                                                             thresholding=True)))


# -- Stable Diffusion ----------------------------------------------------------------------------------
@pytest.mark.parametrize("negative", [None, "a blue tree"])
def test_stable_diffusion_with_guidance_lands_on_the_pipeline(sd_dir, negative):
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = trailing_ddim(pipe.scheduler.config)
    model = from_diffusers(sd_dir)
    assert model.data_shape == (4, 8, 8) and model.requires_condition
    prompts = ["a photo of a cat", "a red dog"]
    x_T = torch.randn(2, *model.data_shape, generator=gen(5))
    ref = pipe(prompts, negative_prompt=None if negative is None else [negative] * 2, guidance_scale=3.0, num_inference_steps=1000, latents=x_T.clone(),
               output_type="latent", eta=0.0).images
    score = model.condition(prompt=prompts, negative_prompt=negative, guidance_scale=3.0)
    ours = converged_ode(score, model, x_T)
    assert rel_mad(ours, ref) < 0.01
    # model.decode is the pipeline's own VAE decode
    with torch.no_grad():
        torch.testing.assert_close(model.decode(ref), pipe.vae.decode(ref / pipe.vae.config.scaling_factor).sample)


def test_prompts_are_encoded_as_the_pipeline_encodes_them(sd_dir):
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None)
    model = from_diffusers(sd_dir)
    cond = model.condition(prompt="a red dog", guidance_scale=2.0).conditioning
    embeds, negative = pipe.encode_prompt("a red dog", "cpu", 1, True, None)
    torch.testing.assert_close(cond.cond["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond.uncond["encoder_hidden_states"], negative)
    empty, _ = pipe.encode_prompt("", "cpu", 1, False)
    torch.testing.assert_close(negative, empty)  # a missing negative prompt is the empty string, as in diffusers
    # precomputed embeddings give the same score function
    x, t = torch.randn(1, 4, 8, 8, generator=gen(6)), torch.tensor([0.6])
    with torch.no_grad():
        a = model.condition(prompt="a red dog", guidance_scale=2.0)(x, t)
        b = model.condition(encoder_hidden_states=embeds, negative_encoder_hidden_states=negative,
                            guidance_scale=2.0)(x, t)
    torch.testing.assert_close(a, b)


def test_batch_rule_with_per_sample_prompts(sd_dir):
    model = from_diffusers(sd_dir)
    score = model.condition(prompt=["a photo of a cat", "a red dog"], guidance_scale=2.5)
    x, t = torch.randn(2, 4, 8, 8, generator=gen(7)), torch.tensor([0.7, 0.2])
    with torch.no_grad():
        one = score(x, t)
        three = score(x.repeat(3, 1, 1, 1), t.repeat(3))
        torch.testing.assert_close(three, one.repeat(3, 1, 1, 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(score.denoise(x, t), tweedie_denoise(model.condition(
            prompt=["a photo of a cat", "a red dog"], guidance_scale=2.5), model.sde, x, t))
    with pytest.raises(ValueError, match="batch of 3 samples does not fit a conditioning of batch 2"):
        score(torch.randn(3, 4, 8, 8), torch.full((3,), 0.5))


def test_height_and_width_set_the_latent_shape(sd_dir):
    assert from_diffusers(sd_dir, height=32, width=48).data_shape == (4, 16, 24)
    with pytest.raises(ValueError, match="height=31 must be a positive multiple of 2"):
        from_diffusers(sd_dir, height=31)


def test_network_precision_is_separate_from_the_sampler_state(sd_dir):
    full, half = from_diffusers(sd_dir), from_diffusers(sd_dir, dtype=torch.bfloat16)
    assert next(half.net.parameters()).dtype == torch.bfloat16
    x, t = torch.randn(2, 4, 8, 8, generator=gen(8)), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        a = full.condition(prompt="a cat", guidance_scale=2.0)(x, t)
        b = half.condition(prompt="a cat", guidance_scale=2.0)(x, t)
    assert b.dtype == torch.float32 and rel_mad(b, a) < 0.05


# -- DiT, class-conditional and latent pixel-space pipelines ---------------------------------------
def test_dit_with_class_labels_and_guidance_lands_on_the_pipeline(dit_dir):
    pipe = DiTPipeline.from_pretrained(dit_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = trailing_ddim(pipe.scheduler.config)
    model = from_diffusers(dit_dir)
    assert model.data_shape == (4, 8, 8) and model.learned_variance
    ref = pipe([1, 7], guidance_scale=4.0, generator=gen(9), num_inference_steps=1000, output_type="pt").images
    x_T = torch.randn(2, *model.data_shape, generator=gen(9))  # DiTPipeline's own draw
    ours = converged_ode(model.condition(class_labels=[1, 7], guidance_scale=4.0), model, x_T)
    with torch.no_grad():
        image = (model.decode(ours) / 2 + 0.5).clamp(0, 1)
    assert rel_mad(image, ref) < 0.01


def test_class_conditional_unet():
    unet = tiny_unet(3, num_class_embeds=5)
    model = from_diffusers((unet, scheduler("linear", cls="DDPMScheduler")))
    x, t = torch.randn(2, 3, 8, 8, generator=gen(10)), torch.tensor([0.3, 0.3])
    with torch.no_grad():
        out = model.condition(class_labels=[2, 4]).output(x, t)
        torch.testing.assert_close(out, unet(x, torch.full((2,), 299.0), class_labels=torch.tensor([2, 4])).sample)
    with pytest.raises(ValueError, match=r"class label \[2, 5\] out of range: this model has classes 0..4"):
        model.condition(class_labels=[2, 5])
    with pytest.raises(ValueError, match="no null class"):
        model.condition(class_labels=[1], guidance_scale=3.0)
    with pytest.raises(ValueError, match=r"conditional: call model.condition\(...\) \(class_labels="):
        model(x, t)


def test_ldm_pipeline_is_a_latent_model(tmp_path):
    pipe = tiny_ldm(tmp_path / "ldm")
    model = from_diffusers(tmp_path / "ldm")
    assert model.data_shape == (3, 8, 8) and not model.requires_condition
    z = torch.randn(2, 3, 8, 8, generator=gen(11))
    with torch.no_grad():
        torch.testing.assert_close(model.decode(z), pipe.vqvae.decode(z / pipe.vqvae.config.scaling_factor).sample)
        images = model.decode(z)
        assert images.shape == (2, 3, 16, 16)
        assert model.encode(images).shape == z.shape


# -- bad input ---------------------------------------------------------------------------------------------
def test_bad_conditioning_is_refused(sd_dir, dit_dir):
    sd, dit = from_diffusers(sd_dir), from_diffusers(dit_dir)
    with pytest.raises(ValueError, match="DiTTransformer2DModel pipeline has no tokenizer and text encoder"):
        dit.condition(prompt="a cat")
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        sd.condition(prompt="a cat", guidance_scale=-1.0)
    with pytest.raises(ValueError, match="2 prompts but 3 negative prompts"):
        sd.condition(prompt=["a", "b"], negative_prompt=["x", "y", "z"], guidance_scale=2.0)
    with pytest.raises(ValueError, match="out of range: this model has classes 0..999"):
        dit.condition(class_labels=[1000])
    with pytest.raises(ValueError, match=r"conditional: call model.condition\(...\) \(prompt="):
        sd(torch.randn(1, 4, 8, 8), torch.tensor([0.5]))


def test_unreadable_pipelines_are_refused(tmp_path, sd_dir):
    import json
    import shutil

    foreign = tmp_path / "foreign"
    shutil.copytree(sd_dir, foreign)
    index = json.loads((foreign / "model_index.json").read_text())
    index["unet"] = ["transformers", "CLIPTextModel"]
    (foreign / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="names its unet a transformers.CLIPTextModel, which scorekit cannot read"):
        from_diffusers(foreign)
    pickled = tmp_path / "pickled"
    shutil.copytree(sd_dir, pickled)
    for f in (pickled / "text_encoder").glob("*.safetensors"):
        f.unlink()
    torch.save({"w": torch.zeros(1)}, pickled / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"text_encoder holds only pickled weights \(pytorch_model.bin\)"):
        from_diffusers(pickled)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no betas"):
            from_diffusers((tiny_unet(), diffusers.FlowMatchEulerDiscreteScheduler()))


# -- plug-ins on pretrained models ----------------------------------------------------------------
def test_svdd_with_per_sample_prompts_judges_decoded_images(sd_dir):
    from guidance import SVDD
    from samplers import pc_sample

    model = from_diffusers(sd_dir)
    seen = []

    def reward(images):
        seen.append(tuple(images.shape))
        return images.mean(dim=(1, 2, 3))

    score = model.condition(prompt=["a photo of a cat", "a red dog"], guidance_scale=2.0)
    svdd = SVDD(reward, num_candidates=3, decode=model.decode, seed=0)
    with torch.no_grad():
        x = pc_sample(score, model.sde, (2, *model.data_shape), steps=4, corrector=None, eps=model.sde.sampling_eps,
                      guidance=[svdd], generator=gen(12))
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
    assert seen and all(s[1:] == (3, 16, 16) for s in seen)  # pixels, not latents
    assert {s[0] for s in seen} == {6}  # 3 candidates for each of the 2 prompts


def test_minority_distance_in_pixel_space_through_decode():
    """With ``decode`` the minority score compares decoded samples: decode(x) = 2x scales the L2 score by 4."""
    from guidance import minority_score
    from scorekit import VPSDE
    from scorekit.data import imbalanced_mixture

    sde = VPSDE()
    score, x0 = imbalanced_mixture().score_fn(sde), torch.randn(16, 2, generator=gen(13), dtype=torch.float64)
    latent = minority_score(score, sde, x0, n=3, generator=gen(14))
    pixel = minority_score(score, sde, x0, n=3, generator=gen(14), decode=lambda z: 2 * z)
    torch.testing.assert_close(pixel, 4 * latent)
