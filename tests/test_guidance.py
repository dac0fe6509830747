"""Classifier guidance and noisy-classifier training, checked against the Gaussian mixture's closed forms.

The mixture's exact component posterior ``p(k | x_t)`` is a noisy-input classifier whose guided
score ``s + grad log p(k | x_t)`` is exactly the score of the component ``k`` diffused: guidance at
scale 1 must sample ``N(mu_k, s_k^2 I)``.
"""

import pytest
import torch

from guidance.base import apply_score_guidance
from guidance.classifier import (
    ClassifierGuidance,
    classifier_log_prob_grad,
    default_classifier_config,
    load_classifier,
    save_classifier,
    train_noisy_classifier,
)
from samplers import ode_sample, pc_sample
from scorekit import VESDE, VPSDE
from scorekit.checkpoint import save_tensors
from scorekit.data import imbalanced_mixture
from scorekit.nets.classifier import ConvClassifier, MLPClassifier, classifier_from_config, make_classifier

RARE = 2


def exact_classifier(gm, sde):
    """``log p(k | x_t)`` of the mixture: the exact noisy-input component classifier, as logits."""

    def classifier(x, t):
        return torch.log(gm.responsibilities(x, t, sde))

    return classifier


@pytest.fixture(scope="module")
def setup():
    return imbalanced_mixture(), VPSDE()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_log_prob_grad_matches_closed_form(setup):
    # grad log p(k | x_t) = score of component k at t - score of the mixture at t.
    gm, sde = setup
    x = 3 * torch.randn(64, 2, generator=gen(0), dtype=torch.float64)
    t = torch.rand(64, generator=gen(1), dtype=torch.float64) * 0.9 + 0.05
    alpha, sigma = sde.marginal_coeffs(t)
    var = alpha**2 * gm.stds[RARE] ** 2 + sigma**2
    component_score = -(x - alpha[:, None] * gm.means[RARE]) / var[:, None]
    expected = component_score - gm.score(x, t, sde)
    got = classifier_log_prob_grad(exact_classifier(gm, sde), x, t, RARE)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_exact_posterior_guidance_samples_the_target_component(setup):
    gm, sde = setup
    guide = ClassifierGuidance(exact_classifier(gm, sde), target=RARE, scale=1.0)
    x = pc_sample(gm.score_fn(sde), sde, (2000, 2), predictor="ancestral", corrector=None, steps=200,
                  guidance=[guide], generator=gen(0), dtype=torch.float64)
    share = (gm.classify(x) == RARE).double().mean()
    assert share >= 0.9
    # scale 1 with the exact classifier is the exact conditional N(mu_rare, 0.4^2 I): mean and spread
    # within Monte-Carlo error (se of the mean 0.009, of the std about 0.006) plus discretisation.
    torch.testing.assert_close(x.mean(0), gm.means[RARE], atol=0.04, rtol=0)
    torch.testing.assert_close(x.std(0), gm.stds[RARE].expand(2), atol=0.03, rtol=0)


def test_guidance_works_in_the_probability_flow_ode(setup):
    gm, sde = setup
    guide = ClassifierGuidance(exact_classifier(gm, sde), target=RARE, scale=1.0)
    x = ode_sample(gm.score_fn(sde), sde, (500, 2), method="rk4", steps=100, guidance=[guide], generator=gen(1),
                   dtype=torch.float64)
    assert (gm.classify(x) == RARE).double().mean() >= 0.9


def test_scale_zero_is_bit_identical(setup):
    gm, sde = setup
    kw = {"predictor": "ancestral", "corrector": "langevin", "steps": 30, "dtype": torch.float64}
    plain = pc_sample(gm.score_fn(sde), sde, (256, 2), generator=gen(3), **kw)
    guide = ClassifierGuidance(exact_classifier(gm, sde), target=RARE, scale=0.0)
    guided = pc_sample(gm.score_fn(sde), sde, (256, 2), guidance=[guide], generator=gen(3), **kw)
    assert torch.equal(plain, guided)


def test_plugins_compose_additively(setup):
    gm, sde = setup
    clf = exact_classifier(gm, sde)
    x = torch.randn(32, 2, generator=gen(4), dtype=torch.float64)
    t = torch.full((32,), 0.3, dtype=torch.float64)
    half = [ClassifierGuidance(clf, RARE, 0.5), ClassifierGuidance(clf, RARE, 1.5)]
    both = apply_score_guidance(gm.score_fn(sde), half)(x, t)
    once = apply_score_guidance(gm.score_fn(sde), [ClassifierGuidance(clf, RARE, 2.0)])(x, t)
    torch.testing.assert_close(both, once, rtol=1e-12, atol=1e-12)


