"""Faults of the training home (issue 15): non-finite gradients, an out_dir holding an older run, an unusable
out_dir, two runs into one folder, stale temporaries, durability, preemption (SIGTERM), a resume with changed
data or config, malformed files, and kill-and-resume of `scorekit train` and `scorekit distill`."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from scorekit import VPSDE, ScoreModel
from scorekit.checkpoint import load_tensors, save_json, save_tensors
from scorekit.data import imbalanced_mixture
from scorekit.losses import dsm_loss, make_dsm_loss
from scorekit.nets import MLP
from scorekit.training import (
    RunDirError,
    RunLock,
    TrainConfig,
    Trainer,
    TrainingLoop,
    last_finite_checkpoint,
    latest_checkpoint,
    load_weights,
)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def make_trainer(out_dir, steps=20, n=256, loss_fn=None, **cfg):
    sde = VPSDE()
    torch.manual_seed(0)
    model = ScoreModel(MLP(2, hidden=16, depth=1), sde)
    x = imbalanced_mixture().sample(n, torch.Generator().manual_seed(0))
    settings = {"steps": steps, "batch_size": 16, "lr": 1e-3, "checkpoint_every": 5, "progress": False, **cfg}
    return Trainer(model, loss_fn or make_dsm_loss(sde), x, TrainConfig(**settings), out_dir=out_dir)


def same_tensors(a: Path, b: Path) -> None:
    """Every safetensors file of two directories holds the same tensors, to the bit."""
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors")) and names
    for name in names:
        ta, tb = load_tensors(a / name)[0], load_tensors(b / name)[0]
        assert ta.keys() == tb.keys(), name
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)


# -- item 1: non-finite gradients ---------------------------------------------------------------------
def nan_gradient_at(call: int):
    """A DSM loss whose ``call``-th evaluation stays finite but has NaN gradients (the fp16-overflow pattern)."""
    sde, calls = VPSDE(), {"n": 0}

    def loss_fn(model, batch, g):
        calls["n"] += 1
        loss = dsm_loss(model, sde, batch, generator=g)
        if calls["n"] == call:
            w = next(model.parameters())
            loss = loss + torch.sqrt((w * 0).sum())  # value 0, gradient 0 * inf = nan
        return loss

    return loss_fn


def test_nan_gradients_with_a_finite_loss_are_not_applied_nor_checkpointed(tmp_path):
    trainer = make_trainer(tmp_path, loss_fn=nan_gradient_at(13))
    with pytest.raises(FloatingPointError, match=r"the gradient norm of optimizer is nan \(with a finite loss of "
                       r"[0-9.]+\) at step 13: training stopped without applying it; the last good checkpoint is "
                       r".*step-00000010"):
        trainer.train()
    assert latest_checkpoint(tmp_path).name == "step-00000010"  # step 15's checkpoint was not written
    assert last_finite_checkpoint(tmp_path) == latest_checkpoint(tmp_path)
    assert all(torch.isfinite(p).all() for p in trainer.unwrapped.parameters())
    assert all(torch.isfinite(p).all() for p in trainer.ema.parameters())


def test_the_error_names_the_last_checkpoint_that_is_really_finite(tmp_path):
    make_trainer(tmp_path, steps=10, keep_checkpoints=3).train()
    poisoned = tmp_path / "checkpoints" / "step-00000010" / "model.safetensors"
    tensors, meta = load_tensors(poisoned)
    save_tensors({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, poisoned, meta)  # an old bug's
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 11.*last good checkpoint is .*step-00000005"):
        make_trainer(tmp_path, steps=20, keep_checkpoints=3).train()


def test_the_guard_skips_the_update_on_the_device_and_reads_back_every_log_every_steps(tmp_path):
    seen = []
    trainer = make_trainer(None, steps=8, log_every=4, loss_fn=nan_gradient_at(6))
    trainer.callbacks.append(lambda tr: seen.append([torch.is_tensor(e) for e in tr.history]) if tr.step == 7 else None)
    assert trainer.optimizer.optimizer.defaults["fused"]  # AdamW(fused=True) takes found_inf on the CPU too
    before = {}

    def snapshot(tr):
        if tr.step == 5:
            before.update(w=[p.detach().clone() for p in tr.unwrapped.parameters()],
                          opt=[{k: v.clone() for k, v in s.items()} for s in tr.optimizer.optimizer.state.values()])
        if tr.step == 6:  # the NaN step: weights, moments and the step count untouched
            assert all(torch.equal(a, p) for a, p in zip(before["w"], tr.unwrapped.parameters()))
            for old, new in zip(before["opt"], tr.optimizer.optimizer.state.values()):
                assert all(torch.equal(old[k], new[k]) for k in old)

    trainer.callbacks.append(snapshot)
    with pytest.raises(FloatingPointError, match="gradient norm of optimizer is nan .* at step 6"):
        trainer.train()
    assert trainer.step == 8  # read back at step 8 (log_every), not at step 6: no host sync per step
    assert seen == [[False] * 4 + [True] * 3]  # numbers up to the read-back of step 4, device tensors after it


def test_a_fused_step_bumps_the_parameters_version_counters():
    """Code that caches on ``_version`` (SaRA's dense weight, autograd's checks) sees every optimizer update,
    though torch's fused AdamW kernel does not bump the counters itself."""
    versions = []
    trainer = make_trainer(None, steps=3)
    trainer.callbacks.append(lambda tr: versions.append([p._version for p in tr.unwrapped.parameters()]))
    trainer.train()
    assert all(b > a for before, after in zip(versions, versions[1:]) for a, b in zip(before, after))


