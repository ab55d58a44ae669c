"""deploy/: the cluster-launcher configs pass Ray's own validator, every shell command in them and in the
Deploy guide parses (`ray ...` with Ray's CLI, `bindstream ...` with ours, the rest with `bash -n`), the
example pipeline config loads and agrees with the clusters' resources, and the pipeline runs as a user
runs it on a real two-node Ray cluster on this machine, with ingest and the embedder on different nodes."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import yaml

from streaming.pipeline import PipelineConfig

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
CLUSTER_FILES = ("cluster.yaml", "cluster.local.yaml")
COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
MODALITIES = {"vision", "audio", "depth", "thermal", "imu", "fused"}


def load_cluster(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


# --------------------------------------------------------------------------------------------------
# a. Ray's validator
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_aws(monkeypatch):
    """Any attempt to reach AWS fails the test: validation must stay offline."""
    try:
        import boto3
    except ImportError:
        return

    def refuse(*args, **kwargs):
        raise AssertionError("the AWS provider was contacted")

    for name in ("client", "resource", "Session"):
        monkeypatch.setattr(boto3, name, refuse)
    monkeypatch.setattr(boto3.session, "Session", refuse)


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_config_passes_rays_validator(name, no_aws):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_cluster(name)
    # What `ray up` does before it talks to the provider: merge the provider's defaults (the local
    # provider also builds its single node type from head_ip / worker_ips), then check the schema.
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    settings = json.dumps(raw)  # every value, comments left out
    assert not re.search(r"RAY_AUTH_MODE\s*=\s*disabled", settings), "token authentication must stay on"
    # the cluster's token travels with the cluster
    assert any(src.endswith(".ray/auth_token") for src in raw["file_mounts"].values())


def test_aws_cluster_shape(no_aws):
    raw = load_cluster("cluster.yaml")
    assert raw["provider"]["type"] == "aws"
    assert raw["docker"]["image"].startswith("rayproject/ray:2.60.0-py311-gpu")
    assert "--env RAY_AUTH_MODE=token" in raw["docker"]["run_options"]
    head = raw["available_node_types"][raw["head_node_type"]]
    (gpu_type,) = [t for n, t in raw["available_node_types"].items() if n != raw["head_node_type"]]
    assert head["resources"].get("ingest", 0) >= 1 and not head["resources"].get("GPU")
    assert gpu_type["resources"]["GPU"] >= 1 and gpu_type["resources"]["embed"] >= 1
    assert 0 <= gpu_type["min_workers"] <= gpu_type["max_workers"] <= raw["max_workers"]
    # the pinned revision is a commit id
    setup = " ".join(raw["setup_commands"])
    assert re.search(r"BINDSTREAM_REVISION=[0-9a-f]{40};", setup) and "@${BINDSTREAM_REVISION}" in setup


def test_local_cluster_has_no_node_types():
    raw = load_cluster("cluster.local.yaml")
    assert raw["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
    assert "available_node_types" not in raw and "head_node_type" not in raw


# --------------------------------------------------------------------------------------------------
# b. Shell commands parse
# --------------------------------------------------------------------------------------------------

SHELL_KEYWORDS = {"{", "}", "!", "exec", "then", "do", "else", "elif", "if", "while", "until", "time"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, as argv lists without leading VAR=value assignments,
    redirections or keywords (good enough for the commands in deploy/: lists joined by ; && || |)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current, skip_next = [], [], False
    for token in lexer:
        if skip_next:
            skip_next = False
            continue
        if token and set(token) <= set("();&|"):
            commands.append(current)
            current = []
        elif token and set(token) <= set("<>&") and set(token) & set("<>"):
            skip_next = True  # a redirection and its target
            if current and current[-1].isdigit():
                current.pop()  # the file descriptor of `2>&1` (deploy/ has no digit argument before a `>`)
        elif not current and (ASSIGNMENT.match(token) or token in SHELL_KEYWORDS):
            continue
        elif token == "}":
            continue
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def parse_click(command: click.Command, args: list[str], name: str, parent=None) -> click.Context:
    """Parse `args` like the CLI would, down to the leaf command, without running anything."""
    ctx = command.make_context(name, list(args), parent=parent)
    if isinstance(command, click.Group):
        protected = getattr(ctx, "_protected_args", None)
        if protected is None:
            protected = ctx.protected_args
        sub_name, sub, rest = command.resolve_command(ctx, [*protected, *ctx.args])
        return parse_click(sub, rest, sub_name, ctx)
    return ctx


def bash_syntax_ok(script: str) -> None:
    result = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, f"bash -n failed for {script!r}: {result.stderr}"


def check_shell(script: str, seen: dict[str, list]) -> None:
    """bash -n the script; parse each `ray ...` with Ray's CLI and each `bindstream ...` with ours
    (recursing into `bash -c` and into the entrypoint of `ray job submit`). Records parsed contexts."""
    from ray.scripts.scripts import cli as ray_cli

    from streaming.cli import main as bindstream_main

    bash_syntax_ok(script)
    for argv in simple_commands(script):
        if argv[0] == "ray":
            ctx = parse_click(ray_cli, argv[1:], "ray")
            seen["ray"].append((argv, ctx))
            if ctx.command.name == "submit":
                entrypoint = list(ctx.params["entrypoint"])
                if entrypoint[:2] in (["bash", "-c"], ["sh", "-c"]):
                    check_shell(entrypoint[2], seen)
                else:
                    check_shell(shlex.join(entrypoint), seen)
        elif argv[0] == "bindstream":
            seen["bindstream"].append((argv, parse_click(bindstream_main, argv[1:], "bindstream")))
        elif argv[:2] in (["bash", "-c"], ["sh", "-c"]):
            check_shell(argv[2], seen)


def yaml_commands(raw: dict) -> list[tuple[str, str]]:
    out = [(key, cmd) for key in COMMAND_KEYS for cmd in raw.get(key, [])]
    for type_name, node_type in raw.get("available_node_types", {}).items():
        for key in ("initialization_commands", "worker_setup_commands"):
            out += [(f"{type_name}.{key}", cmd) for cmd in node_type.get(key, [])]
    return out


def comment_commands(text: str) -> list[str]:
    """Commands shown in a YAML file's comments: lines `#   [VAR=value ...] ray|bindstream ...`, continued
    with a trailing backslash."""
    out, pending = [], ""
    for line in text.splitlines():
        match = re.match(r"^#\s+(\S.*)$" if pending else r"^#   (\S.*)$", line)
        if not match:
            continue
        if not pending and not re.match(r"^(?:[A-Z_]+=\S+\s+)*(?:ray|bindstream)\s", match.group(1)):
            continue
        pending += match.group(1).strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        out.append(pending.split("  #")[0].strip())
        pending = ""
    return out


def readme_blocks(kind: tuple[str, ...]) -> list[str]:
    text = (DEPLOY / "README.md").read_text()
    return [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S) if lang in kind]


def start_resources(ctx: click.Context) -> dict:
    return json.loads(ctx.params["resources"] or "{}")


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_commands_parse(name, monkeypatch):
    monkeypatch.chdir(DEPLOY)  # `--config bindstream.toml` is resolved in the job's working dir, deploy/
    raw = load_cluster(name)
    seen = {"ray": [], "bindstream": []}
    starts = []  # (list the command is in, parsed `ray start`)
    for key, command in yaml_commands(raw):
        before = len(seen["ray"])
        check_shell(command, seen)
        starts += [(key, ctx) for _, ctx in seen["ray"][before:] if ctx.command.name == "start"]
    head = [ctx for key, ctx in starts if ctx.params["head"] and key == "head_start_ray_commands"]
    workers = [ctx for key, ctx in starts if not ctx.params["head"] and key == "worker_start_ray_commands"]
    assert len(head) == 1 and len(workers) == 1 and len(starts) == 2, starts
    # the roles: ingest on the head (devices reach it), embed on the GPU workers
    assert start_resources(head[0]).get("ingest", 0) >= 1 and "embed" not in start_resources(head[0])
    assert start_resources(workers[0]).get("embed", 0) >= 1
    assert workers[0].params["address"] == "$RAY_HEAD_IP:6379" and head[0].params["port"] == 6379
    # the dashboard and its job API are not exposed beyond the node
    assert head[0].params["dashboard_host"] == "127.0.0.1"
    if raw["provider"]["type"] != "local":
        node_types = raw["available_node_types"]
        assert start_resources(head[0]).items() <= node_types[raw["head_node_type"]]["resources"].items()
        for type_name, node_type in node_types.items():
            if type_name != raw["head_node_type"]:
                assert start_resources(workers[0]).items() <= node_type["resources"].items()
    # the commands shown in the file's comments (how to submit the job) parse too
    for command in comment_commands((DEPLOY / name).read_text()):
        check_shell(command, seen)
    if name == "cluster.yaml":
        runs = [ctx for argv, ctx in seen["bindstream"] if ctx.command.name == "run"]
        assert runs and all(ctx.params["config_file"] == "bindstream.toml" for ctx in runs)
        submits = [ctx for _, ctx in seen["ray"] if ctx.command.name == "submit"]
        assert submits
        for ctx in submits:
            assert_job_submit_drains(ctx)


def assert_job_submit_drains(ctx: click.Context) -> None:
    """The job ships deploy/ (bindstream.toml) and is stopped with SIGINT, which `bindstream run` answers
    by draining (Ray's default SIGTERM ends the driver without draining), with time to drain."""
    assert ctx.params["working_dir"] == "deploy"
    env_vars = json.loads(ctx.params["runtime_env_json"] or "{}").get("env_vars", {})
    assert env_vars.get("RAY_JOB_STOP_SIGNAL") == "SIGINT", env_vars
    assert int(env_vars.get("RAY_JOB_STOP_WAIT_TIME_S", 3)) >= 30, env_vars


def test_readme_commands_parse(monkeypatch):
    monkeypatch.chdir(DEPLOY)
    seen = {"ray": [], "bindstream": []}
    blocks = readme_blocks(("bash", "sh", "console"))
    assert blocks
    for block in blocks:
        bash_syntax_ok(block)
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                check_shell(line, seen)
    commands = {ctx.command.name for _, ctx in seen["ray"]} | {ctx.command.name for _, ctx in seen["bindstream"]}
    assert {"up", "down", "submit", "run", "tail", "simulate"} <= commands, commands
    submits = [ctx for _, ctx in seen["ray"] if ctx.command.name == "submit"]
    for ctx in submits:
        assert_job_submit_drains(ctx)
    for block in readme_blocks(("python",)):
        compile(block, "deploy/README.md", "exec")


# --------------------------------------------------------------------------------------------------
# c. The example pipeline config
# --------------------------------------------------------------------------------------------------


def test_example_pipeline_config_loads():
    config = PipelineConfig.from_toml(DEPLOY / "bindstream.toml")
    data = tomllib.loads((DEPLOY / "bindstream.toml").read_text())
    assert set(data) - {"windowing", "limits"} <= {f for f in PipelineConfig.__dataclass_fields__}
    assert config.ingest and all(e.startswith("tcp://") for e in config.ingest)
    assert len({e.rsplit(":", 1)[1] for e in config.ingest}) == len(config.ingest), "one port per endpoint"
    assert config.model == "imagebind_huge" and config.embedder_gpus == 1 and config.embedders >= 1
    assert config.redis is None  # its password does not belong in a committed file
    # what the pipeline asks for is what the clusters offer
    for name in CLUSTER_FILES:
        raw = load_cluster(name)
        text = " ".join(raw["head_start_ray_commands"])
        worker_text = " ".join(raw["worker_start_ray_commands"])
        for key in config.ingest_resources:
            assert f'"{key}"' in text, (name, key)
        for key in config.embedder_resources:
            assert f'"{key}"' in worker_text, (name, key)
    aws = load_cluster("cluster.yaml")
    gpu_slots = max(
        t["resources"].get("embed", 0) * t.get("max_workers", 0) for t in aws["available_node_types"].values()
    )
    assert config.embedders <= gpu_slots, "more embedders than the cluster can ever place"


# --------------------------------------------------------------------------------------------------
# d. Two Ray nodes on this machine, the pipeline run as a user runs it
# --------------------------------------------------------------------------------------------------

START_TIMEOUT_S = 60
RUN_READY_TIMEOUT_S = 90
EMBED_TIMEOUT_S = 90
DRAIN_TIMEOUT_S = 60
SIM_SECONDS = 8  # enough for a complete 5 s IMU window whatever the stream's phase on the 2.5 s grid


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports: every socket stays bound until all are chosen, so none comes back twice."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}:\n{tail(log)}")
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}:\n{tail(log)}")


