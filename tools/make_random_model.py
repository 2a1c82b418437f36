"""Writes a random-weight model directory (config, tokenizer, seed; no checkpoint).

The torch backend generates the weights on its device from the seed when it loads the
directory, so a Llama-3-8B-shaped model needs no 16 GB checkpoint to travel:

    python tools/make_random_model.py --out /tmp/llama3-8b-random --preset llama-3-8b --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pd_serve.models.random_init import PRESETS, write_random_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory to write")
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama-3-8b")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02,
                   help="standard deviation of projection and embedding weights")
    args = p.parse_args(argv)
    try:
        out = write_random_model(args.out, args.preset, args.seed, args.std)
    except ValueError as exc:
        print(f"make_random_model: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.preset} (seed {args.seed}, std {args.std}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
