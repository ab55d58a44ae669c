"""Command line for a wearable host: `python -m sensors COMMAND --help`."""

from __future__ import annotations

import socket

import click
import zmq

from .arrays import DEFAULT_IMU_CHUNK_S, ImuRecording, load_frames, publish_frames, publish_imu
from .camera import DEFAULT_JPEG_QUALITY, publish_camera
from .mic import publish_microphone
from .protocol import DEFAULT_ENDPOINT, DEPTH, THERMAL
from .publisher import DEFAULT_SNDHWM, DevicePublisher
from .recorder import MIB, SUFFIX, Recorder, RecordingSettings, Replay
from .sampling import DEFAULT_SAMPLING
from .simulator import DEFAULT_PROFILE, PROFILES, simulate

endpoint_option = click.option(
    "--endpoint", default=DEFAULT_ENDPOINT, show_default=True, help="Ingest endpoint to connect to."
)
device_option = click.option(
    "--device", default="wearable-01", show_default=True, help="Device id sent in every header."
)
hwm_option = click.option(
    "--sndhwm", default=DEFAULT_SNDHWM, show_default=True, help="Messages queued before dropping."
)


def _report(publisher: DevicePublisher) -> None:
    click.echo(f"sent {dict(publisher.sent)} dropped {dict(publisher.dropped)} ({publisher.bytes_sent} bytes)")


