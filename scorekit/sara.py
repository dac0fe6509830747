"""SaRA: progressive sparse low-rank adaptation (Hu et al. 2024, arXiv 2409.06633), with a peft-like API.

SaRA fine-tunes the *temporarily ineffective* entries of a pre-trained model: in every adapted weight the
entries with the smallest magnitudes (``|w| < threshold`` in the paper, or the smallest ``fraction`` of each
tensor here) become trainable, everything else stays frozen. Three further pieces complete the method:

- a nuclear-norm penalty ``lambda_rank * ||W * M||_*`` on the sparse trainable matrix, which keeps the
  learned update low-rank (:func:`rank_penalty`);
- a progressive step that re-selects the trainable set once during training from the weights as they
  are then (:func:`reselect`);
- the *unstructured backpropagation*: a custom autograd function builds the adapted weight one block of
  output rows at a time, uses it and drops it, and its backward rebuilds it the same way and returns only the
  gradient at the selected entries, so no dense copy of the weight or of its gradient outlives one block.

The pre-trained weight itself is never written, and a selection made by magnitude is stored as its threshold,
not as per-entry indices: SaRA's training state is the frozen model plus, per trainable entry, the value, its
gradient and the optimizer's moments, the same as LoRA's per trainable parameter.

Usage mirrors peft (``LoraConfig`` -> :class:`SaRAConfig`, ``get_peft_model`` -> :func:`apply_sara`,
``save_pretrained`` -> :func:`save_sara`, ``PeftModel.from_pretrained`` -> :func:`load_sara`,
``merge_and_unload`` -> :func:`merge_sara`, ``unload`` -> :func:`unload_sara`, ``with disable_adapter()`` ->
``with disable_sara(model)``)::

    model = apply_sara(model, SaRAConfig(threshold=2e-3, progressive_step=2500))
    print_trainable_parameters(model)                # peft's line
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ...  loss = task_loss + rank_penalty(model, generator)
    save_sara(model, "adapter")                      # adapter/adapter_config.json + adapter_model.safetensors
    load_sara(fresh_model, "adapter")                # or merge_sara(model) for a plain model
    with disable_sara(model): ...                    # the pre-trained model, re-enabled on exit

A diffusers model carrying SaRA layers keeps working with ``save_pretrained``: it writes the plain merged
model (see :func:`apply_sara`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .checkpoint import load_json, load_tensors, save_json, save_tensors
from .validate import positive_int

__all__ = [
    "SaRAConfig",
    "SaRALayer",
    "find_targets",
    "apply_sara",
    "sara_state_dict",
    "save_sara",
    "load_sara",
    "merge_sara",
    "unload_sara",
    "disable_sara",
    "enable_sara",
    "rank_penalty",
    "reselect",
    "print_trainable_parameters",
    "base_model_identity",
]

FORMAT = "scorekit-sara/1"
# The peft-style directory form of an adapter (save_sara(model, DIR)).
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# The authors apply the nuclear norm only to 2-D weights whose both sides exceed 64.
RANK_MIN_SIDE = 64


@dataclass
class SaRAConfig:
    """Which entries SaRA trains and how.

    Exactly one of ``threshold`` (train every entry with ``|w| < threshold``, the paper's rule; the
    authors use ``2e-3``) or ``fraction`` (train the ``ceil(fraction * numel)`` smallest-``|w|`` entries
    of each weight tensor) must be given. ``target_modules`` follows peft: ``None`` adapts every
    ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (diffusers' attention projections ``to_q/to_k/to_v/to_out``
    are ``nn.Linear``); a string is a regular expression that must match a module's full name; a list
    matches module names equal to an entry or ending in ``"." + entry``. ``rank_lambda`` is the weight of
    the nuclear-norm penalty (the authors' ``5e-4``), ``progressive_step`` the training step after which
    :func:`reselect` runs once (the authors: 2,500 of 5,000), ``None`` for never.
    ``unstructured_backprop=False`` builds the adapted weight with ordinary autograd ops instead of the
    memory-saving custom function (same results; used to measure what the custom backward saves).
    """

    threshold: float | None = None
    fraction: float | None = None
    target_modules: str | list[str] | None = None
    rank_lambda: float = 5e-4
    progressive_step: int | None = None
    unstructured_backprop: bool = True

    def __post_init__(self):
        if (self.threshold is None) == (self.fraction is None):
            given = "both" if self.threshold is not None else "neither"
            raise ValueError(
                f"SaRAConfig needs exactly one of threshold= (train entries with |w| < threshold, e.g. 2e-3) "
                f"or fraction= (train the smallest-|w| fraction of each weight, e.g. 0.1); {given} given"
            )
        if self.threshold is not None and not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold must be a positive finite number, got {self.threshold}")
        if self.fraction is not None and not 0 < self.fraction < 1:
            raise ValueError(f"fraction must lie in (0, 1) (the share of entries trained per weight), got {self.fraction}")
        if not (math.isfinite(self.rank_lambda) and self.rank_lambda >= 0):
            raise ValueError(f"rank_lambda must be >= 0, got {self.rank_lambda}")
        if self.progressive_step is not None:
            self.progressive_step = positive_int(self.progressive_step, "progressive_step",
                                                 "the training step after which the re-selection runs; null = never")
        if isinstance(self.target_modules, (tuple, list)):
            self.target_modules = [str(t) for t in self.target_modules]
            if not self.target_modules:
                raise ValueError("target_modules is an empty list; pass None to adapt every Linear/Conv module")
        elif self.target_modules is not None and not isinstance(self.target_modules, str):
            raise TypeError(f"target_modules must be None, a regex string or a list of names, got {self.target_modules!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def select(self, weight: Tensor) -> Tensor:
        """Sorted flat indices of the ineffective entries of ``weight`` under this config's rule."""
        mag = weight.detach().abs().reshape(-1)
        if self.threshold is not None:
            return torch.nonzero(mag < self.threshold).reshape(-1)
        k = math.ceil(self.fraction * mag.numel())
        return torch.sort(torch.topk(mag, k, largest=False).indices).values


# At most this many weight entries (8 MiB in fp32) are built at a time by the unstructured backprop: the adapted
# weight and its gradient exist densely for one block of output rows only, never for the whole layer. Smaller
# blocks save memory at Stable Diffusion scale; larger ones fewer kernel launches.
BLOCK_ENTRIES = 2**21


def _below(w: Tensor, threshold: Tensor) -> Tensor:
    """``|w| < threshold`` without the float temporary of ``w.abs()``."""
    below = w > -threshold
    return below.logical_and_(w < threshold)


class _Block(NamedTuple):
    """Output rows ``r0:r1`` of a weight and the slices of the layer's tensors that fall in them (host numbers)."""

    r0: int
    r1: int
    v0: int  # sara_values[v0:v1]
    v1: int
    f0: int  # sara_fixed_indices / sara_fixed_values[f0:f1]
    f1: int
    l0: int  # sara_listed[l0:l1]
    l1: int


@torch.no_grad()
def _as_threshold(weight: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """``(t, listed)`` with ``{i : |w_i| < t}`` and ``listed`` together exactly the sorted flat ``indices``, and
    ``listed`` as short as possible: empty for a set chosen by magnitude; the chosen entries tied at the boundary
    for a top-k choice among ties; every index (``t = 0``) for a set not chosen by magnitude."""
    flat = weight.detach().reshape(-1)
    if not indices.numel():
        return flat.new_zeros(()), indices
    magnitude = flat[indices].abs()
    top = magnitude.max()
    above_all = torch.nextafter(top, torch.full_like(top, math.inf))
    if int(_below(flat, above_all).sum()) == indices.numel():
        return above_all, indices[:0]
    tied = magnitude == top
    if int(_below(flat, top).sum()) == indices.numel() - int(tied.sum()):
        return top, indices[tied]
    return flat.new_zeros(()), indices


class _UnstructuredBackprop(torch.autograd.Function):
    """SaRA's unstructured backprop for one layer: ``y = op(x, W')`` with ``W'`` the frozen weight ``W`` with its
    selected entries replaced by ``values``. ``W'`` is built one block of output rows at a time, used and dropped,
    in the forward and again in the backward, which returns ``dL/dvalues`` (the gradient at the selected entries)
    block by block: only ``x`` is kept for the backward, as for any layer whose weight trains."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, layer: SaRALayer) -> Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x, values)
        outs = [layer._block_op(x, layer._block_weight(b, values), (b.r0, b.r1)) for b in layer._blocks]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=layer._channel_dim(x))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, values = ctx.saved_tensors
        layer, need_x = ctx.layer, ctx.needs_input_grad[0]
        grad_x, grad_values, dim = None, values.new_empty(values.shape), layer._channel_dim(grad_y)
        # One block at a time, and within it the input gradient (which needs the block's weight) before the weight
        # gradient (which does not), so the block's weight and its dense gradient never coexist.
        for block in layer._blocks:
            g_y = grad_y.narrow(dim, block.r0, block.r1 - block.r0)
            if need_x:
                g_x = layer._input_grad(g_y, layer._block_weight(block, values), x)
                grad_x = g_x if grad_x is None else grad_x.add_(g_x)
                del g_x
            grad_values[block.v0:block.v1] = layer._weight_grad(g_y, x, block).reshape(-1)[layer._block_indices(block)]
        return (None if grad_x is None else grad_x.to(x.dtype)), grad_values, None


class SaRALayer(nn.Module):
    """A frozen ``nn.Linear``/``nn.ConvNd`` (``base_layer``) whose selected entries are trainable.

    ``base_layer.weight`` keeps the pre-trained values throughout (disabling or unloading just uses it).
    ``sara_values``, the only ``nn.Parameter`` that trains, holds the selected entries in flat-index order. The
    selection is the entries with ``|w| < sara_threshold`` on the pre-trained weight together with the sorted
    ``sara_listed`` indices. A selection made by magnitude (:func:`apply_sara`) is the threshold alone, so SaRA
    keeps no per-entry index (a fraction's top-k choice among entries tied at the boundary lists those few); a
    selection no threshold reproduces (after a progressive re-selection) is listed whole, with threshold 0.
    ``sara_fixed_indices``/``sara_fixed_values`` hold entries trained before a re-selection and released by it
    (kept, frozen). :attr:`sara_indices` gives the trainable indices either way.
    Attributes not found here (``in_features``, ``kernel_size``, ...) are read from ``base_layer``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        indices: Tensor,
        config: SaRAConfig,
        fixed_indices: Tensor | None = None,
        fixed_values: Tensor | None = None,
        values: Tensor | None = None,
    ):
        """``values`` (at ``indices``, in their order) and ``fixed_values`` default to the pre-trained entries."""
        super().__init__()
        if not isinstance(base_layer, SUPPORTED):
            raise TypeError(f"SaRA adapts {[c.__name__ for c in SUPPORTED]}, got {type(base_layer).__name__}")
        base_layer.requires_grad_(False)
        if not base_layer.weight.is_contiguous():
            base_layer.weight.data = base_layer.weight.data.contiguous()
        self.base_layer, self.config, self.enabled = base_layer, config, True
        w = base_layer.weight.detach()
        # int32 indices halve the index memory (and file size) for any weight below 2**31 entries.
        self._index_dtype = torch.int32 if w.numel() < 2**31 else torch.int64
        empty = torch.empty(0, dtype=self._index_dtype, device=w.device)
        self.register_buffer("sara_threshold", w.new_zeros(()))
        self.register_buffer("sara_listed", empty)
        self.register_buffer("sara_fixed_indices", empty)
        self.register_buffer("sara_fixed_values", w.new_empty(0))
        self.sara_values = nn.Parameter(w.new_empty(0))
        if isinstance(base_layer, nn.Linear):
            self._padding, self._pre_pad = None, None
        elif base_layer.padding_mode == "zeros" and not isinstance(base_layer.padding, str):
            self._padding, self._pre_pad = list(base_layer.padding), None
        else:  # padding modes and "same"/"valid" padding: pad the input first, as nn.ConvNd does for its modes
            mode = "constant" if base_layer.padding_mode == "zeros" else base_layer.padding_mode
            self._padding, self._pre_pad = [0] * (w.ndim - 2), (base_layer._reversed_padding_repeated_twice, mode)
        indices = indices.to(w.device, torch.long)
        fixed_indices = indices[:0] if fixed_indices is None else fixed_indices.to(w.device, torch.long)
        self.set_selection(indices, w.reshape(-1)[indices] if values is None else values,
                           fixed_indices, w.reshape(-1)[fixed_indices] if fixed_values is None else fixed_values)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # -- the selection -----------------------------------------------------------------------------
    @property
    def sara_indices(self) -> Tensor:
        """Sorted flat indices of the trainable entries (``sara_values[k]`` sits at ``sara_indices[k]``)."""
        if not self._rule:
            return self.sara_listed
        below = _below(self.base_layer.weight.detach().reshape(-1), self.sara_threshold)
        below[self.sara_listed] = True
        return torch.nonzero(below).reshape(-1).to(self._index_dtype)

    def support(self) -> Tensor:
        """Flat indices of every entry the adapter may differ from the base at: ``cat(fixed, trainable)``."""
        return torch.cat([self.sara_fixed_indices, self.sara_indices])

    def adapted_values(self) -> Tensor:
        return torch.cat([self.sara_fixed_values, self.sara_values])

    @torch.no_grad()
    def set_selection(self, indices: Tensor, values: Tensor, fixed_indices: Tensor, fixed_values: Tensor) -> None:
        """Make ``indices`` (flat, any order) trainable with ``values`` and freeze ``fixed_values`` at
        ``fixed_indices``. The ``sara_values`` Parameter object is kept when the number of trainable entries stays
        the same, and replaced when it changes: autograd caches a leaf's shape in its gradient accumulator, so
        resizing ``.data`` in place breaks the next backward."""
        w = self.base_layer.weight
        order, fixed_order = torch.argsort(indices), torch.argsort(fixed_indices)
        indices, values = indices[order], values.to(w)[order]
        self.sara_threshold, listed = _as_threshold(w, indices)
        self.sara_listed = listed.to(self._index_dtype)
        self._rule = bool(self.sara_threshold > 0)
        self.sara_fixed_indices = fixed_indices[fixed_order].to(self._index_dtype)
        self.sara_fixed_values = fixed_values.to(w)[fixed_order]
        if values.shape == self.sara_values.shape:
            self.sara_values.copy_(values)
            self.sara_values.grad = None
        else:
            self.sara_values = nn.Parameter(values.clone(), requires_grad=self.sara_values.requires_grad)
        self._plan()

    @torch.no_grad()
    def _plan(self) -> None:
        """Split the weight into blocks of output rows (``BLOCK_ENTRIES`` each at most; one block for grouped
        convolutions) and note, per block, its slice of ``sara_values`` and of the fixed entries (host numbers,
        read once here, so the forward never syncs)."""
        w = self.base_layer.weight
        rows, per_row = w.shape[0], w[0].numel()
        step = rows if getattr(self.base_layer, "groups", 1) > 1 else max(1, BLOCK_ENTRIES // per_row)
        starts = list(range(0, rows, step)) + [rows]
        first_rows = torch.tensor(starts, device=w.device)
        bounds = (first_rows * per_row).to(self._index_dtype)
        listed = torch.searchsorted(self.sara_listed, bounds)
        trainable = listed
        if self._rule:
            counts = _below(w.reshape(rows, -1), self.sara_threshold).sum(1)
            trainable = trainable + torch.cat([counts.new_zeros(1), counts.cumsum(0)])[first_rows]
        fixed = torch.searchsorted(self.sara_fixed_indices, bounds)
        t, f, li = torch.stack([trainable, fixed, listed]).tolist()
        if t[-1] != self.sara_values.numel():
            raise ValueError(f"{t[-1]} entries are selected but sara_values holds {self.sara_values.numel()}")
        self._row_size = per_row
        self._blocks = [_Block(starts[k], starts[k + 1], t[k], t[k + 1], f[k], f[k + 1], li[k], li[k + 1])
                        for k in range(len(starts) - 1)]

    def _block_indices(self, block: _Block) -> Tensor:
        """Flat indices, within the block's rows, of the trainable entries there (ordered as ``sara_values``)."""
        listed = self.sara_listed[block.l0:block.l1] - block.r0 * self._row_size
        if block.v1 - block.v0 == block.l1 - block.l0:  # nothing below the threshold in these rows
            return listed
        rows = self.base_layer.weight.detach()[block.r0:block.r1].reshape(-1)
        below = _below(rows, self.sara_threshold)
        if block.l1 > block.l0:
            below[listed] = True
        return torch.nonzero(below).reshape(-1)

    def _block_weight(self, block: _Block, values: Tensor) -> Tensor:
        """The block's rows of the adapted weight, as a new tensor."""
        w = self.base_layer.weight.detach()[block.r0:block.r1].clone()
        flat = w.view(-1)
        if block.f1 > block.f0:
            fixed = self.sara_fixed_indices[block.f0:block.f1] - block.r0 * self._row_size
            flat[fixed] = self.sara_fixed_values[block.f0:block.f1]
        if block.v1 > block.v0:
            flat[self._block_indices(block)] = values.detach()[block.v0:block.v1]
        return w

    @torch.no_grad()
    def dense(self, adapted: bool = True) -> Tensor:
        """A dense copy of the adapted (or, with ``adapted=False``, the pre-trained) weight."""
        if not adapted:
            return self.base_layer.weight.detach().clone()
        return torch.cat([self._block_weight(block, self.sara_values) for block in self._blocks])

    def sparse_matrix(self) -> Tensor:
        """``W * M``: the trainable values at their positions, zeros elsewhere (differentiable)."""
        w = self.base_layer.weight
        return w.new_zeros(w.numel()).index_put((self.sara_indices,), self.sara_values).view_as(w)

    # -- the layer's operation -------------------------------------------------------------------------
    def _channel_dim(self, x: Tensor) -> int:
        return x.ndim - 1 if isinstance(self.base_layer, nn.Linear) else 1

    def _block_op(self, x: Tensor, w: Tensor, rows: tuple[int, int]) -> Tensor:
        """The base layer's operation with output ``rows`` of the weight (``w``, those rows only) and of the bias."""
        base = self.base_layer
        bias = None if base.bias is None else base.bias[rows[0]:rows[1]]
        if isinstance(base, nn.Linear):
            return F.linear(x, w, bias)
        return torch.convolution(x, w, bias, base.stride, self._padding, base.dilation, False,
                                 [0] * (w.ndim - 2), base.groups)

    # The block's gradients in the dtype of grad_y: under autocast the forward ran in it, as autocast's own
    # backward assumes. Only tensor shapes are read from the placeholder weight / input (torch.nn.grad does the same).
    def _input_grad(self, grad_y: Tensor, w: Tensor, x: Tensor) -> Tensor:
        """``dL/dx`` of :meth:`_block_op` for the block's output gradient ``grad_y`` and weight rows ``w``."""
        base, w = self.base_layer, w.to(grad_y.dtype)
        if isinstance(base, nn.Linear):
            return grad_y @ w
        return self._conv_backward(grad_y, grad_y.new_empty(1).expand(x.shape), w, [True, False, False])[0]

    def _weight_grad(self, grad_y: Tensor, x: Tensor, block: _Block) -> Tensor:
        """``dL/dw`` (dense, the block's rows) of :meth:`_block_op` for the block's output gradient ``grad_y``."""
        base, x = self.base_layer, x.to(grad_y.dtype)
        shape = (block.r1 - block.r0, *self.base_layer.weight.shape[1:])
        if isinstance(base, nn.Linear):
            return grad_y.reshape(-1, shape[0]).T @ x.reshape(-1, shape[1])
        return self._conv_backward(grad_y, x, grad_y.new_empty(1).expand(shape), [False, True, False])[1]

    def _conv_backward(self, grad_y: Tensor, x: Tensor, w: Tensor, mask: list[bool]) -> tuple[Tensor, ...]:
        """aten's convolution backward of :meth:`_block_op` (``mask``: which of input / weight / bias gradients)."""
        base = self.base_layer
        return torch.ops.aten.convolution_backward(grad_y, x, w, None, base.stride, self._padding, base.dilation,
                                                   False, [0] * (w.ndim - 2), base.groups, mask)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self.base_layer(x)
        if self._pre_pad is not None:
            x = F.pad(x, self._pre_pad[0], mode=self._pre_pad[1])
        if self.config.unstructured_backprop:
            return _UnstructuredBackprop.apply(x, self.sara_values, self)
        w = self.base_layer.weight
        # A dense adapted weight made by ordinary autograd ops: autograd keeps it for the input gradient.
        adapted = w.reshape(-1).index_put((self.support(),), self.adapted_values()).view_as(w)
        return self._block_op(x, adapted, (0, w.shape[0]))

    # -- moving, casting and loading -----------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):
        w = self.base_layer.weight
        # A threshold selects other entries once the weights are rounded to another dtype: list them first.
        listed = self.sara_indices.long() if self._rule and fn(w.new_empty(0)).dtype != w.dtype else None
        super()._apply(fn, recurse)
        if listed is not None:
            self.set_selection(listed.to(self.sara_values.device), self.sara_values.detach(),
                               self.sara_fixed_indices.long(), self.sara_fixed_values)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint written after a progressive re-selection holds selections of other sizes: resize
        # to them so that resuming works (the values are then copied in by the default loader).
        for name in ("sara_values", "sara_listed", "sara_fixed_indices", "sara_fixed_values"):
            incoming, own = state_dict.get(prefix + name), getattr(self, name)
            if incoming is not None and incoming.shape != own.shape:
                resized = own.new_empty(incoming.shape)
                if name == "sara_values":  # a new leaf, for the reason given in set_selection
                    self.sara_values = nn.Parameter(resized, requires_grad=own.requires_grad)
                else:
                    setattr(self, name, resized)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._rule = bool(self.sara_threshold > 0)
        self._plan()

    def extra_repr(self) -> str:
        n = self.base_layer.weight.numel()
        return (f"trainable={self.sara_values.numel()}/{n}, fixed={self.sara_fixed_indices.numel()}, "
                f"listed={self.sara_listed.numel()}, enabled={self.enabled}, "
                f"unstructured_backprop={self.config.unstructured_backprop}")


# -- module discovery ---------------------------------------------------------------------------------
def _sara_layers(model: nn.Module) -> dict[str, SaRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SaRALayer)}


def _require_layers(model: nn.Module, what: str) -> dict[str, SaRALayer]:
    layers = _sara_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no SaRA adapters; call apply_sara(model, config) or load_sara first")
    return layers


def _matches(name: str, target: str | list[str]) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def find_targets(model: nn.Module, target: str | list[str] | None) -> list[str]:
    """Names of the modules of ``model`` that ``target`` selects (peft's ``target_modules`` rule): a string is a
    regex over full module names, a list matches names or name suffixes, ``None`` every supported layer."""
    names = []
    mha_children = {
        f"{n}.{c}" if n else c
        for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention) for c, _ in m.named_children()
    }
    for name, module in model.named_modules():
        if target is None:
            # nn.MultiheadAttention reads out_proj.weight directly instead of calling its forward.
            if isinstance(module, SUPPORTED) and name not in mha_children:
                names.append(name)
        elif _matches(name, target):
            if not isinstance(module, SUPPORTED) or name in mha_children:
                raise ValueError(
                    f"target_modules={target!r} matches module {name!r} of type {type(module).__name__}; SaRA "
                    f"adapts {[c.__name__ for c in SUPPORTED]} (outside nn.MultiheadAttention); narrow the pattern"
                )
            names.append(name)
    if not names:
        candidates = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED)]
        shown = ", ".join(candidates[:12]) + (", ..." if len(candidates) > 12 else "")
        what = f"target_modules={target!r} matches no module" if target is not None else "the model has no Linear/Conv module"
        raise ValueError(f"{what}; Linear/Conv modules of this model: [{shown}]")
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` inside ``model``; returns the (possibly new) root."""
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return model


# -- diffusers' save_pretrained -----------------------------------------------------------------------
def _is_diffusers_model(module: nn.Module) -> bool:
    return any(c.__module__.startswith("diffusers.") for c in type(module).__mro__) and hasattr(module, "config")


@contextlib.contextmanager
def _plain_modules(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every SaRA layer swapped for its base layer holding the values the model computes with
    now (adapted, or pre-trained where disabled); the layers and the pre-trained storage come back on exit."""
    layers, kept = _sara_layers(model), {}
    with torch.no_grad():
        for name, layer in layers.items():
            if layer.enabled:
                support, flat = layer.support().long(), layer.base_layer.weight.view(-1)
                kept[name] = support, flat[support].clone()
                flat[support] = layer.adapted_values().detach()
            model = _replace(model, name, layer.base_layer)
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, layer in layers.items():
                if name in kept:
                    support, values = kept[name]
                    layer.base_layer.weight.view(-1)[support] = values
                _replace(model, name, layer)


def _save_pretrained_merged(self, save_directory, *args, **kwargs):
    """diffusers' ``save_pretrained`` of this SaRA-adapted model: writes the *plain merged* model (the values it
    computes with now, in the original module types), which ``from_pretrained`` reloads to the same outputs.
    The model itself keeps its adapters. For the adapter alone use ``scorekit.sara.save_sara``."""
    with _plain_modules(self) as plain:
        return type(plain).save_pretrained(plain, save_directory, *args, **kwargs)


def _patch_save_pretrained(model: nn.Module) -> None:
    # A SaRA-adapted diffusers model would otherwise write base_layer/sara_* keys that from_pretrained cannot
    # place (the weights stay on the meta device and the first forward fails).
    for module in model.modules():
        if _is_diffusers_model(module) and _sara_layers(module):
            module.save_pretrained = types.MethodType(_save_pretrained_merged, module)


def _unpatch_save_pretrained(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module.__dict__.get("save_pretrained"), types.MethodType):
            del module.__dict__["save_pretrained"]


# -- the base model's identity ------------------------------------------------------------------------
def base_model_identity(model: nn.Module) -> dict[str, Any]:
    """What an adapter records of the model it was made for: the class, and for the diffusers models inside
    it their class, ``_name_or_path`` and a hash of their config (private ``_`` keys left out)."""
    identity: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
    for name, module in model.named_modules():
        if _is_diffusers_model(module):
            config = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
            digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
            where = module.config.get("_name_or_path")  # a Path when from_pretrained was given one
            identity.setdefault("diffusers", {})[name] = {
                "class": type(module).__name__, "name_or_path": None if where is None else str(where),
                "config_hash": digest}
    return identity


# -- public API ---------------------------------------------------------------------------------------
def apply_sara(model: nn.Module, config: SaRAConfig) -> nn.Module:
    """Adapt ``model`` in place: every target weight gets its ineffective entries as trainable values.

    All parameters of ``model`` are frozen (``requires_grad=False``, as peft does), so
    ``[p for p in model.parameters() if p.requires_grad]`` is exactly the set of sparse values. Target
    modules whose weight has no entry under the threshold are left as they are; a threshold that
    selects nothing anywhere is an error. Returns ``model`` (a new root only if ``model`` itself is a
    single targeted layer).

    diffusers models in ``model`` (a ``UNet2DModel``, or one inside a ScoreModel) get a ``save_pretrained`` that
    writes the plain *merged* model, which ``from_pretrained`` reloads to the same outputs; the adapted model is
    left as it is. Use :func:`save_sara` for the adapter alone (:func:`merge_sara` / :func:`unload_sara` restore
    diffusers' own ``save_pretrained``).
    """
    if not isinstance(config, SaRAConfig):
        raise TypeError(f"config must be a SaRAConfig, got {type(config).__name__}")
    if _sara_layers(model):
        raise ValueError("the model already has SaRA adapters; merge_sara(model) first, or load_sara into it")
    names = find_targets(model, config.target_modules)
    selections = {name: config.select(model.get_submodule(name).weight) for name in names}
    if not any(idx.numel() for idx in selections.values()):
        smallest = {n: model.get_submodule(n).weight.detach().abs().min().item() for n in names}
        where = min(smallest, key=smallest.get)
        raise ValueError(
            f"threshold={config.threshold} selects no weight entry in any of the {len(names)} target modules "
            f"(the smallest |w| is {smallest[where]:.3g}, in {where!r}); raise the threshold or use fraction="
        )
    model.requires_grad_(False)
    for name, idx in selections.items():
        if idx.numel():
            model = _replace(model, name, SaRALayer(model.get_submodule(name), idx, config))
    _patch_save_pretrained(model)
    return model


def sara_state_dict(model: nn.Module) -> dict[str, Any]:
    """The adapter alone: ``{"config": dict, "shapes": {module: weight shape}, "tensors": {...}, "base_model": ...}``.

    ``tensors`` maps ``"<module>.sara_values"``/``"<module>.sara_indices"`` (trainable entries; flat
    indices into the weight) and ``"<module>.sara_fixed_values"``/``"<module>.sara_fixed_indices"``
    (entries released by a progressive re-selection) to detached CPU tensors; ``base_model`` is
    :func:`base_model_identity` of ``model``.
    """
    layers = _require_layers(model, "sara_state_dict")
    config = next(iter(layers.values())).config
    tensors: dict[str, Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, layer in layers.items():
        for key in ("sara_values", "sara_indices", "sara_fixed_values", "sara_fixed_indices"):
            tensors[f"{name}.{key}"] = getattr(layer, key).detach().cpu().clone()
        shapes[name] = list(layer.base_layer.weight.shape)
    return {"config": config.to_dict(), "shapes": shapes, "tensors": tensors, "base_model": base_model_identity(model)}


def _is_file_form(path: Path) -> bool:
    return path.suffix == ".safetensors" and not path.is_dir()


def save_sara(model: nn.Module, path: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> None:
    """Write the adapter (:func:`sara_state_dict`) to ``path``, each file atomically; indices are int32 for
    weights below 2**31 entries.

    A directory path (peft's layout; created if needed, other files in it left alone) gets
    ``adapter_config.json`` (``peft_type``, the SaRA ``config``, the weight ``shapes``, scorekit's version and
    the base model's identity) and ``adapter_model.safetensors`` (the sparse values and indices). A path ending
    in ``.safetensors`` is the single-file form: the same tensors, with config and shapes in its metadata.
    ``base_model_name_or_path`` (default: the ``_name_or_path`` of a diffusers model inside) is recorded as peft does.
    """
    from . import __version__

    state, path = sara_state_dict(model), Path(path)
    if _is_file_form(path):
        save_tensors(state["tensors"], path, {"format": FORMAT, "config": state["config"], "shapes": state["shapes"]})
        return
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(state["tensors"], path / WEIGHTS_NAME, {"format": FORMAT})
    base = state["base_model"]
    name_or_path = base_model_name_or_path or next(
        (d["name_or_path"] for d in base.get("diffusers", {}).values() if d["name_or_path"]), None)
    save_json({"peft_type": "SARA", "format": FORMAT, "scorekit_version": __version__,
               "base_model_name_or_path": name_or_path, "base_model": base,
               "config": state["config"], "shapes": state["shapes"]}, path / CONFIG_NAME)


def _checked_meta(meta: Any, where: str) -> dict[str, Any]:
    """The ``config``/``shapes`` of an adapter's metadata, checked; errors name ``where`` (file) and the key."""
    if not isinstance(meta, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{where} is not a SaRA adapter (format {meta.get('format')!r}, expected {FORMAT!r})")
    for key in ("config", "shapes"):
        if key not in meta:
            raise ValueError(f"{where} has no {key!r} key ({'the SaRAConfig fields' if key == 'config' else 'module name -> weight shape'}); "
                             "it was not written by save_sara, or was edited; save the adapter again")
    shapes, config = meta["shapes"], meta["config"]
    if not isinstance(shapes, dict) or not all(
            isinstance(s, list) and all(isinstance(d, int) and d > 0 for d in s) for s in shapes.values()):
        raise ValueError(f"{where}: key 'shapes' must map module names to weight shapes (lists of positive "
                         f"integers), got {str(shapes)[:200]}")
    fields = {f.name for f in dataclasses.fields(SaRAConfig)}
    if not isinstance(config, dict) or set(config) - fields:
        unknown = sorted(set(config) - fields) if isinstance(config, dict) else config
        raise ValueError(f"{where}: key 'config' must hold SaRAConfig fields {sorted(fields)}; unknown: {unknown}")
    try:
        SaRAConfig(**config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: key 'config' is not a valid SaRAConfig: {e}") from None
    return meta


def _read_adapter(state_or_path: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(state_or_path, dict):
        missing = {"config", "shapes", "tensors"} - set(state_or_path)
        if missing:
            raise ValueError(f"the adapter state dict lacks {sorted(missing)}; expected what sara_state_dict returns")
        return state_or_path
    path = Path(state_or_path)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{path} is not a SaRA adapter directory: expected {CONFIG_NAME} and {WEIGHTS_NAME} "
                                    f"(written by save_sara(model, DIR)), found {sorted(p.name for p in path.iterdir())[:8]}")
        meta = _checked_meta(load_json(path / CONFIG_NAME), str(path / CONFIG_NAME))
        tensors, _ = load_tensors(path / WEIGHTS_NAME)
    else:
        tensors, meta = load_tensors(path)
        meta = _checked_meta(meta, f"{path} (its metadata)")
    return {"config": meta["config"], "shapes": meta["shapes"], "tensors": tensors, "base_model": meta.get("base_model")}


def _differs(recorded: dict | None, model: nn.Module) -> str | None:
    """A sentence saying how ``model`` differs from the base model the adapter recorded, or ``None``."""
    if not recorded:
        return None
    now = base_model_identity(model)
    if recorded == now:
        return None
    return f"the adapter was made for {json.dumps(recorded)}, this model is {json.dumps(now)}"


def _plan_module(model: nn.Module, name: str, shape: list[int], tensors: dict[str, Tensor]):
    """``(module, parts)`` for one adapter module, or a string saying what does not match."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return (f"the adapter has module {name!r} but the model has no module of that name; was the adapter "
                f"made for another architecture (or for a model wrapped differently, e.g. ScoreModel vs its .net)?")
    base = module.base_layer if isinstance(module, SaRALayer) else module
    if not isinstance(base, SUPPORTED):
        return f"module {name!r} is a {type(base).__name__}; the adapter expects a Linear/Conv layer there"
    if list(base.weight.shape) != list(shape):
        return (f"module {name!r} has a weight of shape {tuple(base.weight.shape)} but the adapter was made for "
                f"{tuple(shape)}")
    parts = {}
    for key in ("sara_values", "sara_indices", "sara_fixed_values", "sara_fixed_indices"):
        if f"{name}.{key}" not in tensors:
            raise ValueError(f"the adapter lacks tensor {name}.{key}; the file is incomplete")
        parts[key] = tensors[f"{name}.{key}"]
    n = base.weight.numel()
    for v, i in (("sara_values", "sara_indices"), ("sara_fixed_values", "sara_fixed_indices")):
        if parts[v].numel() != parts[i].numel():
            raise ValueError(f"module {name!r}: {parts[v].numel()} values for {parts[i].numel()} indices")
        if parts[i].numel() and (parts[i].min() < 0 or parts[i].max() >= n):
            raise ValueError(f"module {name!r}: adapter indices fall outside its weight of {n} entries")
    return module, parts


def load_sara(model: nn.Module, state_or_path: dict[str, Any] | str | os.PathLike) -> nn.Module:
    """Put an adapter (from :func:`sara_state_dict`, a directory or a file of :func:`save_sara`) into ``model``.

    ``model`` is either the plain base model (its target modules are wrapped with the adapter's
    selection) or one already adapted with the same modules (its selection and values are replaced).
    Module names and weight shapes must match; the error lists every module that does not (and the base model
    the adapter recorded). A model of another identity (class, diffusers config) whose modules do match loads
    with a warning. Returns ``model``.
    """
    state = _read_adapter(state_or_path)
    config = SaRAConfig(**state["config"])
    tensors, shapes = state["tensors"], state["shapes"]
    existing = _sara_layers(model)
    extra = sorted(set(existing) - set(shapes))
    if extra:
        raise ValueError(f"the model has SaRA modules the adapter does not cover: {extra[:5]}")
    plan, problems = {}, []
    for name, shape in shapes.items():
        found = _plan_module(model, name, shape, tensors)
        if isinstance(found, str):
            problems.append(found)
        else:
            plan[name] = found
    identity = _differs(state.get("base_model"), model)
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ValueError(f"the adapter does not fit this model in {len(problems)} of {len(shapes)} modules: "
                         + "; ".join(problems[:8]) + more + (f". Note: {identity}" if identity else ""))
    if identity:
        warnings.warn(f"load_sara: {identity}; every module matches, so the adapter is loaded", stacklevel=2)
    model.requires_grad_(False)
    for name, (module, parts) in plan.items():
        idx, fixed = parts["sara_indices"], parts["sara_fixed_indices"]
        if isinstance(module, SaRALayer):
            module.config = config
            device = module.sara_values.device
            module.set_selection(idx.to(device, torch.long), parts["sara_values"], fixed.to(device, torch.long),
                                 parts["sara_fixed_values"])
        else:
            model = _replace(model, name, SaRALayer(module, idx, config, fixed, parts["sara_fixed_values"],
                                                    parts["sara_values"]))
    _patch_save_pretrained(model)
    return model


def merge_sara(model: nn.Module) -> nn.Module:
    """Write the adapted values into the dense weights and put the original modules back.

    Returns the plain model (original module types, merged weights). Its parameters stay frozen, as
    after peft's ``merge_and_unload``; call ``model.requires_grad_()`` to train it further. A disabled
    adapter is refused (merging it would silently drop it or bake in what the model no longer computes):
    :func:`enable_sara` it first, or :func:`unload_sara` for the pre-trained model.
    """
    layers = _require_layers(model, "merge_sara")
    off = [name for name, layer in layers.items() if not layer.enabled]
    if off:
        raise ValueError(
            f"merge_sara: the adapter is disabled in {len(off)} of {len(layers)} modules ({off[:3]}); call "
            "enable_sara(model) (or leave the `with disable_sara(model):` block) to merge it, or "
            "unload_sara(model) to drop it and keep the pre-trained weights"
        )
    for name, layer in layers.items():
        merged = layer.dense(adapted=True)
        with torch.no_grad():
            layer.base_layer.weight.copy_(merged)
        model = _replace(model, name, layer.base_layer)
    _unpatch_save_pretrained(model)
    return model


def unload_sara(model: nn.Module) -> nn.Module:
    """Drop the adapter without merging (peft's ``unload``): the plain model with its pre-trained weights and
    original module types. Its parameters stay frozen; save the adapter first (:func:`save_sara`) to keep it."""
    for name, layer in _require_layers(model, "unload_sara").items():
        model = _replace(model, name, layer.base_layer)
    _unpatch_save_pretrained(model)
    return model


class _AdapterSwitch:
    """What :func:`disable_sara` returns: calls and reads like the model, and as a context manager puts the
    adapters back as they were (``with disable_sara(model): ...``)."""

    def __init__(self, model: nn.Module, previous: dict[str, bool]):
        self.model, self._previous = model, previous

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        if name in ("model", "_previous"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc) -> None:
        for name, layer in _sara_layers(self.model).items():
            layer.enabled = self._previous.get(name, True)

    def __repr__(self) -> str:
        return f"disable_sara({type(self.model).__name__})"


def disable_sara(model: nn.Module) -> _AdapterSwitch:
    """Switch every adapter off: the model computes with its pre-trained weights (nothing is merged).

    Either until :func:`enable_sara` (the returned handle calls like the model: ``disable_sara(model)(x)``), or,
    as peft's ``disable_adapter()``, for a block: ``with disable_sara(model): ...`` re-enables on exit (each
    layer as it was before).
    """
    layers = _require_layers(model, "disable_sara")
    previous = {name: layer.enabled for name, layer in layers.items()}
    for layer in layers.values():
        layer.enabled = False
    return _AdapterSwitch(model, previous)


def enable_sara(model: nn.Module) -> nn.Module:
    """Switch the adapters back on after :func:`disable_sara`."""
    for layer in _require_layers(model, "enable_sara").values():
        layer.enabled = True
    return model


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print peft's line ``trainable params: N || all params: M || trainable%: P`` and return ``(N, M)``.

    ``M`` counts the model's own parameters: SaRA's trainable values are entries of its weights, so they are
    not counted twice (for a model without SaRA layers this is every parameter).
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("sara_values"))
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}")
    return trainable, total


def rank_penalty(model: nn.Module, generator: torch.Generator | None = None) -> Tensor:
    """The low-rank constraint ``lambda_rank * ||W * M||_*`` (nuclear norm of the sparse trainable matrix).

    As in the authors' code, each call draws one adapted 2-D weight with both sides larger than 64 at
    random (with ``generator``) and penalises that one; ``W * M`` holds the current trainable values at
    their positions and zeros elsewhere, so the gradient reaches ``sara_values``. Returns a zero scalar
    when ``rank_lambda`` is 0 or no adapted weight qualifies (small models).
    """
    layers = list(_require_layers(model, "rank_penalty").values())
    lam = layers[0].config.rank_lambda
    eligible = [
        layer for layer in layers
        if layer.base_layer.weight.ndim == 2 and min(layer.base_layer.weight.shape) > RANK_MIN_SIDE
        and layer.sara_values.numel()
    ]
    zero = layers[0].sara_values.new_zeros(())
    if lam == 0 or not eligible:
        return zero
    device = generator.device if generator is not None else torch.device("cpu")
    pick = eligible[int(torch.randint(len(eligible), (1,), generator=generator, device=device))]
    return lam * torch.linalg.matrix_norm(pick.sparse_matrix(), ord="nuc")


@torch.no_grad()
def reselect(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """SaRA's progressive step: re-select the trainable entries from the weights as they are now.

    In every adapted weight the selection rule (threshold or fraction) is applied to the current adapted
    weight. Trained entries that are still ineffective stay trainable with their values; trained entries
    that became effective are released and kept frozen at their trained values; ineffective entries
    that were frozen join the trainable set (with a threshold this cannot happen, since frozen entries
    never drop below it; with a fraction it does). The adapted weight, hence every output, is unchanged.
    A layer whose trainable count changes (with a threshold it shrinks as trained entries grow past it;
    with a fraction it never changes) gets a new ``sara_values`` Parameter. Pass ``optimizer`` to have the
    new Parameters swapped into its parameter groups and the stale state dropped (the authors restart the
    optimizer state here), or build a new optimizer. Returns the new number of trainable entries.
    """
    total = 0
    for layer in _require_layers(model, "reselect").values():
        old_param = layer.sara_values
        current = layer.dense(adapted=True).view(-1)
        old = layer.support().long()
        new = layer.config.select(current)
        released = old[~torch.isin(old, new)]
        layer.set_selection(new, current[new], released, current[released])
        if optimizer is not None:
            optimizer.state.pop(old_param, None)
            for group in optimizer.param_groups:
                group["params"] = [layer.sara_values if p is old_param else p for p in group["params"]]
        total += new.numel()
    return total
