"""Ingest stage: a ZeroMQ PULL socket that devices PUSH to. Validates each message (stateless, cheap:
images stay encoded) and routes it by device to the windowing actor that owns that device's windows."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import zmq

from sensors.protocol import DEFAULT_ENDPOINT, Limits, Rejected, decode

from .records import SENSOR_MODALITY
from .stage import Downstream, StageMetrics


@dataclass(frozen=True)
class IngestSettings:
    endpoint: str = DEFAULT_ENDPOINT  # bound; other interfaces than loopback must be named explicitly
    limits: Limits = Limits()
    batch_max: int = 512  # messages per call to a windowing actor
    batch_ms: float = 10.0  # longest a received message waits before it is passed on
    max_inflight: int = 4  # calls to windowing actors not yet returned; then ingest waits (ZeroMQ buffers)
    rcvhwm: int = 10_000  # messages the socket queues before devices' sends block or drop


class Ingest:
    """Receives on a worker thread from `start()` until `stop()`."""

    def __init__(self, settings: IngestSettings, windowers: list):
        self.settings = settings
        self.downstream = Downstream(windowers, settings.max_inflight)
        self.metrics = StageMetrics("ingest")
        self.ctx = zmq.Context.instance()
        self.socket = self.ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, settings.rcvhwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(settings.endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.bytes_in = 0
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="ingest", daemon=True)

    def start(self) -> str:
        """Start receiving; returns the bound endpoint (with the real port when bound to port 0 / *)."""
        self._worker.start()
        return self.endpoint

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        batches: dict[str, list] = {}
        first_arrival = None
        while not self._stop.is_set():
            if poller.poll(timeout=self.settings.batch_ms):
                for _ in range(self.settings.batch_max):
                    try:
                        frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    first_arrival = first_arrival or time.time_ns()
                    self._accept(frames, batches)
            if first_arrival and (time.time_ns() - first_arrival >= self.settings.batch_ms * 1e6
                                  or sum(map(len, batches.values())) >= self.settings.batch_max):
                self._flush(batches, first_arrival)
                batches, first_arrival = {}, None
        if batches:
            self._flush(batches, first_arrival)

    def _accept(self, frames, batches: dict[str, list]) -> None:
        try:
            msg = decode(frames, self.settings.limits)
        except Rejected as err:
            self.metrics.count(f"rejected_{err.reason}")
            self.metrics.count("rejected_by_device", getattr(err, "device", None) or "unknown")
            return
        self.bytes_in += msg.nbytes
        self.metrics.count("in", SENSOR_MODALITY[msg.sensor])
        batches.setdefault(msg.device, []).append(msg)

    def _flush(self, batches: dict[str, list], arrived_ns: int) -> None:
        by_actor: dict[int, list] = {}
        for device, messages in batches.items():
            by_actor.setdefault(id(self.downstream.actor_for(device)), []).extend(messages)
        for messages in by_actor.values():
            self.downstream.push(messages, arrived_ns, key=messages[0].device)

    def stop(self) -> dict:
        """Stop receiving, pass on what was received, wait until the windowing actors took it."""
        self._stop.set()
        if self._worker.is_alive():
            self._worker.join()
        self.downstream.wait()
        self.socket.close()
        return self.stats()

    def stats(self) -> dict:
        return self.metrics.snapshot(endpoint=self.endpoint, bytes_in=self.bytes_in)
