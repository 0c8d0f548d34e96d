"""Write the bundled concept image sets (assets/concepts/<name>/), seeded and reproducible.

castle: a grey castle silhouette (towers with crenellations, a shape absent from pretraining)
on one light background, at varied positions and sizes: DreamBooth in miniature.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from filteratom_sd.tiny.domain import castle_image

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "assets" / "concepts" / "castle"))
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    for i in range(args.count):
        castle_image(rng).save(out / f"castle_{i}.png", optimize=True)


if __name__ == "__main__":
    main()
