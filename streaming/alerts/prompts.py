"""How text becomes a query vector: per-modality prompt templates, prompt ensembling, and the background
prompts each modality's queries compete with.

A text is embedded with prompt ensembling: each modality's templates are filled with the text, embedded,
normalised, averaged and the mean renormalised. The background prompts go through the same templates, so
whatever a template adds to every prompt is shared by query and background and cancels.
"""

from __future__ import annotations

import numpy as np

from ..records import FUSED_MODALITIES
from .records import QueryError

# Templates per modality. ImageBind aligns every modality with text only through images (CLIP's text
# space), so each template phrases the text the way a caption of that modality's paired data reads:
#   audio: ESC-50 / AudioSet style "sound of" captions; vision and fused (a sum dominated by the vision
#   part's alignment): CLIP's photo / video captions; depth and thermal were trained against the RGB
#   image of the same scene, so a plain "photo of" caption joins the sensor-specific one; IMU was
#   trained against Ego4D video whose narrations describe what the wearer does ("a person walking"),
#   with the bare text kept for users who already write a narration.
PROMPT_TEMPLATES = {
    "audio": ("a sound of {}", "the sound of {}"),
    "vision": ("a photo of {}", "a video of {}"),
    "fused": ("a photo of {}", "a video of {}"),
    "depth": ("a depth photo of {}", "a photo of {}"),
    "thermal": ("a thermal photo of {}", "a photo of {}"),
    "imu": ("a person {}", "{}"),
}

_SCENES = (
    "an empty room",
    "a street",
    "a desk",
    "a wall",
    "people talking",
    "a kitchen",
    "a hallway",
    "a computer screen",
    "a floor",
    "a ceiling",
    "a window",
    "trees",
    "the inside of a car",
    "a hand",
    "a door",
    "a shelf",
)
# What a wearable mostly perceives when nothing of interest happens, per modality.
BACKGROUND_PROMPTS = {
    "audio": (
        "silence",
        "people talking",
        "speech",
        "music",
        "traffic",
        "wind",
        "rain",
        "footsteps",
        "a quiet room",
        "typing on a keyboard",
        "a door closing",
        "dishes clattering",
        "an air conditioner humming",
        "birds chirping",
        "a television",
        "running water",
    ),
    "vision": _SCENES,
    "fused": _SCENES,
    "depth": _SCENES,
    "thermal": (
        "a person",
        "a street at night",
        "a room",
        "a wall",
        "a car",
        "trees",
        "a window",
        "a floor",
        "a hand",
        "a door",
        "people walking",
        "an empty road",
    ),
    "imu": (
        "standing still",
        "walking",
        "sitting down",
        "typing",
        "eating",
        "talking to someone",
        "climbing stairs",
        "driving a car",
        "lying down",
        "looking around",
        "washing dishes",
        "opening a door",
    ),
}


def ensemble(encoder, texts: list[str], modality: str) -> np.ndarray:
    """(len(texts), dim): each text through `modality`'s templates, the normalised mean of the normalised
    template embeddings."""
    templates = PROMPT_TEMPLATES[modality]
    emb = encoder.embed_text([t.format(text) for text in texts for t in templates]).astype(np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    mean = emb.reshape(len(texts), len(templates), -1).mean(axis=1)
    return (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)


def check_modality(encoder, modality: str) -> None:
    """QueryError unless the encoder embeds `modality` (fused: all of its members)."""
    needed = FUSED_MODALITIES if modality == "fused" else (modality,)
    missing = [m for m in needed if m not in encoder.model.modality_trunks]
    if missing:
        raise QueryError(f"model {encoder.name} has no {', '.join(missing)} encoder for {modality} queries")
