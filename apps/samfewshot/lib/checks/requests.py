"""What the server accepts in a request, checked before anything is stored or computed: names, file names, JSON
fields, and the declared options of train, infer, scoring and active-learning requests (one declaration per option:
the route checks it and the task reads it through it, ``infer_option``). ``lib.routes`` applies these checks to the
arguments of every route the server answers; volumes and labels are checked by ``lib.checks.volumes``.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from lib.errors import InvalidInput, NotFound, one_line, quoted

# Image ids and label tags become file and folder names inside the datastore: a file name holds at most 255 bytes,
# and the id shares it with its extension. DICOM UIDs, the longest ids clients send, have at most 64 characters.
MAX_NAME_BYTES = 128
# An uploaded file's name: its suffixes pick the reader and name the server's temporary copy.
MAX_FILENAME_BYTES = 255
MAX_SUFFIX_CHARS = 16
# JSON a client sends: form fields (params, info) and request bodies (train, scoring, active learning options).
# Python's parser recurses; nesting is bounded well below the interpreter's limit, and sizes keep the datastore
# index and the task queue (which passes a request to its subprocess on the command line) small.
MAX_JSON_DEPTH = 32
MAX_FIELD_BYTES = 1 << 20
MAX_OPTIONS_BYTES = 16 << 10
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_name(value: Any, what: str) -> str:
    """An image id or label tag: a plain file name, never a path (no separators, no leading dot, no control
    characters), so nothing can be written outside the datastore."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{what} must be a non-empty name, got {quoted(value)}")
    if len(value.encode()) > MAX_NAME_BYTES:
        raise InvalidInput(f"{what} {quoted(value)} is {len(value.encode())} bytes long; at most {MAX_NAME_BYTES}")
    if "/" in value or "\\" in value or value.startswith(".") or _CONTROL.search(value):
        raise InvalidInput(f"{what} {value!r} is not a plain name: no '/', '\\', leading '.' or control characters")
    return value


def check_filename(filename: Any, what: str) -> str:
    """The name an uploaded file arrives with (its suffixes pick the reader); '' when the client sent none."""
    if filename is None or filename == "":
        return ""
    if not isinstance(filename, str):
        raise InvalidInput(f"{what} file name must be a string, got {quoted(filename)}")
    if _CONTROL.search(filename):
        raise InvalidInput(f"{what} file name {filename!r} holds control characters")
    if len(filename.encode()) > MAX_FILENAME_BYTES:
        raise InvalidInput(f"{what} file name {quoted(filename)} is longer than {MAX_FILENAME_BYTES} bytes")
    suffix = "".join(pathlib.PurePosixPath(filename.replace("\\", "/")).suffixes)
    if len(suffix) > MAX_SUFFIX_CHARS:
        raise InvalidInput(f"{what} file name {filename!r} has the extension {quoted(suffix)}; at most {MAX_SUFFIX_CHARS} characters")
    return filename


def check_choice(value: Any, valid: Collection[str], what: str) -> str:
    """``value`` must be one of ``valid`` (a model, strategy or scoring method name): NotFound lists them."""
    if value not in valid:
        names = ", ".join(sorted(valid)) or "none"
        raise NotFound(f"unknown {what} {value!r}; valid: {names}")
    return value


def parse_json_object(text: Any, field: str, max_bytes: int = MAX_FIELD_BYTES) -> dict[str, Any]:
    """A form field that must hold a JSON object (MONAI Label's ``params`` / ``info``), of bounded size and depth."""
    if text is None or text == "":
        return {}
    if not isinstance(text, str):
        raise InvalidInput(f"'{field}' must be JSON text, got {type(text).__name__}")
    if len(text.encode()) > max_bytes:
        raise InvalidInput(f"'{field}' is {len(text.encode())} bytes of JSON; at most {max_bytes}")
    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError) as e:
        raise InvalidInput(f"'{field}' is not valid JSON ({e}); send a JSON object such as {{}}") from e
    except RecursionError as e:
        raise InvalidInput(f"'{field}' is JSON nested deeper than {MAX_JSON_DEPTH} levels") from e
    if not isinstance(value, dict):
        raise InvalidInput(f"'{field}' must be a JSON object, got {type(value).__name__}: {text[:80]!r}")
    check_json_depth(value, field)
    return value


