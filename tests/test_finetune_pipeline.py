"""Fine-tuning a Stable-Diffusion-style pipeline on a captioned image folder (`scorekit finetune --base PIPE
--data FOLDER`), its outputs (`merged/` pipeline directory, `adapter/`) and `scorekit sample --adapter`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a cat"
STEPS = ("training.steps=3", "training.batch_size=4", "training.progress=false", "training.checkpoint_every=0")


def write_folder(folder: Path, n: int = 8, seed: int = 0) -> list[str]:
    """``n`` random images (one grayscale, one RGBA, the rest RGB, of a non-square size) with captions."""
    from scorekit.testing import WORDS

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines, texts = [], []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
        image = image.convert({0: "L", 1: "RGBA"}.get(i, "RGB"))
        image.save(folder / f"{i:02d}.png")
        texts.append(" ".join(rng.choice(WORDS, 4)))
        lines.append(json.dumps({"file_name": f"{i:02d}.png", "text": texts[-1]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return texts


def cli(*argv) -> int:
    from scorekit.cli import main

    return main([str(a) for a in argv])


def finetune(pipe, data, out, method, *extra) -> int:
    return cli("finetune", "--config", ROOT / "configs/finetune_sd.yaml", "--base", pipe, "--data", data,
               "--resolution", 16, "--method", method, "--out_dir", out, *STEPS, *extra)


def sample(checkpoint, out, *extra):
    from scorekit.checkpoint import load_tensors

    assert cli("sample", "--checkpoint", checkpoint, "--prompt", PROMPT, "--steps", 3, "--n", 2, "--sampler",
               "dpm_solver_2m", "--device", "cpu", "--no-progress", "--out", out, *extra) == 0
    assert Path(out).is_file()
    return load_tensors(Path(out).with_suffix(".safetensors"))[0]["samples"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from scorekit.testing import tiny_sd

    root = tmp_path_factory.mktemp("sd")
    tiny_sd(root / "pipe")
    write_folder(root / "images")
    return root


@pytest.fixture(scope="module")
def runs(pipe):
    """One 3-step run per method (SaRA with its re-selection after step 2)."""
    for method in ("sara", "lora", "full"):
        assert finetune(pipe / "pipe", pipe / "images", pipe / method, method, "sara.progressive_step=2") == 0
    return pipe


def base_unet(pipe):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(pipe / "pipe" / "unet").eval()


def merged_unet(run):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(run / "merged", safety_checker=None).unet


# -- the merged pipeline ------------------------------------------------------------------------------
def test_sara_merged_pipeline_is_the_base_with_the_adapter_merged(runs):
    from scorekit.sara import load_sara, merge_sara

    merged = merged_unet(runs / "sara").state_dict()
    expected = merge_sara(load_sara(base_unet(runs), runs / "sara" / "adapter")).state_dict()
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in merged)
    # only the adapted entries moved, and (nearly) all of them did
    from scorekit.checkpoint import load_tensors

    base = base_unet(runs).state_dict()
    adapter, _ = load_tensors(runs / "sara" / "adapter" / "adapter_model.safetensors")
    moved = total = 0
    for name in {k.rsplit(".sara_", 1)[0] for k in adapter}:
        w0, w1 = base[f"{name}.weight"].flatten(), merged[f"{name}.weight"].flatten()
        support = torch.cat([adapter[f"{name}.sara_fixed_indices"], adapter[f"{name}.sara_indices"]]).long()
        outside = torch.ones_like(w0, dtype=torch.bool)
        outside[support] = False
        assert torch.equal(w0[outside], w1[outside]), name
        moved += int((w0[support] != w1[support]).sum())
        total += support.numel()
    assert total > 0 and moved >= 0.9 * total, (moved, total)
    assert all(torch.equal(base[k], merged[k]) for k in base if not k.endswith("weight"))


def test_lora_merged_pipeline_adds_the_scaled_low_rank_product(runs):
    from peft import LoraConfig

    from scorekit.checkpoint import load_tensors

    config = LoraConfig.from_pretrained(str(runs / "lora" / "adapter"))
    state, _ = load_tensors(runs / "lora" / "adapter" / "adapter_model.safetensors")
    base, merged = base_unet(runs).state_dict(), merged_unet(runs / "lora").state_dict()
    assert merged.keys() == base.keys()  # a plain UNet: no lora_A / base_layer keys
    linear = [k.rsplit(".lora_A.", 1)[0] for k in state if k.endswith("lora_A.weight") and state[k].ndim == 2]
    assert linear
    for name in linear:  # W = W0 + (alpha / r) B A, by hand
        a, b = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        expected = base[f"{name}.weight"] + config.lora_alpha / config.r * b @ a
        torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(merged[f"{n}.weight"], base[f"{n}.weight"]) for n in linear)


def test_full_merged_pipeline_holds_the_ema_weights_and_every_weight_trained(runs):
    from scorekit.checkpoint import load_tensors
    from scorekit.training import latest_checkpoint

    ema, _ = load_tensors(latest_checkpoint(runs / "full") / "ema.safetensors")
    merged, base = merged_unet(runs / "full").state_dict(), base_unet(runs).state_dict()
    assert {f"score.net.{k}" for k in merged} == set(ema)
    assert all(torch.equal(merged[k], ema[f"score.net.{k}"]) for k in merged)
    assert all(not torch.equal(merged[k], base[k]) for k in base if base[k].ndim >= 2)
    assert not (runs / "full" / "adapter").exists()


# -- sampling -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sara", "lora"])
def test_sampling_the_adapter_equals_sampling_the_merged_pipeline(runs, tmp_path, method):
    merged = sample(runs / method / "merged", tmp_path / "merged.png")
    adapted = sample(runs / "pipe", tmp_path / "adapted.png", "--adapter", runs / method / "adapter")
    assert merged.shape == (2, 3, 16, 16) and torch.isfinite(merged).all()
    torch.testing.assert_close(adapted, merged, rtol=0, atol=1e-5)
    base = sample(runs / "pipe", tmp_path / "base.png")
    assert not torch.allclose(base, merged)


def test_full_merged_pipeline_samples(runs, tmp_path):
    samples = sample(runs / "full" / "merged", tmp_path / "full.png")
    assert samples.shape == (2, 3, 16, 16) and torch.isfinite(samples).all()


# -- the loss -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(pipe):
    from scorekit import from_diffusers

    return from_diffusers(pipe / "pipe")


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_loss_matches_a_hand_computation_with_diffusers_scheduler(model, prediction):
    """The loss of diffusers' train_text_to_image.py: noise added by the scheduler at a uniform step k,
    MSE to epsilon / get_velocity / the sample, with the same draws."""
    from diffusers import DDPMScheduler

    from scorekit.finetune import PipelineDenoiser, pipeline_dsm_loss

    torch.manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8)
    context = model.conditioning(prompt=["a red cat", "a big dog", "a tree"]).cond["encoder_hidden_states"]
    loss_fn = pipeline_dsm_loss(model.sde, prediction, context[:1] * 0)
    with torch.no_grad():
        loss = loss_fn(PipelineDenoiser(model), (x0, context), torch.Generator().manual_seed(5))

        g = torch.Generator().manual_seed(5)
        k = torch.randint(0, 1000, (3,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        scheduler = DDPMScheduler.from_config(model.scheduler_config)
        noisy = scheduler.add_noise(x0, eps, k)
        out = model.net(noisy, k, encoder_hidden_states=context).sample
        target = {"eps": eps, "v": scheduler.get_velocity(x0, eps, k), "x0": x0}[prediction]
        expected = ((out - target) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, encoder_hidden_states):
        self.seen.append(encoder_hidden_states)
        return torch.zeros_like(x)


@pytest.mark.parametrize("dropout", [0.0, 0.5, 1.0])
def test_caption_dropout_uses_the_empty_prompt_embedding(model, dropout):
    from scorekit.finetune import pipeline_dsm_loss

    context, empty = torch.randn(64, 12, 16), torch.zeros(1, 12, 16)
    recorder = Recorder()
    pipeline_dsm_loss(model.sde, "eps", empty, dropout)(recorder, (torch.randn(64, 4, 8, 8), context),
                                                         torch.Generator().manual_seed(0))
    used = recorder.seen[0]
    is_empty = (used == empty).flatten(1).all(1)
    is_own = (used == context).flatten(1).all(1)
    assert bool((is_empty | is_own).all())
    if dropout == 0.0:
        assert not is_empty.any()
    elif dropout == 1.0:
        assert is_empty.all()
    else:
        assert 10 < int(is_empty.sum()) < 54


# -- the data -------------------------------------------------------------------------------------------
def test_data_is_encoded_once_with_non_rgb_images_converted(model, pipe):
    from scorekit.finetune import prepare_pipeline_data

    data = prepare_pipeline_data(model, pipe / "images", resolution=16, latents="mean")
    assert data.latents.shape == (8, 4, 8, 8) and torch.isfinite(data.latents).all()
    assert data.embeddings.shape == (8, 12, 16) and data.empty.shape == (1, 12, 16)
    texts = [json.loads(line)["text"] for line in (pipe / "images" / "metadata.jsonl").read_text().splitlines()]
    assert data.texts == texts
    own = model.conditioning(prompt=texts[:2]).cond["encoder_hidden_states"]
    torch.testing.assert_close(data.embeddings[:2], own)
    torch.testing.assert_close(data.empty, model.conditioning(prompt=[""]).cond["encoder_hidden_states"])
    # mean latents are the VAE posterior's mode times the scaling factor; sampled ones are a seeded draw
    from scorekit.data import load_image_folder

    images = load_image_folder(pipe / "images", resolution=16)
    assert images.shape == (8, 3, 16, 16)
    torch.testing.assert_close(data.latents, model.encode(images).detach())
    drawn = [prepare_pipeline_data(model, pipe / "images", resolution=16, seed=s).latents for s in (0, 0, 1)]
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])


def test_bad_image_folders_are_named(pipe, tmp_path, capsys):
    bare = tmp_path / "bare"
    write_folder(bare)
    (bare / "metadata.jsonl").unlink()
    assert finetune(pipe / "pipe", bare, tmp_path / "out1", "full") == 2
    assert "has no metadata.jsonl" in capsys.readouterr().err

    holes = tmp_path / "holes"
    write_folder(holes)
    (holes / "03.png").unlink()
    assert finetune(pipe / "pipe", holes, tmp_path / "out2", "full") == 2
    err = capsys.readouterr().err
    assert "names files that are not in" in err and "03.png" in err

    assert cli("finetune", "--config", ROOT / "configs/finetune_sd.yaml", "--base", pipe / "pipe", "--out_dir",
               tmp_path / "out3", "--method", "full", *STEPS) == 2
    assert "pass --data IMAGEFOLDER" in capsys.readouterr().err


# -- adapters that do not fit ---------------------------------------------------------------------------
def other_unet():
    """A UNet2DConditionModel with the tiny pipeline's module names but other widths."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)


