"""Bad inputs at the entry points: each is refused with a message that says what was wrong and what is expected."""

import math

import numpy as np
import pytest
import torch

from samplers import colorize, count_nfe, inpaint, likelihood, ode_encode, ode_sample, pc_sample
from scorekit import VESDE, VPSDE, ScoreModel
from scorekit.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    build_data,
    build_score_model,
    from_dict,
)
from scorekit.data import load_digits
from scorekit.images import read_image
from scorekit.nets import MLP
from scorekit.noise2score import Noise2Score, ScoreUNet


class ImageScore:
    """A zero score on (B, 3, 4, 4) images that says which SDE it belongs to, as models do."""

    def __init__(self, sde):
        self.sde = sde

    def __call__(self, x, t):
        return torch.zeros_like(x)


@pytest.fixture(scope="module")
def vp_model():
    return ScoreModel(MLP(2, hidden=8, depth=1), VPSDE()).eval().requires_grad_(False)


# -- 9: the SDE the model was trained on -------------------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda f, sde: pc_sample(f, sde, (4, 2), steps=2),
    lambda f, sde: ode_sample(f, sde, (4, 2)),
    lambda f, sde: ode_sample(f, sde, (4, 2), method="dpm_solver_2m", steps=2),
    lambda f, sde: ode_encode(f, sde, torch.zeros(4, 2)),
    lambda f, sde: likelihood(f, sde, torch.zeros(4, 2)),
    lambda f, sde: inpaint(f, sde, torch.zeros(4, 2), torch.tensor([1.0, 0.0]), steps=2),
], ids=["pc", "ode", "dpm_solver", "ode_encode", "likelihood", "inpaint"])
@pytest.mark.parametrize("wrap", [lambda m: m, count_nfe, lambda m: m.condition(class_labels=torch.zeros(4).long())],
                         ids=["model", "count_nfe", "conditioned"])
def test_samplers_refuse_an_sde_other_than_the_models(vp_model, call, wrap):
    with pytest.raises(ValueError, match=r"trained on VPSDE\(beta_min=0.1.*given VESDE\(sigma_min=0.01.*model.sde"):
        call(wrap(vp_model), VESDE())


def test_colorize_refuses_another_sde_and_another_n_is_fine(vp_model):
    with pytest.raises(ValueError, match=r"trained on VESDE.*given VPSDE"):
        colorize(ImageScore(VESDE()), VPSDE(), torch.zeros(1, 1, 4, 4), steps=2)
    assert pc_sample(vp_model, VPSDE(N=10), (3, 2)).shape == (3, 2)  # the same process, fewer default steps


# -- 10: ODE tolerances ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rtol", "atol"])
@pytest.mark.parametrize("value", [0.0, -1e-5, math.nan, math.inf])
@pytest.mark.parametrize("call", [
    lambda f, kw: ode_sample(f, f.sde, (2, 2), **kw),
    lambda f, kw: ode_encode(f, f.sde, torch.zeros(2, 2), **kw),
    lambda f, kw: likelihood(f, f.sde, torch.zeros(2, 2), **kw),
], ids=["ode_sample", "ode_encode", "likelihood"])
def test_ode_tolerances_must_be_finite_and_positive(vp_model, name, value, call):
    with pytest.raises(ValueError, match=rf"{name} must be a finite number > 0 \(.*tolerance"):
        call(vp_model, {name: value})


def test_sampling_config_tolerances_and_snr_are_checked():
    with pytest.raises(ValueError, match=r"rtol must be a finite number > 0"):
        SampleConfig(rtol=0.0)
    with pytest.raises(ValueError, match=r"snr must be a finite number >= 0 \(the corrector's signal-to-noise"):
        SampleConfig(snr=-0.16)


def test_pc_sample_refuses_a_negative_snr(vp_model):
    with pytest.raises(ValueError, match=r"snr must be a finite number >= 0"):
        pc_sample(vp_model, vp_model.sde, (2, 2), steps=2, snr=-0.16)


# -- 12: config values checked where the config is built ---------------------------------------------------
@pytest.mark.parametrize("data, message", [
    ({"sampling": {"sampler": "foo"}}, r"sampling: unknown sampler 'foo'; valid names are \['pc', 'ode', 'dpm_solver_2m'\]"),
    ({"sampling": {"n": 0}}, r"sampling: n must be a positive integer"),
    ({"sampling": {"predictor": "heun"}}, r"unknown predictor 'heun'; valid names are \[.*'reverse_diffusion'.*'none'\]"),
    ({"sampling": {"method": "rk45"}}, r"unknown ODE method 'rk45'; valid names are \['dopri5'"),
    ({"data": {"split": "valid"}}, r"data: unknown split 'valid'; valid names are \['all', 'train', 'test'\]"),
    ({"data": {"name": "mixture", "split": "all"}}, r"split 'all' is for digits"),
    ({"data": {"name": "cifar"}}, r"unknown data set 'cifar'; valid names are \['digits', 'mixture'"),
    ({"model": {"net": "resnet"}}, r"model: unknown net 'resnet'; valid names are \['mlp', 'unet'\]"),
    ({"model": {"prediction": "noise"}}, r"unknown prediction 'noise'; valid names are \['eps', 'score', 'x0', 'v'\]"),
], ids=["sampler", "n", "predictor", "method", "split", "split-all", "dataset", "net", "prediction"])
def test_config_names_and_sizes_are_checked_when_built(data, message):
    with pytest.raises(ValueError, match=message):
        from_dict(RunConfig, data)