def check_json_depth(value: Any, field: str) -> None:
    """Nesting of parsed JSON at most ``MAX_JSON_DEPTH`` (iterative: a deep value must not exhaust the stack)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidInput(f"'{field}' is JSON nested deeper than {MAX_JSON_DEPTH} levels")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def check_options(options: Any, what: str, max_bytes: int = MAX_OPTIONS_BYTES) -> dict[str, Any]:
    """A JSON body of task options (train, scoring, active learning): an object (or nothing), small and shallow."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(options).__name__}")
    check_json_depth(options, what)
    size = len(json.dumps(options).encode())
    if size > max_bytes:
        raise InvalidInput(f"{what} are {size} bytes of JSON; at most {max_bytes}")
    return options


def check_same(options: Mapping[str, Any], key: str, expected: Any, where: str) -> None:
    """A body or params key that repeats what the URL names (model, strategy, method, image) may only repeat it."""
    if key in options and options[key] != expected:
        raise InvalidInput(f"{key} {quoted(options[key])} in the {where} differs from the {key} {expected!r} the URL names")


def check_label_info(label_info: Any) -> dict[int, str]:
    """Slicer's ``label_info`` ([{name, idx}, ...]) -> {idx: name}."""
    if label_info is None:
        return {}
    if not isinstance(label_info, list):
        raise InvalidInput(f"label_info must be a list of {{'name', 'idx'}} objects, got {type(label_info).__name__}")
    ids = {}
    for entry in label_info:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise InvalidInput(f"label_info entries need a 'name' string and an integer 'idx', got {entry!r}")
        idx = _integer(entry.get("idx"))
        if idx is None or idx < 0:
            raise InvalidInput(f"label_info 'idx' must be a non-negative integer, got {entry.get('idx')!r} for {entry['name']!r}")
        ids[idx] = entry["name"]
    return ids


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _integer(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number.is_integer() else None


def _points(value: Any, length: int | None = None) -> bool:
    """A list of [i, j, k] finite numbers (``length`` None), or one list of ``length`` finite numbers."""
    if length is not None:
        return isinstance(value, list) and len(value) == length and all(_number(v) is not None for v in value)
    return isinstance(value, list) and len(value) <= MAX_PROMPT_POINTS and all(_points(p, 3) for p in value)


def _name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value.encode()) <= MAX_NAME_BYTES and not _CONTROL.search(value)


def _device(value: Any) -> bool:
    """'cpu', 'cuda', 'cuda:N', or a list of them (MONAI Label's trainer config lists the choices)."""
    if isinstance(value, list):
        return 0 < len(value) <= 16 and all(_device(v) for v in value)
    return isinstance(value, str) and re.fullmatch(r"cpu|cuda(:\d{1,2})?", value) is not None


@dataclass(frozen=True)
class Option:
    """A request option: what it must be (a refusal names it) and ``parse``, which returns the value as the task
    reads it (``"1"`` -> 1 for an integer) or raises ``ValueError``. The route hands the parsed value on, so what
    was checked is what runs."""

    what: str
    parse: Callable[[Any], Any]


def accepted(what: str, ok: Callable[[Any], bool]) -> Option:
    """An option kept as sent where ``ok`` holds."""

    def parse(value: Any) -> Any:
        if not ok(value):
            raise ValueError(what)
        return value

    return Option(what, parse)


def integer(what: str, low: int | None = None, high: int | None = None) -> Option:
    """An integer (a JSON number or a numeric string, no fraction) in [low, high]."""

    def parse(value: Any) -> int:
        parsed = _integer(value)
        if parsed is None or (low is not None and parsed < low) or (high is not None and parsed > high):
            raise ValueError(what)
        return parsed

    return Option(what, parse)


def number(what: str, ok: Callable[[float], bool]) -> Option:
    """A finite number (or a numeric string) where ``ok`` holds."""

    def parse(value: Any) -> float:
        parsed = _number(value)
        if parsed is None or not ok(parsed):
            raise ValueError(what)
        return parsed

    return Option(what, parse)


def one_of(*choices: Any) -> Option:
    return accepted(f"one of {', '.join(map(str, choices))}", lambda v: v in choices)


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1) or (isinstance(value, str) and value.lower() in BOOLEAN_WORDS):
        return str(value).lower() in TRUE_WORDS
    raise ValueError("true or false")


BOOLEAN_WORDS = ("true", "false", "1", "0", "yes", "no", "y", "n", "t", "f", "on", "off")
TRUE_WORDS = ("true", "1", "yes", "y", "t", "on")
BOOLEAN = Option("true or false", _boolean)
MAX_PROMPT_POINTS = 1000
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")
RESULT_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
Options = dict[str, Option]
NAME = f"a name of at most {MAX_NAME_BYTES} bytes"

