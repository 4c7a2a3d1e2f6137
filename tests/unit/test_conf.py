"""The declared --conf keys: typed defaults, errors that name the nearest key, and the README's table agrees."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lib.conf import parse_conf
from lib.configs import CONF_KEYS

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_table() -> dict[str, str]:
    """key -> the 'values (default first)' cell of the README's configuration table."""
    text = README.read_text()
    section = text[text.index("## Server configuration") :]
    section = section[: section.index("\n## ", 4)]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z0-9_]+)` \| ([^|]*) \|", section, re.M)}


def test_readme_lists_every_key_with_its_default_and_choices():
    table = readme_table()
    assert set(table) == set(CONF_KEYS)
    for name, key in CONF_KEYS.items():
        values = re.findall(r"`([^`]*)`", table[name])
        if key.default:
            assert values and values[0] == key.default, (name, table[name])
        named = set(values) | {part for value in values for part in value.split(",")}
        assert set(key.choices) <= named, (name, table[name])


def test_defaults_are_typed():
    conf = parse_conf({})
    assert conf["lora_rank"] is None and parse_conf({"lora_rank": "8"})["lora_rank"] == 8  # None: the model's own
    assert conf["recipe"] == "fewshot" and conf["auto_scoring"] is True and conf["handout_timeout"] == 900.0
    assert conf["backbone"] == "litemedsam" and conf["masg_modules"] == "hae,bfe,dsf"
    assert parse_conf(conf) == conf  # parsed values parse to themselves
    assert parse_conf({"preload": "1", "masg_modules": " hae , dsf "})["masg_modules"] == "hae,dsf"


@pytest.mark.parametrize(
    "conf, message",
    [
        ({"lora_rnak": "8"}, "--conf lora_rnak: not a key of this app. By 'lora_rnak', did you mean 'lora_rank'?"),
        ({"precision": "bf61"}, "--conf precision 'bf61': By 'bf61', did you mean 'bf16'?"),
        ({"max_epochs": "0"}, "--conf max_epochs '0': must be at least 1"),
        ({"handout_timeout": "soon"}, "--conf handout_timeout 'soon': expected float"),
        ({"endpoints": "logs,wsi"}, "--conf endpoints 'logs,wsi': Unsupported option 'wsi'"),
    ],
)
def test_bad_keys_and_values_name_the_problem(conf, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_conf(conf)


def test_object_labels_must_name_labels():
    from lib.configs.sam_segmentation import DEFAULT_LABELS, parse_object_labels

    assert parse_object_labels(" grey matter ,", DEFAULT_LABELS) == {"grey matter"}
    with pytest.raises(ValueError, match=re.escape("--conf object_labels 'gray mater': By 'gray mater', did you mean 'grey matter'?")):
        parse_object_labels("gray mater", DEFAULT_LABELS)
