"""How the process was launched: the warning for a launcher that asked for several processes but started one.

``scorekit sample`` / ``likelihood`` split their work over torchrun's ``RANK`` / ``WORLD_SIZE``, and the
training loop over accelerate's process group; both say so when a launch that meant to split did not.
"""

from __future__ import annotations

import os

__all__ = ["warn_if_launch_was_not_split"]

_SPLIT_COMMAND = ("`accelerate launch --multi_gpu --num_processes N -m scorekit.cli ...` (it runs torchrun; on CPU "
                  "too, with --device cpu where CUDA is visible) or `torchrun --nproc_per_node N -m scorekit.cli -- ...`")
_MPI_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # accelerate's list for multi-CPU


def warn_if_launch_was_not_split(work: str) -> None:
    """Warn when this process runs alone (no ``WORLD_SIZE``) although its launcher asked for several.
    ``accelerate launch`` without ``--multi_gpu`` (``--cpu``, a multi-CPU config, ``--num_processes N`` on
    fewer than two GPUs) uses its simple launcher: ONE process, marked by ``ACCELERATE_USE_CPU``, with
    ``MASTER_ADDR`` set only for ``--num_processes > 1`` or ``--num_machines > 1`` (the processes are left to
    mpirun and a hostfile). mpirun's processes carry MPI's sizes, which scorekit's samplers do not read.
    ``work`` names what each lone process then does in full (``"every seed"``, ``"the whole training run"``)."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return
    import warnings

    mpi = next((f"{k}={env[k]}" for k in _MPI_SIZES if env.get(k, "").isdigit() and int(env[k]) > 1), None)
    if mpi is not None:
        message = (f"scorekit takes its process group from torchrun's RANK/WORLD_SIZE, not from MPI ({mpi}): each "
                   f"of these processes works alone on {work}. Launch with {_SPLIT_COMMAND}.")
    elif "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env:
        message = ("accelerate launch started this process alone: without --multi_gpu (or a hostfile for mpirun), "
                   f"`--cpu --num_processes N` and multi-CPU configs run a single process, which does {work} alone. "
                   f"For N processes use {_SPLIT_COMMAND}.")
    else:
        return
    warnings.warn(message, stacklevel=3)
