"""Data that ships with the installed packages, toy 2-D sets, and a Gaussian mixture with exact scores.

Nothing here downloads anything: digits come from scikit-learn, images from scikit-image.
:class:`GaussianMixture` is the test bed every sampler and guidance test checks against: under any
SDE here the diffused mixture is again a Gaussian mixture, so its score, density, component
posterior and posterior mean ``E[x_0 | x_t]`` are closed forms at every ``t``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .sde import SDE, batch_time

__all__ = [
    "load_digits",
    "load_image",
    "load_image_folder",
    "IMAGE_EXTENSIONS",
    "SKIMAGE_GRAY_IMAGES",
    "make_imbalanced",
    "toy_2d",
    "TOY_SETS",
    "GaussianMixture",
    "imbalanced_mixture",
]


# -- real data -------------------------------------------------------------------------------------
#: the splits of :func:`load_digits` (the synthetic sets have "train" and "test", independent draws)
SPLITS = ("all", "train", "test")


def load_digits(
    split: str = "all",
    *,
    test_fraction: float = 0.2,
    classes: Sequence[int] | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits as ``(images, labels)``.

    Images are float32 of shape ``(n, 1, 8, 8)`` scaled from ``[0, 16]`` to ``[-1, 1]``; labels are
    int64. ``split`` is ``"all"``, ``"train"`` or ``"test"``: a class-stratified split with
    ``test_fraction`` held out, fixed by ``seed``. ``classes`` keeps only those digits.
    """
    from sklearn.datasets import load_digits as _sk_digits

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid choices are {list(SPLITS)}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    bunch = _sk_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1) / 8.0 - 1.0
    y = torch.from_numpy(bunch.target.astype(np.int64))
    if split != "all":
        rng = np.random.default_rng(seed)
        test = np.zeros(len(y), dtype=bool)
        for c in range(10):
            idx = np.flatnonzero(bunch.target == c)
            test[rng.choice(idx, size=int(round(test_fraction * len(idx))), replace=False)] = True
        keep = torch.from_numpy(test if split == "test" else ~test)
        x, y = x[keep], y[keep]
    if classes is not None:
        bad = sorted(set(classes) - set(range(10)))
        if bad:
            raise ValueError(f"classes must be digits 0-9, got {bad}")
        keep = torch.isin(y, torch.tensor(list(classes)))
        x, y = x[keep], y[keep]
    return x, y


SKIMAGE_GRAY_IMAGES = ("camera", "moon", "coins", "page", "grass", "brick", "gravel", "text", "horse",
                       "astronaut", "coffee", "chelsea", "rocket")


def load_image(name: str, gray: bool = True) -> Tensor:
    """A scikit-image bundled sample image as float32 in ``[0, 1]``, shape ``(1, H, W)`` (``(3, H, W)`` if
    ``gray=False`` and the image has color). Color images are converted with ``rgb2gray`` when ``gray``."""
    from skimage import color, data, util

    if name not in SKIMAGE_GRAY_IMAGES or not hasattr(data, name):
        raise ValueError(f"unknown image {name!r}; bundled images are {list(SKIMAGE_GRAY_IMAGES)}")
    img = getattr(data, name)()
    if img.ndim == 3:
        img = img[..., :3]
        img = color.rgb2gray(img) if gray else util.img_as_float32(img).transpose(2, 0, 1)
    img = util.img_as_float32(img)
    return torch.from_numpy(np.ascontiguousarray(img if img.ndim == 3 else img[None]))


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_image_folder(path, *, resolution: int | None = None, captions: bool = False
                      ) -> Tensor | tuple[Tensor, list[str]]:
    """The images of a folder as float32 ``(N, 3, H, W)`` in ``[-1, 1]``, in file-name order.

    Images are converted to RGB; with ``resolution`` the shorter side is resized to it (bilinear) and the
    centre cropped to ``resolution x resolution``, as diffusers' text-to-image training scripts do, else all
    images must share one size. With ``captions``, the folder's ``metadata.jsonl`` (one JSON object per line
    with ``file_name`` and ``text``: the ``datasets`` image-folder convention those scripts read) gives the
    images and their captions, returned as ``(images, texts)``.
    """
    import json
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no image folder {folder}: expected a directory of {'/'.join(IMAGE_EXTENSIONS)} files")
    if captions:
        meta = folder / "metadata.jsonl"
        if not meta.is_file():
            raise FileNotFoundError(f"{folder} has no metadata.jsonl: captioned training needs one line "
                                    '{"file_name": "...", "text": "..."} per image')
        entries = []
        for i, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{meta}, line {i}: not JSON ({e.msg})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) \
                    or not isinstance(entry.get("text"), str):
                raise ValueError(f"{meta}, line {i}: expected an object with string 'file_name' and 'text'")
            entries.append((entry["file_name"], entry["text"]))
        missing = [name for name, _ in entries if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{meta} names files that are not in {folder}: {missing[:5]}")
        files, texts = [folder / name for name, _ in entries], [text for _, text in entries]
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        texts = []
    if not files:
        raise ValueError(f"{folder} holds no images ({'/'.join(IMAGE_EXTENSIONS)})")
    images = []
    for file in files:
        try:
            with Image.open(file) as im:
                im = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{file} is not an image PIL can read ({e})") from None
        if resolution is not None:
            scale = resolution / min(im.size)
            im = im.resize((max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))),
                           Image.BILINEAR)
            left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
        images.append(torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1)
    sizes = sorted({tuple(x.shape[1:]) for x in images})
    if len(sizes) > 1:
        raise ValueError(f"the images in {folder} have different sizes {sizes[:4]}: pass a resolution to resize "
                         "and centre-crop them")
    stacked = torch.stack(images)
    return (stacked, texts) if captions else stacked


