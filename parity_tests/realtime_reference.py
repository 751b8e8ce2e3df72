"""Golden tensors for VibeVoice-Realtime-0.5B from Microsoft's own code (realtime.md §8), on a tiny seeded model.

    PYTHONPATH=<checkout of github microsoft/VibeVoice at e73d1e1> <reference venv>/bin/python \\
        parity_tests/realtime_reference.py --out tests/data/realtime_tiny

The reference environment (realtime.md §8.1; nothing of it is part of this project): torch 2.13.0,
transformers 4.51.3, accelerate 1.6.0, diffusers 0.39.0, numpy, safetensors, and the `vibevoice/` package of the
Microsoft checkout on PYTHONPATH (never pip-installed). `tests/data/realtime_tiny/README.md` describes every file
written here; `tests/test_realtime_golden.py` checks the committed files without this environment.

What it does: builds a tiny realtime model in the original layout with re-randomized weights (§8.2), saves it as
the release is saved (safetensors without the acoustic encoder), reloads it the way the file demo does on CPU
(float32, SDPA), builds a tiny Qwen2-style tokenizer (§8.3) and a voice preset in the released .pt format (§8.4),
then records the component suite and whole `generate()` runs with injected noise and a forced stop (§8.5).
Everything is seeded and single-threaded; two runs write byte-identical files.

Not a test module (no `test_` prefix): pytest never collects it, and it imports torch and the Microsoft code only
when run.
"""

import argparse
import copy
import json
import math
import shutil
import zlib
from pathlib import Path

COMMIT = "e73d1e17c3754f046352014856a922f8208fb5d3"
SEED = 20260424
HOP = 3200

LM_LAYERS, TTS_LAYERS = 2, 3  # lower and TTS stacks of different depths (a port that swaps them fails)
DECODER = dict(model_type="qwen2", hidden_size=64, intermediate_size=64, num_hidden_layers=LM_LAYERS + TTS_LAYERS,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=280, max_position_embeddings=8192,
               rope_theta=1000000.0, rope_scaling=None, rms_norm_eps=1e-6, hidden_act="silu", attention_dropout=0.0,
               initializer_range=0.02, tie_word_embeddings=False, max_window_layers=LM_LAYERS + TTS_LAYERS,
               use_sliding_window=False, sliding_window=None, use_cache=True)
VAE = 16
ACOUSTIC = dict(channels=1, causal=True, vae_dim=VAE, fix_std=0.5, std_dist_type="gaussian", conv_bias=True,
                conv_norm="none", corpus_normalize=0.0, disable_last_norm=True, layernorm="RMSNorm",
                layernorm_elementwise_affine=True, layernorm_eps=1e-5, layer_scale_init_value=1e-6,
                mixer_layer="depthwise_conv", pad_mode="constant", weight_init_value=0.01,
                encoder_n_filters=4, decoder_n_filters=4, encoder_ratios=[8, 5, 5, 4, 2, 2],
                decoder_ratios=[8, 5, 5, 4, 2, 2],
                # decoder_depths null as in the release: the decoder uses the reversed encoder depths (1-...-1-2)
                encoder_depths="2-1-1-1-1-1-1", decoder_depths=None)
HEAD = dict(hidden_size=64, head_layers=2, head_ffn_ratio=2.0, rms_norm_eps=1e-5, latent_size=VAE, speech_vae_dim=VAE,
            prediction_type="v_prediction", diffusion_type="ddpm", ddpm_num_steps=1000, ddpm_num_inference_steps=20,
            ddpm_beta_schedule="cosine", ddpm_batch_mul=4)

# Tokenizer (§8.3): the 256 byte symbols in GPT-2/Qwen order (' ' = 220, '\n' = 198), a few merges, then the 13
# Qwen2.5 special tokens in Qwen's order, renumbered after the regular vocabulary.
MERGES = [("h", "e"), ("l", "l"), ("Ġ", "t"), ("Ġt", "he"), ("o", "r"), (".", "Ċ"), ("Ġ", "w"), ("i", "n")]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>"]
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
              r"\s+(?!\S)|\s+")

KEEP = ("README.md", "weight-keys-realtime-0.5b.tsv.gz")  # in --out, not written here

PROMPT_TEXT = "the voice prompt"  # the lower-LM part of the preset (P ids)
PROMPT_FRAMES = 5  # K voice frames in front of it in the TTS-LM cache

