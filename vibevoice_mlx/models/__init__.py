"""The model families, one file each: `vibevoice` (VibeVoice 1.5B and 7B) and `realtime` (VibeVoice-Realtime-0.5B).

`family` is the one place that tells them apart, from a folder's `config.json`; every front door (load, convert,
say, batch, serve, bench) asks it and then goes the family's way.
"""

from typing import Any, Dict

VIBEVOICE = "vibevoice"
REALTIME = "realtime"
# config.json's model_type of each family (the 1.5B/7B folders of Microsoft may have none).
MODEL_TYPES = {"vibevoice": VIBEVOICE, None: VIBEVOICE, "vibevoice_streaming": REALTIME}


def family(config: Dict[str, Any]) -> str:
    """VIBEVOICE or REALTIME for a config.json; KeyError for any other model_type or a config that is not an
    object (callers word the error)."""
    if not isinstance(config, dict):
        raise KeyError(type(config).__name__)
    return MODEL_TYPES[config.get("model_type")]
