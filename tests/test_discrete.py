"""Masked discrete diffusion (scorekit.discrete, samplers.masked) against closed forms of a product mixture."""

import math

import pytest
import torch

from samplers.masked import masked_sample, masked_step, masked_time_steps
from scorekit.discrete import (
    MaskedDenoiser,
    MaskedDiffusion,
    ProductMixture,
    count_token,
    imbalanced_sequences,
    make_masked_loss,
    sample_categorical,
)
from scorekit.training import TrainConfig, Trainer

G = 2  # the token the rare component emits


def exact_count_distribution(pm: ProductMixture, token: int) -> torch.Tensor:
    """P(count of ``token`` = c), c = 0..L, for a mixture whose components are i.i.d. over positions."""
    c = torch.arange(pm.length + 1, dtype=torch.float64)
    binom = torch.exp(torch.lgamma(torch.tensor(pm.length + 1.0)) - torch.lgamma(c + 1) - torch.lgamma(pm.length - c + 1))
    p = pm.probs[:, 0, token]
    return (pm.weights[:, None] * binom * p[:, None] ** c * (1 - p[:, None]) ** (pm.length - c)).sum(0)


def total_variation(samples: torch.Tensor, exact: torch.Tensor) -> float:
    hist = torch.bincount(samples, minlength=len(exact)).double() / len(samples)
    return 0.5 * float((hist - exact).abs().sum())


def test_forward_process_masks_each_token_with_probability_m_t():
    d = MaskedDiffusion(4, 12, eps=1e-3)
    g = torch.Generator().manual_seed(0)
    x0 = imbalanced_sequences().sample(4000, g)
    for t in (0.1, 0.5, 0.9):
        frac = (d.q_sample(x0, t, g) == d.mask_index).double().mean()
        assert abs(float(frac) - (1 - 1e-3) * t) < 4 * math.sqrt(t * (1 - t) / x0.numel())
    assert float(d.sigma(torch.tensor(0.5, dtype=torch.float64))) == pytest.approx(-math.log(1 - 0.999 * 0.5))


def test_nelbo_of_the_exact_denoiser_is_the_exact_negative_log_likelihood():
    # With the exact x0-predictor the continuous-time NELBO is the any-order autoregressive chain rule,
    # whose expectation over t is -log p(x0) (up to the sampling_eps cut-off, ~1e-3 nats).
    d = MaskedDiffusion(4, 12, eps=0.0)
    pm = imbalanced_sequences()
    g = torch.Generator().manual_seed(1)
    x0 = pm.sample(3000, g)
    draws = torch.stack([d.nelbo(pm.denoiser(d), x0, g) for _ in range(8)])
    gap = draws.mean(0) + pm.log_prob(x0)
    se = float(gap.std() / math.sqrt(gap.numel()))
    assert abs(float(gap.mean())) < 4 * se + 0.01, (float(gap.mean()), se)


def test_exact_denoiser_is_the_posterior_of_the_mixture():
    pm = imbalanced_sequences(length=3)
    d = MaskedDiffusion(4, 3)
    x_t = torch.tensor([[G, d.mask_index, d.mask_index], [0, 1, d.mask_index]])
    lp = pm.denoiser(d)(x_t, torch.full((2,), 0.5))
    # brute force over every completion of each partly masked sequence
    grid = torch.cartesian_prod(*[torch.arange(4)] * 3)
    p = pm.log_prob(grid).exp()
    for b in range(2):
        keep = ((grid == x_t[b]) | (x_t[b] == d.mask_index)).all(1)
        cond = p * keep
        for pos in range(3):
            marg = torch.zeros(4, dtype=torch.float64).index_add_(0, grid[:, pos], cond) / cond.sum()
            assert torch.allclose(lp[b, pos].exp(), marg, atol=1e-12)


def test_reverse_step_copies_unmasked_tokens_and_unmasks_everything_at_zero():
    d = MaskedDiffusion(4, 12)
    pm = imbalanced_sequences()
    g = torch.Generator().manual_seed(2)
    x = d.q_sample(pm.sample(500, g), 0.6, g)
    lp = pm.denoiser(d)(x, torch.full((500,), 0.6))
    half = d.reverse_step(lp, x, 0.6, 0.3, g)
    unmasked = x != d.mask_index
    assert torch.equal(half[unmasked], x[unmasked])
    # a masked token stays masked with probability m(s) / m(t) = 1/2
    stay = (half[~unmasked] == d.mask_index).double().mean()
    assert abs(float(stay) - 0.5) < 4 * math.sqrt(0.25 / int((~unmasked).sum()))
    done = d.reverse_step(lp, x, 0.6, 0.0, g)
    assert int((done == d.mask_index).sum()) == 0


def test_sample_categorical_matches_the_probabilities():
    g = torch.Generator().manual_seed(3)
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]], dtype=torch.float64).expand(40000, 4) * 3.0  # unnormalised
    draws = sample_categorical(probs, g)
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    assert freq[1] == 0
    assert torch.allclose(freq, torch.tensor([0.2, 0.0, 0.5, 0.3], dtype=torch.float64), atol=0.01)


