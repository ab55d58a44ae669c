"""The fan-in: every device's alerts entries copied, in order and each once, to `bindstream:alerts`, which `bindstream
watch`, the console, the notifier and the evidence writers follow, with each entry's event record written first.

The matcher's commit appends an alerts entry to the device's own stream `bindstream:alerts:{<device>}` (in the
device's hash slot, with the rest of its commit: one atomic script). Copying it elsewhere cannot be part of that
script in a Redis Cluster, so the rule is:

1. Per device, the hash `bindstream:fanin:{bindstream:alerts}` holds the id of the last entry of its stream that was
   copied. FAN_IN copies an entry only if its id is above that mark and moves the mark, atomically with its XADD
   to `bindstream:alerts` and its PUBLISH (all in the slot of bindstream:alerts): an entry is never copied twice.
2. Whoever copies reads the device's stream after the mark and copies in id order: an entry is never skipped,
   whatever copy died half-way. The matcher copies after each commit that added entries, retries a device whose
   copy failed, and copies what is left after the mark for every device it takes over (a matcher that died
   between its commit and its copy left it there).
3. Before the copy, each entry's event record is written (RECORD, in the event's slot): a start creates the record
   unless it exists (a copy done again keeps a review), an update or end sets its fields while the record exists.
   The events index gets the start too. Both are idempotent, so a copy repeated after a failure changes nothing.
   The record exists before the entry is published, so an evidence writer that hears of it can link its evidence.

Bounds: a device's stream keeps its newest `device_maxlen` entries (an outage of the fan-in's node longer than
that many alerts of one device loses the oldest from the copy); `copy_count` entries per device per read.
"""

from __future__ import annotations

import time

from ..records import text
from ..redis_access import run_scripts
from ..redis_layout import (
    ALERTS_CHANNEL,
    ALERTS_STREAM,
    EVENTS_INDEX,
    FANIN_CURSORS,
    START,
    BadRecord,
    decode_device_alert,
    device_alerts_key,
    event_key,
)
from ..stage import StageMetrics

# Copy one entry of a device's stream, once. KEYS: bindstream:alerts, the marks. ARGV: device, the entry's id in
# the device's stream, maxlen, channel, then the alert's field/value pairs. Returns the new entry's id, or false
# (copied before).
FAN_IN = """
local mark = redis.call('HGET', KEYS[2], ARGV[1])
if mark then
  local ms, seq = string.match(mark, '^(%d+)-(%d+)$')
  local ems, eseq = string.match(ARGV[2], '^(%d+)-(%d+)$')
  ms, seq, ems, eseq = tonumber(ms), tonumber(seq), tonumber(ems), tonumber(eseq)
  if ems < ms or (ems == ms and eseq <= seq) then return false end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 5))
local msg = {id = id}
for i = 5, #ARGV, 2 do msg[ARGV[i]] = ARGV[i + 1] end
redis.call('PUBLISH', ARGV[4], cjson.encode(msg))
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return id
"""

# An event record from an alerts entry: a start writes all of it unless it exists; a later change sets its fields
# only while the record exists (an expired record never comes back partial). KEYS: event key. ARGV: 1 for a
# start, ttl s, then field/value pairs.
RECORD = """
local exists = redis.call('EXISTS', KEYS[1]) == 1
if (ARGV[1] == '1') == exists then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


class FanIn:
    """Copies the alerts entries of the devices marked `due` to bindstream:alerts (the rule: the module docstring).
    An entry of a device's stream that does not decode is skipped, counted in `metrics` as `rejected_alert_entry`
    per device."""

    def __init__(self, client, alerts_maxlen: int, event_ttl_s: int, copy_count: int, metrics: StageMetrics):
        self.client, self.metrics = client, metrics
        self.alerts_maxlen, self.event_ttl_s, self.copy_count = alerts_maxlen, event_ttl_s, copy_count
        self.fan_in = client.register_script(FAN_IN)
        self.record = client.register_script(RECORD)
        self.due: set[str] = set()  # devices whose stream may hold entries not copied yet

    def copy(self) -> int:
        """Copy what the due devices' streams hold after their marks; returns the entries copied. A device stays
        due while its copy fails or more is left than one read takes; the first error is raised."""
        if not self.due:
            return 0
        devices = sorted(self.due)
        marks = self.client.hmget(FANIN_CURSORS, devices)
        pipe = self.client.pipeline(transaction=False)
        for device, mark in zip(devices, marks):
            pipe.xrange(device_alerts_key(device), min=f"({text(mark)}" if mark else "-", count=self.copy_count)
        found = pipe.execute()
        self.due = {device for device, got in zip(devices, found) if len(got) >= self.copy_count}
        entries = []  # (device, entry id, alert, record fields), in each device's order
        for device, got in zip(devices, found):
            for raw_id, raw in got:
                try:
                    entries.append((device, text(raw_id), *decode_device_alert(raw_id, raw)))
                except BadRecord:
                    self.metrics.count("rejected_alert_entry", device)
        if not entries:
            return 0
        now_ms = time.time_ns() // 1_000_000
        records, starts = [], {}
        for _, _, alert, fields in entries:
            is_start = int(alert.state == START)
            records.append((self.record, [event_key(alert.event)], [is_start, self.event_ttl_s, *flat(fields)]))
            if is_start:
                starts[alert.event] = alert.detected_ns // 1_000_000
        results = run_scripts(self.client, records)
        if starts:
            pipe = self.client.pipeline(transaction=False)
            pipe.zadd(EVENTS_INDEX, starts)
            pipe.zremrangebyscore(EVENTS_INDEX, "-inf", f"({now_ms - self.event_ttl_s * 1000}")
            results += pipe.execute(raise_on_error=False)
        copies = [
            (self.fan_in, [ALERTS_STREAM, FANIN_CURSORS], [device, entry_id, self.alerts_maxlen, ALERTS_CHANNEL])
            for device, entry_id, _, _ in entries
        ]
        for (_, _, args), (_, _, alert, _) in zip(copies, entries):
            args += flat(alert.fields())
        results += run_scripts(self.client, copies)
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            self.due |= {device for device, _, _, _ in entries}
            raise failed
        return sum(1 for r in results[-len(copies) :] if r is not None)


def flat(fields: dict[str, str]) -> list[str]:
    return [x for item in fields.items() for x in item]