# Whole runs (§8.5): (name, text, cfg, steps, expected id count, last kept frame)
RUNS = [
    # demo setting; 7 ids (T5 S6 T2 S6 S6): stop at frame 14, inside the speech-only window 2
    ("demo", "Then the win.", 1.5, 5, 7, 14),
    # 10 ids, a multiple of 5: window 2 has no text; stop at frame 15
    ("multiple5", "Hi, the winner.", 1.3, 10, 10, 15),
    # 3 ids (< 5, the first window is the whole text); stop in the middle of window 0
    ("midwindow", "Hi.", 1.5, 5, 3, 2),
]


def _seeded(key, seed=SEED):
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))


def random_tensor(key, shape):
    """A non-degenerate value for one parameter (§8.2); seeded by its name, so order does not matter."""
    import torch

    g = _seeded(key)
    leaf = key.rsplit(".", 1)[-1]
    if len(shape) == 0:
        u = torch.rand((), generator=g).item()
        return torch.tensor(0.8 + 0.4 * u) if "scaling" in key else torch.tensor(-0.2 + 0.4 * u)
    if leaf in ("gamma", "ffn_gamma"):
        return 0.3 + 0.4 * torch.rand(shape, generator=g)
    if len(shape) == 1 and leaf == "weight":
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if leaf == "bias":
        return 0.05 * torch.randn(shape, generator=g)
    if "embed_tokens" in key or "tts_input_types" in key:
        return torch.randn(shape, generator=g)
    if "convtr" in key:  # [in, out, k], stride k/2: each output sees in * k / stride inputs
        fan_in = shape[0] * 2
    else:
        fan_in = math.prod(shape[1:])
    w = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    if key.endswith("decoder.head.conv.conv.weight"):
        w = 0.1 * w  # keep the waveform near +-1
    return w


def realtime_config():
    return dict(model_type="vibevoice_streaming", architectures=["VibeVoiceStreamingForConditionalGenerationInference"],
                acoustic_tokenizer_config=dict(ACOUSTIC), decoder_config=dict(DECODER),
                diffusion_head_config=dict(HEAD), tts_backbone_num_hidden_layers=TTS_LAYERS, torch_dtype="float32")


def build_tokenizer(out):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import Qwen2TokenizerFast
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    fast = Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                              unk_token=None, bos_token=None)
    fast.save_pretrained(str(out))
    return out


def build_model(folder):
    """Tiny model in the original layout, saved as the release is (no encoder keys), reloaded as the CPU demo does."""
    import torch
    from vibevoice.modular.configuration_vibevoice_streaming import VibeVoiceStreamingConfig
    from vibevoice.modular.modeling_vibevoice_streaming_inference import (
        VibeVoiceStreamingForConditionalGenerationInference as Model)

    cfg = realtime_config()
    model = Model(VibeVoiceStreamingConfig(**{k: copy.deepcopy(v) for k, v in cfg.items() if k != "model_type"}))
    state = {k: random_tensor(k, tuple(v.shape)).to(v.dtype) for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    # bf16 on disk, as the release: the reference then computes in fp32 on exact upcasts, as the demo does on CPU
    released = {k: v.to(torch.bfloat16) for k, v in state.items()
                if not k.startswith("model.acoustic_tokenizer.encoder.")}
    model.save_pretrained(str(folder), safe_serialization=True, state_dict=released)
    (folder / "generation_config.json").unlink(missing_ok=True)
    written = json.loads((folder / "config.json").read_text())
    written["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "processor_class": "VibeVoiceStreamingProcessor", "speech_tok_compress_ratio": HOP, "db_normalize": True,
        "audio_processor": {"feature_extractor_type": "VibeVoiceTokenizerProcessor", "sampling_rate": 24000,
                            "normalize_audio": True, "target_dB_FS": -25, "eps": 1e-6},
        "language_model_pretrained_name": "Qwen/Qwen2.5-0.5B"}, indent=2, sort_keys=True) + "\n")
    loaded, info = Model.from_pretrained(str(folder), torch_dtype=torch.float32, attn_implementation="sdpa",
                                         device_map="cpu", output_loading_info=True)
    encoder = {k for k in state if k.startswith("model.acoustic_tokenizer.encoder.")}
    assert set(info["missing_keys"]) == encoder, sorted(set(info["missing_keys"]) ^ encoder)[:5]
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    got = loaded.state_dict()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], v.float()) for k, v in released.items())
    assert loaded.model.language_model.config.num_hidden_layers == LM_LAYERS
    assert isinstance(loaded.model.language_model.norm, torch.nn.Identity)
    return loaded.eval()


