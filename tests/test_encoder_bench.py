"""The CPU fast paths (bf16, int8) measured against fp32, and the benchmarks that report them (no speed asserted)."""

import numpy as np
import pytest
import torch

import encoders
from encoders import batch_transforms
from encoders.bench import (
    PREPROCESSED,
    bench_encoders,
    bench_preprocessing,
    cosine_to_fp32,
    example_stream,
    preprocess_on_cpu,
    raw_media,
)

# Least cosine similarity to fp32 over the parity fixture's inputs, per modality. Measured here (AVX-512 BF16):
# bf16 0.99984 (imu) to 0.99998, int8 0.9979 (imu) to 0.9997; the bounds leave room for other CPUs' kernels.
LEAST_COSINE = {"bfloat16": 0.999, "int8": 0.99}


def test_bf16_and_int8_embeddings_stay_close_to_fp32_on_the_parity_fixture(parity_fixture):
    model = encoders.build_model(parity_fixture["config"])
    model.load_state_dict(parity_fixture["state_dict"])
    inputs = {m: x for m, x in parity_fixture["inputs"].items() if m != "video"}
    cosines = cosine_to_fp32(model, inputs, list(LEAST_COSINE), device="cpu")
    print(cosines)
    for dtype, bound in LEAST_COSINE.items():
        assert set(cosines[dtype]) == set(inputs)
        assert min(cosines[dtype].values()) >= bound, (dtype, cosines[dtype])
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the fp32 model was left as it was


def test_bench_encoders_reports_each_dtypes_cosine_to_fp32():
    rows = bench_encoders("tiny", "cpu", ("float32", "bfloat16", "int8"), (1,), ("audio", "imu"), min_seconds=0)
    assert [(r.dtype, r.modality) for r in rows] == [
        (d, m) for d in ("float32", "bfloat16", "int8") for m in ("audio", "imu")
    ]
    for r in rows:
        bound = LEAST_COSINE.get(r.dtype, 1 - 1e-6)  # fp32 against itself: the same numbers
        assert bound <= r.cosine <= 1 + 1e-6, r


@pytest.mark.parametrize("modality", PREPROCESSED)
def test_the_preprocessing_bench_times_like_against_like(modality):
    """Both sides of the preprocessing table make the same model inputs from the same media."""
    stream = example_stream(modality, 3)
    cpu = torch.stack(preprocess_on_cpu(modality, stream))
    batched = batch_transforms.preprocess(modality, raw_media(modality, stream), "cpu")
    np.testing.assert_allclose(batched.numpy(), cpu.numpy(), atol=batch_transforms.PARITY["cpu"]["max_abs"])
    (row,) = bench_preprocessing("cpu", (3,), (modality,), min_seconds=0)
    assert (row.modality, row.batch) == (modality, 3)
