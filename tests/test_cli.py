"""The ``scorekit`` command line end to end: train a small run, then sample from it with plug-ins by name."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scorekit.cli import main

# what `scorekit --help` must not import: each takes longer than torch itself to load
HEAVY = ("diffusers", "accelerate", "peft", "PIL", "matplotlib", "sklearn")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rc = main(["train", "--config", "configs/gmm2d.yaml", "--out_dir", str(root / "run"), "--seed", "0",
               "training.steps=300", "training.progress=false", "data.n=4000"])
    assert rc == 0
    return root


def sample(run_dir, name, *extra):
    out = run_dir / f"{name}.png"
    rc = main(["sample", "--checkpoint", str(run_dir / "run"), "--n", "512", "--steps", "50", "--seed", "3",
               "--no-progress", "--out", str(out), *extra])
    assert rc == 0 and out.is_file()
    return load_file(out.with_suffix(".safetensors"))["samples"]


def test_svdd_by_name_raises_a_reward_from_a_file(run_dir):
    reward = run_dir / "height.py"
    reward.write_text("def height(x):\n    return x[:, 1]\n")
    plain = sample(run_dir, "plain")
    guided = sample(run_dir, "svdd", "--guidance", "svdd", "--reward", f"{reward}:height", "--candidates", "4")
    again = sample(run_dir, "svdd_again", "--guidance", "svdd", "--reward", f"{reward}:height", "--candidates", "4")
    assert torch.equal(guided, again)  # --seed also seeds the selection
    # the argmax over 4 candidates per step moves mass up, far beyond the sampling noise of the mean
    assert guided[:, 1].mean() > plain[:, 1].mean() + 0.3


def test_guidance_errors_say_what_is_missing(run_dir, capsys):
    for extra, message in [(["--guidance", "svdd"], "needs --reward"),
                           (["--guidance", "minority"], "--classifier PATH"),
                           (["--guidance", "svdd", "--reward", "nonsense"], "neither a built-in")]:
        rc = main(["sample", "--checkpoint", str(run_dir / "run"), "--n", "4", "--no-progress", *extra])
        assert rc == 2 and message in capsys.readouterr().err


def test_help_imports_no_heavy_library():
    """Every command module imports only the standard library at module level: ``--help`` (which builds every
    subcommand's parser) loads torch at most (``import scorekit``), never diffusers, accelerate or peft."""
    code = ("import sys\nfrom scorekit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print('heavy:', [m for m in {HEAVY!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert "usage: scorekit" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "heavy: []"
