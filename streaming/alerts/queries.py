"""Storing the standing queries and their backgrounds in Redis, and telling running matchers of each change.

Keys and encodings are redis_layout's (ALERTS.md has the full description):
    HASH bindstream:query:{id}        text modality device emb dim model source created
                                      threshold k n cooldown_s hysteresis
    SET  bindstream:queries           the ids of the active queries
    INT  bindstream:queries:version   bumped on every change (matchers poll it)
    PUB  bindstream:queries           "{add|rm|update} {id}" on every change (matchers reload at once)
    HASH bindstream:background:{model}:{modality}
                                      prompts emb dim count logit_scale exclude_cos created
"""

from __future__ import annotations

import redis

from ..records import text
from ..redis_layout import (
    QUERY_CHANNEL,
    QUERY_SET,
    QUERY_VERSION,
    background_key,
    decode_background,
    decode_query,
    encode_background,
    encode_decision,
    encode_query,
    query_key,
)
from .prompts import BACKGROUND_PROMPTS, ensemble
from .records import Background, Decision, Query, QueryError


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
        raise QueryError(
            f"no query {ref!r}: neither an id, the start of one, nor a query's text (see `bindstream alert list`)"
        )
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


def update_query(client: redis.Redis, q: Query) -> None:
    """Store every setting of `q`, an active query (its settings edited); QueryError if it was removed."""
    if not client.sismember(QUERY_SET, q.id):
        raise QueryError(f"no query {q.id!r}")
    client.hset(query_key(q.id), mapping=encode_query(q))
    notify(client, "update", q.id)


def save_background(client: redis.Redis, bg: Background) -> Background:
    client.hset(background_key(bg.model, bg.modality), mapping=encode_background(bg))
    client.incr(QUERY_VERSION)  # matchers rebuild their score matrices
    return bg


def load_background(client: redis.Redis, model: str, modality: str) -> Background | None:
    return decode_background(model, modality, client.hgetall(background_key(model, modality)))


def read_backgrounds(
    client: redis.Redis, keys
) -> tuple[dict[tuple[str, str], Background | None], dict[tuple[str, str], str]]:
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
    return save_background(
        client, Background(encoder.name, modality, prompts, ensemble(encoder, list(prompts), modality))
    )