def test_per_sample_targets(setup):
    gm, sde = setup
    clf = exact_classifier(gm, sde)
    x = torch.randn(6, 2, generator=gen(5), dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 2, 1, 0])
    got = classifier_log_prob_grad(clf, x, 0.4, targets)
    for k in range(3):
        rows = targets == k
        torch.testing.assert_close(got[rows], classifier_log_prob_grad(clf, x[rows], 0.4, k))


def test_trained_noisy_classifier_approaches_the_posterior(setup):
    gm, sde = setup
    x, k = gm.sample(4000, gen(6), return_labels=True)
    torch.manual_seed(0)
    net = make_classifier(2, 3, hidden=64, depth=2)
    clf = train_noisy_classifier(net, sde, x, k, default_classifier_config(steps=250, lr=5e-3, seed=1))
    assert not any(p.requires_grad for p in clf.parameters())
    x_test = gm.sample(2000, gen(7))
    for t in (0.1, 0.4, 0.7):
        tt = torch.full((2000,), t)
        x_t = sde.marginal_coeffs(tt)[0][:, None] * x_test + sde.marginal_coeffs(tt)[1][:, None] * torch.randn(
            2000, 2, generator=gen(8))
        with torch.no_grad():
            learned = torch.softmax(clf(x_t, tt), 1)
        exact = gm.responsibilities(x_t.double(), tt.double(), sde)
        assert (learned.double() - exact).abs().sum(1).mean() < 0.1, t
    guide = ClassifierGuidance(clf, target=RARE, scale=1.0)
    samples = pc_sample(gm.score_fn(sde), sde, (1000, 2), predictor="ancestral", corrector=None, steps=100,
                        guidance=[guide], generator=gen(9))
    assert (gm.classify(samples.double()) == RARE).double().mean() >= 0.85


# -- persistence -------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net = make_classifier((1, 8, 8), 10, channels=(16, 32)).eval()
    path = tmp_path / "clf.safetensors"
    save_classifier(path, net, VESDE())
    loaded, meta = load_classifier(path)
    assert isinstance(loaded, ConvClassifier) and meta["num_classes"] == 10 and meta["kind"] == "classifier"
    x, t = torch.randn(4, 1, 8, 8, generator=gen(0)), torch.rand(4, generator=gen(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), net(x, t), rtol=0, atol=0)
    guide = ClassifierGuidance.load(path, target=3, scale=2.0)
    assert guide.sde == VESDE() and guide.num_classes == 10 and guide.scale == 2.0
    with pytest.raises(ValueError, match=r"target class 10 is out of range: valid classes are 0..9"):
        ClassifierGuidance.load(path, target=10)


def test_load_refuses_foreign_files(tmp_path):
    path = tmp_path / "other.safetensors"
    save_tensors({"w": torch.zeros(2)}, path, {"format": "something-else"})
    with pytest.raises(ValueError, match="not a scorekit classifier"):
        load_classifier(path)


def test_classifier_config_round_trip():
    for net in (MLPClassifier((1, 8, 8), out_dim=1, hidden=32, depth=1), ConvClassifier((3, 16, 16), 7, channels=(8, 16, 16))):
        rebuilt = classifier_from_config(net.config)
        assert type(rebuilt) is type(net) and rebuilt.config == net.config
        x = torch.randn(2, *net.data_shape)
        assert rebuilt(x, torch.rand(2)).shape == (2, net.out_dim)


# -- bad input ----------------------------------------------------------------------------------------
def test_bad_input_errors(setup):
    gm, sde = setup
    clf = exact_classifier(gm, sde)
    net = MLPClassifier(2, out_dim=3)
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        ClassifierGuidance(clf, RARE, scale=-1.0)
    with pytest.raises(ValueError, match="target class 3 is out of range: valid classes are 0..2"):
        ClassifierGuidance(net, 3)
    with pytest.raises(TypeError, match="must be an integer index"):
        ClassifierGuidance(net, 1.5)
    with pytest.raises(ValueError, match="has 3 outputs but num_classes=4"):
        ClassifierGuidance(net, 0, num_classes=4)
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="target class 5 is out of range for a classifier with 3 classes"):
        ClassifierGuidance(clf, 5).log_prob_grad(x, 0.5)
    with pytest.raises(ValueError, match=r"logits of shape \(4,\)"):
        ClassifierGuidance(lambda x, t: x[:, 0], 0).log_prob_grad(x, 0.5)
    with pytest.raises(ValueError, match="labels span 0..3 but the classifier has 3 outputs"):
        train_noisy_classifier(net, sde, torch.randn(8, 2), torch.tensor([0, 1, 2, 3] * 2))
    with pytest.raises(ValueError, match="x has shape .* but the classifier expects"):
        net(torch.randn(4, 3), torch.rand(4))
    with pytest.raises(TypeError, match="only networks from scorekit.nets.classifier can be saved"):
        save_classifier("/tmp/never.safetensors", torch.nn.Linear(2, 3), sde)
    with pytest.raises(ValueError, match="unknown classifier net 'resnet'"):
        make_classifier(2, 3, net="resnet")