class PlainSGD(TrainingLoop):
    """A loop whose optimizer has no fused step: the guard reads the flags back before each step."""

    def __init__(self):
        super().__init__(TrainConfig(steps=3, progress=False))
        self.net = self.track("net", nn.Linear(2, 1))
        self.track("sgd", torch.optim.SGD(self.net.parameters(), lr=0.1))

    def train_step(self):
        loss = self.net(torch.ones(1, 2)).sum() + (torch.sqrt((self.net.weight * 0).sum()) if self.step == 1 else 0)
        return self.optimize(loss, [self.tracked["sgd"]])


def test_an_optimizer_without_a_fused_step_is_checked_before_it_steps():
    loop = PlainSGD()
    with pytest.raises(FloatingPointError, match="gradient norm of sgd is nan .* at step 2"):
        loop.train()
    assert loop.step == 1 and torch.isfinite(loop.net.weight).all()


# -- item 2: a fresh run into a folder holding an older one --------------------------------------------
def test_a_fresh_run_refuses_an_out_dir_holding_checkpoints_unless_asked_to_overwrite(tmp_path):
    make_trainer(tmp_path, steps=20).train()
    with pytest.raises(RunDirError, match=r"already holds checkpoints \(newest step-00000020\) and training.resume "
                       r"is false.*training.overwrite: true"):
        make_trainer(tmp_path, steps=10, resume=False).train()
    assert latest_checkpoint(tmp_path).name == "step-00000020"  # nothing was touched
    fresh = make_trainer(tmp_path, steps=10, resume=False, overwrite=True)
    fresh.train()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000005", "step-00000010"]
    assert load_weights(tmp_path)[1]["step"] == 10
    from scorekit.config import RunConfig, load_config

    assert load_config({"training": {"overwrite": True}}, RunConfig).training.overwrite is True


