"""The KV-cache tests may run the KIVI kernel under Triton's interpreter on this CPU.

Triton decides at import time whether it can run without a GPU, so TRITON_INTERPRET=1 is set here,
before anything imports triton (as tests/kernels/conftest.py does).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