def test_an_adapter_of_another_base_model_names_the_mismatching_modules(pipe, tmp_path, capsys):
    from scorekit.finetune import inject_lora, save_lora
    from scorekit.sara import SaRAConfig, apply_sara, find_targets, save_sara

    save_sara(apply_sara(other_unet(), SaRAConfig(fraction=0.1)), tmp_path / "sara")
    out = tmp_path / "x.png"
    args = ("sample", "--checkpoint", pipe / "pipe", "--prompt", PROMPT, "--steps", 2, "--n", 1, "--out", out,
            "--device", "cpu", "--no-progress", "--adapter")
    assert cli(*args, tmp_path / "sara") == 2
    err = capsys.readouterr().err
    assert "the adapter does not fit this model" in err and "'conv_in' has a weight of shape (16, 4, 3, 3)" in err

    unet = other_unet()
    save_lora(inject_lora(unet, find_targets(unet, ["to_q", "conv_in"]), 2, 2.0, 0.0), tmp_path / "lora")
    assert cli(*args, tmp_path / "lora") == 2
    err = capsys.readouterr().err
    assert "the LoRA adapter in" in err and "module 'conv_in' has a weight of shape (16, 4, 3, 3)" in err
    assert not out.exists()


def test_an_adapter_on_a_model_without_its_modules_names_them(runs, tmp_path, capsys):
    from scorekit.testing import tiny_dit

    tiny_dit(tmp_path / "dit")
    args = ("sample", "--checkpoint", tmp_path / "dit", "--class-label", 1, "--steps", 2, "--n", 1, "--device",
            "cpu", "--no-progress", "--out", tmp_path / "x.png", "--adapter")
    assert cli(*args, runs / "sara" / "adapter") == 2
    assert "but the model has no module of that name" in capsys.readouterr().err
    assert cli(*args, runs / "lora" / "adapter") == 2
    assert "but the model has no Linear/Conv module of that name" in capsys.readouterr().err
    assert cli(*args, tmp_path / "nothing") == 2
    assert "no adapter at" in capsys.readouterr().err


