"""Media preprocessing: raw sensor data -> one ImageBind input item (CPU, float32; text int64).

Text, image, audio and video follow the reference ImageBind (facebookresearch/ImageBind) pipelines.
Two known differences: images are resized with torch's uint8 antialiased bicubic instead of PIL's (the same
fixed-point filter: mean abs difference 5e-5 after normalisation, at most one 8-bit level; float32 on devices
without the uint8 kernel: ~0.002), and a video is one window from its start with one centre crop,
its 2 frames taken at the centres of the window's two halves (the reference takes the first and last),
each frame through the image transform (the reference averages 5 clips x 3 spatial crops, scaled with
pytorchvideo's bilinear ShortSideScale), because streams are embedded window by window.

Depth, thermal and IMU have no official loader; the choices below are ours.

Depth -> disparity, following Omnivore (which ImageBind follows for depth):
  * input (H, W) uint16 millimetres or floating-point metres; 0 or NaN = no reading; negative or
    infinite values are errors.
  * metres are clamped to [DEPTH_MIN_M, DEPTH_MAX_M] = [0.519, 10] m and converted with
    disparity = BASELINE_FOCAL / depth, BASELINE_FOCAL = 0.075 m x 518.86 px (a Kinect v1 as
    calibrated for NYU Depth v2, part of SUN RGB-D). Inputs carry no intrinsics, so this is a nominal
    geometry. DEPTH_MIN_M = BASELINE_FOCAL / 75 so that the largest disparity is Omnivore's clamp of
    75 px; 10 m is the range limit of wearable/indoor depth sensors (beyond it readings are noise).
  * disparity / 75 lies in [0.052, 1]; pixels with no reading get 0 (zero disparity = infinitely far,
    i.e. no evidence of a surface).
  * resize with antialiased bilinear on the disparity map: its weights are non-negative, so no
    overshoot (bicubic rings into negative disparity at depth edges) and no new values outside
    the input range; averaging disparity (inverse depth) is also the better-behaved average at range.
  * normalise with Omnivore's SUN RGB-D disparity statistics, mean 0.0418, std 0.0295.
Thermal -> one channel in [0, 1], white-hot:
  * uint8: an 8-bit thermal image as in LLVIP (already scaled by the camera), divided by 255.
  * uint16: radiometric centi-kelvin (FLIR Lepton and similar): deg C = v / 100 - 273.15.
    float: deg C (must be finite). Both map THERMAL_RANGE_C = [-10, 50] deg C linearly onto [0, 1],
    clipped: outdoor night ambient through skin temperature (LLVIP's scenes: streets, pedestrians) with
    margin; hotter objects saturate white as they would under a camera's gain control.
  * resize as images (antialiased bicubic; thermal frames are images), clipped back to [0, 1].
  * normalise with mean 0.5, std 0.5 (-> [-1, 1]): ImageBind publishes no thermal statistics.
IMU -> (6, 2000): a 5 s window at 400 Hz, the shape ImageBind's IMU encoder takes:
  * input (N, 6) floating-point rows [ax, ay, az, gx, gy, gz] in m/s^2 and rad/s, kept in these
    units: Ego4D, ImageBind's IMU source, gives accelerometer in m/s^2 and gyroscope in rad/s, as
    far as we know (GoPro's GPMF units; not checked against the dataset here). No scaling: the IMU
    stem is a bias-free linear layer followed by LayerNorm, so one global scale cancels; only the
    accelerometer : gyroscope ratio matters, and these units keep Ego4D's. Axis signs and the
    channel order are the device's; ImageBind's training order is not published.
  * the first 5 s of samples are resampled to 400 Hz (up to 1 s of later samples, when given, serve
    as context for the window's end). Rates within 0.1 % of an integer (every real IMU rate: 100,
    200, 800, 833, 1000 Hz ...) use torchaudio's windowed-sinc resampler at the rounded rate: it
    low-passes when downsampling, where plain interpolation would alias. Each end is first padded
    with one second of its edge value, so gravity's offset does not ring against zero padding.
    Other rates use linear interpolation (no anti-alias filter; only for odd inferred rates).
  * shorter windows are zero-padded to 2000 steps, as audio is.
  * readings are clipped to +-IMU_LIMIT = 1000 (m/s^2, rad/s), beyond any wearable IMU's range, so that
    no finite input can overflow the encoder.
Audio samples are clipped to the nominal range [-1, 1] (PROTOCOL.md), as a converter would.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import soundfile
import torch
import torch.nn.functional as F
import torchaudio

from .config import ImageBindConfig
from .finite import all_finite

# Output sizes: the default config's `input_specs()`, which are the official ImageBind preprocessing's.
OFFICIAL = ImageBindConfig()

# text
CONTEXT_LENGTH = OFFICIAL.context_length  # 77

# images and video
IMAGE_SIZE = OFFICIAL.image_size  # 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIDEO_FRAMES = OFFICIAL.video_frames  # 2
VIDEO_SECONDS = 2.0

# audio
AUDIO_RATE = 16000
AUDIO_CLIP_SAMPLES = 2 * AUDIO_RATE  # the first 2 s
MEL_BINS = OFFICIAL.audio_num_mel_bins  # 128
MEL_FRAMES = OFFICIAL.audio_target_len  # 204
FRAME_LENGTH_MS = 25
FRAME_SHIFT_MS = 10
FRAME_SAMPLES = AUDIO_RATE * FRAME_LENGTH_MS // 1000  # 400: shortest waveform fbank accepts
MEL_MEAN = -4.268
MEL_STD = 9.138
RESAMPLE_CONTEXT_S = 0.1  # input after the clip that audio_tensor resamples with it (kernel reach << 0.1 s)

# depth
BASELINE_FOCAL = 0.075 * 518.86  # stereo baseline (m) x focal length (px): disparity in px at 1 m
DISPARITY_MAX = 75.0  # px, Omnivore's clamp and scale
DEPTH_MIN_M = BASELINE_FOCAL / DISPARITY_MAX  # ~0.519 m
DEPTH_MAX_M = 10.0
DEPTH_MEAN = 0.0418
DEPTH_STD = 0.0295
MM_PER_M = 1000.0

# thermal
THERMAL_RANGE_C = (-10.0, 50.0)
THERMAL_MEAN = 0.5
THERMAL_STD = 0.5
KELVIN_AT_0C = 273.15
CENTI = 100.0

# IMU
IMU_CHANNELS = OFFICIAL.imu_channels  # 6
IMU_STEPS = OFFICIAL.imu_length  # 2000
IMU_SECONDS = 5
IMU_RATE = IMU_STEPS // IMU_SECONDS  # 400 Hz
IMU_RATE_TOLERANCE = 1e-3  # relative distance to an integer rate for sinc resampling
IMU_CONTEXT_S = 1.0  # samples after the window used (only) to resample its end
IMU_LIMIT = 1000.0  # m/s^2 (~100 g) and rad/s: beyond any wearable's range; readings are clipped to it

# files
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp"}
AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".mp3"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv"}
EXTENSION_MODALITY = {
    **dict.fromkeys(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS, "vision"),
    **dict.fromkeys(AUDIO_EXTENSIONS, "audio"),
    ".csv": "imu",
}
TIME_COLUMNS_S = ("t", "time", "timestamp")
TIME_COLUMNS_MS = ("t_ms", "timestamp_ms", "canonical_timestamp_ms")
IMU_COLUMN_NAMES = (  # accepted header names per channel, in channel order
    ("ax", "acc_x", "accl_x", "accel_x"),
    ("ay", "acc_y", "accl_y", "accel_y"),
    ("az", "acc_z", "accl_z", "accel_z"),
    ("gx", "gyr_x", "gyro_x"),
    ("gy", "gyr_y", "gyro_y"),
    ("gz", "gyr_z", "gyro_z"),
)


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------


def _array(x, modality: str, expected: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{modality}: expected a numpy array {expected}, got {type(x).__name__}")
    return x


def _check_finite(x: torch.Tensor, modality: str, expected: str) -> None:
    if not all_finite(x):
        raise ValueError(f"{modality}: NaN or Inf in input; expected finite values {expected}")


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return path


def _resize_short_side(x: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, C, H, W) -> short side IMAGE_SIZE, long side int(IMAGE_SIZE * long / short) (torchvision's rule)."""
    h, w = x.shape[-2:]
    long = int(IMAGE_SIZE * max(h, w) / min(h, w))
    size = (IMAGE_SIZE, long) if h <= w else (long, IMAGE_SIZE)
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def _center_crop(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, IMAGE_SIZE, IMAGE_SIZE), offsets rounded as torchvision's CenterCrop."""
    h, w = x.shape[-2:]
    top = int(round((h - IMAGE_SIZE) / 2.0))
    left = int(round((w - IMAGE_SIZE) / 2.0))
    return x[..., top : top + IMAGE_SIZE, left : left + IMAGE_SIZE]


