"""A voice agent's last mile: a language model's tokens go to the server as they are written, and the speech comes
back while the model is still writing.

A generator stands in for the language model (it yields words with small sleeps). Each word is sent over
`WS /v1/audio/speech/stream` as an `input.text` delta; the audio frames (16-bit PCM, 24 kHz) are written to a WAV
file as they arrive, and played too with `--play` (needs the `play` extra: `pip install 'vibevoice-mlx[play]'`).

    vibevoice-mlx serve --model path/to/VibeVoice-Realtime-0.5B &
    python -m vibevoice_mlx.examples.agent_stream --voice en-Carter_man --out agent.wav
"""

import argparse
import json
import os
import threading
import time
from typing import Iterator, Optional

import soundfile as sf

SAMPLE_RATE = 24000
TEXT = ("Sure! I checked the weather for you. Tomorrow will be sunny in the morning, with a light breeze "
        "from the west, and some clouds after four.")


def fake_llm(text: str = TEXT, delay: float = 0.05) -> Iterator[str]:
    """A language model's token stream: one word at a time (with its space), a little while apart."""
    for i, word in enumerate(text.split(" ")):
        time.sleep(delay)
        yield word if i == 0 else " " + word


def speak(tokens: Iterator[str], url: str, out: str, api_key: Optional[str] = None, model: Optional[str] = None,
          voice: Optional[str] = None, seed: Optional[int] = None, play: bool = False) -> dict:
    """Sends `tokens` as they come, saves (and plays) the audio as it arrives; returns the totals."""
    from websockets.sync.client import connect

    player = None
    if play:
        import sounddevice  # the `play` extra

        player = sounddevice.RawOutputStream(samplerate=SAMPLE_RATE, channels=1, dtype="int16")
        player.start()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    config = {"type": "session.config", "model": model, "voice": voice, "seed": seed, "response_format": "pcm",
              "audio_transport": "binary"}
    stats = {"words": 0, "characters": 0, "frames": 0, "audio_seconds": 0.0, "first_text": None,
             "time_to_first_audio_s": None, "usage": None, "error": None}
    start = time.monotonic()

    def send(ws):
        # The language model runs beside the audio: its words go out while frames come back.
        for token in tokens:
            if stats["first_text"] is None:
                stats["first_text"] = time.monotonic()
            ws.send(json.dumps({"type": "input.text", "text": token}))
            stats["words"] += 1
            stats["characters"] += len(token)
        ws.send(json.dumps({"type": "session.close"}))  # speak what is pending, then close

    with connect(url, additional_headers=headers, max_size=None) as ws, \
            sf.SoundFile(out, "w", samplerate=SAMPLE_RATE, channels=1, subtype="PCM_16") as wav:
        ws.send(json.dumps({k: v for k, v in config.items() if v is not None}))
        created = json.loads(ws.recv())
        if created.get("type") == "error":
            raise RuntimeError(f"{created['message']} ({created['code']})")
        sender = threading.Thread(target=send, args=(ws,), daemon=True)
        sender.start()
        for message in ws:  # ends when the server closes after session.close
            if isinstance(message, bytes):
                if stats["time_to_first_audio_s"] is None:
                    stats["time_to_first_audio_s"] = time.monotonic() - stats["first_text"]
                wav.buffer_write(message, dtype="int16")
                if player is not None:
                    player.write(message)
                stats["frames"] += 1
                stats["audio_seconds"] += len(message) / 2 / SAMPLE_RATE
                continue
            event = json.loads(message)
            if event["type"] == "speech.audio.done":
                stats["usage"] = event["usage"]
            elif event["type"] == "error":
                stats["error"] = f"{event['message']} ({event['code']})"
        sender.join(timeout=5)
    if player is not None:
        player.stop()
        player.close()
    stats["wall_s"] = time.monotonic() - start
    stats["model"], stats["voice"] = created.get("model"), created.get("voice")
    del stats["first_text"]
    return stats


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000/v1/audio/speech/stream")
    parser.add_argument("--api-key", default=os.environ.get("VIBEVOICE_MLX_API_KEY"),
                        help="the server's key (default: $VIBEVOICE_MLX_API_KEY)")
    parser.add_argument("--model", help="a served model (default: the server's first)")
    parser.add_argument("--voice", help="a preset (realtime) or a saved voice (1.5B/7B)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--text", default=TEXT, help="what the stand-in language model writes")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds between its words")
    parser.add_argument("--out", default="agent.wav", help="the WAV file written as the audio arrives")
    parser.add_argument("--play", action="store_true", help="play it too (needs the `play` extra)")
    args = parser.parse_args(argv)
    stats = speak(fake_llm(args.text, args.delay), args.url, args.out, api_key=args.api_key, model=args.model,
                  voice=args.voice, seed=args.seed, play=args.play)
    ttfa = stats["time_to_first_audio_s"]
    print(f"model {stats['model']}, voice {stats['voice']}")
    print(f"time to first audio: {'none' if ttfa is None else f'{ttfa * 1000:.0f} ms'} after the first word"
          + (f" (server: {stats['usage']['time_to_first_audio_s'] * 1000:.0f} ms)" if stats["usage"] else ""))
    print(f"sent {stats['words']} words ({stats['characters']} characters); got {stats['frames']} frames, "
          f"{stats['audio_seconds']:.2f} s of audio in {stats['wall_s']:.2f} s; saved {args.out}")
    if stats["error"]:
        raise SystemExit(f"error: {stats['error']}")
    return stats


if __name__ == "__main__":
    main()