def test_the_sd_config_loads():
    from scorekit.config import load_config
    from scorekit.finetune import FinetuneConfig

    cfg = load_config(ROOT / "configs/finetune_sd.yaml", FinetuneConfig, ["finetune.caption_dropout=1.0"])
    assert cfg.finetune.caption_dropout == 1.0 and cfg.finetune.resolution == 512 and cfg.sara.threshold == 2e-3
    with pytest.raises(ValueError, match="latents"):
        load_config(ROOT / "configs/finetune_sd.yaml", FinetuneConfig, ["finetune.latents=mode"])


def test_a_pipeline_run_resumes_bit_for_bit_across_the_progressive_step(pipe, tmp_path):
    from scorekit.checkpoint import load_tensors

    extra = ("sara.progressive_step=2", "training.checkpoint_every=1")
    assert finetune(pipe / "pipe", pipe / "images", tmp_path / "once", "sara", *extra, "training.steps=4") == 0
    assert finetune(pipe / "pipe", pipe / "images", tmp_path / "split", "sara", *extra) == 0  # 3 steps
    assert finetune(pipe / "pipe", pipe / "images", tmp_path / "split", "sara", *extra, "training.steps=4") == 0
    once, _ = load_tensors(tmp_path / "once" / "adapter" / "adapter_model.safetensors")
    split, _ = load_tensors(tmp_path / "split" / "adapter" / "adapter_model.safetensors")
    assert once.keys() == split.keys() and all(torch.equal(once[k], split[k]) for k in once)
