"""Device side of bindstream: wire protocol v1, publishers, MCAP recording and replay, and a simulated wearable.

msg = sensors.decode(socket.recv_multipart(copy=False))   # validated, zero-copy
with sensors.DevicePublisher("tcp://ingest:5555", "glasses-01") as pub:
    pub.send("imu", time.monotonic_ns(), rows, rate=800)
sensors.simulate("tcp://127.0.0.1:5555", devices=4, seconds=30)
"""

from .arrays import ImuRecording, load_frames, publish_frames, publish_imu
from .camera import capture_frames, open_capture, publish_camera
from .mcap_format import RecordedMessage, Recording
from .mic import publish_microphone
from .protocol import (
    CAMERA,
    DEFAULT_ENDPOINT,
    DEPTH,
    IMU,
    MIC,
    REASONS,
    SENSORS,
    THERMAL,
    VERSION,
    Limits,
    Rejected,
    SensorMessage,
    decode,
    decode_image,
    encode_header,
)
from .publisher import DevicePublisher, connect_push
from .recorder import Recorder, RecordingSettings, Replay
from .simulator import SimulatedWearable, SimulationStats, simulate

__all__ = [
    "CAMERA",
    "DEFAULT_ENDPOINT",
    "DEPTH",
    "IMU",
    "MIC",
    "REASONS",
    "SENSORS",
    "THERMAL",
    "VERSION",
    "DevicePublisher",
    "ImuRecording",
    "Limits",
    "RecordedMessage",
    "Recorder",
    "Recording",
    "RecordingSettings",
    "Rejected",
    "Replay",
    "SensorMessage",
    "SimulatedWearable",
    "SimulationStats",
    "capture_frames",
    "connect_push",
    "decode",
    "decode_image",
    "encode_header",
    "load_frames",
    "open_capture",
    "publish_camera",
    "publish_frames",
    "publish_imu",
    "publish_microphone",
    "simulate",
]
