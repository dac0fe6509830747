"""ScoreModel parameterizations and Tweedie's formula against the exact Gaussian-mixture quantities."""

import pytest
import torch
from torch import nn

from scorekit import VESDE, VPSDE, ScoreModel, SubVPSDE, tweedie_denoise
from scorekit.data import GaussianMixture, imbalanced_mixture
from scorekit.nets import MLP, make_unet

SDES = [VPSDE(), SubVPSDE(), VESDE()]
ids = ["vp", "subvp", "ve"]


class OracleNet(nn.Module):
    """Outputs what an ideal network of each parameterization would, from the mixture's exact quantities."""

    def __init__(self, gm: GaussianMixture, sde, prediction: str, time_input: str):
        super().__init__()
        self.gm, self.sde, self.prediction, self.time_input = gm, sde, prediction, time_input

    def t_of(self, c):
        if self.time_input == "index":
            return c / (self.sde.N - 1)
        if self.time_input == "t":
            return c
        sigma = c.exp() if self.time_input == "log_sigma" else c
        return self.sde.t_from_log_snr(-2 * torch.log(sigma))

    def forward(self, x, c):
        t = self.t_of(c.to(x.dtype))
        alpha, sigma = (v[:, None] for v in self.sde.marginal_coeffs(t))
        score = self.gm.score(x, t, self.sde)
        x0 = self.gm.posterior_mean(x, t, self.sde)
        eps = -sigma * score
        return {"score": score, "eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[self.prediction]


@pytest.mark.parametrize("sde", SDES, ids=ids)
@pytest.mark.parametrize("prediction", ["eps", "score", "x0", "v"])
def test_every_parameterization_recovers_the_exact_score(sde, prediction):
    gm = imbalanced_mixture()
    time_input = "log_sigma" if sde.name == "ve" else "index"
    model = ScoreModel(OracleNet(gm, sde, prediction, time_input), sde, prediction=prediction, data_shape=(2,))
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.02
    torch.testing.assert_close(model(x, t), gm.score(x, t, sde), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("sde", SDES, ids=ids)
def test_tweedie_equals_the_exact_posterior_mean(sde):
    gm = imbalanced_mixture()
    g = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(128, 2, generator=g, dtype=torch.float64)
    t = torch.rand(128, generator=g, dtype=torch.float64) * 0.9 + 0.05
    torch.testing.assert_close(tweedie_denoise(gm.score_fn(sde), sde, x, t), gm.posterior_mean(x, t, sde))


def test_posterior_mean_by_quadrature_in_1d():
    """E[x0 | x_t] from the mixture formula against direct numerical integration of p(x0) p(x_t | x0)."""
    sde = VPSDE()
    gm = GaussianMixture([0.95, 0.05], [[-2.0], [2.0]], 0.5)
    grid = torch.linspace(-6, 6, 20001, dtype=torch.float64)[:, None]
    prior = gm.log_prob(grid).exp()
    for t_val, x_val in [(0.3, 0.4), (0.6, 1.1), (0.9, -0.3)]:
        t = torch.tensor([t_val], dtype=torch.float64)
        alpha, sigma = sde.marginal_coeffs(t)
        lik = torch.exp(-0.5 * ((x_val - alpha * grid[:, 0]) / sigma) ** 2)
        w = prior * lik
        ref = (w * grid[:, 0]).sum() / w.sum()
        got = gm.posterior_mean(torch.tensor([[x_val]], dtype=torch.float64), t, sde)
        assert abs(got.item() - ref.item()) < 1e-8


def test_time_inputs_follow_the_reference_conventions():
    seen = {}

    class Probe(nn.Module):
        data_shape = (2,)

        def forward(self, x, c):
            seen["c"] = c
            return torch.zeros_like(x)

    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    x = torch.zeros(3, 2, dtype=torch.float64)
    ScoreModel(Probe(), VPSDE(N=1000))(x, t)
    torch.testing.assert_close(seen["c"], t * 999)
    ve = VESDE()
    ScoreModel(Probe(), ve)(x, t)
    torch.testing.assert_close(seen["c"], torch.log(ve.sigma(t)))
    ScoreModel(Probe(), ve, time_input="sigma")(x, t)
    torch.testing.assert_close(seen["c"], ve.sigma(t))


def test_networks_run_inside_score_models():
    sde = VPSDE()
    x = torch.randn(4, 1, 8, 8)
    unet = ScoreModel(make_unet(8, 1, (16, 32)), sde)
    mlp = ScoreModel(MLP((1, 8, 8), hidden=32, depth=1), sde)
    for model in (unet, mlp):
        out = model(x, torch.full((4,), 0.5))
        assert out.shape == x.shape and torch.isfinite(out).all()
    assert unet.data_shape == (1, 8, 8)
    # the MLP's zero-initialised head makes the initial eps prediction exactly zero
    assert (mlp.raw(x, 0.5) == 0).all()


def test_bad_inputs():
    sde = VPSDE()
    model = ScoreModel(make_unet(8, 1, (16, 32)), sde)
    with pytest.raises(ValueError, match=r"x has shape \(8, 3, 32, 32\) but the model expects \(B, 1, 8, 8\)"):
        model(torch.randn(8, 3, 32, 32), torch.rand(8))
    with pytest.raises(ValueError, match=r"unknown prediction 'noise'; valid parameterizations are"):
        ScoreModel(MLP(2), sde, prediction="noise")
    with pytest.raises(ValueError, match="time_input='sigma' needs a VESDE"):
        ScoreModel(MLP(2), sde, time_input="sigma")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1.0\]"):
        ScoreModel(MLP(2), sde)(torch.randn(2, 2), torch.tensor([0.5, -0.5]))
    with pytest.raises(TypeError, match="floating-point tensor"):
        ScoreModel(MLP(2), sde)(torch.ones(2, 2, dtype=torch.long), torch.rand(2))
    with pytest.raises(ValueError, match="cannot be halved"):
        make_unet(sample_size=6, block_out_channels=(8, 16, 32), norm_num_groups=8)
    with pytest.raises(ValueError, match="'positional' .* or 'fourier'"):
        make_unet(time_embedding="learned")


def test_guided_conditioning_needs_the_unconditional_added_kwargs():
    """With added_cond_kwargs (SDXL's pooled embedding), classifier-free guidance needs the unconditional branch's
    own: reusing the prompt's for both branches would be silently wrong."""
    model = ScoreModel(nn.Identity(), VPSDE())
    h, h_neg = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    added, added_neg = {"text_embeds": torch.ones(2, 5)}, {"text_embeds": torch.zeros(2, 5)}
    with pytest.raises(ValueError, match="needs the unconditional branch's as well: pass negative_added_cond_kwargs="):
        model.conditioning(guided=True, encoder_hidden_states=h, negative_encoder_hidden_states=h_neg,
                           added_cond_kwargs=added)
    cond = model.conditioning(guided=True, encoder_hidden_states=h, negative_encoder_hidden_states=h_neg,
                              added_cond_kwargs=added, negative_added_cond_kwargs=added_neg)
    assert cond.cond["added_cond_kwargs"] is added and cond.uncond["added_cond_kwargs"] is added_neg
    assert cond.uncond["encoder_hidden_states"] is h_neg
