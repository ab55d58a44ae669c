"""Embedder stage: batches windows per modality across devices and runs the encoders (GPU when present)."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from .records import STREAM_MODALITIES, Embedding, Window
from .stage import Downstream, StageMetrics, now_ns


@dataclass(frozen=True)
class EmbedderSettings:
    model: str = "tiny"
    checkpoint: str | None = None
    device: str | None = None
    dtype: str | None = None
    max_batch: int = 32  # windows of one modality per encoder call
    max_wait_ms: float = 50.0  # how long a partial batch waits for more windows
    queue_capacity: int = 256  # windows waiting; when full the oldest is dropped (live input)
    max_inflight: int = 8  # publish calls not yet taken by the publisher
    torch_threads: int | None = None


class WindowQueue:
    """Windows waiting to be embedded, one FIFO per modality, `capacity` in all. When full, the oldest
    window of any modality is dropped: for live input the newest data matters most."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.fifos: dict[str, deque] = {m: deque() for m in STREAM_MODALITIES}
        self.size = 0
        self.cond = threading.Condition()

    def put(self, windows: list[Window]) -> list[Window]:
        """Enqueue; return the windows dropped to make room."""
        dropped = []
        with self.cond:
            for window in windows:
                if self.size >= self.capacity:
                    dropped.append(self._pop_oldest())
                self.fifos[window.modality].append(window)
                self.size += 1
            self.cond.notify_all()
        return dropped

    def _pop_oldest(self) -> Window:
        fifo = min((f for f in self.fifos.values() if f), key=lambda f: f[0].arrived_ns)
        self.size -= 1
        return fifo.popleft()

    def take(self, max_batch: int, max_wait_s: float, stop: threading.Event) -> list[Window]:
        """Up to `max_batch` windows of the modality whose head waited longest. A partial batch waits until
        its head is `max_wait_s` old (or `stop` is set) for more windows to arrive."""
        with self.cond:
            while True:
                heads = [f for f in self.fifos.values() if f]
                if heads:
                    fifo = min(heads, key=lambda f: f[0].arrived_ns)
                    deadline = fifo[0].arrived_ns / 1e9 + max_wait_s
                    if len(fifo) >= max_batch or stop.is_set() or time.time() >= deadline:
                        batch = [fifo.popleft() for _ in range(min(max_batch, len(fifo)))]
                        self.size -= len(batch)
                        self.cond.notify_all()
                        return batch
                    self.cond.wait(timeout=max(deadline - time.time(), 0.001))
                elif stop.is_set():
                    return []
                else:
                    self.cond.wait(timeout=0.1)


class Embedder:
    """Takes windows (`push`), embeds them in batches on a worker thread, sends Embeddings downstream."""

    def __init__(self, settings: EmbedderSettings, publishers: list):
        import encoders
        import torch

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.encoder = encoders.load(settings.model, checkpoint=settings.checkpoint, device=settings.device,
                                     dtype=settings.dtype)
        self.queue = WindowQueue(settings.queue_capacity)
        self.downstream = Downstream(publishers, settings.max_inflight)
        self.metrics = StageMetrics("embed")
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="embedder", daemon=True)
        self._worker.start()

    def push(self, windows: list[Window]) -> int:
        """Enqueue windows; returns the queue depth."""
        for window in windows:
            self.metrics.count("in", window.modality)
        for window in self.queue.put(windows):
            self.metrics.count("dropped_queue_full", window.modality)
        self.metrics.queue_depth(self.queue.size)
        return self.queue.size

    def _run(self) -> None:
        wait_s = self.settings.max_wait_ms / 1000
        while batch := self.queue.take(self.settings.max_batch, wait_s, self._stop):
            self._embed(batch)

    def _embed(self, batch: list[Window]) -> None:
        start = time.perf_counter()
        modality = batch[0].modality
        try:
            vectors = self.encoder.embed(modality, np.stack([w.data for w in batch]))
        except ValueError:  # a malformed window must not take the batch down: embed one by one
            vectors = []
            for window in batch:
                try:
                    vectors.append(self.encoder.embed(modality, window.data[None])[0])
                except ValueError:
                    vectors.append(None)
                    self.metrics.count("rejected_by_encoder", modality)
        done = now_ns()
        self.metrics.busy(time.perf_counter() - start)
        out = [
            Embedding(w.device, w.modality, w.t0, w.t1, v, self.encoder.name, w.arrived_ns, done)
            for w, v in zip(batch, vectors)
            if v is not None
        ]
        self.metrics.count("out", modality, len(out))
        self.metrics.count("batches", modality)
        for e in out:
            self.metrics.latency((done - e.arrived_ns) / 1e9)
        self.metrics.queue_depth(self.queue.size)
        if out:
            self.downstream.push(out)

    def drain(self) -> dict:
        """Embed everything queued, hand it to the publisher, and stop the worker."""
        self._stop.set()
        with self.queue.cond:
            self.queue.cond.notify_all()
        self._worker.join()
        self.downstream.wait()
        return self.stats()

    def stats(self) -> dict:
        return self.metrics.snapshot(queue=self.queue.size, model=self.encoder.name,
                                     random_weights=self.encoder.random_weights, device=str(self.encoder.device))