def tail(path: Path | None, n: int = 4000) -> str:
    if path is None or not path.exists():
        return ""
    return path.read_text(errors="replace")[-n:]


class RayNodes:
    """`ray start --block` processes, each in its own session: stopping them stops only this test's Ray
    (never `ray stop`, which would stop every Ray on the machine)."""

    def __init__(self, root: Path, env: dict, ports: Iterator[int]):
        self.root, self.env, self.ports = root, env, ports
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    PORT_OPTIONS = (
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--metrics-export-port",
        "--runtime-env-agent-port",
    )
    ATTEMPTS = 2

    def start(self, name: str, args: list[str]) -> Path:
        """Start a node, its ports the next of `ports`; once more if Ray's own registration with the GCS timed
        out (seen on a loaded 2-core machine: `ray start` gives up after 30 s)."""
        for attempt in range(1, self.ATTEMPTS + 1):
            log = self.root / f"{name}-{attempt}.log"
            ports = {option: next(self.ports) for option in self.PORT_OPTIONS}
            cmd = [
                shutil.which("ray"),
                "start",
                "--block",
                "--disable-usage-stats",
                "--num-gpus=0",
                "--object-store-memory=100000000",
                *args,
                *(f"{k}={v}" for k, v in ports.items()),
            ]
            with open(log, "wb") as out:
                self.procs.append(
                    subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                )
            self.logs.append(log)
            try:
                wait_for(
                    lambda log=log: "Ray runtime started" in tail(log, 100_000),
                    START_TIMEOUT_S,
                    f"ray node {name}",
                    self.procs[-1],
                    log,
                )
                return log
            except AssertionError:
                if attempt == self.ATTEMPTS or "timed out during startup" not in tail(log, 100_000):
                    raise

    def stop(self) -> None:
        for proc in reversed(self.procs):  # workers first, the head last
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Ray's worker processes start their own process groups: end any left over, found by this test's
        # unique temp dir in their command line.
        import psutil

        time.sleep(1)
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(str(self.root) in part for part in p.info["cmdline"] or ()):
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass


