"""The speech encoders behind one interface: the Gemma 4 audio tower (and the trained stand-in of its class) and Whisper.

`load_encoder(cfg)` gives a `LoadedEncoder` of the kind `cfg.kind` names; `encode_windows` turns audio windows into
25-per-second float32 vectors with any of them, so stage 1, `tokenize audio` and stage 3 take every encoder the same way.
"""

from speechless.speech.encoders.base import FRAMES_PER_SECOND, AudioWindow, EncoderConfig, LoadedEncoder, encode_windows
from speechless.speech.encoders.gemma4 import Gemma4Encoder, weights_sha256

__all__ = ["FRAMES_PER_SECOND", "AudioWindow", "EncoderConfig", "Gemma4Encoder", "LoadedEncoder", "encode_windows",
           "load_encoder", "weights_sha256"]


def load_encoder(cfg: EncoderConfig) -> LoadedEncoder:
    """The encoder `cfg` describes (`cfg.kind`: gemma4 or whisper); its `revision` is the sha256 of its weights."""
    if cfg.kind == "whisper":
        from speechless.speech.encoders.whisper import load_whisper

        return load_whisper(cfg)
    from speechless.speech.encoders.gemma4 import load_gemma4

    return load_gemma4(cfg)
