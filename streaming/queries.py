"""Standing text queries over the embedding streams, and the background prompts they are calibrated with.

Layout (ALERTS.md has the full description):
    HASH bindstream:query:{id}        text modality device emb dim model source created
                                      threshold k n cooldown_s hysteresis
    SET  bindstream:queries           the ids of the active queries
    INT  bindstream:queries:version   bumped on every change (matchers poll it)
    PUB  bindstream:queries           "{add|rm|update} {id}" on every change (matchers reload at once)
    HASH bindstream:background:{model}:{modality}
                                      prompts emb dim count logit_scale exclude_cos created

A text query is embedded with prompt ensembling: each modality's templates are filled with the text,
embedded, normalised, averaged and the mean renormalised. The background prompts go through the same
templates, so whatever a template adds to every prompt is shared by query and background and cancels.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np
import redis

from .publisher import FUSED_MODALITIES
from .records import text

QUERY_PREFIX = "bindstream:query"
QUERY_SET = "bindstream:queries"
QUERY_CHANNEL = "bindstream:queries"
QUERY_VERSION = "bindstream:queries:version"
BACKGROUND_PREFIX = "bindstream:background"
ALL_DEVICES = "*"
QUERY_MODALITIES = ("vision", "audio", "depth", "thermal", "imu", "fused")
ID_BYTES = 4  # query ids: 8 hex characters

# Templates per modality. ImageBind aligns every modality with text only through images (CLIP's text
# space), so each template phrases the text the way a caption of that modality's paired data reads:
#   audio: ESC-50 / AudioSet style "sound of" captions; vision and fused (a sum dominated by the vision
#   part's alignment): CLIP's photo / video captions; depth and thermal were trained against the RGB
#   image of the same scene, so a plain "photo of" caption joins the sensor-specific one; IMU was
#   trained against Ego4D video whose narrations describe what the wearer does ("a person walking"),
#   with the bare text kept for users who already write a narration.
PROMPT_TEMPLATES = {
    "audio": ("a sound of {}", "the sound of {}"),
    "vision": ("a photo of {}", "a video of {}"),
    "fused": ("a photo of {}", "a video of {}"),
    "depth": ("a depth photo of {}", "a photo of {}"),
    "thermal": ("a thermal photo of {}", "a photo of {}"),
    "imu": ("a person {}", "{}"),
}

_SCENES = (
    "an empty room", "a street", "a desk", "a wall", "people talking", "a kitchen", "a hallway",
    "a computer screen", "a floor", "a ceiling", "a window", "trees", "the inside of a car", "a hand",
    "a door", "a shelf",
)
# What a wearable mostly perceives when nothing of interest happens, per modality.
BACKGROUND_PROMPTS = {
    "audio": (
        "silence", "people talking", "speech", "music", "traffic", "wind", "rain", "footsteps", "a quiet room",
        "typing on a keyboard", "a door closing", "dishes clattering", "an air conditioner humming",
        "birds chirping", "a television", "running water",
    ),
    "vision": _SCENES,
    "fused": _SCENES,
    "depth": _SCENES,
    "thermal": (
        "a person", "a street at night", "a room", "a wall", "a car", "trees", "a window", "a floor", "a hand",
        "a door", "people walking", "an empty road",
    ),
    "imu": (
        "standing still", "walking", "sitting down", "typing", "eating", "talking to someone", "climbing stairs",
        "driving a car", "lying down", "looking around", "washing dishes", "opening a door",
    ),
}
LOGIT_SCALE = 100.0  # softmax temperature of the share: CLIP's / ImageBind's learned text logit scale
MAX_LOGIT_SCALE = 300.0  # keeps exp() of any score difference inside float64
EXCLUDE_COS = 0.9  # a background prompt this close to a query (a near synonym) does not compete with it
MAX_SMOOTHING_N = 64  # the last n windows are kept as the bits of one uint64
MAX_COOLDOWN_S = 86_400.0  # one day of device time: a longer cooldown is a typo (or an attack), not a setting


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
        for name, kind in (("threshold", Real), ("k", Integral), ("n", Integral), ("cooldown_s", Real),
                           ("hysteresis", Real)):
            value = getattr(self, name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise QueryError(f"{name} must be {'an integer' if kind is Integral else 'a number'}, got {value!r}",
                                 name)
        if not 0.0 < self.threshold < 1.0:
            raise QueryError(f"threshold {self.threshold} must lie strictly between 0 and 1 (a softmax share)",
                             "threshold")
        if not 1 <= self.k <= self.n <= MAX_SMOOTHING_N:
            raise QueryError(f"smoothing needs 1 <= k <= n <= {MAX_SMOOTHING_N}; got k={self.k} n={self.n}",
                             "k" if self.k > self.n or self.k < 1 else "n")
        if not 0.0 <= self.cooldown_s <= MAX_COOLDOWN_S:
            raise QueryError(f"cooldown_s {self.cooldown_s} must lie in [0, {MAX_COOLDOWN_S:g}] seconds",
                             "cooldown_s")
        if not 0.0 <= self.hysteresis < self.threshold:
            raise QueryError(f"hysteresis {self.hysteresis} must lie in [0, threshold={self.threshold}) "
                             f"(the score re-arms below threshold - hysteresis)", "hysteresis")


@dataclass
class Query:
    text: str
    modality: str
    emb: np.ndarray  # (dim,) float32, unit norm
    model: str
    device: str = ALL_DEVICES  # a device id or glob; '*' = every device
    decision: Decision = field(default_factory=Decision)
    source: str = "text"  # text | example:{file} | vector:{file}
    id: str = field(default_factory=lambda: secrets.token_hex(ID_BYTES))
    created: float = field(default_factory=time.time)

    def __post_init__(self):
        if not self.text.strip():
            raise QueryError("the query text is empty")
        if self.modality not in QUERY_MODALITIES:
            raise QueryError(f"unknown modality {self.modality!r}; choose one of {QUERY_MODALITIES}")
        if not self.model or not self.device:
            raise QueryError(f"query {self.text!r}: the model and the device (id or glob) must not be empty")
        if not math.isfinite(self.created):
            raise QueryError(f"query {self.text!r}: created {self.created} is not a time")
        self.emb = unit(self.emb, f"query {self.text!r}")


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
            raise QueryError(f"background {self.model}/{self.modality}: {len(self.prompts)} prompts, "
                             f"{len(self.emb)} vectors")
        if not 0.0 < self.logit_scale <= MAX_LOGIT_SCALE:
            raise QueryError(f"logit_scale {self.logit_scale} must lie in (0, {MAX_LOGIT_SCALE}]")
        if not -1.0 <= self.exclude_cos <= 1.0:
            raise QueryError(f"exclude_cos {self.exclude_cos} must be a cosine, in [-1, 1]")
        self.emb = np.stack([unit(v, f"background {p!r}") for v, p in zip(self.emb, self.prompts)])


def unit(v, what: str) -> np.ndarray:
    """`v` as a unit-norm float32 vector; QueryError unless it is a finite non-zero 1-D vector."""
    v = np.asarray(v, dtype=np.float64).squeeze()
    if v.ndim != 1 or not np.isfinite(v).all() or not np.linalg.norm(v) > 0:
        raise QueryError(f"{what}: expected a finite non-zero 1-D vector, got shape {np.shape(v)}")
    return (v / np.linalg.norm(v)).astype(np.float32)


def query_key(query_id: str) -> str:
    return f"{QUERY_PREFIX}:{query_id}"


def background_key(model: str, modality: str) -> str:
    return f"{BACKGROUND_PREFIX}:{model}:{modality}"


# ----- embedding text ---------------------------------------------------------------------------------


def ensemble(encoder, texts: list[str], modality: str) -> np.ndarray:
    """(len(texts), dim): each text through `modality`'s templates, the normalised mean of the normalised
    template embeddings."""
    templates = PROMPT_TEMPLATES[modality]
    emb = encoder.embed_text([t.format(text) for text in texts for t in templates]).astype(np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    mean = emb.reshape(len(texts), len(templates), -1).mean(axis=1)
    return (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)


def check_modality(encoder, modality: str) -> None:
    """QueryError unless the encoder embeds `modality` (fused: all of its members)."""
    needed = FUSED_MODALITIES if modality == "fused" else (modality,)
    missing = [m for m in needed if m not in encoder.model.modality_trunks]
    if missing:
        raise QueryError(f"model {encoder.name} has no {', '.join(missing)} encoder for {modality} queries")


# ----- Redis -----------------------------------------------------------------------------------------


# What a stored query or background hash that does not parse raises (a missing field, text where a number
# belongs, dim 0, bytes that are not UTF-8); each is reported as QueryError for that record only.
PARSE_ERRORS = (KeyError, ValueError, TypeError, IndexError, ArithmeticError)


def _vectors(raw: bytes, dim: int, count: int, what: str) -> np.ndarray:
    """(count, dim) float32 from `count * dim` little-endian floats; QueryError for any other size."""
    if dim < 1 or len(raw) != 4 * dim * count:
        raise QueryError(f"{what}: {len(raw)} bytes of emb are not {count} vector(s) of dim {dim}")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(count, dim)


def notify(client: redis.Redis, event: str, query_id: str) -> None:
    """Tell running matchers that the queries changed."""
    client.incr(QUERY_VERSION)
    client.publish(QUERY_CHANNEL, f"{event} {query_id}")


def save_query(client: redis.Redis, q: Query, event: str = "add") -> Query:
    d = q.decision
    client.hset(query_key(q.id), mapping={
        "text": q.text, "modality": q.modality, "device": q.device, "model": q.model, "source": q.source,
        "emb": np.ascontiguousarray(q.emb, dtype="<f4").tobytes(), "dim": q.emb.shape[0], "created": q.created,
        "threshold": d.threshold, "k": d.k, "n": d.n, "cooldown_s": d.cooldown_s, "hysteresis": d.hysteresis,
    })
    client.sadd(QUERY_SET, q.id)
    notify(client, event, q.id)
    return q


def load_query(client: redis.Redis, query_id: str) -> Query:
    """The stored query, checked as `alert add` checks it; QueryError if it is missing or malformed."""
    f = {text(k): v for k, v in client.hgetall(query_key(query_id)).items()}
    if not f:
        raise QueryError(f"no query {query_id!r}")
    try:
        decision = Decision(float(f["threshold"]), int(f["k"]), int(f["n"]), float(f["cooldown_s"]),
                            float(f["hysteresis"]))
        return Query(text=text(f["text"]), modality=text(f["modality"]), model=text(f["model"]),
                     emb=_vectors(f["emb"], int(f["dim"]), 1, query_id)[0], device=text(f["device"]),
                     decision=decision, source=text(f["source"]), id=query_id, created=float(f["created"]))
    except PARSE_ERRORS as err:
        raise QueryError(f"query {query_id!r} is malformed: {err}") from err


def read_queries(client: redis.Redis) -> tuple[list[Query], dict[str, str]]:
    """(every active query that loads, oldest first; {id: why} of those that do not)."""
    good, bad = [], {}
    for query_id in map(text, client.smembers(QUERY_SET)):
        try:
            good.append(load_query(client, query_id))
        except QueryError as err:
            bad[query_id] = str(err)
    return sorted(good, key=lambda q: q.created), bad


def load_queries(client: redis.Redis) -> list[Query]:
    """Every active query, oldest first; malformed ones are left out."""
    return read_queries(client)[0]


def find_query_id(client: redis.Redis, ref: str) -> str:
    """The id of the active query `ref` names: its id, the start of exactly one id, or the text of exactly one
    query; QueryError otherwise (an ambiguous `ref` lists its candidates)."""
    ids = {text(i) for i in client.smembers(QUERY_SET)}
    if ref in ids:
        return ref
    texts = {q.id: q.text for q in load_queries(client)}
    found = sorted({i for i in ids if ref and i.startswith(ref)} | {i for i, t in texts.items() if t == ref})
    if len(found) == 1:
        return found[0]
    if not found:
        raise QueryError(f"no query {ref!r}: neither an id, the start of one, nor a query's text "
                         f"(see `bindstream alert list`)")
    named = ", ".join(f"{i} ({texts[i]!r})" if i in texts else i for i in found)
    raise QueryError(f"{ref!r} names {len(found)} queries: {named}; give more of the id")


def delete_query(client: redis.Redis, query_id: str) -> None:
    if not client.srem(QUERY_SET, query_id):
        raise QueryError(f"no query {query_id!r}")
    client.delete(query_key(query_id))
    notify(client, "rm", query_id)


def set_decision(client: redis.Redis, query_id: str, decision: Decision) -> None:
    if not client.sismember(QUERY_SET, query_id):
        raise QueryError(f"no query {query_id!r}")
    client.hset(query_key(query_id), mapping={
        "threshold": decision.threshold, "k": decision.k, "n": decision.n, "cooldown_s": decision.cooldown_s,
        "hysteresis": decision.hysteresis,
    })
    notify(client, "update", query_id)


def save_background(client: redis.Redis, bg: Background) -> Background:
    client.hset(background_key(bg.model, bg.modality), mapping={
        "prompts": "\n".join(bg.prompts), "emb": np.ascontiguousarray(bg.emb, dtype="<f4").tobytes(),
        "dim": bg.emb.shape[1], "count": len(bg.prompts), "logit_scale": bg.logit_scale,
        "exclude_cos": bg.exclude_cos, "created": time.time(),
    })
    client.incr(QUERY_VERSION)  # matchers rebuild their score matrices
    return bg


def load_background(client: redis.Redis, model: str, modality: str) -> Background | None:
    f = {text(k): v for k, v in client.hgetall(background_key(model, modality)).items()}
    if not f:
        return None
    try:
        prompts = tuple(text(f["prompts"]).split("\n"))
        return Background(model, modality, prompts,
                          _vectors(f["emb"], int(f["dim"]), len(prompts), background_key(model, modality)),
                          float(f["logit_scale"]), float(f["exclude_cos"]))
    except PARSE_ERRORS as err:
        raise QueryError(f"{background_key(model, modality)} is malformed: {err}") from err


def read_backgrounds(client: redis.Redis, keys) -> tuple[dict[tuple[str, str], Background | None],
                                                         dict[tuple[str, str], str]]:
    """(the background of each (model, modality) of `keys`, None where none loads; {key: why} of the
    malformed ones)."""
    found, bad = {}, {}
    for model, modality in keys:
        try:
            found[model, modality] = load_background(client, model, modality)
        except QueryError as err:
            found[model, modality], bad[model, modality] = None, str(err)
    return found, bad


def ensure_background(client: redis.Redis, encoder, modality: str) -> Background:
    """The stored background of (encoder's model, modality), embedded and stored first if missing."""
    found = load_background(client, encoder.name, modality)
    if found is not None:
        return found
    prompts = BACKGROUND_PROMPTS[modality]
    return save_background(client, Background(encoder.name, modality, prompts, ensemble(encoder, list(prompts),
                                                                                         modality)))


# ----- few-shot tuning ---------------------------------------------------------------------------------

THRESHOLD_BOUNDS = (1e-6, 1 - 1e-6)  # a fitted threshold stays strictly inside (0, 1)


@dataclass(frozen=True)
class Counts:
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def confusion(scores: np.ndarray, labels: np.ndarray, threshold: float) -> Counts:
    pred, labels = scores >= threshold, labels.astype(bool)
    return Counts(int((pred & labels).sum()), int((pred & ~labels).sum()), int((~pred & labels).sum()),
                  int((~pred & ~labels).sum()))


def fit_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold with the best F1 on (scores, labels) (ties: the highest), placed halfway to the next
    lower score for margin, inside THRESHOLD_BOUNDS."""
    candidates = np.unique(scores)[::-1]  # descending
    f1 = [confusion(scores, labels, t).f1 for t in candidates]
    best = int(np.argmax(f1))
    threshold = candidates[best] if best + 1 == len(candidates) else (candidates[best] + candidates[best + 1]) / 2
    return float(np.clip(threshold, *THRESHOLD_BOUNDS))
