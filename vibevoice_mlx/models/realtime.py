"""VibeVoice-Realtime-0.5B in MLX: the split language model, the type embedding, the EOS classifier (realtime.md §1).

What it shares with the 1.5B/7B is imported, not repeated: mlx-lm's Qwen2 layers, the diffusion head, the σ-VAE
decoder, the speech connector and the config readers. Attribute names equal the original checkpoint keys
(`model.language_model.*`, `model.tts_language_model.*`, `tts_eos_classifier.*`, ...), so the weights load with
no renaming; only the conv transposes of `keys.mlx_transpose` apply.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen2

from .. import backbone
from ..audio_tokenizer import TokenizerConfig, TokenizerDecoder
from ..checkpoint import _head_from_original, _qwen2, _tokenizer_from_original
from ..diffusion_head import DiffusionHead, DiffusionHeadConfig
from ..errors import UserError
from ..keys import mlx_transpose
from ..connector import SpeechConnector
from ..scheduler import SchedulerConfig

MODEL_TYPE = "vibevoice_streaming"
TEXT_WINDOW = 5  # text ids per window (module constants of the original, realtime.md §1.1)
SPEECH_WINDOW = 6  # speech frames per window
# Never read: the TTS LM is always driven by input embeddings (realtime.md §1.2); dropped at load and convert.
UNUSED_KEYS = ("model.tts_language_model.embed_tokens.weight",)


@dataclass
class RealtimeConfig:
    """The typed config of a realtime checkpoint (`model_type` `vibevoice_streaming`)."""

    lower: qwen2.ModelArgs  # the lower LM: total layers minus the TTS layers, no final norm
    tts: qwen2.ModelArgs  # the TTS LM: `tts_backbone_num_hidden_layers` layers and a final norm
    acoustic_tokenizer_config: TokenizerConfig
    diffusion_head_config: DiffusionHeadConfig
    scheduler: SchedulerConfig
    acoustic_vae_dim: int = 64
    quantization: Optional[Dict[str, int]] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, config: Dict[str, Any], quantization: Optional[Dict[str, int]] = None) -> "RealtimeConfig":
        if config.get("model_type") != MODEL_TYPE:
            raise UserError(f"config.json has model_type {config.get('model_type')!r}, not {MODEL_TYPE!r}.")
        dec = _qwen2(config["decoder_config"])
        total, n_tts = int(dec["num_hidden_layers"]), int(config.get("tts_backbone_num_hidden_layers", 20))
        if not 0 < n_tts < total:
            raise UserError(f"config.json: tts_backbone_num_hidden_layers {n_tts} must be between 1 and "
                            f"decoder_config.num_hidden_layers - 1 ({total - 1}).")
        acoustic = _tokenizer_from_original(config["acoustic_tokenizer_config"], semantic=False)
        head = _head_from_original(config.get("diffusion_head_config", {}), dec["hidden_size"], acoustic["vae_dim"])
        return cls(
            lower=backbone.model_args(dict(dec, num_hidden_layers=total - n_tts)),
            tts=backbone.model_args(dict(dec, num_hidden_layers=n_tts)),
            acoustic_tokenizer_config=TokenizerConfig.from_dict(acoustic),
            diffusion_head_config=DiffusionHeadConfig.from_dict(head),
            scheduler=SchedulerConfig.from_head_config(head),
            acoustic_vae_dim=int(acoustic["vae_dim"]),
            quantization=quantization,
            raw=config,
        )

    @property
    def hidden_size(self) -> int:
        return self.tts.hidden_size

    @property
    def max_positions(self) -> int:
        """The context of the positive TTS LM, preset included (realtime.md §4.8)."""
        return self.tts.max_position_embeddings or 8192

    @property
    def hop_length(self) -> int:
        return self.acoustic_tokenizer_config.hop_length

    @property
    def kv_heads(self) -> int:
        return self.tts.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.tts.hidden_size // self.tts.num_attention_heads


class LowerLM(qwen2.Qwen2Model):
    """The lower Qwen2 stack: its output is the raw residual stream of its last layer (no final norm)."""

    def __init__(self, args: qwen2.ModelArgs):
        super().__init__(args)
        self.norm = nn.Identity()


class TTSLM(qwen2.Qwen2Model):
    """The upper Qwen2 stack with its final norm; always fed input embeddings, so it has no embedding table."""

    def __init__(self, args: qwen2.ModelArgs):
        super().__init__(args)
        del self.embed_tokens


class AcousticDecoder(nn.Module):
    """`model.acoustic_tokenizer` of the release: the σ-VAE decoder only (the encoder is not in the checkpoint)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.decoder = TokenizerDecoder(cfg)


