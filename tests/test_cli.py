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


def test_overrides_may_come_anywhere_among_the_options():
    from scorekit.cli import build_parser

    args = build_parser(["train"]).parse_args(["train", "--config", "c.yaml", "a.b=1", "--out_dir", "X", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.out_dir == "X"
    args = build_parser(["demo"]).parse_args(["demo", "a.b=1", "--steps", "3", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.steps == 3


def test_user_errors_are_one_line_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  steps: 3\n lr: [1, 2\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"scorekit train: error: {bad}: malformed YAML at line ") and "Traceback" not in err
    assert main(["train", "--config", str(tmp_path)]) == 2
    assert f"the config {tmp_path} is a folder; pass a YAML file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="malformed YAML"):
        main(["--debug", "train", "--config", str(bad)])
    import scorekit.commands.train as train

    def bug(args):
        raise TypeError("unsupported operand type(s)")

    monkeypatch.setattr(train, "run", bug)
    with pytest.raises(TypeError, match="unsupported operand"):  # a bug, not a usage error
        main(["train", "--config", "configs/gmm2d.yaml"])


def test_reward_file_with_a_syntax_error_is_named(run_dir, capsys):
    bad = run_dir / "broken.py"
    bad.write_text("def f(x):\n    return x[:, 1\n")
    rc = main(["sample", "--checkpoint", str(run_dir / "run"), "--n", "4", "--no-progress", "--guidance", "svdd",
               "--reward", f"{bad}:f"])
    err = capsys.readouterr().err
    assert rc == 2 and f"the reward module '{bad}'" in err and "is not valid Python" in err and "line 2" in err


def test_training_says_its_processes_device_and_backend(tmp_path, capsys):
    rc = main(["train", "--config", "configs/gmm2d.yaml", "--out_dir", str(tmp_path / "run"), "training.steps=2",
               "data.n=64", "training.batch_size=16"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "train: 1 process(es), device cpu, backend none (one process), mixed precision no" in out


def test_reward_help_says_it_runs_user_code():
    from scorekit.cli import build_parser

    sub = next(a for a in build_parser(["sample"])._actions if a.dest == "command")
    assert "use code you trust" in " ".join(sub.choices["sample"].format_help().split())
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "executes the file with your rights: use code you trust" in readme


def test_demo_trains_the_small_unet_by_default_and_keeps_the_mlp():
    from scorekit.cli import build_parser
    from scorekit.commands.demo import _config

    parser = build_parser(["demo"])
    unet = _config(parser.parse_args(["demo"]))
    assert unet.model.net == "unet" and unet.model.options["block_out_channels"] == [32, 64, 64]
    mlp = _config(parser.parse_args(["demo", "--net", "mlp", "--steps", "7", "sampling.rtol=1e-3"]))
    assert mlp.model.net == "mlp" and mlp.training.steps == 7 and mlp.sampling.rtol == 1e-3


def test_demo_runs_end_to_end_on_the_unet_at_a_tiny_size(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out_dir", str(out), "--steps", "2", "--n", "8", "sampling.steps=4", "sampling.rtol=1e-2",
               "sampling.atol=1e-2", "training.batch_size=16", "training.checkpoint_every=0"])
    assert rc == 0
    table = (out / "metrics.md").read_text()
    assert "DPM-Solver++(2M), 20 steps" in table and "dopri5, rtol=0.01, atol=0.01" in table
    assert {"samples.png", "samples_pc.png", "samples_ode.png", "samples_dpm_solver_2m.png", "metrics.json"} <= {
        p.name for p in out.iterdir()}
