"""Every ``--conf`` key of the app, declared once: its type, default, allowed values and meaning.

The keys every model shares are declared here; a model's own keys are declared in its config module
(``lib/configs/<model>.py``, with ``declare_conf_keys``), so ``CONF_KEYS`` holds them all once ``lib.configs`` is
imported, as the app, its scripts and its tests do before parsing.

``parse_conf`` turns the server's ``--conf`` strings into typed values with every default filled in. An unknown key
or a value outside its choices stops the server with the nearest valid name (MONAI's ``look_up_option``); a value
of the wrong type names the key and the type. The README's configuration table is checked against ``CONF_KEYS``
(tests/unit/test_conf.py).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from monai.utils import look_up_option
from monailabel.utils.others.generic import strtobool

from lib.compute import ENGINES, PRECISIONS, QUANTIZATIONS
from lib.errors import one_line
from lib.networks.sam_backbone import SAM_ENCODERS
from lib.trainers.recipes import RECIPES

# Optional endpoint groups (--conf endpoints, comma-separated; 'none' for none) and what each serves (lib.routes).
ENDPOINT_GROUPS = {
    "sessions": "/session/...: 3D Slicer uploads a volume that is not in the datastore as a session to segment it",
    "logs": "/logs/ and /logs/gpu: the server log and nvidia-smi (admin role)",
    "batch_infer": "/batch/infer/...: segment every datastore volume in a background task (admin role)",
}
DEFAULT_ENDPOINT_GROUPS = ("sessions",)


def _bool(value: str) -> bool:
    return bool(strtobool(value))


def listed_names(key: str, text: str, choices: Collection[str], valid: str = "", listed: bool = True) -> list[str]:
    """The comma-separated names of ``--conf key``'s ``text`` (or ``text`` itself, unless ``listed``), each one of
    ``choices``; an unknown one stops the server with the nearest choice (MONAI's ``look_up_option``) and
    ``valid``, the list to show."""
    names = [name.strip() for name in text.split(",") if name.strip()] if listed else [text]
    for name in names:
        try:
            look_up_option(name, choices)
        except ValueError as e:
            raise ValueError(f"--conf {key} {text!r}: {one_line(e)}" + (f" valid: {valid}." if valid else "")) from None
    return names


@dataclass(frozen=True)
class ConfKey:
    """One ``--conf`` key: ``kind`` parses its string; ``choices`` (each of a comma-separated list when ``listed``)."""

    name: str
    default: str
    help: str
    kind: Callable[[str], Any] = str
    choices: tuple[str, ...] = ()
    listed: bool = False
    minimum: float | None = None

    def parse(self, value: Any) -> Any:
        text = str(self.default if value is None else value).strip()
        if self.choices:
            names = listed_names(self.name, text, self.choices, ", ".join(self.choices), listed=self.listed)
            return ",".join(names) if self.listed else text
        try:
            parsed = self.kind(text) if text or self.kind is str else None
        except ValueError:
            raise ValueError(f"--conf {self.name} {text!r}: expected {self.kind.__name__.lstrip('_')}") from None
        if self.minimum is not None and parsed is not None and parsed < self.minimum:
            raise ValueError(f"--conf {self.name} {text!r}: must be at least {self.minimum:g}")
        return parsed


CONF_KEYS: dict[str, ConfKey] = {
    key.name: key
    for key in (
        ConfKey(
            "models",
            "all",
            "models to register: all, segmentation (the SAM models), or names comma-separated (lib.configs.MODEL_CONFIGS)",
        ),
        ConfKey(
            "backbone",
            "litemedsam",
            "SAM backbone: litemedsam (pretrained, offline), vit_b/l/h (SAM's weights), tiny (random, tests)",
            choices=tuple(SAM_ENCODERS),
        ),
        ConfKey("sam_checkpoint", "", "SAM weights: a path or URL (default: the official file of the backbone)"),
        ConfKey("labels", "", 'label set as JSON {"name": id} (default: the brain-MRI sample\'s)'),
        ConfKey(
            "object_labels",
            "",
            "labels whose clicks and boxes answer the prompted objects only (lesions); the others answer the whole class",
        ),
        ConfKey("auto_train", "false", "queue a training run after each saved final label", kind=_bool),
        ConfKey("label_check", "true", "check each saved final label against the served adapter's prediction", kind=_bool),
        ConfKey("device", "auto", "auto, cpu, cuda or cuda:N"),
        ConfKey(
            "lora_rank", "", "rank of the SAM models' LoRA on q and v (default: HF-SAM 5, as published; MASG-SAM 4)", kind=int, minimum=1
        ),
        ConfKey("recipe", "fewshot", "how the SAM models' adapters train", choices=tuple(RECIPES)),
        ConfKey("modality", "auto", "intensity normalisation: auto, CT, MR, ..."),
        ConfKey("preload", "false", "build the networks at start-up", kind=_bool),
        ConfKey("precision", "auto", "inference precision", choices=PRECISIONS),
        ConfKey("train_precision", "auto", "training precision of the SAM models", choices=PRECISIONS),
        ConfKey("engine", "auto", "what runs the image encoders on a CPU", choices=ENGINES),
        ConfKey(
            "quantize",
            "none",
            "the SAM models' image encoder on OpenVINO: none, or int8 (NNCF post-training quantisation, calibrated on "
            "the first volume each adapter serves)",
            choices=QUANTIZATIONS,
        ),
        ConfKey("embedding_cache_mb", "1024", "memory for SAM image embeddings of slices seen before", kind=int, minimum=0),
        ConfKey("auto_scoring", "true", "compute the active-learning scores at start-up and after training", kind=_bool),
        ConfKey("handout_timeout", "900", "seconds before a handed-out volume may be handed out again", kind=float, minimum=0),
        ConfKey("max_epochs", "50", "default epochs of a training run", kind=int, minimum=1),
        ConfKey(
            "endpoints",
            ",".join(DEFAULT_ENDPOINT_GROUPS),
            "optional endpoint groups to serve",
            choices=("none", *ENDPOINT_GROUPS),
            listed=True,
        ),
    )
}


def declare_conf_keys(*keys: ConfKey) -> tuple[ConfKey, ...]:
    """Add a model's own ``--conf`` keys to ``CONF_KEYS`` (from its config module); a name declared twice is a
    programming error and stops the import."""
    for key in keys:
        if key.name in CONF_KEYS and CONF_KEYS[key.name] != key:
            raise ValueError(f"--conf {key.name} is declared twice: {CONF_KEYS[key.name]} and {key}")
        CONF_KEYS[key.name] = key
    return keys


def parse_conf(conf: Mapping[str, Any]) -> dict[str, Any]:
    """``--conf`` strings -> {key: typed value} for every key of ``CONF_KEYS``; unknown keys and bad values raise
    ValueError naming the key and the nearest valid name. Parsing parsed values gives them back."""
    for key in conf:
        try:
            look_up_option(key, CONF_KEYS)
        except ValueError as e:
            raise ValueError(f"--conf {key}: not a key of this app. {one_line(e)}") from None
    return {name: key.parse(conf.get(name)) for name, key in CONF_KEYS.items()}
