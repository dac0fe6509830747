"""Image files <-> float tensors ``(C, H, W)`` in [0, 1] intensity units.

Reads PNG (8- or 16-bit), TIFF and ``.npy``; uint8 and uint16 images are scaled to [0, 1] by their bit depth
(other integer types are refused: their range is unknown), float images are taken as [0, 1] intensities. Writes by the output's extension: ``.png`` 8-bit (or
16-bit), ``.tif``/``.tiff`` and ``.npy`` float32 (unclipped). Pillow and tifffile are imported only
for the formats that need them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_path

__all__ = ["IMAGE_SUFFIXES", "read_image", "write_image", "image_pairs"]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".npy")


def _unsupported(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: unsupported {what} format {path.suffix.lower()!r}; use one of {list(IMAGE_SUFFIXES)}")


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as float32 ``(C, H, W)``: uint8/uint16 data divided by 255/65535, floats as is; unreadable
    files and integer types of unknown range are ``ValueError``s naming the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise _unsupported(path, "image")
    try:
        arr = _read_array(path, suffix)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (OSError, ValueError, EOFError, SyntaxError) as e:  # truncated or foreign files (PIL: OSError)
        raise ValueError(f"{path}: cannot read it as a {suffix} image ({type(e).__name__}: {e})") from e
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):  # drop alpha
        arr = arr[..., :-1]
    if arr.ndim == 3 and arr.shape[-1] in (1, 3):
        arr = arr.transpose(2, 0, 1)
    elif arr.ndim == 2:
        arr = arr[None]
    else:
        raise ValueError(f"{path}: expected a grayscale or RGB image, got an array of shape {arr.shape}")
    if arr.dtype in (np.uint8, np.uint16):  # by the bit depth: 255, 65535
        arr = arr.astype(np.float32) / np.iinfo(arr.dtype).max
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: integer pixels of type {arr.dtype} have no known bit depth; save 8-bit images as "
                         "uint8 (0..255), 16-bit ones as uint16 (0..65535), or float intensities in [0, 1]")
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    else:
        raise ValueError(f"{path}: unsupported pixel type {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _read_array(path: Path, suffix: str) -> np.ndarray:
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if not isinstance(arr, np.ndarray):  # an .npz archive under an .npy name
            raise ValueError("an .npz archive, not one .npy array")
        return arr
    if suffix in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path)
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("P", "PA"):  # palette indices: the colours they stand for
            im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
        arr = np.array(im)
        if im.mode.startswith("I"):  # 16-bit PNG; older Pillow reads it as int32 ("I")
            arr = arr.astype(np.uint16)
    return arr


def write_image(path: str | Path, image: torch.Tensor, bits: int = 8) -> None:
    """Write ``(C, H, W)`` atomically by extension: PNG clipped to [0, 1] and quantised to ``bits`` (8 or 16),
    TIFF/npy as float32."""
    path = Path(path)
    if bits not in (8, 16):
        raise ValueError(f"PNG bit depth must be 8 or 16, got {bits!r}")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise _unsupported(path, "output")
    arr = image.detach().cpu().float().numpy()
    arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    with atomic_path(path) as tmp:
        if suffix == ".png":
            from PIL import Image

            q = np.round(np.clip(arr, 0, 1) * (2**bits - 1)).astype(np.uint8 if bits == 8 else np.uint16)
            Image.fromarray(q).save(tmp, format="PNG")
        elif suffix in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(tmp, arr.astype(np.float32))
        else:
            with open(tmp, "wb") as f:
                np.save(f, arr.astype(np.float32))


def image_pairs(src: str | Path, dst: str | Path) -> list[tuple[Path, Path]]:
    """(input, output) files: one pair for a file, one per image for a folder (same names in ``dst``)."""
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {src}")
        if dst.suffix.lower() in IMAGE_SUFFIXES:
            raise ValueError(f"input {src} is a folder, so the output must be a folder too, got {dst}")
        return [(f, dst / f.name) for f in files]
    if not src.is_file():
        raise FileNotFoundError(f"no such input image or folder: {src}")
    return [(src, dst)]
