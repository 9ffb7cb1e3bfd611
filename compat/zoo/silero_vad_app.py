"""silero-vad, as its README uses it: the packaged ONNX model finds the speech in a waveform.

The waveform is made here (no audio file): 4 s at 16 kHz of faint noise with two voiced
stretches, formant-filtered glottal pulses with a falling pitch and a syllable envelope (a vowel
as a speech synthesizer makes it). Prints the speech timestamps and each 32 ms chunk's speech
probability as JSON.

    python silero_vad_app.py
"""

from __future__ import annotations

import json

import numpy as np
import torch
from silero_vad import get_speech_timestamps, load_silero_vad

SR = 16000


def vowel(seconds: float, f0: float, formants: list[tuple[float, float]], seed: int) -> np.ndarray:
    """Glottal pulses at a pitch falling from ``f0`` to 0.8 ``f0``, through second-order
    resonators at ``formants`` (frequency, bandwidth), shaped by 4 Hz syllables."""
    n = int(seconds * SR)
    t = np.arange(n) / SR
    pitch = f0 * (1.0 - 0.2 * t / seconds)
    phase = np.cumsum(pitch / SR)
    pulses = np.diff(np.floor(phase), prepend=0.0)
    rng = np.random.default_rng(seed)
    signal = pulses + 0.02 * rng.standard_normal(n)
    for freq, bandwidth in formants:
        r = np.exp(-np.pi * bandwidth / SR)
        a1, a2 = -2 * r * np.cos(2 * np.pi * freq / SR), r * r
        out = np.zeros(n)
        y1 = y2 = 0.0
        for i in range(n):
            y = signal[i] - a1 * y1 - a2 * y2
            out[i] = y
            y2, y1 = y1, y
        signal = out
    envelope = 0.55 - 0.45 * np.cos(2 * np.pi * 4 * t)
    signal *= envelope
    return signal / np.abs(signal).max()


def waveform() -> np.ndarray:
    # Lengths chosen so that no chunk's probability is within 0.08 of the detector's thresholds
    # (0.5 to start speech, 0.35 to end it): fp16 rounding cannot move a boundary.
    rng = np.random.default_rng(0)
    wav = 0.003 * rng.standard_normal(4 * SR)
    a = vowel(1.125, 140.0, [(730, 90), (1090, 110), (2440, 170)], seed=1)
    i = vowel(0.875, 210.0, [(270, 60), (2290, 100), (3010, 150)], seed=2)
    wav[int(0.5 * SR) : int(0.5 * SR) + a.size] += 0.5 * a
    wav[int(2.4 * SR) : int(2.4 * SR) + i.size] += 0.4 * i
    return wav.astype(np.float32)


def main() -> None:
    model = load_silero_vad(onnx=True)
    audio = torch.from_numpy(waveform())
    speech = get_speech_timestamps(audio, model, sampling_rate=SR)
    probabilities = model.audio_forward(audio, sr=SR)[0].tolist()
    print(
        json.dumps(
            {
                "speech": speech,
                "probabilities": [round(p, 4) for p in probabilities],
            }
        )
    )


if __name__ == "__main__":
    main()
