"""The PyTorch path behind the backend protocol (`backend.Backend`): transformers' VibeVoice per segment.

The model loading, device policy and the injectable `torch_generate` live in `torch_backend.py`; this adapts them
to the jobs and events the orchestration in `generation.py` speaks, so both backends share it.
"""

import numpy as np

from . import memory
from .backend import NEXT, TRUNCATED, greedy
from .checkpoint import MLX
from .constants import CONTROL_ROLES
from .errors import UserError
from . import torch_backend


class TorchBackend:
    """The PyTorch implementation of `backend.Backend`: transformers' `generate` per segment, one script at a time.

    transformers generates a whole segment in one call, so its events come after the call, one per token, with
    each frame's 3200 samples; the orchestration on top is the same as for the MLX engine.
    """

    name = "torch"
    max_batch = 1

    def __init__(self, model, tokens, hop_length: int):
        self.model, self.tokens, self.hop_length = model, tokens, hop_length

    @classmethod
    def load(cls, ckpt, config, tokens, device: str = "auto", dtype: str = "auto", attention: str = "auto"):
        if ckpt.layout == MLX:
            raise UserError(f"{ckpt.folder} is a converted MLX folder, which only the MLX backend runs: use "
                            "--backend mlx (backend='mlx'), or point the torch backend at the PyTorch checkpoint it "
                            "was converted from.")
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            raise UserError("The torch backend needs the PyTorch extra: pip install 'vibevoice-mlx[torch]'.") \
                from None
        ids = {role: getattr(tokens, role) for role in CONTROL_ROLES}
        model = torch_backend.load_torch_model(ckpt.folder, device=device, dtype=dtype, attention=attention, token_ids=ids)
        return cls(model, tokens, config.hop_length)

    @property
    def dtype_name(self) -> str:
        return str(next(self.model.parameters()).dtype).replace("torch.", "")

    def free(self) -> None:
        memory.free_memory()

    def voice_latents(self, voices):
        raise UserError("Encoding and saving voices needs the MLX backend (backend='mlx').")

    def encode_voices(self, voices, voice_noise: bool, key):
        if any(v.ndim != 1 for v in voices):
            raise UserError("Saved voices (.safetensors) need the MLX backend; give the audio file with "
                            "--backend torch.")
        return {"audio": list(voices), "noise": voice_noise}  # transformers encodes them itself

    def run(self, sources, settings):
        for i, source in enumerate(sources):
            while True:
                job = source.next_job()
                yield i, NEXT, None
                if job is None:
                    break
                yield from ((i, token, audio) for token, audio in self._segment(job, settings))

    def _segment(self, job, settings):
        import mlx.core as mx

        t, hop = self.tokens, self.hop_length
        allowed = t.control_ids
        # transformers hands the sampler full-vocabulary logits; ours see the control tokens only. The default
        # greedy choice is left to transformers' own argmax.
        token_sampler = None if job.sampler is greedy else (
            lambda logits: job.sampler(mx.array(np.asarray(logits)[list(allowed)]), allowed))
        noise = (lambda i: np.array(job.noise()).reshape(-1)) if job.noise.injected else None
        max_new = None if job.max_frames is None else job.max_frames + 4
        voices = job.voices["audio"]
        out = torch_backend.torch_generate(self.model, job.prompt.input_ids, voices or None, job.prompt.speech_input_mask,
                             steps=settings.steps, cfg_scale=settings.cfg_scale, noise=noise,
                             token_sampler=token_sampler, max_new_tokens=max_new,
                             sample_voice_noise=job.voices["noise"], seed=job.seed)
        frames = 0
        for token in (int(x) for x in out.tokens):
            if token == t.speech_diffusion:
                if job.max_frames is not None and frames >= job.max_frames:
                    yield TRUNCATED, None
                    return
                yield token, out.audio[frames * hop:(frames + 1) * hop]
                frames += 1
            else:
                yield token, None
                if token == t.eos:
                    return
        yield TRUNCATED, None  # no eos within the token budget