def _resize_crop(x: torch.Tensor, mode: str) -> torch.Tensor:
    return _center_crop(_resize_short_side(x, mode))


RESAMPLER_WIDTH = 6  # torchaudio's defaults: zero crossings of the windowed sinc, and its rolloff
RESAMPLER_ROLLOFF = 0.99
MAX_RESAMPLER_TAPS = 2**19  # 2 MiB of float32 kernel; every common audio and IMU rate needs less
RATE_GRID_HZ = 100  # beyond that bound a rate is resampled as the nearest multiple of this


def resampler_taps(rate: int, target: int) -> int:
    """Size of torchaudio's sinc kernel for rate -> target: it grows with the ratio reduced by the rates'
    gcd (44,100 -> 16,000 Hz is 441/160: 76k taps; 44,101 -> 16,000 Hz is 44101/16000: 7e8 taps, 2.8 GB)."""
    g = math.gcd(rate, target)
    orig, new = rate // g, target // g
    width = math.ceil(RESAMPLER_WIDTH * orig / (min(orig, new) * RESAMPLER_ROLLOFF))
    return new * (orig + 2 * width)


def nominal_rate(rate: int, target: int) -> int:
    """The rate a stream is resampled as: its own, unless its kernel would exceed MAX_RESAMPLER_TAPS; then
    the nearest multiple of RATE_GRID_HZ (a pitch and time error of at most 0.6 % at 8 kHz, 23 ppm at
    44.1 kHz), whose kernel to 16 kHz has at most 331k taps. So no accepted rate costs more than 2^19 taps
    (measured worst: 26 ms for a 2 s window of 8 channels)."""
    if resampler_taps(rate, target) <= MAX_RESAMPLER_TAPS:
        return rate
    return max(RATE_GRID_HZ, round(rate / RATE_GRID_HZ) * RATE_GRID_HZ)


