"""``python -m keel_edge verify BUNDLE`` and ``python -m keel_edge score BUNDLE < rows.json``.

``score`` reads ``{"rows": [...]}`` (or a bare list of rows) from standard input and prints
``{"scores": [...], "model": {...}, "variant": ...}``. Exit status 2 means the bundle failed
its hash checks, 3 that the rows broke the feature contract.
"""

from __future__ import annotations

import argparse
import json
import sys

from keel_edge.bundle import BundleIntegrityError, load_bundle, verify_bundle
from keel_edge.contract import ContractError


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="keel_edge", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check every file against the manifest")
    verify.add_argument("bundle")
    verify.add_argument("--sha256", default="", help="expected sha256 of manifest.json")
    score = commands.add_parser("score", help="score rows read from standard input")
    score.add_argument("bundle")
    score.add_argument("--variant", default="", help="fp32 or int8 (default: the manifest's)")
    score.add_argument("--sha256", default="", help="expected sha256 of manifest.json")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            manifest = verify_bundle(args.bundle, args.sha256)
            print(json.dumps({"verified": sorted(manifest["files"]), "model": manifest["model"]}))
            return 0
        bundle = load_bundle(args.bundle, args.variant, expected_manifest_sha256=args.sha256)
        payload = json.load(sys.stdin)
        rows = payload.get("rows") if isinstance(payload, dict) else payload
        scores = bundle.predict(rows)
    except BundleIntegrityError as error:
        print(f"keel_edge: {error}", file=sys.stderr)
        return 2
    except ContractError as error:
        print(f"keel_edge: {error}", file=sys.stderr)
        return 3
    print(json.dumps({"scores": scores.tolist(), "model": bundle.model, "variant": bundle.variant}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