def check_release_keys(table):
    """The original module tree at the released config (§1.1, §8.2), encoder dropped: exactly the committed key table
    (605 tensors, 1,017,626,724 parameters), so the tiny model's key structure is checked against the real one."""
    import gzip

    import torch
    from accelerate import init_empty_weights
    from vibevoice.modular.configuration_vibevoice_streaming import VibeVoiceStreamingConfig
    from vibevoice.modular.modeling_vibevoice_streaming_inference import (
        VibeVoiceStreamingForConditionalGenerationInference as Model)

    decoder = dict(DECODER, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2, vocab_size=151936, max_window_layers=24)
    acoustic = dict(ACOUSTIC, vae_dim=64, encoder_n_filters=32, decoder_n_filters=32, encoder_depths="3-3-3-3-3-3-8")
    head = dict(HEAD, hidden_size=896, head_layers=4, head_ffn_ratio=3.0, latent_size=64, speech_vae_dim=64)
    config = VibeVoiceStreamingConfig(acoustic_tokenizer_config=acoustic, decoder_config=decoder,
                                      diffusion_head_config=head, tts_backbone_num_hidden_layers=20)
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False  # else every skeleton tensor is NaN-filled
    try:
        with init_empty_weights():
            model = Model(config)
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
    got = {k: list(v.shape) for k, v in model.state_dict().items()
           if not k.startswith("model.acoustic_tokenizer.encoder.")}
    with gzip.open(table, "rt") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if not line.startswith(("#", "original_key"))]
    want = {key: json.loads(shape) for key, _, shape, _ in rows}
    assert got == want, sorted(set(got) ^ set(want))[:5]
    assert len(got) == 605 and sum(math.prod(s) for s in got.values()) == 1_017_626_724


def _fresh_cache():
    from transformers.cache_utils import DynamicCache

    return DynamicCache()


def build_preset(model, tokenizer, out):
    """A voice preset in the released format (§3.1, §8.4) plus its tensors in safetensors, bf16 and fp32."""
    import torch
    from safetensors.torch import save_file
    from transformers.modeling_outputs import BaseModelOutputWithPast

    pad = tokenizer.pad_id
    prompt = tokenizer.encode(PROMPT_TEXT, add_special_tokens=False)
    P, K = len(prompt), PROMPT_FRAMES
    latents = torch.randn((1, K, VAE), generator=_seeded("preset.latents"))
    with torch.no_grad():
        ones = lambda n: torch.ones((1, n), dtype=torch.long)  # noqa: E731
        lm = model.forward_lm(input_ids=torch.tensor([prompt]), attention_mask=ones(P), past_key_values=_fresh_cache(),
                              use_cache=True, return_dict=True)
        speech = model.model.acoustic_connector(latents)
        tts_lm = model.forward_tts_lm(
            input_ids=torch.full((1, K + P), pad), attention_mask=ones(K + P), past_key_values=_fresh_cache(),
            use_cache=True, return_dict=True, lm_last_hidden_state=torch.cat([speech, lm.last_hidden_state], 1),
            tts_text_masks=torch.tensor([[0] * K + [1] * P]))
        neg_lm = model.forward_lm(input_ids=torch.tensor([[pad]]), attention_mask=ones(1),
                                  past_key_values=_fresh_cache(), use_cache=True, return_dict=True)
        neg_tts_lm = model.forward_tts_lm(
            input_ids=torch.tensor([[pad]]), attention_mask=ones(1), past_key_values=_fresh_cache(), use_cache=True,
            return_dict=True, lm_last_hidden_state=neg_lm.last_hidden_state, tts_text_masks=torch.tensor([[1]]))
    preset, fp32, bf16 = {}, {}, {}
    for name, o in (("lm", lm), ("tts_lm", tts_lm), ("neg_lm", neg_lm), ("neg_tts_lm", neg_tts_lm)):
        cache = o.past_key_values
        fp32[f"{name}.last_hidden_state"] = o.last_hidden_state.contiguous().clone()
        for kind in ("key", "value"):
            for i, t in enumerate(getattr(cache, f"{kind}_cache")):
                S = t.shape[2]
                if S > 1:  # the released layout: memory order [batch, seq, kv_heads, head_dim] (§3.1)
                    heads, dim = t.shape[1], t.shape[3]
                    assert t.stride() == (S * heads * dim, dim, heads * dim, 1), t.stride()
                fp32[f"{name}.{kind}.{i}"] = t.contiguous().clone()
                getattr(cache, f"{kind}_cache")[i] = t.to(torch.bfloat16)  # keeps the strides
        bf16.update({k: v.to(torch.bfloat16) for k, v in fp32.items() if k.startswith(name + ".")})
        preset[name] = BaseModelOutputWithPast(last_hidden_state=o.last_hidden_state.to(torch.bfloat16),
                                               past_key_values=cache)
    torch.save(preset, str(out / "voice.pt"))
    back = torch.load(str(out / "voice.pt"), map_location="cpu", weights_only=False)
    for name, o in back.items():  # what a reader gets back: the bf16 values, K/V still strided views
        assert torch.equal(o.last_hidden_state, bf16[f"{name}.last_hidden_state"])
        for i, (k, v) in enumerate(zip(o.past_key_values.key_cache, o.past_key_values.value_cache)):
            assert torch.equal(k, bf16[f"{name}.key.{i}"]) and torch.equal(v, bf16[f"{name}.value.{i}"])
            assert k.shape[2] == 1 or not k.is_contiguous()
    save_file(bf16, str(out / "voice.safetensors"), metadata={"format": "pt"})
    fp32["prompt_ids"] = torch.tensor(prompt, dtype=torch.int64)
    fp32["prompt_latents"] = latents[0].clone()
    save_file(fp32, str(out / "voice_fp32.safetensors"), metadata={"format": "pt"})
    return dict(P=P, K=K, prompt_ids=prompt, prompt_text=PROMPT_TEXT)


