"""Event records, as the matcher writes them (ALERTS.md, "Events"): read one, find one by the start of its id,
list them newest first, and record a person's review of one. Plain functions over a redis client: the commands
call them.

A record lives `event_ttl_s` (the matcher's setting) after its last change; the index `bindstream:events`
may still name an expired one for a while (the matcher trims it at each start), so listing skips ids whose
record is gone. Nothing here changes an event but its review.
"""

from __future__ import annotations

import time
from fnmatch import fnmatchcase

import redis

from ..records import text
from ..redis_layout import EVENTS_INDEX, REVIEWS, BadRecord, Event, event_key

HEX = frozenset("0123456789abcdef")  # the characters of an event id
LIST_CHUNK = 500  # index members read (and records fetched, in one round trip) per step of a listing
DEFAULT_LIMIT = 50  # events a listing returns unless told

# A review, only of an event that exists (an expired one must not come back as a hash of two fields).
# KEYS: event key. ARGV: review, wall clock ns. Returns 1, or 0 when there is no such event.
SET_REVIEW = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'review', ARGV[1], 'reviewed_ns', ARGV[2])
return 1
"""


class NoEvent(LookupError):
    """No record of that event id: never raised, or expired."""


def load_event(client: redis.Redis, event_id: str) -> Event:
    """The record of `event_id`; NoEvent if there is none, BadRecord if it does not decode."""
    raw = client.hgetall(event_key(event_id))
    if not raw:
        raise NoEvent(f"no event {event_id!r} (never raised, or expired)")
    return Event.decode(raw)


def list_events(
    client: redis.Redis,
    device: str | None = None,
    query: str | None = None,
    since_ms: int | None = None,
    limit: int = DEFAULT_LIMIT,
    kind: str | None = None,
) -> tuple[list[Event], int]:
    """(the newest `limit` events by start, the records skipped because they do not decode): of the devices
    matching `device` (an id or glob), of the query id `query` ("health" for health events) and of the `kind`
    (query or health) when given, started at most `since_ms` ago by the server's clock."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    low: float | str = "-inf"
    if since_ms is not None:
        seconds, micros = client.time()
        low = seconds * 1000 + micros // 1000 - since_ms
    events: list[Event] = []
    skipped = offset = 0
    while len(events) < limit:
        ids = client.zrevrangebyscore(EVENTS_INDEX, "+inf", low, start=offset, num=LIST_CHUNK)
        if not ids:
            break
        offset += len(ids)
        pipe = client.pipeline(transaction=False)
        for event_id in ids:
            pipe.hgetall(event_key(text(event_id)))
        for raw in pipe.execute():
            if not raw:
                continue  # expired: the index still names it
            try:
                event = Event.decode(raw)
            except BadRecord:
                skipped += 1
                continue
            if (
                (device is None or fnmatchcase(event.device, device))
                and (query is None or event.query == query)
                and (kind is None or event.kind == kind)
            ):
                events.append(event)
    return events[:limit], skipped


def find_event_id(client: redis.Redis, ref: str) -> str:
    """The id of the event `ref` names: its id, or the start of exactly one listed event's id; NoEvent when
    it names none, or several (the message lists them)."""
    if ref and client.exists(event_key(ref)):
        return ref
    if not ref or any(c not in HEX for c in ref):  # an id is hex: no glob character reaches the MATCH below
        raise NoEvent(f"no event {ref!r}: event ids are hexadecimal (see `bindstream event list`)")
    listed = [text(i) for i, _ in client.zscan_iter(EVENTS_INDEX, match=f"{ref}*", count=LIST_CHUNK)]
    pipe = client.pipeline(transaction=False)
    for event_id in listed:
        pipe.exists(event_key(event_id))
    found = sorted(i for i, exists in zip(listed, pipe.execute()) if exists)
    if len(found) == 1:
        return found[0]
    if not found:
        raise NoEvent(f"no event {ref!r}: neither an id nor the start of one (never raised, or expired)")
    raise NoEvent(f"{ref!r} starts {len(found)} event ids: {', '.join(found[:5])}; give more of the id")


def set_review(client: redis.Redis, event_id: str, review: str) -> Event:
    """Record a person's verdict on an event (one of REVIEWS; "none" takes it back) and when it was given;
    returns the event. ValueError for another verdict, NoEvent if there is no such event."""
    if review not in REVIEWS:
        raise ValueError(f"review {review!r} must be one of {', '.join(REVIEWS)}")
    if not client.eval(SET_REVIEW, 1, event_key(event_id), review, time.time_ns()):
        raise NoEvent(f"no event {event_id!r} (never raised, or expired)")
    return load_event(client, event_id)
