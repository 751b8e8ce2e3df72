"""VibeVoice-Realtime-0.5B voice presets: the restricted .pt reader, the safetensors voices, the preset cache, the
`voices` command and the refusals. Offline: presets are written here in the exact layout of Microsoft's files
(realtime.md §3.1), with the pickle built by a pickler that names the five globals without importing them."""

import functools
import hashlib
import http.server
import io
import json
import pickle
import pickletools
import threading
import zipfile
from collections import OrderedDict

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from vibevoice_mlx import preset_store as store
from vibevoice_mlx import presets
from vibevoice_mlx.audio import load_voice, save_voice
from vibevoice_mlx.cli import main
from vibevoice_mlx.errors import UserError
from vibevoice_mlx.presets import PresetError, PresetShape, bf16_to_float32, convert_pt, load_preset, read_pt
from vibevoice_mlx.testing import offline_hub
from vibevoice_mlx.voices import read_voice

FIVE = {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch BFloat16Storage",
        "transformers.modeling_outputs BaseModelOutputWithPast", "transformers.cache_utils DynamicCache"}
SHAPE = PresetShape(hidden_size=16, lm_layers=2, tts_layers=3, kv_heads=2, head_dim=4)


# --- a writer of the real format: protocol 2, GLOBAL opcodes, BFloat16 storages by persistent id ---

def _named(module, name):
    return type(name, (), {"pickle_as": (module, name)})


REBUILD = _named("torch._utils", "_rebuild_tensor_v2")
BF16 = _named("torch", "BFloat16Storage")


class Output(dict):
    pickle_as = ("transformers.modeling_outputs", "BaseModelOutputWithPast")

    def __reduce__(self):  # as transformers' ModelOutput pickles: REDUCE with 4 fields, SETITEMS, BUILD
        h, c = self["last_hidden_state"], self["past_key_values"]
        state = {"last_hidden_state": h, "past_key_values": c, "hidden_states": None, "attentions": None}
        return Output, (h, c, None, None), state, None, iter(self.items())


class Cache:  # pickled by NEWOBJ without arguments, then BUILD of its __dict__
    pickle_as = ("transformers.cache_utils", "DynamicCache")


class Storage:
    def __init__(self, key, bits):
        self.key, self.bits = key, bits


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, OrderedDict())

    def __reduce__(self):
        return REBUILD, self.args


class _Pickler(pickle._Pickler):
    def save_global(self, obj, name=None):
        module, name = getattr(obj, "pickle_as", (obj.__module__, obj.__qualname__))
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", BF16, obj.key, "cuda:0", obj.bits.size)
        return None