def _randn(shape, key):
    import torch

    return torch.randn(shape, generator=_seeded(key))


def record_components(model):
    """The component suite on fixed seeded inputs, each piece called as generate() calls it."""
    import torch
    from vibevoice.modular.modular_vibevoice_tokenizer import VibeVoiceTokenizerStreamingCache

    H = DECODER["hidden_size"]
    m = model.model
    out = {}
    with torch.no_grad():
        # diffusion head on fixed x / t / condition (t as floats of the model dtype, as sample_speech_tokens passes)
        x, cond = _randn((4, VAE), "head.x"), _randn((4, H), "head.cond")
        t = torch.tensor([999.0, 599.0, 200.0, 0.0])
        v = m.prediction_head(x, t, condition=cond)
        out.update({"head.x": x, "head.t": t, "head.condition": cond, "head.v": v})
        # the DPM-Solver++ schedules
        for n in (5, 10):
            m.noise_scheduler.set_timesteps(n)
            out[f"schedule{n}.timesteps"] = m.noise_scheduler.timesteps.clone()
            out[f"schedule{n}.sigmas"] = m.noise_scheduler.sigmas.to(torch.float32).clone()
        # sample_speech_tokens with fixed noise, both cfg / steps settings, with the per-step x and v
        pos, neg = _randn((1, H), "sample.pos"), _randn((1, H), "sample.neg")
        out.update({"sample.h_pos": pos[0], "sample.h_neg": neg[0]})
        for name, cfg, steps in (("sample5", 1.5, 5), ("sample10", 1.3, 10)):
            noise = _randn((VAE,), f"{name}.noise")
            xs, vs = [], []
            with InjectNoise(noise[None], xs, vs, model) as injected:
                model.ddpm_inference_steps = steps
                z = model.sample_speech_tokens(pos, neg, cfg_scale=cfg)
            assert injected.used == 1 and len(xs) == steps
            out.update({f"{name}.noise": noise, f"{name}.x": torch.stack(xs), f"{name}.v": torch.stack(vs),
                        f"{name}.z": z[0]})
        # the σ-VAE decoder: one-shot over 3 frames and streamed one frame at a time, as generate() calls it
        lat = _randn((1, 3, VAE), "decoder.latents")
        out["decoder.latents"] = lat[0]
        out["decoder.one_shot"] = m.acoustic_tokenizer.decode(lat)[0, 0]
        cache, chunks = VibeVoiceTokenizerStreamingCache(), []
        for f in range(3):
            chunks.append(m.acoustic_tokenizer.decode(lat[:, f:f + 1], cache=cache, sample_indices=torch.tensor([0]),
                                                      use_cache=True, debug=False)[0, 0])
        out["decoder.streamed"] = torch.cat(chunks)
        # connector and EOS classifier
        z = _randn((3, VAE), "connector.z")
        out.update({"connector.z": z, "connector.out": m.acoustic_connector(z)})
        h = _randn((3, H), "classifier.h")
        out.update({"classifier.h": h, "classifier.logit": model.tts_eos_classifier(h)[:, 0]})
        # each LM stack on fixed inputs_embeds without cache, with every layer's output
        for name, lm in (("lower_lm", m.language_model), ("tts_lm", m.tts_language_model)):
            e = _randn((1, 7, H), f"{name}.embeds")
            o = lm(inputs_embeds=e, use_cache=False, output_hidden_states=True, return_dict=True)
            out.update({f"{name}.inputs_embeds": e[0], f"{name}.last_hidden_state": o.last_hidden_state[0],
                        f"{name}.hidden_states": torch.stack([s[0] for s in o.hidden_states])})
    return {k: v.contiguous() for k, v in out.items()}


