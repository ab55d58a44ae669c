"""Typed records passed between pipeline stages (through Ray's object store: numpy payloads, no lists),
and the table of the modalities they carry: every list of streamed modalities in streaming/ reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sensors.protocol import FRAME_SENSORS as FRAME_SENSORS  # re-exported beside the modality table


@dataclass(frozen=True)
class StreamSpec:
    """How one modality streams: from which sensor, cut into which windows, and whether `fused` sums it."""

    sensor: str  # on the wire (sensors/protocol.py): a stream of frames (FRAME_SENSORS), of which each window
    # samples some, or of sample chunks, all used
    cadence: str  # the `WindowingConfig` field giving its window length and hop (depth, thermal: vision's)
    fused: bool = True  # summed into `fused`, which needs identical window bounds (IMU windows have others)


STREAMS = {  # modality of the encoder that embeds the windows -> its stream
    "vision": StreamSpec("camera", cadence="vision"),
    "audio": StreamSpec("mic", cadence="audio"),
    "depth": StreamSpec("depth", cadence="vision"),
    "thermal": StreamSpec("thermal", cadence="vision"),
    "imu": StreamSpec("imu", cadence="imu", fused=False),
}
FUSED = "fused"
STREAM_MODALITIES = tuple(STREAMS)
SENSOR_MODALITY = {s.sensor: m for m, s in STREAMS.items()}  # sensor on the wire -> modality
FUSED_MODALITIES = tuple(m for m, s in STREAMS.items() if s.fused)
QUERY_MODALITIES = STREAM_MODALITIES + (FUSED,)  # every embedding stream a query can watch
MIN_DBFS = -120.0  # an audio window's loudness floor (digital silence has no finite RMS dBFS); int16 LSB is -96


def text(value) -> str:
    """A Redis reply value (bytes or not) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class RawInput:
    """A window's media before the costly steps of its preprocessing (decoding, resizing, resampling, fbank),
    which the embedder then runs on its own device (`preprocess_on`, streaming/windowing.py), batched across
    windows (encoders/batch_transforms.py). The windowing stage has checked them as it checks its own input."""

    # vision: each sampled frame, JPEG bytes (1-D uint8) or RGB pixels (h, w, 3) uint8; depth, thermal: the
    # sampled frame, one of integers as sent (uint16 mm; uint8 levels, uint16 centi-kelvin), one of floats in
    # metres (NaN: no reading) or in [0, 1], (h, w) float32; audio: its (n, channels) float32 samples
    arrays: tuple[np.ndarray, ...]
    rate: int = 0  # audio: the samples' rate, Hz


NO_DATA = np.empty(0, np.float32)  # `Window.data` of a window whose `raw` media the embedder preprocesses


@dataclass
class Window:
    """One window of one device's sensor, preprocessed into the encoder's input (or carrying its raw media)."""

    device: str
    modality: str
    t0: int  # window bounds on the device clock, ns; t1 exclusive
    t1: int
    data: np.ndarray  # model input without batch axis: float32, but vision's (3, 2, 224, 224) uint8 RGB levels
    arrived_ns: int  # wall clock at which ingest received the batch holding the window's last message
    epoch: int = 0  # the device's session (+1 at each restart): windows of two sessions may share t0
    dbfs: float | None = None  # audio windows: RMS loudness of the samples in dBFS (full scale 1), >= MIN_DBFS
    reuses: int | None = None  # gated (streaming/gating.py): t0 of the embedded window it repeats; data is empty
    raw: RawInput | None = None  # its media, which the embedder preprocesses (then `data` is NO_DATA)


@dataclass
class Embedding:
    """The joint-space embedding of one window."""

    device: str
    modality: str
    t0: int
    t1: int
    emb: np.ndarray  # (D,) float32, unit norm
    model: str
    arrived_ns: int
    embedded_ns: int  # wall clock when the encoder returned
    members: tuple[str, ...] = ()  # for fused embeddings: the modalities summed
    epoch: int = 0
    dbfs: float | None = None  # audio embeddings: their window's loudness (Window.dbfs)
    reused: int | None = None  # the t0 of the window of its stream whose vector this repeats (Window.reuses)

    @property
    def key(self) -> tuple[str, str, int, int]:
        """What identifies a window's embedding: a re-sent window has the same key."""
        return (self.device, self.modality, self.epoch, self.t0)