def write_pt(path, top, storages, root="Wayne"):
    """A torch.save archive of `top` (objects above) with the storages' raw bf16 bits."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(top)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{root}/data.pkl", buf.getvalue())
        z.writestr(f"{root}/byteorder", "little")
        for s in storages:
            z.writestr(f"{root}/data/{s.key}", s.bits.astype("<u2").tobytes())
        z.writestr(f"{root}/version", "3\n")
        z.writestr(f"{root}/.data/serialization_id", "0123456789")
    return path


def make_preset(path, seed=0, prompt=5, voice=3, shape=SHAPE, root="Wayne", hidden_offset=0):
    """A preset in Microsoft's layout with random bf16 bits. K/V are strided views as in the real files (memory
    order [1, S, kv_heads, head_dim], logical [1, kv_heads, S, head_dim]). Returns the logical arrays expected."""
    rng = np.random.default_rng(seed)
    storages, want, top = [], {}, {}

    def storage(bits):
        s = Storage(str(len(storages)), bits.ravel())
        storages.append(s)
        return s

    kv, hd, hidden = shape.kv_heads, shape.head_dim, shape.hidden_size
    for branch, layers, seq in (("lm", shape.lm_layers, prompt), ("tts_lm", shape.tts_layers, voice + prompt),
                                ("neg_lm", shape.lm_layers, 1), ("neg_tts_lm", shape.tts_layers, 1)):
        h = rng.integers(0, 1 << 16, size=(seq, hidden), dtype=np.uint16)
        pad = rng.integers(0, 1 << 16, size=hidden_offset, dtype=np.uint16)
        ht = Tensor(storage(np.concatenate([pad, h.ravel()])), hidden_offset, (1, seq, hidden),
                    (seq * hidden, hidden, 1))
        cache = Cache()
        cache.__dict__.update(_seen_tokens=seq, key_cache=[], value_cache=[])
        entry = {"hidden": h, "keys": [], "values": [], "seen": seq}
        for _ in range(layers):
            for which in ("keys", "values"):
                memory = rng.integers(0, 1 << 16, size=(seq, kv, hd), dtype=np.uint16)
                t = Tensor(storage(memory), 0, (1, kv, seq, hd), (seq * kv * hd, hd, kv * hd, 1))
                cache.__dict__["key_cache" if which == "keys" else "value_cache"].append(t)
                entry[which].append(memory.transpose(1, 0, 2))
        out = Output()
        out["last_hidden_state"], out["past_key_values"] = ht, cache
        top[branch], want[branch] = out, entry
    write_pt(path, top, storages, root=root)
    return want


def _globals(path):
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    return {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


# --- the reader ---

def test_the_writer_makes_the_real_format(tmp_path):
    path = tmp_path / "p.pt"
    make_preset(path)
    assert _globals(path) == FIVE


@pytest.mark.parametrize("root,offset", [("Wayne", 0), ("3752_4943_000011_000000", 7)])
def test_reads_strided_bf16_bitwise(tmp_path, root, offset):
    path = tmp_path / "p.pt"
    want = make_preset(path, seed=1, root=root, hidden_offset=offset)
    got = read_pt(path)
    assert list(got) == ["lm", "tts_lm", "neg_lm", "neg_tts_lm"]
    for branch, w in want.items():
        assert got[branch]["seen"] == w["seen"]
        np.testing.assert_array_equal(got[branch]["hidden"], w["hidden"])
        for which in ("keys", "values"):
            assert len(got[branch][which]) == len(w[which])
            for g, e in zip(got[branch][which], w[which]):
                assert g.dtype == np.uint16 and g.flags.c_contiguous
                np.testing.assert_array_equal(g, e)
    # read as contiguous (what a naive reader does), the storage scrambles heads and positions
    naive = want["lm"]["keys"][0].transpose(1, 0, 2).reshape(want["lm"]["keys"][0].shape)
    assert not np.array_equal(naive, got["lm"]["keys"][0])


def test_bf16_to_float32_is_exact():
    bits = np.array([0x3F80, 0xC000, 0x0000, 0x8000, 0x7F80, 0x4049], np.uint16)
    np.testing.assert_array_equal(bf16_to_float32(bits), np.array([1.0, -2.0, 0.0, -0.0, np.inf, 3.140625],
                                                                  np.float32))
    assert np.signbit(bf16_to_float32(bits)[3])


def _malicious(tmp_path, pickle_bytes, root="evil"):
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{root}/data.pkl", pickle_bytes)
        z.writestr(f"{root}/byteorder", "little")
    return path


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"), ("posix", "system"),
                                         ("transformers.cache_utils", "StaticCache"), ("torch", "FloatStorage")])
@pytest.mark.parametrize("opcode", ["GLOBAL", "STACK_GLOBAL", "INST"])
def test_a_class_outside_the_five_is_refused_by_name_and_nothing_runs(tmp_path, module, name, opcode):
    marker = tmp_path / "ran"
    arg = f"open({str(marker)!r}, 'w')" if name == "eval" else f"touch {marker}"
    s = pickle.dumps(arg, protocol=2)[2:-1]  # the argument string's opcodes
    if opcode == "GLOBAL":
        body = b"\x80\x02c" + f"{module}\n{name}\n".encode() + s + b"\x85R."
    elif opcode == "STACK_GLOBAL":
        body = (b"\x80\x04" + pickle.dumps(module, 4)[2:-1] + pickle.dumps(name, 4)[2:-1] + b"\x93" + s + b"\x85R.")
    else:  # INST: MARK args INST module name
        body = b"(" + s + b"i" + f"{module}\n{name}\n".encode() + b"."
    with pytest.raises(PresetError, match=rf"refused to load the class {module}\.{name}\b"):
        read_pt(_malicious(tmp_path, body))
    assert not marker.exists()


def test_a_preset_with_a_sixth_class_inside_is_refused(tmp_path):
    path = tmp_path / "p.pt"
    make_preset(path)
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    pkl = entries["Wayne/data.pkl"]
    entries["Wayne/data.pkl"] = pkl.replace(b"cache_utils\nDynamicCache", b"cache_utils\nStaticCache")
    with zipfile.ZipFile(path, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)
    with pytest.raises(PresetError, match="transformers.cache_utils.StaticCache"):
        read_pt(path)


def test_size_bounds_and_broken_archives(tmp_path, monkeypatch):
    path = tmp_path / "p.pt"
    make_preset(path)
    monkeypatch.setattr(presets, "MAX_ENTRIES", 10)
    with pytest.raises(PresetError, match="entries"):
        read_pt(path)
    monkeypatch.setattr(presets, "MAX_ENTRIES", 4096)
    monkeypatch.setattr(presets, "MAX_PICKLE_BYTES", 100)
    with pytest.raises(PresetError, match="pickle"):
        read_pt(path)
    monkeypatch.setattr(presets, "MAX_ARCHIVE_BYTES", 1000)
    with pytest.raises(PresetError, match="larger than any voice preset"):
        read_pt(path)
    (tmp_path / "x.pt").write_bytes(b"not a zip")
    with pytest.raises(PresetError, match="torch.save zip"):
        read_pt(tmp_path / "x.pt")
    monkeypatch.setattr(presets, "MAX_ARCHIVE_BYTES", 256 << 20)
    monkeypatch.setattr(presets, "MAX_PICKLE_BYTES", 8 << 20)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("Wayne/data/0")
    raw = bytearray(path.read_bytes())
    raw[info.header_offset + 30 + len(info.filename) + len(info.extra) + 1] ^= 0xFF  # a storage byte: CRC fails
    path.write_bytes(bytes(raw))
    with pytest.raises(PresetError, match="CRC"):
        read_pt(path)


def _one_tensor(tmp_path, size, stride, offset=0, numel=6, nbytes=None):
    """A pickle holding one tensor record over one storage (for the bounds of _rebuild_tensor_v2)."""
    st = Storage("0", np.arange(numel, dtype=np.uint16))
    path = tmp_path / "t.pt"
    write_pt(path, Tensor(st, offset, size, stride), [st])
    if nbytes is not None:
        with zipfile.ZipFile(path) as z:
            entries = {n: z.read(n) for n in z.namelist()}
        entries["Wayne/data/0"] = entries["Wayne/data/0"][:nbytes]
        with zipfile.ZipFile(path, "w") as z:
            for n, data in entries.items():
                z.writestr(n, data)
    return path


@pytest.mark.parametrize("size,stride,offset,nbytes,match", [
    ((2, 3), (3, 1), 1, None, "reaches element 6"),  # a view past the storage's end
    ((2, 3), (8, 1), 0, None, "reaches element"),
    ((1000000, 1000000), (0, 0), 0, None, "in a storage of 6"),  # a small file cannot ask for a huge array
    ((2, 3), (3, 1), 0, 10, "10 bytes for 6"),
])
def test_tensor_records_stay_inside_their_storage(tmp_path, size, stride, offset, nbytes, match):
    with pytest.raises(PresetError, match=match):
        read_pt(_one_tensor(tmp_path, size, stride, offset, nbytes=nbytes))


def test_a_tensor_view_honours_offset_and_strides(tmp_path):
    st = Storage("0", np.arange(12, dtype=np.uint16))
    path = write_pt(tmp_path / "t.pt", [Tensor(st, 1, (3, 2), (1, 4)), Tensor(st, 0, (2, 2, 3), (6, 1, 2))], [st])
    pickled = presets._PresetUnpickler(*presets._archive(path), path).load()
    np.testing.assert_array_equal(pickled[0].bits, np.arange(12)[1:].reshape(-1)[[0, 4, 1, 5, 2, 6]].reshape(3, 2))
    np.testing.assert_array_equal(pickled[1].bits, np.arange(12).reshape(2, 3, 2).transpose(0, 2, 1))


def test_a_file_that_is_not_a_preset_says_so(tmp_path):
    path = tmp_path / "p.pt"
    write_pt(path, {"lm": 1}, [])
    with pytest.raises(PresetError, match="not a VibeVoice-Realtime voice preset: top-level keys"):
        read_pt(path)


# --- safetensors voices ---

def test_convert_and_load_keep_every_bit(tmp_path):
    src = tmp_path / "en-Test_man.pt"
    want = make_preset(src, seed=3, prompt=6, voice=4)
    meta = convert_pt(src, tmp_path / "v.safetensors")
    assert meta["prompt_length"] == 6 and meta["tts_length"] == 10
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    voice = load_preset(tmp_path / "v.safetensors", shape=SHAPE)
    assert (voice.prompt_length, voice.tts_length, voice.shape) == (6, 10, SHAPE)
    assert voice.meta["format"] == presets.PRESET_FORMAT and voice.meta["model_family"] == "vibevoice-realtime"
    assert set(voice.caches) == {"lm", "tts_lm", "neg_tts_lm"}  # neg_lm is dropped
    for branch, (keys, values) in voice.caches.items():
        assert keys.dtype == mx.bfloat16
        np.testing.assert_array_equal(np.array(keys.view(mx.uint16)), np.stack(want[branch]["keys"]))
        np.testing.assert_array_equal(np.array(values.view(mx.uint16)), np.stack(want[branch]["values"]))
    np.testing.assert_array_equal(np.array(voice.neg_hidden.view(mx.uint16)), want["neg_tts_lm"]["hidden"][-1])
    fp32 = load_preset(tmp_path / "v.safetensors", dtype=mx.float32)
    np.testing.assert_array_equal(np.array(fp32.caches["tts_lm"][0]), bf16_to_float32(np.stack(want["tts_lm"]["keys"])))


def test_a_preset_for_another_model_size_is_refused_in_one_line(tmp_path):
    src = tmp_path / "p.pt"
    make_preset(src)
    convert_pt(src, tmp_path / "v.safetensors")
    other = PresetShape(hidden_size=896, lm_layers=4, tts_layers=20, kv_heads=2, head_dim=64)
    with pytest.raises(PresetError, match="for another model size") as e:
        load_preset(tmp_path / "v.safetensors", shape=other)
    assert "\n" not in str(e.value) and "4+20 layers" in str(e.value)


def test_a_damaged_voice_file_is_one_line(tmp_path):
    src = tmp_path / "p.pt"
    make_preset(src)
    path = tmp_path / "v.safetensors"
    convert_pt(src, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(PresetError) as e:
        load_preset(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_shape_from_the_released_config():
    config = {"tts_backbone_num_hidden_layers": 20,
              "decoder_config": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                                 "num_key_value_heads": 2}}
    assert PresetShape.from_config(config) == PresetShape(896, 4, 20, 2, 64)


def test_the_1_5b_and_realtime_voices_refuse_each_other(tmp_path):
    saved = save_voice(tmp_path / "alice.safetensors", np.zeros((1, 8), np.float32), {"num_samples": 3000,
                                                                                       "model": "tiny"})
    with pytest.raises(PresetError, match="saved for VibeVoice 1.5B/7B.*en-Carter_man"):
        store.load_voice_preset(saved)
    src = tmp_path / "p.pt"
    make_preset(src)
    rt = tmp_path / "rt.safetensors"
    convert_pt(src, rt)
    for give in (lambda: load_voice(rt), lambda: read_voice(rt), lambda: read_voice(src),
                 lambda: read_voice("en-Davis_man")):
        with pytest.raises(UserError, match="is a VibeVoice-Realtime-0.5B voice preset, which VibeVoice 1.5B/7B"):
            give()


# --- names, the cache, fetching ---

@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VIBEVOICE_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(store.URL_ENV, raising=False)
    monkeypatch.delenv(store.OFFLINE_ENV, raising=False)
    return tmp_path / "cache" / "realtime-voices"


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A preset server on 127.0.0.1 with one known preset (its checksum pinned for the test); counts requests."""
    root = tmp_path / "served"
    root.mkdir()
    make_preset(root / "en-Davis_man.pt", seed=5)
    monkeypatch.setitem(store.PRESET_BLOBS, "en-Davis_man", store.git_blob_id((root / "en-Davis_man.pt").read_bytes()))
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv(store.URL_ENV, f"http://127.0.0.1:{httpd.server_address[1]}/voices/")
    (root / "voices").mkdir()
    (root / "en-Davis_man.pt").rename(root / "voices" / "en-Davis_man.pt")
    yield requests
    httpd.shutdown()
    httpd.server_close()


