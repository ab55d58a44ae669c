"""`bindstream bench capacity` as a user runs it (a real process: its own Ray, redis-server and sender): one
wearable for 5 s (time for windows of 2 s to be published on a loaded machine); its JSON figures are there and
agree with each other (no speed is asserted)."""

import json
import math
import subprocess
import sys
import time
from collections import Counter

import msgpack
import numpy as np
import psutil
import pytest

from sensors.protocol import NS_PER_S, decode
from streaming.capacity import (
    CPU_STAGES,
    CapacitySettings,
    busy_share,
    fleet_sizes,
    phase_ns,
    record,
    replay,
    wall_offset_ns,
)
from streaming.windowing import Windower, WindowingConfig

BINDSTREAM = [sys.executable, "-c", "from streaming.cli import main; main()"]
KEYS = {"wearables", "windows_per_s", "cpu_ms_per_window", "per_stage_cpu_ms", "efficiency"}


def test_capacity_of_one_wearable_reports_consistent_figures():
    done = subprocess.run(
        [*BINDSTREAM, "bench", "capacity", "--seconds", "5", "--max-wearables", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "random weights" in done.stderr and "1 wearables:" in done.stderr  # the model said, a line per step
    figures = json.loads(done.stdout)
    assert KEYS <= set(figures) and figures["model"] == "tiny" and figures["profile"] == "steady"
    (step,) = figures["steps"]  # at most one wearable: one step
    assert step["wearables"] == 1 and step["windows"] > 0 and step["unpublished"] >= 0
    assert math.isclose(step["windows_per_s"], step["windows"] / 5, rel_tol=1e-9)
    assert figures["offline_windows_per_s"] > 0
    assert 0 < step["machine_busy"] <= 1  # a pipeline and a sender ran: the machine was busy, at most wholly
    if step["behind"]:  # a loaded machine may not keep one wearable within the hop: then no fleet kept up
        assert figures["wearables"] == 0 and figures["per_stage_cpu_ms"] == {}
        return
    assert figures["wearables"] == 1 and figures["windows_per_s"] == step["windows_per_s"]
    stages = figures["per_stage_cpu_ms"]
    assert set(stages) == set(CPU_STAGES) and all(math.isfinite(ms) for ms in stages.values())
    assert math.isclose(figures["cpu_ms_per_window"], sum(stages.values()), rel_tol=1e-9)
    assert math.isclose(figures["cpu_ms_per_window"], step["cpu_ms_per_window"], rel_tol=1e-9)
    assert figures["forward_cpu_ms_per_window"] > 0  # the encoder ran, and its share is told apart
    assert figures["preprocess_cpu_ms_per_window"] == 0  # no GPU here: windows are preprocessed where they are cut
    assert math.isclose(figures["efficiency"], figures["windows_per_s"] / figures["offline_windows_per_s"])


def test_the_machine_busy_share_counts_at_least_this_process():
    """Busy for 0.3 s on one core: at least this process's share of all cores' time was busy, at most all of it."""
    before, mine = psutil.cpu_times(), time.process_time()
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        pass
    after, mine = psutil.cpu_times(), time.process_time() - mine
    total = sum(after) - sum(before) - (after.guest - before.guest) - (after.guest_nice - before.guest_nice)
    assert 0.9 * mine / total <= busy_share(before, after) <= 1  # 10%: the kernel counts in 10 ms ticks


@pytest.mark.parametrize(
    "keeps_up_to, max_wearables, tried",
    [(5, 256, [1, 2, 4, 8, 6, 5]), (3, 256, [1, 2, 4, 3]), (100, 8, [1, 2, 4, 8]), (0, 256, [1])],
)
def test_fleets_double_until_one_falls_behind_then_bisect(keeps_up_to, max_wearables, tried):
    """Against a pipeline that keeps up with at most `keeps_up_to` wearables: doubling, then two bisections,
    never beyond `max_wearables`; the largest fleet that kept up is the capacity."""

    class Step:
        def __init__(self, wearables):
            self.wearables, self.behind = wearables, "" if wearables <= keeps_up_to else "latency over the hop"

    steps = fleet_sizes(CapacitySettings(max_wearables=max_wearables, refine=2), Step)
    assert [s.wearables for s in steps] == tried
    assert max((s.wearables for s in steps if not s.behind), default=0) == min(keeps_up_to, max_wearables)


def test_joined_chunks_carry_the_same_samples_into_the_same_windows():
    """Audio and IMU joined into 100 ms chunks (`--chunk-ms 100`): a fifth of the audio messages, each sent when
    its last 20 ms part would have been (the simulator sends a chunk at its first sample's time), and windows equal
    to those of the simulator's own chunks, also across the recording's loop (no hole where it starts over)."""
    plain, joined = (record(CapacitySettings(pool=1, chunk_ms=ms))[0] for ms in (0, 100))
    count = Counter(m.sensor for m in plain)
    assert Counter(m.sensor for m in joined) == {**count, "mic": count["mic"] // 5, "imu": count["imu"] // 2}
    for m in joined:
        if m.sensor == "mic":
            assert m.offset_ns - m.capture_ns == 80 * NS_PER_S // 1000  # sent with its last 20 ms part
    windows = []
    for recording in (plain, joined):
        windower = Windower(WindowingConfig(device_cpu_share=1e9, device_cpu_burst_s=1e9))  # unmetered
        sent = list(replay(recording, "d", 0, 13, 10))
        assert [t for t, _, _ in sent] == sorted(t for t, _, _ in sent)
        windows.append(
            {(w.modality, w.t0): w.data for _, header, payload in sent for w in windower.add(decode([header, payload]))}
        )
        assert not windower.take_drops()
    assert windows[0].keys() == windows[1].keys() and ("audio", 9 * NS_PER_S) in windows[0]  # 9-11 s: across the loop
    assert all(np.array_equal(windows[0][key], windows[1][key]) for key in windows[0])


@pytest.mark.parametrize("aligned", [False, True])
def test_wearables_clocks_are_their_own_unless_aligned(aligned):
    """A wearable's clock reads the wall clock less its phase (monotonic clocks booted at different moments), so
    the grid's whole seconds, where windows end, fall at a different wall moment for each wearable; with
    `aligned_clocks` at the same one. Either way each wearable sends at its own phase of the wall clock."""
    settings = CapacitySettings(aligned_clocks=aligned)
    (recording,) = record(CapacitySettings(pool=1, loop_s=1))
    ends, sends = set(), set()
    for j in range(1, 6):
        offset = wall_offset_ns(j, settings)
        sent = list(replay(recording, f"d{j}", phase_ns(j) - offset, 1, 1, wall_offset_ns=offset))
        wall, header, _ = sent[0]
        t_ns = msgpack.unpackb(header)["t_ns"]
        assert wall - t_ns == offset  # sent when its clock, on the wall clock, says
        ends.add((wall - t_ns % NS_PER_S) % NS_PER_S)  # where in the wall clock's second its clock's seconds begin
        sends.add(wall % NS_PER_S)
    assert len(sends) == 5
    assert len(ends) == (1 if aligned else 5)
