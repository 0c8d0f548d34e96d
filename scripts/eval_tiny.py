"""Measure how well a tiny-domain pipeline follows prompts (64 prompts x 4 seeds by default).

    python scripts/eval_tiny.py                       # the bundled model, prints JSON
    python scripts/eval_tiny.py --write-card          # also (re)writes the bundled model's README.md
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from filteratom_sd.tiny.bundled import bundled_model_path
from filteratom_sd.tiny.model_card import evaluate, model_card

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("eval_tiny")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: the bundled model)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--write-card", action="store_true", help="(re)write README.md in the model folder")
    parser.add_argument("--summary", default=str(ROOT / ".pretrain" / "summary.json"), help="training summary for the card")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model = Path(args.model) if args.model else bundled_model_path()
    metrics = evaluate(model, args.prompts, args.seeds, args.steps, args.guidance_scale, args.threads)
    print(json.dumps(metrics, indent=2))
    if args.write_card:
        summary_path = Path(args.summary)
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        (model / "README.md").write_text(model_card(model, metrics, summary))
        logger.info("wrote %s", model / "README.md")


if __name__ == "__main__":
    main()
