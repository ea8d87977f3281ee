"""Synthetic spoken-vowel-like data made on the fly: ten vowel classes at 8 kHz (nothing to download).

Each clip is a sustained vowel made by source-filter synthesis: a harmonic source (a glottal-pulse-like spectrum
falling by 6 dB per octave) at a random pitch between 90 and 250 Hz with a slight vibrato and jitter of the pitch
contour, shaped by the resonances of the vowel's first three formants. Class ``c`` is the vowel ``VOWELS[c]`` with
the average formant frequencies of Peterson & Barney ("Control Methods Used in a Study of the Vowels", JASA 1952,
men's averages), each clip's formants drawn within ±6 % of them. Every clip also draws its onset and duration, an
attack/release envelope, a peak amplitude in [0.2, 0.9] and background noise at a signal-to-noise ratio between 20
and 40 dB. As in speech, the class lies in the spectral envelope, not in the pitch, so a classifier must read
formants; the distortion budgets of the audio threat model are relative to each clip's loudness, as Carlini &
Wagner's are.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bastion.data import Dataset
from bastion.errors import InputError

__all__ = ["AUDIO_DOMAIN", "FORMANTS", "VOWELS", "make_vowels"]

#: Waveform samples lie in [-1, 1] (16-bit audio scaled by 1/32768).
AUDIO_DOMAIN: tuple[float, float] = (-1.0, 1.0)


#: The classes, in label order: IPA symbols of the vowels of "heed, hid, head, had, hod, hawed, hood, who'd, hud,
#: heard".
VOWELS: tuple[str, ...] = ("i", "ɪ", "ɛ", "æ", "ɑ", "ɔ", "ʊ", "u", "ʌ", "ɝ")
#: Peterson & Barney's (1952) average formant frequencies F1, F2, F3 of men, in Hz, per vowel.
FORMANTS: tuple[tuple[float, float, float], ...] = (
    (270, 2290, 3010), (390, 1990, 2550), (530, 1840, 2480), (660, 1720, 2410), (730, 1090, 2440),
    (570, 840, 2410), (440, 1020, 2240), (300, 870, 2240), (640, 1190, 2390), (490, 1350, 1690),
)  # fmt: skip
_BANDWIDTHS = (80.0, 100.0, 140.0)


def make_vowels(
    n: int = 600,
    *,
    classes: int = 10,
    sample_rate: int = 8000,
    seconds: float = 0.5,
    seed: int = 0,
) -> Dataset:
    """A balanced data set of ``n`` mono vowel clips (n, 1, T), ``T = sample_rate · seconds``, labels ``i % classes``.

    Args:
        n: number of clips.
        classes: number of vowel classes, the first ``classes`` of :data:`VOWELS` (2 to 10).
        sample_rate: samples per second (at least 6000, so that the third formant is below the Nyquist frequency).
        seconds: clip length (T must be at least 256 samples).
        seed: seed of everything random.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive integer, got {n!r}")
    if isinstance(classes, bool) or not isinstance(classes, int) or not 2 <= classes <= len(VOWELS):
        raise InputError(f"classes must be an integer in [2, {len(VOWELS)}], got {classes!r}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 6000:
        raise InputError(f"sample_rate must be an integer >= 6000 Hz, got {sample_rate!r}")
    t_len = round(sample_rate * float(seconds))
    if t_len < 256:
        raise InputError(f"sample_rate * seconds must give at least 256 samples, got {t_len}")
    rng = np.random.default_rng(seed)
    t = np.arange(t_len) / sample_rate
    nyquist = sample_rate / 2
    ys = np.arange(n) % classes
    xs = np.empty((n, 1, t_len), dtype=np.float32)
    for i, c in enumerate(ys):
        f0 = rng.uniform(90, 250)
        contour = 1 + 0.01 * np.sin(2 * math.pi * rng.uniform(4, 7) * t + rng.uniform(0, 2 * math.pi))
        contour *= 1 + rng.uniform(-0.05, 0.05) * t / t[-1]  # a slight rise or fall
        phase = 2 * math.pi * np.cumsum(f0 * contour) / sample_rate
        harmonics = np.arange(1, int(nyquist / (f0 * 1.07)) + 1)
        formants = np.array(FORMANTS[c]) * rng.uniform(0.94, 1.06, size=3)
        freq = harmonics * f0
        gain = sum(1 / (1 + ((freq - fk) / bk) ** 2) for fk, bk in zip(formants, _BANDWIDTHS))
        amp = gain / harmonics  # a source spectrum falling as 1/h (6 dB per octave)
        offsets = rng.uniform(0, 2 * math.pi, size=len(harmonics))
        wave = (amp[:, None] * np.sin(harmonics[:, None] * phase[None] + offsets[:, None])).sum(axis=0)
        onset = int(rng.uniform(0, 0.2) * t_len)
        seg = np.ones(min(int(rng.uniform(0.6, 0.8) * t_len), t_len - onset))
        r = min(max(int(0.03 * sample_rate), 1), len(seg) // 2)
        seg[:r] = np.linspace(0, 1, r)
        seg[len(seg) - r :] = np.linspace(1, 0, r)
        env = np.zeros(t_len)
        env[onset : onset + len(seg)] = seg
        wave *= env
        wave *= rng.uniform(0.2, 0.9) / max(np.abs(wave).max(), 1e-12)
        rms = math.sqrt(float(np.mean(wave**2)))
        noise = rng.normal(size=t_len) * rms / 10 ** (rng.uniform(20, 40) / 20)
        xs[i, 0] = np.clip(wave + noise, -1.0, 1.0)
    return Dataset(torch.from_numpy(xs), torch.from_numpy(ys), num_classes=classes,
                   name=f"vowels(n={n}, sample_rate={sample_rate}, seconds={seconds}, seed={seed})",
                   domain=AUDIO_DOMAIN)  # fmt: skip
