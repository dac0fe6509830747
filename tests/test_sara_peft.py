"""SaRA's peft habits: the adapter directory, disable as a context manager, unload, merge refusals,
print_trainable_parameters (against peft's own), and diffusers' save_pretrained on an adapted model."""

import copy
import json
import logging
import re
import warnings

import pytest
import torch
from torch import nn

from scorekit.sara import (
    SaRAConfig,
    SaRALayer,
    apply_sara,
    disable_sara,
    enable_sara,
    load_sara,
    merge_sara,
    print_trainable_parameters,
    save_sara,
    unload_sara,
)


def net(width=24):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, width), nn.Tanh(),
                         nn.Linear(width, 3))


def inputs():
    return torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))


def fit(model, x, steps=5):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def tiny_unet(**overrides):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    options = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                   norm_num_groups=4, attention_head_dim=4)
    return UNet2DModel(**{**options, **overrides})


def unet_out(unet, x):
    return unet(x, torch.full((len(x),), 10)).sample


# -- the adapter directory ------------------------------------------------------------------------------
def test_save_sara_writes_a_peft_style_directory_that_loads_exactly(tmp_path):
    base = net()
    x = inputs()
    model = fit(apply_sara(copy.deepcopy(base), SaRAConfig(fraction=0.2, rank_lambda=0.0)), x)
    save_sara(model, tmp_path / "adapter", base_model_name_or_path="runs/digits04")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                         "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    import scorekit

    assert config["peft_type"] == "SARA" and config["scorekit_version"] == scorekit.__version__
    assert config["base_model_name_or_path"] == "runs/digits04"
    assert config["base_model"]["class"] == "torch.nn.modules.container.Sequential"
    assert config["config"] == {**SaRAConfig(fraction=0.2, rank_lambda=0.0).to_dict()}
    assert config["shapes"] == {"0": [4, 1, 3, 3], "2": [24, 64], "4": [3, 24]}
    out = model(x)
    assert torch.equal(load_sara(copy.deepcopy(base), tmp_path / "adapter")(x), out)
    # the single-file form keeps working, next to it
    save_sara(model, tmp_path / "adapter.safetensors")
    assert torch.equal(load_sara(copy.deepcopy(base), tmp_path / "adapter.safetensors")(x), out)
    # saving into a directory holding other files leaves them alone
    (tmp_path / "adapter" / "notes.txt").write_text("mine")
    save_sara(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "notes.txt").read_text() == "mine"


def test_adapter_of_another_base_model_names_every_mismatching_module(tmp_path):
    model = apply_sara(tiny_unet(), SaRAConfig(fraction=0.1))
    save_sara(model, tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model"]
    assert recorded["class"] == "diffusers.models.unets.unet_2d.UNet2DModel"
    assert set(recorded["diffusers"][""]) == {"class", "name_or_path", "config_hash"}

    other = tiny_unet(block_out_channels=(8, 32))
    with pytest.raises(ValueError) as err:
        load_sara(other, tmp_path / "adapter")
    message = str(err.value)
    expected = [n for n, m in model.named_modules() if isinstance(m, SaRALayer)
                and other.get_submodule(n).weight.shape != m.base_layer.weight.shape]
    assert re.match(rf"the adapter does not fit this model in {len(expected)} of \d+ modules: ", message)
    assert all(f"module {n!r} has a weight of shape" in message for n in expected[:8])
    assert "Note: the adapter was made for" in message and recorded["diffusers"][""]["config_hash"] in message

    # same module shapes, another config (another activation): loads, with a warning naming both identities
    relu = tiny_unet(act_fn="relu")
    with pytest.warns(UserWarning, match="the adapter was made for .* every module matches"):
        load_sara(relu, tmp_path / "adapter")


def write_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (path / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, match", [
    (dict(shapes=None), r"adapter_config.json has no 'shapes' key \(module name -> weight shape\)"),
    (dict(config=None), r"adapter_config.json has no 'config' key"),
    (dict(shapes={"2": "24x64"}), r"adapter_config.json: key 'shapes' must map module names to weight shapes"),
    (dict(config={"fraction": 0.2, "rank": 4}), r"adapter_config.json: key 'config' must hold SaRAConfig fields.*"
                                                r"unknown: \['rank'\]"),
    (dict(config={"fraction": 2.0}), r"adapter_config.json: key 'config' is not a valid SaRAConfig: fraction must"),
    (dict(format="peft-lora"), r"adapter_config.json is not a SaRA adapter \(format 'peft-lora'"),
])
def test_malformed_adapter_config_names_the_file_and_key(tmp_path, change, match):
    save_sara(apply_sara(net(), SaRAConfig(fraction=0.2)), tmp_path / "a")
    write_config(tmp_path / "a", **change)
    with pytest.raises(ValueError, match=match):
        load_sara(net(), tmp_path / "a")


def test_unreadable_or_incomplete_adapters(tmp_path):
    from scorekit.checkpoint import load_tensors, save_tensors

    model = apply_sara(net(), SaRAConfig(fraction=0.2))
    save_sara(model, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"a/adapter_config.json is not valid JSON"):
        load_sara(net(), tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"is not a SaRA adapter directory: expected adapter_config.json and "
                                                r"adapter_model.safetensors"):
        load_sara(net(), tmp_path / "a")
    # a single file whose metadata lost its shapes
    save_sara(model, tmp_path / "b.safetensors")
    tensors, meta = load_tensors(tmp_path / "b.safetensors")
    save_tensors(tensors, tmp_path / "b.safetensors", {k: v for k, v in meta.items() if k != "shapes"})
    with pytest.raises(ValueError, match=r"b.safetensors \(its metadata\) has no 'shapes' key"):
        load_sara(net(), tmp_path / "b.safetensors")


