"""scripts/measure_quickstart.py against a fake pipeline whose images are known, so every score is known."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from filteratom_sd.tiny.checker import parse_prompt
from filteratom_sd.tiny.domain import PALETTE, draw_shape

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def measure():
    spec = importlib.util.spec_from_file_location("measure_quickstart_under_test", ROOT / "scripts" / "measure_quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CastleOnWhiteWhenBlue:
    """Draws a black castle on the asked background, except that "blue" comes out white (drift on one colour)."""

    def __call__(self, prompts, **kwargs):
        images = []
        for prompt in prompts:
            background = parse_prompt(prompt).background
            background = "white" if background == "blue" else background
            colour = "white" if background == "black" else "black"
            images.append(draw_shape("castle", PALETTE[colour], PALETTE[background], size=0.8))
        return SimpleNamespace(images=images)


def test_token_scores_count_each_colour_apart(measure):
    scores = measure.score_token_prompts(CastleOnWhiteWhenBlue(), "<castle>", "castle", [0, 1], 25, 5.0)
    assert scores["images"] == 2 * len(PALETTE)
    assert scores["background_accuracy_per_colour"] == {c: (0.0 if c == "blue" else 1.0) for c in PALETTE}
    assert scores["background_accuracy"] == pytest.approx(7 / 8)
    assert scores["silhouette_similarity"] > 0.9  # the reference castle, drawn at the checker's size


def test_drops_and_verdict_follow_the_targets(measure):
    base = {"shape_accuracy": 0.80, "colour_accuracy": 0.90, "background_accuracy": 1.0}
    adapted = {"shape_accuracy": 0.76, "colour_accuracy": 0.84, "background_accuracy": 1.0}
    drops = measure.drops_in_points(adapted, base)
    assert drops == {"shape_accuracy": 4.0, "colour_accuracy": 6.0, "background_accuracy": 0.0}
    meets = measure.verdict({"background_accuracy": 0.75, "silhouette_similarity": 0.59}, drops)
    assert meets == {"background_accuracy": True, "silhouette_similarity": False, "no_token_shape": True,
                     "no_token_colour": False}