def get_resampler(rate: int, target: int = AUDIO_RATE) -> torchaudio.transforms.Resample:
    """The resampler of `rate`'s nominal rate to `target`: one per pair, built once and reused (at most 32,
    of at most 2 MiB each: rates with the same nominal rate share one).

    Default settings (Hann-windowed sinc, 6 zero crossings, rolloff 0.99); the kernel is computed in
    float32 as `torchaudio.functional.resample` does for float32 input (the reference's call), which
    the transform's default float64-then-cast kernel misses by ~1e-6 (up to ~4e-3 in the log-mel).
    """
    return _resampler(nominal_rate(rate, target), target)


@functools.lru_cache(maxsize=32)
def _resampler(rate: int, target: int) -> torchaudio.transforms.Resample:
    return torchaudio.transforms.Resample(
        rate, target, lowpass_filter_width=RESAMPLER_WIDTH, rolloff=RESAMPLER_ROLLOFF, dtype=torch.float32
    )


# --------------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------------


@functools.cache
def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer  # slow import (~2 s): only when text is used

    return SimpleTokenizer(context_length=CONTEXT_LENGTH)


def tokenize(texts: Sequence[str]) -> torch.Tensor:
    """CLIP BPE ids (N, 77), zero-padded; a longer text is cut to 77 ids ending in end-of-text."""
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise ValueError("text: expected a sequence of strings, e.g. ['a dog']")
    if len(texts) == 0:
        raise ValueError("text: expected at least one string; got an empty sequence")
    return _tokenizer()(list(texts), context_length=CONTEXT_LENGTH)  # (N, 77) int64


# --------------------------------------------------------------------------------------------------
# images and video
# --------------------------------------------------------------------------------------------------


def load_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    bgr = cv2.imread(str(_existing(path)), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"vision: cannot decode image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _rgb_batch(frames: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) frames of one size -> (B, 3, H, W) uint8 (a channels-last view of the stacked frames)."""
    expected = "(H, W, 3) uint8 RGB"
    frames = [_array(frame, "vision", expected) for frame in frames]
    for frame in frames:
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or 0 in frame.shape:
            raise ValueError(f"vision: expected {expected}, got {frame.dtype} {frame.shape}")
        if frame.shape != frames[0].shape:
            raise ValueError(f"vision: frames differ in size: {frames[0].shape} and {frame.shape}")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)


