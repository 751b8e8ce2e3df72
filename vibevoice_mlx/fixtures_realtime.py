"""A seeded random VibeVoice-Realtime-0.5B checkpoint at the released size, with a voice preset and a tokenizer, for
benchmarks (`bench --random-weights realtime-0.5b`).

    python -m vibevoice_mlx.fixtures_realtime --out vv-realtime

Writes `<out>/model` (the original layout: the released `config.json` of realtime.md §1.1 and the 605 keys of its
`model.safetensors`, bfloat16 like the release, the unused TTS-LM embedding included), `<out>/voice.safetensors`
(a saved realtime voice of a real preset's shape: P 60, K+P 183, as en-Davis_man) and `<out>/tokenizer` (the
byte-level BPE of `fixtures.build_tokenizer` with Qwen2.5's special ids: speed does not depend on which ids come
in, only on how many). Tensors are drawn by `fixtures.random_tensor` (seeded by key, non-degenerate scales) and
streamed to disk one at a time. The key list is the MLX model's own parameters mapped back to the original layout.

Needs the `torch` extra (torch for the draws, transformers for the tokenizer).
"""

import argparse
import copy
import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

from .constants import SAMPLE_RATE
from .keys import torch_transpose

# The released config (realtime.md §1.1), as the original `save_pretrained` writes it.
_ACOUSTIC = {
    "causal": True, "channels": 1, "conv_bias": True, "conv_norm": "none", "corpus_normalize": 0.0,
    "decoder_depths": None, "decoder_n_filters": 32, "decoder_ratios": [8, 5, 5, 4, 2, 2], "disable_last_norm": True,
    "encoder_depths": "3-3-3-3-3-3-8", "encoder_n_filters": 32, "encoder_ratios": [8, 5, 5, 4, 2, 2], "fix_std": 0.5,
    "layer_scale_init_value": 1e-6, "layernorm": "RMSNorm", "layernorm_elementwise_affine": True,
    "layernorm_eps": 1e-5, "mixer_layer": "depthwise_conv", "model_type": "vibevoice_acoustic_tokenizer",
    "pad_mode": "constant", "std_dist_type": "gaussian", "vae_dim": 64, "weight_init_value": 0.01,
}
REALTIME_CONFIG = {
    "model_type": "vibevoice_streaming",
    "architectures": ["VibeVoiceStreamingForConditionalGenerationInference"],
    "tts_backbone_num_hidden_layers": 20,
    "acoustic_vae_dim": 64,
    "torch_dtype": "bfloat16",
    "acoustic_tokenizer_config": _ACOUSTIC,
    "decoder_config": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 8192,
        "rope_theta": 1000000.0, "rope_scaling": None, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "attention_dropout": 0.0, "initializer_range": 0.02, "tie_word_embeddings": False, "max_window_layers": 24,
        "use_sliding_window": False, "sliding_window": None, "use_cache": True,
    },
    "diffusion_head_config": {
        "hidden_size": 896, "head_layers": 4, "head_ffn_ratio": 3.0, "latent_size": 64, "speech_vae_dim": 64,
        "rms_norm_eps": 1e-5, "prediction_type": "v_prediction", "diffusion_type": "ddpm", "ddpm_num_steps": 1000,
        "ddpm_beta_schedule": "cosine", "ddpm_num_inference_steps": 20, "ddpm_batch_mul": 4,
        "model_type": "vibevoice_diffusion_head",
    },
}
PREPROCESSOR = {
    "processor_class": "VibeVoiceStreamingProcessor", "speech_tok_compress_ratio": 3200, "db_normalize": True,
    "audio_processor": {"feature_extractor_type": "VibeVoiceTokenizerProcessor", "sampling_rate": SAMPLE_RATE,
                        "normalize_audio": True, "target_dB_FS": -25, "eps": 1e-6},
    "language_model_pretrained_name": "Qwen/Qwen2.5-0.5B",
}
PRESET_LENGTHS = (60, 183)  # P and K+P of en-Davis_man (realtime.md §3.1)


