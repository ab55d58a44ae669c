"""The tables of `bindstream run/demo` show every drop, reject and refusal of every stage, by reason, and per
device where the stage counted one; and the typed counters they read (streaming/stage.py:Counts)."""

from __future__ import annotations

import json

from rich.console import Console

from streaming.dashboard import stats_table, summary
from streaming.stage import MAX_LABELS, Counts, StageMetrics

CURVE_REFUSALS = (
    "curve_unknown_key",
    "curve_no_key",
    "curve_bad_handshake",
    "curve_protocol_error",
    "curve_handshake_failed",
    "curve_zap_error",
)  # SECURITY.md; ingest counts each as refused_<reason>
DROPPED = {  # stage -> (event, label, n) of what it did not take or pass on, as the stages count them
    "ingest": [
        ("rejected_malformed", "unknown", 2),
        ("rejected_device_cap", "dev-a", 3),
        ("rejected_device_mismatch", "dev-b", 1),
        ("dropped_window_stage_error", "dev-a", 4),
        ("refused_connection_cap", "", 5),
    ]
    + [(f"refused_{reason}", "", 6) for reason in CURVE_REFUSALS],
    "window": [("dropped_seq_lost", "dev-a", 7), ("dropped_overload", "dev-b", 8)],
    "embed": [("dropped_queue_full", "dev-b", 9), ("rejected_non_finite", "dev-a", 10)],
    "publish": [("dropped_drain_timeout", "dev-a", 11), ("rejected_bad_norm", "dev-b", 12)],
    "match": [
        ("rejected_malformed", "dev-b", 13),
        ("refused_stream_cap", "dev-a", 14),
        ("rejected_query", "dim0", 15),
        ("rejected_background", "tiny/vision", 16),
    ],
    "notify": [("dropped_outbox_full", "5f2c0a9e1b3d", 17), ("rejected_malformed", "", 18)],
}
NOT_DEVICES = {"dim0", "tiny/vision", "5f2c0a9e1b3d"}  # the matcher's rejected query and background; a sink
PASSED = [
    ("in", "imu", 100),
    ("out", "imu", 90),
    ("thinned", "vision", 20),
    ("closed_idle", "", 1),
    ("evicted_idle", "", 1),
]  # what no drop line may show


def snapshot(stage: str, counted: list[tuple[str, str, int]]) -> dict:
    metrics = StageMetrics(stage)
    for event, label, n in counted:
        metrics.count(event, label, n)
    return metrics.snapshot()


def stats() -> dict[str, list[dict]]:
    """Two actors per stage, each counting every drop once and what passed; as `Pipeline.stats()` returns."""
    return {stage: [snapshot(stage, events + PASSED) for _ in range(2)] for stage, events in DROPPED.items()}


def rendered(renderable) -> str:
    console = Console(record=True, width=400)
    console.print(renderable)
    return " ".join(console.export_text().split())  # a wrapped caption reads as one line


def test_the_live_table_shows_every_drop_reject_and_refusal_by_reason():
    text = rendered(stats_table(stats()))
    shown = set(text[text.index("drops: ") + len("drops: ") :].split(", "))
    assert shown == {f"{stage}: {event} {2 * n}" for stage, events in DROPPED.items() for event, _, n in events}


def test_the_summary_shows_every_labelled_drop_per_device():
    text = rendered(summary(stats(), "final"))
    rows = text[text.index("dropped, rejected or refused, per device") :]
    for stage, events in DROPPED.items():
        for event, label, n in events:
            if label and label not in NOT_DEVICES:
                assert f"{stage}: {event} {2 * n}" in rows, (stage, event, label, rows)
    for device in ("unknown", "dev-a", "dev-b"):
        assert f"│ {device} │" in rows, device
    assert not [label for label in NOT_DEVICES if f"│ {label} │" in rows]


def test_an_unfinished_stage_and_a_quiet_run_show_no_drops():
    quiet = {"ingest": [snapshot("ingest", PASSED)], "publish": [{"stage": "publish", "counts": {}, "unfinished": "X"}]}
    assert "drops: none" in rendered(summary(quiet, "final"))


def test_counts_read_events_labels_families_and_sums():
    a = Counts.of(
        snapshot(
            "ingest",
            [
                ("in", "imu", 3),
                ("in", "audio", 1),
                ("rejected_x", "d", 2),
                ("rejected_y", "d", 1),
                ("rejected_y", "e", 4),
                ("refused_connection_cap", "", 5),
            ],
        )
    )
    b = Counts.from_dict(json.loads(json.dumps(a.to_dict())))  # what `--json` prints reads back the same
    assert b == a and (a + b).get("in", "imu") == 6 and Counts.of() == Counts()
    assert (a.get("in"), a.get("in", "imu"), a.get("in", "vision"), a.get("out")) == (4, 3, 0, 0)
    assert a.get("rejected_") == 7 and a.get("rejected_", "d") == 3 and a.labels("rejected_") == {"d": 3, "e": 4}
    assert a.events() == ["in", "refused_connection_cap", "rejected_x", "rejected_y"]
    assert a.events("rejected_") == ["rejected_x", "rejected_y"] and a.labels("refused_connection_cap") == {"": 5}


def test_labels_beyond_the_cap_count_as_other():
    metrics = StageMetrics("ingest")
    for i in range(MAX_LABELS + 5):
        metrics.count("rejected_device_cap", f"id-{i}")
    metrics.count("in", "imu")  # another event keeps its own labels
    counts = Counts.of(metrics.snapshot())
    assert len(counts.labels("rejected_device_cap")) == MAX_LABELS + 1
    assert counts.get("rejected_device_cap", "other") == 5 and counts.get("rejected_device_cap") == MAX_LABELS + 5
    assert counts.labels("in") == {"imu": 1}
