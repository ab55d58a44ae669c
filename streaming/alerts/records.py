"""What a standing query is: its text and vector, the decision settings, the background it competes with.

Plain records, checked when built (from `alert add` / `alert tune` and from every hash read back from Redis),
so that the matcher never meets a setting out of range.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field, fields
from numbers import Integral, Real

import numpy as np

from ..records import MIN_DBFS, QUERY_MODALITIES

ALL_DEVICES = "*"
ID_BYTES = 4  # query ids: 8 hex characters
LOGIT_SCALE = 100.0  # softmax temperature of the share: CLIP's / ImageBind's learned text logit scale
MAX_LOGIT_SCALE = 300.0  # keeps exp() of any score difference inside float64
EXCLUDE_COS = 0.9  # a background prompt this close to a query (a near synonym) does not compete with it
MAX_SMOOTHING_N = 64  # the last n windows are kept as the bits of one uint64
MAX_COOLDOWN_S = 86_400.0  # one day of device time: a longer cooldown is a typo (or an attack), not a setting
MAX_MEMORY = 100_000  # windows an example query's running estimate may average over (a day of 1 s windows)
MAX_Z = 50.0  # spreads above the stream's usual cosine: further is beyond any stream's estimate


class QueryError(ValueError):
    """A query or background that cannot be stored or used as given; `param` names the setting at fault
    (a Decision field), when one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Decision:
    """When a query's calibrated score (its softmax share, in [0, 1]) makes an alert: `k` of the last `n`
    windows at or above `threshold`, the current one included; then no alert until the score has fallen
    below `threshold - hysteresis` and `cooldown_s` seconds of device time have passed."""

    threshold: float = 0.5
    k: int = 2
    n: int = 3
    cooldown_s: float = 30.0
    hysteresis: float = 0.2

    def __post_init__(self):
        """The one place where decision settings are checked (alert add / tune, and every query loaded from
        Redis): numbers of the right kind, finite, in range; NaN fails every range test."""
        check_numbers(self)
        if not 0.0 < self.threshold < 1.0:
            raise QueryError(
                f"threshold {self.threshold} must lie strictly between 0 and 1 (a softmax share)", "threshold"
            )
        if not 1 <= self.k <= self.n <= MAX_SMOOTHING_N:
            raise QueryError(
                f"smoothing needs 1 <= k <= n <= {MAX_SMOOTHING_N}; got k={self.k} n={self.n}",
                "k" if self.k > self.n or self.k < 1 else "n",
            )
        if not 0.0 <= self.cooldown_s <= MAX_COOLDOWN_S:
            raise QueryError(f"cooldown_s {self.cooldown_s} must lie in [0, {MAX_COOLDOWN_S:g}] seconds", "cooldown_s")
        if not 0.0 <= self.hysteresis < self.threshold:
            raise QueryError(
                f"hysteresis {self.hysteresis} must lie in [0, threshold={self.threshold}) "
                f"(the score re-arms below threshold - hysteresis)",
                "hysteresis",
            )


@dataclass(frozen=True)
class Calibration:
    """How an example or vector query's cosine to a window becomes its score, in [0, 1] (ALERTS.md, "Query
    by example"): the score is 0.5 where the cosine lies both `z` spreads above the stream's running mean
    cosine to the example and at `min_cos`; each spread further above either adds a unit of logit."""

    min_cos: float = 0.5  # the floor: a random direction reaches it with p ~1e-5 in 64 dimensions, ~1e-66 in 1024
    z: float = 4.0  # spreads above the stream's usual cosine to the example at which the score is 0.5
    min_sd: float = 0.05  # the least spread assumed: near-identical windows do not make every small change stand out
    memory: int = 300  # windows the running estimate averages over (each then weighs 1/memory): 5 min of 1 s hops
    warmup: int = 30  # windows of a stream before the estimate is used; until then the query scores 0 there

    def __post_init__(self):
        """Numbers of the right kind and in range, as Decision checks its settings; NaN fails every range."""
        check_numbers(self)
        if not 0.0 <= self.min_cos < 1.0:
            raise QueryError(f"min_cos {self.min_cos} must lie in [0, 1): a cosine no window must fall below")
        if not 0.0 < self.z <= MAX_Z:
            raise QueryError(f"z {self.z} must lie in (0, {MAX_Z:g}] spreads")
        if not 0.0 < self.min_sd <= 1.0:
            raise QueryError(f"min_sd {self.min_sd} must lie in (0, 1] (a spread of cosines)")
        if not 1 <= self.warmup <= self.memory <= MAX_MEMORY:
            raise QueryError(
                f"the running estimate needs 1 <= warmup <= memory <= {MAX_MEMORY}; "
                f"got warmup={self.warmup} memory={self.memory}"
            )


