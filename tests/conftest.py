"""Test-session settings shared by every test module."""

import os

import torch

# The suite runs as two xdist workers on two cores (see the Makefile); one intra-op thread per worker
# avoids oversubscription, which slows small-tensor work by an order of magnitude.
torch.set_num_threads(int(os.environ.get("SCOREKIT_TEST_THREADS", "1")))
