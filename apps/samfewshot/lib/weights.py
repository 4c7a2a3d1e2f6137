"""Where the base weights come from: a path, or a URL downloaded once into the model folder and checked by sha256."""

from __future__ import annotations

import os

from monai.apps import download_url

from lib.networks.sam_backbone import OFFICIAL_CHECKPOINTS, CheckpointError, OfficialCheckpoint


def resolve_checkpoint(value: str | None, official: OfficialCheckpoint | None, model_dir: str, conf_key: str, what: str = "SAM") -> str:
    """Local path of a weights file: ``value`` is a path or URL (default: the ``official`` file's URL). URLs are
    downloaded once into the model dir, verified by sha256 where the official hash is known; every failure names
    the file, where to get it and the ``--conf`` key that points to it."""
    value = value or (official.url if official else None)
    if not value:
        raise CheckpointError(f"no official {what} checkpoint for this backbone; set --conf {conf_key}")
    if not value.startswith(("http://", "https://")):
        if not os.path.isfile(value):
            raise CheckpointError(f"--conf {conf_key} '{value}' does not exist")
        return value
    is_official = official is not None and value == official.url
    filename = official.filename if is_official else os.path.basename(value)
    path = os.path.join(model_dir, filename)
    if not os.path.exists(path):
        try:
            sha = official.sha256 if is_official else None
            download_url(value, path, hash_val=sha, hash_type="sha256", progress=False)
        except Exception as e:
            raise CheckpointError(
                f"{what} weights '{filename}' are not available: download from {value} failed ({e}). Download it on a "
                f"machine with internet access, then copy it to {path} or pass its path with "
                f"--conf {conf_key} /path/to/{filename}; for an offline trial use --conf backbone tiny"
            ) from e
    return path


def resolve_sam_checkpoint(backbone: str, value: str | None, model_dir: str) -> str | None:
    """SAM weights for ``backbone``; None for ``tiny`` without a checkpoint (random weights by design)."""
    if backbone == "tiny" and not value:
        return None
    return resolve_checkpoint(value, OFFICIAL_CHECKPOINTS.get(backbone), model_dir, "sam_checkpoint")
