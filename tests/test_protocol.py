"""Wire protocol v1: round trips over loopback ZeroMQ, and every reject reason from crafted messages."""

import dataclasses
import pickle
import tracemalloc
from pathlib import Path

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from sensors import DevicePublisher, Limits, Rejected, decode, decode_image, encode_header
from sensors import protocol as p
from sensors.images import encode_jpeg

from .attacks import padded_png, png_bomb, progressive_jpeg, scan_bomb_jpeg
from .conftest import endpoint

pytestmark = pytest.mark.timeout(60)

DEVICE = "glasses-01"
T0 = 1_000_000_000
RNG = np.random.default_rng(0)
_Y, _X = np.mgrid[0:48, 0:64]
RGB = np.stack([_X * 4, _Y * 5, np.full_like(_X, 40)], axis=2).astype(np.uint8)  # smooth, distinct channels
JPEG = encode_jpeg(cv2.cvtColor(RGB, cv2.COLOR_RGB2BGR), 90).tobytes()
PNG = cv2.imencode(".png", cv2.cvtColor(RGB, cv2.COLOR_RGB2BGR))[1].tobytes()


def header(*bases: dict, **overrides) -> dict:
    """A valid imu header updated with `bases` then `overrides` (a value of None removes the key)."""
    h = {"v": 1, "device": DEVICE, "sensor": "imu", "seq": 0, "t_ns": T0, "rate": 800}
    for update in (*bases, overrides):
        h.update(update)
    return {k: v for k, v in h.items() if v is not None}


def frames(h: dict, payload: bytes = bytes(48)) -> list[bytes]:
    return [msgpack.packb(h), payload]


def rejected(msg_frames, limits: Limits = p.DEFAULT_LIMITS) -> str:
    with pytest.raises(Rejected) as err:
        decode(msg_frames, limits)
    assert err.value.message and err.value.reason in str(err.value)
    return err.value.reason


def floats(*values) -> bytes:
    return np.array(values, "<f4").tobytes()


# --- round trips over real sockets -------------------------------------------------------------

ROUND_TRIPS = {
    "camera-jpeg": ("camera", np.frombuffer(JPEG, np.uint8), {"encoding": "jpeg"}),
    "camera-png": ("camera", np.frombuffer(PNG, np.uint8), {"encoding": "png"}),
    "camera-raw": ("camera", RGB, {}),
    "mic-int16-stereo": ("mic", RNG.integers(-32768, 32767, (960, 2), dtype=np.int16), {"rate": 48000}),
    "mic-float32": ("mic", RNG.uniform(-1, 1, 441).astype(np.float32), {"rate": 44100}),
    "imu": ("imu", RNG.normal(0, 1, (40, 6)), {"rate": 800}),
    "depth-uint16": ("depth", RNG.integers(0, 5000, (48, 64), dtype=np.uint16), {}),
    "depth-float32-nan": ("depth", np.where(RNG.random((48, 64)) < 0.1, np.nan, 1.5).astype(np.float32), {}),
    "thermal-uint8": ("thermal", RNG.integers(0, 256, (120, 160), dtype=np.uint8), {}),
    "thermal-uint16": ("thermal", RNG.integers(29000, 31000, (120, 160), dtype=np.uint16), {}),
    "thermal-float32": ("thermal", RNG.normal(25, 3, (120, 160)).astype(np.float32), {}),
}


