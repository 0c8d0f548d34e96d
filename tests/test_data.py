"""Concept images: reading, conversion, captions, views and masks."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from filteratom_sd.training.data import image_to_tensor, instance_prompts, load_concept_images, training_views
from filteratom_sd.errors import DataError
from filteratom_sd.training.latents import loss_weights


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_modes_orientation_and_transparency(tmp_path):
    left_red = Image.new("RGB", (20, 10), (255, 255, 255))
    left_red.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    _save(left_red, tmp_path / "a_rotated.jpg", exif=exif, quality=95)
    _save(Image.new("L", (12, 12), 128), tmp_path / "b_grey.png")
    _save(Image.new("RGB", (12, 12), (0, 204, 0)).convert("P"), tmp_path / "c_palette.png")
    rgba = Image.new("RGBA", (12, 12), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 6, 12))
    _save(rgba, tmp_path / "d_cutout.png")
    images = load_concept_images(tmp_path)
    assert [i.path.name for i in images] == ["a_rotated.jpg", "b_grey.png", "c_palette.png", "d_cutout.png"]
    assert all(i.image.mode == "RGB" for i in images)
    rotated = np.asarray(images[0].image)
    assert rotated.shape[:2] == (20, 10) and rotated[0, 5, 0] > 200 and rotated[0, 5, 1] < 60  # red now on top
    assert images[1].image.getpixel((3, 3)) == (128, 128, 128)
    assert images[2].image.getpixel((3, 3)) == (0, 204, 0)
    cutout = images[3]
    assert cutout.image.getpixel((10, 3)) == (255, 255, 255)  # transparent pixels flattened onto white
    assert cutout.mask is not None and cutout.mask.getpixel((2, 3)) == 255 and cutout.mask.getpixel((10, 3)) == 0
    assert all(i.mask is None for i in images[:3])


def test_captions_from_metadata_and_text_files_else_templates(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _save(Image.new("RGB", (16, 16)), tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a <x> at dusk"}) + "\n")
    (tmp_path / "b.txt").write_text("a <x> in snow\n")
    images = load_concept_images(tmp_path)
    assert instance_prompts(images, "<x>", ["a photo of a {}", "a {}"]) == ["a <x> at dusk", "a <x> in snow", "a photo of a <x>"]
    (tmp_path / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="line 1"):
        load_concept_images(tmp_path)


def test_unreadable_and_tiny_files_are_skipped_with_a_warning(tmp_path, caplog):
    _save(Image.new("RGB", (16, 16)), tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    _save(Image.new("RGB", (1, 1)), tmp_path / "dot.png")
    (tmp_path / "notes.md").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="filteratom_sd.training.data"):
        images = load_concept_images(tmp_path)
    assert [i.path.name for i in images] == ["good.png"]
    assert "broken.png" in caplog.text and "dot.png" in caplog.text and "1 images" in caplog.text


def test_views_resize_crop_and_flip_their_masks_with_them():
    image = Image.new("RGB", (32, 16), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 8, 16))  # white strip on the left
    mask = Image.new("L", (32, 16), 0)
    mask.paste(255, (0, 0, 8, 16))
    views, masks, owners = training_views([image, image], 8, True, True, seed=0, masks=[mask, None])
    assert views.shape == (4, 3, 8, 8) and masks.shape == (4, 1, 8, 8) and owners == [0, 0, 1, 1]
    # centre crop of the 16x8 resize keeps columns 4..11: the strip (columns 0..3) is cut away
    assert torch.equal(views[0], image_to_tensor(image, 8, True))
    assert masks[0].max() < 0.1 and torch.equal(masks[2], torch.ones(1, 8, 8))
    square = Image.new("RGB", (8, 8), (0, 0, 0))
    square.paste((255, 255, 255), (0, 0, 2, 8))
    square_mask = Image.new("L", (8, 8), 0)
    square_mask.paste(255, (0, 0, 2, 8))
    views, masks, _ = training_views([square], 8, True, True, seed=0, masks=[square_mask])
    assert masks[0, 0, :, :2].min() > 0.99 and masks[0, 0, :, 2:].max() < 0.01
    assert torch.equal(masks[1], masks[0].flip(-1)) and torch.equal(views[1], views[0].flip(-1))
    assert torch.equal((views[0][0] > 0).float(), masks[0][0])  # the mask marks exactly the white strip


def test_loss_weights_average_the_mask_over_each_latent_pixel():
    masks = torch.zeros(1, 1, 8, 8)
    masks[..., :, :4] = 1.0
    masks[..., 0, 4] = 1.0  # one pixel of 4 in latent cell (0, 2)
    weights = loss_weights(masks, (4, 4), unmasked_weight=0.2)
    assert torch.allclose(weights[0, 0, :, :2], torch.ones(4, 2))
    assert torch.isclose(weights[0, 0, 0, 2], torch.tensor(0.2 + 0.8 * 0.25))
    assert torch.allclose(weights[0, 0, 1:, 2:], torch.full((3, 2), 0.2))
    assert torch.equal(loss_weights(masks, (4, 4), unmasked_weight=1.0), torch.ones(1, 1, 4, 4))


def test_folder_problems_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_concept_images(tmp_path / "missing")
    with pytest.raises(DataError, match="holds no"):
        load_concept_images(tmp_path)
