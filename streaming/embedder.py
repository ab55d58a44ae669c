"""Embedder stage: batches windows per modality across devices and runs the encoders (GPU when present).

`push` returns only once its windows are embedded and queued by the publisher (or dropped, counted). So
when an embedder dies, the push calls it had not finished are still open: Ray retries them on the
restarted actor (`max_task_retries`), and the windows are embedded again; the publisher drops the
duplicates. Nothing a windowing actor handed over is lost with an embedder.

Every encoder output row is checked before it leaves: a row with a NaN or Inf, or whose norm is off 1 by
more than `unit_tolerance` (zero included), is dropped, counted under the window's device; the others are
renormalised in float32. Drops are counted per device: the device that lost the window sees it.

Windows that carry their media instead of a model input (`Window.raw`: `preprocess_on`, streaming/windowing.py)
are preprocessed here, a batch at once on the encoder's device (encoders/batch_transforms.py), before the forward;
vision windows cut with their model input carry it as 8-bit levels, normalised here on the device too.
Gated windows (`Window.reuses`, streaming/gating.py) take no forward: they go on, in their place in the batch,
as embeddings without a vector that the publisher fills with the one they repeat.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import ray

from .publisher import unit_rows
from .records import NO_DATA, STREAM_MODALITIES, Embedding, Window
from .retry import Backoff
from .stage import CallOrder, Downstream, StageMetrics

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
PUBLISH_RETRY_MAX_S = 2.0  # backoff cap while the publisher is down
ORDER_WAIT_S = 1.0  # how long a push call waits for the same caller's previous call (one that never comes)


@dataclass(frozen=True)
class EmbedderSettings:
    model: str = "tiny"
    checkpoint: str | None = None
    device: str | None = None
    dtype: str | None = None
    max_batch: int = 32  # windows of one modality per encoder call
    max_wait_ms: float = 50.0  # how long a partial batch waits for more windows
    queue_capacity: int = 256  # windows waiting; when full the oldest is dropped (live input)
    torch_threads: int | None = None
    throttle_ms: float = 0.0  # extra time per batch, to test overload (embedders slower than the input)
    unit_tolerance: float = 1e-2  # an output row's norm may be off 1 by this much (bf16 rounding); beyond: dropped


@dataclass
class Ticket:
    """One push call's windows still to settle (embedded and published, or dropped); the call returns at 0."""

    remaining: int
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def settle(self, n: int = 1) -> None:
        with self.lock:
            self.remaining -= n
            if self.remaining <= 0:
                self.done.set()


class Queued(NamedTuple):
    window: Window
    ticket: Ticket
    queued_at: float  # time.monotonic() when it entered the queue: the batch deadline counts from here


