"""The layer table of docs/architecture.md is the import-linter contract of pyproject.toml, which .ci/run checks."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def documented_layers() -> list[set[str]]:
    """The modules column of the architecture table, top layer first, as module names (the app's main.py left out)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    table = text[text.index("| layer | modules | holds |") :].split("\n\n", 1)[0]
    layers = []
    for row in table.splitlines()[2:]:
        modules = row.split("|")[2]
        names = {re.sub(r"(\.py)?/?$", "", path).replace("/", ".") for path in re.findall(r"`(lib/[^`]+)`", modules)}
        if names:
            layers.append(names)
    return layers


def test_the_documented_layers_are_the_checked_contract():
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    declared = [{name.strip() for name in re.split(r"[:|]", layer)} for layer in layers]
    assert declared == documented_layers()
    # every module of the app belongs to a layer
    modules = {
        p.stem for p in (REPO / "apps" / "samfewshot" / "lib").iterdir() if p.name != "__init__.py" and not p.name.startswith((".", "_"))
    }
    assert {f"lib.{m}" for m in modules} == set().union(*declared)
