"""σ-VAE tokenizers and causal convs in pure MLX: lengths, streaming == one-shot, reset, dtypes, key names."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from vibevoice_mlx.audio_tokenizer import AcousticTokenizer, SemanticTokenizer, TokenizerConfig
from vibevoice_mlx.conv import CausalConv1d, CausalConvTranspose1d
from vibevoice_mlx.keys import mlx_transpose
from vibevoice_mlx.checkpoint import normalize_config
from vibevoice_mlx.testing import assert_close, snr_db

HOP = 16  # tiny fixture: encoder_ratios [4, 2, 2]


def _original_weights(folder, prefix):
    """(name under `prefix`, MLX-layout array) for every tensor of the original-layout checkpoint."""
    weights = mx.load(str(folder / "model.safetensors"))
    out = []
    for key, value in weights.items():
        if key.startswith(prefix):
            perm = mlx_transpose(key)
            out.append((key[len(prefix):], value.transpose(perm) if perm else value))
    return out


@pytest.fixture(scope="module")
def tokenizers(tiny):
    cfg = normalize_config(json.loads((tiny["original"] / "config.json").read_text()))
    acoustic = AcousticTokenizer(TokenizerConfig.from_dict(cfg["acoustic_tokenizer_config"]))
    acoustic.load_weights(_original_weights(tiny["original"], "model.acoustic_tokenizer."), strict=True)
    semantic = SemanticTokenizer(TokenizerConfig.from_dict(cfg["semantic_tokenizer_config"]))
    semantic.load_weights(_original_weights(tiny["original"], "model.semantic_tokenizer."), strict=True)
    return acoustic, semantic


def _audio(batch, length, seed=0):
    return mx.array(np.random.default_rng(seed).standard_normal((batch, length, 1)).astype(np.float32) * 0.5)


def _latents(batch, frames, dim, seed=1):
    return mx.array(np.random.default_rng(seed).standard_normal((batch, frames, dim)).astype(np.float32))


def _scale(x):
    return float(mx.abs(x).max())


# --- config -----------------------------------------------------------------------------------------------


def test_config_from_dict_ignores_unknown_keys_and_derives_lists():
    cfg = TokenizerConfig.from_dict({"vae_dim": 64, "encoder_ratios": [8, 5, 5, 4, 2, 2], "causal": True,
                                     "encoder_depths": "3-3-3-3-3-3-8", "decoder_depths": None, "model_type": "x"})
    assert cfg.hop_length == 3200
    assert cfg.encoder_depth_list == [3, 3, 3, 3, 3, 3, 8]
    assert cfg.decoder_depth_list == [8, 3, 3, 3, 3, 3, 3]
    assert cfg.decoder_ratios == [8, 5, 5, 4, 2, 2]
    with pytest.raises(ValueError):
        TokenizerConfig(vae_dim=8, encoder_ratios=[2, 2], encoder_depths="1-1")


# --- causal convs against a direct NumPy convolution ------------------------------------------------------


def _set_conv(conv, seed):
    rng = np.random.default_rng(seed)
    leaf = conv.conv.conv if isinstance(conv, CausalConv1d) else conv.convtr.convtr
    leaf.update(tree_map(lambda p: mx.array(rng.standard_normal(p.shape).astype(np.float32)), leaf.parameters()))
    return leaf


def _np_conv(x, w, b, stride, dilation, groups):
    """Causal conv by definition: left pad (k-1)d-(s-1) zeros, zeros to the right, ceil(L/s) outputs."""
    bsz, length, cin = x.shape
    out, k, _ = w.shape
    pad = (k - 1) * dilation - (stride - 1)
    n = math.ceil(length / stride)
    xp = np.concatenate([np.zeros((bsz, pad, cin)), x, np.zeros((bsz, k * dilation + stride, cin))], axis=1)
    gin, gout = cin // groups, out // groups
    y = np.zeros((bsz, n, out))
    for t in range(n):
        for o in range(out):
            g = o // gout
            for j in range(k):
                y[:, t, o] += xp[:, t * stride + j * dilation, g * gin:(g + 1) * gin] @ w[o, j]
    return y + b


@pytest.mark.parametrize("cin,cout,k,stride,dilation,groups", [
    (1, 4, 7, 1, 1, 1),      # stem
    (4, 8, 4, 2, 1, 1),      # downsampler k = 2s
    (3, 5, 10, 5, 1, 1),
    (6, 6, 7, 1, 1, 6),      # depthwise mixer
    (4, 6, 3, 1, 2, 2),      # grouped + dilated (falls back to mx.conv1d)
    (5, 5, 3, 2, 2, 5),      # depthwise, strided and dilated
])
@pytest.mark.parametrize("length", [20, 21, 23])
def test_causal_conv1d_matches_definition(cin, cout, k, stride, dilation, groups, length):
    conv = CausalConv1d(cin, cout, k, stride=stride, dilation=dilation, groups=groups)
    leaf = _set_conv(conv, seed=k + length)
    x = np.random.default_rng(length).standard_normal((2, length, cin))
    got = conv(mx.array(x.astype(np.float32)))
    assert got.shape == (2, math.ceil(length / stride), cout)
    want = _np_conv(x, np.array(leaf.weight), np.array(leaf.bias), stride, dilation, groups)
    assert_close("conv1d vs definition", got, want, atol=1e-4)


@pytest.mark.parametrize("cin,cout,stride,k", [(4, 3, 2, 4), (3, 5, 5, 10), (2, 2, 4, 8), (3, 2, 2, 6)])
def test_causal_conv_transpose1d_matches_definition(cin, cout, stride, k):
    conv = CausalConvTranspose1d(cin, cout, k, stride=stride)
    leaf = _set_conv(conv, seed=stride)
    w, b = np.array(leaf.weight), np.array(leaf.bias)  # [out, k, in]
    x = np.random.default_rng(stride).standard_normal((2, 5, cin))
    full = np.zeros((2, (5 - 1) * stride + k, cout))
    for t in range(5):
        for j in range(k):
            full[:, t * stride + j] += x[:, t] @ w[:, j].T
    want = full[:, : 5 * stride] + b  # causal: trim k - s on the right only
    got = conv(mx.array(x.astype(np.float32)))
    assert_close("conv_transpose1d vs definition", got, want, atol=1e-4)


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1, 1], [2, 3, 1], [6]])
def test_conv_streaming_equals_one_shot(chunks):
    x = mx.array(np.random.default_rng(3).standard_normal((2, 6 * 4, 3)).astype(np.float32))
    conv = CausalConv1d(3, 5, 8, stride=4)
    _set_conv(conv, 0)
    tr = CausalConvTranspose1d(3, 5, 8, stride=4)
    _set_conv(tr, 1)
    for layer, unit in [(conv, 4), (tr, 1)]:
        xs = x if unit == 4 else x[:, :6]
        state, outs, pos = layer.make_state(2), [], 0
        for c in chunks:
            y, state = layer.step(xs[:, pos:pos + c * unit], state)
            outs.append(y)
            pos += c * unit
        assert_close(f"{type(layer).__name__} stream", mx.concatenate(outs, axis=1), layer(xs), atol=1e-5)


# --- tokenizers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [3 * HOP, 3 * HOP + 1, 3 * HOP - 1, HOP - 5, 1])
def test_encoder_output_length(tokenizers, length):
    acoustic, semantic = tokenizers
    x = _audio(2, length)
    assert acoustic.encoder(x).shape == (2, math.ceil(length / HOP), 8)
    assert semantic.encoder(x).shape == (2, math.ceil(length / HOP), 12)


@pytest.mark.parametrize("frames", [1, 3])
def test_decoder_output_length(tokenizers, frames):
    audio = tokenizers[0].decoder(_latents(2, frames, 8))
    assert audio.shape == (2, frames * HOP, 1)
    assert audio.dtype == mx.float32


def test_decoder_stream_equals_one_shot(tokenizers):
    dec = tokenizers[0].decoder
    z = _latents(2, 7, 8)
    want = dec(z)
    state, outs = dec.make_state(2), []
    for t in range(7):
        y, state = dec.stream(z[:, t:t + 1], state)
        outs.append(y)
    assert_close("decoder frame by frame", mx.concatenate(outs, axis=1), want, atol=1e-5 * _scale(want))
    # Uneven chunks too (2 + 5 frames).
    y1, state = dec.stream(z[:, :2], dec.make_state(2))
    y2, _ = dec.stream(z[:, 2:], state)
    assert_close("decoder chunks", mx.concatenate([y1, y2], axis=1), want, atol=1e-5 * _scale(want))


@pytest.mark.parametrize("which", [0, 1])
def test_encoder_stream_equals_one_shot(tokenizers, which):
    enc = tokenizers[which].encoder
    x = _audio(2, 6 * HOP)
    want = enc(x)
    state, outs = enc.make_state(2), []
    for t in range(6):
        y, state = enc.stream(x[:, t * HOP:(t + 1) * HOP], state)
        outs.append(y)
    assert_close("encoder hop chunks", mx.concatenate(outs, axis=1), want, atol=1e-5 * _scale(want))
    with pytest.raises(ValueError):
        enc.stream(x[:, :HOP + 1], enc.make_state(2))


def test_reset_is_a_fresh_stream(tokenizers):
    dec = tokenizers[0].decoder
    a, b = _latents(1, 3, 8, seed=5), _latents(1, 2, 8, seed=6)
    _, state = dec.stream(a, dec.make_state(1))
    continued, _ = dec.stream(b, state)
    restarted, _ = dec.stream(b, dec.make_state(1))
    assert_close("decoder after reset", restarted, dec(b), atol=1e-5 * _scale(restarted))
    # The carried state matters: without the reset the same latents decode differently.
    assert float(mx.abs(continued - restarted).max()) > 1e-2 * _scale(restarted)


def test_reset_rows_resets_only_those_rows(tokenizers):
    dec = tokenizers[0].decoder
    a, b = _latents(2, 3, 8, seed=5), _latents(2, 2, 8, seed=6)
    _, state = dec.stream(a, dec.make_state(2))
    continued, _ = dec.stream(b, state)
    mixed, _ = dec.stream(b, dec.reset_rows(state, mx.array([True, False])))
    fresh = dec(b)
    assert_close("reset row", mixed[0], fresh[0], atol=1e-5 * _scale(fresh))
    assert_close("kept row", mixed[1], continued[1], atol=1e-5 * _scale(fresh))
    assert float(mx.abs(continued[0] - fresh[0]).max()) > 1e-2 * _scale(fresh)


def test_compiled_stream_step_equals_eager(tokenizers):
    dec, enc = tokenizers[0].decoder, tokenizers[1].encoder
    step = mx.compile(lambda z, s_dec, s_enc: _frame(dec, enc, z, s_dec, s_enc))
    z = _latents(1, 3, 8)
    states = [(dec.make_state(1), enc.make_state(1)), (dec.make_state(1), enc.make_state(1))]
    for t in range(3):
        got = step(z[:, t:t + 1], *states[0])
        want = _frame(dec, enc, z[:, t:t + 1], *states[1])
        assert_close("compiled audio", got[0], want[0], atol=1e-5 * _scale(want[0]))
        assert_close("compiled semantic", got[1], want[1], atol=1e-5 * _scale(want[1]))
        states = [(got[2], got[3]), (want[2], want[3])]


def _frame(dec, enc, z, s_dec, s_enc):
    audio, s_dec = dec.stream(z, s_dec)
    sem, s_enc = enc.stream(audio, s_enc)
    return audio, sem, s_dec, s_enc


def _cast_big(module, dtype):
    """Cast conv and linear weights (ndim >= 2) only, as §8 keeps 1-D params float32."""
    module.update(tree_map(lambda p: p.astype(dtype) if p.ndim >= 2 else p, module.parameters()))


@pytest.mark.parametrize("mixed", [False, True])
def test_float16_is_finite_and_close(tiny, mixed):
    cfg = normalize_config(json.loads((tiny["original"] / "config.json").read_text()))
    ref = AcousticTokenizer(TokenizerConfig.from_dict(cfg["acoustic_tokenizer_config"]))
    weights = _original_weights(tiny["original"], "model.acoustic_tokenizer.")
    ref.load_weights(weights, strict=True)
    half = AcousticTokenizer(TokenizerConfig.from_dict(cfg["acoustic_tokenizer_config"]))
    half.load_weights(weights, strict=True)
    if mixed:
        _cast_big(half, mx.float16)
        assert half.encoder.stages[0][0].gamma.dtype == mx.float32
    else:
        half.set_dtype(mx.float16)
    x, z = _audio(2, 4 * HOP), _latents(2, 4, 8)
    state = half.decoder.make_state(2)
    assert all(s.dtype == mx.float16 for s in state)  # activations follow the big weights
    streamed, state = half.decoder.stream(z, state)
    assert all(s.dtype == mx.float16 for s in state)
    for name, got, want in [("encoder", half.encoder(x), ref.encoder(x)), ("decoder", half.decoder(z), ref.decoder(z)),
                            ("decoder stream", streamed, ref.decoder(z))]:
        assert got.dtype == mx.float32 and bool(mx.isfinite(got).all()), name
        # Observed 54.6-58.4 dB on the tiny fixture (float16 keeps 11 significant bits, about 66 dB).
        assert snr_db(got, want) > 40, (name, snr_db(got, want))


def test_parameter_names_are_the_original_keys(tiny):
    cfg = normalize_config(json.loads((tiny["original"] / "config.json").read_text()))
    for cls, name in [(AcousticTokenizer, "acoustic"), (SemanticTokenizer, "semantic")]:
        model = cls(TokenizerConfig.from_dict(cfg[f"{name}_tokenizer_config"]))
        weights = _original_weights(tiny["original"], f"model.{name}_tokenizer.")
        assert {k for k, _ in tree_flatten(model.parameters())} == {k for k, _ in weights}
        model.load_weights(weights, strict=True)  # shapes must match too
    keys = {k for k, _ in tree_flatten(AcousticTokenizer(TokenizerConfig(vae_dim=8, encoder_n_filters=2,
                                                                         encoder_ratios=[2], encoder_depths="1-1"))
                                       .parameters())}
    for key in ["encoder.downsample_layers.0.0.conv.conv.weight", "encoder.stages.1.0.mixer.conv.conv.conv.bias",
                "encoder.head.conv.conv.weight", "decoder.upsample_layers.1.0.convtr.convtr.weight",
                "decoder.stages.0.0.ffn.linear1.weight", "decoder.head.conv.conv.bias", "decoder.stages.1.0.gamma"]:
        assert key in keys, key


def test_sample_uses_injected_noise(tokenizers):
    acoustic = tokenizers[0]
    assert acoustic.vae_std == pytest.approx(0.5 / 0.8)
    mean, noise = _latents(2, 3, 8, seed=2), _latents(2, 3, 8, seed=3)
    std = mx.array([0.5, -2.0])
    got = acoustic.sample(mean, std, noise)
    want = np.array(mean) + 0.625 * np.array(std)[:, None, None] * np.array(noise)
    assert_close("sample", got, want, atol=1e-6)


@pytest.mark.parametrize("length", [16 * 7, 16 * 7 + 5, 16 * 9 + 15, 33])
def test_chunked_encode_equals_one_pass(length):
    """Long voices are encoded in chunks for bounded memory; the result is the one-pass result."""
    from vibevoice_mlx.fixtures import tiny_config

    cfg = TokenizerConfig.from_dict(tiny_config()["acoustic_tokenizer_config"])
    mx.random.seed(7)
    enc = AcousticTokenizer(cfg).encoder
    x = mx.random.normal((2, length, 1))
    whole = enc(x, chunk_frames=None)
    chunked = enc(x, chunk_frames=2)
    assert chunked.shape == whole.shape == (2, -(-length // 16), cfg.vae_dim)
    np.testing.assert_allclose(np.array(chunked), np.array(whole), atol=1e-5, rtol=1e-5)
    pieces = list(enc.chunks(x, chunk_frames=2))  # what the server steps through between frames
    assert len(pieces) == -(-(length // 16) // 2) + (length % 16 > 0)
    assert np.array_equal(np.array(mx.concatenate(pieces, axis=1)), np.array(chunked))
