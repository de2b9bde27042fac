"""fxquant.zeroshot: LRQ-style zero-shot quantization — QAT with no real data, on images a generator
synthesises from the float model.

Example usage::

    qmodel = fxquant.prepare_qat(fp_model, "lrq_w4a4")
    result = fxquant.zeroshot.train(qmodel)
"""

from .generator import Generator, LongRangeAttention, dilated_depthwise
from .loop import ZeroShotResult, save_grid, train
from .objectives import BNStatistics, ama_logits, classifier

__all__ = [
    "BNStatistics",
    "Generator",
    "LongRangeAttention",
    "ZeroShotResult",
    "ama_logits",
    "classifier",
    "dilated_depthwise",
    "save_grid",
    "train",
]
