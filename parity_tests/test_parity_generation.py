"""End to end: MLX generation against transformers' generate on the same weights, noise and token choices.

Voices here have lengths that are multiples of the hop: transformers pads voice audio to a multiple of the hop
before encoding while the original pads inside every conv, which changes the last partial frame
(architecture.md §7); that difference is covered by the encoder parity tests, not here.
"""

import numpy as np
import pytest

import vibevoice_mlx as vv
from vibevoice_mlx import engine
from vibevoice_mlx.testing import assert_close, snr_db

SCRIPT = "Speaker 1: Hello there.\nSpeaker 2: Hi, how are you?"


@pytest.fixture(scope="module")
def pipes(tiny):
    mlx = vv.load(tiny["original"], tokenizer=tiny["tokenizer"], dtype="float32")
    torch = vv.load(tiny["transformers"], backend="torch", device="cpu", dtype="float32")
    return mlx, torch


def _voices(hop, frames=(5, 3)):
    rng = np.random.default_rng(11)
    return [(0.3 * rng.standard_normal(n * hop)).astype(np.float32) for n in frames]


def _forced(seq):
    it = iter(seq)
    return lambda logits, ids: next(it)


def _noise(frames, latent, seed=5):
    return np.random.default_rng(seed).standard_normal((frames, latent)).astype(np.float32)


def _run(pipe, tokens, noise, voices, **kw):
    return vv.generate(pipe, SCRIPT, voices=voices, sampler=_forced(tokens), noise=noise, voice_noise=False,
                       steps=10, cfg_scale=1.3, **kw)


def test_end_to_end_forced_frames_with_voices(pipes):
    mlx, torch = pipes
    hop, latent = mlx.hop_length, mlx.config.acoustic_vae_dim
    tokens = [259] * 8 + [258, 256]
    noise = _noise(8, latent)
    voices = _voices(hop)
    got, want = _run(mlx, tokens, noise, voices), _run(torch, tokens, noise, voices)
    assert got.tokens == want.tokens == [tokens]
    assert got.frames == 8 and len(got.audio) == len(want.audio) == 8 * hop
    scale = np.abs(want.audio).max()
    assert scale > 1e-2, "reference audio is near silent: the test would prove nothing"
    # Each frame feeds the next (connectors, semantic encoder, LM), and this random model's loop roughly doubles
    # a difference per frame: observed max abs error 6.7e-6 on frame 0, growing to 3.2e-4 on frame 7, at signal
    # scale 4.3. Every component alone agrees to ~1e-6 (the component parity tests).
    assert_close("end-to-end audio float32, frame 0", got.audio[:hop], want.audio[:hop], atol=1e-5 * scale)
    assert_close("end-to-end audio float32, 8 frames", got.audio, want.audio, atol=2e-4 * scale)


def test_end_to_end_greedy_token_choice(pipes):
    """Without forcing, both pick the same tokens by argmax over the four control tokens."""
    mlx, torch = pipes
    latent = mlx.config.acoustic_vae_dim
    noise = _noise(64, latent, seed=9)
    kw = dict(voices=_voices(mlx.hop_length), noise=noise, voice_noise=False, max_seconds=0.02)
    got = vv.generate(mlx, SCRIPT, **kw)
    want = vv.generate(torch, SCRIPT, **kw)
    n = min(len(got.tokens[0]), len(want.tokens[0]))
    assert n > 0 and got.tokens[0][:n] == want.tokens[0][:n]


def test_end_to_end_float16_against_float32_reference(tiny, pipes):
    _, torch = pipes
    mlx16 = vv.load(tiny["original"], tokenizer=tiny["tokenizer"], dtype="float16")
    hop, latent = mlx16.hop_length, mlx16.config.acoustic_vae_dim
    tokens = [259] * 8 + [258, 256]
    noise, voices = _noise(8, latent), _voices(hop)
    got, want = _run(mlx16, tokens, noise, voices), _run(torch, tokens, noise, voices)
    assert got.tokens == want.tokens
    snrs = [snr_db(got.audio[f * hop : (f + 1) * hop], want.audio[f * hop : (f + 1) * hop]) for f in range(8)]
    print("[parity] end-to-end audio float16 vs float32 reference, SNR per frame (dB): "
          + " ".join(f"{x:.1f}" for x in snrs))
    # Observed on the CPU backend: 35.3, 37.5, 35.1 dB on the first three frames; later frames drift (29 to 12 dB)
    # because the random model's feedback loop amplifies any difference (see the float32 test). Checked: the
    # first frames, where the float16 error is not yet fed back.
    assert min(snrs[:3]) > 30, f"float16 SNR of the first frames: {snrs[:3]}"


def test_multi_segment_follows_the_original_rules(pipes, monkeypatch):
    """speech_end then speech_start mid-output (§6.3/§6.4): the negative branch restarts exactly as at frame 0,
    and the tokenizer streams restart after speech_end. transformers does neither the same way, so the rules are
    checked directly."""
    mlx, _ = pipes
    latent = mlx.config.acoustic_vae_dim
    seen = []
    real = engine.sample_latent

    def recording(head, pos, neg, noise, *a, **k):
        z = real(head, pos, neg, noise, *a, **k)
        seen.append((np.array(pos), np.array(neg), np.array(z)))
        return z

    monkeypatch.setattr(engine, "sample_latent", recording)
    tokens = [259, 259, 259, 258, 257, 259, 259, 258, 256]
    noise = np.repeat(_noise(1, latent), 5, axis=0)  # the same noise every frame
    # eager, so the recording wrapper sees concrete values (compiled frames equal eager ones: tests/)
    res = _run(mlx, tokens, noise, _voices(mlx.hop_length), compile=False)
    assert res.tokens == [tokens] and res.frames == 5 and len(seen) == 5
    # frame 3 is the first of the new segment: its negative hidden state equals frame 0's
    assert_close("negative branch after reset", seen[3][1], seen[0][1], atol=1e-5)
    assert not np.allclose(seen[1][1], seen[0][1])
    # the decoder restarted: frame 3 decodes as the first frame of a fresh stream
    import mlx.core as mx

    m = mlx.model
    z = m.unscale_latents(mx.array(seen[3][2]))[:, None, :]
    fresh, _ = m.model.acoustic_tokenizer.decoder.stream(z, m.model.acoustic_tokenizer.decoder.make_state(1))
    hop = mlx.hop_length
    assert_close("decoder after speech_end", res.audio[3 * hop : 4 * hop], np.array(fresh)[0, :, 0], atol=1e-5)


def test_both_layouts_generate_the_same_audio(tiny, pipes):
    mlx, _ = pipes
    other = vv.load(tiny["transformers"], dtype="float32")
    tokens = [259] * 4 + [258, 256]
    noise, voices = _noise(4, mlx.config.acoustic_vae_dim), _voices(mlx.hop_length)
    a, b = _run(mlx, tokens, noise, voices), _run(other, tokens, noise, voices)
    np.testing.assert_array_equal(a.audio, b.audio)