QUERY_ACTORS = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
from ray._private import state
nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
actors = [{"class": a["ActorClassName"], "node": a["Address"]["NodeID"], "state": a["State"]}
          for a in state.actors().values()]
print("ACTORS " + json.dumps({"nodes": nodes, "actors": actors}))
"""


@pytest.mark.timeout(240)
def test_pipeline_on_two_ray_nodes(tmp_path):
    import redis

    from sensors.simulator import simulate
    from streaming.redis_server import RedisServer
    from streaming.subscriber import read_all

    if not shutil.which("ray") or not shutil.which("bindstream"):
        pytest.skip("the `ray` and `bindstream` commands must be on PATH")
    began = time.monotonic()
    # A short root (Unix socket paths are limited to ~107 bytes) only this test uses: the nodes' sessions,
    # ray_current_cluster (so /tmp/ray's record is never touched) and a token of this cluster's own.
    root = Path(tempfile.mkdtemp(prefix="bsdeploy-", dir="/tmp"))
    token = root / "auth_token"
    token.write_text(uuid.uuid4().hex)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), PYTHONUNBUFFERED="1")
    # every port this test names, taken in one go (each socket held until all are chosen): none comes back twice
    gcs_port, ingest_port, client_port, *node_ports = free_ports(3 + 2 * RayNodes.ATTEMPTS * len(RayNodes.PORT_OPTIONS))
    nodes = RayNodes(root, env, iter(node_ports))
    run = None
    run_log = tmp_path / "run.log"
    try:
        with RedisServer(password="s3cret-" + uuid.uuid4().hex[:8]) as server:
            nodes.start(
                "head",
                [
                    "--head",
                    f"--port={gcs_port}",
                    "--node-ip-address=127.0.0.1",
                    "--num-cpus=1",
                    '--resources={"ingest": 1}',
                    "--include-dashboard=false",
                    f"--ray-client-server-port={client_port}",
                    f"--temp-dir={root}",
                ],
            )
            # written by the head after it says it started (a slow machine showed the gap): waited for, then read
            address = wait_for(
                lambda: (root / "ray_current_cluster").is_file() and (root / "ray_current_cluster").read_text().strip(),
                START_TIMEOUT_S,
                "the head's ray_current_cluster file",
                nodes.procs[-1],
                nodes.logs[-1],
            )
            nodes.start(
                "worker",
                [f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=2", '--resources={"embed": 1}'],
            )
            config = tmp_path / "bindstream.toml"
            config.write_text(
                f'ingest = ["tcp://127.0.0.1:{ingest_port}"]\n'
                f'redis = "{server.url}"\n'
                'model = "tiny"\nembedders = 1\nwindowers = 1\nmax_wait_ms = 20.0\ntorch_threads = 1\n'
                "fused_wait_s = 2.0\n"
                "ingest_resources = { ingest = 0.01 }\nembedder_resources = { embed = 1 }\n"
            )
            with open(run_log, "wb") as out:
                run = subprocess.Popen(
                    [shutil.which("bindstream"), "run", "--config", str(config), "--no-live"],
                    env={**env, "RAY_ADDRESS": address},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            wait_for(
                lambda: f"ingest: tcp://127.0.0.1:{ingest_port}" in tail(run_log, 100_000),
                RUN_READY_TIMEOUT_S,
                "`bindstream run` to bind its ingest endpoint",
                run,
                run_log,
            )

            sent = {}
            sim = threading.Thread(
                target=lambda: sent.update(
                    stats=simulate(f"tcp://127.0.0.1:{ingest_port}", devices=1, seconds=SIM_SECONDS, realtime=False)
                ),
                daemon=True,
            )
            sim.start()
            sim.join(60)
            assert not sim.is_alive(), "the simulated wearable could not deliver its messages"
            assert sent["stats"].total_sent > 0

            client = redis.Redis.from_url(server.url)
            modalities = lambda: {r.modality for r in read_all(client, "sim-000")}  # noqa: E731
            wait_for(
                lambda: modalities() >= MODALITIES - {"fused"},
                EMBED_TIMEOUT_S,
                "embeddings of every modality in Redis",
                run,
                run_log,
            )

            # where the actors run, asked of the cluster while the job is live
            query = subprocess.run(
                [sys.executable, "-c", QUERY_ACTORS, address], env=env, capture_output=True, text=True, timeout=60
            )
            line = [x for x in query.stdout.splitlines() if x.startswith("ACTORS ")]
            assert line, query.stdout + query.stderr
            placement = json.loads(line[0][len("ACTORS ") :])

            run.send_signal(signal.SIGINT)
            assert run.wait(timeout=DRAIN_TIMEOUT_S) == 0, tail(run_log)
            output = tail(run_log, 100_000)
            assert "draining" in output and "drops: none" in output, output

            records = read_all(client, "sim-000")
            assert {r.modality for r in records} == MODALITIES, output
            assert all(r.model == "tiny" for r in records)
    finally:
        if run is not None and run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(timeout=10)
        nodes.stop()
        shutil.rmtree(root, ignore_errors=True)

    alive = [a for a in placement["actors"] if a["state"] == "ALIVE"]
    by_class = {}
    for actor in alive:
        by_class.setdefault(actor["class"], set()).add(actor["node"])
    (ingest_node,) = by_class["Ingest"]
    (embed_node,) = by_class["Embedder"]
    assert ingest_node != embed_node, placement
    assert placement["nodes"][ingest_node].get("ingest") == 1
    assert placement["nodes"][embed_node].get("embed") == 1
    assert len(placement["nodes"]) == 2
    assert (
        not Path("/tmp/ray/ray_current_cluster").exists()
        or Path("/tmp/ray/ray_current_cluster").read_text().strip() != address
    )
    assert time.monotonic() - began < 180