def _rgb_to_model(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) 8-bit levels (uint8, or float holding them) -> (B, 3, 224, 224) CLIP-normalised."""
    return levels_to_model(_rgb_levels(x))


def _rgb_levels(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) 8-bit levels (uint8, or float holding them) -> (B, 3, 224, 224) uint8, resized and cropped.

    On the CPU the frames are resized in 8 bits, as PIL (the reference) resizes: torch's uint8 antialiased
    bicubic (channels last) computes PIL's fixed-point filter, within one level of it (mean abs 5e-5 to the
    parity fixture's inputs, where resizing in float32 and rounding gave 2e-3), and at a sixth of the float
    kernel's cost. Other devices, which have no uint8 kernel, resize in float32 and round to 8-bit levels.
    """
    if x.device.type == "cpu":
        x = x if x.dtype == torch.uint8 else x.clamp(0, 255).round().to(torch.uint8)
        return _resize_crop(x.contiguous(memory_format=torch.channels_last), "bicubic")
    return _resize_crop(x.float(), "bicubic").clamp(0, 255).round().to(torch.uint8)


def levels_to_model(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, ...) uint8 RGB levels, on any device -> float32 CLIP-normalised, the vision model's input. Vision
    windows travel as their levels (a quarter of the bytes) and the encoder normalises them (`Encoder.embed`)."""
    if x.dtype != torch.uint8 or x.dim() < 2 or x.shape[1] != 3:
        raise ValueError(f"vision: expected uint8 RGB levels of shape (B, 3, ...), got {x.dtype} {tuple(x.shape)}")
    shape = (1, 3) + (1,) * (x.dim() - 2)
    mean, std = (v.view(shape) for v in _clip_stats(x.device))
    # in place on one fresh copy: the same arithmetic, a fifth of the time of a new tensor per step
    return x.to(torch.float32, copy=True).div_(255).sub_(mean).div_(std)


@functools.cache
def _clip_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's per-channel mean and std on `device`, made once per device (read-only by use)."""
    return torch.tensor(CLIP_MEAN, device=device), torch.tensor(CLIP_STD, device=device)


def model_input(modality: str, batch: torch.Tensor) -> torch.Tensor:
    """A batch as the model takes it: uint8 vision levels normalised (`levels_to_model`), anything else as it is."""
    return levels_to_model(batch) if modality == "vision" and batch.dtype == torch.uint8 else batch


def image_levels(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, 224, 224) uint8 levels, resized and cropped (`levels_to_model` normalises);
    contiguous (the resize leaves them channels last), so that stacked windows are plain arrays."""
    return _rgb_levels(_rgb_batch([rgb]))[0].contiguous()


def image_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, 224, 224)."""
    return _rgb_to_model(_rgb_batch([rgb]))[0]


def uniform_indices(num_frames: int, n: int = VIDEO_FRAMES) -> torch.Tensor:
    """n indices spread evenly over num_frames: the frame at the centre of each of n equal segments,
    floor((i + 0.5) * num_frames / n): (n,) int64. Centres rather than first and last frame (the reference's
    linspace) so that a stream can tell from a frame's time alone whether a window will sample it."""
    if num_frames < 1 or n < 1:
        raise ValueError(f"vision: need at least one frame and one sample, got {num_frames} frames, n={n}")
    return ((torch.arange(n, dtype=torch.float64) + 0.5) * num_frames / n).floor().long()


def video_tensor(frames: Sequence[np.ndarray], n: int = VIDEO_FRAMES) -> torch.Tensor:
    """A window of (H, W, 3) uint8 frames -> (3, n, 224, 224): n frames sampled uniformly."""
    if len(frames) == 0:
        raise ValueError("vision: expected a non-empty sequence of (H, W, 3) uint8 frames")
    picked = [frames[i] for i in uniform_indices(len(frames), n).tolist()]
    return _rgb_to_model(_rgb_batch(picked)).transpose(0, 1)  # (n, 3, S, S) -> (3, n, S, S)


def load_video(path: str | Path, seconds: float = VIDEO_SECONDS) -> list[np.ndarray]:
    """The first `seconds` of a video as (H, W, 3) uint8 RGB frames."""
    capture = cv2.VideoCapture(str(_existing(path)))
    try:
        fps = capture.get(cv2.CAP_PROP_FPS)
        if not capture.isOpened() or not fps > 0:
            raise ValueError(f"vision: cannot open video {path} or read its frame rate")
        count = max(1, round(fps * seconds))
        frames: list[np.ndarray] = []
        while len(frames) < count:
            ok, bgr = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    if not frames:
        raise ValueError(f"vision: no frames decoded from {path}")
    return frames