class InjectNoise:
    """Patch the RNG for one generate()/sample call: every torch.randn(2, vae) returns [z_k; z_k] from `noise`,
    every other RNG entry point fails; records each scheduler step's guided v and resulting x."""

    def __init__(self, noise, xs, vs, model):
        self.noise, self.xs, self.vs, self.model, self.used = noise, xs, vs, model, 0

    def __enter__(self):
        import torch

        self.saved = {n: getattr(torch, n) for n in ("randn", "randn_like", "rand", "randint", "multinomial",
                                                     "normal", "bernoulli", "rand_like")}

        def randn(*shape, **kw):
            assert tuple(shape) == (2, VAE) and not kw, (shape, kw)
            z = self.noise[self.used]
            self.used += 1
            return torch.stack([z, z])

        def refuse(*a, **kw):
            raise AssertionError("unexpected RNG call in generate()")

        for n in self.saved:
            setattr(torch, n, randn if n == "randn" else refuse)
        sched = self.model.model.noise_scheduler
        self.step = sched.step

        def step(model_output, timestep, sample, *a, **kw):
            res = self.step(model_output, timestep, sample, *a, **kw)
            assert torch.equal(model_output[0], model_output[1])
            self.vs.append(model_output[0].clone())
            self.xs.append(res.prev_sample[0].clone())
            return res

        sched.step = step
        return self

    def __exit__(self, *exc):
        import torch

        for n, f in self.saved.items():
            setattr(torch, n, f)
        del self.model.model.noise_scheduler.step
        return False


