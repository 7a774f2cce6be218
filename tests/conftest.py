"""Test-wide settings.

pytest runs with `-n 2` (two worker processes on CI's two cores): each worker gets one intra-op
thread, otherwise torch's thread pools oversubscribe the cores and tiny-model tests slow down
by an order of magnitude while their threads spin-wait on each other.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("POLARS_MAX_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
