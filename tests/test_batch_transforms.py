"""The batched preprocessing path (encoders/batch_transforms.py) against the CPU path (encoders/transforms.py):
on the shared real media and on generated frames, on the CPU here (and on CUDA where there is one); the
windowing stage shipping raw media; and the pipeline publishing the same embeddings either way."""

import msgpack
import numpy as np
import pytest
import redis
import torch

import encoders
from encoders import batch_transforms as B
from encoders import transforms as T
from sensors.images import encode_jpeg
from sensors.protocol import decode, decode_image, encode_header
from sensors.simulator import SimulatedWearable
from streaming.gating import GatingSettings
from streaming.pipeline import ConfigError, Pipeline, PipelineConfig
from streaming.records import NO_DATA
from streaming.stage import Counts
from streaming.subscriber import read_all
from streaming.windowing import SECOND, Windower, WindowingConfig, WindowStageSettings

from .attacks import padded_png
from .conftest import ASSETS, shared_file, wait_for
from .test_pipeline import send_all

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")),
]
ASSET_NAMES = ["dog", "car", "bird"]
EMBEDDING_TOLERANCE = 1e-4  # max abs, as tests/test_pipeline.py compares published and offline embeddings
UNMETERED = WindowingConfig(device_cpu_burst_s=1e9)  # streams fed as fast as they go: no device is throttled


def assert_parity(got: torch.Tensor, expected: torch.Tensor, device: str) -> None:
    """Within batch_transforms.PARITY for `device`, element by element (both on the CPU for the comparison)."""
    diff = (got.cpu() - expected).abs()
    assert got.shape == expected.shape
    print(f"{device}: max abs {diff.max().item():.2e}, mean abs {diff.mean().item():.2e}")
    bound = B.PARITY[device]
    assert diff.max().item() <= bound["max_abs"] and diff.mean().item() <= bound["mean_abs"], (
        f"max abs {diff.max().item():.2e}, mean abs {diff.mean().item():.2e}"
    )


def jpeg_bytes(rgb: np.ndarray, quality: int = 85) -> np.ndarray:
    return encode_jpeg(np.ascontiguousarray(rgb[..., ::-1]), quality)


def cpu_decoded(jpeg: np.ndarray) -> np.ndarray:
    """RGB pixels of a JPEG as the windowing stage decodes a camera message's (whole)."""
    return decode_image(decode([encode_header("d", "camera", 0, 0, encoding="jpeg"), jpeg.tobytes()]))


def cpu_video(frames: list[np.ndarray]) -> torch.Tensor:
    """A vision window as the windowing stage makes it: each frame through the image transform, stacked."""
    return torch.stack([T.image_tensor(frame) for frame in frames], dim=1)


def scene(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth (h, w, 3) uint8 RGB image with edges: gradients, a disc, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([255 * x / w, 255 * y / h, 128 + 60 * np.sin(x / 17.0)], axis=-1)
    rgb[(y - h / 2) ** 2 + (x - w / 3) ** 2 < (h / 5) ** 2] = (250, 30, 40)
    return np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)


# ----- the transforms, item by item -----


@pytest.mark.parametrize("device", DEVICES)
def test_real_images_as_vision_windows(device):
    """The shared JPEGs as decoded bytes, windows of two frames sharing one (decoded once)."""
    jpegs = [np.fromfile(shared_file(ASSETS / f"{name}_image.jpg"), np.uint8) for name in ASSET_NAMES]
    rgb = [T.load_image(ASSETS / f"{name}_image.jpg") for name in ASSET_NAMES]
    got = B.vision_inputs([[jpegs[0], jpegs[1]], [jpegs[1], jpegs[2]]], device)
    expected = torch.stack([cpu_video(rgb[:2]), cpu_video(rgb[1:])])
    assert_parity(got, expected, device)


@pytest.mark.parametrize("device", DEVICES)
def test_generated_frames_of_every_kind_and_size(device):
    """JPEG (colour, grey, two qualities), pixels (a raw frame or a PNG the windowing stage decoded), of three
    sizes, in one call."""
    big, wide, small = scene(480, 640, 1), scene(360, 1280, 2), scene(120, 160, 3)
    grey = np.repeat(scene(240, 320, 4)[..., :1], 3, axis=2)
    grey_jpeg = encode_jpeg(np.ascontiguousarray(grey[..., 0]), 90)  # a one-channel JPEG
    frames = [jpeg_bytes(big), jpeg_bytes(wide, 60), small, grey_jpeg]
    decoded = [cpu_decoded(f) if f.ndim == 1 else f for f in frames]
    got = B.vision_inputs([frames[:2], frames[2:]], device)
    expected = torch.stack([cpu_video(decoded[:2]), cpu_video(decoded[2:])])
    assert_parity(got, expected, device)