@dataclass
class Query:
    text: str
    modality: str
    emb: np.ndarray  # (dim,) float32, unit norm
    model: str
    device: str = ALL_DEVICES  # a device id or glob; '*' = every device
    decision: Decision = field(default_factory=Decision)
    calibration: Calibration = field(default_factory=Calibration)  # used by example and vector queries only
    min_dbfs: float | None = None  # audio queries: windows quieter than this (RMS dBFS) score 0; None: no gate
    source: str = "text"  # text | example:{file} | vector:{file}
    id: str = field(default_factory=lambda: secrets.token_hex(ID_BYTES))
    created: float = field(default_factory=time.time)
    notify: tuple[str, ...] = ()  # URLs of the sinks that get this query's alerts (notify.py checks their schemes)

    def __post_init__(self):
        if not self.text.strip():
            raise QueryError("the query text is empty")
        if self.modality not in QUERY_MODALITIES:
            raise QueryError(f"unknown modality {self.modality!r}; choose one of {QUERY_MODALITIES}")
        if not self.model or not self.device:
            raise QueryError(f"query {self.text!r}: the model and the device (id or glob) must not be empty")
        if not math.isfinite(self.created):
            raise QueryError(f"query {self.text!r}: created {self.created} is not a time")
        if self.min_dbfs is not None:
            if self.modality != "audio":
                raise QueryError(f"min_dbfs gates audio queries only, not {self.modality}", "min_dbfs")
            if not isinstance(self.min_dbfs, Real) or not MIN_DBFS <= self.min_dbfs <= 0.0:
                raise QueryError(f"min_dbfs {self.min_dbfs} must lie in [{MIN_DBFS:g}, 0] dBFS", "min_dbfs")
        self.emb = unit(self.emb, f"query {self.text!r}")
        self.notify = tuple(dict.fromkeys(self.notify))
        for url in self.notify:
            if not isinstance(url, str) or not url or url != url.strip() or "\n" in url:
                raise QueryError(f"query {self.text!r}: notify URL {url!r} must be one line without spaces around it")

    @property
    def by_example(self) -> bool:
        """Whether the vector is a clip's (an --example or --vector query): scored by its stream-calibrated
        cosine, not by its share against the text background prompts."""
        return self.source != "text"


@dataclass
class Background:
    """The prompts one (model, modality)'s queries compete with, and the calibration's two parameters."""

    model: str
    modality: str
    prompts: tuple[str, ...]
    emb: np.ndarray  # (count, dim) float32, unit rows
    logit_scale: float = LOGIT_SCALE
    exclude_cos: float = EXCLUDE_COS

    def __post_init__(self):
        if len(self.prompts) != len(self.emb) or not self.prompts:
            raise QueryError(
                f"background {self.model}/{self.modality}: {len(self.prompts)} prompts, {len(self.emb)} vectors"
            )
        if not 0.0 < self.logit_scale <= MAX_LOGIT_SCALE:
            raise QueryError(f"logit_scale {self.logit_scale} must lie in (0, {MAX_LOGIT_SCALE}]")
        if not -1.0 <= self.exclude_cos <= 1.0:
            raise QueryError(f"exclude_cos {self.exclude_cos} must be a cosine, in [-1, 1]")
        self.emb = np.stack([unit(v, f"background {p!r}") for v, p in zip(self.emb, self.prompts)])


def check_numbers(settings) -> None:
    """QueryError naming the field unless each field of the settings dataclass holds a number of its declared
    type: an integer for `int`, any real for `float` (a bool is neither)."""
    for f in fields(settings):
        kind = Integral if f.type == "int" else Real
        value = getattr(settings, f.name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise QueryError(
                f"{f.name} must be {'an integer' if kind is Integral else 'a number'}, got {value!r}", f.name
            )


def unit(v, what: str) -> np.ndarray:
    """`v` as a unit-norm float32 vector; QueryError unless it is a finite non-zero 1-D vector."""
    v = np.asarray(v, dtype=np.float64).squeeze()
    if v.ndim != 1 or not np.isfinite(v).all() or not np.linalg.norm(v) > 0:
        raise QueryError(f"{what}: expected a finite non-zero 1-D vector, got shape {np.shape(v)}")
    return (v / np.linalg.norm(v)).astype(np.float32)
