"""Inpainting and colorization with the PC sampler (Song et al. 2021, App. I) against exact conditionals."""

import math

import pytest
import torch

from samplers import colorize, inpaint
from samplers.inverse import COLOR_DECOUPLE
from scorekit import VPSDE
from scorekit.data import GaussianMixture, imbalanced_mixture

MIX = imbalanced_mixture()
N = 4000


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def inpaint_x_given_y(y, seed=0):
    sde = VPSDE()
    x = torch.tensor([[float("nan"), y]], dtype=torch.float64).repeat(N, 1)  # unknown entries are ignored
    mask = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    out = inpaint(MIX.score_fn(sde), sde, x, mask, steps=300, generator=gen(seed))
    assert torch.equal(out[:, 1], x[:, 1])
    cond = MIX.conditional(torch.tensor([y]), known=[1])
    shares = torch.bincount(cond.classify(out[:, :1]), minlength=3).double() / N
    return out[:, 0], cond, shares


def test_inpainting_keeps_the_known_coordinate_and_samples_the_conditional():
    """Given y = -1, x | y is 0.63 N(-2, 0.4^2) + 0.37 N(2, 0.4^2) (mixture.conditional); tolerances are
    4 Monte-Carlo standard errors at n = 4000."""
    x, cond, shares = inpaint_x_given_y(-1.0)
    assert (shares - cond.weights).abs().max().item() < 4 * math.sqrt(0.25 / N)
    exact_mean = (cond.weights * cond.means[:, 0]).sum().item()
    exact_var = (cond.weights * (cond.means[:, 0] ** 2 + cond.stds**2)).sum().item() - exact_mean**2
    assert abs(x.mean().item() - exact_mean) < 4 * math.sqrt(exact_var / N)
    assert abs(x.var().item() - exact_var) < 0.1 * exact_var


def test_replacement_overweights_a_mode_the_known_part_rules_out_late():
    """Known limitation of replacement (App. I): it conditions on a noised y_t, so a mode that only the
    clean y rules out keeps its unconditional share. At y = 0.7 the rare mode (x = 0) has conditional
    weight 0.017 but keeps about its prior 0.05; kept as a regression test of the documented behaviour."""
    _, cond, shares = inpaint_x_given_y(0.7, seed=1)
    assert cond.weights[2].item() < 0.02
    assert shares[2].item() > 2 * cond.weights[2].item()


def test_colorization_keeps_the_gray_image_and_samples_the_chroma():
    """A 3-D mixture read as 1x1 RGB images; in the decoupled space its first coordinate is sqrt(3) gray
    and the chroma is drawn from the rotated mixture conditioned on it."""
    rgb = GaussianMixture([0.5, 0.3, 0.2], [[0.6, -0.3, -0.3], [-0.3, 0.6, -0.3], [0.1, 0.0, -0.1]], 0.15)
    sde = VPSDE()

    def score(x, t):
        return rgb.score(x.reshape(len(x), 3), t, sde).reshape(x.shape)

    gray = torch.zeros(N, 1, 1, 1, dtype=torch.float64)
    out = colorize(score, sde, gray, steps=300, generator=gen(1))
    assert out.shape == (N, 3, 1, 1)
    assert torch.allclose(out.mean(1, keepdim=True), gray, atol=1e-12)
    rotated = GaussianMixture(rgb.weights, rgb.means @ COLOR_DECOUPLE, rgb.stds)
    cond = rotated.conditional(torch.zeros(1, dtype=torch.float64), known=[0])
    chroma = out.reshape(N, 3) @ COLOR_DECOUPLE[:, 1:]
    shares = torch.bincount(cond.classify(chroma), minlength=3).double() / N
    assert (shares - cond.weights).abs().max().item() < 4 * math.sqrt(0.25 / N)


def test_decoupling_matrix_is_orthonormal_with_a_gray_axis():
    M = COLOR_DECOUPLE
    assert torch.allclose(M.T @ M, torch.eye(3, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(M[:, 0], torch.full((3,), 1 / math.sqrt(3), dtype=torch.float64))


def test_bad_input():
    sde = VPSDE()
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="mask must contain only 0"):
        inpaint(MIX.score_fn(sde), sde, x, torch.full((1, 2), 0.5))
    with pytest.raises(
        ValueError, match=r"mask of shape \(3,\) does not broadcast against x of shape \(4, 2\)"
    ):
        inpaint(MIX.score_fn(sde), sde, x, torch.ones(3))
    with pytest.raises(ValueError, match=r"gray has shape \(4, 3, 8, 8\); expected \(B, 1, H, W\)"):
        colorize(MIX.score_fn(sde), sde, torch.zeros(4, 3, 8, 8))
    with pytest.raises(TypeError, match="don't pass x_T or project"):
        inpaint(MIX.score_fn(sde), sde, x, torch.ones(1, 2), x_T=x)
