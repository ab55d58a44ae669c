"""The Redis layout module: what it writes decodes to the same record, and readers need neither Ray nor torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from streaming.alerts.records import Background, Decision, Query, QueryError
from streaming.records import Embedding
from streaming.redis_layout import (
    Alert,
    BadRecord,
    decode_background,
    decode_embedding,
    decode_query,
    encode_background,
    encode_embedding,
    encode_query,
    parse_key,
    stream_key,
)


def test_the_subscriber_imports_without_ray_or_torch():
    """REDIS.md's Python reader: `ray` and `torch` made unimportable, the subscriber API still loads."""
    code = (
        "import sys; sys.modules['ray'] = None; sys.modules['torch'] = None\n"
        "import streaming.subscriber, streaming.redis_layout\n"
        "assert 'ray' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_the_publisher_imports_without_torch():
    """The publisher's process runs no model: its imports (gating's `Repeats` among them) leave torch out."""
    code = "import sys, streaming.publisher\nassert 'torch' not in sys.modules, 'torch imported'\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def unit_vector(dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def wire(fields: dict) -> dict:
    """Fields as redis-py returns them: bytes keys and values."""
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}


def test_an_embedding_entry_decodes_to_what_was_written():
    e = Embedding(
        "glasses-1",
        "fused",
        3_000_000_000,
        5_000_000_000,
        unit_vector(16),
        "tiny",
        0,
        0,
        members=("vision", "audio"),
        epoch=2,
    )
    r = decode_embedding(stream_key(e.device, e.modality), b"17-0", wire(encode_embedding(e)))
    assert (r.device, r.modality, r.t0, r.t1, r.model, r.epoch, r.modalities, r.id) == (
        "glasses-1",
        "fused",
        e.t0,
        e.t1,
        "tiny",
        2,
        ("vision", "audio"),
        "17-0",
    )
    np.testing.assert_array_equal(r.emb, e.emb)


def test_a_truncated_vector_or_foreign_key_is_a_bad_record():
    fields = wire(encode_embedding(Embedding("d", "audio", 0, 1, unit_vector(8), "tiny", 0, 0)))
    with pytest.raises(BadRecord, match="bytes"):
        decode_embedding(stream_key("d", "audio"), "1-0", fields | {b"emb": fields[b"emb"][:-1]})
    with pytest.raises(BadRecord):
        parse_key("bindstream:alerts")
    assert parse_key("bindstream:emb:{a:b}:audio") == ("a:b", "audio")  # the device is the hash tag
    with pytest.raises(BadRecord):
        parse_key("bindstream:emb:a:audio")  # a v1 key (REDIS.md "Versions")


def test_queries_and_backgrounds_decode_to_what_was_written():
    q = Query(
        "a baby crying", "audio", unit_vector(8), "tiny", device="monitor-*", decision=Decision(0.6, 3, 5, 10.0, 0.1)
    )
    back = decode_query(q.id, wire(encode_query(q)))
    assert (back.text, back.modality, back.device, back.decision, back.created) == (
        q.text,
        q.modality,
        q.device,
        q.decision,
        q.created,
    )
    bg = Background("tiny", "audio", ("silence", "speech"), np.stack([unit_vector(8, 1), unit_vector(8, 2)]))
    assert decode_background("tiny", "audio", wire(encode_background(bg))).prompts == ("silence", "speech")
    assert decode_background("tiny", "audio", {}) is None
    with pytest.raises(QueryError, match="malformed"):
        decode_query(q.id, wire(encode_query(q)) | {b"k": b"9"})  # k > n: the Decision check runs on read


def test_an_alert_entry_decodes_to_what_was_written():
    a = Alert("d", "q1", "glass breaking", "audio", 0.75, 0.5, 1, 2, stream_key("d", "audio"), "5-0", "tiny", 9)
    back = Alert.from_entry(b"6-0", wire(a.fields()) | {b"added_later": b"x"})
    assert back == Alert(**{**a.__dict__, "id": "6-0"})


def test_every_streamed_modality_is_one_the_encoder_embeds():
    """The pipeline's table (no torch) and the encoder's are two tables: they must agree."""
    from encoders.modalities import MODALITIES
    from streaming.records import QUERY_MODALITIES, SENSOR_MODALITY, STREAM_MODALITIES

    assert set(STREAM_MODALITIES) <= set(MODALITIES) and set(SENSOR_MODALITY.values()) == set(STREAM_MODALITIES)
    assert set(QUERY_MODALITIES) - set(STREAM_MODALITIES) == {"fused"}


def test_the_web_console_imports_without_ray():
    """The console reads and writes only Redis: it runs on any machine, with no Ray (README "Web console")."""
    code = "import sys; sys.modules['ray'] = None\nimport streaming.ui.app\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
