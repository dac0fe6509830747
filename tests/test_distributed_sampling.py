"""``scorekit sample --seeds`` and ``scorekit likelihood`` in one and in two processes (torchrun and
``accelerate launch --multi_gpu``, gloo on CPU)."""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from scorekit.cli import main
from scorekit.sampling import init_processes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny digits model (8x8 images): an MLP trained for a few steps is enough to test the plumbing."""
    root = tmp_path_factory.mktemp("seeds")
    rc = main(["train", "--config", "configs/digits_vp.yaml", "--out_dir", str(root / "run"), "--seed", "0",
               "training.steps=20", "training.progress=false", "training.checkpoint_every=0", "model.net=mlp",
               "model.options={hidden: 32, depth: 1}"])
    assert rc == 0
    return root


def torchrun(*args, nproc=2):
    # "--" ends torchrun's own options: its parser would take scorekit's --n for an abbreviation of --nnodes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCOREKIT_TEST_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "-m", "scorekit.cli", "--", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def accelerate_launch(home, *args, flags=("--multi_gpu", "--num_processes", "2")):
    """``accelerate launch FLAGS -m scorekit.cli ARGS``; HF_HOME=home keeps any ``accelerate config``
    default file out of it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCOREKIT_TEST_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "HF_HOME": str(home)}
    env.pop("MASTER_ADDR", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", *flags,
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", "0", "-m", "scorekit.cli", *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def sample_args(run_dir, *extra):
    return ["sample", "--checkpoint", str(run_dir / "run"), "--steps", "15", "--no-progress", *extra]


def close(a, b):
    """Equal up to float32 rounding: the network's matrix products round differently for other batch
    sizes (the sampler adds nothing batch-dependent: tests/test_seeds.py checks that bit for bit)."""
    return a.shape == b.shape and (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_seeds_give_the_same_samples_for_any_batch_size_and_process_count(run_dir):
    outs = {}
    for name, batch in (("b2", "2"), ("b3", "3"), ("b7", "7")):
        out = run_dir / f"{name}.png"
        assert main(sample_args(run_dir, "--seeds", "0-4,9,20", "--batch_size", batch, "--out", str(out))) == 0
        outs[name] = load_file(out.with_suffix(".safetensors"))["samples"]
    out = run_dir / "two.png"
    printed = torchrun(*sample_args(run_dir, "--seeds", "0-4,9,20", "--batch_size", "2", "--out", str(out)))
    assert "7 samples" in printed and "2 process(es)" in printed
    two = load_file(out.with_suffix(".safetensors"))["samples"]
    assert two.shape == (7, 1, 8, 8)
    # two processes compute the one-process batches: bit for bit the same samples
    assert torch.equal(outs["b2"], two)
    assert close(outs["b2"], outs["b3"]) and close(outs["b2"], outs["b7"])
    # a subset of the seeds gives the same samples for those seeds (other batches: up to rounding)
    sub = run_dir / "sub.png"
    assert main(sample_args(run_dir, "--seeds", "9,20", "--out", str(sub))) == 0
    assert close(load_file(sub.with_suffix(".safetensors"))["samples"], two[5:])
    assert not list(run_dir.glob(".*.shards"))  # rank 0 removed the shards


@pytest.mark.parametrize("plugin", [("svdd", "--alpha", "1", "--candidates", "3"), ("self_minority", "--scale", "1")],
                         ids=["svdd-alpha1", "self_minority"])
def test_plugins_draw_from_the_samples_own_streams_under_seeds(run_dir, tmp_path, plugin):
    """SVDD's selection draws (alpha > 0) and self-guidance's re-noising come from each sample's stream, so the
    samples of --seeds do not depend on the batch size with a plug-in either."""
    reward = tmp_path / "reward.py"
    reward.write_text("def brightness(x):\n    return x.flatten(1).mean(1)\n")  # continuous: no ties to break
    args = ("--guidance", *plugin, "--reward", f"{reward}:brightness") if plugin[0] == "svdd" else ("--guidance", *plugin)
    outs = []
    for batch in ("2", "3", "6"):
        out = tmp_path / f"b{batch}.png"
        assert main(sample_args(run_dir, "--seeds", "0-5", "--batch_size", batch, *args, "--out", str(out))) == 0
        outs.append(load_file(out.with_suffix(".safetensors"))["samples"])
    assert close(outs[0], outs[1]) and close(outs[0], outs[2])
    plain = tmp_path / "plain.png"
    assert main(sample_args(run_dir, "--seeds", "0-5", "--batch_size", "2", "--out", str(plain))) == 0
    assert not close(load_file(plain.with_suffix(".safetensors"))["samples"], outs[0])  # the plug-in acted


def test_outdir_holds_one_png_per_seed_and_an_npz_for_fid_tools(run_dir):
    outdir = run_dir / "fid"
    torchrun(*sample_args(run_dir, "--seeds", "3-7", "--batch_size", "2", "--outdir", str(outdir)))
    assert sorted(p.name for p in outdir.iterdir()) == [f"00000{i}.png" for i in range(3, 8)] + ["samples.npz"]
    arr = np.load(outdir / "samples.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 8, 8, 1)  # (N, H, W, C), as pytorch-fid/clean-fid read
    for i, seed in enumerate(range(3, 8)):
        png = np.asarray(Image.open(outdir / f"{seed:06d}.png"))
        assert np.array_equal(png, arr[i, ..., 0])
    # the same numbers as the tensor file, quantised as the PNGs are
    ref = run_dir / "ref.png"
    assert main(sample_args(run_dir, "--seeds", "3-7", "--batch_size", "2", "--out", str(ref))) == 0
    x = load_file(ref.with_suffix(".safetensors"))["samples"]
    expected = ((x.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(arr, expected)


def test_accelerate_launch_multi_gpu_runs_two_cpu_processes_with_the_one_process_samples(run_dir):
    """The accelerate command that splits on CPU: --multi_gpu hands the processes to torchrun."""
    args = sample_args(run_dir, "--seeds", "0-4,9,20", "--batch_size", "2", "--device", "cpu")
    one, two = run_dir / "acc1.png", run_dir / "acc2.png"
    assert main([*args, "--out", str(one)]) == 0
    printed, _ = accelerate_launch(run_dir / "hf", *args, "--out", str(two))
    assert "7 samples" in printed and "2 process(es)" in printed
    assert torch.equal(load_file(one.with_suffix(".safetensors"))["samples"],
                       load_file(two.with_suffix(".safetensors"))["samples"])


def test_accelerate_launch_cpu_runs_one_process_and_says_so(run_dir):
    """``--cpu --num_processes 2`` goes to accelerate's simple launcher: one process (mpirun would start
    the others). scorekit still samples every seed, and warns with the command that splits."""
    out = run_dir / "acc_cpu.png"
    printed, err = accelerate_launch(run_dir / "hf", *sample_args(run_dir, "--seeds", "0-2", "--out", str(out)),
                                     flags=("--cpu", "--num_processes", "2"))
    assert "3 samples" in printed and "1 process(es)" in printed
    assert "accelerate launch started this process alone" in err
    assert "accelerate launch --multi_gpu --num_processes N" in err


@pytest.fixture
def launch_env(monkeypatch):
    """An environment without any launcher's process-count variables (torchrun's, accelerate's, MPI's)."""
    for k in ("WORLD_SIZE", "MASTER_ADDR", "ACCELERATE_USE_CPU", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.parametrize("env, message", [
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}, "started this process alone"),
    ({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1"}, "started this process alone"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}, "not from MPI"),
    ({"PMI_SIZE": "4"}, "not from MPI (PMI_SIZE=4)"),
])
def test_a_launch_that_did_not_split_is_named(monkeypatch, launch_env, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.warns(UserWarning, match=re.escape(message)):
        assert init_processes("cpu").world == 1


def test_a_training_run_launched_alone_says_so(monkeypatch, launch_env):
    """``accelerate launch --cpu --num_processes 2 -m scorekit.cli train`` runs one process: the training loop
    warns with the command that splits; a plain single process stays quiet."""
    from scorekit.training import TrainConfig, Trainer

    make = lambda: Trainer(torch.nn.Linear(1, 1), lambda m, b, g: m(b).mean(), torch.ones(4, 1),  # noqa: E731
                           TrainConfig(steps=1, batch_size=2, progress=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.warns(UserWarning, match=r"started this process alone: .* which does the whole training run alone"):
        make()


@pytest.mark.parametrize("env", [
    {"ACCELERATE_USE_CPU": "True"},  # accelerate launch --cpu with one process: no MASTER_ADDR
    {"MASTER_ADDR": "127.0.0.1"},  # not accelerate's launcher
    {"WORLD_SIZE": "1", "RANK": "0", "ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"},  # torchrun, 1 process
    {"PMI_SIZE": "1"},
])
def test_a_single_process_launch_is_quiet(monkeypatch, launch_env, recwarn, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert init_processes("cpu").world == 1
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_several_processes_need_seeds(run_dir, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; the check comes before joining the group
    assert main(sample_args(run_dir, "--n", "4")) == 2
    assert "sampling in 2 processes needs per-sample seeds: pass --seeds" in capsys.readouterr().err


@pytest.mark.parametrize("spec, message", [("5-2", "runs backwards"), ("0-3,2", "names a seed twice"),
                                           ("a-b", "seeds >= 0 and ranges")])
def test_bad_seeds_are_explained(run_dir, capsys, spec, message):
    assert main(sample_args(run_dir, "--seeds", spec)) == 2
    assert message in capsys.readouterr().err


def test_likelihood_gathers_the_same_numbers_from_two_processes(run_dir, capsys):
    args = ["likelihood", "--checkpoint", str(run_dir / "run"), "--n", "6", "--batch_size", "2", "--rtol", "1e-3",
            "--atol", "1e-3"]
    assert main(args) == 0
    one = capsys.readouterr().out
    two = torchrun(*args)
    pattern = r"6 digits \(test\) points: log p = (\S+) ± (\S+) nats, (\S+) bits/dim.*?(\d+) ODE evaluations"
    assert re.search(pattern, one).groups() == re.search(pattern, two).groups()
    assert "2 process(es)" in two
