"""The MLX realtime model against Microsoft's original code (tests/data/realtime_tiny, recorded by
parity_tests/realtime_reference.py on the same tiny weights): every component on fixed inputs, then whole runs with
the reference's injected noise and forced stop. float32 throughout.

Observed max errors (float32, MLX CPU) are written beside each tolerance.
"""

import json

import mlx.core as mx
import numpy as np
import pytest

from vibevoice_mlx.scheduler import DPMSolver, sample_latent
from vibevoice_mlx.testing import (REALTIME_RUNS, REALTIME_TINY as DATA, assert_close, realtime_golden_run,
                                   realtime_tiny)
from vibevoice_mlx.windows import TextIds


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return realtime_tiny(tmp_path_factory.mktemp("voice"))


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0].model


@pytest.fixture(scope="module")
def voice(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def comp():
    return {k: np.array(v) for k, v in mx.load(str(DATA / "components.safetensors")).items()}


@pytest.fixture(scope="module")
def golden():
    return json.loads((DATA / "golden.json").read_text())


def test_diffusion_head(model, comp):
    v = model.model.prediction_head(mx.array(comp["head.x"]), mx.array(comp["head.t"]), mx.array(comp["head.condition"]))
    assert_close("head v", v, comp["head.v"], atol=2e-5)  # observed 1.1e-5 at |v| 2.9


@pytest.mark.parametrize("n", [5, 10])
def test_schedule(model, comp, n):
    solver = DPMSolver.from_config(model.config.scheduler)
    assert solver.timesteps(n) == comp[f"schedule{n}.timesteps"].tolist()
    assert_close("sigmas", solver.sigmas(n), comp[f"schedule{n}.sigmas"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("n,cfg", [(5, 1.5), (10, 1.3)])
def test_sampler(model, comp, n, cfg):
    sched = DPMSolver.from_config(model.config.scheduler).schedule(n)
    z = sample_latent(model.model.prediction_head, mx.array(comp["sample.h_pos"])[None],
                      mx.array(comp["sample.h_neg"])[None], mx.array(comp[f"sample{n}.noise"])[None], sched, cfg)
    assert_close(f"z after {n} steps", z[0], comp[f"sample{n}.z"], atol=2e-5)


def test_decoder(model, comp):
    dec = model.model.acoustic_tokenizer.decoder
    lat = mx.array(comp["decoder.latents"])[None]
    one = dec(lat).reshape(-1)
    assert_close("decoder one-shot", one, comp["decoder.one_shot"], atol=1e-5)  # observed 1.2e-6
    state, chunks = dec.make_state(1), []
    for i in range(lat.shape[1]):
        a, state = dec.stream(lat[:, i : i + 1], state)
        chunks.append(a.reshape(-1))
    assert_close("decoder streamed", mx.concatenate(chunks), comp["decoder.streamed"], atol=1e-5)  # observed 1.2e-6


def test_connector_and_classifier(model, comp):
    out = model.model.acoustic_connector(mx.array(comp["connector.z"]))
    assert_close("connector", out, comp["connector.out"], atol=1e-5)
    logit = model.tts_eos_classifier(mx.array(comp["classifier.h"]))
    assert_close("EOS logit", logit, comp["classifier.logit"], atol=1e-5)


@pytest.mark.parametrize("stream", ["lower_lm", "tts_lm"])
def test_language_models(model, comp, stream):
    lm = model.model.language_model if stream == "lower_lm" else model.model.tts_language_model
    h = lm(None, input_embeddings=mx.array(comp[f"{stream}.inputs_embeds"])[None])[0]
    assert_close(stream, h, comp[f"{stream}.last_hidden_state"], atol=1e-5)  # observed 2.1e-6


@pytest.mark.parametrize("name", REALTIME_RUNS)
def test_whole_run(model, voice, name):
    got, want, probs, want_probs = realtime_golden_run(model, voice, name)
    peak = float(np.abs(want).max())
    assert_close(f"{name} audio", got, want, atol=5e-4 * peak)  # observed 6e-6 at peak 0.6
    # The EOS probabilities the forced rule saw are the reference's true values.
    assert_close("EOS probabilities", probs, want_probs, atol=1e-5)


def test_a_batch_equals_its_solo_runs(model, voice, golden):
    """Three utterances of different lengths, windows and stops in one batch: each row's audio is its solo run."""
    from vibevoice_mlx.windows import Batch, Row

    runs = {n: {k: np.array(v) for k, v in mx.load(str(DATA / f"run_{n}.safetensors")).items()}
            for n in ("demo", "multiple5", "midwindow")}

    def row(name):
        noise, stop = mx.array(runs[name]["noise"]), golden["runs"][name]["stop_frame"]
        return Row(TextIds(runs[name]["text_ids"].tolist(), closed=True), lambda f: noise[f],
                   lambda f, p: f >= stop)

    solo = {}
    for name in runs:
        b = Batch(model, cfg_scale=1.5, steps=5)
        b.add(row(name), voice)
        solo[name] = np.concatenate([np.array(a) for _ in iter(lambda: b.active, False) for _, a in b.step()])
    b, rows = Batch(model, cfg_scale=1.5, steps=5), {}
    for name in runs:
        rows[name] = row(name)
        b.add(rows[name], voice)
    got = {name: [] for name in runs}
    while b.active:
        for r, a in b.step():
            got[next(n for n in rows if rows[n] is r)].append(np.array(a))
    for name in runs:
        together = np.concatenate(got[name])
        assert together.shape == solo[name].shape
        err = float(np.abs(together - solo[name]).max())
        assert err == 0.0, f"{name}: batched audio differs from its solo run by {err:.3g}"
