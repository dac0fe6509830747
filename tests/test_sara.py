"""SaRA adapters: selection, sparse training, unstructured backprop, rank penalty, progressive step, I/O."""

import copy
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from scorekit import VPSDE, ScoreModel
from scorekit.losses import dsm_loss
from scorekit.nets import make_unet
from scorekit.sara import (
    SaRAConfig,
    SaRALayer,
    apply_sara,
    disable_sara,
    enable_sara,
    load_sara,
    merge_sara,
    rank_penalty,
    reselect,
    sara_state_dict,
    save_sara,
)


class Small(nn.Module):
    """Linear + Conv2d + a 2-D weight larger than 64 on both sides (eligible for the rank penalty)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.inp = nn.Linear(4 * 16, 72)
        self.hidden = nn.Linear(72, 80)
        self.norm = nn.LayerNorm(80)
        self.out = nn.Linear(80, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.out(self.norm(torch.tanh(self.hidden(torch.tanh(self.inp(h))))))


def make_small(dtype=torch.float32):
    torch.manual_seed(0)
    return Small().to(dtype)


def batch(dtype=torch.float32, n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 4, 4, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def train(model, steps=30, lr=3e-2, penalty=False):
    x, y = batch(next(model.parameters()).dtype)
    opt = torch.optim.Adam(trainable(model), lr=lr)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        loss = (model(x) - y).pow(2).mean() + (rank_penalty(model, g) if penalty else 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, opt


def weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


# -- selection ----------------------------------------------------------------------------------------
def test_fraction_selects_the_smallest_entries_of_each_weight():
    base = make_small()
    model = apply_sara(copy.deepcopy(base), SaRAConfig(fraction=0.1))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SaRALayer)}
    assert set(layers) == {"conv", "inp", "hidden", "out"}
    expected = sum(math.ceil(0.1 * w.numel()) for w in weights(base).values())
    assert sum(p.numel() for p in trainable(model)) == expected
    assert all(p is layer.sara_values for p, layer in zip(trainable(model), layers.values()))
    for name, layer in layers.items():
        mag = weights(base)[name].abs().reshape(-1)
        chosen = torch.zeros_like(mag, dtype=torch.bool)
        chosen[layer.sara_indices] = True
        assert mag[chosen].max() <= mag[~chosen].min()
        torch.testing.assert_close(layer.sara_values.detach(), weights(base)[name].reshape(-1)[layer.sara_indices])


def test_threshold_selects_entries_below_it_and_target_modules_restrict():
    base = make_small()
    thr = 0.02
    model = apply_sara(copy.deepcopy(base), SaRAConfig(threshold=thr))
    expected = sum(int((w.abs() < thr).sum()) for w in weights(base).values())
    assert sum(p.numel() for p in trainable(model)) == expected
    for m in model.modules():
        if isinstance(m, SaRALayer):
            assert (m.sara_values.abs() < thr).all()
    only = apply_sara(copy.deepcopy(base), SaRAConfig(threshold=thr, target_modules=["hidden", "conv"]))
    assert {n for n, m in only.named_modules() if isinstance(m, SaRALayer)} == {"hidden", "conv"}
    regex = apply_sara(copy.deepcopy(base), SaRAConfig(threshold=thr, target_modules=r"(inp|out)"))
    assert {n for n, m in regex.named_modules() if isinstance(m, SaRALayer)} == {"inp", "out"}


# -- training -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ub", [True, False])
def test_adam_trains_only_the_selected_entries(ub):
    base = make_small()
    model = apply_sara(copy.deepcopy(base), SaRAConfig(fraction=0.2, unstructured_backprop=ub))
    support = {n: m.sara_indices.clone() for n, m in model.named_modules() if isinstance(m, SaRALayer)}
    losses, _ = train(model)
    assert losses[-1] < 0.7 * losses[0]
    merged = merge_sara(model)
    before, after = weights(base), weights(merged)
    for name in before:
        changed = (before[name] != after[name]).reshape(-1).nonzero().reshape(-1)
        assert changed.numel() > 0
        assert torch.isin(changed, support[name]).all(), f"{name}: entries outside the selection changed"
    for (n, p), (_, q) in zip(base.named_parameters(), merged.named_parameters()):
        if not n.endswith("weight") or n.startswith("norm"):
            assert torch.equal(p, q), f"{n} should be frozen"


@pytest.mark.parametrize("ub", [True, False])
def test_frozen_weights_get_no_grad_and_the_sparse_values_do(ub):
    model = apply_sara(make_small(), SaRAConfig(fraction=0.1, unstructured_backprop=ub))
    x, y = batch()
    (model(x) - y).pow(2).mean().backward()
    for name, p in model.named_parameters():
        if name.endswith("sara_values"):
            assert p.grad is not None and p.grad.shape == p.shape
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("ub", [True, False])
def test_sparse_gradient_equals_dense_gradient_at_the_selected_entries(ub):
    base = make_small(torch.float64)
    x, y = batch(torch.float64)
    dense = copy.deepcopy(base)
    (dense(x) - y).pow(2).mean().backward()
    model = apply_sara(copy.deepcopy(base), SaRAConfig(fraction=0.3, unstructured_backprop=ub))
    (model(x) - y).pow(2).mean().backward()
    for name, layer in model.named_modules():
        if isinstance(layer, SaRALayer):
            ref = dense.get_submodule(name).weight.grad.reshape(-1)[layer.sara_indices]
            torch.testing.assert_close(layer.sara_values.grad, ref, rtol=1e-12, atol=1e-14)



class Awkward(nn.Module):
    """Layers the unstructured backprop must pad itself or cannot split by rows: "same" padding with an even
    kernel (asymmetric), reflect padding, a grouped 1-D convolution, and a Linear on a 3-D input."""

    def __init__(self):
        super().__init__()
        self.same = nn.Conv2d(2, 6, 4, padding="same")
        self.reflect = nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect", bias=False)
        self.grouped = nn.Conv1d(4, 4, 3, padding=1, groups=2)
        self.lin = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.tanh(self.reflect(torch.tanh(self.same(x))))
        h = torch.tanh(self.grouped(h.flatten(2)))
        return self.lin(h.reshape(len(x), 24, 6))


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # the dense reference's, not SaRA's
def test_unstructured_backprop_in_row_blocks_matches_dense_autograd(monkeypatch):
    """With blocks of 8 entries every weight is built a few output rows at a time; outputs and the gradients of
    the values and of the input still equal dense autograd on the adapted weights."""
    import scorekit.sara as sara

    monkeypatch.setattr(sara, "BLOCK_ENTRIES", 8)
    torch.manual_seed(0)
    base = Awkward().double()
    model = apply_sara(copy.deepcopy(base), SaRAConfig(fraction=0.3))
    assert len(model.same._blocks) == 6 and len(model.grouped._blocks) == 1
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = model(x)
    out.pow(2).sum().backward()
    ref = copy.deepcopy(base).requires_grad_()
    for name, layer in model.named_modules():
        if isinstance(layer, SaRALayer):
            ref.get_submodule(name).weight.data = layer.dense()
    ref_out = ref(x_ref)
    ref_out.pow(2).sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    for name, layer in model.named_modules():
        if isinstance(layer, SaRALayer):
            expected = ref.get_submodule(name).weight.grad.reshape(-1)[layer.sara_indices]
            torch.testing.assert_close(layer.sara_values.grad, expected, rtol=1e-12, atol=1e-12)


def test_a_magnitude_selection_is_stored_as_its_threshold_and_a_reselection_as_indices():
    base = make_small()
    config = SaRAConfig(fraction=0.2)
    model = apply_sara(copy.deepcopy(base), config)
    for name, layer in model.named_modules():
        if isinstance(layer, SaRALayer):
            state = {k: v for k, v in layer.state_dict().items() if not k.startswith("base_layer.")}
            # Besides the values: the threshold (one number) and three empty tensors, no per-entry index.
            assert sum(v.numel() for k, v in state.items() if k != "sara_values") == 1, name
            assert torch.equal(layer.sara_indices.long(), config.select(weights(base)[name]))
    train(model, steps=10)
    dense = {n: m.dense() for n, m in model.named_modules() if isinstance(m, SaRALayer)}
    reselect(model)
    for name, layer in model.named_modules():
        if isinstance(layer, SaRALayer):
            assert torch.equal(layer.dense(), dense[name])
            assert layer.sara_listed.numel() == layer.sara_values.numel() and float(layer.sara_threshold) == 0



def test_a_top_k_choice_among_tied_entries_lists_only_the_chosen_tied_ones():
    lin = nn.Linear(8, 4).double()
    with torch.no_grad():
        lin.weight.copy_(torch.arange(32.0).reshape(4, 8) / 32 + 0.1)
        lin.weight.view(-1)[[5, 6]] = 0.01
        lin.weight.view(-1)[[3, 9, 17, 30]] = -0.05  # four entries tied at |w| = 0.05, two of them chosen
    config = SaRAConfig(fraction=4 / 32)
    expected = config.select(lin.weight)
    pretrained = lin.weight.detach().clone()
    layer = apply_sara(lin, config)
    assert torch.equal(layer.sara_indices.long(), expected)
    assert layer.sara_listed.numel() == 2 and float(layer.sara_threshold) == 0.05
    x = torch.randn(5, 8, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    w = pretrained.requires_grad_()
    torch.nn.functional.linear(x, w, lin.bias).pow(2).sum().backward()
    torch.testing.assert_close(layer.sara_values.grad, w.grad.reshape(-1)[expected], rtol=1e-12, atol=1e-12)

def test_casting_to_another_dtype_keeps_the_selection():
    """|w| < threshold would pick other entries once the weights are rounded: the cast lists them first."""
    model = apply_sara(make_small(), SaRAConfig(fraction=0.3))
    train(model, steps=5)
    before = {n: (m.sara_indices.clone(), m.dense()) for n, m in model.named_modules() if isinstance(m, SaRALayer)}
    model.to(torch.bfloat16)
    for name, layer in model.named_modules():
        if isinstance(layer, SaRALayer):
            assert torch.equal(layer.sara_indices, before[name][0]), name
            assert torch.equal(layer.dense(), before[name][1].to(torch.bfloat16)), name


def test_unstructured_backprop_under_autocast_matches_autograd():
    x, y = batch()
    grads = []
    for ub in (True, False):
        model = apply_sara(make_small(), SaRAConfig(fraction=0.2, unstructured_backprop=ub))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (model(x).float() - y).pow(2).mean()
        loss.backward()
        grads.append([p.grad for p in trainable(model)])
    for a, b in zip(*grads):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)

def _saved_bytes(model, x, y):
    """Bytes of the tensors autograd saves for the backward that the model does not own already."""
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), x, y)}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = (model(x) - y).pow(2).mean()
    loss.backward()
    return sum(saved.values())


def test_unstructured_backprop_saves_no_dense_weight_copy_for_the_backward():
    x, y = batch()
    ub = apply_sara(make_small(), SaRAConfig(fraction=0.1))
    plain = apply_sara(make_small(), SaRAConfig(fraction=0.1, unstructured_backprop=False))
    layers = [m for m in plain.modules() if isinstance(m, SaRALayer)]
    dense = sum(m.base_layer.weight.numel() * 4 for m in layers)
    indices = sum(m.sara_indices.numel() * m.sara_indices.element_size() for m in layers)
    # Without it, autograd keeps each adapted dense weight (a fresh tensor) for the input gradient, and
    # the concatenated support indices for the scatter's backward; with it, only the activations.
    assert _saved_bytes(plain, x, y) - _saved_bytes(ub, x, y) == dense + indices


def test_both_backprop_paths_train_identically():
    runs = []
    for ub in (True, False):
        model = apply_sara(make_small(torch.float64), SaRAConfig(fraction=0.2, unstructured_backprop=ub))
        train(model, steps=10, penalty=True)
        runs.append([p.detach().clone() for p in trainable(model)])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_repeated_forwards_before_backward_and_after_disable():
    model = apply_sara(make_small(), SaRAConfig(fraction=0.1))
    train(model, steps=3)
    x, _ = batch()
    a = model(x)
    b = model(x)  # a second forward must not invalidate the first graph
    (a.sum() + b.sum()).backward()
    assert torch.equal(a, b)


# -- rank penalty -------------------------------------------------------------------------------------
def test_rank_penalty_is_the_nuclear_norm_of_the_sparse_matrix_of_an_eligible_weight():
    model = apply_sara(make_small(torch.float64), SaRAConfig(fraction=0.3, rank_lambda=0.01))
    train(model, steps=5)
    layer = model.hidden  # 80 x 72: the only weight with both sides > 64 (inp is 72 x 64)
    mask = torch.zeros(layer.base_layer.weight.numel(), dtype=torch.bool)
    mask[layer.sara_indices] = True
    wm = layer.dense().reshape(-1) * mask
    wm = wm.view_as(layer.base_layer.weight)
    u, s, vh = torch.linalg.svd(wm)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p in trainable(model):
            p.grad = None
        penalty = rank_penalty(model, g)
        torch.testing.assert_close(penalty, 0.01 * s.sum())
        penalty.backward()
        # d||A||_*/dA = U V^T for a full-rank A
        expected = (0.01 * (u[:, : s.numel()] @ vh)).reshape(-1)[layer.sara_indices]
        torch.testing.assert_close(layer.sara_values.grad, expected)
        assert all(p.grad is None for n, p in model.named_parameters() if p.requires_grad and "hidden" not in n)


def test_rank_penalty_is_zero_without_lambda_or_eligible_weights():
    model = apply_sara(make_small(), SaRAConfig(fraction=0.1, rank_lambda=0.0))
    assert rank_penalty(model).item() == 0.0
    small = apply_sara(make_small(), SaRAConfig(fraction=0.1, target_modules=["inp", "out"]))
    assert rank_penalty(small).item() == 0.0


# -- progressive step ---------------------------------------------------------------------------------
def test_reselect_with_fraction_keeps_outputs_and_trained_values_and_takes_in_new_entries():
    model = apply_sara(make_small(), SaRAConfig(fraction=0.1))
    _, opt = train(model, steps=40, lr=0.1)
    x, _ = batch()
    before_out = model(x).detach()
    before = {n: (m.sara_indices.clone(), m.sara_values.detach().clone(), m.dense())
              for n, m in model.named_modules() if isinstance(m, SaRALayer)}
    n_before = sum(p.numel() for p in trainable(model))
    params = trainable(model)
    assert reselect(model, opt) == n_before
    assert torch.equal(model(x), before_out)
    assert trainable(model) == params and all(p not in opt.state for p in params)
    released_any = False
    for name, layer in model.named_modules():
        if not isinstance(layer, SaRALayer):
            continue
        old_idx, old_vals, dense = before[name]
        new_idx = layer.sara_indices
        assert torch.equal(new_idx, SaRAConfig(fraction=0.1).select(dense))
        kept = torch.isin(old_idx, new_idx)
        pos = torch.searchsorted(new_idx, old_idx[kept])
        assert torch.equal(layer.sara_values.detach()[pos], old_vals[kept])
        assert torch.equal(layer.sara_fixed_indices, old_idx[~kept])
        assert torch.equal(layer.sara_fixed_values, old_vals[~kept])
        released_any |= bool((~kept).any())
    assert released_any
    train(model, steps=3)  # the optimizer keeps working with the resized parameters


def test_reselect_with_threshold_only_releases_entries_and_training_goes_on():
    model = apply_sara(make_small(), SaRAConfig(threshold=0.03))
    _, opt = train(model, steps=20, lr=0.05)
    old = {n: m.sara_indices.clone() for n, m in model.named_modules() if isinstance(m, SaRALayer)}
    x, y = batch()
    # A training loop calls reselect while the last step's loss, hence its autograd graph, is still alive.
    last_loss = (model(x) - y).pow(2).mean() + rank_penalty(model)
    last_loss.backward()
    out = model(x).detach()
    reselect(model, opt)
    assert torch.equal(model(x), out)
    for name, layer in model.named_modules():
        if isinstance(layer, SaRALayer):
            assert torch.isin(layer.sara_indices, old[name]).all()
            assert (layer.sara_values.abs() < 0.03).all() and (layer.sara_fixed_values.abs() >= 0.03).all()
    assert sum(p.numel() for p in trainable(model)) < sum(i.numel() for i in old.values())
    # The shrunken selections are new Parameters; the optimizer passed to reselect now holds them (a
    # resized leaf that kept its old gradient accumulator would fail in this backward).
    assert [p for g in opt.param_groups for p in g["params"]] == trainable(model)
    before = [p.detach().clone() for p in trainable(model)]
    loss = (model(x) - y).pow(2).mean() + rank_penalty(model)
    loss.backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, trainable(model)) if a.numel())


def test_state_dict_after_reselect_loads_into_a_fresh_adapter():
    model = apply_sara(make_small(), SaRAConfig(fraction=0.1))
    train(model, steps=20, lr=0.1)
    reselect(model)
    fresh = apply_sara(make_small(), SaRAConfig(fraction=0.1))
    fresh.load_state_dict(model.state_dict())
    x, _ = batch()
    assert torch.equal(fresh(x), model(x))


# -- switching, saving, merging -----------------------------------------------------------------------
@pytest.mark.parametrize("ub", [True, False])
def test_disable_gives_base_outputs_and_enable_restores(ub):
    base = make_small()
    model = apply_sara(copy.deepcopy(base), SaRAConfig(fraction=0.2, unstructured_backprop=ub))
    train(model, steps=10)
    x, _ = batch()
    adapted = model(x).detach()
    assert not torch.allclose(adapted, base(x))
    assert torch.equal(disable_sara(model)(x), base(x))
    assert torch.equal(enable_sara(model)(x), adapted)


def test_save_load_into_fresh_base_reproduces_outputs_exactly(tmp_path):
    base = make_small()
    model = apply_sara(copy.deepcopy(base), SaRAConfig(fraction=0.1, progressive_step=10))
    train(model, steps=15, lr=0.1)
    reselect(model)
    train(model, steps=5)
    path = tmp_path / "adapter.safetensors"
    save_sara(model, path)
    assert not list(tmp_path.glob("*.tmp"))
    x, _ = batch()
    loaded = load_sara(copy.deepcopy(base), path)
    assert torch.equal(loaded(x), model(x))
    assert loaded.hidden.config == model.hidden.config
    # into a model already adapted with another selection
    other = apply_sara(copy.deepcopy(base), SaRAConfig(threshold=0.05))
    assert torch.equal(load_sara(other, path)(x), model(x))
    # from the in-memory state dict; only sparse tensors are in it
    state = sara_state_dict(model)
    assert set(state["config"]) >= {"threshold", "fraction", "rank_lambda", "progressive_step"}
    n_sparse = sum(v.numel() for v in state["tensors"].values())
    assert n_sparse < sum(w.numel() for w in weights(base).values())
    assert torch.equal(load_sara(copy.deepcopy(base), state)(x), model(x))


def test_merge_gives_plain_modules_and_same_outputs():
    base = make_small()
    model = apply_sara(copy.deepcopy(base), SaRAConfig(fraction=0.2))
    train(model, steps=10)
    x, _ = batch()
    out = model(x).detach()
    merged = merge_sara(model)
    assert not any(isinstance(m, SaRALayer) for m in merged.modules())
    assert [type(m) for m in merged.modules()] == [type(m) for m in base.modules()]
    assert merged.state_dict().keys() == base.state_dict().keys()
    assert torch.equal(merged(x), out)


# -- diffusers UNet -----------------------------------------------------------------------------------
def test_sara_on_a_diffusers_unet_score_model(tmp_path):
    torch.manual_seed(0)
    sde = VPSDE()
    net = make_unet(sample_size=8, block_out_channels=(16, 32), attention=True)
    base = ScoreModel(net, sde)
    model = apply_sara(copy.deepcopy(base), SaRAConfig(fraction=0.05))
    names = {n for n, m in model.named_modules() if isinstance(m, SaRALayer)}
    assert {"net.mid_block.attentions.0.to_q", "net.mid_block.attentions.0.to_out.0", "net.conv_in"} <= names
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 1, 8, 8, generator=g)
    opt = torch.optim.Adam(trainable(model), lr=1e-2)
    for _ in range(2):
        loss = dsm_loss(model, sde, x0, generator=g) + rank_penalty(model, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    t = torch.full((8,), 0.5)
    out = model(x0, t).detach()
    path = tmp_path / "unet.safetensors"
    save_sara(model, path)
    assert torch.equal(load_sara(copy.deepcopy(base), path)(x0, t), out)
    assert torch.equal(disable_sara(model)(x0, t), base(x0, t))
    enable_sara(model)
    merged = merge_sara(model)
    assert type(merged.net.mid_block.attentions[0].to_q) is nn.Linear
    assert type(merged.net.conv_in) is nn.Conv2d
    torch.testing.assert_close(merged(x0, t), out, rtol=0, atol=0)


# -- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fraction=0.0), r"fraction must lie in \(0, 1\)"),
        (dict(fraction=1.5), r"fraction must lie in \(0, 1\)"),
        (dict(threshold=0.0), "threshold must be a positive"),
        (dict(threshold=-1e-3), "threshold must be a positive"),
        (dict(threshold=1e-3, fraction=0.1), "exactly one of threshold=.*both given"),
        (dict(), "exactly one of threshold=.*neither given"),
        (dict(fraction=0.1, rank_lambda=-1.0), "rank_lambda must be >= 0"),
        (dict(fraction=0.1, progressive_step=0), "progressive_step must be a positive"),
        (dict(fraction=0.1, progressive_step=2.5), "progressive_step must be a positive integer"),
        (dict(fraction=0.1, progressive_step=True), "progressive_step must be a positive integer"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SaRAConfig(**kwargs)


def test_bad_targets_and_thresholds():
    with pytest.raises(ValueError, match=r"target_modules=\['to_q'\] matches no module; .*\[conv, inp, hidden, out\]"):
        apply_sara(make_small(), SaRAConfig(fraction=0.1, target_modules=["to_q"]))
    with pytest.raises(ValueError, match=r"matches module 'norm' of type LayerNorm"):
        apply_sara(make_small(), SaRAConfig(fraction=0.1, target_modules="norm|out"))
    smallest = min(weights(make_small()).items(), key=lambda kv: kv[1].abs().min())[0]
    with pytest.raises(ValueError, match=rf"threshold=1e-09 selects no weight entry in any of the 4 target "
                                         rf"modules \(the smallest \|w\| is .*, in '{smallest}'\)"):
        apply_sara(make_small(), SaRAConfig(threshold=1e-9))
    model = apply_sara(make_small(), SaRAConfig(fraction=0.1))
    with pytest.raises(ValueError, match="already has SaRA adapters"):
        apply_sara(model, SaRAConfig(fraction=0.1))
    with pytest.raises(ValueError, match="rank_penalty: the model has no SaRA adapters"):
        rank_penalty(make_small())


def test_loading_into_a_mismatched_model_names_the_module(tmp_path):
    model = apply_sara(make_small(), SaRAConfig(fraction=0.1))
    path = tmp_path / "a.safetensors"
    save_sara(model, path)

    wider = make_small()
    wider.hidden = nn.Linear(72, 96)
    with pytest.raises(ValueError, match=r"module 'hidden' has a weight of shape \(96, 72\) but the adapter was made for \(80, 72\)"):
        load_sara(wider, path)

    other_type = make_small()
    other_type.hidden = nn.LayerNorm(72)
    with pytest.raises(ValueError, match=r"module 'hidden' is a LayerNorm; the adapter expects a Linear/Conv layer"):
        load_sara(other_type, path)

    partial = apply_sara(make_small(), SaRAConfig(fraction=0.1, target_modules=["hidden"]))
    save_sara(partial, tmp_path / "hidden_only.safetensors")
    with pytest.raises(ValueError, match=r"the model has SaRA modules the adapter does not cover: \['conv', 'inp', 'out'\]"):
        load_sara(apply_sara(make_small(), SaRAConfig(fraction=0.1)), tmp_path / "hidden_only.safetensors")

    renamed = nn.Sequential(make_small())
    with pytest.raises(ValueError, match=r"the adapter has module 'conv' but the model has no module of that name"):
        load_sara(renamed, path)

    plain = tmp_path / "plain.safetensors"
    from scorekit.checkpoint import save_tensors

    save_tensors({"w": torch.zeros(2)}, plain, {"format": "other"})
    with pytest.raises(ValueError, match="is not a SaRA adapter"):
        load_sara(make_small(), plain)


# -- the finetune command -----------------------------------------------------------------------------
BASE_YAML = """
sde: {name: vp}
model: {net: mlp, options: {hidden: 72, depth: 1, emb_dim: 16}}
data: {name: digits, split: train, classes: [0, 1, 2, 3, 4]}
training: {steps: 10, batch_size: 32, lr: 1.0e-3, progress: false, checkpoint_every: 0}
"""


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    from scorekit.cli import main

    root = tmp_path_factory.mktemp("base")
    (root / "base.yaml").write_text(BASE_YAML)
    assert main(["train", "--config", str(root / "base.yaml"), "--out_dir", str(root / "run")]) == 0
    return root / "run"


ROOT = Path(__file__).resolve().parents[1]


def finetune_args(base, out, *extra, method="sara"):
    return ["finetune", "--config", str(ROOT / "configs/finetune_sara.yaml"), "--base", str(base), "--out_dir",
            str(out), "--method", method, "training.batch_size=16", "training.progress=false",
            "sara.progressive_step=3", "training.checkpoint_every=2", *extra]


def finetune(base, out, *extra, method="sara"):
    from scorekit.cli import main

    assert main(finetune_args(base, out, *extra, method=method)) == 0


# With a threshold the re-selection shrinks the trainable set (new Parameters); with a fraction it keeps its size.
@pytest.mark.parametrize("rule", [(), ("sara.fraction=null", "sara.threshold=0.02", "training.lr=0.01")],
                         ids=["fraction", "threshold"])
def test_finetune_sara_resumes_across_the_progressive_step(base_run, tmp_path, rule):
    from scorekit.checkpoint import load_tensors
    from scorekit.config import load_score_model

    finetune(base_run, tmp_path / "once", "training.steps=6", *rule)
    finetune(base_run, tmp_path / "split", "training.steps=4", *rule)  # stops after the re-selection (step 3)
    finetune(base_run, tmp_path / "split", "training.steps=6", *rule)  # resumes from the step-4 checkpoint
    once, _ = load_tensors(tmp_path / "once" / "adapter.safetensors")
    split, meta = load_tensors(tmp_path / "split" / "adapter.safetensors")
    assert once.keys() == split.keys() and all(torch.equal(once[k], split[k]) for k in once)
    assert any(v.numel() for k, v in once.items() if k.endswith("sara_fixed_indices")), "no re-selection happened"
    assert meta["config"]["progressive_step"] == 3
    # merged/ is a plain checkpoint equal to the base with the adapter loaded
    base, _ = load_score_model(base_run)
    merged, _ = load_score_model(tmp_path / "once" / "merged")
    adapted = load_sara(base, tmp_path / "once" / "adapter.safetensors")
    x, t = torch.randn(5, 1, 8, 8), torch.full((5,), 0.3)
    torch.testing.assert_close(merged(x, t), adapted(x, t), rtol=0, atol=0)


def test_finetune_lora_matches_the_sara_budget_and_full_trains_everything(base_run, tmp_path, capsys):
    finetune(base_run, tmp_path / "lora", "training.steps=2", method="lora")
    sara_line = capsys.readouterr().out
    budget = int(sara_line.split("'sara_budget': ")[1].split("}")[0])
    trainable = int(sara_line.split("'trainable': ")[1].split(",")[0])
    rank = int(sara_line.split("'rank': ")[1].split(",")[0])
    per_rank = trainable // rank
    assert abs(trainable - budget) <= per_rank / 2 + 1  # the closest rank
    finetune(base_run, tmp_path / "full", "training.steps=2", method="full")
    from scorekit.config import load_score_model

    base, _ = load_score_model(base_run)
    full, _ = load_score_model(tmp_path / "full" / "merged")
    assert f"'trainable': {sum(p.numel() for p in base.parameters())}" in capsys.readouterr().out
    assert all(not torch.equal(p, q) for p, q in zip(base.parameters(), full.parameters()) if p.ndim == 2)


def test_lora_budget_caps_the_rank_of_narrow_modules():
    """A 1-channel conv (or a 3-output Linear) cannot take the global LoRA rank: it gets its own smaller rank
    (scale alpha / r kept), and the global rank is chosen so that the total is the closest to SaRA's budget."""
    from peft.tuners.lora import LoraLayer

    from scorekit.finetune import FinetuneConfig, prepare_model

    base = make_small()
    cfg = FinetuneConfig(method="lora", sara=SaRAConfig(fraction=0.3))
    budget = sum(p.numel() for p in trainable(apply_sara(make_small(), cfg.sara)))
    model, summary = prepare_model(copy.deepcopy(base), cfg)
    r = summary["rank"]
    shapes = {n: m.weight.shape for n, m in base.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}

    def count(rank):
        return sum(min(rank, s[0], math.prod(s[1:])) * (s[0] + math.prod(s[1:])) for s in shapes.values())

    assert r > 4  # above the conv's (4 outputs) and the head's (3 outputs) widths
    assert summary["trainable"] == count(r) == sum(p.numel() for p in trainable(model))
    assert all(abs(count(r) - budget) <= abs(count(k) - budget) for k in range(1, 81))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert layers["conv"].r["default"] == 4 and layers["out"].r["default"] == 3 and layers["hidden"].r["default"] == r
    assert all(m.scaling["default"] == 1.0 for m in layers.values())
    x, _ = batch()
    torch.testing.assert_close(model(x), base(x))  # LoRA's B starts at zero