@pytest.mark.parametrize("case", ROUND_TRIPS)
def test_round_trip_over_loopback(pull, case):
    sensor, array, fields = ROUND_TRIPS[case]
    with DevicePublisher(endpoint(pull), DEVICE) as pub:
        for i in range(3):
            assert pub.send(sensor, T0 + i * 1000, array, **fields)
        assert pub.sent[sensor] == 3 and not pub.dropped
    for i in range(3):
        msg = decode(pull.recv_multipart(copy=False))
        assert (msg.device, msg.sensor, msg.seq, msg.t_ns) == (DEVICE, sensor, i, T0 + i * 1000)
    expected = array.astype(np.float32) if sensor == "imu" else array
    if sensor == "mic":
        expected = expected.reshape(len(array), -1)
        assert (msg.rate, msg.channels, msg.dtype) == (fields["rate"], expected.shape[1], array.dtype.name)
        assert msg.end_ns() == msg.t_ns + len(array) * 1_000_000_000 // fields["rate"]
    elif sensor == "imu":
        assert msg.rate == 800 and msg.end_ns() == msg.t_ns + 50_000_000
    else:
        assert msg.end_ns() == msg.t_ns
    if sensor == "camera":
        assert msg.shape == RGB.shape
        assert msg.encoding == fields.get("encoding", "raw")
        rgb = decode_image(msg)
        assert rgb.shape == RGB.shape and rgb.dtype == np.uint8
        if msg.encoding == "jpeg":
            assert np.abs(rgb.astype(int) - RGB).mean() < 3  # also catches a BGR/RGB swap
        else:
            np.testing.assert_array_equal(rgb, RGB)
    if sensor in ("depth", "thermal"):
        assert (msg.dtype, msg.shape) == (array.dtype.name, array.shape)
    assert msg.payload.dtype == expected.dtype and msg.nbytes == expected.nbytes
    np.testing.assert_array_equal(msg.payload, expected)


def test_payload_is_a_view_of_the_received_frame(pull):
    with DevicePublisher(endpoint(pull), DEVICE) as pub:
        pub.send("depth", T0, np.zeros((480, 640), np.uint16))
    received = pull.recv_multipart(copy=False)
    msg = decode(received)
    assert np.shares_memory(msg.payload, np.frombuffer(received[1], np.uint8))


def test_unknown_header_keys_are_ignored():
    msg = decode(frames(header(firmware="1.2.3", extra={"nested": [1, 2]}), floats(*range(6))))
    assert msg.sensor == "imu" and msg.payload.shape == (1, 6)


def test_encode_header_is_plain_msgpack():
    raw = encode_header(DEVICE, "depth", np.int64(3), T0, dtype=np.dtype(np.uint16), shape=(np.int64(2), 2), x=None)
    assert msgpack.unpackb(raw) == {
        "v": 1,
        "device": DEVICE,
        "sensor": "depth",
        "seq": 3,
        "t_ns": T0,
        "dtype": "uint16",
        "shape": [2, 2],
    }
    with pytest.raises(ValueError, match="header"):
        encode_header(DEVICE, "imu", 0, 0, rate=800, note="x" * 5000)


def test_protocol_md_byte_example():
    """The byte-level example in PROTOCOL.md section 7 is what the reference encoder produces."""
    header = bytes.fromhex(
        "86 a1 76 01 a6 64 65 76 69 63 65 aa 67 6c 61 73 73 65 73 2d 30 31 a6 73 65 6e 73 6f 72"
        " a3 69 6d 75 a3 73 65 71 07 a4 74 5f 6e 73 cf 00 00 01 1f 71 fb 04 cb a4 72 61 74 65 cd 03 20"
    )
    payload = bytes.fromhex(
        "00000000 00000000 c3f51c41 00000000 00000000 0000003f0000803e 00000000 00001c41 00000000 00000000 0000003f"
    )
    assert encode_header("glasses-01", "imu", 7, 1234567890123, rate=800) == header
    msg = decode([header, payload])
    assert (msg.device, msg.sensor, msg.seq, msg.t_ns, msg.rate) == ("glasses-01", "imu", 7, 1234567890123, 800)
    np.testing.assert_array_equal(msg.payload, np.array([[0, 0, 9.81, 0, 0, 0.5], [0.25, 0, 9.75, 0, 0, 0.5]], "f4"))
    assert msg.end_ns() == 1234567890123 + 2 * 1_250_000


# --- rejects -----------------------------------------------------------------------------------


def _sof_patched(jpeg: bytes, h: int, w: int) -> bytes:
    i = jpeg.index(b"\xff\xc0") + 5
    return jpeg[:i] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + jpeg[i + 4 :]


