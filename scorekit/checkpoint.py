"""Safe, atomic persistence: safetensors for tensors, JSON for everything else, nothing unpickled.

Every writer goes through :func:`atomic_path` (write to a temporary name in the same directory, then
``os.replace``), so a crash mid-write never leaves a truncated file under the final name. The data and
the directory entry are fsynced before and after the rename, so that a published file survives a power
loss or a node failure; :func:`remove_stale_temporaries` clears what a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor

__all__ = [
    "atomic_path",
    "atomic_dir",
    "save_json",
    "load_json",
    "save_tensors",
    "load_tensors",
    "optimizer_to_tensors",
    "optimizer_from_tensors",
    "fsync_tree",
    "remove_stale_temporaries",
    "meta_field",
]

META_KEY = "scorekit"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str | os.PathLike) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    is_dir = os.path.isdir(path)
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the files themselves were flushed
        if not is_dir:
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under ``path`` (a file or a directory), then the directories, deepest first."""
    path = Path(path)
    if not path.is_dir():
        _fsync(path)
        return
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (``.NAME.<random>.tmp``); on success it is fsynced and
    renamed onto ``path`` atomically, and the directory is fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates the file private (0600); give it the permissions a plain open() would
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path`` (``.NAME.<random>.tmp``); on success its files and
    itself are fsynced and it replaces ``path`` by a rename, and the parent directory is fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def remove_stale_temporaries(directory: str | os.PathLike, min_age: float = 0.0, keep: Path | None = None) -> list[Path]:
    """Delete the temporaries (``.NAME.<random>.tmp`` files and directories) that killed writers left in
    ``directory``, those at least ``min_age`` seconds old, but ``keep``; returns what was removed.

    Call it only while no other writer uses ``directory`` (e.g. under the run lock of
    :class:`scorekit.training.TrainingLoop`), or with a ``min_age`` longer than any write takes.
    """
    directory, removed, now = Path(directory), [], time.time()
    if not directory.is_dir():
        return removed
    for entry in directory.glob(".*.tmp"):
        if entry == keep:
            continue
        try:
            if now - entry.lstat().st_mtime < min_age:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue
        removed.append(entry)
    return removed


def meta_field(meta: Any, key: str, source: str | os.PathLike, what: str = "metadata") -> Any:
    """``meta[key]``, with an error naming ``source`` and the missing key when ``meta`` is not a mapping
    or lacks it (a truncated, hand-edited or foreign file)."""
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: the {what} is a JSON {type(meta).__name__}, expected an object with {key!r}; "
                         "the file is corrupt or was not written by scorekit")
    if key not in meta:
        raise ValueError(f"{source}: the {what} has no {key!r} (it has {sorted(meta)}); the file is incomplete "
                         "or was written by another program; write it again with scorekit")
    return meta[key]


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt or not a scorekit file") from e


def save_tensors(tensors: dict[str, Tensor], path: str | os.PathLike, meta: dict | None = None) -> None:
    """Save a flat ``name -> tensor`` dict as safetensors, with ``meta`` (JSON) in the header, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {META_KEY: json.dumps(meta if meta is not None else {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict]:
    """Load a file written by :func:`save_tensors`: ``(tensors, meta)``.

    Raises a ``ValueError`` that names the file when it is not safetensors (corrupt, pickled, foreign)
    or carries no scorekit metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}); expected a checkpoint written by scorekit "
            "(pickled .pt/.ckpt files are refused on purpose)"
        ) from e
    if META_KEY not in header:
        raise ValueError(
            f"{path} is a safetensors file but not a scorekit checkpoint (no '{META_KEY}' metadata); "
            "for diffusers weights use scorekit.from_diffusers"
        )
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the '{META_KEY}' metadata in the header is not valid JSON ({e}); "
                         "the file is corrupt or was not written by scorekit") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the '{META_KEY}' metadata in the header is a JSON {type(meta).__name__}, "
                         "expected an object; the file is corrupt or was not written by scorekit")
    return tensors, meta


def optimizer_to_tensors(state: dict) -> tuple[dict[str, Tensor], dict]:
    """Split a torch optimizer ``state_dict`` into tensors (safetensors) and a JSON-able remainder."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, Tensor], rest: dict) -> dict:
    """Inverse of :func:`optimizer_to_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in rest.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}