# -- item 4: the output folder is checked before the first step ----------------------------------------
def test_an_unusable_out_dir_fails_before_the_first_step(tmp_path, monkeypatch):
    calls = []

    def loss_fn(model, batch, g):
        calls.append(1)
        return dsm_loss(model, VPSDE(), batch, generator=g)

    (tmp_path / "file").write_text("in the way")
    with pytest.raises(RunDirError, match=r"out_dir .*file cannot hold checkpoints: .* is a file, not a folder"):
        make_trainer(tmp_path / "file", loss_fn=loss_fn).train()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("in the way")
    with pytest.raises(RunDirError, match="cannot hold checkpoints"):
        make_trainer(tmp_path / "run", loss_fn=loss_fn).train()

    import scorekit.training

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro" / "checkpoints"))

    monkeypatch.setattr(scorekit.training.tempfile, "mkstemp", read_only)
    with pytest.raises(RunDirError, match=r"out_dir .*ro is not writable .*permission denied"):
        make_trainer(tmp_path / "ro", loss_fn=loss_fn).train()
    assert calls == []  # no step was taken


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_dir_fails_before_the_first_step(tmp_path):
    tmp_path.joinpath("ro").mkdir(mode=0o555)
    with pytest.raises(RunDirError, match="not writable"):
        make_trainer(tmp_path / "ro").train()


# -- item 5: the run lock and the temporaries ----------------------------------------------------------
HOLD = """
import sys, time
from scorekit.training import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("LOCKED", flush=True)
sys.stdin.readline()
"""


def test_a_second_run_into_one_out_dir_is_refused_naming_the_holder(tmp_path):
    tmp_path.joinpath("run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        with pytest.raises(RunDirError, match=rf"run is in use by another run, pid {holder.pid}: two runs"):
            make_trainer(tmp_path / "run", steps=5).train()
        assert not (tmp_path / "run" / "checkpoints" / "step-00000005").exists()
    finally:
        holder.communicate("\n", timeout=60)
    make_trainer(tmp_path / "run", steps=5).train()  # free again once the holder has ended
    with RunLock(tmp_path / "run"):  # another object of this process
        with pytest.raises(RunDirError, match=rf"pid {os.getpid()} \(this process"):
            make_trainer(tmp_path / "run", steps=10).train()
    # trainers one after the other on one folder in one process: the lock is held only inside train()
    make_trainer(tmp_path / "run", steps=10).train()
    assert not (tmp_path / "run" / RunLock.name).exists()


def test_temporaries_have_per_process_names_and_stale_ones_are_removed(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    root.mkdir(parents=True)
    stale_dir = root / ".step-00000005.k1ll3d.tmp"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half")
    stale_file = root / ".state.json.x7a2.tmp"
    stale_file.write_text("{")
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((Path(a).name, Path(b).name)), real_replace(a, b)))
    make_trainer(tmp_path, steps=5).train()
    assert not stale_dir.exists() and not stale_file.exists()
    published = [a for a, b in renamed if b == "step-00000005"]
    assert len(published) == 1 and published[0].startswith(".step-00000005.") and published[0].endswith(".tmp")
    assert published[0] != ".step-00000005.tmp"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000005"]


# -- item 6: durability and preemption -----------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced descriptors")
def test_checkpoints_are_fsynced_before_the_rename_that_publishes_them(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    make_trainer(tmp_path, steps=5).train()
    final = tmp_path / "checkpoints" / "step-00000005"
    at = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final))
    tmp = events[at][1]
    synced = {e[1] for e in events[:at] if e[0] == "fsync"}
    files = {str(final / p.name) for p in final.iterdir()}
    assert {f.replace(str(final), tmp) for f in files} <= synced and tmp in synced  # files and folder, before
    assert ("fsync", str(final.parent)) in events[at:]  # and the folder holding it, after


