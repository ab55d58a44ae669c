"""Windowing on the device clock: grid, completeness, and every drop rule, on crafted messages."""

from collections import Counter

import cv2
import numpy as np
import pytest
import torch

from encoders import transforms
from sensors.protocol import decode, encode_header, jpeg_scale
from streaming.windowing import SECOND, Windower, WindowingConfig

from .attacks import progressive_jpeg
from .conftest import ASSETS, shared_file

DEVICE = "dev"
START = 100 * SECOND
MIC_RATE, CHUNK = 16_000, 320  # 20 ms chunks
CHUNK_NS = CHUNK * SECOND // MIC_RATE


def mic(seq: int, t_ns: int, value: float = 0.0) -> object:
    samples = np.full((CHUNK, 1), value, np.float32)
    return decode(
        [encode_header(DEVICE, "mic", seq, t_ns, rate=MIC_RATE, channels=1, dtype="float32"), samples.tobytes()]
    )


def depth(seq: int, t_ns: int, mm: int) -> object:
    frame = np.full((48, 64), mm, np.uint16)
    return decode([encode_header(DEVICE, "depth", seq, t_ns, dtype="uint16", shape=[48, 64]), frame.tobytes()])


def camera(seq: int, t_ns: int, level: int) -> object:
    ok, jpeg = cv2.imencode(".jpg", np.full((48, 64, 3), level, np.uint8))
    return decode([encode_header(DEVICE, "camera", seq, t_ns, encoding="jpeg"), jpeg.tobytes()])


def feed(windower, messages):
    out = []
    for m in messages:
        out += windower.add(m)
    return out


