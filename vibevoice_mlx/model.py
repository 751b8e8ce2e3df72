"""The VibeVoice model in MLX: backbone, σ-VAE tokenizers, connectors, diffusion head.

Attribute names equal the original Microsoft checkpoint keys (`model.language_model.*`,
`model.acoustic_tokenizer.*`, `model.prediction_head.*`, ...), so an original checkpoint loads with no renaming
and the transformers layout goes through the one table in `convert/keys.py`.
"""

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import mlx.core as mx
import mlx.nn as nn

from . import backbone
from .audio_tokenizer import AcousticTokenizer, SemanticTokenizer, TokenizerConfig
from .convert.keys import mlx_transpose
from .convert.layouts import normalize_config
from .diffusion_head import DiffusionHead, DiffusionHeadConfig

logger = logging.getLogger(__name__)

# Tensors the loader may find in a checkpoint and must not load (architecture.md §4.1, §4.4).
_DROP_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class ModelConfig:
    decoder_config: Dict[str, Any]
    acoustic_tokenizer_config: TokenizerConfig
    semantic_tokenizer_config: TokenizerConfig
    diffusion_head_config: DiffusionHeadConfig
    acoustic_vae_dim: int = 64
    semantic_vae_dim: int = 128
    tie_word_embeddings: bool = True
    token_ids: Dict[str, int] = field(default_factory=dict)
    quantization: Optional[Dict[str, int]] = None

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "ModelConfig":
        """From a config.json of either layout or a converted folder (normalized, original field names)."""
        norm = normalize_config({k: v for k, v in config.items() if k != "quantization"})
        return cls(
            decoder_config=norm["decoder_config"],
            acoustic_tokenizer_config=TokenizerConfig.from_dict(norm["acoustic_tokenizer_config"]),
            semantic_tokenizer_config=TokenizerConfig.from_dict(norm["semantic_tokenizer_config"]),
            diffusion_head_config=DiffusionHeadConfig.from_dict(norm["diffusion_head_config"]),
            acoustic_vae_dim=norm["acoustic_vae_dim"],
            semantic_vae_dim=norm["semantic_vae_dim"],
            tie_word_embeddings=norm["tie_word_embeddings"],
            token_ids=norm.get("token_ids", {}),
            quantization=config.get("quantization"),
        )

    @property
    def hidden_size(self) -> int:
        return self.decoder_config["hidden_size"]

    @property
    def hop_length(self) -> int:
        return self.acoustic_tokenizer_config.hop_length


class SpeechConnector(nn.Module):
    """fc1 -> RMSNorm -> fc2, no activation (architecture.md §3.2)."""

    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, output_dim)
        self.norm = nn.RMSNorm(output_dim, eps=1e-6)
        self.fc2 = nn.Linear(output_dim, output_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.norm(self.fc1(x)))


class VibeVoiceModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h = config.hidden_size
        self.language_model = backbone.make_language_model(config.decoder_config)
        self.acoustic_tokenizer = AcousticTokenizer(config.acoustic_tokenizer_config)
        self.semantic_tokenizer = SemanticTokenizer(config.semantic_tokenizer_config)
        self.acoustic_connector = SpeechConnector(config.acoustic_vae_dim, h)
        self.semantic_connector = SpeechConnector(config.semantic_vae_dim, h)
        self.prediction_head = DiffusionHead(config.diffusion_head_config)
        self.speech_scaling_factor = mx.array(1.0)
        self.speech_bias_factor = mx.array(0.0)


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = VibeVoiceModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.decoder_config["vocab_size"], bias=False)

    # --- weights -------------------------------------------------------------------------------------------

    def sanitize(self, weights: Dict[str, mx.array], layout: str) -> Dict[str, mx.array]:
        """Original-named PyTorch weights -> MLX layout. `layout` is "mlx" for a converted folder (no transposes).

        Conv weights are transposed by key name (convert/keys.py), never by shape. A tied 1.5B checkpoint may store
        a copy of the embeddings as lm_head.weight: the head is always the embedding matrix then, so it is dropped.
        """
        out = {}
        for k, v in weights.items():
            if k.endswith(_DROP_SUFFIXES):
                continue
            if k == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            perm = mlx_transpose(k) if layout != "mlx" else None
            if perm is not None:
                if v.ndim != 3:
                    raise ValueError(f"{k}: expected a 3-D conv weight, got shape {tuple(v.shape)}")
                v = v.transpose(perm)
            out[k] = v
        return out

    @staticmethod
    def cast_predicate(key: str) -> bool:
        """False for tensors that stay float32 whatever the model dtype (architecture.md §8): the latent scaling
        scalars and the tokenizer layer scales (init 1e-6, at risk of float16 underflow)."""
        leaf = key.rsplit(".", 1)[-1]
        return not (key.startswith("model.speech_") or leaf in ("gamma", "ffn_gamma"))

    @staticmethod
    def quant_predicate(path: str, module: nn.Module) -> bool:
        """Quantize only the language model's Linear layers (not embeddings, head, tokenizers, connectors)."""
        return path.startswith("model.language_model.layers.") and isinstance(module, nn.Linear)

    # --- pieces used by generation -------------------------------------------------------------------------

    @property
    def language_model(self):
        return self.model.language_model

    def embed_tokens(self, ids: mx.array) -> mx.array:
        return self.model.language_model.embed_tokens(ids)

    def head_rows(self, ids) -> mx.array:
        """The lm_head rows of `ids` in float32: only the control tokens are ever scored (architecture.md §6.3)."""
        ids = tuple(int(i) for i in ids)
        kept = self.__dict__.get("_kept_head_rows")
        if kept is not None:
            if ids != kept[0]:
                raise ValueError(f"only the lm_head rows of {kept[0]} were kept; {ids} were asked for")
            return kept[1]
        if self.config.tie_word_embeddings:
            w = self.model.language_model.embed_tokens(mx.array(ids))
        else:
            w = self.lm_head.weight[mx.array(ids)]
        return w.astype(mx.float32)

    def keep_head_rows(self, ids) -> None:
        """Keep only the control tokens' rows of an untied lm_head (7B: frees 1.1 GB of float16 weights).

        Generation never scores another token, so the rest of the matrix is dead weight once loaded.
        """
        if self.config.tie_word_embeddings or "lm_head" not in self:
            return
        rows = self.head_rows(ids)
        mx.eval(rows)
        self.__dict__["_kept_head_rows"] = (tuple(int(i) for i in ids), rows)
        del self.lm_head

    def scale_latents(self, z: mx.array) -> mx.array:
        """Raw acoustic latents -> the normalized space of the LM and diffusion head: (z + bias) * scale."""
        m = self.model
        return (z.astype(mx.float32) + m.speech_bias_factor) * m.speech_scaling_factor

    def unscale_latents(self, z: mx.array) -> mx.array:
        """Normalized latents -> decoder input: z / scale - bias."""
        m = self.model
        return z.astype(mx.float32) / m.speech_scaling_factor - m.speech_bias_factor