TRAIN_SCRIPT = """
import sys, time, torch
from scorekit import VPSDE, ScoreModel
from scorekit.losses import make_dsm_loss
from scorekit.nets import MLP
from scorekit.training import TrainConfig, Trainer

def build(out_dir, steps, callbacks=()):
    sde = VPSDE()
    torch.manual_seed(0)
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=steps, batch_size=16, lr=1e-3, checkpoint_every=1000, log_every=7, progress=False)
    return Trainer(ScoreModel(MLP(2, hidden=16, depth=1), sde), make_dsm_loss(sde), x, cfg, out_dir=out_dir,
                   callbacks=callbacks)

def report(tr):
    print("STEP", tr.step, flush=True)
    time.sleep(0.05)

if __name__ == "__main__":
    build(sys.argv[1], 400, [report]).train()
"""


def test_sigterm_saves_the_current_step_and_resume_continues_from_it(tmp_path):
    script = tmp_path / "train_run.py"
    script.write_text(textwrap.dedent(TRAIN_SCRIPT))
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    for line in child.stdout:
        if line.strip() == "STEP 3":
            child.send_signal(signal.SIGTERM)
            break
    out, err = child.communicate(timeout=120)
    assert child.returncode == 143, err[-2000:]
    ckpt = latest_checkpoint(tmp_path / "run")
    saved = int(ckpt.name.split("-")[1])
    assert 3 <= saved < 400 and f"SIGTERM received; saved {ckpt}" in err and "Traceback" not in err
    assert not (tmp_path / "run" / RunLock.name).exists()

    sys.path.insert(0, str(tmp_path))
    try:
        from train_run import build
    finally:
        sys.path.remove(str(tmp_path))
    handler = signal.getsignal(signal.SIGTERM)
    resumed = build(tmp_path / "run", saved + 5)
    assert resumed.resume() and resumed.step == saved  # the saved step is where the run continues
    resumed.train()
    assert signal.getsignal(signal.SIGTERM) is handler  # the handler lives only during train()
    straight = build(tmp_path / "straight", saved + 5)
    straight.train()
    assert resumed.history == straight.history
    same_tensors(latest_checkpoint(tmp_path / "run"), latest_checkpoint(tmp_path / "straight"))


# -- item 7: a resume with changed data or config ------------------------------------------------------
def test_resume_refuses_other_data_and_warns_about_a_changed_config(tmp_path):
    make_trainer(tmp_path, steps=10).train()
    with pytest.raises(ValueError, match=r"step-00000010 was written for other data \(n 256, shapes \[\[2\]\]\) than "
                       r"this run has \(n 128, shapes \[\[2\]\]\)"):
        make_trainer(tmp_path, steps=20, n=128).train()
    with pytest.warns(UserWarning, match=r"differs from the one it was written with: lr 0.001 -> 0.002, seed 0 -> 3"):
        make_trainer(tmp_path, steps=15, lr=2e-3, seed=3).train()
    # a longer run, other logging or checkpointing is what resuming is for: no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_trainer(tmp_path, steps=25, lr=2e-3, seed=3, log_every=5, checkpoint_every=10).train()


def test_resume_of_an_old_checkpoint_without_a_data_record_still_refuses_a_smaller_data_set(tmp_path):
    make_trainer(tmp_path, steps=5).train()
    state_file = tmp_path / "checkpoints" / "step-00000005" / "state.json"
    state = json.loads(state_file.read_text())
    del state["data"]
    save_json(state, state_file)
    with pytest.raises(ValueError, match="data order covers 256 samples but this run has 100"):
        make_trainer(tmp_path, steps=10, n=100).train()


def test_the_train_command_warns_about_a_changed_data_set_and_refuses_a_changed_size(tmp_path):
    from scorekit.config import RunConfig, build_trainer, load_config

    def run(*overrides):
        cfg = load_config("configs/gmm2d.yaml", RunConfig, [f"out_dir={tmp_path}", "training.steps=4",
                          "training.batch_size=8", "training.progress=false", "model.options.hidden=16",
                          "model.options.depth=1", "data.n=256", *overrides])
        build_trainer(cfg).train()

    run()
    with pytest.raises(ValueError, match="written for other data"):
        run("data.n=128", "training.steps=6")
    with pytest.warns(UserWarning, match=r"run_config.data.seed 0 -> 1"):
        run("data.seed=1", "training.steps=6")