# Options of every task request: where it runs and how much it logs.
COMMON_OPTIONS: Options = {
    "device": accepted("'cpu', 'cuda' or 'cuda:N'", _device),
    "logging": accepted(f"one of {', '.join(LOG_LEVELS)}", lambda v: isinstance(v, str) and v.upper() in LOG_LEVELS),
    "client_id": accepted(NAME, lambda v: v is None or _name(v)),  # MONAILabelClient sends None
}
# Training options a client may set (3D Slicer echoes the trainer's config) and what they must be.
TRAIN_OPTIONS: Options = {
    **COMMON_OPTIONS,
    "max_epochs": integer("a positive integer", low=1),
    "train_batch_size": integer("a positive integer", low=1),
    "val_batch_size": integer("a positive integer", low=1),
    "early_stop_patience": integer("an integer"),
    "lr": number("a positive number", lambda v: v > 0),
    "val_split": number("a number in [0, 1)", lambda v: 0 <= v < 1),
    "multi_gpu": BOOLEAN,
    "pretrained": BOOLEAN,
    "gpus": accepted(
        "'all' or GPU indices such as '0,1'", lambda v: isinstance(v, str) and re.fullmatch(r"all|\d{1,2}(,\d{1,2}){0,15}", v) is not None
    ),
    "name": accepted(
        "a plain name (no '/', '\\' or leading '.')", lambda v: _name(v) and "/" not in v and "\\" not in v and not v.startswith(".")
    ),
    "dataset": one_of("SmartCacheDataset", "CacheDataset", "PersistentDataset", "Dataset"),
    "dataloader": one_of("ThreadDataLoader", "DataLoader"),
    "tracking": one_of("None", "mlflow", "", None),
    "tracking_uri": accepted("empty: the server keeps a run's tracking inside its model folder", lambda v: v in ("", None)),
    "tracking_experiment_name": accepted(NAME, lambda v: v == "" or _name(v)),
    "tracking_run_name": accepted(NAME, lambda v: v == "" or _name(v)),
    "interactive_share": number("a number in [0, 1]", lambda v: 0 <= v <= 1),
}

# Keys MONAI Label's trainer reads as server-side settings: a datalist file to train on, the process group's
# rendezvous (a file:// URL is a path), the run's folder, code to import.
SERVER_TRAIN_KEYS = ("train_ds", "val_ds", "distributed_url", "distributed_backend", "bundle_path", "run_id", "local_rank")

