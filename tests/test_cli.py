"""The `bindstream` command line as a user runs it: a real process, real files, a real pipeline."""

import subprocess
import sys

import numpy as np

from .conftest import ASSETS, shared_file

BINDSTREAM = [sys.executable, "-c", "from streaming.cli import main; main()"]


def run(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*BINDSTREAM, *args], capture_output=True, text=True, timeout=timeout)


def test_embed_files_of_several_modalities(tmp_path):
    image = shared_file(ASSETS / "dog_image.jpg")
    audio = shared_file(ASSETS / "car_audio.wav")
    depth = tmp_path / "depth.npy"
    np.save(depth, np.full((120, 160), 1500, np.uint16))
    out = tmp_path / "emb.npy"
    done = run("embed", str(image), str(audio), "--text", "a dog", "--model", "tiny", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "RANDOM weights" in done.stdout + done.stderr  # the tiny model says so
    emb = np.load(out)
    assert emb.shape == (2, 64) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    done = run("embed", str(depth), "--modality", "depth", "--model", "tiny")
    assert done.returncode == 0, done.stderr
    assert "depth" in done.stdout


def test_embed_refuses_what_it_cannot_read(tmp_path):
    odd = tmp_path / "notes.txt"
    odd.write_text("hello")
    done = run("embed", str(odd), "--model", "tiny")
    assert done.returncode != 0
    assert "notes.txt: cannot tell the modality" in done.stderr
    assert "Traceback" not in done.stderr


def test_demo_runs_the_whole_pipeline_and_summarises():
    done = run("demo", "--seconds", "4", "--devices", "1", timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "summary" in done.stdout and "tiny" in done.stdout
    summary = done.stdout[done.stdout.rindex("summary") :]
    published, column = {}, None
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").replace("┃", "│").split("│")]
        if "published" in cells:
            column = cells.index("published")
        elif (
            column is not None and len(cells) > column and cells[0] in ("vision", "audio", "depth", "thermal", "fused")
        ):
            published[cells[0]] = int(cells[column])
    # 4 s of one wearable: at least the windows that fit in it, published for every 2 s modality
    assert set(published) == {"vision", "audio", "depth", "thermal", "fused"}
    assert all(n >= 2 for n in published.values()), published