# --------------------------------------------------------------------------------------------------
# audio
# --------------------------------------------------------------------------------------------------


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """(waveform (channels, samples) float32, sample rate)."""
    data, rate = soundfile.read(str(_existing(path)), dtype="float32", always_2d=True)  # (samples, channels)
    return np.ascontiguousarray(data.T), rate


def _waveform(waveform) -> torch.Tensor:
    expected = "(channels, samples) or (samples,) float"
    waveform = _array(waveform, "audio", expected)
    if waveform.ndim not in (1, 2) or waveform.dtype.kind != "f" or (waveform.ndim == 2 and waveform.shape[0] == 0):
        raise ValueError(f"audio: expected {expected}, got {waveform.dtype} {waveform.shape}")
    # a copy (input arrays may be read-only buffers), contiguous: numpy's copy of a strided view is ~40x faster than
    # torch.tensor's (a window's 96,000 samples: 10 against 465 us)
    x = torch.from_numpy(np.array(waveform, dtype=np.float32, order="C"))
    _check_finite(x, "audio", expected)
    return x


def _positive_rate(rate, modality: str) -> float:
    if not (isinstance(rate, (int, float, np.integer, np.floating)) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"{modality}: expected a positive sample rate in Hz, got {rate!r}")
    return float(rate)


def _integer_rate(rate, modality: str) -> int:
    if not _positive_rate(rate, modality).is_integer():
        raise ValueError(f"{modality}: expected an integer sample rate in Hz, got {rate!r}")
    return int(rate)


def resample(waveform: np.ndarray | torch.Tensor, rate: int, target: int = AUDIO_RATE) -> torch.Tensor:
    """Resample along the last axis with torchaudio's default windowed sinc; shape kept, length rescaled."""
    return _resampled(_waveform(waveform), rate, target)


def _resampled(x: torch.Tensor, rate: int, target: int = AUDIO_RATE) -> torch.Tensor:
    """`resample` of a waveform that `_waveform` has checked."""
    rate, target = _integer_rate(rate, "audio"), _integer_rate(target, "audio")
    return x if rate == target else get_resampler(rate, target)(x)


# The reference's kaldi fbank: (1, samples) at 16 kHz -> (frames, 128), a frame of 25 ms every 10 ms, each on its own
fbank = functools.partial(
    torchaudio.compliance.kaldi.fbank,
    htk_compat=True,
    sample_frequency=AUDIO_RATE,
    use_energy=False,
    window_type="hanning",
    num_mel_bins=MEL_BINS,
    dither=0.0,
    frame_length=FRAME_LENGTH_MS,
    frame_shift=FRAME_SHIFT_MS,
)


def _fbank_to_model(fbanks: torch.Tensor) -> torch.Tensor:
    """(B, frames, 128) fbanks -> (B, 1, 128, 204): cut or zero-padded to 204 frames, normalised."""
    mel = fbanks.transpose(1, 2)  # (B, 128, frames)
    mel = F.pad(mel, (0, max(0, MEL_FRAMES - mel.shape[2])))[..., :MEL_FRAMES]
    return ((mel - MEL_MEAN) / MEL_STD).unsqueeze(1)


def mel_spectrogram(waveform_16k: np.ndarray | torch.Tensor) -> torch.Tensor:
    """16 kHz (channels, samples) or (samples,) -> (1, 128, 204) normalised log-mel of the first 2 s."""
    return _log_mel(_waveform(waveform_16k))


def _log_mel(x: torch.Tensor) -> torch.Tensor:
    """`mel_spectrogram` of a waveform that `_waveform` has checked."""
    x = (x if x.ndim == 2 else x[None])[:, :AUDIO_CLIP_SAMPLES]  # (C, <=32000)
    if x.numel():
        x = x - x.mean()  # over every sample of every channel, as the reference does
    x = F.pad(x, (0, max(0, FRAME_SAMPLES - x.shape[1])))  # at least one frame
    return _fbank_to_model(fbank(x[:1])[None])[0]


