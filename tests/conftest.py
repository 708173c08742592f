"""Suite-wide settings: the test shapes are tiny, so one torch thread is fastest and stays fast
when other processes share the two cores (two threads then slow small ops by orders of magnitude)."""

import torch

torch.set_num_threads(1)
