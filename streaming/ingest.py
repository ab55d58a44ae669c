"""Ingest stage: a ZeroMQ PULL socket that devices PUSH to. Validates each message (stateless, cheap:
images stay encoded) and routes it by device to the windowing actor that owns that device's windows.

Bounds: connections (number, idle time: streaming/connections.py), and devices: at most `max_devices`
device ids at once; one silent for `device_idle_s` gives up its place; at the cap, a new id takes the
place of the one silent longest if that one has been silent `device_evict_idle_s` (it loses nothing: it is
admitted again when it returns), else it is refused (`rejected_device_cap`). So a flood of ids cannot
grow ingest's per-device state, devices that send keep their places, and a flood that stopped cannot
lock newcomers out.

Frames that no window samples (most of a 30 fps stream: a window takes 2 camera frames, 1 depth frame)
are forwarded without their pixels, as timestamps; see streaming/windowing.py.

With `record` (`run --record DIR`), the wire frames of each accepted message are also queued for a recorder
thread (sensors/recorder.py, MCAP files): a full queue leaves a message out of the recording, counted, never out
of the data path."""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

import ray
import zmq

from sensors.protocol import DEFAULT_ENDPOINT, NO_PIXELS, Limits, Rejected, decode
from sensors.recorder import Recorder, RecordingSettings

from .connections import ConnectionGuard, ConnectionLimits
from .curve import CurveSettings, peer_user_id, secure_server
from .records import SENSOR_MODALITY
from .stage import Downstream, StageMetrics
from .windowing import FRAME_SENSORS, WindowingConfig

OVERSIZE_FACTOR = 2  # frames up to this many times the payload limit are read (to count them), not more
DEVICE_MISMATCH = "device_mismatch"  # with CurveZMQ: a device may only speak for itself
DEVICE_CAP = "device_cap"  # a new device id while `max_devices` others are active
REPORTED_MAX = 100  # (device, reason) pairs logged; later ones are only counted (an id flood must not flood the log)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestSettings:
    endpoint: str = DEFAULT_ENDPOINT  # bound; other interfaces than loopback must be named explicitly
    limits: Limits = Limits()
    batch_max: int = 512  # messages per call to a windowing actor
    # longest a received message waits before it is passed on: each call to a windowing actor costs ~2 ms of CPU
    # (its payloads go through Ray's object store), so fewer, larger calls; the windows' hop is 1 s (100 instead of
    # 50 ms: 1.2 fewer core-ms per window at 16 wearables, `bench capacity`)
    batch_ms: float = 100.0
    # with a batch open, the wait between emptying the socket and looking again (never past the batch's due time):
    # each emptying costs ZeroMQ a wake-up of its I/O thread and ingest a round of calls, so a few per batch
    # (ingest's receiving thread, 24 wearables: 2 ms 50, 10 ms 40, 25 ms 27, 50 ms 20 us of CPU a message)
    drain_pause_ms: float = 25.0
    max_inflight: int = 4  # calls to windowing actors not yet returned; then ingest waits (ZeroMQ buffers)
    rcvhwm: int = 1_000  # messages the socket queues before devices' sends block or drop (devices buffer too)
    windowing: WindowingConfig = WindowingConfig()  # to know which frames windows sample
    curve: CurveSettings | None = None  # CurveZMQ with an allow-list of device keys (SECURITY.md)
    connections: ConnectionLimits = ConnectionLimits()
    record: str | None = None  # folder to record what is accepted in (MCAP, sensors/recorder.py); None: not recorded
    recording: RecordingSettings = RecordingSettings()