# -- item 8: malformed files ---------------------------------------------------------------------------
def test_malformed_state_and_metadata_name_the_file_and_the_key(tmp_path):
    make_trainer(tmp_path, steps=5).train()
    ckpt = tmp_path / "checkpoints" / "step-00000005"
    state = json.loads((ckpt / "state.json").read_text())
    save_json([state], ckpt / "state.json")
    with pytest.raises(ValueError, match=r"step-00000005/state.json holds a JSON list, expected an object"):
        make_trainer(tmp_path, steps=10).train()
    save_json({k: v for k, v in state.items() if k != "world_size"}, ckpt / "state.json")
    with pytest.raises(ValueError, match=r"state.json: the state has no 'world_size'"):
        make_trainer(tmp_path, steps=10).train()
    save_json(state, ckpt / "state.json")

    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "bad.safetensors"), metadata={"scorekit": "{not json"})
    with pytest.raises(ValueError, match=r"bad.safetensors: the 'scorekit' metadata in the header is not valid JSON"):
        load_tensors(tmp_path / "bad.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "list.safetensors"), metadata={"scorekit": "[1, 2]"})
    with pytest.raises(ValueError, match=r"list.safetensors: the 'scorekit' metadata in the header is a JSON list"):
        load_tensors(tmp_path / "list.safetensors")


def test_loaders_name_the_file_and_the_mismatching_keys(tmp_path):
    from scorekit.config import RunConfig, build_trainer, load_config, load_score_model

    cfg = load_config("configs/gmm2d.yaml", RunConfig, [f"out_dir={tmp_path / 'run'}", "training.steps=2",
                      "training.batch_size=8", "training.progress=false", "model.options.hidden=16",
                      "model.options.depth=1", "data.n=64"])
    build_trainer(cfg).train()
    ema = latest_checkpoint(tmp_path / "run") / "ema.safetensors"
    tensors, meta = load_tensors(ema)
    save_tensors({k: v for k, v in tensors.items() if not k.endswith("bias")}, ema, meta)
    with pytest.raises(ValueError, match=r"ema.safetensors does not match the model: missing keys \[.*bias"):
        load_score_model(tmp_path / "run")

    from scorekit.noise2score import Noise2Score

    save_tensors({"w": torch.zeros(1)}, tmp_path / "n2s.safetensors", {"format": Noise2Score.FORMAT, "level": 0.1})
    with pytest.raises(ValueError, match=r"n2s.safetensors: the metadata has no 'noise'"):
        Noise2Score.load(tmp_path / "n2s.safetensors")

    from guidance.classifier import load_classifier, save_classifier
    from scorekit.nets.classifier import MLPClassifier

    path, net = tmp_path / "clf.safetensors", MLPClassifier(2, out_dim=3, hidden=8, depth=1)
    save_classifier(path, net, VPSDE())
    tensors, meta = load_tensors(path)
    save_tensors({**tensors, "extra.weight": torch.zeros(1)}, path, meta)
    with pytest.raises(ValueError, match=r"clf.safetensors does not match the model: .*unexpected keys \['extra.weight'\]"):
        load_classifier(path)
    save_tensors(tensors, path, {k: v for k, v in meta.items() if k != "architecture"})
    with pytest.raises(ValueError, match=r"clf.safetensors: the metadata has no 'architecture'"):
        load_classifier(path)


# -- kill and resume: `scorekit train` and `scorekit distill` end bit for bit as uninterrupted runs ------
KILL_SCRIPT = """
import os, signal, sys
import scorekit.training as training

KILL_AT = int(sys.argv[1])
real_save = training.save_tensors

def save_then_die(tensors, path, meta=None):  # killed while writing the checkpoint of step KILL_AT
    if ".step-%08d." % KILL_AT in str(path) and "optimizer" in os.path.basename(str(path)):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(tensors, path, meta)

training.save_tensors = save_then_die
from scorekit.cli import main
sys.exit(main(sys.argv[2:]))
"""

TEACHER = ["train", "--config", "configs/gmm2d.yaml", "training.steps=2", "training.batch_size=16",
           "model.options.hidden=16", "model.options.depth=1", "data.n=512", "training.progress=false"]


def run_killed(tmp_path, kill_at, argv):
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT))
    out = subprocess.run([sys.executable, str(script), str(kill_at), *argv], capture_output=True, text=True,
                         timeout=300, env=ENV, cwd=ROOT)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]


