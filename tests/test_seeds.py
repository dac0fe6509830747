"""Per-sample generators (samplers.StackedGenerator): a sample does not depend on its batch, and the loops
read nothing back from the device per step."""

import sys
from pathlib import Path

import pytest
import torch

from guidance import SVDD
from samplers import StackedGenerator, ode_sample, pc_sample
from samplers._common import CHECK_EVERY
from scorekit import VESDE, VPSDE
from scorekit.data import imbalanced_mixture

MIX = imbalanced_mixture()
SEEDS = [11, 3, 7, 0, 42, 5]


def split_runs(sampler, splits, seeds=SEEDS):
    """``sampler(batch, generator)`` run on consecutive chunks of ``seeds`` of the given sizes."""
    out, start = [], 0
    for size in splits:
        out.append(sampler(size, StackedGenerator(seeds[start : start + size])))
        start += size
    assert start == len(seeds)
    return torch.cat(out)


def batch_of_one(sampler, seeds=SEEDS):
    """The independent computation: each sample alone, from a plain generator seeded like its stream."""
    return torch.cat([sampler(1, torch.Generator().manual_seed(s)) for s in seeds])


@pytest.mark.parametrize("sde, corrector", [(VPSDE(), "langevin"), (VESDE(), "annealed_langevin"),
                                            (VPSDE(), None)], ids=["vp-langevin", "ve-annealed", "vp-none"])
def test_pc_sample_is_independent_of_the_batch_split(sde, corrector):
    def sampler(b, g):
        return pc_sample(MIX.score_fn(sde), sde, (b, 2), steps=15, corrector=corrector, eps=1e-3, generator=g,
                         dtype=torch.float64)

    whole = split_runs(sampler, [6])
    assert torch.equal(whole, split_runs(sampler, [2, 4]))
    assert torch.equal(whole, split_runs(sampler, [1, 3, 2]))
    assert torch.equal(whole, batch_of_one(sampler))
    assert torch.isfinite(whole).all() and len(set(whole[:, 0].tolist())) == len(SEEDS)


@pytest.mark.parametrize("method, steps", [("rk4", 8), ("dpm_solver_2m", 10), ("euler", 12)])
def test_fixed_step_ode_sample_is_independent_of_the_batch_split(method, steps):
    sde = VPSDE()

    def sampler(b, g):
        return ode_sample(MIX.score_fn(sde), sde, (b, 2), method=method, steps=steps, generator=g,
                          dtype=torch.float64)

    whole = split_runs(sampler, [6])
    assert torch.equal(whole, split_runs(sampler, [4, 2]))
    assert torch.equal(whole, batch_of_one(sampler))


def test_adaptive_ode_sample_agrees_across_splits_to_the_tolerance():
    # dopri5 picks one step sequence for the whole batch, so splits agree to the tolerance, not bitwise
    sde = VPSDE()

    def sampler(b, g):
        return ode_sample(MIX.score_fn(sde), sde, (b, 2), generator=g, rtol=1e-7, atol=1e-7, dtype=torch.float64)

    assert torch.allclose(split_runs(sampler, [6]), split_runs(sampler, [3, 3]), atol=1e-4)


def test_svdd_candidates_follow_the_tiling_rule():
    """SVDD draws its M candidates for M * B rows: sample i is what a batch of one gives (argmax selection)."""
    sde = VPSDE()

    def sampler(b, g):
        svdd = SVDD(lambda x: x[:, 1], num_candidates=3)
        return pc_sample(MIX.score_fn(sde), sde, (b, 2), steps=10, guidance=[svdd], generator=g,
                         dtype=torch.float64)

    whole = split_runs(sampler, [6])
    assert torch.equal(whole, split_runs(sampler, [2, 2, 2]))
    assert torch.equal(whole, batch_of_one(sampler))


