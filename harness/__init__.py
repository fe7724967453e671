"""lmhead-bench: one contract, one float64 reference, and tools to check and benchmark LM heads.

The public API (``harness.api``): ``check`` runs the correctness gate on an implementation and
returns a ``CheckReport``; ``reference`` is the float64 reference loss and gradients; ``cases``
is the Hypothesis strategy of the cases the gate draws and ``make_inputs`` their tensors. An
implementation is a plain loss function or an ``Implementation`` (with its ``Capabilities``),
given ``LossSpec`` options, refusing what it cannot run with ``UnsupportedCase``. The pytest
plugin (``harness.pytest_plugin``) makes the gate test items; ``docs/kernel-authors.md`` shows all three.

Importing the harness on a machine without a CUDA GPU turns on Triton's interpreter
(``TRITON_INTERPRET=1``) so that Triton implementations such as Liger-Kernel run on the CPU.
Triton reads the variable once, when it is first imported (``torch.compile`` imports it too),
so this has to happen here, before any implementation module is loaded.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ``harness.check`` is both the gate's subpackage and the API's function. Python binds a subpackage
# to its parent's attribute when it is first imported: importing it here, before the function is
# bound, keeps ``harness.check`` the function. (Import the subpackage's modules by their full
# name, ``from harness.check.engine import ...``, as everywhere in the harness.)
import harness.check  # noqa: E402, F401 - the package alone: a docstring
from harness.adapter import Capabilities, Implementation  # noqa: E402
from harness.api import CheckReport, PropertyReport, cases, check, make_inputs, reference  # noqa: E402
from harness.case import Case  # noqa: E402
from harness.errors import HarnessError, UnsupportedCase  # noqa: E402
from harness.spec import LossOutput, LossSpec  # noqa: E402

__all__ = [
    "check",
    "reference",
    "cases",
    "make_inputs",
    "Case",
    "CheckReport",
    "PropertyReport",
    "Implementation",
    "Capabilities",
    "LossSpec",
    "LossOutput",
    "UnsupportedCase",
    "HarnessError",
]
