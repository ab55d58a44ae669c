"""The Devices page (/devices): every device that has embedding streams, each of its streams (modality and the
sensor behind it) with when its last window arrived, its windows per minute, and whether it is silent (an open
health event). The table (/devices/table) reloads every `refresh_s` and on every live health event.

All of it comes from Redis: the stream keys (subscriber.stream_keys), each stream's last entry id and recent
entries (one script call per `stream_chunk` streams, of one hash slot in a Redis Cluster: no embedding leaves
Redis), and the health event records.
Drops by reason are the pipeline's counters, which are not in Redis: the page says so rather than guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis
from fastapi import APIRouter, Request

from streaming.alerts.events import list_events
from streaming.records import FUSED, FUSED_MODALITIES, QUERY_MODALITIES, STREAMS, text
from streaming.redis_access import run_scripts, slot_groups
from streaming.redis_layout import HEALTH_EVENT, OPEN, Event, id_tuple, parse_key
from streaming.subscriber import stream_keys

from ..web import ConsoleSettings, RedisClient, page, settings_of

router = APIRouter()

# Per stream (KEYS): its last entry id ('' once it is gone) and how many entries it has from id ARGV[1] on, counted
# up to ARGV[2]. Only ids and a count come back: the entries (4 KiB embeddings) stay in Redis.
STREAM_STATUS = """
local out = {}
for i, key in ipairs(KEYS) do
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  local recent = redis.call('XRANGE', key, ARGV[1], '+', 'COUNT', ARGV[2])
  out[i] = {last[1] and last[1][1] or '', #recent}
end
return out
"""


@dataclass
class Stream:
    """One embedding stream of a device, as the table shows it."""

    modality: str
    sensor: str  # what feeds it: the device's sensor, or the modalities a fused window sums
    last_ms: int  # when its last window was stored (Redis clock)
    per_minute: float  # windows per minute over the last rate_window_s
    at_least: bool  # the count reached max_rate_count: the rate is at least per_minute
    silent: Event | None  # its open health event, if any


@dataclass
class Device:
    name: str
    streams: list[Stream] = field(default_factory=list)

    @property
    def silent(self) -> list[Stream]:
        return [s for s in self.streams if s.silent]


@dataclass
class Fleet:
    devices: list[Device]
    now_ms: int  # Redis clock when read
    hidden: int  # streams beyond max_streams, not shown


def feeding(modality: str) -> str:
    """The sensor behind a modality's stream (fused: the modalities it sums)."""
    if modality == FUSED:
        return "+".join(FUSED_MODALITIES)
    return STREAMS[modality].sensor if modality in STREAMS else "?"


def open_health(client: redis.Redis, settings: ConsoleSettings) -> dict[str, Event]:
    """The open health events (silent streams), by stream key."""
    events, _ = list_events(client, kind=HEALTH_EVENT, limit=settings.max_health)
    return {e.source: e for e in reversed(events) if e.state == OPEN}  # newest last: it wins


def read_fleet(client: redis.Redis, settings: ConsoleSettings) -> Fleet:
    keys = stream_keys(client)
    shown = keys[: settings.max_streams]
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    low = str(max(now_ms - int(settings.rate_window_s * 1000), 0))
    chunks = slot_groups(client, shown, settings.stream_chunk)  # a Redis Cluster: one script per hash slot
    script = client.register_script(STREAM_STATUS)
    found: dict[str, list] = {}
    for chunk, reply in zip(chunks, run_scripts(client, [(script, c, [low, settings.max_rate_count]) for c in chunks])):
        if isinstance(reply, Exception):
            raise reply
        found |= dict(zip(chunk, reply))
    status = [found[key] for key in shown]
    silent = open_health(client, settings)
    devices: dict[str, Device] = {}
    order = {m: i for i, m in enumerate(QUERY_MODALITIES)}
    for key, (last_id, count) in zip(shown, status):
        if not text(last_id):
            continue  # expired since it was listed
        name, modality = parse_key(key)
        devices.setdefault(name, Device(name)).streams.append(
            Stream(
                modality,
                feeding(modality),
                id_tuple(text(last_id))[0],
                count * 60 / settings.rate_window_s,
                count >= settings.max_rate_count,
                silent.get(key),
            )
        )
    for device in devices.values():
        device.streams.sort(key=lambda s: (order.get(s.modality, len(order)), s.modality))
    return Fleet(sorted(devices.values(), key=lambda d: d.name), now_ms, len(keys) - len(shown))


def ago(ms: int) -> str:
    """A while, as the table shows it: 4 s, 3 min, 2 h, 5 d."""
    seconds = max(ms, 0) / 1000
    for size, unit in ((86_400, "d"), (3_600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds // size:.0f} {unit}"
    return f"{seconds:.0f} s"


@router.get("/devices")
def devices_page(request: Request, redis_client: RedisClient):
    settings = settings_of(request)
    return page(request, "devices.html", fleet=read_fleet(redis_client, settings), ago=ago, settings=settings)


@router.get("/devices/table")
def devices_table(request: Request, redis_client: RedisClient):
    """The table alone, for the page's refresh."""
    return page(request, "devices_table.html", fleet=read_fleet(redis_client, settings_of(request)), ago=ago)
