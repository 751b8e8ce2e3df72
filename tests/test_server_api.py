"""The OpenAI-compatible API of `vibevoice-mlx serve`, against a server subprocess on the tiny model."""

import base64
import io

import numpy as np
import pytest
import soundfile as sf

import server_helpers as sh

FRAMES = 5


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    return sh.shared_server(tiny, tmp_path_factory)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0, timeout=60)


def test_health_is_public_and_reports_the_model(server):
    r = server.request("GET", "/health", auth=False)
    assert r.status == 200 and r.json()["model"] == "tiny-served" and r.json()["auth"] is True


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic test-key"}])
def test_api_key_is_checked(server, headers):
    for method, path in (("GET", "/v1/models"), ("GET", "/v1/voices"), ("POST", "/v1/audio/speech")):
        r = server.request(method, path, {}, headers=headers, auth=False)
        assert r.status == 401, (path, r.body)
        assert r.error["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"


def test_models_lists_the_served_model(server):
    r = server.request("GET", "/v1/models")
    assert r.status == 200 and [m["id"] for m in r.json()["data"]] == ["tiny-served"]


def test_openai_client_create_gives_valid_audio(client):
    r = client.audio.speech.create(model="tts-1", voice="alloy", input="Speaker 1: Hello.", response_format="wav",
                                   extra_body={"seed": 1, "max_seconds": sh.seconds_for(FRAMES)})
    audio = sh.decode(r.content)
    assert audio.shape == (FRAMES * sh.HOP,) and np.abs(audio).max() > 0


def test_openai_client_streaming_is_one_file(client):
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input="Speaker 1: Streaming.", response_format="wav",
            extra_body={"seed": 2, "max_seconds": sh.seconds_for(40)}) as r:
        assert r.headers["content-type"] == "audio/wav" and r.headers["x-vibevoice-seed"] == "2"
        data = b"".join(r.iter_bytes(chunk_size=256))
    assert data.count(b"RIFF") == 1 and data.startswith(b"RIFF")
    assert sh.decode(data).shape == (40 * sh.HOP,)


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus", "pcm"])
def test_each_response_format_decodes(server, fmt):
    r = server.speech(input="Speaker 1: Formats.", response_format=fmt, seed=3, max_seconds=sh.seconds_for(20))
    assert r.status == 200, r.body
    n = 20 * sh.HOP
    if fmt == "pcm":
        assert r.headers["content-type"] == "audio/pcm" and len(r.body) == 2 * n
        return
    audio = sh.decode(r.body)
    # mp3 adds the encoder's delay and pads to whole frames (576 samples at 24 kHz); the others are exact.
    assert (n <= len(audio) <= n + 2 * 1152) if fmt == "mp3" else len(audio) == n


def test_default_format_is_mp3_as_openai(server):
    r = server.speech(input="Hi.", seed=1, max_seconds=sh.seconds_for(3))
    assert r.status == 200 and r.headers["content-type"] == "audio/mpeg"


def test_sse_events_parse_and_carry_the_audio(server):
    r = server.speech(input="Speaker 1: Events.", response_format="pcm", stream_format="sse", seed=4,
                      max_seconds=sh.seconds_for(FRAMES))
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sh.sse_events(r.body)
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert events[-1]["type"] == "speech.audio.done" and len(deltas) == len(events) - 1 == FRAMES
    pcm = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    usage = events[-1]["usage"]
    assert len(pcm) == 2 * FRAMES * sh.HOP and usage["output_tokens"] == FRAMES and usage["input_tokens"] > 3
    assert usage["total_tokens"] == usage["input_tokens"] + FRAMES
    assert events[-1]["seed"] == 4 and events[-1]["truncated"] is True


def test_same_seed_same_audio(server):
    a, b, c = (server.speech(input="Speaker 1: Again.", response_format="pcm", seed=s,
                             max_seconds=sh.seconds_for(FRAMES)) for s in (9, 9, 10))
    assert a.body == b.body and a.body != c.body


