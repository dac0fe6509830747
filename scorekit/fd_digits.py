"""FD-digits: a Fréchet distance for generated 8x8 digits, the role FID plays for CIFAR-10.

The Fréchet distance (:func:`scorekit.metrics.frechet_distance`) between the penultimate features of a
small classifier trained on scikit-learn's digits train split (:class:`DigitsNet`, 64 features). Its
weights ship with the package (``scorekit/assets/digits_features.safetensors``; settings and held-out
accuracy in ``digits_features.json``) and are rebuilt deterministically, with the recipe in
:func:`build_digits_features`, by ``python -m scorekit.fd_digits --rebuild-digits-features``.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_tensors, save_json, save_tensors
from .metrics import frechet_distance, precision_recall, vendi_score

__all__ = [
    "DIGITS_ASSET", "DIGITS_TRAINING", "DigitsNet", "build_digits_features", "digits_classifier", "digits_features",
    "digits_metrics", "fd_digits", "main",
]

DIGITS_ASSET = Path(__file__).resolve().parent / "assets" / "digits_features.safetensors"


class DigitsNet(nn.Module):
    """A small conv classifier for 8x8 digits in ``[-1, 1]``; :meth:`features` are its penultimate activations."""

    def __init__(self, width: int = 16, feature_dim: int = 64):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim}
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 4, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


DIGITS_TRAINING = {
    "seed": 0,
    "steps": 1000,
    "batch_size": 64,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "ema_decay": 0.995,
    "max_shift": 1,
}


def _random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image (B, 1, H, W) by up to ``max_shift`` pixels, filling with the background value -1."""
    B, _, H, W = x.shape
    padded = F.pad(x[:, 0], [max_shift] * 4, value=-1.0)
    a, b = torch.randint(0, 2 * max_shift + 1, (2, B, 1), generator=generator, device=generator.device).to(
        x.device
    )
    rows = (a + torch.arange(H, device=x.device))[:, :, None]
    cols = (b + torch.arange(W, device=x.device))[:, None, :]
    return padded[torch.arange(B, device=x.device)[:, None, None], rows, cols][:, None]


def _accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).double().mean())


def build_digits_features(out_path: str | Path | None = None, **overrides) -> tuple[DigitsNet, dict]:
    """Train the FD-digits feature network on ``load_digits("train")`` and return ``(net, info)``.

    Deterministic for a given seed (the initialisation is drawn under ``seed``, the scorekit
    :class:`~scorekit.training.Trainer` draws batches and shifts from it); random +-1 pixel shifts
    augment the data. ``info`` holds the architecture, the training settings and the train/test
    accuracy. With ``out_path`` the weights are written there (safetensors, ``info`` in the header)
    and ``info`` beside it as JSON; the shipped file is :data:`DIGITS_ASSET`.
    """
    from .data import load_digits
    from .training import TrainConfig, Trainer

    settings = {**DIGITS_TRAINING, **overrides}
    unknown = sorted(set(settings) - set(DIGITS_TRAINING))
    if unknown:
        raise ValueError(f"unknown training settings {unknown}; valid keys are {sorted(DIGITS_TRAINING)}")
    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("test")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        net = DigitsNet()

    def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor], generator: torch.Generator) -> Tensor:
        images, labels = batch
        return F.cross_entropy(model(_random_shift(images, settings["max_shift"], generator)), labels)

    config = TrainConfig(
        steps=settings["steps"],
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        weight_decay=settings["weight_decay"],
        ema_decay=settings["ema_decay"],
        seed=settings["seed"],
        mixed_precision="no",
        progress=False,
        grad_clip=None,
    )
    threads = torch.get_num_threads()
    # One thread: the weights then do not depend on the core count, and these tiny convolutions gain
    # nothing from intra-op parallelism (on a busy machine extra threads slow them down many-fold).
    torch.set_num_threads(1)
    try:
        trainer = Trainer(net, loss_fn, (x_train, y_train), config)
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    net = trainer.ema.cpu().eval()
    info = {
        "architecture": {"class": "DigitsNet", **net.config},
        "training": {
            **settings,
            "optimizer": "AdamW",
            "data": "load_digits('train')",
            "n_train": len(y_train),
        },
        "train_accuracy": _accuracy(net, x_train, y_train),
        "test_accuracy": _accuracy(net, x_test, y_test),
        "n_test": len(y_test),
        "torch_version": torch.__version__,
    }
    if out_path is not None:
        out_path = Path(out_path)
        save_tensors(net.state_dict(), out_path, info)
        save_json(info, out_path.with_suffix(".json"))
    return net, info


