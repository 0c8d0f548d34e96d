import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from filteratom_sd.tiny.domain import (
    CASTLE_GREY,
    IMAGE_SIZE,
    PALETTE,
    PHRASINGS,
    SHAPES,
    caption,
    caption_vocabulary,
    castle_image,
    castle_mask,
    draw_shape,
    random_example,
    shape_mask,
)
from filteratom_sd.tiny.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def test_examples_are_seeded_64px_with_distinct_colours():
    a = [random_example(random.Random(7)) for _ in range(2)]
    assert np.array_equal(np.asarray(a[0].image), np.asarray(a[1].image)) and a[0].caption == a[1].caption
    b = random_example(random.Random(8))
    assert not np.array_equal(np.asarray(a[0].image), np.asarray(b.image))
    rng = random.Random(0)
    seen_shapes, seen_phrasings = set(), set()
    for _ in range(200):
        example = random_example(rng)
        assert example.image.size == (IMAGE_SIZE, IMAGE_SIZE) == (64, 64) and example.image.mode == "RGB"
        assert example.colour != example.background and example.shape in SHAPES
        assert example.caption in {p.format(fg=example.colour, shape=example.shape, bg=example.background) for p in PHRASINGS}
        pixels = np.asarray(example.image)
        assert tuple(pixels[0, 0]) == PALETTE[example.background]  # plain background in the exact colour
        assert (pixels == np.asarray(PALETTE[example.colour])).all(-1).sum() > 50  # solid shape in the exact colour
        seen_shapes.add(example.shape)
        seen_phrasings.add(example.caption.replace(example.colour, "{fg}", 1))
    assert seen_shapes == set(SHAPES) and len(seen_phrasings) > len(PHRASINGS)


def test_position_size_and_rotation_are_jittered():
    rng = random.Random(3)
    boxes = set()
    for _ in range(20):
        example = random_example(rng, shapes=("square",))
        mask = (np.asarray(example.image) == np.asarray(PALETTE[example.colour])).all(-1)
        rows, cols = np.nonzero(mask)
        boxes.add((rows.min(), cols.min(), rows.max() - rows.min()))
    assert len(boxes) > 15


def test_palette_has_the_exact_colours():
    assert PALETTE == {
        "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
        "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
    }
    assert SHAPES == ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "ring")


def test_shapes_have_distinct_masks_and_unknown_shapes_are_refused():
    masks = {s: shape_mask(s) for s in SHAPES + ("castle",)}
    for a in masks:
        for b in masks:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.85, (a, b, iou)
    assert not masks["ring"][32, 32] and masks["circle"][32, 32]  # the ring has a hole
    assert np.array_equal(castle_mask(), masks["castle"])
    with pytest.raises(ValueError):
        draw_shape("hexagon", (0, 0, 0), (255, 255, 255))


def test_captions_and_vocabulary():
    assert caption("star", "red", "blue") == "a red star on a blue background"
    assert caption("<castle>", "red", "blue") == "a red <castle> on a blue background"
    vocabulary = caption_vocabulary()
    assert {"red", "star", "background", "photo", "front"} <= set(vocabulary) and "castle" not in vocabulary


def test_castle_images_are_grey_on_one_light_background_and_vary():
    rng = random.Random(0)
    images = [np.asarray(castle_image(rng)) for _ in range(5)]
    assert all(im.shape == (64, 64, 3) for im in images)
    assert len({tuple(im[0, 0]) for im in images}) == 1 and min(images[0][0, 0]) > 200
    assert all((im == np.asarray(CASTLE_GREY)).all(-1).sum() > 300 for im in images)
    boxes = []
    for im in images:
        rows, cols = np.nonzero((im == np.asarray(CASTLE_GREY)).all(-1))
        boxes.append((rows.min(), cols.min(), rows.max() - rows.min()))
    assert len(set(boxes)) == 5 and len({b[2] for b in boxes}) >= 3  # positions and sizes differ


def test_bundled_concept_set_matches_its_generator():
    folder = ROOT / "assets" / "concepts" / "castle"
    files = sorted(folder.glob("*.png"))
    assert [f.name for f in files] == [f"castle_{i}.png" for i in range(5)]
    rng = random.Random(0)  # scripts/make_concepts.py's default seed
    for file in files:
        with Image.open(file) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
            assert np.array_equal(np.asarray(image), np.asarray(castle_image(rng)))


def test_tokenizer_keeps_caption_words_whole_and_splits_unknown_ones():
    tok = build_tokenizer(["a", "red", "star", "on", "blue", "background"])
    pieces = tok.convert_ids_to_tokens(tok("a red star on a blue background").input_ids)
    assert pieces == ["<|startoftext|>", "a</w>", "red</w>", "star</w>", "on</w>", "a</w>", "blue</w>",
                      "background</w>", "<|endoftext|>"]
    unknown = tok.convert_ids_to_tokens(tok("a <castle> forest").input_ids)
    assert len(unknown) > 6 and tok.unk_token not in unknown[1:-1]
    assert tok.decode(tok("a <castle> forest").input_ids, skip_special_tokens=True) == "a < castle > forest"  # as real CLIP: punctuation is its own word
    assert tok.model_max_length == 32
    assert len(tok("red " * 100, truncation=True).input_ids) == 32


def test_tokenizer_is_deterministic():
    words = caption_vocabulary()
    a, b = build_tokenizer(words), build_tokenizer(list(reversed(words)))
    assert a.get_vocab() == b.get_vocab()
