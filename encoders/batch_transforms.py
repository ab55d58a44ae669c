"""Batched, device-agnostic preprocessing: many windows' raw media -> their model inputs on any torch device.

The rule: each output equals what `encoders/transforms.py` makes of the same media (`video_tensor` of the
decoded frames, `depth_tensor`, `thermal_tensor`, `audio_tensor`) within PARITY, on the device the tensors
are given for: the embedder's, so that on a GPU node the CPU only checks and ships the media
(`preprocess_on`, streaming/windowing.py). The same operations in the same order, batched:
- JPEG frames decode with torchvision's `decode_jpeg`, all of a batch in one call: on CUDA with nvJPEG, on
  the CPU with libjpeg-turbo (the same pixels as OpenCV's decoder in the CPU path). Frames that arrive as
  pixels (raw, or PNG that the windowing stage decoded while checking it) are copied to the device.
- frames of one size are resized together (torch's antialiased bicubic, bilinear for depth: in 8 bits for
  camera frames on the CPU, as the CPU path; in float32 on CUDA, which has no 8-bit kernel) and normalised.
- depth and thermal frames of integers (uint16 millimetres, uint8 levels, uint16 centi-kelvin) arrive as sent:
  every value is valid, and they are converted per pixel (metres, [0, 1]) here; frames of floats arrive converted
  (the windowing stage's check of every pixel is that conversion). Then they are resized and normalised here.
- audio clips of one (rate, channels, length) are resampled together by the same windowed-sinc kernel; then
  every clip's fbank comes from one call: kaldi's fbank treats each 25 ms frame on its own (DC removed,
  pre-emphasis, window, FFT, mel), so clips laid end to end, each padded to a whole number of 10 ms frame
  shifts, give exactly each clip's frames.
IMU windows are never shipped raw: 6 x 2000 values cost the windowing stage next to nothing.
"""

from __future__ import annotations

import copy
import functools
from collections import defaultdict
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torchvision.io import ImageReadMode, decode_jpeg

from . import transforms as T

FRAME_SHIFT_SAMPLES = T.AUDIO_RATE * T.FRAME_SHIFT_MS // 1000  # 160

# Largest difference to the CPU path allowed per element of a model input (normalised units), by device type
# (tests/test_batch_transforms.py). CPU: the same decoders and kernels; measured on the shared media and generated
# frames, images, depth and thermal are identical and audio is within 1.3e-5 (batched resampling and FFTs round
# differently). CUDA, not yet measured here: nvJPEG's IDCT and chroma upsampling, the float32 resize (the CPU's is
# 8-bit) and cuFFT move a few 8-bit levels at edges, so the mean is held to what our resize may differ from the
# reference's PIL resize (test_transforms.py), and single elements to 0.5 (about 35 levels).
PARITY = {
    "cpu": {"max_abs": 1e-4, "mean_abs": 1e-6},
    "cuda": {"max_abs": 0.5, "mean_abs": 0.01},
}


def pixels(frame: np.ndarray) -> torch.Tensor:
    """(h, w, 3) uint8 RGB pixels -> (3, h, w) uint8 tensor (a copy: shipped arrays are read-only buffers)."""
    return torch.from_numpy(np.array(frame, np.uint8)).permute(2, 0, 1)


