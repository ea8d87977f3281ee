"""Audio: synthetic tone data, a 1-D convolutional waveform classifier, the decibel threat model and its attacks.

* data: :func:`make_vowels` (ten pitch classes of harmonic tones at 8 kHz, generated on the fly);
* model: :class:`AudioCNN`, also ``build_model("audiocnn", (1, T), K)`` / ``zoo:audiocnn``;
* threat model: :class:`DecibelBall` (Carlini & Wagner's l∞ budget in dB relative to the clip);
* attacks: :class:`WaveformPGD` and :class:`AudioCW`.
"""

from bastion.audio.attacks import AudioCW, WaveformPGD
from bastion.audio.data import AUDIO_DOMAIN, make_vowels
from bastion.audio.model import AudioCNN
from bastion.audio.threat import DecibelBall, check_waveforms, to_db

__all__ = [
    "AUDIO_DOMAIN",
    "AudioCNN",
    "AudioCW",
    "DecibelBall",
    "WaveformPGD",
    "check_waveforms",
    "make_vowels",
    "to_db",
]
