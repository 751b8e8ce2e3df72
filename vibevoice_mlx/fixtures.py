"""Seeded random VibeVoice checkpoints in both layouts, for tests, parity and benchmarks.

    python -m vibevoice_mlx.fixtures --size tiny --out vv-tiny
    python -m vibevoice_mlx.fixtures --size 1.5b --dtype bfloat16 --layouts original --out vv-1.5b

Writes `<out>/original` (Microsoft layout: config with `decoder_config`, original key names) and
`<out>/transformers` (the 5.x layout, as `save_pretrained` writes it) with the same weights, plus `<out>/tokenizer`
(a byte-level BPE with VibeVoice's special tokens; the tiny tokenizer is also copied into the transformers folder,
as the -hf repos ship theirs). Every tensor is drawn from a generator seeded by (seed, original key), so the same
seed gives the same bytes, and tensors stream to disk one at a time: the 7B size needs no more memory than its
largest tensor. The default init of the reference gives near-silent audio (layer scales 1e-6), so every tensor is
re-drawn at a non-degenerate scale.

Needs the `torch` extra (torch, transformers): the key list comes from transformers' VibeVoice on the meta device.
"""

import argparse
import copy
import json
import math
import shutil
import zlib
from pathlib import Path
from typing import Dict, Iterable, Optional

from .checkpoint import hop_length, to_transformers_config
from .constants import DEFAULT_CFG_SCALE, DEFAULT_STEPS, SAMPLE_RATE, TOKEN_STRINGS
from .keys import transformers_to_original

# The special tokens VibeVoice uses (architecture.md §5.1), in the id order of the Qwen2.5 vocabulary.
SPECIAL_TOKENS = [TOKEN_STRINGS[r] for r in ("eos", "speech_start", "speech_end", "speech_diffusion", "pad")]

TINY_TOKENIZER = {
    "channels": 1,
    "encoder_n_filters": 4,
    "decoder_n_filters": 4,
    # Applied reversed by the encoder (2, 2, 4): the first downsampler has 4 input channels and kernel 4, the
    # last 16 input channels and kernel 8, so a converter that guesses transposes from shapes gets them wrong.
    "encoder_ratios": [4, 2, 2],
    "decoder_ratios": [4, 2, 2],
    "encoder_depths": "1-1-1-2",
    "decoder_depths": "2-1-1-1",
    "kernel_size": 7,
    "last_kernel_size": 7,
    "ffn_expansion": 4,
    "layernorm_eps": 1e-5,
}


def _tokenizer_cfg(base: Dict, vae_dim: int, semantic: bool) -> Dict:
    out = dict(base, vae_dim=vae_dim)
    out.update(fix_std=0.0, std_dist_type="none") if semantic else out.update(fix_std=0.5, std_dist_type="gaussian")
    return out


def _config(decoder: Dict, tokenizer: Dict, acoustic_dim: int, semantic_dim: int, head_layers: int,
            tie: bool, token_ids: Optional[Dict] = None) -> Dict:
    cfg = {
        "model_type": "vibevoice",
        "decoder_config": dict(decoder, model_type="qwen2", tie_word_embeddings=tie, hidden_act="silu"),
        "acoustic_tokenizer_config": _tokenizer_cfg(tokenizer, acoustic_dim, False),
        "semantic_tokenizer_config": _tokenizer_cfg(tokenizer, semantic_dim, True),
        "diffusion_head_config": {
            "hidden_size": decoder["hidden_size"],
            "latent_size": acoustic_dim,
            "head_layers": head_layers,
            "head_ffn_ratio": 3.0,
            "rms_norm_eps": 1e-5,
            "frequency_embedding_size": 256,
            "ddpm_num_steps": 1000,
            "ddpm_beta_schedule": "cosine",
            "prediction_type": "v_prediction",
        },
        "acoustic_vae_dim": acoustic_dim,
        "semantic_vae_dim": semantic_dim,
        "tie_word_embeddings": tie,
    }
    if token_ids:
        cfg["token_ids"] = token_ids
    return cfg


def tiny_config(tie: bool = True) -> Dict:
    """A normalized config small enough for a CPU test suite (hop 16, hidden 64, 2 layers)."""
    decoder = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": 272,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
    }
    ids = {"eos": 256, "speech_start": 257, "speech_end": 258, "speech_diffusion": 259}
    return _config(decoder, TINY_TOKENIZER, 8, 12, 2, tie, ids)


def real_config(size: str) -> Dict:
    """The normalized config of the released 1.5B or 7B model (architecture.md §2)."""
    tok = {
        "channels": 1, "encoder_n_filters": 32, "decoder_n_filters": 32,
        "encoder_ratios": [8, 5, 5, 4, 2, 2], "decoder_ratios": [8, 5, 5, 4, 2, 2],
        "encoder_depths": "3-3-3-3-3-3-8", "decoder_depths": "8-3-3-3-3-3-3",
        "kernel_size": 7, "last_kernel_size": 7, "ffn_expansion": 4, "layernorm_eps": 1e-5,
    }
    if size == "1.5b":
        dec = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
               "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 65536}
        tie = True
    elif size == "7b":
        dec = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
               "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768}
        tie = False
    else:
        raise ValueError(f"Unknown size {size!r}: choose tiny, 1.5b or 7b.")
    dec.update(rms_norm_eps=1e-6, rope_theta=1000000.0)
    ids = {"eos": 151643, "speech_start": 151652, "speech_end": 151653, "speech_diffusion": 151654}
    return _config(dec, tok, 64, 128, 4, tie, ids)