BAD = [
    ({"input": "Hi.", "steps": 0}, 400, "steps", "invalid_value"),
    ({"input": "Hi.", "steps": "many"}, 400, "steps", "invalid_value"),
    ({"input": "Hi.", "cfg_scale": float("nan")}, 400, "cfg_scale", "invalid_value"),
    ({"input": "Hi.", "seed": -1}, 400, "seed", "invalid_value"),
    ({"input": "Hi.", "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"input": "Hi.", "max_seconds": -1}, 400, "max_seconds", "invalid_value"),
    ({"input": "Hi.", "temperature": -0.5}, 400, "temperature", "invalid_value"),
    ({"input": "Hi.", "cfg": 2}, 400, "cfg", "unknown_parameter"),
    ({"input": "Hi.", "speed": 1.5}, 400, "speed", "unsupported_value"),
    ({"input": "Hi.", "instructions": "Speak happily."}, 400, "instructions", "unsupported_value"),
    ({"input": "Hi.", "response_format": "aac"}, 400, "response_format", "unsupported_value"),
    ({"input": "Hi.", "response_format": "ogg"}, 400, "response_format", "invalid_value"),
    ({"input": "Hi.", "stream_format": "chunks"}, 400, "stream_format", "invalid_value"),
    ({"input": "Hi.", "model": "gpt-5"}, 404, "model", "model_not_found"),
    ({}, 400, "input", "missing_parameter"),
    ({"input": "   "}, 400, "input", "empty_input"),
    ({"input": "x" * 2001}, 400, "input", "string_above_max_length"),
    ({"input": "Hi. [pause:soon]"}, 400, None, "invalid_input"),  # the library's own check
    ({"input": "Hi.", "voice": "../../etc/passwd"}, 400, "voice", "invalid_value"),
    ({"input": "Hi.", "voice": "nobody"}, 400, "voice", "voice_not_found"),
    ({"input": "Hi.", "voices": ["alloy", "nobody"]}, 400, "voice", "voice_not_found"),
]


@pytest.mark.parametrize("body,status,param,code", BAD, ids=[str(b[3]) + "-" + str(b[2]) for b in BAD])
def test_bad_input_is_an_openai_error(server, body, status, param, code):
    r = server.request("POST", "/v1/audio/speech", {"model": "tts-1", **body})
    assert r.status == status, r.body
    assert set(r.error) == {"message", "type", "param", "code"}
    assert (r.error["param"], r.error["code"]) == (param, code) and r.error["message"]
    assert r.error["type"] == ("invalid_request_error" if status < 500 else "server_error")


def test_not_json_and_unknown_routes_are_openai_errors(server):
    r = server.request("POST", "/v1/audio/speech", b"{not json", headers={"Content-Type": "application/json"})
    assert r.status == 400 and r.error["code"] == "invalid_json"
    r = server.request("POST", "/v1/audio/speech", [1, 2])
    assert r.status == 400 and r.error["code"] == "invalid_json"
    r = server.request("GET", "/v1/nothing")
    assert r.status == 404 and r.error["code"] == "not_found"
    r = server.request("PUT", "/v1/audio/speech", {})
    assert r.status == 405 and r.error["code"] == "method_not_allowed"


@pytest.fixture(scope="module")
def voices(server):
    """Two saved voices, uploaded as a WAV and a FLAC."""
    rng = np.random.default_rng(0)
    for name, fmt in (("alice", "WAV"), ("bob", "FLAC")):
        clip = sh.wav_bytes(0.1 * rng.standard_normal(2400).astype(np.float32), 16000, fmt)
        r = server.upload_voice(name, clip, filename=f"{name}.{fmt.lower()}")
        assert r.status == 201, r.body
    return ["alice", "bob"]


def test_uploaded_voices_are_listed_and_stored_as_files(server, voices):
    r = server.request("GET", "/v1/voices")
    listed = {v["id"]: v for v in r.json()["data"]}
    assert set(voices) <= set(listed) and listed["alice"]["seconds"] == pytest.approx(0.15)
    assert (server.voices_dir / "alice.safetensors").is_file() and (server.voices_dir / "bob.safetensors").is_file()


def test_a_saved_voice_is_used_by_name(server, voices):
    common = dict(input="Speaker 1: With a voice.", response_format="pcm", seed=5, max_seconds=sh.seconds_for(4))
    with_voice = server.speech(voice="alice", **common)
    as_object = server.speech(voice={"id": "alice"}, **common)
    without = server.speech(voice="alloy", **common)
    assert with_voice.status == as_object.status == without.status == 200
    assert with_voice.body == as_object.body != without.body


def test_several_speakers_with_a_list_of_voices(server, voices):
    r = server.speech(input="Speaker 1: Hi Bob.\nSpeaker 2: Hi Alice!", voices=voices, response_format="wav",
                      seed=6, max_seconds=sh.seconds_for(8))
    assert r.status == 200 and sh.decode(r.body).shape == (8 * sh.HOP,)
    r = server.speech(input="Speaker 1: Hi Bob.\nSpeaker 2: Hi Alice!", voices=["alice"], seed=6)
    assert r.status == 400 and "2 speakers" in r.error["message"]  # the library's refusal, as the CLI's


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 65, "a b", "é"])
def test_voice_names_are_validated(server, name):
    r = server.upload_voice(name, sh.wav_bytes(np.zeros(800, np.float32)))
    assert r.status == 400 and r.error["param"] == "name"
    assert not any(p.name.startswith(".upload") for p in server.voices_dir.iterdir())