@pytest.mark.parametrize("net, options, message", [
    ("mlp", {"hidden": 0}, r"hidden must be a positive integer \(width of the MLP\), got 0"),
    ("mlp", {"emb_dim": 7}, r"emb_dim must be even"),
    ("mlp", {"widht": 8}, r"unknown model.options \['widht'\] for net 'mlp'; valid options are \['depth', 'emb_dim'"),
    ("unet", {"block_out_channels": []}, r"block_out_channels must be a non-empty list"),
    ("unet", {"layers_per_block": 0}, r"layers_per_block must be a positive integer"),
])
def test_network_options_are_checked(net, options, message):
    shape = (2,) if net == "mlp" else (1, 8, 8)
    with pytest.raises(ValueError, match=message):
        build_score_model(ModelConfig(net=net, options=options), VPSDE(), shape)


def test_distill_n_samples_is_checked_before_the_run():
    from scorekit.distill import DistillRunConfig

    with pytest.raises(ValueError, match=r"n_samples must be a positive integer \(generator samples"):
        from_dict(DistillRunConfig, {"n_samples": 0})


def test_the_test_split_is_the_test_split():
    x_test, _ = build_data(DataConfig(name="digits", split="test"))
    assert torch.equal(x_test, load_digits("test")[0])
    assert not torch.equal(build_data(DataConfig(name="mixture", n=50, split="test"))[0],
                           build_data(DataConfig(name="mixture", n=50, split="train"))[0])


# -- 13: integer and empty tensors -------------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda f: pc_sample(f, f.sde, None, x_T=torch.zeros(4, 2, dtype=torch.int64), steps=2), r"x_T has dtype torch.int64"),
    (lambda f: ode_sample(f, f.sde, None, x_T=torch.zeros(4, 2, dtype=torch.int64)), r"x_T has dtype torch.int64"),
    (lambda f: ode_encode(f, f.sde, torch.zeros(4, 2, dtype=torch.int64)), r"x has dtype torch.int64.*x.float\(\)"),
    (lambda f: likelihood(f, f.sde, torch.zeros(4, 2, dtype=torch.int64)), r"x has dtype torch.int64"),
    (lambda f: inpaint(f, f.sde, torch.zeros(4, 2, dtype=torch.int64), torch.ones(2)), r"x has dtype torch.int64"),
    (lambda f: pc_sample(f, f.sde, (0, 2), steps=2), r"every dimension of shape must be a positive integer"),
    (lambda f: ode_encode(f, f.sde, torch.zeros(0, 2)), r"x has shape \(0, 2\); expected a non-empty batch"),
    (lambda f: likelihood(f, f.sde, torch.full((2, 2), math.nan)), r"x contains NaN or infinite values"),
    (lambda f: pc_sample(f, f.sde, 4, steps=2), r"the sample shape must be a tuple \(batch, ...\), got 4"),
], ids=["pc", "ode", "ode_encode", "likelihood", "inpaint", "empty-shape", "empty-x", "nan", "int-shape"])
def test_samplers_check_dtype_and_size(vp_model, call, message):
    with pytest.raises(ValueError, match=message):
        call(vp_model)


def test_noise2score_checks_sizes_and_channels():
    n2s = Noise2Score(ScoreUNet(1, width=8, depth=3))
    with pytest.raises(ValueError, match=r"4x4 pixels are too small for the network \(depth 3, unshuffle 2\): each "
                                         r"side needs at least 9 pixels"):
        n2s.denoise(torch.rand(1, 1, 4, 4), 0.1)
    with pytest.raises(ValueError, match=r"have 3 channel\(s\) but the network takes 1"):
        n2s.denoise(torch.rand(1, 3, 16, 16), 0.1)
    with pytest.raises(ValueError, match=r"empty \(shape \(0, 1, 16, 16\)\)"):
        n2s.denoise(torch.rand(0, 1, 16, 16), 0.1)
    with pytest.raises(ValueError, match=r"the training patches of 4x4 pixels are too small"):
        n2s.fit([torch.rand(1, 16, 16)], 0.1, patch_size=4)
    with pytest.raises(ValueError, match=r"patch_size must be a positive integer"):
        n2s.fit([torch.rand(1, 16, 16)], 0.1, patch_size=0)


# -- 14: integer .npy images -------------------------------------------------------------------------------
def test_read_image_scales_by_bit_depth_and_refuses_other_integers(tmp_path):
    img = np.arange(64).reshape(8, 8)
    np.save(tmp_path / "u16.npy", (img * 1000).astype(np.uint16))
    assert torch.allclose(read_image(tmp_path / "u16.npy")[0], torch.from_numpy(img * 1000 / 65535).float())
    for dtype in (np.int32, np.int64):
        np.save(tmp_path / "i.npy", (img * 4).astype(dtype))
        with pytest.raises(ValueError, match=rf"i.npy: integer pixels of type {np.dtype(dtype)} have no known bit "
                                             r"depth; save 8-bit images as uint8"):
            read_image(tmp_path / "i.npy")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=r"bad.png: cannot read it as a .png image"):
        read_image(tmp_path / "bad.png")


# -- 15: a reward file that is not valid Python ------------------------------------------------------------
def test_load_reward_names_a_syntax_error(tmp_path):
    from guidance.rewards import load_reward

    (tmp_path / "broken.py").write_text("def f(x):\n    return x[:, 1\n")
    with pytest.raises(ValueError, match=r"broken.py' of .* is not valid Python: .*line 2"):
        load_reward(f"{tmp_path / 'broken.py'}:f")
    (tmp_path / "raises.py").write_text("import does_not_exist_anywhere\n")
    with pytest.raises(ValueError, match=r"cannot load the reward module .*No module named 'does_not_exist_anywhere'"):
        load_reward(f"{tmp_path / 'raises.py'}:f")