THRESHOLD = ("sara.fraction=null", "sara.threshold=0.02", "training.lr=0.01")

# Runs `scorekit finetune` (argv[3:]) in a fresh process: SIGKILLs itself after step argv[1] (0: never), else
# each rank saves its own (not the EMA) adapter as argv[2]/rank-N.safetensors.
DRIVER = """
import os, signal, sys
import scorekit.finetune as ft
from scorekit.cli import main
from scorekit.sara import save_sara

kill_at, out = int(sys.argv[1]), sys.argv[2]
original, made = ft.make_finetune_trainer, []

def make(*args, **kwargs):
    trainer, summary = original(*args, **kwargs)
    if kill_at:
        trainer.callbacks.append(lambda t: t.step == kill_at and os.kill(os.getpid(), signal.SIGKILL))
    made.append(trainer)
    return trainer, summary

ft.make_finetune_trainer = make
assert main(sys.argv[3:]) == 0
save_sara(made[0].unwrapped, f"{out}/rank-{made[0].accelerator.process_index}.safetensors")
"""


def run_driver(tmp_path, kill_at, out, argv, launcher=()):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCOREKIT_TEST_THREADS": "1"}
    cmd = [sys.executable, *launcher, str(script), str(kill_at), str(out), *argv]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def tensors_equal(a, b):
    from scorekit.checkpoint import load_tensors

    a, b = load_tensors(a)[0], load_tensors(b)[0]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kill_at", [3, 5], ids=["right-after-reselection", "after-its-checkpoint"])
