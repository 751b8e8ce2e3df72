"""Our kept-loaded pipeline as one of ComfyUI's loaded models, so that ComfyUI can release it.

ComfyUI's "Unload Models" (`POST /free`) and its room-making before loading a model of its own go through
`comfy.model_management`: `unload_all_models()` is `free_memory(1e30, get_torch_device())`, which detaches every
entry of `current_loaded_models` on that device. Entries get there through `load_models_gpu([patcher])`, the call
every node pack's models take; `VibeVoiceModel` is the small part of ComfyUI's `ModelPatcher` interface those
functions use (the MLX weights are no torch module it could move, so loading and offloading are no-ops and detaching
releases the pipeline). This file is the one place that speaks that interface.
"""

import logging
from typing import Callable, Optional

from .runtime import comfy_module

logger = logging.getLogger(__name__)


class VibeVoiceModel:
    """What ComfyUI's `LoadedModel` calls on a model patcher, for the pipeline `release` drops. `model` is the
    patcher itself: ComfyUI watches it with a finalizer, so that dropping this object removes ComfyUI's entry."""

    parent = None

    def __init__(self, release: Callable[[], bool], size: int, device):
        self.release = release
        self.size = int(size)
        self.load_device = self.offload_device = device
        self.loaded = True

    @property
    def model(self):
        return self

    def model_size(self) -> int:
        return self.size

    def loaded_size(self) -> int:
        return self.size if self.loaded else 0

    def current_loaded_device(self):
        return self.load_device

    def model_dtype(self):
        return None

    def model_patches_to(self, device_or_dtype) -> None:
        pass

    def model_patches_models(self):
        return []

    def partially_load(self, device, extra_memory=0, force_patch_weights=False) -> int:
        return 0

    def partially_unload(self, device, memory_to_free=0) -> int:
        return 0  # all or nothing: ComfyUI then detaches the whole model

    def lowvram_patch_counter(self) -> int:
        return 0

    def is_clone(self, other) -> bool:
        return other is self

    def detach(self, unpatch_all=True) -> None:
        """ComfyUI unloads us: release the pipeline (this object stays until our cache lets it go)."""
        if self.loaded:
            self.loaded = False
            logger.info("ComfyUI unloads the VibeVoice model")
            self.release()


def register(size: int, release: Callable[[], bool]) -> Optional[VibeVoiceModel]:
    """Inside ComfyUI, make a just-loaded pipeline of `size` bytes one of ComfyUI's loaded models (which may unload
    others to make room); `release` drops it. Returns the entry to keep while the pipeline is loaded; None outside
    ComfyUI."""
    mm = comfy_module("comfy.model_management")
    if mm is None or not hasattr(mm, "load_models_gpu"):
        return None
    entry = VibeVoiceModel(release, size, mm.get_torch_device())
    mm.load_models_gpu([entry])
    return entry