def _warn_if_nothing_listens(endpoint: str) -> None:
    """One line on stderr when no ingest answers at a tcp `endpoint`: ZeroMQ would queue silently."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    if not endpoint.startswith("tcp://") or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]").replace("*", "127.0.0.1"), int(port)), timeout=1).close()
    except OSError:
        click.echo(
            f"warning: nothing listens at {endpoint} (is `bindstream run` running?); messages wait in each "
            "device's send queue and are dropped when it is full",
            err=True,
        )


@click.group()
def main() -> None:
    """Publish wearable sensor streams to a bindstream ingest endpoint (wire protocol v1)."""


@main.command("simulate")
@endpoint_option
@click.option("--devices", default=1, show_default=True)
@click.option("--seconds", default=10.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--realtime/--fast",
    default=True,
    show_default=True,
    help="Pace to the wall clock, or send as fast as possible without dropping.",
)
@click.option(
    "--profile",
    type=click.Choice(list(PROFILES)),
    default=DEFAULT_PROFILE,
    show_default=True,
    help="What the wearables do: steady (everything moves and sounds all the time) or day (quiet stretches, events).",
)
@click.option(
    "--all-frames",
    is_flag=True,
    help="Send every frame's pixels. By default the wearables leave out the frames the server's default windows "
    "do not use (PROTOCOL.md section 5): 0.8 instead of 19.7 MB/s each, the same windows while frames keep "
    "coming. Use it against a server whose [windowing] differs from the default.",
)
def simulate_command(
    endpoint: str, devices: int, seconds: float, seed: int, realtime: bool, profile: str, all_frames: bool
) -> None:
    """Run simulated wearables sim-000, sim-001, ..."""
    _warn_if_nothing_listens(endpoint)
    stats = simulate(
        endpoint,
        devices=devices,
        seconds=seconds,
        seed=seed,
        realtime=realtime,
        profile=PROFILES[profile],
        sampling=None if all_frames else DEFAULT_SAMPLING,
    )
    dropped = sum(n for sensors in stats.dropped.values() for n in sensors.values())
    megabytes = stats.bytes_sent / 1e6
    click.echo(
        f"sent {stats.total_sent} messages ({megabytes:.1f} MB) in {stats.wall_s:.1f} s; "
        f"dropped {dropped} (device send queues full)"
    )


@main.command("camera")
@click.argument("source")
@endpoint_option
@device_option
@hwm_option
@click.option("--quality", default=DEFAULT_JPEG_QUALITY, show_default=True, help="JPEG quality.")
@click.option("--max-frames", type=int, default=None)
def camera_command(source: str, endpoint: str, device: str, sndhwm: int, quality: int, max_frames: int | None) -> None:
    """Send a camera (index), video file or stream URL as JPEG frames."""
    with DevicePublisher(endpoint, device, sndhwm=sndhwm) as publisher:
        publish_camera(publisher, source, quality=quality, max_frames=max_frames)
        _report(publisher)


@main.command("mic")
@endpoint_option
@device_option
@hwm_option
@click.option("--rate", default=48_000, show_default=True)
@click.option("--channels", default=1, show_default=True)
@click.option("--seconds", type=float, default=None, help="Stop after this long (default: Ctrl-C).")
def mic_command(endpoint: str, device: str, sndhwm: int, rate: int, channels: int, seconds: float | None) -> None:
    """Send the default microphone in 100 ms int16 chunks (needs bindstream[mic])."""
    with DevicePublisher(endpoint, device, sndhwm=sndhwm) as publisher:
        publish_microphone(publisher, rate=rate, channels=channels, seconds=seconds)
        _report(publisher)


@main.command("frames")
@click.argument("sensor", type=click.Choice([DEPTH, THERMAL]))
@click.argument("path", type=click.Path(exists=True))
@click.option("--fps", type=float, required=True)
@endpoint_option
@device_option
@hwm_option
def frames_command(sensor: str, path: str, fps: float, endpoint: str, device: str, sndhwm: int) -> None:
    """Send depth or thermal frames from a .npy stack, an image directory or one image."""
    with DevicePublisher(endpoint, device, sndhwm=sndhwm) as publisher:
        publish_frames(publisher, sensor, load_frames(path), fps)
        _report(publisher)


@main.command("imu-csv")
@click.argument("path", type=click.Path(exists=True))
@endpoint_option
@device_option
@hwm_option
@click.option("--chunk-ms", default=round(DEFAULT_IMU_CHUNK_S * 1000), show_default=True)
def imu_csv_command(path: str, endpoint: str, device: str, sndhwm: int, chunk_ms: int) -> None:
    """Send an IMU CSV (t seconds, ax, ay, az, gx, gy, gz) at its own rate."""
    with DevicePublisher(endpoint, device, sndhwm=sndhwm) as publisher:
        publish_imu(publisher, ImuRecording.from_csv(path), chunk_s=chunk_ms / 1000)
        _report(publisher)


@main.command("record")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option(
    "--bind",
    "bind",
    default=DEFAULT_ENDPOINT,
    show_default=True,
    help="Endpoint to bind a PULL socket on (this machine only; tcp://0.0.0.0:5555 for every interface).",
)
@click.option("--seconds", type=float, default=None, help="Stop after this long (default: Ctrl-C or --count).")
@click.option("--count", type=int, default=None, help="Stop after this many messages.")
@click.option(
    "--max-total-mb",
    type=click.FloatRange(min=1),
    default=RecordingSettings.max_total_bytes / MIB,
    show_default=True,
    help="Disk the recordings in FOLDER may use; the oldest files are deleted first.",
)
def record_command(folder: str, bind: str, seconds: float | None, count: int | None, max_total_mb: float) -> None:
    """Record the valid messages that arrive into rotating MCAP files in FOLDER (PROTOCOL.md, "Recordings")."""
    socket: zmq.Socket = zmq.Context.instance().socket(zmq.PULL)
    try:
        socket.bind(bind)
    except zmq.ZMQError as err:
        socket.close()
        raise click.ClickException(f"cannot bind {bind}: {err}") from None
    total = int(max_total_mb * MIB)  # files of a quarter of it at most: the budget keeps a few besides the newest
    settings = RecordingSettings(
        max_total_bytes=total, max_file_bytes=min(RecordingSettings.max_file_bytes, total // 4)
    )
    recorder = Recorder(folder, settings, tag="device-record", source=f"bindstream device record {bind}")
    try:
        recorder.record(socket, seconds=seconds, count=count)
    except KeyboardInterrupt:
        pass  # Ctrl-C ends the recording; what was queued is still written
    finally:
        recorder.close()
        socket.close()
    left_out = {event: n for event, n in recorder.counts.items() if event.startswith(("rejected_", "dropped_"))}
    click.echo(
        f"recorded {recorder.counts['recorded']} messages in {folder}" + (f"; left out: {left_out}" if left_out else "")
    )


@main.command("replay")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@endpoint_option
@click.option(
    "--speed",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Playback speed, paced by the receive times (2: twice as fast).",
)
@click.option(
    "--as-fast-as-possible",
    "fastest",
    is_flag=True,
    help="Send as fast as ingest takes them (run the pipeline with --overload block to keep every window).",
)
@click.pass_context
def replay_command(ctx: click.Context, paths: tuple[str, ...], endpoint: str, speed: float, fastest: bool) -> None:
    """Send recordings (MCAP files or folders of them) to an ingest endpoint, byte for byte as they were accepted;
    the device clocks are kept, so the windows are those of the live run."""
    if fastest and ctx.get_parameter_source("speed") is click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--speed and --as-fast-as-possible exclude each other")
    replay = Replay(paths)
    if not replay.files:
        raise click.ClickException(f"no {SUFFIX} files in {', '.join(paths)}")
    _warn_if_nothing_listens(endpoint)
    try:
        sent = replay.play(endpoint, None if fastest else speed)
    except ValueError as err:  # not an MCAP file, or not a bindstream recording
        raise click.ClickException(str(err)) from None
    click.echo(f"replayed {sent} messages from {len(replay.files)} files")
    for path in replay.truncated:
        click.echo(f"{path} was cut short (no footer): replayed up to its last complete chunk", err=True)