def decode_frames(frames: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Camera frames -> (3, h, w) uint8 RGB on `device`: JPEG bytes (1-D uint8) decoded in one call, pixels
    (h, w, 3) copied over. ValueError if a JPEG does not decode."""
    out: list[torch.Tensor | None] = [None] * len(frames)
    jpegs = [i for i, frame in enumerate(frames) if frame.ndim == 1]
    if jpegs:
        data = [torch.from_numpy(np.array(frames[i], np.uint8)) for i in jpegs]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # a frame that this decoder refuses fails the call: the frames one by one
            decoded = [_decode_jpeg(jpeg, device) for jpeg in data]
        for i, image in zip(jpegs, decoded):
            out[i] = image
    for i, frame in enumerate(frames):
        if out[i] is None:
            out[i] = pixels(frame).to(device)
    return [image for image in out if image is not None]


def _decode_jpeg(jpeg: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One JPEG by `device`'s decoder, else by OpenCV's as the CPU path decodes it (which, unlike torchvision's,
    takes a truncated JPEG and fills the rest grey); ValueError when neither decodes it."""
    try:
        return decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return pixels(opencv_rgb(jpeg.numpy())).to(device)


def opencv_rgb(jpeg: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 RGB of JPEG bytes as the CPU path decodes them (OpenCV, EXIF orientation ignored, as
    sensors.protocol.decode_image); ValueError if it does not decode."""
    bgr = cv2.imdecode(jpeg, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        raise ValueError("vision: a JPEG frame does not decode")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _by_shape(items: Sequence) -> dict[tuple, list[int]]:
    """Indices of `items` grouped by shape: items of one shape are processed as one batch."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[tuple(item.shape)].append(i)
    return groups


def _batched(items: Sequence[torch.Tensor], fn) -> torch.Tensor:
    """`fn` over the items stacked by shape, outputs back in the items' order: (N, *output item)."""
    out: list[torch.Tensor | None] = [None] * len(items)
    for indices in _by_shape(items).values():
        for i, y in zip(indices, fn(torch.stack([items[i] for i in indices]))):
            out[i] = y
    return torch.stack([y for y in out if y is not None])


def images_to_model(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(3, h, w) uint8 RGB images of any sizes, on one device -> (N, 3, 224, 224) as `transforms.image_tensor`
    (which resizes in 8 bits on the CPU, in float32 on devices without that kernel). Stacked channels last, as
    the CPU path stacks (h, w, 3) frames: one copy, and the layout the CPU's 8-bit kernel takes."""
    channels_last = [image.permute(1, 2, 0) for image in images]
    return _batched(channels_last, lambda x: T._rgb_to_model(x.permute(0, 3, 1, 2)))


def vision_inputs(windows: Sequence[Sequence[np.ndarray]], device: torch.device | str) -> torch.Tensor:
    """Each window's sampled camera frames (JPEG bytes or RGB pixels) -> (B, 3, frames, 224, 224), as the
    windowing stage makes a vision window. A frame that two windows of the call share is decoded once."""
    device = torch.device(device)
    unique: dict[int, int] = {}  # id of a frame's array -> its index among the frames decoded
    frames: list[np.ndarray] = []
    for window in windows:
        for frame in window:
            if id(frame) not in unique:
                unique[id(frame)] = len(frames)
                frames.append(frame)
    images = images_to_model(decode_frames(frames, device))
    return torch.stack([torch.stack([images[unique[id(f)]] for f in window], dim=1) for window in windows])


INTEGER_FRAMES = {"depth": (np.uint16,), "thermal": (np.uint8, np.uint16)}  # valid whatever their values


def frame_media(modality: str, frame: np.ndarray) -> np.ndarray:
    """A depth or thermal frame as it travels to the embedders: one of integers as sent (its shape checked), one
    of floats checked and converted per pixel as the CPU path does before it resizes: (h, w) float32 metres (NaN:
    no reading) or [0, 1]. ValueError for what the CPU path refuses."""
    if isinstance(frame, np.ndarray) and frame.dtype in INTEGER_FRAMES[modality]:
        return T._one_channel(frame, modality, "(H, W)", INTEGER_FRAMES[modality])
    convert = T._depth_metres if modality == "depth" else T._thermal_unit
    return convert(frame).numpy()


def frame_inputs(modality: str, frames: Sequence[np.ndarray], device: torch.device | str) -> torch.Tensor:
    """Depth or thermal frames made by `frame_media` -> (B, 1, 224, 224), as `depth_tensor` / `thermal_tensor`:
    frames of integers are converted per pixel on `device`."""
    to_model = T._metres_to_model if modality == "depth" else T._unit_to_model
    to_unit = T.mm_to_metres if modality == "depth" else T.thermal_levels_to_unit
    tensors = [torch.from_numpy(np.array(frame)).to(device) for frame in frames]  # a copy: Ray's arrays are read-only
    tensors = [x if x.is_floating_point() else to_unit(x) for x in tensors]
    return _batched(tensors, lambda x: to_model(x[:, None]))


@functools.lru_cache(maxsize=32)
def _resampler(rate: int, device: torch.device) -> torchaudio.transforms.Resample:
    """`transforms.get_resampler(rate)` on `device` (a copy there: the CPU one stays where it is)."""
    resampler = T.get_resampler(rate)
    return resampler if device.type == "cpu" else copy.deepcopy(resampler).to(device)


def _clip_16k(samples: torch.Tensor, rate: int) -> torch.Tensor:
    """(B, n, channels) samples at `rate` -> (B, <= 32000) first channel of the first 2 s at 16 kHz, the mean
    over every channel subtracted: `transforms.audio_tensor` up to its fbank."""
    x = samples[:, : T.samples_to_resample(rate)].transpose(1, 2).contiguous().clamp(-1.0, 1.0)  # (B, channels, n)
    if rate != T.AUDIO_RATE:
        x = _resampler(rate, x.device)(x)
    x = x[..., : T.AUDIO_CLIP_SAMPLES]
    if x.shape[-1]:
        x = x - x.mean(dim=(1, 2), keepdim=True)
    return x[:, 0]


def fbanks(clips: Sequence[torch.Tensor]) -> torch.Tensor:
    """16 kHz clips (n,) of at most 32000 samples, on one device -> (B, frames, 128) fbanks, one call for all:
    each clip, padded to at least one frame and then to whole frame shifts, is laid after the previous one, and
    each clip's frames are picked out (frames past a clip's end, which `transforms.mel_spectrogram` never
    makes, are dropped: its frames then come as zero padding in `_fbank_to_model`)."""
    lengths = [max(len(clip), T.FRAME_SAMPLES) for clip in clips]
    span = -(-max(lengths) // FRAME_SHIFT_SAMPLES) * FRAME_SHIFT_SAMPLES  # samples per clip, whole shifts
    flat = torch.cat([F.pad(clip, (0, span - len(clip))) for clip in clips])
    frames = T.fbank(flat[None])  # (all frames, 128)
    per_clip = 1 + (max(lengths) - T.FRAME_SAMPLES) // FRAME_SHIFT_SAMPLES
    starts = torch.arange(len(clips), device=frames.device)[:, None] * (span // FRAME_SHIFT_SAMPLES)
    out = frames[starts + torch.arange(per_clip, device=frames.device)]  # (B, per_clip, 128)
    for i, n in enumerate(lengths):  # a shorter clip has fewer frames: the rest are padding, as on the CPU path
        out[i, 1 + (n - T.FRAME_SAMPLES) // FRAME_SHIFT_SAMPLES :] = 0
    return out


def audio_inputs(clips: Sequence[tuple[np.ndarray, int]], device: torch.device | str) -> torch.Tensor:
    """Each window's ((n, channels) float samples, rate) -> (B, 1, 128, 204), as `transforms.audio_tensor`
    of the samples transposed (which the windowing stage makes of an audio window)."""
    device = torch.device(device)
    clips_16k: list[torch.Tensor | None] = [None] * len(clips)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (samples, rate) in enumerate(clips):
        groups[(samples.shape, rate)].append(i)
    for (_, rate), indices in groups.items():
        stacked = np.stack([np.asarray(clips[i][0], np.float32) for i in indices])
        for i, clip in zip(indices, _clip_16k(torch.from_numpy(stacked).to(device), rate)):
            clips_16k[i] = clip
    return T._fbank_to_model(fbanks([clip for clip in clips_16k if clip is not None]))


def preprocess(modality: str, windows: Sequence[tuple[Sequence[np.ndarray], int]], device) -> torch.Tensor:
    """The model inputs (B, ...) on `device` of B windows of `modality` (vision, depth, thermal or audio) from
    their media, each window's (arrays, rate) as `streaming.records.RawInput` holds them."""
    if modality == "vision":
        return vision_inputs([arrays for arrays, _ in windows], device)
    if modality == "audio":
        return audio_inputs([(arrays[0], rate) for arrays, rate in windows], device)
    if modality in ("depth", "thermal"):
        return frame_inputs(modality, [arrays[0] for arrays, _ in windows], device)
    raise ValueError(f"{modality} windows are preprocessed where they are cut, never from raw media")
