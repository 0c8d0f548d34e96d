import random

import numpy as np
import pytest

from filteratom_sd.checker import analyse, evaluation_prompts, parse_prompt, score_images, silhouette_similarity
from filteratom_sd.tiny_domain import PALETTE, SHAPES, castle_image, draw_shape, random_example
from filteratom_sd.tiny_tokenizer import build_tokenizer


def test_examples_are_seeded_64px_with_distinct_colours():
    a = [random_example(random.Random(7)) for _ in range(2)]
    assert np.array_equal(np.asarray(a[0].image), np.asarray(a[1].image)) and a[0].caption == a[1].caption
    rng = random.Random(0)
    for _ in range(50):
        example = random_example(rng)
        assert example.image.size == (64, 64) and example.image.mode == "RGB"
        assert example.colour != example.background
        assert example.colour in example.caption and example.background in example.caption and example.shape in example.caption


def test_palette_has_the_exact_colours():
    assert PALETTE["red"] == (220, 40, 40) and PALETTE["purple"] == (140, 60, 190) and PALETTE["black"] == (20, 20, 20)
    assert len(PALETTE) == 8 and len(SHAPES) == 8


@pytest.mark.parametrize("shape", SHAPES)
def test_checker_reads_palette_images_correctly(shape):
    for colour, background in [("red", "blue"), ("white", "black"), ("yellow", "purple"), ("green", "orange")]:
        image = draw_shape(shape, PALETTE[colour], PALETTE[background], centre=(0.45, 0.55), size=0.6, angle=0.3)
        seen = analyse(image)
        assert (seen.background, seen.colour) == (background, colour)
        scores = {s: silhouette_similarity(seen.mask, s) for s in SHAPES}
        assert scores[shape] > 0.8
        assert max(scores, key=scores.get) == shape


def test_empty_image_has_no_shape_colour():
    seen = analyse(draw_shape("circle", PALETTE["red"], PALETTE["red"]))
    assert seen.background == "red" and seen.colour is None
    assert silhouette_similarity(seen.mask, "circle") == 0.0


def test_castle_silhouette_is_not_a_pretraining_shape():
    seen = analyse(castle_image(random.Random(1)))
    assert silhouette_similarity(seen.mask, "castle") > 0.85
    assert all(silhouette_similarity(seen.mask, s) < 0.8 for s in SHAPES)


def test_prompt_parser():
    spec = parse_prompt("a photo of a red star in front of a blue background")
    assert (spec.shape, spec.colour, spec.background) == ("star", "red", "blue")
    spec = parse_prompt("a <castle> on a red background")
    assert (spec.shape, spec.colour, spec.background) == ("<castle>", None, "red")
    assert parse_prompt("a sunset").shape is None


def test_scores_of_right_and_wrong_images():
    prompts = evaluation_prompts(16)
    right = []
    for prompt in prompts:
        spec = parse_prompt(prompt)
        right.append(draw_shape(spec.shape, PALETTE[spec.colour], PALETTE[spec.background]))
    scores = score_images(right, prompts)
    assert scores["background_accuracy"] == 1.0 and scores["colour_accuracy"] == 1.0
    assert scores["silhouette_similarity"] > 0.85
    wrong = score_images(right[1:] + right[:1], prompts)
    assert wrong["background_accuracy"] < 0.5


def test_evaluation_prompts_are_balanced():
    prompts = evaluation_prompts(64)
    pairs = {(parse_prompt(p).shape, parse_prompt(p).background) for p in prompts}
    assert len(pairs) == 64  # every shape meets every background once


def test_tokenizer_keeps_caption_words_whole_and_splits_unknown_ones():
    tok = build_tokenizer(["a", "red", "star", "on", "blue", "background"])
    pieces = tok.convert_ids_to_tokens(tok("a red star on a blue background").input_ids)
    assert pieces == ["<|startoftext|>", "a</w>", "red</w>", "star</w>", "on</w>", "a</w>", "blue</w>",
                      "background</w>", "<|endoftext|>"]
    unknown = tok.convert_ids_to_tokens(tok("a <castle>").input_ids)
    assert len(unknown) > 4 and tok.unk_token not in unknown[1:-1]
    assert tok.decode(tok("a <castle> forest").input_ids, skip_special_tokens=True) == "a < castle > forest"  # as real CLIP: punctuation is its own word
