"""Every built-in LM-head/loss implementation, one module per family.

The harness takes them from ``builtin_implementations()``; third-party ones plug in by name as
``package.module:attr`` (see ``harness.registry``) without being listed here.
"""

import torch

from harness.adapter import Implementation
from implementations.cce import CutCrossEntropy
from implementations.chunked import Chunked
from implementations.fla import Fla, FlaVocabParallel
from implementations.flash_attention import FlashAttnCrossEntropy
from implementations.distributed import ChunkedVocabParallel, DTensorLossParallel, MegatronVocabParallel
from implementations.hf_heads import hf_implementations
from implementations.liger import Liger, LigerCrossEntropy, LigerCuteDSL, LigerVocabParallel
from implementations.olmo_core import OlmoCoreFusedHead, OlmoCoreHead, OlmoCoreNormalizedHead
from implementations.torch_linear_ce import TorchLinearCrossEntropy
from implementations.quack import QuackCrossEntropy, QuackLinearCrossEntropy
from implementations.torch_native import TorchCompile, TorchEager
from implementations.torchtitan import TorchtitanChunked, TorchtitanLossParallel
from implementations.transformer_engine_ce import TransformerEngineCrossEntropy
from implementations.unsloth import UnslothFusedCE


def builtin_implementations() -> tuple[Implementation, ...]:
    """Fresh instances, in the order tables and plots list them (torch-eager, the baseline, first)."""
    return (
        TorchEager(),
        TorchCompile(),
        TorchLinearCrossEntropy(),
        Chunked(),
        Liger(),
        Liger("liger-fp32-accum", accum_dtype=torch.float32),
        LigerCrossEntropy(),
        CutCrossEntropy("cce"),
        CutCrossEntropy("cce-exact", exact=True),
        Fla(),
        TorchtitanChunked(),
        DTensorLossParallel(),
        ChunkedVocabParallel(),
        MegatronVocabParallel(),
        FlaVocabParallel(),
        LigerVocabParallel(),
        TorchtitanLossParallel(),
        OlmoCoreHead(),
        OlmoCoreFusedHead(),
        OlmoCoreNormalizedHead(),
        *hf_implementations(),
        # GPU only: listed everywhere, unavailable on a CPU machine with the reason.
        LigerCuteDSL(),
        UnslothFusedCE(),
        FlashAttnCrossEntropy(),
        TransformerEngineCrossEntropy(),
        QuackCrossEntropy(),
        QuackLinearCrossEntropy(),
    )