@pytest.mark.parametrize("device", DEVICES)
def test_depth_and_thermal_frames(device):
    rng = np.random.default_rng(5)
    mm = rng.integers(0, 12_000, (480, 640), dtype=np.uint16)
    mm[:40] = 0  # no reading
    metres = rng.uniform(0.2, 15, (240, 320)).astype(np.float32)
    metres[5, :] = np.nan
    depth = [mm, metres, mm]
    media = [B.frame_media("depth", d) for d in depth]
    assert media[0] is mm, "a frame of uint16 millimetres travels as sent"
    got = B.frame_inputs("depth", media, device)
    assert_parity(got, torch.stack([T.depth_tensor(d) for d in depth]), device)
    thermal = [
        rng.integers(0, 256, (120, 160), dtype=np.uint8),
        rng.integers(26_000, 33_000, (120, 160), dtype=np.uint16),  # centi-kelvin
        rng.uniform(-20, 60, (60, 80)).astype(np.float32),  # deg C
    ]
    media = [B.frame_media("thermal", t) for t in thermal]
    assert media[0] is thermal[0] and media[1] is thermal[1], "frames of integer levels travel as sent"
    got = B.frame_inputs("thermal", media, device)
    assert_parity(got, torch.stack([T.thermal_tensor(t) for t in thermal]), device)


@pytest.mark.parametrize("device", DEVICES)
def test_audio_clips_of_any_rate_channels_and_length(device):
    """The shared recordings (44.1 kHz, stereo and mono), 48 kHz and 16 kHz clips, a clip shorter than 2 s and
    one shorter than one fbank frame, in one call."""
    rng = np.random.default_rng(6)
    clips = []
    for name in ASSET_NAMES:
        waveform, rate = T.load_audio(shared_file(ASSETS / f"{name}_audio.wav"))
        clips.append((np.ascontiguousarray(waveform.T[: 2 * rate]), rate))
    clips += [
        ((0.3 * rng.standard_normal((96_000, 1))).astype(np.float32), 48_000),
        ((0.3 * rng.standard_normal((96_000, 1))).astype(np.float32), 48_000),
        ((0.3 * rng.standard_normal((20_000, 2))).astype(np.float32), 16_000),
        ((0.3 * rng.standard_normal((300, 1))).astype(np.float32), 16_000),
        ((2.0 * rng.standard_normal((32_000, 1))).astype(np.float32), 16_000),  # clipped to [-1, 1]
    ]
    got = B.audio_inputs(clips, device)
    expected = torch.stack([T.audio_tensor(samples.T, rate) for samples, rate in clips])
    assert_parity(got, expected, device)


