"""`bindstream run` as a new user meets it (issue 11): each start-up mistake ends within seconds in one
clear line, Ctrl-C works at any moment, the embedded Redis can be pinned, and the summary adds up.

Mistakes caught before Ray starts run in this process (click's CliRunner); the rest run `bindstream`
as a real process with a real local Ray, redis-server and ZeroMQ devices."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest
import redis
import zmq
from click.testing import CliRunner

from sensors.simulator import SimulatedWearable, simulate
from streaming.cli import main
from streaming.redis_server import RedisServer, free_port, port_in_use

from .conftest import wait_for

BINDSTREAM = [sys.executable, "-c", "from streaming.cli import main; main()"]
DEPLOY_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "bindstream.toml"
ANY_PORT = ["--ingest", "tcp://127.0.0.1:*"]  # so that a busy 5555 on this machine decides nothing
FAST_S = 10  # a mistake found before Ray starts
RAY_S = 60  # one found once a local Ray is up (it starts in 3-15 s on a busy 2-core machine)
RAY_NOISE = ("Traceback", "Aborted!", "RAY_AUTH_MODE", "core_worker", "constructor arguments")


@pytest.fixture
def cli():
    """Invoke `bindstream ARGS` in this process: (result, seconds). The signal handlers `run` sets are
    put back afterwards."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def invoke(*args):
        start = time.monotonic()
        result = CliRunner().invoke(main, list(args))
        return result, time.monotonic() - start

    yield invoke
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def assert_one_clear_line(result, seconds: float, *phrases: str) -> None:
    """The command ended by itself (no exception escaped click), non-zero, within FAST_S, with one error
    line (two at most) on stderr that contains every phrase."""
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, (result.exception, result.output)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert 1 <= len(errors) <= 2 and errors[0].startswith("Error: "), result.stderr
    assert all(p in result.stderr for p in phrases), result.stderr
    assert seconds < FAST_S, seconds


@pytest.mark.parametrize(
    "content, phrases",
    [
        ("embeders = 2\n", ["unknown pipeline config keys: 'embeders' (did you mean 'embedders'?)"]),
        ("embedders = \n", ["is not valid TOML", "line 1"]),
        ('embedders = "two"\n', ["embedders must be an integer, got 'two'"]),
        (
            "[limits]\nmax_sides = 4\n",
            ["unknown pipeline config keys in [limits]: 'max_sides' (did you mean 'max_side'?)"],
        ),
    ],
)
def test_a_malformed_config_file_is_named_in_one_line(cli, tmp_path, content, phrases):
    config = tmp_path / "bad.toml"
    config.write_text(content)
    result, seconds = cli("run", "--config", str(config), *ANY_PORT)
    assert_one_clear_line(result, seconds, str(config), *phrases)


def test_redis_mistakes_are_named_with_their_fix(cli):
    result, seconds = cli("run", "--redis", "localhost:6379", *ANY_PORT)
    assert_one_clear_line(result, seconds, "'localhost:6379' is not a Redis URL", "redis://localhost:6379/0")

    result, seconds = cli("run", "--redis", f"redis://127.0.0.1:{free_port()}/0", *ANY_PORT)
    assert_one_clear_line(result, seconds, "cannot reach Redis", "leave out --redis")

    with RedisServer(password="the-right-one") as server:
        result, seconds = cli("run", "--redis", f"redis://:not-it@127.0.0.1:{server.port}/0", *ANY_PORT)
        assert_one_clear_line(result, seconds, "refused the credentials", "redis://:PASSWORD@HOST:PORT/0")
        assert "not-it" not in result.output  # the password is never printed

        result, seconds = cli("run", "--redis-port", str(server.port), *ANY_PORT)
        assert_one_clear_line(
            result,
            seconds,
            f"port {server.port} is in use",
            f"--redis redis://127.0.0.1:{server.port}/0",
            "another --redis-port",
        )


def test_a_busy_ingest_endpoint_is_named(cli):
    ctx = zmq.Context()
    try:
        busy = ctx.socket(zmq.PULL)
        busy.bind("tcp://127.0.0.1:*")
        endpoint = busy.getsockopt_string(zmq.LAST_ENDPOINT)
        result, seconds = cli("run", "--ingest", endpoint)
        assert_one_clear_line(result, seconds, f"ingest endpoint {endpoint} is in use", "--ingest")
    finally:
        ctx.destroy(linger=0)


def test_cluster_placement_on_one_machine_is_explained_not_waited_for(cli):
    result, seconds = cli("run", "--config", str(DEPLOY_CONFIG))
    assert_one_clear_line(
        result,
        seconds,
        "ingest_resources asks for ingest",
        "embedder_resources asks for embed",
        "leave ingest_resources and embedder_resources out",
    )


def test_debug_adds_the_traceback(cli):
    result, _ = cli("--debug", "run", "--redis", "localhost:6379", *ANY_PORT)
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "Error: 'localhost:6379' is not a Redis URL" in result.stderr


