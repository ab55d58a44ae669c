"""The first hour of a new user (issue 11), end to end: `tail`, `embed`, `alert list/rm/tune`, `search`,
`timeline`, `bench encoders` and `device record` as a user runs them, against real redis-server processes;
every mistake gives one clear line, a non-zero exit and no traceback."""

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import redis
import soundfile
import zmq
from click.testing import CliRunner

from streaming.alerts.queries import save_background, save_query
from streaming.alerts.records import Background, Query
from streaming.cli import main
from streaming.cli.terminal import console
from streaming.records import Embedding
from streaming.redis_layout import QUERY_SET, encode_embedding, register_streams, stream_key
from streaming.redis_server import RedisServer, free_port

from .conftest import ASSETS, shared_file, wait_for

BINDSTREAM = [sys.executable, "-c", "from streaming.cli import main; main()"]
ROOT = Path(__file__).resolve().parents[1]
DIM = 64  # tiny's joint space
SECOND = 1_000_000_000
TIMEOUT_S = 60


def run(*args, timeout=TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([*BINDSTREAM, *args], capture_output=True, text=True, timeout=timeout)


def cli(*args):
    return CliRunner().invoke(main, list(args))


def one_error_line(result) -> str:
    """The single line a failed command printed (CompletedProcess or click Result), after checking it."""
    code = result.returncode if hasattr(result, "returncode") else result.exit_code
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def unit(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i] = 1
    return v


def write(client, device: str, n: int, modality: str = "audio") -> list[str]:
    """XADD `n` windows 2 s apart to the device's stream, each in a millisecond of its own (stream ids order
    entries across streams by the ms only); returns the entry ids."""
    ids = []
    for i in range(n):
        e = Embedding(device, modality, 2 * i * SECOND, 2 * (i + 1) * SECOND, unit(i % DIM), "tiny", 0, 0)
        ids.append(client.xadd(stream_key(device, modality), encode_embedding(e)).decode())
        time.sleep(0.002)
    register_streams(client, [stream_key(device, modality)])  # as the publisher does: matchers find it there
    return ids


class Lines:
    """The lines a process writes to one of its pipes, collected by a thread."""

    def __init__(self, pipe):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(pipe), daemon=True)
        self.thread.start()

    def wait(self, text: str) -> str:
        return wait_for(lambda: next((line for line in self.lines if text in line), None), TIMEOUT_S, repr(text))

    def all(self) -> list[str]:
        """Every line, once the process has closed the pipe."""
        self.thread.join(TIMEOUT_S)
        return self.lines


# ----- tail ---------------------------------------------------------------------------------------------


