"""Reaching Redis from a URL: the one place that turns a URL into a client, a single instance (`redis://`,
`rediss://`) or a Redis Cluster (`rediscluster://HOST:PORT`, `redisclusters://` with TLS: any node, the others are
found from it), and the few operations whose form differs between the two (scripts in a pipeline, reading many
streams, the server's CPU). Every failure to connect is told in one message that names its cause (a URL it cannot
use, refused credentials, TLS, unreachable) and never the password (`redact_url`). SECURITY.md section 3.

In a cluster a command, a script or a transaction may only touch keys of one hash slot (redis_layout.py gives
every key of one device the device's hash tag), and redis-py refuses EVALSHA in a cluster pipeline: `run_scripts`
sends each script call on its own slot's node, all in one round trip per node, and loads a script a node lacks.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.commands.core import Script

CLUSTER_SCHEMES = {"rediscluster": "redis", "redisclusters": "rediss"}  # ours -> redis-py's, for RedisCluster
AnyRedis: TypeAlias = "redis.Redis | redis.cluster.RedisCluster"  # what `connect` returns


def redact_url(url: str) -> str:
    """`url` with its password replaced by *** (for logs and error messages); without a scheme, everything
    before an `@` is taken for credentials."""
    if "://" not in url:
        return f"***@{url.rsplit('@', 1)[1]}" if "@" in url else url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def cluster_url(url: str) -> str:
    """The `redis://` / `rediss://` form of a `rediscluster://` URL that redis-py's RedisCluster takes; ValueError
    for a database other than 0 (a cluster has only database 0)."""
    scheme, rest = url.split("://", 1)
    parts = urlsplit(f"{CLUSTER_SCHEMES[scheme.lower()]}://{rest}")
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0, not {parts.path.strip('/')!r}")
    return urlunsplit(parts._replace(path=""))


def connect(url: str, **kwargs: Any) -> AnyRedis:
    """A client of the Redis at `url`: `redis.Redis` for redis:// and rediss://, `redis.cluster.RedisCluster` for
    rediscluster:// and redisclusters:// (it asks that node for the others, so it connects here). `kwargs` go to
    the client (socket timeouts). ValueError for a URL it cannot use."""
    if is_cluster_url(url):
        return redis.cluster.RedisCluster.from_url(cluster_url(url), **kwargs)
    return redis.Redis.from_url(url, **kwargs)


async def connect_async(url: str, **kwargs: Any) -> redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster:
    """`connect` for asyncio code (the console's live feed). A cluster client has asked a node for the others once
    this returns (its pub/sub needs that map; a single instance is connected on first use)."""
    if is_cluster_url(url):
        client = redis.asyncio.cluster.RedisCluster.from_url(cluster_url(url), **kwargs)
        await client.initialize()
        return client
    return redis.asyncio.Redis.from_url(url, **kwargs)


def is_cluster(client: Any) -> bool:
    return isinstance(client, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster)


class RedisAccessError(RuntimeError):
    """Redis refused the credentials, the TLS handshake, or the connection."""


def check_redis(url: str, timeout_s: float = 5.0) -> None:
    """Connect to `url` and PING, raising RedisAccessError with a message that names the cause (wrong
    password or user, TLS certificate, unreachable) and never the password."""
    where = redact_url(url)
    client = None
    try:
        client = connect(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        client.ping()
    except ValueError as err:  # no scheme, a port that is no number, a cluster database other than 0
        hint = f"it needs a scheme, e.g. redis://{where}{'' if '/' in where else '/0'}" if "://" not in url else err
        raise RedisAccessError(f"{where!r} is not a Redis URL: {hint}") from None
    except redis.AuthenticationError as err:
        raise RedisAccessError(f"Redis at {where} refused the credentials: {err}") from None
    except redis.ResponseError as err:
        if "NOAUTH" in str(err) or "NOPERM" in str(err):
            raise RedisAccessError(f"Redis at {where} refused access: {err}") from None
        raise
    except (redis.ConnectionError, redis.cluster.RedisClusterException) as err:
        text = str(err)
        if "CERTIFICATE" in text.upper() or "SSL" in text.upper():
            raise RedisAccessError(f"TLS to Redis at {where} failed: {text}") from None
        raise RedisAccessError(f"cannot reach Redis at {where}: {text}") from None
    finally:
        if client is not None:
            client.close()


# ----- what differs between a single instance and a cluster -----------------------------------------------


def slot_groups(client: AnyRedis, keys: Iterable[str], size: int) -> list[list[str]]:
    """`keys` in groups that one command or script may touch, at most `size` keys each: in a cluster the keys of
    one hash slot, on a single instance any."""
    if not is_cluster(client):
        listed = list(keys)
        return [listed[i : i + size] for i in range(0, len(listed), size)]
    by_slot: dict[int, list[str]] = defaultdict(list)
    for key in keys:
        by_slot[client.keyslot(key)].append(key)
    return [group[i : i + size] for group in by_slot.values() for i in range(0, len(group), size)]


def run_scripts(client: AnyRedis, calls: Sequence[tuple[Script, Sequence, Sequence]]) -> list:
    """Run each (script, keys, args) in one pipeline (in a cluster: on its keys' node, one round trip per node);
    returns each call's reply, or the exception it raised. A script a node does not hold (NOSCRIPT: the call did
    nothing) is loaded there and that call sent again."""
    results: list = [None] * len(calls)
    todo = list(range(len(calls)))
    for _ in range(2):  # a second time for the calls that met a node without the script
        pipe = client.pipeline(transaction=False)
        for i in todo:
            script, keys, args = calls[i]
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        for i, reply in zip(todo, pipe.execute(raise_on_error=False)):
            results[i] = reply
        todo = [i for i in todo if isinstance(results[i], redis.exceptions.NoScriptError)]
        if not todo:
            break
        for body in {calls[i][0].script for i in todo}:
            client.script_load(body)  # a cluster client sends it to every primary
    return results


def read_streams(
    client: AnyRedis, streams: dict[str, str], count: int, block_ms: int | None, group: str = "", consumer: str = ""
) -> list:
    """XREAD (or XREADGROUP with `group`) of `streams` (key -> id): one blocking call on a single instance; in a
    cluster one call per hash slot, pipelined, waiting `block_ms` only when none has anything. Returns the reply
    entries as [(key, [(id, fields), ...]), ...]."""

    def queue(target, chosen: dict[str, str], block: int | None):
        if group:
            return target.xreadgroup(group, consumer, chosen, count=count, block=block)
        return target.xread(chosen, count=count, block=block)

    if not streams:
        return []
    if not is_cluster(client):
        return queue(client, streams, block_ms) or []
    pipe = client.pipeline(transaction=False)
    for keys in slot_groups(client, streams, len(streams)):
        queue(pipe, {k: streams[k] for k in keys}, None)
    out = [item for reply in pipe.execute() for item in reply or []]
    if not out and block_ms:
        time.sleep(block_ms / 1000)
    return out


def server_info_sum(client: AnyRedis, section: str, names: Sequence[str]) -> float:
    """The sum of the INFO `section` fields `names` of the Redis server, over every primary of a cluster (its
    CPU seconds: "cpu", ("used_cpu_user", "used_cpu_sys"); its memory: "memory", ("used_memory",))."""
    if is_cluster(client):
        infos = list(client.info(section, target_nodes=redis.cluster.RedisCluster.PRIMARIES).values())
        if infos and not isinstance(infos[0], dict):  # one primary: redis-py returns its reply itself
            infos = [dict(client.info(section, target_nodes=redis.cluster.RedisCluster.PRIMARIES))]
    else:
        infos = [client.info(section)]
    return sum(float(info[name]) for info in infos for name in names)
