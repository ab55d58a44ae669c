"""Media preprocessing: parity with the reference's inputs, the documented depth/thermal/IMU formulas, bad input."""

import math

import cv2
import numpy as np
import pytest
import soundfile
import torch

from encoders import transforms as T

from .conftest import ASSETS, shared_file

IMAGE_TOLERANCE = 0.01  # mean abs: the reference resized with PIL's bicubic, we use torch's
AUDIO_TOLERANCE = 1e-3  # max abs
ASSET_NAMES = ["dog", "car", "bird"]


def _clip_normalised(value: float) -> torch.Tensor:
    return (value - torch.tensor(T.CLIP_MEAN)) / torch.tensor(T.CLIP_STD)


def _imu_signal(rate: float, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """(samples (N, 6) at `rate`, the same signal at 400 Hz (6, 2000)): gravity + 1 Hz sine, 0.5 Hz cosine."""

    def signal(t):
        accel = 9.81 + np.sin(2 * np.pi * t)
        gyro = 0.5 * np.cos(np.pi * t)
        return np.stack([accel, accel, accel, gyro, gyro, gyro])

    t_in = np.arange(math.ceil(seconds * rate)) / rate
    return signal(t_in).T.astype(np.float32), signal(np.arange(T.IMU_STEPS) / T.IMU_RATE)


# ----- text -----


def test_tokenize_matches_fixture(parity_fixture):
    ids = T.tokenize(parity_fixture["texts"])
    assert ids.dtype == torch.int64
    assert torch.equal(ids, parity_fixture["inputs"]["text"])


def test_tokenize_truncates_keeping_end_of_text():
    ids = T.tokenize(["word " * 100, "a dog"])
    assert ids.shape == (2, 77)
    assert ids[0, -1] == 49407 and bool((ids[0] != 0).all())
    assert ids[1, 3] == 49407 and ids[1, 4] == 0


@pytest.mark.parametrize("texts", [[], "a dog", ["a dog", 3]])
def test_tokenize_rejects_bad_input(texts):
    with pytest.raises(ValueError, match="text"):
        T.tokenize(texts)


# ----- images and video -----


@pytest.mark.parametrize("name", ASSET_NAMES)
def test_image_matches_fixture(parity_fixture, name):
    row = parity_fixture["image_files"].index(f"{name}_image.jpg")
    x = T.image_tensor(T.load_image(shared_file(ASSETS / f"{name}_image.jpg")))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    err = (x - parity_fixture["inputs"]["vision"][row]).abs().mean().item()
    print(f"{name}_image.jpg: mean abs {err:.5f}")
    assert err < IMAGE_TOLERANCE


@pytest.mark.parametrize("name", ASSET_NAMES)
def test_image_resized_in_8_bits_as_the_reference(parity_fixture, name):
    """The CPU path resizes uint8 frames with PIL's fixed-point bicubic, as the reference does: within one 8-bit
    level of its inputs (mean abs 5e-5 measured), where resizing in float32 was 2e-3 off."""
    row = parity_fixture["image_files"].index(f"{name}_image.jpg")
    x = T.image_tensor(T.load_image(shared_file(ASSETS / f"{name}_image.jpg")))
    diff = (x - parity_fixture["inputs"]["vision"][row]).abs()
    assert diff.mean().item() < 2e-4 and diff.max().item() < 1.01 / 255 / min(T.CLIP_STD)


def test_image_at_model_size_is_only_normalised():
    rgb = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    expected = (torch.from_numpy(rgb).permute(2, 0, 1) / 255 - torch.tensor(T.CLIP_MEAN)[:, None, None]) / torch.tensor(
        T.CLIP_STD
    )[:, None, None]
    torch.testing.assert_close(T.image_tensor(rgb), expected)


def test_image_levels_normalise_by_clips_formula():
    """Vision windows travel as their resized uint8 levels, contiguous (the resize leaves them channels last, and
    stacked so they normalised ten times slower); normalised, bit for bit CLIP's formula; never normalised twice."""
    rgb = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    levels = T.image_levels(rgb)
    assert levels.dtype == torch.uint8 and levels.shape == (3, 224, 224) and levels.is_contiguous()
    video = torch.stack([levels, levels.flip(-1)], dim=1)  # (3, 2, 224, 224), as a vision window
    mean, std = (torch.tensor(v).view(1, 3, 1, 1, 1) for v in (T.CLIP_MEAN, T.CLIP_STD))
    assert torch.equal(T.levels_to_model(video[None]), (video[None].float() / 255 - mean) / std)
    with pytest.raises(ValueError, match="expected uint8 RGB levels"):
        T.levels_to_model(video[None].float())  # model input already


def test_image_centre_crop_of_wide_image():
    rgb = np.zeros((224, 448, 3), np.uint8)
    rgb[:, 224:] = 255  # right half white: the centre crop is half black, half white
    x = T.image_tensor(rgb)
    torch.testing.assert_close(x[:, :, :112], _clip_normalised(0.0)[:, None, None].expand(3, 224, 112))
    torch.testing.assert_close(x[:, :, 112:], _clip_normalised(1.0)[:, None, None].expand(3, 224, 112))


@pytest.mark.parametrize(
    "rgb", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32), np.zeros((0, 10, 3), np.uint8), [1, 2]]
)
def test_image_rejects_bad_input(rgb):
    with pytest.raises(ValueError, match=r"vision: .*\(H, W, 3\) uint8"):
        T.image_tensor(rgb)


