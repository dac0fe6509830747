"""YAML configs <-> dataclasses, builders and the error messages users see."""

from pathlib import Path

import pytest
import torch

from scorekit import VESDE, VPSDE
from scorekit.config import (
    RunConfig,
    build_data,
    build_score_model,
    from_dict,
    load_config,
    load_score_model,
    to_dict,
)
from scorekit.training import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN_CONFIGS = ["digits_vp.yaml", "digits_ve.yaml", "gmm2d.yaml"]


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_shipped_run_configs_load_and_build(name):
    cfg = load_config(CONFIGS / name, RunConfig)
    x, _ = build_data(cfg.data)
    sde = cfg.sde.build()
    model = build_score_model(cfg.model, sde, tuple(x.shape[1:]))
    out = model(x[:4], torch.full((4,), 0.5))
    assert out.shape == x[:4].shape and torch.isfinite(out).all()
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_ve_unet_uses_the_ncsnpp_convention():
    cfg = load_config(CONFIGS / "digits_ve.yaml", RunConfig)
    model = build_score_model(cfg.model, cfg.sde.build(), (1, 8, 8))
    assert isinstance(model.sde, VESDE)
    assert (model.prediction, model.time_input) == ("score", "sigma")
    assert model.net.config.time_embedding_type == "fourier"
    vp = build_score_model(load_config(CONFIGS / "digits_vp.yaml", RunConfig).model, VPSDE(), (1, 8, 8))
    assert (vp.prediction, vp.time_input) == ("eps", "index")


def test_overrides_and_type_conversion():
    cfg = load_config(CONFIGS / "gmm2d.yaml", RunConfig, ["training.steps=7", "sampling.steps=null", "sde.name=ve"])
    assert cfg.training.steps == 7 and cfg.sampling.steps is None and cfg.sde.name == "ve"
    assert isinstance(cfg.training.lr, float) and cfg.training.betas == (0.9, 0.999)


def test_errors_name_the_key_and_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stepz'\] in section 'training'; valid keys are \[.*'steps'"):
        load_config({"training": {"stepz": 3}}, RunConfig)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['sampler'\] in RunConfig; valid keys are \['data', 'loss'"):
        load_config({"sampler": {}}, RunConfig)
    with pytest.raises(ValueError, match=r"training.lr: expected a number, got 'fast'"):
        load_config({"training": {"lr": "fast"}}, RunConfig)
    with pytest.raises(ValueError, match=r"training.steps: expected an integer, got 2.5"):
        load_config({"training": {"steps": 2.5}}, RunConfig)
    with pytest.raises(ValueError, match=r"training: steps must be an integer >= 1 \(optimiser steps\), got 0"):
        load_config({"training": {"steps": 0}}, RunConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  steps: 3\n lr: [1, 2\n")
    with pytest.raises(ValueError, match=r"bad.yaml: malformed YAML at line \d+"):
        load_config(bad, RunConfig)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a YAML mapping"):
        load_config(top, RunConfig)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.yaml", RunConfig)
    with pytest.raises(ValueError, match="must look like section.key=value"):
        load_config({}, RunConfig, ["training.steps"])
    with pytest.raises(ValueError, match=r"unknown net 'resnet'; valid names are \['mlp', 'unet'\]"):
        build_score_model(from_dict(RunConfig, {"model": {"net": "resnet"}}).model, VPSDE(), (2,))
    with pytest.raises(ValueError, match="unknown data set 'cifar10'"):
        build_data(from_dict(RunConfig, {"data": {"name": "cifar10"}}).data)


def test_yaml_floats_read_as_yaml_1_2_and_duplicate_keys_are_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  lr: 1e-3\n  grad_clip: 2.0e1\nsde:\n  sigma_max: 1.0e6\n")
    cfg = load_config(path, RunConfig, ["sampling.rtol=1e-4"])
    assert (cfg.training.lr, cfg.training.grad_clip, cfg.sde.sigma_max, cfg.sampling.rtol) == (1e-3, 20.0, 1e6, 1e-4)
    assert load_config({}, RunConfig, ["out_dir=1e5x"]).out_dir == "1e5x"  # not a number: stays a string
    path.write_text("training:\n  lr: 1e-3\n  steps: 5\n  lr: 1e-4\n")
    with pytest.raises(ValueError, match=r"run.yaml: malformed YAML at line 4, column 3: duplicate key 'lr' "
                                         r"\(first given at line 2\)"):
        load_config(path, RunConfig)
    with pytest.raises(ValueError, match=r"override 'training.lr=\[1': malformed YAML"):
        load_config({}, RunConfig, ["training.lr=[1"])


def test_load_score_model_restores_the_ema_weights(tmp_path):
    from scorekit.config import build_trainer

    cfg = load_config(CONFIGS / "gmm2d.yaml", RunConfig,
                      ["training.steps=3", "training.progress=false", f"out_dir={tmp_path}", "data.n=256"])
    trainer: Trainer = build_trainer(cfg)
    trainer.train()
    model, run = load_score_model(tmp_path)
    assert run == cfg
    x, t = torch.randn(5, 2), torch.rand(5)
    torch.testing.assert_close(model(x, t), trainer.ema(x, t))
