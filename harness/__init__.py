"""lmhead-bench: one contract, one float64 reference, and tools to check and benchmark LM heads.

Importing the harness on a machine without a CUDA GPU turns on Triton's interpreter
(``TRITON_INTERPRET=1``) so that Triton implementations such as Liger-Kernel run on the CPU.
Triton reads the variable once, when it is first imported (``torch.compile`` imports it too),
so this has to happen here, before any implementation module is loaded.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from harness.errors import HarnessError, UnsupportedCase  # noqa: E402
from harness.spec import LossOutput, LossSpec  # noqa: E402

__all__ = ["HarnessError", "UnsupportedCase", "LossOutput", "LossSpec"]
