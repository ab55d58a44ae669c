"""Standing text queries over the embedding streams, and the background prompts they are calibrated with.

Layout (`redis_layout.py`; ALERTS.md has the full description):
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

from dataclasses import dataclass

import numpy as np
import redis

from .alerts.records import Background, Decision, Query, QueryError
from .records import FUSED_MODALITIES, text
from .redis_layout import (QUERY_CHANNEL, QUERY_SET, QUERY_VERSION, background_key, decode_background, decode_query,
                           encode_background, encode_decision, encode_query, query_key)


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


def notify(client: redis.Redis, event: str, query_id: str) -> None:
    """Tell running matchers that the queries changed."""
    client.incr(QUERY_VERSION)
    client.publish(QUERY_CHANNEL, f"{event} {query_id}")


def save_query(client: redis.Redis, q: Query, event: str = "add") -> Query:
    client.hset(query_key(q.id), mapping=encode_query(q))
    client.sadd(QUERY_SET, q.id)
    notify(client, event, q.id)
    return q


def load_query(client: redis.Redis, query_id: str) -> Query:
    """The stored query, checked as `alert add` checks it; QueryError if it is missing or malformed."""
    return decode_query(query_id, client.hgetall(query_key(query_id)))


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
    client.hset(query_key(query_id), mapping=encode_decision(decision))
    notify(client, "update", query_id)


def save_background(client: redis.Redis, bg: Background) -> Background:
    client.hset(background_key(bg.model, bg.modality), mapping=encode_background(bg))
    client.incr(QUERY_VERSION)  # matchers rebuild their score matrices
    return bg


def load_background(client: redis.Redis, model: str, modality: str) -> Background | None:
    return decode_background(model, modality, client.hgetall(background_key(model, modality)))


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
