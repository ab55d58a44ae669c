"""`bindstream ui`: the web console (streaming/ui) on uvicorn; and `--ui` of `run` and `demo`, the same console on
a thread beside the pipeline. It listens on 127.0.0.1 unless told; any other address needs a token (auth.py),
and a host, token or port it cannot use is refused in one line before anything starts."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import click

from streaming.ui.auth import TOKEN_ENV, check_bind

from .options import CHECKPOINT_OPTION, MODEL_OPTION, connect, model_name, redis_option
from .terminal import console

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8080


def listen(redis_url: str, host: str, port: int, token: str | None, model: str | None, checkpoint: str | None):
    """The console (a ConsoleServer) over `redis_url`, bound to host:port, not yet serving; `model` and `checkpoint`
    are the encoder of its Queries and Search pages. One line for what cannot be."""
    from streaming.ui.app import ConsoleError, ConsoleServer, create_app  # the app's pages import the CLI's options

    try:
        check_bind(host, token)
        return ConsoleServer(create_app(redis_url, token=token, model=model, checkpoint=checkpoint), host, port)
    except (ValueError, ConsoleError) as err:
        raise click.ClickException(str(err)) from None


@click.command("ui")
@redis_option()
@click.option("--host", default=LOOPBACK, help="Address to listen on; any but a loopback one needs --token.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, help="Port to listen on (0: a free one).")
@click.option(
    "--token",
    envvar=TOKEN_ENV,
    show_envvar=True,
    default=None,
    help="Secret every request must carry: Authorization: Bearer TOKEN, or ?token=TOKEN once per browser.",
)
@MODEL_OPTION
@CHECKPOINT_OPTION
def ui(redis_url, host, port, token, model, checkpoint):
    """The web console: devices, events with their evidence, score timelines, queries and search, in a browser.
    It reads and writes only Redis; Ctrl-C stops it."""
    from .pipeline import say_model  # pipeline.py imports this module for --ui

    connect(redis_url)  # Redis answers, or one line says why not
    server = listen(redis_url, host, port, token, model, checkpoint)
    say_model(model_name(model, checkpoint))  # the encoder of the Queries and Search pages (tiny: RANDOM weights)
    console.print(
        f"web console: {server.url}/" + (" (open it once with ?token=TOKEN)" if token else "") + "; Ctrl-C stops it",
        soft_wrap=True,
    )
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn stops serving at Ctrl-C, then raises it again
        console.print("web console stopped")


def ui_options(command):
    """`--ui` and `--ui-port` of `run` and `demo` (parameters `ui`, `ui_port`)."""
    command = click.option(
        "--ui-port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, help="Port of --ui's console (0: a free one)."
    )(command)
    return click.option(
        "--ui", is_flag=True, help=f"Serve the web console (bindstream ui) on {LOOPBACK} while this runs."
    )(command)


@contextmanager
def _beside(redis_url: str, port: int, model: str, checkpoint: str | None):
    from streaming.ui.app import ConsoleError

    try:
        server = listen(redis_url, LOOPBACK, port, None, model, checkpoint).start()
    except ConsoleError as err:
        raise click.ClickException(str(err)) from None
    console.print(f"web console: {server.url}/ (until this command ends)", soft_wrap=True)
    try:
        yield server
    finally:
        server.stop()


def console_beside(ui: bool, port: int, redis_url: str, model: str, checkpoint: str | None):
    """With `ui`, the console over `redis_url` (its encoder: the pipeline's `model`) on a thread, on
    127.0.0.1:`port`, for the `with` block's while."""
    return _beside(redis_url, port, model, checkpoint) if ui else nullcontext()
