"""A device's windows reach Redis in the order they were cut, although the embedder runs its calls on many
threads (streaming/stage.py `CallOrder`): real threads, a real embedder actor, publisher and redis-server."""

import threading
import time

import numpy as np
import pytest
import ray
import redis

from streaming.embedder import Embedder, EmbedderSettings
from streaming.pipeline import EMBEDDER_CONCURRENCY
from streaming.publisher import Publisher, PublisherSettings
from streaming.records import Window
from streaming.stage import CallOrder, Counts, Downstream
from streaming.subscriber import read_all
from streaming.windowing import SECOND

from .attacks import START_NS

pytestmark = pytest.mark.timeout(120)


def test_calls_pass_in_the_order_their_caller_made_them():
    """Calls that arrive last-first still pass first-to-last; calls of another caller are not held back."""
    passed: list[tuple[str, int]] = []
    order = CallOrder(max_wait_s=10, count=lambda event: passed.append((event, -1)))

    def call(caller: str, n: int) -> None:
        order.wait_turn(caller, n)
        passed.append((caller, n))
        order.done(caller, n)

    threads = [threading.Thread(target=call, args=("a", n)) for n in reversed(range(6))]
    for thread in threads[:-1]:
        thread.start()
        time.sleep(0.02)  # each later call of "a" reaches the actor first
    call("b", 0)  # another caller's first call goes straight in while "a"'s wait for its call 0
    threads[-1].start()
    for thread in threads:
        thread.join()
    assert passed[0] == ("b", 0)
    assert [n for caller, n in passed if caller == "a"] == list(range(6))


def test_a_call_that_never_comes_holds_the_next_one_only_for_max_wait_and_is_counted():
    timeouts: list[str] = []
    order = CallOrder(max_wait_s=0.2, count=timeouts.append)
    order.wait_turn("a", 0)
    order.done("a", 0)
    began = time.monotonic()
    order.wait_turn("a", 2)  # call 1 was lost
    waited = time.monotonic() - began
    order.done("a", 2)
    order.wait_turn("a", 1)  # late: it passes at once, after the one that overtook it
    assert waited >= 0.2 and timeouts == ["order_wait_timeout"]


def test_calls_pass_from_the_first_one_still_open_and_a_new_caller_starts_at_0():
    """An actor Ray restarted runs the open calls again, from some n > 0: the first of them says that every call
    before it had returned (`first_open`), so it passes at once, and the next waits for it. A caller new to the
    actor still starts at 0: its call 1 does not pass before its call 0."""
    timeouts: list[str] = []
    order = CallOrder(max_wait_s=0.3, count=timeouts.append)
    order.wait_turn("a", 7, 7)
    order.done("a", 7)
    order.wait_turn("a", 8, 7)
    order.done("a", 8)
    assert timeouts == []
    began = time.monotonic()
    order.wait_turn("b", 1, 0)  # "b"'s call 0 never comes here: held for max_wait_s, counted
    assert time.monotonic() - began >= 0.3 and timeouts == ["order_wait_timeout"]


def imu_window(device: str, k: int) -> Window:
    data = np.random.default_rng(k).standard_normal((6, 2000)).astype(np.float32)
    t0 = START_NS + k * SECOND
    return Window(device, "imu", t0, t0 + 5 * SECOND, data, time.time_ns())


def test_a_devices_windows_reach_redis_in_the_order_they_were_pushed(ray_local, redis_server):
    """300 one-window calls, 8 open at a time, into an embedder actor that runs its calls concurrently (as the
    pipeline makes it): Redis holds them in push order."""
    device = "call-order"
    publisher = ray.remote(Publisher).remote(PublisherSettings(redis_server.url))
    embedder = (
        ray.remote(Embedder)
        .options(max_concurrency=EMBEDDER_CONCURRENCY)
        .remote(EmbedderSettings(model="tiny", device="cpu", max_batch=4, max_wait_ms=1), [publisher])
    )
    try:
        downstream = Downstream([embedder], max_inflight=8, ordered=True)
        for k in range(300):
            downstream.push([imu_window(device, k)], key=device)
        downstream.wait()
        ray.get(publisher.drain.remote())
        stored = [r.t0 for r in read_all(redis.Redis.from_url(redis_server.url), device)]
        assert stored == [START_NS + k * SECOND for k in range(300)]
        assert Counts.of(ray.get(embedder.stats.remote())).get("order_wait_timeout") == 0
    finally:
        for actor in (embedder, publisher):
            ray.kill(actor)
