"""CurveZMQ key files, for devices and servers alike: zmq certificate files (`name.key` public,
`name.key_secret` secret) as `zmq.auth.create_certificates` writes them. Every key read is checked to be
40 Z85 characters that decode, so a damaged file fails here with its name, not later inside libzmq."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import zmq.auth
from zmq.utils import z85

log = logging.getLogger(__name__)
Z85_KEY_CHARS = 40  # a 32-byte Curve25519 key in Z85


def generate_keys(folder: str | os.PathLike, name: str) -> tuple[str, str]:
    """Create a CURVE key pair as zmq certificate files `folder/name.key` (public: give it to the other side)
    and `folder/name.key_secret` (secret: keep it on this machine, mode 0600). Returns (public, secret) paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(folder, name)
    os.chmod(secret_file, 0o600)
    return str(public_file), str(secret_file)


def raw_key(key: bytes, source: str | os.PathLike) -> bytes:
    """The 32 raw bytes of a Z85 key; ValueError naming `source` if it is not 40 valid Z85 characters."""
    if len(key) != Z85_KEY_CHARS:
        raise ValueError(f"{source}: a CURVE key is {Z85_KEY_CHARS} Z85 characters, got {len(key)}")
    try:
        return z85.decode(key)
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"{source}: the key is not valid Z85") from None


def load_public_key(path: str | os.PathLike) -> bytes:
    """The Z85 public key (40 characters) of a certificate file; ValueError if it has none or it is invalid."""
    public, _ = zmq.auth.load_certificate(path)
    raw_key(public, path)
    return public


def load_secret_certificate(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of a secret certificate file; ValueError if the secret key is missing."""
    public, secret = zmq.auth.load_certificate(path)
    if not secret:
        raise ValueError(f"{path} holds no secret key: pass the .key_secret file that generate_keys wrote")
    raw_key(public, path)
    raw_key(secret, path)
    return public, secret


def load_allow_list(folder: str | os.PathLike) -> dict[bytes, str]:
    """{raw 32-byte public key: certificate name} for every `*.key` file in `folder`. Files that cannot be read
    or hold no valid key are skipped with a warning; a missing folder raises FileNotFoundError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"allow-list folder {folder} does not exist")
    allowed = {}
    for path in sorted(folder.glob("*.key")):
        try:
            allowed[raw_key(zmq.auth.load_certificate(path)[0], path)] = path.stem
        except (OSError, ValueError) as err:
            log.warning("skipping %s in the CURVE allow-list: %s", path, err)
    return allowed
