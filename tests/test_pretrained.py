"""diffusers pipelines <-> scorekit score models, checked against diffusers' own schedulers and pipelines."""

import json
import shutil

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    ScoreSdeVePipeline,
    ScoreSdeVeScheduler,
    UNet2DModel,
)
from safetensors.torch import save_file

from scorekit import VESDE, VPSDE, DiscreteVPSDE, ScoreModel, from_diffusers, save_diffusers
from scorekit.nets import MLP, make_unet
from scorekit.pretrained import PretrainedScoreModel

N = 40  # training steps of the tiny schedulers


def tiny_unet(channels=1, time_embedding="positional", seed=0):
    torch.manual_seed(seed)
    return make_unet(
        sample_size=8, channels=channels, block_out_channels=(8, 16), time_embedding=time_embedding
    ).eval()


def ddpm_scheduler(**kw):
    return DDPMScheduler(
        num_train_timesteps=N, beta_start=0.1 / N, beta_end=20.0 / N, clip_sample=False, **kw
    )


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddpm") / "pipe"
    DDPMPipeline(unet=tiny_unet(), scheduler=ddpm_scheduler()).save_pretrained(path)
    return path


def x0_from_score(score, x, abar):
    """Tweedie with the discrete coefficients: E[x0 | x_k] = (x + (1 - abar) score) / sqrt(abar)."""
    abar = abar.double()[:, None, None, None]
    return (x.double() + (1 - abar) * score.double()) / abar.sqrt()


# -- VP: DDPM pipelines ------------------------------------------------------------------------------
def test_ddpm_dir_score_times_std_is_minus_eps(ddpm_dir):
    model = from_diffusers(ddpm_dir)
    sched = DDPMScheduler.from_pretrained(ddpm_dir / "scheduler")
    unet = model.net
    assert isinstance(model, PretrainedScoreModel) and isinstance(model, ScoreModel)
    assert isinstance(model.sde, DiscreteVPSDE) and model.sde.N == N
    torch.testing.assert_close(model.sde.discrete_betas(), sched.betas.double(), rtol=1e-5, atol=0)
    # every step k sits at t = (k + 1) / N, also as float32
    k = torch.arange(N)
    t = (k + 1).float() / N
    x = torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        score = model(x, t)
        eps = unet(x, k).sample
    std = (1 - sched.alphas_cumprod[k]).sqrt()[:, None, None, None]
    torch.testing.assert_close(score * std, -eps, rtol=1e-5, atol=1e-5)
    # between steps the network sees the fractional timestep and the table's interpolated std
    t_mid = (k[:-1].double() + 1.5) / N
    torch.testing.assert_close(model.network_time(t_mid), k[:-1].double() + 0.5)
    coeff = model.coeffs(t_mid)[1]
    lo, hi = (1 - sched.alphas_cumprod[k[:-1]].double()).sqrt(), (1 - sched.alphas_cumprod[k[1:]].double()).sqrt()
    assert bool(((coeff > lo) & (coeff < hi)).all())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_types_match_diffusers_x0(prediction_type):
    """Our score's Tweedie x0 equals DDPMScheduler.step's own pred_original_sample for each parameterization."""
    unet, sched = tiny_unet().double(), ddpm_scheduler(prediction_type=prediction_type)
    model = from_diffusers((unet, sched))
    assert model.prediction == {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[prediction_type]
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sched.set_timesteps(N)
    # diffusers keeps its table in float32 and takes sqrt(abar) there; the comparison is of the formulas, on
    # the table scorekit reads (cumprod(1 - betas) in float64)
    sched.alphas_cumprod = torch.cumprod(1 - sched.betas.double(), 0)
    for k in (N - 1, 17, 1):
        with torch.no_grad():
            out = unet(x, k).sample
            score = model(x, torch.full((3,), (k + 1) / N, dtype=torch.float64))
        ref = sched.step(out, k, x).pred_original_sample
        ours = x0_from_score(score, x, sched.alphas_cumprod[[k] * 3])
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_pipeline_object_pair_and_ddim_agree(ddpm_dir):
    pipe = DDPMPipeline.from_pretrained(ddpm_dir)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        ref = from_diffusers(ddpm_dir)(x, t)
        for source in (
            pipe,
            (pipe.unet, pipe.scheduler),
            (pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config)),
        ):
            torch.testing.assert_close(from_diffusers(source)(x, t), ref)
        assert from_diffusers(pipe.unet, pipe.scheduler).sde == from_diffusers(ddpm_dir).sde


