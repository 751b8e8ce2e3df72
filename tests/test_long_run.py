"""Flat memory over a long run: ten minutes of audio in one call, memory sampled throughout.

A tiny model with the real hop (3200 samples, 7.5 frames/s) and small channels, built in MLX with seeded random
weights, is forced to speak 4,500 frames in one segment (a 2,300-token prompt allows 2x that under the length
rule). What may grow is the KV cache; everything else (streams, compiled steps, responses) must stay flat.
"""

import copy
import os
import resource

import mlx.core as mx
import numpy as np
import pytest

import vibevoice_mlx as vv
from vibevoice_mlx.engine import MLXBackend
from vibevoice_mlx.fixtures import tiny_config
from vibevoice_mlx.loader import VibeVoice, load_tokenizer
from vibevoice_mlx.models.vibevoice import Model, ModelConfig
from vibevoice_mlx.processor import SpecialTokens

FRAMES = 4500  # 600 s at 7.5 frames/s


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def long_pipe(tiny):
    cfg = copy.deepcopy(tiny_config())
    cfg["decoder_config"]["max_position_embeddings"] = 8192
    for name in ("acoustic_tokenizer_config", "semantic_tokenizer_config"):
        t = cfg[name]
        t.update(encoder_n_filters=1, decoder_n_filters=1, encoder_ratios=[8, 5, 5, 4, 2, 2],
                 decoder_ratios=[8, 5, 5, 4, 2, 2], encoder_depths="1-1-1-1-1-1-1", decoder_depths="1-1-1-1-1-1-1")
    config = ModelConfig.from_normalized(cfg)
    mx.random.seed(0)
    model = Model(config)
    mx.eval(model.parameters())
    tok = load_tokenizer(tiny["tokenizer"])
    tokens = SpecialTokens.from_tokenizer(tok)
    return VibeVoice(MLXBackend(model, tokens), tok, tokens, tiny["tokenizer"], config)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the process's memory from /proc")
def test_ten_minutes_in_one_call_keep_memory_flat(long_pipe):
    assert long_pipe.hop_length == 3200
    samples = {"active": [], "rss": []}
    made = {"frames": 0}

    def speak(logits, ids):
        if made["frames"] and made["frames"] % 500 == 0:
            samples["active"].append(mx.get_active_memory())
            samples["rss"].append(_rss_bytes())
        made["frames"] += 1
        return ids[2] if made["frames"] <= FRAMES else ids[3]

    script = "Speaker 1: " + "la " * 770  # about 2,300 prompt tokens with the byte-level test tokenizer
    made_samples = 0
    for r in vv.stream_generate(long_pipe, script, sampler=speak, steps=1, seed=0):
        made_samples += len(r.audio)  # nothing kept: only the engine's own memory is measured
    seconds = made_samples / 24000
    assert made_samples == FRAMES * 3200 and seconds >= 600 and not r.truncated
    d = long_pipe.config.decoder_config
    head_dim = d.hidden_size // d.num_attention_heads
    kv_per_token = 2 * 2 * d.num_hidden_layers * d.num_key_value_heads * head_dim * 4  # K, V; both CFG rows
    grown_tokens = 500 * (len(samples["active"]) - 1)
    # The cache grows in blocks of 256 tokens: allow two blocks beyond the tokens added.
    allowed = kv_per_token * (grown_tokens + 512)
    active_growth = samples["active"][-1] - samples["active"][0]
    rss_growth = samples["rss"][-1] - samples["rss"][0]
    print(f"[memory] {seconds:.0f} s of audio: active {samples['active'][0] / 1e6:.1f} -> "
          f"{samples['active'][-1] / 1e6:.1f} MB (KV allowance {allowed / 1e6:.2f} MB), RSS growth "
          f"{rss_growth / 1e6:.1f} MB, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB")
    assert active_growth <= allowed, (active_growth, allowed)
    assert rss_growth <= 64e6, rss_growth  # allocator caches settle; a leak of a chunk per frame would be ~58 MB
