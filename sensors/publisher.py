"""Device side of the transport: a PUSH socket that frames, numbers and sends sensor messages."""

from __future__ import annotations

import threading
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import zmq

from .keys import load_public_key, load_secret_certificate
from .protocol import (
    CAMERA,
    DEFAULT_ENDPOINT,
    DEFAULT_LIMITS,
    DEPTH,
    DEVICE_PATTERN,
    DEVICE_RULE,
    IMU,
    IMU_DTYPE,
    MIC,
    OMITTED,
    THERMAL,
    Limits,
    decode,
    encode_header,
)
from .sampling import FrameOmitter

if TYPE_CHECKING:
    from collections.abc import Mapping

    from typing_extensions import Buffer

    from .sampling import FrameSampling

DEFAULT_SNDHWM = 1000  # messages queued while the link is slow or down (~7 s of a full wearable)
DEFAULT_LINGER_MS = 2000  # how long close() keeps trying to deliver queued messages
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 5000  # reconnect back-off doubles up to this
TCP_KEEPALIVE_IDLE_S = 10  # detect dead Wi-Fi/LTE links within ~25 s
TCP_KEEPALIVE_INTVL_S = 5
TCP_KEEPALIVE_CNT = 3


def _curve_client_keys(server_public_file: str | None, client_secret_file: str | None) -> tuple | None:
    """(server public, client public, client secret) Z85 keys from zmq certificate files, or None for plain."""
    if server_public_file is None and client_secret_file is None:
        return None
    if server_public_file is None or client_secret_file is None:
        raise ValueError("CurveZMQ needs both curve_server_public_file and curve_client_secret_file")
    return (load_public_key(server_public_file), *load_secret_certificate(client_secret_file))


def connect_push(
    endpoint: str = DEFAULT_ENDPOINT,
    *,
    sndhwm: int = DEFAULT_SNDHWM,
    linger_ms: int = DEFAULT_LINGER_MS,
    context: zmq.Context | None = None,
    curve_server_public_file: str | None = None,
    curve_client_secret_file: str | None = None,
) -> zmq.Socket:
    """A PUSH socket with the protocol's recommended options, connected to `endpoint`.

    With `curve_server_public_file` (the server's public certificate, `server.key`) and
    `curve_client_secret_file` (this device's secret certificate, `<device>.key_secret`) the connection
    uses CurveZMQ: encrypted, and accepted only if the server allows this device's public key.
    """
    curve = _curve_client_keys(curve_server_public_file, curve_client_secret_file)
    sock = (context or zmq.Context.instance()).socket(zmq.PUSH)
    if curve:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, TCP_KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, TCP_KEEPALIVE_INTVL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, TCP_KEEPALIVE_CNT)
    sock.connect(endpoint)
    return sock


def _array_payload(sensor: str, array: np.ndarray, fields: dict) -> np.ndarray:
    """Contiguous little-endian array; fills dtype/shape/channels/encoding fields it implies."""
    if sensor == IMU:
        array = array.astype(IMU_DTYPE, copy=False)
    elif array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    array = np.ascontiguousarray(array)
    if sensor == CAMERA and fields.setdefault("encoding", "raw") == "raw":
        fields.setdefault("shape", array.shape)
    elif sensor in (DEPTH, THERMAL):
        fields.setdefault("dtype", array.dtype.name)
        fields.setdefault("shape", array.shape)
    elif sensor == MIC:
        fields.setdefault("dtype", array.dtype.name)
        fields.setdefault("channels", 1 if array.ndim == 1 else array.shape[1])
    return array


def terminate(context: zmq.Context) -> None:
    """Terminate `context`, which waits until its sockets' queues are sent or their linger is over, in a way
    Ctrl-C can interrupt (ZeroMQ's own wait cannot be; interrupted, what is still queued is lost)."""
    waiter = threading.Thread(target=context.term, name="zmq-term", daemon=True)
    waiter.start()
    while waiter.is_alive():
        waiter.join(0.1)


