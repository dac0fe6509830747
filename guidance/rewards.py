"""Reward functions for reward-guided sampling (SVDD, best-of-N, DPS) and their loader.

A reward is ``reward_fn(x0) -> (batch,)``, larger is better. :func:`load_reward` resolves a built-in name
(:data:`REWARDS`), ``"package.module:function"`` or ``"path/to/file.py:function"``; the last two import or
execute user code with the caller's rights, so only code you trust belongs there.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["RewardFn", "REWARDS", "load_reward", "checked_values", "png_compressibility", "digits_compressibility",
           "ink_mass"]

RewardFn = Callable[[Tensor], Tensor]


def _to_uint8(x: Tensor, levels: int) -> np.ndarray:
    """Images in [-1, 1] quantised to ``levels`` equally spaced grey levels, as uint8."""
    q = torch.round((x.detach().float().clamp(-1, 1) + 1) / 2 * (levels - 1))
    return (q * (255 / (levels - 1))).round().to(torch.uint8).cpu().numpy()


def png_compressibility(x: Tensor, levels: int = 256) -> Tensor:
    """Minus the PNG file size in bytes of each image (``(B, C, H, W)``, values in ``[-1, 1]``), after
    quantising it to ``levels`` grey levels.

    The counterpart for small images of the paper's compressibility reward (minus the JPEG size);
    piecewise constant, so it has no useful gradient.
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"png_compressibility takes images (B, 1 or 3, H, W), got shape {tuple(x.shape)}")
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must lie in [2, 256], got {levels}")
    from PIL import Image  # PIL is only needed here

    sizes = []
    for img in _to_uint8(x, levels):
        buf = io.BytesIO()
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(buf, format="PNG", compress_level=9)
        sizes.append(-float(buf.tell()))
    return torch.tensor(sizes, device=x.device)


def digits_compressibility(x: Tensor) -> Tensor:
    """:func:`png_compressibility` at the 17 grey levels of scikit-learn's digits (pixel values 0..16):
    finer levels would only measure the samples' sub-level noise, which no real digit has."""
    return png_compressibility(x, levels=17)


def ink_mass(x: Tensor, threshold: float = 0.0) -> Tensor:
    """The number of pixels brighter than ``threshold`` in each image (a staircase of the ink mass)."""
    return (x > threshold).flatten(1).sum(1).to(torch.get_default_dtype())


#: built-in rewards that :func:`load_reward` resolves by name
REWARDS: dict[str, RewardFn] = {"compressibility": png_compressibility, "digits_compressibility": digits_compressibility,
                                "ink": ink_mass}


def load_reward(spec: str | RewardFn) -> RewardFn:
    """Resolve a reward: a callable, a name in :data:`REWARDS`, ``"package.module:function"`` or
    ``"path/to/file.py:function"`` (what ``scorekit sample --reward`` takes).

    The last two forms import the module or execute the file with your rights: use code you trust.
    """
    if callable(spec):
        return spec
    if spec in REWARDS:
        return REWARDS[spec]
    module, sep, name = str(spec).rpartition(":")
    if not sep or not module or not name:
        raise ValueError(f"reward {spec!r} is neither a built-in ({sorted(REWARDS)}) nor of the form "
                         "'module:function' or 'file.py:function'")
    try:
        if module.endswith(".py"):
            path = Path(module)
            if not path.is_file():
                raise FileNotFoundError(f"no file {module}")
            loader = importlib.util.spec_from_file_location(path.stem, path)
            mod = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module)
    except (ImportError, FileNotFoundError) as err:
        raise ValueError(f"cannot load the reward module {module!r} of {spec!r}: {err}") from err
    except SyntaxError as err:
        raise ValueError(f"the reward module {module!r} of {spec!r} is not valid Python: {err.msg} "
                         f"({err.filename}, line {err.lineno})") from err
    except Exception as err:  # the user's module failed while it was imported
        raise ValueError(f"importing the reward module {module!r} of {spec!r} failed: "
                         f"{type(err).__name__}: {err} (`scorekit --debug ...` shows the traceback)") from err
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ValueError(f"{module!r} has no callable {name!r} (reward {spec!r})")
    return fn


class RewardTypeError(TypeError, ValueError):
    """A reward or value function returned something other than a tensor: a ``TypeError``, as Python names a wrong
    type, and a ``ValueError`` too, so that the CLI reports it as bad input (the user's function), not as a bug."""


def checked_values(values, n: int, what: str) -> Tensor:
    """``values`` as a float64 vector of ``n`` finite numbers, or a clear error."""
    if not torch.is_tensor(values):
        raise RewardTypeError(f"{what} must return a tensor of shape ({n},), got {type(values).__name__}")
    if tuple(values.shape) != (n,):
        raise ValueError(f"{what} returned shape {tuple(values.shape)} for a batch of {n} samples; "
                         f"expected one number per sample, shape ({n},)")
    values = values.to(torch.float64)
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        raise FloatingPointError(f"{what} returned {int(bad.sum())} non-finite values (NaN or inf) for a batch of "
                                 f"{n}; rewards and values must be finite numbers")
    return values
