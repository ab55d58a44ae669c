"""The ImageBind implementation: parity with the reference, the official checkpoint layout, loading, bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import encoders
from encoders import transforms as T
from encoders.api import quantize_int8
from encoders.weights import CheckpointMissing, download_checkpoint, find_checkpoint

from .conftest import HUGE_KEYS, shared_file

TOLERANCE = 1e-4


def reference_outputs(model, inputs):
    """Run a model on a fixture's inputs; `video` is a batch of clips fed as vision, as the reference does."""
    inputs = dict(inputs)
    video = inputs.pop("video")
    with torch.inference_mode():
        outputs = model(inputs)
        outputs["video"] = model({"vision": video})["vision"]
    return outputs


def test_parity_with_reference_fixture(parity_fixture):
    model = encoders.build_model(parity_fixture["config"])
    model.load_state_dict(parity_fixture["state_dict"], strict=True)
    outputs = reference_outputs(model, parity_fixture["inputs"])
    assert set(outputs) == set(parity_fixture["outputs"])
    for modality, expected in parity_fixture["outputs"].items():
        err = (outputs[modality] - expected).abs().max().item()
        assert err < TOLERANCE, f"{modality}: max abs error {err}"


def test_parity_through_checkpoint_file_and_api(parity_fixture, tmp_path):
    """The memory-mapped load path (`encoders.load` with a checkpoint) gives the same outputs."""
    path = tmp_path / "tiny.pth"
    torch.save(parity_fixture["state_dict"], path)
    enc = encoders.load("tiny", checkpoint=str(path), device="cpu")
    assert not enc.random_weights
    outputs = reference_outputs(enc.model, parity_fixture["inputs"])
    for modality, expected in parity_fixture["outputs"].items():
        assert (outputs[modality] - expected).abs().max().item() < TOLERANCE
    # unit-norm embeddings are the reference outputs renormalised
    emb = enc.embed("audio", parity_fixture["inputs"]["audio"])
    expected = torch.nn.functional.normalize(parity_fixture["outputs"]["audio"], dim=-1).numpy()
    assert emb.dtype == np.float32
    np.testing.assert_allclose(emb, expected, atol=TOLERANCE)


def test_huge_layout_matches_official_checkpoint():
    expected = json.loads(shared_file(HUGE_KEYS).read_text())
    model = encoders.build_model("imagebind_huge", device="meta")
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert sum(v.numel() for v in model.state_dict().values()) == 1_200_786_990
    # and a state dict with exactly those keys loads strictly
    fake = {k: torch.empty(shape, device="meta") for k, shape in expected.items()}
    encoders.build_model("imagebind_huge", device="meta").load_state_dict(fake, strict=True, assign=True)


def test_config_from_reference_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown ImageBind config keys"):
        encoders.build_model({"vision_embed_dimm": 64})


def test_image_fast_path_equals_repeated_frames(parity_fixture):
    """An image needs no second frame: the 2-D path equals the video path on the repeated image."""
    model = encoders.build_model(parity_fixture["config"])
    model.load_state_dict(parity_fixture["state_dict"])
    images = parity_fixture["inputs"]["vision"]
    as_video = images.unsqueeze(2).repeat(1, 1, 2, 1, 1)  # (B, 3, 2, H, W)
    with torch.inference_mode():
        a = model.embed("vision", images)
        b = model.embed("vision", as_video)
    assert (a - b).abs().max().item() < 1e-5


def test_int8_close_to_fp32(parity_fixture):
    model = encoders.build_model(parity_fixture["config"])
    model.load_state_dict(parity_fixture["state_dict"])
    quantized = quantize_int8(model)
    inputs = dict(parity_fixture["inputs"])
    inputs.pop("video")
    with torch.inference_mode():
        for modality, x in inputs.items():
            cos = torch.nn.functional.cosine_similarity(quantized.embed(modality, x), model.embed(modality, x))
            assert cos.min().item() >= 0.98, f"{modality}: cosine {cos.min().item():.4f}"


def test_tiny_weights_identical_across_processes():
    code = (
        "import encoders, hashlib, torch;"
        "m = encoders.load('tiny', device='cpu').model;"
        "h = hashlib.sha256();"
        "[h.update(v.float().numpy().tobytes()) for v in m.state_dict().values()];"
        "print(h.hexdigest())"
    )
    digests = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(digests) == 1


def test_tiny_warns_loudly_about_random_weights(caplog):
    enc = encoders.load("tiny", device="cpu")
    assert enc.random_weights
    assert "RANDOM weights" in caplog.text


