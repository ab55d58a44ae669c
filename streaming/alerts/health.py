"""Device health: a stream of a matcher's shard that falls silent raises a health event (`kind` health), which
ends when entries flow again. ALERTS.md "Device health events" describes it for users; the rule:

- Silent: the stream's last entry was delivered to the matcher's group and is `silence_s` old, by its id (ms)
  against Redis's clock (`TIME`). A stream whose last entry the group never delivered (written before the
  group started, or still being read) does not raise.
- Ends: at the stream's first entry after the last one before the silence. A deleted stream's silence is
  dropped without an end: it never flows again.
- Kept in Redis: `bindstream:health:<group>:{<device>}` (`health_key`), one field per silent stream of the
  device, `encode_silence(last entry before the silence, its window's t1)`; read back at the first check after
  the matcher took the device (a start, or a device moving to it from another matcher), where a field that does
  not parse is deleted and counted (`rejected_state` per device).
- Asked of Redis: only about the streams whose health may change, with the read-only SILENT_STREAMS, one call
  per `sweep_chunk` streams of one hash slot, all in one round trip per node. A delivered id found not to be its
  stream's last entry (a group's start) is remembered (for at most `max_remembered` streams) and not asked about
  again until it changes. While nothing changes a check costs one `TIME`.
- Committed: by the matcher, each change exactly once per (stream, entry, state) like its query events'
  changes, with its device's commit script (`health_commit` devices per script, so that a mass silence, a
  network outage, does not hold Redis in one long one); `applied` takes the changes into memory once committed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from sensors.protocol import INT64_MAX

from ..records import text
from ..redis_access import run_scripts, slot_groups
from ..redis_layout import (
    END,
    ENDED,
    HEALTH_EVENT,
    HEALTH_QUERY,
    OPEN,
    START,
    Event,
    decode_silence,
    event_id,
    health_key,
    id_tuple,
    parse_key,
)
from ..stage import StageMetrics

# Which of the streams the matcher suspects did fall silent, or flow again (read only). KEYS: streams. ARGV:
# per stream 'p' .. the id of the last entry the group delivered (no open health event: silent if that is
# the stream's last entry), or 'o' .. the last entry before its open health event. Returns, for each stream
# whose health changes, its index in KEYS (from 1) and {id, t0, t1, model} of the entry that shows it: its
# last entry, or its first entry after the silence; and for a silent stream that is gone, its index and {}.
SILENT_STREAMS = """
local out = {}
for i, key in ipairs(KEYS) do
  local mark, id = string.sub(ARGV[i], 1, 1), string.sub(ARGV[i], 2)
  local e
  if mark == 'o' and redis.call('EXISTS', key) == 0 then
    out[#out + 1] = i
    out[#out + 1] = {}
  elseif mark == 'o' then
    e = redis.pcall('XRANGE', key, '(' .. id, '+', 'COUNT', 1)
  else
    e = redis.pcall('XREVRANGE', key, '+', '-', 'COUNT', 1)
    if type(e) == 'table' and e[1] and e[1][1] ~= id then
      e = nil
    end
  end
  if type(e) == 'table' and e[1] then
    local f = {}
    for j = 1, #e[1][2], 2 do f[e[1][2][j]] = e[1][2][j + 1] end
    out[#out + 1] = i
    out[#out + 1] = {e[1][1], f['t0'] or '', f['t1'] or '', f['model'] or ''}
  end
end
return out
"""

Silence = tuple[str, int]  # an open health event: (the last entry before the silence, that window's t1)


@dataclass(frozen=True)
class HealthChange:
    """A stream's health event starting or ending: its record, what its alerts entry reports (the entry that
    shows the change, the seconds of silence, device times), and the stream's silence from then on (None:
    it ended, its field goes)."""

    stream: str
    record: Event
    state: str  # START or END
    source_id: str
    score: float
    t0: int
    t1: int
    silence: Silence | None


def device_time(raw: bytes) -> int:
    """A device time field of an entry SILENT_STREAMS returned; 0 where it is none (a malformed entry)."""
    try:
        t = int(raw)
    except ValueError:
        return 0
    return t if 0 <= t <= INT64_MAX else 0


class HealthWatch:
    """The health of one matcher's streams (the rule: this module's docstring): `check` finds the changes,
    the matcher commits them, then `applied` takes them into memory; `forget` drops devices another matcher
    took. `metrics` is the matcher's."""

    def __init__(
        self,
        client: redis.Redis,
        group: str,
        silence_s: float,
        sweep_chunk: int,
        max_remembered: int,
        metrics: StageMetrics,
    ):
        self.client = client
        self.group = group
        self.silence_s = silence_s
        self.sweep_chunk = sweep_chunk
        self.max_remembered = max_remembered
        self.metrics = metrics
        self.silent = client.register_script(SILENT_STREAMS)
        self.silences: dict[str, Silence] = {}  # stream key -> its open health event
        self.loaded: set[str] = set()  # devices whose open health events were read from Redis
        # stream key -> the delivered id at which a check found that it is not the stream's last entry (never
        # delivered: a group's start), so that it is not asked again until it changes
        self.not_last: dict[str, str] = {}

    def _load(self, devices: set[str]) -> None:
        """Read the open health events of `devices` from Redis; a field that does not parse is deleted and
        counted (`rejected_state` per device)."""
        new = sorted(devices - self.loaded)
        if not new:
            return
        pipe = self.client.pipeline(transaction=False)
        for device in new:
            pipe.hgetall(health_key(self.group, device))
        unreadable: dict[str, list] = {}
        for device, fields in zip(new, pipe.execute()):
            for name, value in fields.items():
                try:
                    self.silences[name.decode(errors="replace")] = decode_silence(value)
                except ValueError:
                    unreadable.setdefault(device, []).append(name)
                    self.metrics.count("rejected_state", device)
        for device, names in unreadable.items():
            self.client.hdel(health_key(self.group, device), *names)
        self.loaded |= set(new)

    def forget(self, devices: set[str]) -> None:
        """Drop what is kept of devices another matcher reads now (their health events stay in Redis, for it)."""
        for key in [k for k in [*self.silences, *self.not_last] if parse_key(k)[0] in devices]:
            self.silences.pop(key, None)
            self.not_last.pop(key, None)
        self.loaded -= devices

    def check(self, positions: dict[str, str], unread: set[str]) -> list[HealthChange]:
        """The health event changes of this matcher's streams, `positions` the last entries the group delivered
        of each (as far as the matcher knows), `unread` those known to have newer entries. Looks in Redis
        only at the streams whose delivered id is `silence_s` old and not known to be no last entry, and at
        the silent ones; drops (HDEL) the silences of the streams that are gone (deleted, expired) or no longer
        in `positions`: they will not flow again."""
        self._load({parse_key(k)[0] for k in positions})
        silences = self.silences
        gone = [k for k in silences if k not in positions]  # deleted: it will not flow again
        self.not_last = {k: p for k, p in self.not_last.items() if positions.get(k) == p}
        seconds, micros = self.client.time()
        now_ms = seconds * 1000 + micros // 1000
        marks = {}
        for key, position in positions.items():
            if key in silences:
                marks[key] = f"o{silences[key][0]}"
            elif (
                key not in unread
                and self.not_last.get(key) != position
                and now_ms - id_tuple(position)[0] >= self.silence_s * 1000
            ):
                marks[key] = f"p{position}"
        chunks = slot_groups(self.client, marks, self.sweep_chunk)
        replies = run_scripts(self.client, [(self.silent, chunk, [marks[k] for k in chunk]) for chunk in chunks])
        now_ns = time.time_ns()
        changes = []
        for chunk, found in zip(chunks, replies):
            if isinstance(found, Exception):
                raise found
            for index, row in zip(found[::2], found[1::2]):
                key = chunk[index - 1]
                if not row:
                    gone.append(key)
                    continue
                entry_raw, t0, t1, model_raw = row
                changes.append(self._change(key, text(entry_raw), t0, t1, model_raw, now_ms, now_ns))
        answered = {c.stream for c in changes} | set(gone)
        for key in marks:
            if key not in answered and key not in silences and len(self.not_last) < self.max_remembered:
                self.not_last[key] = positions[key]
        if gone:
            pipe = self.client.pipeline(transaction=False)
            for key in gone:
                pipe.hdel(health_key(self.group, parse_key(key)[0]), key)
                del silences[key]
            pipe.execute()
        return changes

    def _change(
        self, key: str, entry_id: str, t0: bytes, t1: bytes, model_raw: bytes, now_ms: int, now_ns: int
    ) -> HealthChange:
        """The change SILENT_STREAMS's entry `entry_id` (of times t0, t1) shows for stream `key`: the end of its
        open health event (the first entry after the silence), or the start of one (its last entry)."""
        device, modality = parse_key(key)
        silences = self.silences
        silence: Silence | None = None
        if key in silences:  # flows again: the silence lasted from the last entry before to this one
            last_id, start_ns = silences[key]
            end_ns = device_time(t0)
            silent_s = (id_tuple(entry_id)[0] - id_tuple(last_id)[0]) / 1000
            state, t_first, t_last = END, start_ns, end_ns
        else:  # fell silent after this entry
            last_id, start_ns = entry_id, device_time(t1)
            end_ns, silent_s = start_ns, (now_ms - id_tuple(entry_id)[0]) / 1000
            state, t_first, t_last = START, device_time(t0), start_ns
            silence = (entry_id, start_ns)
        ended = state == END
        record = Event(
            event_id(HEALTH_QUERY, key, last_id),
            HEALTH_EVENT,
            device,
            HEALTH_QUERY,
            f"{device} {modality} silent",
            modality,
            model_raw.decode(errors="replace"),
            key,
            start_ns,
            end_ns,
            silent_s,
            last_id,
            0,
            ENDED if ended else OPEN,
            detected_ns=now_ns,
            ended_ns=now_ns if ended else 0,
        )
        return HealthChange(key, record, state, entry_id, silent_s, t_first, t_last, silence)

    def applied(self, changes: list[HealthChange]) -> None:
        """Take committed `changes` into memory."""
        silences = self.silences
        for c in changes:
            if c.silence is None:
                del silences[c.stream]
            else:
                silences[c.stream] = c.silence