def test_voice_upload_refusals(server, voices):
    r = server.upload_voice("alice", sh.wav_bytes(np.zeros(800, np.float32)))
    assert r.status == 409 and r.error["code"] == "voice_exists"
    r = server.upload_voice("noise", b"this is not audio", filename="noise.wav")
    assert r.status == 400 and r.error["code"] == "invalid_audio"
    assert str(server.voices_dir) not in r.error["message"] and ".upload-" not in r.error["message"]
    assert "'noise.wav'" in r.error["message"] and "''" not in r.error["message"], r.error["message"]
    r = server.upload_voice("big", b"\0" * (1024 * 1024 + 1))
    assert r.status == 413 and r.error["code"] == "file_too_large"
    assert not (server.voices_dir / "big.safetensors").exists()


def test_an_upload_is_encoded_as_the_library_encodes_a_voice(server, tiny, tmp_path):
    import vibevoice_mlx as vv
    from vibevoice_mlx.audio import load_voice

    clip = tmp_path / "dora.wav"  # 300 frames of the tiny model: the server encodes it in 19 steps
    clip.write_bytes(sh.wav_bytes(0.1 * np.random.default_rng(4).standard_normal(4800).astype(np.float32)))
    assert server.upload_voice("dora", clip.read_bytes(), filename="dora.wav").status == 201
    want = vv.save_voice(sh.pipe(tiny, tmp_path), str(clip), str(tmp_path / "dora.safetensors"))
    got = load_voice(server.voices_dir / "dora.safetensors")
    assert np.array_equal(got[0], load_voice(want)[0]) and got[1]["num_samples"] == 4800
    assert server.request("DELETE", "/v1/voices/dora").status == 200


def test_a_voice_longer_than_the_context_takes_is_refused_at_upload(server):
    # 2 s is 3000 frames of the tiny model (hop 16): more than half its context of 4096 tokens.
    clip = sh.wav_bytes(0.1 * np.random.default_rng(5).standard_normal(48000).astype(np.float32))
    r = server.upload_voice("long", clip)
    assert r.status == 413 and r.error["code"] == "voice_too_long" and r.error["param"] == "file"
    assert "2.0 s" in r.error["message"] and "context of 4096 tokens" in r.error["message"]
    assert not (server.voices_dir / "long.safetensors").exists()
    assert not any(p.name.startswith(".upload") for p in server.voices_dir.iterdir())