def test_tail_since_start_prints_the_history_in_order_and_exits_after_count(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    tag = uuid.uuid4().hex[:8]
    write(client, f"{tag}-a", 2)
    write(client, f"{tag}-b", 2)
    write(client, f"{tag}-a", 1, "vision")  # another modality: filtered out
    write(client, f"{tag}x-a", 1)  # outside the glob
    done = run(
        "tail",
        "--redis",
        redis_server.url,
        "--device",
        f"{tag}-*",
        "--modality",
        "audio",
        "--since",
        "start",
        "--count",
        "3",
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[:3] for line in lines] == [
        [f"{tag}-a", "audio", "t0=0"],
        [f"{tag}-a", "audio", "t0=2000000000"],
        [f"{tag}-b", "audio", "t0=0"],
    ], lines
    assert "waiting" not in done.stderr


def test_tail_waits_then_prints_the_first_window_of_a_device_that_appears_later(redis_server):
    tag = uuid.uuid4().hex[:8]
    proc = subprocess.Popen(
        [*BINDSTREAM, "tail", "--redis", redis_server.url, "--device", f"{tag}-*", "--count", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        err = Lines(proc.stderr)
        assert (
            err.wait("waiting for records of")
            == f"waiting for records of {tag}-*/* at {redis_server.url} (Ctrl-C to stop)\n"
        )
        write(redis.Redis.from_url(redis_server.url), f"{tag}-new", 3)  # a device that appears after the start
        proc.wait(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    out = proc.stdout.read()
    assert proc.returncode == 0 and out.split()[:3] == [f"{tag}-new", "audio", "t0=0"], (out, err.all())


def test_tail_ctrl_c_exits_quietly(redis_server):
    proc = subprocess.Popen(
        [*BINDSTREAM, "tail", "--redis", redis_server.url, "--device", uuid.uuid4().hex],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        err = Lines(proc.stderr)
        err.wait("Ctrl-C to stop")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == 0 and len(err.all()) == 1, err.lines  # the waiting line only


def test_tail_without_redis_says_so_in_one_line(server):
    done = run("tail", "--redis", f"redis://127.0.0.1:{free_port()}/0")
    assert "cannot reach Redis at redis://127.0.0.1:" in one_error_line(done)
    with RedisServer(password="right") as locked:
        line = one_error_line(cli("tail", "--redis", locked.url.replace(":right@", ":s3cr3t@")))
        assert "refused the credentials" in line and "s3cr3t" not in line and "***" in line  # never the password
        assert "refused" in one_error_line(cli("tail", "--redis", locked.url.replace(":right@", "")))
    assert "is not a Redis URL: it needs a scheme" in one_error_line(cli("tail", "--redis", "localhost:6379"))
    result = cli("tail", "--redis", server.url, "--since", "yesterday")
    assert result.exit_code == 2 and "--since" in result.stderr and "start" in result.stderr


# ----- embed --------------------------------------------------------------------------------------------


def test_embed_unknown_extension_and_undecodable_file_give_one_line(tmp_path):
    odd = tmp_path / "notes.txt"
    odd.write_text("hello")
    line = one_error_line(cli("embed", str(odd)))
    assert "notes.txt" in line and "--modality" in line and "modality=" not in line and ".wav" in line
    fake = tmp_path / "dog.wav"
    shutil.copy(shared_file(ASSETS / "dog_image.jpg"), fake)
    line = one_error_line(run("embed", str(fake), "--model", "tiny"))
    assert "dog.wav" in line and "audio" in line and "LibsndfileError" not in line


def test_embed_says_random_weights_once(tmp_path):
    done = run("embed", str(shared_file(ASSETS / "dog_image.jpg")), "--model", "tiny")
    assert done.returncode == 0, done.stderr
    assert (done.stdout + done.stderr).count("RANDOM weights") == 1


# ----- alerts -------------------------------------------------------------------------------------------


def add_queries(client) -> None:
    """Three audio queries of the tiny model, with their background."""
    save_background(
        client,
        Background("tiny", "audio", tuple(f"b{i}" for i in range(1, 9)), np.stack([unit(i) for i in range(1, 9)])),
    )
    for query_id, text in (("aa11aa11", "a dog barking"), ("aa22aa22", "a car horn"), ("bb33bb33", "a baby crying")):
        save_query(client, Query(text, "audio", unit(0), "tiny", id=query_id))


def ids(client) -> set[str]:
    return {x.decode() for x in client.smembers(QUERY_SET)}


def test_alert_rm_takes_a_unique_id_prefix_or_the_text(server):
    client = redis.Redis.from_url(server.url)
    add_queries(client)
    listed = json.loads(cli("alert", "list", "--json", "--redis", server.url).stdout)
    assert {q["id"]: q["text"] for q in listed} == {
        "aa11aa11": "a dog barking",
        "aa22aa22": "a car horn",
        "bb33bb33": "a baby crying",
    }
    assert listed[0]["threshold"] == 0.5 and listed[0]["modality"] == "audio"
    line = one_error_line(cli("alert", "rm", "aa", "--redis", server.url))
    assert "aa11aa11 ('a dog barking')" in line and "aa22aa22 ('a car horn')" in line and len(ids(client)) == 3
    assert "no query 'zz'" in one_error_line(cli("alert", "rm", "zz", "--redis", server.url))
    result = cli("alert", "rm", "aa1", "a baby crying", "--redis", server.url)
    assert result.exit_code == 0 and "removed query aa11aa11" in result.stdout, result.output
    assert ids(client) == {"aa22aa22"}


def test_alert_list_keeps_full_ids_in_a_narrow_table(server, monkeypatch):
    monkeypatch.setattr(console, "width", 60)
    source = "example:/home/someone/clips/a/long/path/clip.wav"
    save_query(
        redis.Redis.from_url(server.url),
        Query(
            "a very long query text " * 4,
            "audio",
            unit(0),
            "tiny",
            device="glasses-kitchen-*",
            source=source,
            id="cd44cd44",
        ),
    )
    out = cli("alert", "list", "--redis", server.url).stdout
    rows = [line.split("│") for line in out.splitlines() if line.startswith("│")]
    assert max(len(line) for line in out.splitlines()) <= 60 and "…" not in out
    assert rows[0][1].strip() == "cd44cd44" and "".join(r[6].strip() for r in rows) == source, out


def test_search_json_parses(server):
    client = redis.Redis.from_url(server.url)
    ids_written = write(client, "dev", 3)
    result = cli("search", "a dog", "--modality", "audio", "--model", "tiny", "--json", "--redis", server.url)
    hits = json.loads(result.stdout)
    assert [h["rank"] for h in hits] == [1, 2, 3] and {h["id"] for h in hits} == set(ids_written)
    assert hits[0]["device"] == "dev" and hits[0]["stream"] == stream_key("dev", "audio")


def test_alert_tune_dry_run_says_what_it_would_set(server, tmp_path):
    client = redis.Redis.from_url(server.url)
    assert cli("alert", "add", "a tone", "--modality", "audio", "--model", "tiny", "--redis", server.url).exit_code == 0
    t = np.arange(32000) / 16000
    for label, make in (
        ("pos", lambda i: 0.5 * np.sin(2 * np.pi * (300 + 100 * i) * t)),
        ("neg", lambda i: 0.1 * np.random.default_rng(i).standard_normal(len(t))),
    ):
        (tmp_path / label).mkdir()
        for i in range(2):
            soundfile.write(tmp_path / label / f"{i}.wav", make(i).astype(np.float32), 16000)
    (query_id,) = ids(client)
    before = client.hget(f"bindstream:query:{query_id}", "threshold")
    result = cli(
        "alert",
        "tune",
        query_id[:3],
        "--positive",
        str(tmp_path / "pos"),
        "--negative",
        str(tmp_path / "neg"),
        "--holdout",
        "0",
        "--dry-run",
        "--redis",
        server.url,
    )
    assert result.exit_code == 0, result.output
    assert "would set" in result.stdout and "set to" not in result.stdout.replace("would set to", "")
    assert client.hget(f"bindstream:query:{query_id}", "threshold") == before


def test_timeline_of_an_unknown_device_says_so(server, tmp_path):
    client = redis.Redis.from_url(server.url)
    add_queries(client)
    write(client, "glasses-1", 2)
    page = tmp_path / "t.html"
    line = one_error_line(cli("timeline", "--device", "glases-1", "-o", str(page), "--redis", server.url))
    assert "no device 'glases-1'" in line and "glasses-1" in line and not page.exists()
    assert cli("timeline", "--device", "glasses-1", "-o", str(page), "--redis", server.url).exit_code == 0
    assert page.read_text().count("<svg") == 3


# ----- bench encoders, device record, ALERTS.md -----------------------------------------------------------


def test_bench_encoders_shows_defaults_notice_and_one_line_errors():
    help_text = " ".join(cli("bench", "encoders", "--help").stdout.split())
    for default in (
        "[default: tiny]",
        "[default: float32]",
        "[default: 1,8,32]",
        "[default: 1.0;",
        "[default: vision,text,audio,depth,thermal,imu]",
    ):
        assert default in help_text, help_text
    result = cli("bench", "encoders", "--modalities", "text", "--batch", "1,2", "--min-seconds", "0")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("RANDOM weights") == 1
    assert re.search(r"text\s*│\s*1\s*│", result.stdout) and re.search(r"text\s*│\s*2\s*│", result.stdout)
    assert "'smell'" in cli("bench", "encoders", "--modalities", "text,smell").stderr
    assert "positive integers" in cli("bench", "encoders", "--batch", "0").stderr


def test_device_record_binds_loopback_by_default_and_says_when_the_port_is_taken(tmp_path):
    assert "[default: tcp://127.0.0.1:5555]" in " ".join(cli("device", "record", "--help").stdout.split())
    taken = zmq.Context.instance().socket(zmq.PULL)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        line = one_error_line(
            cli("device", "record", str(tmp_path / "rec"), "--bind", f"tcp://127.0.0.1:{port}", "--seconds", "0.1")
        )
    finally:
        taken.close(linger=0)
    assert f"cannot bind tcp://127.0.0.1:{port}" in line


def test_alerts_md_synopsis_names_existing_commands_and_options():
    text = (ROOT / "ALERTS.md").read_text()
    synopsis = re.search(r"```\n(bindstream .*?)```", text, flags=re.S)[1]
    commands = [
        part.strip()
        for line in synopsis.replace("\n  ", " ").splitlines()
        for part in re.split(r" \| (?=[a-z])", line.removeprefix("bindstream "))
    ]
    assert len(commands) >= 9, commands
    for shown in commands:
        command, words = main, shown.split()
        while words and hasattr(command, "commands") and words[0] in command.commands:
            command = command.commands[words.pop(0)]
        assert not hasattr(command, "commands"), f"ALERTS.md shows `{shown}`: no such command"
        known = {opt for p in command.params for opt in p.opts + p.secondary_opts}
        shown_options = set(re.findall(r"(?<![\w-])--?[a-z][\w-]*", shown))
        assert shown_options <= known, f"ALERTS.md shows `{shown}`: no {shown_options - known}"
    assert "bench_alerts" not in text