CAMERA_RAW = {"sensor": "camera", "rate": None, "encoding": "raw"}
MIC = {"sensor": "mic", "rate": 8000, "channels": 1, "dtype": "int16"}
DEPTH = {"sensor": "depth", "rate": None, "dtype": "uint16", "shape": [2, 2]}
THERMAL = {"sensor": "thermal", "rate": None, "dtype": "float32", "shape": [1, 2]}
BAD_UTF8_KEY = b"\x81\xa2\xff\xfe\x01"  # {"\xff\xfe": 1}

REJECTS = {
    # malformed
    "not-msgpack": ([b"\xc1", b"x"], "malformed"),
    "truncated-msgpack": ([msgpack.packb(header())[:-3], b"x"], "malformed"),
    "trailing-bytes": ([msgpack.packb(header()) + b"\x00", b"x"], "malformed"),
    "header-is-list": ([msgpack.packb([1, 2, 3]), b"x"], "malformed"),
    "header-is-int": ([msgpack.packb(7), b"x"], "malformed"),
    "int-map-key": ([msgpack.packb({1: 2}), b"x"], "malformed"),
    "invalid-utf8": ([BAD_UTF8_KEY, b"x"], "malformed"),
    "frame-not-bytes": ([msgpack.packb(header()), 12], "malformed"),
    # framing and version
    "one-frame": ([msgpack.packb(header())], "frame_count"),
    "three-frames": (frames(header()) + [b"extra"], "frame_count"),
    "no-frames": ([], "frame_count"),
    "header-too-large": (frames(header(pad="x" * 5000)), "header_too_large"),
    "version-2": (frames(header(v=2)), "bad_version"),
    "version-0": (frames(header(v=0)), "bad_version"),
    "unknown-sensor": (frames(header(sensor="lidar")), "unknown_sensor"),
    # missing keys
    **{
        f"missing-{key}": (frames(header({key: None})), "missing_key")
        for key in ("v", "device", "sensor", "seq", "t_ns", "rate")
    },
    **{
        f"missing-mic-{key}": (frames(header(MIC, {key: None}), bytes(2)), "missing_key")
        for key in ("channels", "dtype")
    },
    "missing-encoding": (frames(header(sensor="camera", rate=None), JPEG), "missing_key"),
    "missing-shape": (frames(header(DEPTH, shape=None), bytes(8)), "missing_key"),
    # wrong types
    "v-str": (frames(header(v="1")), "bad_value"),
    "seq-str": (frames(header(seq="1")), "bad_value"),
    "seq-bool": (frames(header(seq=True)), "bad_value"),
    "t_ns-float": (frames(header(t_ns=1.5)), "bad_value"),
    "device-bytes": (frames(header(device=b"glasses")), "bad_value"),
    "sensor-int": (frames(header(sensor=3)), "bad_value"),
    "rate-float": (frames(header(rate=800.0)), "bad_value"),
    "shape-str": (frames(header(DEPTH, shape="2x2"), bytes(8)), "bad_value"),
    "shape-floats": (frames(header(DEPTH, shape=[2.0, 2.0]), bytes(8)), "bad_value"),
    # bad values
    "seq-negative": (frames(header(seq=-1)), "bad_value"),
    "t_ns-negative": (frames(header(t_ns=-5)), "bad_value"),
    "device-empty": (frames(header(device="")), "bad_value"),
    "device-space": (frames(header(device="my glasses")), "bad_value"),
    "device-newline": (frames(header(device="glasses\n")), "bad_value"),
    "device-65-chars": (frames(header(device="d" * 65)), "bad_value"),
    "device-colon": (frames(header(device="a:vision")), "bad_value"),  # ":" separates Redis key fields
    # images whose decoding costs far more than their size
    "jpeg-scan-bomb": (
        frames(header(sensor="camera", rate=None, encoding="jpeg"), scan_bomb_jpeg(64, 40)),
        "too_costly",
    ),
    "png-16-bit-rgba-4096": (frames(header(sensor="camera", rate=None, encoding="png"), png_bomb(4096)), "too_costly"),
    "imu-rate-0": (frames(header(rate=0)), "bad_value"),
    "imu-rate-4001": (frames(header(rate=4001)), "bad_value"),
    "mic-rate-low": (frames(header(MIC, rate=7999), bytes(2)), "bad_value"),
    "mic-rate-high": (frames(header(MIC, rate=192001), bytes(2)), "bad_value"),
    "mic-channels-9": (frames(header(MIC, channels=9), bytes(18)), "bad_value"),
    "mic-channels-0": (frames(header(MIC, channels=0), bytes(2)), "bad_value"),
    "mic-dtype-int8": (frames(header(MIC, dtype="int8"), bytes(2)), "bad_value"),
    "depth-dtype-uint8": (frames(header(DEPTH, dtype="uint8"), bytes(4)), "bad_value"),
    "thermal-dtype-int16": (frames(header(THERMAL, dtype="int16"), bytes(4)), "bad_value"),
    "encoding-gif": (frames(header(sensor="camera", rate=None, encoding="gif"), b"GIF89a"), "bad_value"),
    "shape-1d": (frames(header(DEPTH, shape=[4]), bytes(8)), "bad_value"),
    "shape-3d-depth": (frames(header(DEPTH, shape=[2, 2, 1]), bytes(8)), "bad_value"),
    "shape-zero": (frames(header(DEPTH, shape=[0, 2]), bytes(8)), "bad_value"),
    "raw-4-channels": (frames(header(CAMERA_RAW, shape=[2, 2, 4]), bytes(16)), "bad_value"),
    # payload size
    "empty-payload": (frames(header(), b""), "payload_size"),
    "imu-25-bytes": (frames(header(), bytes(25)), "payload_size"),
    "mic-odd-bytes": (frames(header(MIC), bytes(3)), "payload_size"),
    "mic-stereo-partial-frame": (frames(header(MIC, channels=2), bytes(6)), "payload_size"),
    "depth-short": (frames(header(DEPTH), bytes(7)), "payload_size"),
    "depth-long": (frames(header(DEPTH), bytes(9)), "payload_size"),
    "raw-4096x4096-10-bytes": (frames(header(CAMERA_RAW, shape=[4096, 4096, 3]), bytes(10)), "payload_size"),
    # too large
    "side-4097": (frames(header(DEPTH, shape=[4097, 1]), bytes(8194)), "too_large"),
    "payload-9-mib": (frames(header(), bytes(9 * 1024 * 1024 // 24 * 24)), "too_large"),
    "mic-over-1s": (frames(header(MIC), bytes(2 * 8001)), "too_large"),
    "imu-4001-rows": (frames(header(), bytes(24 * 4001)), "too_large"),
    "jpeg-5000x5000": (
        frames(header(sensor="camera", rate=None, encoding="jpeg"), _sof_patched(JPEG, 5000, 5000)),
        "too_large",
    ),
    # non-finite
    "imu-nan": (frames(header(), floats(0, 0, 9.8, 0, 0, np.nan)), "non_finite"),
    "imu-inf": (frames(header(), floats(0, 0, np.inf, 0, 0, 0)), "non_finite"),
    "mic-float-nan": (frames(header(MIC, dtype="float32"), floats(0.1, np.nan)), "non_finite"),
    "mic-float-inf": (frames(header(MIC, dtype="float32"), floats(-np.inf)), "non_finite"),
    "thermal-float-nan": (frames(header(THERMAL), floats(21.5, np.nan)), "non_finite"),
    "depth-float-inf": (frames(header(DEPTH, dtype="float32"), floats(1, np.nan, np.inf, 0)), "non_finite"),
    # unreadable images
    "jpeg-garbage": (frames(header(sensor="camera", rate=None, encoding="jpeg"), b"not a jpeg"), "bad_image"),
    "jpeg-labelled-png": (frames(header(sensor="camera", rate=None, encoding="png"), JPEG), "bad_image"),
    "jpeg-truncated": (frames(header(sensor="camera", rate=None, encoding="jpeg"), JPEG[:20]), "bad_image"),
    "jpeg-zero-height": (
        frames(header(sensor="camera", rate=None, encoding="jpeg"), _sof_patched(JPEG, 0, 64)),
        "bad_value",
    ),
    # omitted frames (the device left the pixels out): a frame's header, checked as for a sent frame, no payload
    "omitted-with-payload": (frames(header(DEPTH, omitted=True), bytes(8)), "payload_size"),
    "omitted-mic": (frames(header(MIC, omitted=True), b""), "bad_value"),
    "omitted-imu": (frames(header(omitted=True), b""), "bad_value"),
    "omitted-false": (frames(header(DEPTH, omitted=False), b""), "bad_value"),
    "omitted-1": (frames(header(DEPTH, omitted=1), b""), "bad_value"),
    "omitted-depth-no-dtype": (frames(header(DEPTH, dtype=None, omitted=True), b""), "missing_key"),
    "omitted-depth-side-4097": (frames(header(DEPTH, shape=[4097, 1], omitted=True), b""), "too_large"),
    "omitted-camera-no-encoding": (frames(header(sensor="camera", rate=None, omitted=True), b""), "missing_key"),
    "omitted-raw-no-shape": (frames(header(CAMERA_RAW, omitted=True), b""), "missing_key"),
    "omitted-raw-4-channels": (frames(header(CAMERA_RAW, shape=[2, 2, 4], omitted=True), b""), "bad_value"),
}


@pytest.mark.parametrize(
    "fields",
    [
        {"sensor": "camera", "rate": None, "encoding": "jpeg"},
        {**CAMERA_RAW, "shape": [480, 640, 3]},
        {**DEPTH, "shape": [480, 640]},
        THERMAL,
    ],
)
def test_an_omitted_frame_is_its_header_without_pixels(fields):
    msg = decode(frames(header(fields, omitted=True), b""))
    assert (msg.sensor, msg.t_ns, msg.payload.size) == (fields["sensor"], T0, 0)
    assert msg.dtype == fields.get("dtype") and msg.encoding == fields.get("encoding")
    assert msg.shape == (tuple(fields["shape"]) if "shape" in fields else None)


def test_a_publisher_with_the_pipelines_sampling_omits_the_frames_no_window_uses(pull):
    """Over a real socket: of 3 s of camera frames at 30 fps, only the first and those at the windows' sample
    moments (x.5 s: the centres of a 2 s window's halves, windows starting every second) carry pixels; of the
    rest only as many arrive omitted as keep the frames within the server's largest gap (the others are not sent
    at all), numbered without holes."""
    from streaming.windowing import WindowingConfig

    sampling = WindowingConfig().frame_sampling()
    gap = sampling["camera"].max_gap_ns
    assert gap == WindowingConfig().max_frame_gap_ns
    sock, ep = pull, endpoint(pull)
    times = [T0 + k * 1_000_000_000 // 30 for k in range(90)]
    with DevicePublisher(ep, DEVICE, sampling=sampling) as pub:
        for t in times:
            frame = np.frombuffer(JPEG, np.uint8) if pub.takes("camera", t) else None
            pub.send("camera", t, frame, encoding="jpeg")
        sent = pub.sent["camera"]
        got = [decode(sock.recv_multipart()) for _ in range(sent)]
    assert pub.skipped["camera"] == len(times) - sent > len(times) // 2
    assert [m.seq for m in got] == list(range(sent))
    with_pixels = [m.t_ns for m in got if m.payload.size]
    previous = [None, *times[:-1]]
    assert with_pixels == [t for t, before in zip(times, previous) if sampling["camera"].takes(before, t)]
    assert len(with_pixels) == 1 + 3  # the first frame (at 1 s), then the first at or after 1.5, 2.5 and 3.5 s
    assert all(m.shape == (48, 64, 3) for m in got if m.payload.size)
    assert max(b.t_ns - a.t_ns for a, b in zip(got, got[1:])) <= gap  # the server sees no hole


@pytest.mark.parametrize("case", REJECTS)
def test_reject(case):
    msg_frames, reason = REJECTS[case]
    assert rejected(msg_frames) == reason


def test_every_reason_is_exercised():
    assert {reason for _, reason in REJECTS.values()} == set(p.REASONS)


def test_costly_image_limits_let_ordinary_images_through():
    assert decode(frames(header(sensor="camera", rate=None, encoding="jpeg"), progressive_jpeg(64))).shape == (
        64,
        64,
        3,
    )
    rgb_png = png_bomb(4096, bit_depth=8, colour_type=2)  # 8-bit RGB at the largest side: at the limit, accepted
    assert decode(frames(header(sensor="camera", rate=None, encoding="png"), rgb_png)).shape == (4096, 4096, 3)
    with pytest.raises(Rejected, match="scans"):
        decode(
            frames(header(sensor="camera", rate=None, encoding="jpeg"), progressive_jpeg(64)), Limits(max_jpeg_scans=4)
        )


def test_png_with_more_data_than_its_size_is_too_costly_to_decode():
    msg = decode(frames(header(sensor="camera", rate=None, encoding="png"), padded_png(64, pad_mb=200)))
    with pytest.raises(Rejected) as err:
        decode_image(msg)  # libpng would inflate all 200 MB for a 64 x 64 image
    assert err.value.reason == "too_costly"
    ok, png = cv2.imencode(".png", RGB)
    assert (
        decode_image(decode(frames(header(sensor="camera", rate=None, encoding="png"), png.tobytes()))).shape
        == RGB.shape
    )


def test_limits_are_configurable():
    def limit(**kw) -> Limits:
        return dataclasses.replace(p.DEFAULT_LIMITS, **kw)

    assert rejected(frames(header(), bytes(120)), limit(max_payload_bytes=100)) == "too_large"
    assert rejected(frames(header(), bytes(72)), limit(max_imu_rows=2)) == "too_large"
    assert rejected(frames(header(MIC), bytes(2 * 81)), limit(max_audio_seconds=0.01)) == "too_large"
    assert decode(frames(header(MIC), bytes(2 * 80)), limit(max_audio_seconds=0.01)).payload.shape == (80, 1)
    assert rejected(frames(header(DEPTH, shape=[9, 1]), bytes(18)), limit(max_side=8)) == "too_large"
    assert rejected(frames(header(pad="x" * 40)), limit(max_header_bytes=80)) == "header_too_large"


def test_depth_nan_means_no_reading():
    msg = decode(frames(header(DEPTH, dtype="float32"), floats(1.5, np.nan, 0, 2.25)))
    assert np.isnan(msg.payload[0, 1]) and msg.payload[1, 1] == 2.25


@pytest.mark.parametrize(
    "shape, sensor",
    [
        ([4096, 4096, 3], CAMERA_RAW),
        ([4096, 4096], {**DEPTH, "dtype": "float32"}),
        ([4096, 4096], {**THERMAL, "dtype": "uint16"}),
    ],
)
def test_oversized_shape_is_refused_without_allocating(shape, sensor):
    msg_frames = frames(header(sensor, shape=shape), b"0123456789")
    tracemalloc.start()
    try:
        assert rejected(msg_frames) == "payload_size"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_decode_image_rejects_undecodable_jpeg():
    no_scan = JPEG[: JPEG.index(b"\xff\xda")] + b"\xff\xd9"  # headers (with a valid size) but no image data
    msg = decode(frames(header(sensor="camera", rate=None, encoding="jpeg"), no_scan))
    assert msg.shape == RGB.shape
    with pytest.raises(Rejected) as err:
        decode_image(msg)
    assert err.value.reason == "bad_image"


def test_fuzzed_messages_only_raise_rejected():
    rng = np.random.default_rng(1)
    good = [
        frames(header()),
        frames(header(MIC), bytes(4)),
        frames(header(DEPTH), bytes(8)),
        frames(header(sensor="camera", rate=None, encoding="jpeg"), JPEG),
    ]
    accepted = 0
    for _ in range(3000):
        head, payload = (bytearray(f) for f in good[rng.integers(len(good))])
        target = head if rng.random() < 0.7 or not payload else payload
        for _ in range(rng.integers(1, 4)):
            target[rng.integers(len(target))] = rng.integers(256)
        if rng.random() < 0.2:
            del target[rng.integers(len(target)) :]
        try:
            decode([bytes(head), bytes(payload)])
            accepted += 1
        except Rejected as err:
            assert err.reason in p.REASONS
    assert 0 < accepted < 3000


def test_rejects_arrive_over_loopback(pull):
    """Malformed multipart messages sent by a raw PUSH socket are refused by the receiver."""
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoint(pull))
    sent = [REJECTS[c] for c in ("one-frame", "three-frames", "not-msgpack", "version-2", "imu-nan")]
    for msg_frames, _ in sent:
        push.send_multipart(msg_frames)
    push.send_multipart(frames(header(), floats(*range(6))))
    push.close(linger=1000)
    assert [rejected(pull.recv_multipart(copy=False)) for _ in sent] == [reason for _, reason in sent]
    assert decode(pull.recv_multipart(copy=False)).payload.shape == (1, 6)


def test_the_sampling_protocol_md_states_decides_as_the_default_windows():
    """PROTOCOL.md section 5 gives a device without the server's code the default sample moments; so does
    `sensors.sampling.DEFAULT_SAMPLING` (what `bindstream simulate` omits and skips by)."""
    from sensors.sampling import DEFAULT_SAMPLING, FrameSampling
    from streaming.windowing import WindowingConfig

    stated = {"camera": FrameSampling(10**9, (5 * 10**8,), 25 * 10**7), "depth": FrameSampling(10**9, (0,), 25 * 10**7)}
    stated["thermal"] = stated["depth"]
    assert DEFAULT_SAMPLING == stated
    server = WindowingConfig().frame_sampling()
    assert server.keys() == stated.keys()
    for sensor, sampling in server.items():
        for previous in range(0, 5 * 10**9, 7_777_777):
            for period in (33_333_333, 111_111_111, 10**9 // 9):  # 30, 9 and 9 fps
                t = previous + period
                assert sampling.takes(previous, t) == stated[sensor].takes(previous, t), (sensor, previous, period)
        assert sampling.max_gap_ns == stated[sensor].max_gap_ns, sensor
    text = (Path(__file__).parents[1] / "PROTOCOL.md").read_text()
    assert "FrameSampling(10**9, (5 * 10**8,))" in text and "FrameSampling(10**9, (5 * 10**8,), 25 * 10**7)" in text


def test_a_publisher_omits_frames_given_as_arrays_with_their_fields(pull):
    """Depth frames handed over as arrays: the omitted ones still carry the dtype and shape the array implies,
    and a clock stepping back sends the next frame whole (as the server keeps it)."""
    from streaming.windowing import WindowingConfig

    sock = pull
    depth = np.zeros((48, 64), np.uint16)
    times = [T0 + k * 1_000_000_000 // 30 for k in range(40)] + [T0]  # the last: the clock stepped back
    with DevicePublisher(endpoint(pull), DEVICE, sampling=WindowingConfig().frame_sampling()) as pub:
        for t in times:
            pub.send("depth", t, depth)
        got = [decode(sock.recv_multipart()) for _ in range(pub.sent["depth"])]
    assert any(not m.payload.size for m in got)  # some went omitted, carrying the fields below
    assert all(m.dtype == "uint16" and m.shape == (48, 64) for m in got)
    assert [m.t_ns for m in got if m.payload.size] == [T0, T0 + 1_000_000_000, T0]


def test_skipping_keeps_the_frames_sent_within_the_gap_when_the_camera_misses_frames():
    """A camera that misses one frame in seven (30 fps with holes of 67 ms): the frames sent, whole or omitted,
    are still no further apart than the server's gap, and every frame a window uses goes whole."""
    from sensors.sampling import OMIT, SEND, SKIP, FrameOmitter
    from streaming.windowing import WindowingConfig

    sampling = WindowingConfig().frame_sampling()
    omitter = FrameOmitter(sampling)
    times = [T0 + k * 1_000_000_000 // 30 for k in range(300) if k % 7 != 3]
    decided = [omitter.decide("camera", t) for t in times]
    sent = [t for t, how in zip(times, decided) if how != SKIP]
    assert max(b - a for a, b in zip(sent, sent[1:])) <= sampling["camera"].max_gap_ns
    used = [t for t, before in zip(times, [None, *times[:-1]]) if sampling["camera"].takes(before, t)]
    assert [t for t, how in zip(times, decided) if how == SEND] == used
    assert decided.count(SKIP) > decided.count(OMIT)


def test_a_server_offers_skipping_only_where_a_window_cut_early_still_has_its_frames():
    """With a gap of 600 ms, a vision window's second moment (0.5 s before its end) could be cut before its frame
    came: no skipping for the camera; depth and thermal (1 s before the end) may."""
    from streaming.windowing import WindowingConfig

    sampling = WindowingConfig(max_frame_gap_ns=600_000_000).frame_sampling()
    assert sampling["camera"].max_gap_ns is None
    assert sampling["depth"].max_gap_ns == sampling["thermal"].max_gap_ns == 600_000_000


def test_a_frame_the_full_queue_dropped_makes_the_next_one_go(pull):
    """A header-only frame lost to a full send queue must not leave the server with a hole: the next frame is
    sent, not skipped."""
    from sensors.sampling import OMIT, SKIP, FrameOmitter
    from streaming.windowing import WindowingConfig

    omitter = FrameOmitter(WindowingConfig().frame_sampling())
    times = [T0 + k * 1_000_000_000 // 30 for k in range(40)]
    decided = [omitter.decide("camera", t) for t in times[:20]]
    last_omit = max(i for i, how in enumerate(decided) if how == OMIT)
    assert decided[last_omit + 1] == SKIP  # what follows a delivered header is skipped
    omitter = FrameOmitter(WindowingConfig().frame_sampling())
    for t in times[: last_omit + 1]:
        omitter.decide("camera", t)
    omitter.lost("camera")  # the last header did not leave
    assert omitter.decide("camera", times[last_omit + 1]) != SKIP


def test_a_frame_that_fails_validation_leaves_no_hole_in_seq_or_time(pull):
    """A frame the publisher's own check refuses did not go: the next message takes its `seq`, and the next frame
    is not skipped, so the frames the server gets stay within its gap."""
    from streaming.windowing import WindowingConfig

    sampling = WindowingConfig().frame_sampling()
    times = [T0 + k * 1_000_000_000 // 30 for k in range(60)]
    refused = None
    with DevicePublisher(endpoint(pull), DEVICE, sampling=sampling) as pub:
        for t in times:
            if refused is None and not pub.takes("camera", t):  # the first frame that goes omitted: made invalid
                try:
                    pub.send("camera", t, None, encoding="bmp")
                except Rejected:
                    refused = t
                continue
            pub.send("camera", t, None if not pub.takes("camera", t) else JPEG, encoding="jpeg")
        got = [decode(pull.recv_multipart()) for _ in range(pub.sent["camera"])]
    assert refused is not None and refused not in [m.t_ns for m in got]
    assert [m.seq for m in got] == list(range(len(got)))
    assert max(b.t_ns - a.t_ns for a, b in zip(got, got[1:])) <= sampling["camera"].max_gap_ns


def test_a_message_pickles_with_every_field():
    assert p.SensorMessage.__slots__ == tuple(f.name for f in dataclasses.fields(p.SensorMessage))  # __reduce__'s order
    camera = [encode_header("d1", "camera", 7, 123, encoding="jpeg"), JPEG]
    omitted = [encode_header("d1", "depth", 8, 124, omitted=True, dtype="uint16", shape=[4, 6]), b""]
    mic = [encode_header("d1", "mic", 9, 125, rate=48000, channels=2, dtype="int16"), bytes(range(8))]
    for msg in map(decode, (camera, omitted, mic)):
        back = pickle.loads(pickle.dumps(msg, protocol=5))
        for field in dataclasses.fields(p.SensorMessage):
            theirs, ours = getattr(back, field.name), getattr(msg, field.name)
            assert np.array_equal(theirs, ours) if field.name == "payload" else theirs == ours, field.name
        assert back.payload.dtype == msg.payload.dtype and back.payload.shape == msg.payload.shape
