"""Release cached memory of every backend in this process: Python objects, MLX, torch MPS and CUDA.

Neither MLX nor torch gives freed buffers back to the system on their own (both keep allocator caches), which is
what makes a second model load or a long session swap on a 16 GB Mac.
"""

import gc
import logging
import sys
from typing import List

logger = logging.getLogger(__name__)


def free_memory() -> List[str]:
    """Collect garbage and empty the MLX, torch MPS and torch CUDA caches; returns what was cleared.

    torch is only touched if this process already imported it (if not, it holds no caches), so calling this
    never pulls torch in.
    """
    cleared = []
    gc.collect()
    cleared.append("gc")
    try:
        import mlx.core as mx
    except ImportError:
        mx = None
    if mx is not None:
        clear = getattr(mx, "clear_cache", None) or getattr(mx.metal, "clear_cache", None)
        if clear is not None:
            clear()
            cleared.append("mlx")
    torch = sys.modules.get("torch")
    if torch is not None:
        if torch.backends.mps.is_available():
            torch.mps.empty_cache()
            cleared.append("mps")
            logger.info("[VibeVoice] MPS cache cleared")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            cleared.append("cuda")
            logger.info("[VibeVoice] CUDA cache cleared")
    return cleared