def record_run(model, processor, preset_path, text, cfg, steps, stop):
    """One whole generate() as the file demo calls it, with injected noise, a forced stop after frame `stop`, and
    the per-frame, per-text-window and per-forward records (§8.5)."""
    import torch

    preset = torch.load(str(preset_path), map_location="cpu", weights_only=False)
    inputs = processor.process_input_with_cached_prompt(text=text, cached_prompt=preset, padding=True,
                                                        return_tensors="pt", return_attention_mask=True)
    ids = inputs["tts_text_ids"][0].tolist()
    n_windows = stop // 6 + 1
    frames = 6 * n_windows
    noise = _randn((frames, VAE), f"run.{text}.{cfg}.{steps}.noise")
    state = copy.deepcopy(preset)
    streams = {id(state["lm"].past_key_values): "lower_lm", id(state["tts_lm"].past_key_values): "tts_pos",
               id(state["neg_tts_lm"].past_key_values): "tts_neg"}
    log, rec = [], {k: [] for k in ("h_pos", "h_neg", "z", "decoder_in", "audio_chunks", "connector",
                                    "h_pos_after", "h_neg_after", "eos_logit", "eos_prob")}
    text_rows = {"lower_lm": [], "tts_pos": []}
    xs, vs = [], []
    m = model.model
    originals = {}

    def wrap(obj, name, fn):
        originals[(obj, name)] = getattr(obj, name)
        setattr(obj, name, fn)

    def forward(stream_fn):
        def call(**kw):
            cache = kw["past_key_values"]
            past = cache.get_seq_length()
            o = stream_fn(**kw)
            stream = streams[id(o.past_key_values)]
            n = o.last_hidden_state.shape[1]
            kind = "text" if stream == "lower_lm" or int(kw["tts_text_masks"][0, -1]) == 1 else "speech"
            log.append(dict(stream=stream, kind=kind, past=past, n=n,
                            positions=kw["position_ids"][0].tolist(), cache_position=kw["cache_position"].tolist()))
            if kind == "text":
                text_rows[stream].append(o.last_hidden_state[0].clone())
            elif stream == "tts_pos":
                rec["h_pos_after"].append(o.last_hidden_state[0, -1].clone())
            else:
                rec["h_neg_after"].append(o.last_hidden_state[0, -1].clone())
            return o
        return call

    def sample(condition, neg_condition, cfg_scale):
        rec["h_pos"].append(condition[0].clone())
        rec["h_neg"].append(neg_condition[0].clone())
        z = originals[(model, "sample_speech_tokens")](condition, neg_condition, cfg_scale=cfg_scale)
        rec["z"].append(z[0].clone())
        return z

    def decode(latents, **kw):
        rec["decoder_in"].append(latents[0, 0].clone())
        audio = originals[(m.acoustic_tokenizer, "decode")](latents, **kw)
        rec["audio_chunks"].append(audio[0, 0].clone())
        return audio

    def connector(features, **kw):
        e = originals[(m.acoustic_connector, "forward")](features, **kw)
        rec["connector"].append(e[0, 0].clone())
        return e

    true_sigmoid = torch.sigmoid

    def sigmoid(x):
        f = len(rec["eos_prob"])
        rec["eos_logit"].append(x[0, 0].clone())
        rec["eos_prob"].append(true_sigmoid(x)[0, 0].clone())
        return torch.full_like(x, 1.0 if f >= stop else 0.0)

    wrap(model, "forward_lm", forward(model.forward_lm))
    wrap(model, "forward_tts_lm", forward(model.forward_tts_lm))
    wrap(model, "sample_speech_tokens", sample)
    wrap(m.acoustic_tokenizer, "decode", decode)
    wrap(m.acoustic_connector, "forward", connector)
    torch.sigmoid = sigmoid
    try:
        model.set_ddpm_inference_steps(num_steps=steps)
        with InjectNoise(noise, xs, vs, model) as noise_state:
            result = model.generate(**inputs, max_new_tokens=None, cfg_scale=cfg, tokenizer=processor.tokenizer,
                                    generation_config={"do_sample": False}, all_prefilled_outputs=state,
                                    verbose=False, show_progress_bar=False)
    finally:
        torch.sigmoid = true_sigmoid
        for obj, name in originals:
            delattr(obj, name)
    assert noise_state.used == frames and len(rec["eos_prob"]) == frames, (noise_state.used, len(rec["eos_prob"]))
    audio = result.speech_outputs[0][0]
    assert audio.shape == (HOP * (stop + 1),)
    assert torch.equal(audio, torch.cat(rec["audio_chunks"][:stop + 1]))
    tensors = {k: torch.stack(v) for k, v in rec.items()}
    tensors.update({"noise": noise, "x": torch.stack(xs).reshape(frames, steps, VAE),
                    "v": torch.stack(vs).reshape(frames, steps, VAE),
                    "text_ids": torch.tensor(ids, dtype=torch.int64),
                    "text_lower_lm": torch.cat(text_rows["lower_lm"]), "text_tts_lm": torch.cat(text_rows["tts_pos"]),
                    "sequences": result.sequences[0]})
    meta = dict(text=text, cfg_scale=cfg, steps=steps, n_ids=len(ids), stop_frame=stop, frames_computed=frames,
                frames_kept=stop + 1, windows=n_windows, window_text_sizes=[len(ids[5 * w:5 * w + 5]) for w in
                                                                              range(n_windows)],
                forwards=log)
    return {k: v.contiguous() for k, v in tensors.items()}, meta