def test_finetune_killed_mid_run_resumes_bit_for_bit(base_run, tmp_path, kill_at):
    """A `kill -9` (after step 3, the re-selection, before its checkpoint at 4; or after step 5), then the same
    command again: the run ends exactly as the one never interrupted, adapter, merged model and optimizer alike."""
    finetune(base_run, tmp_path / "once", "training.steps=6", *THRESHOLD)
    argv = finetune_args(base_run, tmp_path / "killed", "training.steps=6", *THRESHOLD)
    killed = run_driver(tmp_path, kill_at, tmp_path / "killed", argv)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "adapter.safetensors").exists()
    finetune(base_run, tmp_path / "killed", "training.steps=6", *THRESHOLD)
    once, resumed = tmp_path / "once", tmp_path / "killed"
    for rel in ("adapter.safetensors", "adapter/adapter_model.safetensors", "merged/model.safetensors",
                "merged/ema.safetensors", "checkpoints/step-00000006/optimizer.safetensors"):
        assert tensors_equal(once / rel, resumed / rel), rel


def test_finetune_under_torchrun_two_processes_keeps_the_ranks_identical(base_run, tmp_path):
    """Two CPU processes (gloo), the threshold rule and a progressive step: the re-selection replaces Parameters,
    and both ranks still end with the same adapter, the one in the final checkpoint."""
    from scorekit.checkpoint import load_json, load_tensors

    out = tmp_path / "ddp"
    argv = finetune_args(base_run, out, "training.steps=6", *THRESHOLD)
    done = run_driver(tmp_path, 0, out, argv, launcher=("-m", "torch.distributed.run", "--standalone",
                                                         "--nproc_per_node", "2"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    state = load_json(out / "checkpoints" / "step-00000006" / "state.json")
    assert state["world_size"] == 2
    assert tensors_equal(out / "rank-0.safetensors", out / "rank-1.safetensors")
    rank0, _ = load_tensors(out / "rank-0.safetensors")
    assert any(v.numel() for k, v in rank0.items() if k.endswith("sara_fixed_indices")), "no re-selection happened"
    final, _ = load_tensors(out / "checkpoints" / "step-00000006" / "model.safetensors")
    for key, value in rank0.items():
        assert torch.equal(final[key] if not key.endswith("sara_indices") else selection(final, key[:-12]), value), key


def selection(state, prefix):
    """The trainable indices a SaRALayer's state dict describes: below its threshold on the pre-trained weight, plus its list."""
    if state[prefix + "sara_threshold"] > 0:
        below = state[prefix + "base_layer.weight"].reshape(-1).abs() < state[prefix + "sara_threshold"]
        below[state[prefix + "sara_listed"].long()] = True
        return torch.nonzero(below).reshape(-1).to(torch.int32)
    return state[prefix + "sara_listed"]


@pytest.mark.parametrize("override, match", [
    ("lora.r=0", r"lora: r must be a positive integer \(the LoRA rank; null = match SaRA's trainable budget\), got 0"),
    ("lora.dropout=1.0", r"lora: dropout must lie in \[0, 1\)"),
    ("sara.progressive_step=6", r"sara.progressive_step=6 is not below training.steps=6"),
    ("sara.progressive_step=2.5", r"progressive_step: expected an integer, got 2.5"),
])
def test_finetune_config_refuses_bad_numbers(base_run, tmp_path, capsys, override, match):
    import re

    from scorekit.cli import main

    method = "lora" if "lora" in override else "sara"
    assert main(finetune_args(base_run, tmp_path / "bad", "training.steps=6", override, method=method)) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "bad").exists()


def test_finetune_config_checks_in_code():
    from scorekit.finetune import FinetuneConfig, LoRASection
    from scorekit.training import TrainConfig

    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoRASection(r=0)
    with pytest.raises(ValueError, match="progressive_step=10 is not below training.steps=10"):
        FinetuneConfig(training=TrainConfig(steps=10), sara=SaRAConfig(fraction=0.1, progressive_step=10))
    # LoRA and full fine-tuning do not re-select: the SaRA section only sizes LoRA's budget there
    FinetuneConfig(method="lora", training=TrainConfig(steps=10), sara=SaRAConfig(fraction=0.1, progressive_step=10))


@pytest.mark.parametrize("method", ["sara", "lora"])
def test_sampling_a_run_with_its_adapter_directory_equals_sampling_merged(base_run, tmp_path, method):
    """`finetune` on a scorekit run writes adapter/ for LoRA as for SaRA; `sample --adapter` on the base run
    draws what `sample` on merged/ draws, with the same seed (to float32 rounding: LoRA unmerged computes
    W x + B A x, merged (W + B A) x)."""
    from scorekit.checkpoint import load_tensors
    from scorekit.cli import main

    finetune(base_run, tmp_path / "ft", "training.steps=4", method=method)
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").is_file()
    common = ["sample", "--sampler", "pc", "--steps", "20", "--n", "4", "--seed", "3", "--device", "cpu", "--no-progress"]
    assert main([*common, "--checkpoint", str(tmp_path / "ft" / "merged"), "--out", str(tmp_path / "m.png")]) == 0
    assert main([*common, "--checkpoint", str(base_run), "--adapter", str(tmp_path / "ft" / "adapter"),
                 "--out", str(tmp_path / "a.png")]) == 0
    merged, adapted = (load_tensors(tmp_path / f"{n}.safetensors")[0] for n in ("m", "a"))
    assert merged.keys() == adapted.keys()
    for k in merged:
        torch.testing.assert_close(adapted[k], merged[k], rtol=1e-4, atol=1e-4)
    base = tmp_path / "b.png"
    assert main([*common, "--checkpoint", str(base_run), "--out", str(base)]) == 0
    assert any(not torch.allclose(load_tensors(tmp_path / "b.safetensors")[0][k], merged[k]) for k in merged)