def test_vision_levels_embed_as_their_normalised_input():
    """A uint8 vision batch (how vision windows travel) is normalised by the encoder: the same embedding."""
    enc = encoders.load("tiny", device="cpu")
    levels = torch.randint(0, 256, (2, 3, 2, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(enc.embed("vision", levels), enc.embed("vision", T.levels_to_model(levels)))


@pytest.mark.parametrize(
    "modality, batch, match",
    [
        ("vision", torch.zeros(2, 3, 100, 100), r"vision: expected shape \(B, 3, 224, 224\)"),
        ("vision", torch.zeros(0, 3, 224, 224), "vision: empty batch"),
        ("vision", torch.zeros(2, 3, 100, 100, dtype=torch.uint8), r"vision: expected shape \(B, 3, 224, 224\)"),
        ("vision", torch.zeros(2, 4, 224, 224, dtype=torch.uint8), r"vision: expected uint8 RGB levels"),
        ("audio", torch.zeros(2, 128, 204), r"audio: expected shape \(B, 1, 128, 204\)"),
        ("imu", torch.zeros(1, 6, 2000, dtype=torch.int64), "imu: expected a floating-point tensor"),
        ("depth", torch.full((1, 1, 224, 224), float("inf")), "depth: .*NaN or Inf"),
        ("thermal", torch.full((1, 1, 224, 224), float("nan")), "thermal: .*NaN or Inf"),
        ("text", torch.zeros(2, 77), "text: expected integer token ids"),
        ("text", torch.full((1, 77), 10**6), r"text: token ids must lie in \[0, 49408\)"),
        ("smell", torch.zeros(1, 3), "unknown modality 'smell'"),
    ],
)
def test_bad_input_is_a_clear_error(modality, batch, match):
    enc = encoders.load("tiny", device="cpu")
    with pytest.raises(ValueError, match=match):
        enc.embed(modality, batch)


def test_missing_checkpoint_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("BINDSTREAM_HOME", str(tmp_path))
    with pytest.raises(CheckpointMissing, match=str(tmp_path / "imagebind_huge.pth")):
        find_checkpoint(download=False)
    with pytest.raises(CheckpointMissing, match="could not download"):
        download_checkpoint(tmp_path / "x.pth", url="http://127.0.0.1:9/imagebind_huge.pth")
    with pytest.raises(CheckpointMissing, match="does not exist"):
        encoders.load("imagebind_huge", checkpoint=str(tmp_path / "nope.pth"))


MEMORY_PROBE = """
import dataclasses, json, sys, torch
from encoders import api, build_model, weights
from encoders.config import ImageBindConfig, TrunkConfig

def rss():  # resident anonymous and file-backed memory, bytes
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}

small = TrunkConfig(64, 1, 4)
cfg = dataclasses.replace(ImageBindConfig(), vision=TrunkConfig(512, 6, 8, pre_transformer_ln=True, add_bias_kv=False),
                          text=dataclasses.replace(small, add_bias_kv=False), audio=small, depth=small,
                          thermal=small, imu=small)
if sys.argv[1] == "save":
    torch.save(weights.random_model(cfg).state_dict(), sys.argv[2])
    sys.exit()
build_model("tiny", device="meta")  # one-off costs of the first model built, not of loading
before = rss()
model = weights.load_checkpoint(cfg, sys.argv[2])
with torch.no_grad():
    for p in model.parameters():
        p.sum()  # touch every page of the weights
loaded = rss()
encoder = api.place("probe", model, "cpu", sys.argv[1])
del model
cast = rss()
dtypes = sorted({str(t.dtype) for t in encoder.model.state_dict().values() if t.is_floating_point()})
print(json.dumps({"before": before, "loaded": loaded, "cast": cast, "dtypes": dtypes}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_holds_one_copy_of_the_weights(tmp_path):
    """Memory-mapped load + assign: the weights live once, as file pages; bf16 keeps no fp32 copy."""
    path = tmp_path / "medium.pth"
    subprocess.run([sys.executable, "-c", MEMORY_PROBE, "save", str(path)], check=True)
    size = path.stat().st_size

    def probe(dtype):
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, dtype, str(path)], capture_output=True, text=True, check=True
        ).stdout
        return json.loads(out.strip().splitlines()[-1])

    fp32 = probe("float32")
    grew = {k: fp32["loaded"][k] - fp32["before"][k] for k in ("RssAnon", "RssFile")}
    assert grew["RssAnon"] + grew["RssFile"] <= 1.2 * size, (grew, size)
    assert grew["RssAnon"] <= 0.2 * size, (grew, size)  # no private copy: the pages are the file's
    bf16 = probe("bfloat16")
    assert bf16["dtypes"] == ["torch.bfloat16"]
    kept = bf16["cast"]["RssAnon"] - bf16["before"]["RssAnon"] + bf16["cast"]["RssFile"] - bf16["before"]["RssFile"]
    assert kept <= 0.7 * size, (kept, size)  # half-size weights, and the fp32 pages let go
