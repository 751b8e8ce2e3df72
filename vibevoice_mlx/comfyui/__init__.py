"""ComfyUI nodes for VibeVoice on MLX, under the node ids of the VibeVoice ComfyUI packs.

ComfyUI loads them through the folder `vibevoice-mlx comfyui install <ComfyUI>` writes into `custom_nodes/`,
which re-exports these mappings. Importing this needs neither ComfyUI nor torch; inside ComfyUI it registers
`models/vibevoice/` as a model folder and, on Linux, loads the system's fast BLAS before anything imports MLX.
"""

from .models import load_fast_blas, register_model_folder
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

register_model_folder()
load_fast_blas()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