def test_the_25_names_are_pinned_at_one_commit():
    assert len(store.PRESET_NAMES) == 25 and "en-Davis_man" in store.PRESET_NAMES
    assert store.preset_url("en-Davis_man") == ("https://raw.githubusercontent.com/microsoft/VibeVoice/"
                                                f"{store.COMMIT}/demo/voices/streaming_model/en-Davis_man.pt")
    assert len(store.COMMIT) == 40 and all(len(b) == 40 for b in store.PRESET_BLOBS.values())


def test_a_named_preset_is_fetched_once_then_served_from_the_cache(cache, server):
    voice = store.load_voice_preset("en-Davis_man", shape=SHAPE)
    assert server == ["/voices/en-Davis_man.pt"]
    assert (cache / "en-Davis_man.pt").is_file() and (cache / "en-Davis_man.safetensors").is_file()
    assert voice.meta["source"] == "en-Davis_man.pt"
    mtime = (cache / "en-Davis_man.safetensors").stat().st_mtime_ns
    store.load_voice_preset("en-Davis_man")
    assert server == ["/voices/en-Davis_man.pt"]  # no second request, no second conversion
    assert (cache / "en-Davis_man.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in cache.iterdir()] and not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_a_download_that_does_not_match_the_commit_is_not_kept(cache, server, monkeypatch):
    monkeypatch.setitem(store.PRESET_BLOBS, "en-Davis_man", "0" * 40)
    with pytest.raises(PresetError, match="checksum mismatch"):
        store.resolve_voice("en-Davis_man")
    assert not cache.exists() or not list(cache.iterdir())


@pytest.mark.parametrize("how", ["hf", "ours"])
def test_offline_names_the_url_and_the_folder_in_one_line(cache, monkeypatch, tmp_path, how):
    if how == "hf":
        offline_hub(monkeypatch, tmp_path / "hf")
    else:
        monkeypatch.setenv(store.OFFLINE_ENV, "1")
    with pytest.raises(PresetError) as e:
        store.resolve_voice("en-Carter_man")
    msg = str(e.value)
    assert "\n" not in msg and ("HF_HUB_OFFLINE" if how == "hf" else store.OFFLINE_ENV) in msg
    assert f"download {store.PRESETS_URL}/en-Carter_man.pt into {cache}/" in msg
    # what the message says to do works: the dropped file is used, offline
    make_preset(tmp_path / "x.pt")
    cache.mkdir(parents=True)
    (tmp_path / "x.pt").rename(cache / "en-Carter_man.pt")
    assert store.resolve_voice("en-Carter_man") == cache / "en-Carter_man.safetensors"


def test_a_pt_path_is_converted_once_keyed_by_its_sha256(cache, tmp_path):
    src = tmp_path / "mine.pt"
    make_preset(src, seed=7)
    got = store.resolve_voice(str(src))
    assert got == cache / "converted" / f"{hashlib.sha256(src.read_bytes()).hexdigest()}.safetensors"
    mtime = got.stat().st_mtime_ns
    assert store.resolve_voice(src) == got and got.stat().st_mtime_ns == mtime
    assert store.resolve_voice(got) == got  # a .safetensors voice is used as it is


def test_a_dropped_preset_that_changed_is_converted_again(cache, tmp_path):
    cache.mkdir(parents=True)
    make_preset(cache / "my-voice.pt", seed=1, prompt=4)
    assert store.load_voice_preset("my-voice").prompt_length == 4
    make_preset(cache / "my-voice.pt", seed=2, prompt=9)
    assert store.load_voice_preset("my-voice").prompt_length == 9


@pytest.mark.parametrize("voice", ["clip.wav", "exists.wav", "array"])
def test_audio_is_refused_naming_the_design_and_the_presets(cache, tmp_path, voice):
    if voice == "exists.wav":
        (tmp_path / voice).write_bytes(b"RIFF")
    given = np.zeros(24000, np.float32) if voice == "array" else str(tmp_path / voice)
    with pytest.raises(PresetError) as e:
        store.resolve_voice(given)
    msg = str(e.value)
    assert "\n" not in msg and "acoustic encoder" in msg and "by design" in msg
    assert all(n in msg for n in store.PRESET_NAMES)


def test_unknown_names_and_missing_files(cache, tmp_path):
    with pytest.raises(PresetError, match="Unknown voice preset 'en-Nobody'.*en-Davis_man"):
        store.resolve_voice("en-Nobody")
    with pytest.raises(FileNotFoundError, match="not found"):
        store.resolve_voice(str(tmp_path / "missing.pt"))


# --- the command ---

def test_voices_lists_known_downloaded_and_converted(cache, tmp_path):
    cache.mkdir(parents=True)
    make_preset(cache / "en-Mike_man.pt")
    store.resolve_voice("en-Mike_man")
    (cache / "experimental_voices" / "de").mkdir(parents=True)
    make_preset(cache / "experimental_voices" / "de" / "my-voice.pt")
    r = CliRunner().invoke(main, ["voices"])
    assert r.exit_code == 0, r.output
    lines = {line.split()[0]: line.split()[1:] for line in r.output.splitlines()[2:-1]}
    assert lines["en-Mike_man"] == ["yes", "yes"] and lines["en-Davis_man"] == ["-", "-"]
    assert lines["my-voice"] == ["yes", "-", "(local)"]
    assert "26 presets, 2 downloaded, 1 converted" in r.output
    r = CliRunner().invoke(main, ["voices", "--json"])
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert len(rows) == 26 and rows["en-Mike_man"]["converted"] == str(cache / "en-Mike_man.safetensors")
    assert rows["en-Davis_man"]["url"] == store.preset_url("en-Davis_man") and not rows["my-voice"]["known"]
    assert store.resolve_voice("my-voice") == cache / "my-voice.safetensors"  # an extracted experimental voice


@pytest.mark.parametrize("name", sorted(FIVE))
def test_a_file_cannot_rebuild_the_stand_ins(tmp_path, name):
    """BUILD on a stand-in (a class or the rebuild function) fails instead of changing it for later loads."""
    module, _, cls = name.partition(" ")
    state = b"N}X\x01\x00\x00\x00xK\x01s\x86"  # (None, {'x': 1}): slot state, set with setattr
    body = b"\x80\x02c" + f"{module}\n{cls}\n".encode() + state + b"b."
    with pytest.raises(PresetError, match="not a readable voice preset"):
        read_pt(_malicious(tmp_path, body))
    assert not any(hasattr(obj, "x") for obj in presets._STANDINS.values())
