"""VibeVoice 1.5B and 7B in MLX: backbone, σ-VAE tokenizers, connectors, diffusion head.

Attribute names equal the original Microsoft checkpoint keys (`model.language_model.*`,
`model.acoustic_tokenizer.*`, `model.prediction_head.*`, ...), so an original checkpoint loads with no renaming
and the transformers layout goes through the one table in `keys.py`.
"""

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import qwen2

from .. import backbone
from ..audio_tokenizer import AcousticTokenizer, SemanticTokenizer, TokenizerConfig
from ..connector import SpeechConnector
from ..diffusion_head import DiffusionHead, DiffusionHeadConfig
from ..keys import stays_float32, to_mlx_layout
from ..scheduler import SchedulerConfig

logger = logging.getLogger(__name__)

# Tensors the loader may find in a checkpoint and must not load (architecture.md §4.1, §4.4).
_DROP_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class ModelConfig:
    """The typed model config, built once per load from the normalized config (`checkpoint.normalize_config`)."""

    decoder_config: qwen2.ModelArgs
    acoustic_tokenizer_config: TokenizerConfig
    semantic_tokenizer_config: TokenizerConfig
    diffusion_head_config: DiffusionHeadConfig
    scheduler: SchedulerConfig
    acoustic_vae_dim: int = 64
    semantic_vae_dim: int = 128
    tie_word_embeddings: bool = True
    token_ids: Dict[str, int] = field(default_factory=dict)
    quantization: Optional[Dict[str, int]] = None
    normalized: Dict[str, Any] = field(default_factory=dict, repr=False)  # what it was built from

    @classmethod
    def from_normalized(cls, norm: Dict[str, Any], quantization: Optional[Dict[str, int]] = None) -> "ModelConfig":
        return cls(
            decoder_config=backbone.model_args(norm["decoder_config"]),
            acoustic_tokenizer_config=TokenizerConfig.from_dict(norm["acoustic_tokenizer_config"]),
            semantic_tokenizer_config=TokenizerConfig.from_dict(norm["semantic_tokenizer_config"]),
            diffusion_head_config=DiffusionHeadConfig.from_dict(norm["diffusion_head_config"]),
            scheduler=SchedulerConfig.from_head_config(norm["diffusion_head_config"]),
            acoustic_vae_dim=norm["acoustic_vae_dim"],
            semantic_vae_dim=norm["semantic_vae_dim"],
            tie_word_embeddings=norm["tie_word_embeddings"],
            token_ids=dict(norm.get("token_ids") or {}),
            quantization=quantization,
            normalized=norm,
        )

    @property
    def hidden_size(self) -> int:
        return self.decoder_config.hidden_size

    @property
    def max_positions(self) -> int:
        return self.decoder_config.max_position_embeddings or 32768

    @property
    def hop_length(self) -> int:
        return self.acoustic_tokenizer_config.hop_length


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
            self.lm_head = nn.Linear(config.hidden_size, config.decoder_config.vocab_size, bias=False)

    # --- weights -------------------------------------------------------------------------------------------

    def sanitize(self, weights: Dict[str, mx.array], layout: str) -> Dict[str, mx.array]:
        """Original-named PyTorch weights -> MLX layout. `layout` is "mlx" for a converted folder (no transposes).

        Conv weights are transposed by key name (keys.py), never by shape. A tied 1.5B checkpoint may store
        a copy of the embeddings as lm_head.weight: the head is always the embedding matrix then, so it is dropped.
        """
        tied = self.config.tie_word_embeddings
        return to_mlx_layout(weights, layout, lambda k: k.endswith(_DROP_SUFFIXES) or (k == "lm_head.weight" and tied))

    @staticmethod
    def cast_predicate(key: str) -> bool:
        """The one dtype policy, applied alike on disk (convert) and in memory (load): False for the tensors that
        stay float32 whatever the model dtype (architecture.md §8), the latent scaling scalars and the tokenizer
        layer scales (init 1e-6, at risk of float16 underflow)."""
        return not stays_float32(key)

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

    def head_rows(self, ids: Sequence[int]) -> mx.array:
        """The lm_head rows of `ids` in float32: only the control tokens are ever scored (architecture.md §6.3)."""
        ids = mx.array([int(i) for i in ids])
        if self.config.tie_word_embeddings:
            w = self.model.language_model.embed_tokens(ids)
        else:
            w = self.lm_head.weight[ids]
        return w.astype(mx.float32)

    def prompt_embeddings(self, input_ids: Sequence[int], speech_mask: Sequence[bool],
                          voice_latents: Sequence[mx.array]) -> mx.array:
        """[1, T, H] input embeddings of a prompt: token embeddings, with the voice placeholders overwritten by
        the acoustic connector of the voices' normalized latents (architecture.md §3.3.5, §6.2)."""
        embeds = self.embed_tokens(mx.array(list(input_ids))[None])
        if voice_latents:
            feats = mx.concatenate(list(voice_latents), axis=0).astype(embeds.dtype)
            voice_embeds = self.model.acoustic_connector(feats)
            positions = np.flatnonzero(np.asarray(speech_mask))
            if len(positions) != voice_embeds.shape[0]:
                raise ValueError(f"prompt has {len(positions)} voice slots but the voices give "
                                 f"{voice_embeds.shape[0]}")
            embeds[0, mx.array(positions)] = voice_embeds
        return embeds

    def scale_latents(self, z: mx.array) -> mx.array:
        """Raw acoustic latents -> the normalized space of the LM and diffusion head: (z + bias) * scale."""
        m = self.model
        return (z.astype(mx.float32) + m.speech_bias_factor) * m.speech_scaling_factor

    def unscale_latents(self, z: mx.array) -> mx.array:
        """Normalized latents -> decoder input: z / scale - bias."""
        m = self.model
        return z.astype(mx.float32) / m.speech_scaling_factor - m.speech_bias_factor