class EOSClassifier(nn.Module):
    """fc1 -> ReLU -> fc2 -> one logit per row (realtime.md §1.2)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def __call__(self, h: mx.array) -> mx.array:
        return self.fc2(nn.relu(self.fc1(h)))[..., 0]


class RealtimeInner(nn.Module):
    def __init__(self, config: RealtimeConfig):
        super().__init__()
        h = config.hidden_size
        self.language_model = LowerLM(config.lower)
        self.tts_language_model = TTSLM(config.tts)
        self.tts_input_types = nn.Embedding(2, h)
        self.acoustic_tokenizer = AcousticDecoder(config.acoustic_tokenizer_config)
        self.acoustic_connector = SpeechConnector(config.acoustic_vae_dim, h)
        self.prediction_head = DiffusionHead(config.diffusion_head_config)
        self.speech_scaling_factor = mx.array(1.0)
        self.speech_bias_factor = mx.array(0.0)


class RealtimeModel(nn.Module):
    """The whole model; `generation.realtime` drives it window by window."""

    family = "realtime"

    def __init__(self, config: RealtimeConfig):
        super().__init__()
        self.config = config
        self.model = RealtimeInner(config)
        self.tts_eos_classifier = EOSClassifier(config.hidden_size)

    # --- weights -------------------------------------------------------------------------------------------

    def sanitize(self, weights: Dict[str, mx.array], layout: str) -> Dict[str, mx.array]:
        """Original-named weights -> MLX layout (`layout` "mlx": already converted, no transposes)."""
        out = {}
        for k, v in weights.items():
            if k in UNUSED_KEYS or k.endswith("rotary_emb.inv_freq"):
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
        """False for what stays float32 whatever the model dtype (realtime.md §5.2): the latent scalars and the
        decoder's layer scales."""
        leaf = key.rsplit(".", 1)[-1]
        return not (key.startswith("model.speech_") or leaf in ("gamma", "ffn_gamma"))

    @staticmethod
    def quant_predicate(path: str, module: nn.Module) -> bool:
        """Quantize the Linear layers of both language models only."""
        return path.startswith(("model.language_model.layers.", "model.tts_language_model.layers.")) and isinstance(
            module, nn.Linear)

    # --- the pieces of the window schedule (realtime.md §4.3, §4.4) ------------------------------------------

    def lower(self, ids: mx.array, cache: List) -> mx.array:
        """Text ids [1, n] through the lower LM (appending to `cache`) -> [1, n, H], no final norm."""
        lm = self.model.language_model
        return lm(None, cache=cache, input_embeddings=lm.embed_tokens(ids))

    def tts(self, embeds: mx.array, kind: int, cache: List) -> mx.array:
        """Input rows [B, n, H] of one kind (1 text, 0 speech) through the TTS LM -> final-normed [B, n, H]."""
        typed = embeds + self.model.tts_input_types.weight[kind].astype(embeds.dtype)
        return self.model.tts_language_model(None, cache=cache, input_embeddings=typed)

    def eos_probability(self, h: mx.array) -> mx.array:
        """sigmoid of the EOS logit of each row of h [B, H], in float32 (realtime.md §4.6)."""
        return mx.sigmoid(self.tts_eos_classifier(h[:, None]).astype(mx.float32))[:, 0]

    def unscale_latents(self, z: mx.array) -> mx.array:
        """Normalized latents -> decoder input: z / scale - bias (the connector takes z itself)."""
        m = self.model
        return z.astype(mx.float32) / m.speech_scaling_factor - m.speech_bias_factor