def test_learned_time_embedding_gets_integer_steps():
    torch.manual_seed(0)
    config = {k: v for k, v in tiny_unet().config.items() if not k.startswith("_")}
    unet = UNet2DModel(**{**config, "time_embedding_type": "learned", "num_train_timesteps": N})
    model = from_diffusers((unet.eval(), ddpm_scheduler()))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    k = torch.tensor([5, 39])
    std = (1 - ddpm_scheduler().alphas_cumprod[k]).sqrt()[:, None, None, None]
    with torch.no_grad():
        torch.testing.assert_close(model(x, (k + 1) / N) * std, -unet(x, k).sample, rtol=1e-5, atol=1e-5)


# -- VE: ScoreSdeVe pipelines ------------------------------------------------------------------------
def test_score_sde_ve_pipeline_mapping(tmp_path):
    unet = tiny_unet(channels=3, time_embedding="fourier")
    sched = ScoreSdeVeScheduler(num_train_timesteps=N, sigma_min=0.01, sigma_max=50.0, sampling_eps=1e-5)
    ScoreSdeVePipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "ve")
    model = from_diffusers(tmp_path / "ve")
    assert isinstance(model.sde, VESDE) and model.sde == VESDE(0.01, 50.0, N)
    assert (model.prediction, model.time_input) == ("score", "sigma")
    # replay the pipeline's predictor step (num_inference_steps = N) with our reverse discretization
    sched.set_timesteps(N)
    sched.set_sigmas(N)
    x = 50.0 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    rev = model.sde.reverse(model)
    for i in (0, N // 2, N - 1):
        t = sched.timesteps[i]
        with torch.no_grad():
            out = unet(x, sched.sigmas[i] * torch.ones(2)).sample
            ref = sched.step_pred(out, t, x).prev_sample_mean
            torch.testing.assert_close(model(x, t.expand(2)), out, rtol=1e-4, atol=1e-5)
            f, _ = rev.discretize(x, t.expand(2))
        torch.testing.assert_close(x - f, ref, rtol=1e-4, atol=1e-4)


# -- save_diffusers ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prediction, prediction_type", [("eps", "epsilon"), ("x0", "sample"), ("v", "v_prediction")]
)
def test_save_diffusers_writes_the_ddpm_discretization(tmp_path, prediction, prediction_type):
    sde = VPSDE(beta_min=0.1, beta_max=20.0, N=N)
    model = ScoreModel(tiny_unet(seed=5), sde, prediction=prediction)
    pipe = DDPMPipeline.from_pretrained(save_diffusers(model, tmp_path / "saved"))
    cfg = pipe.scheduler.config
    assert (cfg.num_train_timesteps, cfg.beta_schedule, cfg.prediction_type) == (N, "linear", prediction_type)
    torch.testing.assert_close(pipe.scheduler.betas.double(), sde.discrete_betas(), rtol=1e-6, atol=0)
    for name, value in model.net.state_dict().items():
        torch.testing.assert_close(pipe.unet.state_dict()[name], value, rtol=0, atol=0)
    # a model loaded back has the SDE of that table and writes the same scheduler again
    loaded = from_diffusers(tmp_path / "saved")
    assert loaded.sde == DiscreteVPSDE(torch.cumprod(1 - pipe.scheduler.betas.double(), 0))
    assert loaded.prediction == prediction
    save_diffusers(loaded, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "scheduler" / "scheduler_config.json").read_text())
    assert {k: again[k] for k in ("beta_start", "beta_end", "num_train_timesteps", "prediction_type")} == {
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "num_train_timesteps": N,
        "prediction_type": prediction_type,
    }


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_ddpm_pipeline_samples_what_our_score_implies(tmp_path, prediction):
    """DDPMPipeline's samples from a saved model = DDPM ancestral sampling driven by our score, same noise."""
    unet = tiny_unet(seed=5)
    with torch.no_grad():  # a small output keeps the untrained model's samples inside the clamped range
        unet.conv_out.weight.mul_(0.05)
        unet.conv_out.bias.zero_()
    out = save_diffusers(
        ScoreModel(unet, VPSDE(beta_min=0.1, beta_max=20.0, N=N), prediction=prediction), tmp_path / "p"
    )
    pipe = DDPMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=2, generator=torch.Generator().manual_seed(6), num_inference_steps=N, output_type="pt"
    ).images
    assert float(((images > 0) & (images < 1)).double().mean()) > 0.5  # most pixels are compared unclamped

    model, sched = from_diffusers(out), pipe.scheduler
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 1, 8, 8, generator=g)
    with torch.no_grad():
        for k in range(N - 1, -1, -1):
            beta, abar = sched.betas[k].double(), sched.alphas_cumprod[k].double()
            score = model(x, torch.full((2,), (k + 1) / N)).double()
            x_next = (x.double() + beta * score) / (
                1 - beta
            ).sqrt()  # DDPM eq. (11), eps = -sqrt(1 - abar) score
            if k:
                var = (1 - sched.alphas_cumprod[k - 1].double()) / (1 - abar) * beta  # "fixed_small" variance
                x_next = x_next + var.sqrt() * torch.randn(2, 1, 8, 8, generator=g).double()
            x = x_next.float()
    torch.testing.assert_close(images, (x / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-4)


def test_save_diffusers_refuses_what_ddpm_cannot_express(tmp_path):
    unet = tiny_unet()
    with pytest.raises(ValueError, match="VP models"):
        save_diffusers(ScoreModel(unet, VESDE(N=N), prediction="score", time_input="sigma"), tmp_path / "a")
    with pytest.raises(TypeError, match="UNet2DModel network, got MLP"):
        save_diffusers(ScoreModel(MLP((1, 8, 8), hidden=16, depth=1), VPSDE(N=N)), tmp_path / "b")
    with pytest.raises(ValueError, match="no prediction_type for prediction='score'"):
        save_diffusers(ScoreModel(unet, VPSDE(N=N), prediction="score"), tmp_path / "c")
    with pytest.raises(ValueError, match="time_input='index'"):
        save_diffusers(ScoreModel(unet, VPSDE(N=N), time_input="t"), tmp_path / "d")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_diffusers(ScoreModel(unet, VPSDE(N=N)), tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"
    save_diffusers(ScoreModel(unet, VPSDE(N=N)), tmp_path / "full", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["model_index.json", "scheduler", "unet"]


# -- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "scheduler, match",
    [
        (lambda: object(), r"scheduler object is not supported.*carries betas"),
        (lambda: type("NoBetas", (), {"config": {}})(), r"NoBetas is not supported: it has no betas"),
        (lambda: ddpm_scheduler(prediction_type="flow"), "prediction_type='flow'"),
    ],
)
def test_unsupported_schedulers_are_refused(scheduler, match):
    with pytest.raises(ValueError, match=match):
        from_diffusers((tiny_unet(), scheduler()))


def test_bad_sources_give_clear_errors(tmp_path, ddpm_dir):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        from_diffusers(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model_index.json"):
        from_diffusers(tmp_path / "empty")
    with pytest.raises(TypeError, match="pipeline directory, a pipeline object"):
        from_diffusers(42)
    with pytest.raises(ValueError, match="scheduler object is not supported"):
        from_diffusers((tiny_unet(), object()))


def _copy_pipeline(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_corrupt_and_foreign_files_are_refused(tmp_path, ddpm_dir):
    weights = "unet/diffusion_pytorch_model.safetensors"
    corrupt = _copy_pipeline(ddpm_dir, tmp_path / "corrupt")
    (corrupt / weights).write_bytes(b"not a safetensors file" * 8)
    with pytest.raises(ValueError, match="could not load the UNet.*corrupt or foreign"):
        from_diffusers(corrupt)

    foreign_weights = _copy_pipeline(ddpm_dir, tmp_path / "foreign_weights")
    save_file({"encoder.weight": torch.zeros(3)}, foreign_weights / weights)
    with pytest.raises(
        ValueError,
        match=r"do not match its config.json \(missing keys: .*unexpected keys: \['encoder.weight'\]",
    ):
        from_diffusers(foreign_weights)

    pickled = _copy_pipeline(ddpm_dir, tmp_path / "pickled")
    (pickled / weights).unlink()
    torch.save({"weight": torch.zeros(1)}, pickled / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(
        ValueError, match=r"only pickled weights \(diffusion_pytorch_model.bin\).*safetensors only"
    ):
        from_diffusers(pickled)

    bad_index = _copy_pipeline(ddpm_dir, tmp_path / "bad_index")
    (bad_index / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        from_diffusers(bad_index)

    foreign = _copy_pipeline(ddpm_dir, tmp_path / "foreign")
    index = json.loads((foreign / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "NoSuchScheduler"]
    (foreign / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="NoSuchScheduler, which this diffusers does not have.*ScoreSdeVeScheduler"):
        from_diffusers(foreign)

    broken_config = _copy_pipeline(ddpm_dir, tmp_path / "broken_config")
    (broken_config / "scheduler" / "scheduler_config.json").write_text("[]")
    with pytest.raises(ValueError, match="could not load the DDPMScheduler config"):
        from_diffusers(broken_config)