def test_ancestral_sampler_with_the_exact_denoiser_samples_the_data():
    # with more steps than tokens, parallel unmasking errors are small: the count distribution matches
    d = MaskedDiffusion(4, 12)
    pm = imbalanced_sequences()
    g = torch.Generator().manual_seed(4)
    x = masked_sample(pm.denoiser(d), d, 3000, steps=48, generator=g)
    assert x.dtype == torch.long and x.shape == (3000, 12)
    assert int(x.min()) >= 0 and int(x.max()) < 4
    tv = total_variation((x == G).sum(1), exact_count_distribution(pm, G))
    assert tv < 0.04, tv


@pytest.mark.slow
def test_trained_denoiser_learns_the_mixture():
    d = MaskedDiffusion(4, 12)
    pm = imbalanced_sequences()
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    config = TrainConfig(steps=1500, batch_size=256, lr=3e-3, warmup=50, ema_decay=0.99, progress=False,
                         checkpoint_every=0)
    trainer = Trainer(MaskedDenoiser(4, 12, hidden=128), make_masked_loss(d), pm.sample(20000, g), config)
    trainer.train()
    model = trainer.ema
    test = pm.sample(2000, g)
    with torch.no_grad():
        nelbo = torch.stack([d.nelbo(model, test, g) for _ in range(4)]).mean()
        x = masked_sample(model, d, 3000, steps=48, generator=g)
    entropy = -float(pm.log_prob(test).mean())
    assert float(nelbo) < 1.02 * entropy, (float(nelbo), entropy)
    assert total_variation((x == G).sum(1), exact_count_distribution(pm, G)) < 0.06


def test_denoiser_network_trains_to_the_data_entropy():
    # a fresh network predicts uniformly (log 4 nats per token); a short training run must bring its
    # NELBO, an upper bound on the NLL, within 3% of the data's exact entropy
    d = MaskedDiffusion(4, 12)
    pm = imbalanced_sequences()
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(0)
    net = MaskedDenoiser(4, 12, hidden=64, depth=2)
    x_t = d.q_sample(pm.sample(8, g), 0.5, g)
    out = net(x_t, torch.full((8,), 0.5))
    assert out.shape == (8, 12, 4)
    assert torch.allclose(out.exp().sum(-1), torch.ones(8, 12))
    assert (out.argmax(-1)[x_t != 4] == x_t[x_t != 4]).all()  # carried over
    data = pm.sample(4000, g)
    config = TrainConfig(steps=150, batch_size=256, lr=3e-3, ema_decay=0.0, progress=False, checkpoint_every=0)
    test = pm.sample(2000, g)
    with torch.no_grad():
        before = float(d.nelbo(net, test, g).mean())
    Trainer(net, make_masked_loss(d), data, config).train()
    with torch.no_grad():
        after = float(torch.stack([d.nelbo(net, test, g) for _ in range(4)]).mean())
    entropy = -float(pm.log_prob(test).mean())
    assert before == pytest.approx(12 * math.log(4), rel=0.02)
    assert entropy < 0.95 * before
    assert after < 1.03 * entropy, (after, entropy)


def test_time_grid_ends_at_zero():
    ts, ts_next = masked_time_steps(4)
    assert torch.equal(ts, torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64))
    assert torch.equal(ts_next, torch.tensor([0.75, 0.5, 0.25, 0.0], dtype=torch.float64))


# -- bad input -------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    d = MaskedDiffusion(4, 12)
    pm = imbalanced_sequences()
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 2"):
        MaskedDiffusion(1, 12)
    with pytest.raises(ValueError, match=r"shape \(3, 5\) but sequences have shape \(B, 12\)"):
        d.check_tokens(torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor of token indices"):
        d.nelbo(pm.denoiser(d), torch.zeros(3, 12))
    with pytest.raises(ValueError, match=r"x0 holds values in \[4, 4\]; expected tokens in \[0, 4\)"):
        d.nelbo(pm.denoiser(d), torch.full((3, 12), 4))
    with pytest.raises(ValueError, match=r"denoiser returned shape \(2, 12, 3\).*expected .* \(2, 12, 4\)"):
        masked_step(lambda x, t: torch.zeros(x.shape[0], 12, 3), d)(d.prior_sampling(2), 1.0, 0.5)
    with pytest.raises(FloatingPointError, match="NaN"):
        masked_step(lambda x, t: torch.full((x.shape[0], 12, 4), float("nan")), d)(d.prior_sampling(2), 1.0, 0.5)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        masked_sample(pm.denoiser(d), d, 4, steps=0)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        masked_sample(pm.denoiser(d), d, 0)
    with pytest.raises(ValueError, match="weights must be positive and sum to 1"):
        ProductMixture([0.5, 0.6], torch.full((2, 4), 0.25), length=3)


def test_score_gradient_plugins_are_refused():
    from guidance.base import Guidance

    class Gradient(Guidance):
        def guide_score(self, score_fn):
            return score_fn

    d = MaskedDiffusion(4, 12)
    with pytest.raises(ValueError, match="Gradient guides a continuous score.*use a step-level"):
        masked_sample(imbalanced_sequences().denoiser(d), d, 4, steps=4, guidance=[Gradient()])


def test_count_token():
    assert torch.equal(count_token(torch.tensor([[2, 2, 0], [1, 1, 1]]), 2), torch.tensor([2.0, 0.0]))