class Run:
    """`bindstream ARGS` as a real process in a session of its own (as a terminal's foreground job), its
    output collected line by line."""

    def __init__(self, *args: str):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [*BINDSTREAM, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, "COLUMNS": "200"},
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(s, lines), daemon=True)
            for s, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def wait_for_line(self, text: str, timeout_s: float) -> str:
        return wait_for(
            lambda: next((line for line in self.out if text in line), None) or self._ended(text),
            timeout_s,
            f"{text!r} from bindstream",
        )

    def _ended(self, text: str) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"bindstream ended before {text!r}:\n{self.output()}")

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground group

    def wait(self, timeout_s: float) -> int:
        code = self.proc.wait(timeout=timeout_s)
        for reader in self._readers:
            reader.join(5)
        return code

    def output(self) -> str:
        return "".join(self.out) + "".join(self.err)

    def assert_nothing_left(self) -> None:
        """No process of its session outlives it (Ray's, redis-server)."""

        def gone():
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return True
            return False

        wait_for(gone, 15, "every process of the run to end")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def bindstream():
    runs: list[Run] = []

    def start(*args: str) -> Run:
        runs.append(Run(*args))
        return runs[-1]

    yield start
    for run in runs:
        run.kill()


def test_ctrl_c_while_it_starts_ends_it_cleanly(bindstream):
    run = bindstream("run", "--no-live", *ANY_PORT)
    run.wait_for_line("starting (Ctrl-C to cancel)", RAY_S)
    time.sleep(1.0)  # Ray is starting now
    run.ctrl_c()
    asked = time.monotonic()
    assert run.wait(RAY_S) == 130, run.output()
    assert time.monotonic() - asked < 20
    assert "stopped (Ctrl-C) before the pipeline was up" in "".join(run.err)
    assert not any(noise in run.output() for noise in RAY_NOISE), run.output()
    run.assert_nothing_left()


def test_placement_this_ray_cannot_hold_is_explained(bindstream):
    run = bindstream("run", "--no-live", "--embedders", "64", *ANY_PORT)
    assert run.wait(RAY_S) == 1, run.output()
    errors = [line for line in run.err if line.startswith(("Error: ", "fix: "))]
    assert errors[0].startswith("Error: this machine's Ray cannot place the actors: embedders asks for CPU 64")
    assert errors[1].startswith("fix: pass --embedders "), run.output()
    assert not any(noise in run.output() for noise in RAY_NOISE), run.output()


def test_an_actor_that_cannot_start_is_named(bindstream):
    run = bindstream("run", "--no-live", "--model", "tiny", "--checkpoint", "/nonexistent/tiny.pth", *ANY_PORT)
    assert run.wait(RAY_S) == 1, run.output()
    assert [line for line in run.err if line.startswith("Error: ")] == [
        "Error: the embed actor failed to start: encoders.weights.CheckpointMissing: checkpoint /nonexistent/tiny.pth "
        "does not exist\n"
    ], run.output()
    assert not any(noise in run.output() for noise in RAY_NOISE), run.output()  # nor Ray's report of the retry
    run.assert_nothing_left()


def table_rows(text: str, first_cells: tuple[str, ...]) -> dict[str, list[str]]:
    """The rows of the rich tables in `text` whose first cell is one of `first_cells`, by that cell."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) > 1 and cells[0] in first_cells:
            rows[cells[0]] = cells[1:]
    return rows


def test_run_pins_its_redis_stops_on_ctrl_c_and_its_summary_adds_up(bindstream):
    redis_port, ingest_port = free_port(), free_port()
    endpoint = f"tcp://127.0.0.1:{ingest_port}"
    run = bindstream("run", "--no-live", "--redis-port", str(redis_port), "--ingest", endpoint)
    run.wait_for_line(
        f"redis: embedded redis-server at redis://127.0.0.1:{redis_port}/0, gone when this command ends", RAY_S
    )
    client = redis.Redis(port=redis_port)
    assert client.ping()

    sent = simulate(endpoint, devices=1, seconds=4, realtime=False).total_sent
    header, payload = next((h, p) for h, p in SimulatedWearable("broken-1", seed=1).messages(1) if h["sensor"] == "imu")
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoint)
    for seq in range(3):  # a payload one byte short: rejected (payload_size), counted under its device
        push.send_multipart([msgpack.packb({**header, "seq": seq}), payload[:-1]])
    push.close(linger=5000)
    wait_for(lambda: len(client.keys("bindstream:emb:{sim-000}:*")) >= 4, RAY_S, "embeddings of every 2 s modality")
    run.ctrl_c()
    assert run.wait(RAY_S) == 0, run.output()
    run.assert_nothing_left()
    assert not port_in_use(redis_port)  # the embedded server went with the run

    out = "".join(run.out)
    assert not any(noise in run.output() for noise in RAY_NOISE), run.output()
    assert out.count("RANDOM weights") == 1
    summary = out[out.index("bindstream: final") :]
    stage = {
        name: (int(cells[1]), cells[2])
        for name, cells in table_rows(summary, ("ingest", "window", "embed", "publish", "match")).items()
    }
    modality = table_rows(summary, ("vision", "audio", "depth", "thermal", "imu", "fused"))
    fused = int(modality["fused"][3])  # columns: windows, gated, embedded (model forwards), published
    published, formed = map(int, re.fullmatch(r"(\d+) \+(\d+) fused", stage["publish"][1]).groups())
    assert stage["ingest"] == (sent, str(sent))  # every message sent arrived and was passed on
    assert stage["window"][0] == sent
    assert stage["embed"][0] == int(stage["window"][1]) == sum(int(modality[m][0]) for m in modality if m != "fused")
    assert stage["publish"][0] == int(stage["embed"][1]) == published
    assert formed == fused >= 2 and modality["fused"][:3] == ["-", "-", "-"]
    assert stage["match"][0] == published + formed
    assert "drops: ingest: rejected_payload_size 3" in summary
    device = table_rows(summary, ("broken-1", "sim-000"))
    assert device == {"broken-1": ["3", "ingest: rejected_payload_size 3"]}, summary
