"""Shared test helpers: the read-only ../shared folder (fixtures and real media) beside the checkout; real
servers (Ray, redis-server, ZeroMQ, MQTT) on loopback; a Redis holding the audio background the tests' vectors are
built around."""

import time
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURE = SHARED / "fixtures" / "imagebind_parity_tiny.pt"
HUGE_KEYS = SHARED / "fixtures" / "imagebind_huge_keys.json"
ASSETS = SHARED / "assets"
MODEL = "tiny"  # RANDOM weights
DIM = 64  # tiny's joint space
BACKGROUND = range(1, 9)  # the axes of the background prompts b1..b8 (`client`)


def shared_file(path: Path) -> Path:
    """`path` inside ../shared, or skip the test saying what is missing."""
    if not path.exists():
        pytest.skip(f"{path} is missing: ../shared (fixtures and assets) must lie beside the checkout")
    return path


@pytest.fixture(scope="session")
def parity_fixture():
    import torch

    return torch.load(shared_file(FIXTURE), weights_only=True)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray (token authentication on, as Ray sets it by default)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server process on a free loopback port."""
    from streaming.redis_server import RedisServer

    with RedisServer() as server:
        yield server


@pytest.fixture
def server():
    """A redis-server of the test's own: queries, backgrounds and consumer groups are global to a Redis, and
    what another test left running cannot write into this one."""
    from streaming.redis_server import RedisServer

    with RedisServer() as s:
        yield s


@pytest.fixture
def client(server):
    """A client of `server`, which holds MODEL's audio background: the prompts b1..b8, along the BACKGROUND axes."""
    import numpy as np
    import redis

    from streaming.alerts.queries import save_background
    from streaming.alerts.records import Background

    c = redis.Redis.from_url(server.url)
    axes = np.eye(DIM, dtype=np.float32)[BACKGROUND]
    save_background(c, Background(MODEL, "audio", tuple(f"b{i}" for i in BACKGROUND), axes))
    return c


RECV_TIMEOUT_MS = 5000


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.05):
    """Poll `predicate` until it returns something truthy (returned), or fail saying `what` never came."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def pull():
    """A real PULL socket bound to an ephemeral loopback port (see `endpoint`)."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
    sock.bind("tcp://127.0.0.1:*")
    yield sock
    ctx.destroy(linger=0)


def endpoint(sock) -> str:
    """The endpoint a socket is bound to."""
    import zmq

    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


MOSQUITTO = Path("/usr/sbin/mosquitto")  # Debian's broker (.ci/run installs it)


@pytest.fixture
def mosquitto(tmp_path):
    """A real MQTT broker (Debian's mosquitto) on a free loopback port, anonymous, without persistence;
    yields its `mqtt://127.0.0.1:PORT` URL. Skips, saying why, only where the binary is missing."""
    import socket
    import subprocess

    if not MOSQUITTO.exists():
        pytest.skip(f"{MOSQUITTO} is missing: apt-get install mosquitto (.ci/run does)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    broker = subprocess.Popen([str(MOSQUITTO), "-c", str(config)], stderr=subprocess.PIPE)

    def listening():
        if broker.poll() is not None:
            raise AssertionError(f"mosquitto exited: {broker.stderr.read().decode() if broker.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        wait_for(listening, 10, "mosquitto to listen")
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        broker.terminate()
        broker.wait(timeout=10)


CHROMIUM = Path("/usr/bin/chromium")  # Debian's chromium and chromium-driver (.ci/run installs them)
CHROMEDRIVER = Path("/usr/bin/chromedriver")
BROWSER_SIZE = (1280, 900)  # the desktop window every test starts from (a phone test resizes, then restores it)


@pytest.fixture(scope="session")
def chromium():
    """A real headless Chromium driven through Selenium and Debian's chromedriver (nothing is downloaded). Skips,
    saying why, only where either binary is missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument(f"--window-size={BROWSER_SIZE[0]},{BROWSER_SIZE[1]}")
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()