def original_config_json(normalized: Dict) -> Dict:
    """The config.json Microsoft ships, for a normalized config."""
    cfg = copy.deepcopy(normalized)
    cfg.pop("token_ids", None)
    for name, semantic in [("acoustic_tokenizer_config", False), ("semantic_tokenizer_config", True)]:
        t = cfg[name]
        t.update(causal=True, conv_bias=True, conv_norm="none", pad_mode="constant", layernorm="RMSNorm",
                 layernorm_elementwise_affine=True, mixer_layer="depthwise_conv", disable_last_norm=True,
                 layer_scale_init_value=1e-6, weight_init_value=0.01, corpus_normalize=0.0,
                 model_type="vibevoice_semantic_tokenizer" if semantic else "vibevoice_acoustic_tokenizer")
        t["decoder_depths"] = None
        for k in ("kernel_size", "last_kernel_size", "ffn_expansion"):
            t.pop(k)
        if semantic:
            for k in ("decoder_n_filters", "decoder_ratios", "decoder_depths"):
                t.pop(k)
    cfg["diffusion_head_config"].update(model_type="vibevoice_diffusion_head", diffusion_type="ddpm",
                                        ddpm_num_inference_steps=20, ddpm_batch_mul=4,
                                        speech_vae_dim=cfg["acoustic_vae_dim"])
    cfg["diffusion_head_config"].pop("frequency_embedding_size")
    cfg["architectures"] = ["VibeVoiceForConditionalGeneration"]
    cfg["torch_dtype"] = "bfloat16"
    return cfg


def _tensor_specs(normalized: Dict):
    """(transformers key, shape) of every persistent tensor, from the reference built on the meta device."""
    import torch
    from transformers import VibeVoiceConfig, VibeVoiceForConditionalGeneration

    config = VibeVoiceConfig(**to_transformers_config(normalized))
    with torch.device("meta"):
        model = VibeVoiceForConditionalGeneration(config)
    specs = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    if normalized["tie_word_embeddings"]:
        specs = [(k, s) for k, s in specs if k != "lm_head.weight"]
    return specs