# -- switching, merging, unloading ------------------------------------------------------------------------
@pytest.mark.parametrize("ub", [True, False])
def test_disable_as_a_context_manager_reenables_on_exit(ub):
    base, x = net(), inputs()
    model = fit(apply_sara(copy.deepcopy(base), SaRAConfig(fraction=0.2, unstructured_backprop=ub)), x)
    adapted = model(x).detach()
    with disable_sara(model) as plain:
        assert plain is model
        assert torch.equal(model(x), base(x))
    assert torch.equal(model(x), adapted)
    with pytest.raises(RuntimeError, match="boom"), disable_sara(model):
        raise RuntimeError("boom")
    assert torch.equal(model(x), adapted)  # re-enabled on the way out of an error too
    # a block inside a disabled stretch leaves the model disabled, as it found it
    disable_sara(model)
    with disable_sara(model):
        pass
    assert torch.equal(model(x), base(x))
    enable_sara(model)
    assert torch.equal(model(x), adapted)


def test_merge_refuses_a_disabled_adapter():
    model = fit(apply_sara(net(), SaRAConfig(fraction=0.2)), inputs())
    with disable_sara(model), pytest.raises(ValueError, match=r"merge_sara: the adapter is disabled in 3 of 3 "
                                                              r"modules .*enable_sara\(model\).*unload_sara\(model\)"):
        merge_sara(model)
    assert isinstance(merge_sara(model)[2], nn.Linear)  # enabled again: merges


@pytest.mark.parametrize("ub", [True, False])
def test_unload_gives_the_original_modules_and_weights(ub):
    base, x = net(), inputs()
    model = fit(apply_sara(copy.deepcopy(base), SaRAConfig(fraction=0.3, unstructured_backprop=ub)), x)
    model(x)  # with unstructured backprop the dense storage now holds the adapted values
    plain = unload_sara(model)
    assert [type(m) for m in plain.modules()] == [type(m) for m in base.modules()]
    assert plain.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), base.state_dict().values()))
    with pytest.raises(ValueError, match="unload_sara: the model has no SaRA adapters"):
        unload_sara(plain)


def test_print_trainable_parameters_prints_peft_s_line(capsys):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(net(), LoraConfig(r=2, target_modules=["2", "4"]))
    lora.print_trainable_parameters()
    peft_line = capsys.readouterr().out
    assert print_trainable_parameters(lora) == lora.get_nb_trainable_parameters()
    assert capsys.readouterr().out == peft_line  # same model, same line

    base = net()
    model = apply_sara(copy.deepcopy(base), SaRAConfig(fraction=0.1))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in base.parameters())  # the sparse values are entries of these weights
    assert print_trainable_parameters(model) == (n_train, n_all)
    assert capsys.readouterr().out == (f"trainable params: {n_train:,d} || all params: {n_all:,d} || "
                                       f"trainable%: {100 * n_train / n_all:.4f}\n")


# -- diffusers' save_pretrained ---------------------------------------------------------------------------
@pytest.mark.parametrize("ub", [True, False])
def test_save_pretrained_of_an_adapted_unet_writes_the_merged_model(tmp_path, caplog, ub):
    from diffusers import UNet2DModel

    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model = apply_sara(tiny_unet(), SaRAConfig(fraction=0.1, unstructured_backprop=ub))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        unet_out(model, x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    adapted = unet_out(model, x).detach()
    model.save_pretrained(tmp_path / "unet")
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error")
        reloaded = UNet2DModel.from_pretrained(tmp_path / "unet")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert not any(isinstance(m, SaRALayer) for m in reloaded.modules())
    torch.testing.assert_close(unet_out(reloaded, x), adapted, rtol=0, atol=0)
    # the adapted model is unchanged and keeps training
    assert isinstance(model.conv_in, SaRALayer)
    assert torch.equal(unet_out(model, x), adapted)
    unet_out(model, x).pow(2).mean().backward()
    # what a disabled adapter computes is what gets written
    with disable_sara(model):
        model.save_pretrained(tmp_path / "off")
        base_out = unet_out(model, x).detach()
    torch.testing.assert_close(unet_out(UNet2DModel.from_pretrained(tmp_path / "off"), x), base_out, rtol=0, atol=0)
    # merged back, the model is a plain diffusers model with diffusers' own save_pretrained
    merged = merge_sara(model)
    assert "save_pretrained" not in vars(merged)


def test_save_pretrained_of_a_unet_inside_a_score_model(tmp_path):
    from diffusers import UNet2DModel

    from scorekit import VPSDE, ScoreModel

    score = apply_sara(ScoreModel(tiny_unet(), VPSDE()), SaRAConfig(fraction=0.1))
    score.net.save_pretrained(tmp_path / "net")
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(unet_out(UNet2DModel.from_pretrained(tmp_path / "net"), x), unet_out(score.net, x),
                               rtol=0, atol=0)