def mic_stream(seconds: float, skip: set[int] = frozenset()):
    n = int(seconds * SECOND // CHUNK_NS)
    return [mic(k, START + k * CHUNK_NS) for k in range(n) if k not in skip]


def test_audio_windows_on_the_grid():
    windows = feed(Windower(), mic_stream(5))
    assert [(w.t0 - START) // SECOND for w in windows] == [0, 1, 2, 3]
    assert all(w.t1 - w.t0 == 2 * SECOND and w.data.shape == (1, 128, 204) for w in windows)


def test_first_window_waits_for_the_grid():
    """A stream starting mid-second gets its first window at the next whole second."""
    w = Windower()
    offset = SECOND // 3
    windows = feed(w, [mic(k, START + offset + k * CHUNK_NS) for k in range(200)])  # 4 s
    assert [w.t0 - START for w in windows] == [SECOND, 2 * SECOND]


def test_lost_chunk_drops_only_the_windows_with_the_hole():
    w = Windower()
    lost = 60  # chunk 60 covers [1.2 s, 1.22 s): windows starting at 0 s and 1 s contain it
    windows = feed(w, mic_stream(6, skip={lost}))
    assert [(x.t0 - START) // SECOND for x in windows] == [2, 3, 4]
    assert w.drops[DEVICE, "seq_lost"] == 1
    assert w.drops[DEVICE, "gap"] == 2


def test_duplicates_reordering_and_clock_going_back_are_dropped_and_counted():
    w = Windower()
    msgs = mic_stream(3)
    stream = msgs[:10] + [msgs[5]] + msgs[10:]  # a duplicate
    feed(w, stream)
    assert w.drops[DEVICE, "seq_replay"] == 1
    late = mic(len(msgs), START)  # new seq, but its time lies in the past
    assert w.add(late) == []
    assert w.drops[DEVICE, "clock_backwards"] == 0  # held: the next message says what it was
    # the stream goes on undisturbed (the late message was a lone outlier, now counted)
    more = [mic(k + 1, START + k * CHUNK_NS) for k in range(len(msgs), len(msgs) + 100)]  # 3 s .. 5 s
    assert [(x.t0 - START) // SECOND for x in feed(w, more)] == [2, 3]
    assert w.drops[DEVICE, "clock_backwards"] == 1
    assert w.drops[DEVICE, "gap"] == w.drops[DEVICE, "seq_lost"] == 0


def test_a_message_held_at_the_end_is_counted_when_settled():
    w = Windower()
    feed(w, mic_stream(1) + [mic(3, START)])  # the last one is a replay of seq 3
    assert w.drops[DEVICE, "seq_replay"] == 0
    w.settle_held()
    assert w.drops[DEVICE, "seq_replay"] == 1


def test_a_restart_whose_first_message_was_lost_starts_a_new_session():
    w = Windower()
    feed(w, mic_stream(3))
    rebooted = [mic(k, START + 10 * SECOND + k * CHUNK_NS) for k in range(1, 200)]  # seq 0 lost; clock went on
    windows = feed(w, rebooted)
    assert w.drops[DEVICE, "seq_replay"] == 1 and w.drops[DEVICE, "seq_lost"] == 0
    assert [(x.epoch, (x.t0 - START) // SECOND) for x in windows] == [(1, 11), (1, 12)]


def test_depth_window_takes_the_first_frame_at_its_middle():
    w = Windower()
    period = SECOND // 10
    frames = [depth(k, START + k * period, mm=1000 + 10 * k) for k in range(25)]
    windows = feed(w, frames)
    first = windows[0]
    assert (first.t0, first.t1) == (START, START + 2 * SECOND)
    middle = np.full((48, 64), 1000 + 10 * 10, np.uint16)  # frame 10 is at 1 s, the middle of [0, 2 s)
    np.testing.assert_allclose(first.data, transforms.depth_tensor(middle).numpy())


def test_vision_window_samples_the_centres_of_its_halves():
    w = Windower()
    period = SECOND // 5
    windows = feed(w, [camera(k, START + k * period, level=10 * k) for k in range(12)])
    first = windows[0]
    # frames at 0, 0.2, 0.4, ... s: the first at or after 0.5 s is frame 3, at or after 1.5 s frame 8
    decoded = [np.full((48, 64, 3), 30, np.uint8), np.full((48, 64, 3), 80, np.uint8)]
    expected = transforms.video_tensor(decoded, 2)
    # a vision window travels as its uint8 RGB levels; the encoder normalises them into the model input
    assert first.data.dtype == np.uint8 and first.data.shape == (3, 2, 224, 224)
    got = transforms.model_input("vision", torch.from_numpy(first.data)[None])[0]
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0)  # JPEG of a flat image is near exact


def test_frames_too_far_apart_make_a_hole():
    w = Windower(WindowingConfig(max_frame_gap_ns=300_000_000))
    period = SECOND // 10
    times = [k * period for k in range(12)] + [2 * SECOND + k * period for k in range(30)]  # 0.9 s .. 2 s hole
    windows = feed(w, [depth(i, START + t, 1000) for i, t in enumerate(times)])
    assert w.drops[DEVICE, "gap"] == 2  # windows at 0 s and 1 s
    assert [(x.t0 - START) // SECOND for x in windows] == [2, 3]


def test_undecodable_jpeg_loses_the_window_not_the_stream():
    w = Windower()
    period = SECOND // 5
    msgs = [camera(k, START + k * period, level=50) for k in range(16)]
    msgs[3].payload = np.frombuffer(b"\xff\xd8" + bytes(300), np.uint8)  # a JPEG start, then nothing decodable
    windows = feed(w, msgs)
    assert w.drops[DEVICE, "bad_data"] == 1  # the window [0 s, 2 s) samples frame 3 (at 0.6 s)
    assert [(x.t0 - START) // SECOND for x in windows] == [1]


def test_streams_are_bounded_least_recently_used_first():
    w = Windower(WindowingConfig(max_streams=3))
    for i in range(5):
        w.add(
            decode(
                [
                    encode_header(f"d{i}", "mic", 0, START, rate=MIC_RATE, channels=1, dtype="float32"),
                    np.zeros((CHUNK, 1), np.float32).tobytes(),
                ]
            )
        )
    assert [device for device, _ in w.streams] == ["d2", "d3", "d4"]
    assert w.drops["d0", "evicted"] == w.drops["d1", "evicted"] == 1


def test_windows_after_a_long_frame_gap_are_cut_when_their_frames_come():
    w = Windower()
    period = SECOND // 10
    times = [k * period for k in range(25)] + [12 * SECOND + k * period for k in range(40)]  # 2.4 s .. 12 s hole
    windows = feed(w, [depth(i, START + t, 1000) for i, t in enumerate(times)])
    assert [(x.t0 - START) // SECOND for x in windows] == [0, 12, 13, 14]
    assert w.drops[DEVICE, "gap"] == 11  # the windows starting at 1 s .. 11 s contain the hole
    assert w.drops[DEVICE, "empty"] == 0


def test_device_restart_starts_a_new_session():
    w = Windower()
    first = mic_stream(3)  # seq 0..149, windows at 0 s and 1 s
    assert len(feed(w, first)) == 2
    rebooted = [mic(k, START // 2 + k * CHUNK_NS) for k in range(150)]  # seq from 0 again, clock reset
    windows = feed(w, rebooted)
    assert w.drops[DEVICE, "device_restart"] == 1
    assert w.drops[DEVICE, "seq_replay"] == w.drops[DEVICE, "clock_backwards"] == 0
    assert [(x.epoch, (x.t0 - START // 2) // SECOND) for x in windows] == [(1, 0), (1, 1)]


def test_a_change_of_sample_rate_is_a_hole_not_a_mix():
    w = Windower()
    before = mic_stream(1.5)
    n = len(before)
    t = START + n * CHUNK_NS
    after = [
        decode(
            [
                encode_header(
                    DEVICE, "mic", n + k, t + k * CHUNK_NS // 2, rate=2 * MIC_RATE, channels=1, dtype="float32"
                ),
                np.zeros((CHUNK, 1), np.float32).tobytes(),
            ]
        )
        for k in range(300)
    ]
    windows = feed(w, before + after)
    assert w.drops[DEVICE, "format_change"] == 1
    assert w.drops[DEVICE, "gap"] == 2  # the windows at 0 s and 1 s held both rates
    assert all(x.t0 >= START + 2 * SECOND for x in windows)


def test_pipeline_config_reads_window_specs_from_toml(tmp_path):
    from streaming.pipeline import PipelineConfig

    path = tmp_path / "p.toml"
    path.write_text(
        "[windowing]\nmax_frame_gap_ns = 400000000\n[windowing.imu]\nlength_ns = 4000000000\nhop_ns = 2000000000\n"
    )
    config = PipelineConfig.from_toml(path)
    assert config.windowing.imu.length_ns == 4 * SECOND and config.windowing.imu.hop_ns == 2 * SECOND
    assert config.windowing.max_frame_gap_ns == 400_000_000
    with pytest.raises(ValueError, match="unknown pipeline config keys"):
        PipelineConfig.from_dict({"embeders": 2})


# ----- hostile input (issue 9): forged seq and clocks, costly data -----


def keys(windows):
    return [(w.modality, w.epoch, w.t0) for w in windows]


@pytest.mark.parametrize(
    "forged, reason",
    [
        (dict(seq=2**63 - 1), "seq_jump"),
        (dict(t_ns=START + 2**62), "clock_jump"),
        (dict(seq=0), "device_restart"),
        (dict(seq=1100), "seq_skip"),  # far ahead, within max_seq_jump
        (dict(seq=99), "seq_replay"),
    ],
)
def test_one_forged_message_costs_the_stream_nothing(forged, reason):
    clean = mic_stream(5)
    w = Windower()
    spoof = dict(seq=100, t_ns=clean[100].t_ns) | forged
    attacked = clean[:100] + [mic(spoof["seq"], spoof["t_ns"], value=0.5)] + clean[100:]
    assert keys(feed(w, attacked)) == keys(feed(Windower(), clean))
    assert w.drops == {(DEVICE, reason): 1}  # counted once, under the id it claimed, and nothing else


def test_a_real_loss_of_many_messages_is_counted_in_the_same_session():
    w = Windower()
    msgs = mic_stream(6)
    windows = feed(w, msgs[:100] + msgs[200:])  # 2 s of chunks lost
    assert w.drops[DEVICE, "seq_lost"] == 100 and w.drops[DEVICE, "seq_skip"] == 0
    assert {x.epoch for x in windows} == {0}


def test_a_real_clock_jump_starts_a_new_session_and_loses_no_message():
    w = Windower()
    before = mic_stream(3)
    later = START + 600 * SECOND  # the device paused for 10 minutes; seq goes on
    after = [mic(len(before) + k, later + k * CHUNK_NS) for k in range(150)]
    windows = feed(w, before + after)
    assert w.drops[DEVICE, "clock_jump"] == 1 and w.drops[DEVICE, "gap"] == 0
    assert [(x.epoch, (x.t0 - START) // SECOND) for x in windows] == [(0, 0), (0, 1), (1, 600), (1, 601)]


def test_any_accepted_mic_rate_resamples_with_a_bounded_kernel():
    rate = 44_101  # shares no factor with 16 kHz: its exact kernel would be 7e8 taps (2.8 GB)
    assert transforms.resampler_taps(rate, transforms.AUDIO_RATE) > 100 * transforms.MAX_RESAMPLER_TAPS
    assert transforms.get_resampler(rate).kernel.numel() <= transforms.MAX_RESAMPLER_TAPS
    chunk = rate // 50
    w = Windower()
    msgs = [
        decode(
            [
                encode_header(DEVICE, "mic", k, START + k * SECOND // 50, rate=rate, channels=1, dtype="int16"),
                np.zeros(chunk, np.int16).tobytes(),
            ]
        )
        for k in range(150)
    ]
    windows = feed(w, msgs)
    assert [(x.t0 - START) // SECOND for x in windows] == [0, 1] and windows[0].data.shape == (1, 128, 204)


def test_a_device_over_its_cpu_allowance_is_throttled_not_the_others():
    w = Windower(WindowingConfig(device_cpu_share=0.05, device_cpu_burst_s=0.3))
    big = progressive_jpeg(4095)  # valid, within every limit; odd sides: decoded whole (no scaled decode), ~0.15 s
    heavy = [
        decode([encode_header("heavy", "camera", k, START + k * SECOND // 5, encoding="jpeg"), big]) for k in range(30)
    ]  # 6 s at 5 fps: 5 windows, 10 decodes
    cut = feed(w, heavy) + feed(w, mic_stream(5))
    assert w.drops["heavy", "throttled"] >= 2
    assert [x.t0 for x in cut if x.device == DEVICE] == [START + k * SECOND for k in range(4)]
    assert not any(reason == "throttled" for device, reason in w.drops if device == DEVICE)


def test_a_flood_of_messages_from_one_device_is_throttled_not_the_others():
    w = Windower(WindowingConfig(device_cpu_share=0.01, device_cpu_burst_s=0.2))
    row = np.zeros((1, 6), np.float32).tobytes()
    flood = [
        decode([encode_header("flood", "imu", k, START + k * SECOND // 4000, rate=4000), row]) for k in range(60_000)
    ]  # 15 s of 1-row chunks, as fast as they come: ~0.5 s of CPU
    cut = feed(w, mic_stream(5)) + feed(w, flood)
    assert w.drops["flood", "throttled"] > len(flood) // 10
    assert [x.t0 for x in cut if x.device == DEVICE] == [START + k * SECOND for k in range(4)]


@pytest.mark.parametrize("size", [(1920, 1080), (1280, 960), (3840, 2160)])
def test_a_large_jpeg_is_decoded_scaled_within_tolerance(size):
    """A JPEG frame much larger than 224 is decoded at a fraction of its size (`jpeg_min_side`); the window's
    model input stays within mean abs 0.006 of the one made from the whole frame (the worst measured: 0.0052)."""
    rgb = cv2.resize(transforms.load_image(shared_file(ASSETS / "bird_image.jpg")), size, interpolation=cv2.INTER_CUBIC)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    header = [encode_header(DEVICE, "camera", k, START + k * SECOND // 10, encoding="jpeg") for k in range(22)]
    frames = [decode([h, jpeg.tobytes()]) for h in header]  # 2.1 s at 10 fps: one window
    assert jpeg_scale(frames[0].shape, WindowingConfig().jpeg_min_side) > 1
    default = WindowingConfig().jpeg_min_side
    scaled, whole = (feed(Windower(WindowingConfig(jpeg_min_side=side)), frames) for side in (default, 0))
    assert len(scaled) == len(whole) == 1
    scaled_input, whole_input = (
        transforms.model_input("vision", torch.from_numpy(w[0].data[None])) for w in (scaled, whole)
    )
    assert 0 < (scaled_input - whole_input).abs().mean() < 0.006


def test_a_device_omitting_the_frames_no_window_uses_gets_the_same_windows():
    """Omitted frames (PROTOCOL.md: header, no pixels) keep the stream's times, and frames skipped altogether
    (the ones sent staying within `max_frame_gap_ns`) leave no hole: the windows, their bounds and their inputs
    equal those of the same device sending every frame's pixels, and nothing is dropped."""
    import msgpack

    from sensors.simulator import SimulatedWearable

    def windows(sampling) -> tuple[dict, Windower, Counter]:
        windower = Windower(WindowingConfig(device_cpu_share=1e9, device_cpu_burst_s=1e9))  # unmetered: CPU apart
        wearable = SimulatedWearable(DEVICE, seed=3, start_ns=START + SECOND // 7, sampling=sampling)
        messages = [decode([msgpack.packb(h), p]) for h, p in wearable.messages(8)]
        cut = feed(windower, messages)
        return {(w.modality, w.t0, w.t1): w.data for w in cut}, windower, Counter(m.sensor for m in messages)

    everything, _, all_sent = windows(None)
    omitting, windower, sent = windows(WindowingConfig().frame_sampling())
    assert {m for m, _, _ in everything} == {"vision", "audio", "depth", "thermal", "imu"}
    assert omitting.keys() == everything.keys() and not windower.drops
    assert sent["camera"] < all_sent["camera"] / 4 and sent["depth"] < all_sent["depth"] / 4  # most skipped
    for key, data in everything.items():
        np.testing.assert_array_equal(omitting[key], data, err_msg=str(key))


@pytest.mark.parametrize(
    "stop_s,extra", [(3.9, {"depth"}), (4.3, set()), (4.85, {"depth"}), (4.95, {"depth", "vision"})]
)
def test_a_skipping_device_that_stops_gets_the_same_windows_or_one_more_near_its_end(stop_s, extra):
    """Skipping gives the same windows while frames keep coming (PROTOCOL.md section 5). When the device stops, a
    frame stream's windower has estimated its end up to a gap ahead: a window ending within `max_frame_gap_ns` after
    the stop may be cut where sending every frame would not cut it."""
    import msgpack

    from sensors.simulator import SimulatedWearable

    stop = START + round(stop_s * SECOND)
    config = WindowingConfig(device_cpu_share=1e9, device_cpu_burst_s=1e9)

    def windows(sampling) -> tuple[dict, Windower]:
        windower = Windower(config)
        wearable = SimulatedWearable(DEVICE, seed=3, start_ns=START + SECOND // 7, sampling=sampling)
        messages = [decode([msgpack.packb(h), p]) for h, p in wearable.messages(8) if h["t_ns"] < stop]
        return {(w.modality, w.t0, w.t1): w.data for w in feed(windower, messages)}, windower

    (everything, _), (skipping, windower) = windows(None), windows(config.frame_sampling())
    assert everything.keys() <= skipping.keys() and not windower.drops
    for key, data in everything.items():
        np.testing.assert_array_equal(skipping[key], data, err_msg=str(key))
    more = skipping.keys() - everything.keys()
    assert {modality for modality, _, _ in more} == extra
    assert all(0 < t1 - stop <= config.max_frame_gap_ns for _, _, t1 in more)
