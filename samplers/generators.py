"""Per-sample random streams: one ``torch.Generator`` per sample, as EDM's ``StackedRandomGenerator``.

Sample ``i`` of a batch drawn with a :class:`StackedGenerator` takes its prior draw and every noise draw
of the sampler from its own stream, so it does not depend on the batch it is drawn in nor on the
number of processes: row ``i`` equals what the sampler returns for a batch of one with a
``torch.Generator`` seeded like stream ``i``.

**The tiling rule.** Plug-ins evaluate repeated batches ``x.repeat(k, ...)`` (SVDD's ``M`` candidates;
the library's batch rule), whose row ``j * B + i`` is copy ``j`` of sample ``i``. A draw for ``k * B``
rows takes from each stream ``i`` one draw of shape ``(k, *shape[1:])`` -- exactly what a batch of
one would draw for its ``k`` copies -- and gives its slice ``j`` to row ``j * B + i``. A draw whose
batch is not a multiple of ``B`` is an error.

Every sampler draws through :func:`randn` and :func:`rand` (and :func:`draw` for other
distributions), which accept ``None``, a ``torch.Generator`` or a :class:`StackedGenerator`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from scorekit.validate import int_at_least

__all__ = ["StackedGenerator", "randn", "rand", "draw", "stream_mean"]


class StackedGenerator:
    """One ``torch.Generator`` per sample, seeded with ``seeds[i]`` (on ``device``).

    ``randn(shape)`` stacks per-stream draws of ``shape[1:]`` (for ``shape[0] = k * len(self)`` rows,
    see the module's tiling rule). Indexing with a slice gives the streams of a sub-batch (sharing
    their state), so one object can serve a run drawn in batches.
    """

    def __init__(self, seeds: Iterable[int] | None = None, device: torch.device | str = "cpu", *,
                 generators: list[torch.Generator] | None = None):
        if generators is None:
            seeds = [int_at_least(s, 0, "seed", "a per-sample seed") for s in seeds]
            if not seeds:
                raise ValueError("a StackedGenerator needs at least one seed")
            generators = [torch.Generator(device).manual_seed(s) for s in seeds]
        self.generators = list(generators)
        self.seeds = tuple(g.initial_seed() for g in self.generators)

    @property
    def device(self) -> torch.device:
        return self.generators[0].device

    def __len__(self) -> int:
        return len(self.generators)

    def __getitem__(self, index: slice) -> StackedGenerator:
        if not isinstance(index, slice):
            raise TypeError("index a StackedGenerator with a slice (the streams of a sub-batch)")
        return StackedGenerator(generators=self.generators[index])

    def __repr__(self) -> str:
        return f"StackedGenerator({len(self)} streams, seeds {self.seeds[0]}..{self.seeds[-1]}, {self.device})"

    def copies(self, rows: int) -> int:
        """``k`` for a draw of ``rows = k * len(self)`` rows (the tiling rule); raises otherwise."""
        if rows % len(self):
            raise ValueError(f"a per-sample generator of {len(self)} streams cannot serve a draw for {rows} rows: "
                             f"the batch must be k * {len(self)} rows (k stacked copies, x.repeat(k, ...))")
        return rows // len(self)

    def draw(self, fn: Callable[[tuple[int, ...], torch.Generator], Tensor], shape) -> Tensor:
        """``fn(per_stream_shape, generator)`` for every stream, tiled into ``shape`` (module docstring)."""
        shape = tuple(shape)
        k = self.copies(shape[0])
        parts = [fn((k, *shape[1:]), g) for g in self.generators]
        return torch.stack(parts, 1).reshape(shape)

    def randn(self, shape, *, dtype: torch.dtype | None = None, device=None) -> Tensor:
        """Standard normal draws of ``shape``, one stream per sample."""
        x = self.draw(lambda s, g: torch.randn(s, generator=g, device=g.device, dtype=dtype), shape)
        return x if device is None else x.to(device)

    def rand(self, shape, *, dtype: torch.dtype | None = None, device=None) -> Tensor:
        """Uniform ``[0, 1)`` draws of ``shape``, one stream per sample."""
        x = self.draw(lambda s, g: torch.rand(s, generator=g, device=g.device, dtype=dtype), shape)
        return x if device is None else x.to(device)


def draw(fn: Callable[[tuple[int, ...], torch.Generator | None], Tensor], shape, generator) -> Tensor:
    """``fn(shape, generator)`` for a plain generator (or ``None``); per stream for a :class:`StackedGenerator`."""
    if isinstance(generator, StackedGenerator):
        return generator.draw(fn, shape)
    return fn(tuple(shape), generator)


def randn(shape, generator=None, device=None, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.randn(shape)`` from ``generator`` (``None``, a ``torch.Generator`` or a :class:`StackedGenerator`)."""
    if isinstance(generator, StackedGenerator):
        return generator.randn(shape, dtype=dtype, device=device)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def rand(shape, generator=None, device=None, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.rand(shape)`` from ``generator``, as :func:`randn`."""
    if isinstance(generator, StackedGenerator):
        return generator.rand(shape, dtype=dtype, device=device)
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)


def stream_mean(v: Tensor, generator) -> Tensor:
    """The batch mean of per-row values ``v`` ``(rows,)``: over the whole batch (a scalar), or, for a
    :class:`StackedGenerator`, over each sample's copies (the mean a batch of one takes), per row."""
    if not isinstance(generator, StackedGenerator):
        return v.mean()
    k = generator.copies(v.shape[0])
    return v.view(k, len(generator)).mean(0).repeat(k)