def make_imbalanced(
    x: Tensor, y: Tensor, rare_class: int, share: float, *, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Subsample ``rare_class`` so that it makes up ``share`` of the returned set (others kept whole)."""
    if not 0 < share < 1:
        raise ValueError(f"share must lie in (0, 1), got {share}")
    rare = torch.nonzero(y == rare_class).flatten()
    if len(rare) == 0:
        raise ValueError(f"class {rare_class} does not occur in y (classes present: {sorted(set(y.tolist()))})")
    common = torch.nonzero(y != rare_class).flatten()
    n_rare = max(1, round(share * len(common) / (1 - share)))
    g = torch.Generator().manual_seed(seed)
    rare = rare[torch.randperm(len(rare), generator=g)[:n_rare]]
    keep = torch.cat([common, rare]).sort().values
    return x[keep], y[keep]


# -- toy 2-D sets ----------------------------------------------------------------------------------
def _moons(n: int, g: torch.Generator) -> Tensor:
    n1 = n // 2
    a = torch.rand(n, generator=g) * math.pi
    x = torch.stack([torch.cos(a), torch.sin(a)], 1)
    x[n1:] = torch.stack([1 - torch.cos(a[n1:]), 0.5 - torch.sin(a[n1:])], 1)
    return (x - torch.tensor([0.5, 0.25])) * 2 + 0.1 * torch.randn(n, 2, generator=g)


def _checkerboard(n: int, g: torch.Generator) -> Tensor:
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g) * 2.0
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], 1) * 2


def _swiss_roll(n: int, g: torch.Generator) -> Tensor:
    s = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    x = torch.stack([s * torch.cos(s), s * torch.sin(s)], 1) / 5
    return x + 0.1 * torch.randn(n, 2, generator=g)


def _rings(n: int, g: torch.Generator) -> Tensor:
    r = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, 2.5)
    a = torch.rand(n, generator=g) * 2 * math.pi
    return torch.stack([r * torch.cos(a), r * torch.sin(a)], 1) + 0.08 * torch.randn(n, 2, generator=g)


TOY_SETS: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "moons": _moons,
    "checkerboard": _checkerboard,
    "swiss_roll": _swiss_roll,
    "rings": _rings,
}


def toy_2d(name: str, n: int, *, seed: int = 0) -> Tensor:
    """``n`` float32 points of a toy 2-D set (see ``TOY_SETS``), reproducible from ``seed``."""
    if name not in TOY_SETS:
        raise ValueError(f"unknown toy set {name!r}; valid names are {sorted(TOY_SETS)}")
    return TOY_SETS[name](n, torch.Generator().manual_seed(seed)).float()


# -- the Gaussian-mixture test bed -----------------------------------------------------------------
class GaussianMixture:
    """``p(x) = sum_k w_k N(x; mu_k, s_k^2 I)`` with isotropic components, in ``D`` dimensions.

    Under an SDE with kernel ``x_t = alpha x_0 + sigma z`` the diffused density is
    ``p_t = sum_k w_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I)``, which gives the exact score
    (:meth:`score_fn`), component posterior (:meth:`responsibilities`) and Tweedie mean
    (:meth:`posterior_mean`) at every ``t``. Computations follow the dtype of the input (use float64
    for reference values).
    """

    def __init__(self, weights: Sequence[float] | Tensor, means: Sequence[Sequence[float]] | Tensor,
                 stds: Sequence[float] | Tensor | float):
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.ndim == 1:
            mu = mu[:, None]
        s = torch.as_tensor(stds, dtype=torch.float64).flatten()
        if s.numel() == 1:
            s = s.expand(len(w)).clone()
        if mu.ndim != 2 or not (len(w) == len(mu) == len(s)):
            raise ValueError(
                f"weights {tuple(w.shape)}, means {tuple(mu.shape)} and stds {tuple(s.shape)} disagree: "
                "expected K weights, K x D means and K (or one) stds"
            )
        if (w <= 0).any() or abs(float(w.sum()) - 1) > 1e-6:
            raise ValueError(f"weights must be positive and sum to 1, got {w.tolist()}")
        if (s <= 0).any():
            raise ValueError(f"stds must be positive, got {s.tolist()}")
        self.weights, self.means, self.stds = w, mu, s

    @property
    def K(self) -> int:
        return len(self.weights)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.K}, dim={self.dim}, weights={[round(v, 4) for v in self.weights.tolist()]})"

    # -- sampling and density at t = 0 ---------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, *, return_labels: bool = False,
               dtype: torch.dtype = torch.float32) -> Tensor | tuple[Tensor, Tensor]:
        """``n`` samples (and, with ``return_labels``, their component indices)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = (self.means[k] + self.stds[k, None] * z).to(dtype)
        return (x, k) if return_labels else x

    def _params(self, x: Tensor, t: Tensor | None, sde: SDE | None) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample component means (B, K, D), variances (B, K) and log-weights (K,) of p_t."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x has shape {tuple(x.shape)} but the mixture expects (B, {self.dim})")
        dtype = x.dtype if x.is_floating_point() else torch.float64
        mu, s2 = self.means.to(x.device, dtype), self.stds.to(x.device, dtype) ** 2
        logw = self.weights.to(x.device, dtype).log()
        if sde is None:
            return mu.expand(x.shape[0], -1, -1), s2.expand(x.shape[0], -1), logw
        alpha, sigma = sde.marginal_coeffs(batch_time(t, x, sde.T).to(dtype))
        return alpha[:, None, None] * mu, alpha[:, None] ** 2 * s2 + sigma[:, None] ** 2, logw

    def _component_logp(self, x: Tensor, t, sde) -> tuple[Tensor, Tensor, Tensor]:
        mu, var, logw = self._params(x, t, sde)
        d2 = (x[:, None, :] - mu).pow(2).sum(-1)
        logp = logw - 0.5 * self.dim * torch.log(2 * math.pi * var) - 0.5 * d2 / var
        return logp, mu, var

    def log_prob(self, x: Tensor, t: Tensor | float | None = None, sde: SDE | None = None) -> Tensor:
        """``log p_t(x)`` per sample (``t=None``: the data density ``p_0``)."""
        return torch.logsumexp(self._component_logp(x, t, sde)[0], dim=1)

    def responsibilities(self, x: Tensor, t: Tensor | float | None = None, sde: SDE | None = None) -> Tensor:
        """``p(k | x_t = x)``, shape ``(B, K)``: the exact noisy-input component classifier."""
        return torch.softmax(self._component_logp(x, t, sde)[0], dim=1)

    def score(self, x: Tensor, t: Tensor | float | None = None, sde: SDE | None = None) -> Tensor:
        """``grad_x log p_t(x) = sum_k p(k | x) (mean_k - x) / var_k``."""
        logp, mu, var = self._component_logp(x, t, sde)
        r = torch.softmax(logp, dim=1)
        return ((r / var)[..., None] * (mu - x[:, None, :])).sum(1)

    def posterior_mean(self, x: Tensor, t: Tensor | float, sde: SDE) -> Tensor:
        """``E[x_0 | x_t = x]``: per component ``mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (x - alpha mu_k)``."""
        logp, mu_t, var = self._component_logp(x, t, sde)
        r = torch.softmax(logp, dim=1)
        alpha = sde.marginal_coeffs(batch_time(t, x, sde.T).to(logp.dtype))[0]
        mu0, s2 = self.means.to(x.device, logp.dtype), self.stds.to(x.device, logp.dtype) ** 2
        gain = alpha[:, None] * s2 / var
        comp = mu0 + gain[..., None] * (x[:, None, :] - mu_t)
        return (r[..., None] * comp).sum(1)

    def score_fn(self, sde: SDE) -> Callable[[Tensor, Tensor], Tensor]:
        """The exact score of the mixture diffused by ``sde``, as a score function ``(x, t) -> Tensor``."""

        def exact_score(x: Tensor, t: Tensor) -> Tensor:
            return self.score(x, t, sde)

        exact_score.mixture, exact_score.sde = self, sde  # type: ignore[attr-defined]
        return exact_score

    def classify(self, x: Tensor) -> Tensor:
        """The most probable component of each clean sample (labels ``(B,)``)."""
        return self.responsibilities(x).argmax(1)

    def conditional(self, value: Tensor, known: Sequence[int]) -> GaussianMixture:
        """The mixture of the remaining coordinates given ``x[known] = value`` (one conditioning value).

        With isotropic components the coordinates are independent within a component, so only the
        weights change: ``w_k' ∝ w_k N(value; mu_k[known], s_k^2 I)``.
        """
        known = list(known)
        rest = [i for i in range(self.dim) if i not in known]
        if not known or not rest:
            raise ValueError(f"known must be a proper, non-empty subset of range({self.dim}), got {known}")
        value = torch.as_tensor(value, dtype=torch.float64).reshape(1, len(known))
        part = GaussianMixture(self.weights, self.means[:, known], self.stds)
        w = part.responsibilities(value)[0]
        return GaussianMixture(w / w.sum(), self.means[:, rest], self.stds)


def imbalanced_mixture() -> GaussianMixture:
    """The 2-D imbalanced test mixture: weights 0.6 / 0.35 / 0.05, std 0.4, the rare mode (index 2) on top."""
    return GaussianMixture([0.6, 0.35, 0.05], [[-2.0, -1.0], [2.0, -1.0], [0.0, 2.5]], 0.4)
