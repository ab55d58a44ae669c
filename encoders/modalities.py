"""The encoder's modalities: every list of them in encoders/ and the CLI is read from here.

The input each takes, per model configuration, is `ImageBindConfig.input_specs()`. (The pipeline's table of
streamed modalities is `streaming/records.py`: it must not import this package, which imports torch.)
"""

MODALITIES = ("vision", "text", "audio", "depth", "thermal", "imu")  # the checkpoint's order
MEDIA_MODALITIES = tuple(m for m in MODALITIES if m != "text")  # given as media (files, sensors); text as strings