def realtime_config() -> Dict:
    return copy.deepcopy(REALTIME_CONFIG)


def tensor_specs(config: Dict) -> List[Tuple[str, Tuple[int, ...]]]:
    """(original key, original shape) of every tensor the release stores: the MLX model's parameters (lazy, never
    allocated) with the conv transposes undone, plus the TTS-LM embedding the model does not keep."""
    from mlx.utils import tree_flatten

    from .models.realtime import UNUSED_KEYS, RealtimeConfig, RealtimeModel

    model = RealtimeModel(RealtimeConfig.from_dict(config))
    specs = []
    for key, v in tree_flatten(model.parameters()):
        perm = torch_transpose(key)
        specs.append((key, tuple(v.shape[i] for i in perm) if perm else tuple(v.shape)))
    dec = config["decoder_config"]
    specs += [(key, (dec["vocab_size"], dec["hidden_size"])) for key in UNUSED_KEYS]
    return specs


def write_voice(path: Path, config: Dict, lengths: Tuple[int, int] = PRESET_LENGTHS, seed: int = 0) -> Path:
    """A random saved realtime voice (the `presets` format) of a real preset's lengths, bfloat16 like the presets."""
    import mlx.core as mx

    from .presets import MODEL_FAMILY, PRESET_FORMAT, PRESET_FORMAT_VERSION, PresetShape

    shape = PresetShape.from_config(config)
    p, s = lengths
    meta = {"format": PRESET_FORMAT, "format_version": PRESET_FORMAT_VERSION, "model_family": MODEL_FAMILY,
            "hidden_size": shape.hidden_size, "lm_layers": shape.lm_layers, "tts_layers": shape.tts_layers,
            "kv_heads": shape.kv_heads, "head_dim": shape.head_dim, "prompt_length": p, "tts_length": s,
            "source": f"random, seed {seed}", "source_sha256": "-"}
    key = mx.random.key(seed)
    arrays = {}
    for branch, layers, seq in (("lm", shape.lm_layers, p), ("tts_lm", shape.tts_layers, s),
                                ("neg_tts_lm", shape.tts_layers, 1)):
        for part in ("keys", "values"):
            key, sub = mx.random.split(key)
            dims = (layers, shape.kv_heads, seq, shape.head_dim)
            arrays[f"{branch}.{part}"] = mx.random.normal(dims, key=sub).astype(mx.bfloat16)
    arrays["neg_tts_lm.hidden"] = mx.random.normal((shape.hidden_size,), key=key).astype(mx.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path), arrays, metadata={k: str(v) for k, v in meta.items()})
    return path


def build(out: Path, seed: int = 0, dtype: str = "bfloat16", config: Dict = None,
          max_shard_bytes: int = 4 * 1024**3) -> Dict[str, Path]:
    """Write the random realtime checkpoint, voice and tokenizer under `out`; returns {"model", "voice",
    "tokenizer"} -> path. `config` (default: the released one) lets tests build a small one the same way."""
    import torch

    from .fixtures import _write_shards, build_tokenizer, random_tensor

    config = config or realtime_config()
    out = Path(out)
    model = out / "model"
    model.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    tensors = ((k, random_tensor(k, shape, seed).to(torch_dtype).contiguous()) for k, shape in tensor_specs(config))
    _write_shards(tensors, model, max_shard_bytes, {"format": "pt"})
    (model / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (model / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    size = "tiny" if config["decoder_config"]["vocab_size"] < 151643 else "0.5b"
    return {"model": model, "voice": write_voice(out / "voice.safetensors", config, seed=seed),
            "tokenizer": build_tokenizer(out / "tokenizer", size)}


def parameter_count(specs) -> int:
    return sum(math.prod(shape) for _, shape in specs)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    for k, v in build(Path(args.out), args.seed, args.dtype).items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