def test_tiling_rule_and_its_errors():
    g = StackedGenerator([1, 2, 3])
    x = g.randn((6, 4), dtype=torch.float64)
    for i, seed in enumerate([1, 2, 3]):
        # rows i and 3 + i are the two draws (one call of shape (2, 4)) of stream i
        ref = torch.randn((2, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert torch.equal(x[i::3], ref)
    assert len(g[1:]) == 2 and g[1:].seeds == (2, 3)
    with pytest.raises(ValueError, match="3 streams cannot serve a draw for 4 rows"):
        g.randn((4, 2))
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        StackedGenerator([0, -1])
    with pytest.raises(ValueError, match="at least one seed"):
        StackedGenerator([])


# -- no host reads per step ----------------------------------------------------------------------
class ReadCounter:
    """Counts ``Tensor.item`` / ``tolist`` / ``__bool__`` calls made from the sampler packages' files."""

    ROOTS = tuple(str(Path(__file__).resolve().parents[1] / pkg) for pkg in ("samplers", "guidance"))

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("item", "tolist", "__bool__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original))

    def _wrap(self, original):
        def counted(tensor, *args):
            if sys._getframe(1).f_code.co_filename.startswith(self.ROOTS):
                self.count += 1
            return original(tensor, *args)

        return counted


@pytest.mark.parametrize("steps", [40, 100])
def test_pc_loop_reads_back_only_at_the_every_k_check(monkeypatch, steps):
    sde = VPSDE()
    counter = ReadCounter(monkeypatch)
    pc_sample(MIX.score_fn(sde), sde, (8, 2), steps=steps, generator=torch.Generator().manual_seed(0))
    evaluations = 2 * steps  # one corrector and one predictor evaluation per step
    # set-up reads (the host grid) plus one read per CHECK_EVERY evaluations and one at the end
    assert counter.count <= 2 + evaluations // CHECK_EVERY + 1


def test_fixed_step_ode_and_dpm_solver_loops_do_not_read_back(monkeypatch):
    sde = VPSDE()
    counter = ReadCounter(monkeypatch)
    for method, steps in (("rk4", 25), ("dpm_solver_2m", 100)):
        ode_sample(MIX.score_fn(sde), sde, (8, 2), method=method, steps=steps)
    # the grids' tolist calls (a handful) plus the every-k checks: 100 evaluations each
    assert counter.count <= 8 + 2 * (100 // CHECK_EVERY + 1)


def test_nan_is_still_named_with_its_first_step_and_time():
    sde = VPSDE()
    score = MIX.score_fn(sde)
    # the score turns inf below t = 0.3: on the grid linspace(1, 1e-3, 50) that is step 36 (t = 0.2864),
    # past the first every-k check, so the error comes from a later read-back that still names it
    with pytest.raises(FloatingPointError, match=r"step 36 of 50, t = 0\.286429"):
        pc_sample(lambda x, t: score(x, t) / (t[:, None] >= 0.3), sde, (4, 2), steps=50, corrector=None)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "both infinities"])
def test_one_bad_entry_is_caught_and_large_half_precision_scores_are_not(bad):
    """The check sums each score on the device: one NaN, one inf, or +inf and -inf together (whose sum is NaN)
    in a large tensor are caught; float16 scores near its largest value are summed in float32, not overflowed."""
    from samplers._common import CheckedScore

    x = torch.zeros(64, 3, 32, 32)
    s = torch.zeros_like(x)
    if bad == "both infinities":
        s[3, 1, 5, 7], s[60, 2, 0, 0] = float("inf"), float("-inf")
    else:
        s[17, 0, 31, 2] = bad
    checked = CheckedScore(lambda x, t: s, steps=4)
    checked.step = 3
    checked(x, torch.full((64,), 0.5))
    with pytest.raises(FloatingPointError, match=r"step 3 of 4, t = 0\.5"):
        checked.check()
    big = torch.full((64, 3, 32, 32), 60000.0, dtype=torch.float16)
    checked = CheckedScore(lambda x, t: big)
    checked(big, torch.full((64,), 0.5))
    checked.check()  # 1.2e10 in float32: finite


def test_ode_progress_bar_shows_nfe_and_t(capsys):
    sde = VPSDE()
    ode_sample(MIX.score_fn(sde), sde, (4, 2), method="rk4", steps=3, progress=True)
    err = capsys.readouterr().err
    assert "ode_sample" in err and "12nfe" in err.replace(" ", "") and "t=" in err
