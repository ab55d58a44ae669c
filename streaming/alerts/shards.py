"""How the matchers of one group share the embedding streams: each device (all its streams) belongs to one live
matcher, chosen by rendezvous hashing of the device id over the group's members, and a token in Redis fences its
reads and commits to that matcher while the members change. ALERTS.md "Matchers at scale" describes it for users.

- **Members**: the sorted set `bindstream:matchers:<group>`, each matcher scored by its last heartbeat (server
  ms). A matcher heartbeats at every discovery; one silent for `ttl_ms` is dropped from the set by the next
  heartbeat of any member, and one that stops removes itself. Each matcher computes the owners from the members
  it saw last: views differ for at most a discovery period after a change.
- **Owner**: the member whose hash of (member, device) is the highest (rendezvous, or highest-random-weight,
  hashing): when a member comes or goes, only the devices it gains or loses change owner.
- **Token**: `bindstream:owner:<group>:{<device>}` names the matcher that holds the device. A matcher takes it
  with CLAIM, which in the same script moves every pending entry of the device's streams in the group (the
  consumer group's PEL, whoever read them) to itself and creates the group where a stream lacks it. READ and the
  matcher's commit do nothing for a device whose token another holds (or has expired): so while two matchers
  briefly both think they own a device, one of them at a time reads and decides it, in stream order, and what
  the other had read but not committed is moved to the holder by its claim. Every window is decided once.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

import msgpack
import redis

from ..records import text
from ..redis_layout import members_key

# A heartbeat: this member's score set to the server's clock, members silent for ARGV[2] ms dropped; returns the
# live members. KEYS: the members set. ARGV: member, ttl ms.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%d', now - tonumber(ARGV[2])))
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

# Take a device: its token set to this matcher (TTL ARGV[4] s), and for each stream in KEYS[2..] that is a
# stream, the group created (at ARGV[3]) where it lacks it and every pending entry of the group moved to this
# consumer. KEYS: token, the streams. ARGV: group, consumer, start id, token ttl s, XAUTOCLAIM count. Returns per
# stream false (no such stream), or {the group's last delivered id, 1 if the stream has entries after it or
# pending ones, else 0}.
CLAIM = """
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[4])
local out = {}
for i = 2, #KEYS do
  local key = KEYS[i]
  if redis.call('TYPE', key).ok ~= 'stream' then
    out[#out + 1] = false
  else
    local made = redis.pcall('XGROUP', 'CREATE', key, ARGV[1], ARGV[3])
    if type(made) == 'table' and made.err and string.sub(made.err, 1, 9) ~= 'BUSYGROUP' then return made end
    local start, moved = '0-0', 0
    repeat
      local r = redis.call('XAUTOCLAIM', key, ARGV[1], ARGV[2], 0, start, 'COUNT', ARGV[5], 'JUSTID')
      start, moved = r[1], moved + #r[2]
    until start == '0-0'
    local delivered = '0-0'
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
      local f = {}
      for j = 1, #g, 2 do f[g[j]] = g[j + 1] end
      if f['name'] == ARGV[1] then delivered = f['last-delivered-id'] end
    end
    local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
    local unread = 0
    if moved > 0 or (last and last[1] ~= delivered) then unread = 1 end
    out[#out + 1] = {delivered, unread}
  end
end
return out
"""

# Read devices this matcher holds: per stream its own pending entries (left by a failed commit, or moved to it
# by a claim), then new ones, up to the count, and `budget` entries in all (each stream gets one at least). KEYS:
# per device its token, then its streams. ARGV: group, consumer, count per stream, budget, then per device the
# number of its streams. Returns, packed with MessagePack (one string instead of a reply of ~20 elements per entry,
# which redis-py's parser would take longer to read than the matcher takes to score it), per device 0 (its token
# is not this matcher's: nothing read), or per stream 0 (no such group or stream) or {more, its entries}: more is
# 1 where entries may be left (it gave all it was allowed), the entries {id, {field, value, ...}}, the fields
# false for an entry trimmed while pending.
READ = """
local out, k, left = {}, 1, tonumber(ARGV[4])
for d = 5, #ARGV do
  local n = tonumber(ARGV[d])
  if redis.call('GET', KEYS[k]) ~= ARGV[2] then
    out[#out + 1] = 0
  else
    local streams = {}
    for i = k + 1, k + n do
      local count = math.max(1, math.min(tonumber(ARGV[3]), left))
      local got = redis.pcall('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', count, 'STREAMS', KEYS[i], '0')
      if type(got) == 'table' and got.err then
        streams[#streams + 1] = 0
      else
        local entries = got[1][2]
        if count > #entries then
          got = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', count - #entries, 'STREAMS', KEYS[i], '>')
          for _, e in ipairs(got and got[1][2] or {}) do entries[#entries + 1] = e end
        end
        left = left - #entries
        streams[#streams + 1] = {#entries >= count and 1 or 0, entries}
      end
    end
    out[#out + 1] = streams
  end
  k = k + 1 + n
end
return cmsgpack.pack(out)
"""


def owner(device: str, members: Sequence[str]) -> str | None:
    """The member that owns `device`: the highest hash of (member, device) (rendezvous hashing); None without
    members."""

    def weight(member: str) -> bytes:
        return hashlib.blake2b(f"{member}\n{device}".encode(), digest_size=8).digest()

    return max(members, key=weight, default=None)


class Membership:
    """This matcher's view of its group's live members, and the devices it owns in that view (computed once per
    device and view). `refresh` heartbeats too; `beat` keeps heartbeating from a thread of its own while the
    matcher works through a long step, so that its group does not take it for dead."""

    def __init__(self, client, group: str, member: str, ttl_ms: int):
        self.client, self.key, self.member, self.ttl_ms = client, members_key(group), member, ttl_ms
        self.heartbeat = client.register_script(HEARTBEAT)
        self.members: tuple[str, ...] = ()
        self._owners: dict[str, bool] = {}  # device -> whether it is this member's, in the current view

    def beat(self, every_s: float, stop: threading.Event) -> None:
        """Heartbeat every `every_s` until `stop` is set (a thread's loop; a failed heartbeat is tried again at
        the next one: the member expires only after `ttl_ms` without any)."""
        while not stop.wait(every_s):
            try:
                self.heartbeat(keys=[self.key], args=[self.member, self.ttl_ms])
            except redis.RedisError:
                continue

    def refresh(self) -> bool:
        """Heartbeat and read the live members; whether they changed since the last refresh."""
        members = tuple(sorted(text(m) for m in self.heartbeat(keys=[self.key], args=[self.member, self.ttl_ms])))
        if members == self.members:
            return False
        self.members, self._owners = members, {}
        return True

    def owns(self, device: str) -> bool:
        if device not in self._owners:
            self._owners[device] = owner(device, self.members) == self.member
        return self._owners[device]

    def leave(self) -> None:
        """Leave the group at once (the others take this member's devices at their next discovery)."""
        self.client.zrem(self.key, self.member)
        self.members, self._owners = (), {}


def read_reply(packed: bytes) -> list:
    """A READ reply, unpacked: per device 0 or per stream 0 or its entries (`stream_entries`)."""
    return msgpack.unpackb(packed, raw=True)


def stream_entries(raw) -> list[tuple[str, dict | None]]:
    """A READ reply's entries of one stream as (id, fields), fields None for an entry trimmed while pending."""
    out = []
    for entry_id, flat in raw:
        out.append((text(entry_id), dict(zip(flat[::2], flat[1::2])) if flat else None))
    return out
