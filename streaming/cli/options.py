"""The options that several `bindstream` commands take, each defined once here: `--redis` (one meaning: the
Redis of the embedding streams, queries and alerts, also read from $BINDSTREAM_REDIS_URL), the model options,
`--json`, `--seconds` of the commands that run until Ctrl-C, `--example` and `--vector` of the commands that
query by example, and the duration type of every `--since`; and what the model options and `--example` and
`--vector` name: the encoder, the query's vector."""

from __future__ import annotations

import click
import numpy as np
import redis

from encoders.config import PRESETS
from streaming.alerts.records import unit
from streaming.alerts.search import parse_duration_ms
from streaming.redis_access import AnyRedis, RedisAccessError, check_redis
from streaming.redis_access import connect as connect_url

REDIS_ENV = "BINDSTREAM_REDIS_URL"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DTYPES = ("float32", "bfloat16", "float16", "int8")

MODEL_OPTION = click.option(
    "--model",
    type=click.Choice(sorted(PRESETS)),
    default=None,
    help="Encoder weights; default: imagebind_huge when its checkpoint is on disk, else tiny (random weights).",
)
CHECKPOINT_OPTION = click.option(
    "--checkpoint", type=click.Path(dir_okay=False), default=None, help="Path of the model's checkpoint file."
)
DEVICE_OPTION = click.option("--device", default=None, help="torch device (default: cuda if present, else cpu).")
DTYPE_OPTION = click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default=None,
    help="Weights dtype (default: bfloat16 on GPU, float32 on CPU; int8 is CPU only).",
)
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
SECONDS_OPTION = click.option(
    "--seconds", type=float, default=None, help="Stop after this long (default: until Ctrl-C)."
)


def example_options(command):
    """`--example FILE` (a clip or image: `embed_example`) and `--vector FILE.npy` (`load_vector`), the
    parameters `example` and `vector`: what a query by example is, in place of the command's TEXT."""
    vector = click.option(
        "--vector",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="Query by this .npy vector of the model's joint space (normalised) instead of by TEXT.",
    )
    example = click.option(
        "--example",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="Query by this clip or image, embedded as --modality by the model, instead of by TEXT.",
    )
    return example(vector(command))


def redis_option(embedded: bool = False):
    """`--redis URL` (the parameter `redis_url`), or $BINDSTREAM_REDIS_URL; without either, DEFAULT_REDIS, or,
    for the commands that start the pipeline (`embedded`), None: a redis-server of their own."""
    if embedded:
        default, otherwise = None, "; default: an embedded redis-server, gone when the command ends"
    else:
        default, otherwise = DEFAULT_REDIS, ""
    return click.option(
        "--redis",
        "redis_url",
        default=default,
        envvar=REDIS_ENV,
        show_envvar=True,
        help=f"Redis URL (redis://, rediss://; a Redis Cluster: rediscluster://HOST:PORT, any node) of the "
        f"embeddings, queries and alerts{otherwise}.",
    )


class Duration(click.ParamType):
    """A while back: '500ms', '30s', '10m', '2h', '1d', or 0 (none) -> milliseconds; `words` are further
    answers and their values (tail's `start`: None, everything stored)."""

    name = "duration"

    def __init__(self, words: dict[str, int | None] | None = None):
        self.words = words or {}

    def convert(self, value, param, ctx) -> int | None:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text in self.words:
            return self.words[text]
        try:
            return 0 if text == "0" else parse_duration_ms(text)
        except ValueError as err:
            self.fail("".join([str(err), *(f", or {word}" for word in self.words)]), param, ctx)


def model_name(model: str | None, checkpoint: str | None) -> str:
    """The model --model names, or the default one for --checkpoint (encoders.weights.default_model_name)."""
    from encoders.weights import default_model_name

    return default_model_name(model, checkpoint)


def load_encoder(model: str, checkpoint: str | None, device: str | None = None, dtype: str | None = None):
    """encoders.load, with one line for a missing checkpoint or an unusable device or dtype."""
    import encoders

    try:
        return encoders.load(model, checkpoint=checkpoint, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise click.ClickException(f"cannot load model {model}: {err}") from None


def load_vector(path: str, name: str) -> np.ndarray:
    """A --vector file, normalised, of model `name`'s dimension; else a usage error."""
    from encoders.config import resolve_config

    try:
        v = unit(np.load(path, allow_pickle=False), f"--vector {path}")
    except (ValueError, OSError) as err:
        raise click.BadParameter(str(err), param_hint="--vector") from err
    dim = resolve_config(name).out_embed_dim
    if v.shape[0] != dim:
        raise click.BadParameter(
            f"{path} has {v.shape[0]} dimensions; model {name} embeds in {dim}", param_hint="--vector"
        )
    return v


def embed_example(encoder, path: str, modality: str) -> np.ndarray:
    """An --example file embedded as `modality`; else a usage error."""
    from encoders.transforms import load_file

    try:
        _, tensor = load_file(path, modality)
    except (ValueError, OSError) as err:
        raise click.BadParameter(f"{path} does not load as {modality}: {err}", param_hint="--example") from err
    return encoder.embed(modality, tensor.unsqueeze(0))[0]


def connect(url: str) -> AnyRedis:
    """For command lines: a client of the Redis (or Redis Cluster) at `url` once it answers; a one-line
    ClickException naming the cause (a URL it cannot use, unreachable, refused credentials; never the password)
    when it does not."""
    try:
        check_redis(url)
        return connect_url(url)
    except ValueError as err:  # the URL itself, which is not echoed: it may hold a password
        raise click.ClickException(
            f"cannot use the Redis URL: {err} (write redis://[:PASSWORD@]HOST:PORT/DB, or rediscluster://HOST:PORT)"
        ) from None
    except (RedisAccessError, redis.RedisError) as err:
        raise click.ClickException(str(err)) from None