def digits_classifier(path: str | Path = DIGITS_ASSET) -> DigitsNet:
    """The shipped FD-digits network (a fresh copy in eval mode); ``net(x).argmax(1)`` labels digits.

    Its held-out accuracy on ``load_digits("test")`` is stored in ``digits_features.json``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"the digits feature weights {path} are missing; rebuild them with "
            "`python -m scorekit.fd_digits --rebuild-digits-features`"
        )
    tensors, info = load_tensors(path)
    net = DigitsNet(**{k: v for k, v in info["architecture"].items() if k != "class"})
    net.load_state_dict(tensors)
    return net.eval().requires_grad_(False)


@functools.lru_cache(maxsize=1)
def _shared_classifier() -> DigitsNet:
    return digits_classifier()


def _check_digits(x: Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x).detach()
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(
            f"{name} holds no digits (shape {tuple(x.shape)}); expected (B, 1, 8, 8) with B >= 1"
        )
    if x.ndim == 2 and x.shape[1] == 64:
        x = x.reshape(-1, 1, 8, 8)
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but digits features expect (B, 1, 8, 8) (or (B, 64))"
        )
    x = x.float()
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.5 or hi > 1.5:
        raise ValueError(
            f"{name} spans [{lo:.3g}, {hi:.3g}] but digits must be on load_digits' scale [-1, 1] "
            "(rescale [0, 16] images with x / 8 - 1)"
        )
    if x.shape[0] >= 8 and lo > -0.5:
        raise ValueError(
            f"{name} spans [{lo:.3g}, {hi:.3g}] with no dark background: it looks like [0, 1] images, "
            "but digits must be on load_digits' scale [-1, 1] (rescale with 2 x - 1)"
        )
    return x


def digits_features(x: Tensor, batch_size: int = 2048) -> Tensor:
    """Penultimate features ``(n, 64)`` (float64) of the FD-digits network for digits ``(n, 1, 8, 8)`` in ``[-1, 1]``.

    Samples slightly outside ``[-1, 1]`` (a sampler's overshoot) are clamped to the pixel range first.
    """
    x = _check_digits(x, "x").clamp(-1, 1)
    net = _shared_classifier()
    with torch.no_grad():
        feats = [net.features(x[i : i + batch_size].cpu()) for i in range(0, len(x), batch_size)]
    return torch.cat(feats).double()


def fd_digits(x: Tensor, y: Tensor) -> float:
    """FD-digits: the Fréchet distance between the digits-network features of two sets of digits."""
    return frechet_distance(digits_features(x), digits_features(y))


def digits_metrics(samples: Tensor, reference: Tensor, k: int = 3) -> dict[str, float]:
    """Quality and diversity of generated digits against reference digits, all in digits-feature space:
    ``fd_digits``, ``precision`` and ``recall`` (k-NN, ``k``), and the cosine-kernel ``vendi`` score of
    the samples (with ``vendi_reference`` for scale)."""
    fs = digits_features(samples)
    fr = digits_features(reference)
    pr = precision_recall(fr, fs, k=k)
    return {
        "fd_digits": frechet_distance(fs, fr),
        "precision": pr.precision,
        "recall": pr.recall,
        "vendi": vendi_score(fs),
        "vendi_reference": vendi_score(fr),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scorekit.fd_digits", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rebuild-digits-features",
        action="store_true",
        help=f"retrain the FD-digits network and write {DIGITS_ASSET.name} (+ .json)",
    )
    parser.add_argument("--out", type=Path, default=DIGITS_ASSET, help="where to write the weights")
    args = parser.parse_args(argv)
    if not args.rebuild_digits_features:
        parser.error("nothing to do: pass --rebuild-digits-features")
    _, info = build_digits_features(args.out)
    print(
        f"wrote {args.out}: train accuracy {info['train_accuracy']:.4f}, "
        f"held-out accuracy {info['test_accuracy']:.4f} on {info['n_test']} test digits"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