@pytest.mark.parametrize(
    "num_frames,n,expected",
    [(60, 2, [15, 45]), (30, 2, [7, 22]), (5, 3, [0, 2, 4]), (10, 4, [1, 3, 6, 8]), (1, 2, [0, 0]), (7, 2, [1, 5])],
)
def test_uniform_indices(num_frames, n, expected):
    assert T.uniform_indices(num_frames, n).tolist() == expected


def test_uniform_indices_rejects_no_frames():
    with pytest.raises(ValueError, match="vision"):
        T.uniform_indices(0)


def test_video_tensor_samples_the_centres_of_the_two_halves():
    frames = [np.full((120, 160, 3), 10 * i, np.uint8) for i in range(20)]
    x = T.video_tensor(frames)
    assert x.shape == (3, 2, 224, 224)
    torch.testing.assert_close(x[:, 0], T.image_tensor(frames[5]))
    torch.testing.assert_close(x[:, 1], T.image_tensor(frames[15]))


def test_video_tensor_rejects_bad_frames():
    with pytest.raises(ValueError, match="vision"):
        T.video_tensor([])
    with pytest.raises(ValueError, match="differ in size"):
        T.video_tensor([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)])


def test_load_video_reads_first_window(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(30):  # 3 s at 10 fps, frame i grey level 8 * i
        writer.write(np.full((48, 64, 3), 8 * i, np.uint8))
    writer.release()
    frames = T.load_video(path, seconds=2.0)
    assert len(frames) == 20 and frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    assert abs(float(frames[19].mean()) - 8 * 19) < 4  # JPEG-compressed
    modality, x = T.load_file(path)
    assert modality == "vision" and x.shape == (3, 2, 224, 224)


# ----- audio -----


@pytest.mark.parametrize("name", ASSET_NAMES)
def test_audio_matches_fixture(parity_fixture, name):
    row = parity_fixture["audio_files"].index(f"{name}_audio.wav")
    waveform, rate = T.load_audio(shared_file(ASSETS / f"{name}_audio.wav"))
    assert waveform.dtype == np.float32 and waveform.shape[0] in (1, 2) and rate == 44100
    x = T.audio_tensor(waveform, rate)
    assert x.shape == (1, 128, 204) and x.dtype == torch.float32
    err = (x - parity_fixture["inputs"]["audio"][row]).abs().max().item()
    print(f"{name}_audio.wav ({waveform.shape[0]} ch): max abs {err:.2e}")
    assert err < AUDIO_TOLERANCE


@pytest.mark.parametrize("samples", [0, 10, 399, 400, 16000])
@pytest.mark.parametrize("channels", [None, 1, 2])
def test_short_audio_is_padded(samples, channels):
    shape = (samples,) if channels is None else (channels, samples)
    waveform = np.random.default_rng(samples).normal(0, 0.1, shape).astype(np.float32)
    x = T.mel_spectrogram(waveform)
    assert x.shape == (1, 128, 204) and bool(torch.isfinite(x).all())


def test_resampler_is_cached_per_rate():
    assert T.get_resampler(44100) is T.get_resampler(44100)
    assert T.get_resampler(48000) is not T.get_resampler(44100)
    assert T.get_resampler(44101) is T.get_resampler(44099)  # both resampled as 44,100 Hz (see nominal_rate)
    before = T._resampler.cache_info().hits
    out = T.resample(np.zeros((2, 44100), np.float32), 44100)
    assert out.shape == (2, 16000) and T._resampler.cache_info().hits == before + 1


def test_audio_tensor_resamples_only_what_it_needs():
    waveform = np.random.default_rng(0).normal(0, 0.1, (2, 5 * 22050)).astype(np.float32)
    assert torch.equal(T.audio_tensor(waveform, 22050), T.mel_spectrogram(T.resample(waveform, 22050)))


def test_resample_at_target_rate_is_identity():
    waveform = np.random.default_rng(0).normal(size=(1, 1000)).astype(np.float32)
    assert torch.equal(T.resample(waveform, 16000), torch.from_numpy(waveform))


@pytest.mark.parametrize(
    "waveform,rate",
    [
        (np.zeros((1, 2, 100), np.float32), 16000),
        (np.zeros(100, np.int16), 16000),
        (np.array([0.0, np.nan], np.float32), 16000),
        (np.zeros((0, 100), np.float32), 16000),
        (np.zeros(100, np.float32), 0),
        (np.zeros(100, np.float32), 22050.5),
    ],
)
def test_audio_rejects_bad_input(waveform, rate):
    with pytest.raises(ValueError, match="audio"):
        T.audio_tensor(waveform, rate)


def test_audio_of_a_strided_read_only_view_equals_that_of_its_contiguous_copy():
    samples = np.random.default_rng(0).uniform(-0.5, 0.5, (2 * 48000, 2)).astype(np.float32)
    view = samples.T  # (channels, samples), as the windowing stage passes a stream's joined chunks
    view.flags.writeable = False
    assert torch.equal(T.audio_tensor(view, 48000), T.audio_tensor(np.ascontiguousarray(view), 48000))
    assert np.array_equal(samples, np.random.default_rng(0).uniform(-0.5, 0.5, (2 * 48000, 2)).astype(np.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf])
def test_all_finite_agrees_with_torch(dtype, bad):
    x = torch.zeros(3, 4, 5, dtype=dtype)
    if bad is not None:
        x[2, 1, 3] = bad
    for tensor in (x, x.transpose(0, 2), x[::2], x.flip(0), x.clone().requires_grad_(True)):
        assert T.all_finite(tensor) == bool(torch.isfinite(tensor).all()) == (bad is None)
    assert T.all_finite(x[:2]) and T.all_finite(x[:, :, :3])  # views without the bad value
    if dtype in (torch.float32, torch.float64):  # a view numpy cannot take (its negative bit set): torch's check
        negated = torch.complex(torch.zeros_like(x), x).conj().imag  # -x
        assert negated.is_neg() and T.all_finite(negated) == (bad is None)


# ----- depth -----


def _expected_depth(metres: float) -> float:
    disparity = 0.0 if metres == 0 else 0.075 * 518.86 / min(max(metres, T.DEPTH_MIN_M), 10.0)
    return (disparity / 75 - 0.0418) / 0.0295


@pytest.mark.parametrize("metres", [0.0, 0.3, 2.0, 50.0])
def test_constant_depth_gives_documented_value(metres):
    for depth in (np.full((240, 320), metres, np.float32), np.full((240, 320), round(metres * 1000), np.uint16)):
        x = T.depth_tensor(depth)
        assert x.shape == (1, 224, 224) and x.dtype == torch.float32
        torch.testing.assert_close(x, torch.full((1, 224, 224), _expected_depth(metres)))


def test_depth_two_metres_worked_example():
    # 0.075 * 518.86 / 2 = 19.457 px; / 75 = 0.25943; (0.25943 - 0.0418) / 0.0295 = 7.3773
    assert T.depth_tensor(np.full((50, 50), 2.0, np.float32))[0, 0, 0].item() == pytest.approx(7.3773, abs=1e-3)


def test_uint16_depth_by_look_up_equals_the_per_pixel_steps():
    """Millimetre frames take one table look-up per pixel: the same float32 values as converting each pixel."""
    mm = np.random.default_rng(0).integers(0, 12_000, (48, 64)).astype(np.uint16)  # under 0.519 m, over 10 m, 0
    mm[0, :4] = (0, 1, 10_000, 65_535)
    assert torch.equal(T.depth_tensor(mm), T._metres_to_model(T._depth_metres(mm)[None, None])[0])


def test_depth_nan_is_no_reading():
    depth = np.full((224, 224), 2.0, np.float32)
    depth[:, :112] = np.nan
    x = T.depth_tensor(depth)
    assert x[0, :, :100].unique().tolist() == pytest.approx([_expected_depth(0.0)])
    assert x[0, :, 124:].unique().tolist() == pytest.approx([_expected_depth(2.0)])


@pytest.mark.parametrize(
    "depth",
    [
        np.zeros((10, 10, 1), np.float32),
        np.zeros((10, 10), np.int32),
        np.full((10, 10), np.inf, np.float32),
        np.full((10, 10), -1.0, np.float32),
    ],
)
def test_depth_rejects_bad_input(depth):
    with pytest.raises(ValueError, match=r"depth: .*\(H, W\)"):
        T.depth_tensor(depth)


# ----- thermal -----


@pytest.mark.parametrize(
    "frame,unit",
    [
        (np.full((60, 80), 255, np.uint8), 1.0),
        (np.full((60, 80), 51, np.uint8), 0.2),
        (np.full((60, 80), round((20 + 273.15) * 100), np.uint16), 0.5),  # 20 deg C in [-10, 50]
        (np.full((60, 80), 50.0, np.float32), 1.0),
        (np.full((60, 80), -40.0, np.float32), 0.0),  # clipped
        (np.full((60, 80), 5.0, np.float64), 0.25),
    ],
)
def test_constant_thermal_gives_documented_value(frame, unit):
    x = T.thermal_tensor(frame)
    assert x.shape == (1, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.full((1, 224, 224), (unit - 0.5) / 0.5))


@pytest.mark.parametrize(
    "frame",
    [np.zeros((10, 10, 3), np.uint8), np.zeros((10, 10), np.int32), np.full((10, 10), np.nan, np.float32)],
)
def test_thermal_rejects_bad_input(frame):
    with pytest.raises(ValueError, match=r"thermal: .*\(H, W\)"):
        T.thermal_tensor(frame)


# ----- IMU -----


@pytest.mark.parametrize("rate", [100, 800, 833, 1000, 97.3])
def test_imu_resampling_keeps_a_slow_signal(rate):
    samples, expected = _imu_signal(rate, 6.0)
    x = T.imu_tensor(samples, rate)
    assert x.shape == (6, 2000) and x.dtype == torch.float32
    err = np.abs(x.numpy() - expected).max()
    print(f"IMU at {rate} Hz: max abs error {err:.4f}")
    assert err < 0.02


def test_imu_exact_window_and_native_rate():
    samples, expected = _imu_signal(100, 5.0)  # no samples after the window: the end is edge-padded
    assert np.abs(T.imu_tensor(samples, 100).numpy() - expected).max() < 0.05
    samples, expected = _imu_signal(400, 5.0)
    np.testing.assert_allclose(T.imu_tensor(samples, 400).numpy(), expected, atol=1e-5)


def test_imu_short_window_is_zero_padded():
    x = T.imu_tensor(np.ones((200, 6), np.float32), 100)  # 2 s
    assert x.shape == (6, 2000)
    torch.testing.assert_close(x[:, :790], torch.ones(6, 790), atol=2e-3, rtol=0)
    assert bool((x[:, 800:] == 0).all())
    assert bool((T.imu_tensor(np.zeros((0, 6), np.float32), 100) == 0).all())


@pytest.mark.parametrize(
    "samples,rate",
    [
        (np.zeros((100, 5), np.float32), 100),
        (np.zeros(600, np.float32), 100),
        (np.zeros((100, 6), np.int16), 100),
        (np.full((100, 6), np.nan, np.float32), 100),
        (np.zeros((100, 6), np.float32), 0),
        (np.zeros((100, 6), np.float32), float("nan")),
    ],
)
def test_imu_rejects_bad_input(samples, rate):
    with pytest.raises(ValueError, match="imu"):
        T.imu_tensor(samples, rate)


# ----- files -----


def test_load_file_by_extension(tmp_path):
    rng = np.random.default_rng(0)
    cv2.imwrite(str(tmp_path / "a.png"), rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    soundfile.write(tmp_path / "a.wav", rng.normal(0, 0.1, (8000, 2)).astype(np.float32), 8000)
    assert [(m, tuple(x.shape)) for m, x in (T.load_file(tmp_path / "a.png"), T.load_file(tmp_path / "a.wav"))] == [
        ("vision", (3, 224, 224)),
        ("audio", (1, 128, 204)),
    ]


def test_load_file_imu_csv_infers_rate(tmp_path):
    samples, expected = _imu_signal(200, 6.0)
    t = np.arange(len(samples)) / 200
    path = tmp_path / "imu.csv"
    np.savetxt(path, np.column_stack([t, samples]), delimiter=",", header="t,ax,ay,az,gx,gy,gz", comments="")
    modality, x = T.load_file(path)
    assert modality == "imu" and x.shape == (6, 2000)
    assert np.abs(x.numpy() - expected).max() < 0.02
    ego4d = tmp_path / "ego4d.csv"  # milliseconds, gyro first, extra column
    header = "canonical_timestamp_ms,component_timestamp_ms,gyro_x,gyro_y,gyro_z,accl_x,accl_y,accl_z"
    table = np.column_stack([t * 1000, t, samples[:, 3:], samples[:, :3]])
    np.savetxt(ego4d, table, delimiter=",", header=header, comments="")
    assert T.load_imu_csv(ego4d)[1] == pytest.approx(200)
    torch.testing.assert_close(T.load_file(ego4d)[1], x)


def test_load_file_npy_needs_modality(tmp_path):
    np.save(tmp_path / "d.npy", np.full((48, 64), 1500, np.uint16))
    with pytest.raises(ValueError, match="modality"):
        T.load_file(tmp_path / "d.npy")
    modality, x = T.load_file(tmp_path / "d.npy", "depth")
    assert modality == "depth" and x.shape == (1, 224, 224)
    torch.testing.assert_close(x, torch.full((1, 224, 224), _expected_depth(1.5)))
    assert T.load_file(tmp_path / "d.npy", "thermal")[1].shape == (1, 224, 224)
    samples, _ = _imu_signal(100, 5.0)
    np.save(tmp_path / "i.npy", np.column_stack([np.arange(len(samples)) / 100, samples]))
    assert T.load_file(tmp_path / "i.npy", "imu")[1].shape == (6, 2000)


def test_load_file_depth_from_16_bit_png(tmp_path):
    cv2.imwrite(str(tmp_path / "d.png"), np.full((48, 64), 2000, np.uint16))
    expected = torch.full((1, 224, 224), _expected_depth(2.0))
    torch.testing.assert_close(T.load_file(tmp_path / "d.png", "depth")[1], expected)


def test_load_file_thermal_from_colour_jpeg(tmp_path):
    cv2.imwrite(str(tmp_path / "ir.jpg"), np.full((48, 64, 3), 255, np.uint8))  # LLVIP stores 3-channel JPEGs
    torch.testing.assert_close(T.load_file(tmp_path / "ir.jpg", "thermal")[1], torch.ones(1, 224, 224))


def test_load_file_rejects_unknown(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="modality"):
        T.load_file(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="cannot load"):
        T.load_file(tmp_path / "x.txt", "audio")
    with pytest.raises(FileNotFoundError):
        T.load_file(tmp_path / "missing.png")
