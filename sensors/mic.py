"""Microphone publisher (optional extra: `pip install 'bindstream[mic]'` for sounddevice)."""

from __future__ import annotations

import queue
import time

from .protocol import MIC, NS_PER_S
from .publisher import DevicePublisher

DEFAULT_RATE = 48_000
DEFAULT_CHUNK_MS = 100  # PROTOCOL.md section 5, recommended chunking
MS_PER_S = 1000
POLL_S = 0.1  # how often the send loop checks its deadline


def _sounddevice():
    try:
        import sounddevice
    except (ImportError, OSError) as err:  # OSError: the PortAudio library itself is missing
        raise ImportError(
            "microphone capture needs the optional 'sounddevice' package (and PortAudio): pip install 'bindstream[mic]'"
        ) from err
    return sounddevice


def publish_microphone(
    publisher: DevicePublisher,
    *,
    rate: int = DEFAULT_RATE,
    channels: int = 1,
    dtype: str = "int16",
    chunk_ms: int = DEFAULT_CHUNK_MS,
    input_device: int | str | None = None,
    seconds: float | None = None,
) -> int:
    """Capture chunks of `chunk_ms` and send them until `seconds` pass (None: until interrupted).

    Chunks are stamped by counting samples from the first one's time (monotonic clock, from PortAudio's
    ADC timestamp when the host API reports one): callback jitter never reaches `t_ns`, so consecutive
    chunks meet exactly. After an input overflow (samples lost) the count restarts from the clock.
    Returns the number of chunks handed to send.
    """
    sd = _sounddevice()
    chunks: queue.Queue = queue.Queue()
    clock = {"t0": None, "samples": 0}  # stream time = t0 + samples / rate

    def on_audio(indata, frames, time_info, status):  # PortAudio thread: no socket use here
        if clock["t0"] is None or status.input_overflow:
            lag_s = time_info.currentTime - time_info.inputBufferAdcTime
            if not 0 < lag_s < 1:
                lag_s = frames / rate
            clock["t0"], clock["samples"] = time.monotonic_ns() - round(lag_s * NS_PER_S), 0
        chunks.put((clock["t0"] + clock["samples"] * NS_PER_S // rate, indata.copy()))
        clock["samples"] += frames

    deadline = None if seconds is None else time.monotonic() + seconds
    count = 0
    with sd.InputStream(
        samplerate=rate,
        channels=channels,
        dtype=dtype,
        blocksize=rate * chunk_ms // MS_PER_S,
        device=input_device,
        callback=on_audio,
    ):
        while deadline is None or time.monotonic() < deadline:
            try:
                t_ns, samples = chunks.get(timeout=POLL_S)
            except queue.Empty:
                continue
            publisher.send(MIC, t_ns, samples, rate=rate)
            count += 1
    return count