class DevicePublisher:
    """Sends one device's sensor messages over a PUSH socket connected to the ingest endpoint.

    `seq` counts per sensor and advances for every message handed to `send`, so messages
    dropped because the queue was full (non-blocking mode) show up as gaps at the receiver.
    With `validate`, every message is checked with `decode` first (a bug raises Rejected here
    instead of being refused by the server). `curve_server_public_file` and `curve_client_secret_file`
    (both or neither) turn on CurveZMQ; see `connect_push` and SECURITY.md.
    With `sampling` (the pipeline's, per frame sensor: sensors/sampling.py), a frame no window uses is sent
    omitted, its header without pixels (PROTOCOL.md), or not at all where the frames sent stay within the
    server's largest gap; `takes` tells beforehand, so a camera need not encode it.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        device: str = "device",
        *,
        sndhwm: int = DEFAULT_SNDHWM,
        block: bool = False,
        linger_ms: int = DEFAULT_LINGER_MS,
        validate: bool = True,
        limits: Limits = DEFAULT_LIMITS,
        context: zmq.Context | None = None,
        curve_server_public_file: str | None = None,
        curve_client_secret_file: str | None = None,
        sampling: Mapping[str, FrameSampling] | None = None,
    ):
        if not DEVICE_PATTERN.fullmatch(device):
            raise ValueError(f"device id must be {DEVICE_RULE}, got {device!r}")
        self.endpoint = endpoint
        self.device = device
        self.block = block
        self.validate = validate
        self.limits = limits
        # a context of its own unless given: ZeroMQ's close returns at once, only terminating the context waits
        # (up to the linger) for the queue to be sent, and a program that exits before that loses the queue
        self._own_context = zmq.Context() if context is None else None
        try:
            self.socket = connect_push(
                endpoint,
                sndhwm=sndhwm,
                linger_ms=linger_ms,
                context=context or self._own_context,
                curve_server_public_file=curve_server_public_file,
                curve_client_secret_file=curve_client_secret_file,
            )
        except BaseException:  # e.g. a malformed endpoint: nothing was sent, nothing to wait for
            if self._own_context is not None:
                self._own_context.destroy(linger=0)
            raise
        self.sent: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()  # frames the stream did without (sampling's max_gap_ns)
        self.bytes_sent = 0
        self.omitter = FrameOmitter(sampling)

    def takes(self, sensor: str, t_ns: int) -> bool:
        """Whether the next frame of `sensor`, taken at `t_ns`, goes with its pixels (always without `sampling`)."""
        return self.omitter.takes(sensor, t_ns)

    def send(self, sensor: str, t_ns: int, payload: bytes | np.ndarray | None, **fields) -> bool:
        """Send one message without copying the payload; False if it was dropped (queue full). A frame whose
        payload is None, or that `takes` says no window uses, goes omitted (`fields` still describe it), or is
        skipped (nothing sent, no `seq` used: True)."""
        if isinstance(payload, np.ndarray):
            payload = _array_payload(sensor, payload, fields)  # also fills the fields an omitted frame keeps
        numbered = self.omitter.next(sensor, t_ns)
        if numbered is None:
            self.skipped[sensor] += 1
            return True
        seq, omitted = numbered
        if omitted or payload is None:
            payload, fields = b"", {**fields, OMITTED: True}
        # numpy's stubs give ndarray the buffer protocol (__buffer__) only for Python >= 3.12
        frame: Buffer = payload  # type: ignore[assignment]
        try:
            header = encode_header(self.device, sensor, seq, t_ns, **fields)
            if self.validate:
                decode([header, frame], self.limits)
        except Exception:
            self.omitter.not_sent(sensor, seq)
            raise
        try:
            self.socket.send_multipart([header, frame], 0 if self.block else zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.dropped[sensor] += 1
            self.omitter.lost(sensor)
            return False
        self.sent[sensor] += 1
        self.bytes_sent += len(header) + memoryview(frame).nbytes
        return True

    def reconnect(self) -> None:
        """Drop the connection to the endpoint and connect again. ZeroMQ reconnects by itself after network
        failures, but not after the server refused this device's CURVE key: once the key is allowed, call this
        (or restart the device). Messages queued for the refused connection are lost (seq shows the gap)."""
        try:
            self.socket.disconnect(self.endpoint)
        except zmq.ZMQError:
            pass
        self.socket.connect(self.endpoint)

    def close(self, linger_ms: int | None = None) -> None:
        """Close the socket and return once its queue is sent, or after `linger_ms` (default: the socket's; -1:
        no limit), when what is still queued is lost (the receiver sees no gap: nothing follows). With a `context`
        passed in, the wait happens where its owner terminates it (`terminate`)."""
        self.socket.close(linger=linger_ms)
        if self._own_context is not None:
            terminate(self._own_context)

    def __enter__(self) -> DevicePublisher:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(0 if exc_type else None)  # leaving on an error or Ctrl-C: do not wait for the queue