# Keys of an infer request's ``params`` that MONAI Label reads as server-side settings (where the image is read
# from, where the result is written, whether it is stored); params merge over the request, so a client could
# otherwise name a server file (``image_path``), write a prediction over a final label (``save_label``,
# ``label_tag``) or suppress the result.
SERVER_INFER_KEYS = (
    "image_path",
    "model_filename",
    "session",
    "file",
    "save_label",
    "label_tag",
    "skip_writer",
    "result_write_to_file",
    "timeout",
    "description",
    "result_json_key",
)
# The options of infer requests and what they must be (3D Slicer, OHIF, MONAI Label's own SAM convention for
# prompts, each task's config, which clients echo); other keys are dropped and listed in the answer as ignored.
INFER_PARAMS: Options = {
    **COMMON_OPTIONS,
    "result_extension": one_of(*RESULT_EXTENSIONS),
    "result_dtype": one_of(*RESULT_DTYPES),
    "result_compress": BOOLEAN,
    "uncertainty": BOOLEAN,
    "foreground": accepted(f"a list of at most {MAX_PROMPT_POINTS} [i, j, k] voxel indices", _points),
    "background": accepted(f"a list of at most {MAX_PROMPT_POINTS} [i, j, k] voxel indices", _points),
    "roi": accepted("[i0, i1, j0, j1, k0, k1] voxel indices or []", lambda v: v == [] or _points(v, 6)),
    "batch_size": integer("an integer in 1..256", low=1, high=256),
    "slice": integer("a non-negative integer", low=0),
    "label": accepted(f"a segment name of at most {MAX_NAME_BYTES} bytes", _name),
    "modality": accepted("'auto', 'CT' or 'MR'", lambda v: isinstance(v, str) and v.upper() in ("AUTO", "CT", "MR")),
    # FGNet's instances (lib.infers.affinity_instances)
    "seed_affinity": number("a number in (0, 1]", lambda v: 0 < v <= 1),
    "merge_affinity": number("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "min_fragment_size": integer("a non-negative integer", low=0),
    "sw_overlap": number("a number in [0, 1)", lambda v: 0 <= v < 1),
}


def unknown_keys(options: Mapping[str, Any], known: Collection[str]) -> list[str]:
    return sorted(k for k in options if k not in known)


def refuse_unknown(options: Mapping[str, Any], known: Collection[str], what: str) -> None:
    """Keys outside ``known`` answer 422, each with the nearest known name (MONAI's ``look_up_option``)."""
    from monai.utils import look_up_option

    wrong = []
    for key in unknown_keys(options, known):
        try:
            look_up_option(key, sorted(known))
        except ValueError as e:
            wrong.append(f"{key!r} is not one of the {what}: {one_line(e)}")
    if wrong:
        raise InvalidInput("; ".join(wrong))


def check_keys(
    options: Mapping[str, Any], table: Options, server_keys: Collection[str], what: str, also: Collection[str] | None = ()
) -> dict[str, Any]:
    """``options`` may not hold ``server_keys``; those in ``table`` must parse and are returned parsed; keys in
    neither ``table`` nor ``also`` are refused (``also=None``: they pass as sent, for the caller to sort out)."""
    server = sorted(k for k in options if k in server_keys)
    if server:
        raise InvalidInput(f"{what} may not set {', '.join(server)}: the server decides where it reads and writes")
    if also is not None:
        refuse_unknown(options, {*table, *also}, what)
    parsed, wrong = dict(options), []
    for key, option in table.items():
        if key in options:
            try:
                parsed[key] = option.parse(options[key])
            except (ValueError, TypeError):
                wrong.append(f"{key} must be {option.what}, got {quoted(options[key])}")
    if wrong:
        raise InvalidInput("; ".join(wrong))
    return parsed


def infer_option(data: Mapping[str, Any], key: str, default: Any) -> Any:
    """An infer option as a task reads it: the request's value parsed by its declaration in ``INFER_PARAMS`` (the
    route parsed it already; an in-process caller gets the same check), else ``default``."""
    if key not in data:
        return default
    try:
        return INFER_PARAMS[key].parse(data[key])
    except (ValueError, TypeError):
        raise InvalidInput(f"{key} must be {INFER_PARAMS[key].what}, got {quoted(data[key])}") from None


def check_train_options(options: Mapping[str, Any]) -> dict[str, Any]:
    return check_keys(options, TRAIN_OPTIONS, SERVER_TRAIN_KEYS, "train options", also=("model",))


# Keys of an infer request that are not options: what the URL names, and the segment names of a DICOM SEG answer.
INFER_NAMES = ("image", "model", "label_info")
IGNORED_KEY = "ignored_options"


def check_infer_params(
    params: Mapping[str, Any],
    image: str,
    model: str,
    task_options: Collection[str],
    server_keys: Collection[str] = SERVER_INFER_KEYS,
) -> tuple[dict[str, Any], list[str]]:
    """An infer request's ``params`` (already a bounded JSON object): the image and model the URL names stay the
    ones segmented, server-side keys are refused, and the declared options have sensible values. -> the params
    parsed, without the keys neither declared nor among ``task_options`` (the task's config: what clients echo),
    and those keys: the task would not read them (OHIF's ``restore_label_idx``, a misspelt option)."""
    check_same(params, "image", image, "infer params")
    check_same(params, "model", model, "infer params")
    parsed = check_keys(params, INFER_PARAMS, server_keys, "infer params", also=None)
    if "label_info" in params:
        check_label_info(params["label_info"])
    ignored = unknown_keys(params, {*INFER_PARAMS, *INFER_NAMES, *task_options})
    return {k: v for k, v in parsed.items() if k not in ignored}, ignored


_CHECKSUM = {"SHA256": 64, "SHA512": 128, "MD5": 32}


def check_checksum(value: Any) -> None:
    """``HEAD /datastore/image``'s ``check_sum``: '[ALGO:]hexdigest' with ALGO one of MONAI Label's (SHA256 default)."""
    if value in (None, ""):
        return
    algo, _, digest = value.rpartition(":") if ":" in value else ("SHA256", ":", value)
    if algo not in _CHECKSUM:
        raise InvalidInput(f"check_sum algorithm {quoted(algo)} is not supported; use {', '.join(_CHECKSUM)} as 'ALGO:hexdigest'")
    if not re.fullmatch(rf"[0-9a-fA-F]{{{_CHECKSUM[algo]}}}", digest):
        raise InvalidInput(f"check_sum digest {quoted(digest)} is not a {algo} hex digest ({_CHECKSUM[algo]} hex digits)")