def audio_tensor(waveform: np.ndarray, rate: int) -> torch.Tensor:
    """Any-rate (channels, samples) or (samples,) -> (1, 128, 204).

    Only the first 2 s and RESAMPLE_CONTEXT_S after them are resampled: the sinc kernel reaches a few
    dozen samples, so the result equals resampling the whole recording.
    """
    clipped = _waveform(waveform)[..., : samples_to_resample(rate)].clamp(-1.0, 1.0)  # nominal range: louder clip
    return _log_mel(_resampled(clipped, rate))  # checked once: the steps take it as it is


def samples_to_resample(rate: int) -> int:
    """Samples at `rate` that `audio_tensor` resamples: the first 2 s and RESAMPLE_CONTEXT_S after them."""
    return math.ceil((AUDIO_CLIP_SAMPLES / AUDIO_RATE + RESAMPLE_CONTEXT_S) * _integer_rate(rate, "audio"))


# --------------------------------------------------------------------------------------------------
# depth and thermal
# --------------------------------------------------------------------------------------------------


def _one_channel(frame, modality: str, expected: str, dtypes: tuple) -> np.ndarray:
    """A validated (H, W) array of one of `dtypes` or floating point."""
    frame = _array(frame, modality, expected)
    if frame.ndim != 2 or 0 in frame.shape or not (frame.dtype in dtypes or frame.dtype.kind == "f"):
        raise ValueError(f"{modality}: expected {expected}, got {frame.dtype} {frame.shape}")
    return frame


def _depth_metres(depth) -> torch.Tensor:
    """(H, W) metres, NaN where there is no reading."""
    expected = "(H, W) uint16 millimetres or float metres (0 or NaN = no reading)"
    depth = _one_channel(depth, "depth", expected, (np.uint16,))
    if depth.dtype == np.uint16:
        return mm_to_metres(torch.from_numpy(np.array(depth)))  # a copy: a received payload is read-only
    metres = torch.from_numpy(depth.astype(np.float32))
    if bool(torch.isinf(metres).any()) or bool((metres < 0).any()):
        raise ValueError(f"depth: negative or infinite values; expected {expected}")
    return torch.where(metres > 0, metres, torch.nan)


def mm_to_metres(mm: torch.Tensor) -> torch.Tensor:
    """uint16 millimetres, on any device -> float32 metres, NaN where 0 (no reading). Nothing to check: every
    uint16 is a distance."""
    metres = mm.float() / MM_PER_M
    return torch.where(metres > 0, metres, torch.nan)


def depth_tensor(depth: np.ndarray) -> torch.Tensor:
    """(H, W) uint16 mm or float m -> (1, 224, 224) normalised disparity (see the module docstring)."""
    if isinstance(depth, np.ndarray) and depth.dtype == np.uint16 and depth.ndim == 2 and depth.size:
        return _disparity_to_model(torch.from_numpy(np.take(_mm_disparity(), depth))[None, None])[0]
    return _metres_to_model(_depth_metres(depth)[None, None])[0]


@functools.cache
def _mm_disparity() -> np.ndarray:
    """The scaled disparity of each of the 65,536 uint16 millimetre values, by `_scaled_disparity` itself: a
    uint16 frame's per-pixel steps (to metres, clamp, divide) become one look-up, with the same float32 values."""
    return _scaled_disparity(_depth_metres(np.arange(2**16, dtype=np.uint16)[None])).numpy()[0]


def _metres_to_model(metres: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) metres, NaN where there is no reading -> (B, 1, 224, 224) normalised disparity."""
    return _disparity_to_model(_scaled_disparity(metres))


def _scaled_disparity(metres: torch.Tensor) -> torch.Tensor:
    """Metres (NaN where there is no reading) -> disparity / DISPARITY_MAX in [0.052, 1], 0 = no reading."""
    disparity = BASELINE_FOCAL / metres.clamp(DEPTH_MIN_M, DEPTH_MAX_M)  # px, NaN stays NaN
    return torch.nan_to_num(disparity, nan=0.0) / DISPARITY_MAX


def _disparity_to_model(scaled: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) scaled disparity -> (B, 1, 224, 224) resized and normalised."""
    x = _resize_crop(scaled, "bilinear")
    return (x - DEPTH_MEAN) / DEPTH_STD


def _thermal_unit(frame) -> torch.Tensor:
    """(H, W) in [0, 1], hotter = brighter."""
    expected = "(H, W) uint8 image, uint16 centi-kelvin or float deg C"
    frame = _one_channel(frame, "thermal", expected, (np.uint8, np.uint16))
    if frame.dtype in (np.uint8, np.uint16):
        return thermal_levels_to_unit(torch.from_numpy(np.array(frame)))  # a copy: a payload is read-only
    celsius = torch.from_numpy(frame.astype(np.float32))
    _check_finite(celsius, "thermal", expected)
    return _celsius_to_unit(celsius)


