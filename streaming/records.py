"""Typed records passed between pipeline stages (through Ray's object store: numpy payloads, no lists)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# sensor on the wire -> modality of the encoder that embeds its windows
SENSOR_MODALITY = {"camera": "vision", "mic": "audio", "depth": "depth", "thermal": "thermal", "imu": "imu"}
STREAM_MODALITIES = ("vision", "audio", "depth", "thermal", "imu")
FUSED = "fused"
FUSED_MODALITIES = ("vision", "audio", "depth", "thermal")  # summed into `fused` (IMU windows have other bounds)
QUERY_MODALITIES = STREAM_MODALITIES + (FUSED,)  # every embedding stream a query can watch


def text(value) -> str:
    """A Redis reply value (bytes or not) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class Window:
    """One window of one device's sensor, preprocessed into the encoder's input."""

    device: str
    modality: str
    t0: int  # window bounds on the device clock, ns; t1 exclusive
    t1: int
    data: np.ndarray  # float32 model input without batch axis, e.g. (3, 2, 224, 224) for vision
    arrived_ns: int  # wall clock at which ingest received the batch holding the window's last message
    epoch: int = 0  # the device's session (+1 at each restart): windows of two sessions may share t0


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

    @property
    def key(self) -> tuple[str, str, int, int]:
        """What identifies a window's embedding: a re-sent window has the same key."""
        return (self.device, self.modality, self.epoch, self.t0)
