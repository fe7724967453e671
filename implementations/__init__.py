"""Every built-in LM-head/loss implementation, one module per family.

The harness takes them from ``builtin_implementations()``; third-party ones plug in by name as
``package.module:attr`` (see ``harness.registry``) without being listed here.
"""

import torch

from harness.adapter import Implementation
from implementations.cce import CutCrossEntropy
from implementations.chunked import Chunked
from implementations.distributed import ChunkedVocabParallel, DTensorLossParallel, MegatronVocabParallel
from implementations.hf_heads import hf_implementations
from implementations.liger import Liger
from implementations.olmo_core import OlmoCoreFusedHead, OlmoCoreHead, OlmoCoreNormalizedHead
from implementations.torch_linear_ce import TorchLinearCrossEntropy
from implementations.torch_native import TorchCompile, TorchEager


def builtin_implementations() -> tuple[Implementation, ...]:
    """Fresh instances, in the order tables and plots list them (torch-eager, the baseline, first)."""
    return (
        TorchEager(),
        TorchCompile(),
        TorchLinearCrossEntropy(),
        Chunked(),
        Liger(),
        Liger("liger-fp32-accum", accum_dtype=torch.float32),
        CutCrossEntropy("cce"),
        CutCrossEntropy("cce-exact", exact=True),
        DTensorLossParallel(),
        ChunkedVocabParallel(),
        MegatronVocabParallel(),
        OlmoCoreHead(),
        OlmoCoreFusedHead(),
        OlmoCoreNormalizedHead(),
        *hf_implementations(),
    )
