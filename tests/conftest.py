"""Test-session settings: one intra-op thread (the suite's problems are small, and on a shared 2-core
machine extra threads only contend)."""

import torch

torch.set_num_threads(1)
