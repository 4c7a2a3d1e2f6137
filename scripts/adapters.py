"""List the published adapter versions of a model, or serve an earlier one again.

    .venv/bin/python scripts/adapters.py list hf_sam
    .venv/bin/python scripts/adapters.py restore hf_sam 3

A restore publishes the old tensors as a new version (atomically), so a running server picks it up at its
next request without a restart, and the history keeps every version, the restored one included.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "apps", "samfewshot"))

from lib.adapters import history_path, list_versions, read_adapter, restore_adapter  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["list", "restore"])
    parser.add_argument("model", help="model name, e.g. hf_sam")
    parser.add_argument("version", nargs="?", type=int, help="version to restore")
    parser.add_argument("--model-dir", default=os.path.join(REPO, "apps", "samfewshot", "model"))
    args = parser.parse_args(argv)

    path = os.path.join(args.model_dir, f"{args.model}.pt")
    if args.action == "list":
        served = read_adapter(path)["version"] if os.path.exists(path) else 0
        for version in list_versions(path):
            payload = read_adapter(history_path(path, version))
            info = payload.get("info", {})
            metric = f"{info.get('metric_name', '')} {info.get('metric', float('nan')):.4f}" if "metric" in info else ""
            restored = f" (restored from v{info['restored_from']})" if "restored_from" in info else ""
            mark = "*" if version == served else " "
            print(f"{mark} v{version:04d}  {payload['created']}  {metric}{restored}")
        if served == 0:
            print(f"no adapter published for {args.model} in {args.model_dir}: the base weights are served")
        return 0
    if args.version is None:
        parser.error("restore needs a version number (see: list)")
    print(f"{args.model}: version {args.version} is served again as version {restore_adapter(path, args.version)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