def thermal_levels_to_unit(levels: torch.Tensor) -> torch.Tensor:
    """uint8 image levels or uint16 centi-kelvin, on any device -> [0, 1]. Nothing to check: every level is a
    temperature."""
    x = levels.float()
    return x / 255 if levels.dtype == torch.uint8 else _celsius_to_unit(x / CENTI - KELVIN_AT_0C)


def _celsius_to_unit(celsius: torch.Tensor) -> torch.Tensor:
    low, high = THERMAL_RANGE_C
    return ((celsius - low) / (high - low)).clamp(0, 1)


def thermal_tensor(frame: np.ndarray) -> torch.Tensor:
    """(H, W) uint8, uint16 centi-kelvin or float deg C -> (1, 224, 224) (see the module docstring)."""
    return _unit_to_model(_thermal_unit(frame)[None, None])[0]


def _unit_to_model(unit: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) thermal in [0, 1] -> (B, 1, 224, 224) normalised."""
    x = _resize_crop(unit, "bicubic").clamp(0, 1)
    return (x - THERMAL_MEAN) / THERMAL_STD


# --------------------------------------------------------------------------------------------------
# IMU
# --------------------------------------------------------------------------------------------------


def _sinc_to_imu_rate(x: torch.Tensor, rate: int) -> torch.Tensor:
    """(6, N) at an integer rate -> (6, ceil(N * 400 / rate)), ends padded with 1 s of edge values."""
    if rate == IMU_RATE:
        return x
    padded = F.pad(x[None], (rate, rate), mode="replicate")[0]  # 1 s each side -> 400 output steps each
    out = get_resampler(rate, IMU_RATE)(padded)
    return out[:, IMU_RATE : IMU_RATE + math.ceil(x.shape[1] * IMU_RATE / rate)]


def _linear_to_imu_rate(x: torch.Tensor, rate: float) -> torch.Tensor:
    """(6, N) at any rate -> (6, ceil(N * 400 / rate)) by linear interpolation; the last value is held."""
    n = x.shape[1]
    steps = torch.arange(math.ceil(n * IMU_RATE / rate), dtype=torch.float64)
    position = (steps * (rate / IMU_RATE)).clamp(max=n - 1)  # fractional input index per output step
    left = position.floor().long()
    right = (left + 1).clamp(max=n - 1)
    weight = (position - left).float()
    return x[:, left] * (1 - weight) + x[:, right] * weight


def imu_tensor(samples: np.ndarray, rate_hz: float) -> torch.Tensor:
    """(N, 6) rows [ax, ay, az, gx, gy, gz] (m/s^2, rad/s) at rate_hz -> (6, 2000): 5 s at 400 Hz."""
    expected = "(N, 6) float rows [ax, ay, az, gx, gy, gz] in m/s^2 and rad/s"
    samples = _array(samples, "imu", expected)
    if samples.ndim != 2 or samples.shape[1] != IMU_CHANNELS or samples.dtype.kind != "f":
        raise ValueError(f"imu: expected {expected}, got {samples.dtype} {samples.shape}")
    rate_hz = _positive_rate(rate_hz, "imu")
    x = torch.from_numpy(samples.astype(np.float32)).T  # (6, N)
    _check_finite(x, "imu", expected)
    x = x.clamp(-IMU_LIMIT, IMU_LIMIT)  # finite float32 up to 3e38 would overflow the encoder to NaN
    x = x[:, : math.ceil((IMU_SECONDS + IMU_CONTEXT_S) * rate_hz)]  # the window and 1 s after it
    if x.shape[1] == 0:
        return torch.zeros(IMU_CHANNELS, IMU_STEPS)
    if abs(rate_hz - round(rate_hz)) <= IMU_RATE_TOLERANCE * rate_hz:
        x = _sinc_to_imu_rate(x, round(rate_hz))
    else:
        x = _linear_to_imu_rate(x, rate_hz)
    return F.pad(x, (0, max(0, IMU_STEPS - x.shape[1])))[:, :IMU_STEPS]


def _rate_from_times(seconds: np.ndarray) -> float:
    if len(seconds) < 2 or not bool(np.all(np.diff(seconds) > 0)):
        raise ValueError("imu: need at least two samples with strictly increasing timestamps")
    return (len(seconds) - 1) / float(seconds[-1] - seconds[0])


def load_imu_csv(path: str | Path) -> tuple[np.ndarray, float]:
    """(samples (N, 6) float32 [ax, ay, az, gx, gy, gz], rate in Hz inferred from the timestamps).

    The header names the columns: a time column (t, time or timestamp in seconds; t_ms, timestamp_ms
    or canonical_timestamp_ms in milliseconds) and the six channels (ax or acc_x/accl_x/accel_x, ...,
    gx or gyr_x/gyro_x, ...); other columns are ignored. Sampling is taken as uniform at the mean rate.
    """
    path = _existing(path)
    with path.open() as f:
        header = [name.strip().lower() for name in f.readline().split(",")]
    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)  # (N, columns)

    def column(names: Sequence[str]) -> int:
        found = [header.index(name) for name in names if name in header]
        if not found:
            raise ValueError(f"imu: {path.name} has no column named any of {list(names)}")
        return found[0]

    if any(name in header for name in TIME_COLUMNS_S):
        seconds = table[:, column(TIME_COLUMNS_S)]
    else:
        seconds = table[:, column(TIME_COLUMNS_MS)] / 1000.0
    channels = [column(names) for names in IMU_COLUMN_NAMES]
    return table[:, channels].astype(np.float32), _rate_from_times(seconds)


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------


def _load_npy_imu(path: Path) -> tuple[np.ndarray, float]:
    """A .npy IMU file is (N, 7): rows [t (s), ax, ay, az, gx, gy, gz]."""
    table = np.load(path)
    if table.ndim != 2 or table.shape[1] != IMU_CHANNELS + 1:
        raise ValueError(f"imu: expected a (N, 7) array [t, ax, ay, az, gx, gy, gz] in {path.name}, got {table.shape}")
    return table[:, 1:].astype(np.float32), _rate_from_times(table[:, 0])


def _load_frame(path: Path) -> np.ndarray:
    """A one-channel depth or thermal frame from .npy or an image file (8/16-bit kept, colour -> grey)."""
    if path.suffix.lower() == ".npy":
        return np.load(path)
    frame = cv2.imread(str(path), cv2.IMREAD_ANYDEPTH)  # grey, 16-bit values kept
    if frame is None:
        raise ValueError(f"cannot decode image {path}")
    return frame


def load_file(path: str | Path, modality: str | None = None) -> tuple[str, torch.Tensor]:
    """(modality, tensor) for one file, the modality chosen by extension unless given.

    jpg/jpeg/png/bmp -> vision image; wav/flac/ogg/mp3 -> audio; mp4/avi/mov/mkv -> vision video (first
    2 s); csv -> imu (see `load_imu_csv`). .npy needs modality depth, thermal or imu (imu: (N, 7) rows
    [t, ax, ay, az, gx, gy, gz]); depth and thermal also load from 8/16-bit image files.
    """
    path = _existing(path)
    ext = path.suffix.lower()
    modality = modality or EXTENSION_MODALITY.get(ext)
    if modality is None:
        raise ValueError(
            f"cannot tell the modality of {path.name} from its extension: the known ones are "
            f"{', '.join(sorted(EXTENSION_MODALITY))}; give the modality (--modality on the command "
            f"line), as for .npy (depth, thermal or imu); text is given as text (--text)"
        )
    if modality == "vision" and ext in IMAGE_EXTENSIONS:
        return modality, image_tensor(load_image(path))
    if modality == "vision" and ext in VIDEO_EXTENSIONS:
        return modality, video_tensor(load_video(path))
    if modality == "audio" and ext in AUDIO_EXTENSIONS:
        try:
            return modality, audio_tensor(*load_audio(path))
        except soundfile.LibsndfileError as err:
            raise ValueError(f"not audio that libsndfile can decode ({err.error_string})") from err
    if modality == "imu" and ext in (".csv", ".npy"):
        return modality, imu_tensor(*(load_imu_csv(path) if ext == ".csv" else _load_npy_imu(path)))
    if modality in ("depth", "thermal") and ext in IMAGE_EXTENSIONS | {".npy"}:
        transform = depth_tensor if modality == "depth" else thermal_tensor
        return modality, transform(_load_frame(path))
    raise ValueError(f"cannot load a {ext} file as {modality!r}")