class Ingest:
    """Receives on a worker thread from construction until `stop()`. A restarted actor binds the same
    endpoint again (with a fixed port) and devices reconnect by themselves; what was lost shows as `seq`
    gaps, counted per device by the windowing stage."""

    def __init__(self, settings: IngestSettings, windowers: list):
        self.settings = settings
        self.downstream = Downstream(windowers, settings.max_inflight)
        self.metrics = StageMetrics("ingest")
        self.ctx: zmq.Context = zmq.Context.instance()
        self.socket = self.ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, settings.rcvhwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        # a frame a little over the payload limit is received and counted (too_large); a peer sending one
        # far over it is disconnected before the frame is buffered (memory stays bounded, nothing counted)
        self.socket.setsockopt(zmq.MAXMSGSIZE, OVERSIZE_FACTOR * settings.limits.max_payload_bytes)
        self.auth = None
        if settings.curve:
            self.auth = secure_server(
                self.socket, settings.curve, lambda reason: self.metrics.count(f"refused_{reason}"), monitor=False
            )
        self.connections = ConnectionGuard(
            self.socket, settings.connections, self.metrics.count, listeners=(self.auth,) if self.auth else ()
        )
        self.socket.bind(settings.endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.recorder = None
        if settings.record:
            self.recorder = Recorder(
                settings.record,
                settings.recording,
                tag=re.sub(r"[^A-Za-z0-9.]+", "-", self.endpoint),  # one series of files per endpoint
                source=f"bindstream run, ingest {self.endpoint}",
                count=self.metrics.count,
            )
        self.bytes_in = 0
        self.reported: set[tuple[str, str]] = set()  # (device, reason) already logged; bounded by REPORTED_MAX
        self.devices: OrderedDict[str, float] = OrderedDict()  # device -> its last message (monotonic), oldest first
        self.last_frame_t: dict[tuple[str, str], int] = {}  # (device, sensor) -> time of its last frame
        self.sampling = settings.windowing.frame_sampling()
        # the batch's counts ("in", "thinned", "omitted" per modality) and busy time, counted with it: a count costs
        # microseconds (it is a Ray metric too), a batch holds hundreds of messages
        self.tally: Counter = Counter()
        self.tally_busy_s = 0.0
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._worker.start()

    def bound_endpoint(self) -> str:
        """The endpoint it listens on (with the real port when the configured one was `*`)."""
        return self.endpoint

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        batches: dict[str, list] = {}
        first_arrival: int | None = None  # wall clock, ns: the windows' latency counts from it
        due = 0.0  # time.monotonic() at which the open batch is passed on
        received = 0  # messages of the open batch
        while not self._stop.is_set():
            wait_s = self.settings.batch_ms / 1000 if first_arrival is None else max(due - time.monotonic(), 0.0)
            if poller.poll(timeout=math.ceil(wait_s * 1000)):
                for _ in range(self.settings.batch_max - received):
                    try:
                        frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        self.connections.drained()
                        break
                    if first_arrival is None:
                        first_arrival, due = time.time_ns(), time.monotonic() + self.settings.batch_ms / 1000
                    self._accept(frames, batches)
                    received += 1
            else:
                self.connections.drained()
            if first_arrival is None:
                continue
            left_s = due - time.monotonic()
            if left_s <= 0 or received >= self.settings.batch_max:
                self._flush(batches, first_arrival)
                batches, first_arrival, received = {}, None, 0
            else:  # messages then come in runs: a wake-up per message costs more than the wait
                self._stop.wait(min(self.settings.drain_pause_ms / 1000, left_s))
        # stopping: what the socket already queued is taken too, in batches of `batch_max`, up to `rcvhwm`
        # messages (so devices sending on cannot keep the drain going; ZeroMQ queues up to `rcvhwm` per device,
        # and what is left is lost uncounted, as anything sent after the drain)
        for _ in range(self.settings.rcvhwm):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            first_arrival = first_arrival or time.time_ns()
            self._accept(frames, batches)
            received += 1
            if received >= self.settings.batch_max:
                self._flush(batches, first_arrival)
                batches, first_arrival, received = {}, None, 0
        if batches and first_arrival:
            self._flush(batches, first_arrival)

    def _accept(self, frames, batches: dict[str, list]) -> None:
        start = time.perf_counter()
        try:
            msg = decode(frames, self.settings.limits)
            if self.auth and peer_user_id(frames[0]) != msg.device:
                raise Rejected(DEVICE_MISMATCH, "the header's device is not the sender's certificate name", msg.device)
            if not self._admit(msg.device):
                raise Rejected(DEVICE_CAP, f"{len(self.devices)} devices are active, the limit", msg.device)
        except Rejected as err:
            self.metrics.busy(time.perf_counter() - start)
            device = err.device or "unknown"
            self.metrics.count(f"rejected_{err.reason}", device)
            if (device, err.reason) not in self.reported and len(
                self.reported
            ) < REPORTED_MAX:  # log each kind of fault once per device
                self.reported.add((device, err.reason))
                # str(err), not err: a logged exception would keep the received buffers alive
                log.warning("rejected a message from %s: %s (further ones are only counted)", device, str(err))
            return
        self.connections.seen(frames[0])
        self.bytes_in += msg.nbytes
        if self.recorder:
            self.recorder.put(msg, frames, time.time_ns())  # the wire frames, before thinning drops pixels
        modality = SENSOR_MODALITY[msg.sensor]
        self.tally["in", modality] += 1
        if msg.sensor in FRAME_SENSORS:
            self._thin(msg, modality)
        batches.setdefault(msg.device, []).append(msg)
        self.tally_busy_s += time.perf_counter() - start

    def _admit(self, device: str) -> bool:
        """Whether `device` may send now: it is known, or there is room (see the module docstring)."""
        now = time.monotonic()
        if device in self.devices:
            self.devices.move_to_end(device)
        else:
            limits = self.settings.connections
            while self.devices and now - next(iter(self.devices.values())) > limits.device_idle_s:
                self._forget_oldest()
            if len(self.devices) >= limits.max_devices:
                if now - next(iter(self.devices.values())) < limits.device_evict_idle_s:
                    return False
                self._forget_oldest()
                self.metrics.count("evicted_idle_device")
        self.devices[device] = now
        return True

    def _forget_oldest(self) -> None:
        gone, _ = self.devices.popitem(last=False)
        for sensor in FRAME_SENSORS:
            self.last_frame_t.pop((gone, sensor), None)

    def _thin(self, msg, modality: str) -> None:
        """Drop the pixels of a frame no window samples. A frame whose time does not follow the last one
        (a restart, a clock jump, a replay) keeps them: the windowing stage decides what it is. A frame the
        device omitted (PROTOCOL.md) is counted as such."""
        key = (msg.device, msg.sensor)
        previous = self.last_frame_t.get(key)
        if previous is not None and not 0 < msg.t_ns - previous <= self.settings.windowing.max_clock_jump_ns:
            previous = None
        if not msg.payload.size:
            self.tally["omitted", modality] += 1
        elif not self.sampling[msg.sensor].takes(previous, msg.t_ns):
            msg.payload = NO_PIXELS
            self.tally["thinned", modality] += 1
        self.last_frame_t[key] = msg.t_ns

    def _flush(self, batches: dict[str, list], arrived_ns: int) -> None:
        start = time.perf_counter()
        for (event, label), n in self.tally.items():
            self.metrics.count(event, label, n)
        self.tally.clear()
        self.metrics.busy(self.tally_busy_s)
        self.tally_busy_s = 0.0
        by_actor: dict[int, list] = {}
        for device, messages in batches.items():
            by_actor.setdefault(id(self.downstream.actor_for(device)), []).extend(messages)
        for messages in by_actor.values():
            try:
                self.downstream.push(messages, arrived_ns, key=messages[0].device)
            except ray.exceptions.RayError:  # a windowing actor gone for good: count, keep receiving
                log.exception("passing %d messages to a windowing actor failed", len(messages))
                for msg in messages:
                    self.metrics.count("dropped_window_stage_error", msg.device)
                continue
            for modality, n in Counter(SENSOR_MODALITY[msg.sensor] for msg in messages).items():
                self.metrics.count("out", modality, n)
        self.metrics.busy(time.perf_counter() - start)

    def stop(self) -> dict:
        """Stop receiving (taking what the socket already queued), pass on what was received, wait until the
        windowing actors took it."""
        self._stop.set()
        if self._worker.is_alive():
            self._worker.join()
        self.downstream.wait()
        if self.recorder:  # writes what it queued (at most its queue_bytes) and ends the file with its summary
            self.recorder.close()
        self.socket.close()
        if self.auth:
            self.auth.stop()  # after the socket is closed (SECURITY.md: its monitor must be read until then)
        return self.stats()

    def stats(self) -> dict:
        return self.metrics.snapshot(
            endpoint=self.endpoint, bytes_in=self.bytes_in, devices=len(self.devices), **self.connections.stats()
        )