def random_tensor(key: str, shape, seed: int):
    """One seeded, non-degenerate tensor; `key` is the original name, so both layouts get the same values."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    leaf = key.rsplit(".", 1)[-1]
    if len(shape) == 0:
        if "scaling" in key:
            return torch.tensor(0.8 + 0.4 * torch.rand((), generator=g).item())
        return torch.tensor(-0.1 + 0.2 * torch.rand((), generator=g).item())
    if leaf in ("gamma", "ffn_gamma"):
        return 0.3 + 0.4 * torch.rand(shape, generator=g)
    if len(shape) == 1 and leaf == "weight":
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if leaf == "bias":
        return 0.1 * torch.randn(shape, generator=g)
    if "embed_tokens" in key:
        return torch.randn(shape, generator=g)
    if "convtr" in key:  # [in, out, k] with stride k/2: each output sees about 2*in inputs
        fan_in = shape[0] * 2
    else:
        fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=g) / math.sqrt(fan_in)


def _write_shards(tensors: Iterable, out: Path, max_shard_bytes: int, metadata: Dict) -> None:
    from safetensors.torch import save_file

    current, size, total = {}, 0, 0
    names = []

    def flush():
        nonlocal current, size
        if current:
            name = f"shard-{len(names):05d}.safetensors"
            save_file(current, str(out / name), metadata=metadata)
            names.append((name, list(current)))
            current, size = {}, 0

    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[key] = t
        size += nbytes
        total += nbytes
    flush()
    if len(names) == 1:
        (out / names[0][0]).rename(out / "model.safetensors")
        return
    weight_map = {}
    for i, (name, keys) in enumerate(names):
        final = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        (out / name).rename(out / final)
        weight_map.update({k: final for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def build_tokenizer(out: Path, size: str = "tiny") -> Path:
    """A byte-level BPE (256 bytes, no merges) with VibeVoice's special tokens.

    The tiny vocabulary puts the specials at 256..260; for the real sizes the ids are those of Qwen2.5
    (151643, 151652..151655), padded with unused tokens, so the full-size configs can be driven end to end.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    if size != "tiny":
        vocab.update({f"<|unused_{i}|>": i for i in range(256, 151643)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    first = 256 if size == "tiny" else 151643
    specials = SPECIAL_TOKENS if size == "tiny" else [SPECIAL_TOKENS[0]]
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    if size != "tiny":
        filler = [AddedToken(f"<|reserved_{i}|>", special=True) for i in range(151644, 151652)]
        tok.add_special_tokens(filler + [AddedToken(t, special=True) for t in SPECIAL_TOKENS[1:]])
    assert tok.token_to_id("<|vision_pad|>") == first + (3 if size == "tiny" else 11)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def _transformers_files(folder: Path, normalized: Dict, dtype: str, tok_dir: Optional[Path]) -> None:
    """config.json, generation_config.json and the tokenizer of a transformers-layout folder (as the -hf repos)."""
    from transformers import VibeVoiceConfig

    cfg = VibeVoiceConfig(**to_transformers_config(normalized)).to_dict()
    cfg["architectures"] = ["VibeVoiceForConditionalGeneration"]
    cfg["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = {"guidance_scale": DEFAULT_CFG_SCALE, "num_diffusion_steps": DEFAULT_STEPS, "noise_scheduler_class":
           "DPMSolverMultistepScheduler", "noise_scheduler_config":
           {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tok_dir is not None:
        for f in sorted(Path(tok_dir).iterdir()):
            shutil.copy(f, folder / f.name)


def transformers_layout(original: Path, out: Path, tokenizer: Optional[Path] = None, dtype: str = "float32") -> Path:
    """The transformers 5.x layout of an original-layout checkpoint, without torch: the same tensors renamed by
    the key table, shard by shard, and the transformers config (float32 checkpoints: numpy reads no bfloat16).
    Equals what `build` writes for that layout byte
    for byte (parity_tests/test_fixtures.py), so tests without torch can use a committed original folder."""
    from safetensors.numpy import load_file, save_file

    from .checkpoint import normalize_config
    from .keys import ORIGINAL, original_to_transformers

    original, out = Path(original), Path(out)
    raw = json.loads((original / "config.json").read_text())
    normalized = normalize_config(raw, ORIGINAL)
    if tokenizer is not None:  # Microsoft's config names no token ids; the transformers one does
        from transformers import AutoTokenizer

        from .constants import CONTROL_ROLES
        from .processor import SpecialTokens

        tokens = SpecialTokens.from_tokenizer(AutoTokenizer.from_pretrained(str(tokenizer)))
        normalized["token_ids"] = {role: getattr(tokens, role) for role in CONTROL_ROLES}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for shard in sorted(original.glob("*.safetensors")):
        tensors = {original_to_transformers(k): v for k, v in load_file(str(shard)).items()}
        save_file(tensors, str(out / shard.name), metadata={"format": "pt"})
    index = original / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = dict(sorted((original_to_transformers(k), v) for k, v in data["weight_map"].items()))
        (out / index.name).write_text(json.dumps(data, indent=2) + "\n")
    _transformers_files(out, normalized, dtype, tokenizer)
    return out


def build(out: Path, size: str = "tiny", layouts=("original", "transformers"), seed: int = 0,
          dtype: str = "float32", max_shard_bytes: int = 2 * 1024**3, tie: Optional[bool] = None,
          tokenizer: bool = True) -> Dict[str, Path]:
    """Write a random checkpoint of `size` in each layout under `out`; returns {layout: folder}."""
    import torch

    normalized = tiny_config() if size == "tiny" else real_config(size)
    if tie is not None:
        normalized = copy.deepcopy(normalized)
        normalized["tie_word_embeddings"] = tie
        normalized["decoder_config"]["tie_word_embeddings"] = tie
    specs = _tensor_specs(normalized)
    torch_dtype = getattr(torch, dtype)
    out = Path(out)
    folders = {}
    tok_dir = build_tokenizer(out / "tokenizer", size) if tokenizer else None
    for layout in layouts:
        folder = out / layout
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)

        def tensors(layout=layout):
            for tf_key, shape in specs:
                orig = transformers_to_original(tf_key)
                key = orig if layout == "original" else tf_key
                yield key, random_tensor(orig, shape, seed).to(torch_dtype).contiguous()

        _write_shards(tensors(), folder, max_shard_bytes, {"format": "pt"})
        if layout == "original":
            cfg = original_config_json(normalized)
            (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            pre = {
                "processor_class": "VibeVoiceProcessor",
                "speech_tok_compress_ratio": hop_length(normalized),
                "db_normalize": True,
                "audio_processor": {"feature_extractor_type": "VibeVoiceTokenizerProcessor",
                                    "sampling_rate": SAMPLE_RATE, "normalize_audio": True, "target_dB_FS": -25,
                                    "eps": 1e-6},
                "language_model_pretrained_name": "Qwen/Qwen2.5-1.5B" if size != "7b" else "Qwen/Qwen2.5-7B",
            }
            (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
        else:
            _transformers_files(folder, normalized, dtype, tok_dir)
        folders[layout] = folder
    if tok_dir is not None:
        folders["tokenizer"] = tok_dir
    return folders


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--size", default="tiny", choices=["tiny", "1.5b", "7b"])
    p.add_argument("--layouts", default="original,transformers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-gb", type=float, default=2.0)
    args = p.parse_args()
    folders = build(Path(args.out), args.size, args.layouts.split(","), args.seed, args.dtype,
                    int(args.max_shard_gb * 1024**3))
    for k, v in folders.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