def assert_no_temporaries(run: Path) -> None:
    assert not [p for p in run.rglob("*.tmp")], list(run.rglob("*.tmp"))


def test_killed_train_run_resumes_bit_for_bit(tmp_path):
    from scorekit.cli import main

    argv = [*TEACHER[:3], "training.steps=6", "training.checkpoint_every=2", *TEACHER[5:]]
    assert main([*argv, "--out_dir", str(tmp_path / "straight")]) == 0
    run_killed(tmp_path, 4, [*argv, "--out_dir", str(tmp_path / "b")])
    root = tmp_path / "b" / "checkpoints"
    assert latest_checkpoint(tmp_path / "b").name == "step-00000002"
    assert [p.name for p in root.glob(".step-00000004.*.tmp")]  # what the kill left behind
    assert main([*argv, "--out_dir", str(tmp_path / "b")]) == 0
    assert_no_temporaries(tmp_path / "b")
    a, b = latest_checkpoint(tmp_path / "straight"), latest_checkpoint(tmp_path / "b")
    assert a.name == b.name == "step-00000006"
    same_tensors(a, b)
    assert json.loads((a / "state.json").read_text())["history"] == json.loads((b / "state.json").read_text())["history"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    from scorekit.cli import main

    out = tmp_path_factory.mktemp("teacher")
    assert main([*TEACHER, "--out_dir", str(out)]) == 0
    return out


def distill_argv(teacher: Path, out_dir: Path, steps: int = 4) -> list[str]:
    return ["distill", "--config", "configs/distill_digits.yaml", "--teacher", str(teacher), "--out_dir", str(out_dir),
            "data.name=mixture", "data.n=512", f"distill.training.steps={steps}", "distill.training.batch_size=8",
            "distill.critic_steps=1", "distill.training.checkpoint_every=2", "distill.training.progress=false",
            "n_samples=4"]


def test_two_distill_runs_of_one_config_are_equal(teacher_run, tmp_path):
    from scorekit.cli import main

    torch.manual_seed(123)  # whatever the global RNG holds before, the run is the config's
    assert main(distill_argv(teacher_run, tmp_path / "a", steps=1)) == 0
    assert main(distill_argv(teacher_run, tmp_path / "b", steps=1)) == 0
    same_tensors(latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b"))


def test_killed_distill_run_resumes_bit_for_bit(teacher_run, tmp_path):
    from scorekit.cli import main

    assert main(distill_argv(teacher_run, tmp_path / "straight")) == 0
    run_killed(tmp_path, 4, distill_argv(teacher_run, tmp_path / "b"))
    assert latest_checkpoint(tmp_path / "b").name == "step-00000002"
    assert main(distill_argv(teacher_run, tmp_path / "b")) == 0
    assert_no_temporaries(tmp_path / "b")
    a, b = latest_checkpoint(tmp_path / "straight"), latest_checkpoint(tmp_path / "b")
    assert a.name == b.name == "step-00000004"
    same_tensors(a, b)
    assert json.loads((a / "state.json").read_text())["history"] == json.loads((b / "state.json").read_text())["history"]
    ga, gb = load_tensors(tmp_path / "straight" / "generator.safetensors")[0], load_tensors(tmp_path / "b" / "generator.safetensors")[0]
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