def test_max_voice_seconds_caps_an_upload(tiny, tmp_path):
    from vibevoice_mlx.server.errors import APIError
    from vibevoice_mlx.server.voices import read_upload

    pipe = sh.pipe(tiny, tmp_path)
    clip = tmp_path / "clip.flac"
    clip.write_bytes(sh.wav_bytes(0.1 * np.random.default_rng(6).standard_normal(3600).astype(np.float32),
                                  fmt="FLAC"))
    assert len(read_upload(pipe, clip, max_seconds=0.15)) == 3600
    with pytest.raises(APIError) as e:
        read_upload(pipe, clip, max_seconds=0.1)
    assert e.value.status == 413 and "up to 0.1 s (--max-voice-seconds)" in e.value.message


def test_errors_name_no_server_path(server):
    broken = server.voices_dir / "broken.safetensors"
    broken.write_bytes(b"not a saved voice")
    try:
        r = server.speech(input="Speaker 1: Hi.", voice="broken", response_format="pcm", max_seconds=0.01)
        listed = {v["id"]: v for v in server.request("GET", "/v1/voices").json()["data"]}["broken"]
    finally:
        broken.unlink()
    assert r.status == 400 and "broken.safetensors is not a saved voice" in r.error["message"]
    for message in (r.error["message"], listed["error"]):
        assert str(server.voices_dir) not in message and str(server.voices_dir.parent.name) not in message, message


def test_a_voice_saved_by_another_model_comes_with_a_warning(server, voices):
    from vibevoice_mlx.audio import load_voice, save_voice

    latents, meta = load_voice(server.voices_dir / "alice.safetensors")
    other = {**meta, "model": "other-model", "encoder": "0123456789abcdef"}
    save_voice(server.voices_dir / "foreign.safetensors", latents, other)
    try:
        common = dict(input="Speaker 1: Hi.", response_format="pcm", seed=3, max_seconds=sh.seconds_for(2))
        r = server.speech(voice="foreign", **common)
        own = server.speech(voice="alice", **common)
    finally:
        (server.voices_dir / "foreign.safetensors").unlink()
    assert r.status == 200 and r.body == own.body  # the same latents: the warning is the only difference
    assert "'foreign' was saved by another model (other-model)" in r.headers["x-vibevoice-warning"]
    assert "x-vibevoice-warning" not in own.headers


def test_wav_with_stream_false_is_one_file_with_its_sizes(server):
    import wave

    common = dict(input="Speaker 1: Whole.", response_format="wav", seed=8, max_seconds=sh.seconds_for(6))
    whole, streamed = server.speech(stream=False, **common), server.speech(**common)
    assert whole.status == streamed.status == 200 and int(whole.headers["content-length"]) == len(whole.body)
    with wave.open(io.BytesIO(whole.body)) as w:
        assert w.getnframes() == 6 * sh.HOP
    assert whole.body[44:] == streamed.body[44:] and streamed.body[4:8] == b"\xff" * 4
    r = server.speech(stream=False, stream_format="sse", **common)
    assert r.status == 400 and r.error["param"] == "stream"


def test_voice_delete(server, voices):
    assert server.upload_voice("carol", sh.wav_bytes(np.full(800, 0.1, np.float32))).status == 201
    r = server.request("DELETE", "/v1/voices/carol")
    assert r.status == 200 and r.json() == {"id": "carol", "object": "voice", "deleted": True}
    assert server.request("DELETE", "/v1/voices/carol").status == 404
    assert server.request("DELETE", "/v1/voices/..%2Fx").status in (400, 404)
    assert not (server.voices_dir / "carol.safetensors").exists()


def test_flac_response_is_one_complete_file(server):
    r = server.speech(input="Speaker 1: Flac.", response_format="flac", seed=7, max_seconds=sh.seconds_for(9))
    with sf.SoundFile(io.BytesIO(r.body)) as f:  # the header holds the length: libsndfile reads it as is
        assert f.frames == 9 * sh.HOP
