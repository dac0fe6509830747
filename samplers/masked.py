"""Ancestral sampling of masked (absorbing-state) discrete diffusion (MDLM; Sahoo et al. 2024).

The discrete counterpart of :func:`samplers.pc_sample`: the "score function" is the x0-predictor
``denoiser(x_t, t) -> log p(x0 | x_t)`` and the "SDE" a :class:`scorekit.discrete.MaskedDiffusion`.
Selection plug-ins (SVDD) apply through the same ``guide_step`` hook.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from scorekit.discrete import Denoiser, MaskedDiffusion
from scorekit.sde import batch_time
from scorekit.validate import positive_int

from ._common import check_steps
from .generators import StackedGenerator
from .hooks import Guidance, StepFn, apply_score_guidance, apply_step_guidance, check_guidance

__all__ = ["masked_sample", "masked_step", "masked_time_steps"]


def masked_time_steps(steps: int) -> tuple[Tensor, Tensor]:
    """The grid ``t_i = linspace(1, 0, steps + 1)[:-1]`` and each step's target ``t_{i+1}``, float64.

    The last step ends at ``s = 0``, where the kernel unmasks every remaining token; the reference
    instead stops at ``1e-5`` and takes the denoiser's argmax at the few tokens still masked.
    """
    grid = torch.linspace(1.0, 0.0, check_steps(steps, steps) + 1, dtype=torch.float64)
    return grid[:-1], grid[1:]


def masked_step(denoiser: Denoiser, diffusion: MaskedDiffusion,
                generator: torch.Generator | StackedGenerator | None = None) -> StepFn:
    """One ancestral reverse step ``step_fn(x_t, t, s) -> x_s`` (MDLM eq. 7), one denoiser call.

    Batch-agnostic and drawing from ``generator``, so selection plug-ins may call it on repeated batches.
    A per-sample :class:`~samplers.StackedGenerator` draws each sample's rows (its copies, rows ``i::B``)
    from its own stream.
    """

    def step(x: Tensor, t, s) -> Tensor:
        log_probs = denoiser(x, batch_time(t, x, diffusion.T))
        diffusion.check_output(log_probs, x)
        if not isinstance(generator, StackedGenerator):
            return diffusion.reverse_step(log_probs, x, t, s, generator)
        b, out = len(generator), torch.empty_like(x)
        generator.copies(x.shape[0])  # checks the tiling rule
        for i, g in enumerate(generator.generators):
            out[i::b] = diffusion.reverse_step(log_probs[i::b], x[i::b], t, s, g)
        return out

    return step


@torch.no_grad()
def masked_sample(
    denoiser: Denoiser,
    diffusion: MaskedDiffusion,
    num_samples: int,
    *,
    steps: int = 128,
    guidance: Iterable[Guidance] = (),
    x_T: Tensor | None = None,
    generator: torch.Generator | StackedGenerator | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """Sample ``num_samples`` sequences by ancestral sampling from the fully masked state (MDLM Sec. 3.2).

    ``steps`` uniform steps from ``t = 1`` to ``0`` (:func:`masked_time_steps`; the reference DNA/RNA
    models use 128). ``guidance`` takes selection plug-ins only (SVDD): their ``guide_score`` wraps the
    denoiser and their ``guide_step`` the kernel, in list order, as in :func:`samplers.pc_sample`.
    ``x_T`` (partly masked sequences) replaces the all-mask start. Returns a ``LongTensor``
    ``(num_samples, length)`` of tokens in ``range(vocab_size)``.
    """
    num_samples = positive_int(num_samples, "num_samples")
    guidance = check_guidance(guidance, "masked discrete diffusion", allowed=("step",))
    ts, ts_next = masked_time_steps(steps)
    if x_T is None:
        if device is None and generator is not None:
            device = generator.device
        x = diffusion.prior_sampling(int(num_samples), device=device)
    else:
        diffusion.check_tokens(x_T, "x_T")
        if x_T.shape[0] != num_samples:
            raise ValueError(f"x_T holds {x_T.shape[0]} sequences but num_samples={num_samples}")
        x = x_T
    denoiser = apply_score_guidance(denoiser, guidance)
    step = apply_step_guidance(masked_step(denoiser, diffusion, generator), denoiser, diffusion, guidance)
    for t, s in tqdm(list(zip(ts.tolist(), ts_next.tolist())), desc="masked_sample", disable=not progress):
        x = step(x, t, s)  # host times: nothing to copy to the device per step
    return x
