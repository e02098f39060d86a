"""Shared by the test files."""
import os

import torch

# pytest-xdist: the workers share the cores, so each one's torch takes its share of them. More
# OpenMP threads than cores spin in barriers: steps of the tiny test models ran 10-30x slower.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