def test_an_undecodable_jpeg_is_a_value_error():
    good = jpeg_bytes(scene(120, 160, 7))
    with pytest.raises(ValueError, match="does not decode"):
        B.vision_inputs([[good, good[: len(good) // 2]]], "cpu")
    with pytest.raises(ValueError, match="never from raw media"):
        B.preprocess("imu", [((np.zeros((10, 6), np.float32),), 400)], "cpu")


# ----- the windowing stage shipping raw media -----


def windows_of(messages, windower: Windower) -> list:
    out = []
    for header, payload in messages:
        out += windower.add(decode([msgpack.packb(header), payload]))
    return out


def test_raw_windows_preprocess_to_the_windowing_stage_inputs():
    """The same simulated wearable cut both ways: the raw windows, preprocessed together, give the inputs that
    the windowing stage makes; IMU windows are preprocessed where they are cut either way."""
    messages = list(SimulatedWearable("w-1", seed=3, start_ns=1_000 * SECOND).messages(5.2))
    cpu = windows_of(messages, Windower(UNMETERED))
    raw = windows_of(messages, Windower(UNMETERED, ship_raw=True))
    assert [(w.modality, w.t0) for w in raw] == [(w.modality, w.t0) for w in cpu]
    for modality in ("vision", "audio", "depth", "thermal"):
        pairs = [(r, c) for r, c in zip(raw, cpu) if c.modality == modality]
        assert pairs and all(r.raw is not None and r.data is NO_DATA for r, _ in pairs)
        got = B.preprocess(modality, [(r.raw.arrays, r.raw.rate) for r, _ in pairs], "cpu")
        assert_parity(got, T.model_input(modality, torch.from_numpy(np.stack([c.data for _, c in pairs]))), "cpu")
        assert [r.dbfs for r, _ in pairs] == [c.dbfs for _, c in pairs]
    imu = [(r, c) for r, c in zip(raw, cpu) if c.modality == "imu"]
    assert imu and all(r.raw is None and np.array_equal(r.data, c.data) for r, c in imu)


def test_raw_windows_keep_the_windowing_checks():
    """What the windowing stage refuses stays refused when media travel: negative depth (`bad_data`), a PNG
    padded with compressed zeros (`too_costly`, found before it is inflated)."""
    messages = list(SimulatedWearable("w-2", seed=4, start_ns=1_000 * SECOND).messages(3))
    negative = np.full((4, 4), -1.0, np.float32).tobytes()
    depth = [({**h, "dtype": "float32", "shape": [4, 4]}, negative) for h, _ in messages if h["sensor"] == "depth"]
    png = padded_png(64, pad_mb=2)
    camera = [({**h, "encoding": "png"}, png) for h, _ in messages if h["sensor"] == "camera"]
    windower = Windower(UNMETERED, ship_raw=True)
    assert windows_of(depth + camera, windower) == []
    drops = windower.take_drops()
    assert (drops["w-2", "bad_data"], drops["w-2", "too_costly"]) == (2, 2)


def test_preprocess_on_is_resolved_and_checked():
    assert WindowStageSettings(embedders_have_gpu=True).ships_raw()
    assert not WindowStageSettings().ships_raw()
    assert WindowStageSettings(preprocess_on="embedder").ships_raw()
    assert not WindowStageSettings(preprocess_on="windowing", embedders_have_gpu=True).ships_raw()
    with pytest.raises(ConfigError, match="preprocess_on must be one of auto, windowing, embedder"):
        PipelineConfig.from_dict({"preprocess_on": "gpu"})


# ----- the pipeline, either way -----

START_NS = 1_000 * SECOND
GOOD, BROKEN = "glasses-raw", "glasses-broken-camera"


def broken_camera(messages):
    """The messages with every camera JPEG cut in half: ingest reads its size and lets it through, no decoder
    decodes it (the CPU path counts `bad_data` in the windowing stage; shipped raw, the embedder finds out)."""
    return [(h, p[: len(p) // 2] if h["sensor"] == "camera" else p) for h, p in messages]


def test_pipeline_preprocessing_on_the_embedder_publishes_the_same_embeddings(ray_local, redis_server):
    seconds = 6
    good = list(SimulatedWearable(GOOD, seed=8, start_ns=START_NS).messages(seconds))
    broken = broken_camera(SimulatedWearable(BROKEN, seed=9, start_ns=START_NS).messages(seconds))
    config = PipelineConfig(
        ingest=["tcp://127.0.0.1:*"],
        model="tiny",
        max_wait_ms=20,
        matchers=0,
        preprocess_on="embedder",
        windowing=UNMETERED,
        gating=GatingSettings(enabled=False),  # every window embedded: the comparison is of preprocessing
    )
    pipeline = Pipeline(config, redis_server.url, "tiny")
    try:
        (endpoint,) = pipeline.start()
        sent = send_all(endpoint, good + broken)
        wait_for(lambda: Counts.of(*pipeline.stats()["ingest"]).get("in") == sent, 60, "ingest to take all")
        final = pipeline.drain()
    finally:
        pipeline.kill()
    client = redis.Redis.from_url(redis_server.url)
    published = {(r.modality, r.t0): r.emb for r in read_all(client, GOOD) if r.modality != "fused"}
    encoder = encoders.load("tiny", device="cpu")
    windows = windows_of(good, Windower(UNMETERED))
    offline = {(w.modality, w.t0): encoder.embed(w.modality, w.data[None])[0] for w in windows}
    assert set(published) == set(offline)
    for key, emb in published.items():
        np.testing.assert_allclose(emb, offline[key], atol=EMBEDDING_TOLERANCE, err_msg=str(key))
    embed = Counts.of(*final["embed"])
    vision_windows = seconds - 1
    # every vision, depth, thermal and audio window travelled raw; only the broken camera's failed, alone
    assert {m: embed.get("preprocessed", m) for m in ("vision", "audio", "depth", "thermal")} == {
        "vision": vision_windows,
        "audio": 2 * vision_windows,
        "depth": 2 * vision_windows,
        "thermal": 2 * vision_windows,
    }
    assert embed.labels("dropped_preprocess_error") == {BROKEN: vision_windows}
    assert final["embed"][0]["preprocess_cpu_s"] > 0  # told apart from the rest of the embedder's CPU
    broken_published = {r.modality for r in read_all(client, BROKEN)} - {"fused"}
    assert broken_published == {"audio", "depth", "thermal", "imu"}  # its other windows went on