class WindowQueue:
    """Windows waiting to be embedded, one FIFO per modality, `capacity` in all. When full, the oldest
    window of any modality is dropped: for live input the newest data matters most. Once closed, it
    takes nothing more."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.fifos: dict[str, deque] = {m: deque() for m in STREAM_MODALITIES}
        self.size = 0
        self.closed = False
        self.cond = threading.Condition()

    def put(self, items: list[Queued]) -> tuple[list[Queued], list[Queued]]:
        """Enqueue; return the items dropped to make room, and the items refused because it is closed."""
        dropped = []
        with self.cond:
            if self.closed:
                return [], items
            for item in items:
                if self.size >= self.capacity:
                    dropped.append(self._pop_oldest())
                self.fifos[item.window.modality].append(item)
                self.size += 1
            self.cond.notify_all()
        return dropped, []

    def close(self) -> list[Queued]:
        """Take nothing more; return what was waiting."""
        with self.cond:
            self.closed = True
            left = [item for fifo in self.fifos.values() for item in fifo]
            for fifo in self.fifos.values():
                fifo.clear()
            self.size = 0
            self.cond.notify_all()
        return left

    def _pop_oldest(self) -> Queued:
        fifo = min((f for f in self.fifos.values() if f), key=lambda f: f[0].queued_at)
        self.size -= 1
        return fifo.popleft()

    def take(self, max_batch: int, max_wait_s: float, stop: threading.Event, wait: bool = True) -> list[Queued]:
        """Up to `max_batch` windows of the modality whose head waited longest. A partial batch waits until
        its head is `max_wait_s` old (or `stop` is set) for more windows to arrive. Without `wait`, only a batch
        due now, else []."""
        with self.cond:
            while True:
                heads = [f for f in self.fifos.values() if f]
                if heads:
                    fifo = min(heads, key=lambda f: f[0].queued_at)
                    deadline = fifo[0].queued_at + max_wait_s
                    if len(fifo) >= max_batch or stop.is_set() or time.monotonic() >= deadline:
                        batch = [fifo.popleft() for _ in range(min(max_batch, len(fifo)))]
                        self.size -= len(batch)
                        self.cond.notify_all()
                        return batch
                    if not wait:
                        return []
                    self.cond.wait(timeout=max(deadline - time.monotonic(), 0.001))
                elif stop.is_set() or not wait:
                    return []
                else:
                    self.cond.wait(timeout=0.1)


class Embedder:
    """Takes windows (`push`), embeds them in batches on a worker thread, sends Embeddings downstream."""

    def __init__(self, settings: EmbedderSettings, publishers: list):
        import torch

        import encoders

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.encoder = encoders.load(
            settings.model, checkpoint=settings.checkpoint, device=settings.device, dtype=settings.dtype
        )
        self.queue = WindowQueue(settings.queue_capacity)
        self.downstream = Downstream(publishers, max_inflight=1)
        self.metrics = StageMetrics("embed")
        self.order = CallOrder(ORDER_WAIT_S, self.metrics.count)
        # CPU time of this worker thread in the encoder (all of the forward's when torch runs one thread; with
        # more, their other threads' share counts as the process's): `bench capacity` tells it apart
        self.forward_cpu_s = 0.0
        # CPU time of this worker thread preprocessing windows that carry their media (`Window.raw`): the
        # preprocessing itself on a CPU (all of it when torch runs one thread); on a GPU, launching it (`bench
        # capacity` tells it apart too)
        self.preprocess_cpu_s = 0.0
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="embedder", daemon=True)
        self._worker.start()

    def push(self, windows: list[Window], order: tuple[str, int, int] | None = None) -> int:
        """Embed windows (batched with other calls' windows); returns, with the queue depth, once they are
        published or dropped. With `order` (`CallOrder`), a caller's windows are queued in the order of its calls,
        so a device's windows reach the publisher in the order its windowing actor cut them."""
        ticket = Ticket(len(windows))
        for window in windows:
            self.metrics.count("in", window.modality)
        if order:
            self.order.wait_turn(*order)
        try:
            full, refused = self.queue.put([Queued(w, ticket, time.monotonic()) for w in windows])
        finally:
            if order:
                self.order.done(*order[:2])
        self._drop(full, "queue_full")
        self._drop(refused, "drain_timeout")
        self.metrics.queue_depth(self.queue.size)
        if windows:
            ticket.done.wait()
        return self.queue.size

    def _drop(self, items: list[Queued], reason: str) -> None:
        """Count each item as `dropped_{reason}` under its device and let its push call go on."""
        for item in items:
            self.metrics.count(f"dropped_{reason}", item.window.device)
            item.ticket.settle()

    def _run(self) -> None:
        wait_s, size = self.settings.max_wait_ms / 1000, self.settings.max_batch
        while batch := self.queue.take(size, wait_s, self._stop):
            # the batches of other modalities due by now go along: one call to the publisher for all of them
            batches = [batch]
            while len(batches) < len(STREAM_MODALITIES) and (due := self.queue.take(size, wait_s, self._stop, False)):
                batches.append(due)
            out: list[Embedding] = []
            embedded: list[Queued] = []
            for items in batches:
                try:
                    out += self._embed(items)
                    embedded += items
                except Exception:  # the stage must outlive one bad batch; its pushers must not hang
                    log.exception("embedding a batch of %d %s windows failed", len(items), items[0].window.modality)
                    self._drop(items, "embed_error")
            try:
                if out:
                    self._publish(out)
            except Exception:
                log.exception("handing %d embeddings to the publisher failed", len(out))
                self._drop(embedded, "embed_error")
                continue
            for item in embedded:
                item.ticket.settle()

    def _embed(self, items: list[Queued]) -> list[Embedding]:
        """The batch's embeddings (its windows' tickets are settled by the caller, once they are published)."""
        start = time.perf_counter()
        modality = items[0].window.modality
        windows = [item.window for item in items]
        fresh = [w for w in windows if w.reuses is None]  # gated windows repeat an embedding: no forward
        batch, inputs = self._model_inputs(modality, fresh) if fresh else ([], NO_DATA)
        vectors: list[np.ndarray | None] = []
        forward_start = time.thread_time()
        try:
            vectors = list(self.encoder.embed(modality, inputs)) if batch else []
        except ValueError:  # a malformed window must not take the batch down: embed one by one
            vectors = []
            for i, window in enumerate(batch):
                try:
                    vectors.append(self.encoder.embed(modality, inputs[i : i + 1])[0])
                except ValueError:
                    vectors.append(None)
                    self.metrics.count("rejected_by_encoder", window.device)
        self.forward_cpu_s += time.thread_time() - forward_start
        if self.settings.throttle_ms:
            time.sleep(self.settings.throttle_ms / 1000)
        done = time.time_ns()
        self.metrics.busy(time.perf_counter() - start)
        embedded = [(w, v) for w, v in zip(batch, vectors) if v is not None]
        rows = np.array([v for _, v in embedded], np.float32).reshape(-1, self.encoder.embed_dim)
        unit, reasons = unit_rows(rows, 1 - self.settings.unit_tolerance, 1 + self.settings.unit_tolerance)
        out = []
        for (w, _), v, reason in zip(embedded, unit, reasons):
            if reason:
                self.metrics.count(f"rejected_{reason}", w.device)
            else:
                out.append(self._embedding(w, v, done))
        if len(fresh) < len(windows):
            out = self._in_order(windows, out, done)
        self.metrics.count("out", modality, len(out))
        self.metrics.count("batches", modality)
        for e in out:
            self.metrics.latency((done - e.arrived_ns) / 1e9)
        self.metrics.queue_depth(self.queue.size)
        return out

    def _embedding(self, w: Window, vector: np.ndarray, done: int, reused: int | None = None) -> Embedding:
        """The record of window `w`'s embedding (`reused`: the t0 of the window whose vector it repeats)."""
        return Embedding(
            w.device,
            w.modality,
            w.t0,
            w.t1,
            vector,
            self.encoder.name,
            w.arrived_ns,
            done,
            epoch=w.epoch,
            dbfs=w.dbfs,
            reused=reused,
        )

    def _in_order(self, windows: list[Window], fresh: list[Embedding], done: int) -> list[Embedding]:
        """The batch's embeddings in its windows' order, with a vector-less stand-in (`reused`) for each gated
        window, which the publisher fills with the embedding it repeats (holding it until that one has come, should
        concurrent calls have put it ahead). Counted as `reused`."""
        made = {(e.device, e.epoch, e.t0): e for e in fresh}
        out = []
        for w in windows:
            if w.reuses is None:
                out += [made[key]] if (key := (w.device, w.epoch, w.t0)) in made else []
                continue
            self.metrics.count("reused", w.modality)
            out.append(self._embedding(w, NO_DATA, done, reused=w.reuses))
        return out

    def _model_inputs(self, modality: str, batch: list[Window]) -> tuple[list[Window], np.ndarray | torch.Tensor]:
        """The windows that have a model input, and their inputs stacked. Windows that carry their media
        (`Window.raw`) are preprocessed here, on the encoder's device, all together; a window whose media fail is
        lost alone, counted as `dropped_preprocess_error` under its device."""
        import torch

        from encoders.batch_transforms import preprocess
        from encoders.transforms import model_input

        device = self.encoder.device
        if batch[0].raw is None:  # the windowing stages ship every window of a modality one way
            # vision's uint8 levels normalised here, on the device: this stage's CPU time, not the forward's
            return batch, model_input(modality, torch.from_numpy(np.stack([w.data for w in batch])).to(device))
        media = [(w.raw.arrays, w.raw.rate) if w.raw else ((), 0) for w in batch]
        start = time.thread_time()
        try:
            inputs = [preprocess(modality, media, device)]
            kept = batch
        except Exception:  # one window's media must not take the batch down: one by one
            inputs, kept = [], []
            for window, one in zip(batch, media):
                try:
                    inputs.append(preprocess(modality, [one], device))
                    kept.append(window)
                except Exception:
                    self.metrics.count("dropped_preprocess_error", window.device)
        self.preprocess_cpu_s += time.thread_time() - start
        self.metrics.count("preprocessed", modality, len(kept))
        return kept, (torch.cat(inputs) if inputs else NO_DATA)

    def _publish(self, embeddings: list[Embedding]) -> None:
        """Hand embeddings to the publisher; while it is down (Ray restarts it) try again, with backoff."""
        backoff = Backoff(PUBLISH_RETRY_MAX_S)
        while True:
            try:
                self.downstream.push(embeddings)
                self.downstream.wait()  # the publisher holds them now
                return
            except ray.exceptions.RayActorError:
                self.metrics.count("publisher_unavailable")
                backoff.wait()

    def drain(self, timeout_s: float | None = None) -> dict:
        """Embed everything queued, hand it to the publisher, and stop the worker. What is still queued
        after `timeout_s` (None: no limit), and every window pushed later, is dropped, counted per device
        as `dropped_drain_timeout`; a batch already in the encoder finishes. (Once the windowing actors
        are flushed, every window has been pushed and every push has returned.)"""
        self._stop.set()
        with self.queue.cond:
            self.queue.cond.notify_all()
        self._worker.join(timeout_s)
        self._drop(self.queue.close(), "drain_timeout")
        self._worker.join()
        self.downstream.wait()
        return self.stats()

    def stats(self) -> dict:
        return self.metrics.snapshot(
            queue=self.queue.size,
            model=self.encoder.name,
            random_weights=self.encoder.random_weights,
            device=str(self.encoder.device),
            forward_cpu_s=self.forward_cpu_s,
            preprocess_cpu_s=self.preprocess_cpu_s,
        )