def one_pass(model, preset_path, t, meta):
    """§5.3: each stream recomputed as ONE plain forward over the recorded inputs (same preset cache, positions
    continuing it) against the windowed, cached run. Returns the max abs difference per stream."""
    import torch

    m = model.model
    types = m.tts_input_types.weight
    sizes, F = meta["window_text_sizes"], meta["frames_computed"]
    rows, want, text_at = [], [], 0
    for w, size in enumerate(sizes):
        rows.append(t["text_lower_lm"][text_at:text_at + size] + types[1])
        want.append(t["text_tts_lm"][text_at:text_at + size])
        text_at += size
        rows.append(t["connector"][6 * w:6 * w + 6] + types[0])
        want.append(t["h_pos_after"][6 * w:6 * w + 6])
    frames = t["connector"] + types[0]
    fed = t["text_ids"][:text_at][None]
    preset = torch.load(str(preset_path), map_location="cpu", weights_only=False)
    diffs = {}
    with torch.no_grad():
        for stream, lm, cache, x, expect in (
                ("lower_lm", m.language_model, "lm", m.language_model.embed_tokens(fed)[0], t["text_lower_lm"]),
                ("tts_pos", m.tts_language_model, "tts_lm", torch.cat(rows), torch.cat(want)),
                ("tts_neg", m.tts_language_model, "neg_tts_lm", frames, t["h_neg_after"][:F])):
            past = preset[cache].past_key_values
            start = past.get_seq_length()
            pos = torch.arange(start, start + x.shape[0])[None]
            o = lm(inputs_embeds=x[None], past_key_values=past, position_ids=pos, cache_position=pos[0],
                   use_cache=True, return_dict=True)
            diffs[stream] = float((o.last_hidden_state[0] - expect).abs().max())
    assert max(diffs.values()) < 1e-4, diffs
    return diffs


def _check_positions(meta, P, S):
    """The positions log against §4.7: each stream continues its own cache length."""
    ids, c = meta["n_ids"], 0
    expect = {"lower_lm": P, "tts_pos": S, "tts_neg": 1}
    for e in meta["forwards"]:
        assert e["past"] == expect[e["stream"]], e
        assert e["positions"] == list(range(e["past"], e["past"] + e["n"])), e
        expect[e["stream"]] += e["n"]
        c += e["n"] if e["stream"] == "lower_lm" else 0
    assert c == min(ids, 5 * meta["windows"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import numpy as np
    import torch
    import vibevoice
    from safetensors.torch import save_file
    from vibevoice.modular.modular_vibevoice_text_tokenizer import VibeVoiceTextTokenizerFast
    from vibevoice.processor.vibevoice_streaming_processor import VibeVoiceStreamingProcessor
    from vibevoice.processor.vibevoice_tokenizer_processor import VibeVoiceTokenizerProcessor
    import transformers

    assert transformers.__version__ == "4.51.3", transformers.__version__
    transformers.logging.set_verbosity_error()  # the 276 missing encoder keys are expected (and asserted)
    assert Path(vibevoice.__file__).parent.joinpath("modular", "modeling_vibevoice_streaming_inference.py").exists()
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # everything but the hand-written files is regenerated
        if old.name not in KEEP:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    (out / "model").mkdir()
    build_tokenizer(out / "tokenizer")
    tokenizer = VibeVoiceTextTokenizerFast.from_pretrained(str(out / "tokenizer"))
    assert tokenizer.pad_id == tokenizer.convert_tokens_to_ids("<|image_pad|>") == 256 + len(MERGES) + 12
    assert tokenizer.encode(" \n", add_special_tokens=False) == [220, 198]
    processor = VibeVoiceStreamingProcessor(
        tokenizer=tokenizer, audio_processor=VibeVoiceTokenizerProcessor(
            sampling_rate=24000, normalize_audio=True, target_dB_FS=-25, eps=1e-6),
        speech_tok_compress_ratio=HOP, db_normalize=True)

    check_release_keys(Path(__file__).resolve().parents[1] / "tests" / "data" / "realtime_tiny" / KEEP[1])
    model = build_model(out / "model")
    voice = build_preset(model, tokenizer, out)
    save_file(record_components(model), str(out / "components.safetensors"), metadata={"format": "pt"})

    runs = {}
    for name, text, cfg, steps, n_ids, stop in RUNS:
        tensors, meta = record_run(model, processor, out / "voice.pt", text, cfg, steps, stop)
        assert meta["n_ids"] == n_ids, (name, meta["n_ids"], tensors["text_ids"].tolist())
        _check_positions(meta, voice["P"], voice["P"] + voice["K"])
        save_file(tensors, str(out / f"run_{name}.safetensors"), metadata={"format": "pt"})
        diffs = one_pass(model, out / "voice.pt", tensors, meta)
        print(f"{name}: one forward per stream against the windowed run, max abs difference {diffs}")
        runs[name] = meta
    golden = dict(commit=COMMIT, seed=SEED, torch=torch.__version__.split("+")[0],
                  transformers=transformers.__version__,
                  hop=HOP, sample_rate=24000, text_window=5, speech_window=6, voice=voice,
                  pad_id=tokenizer.pad_id, runs=runs)
    (out / "golden.json").write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
