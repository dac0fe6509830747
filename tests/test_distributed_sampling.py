"""``scorekit sample --seeds`` and ``scorekit likelihood`` in one and in two processes (torchrun, gloo on CPU)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from scorekit.cli import main

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
