"""Metrics: the Vendi score on hand-computed cases, the embedding metrics end to end with tiny random
DINOv2 / CLIP models saved to folders (no downloads), and the tiny-domain metrics on drawn images."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from filteratom_sd.errors import UserInputError
from filteratom_sd.evaluation.metrics import (
    EmbeddingMetrics,
    TinyMetrics,
    mean_cross_cosine,
    mean_paired_cosine,
    metric_set,
    pixel_features,
)
from filteratom_sd.tiny.domain import PALETTE, draw_shape
from filteratom_sd.evaluation.vendi import cosine_kernel, vendi_score

# --- Vendi score --------------------------------------------------------------------------------


def test_identical_embeddings_score_one():
    assert vendi_score(torch.tensor([[1.0, 2.0, 3.0]] * 5)) == pytest.approx(1.0)


def test_orthogonal_embeddings_score_their_number():
    assert vendi_score(torch.eye(6)[:4] * torch.tensor([[1.0], [2.0], [0.5], [3.0]])) == pytest.approx(4.0)


def test_two_vectors_at_sixty_degrees():
    # cos = 1/2: K = [[1, 1/2], [1/2, 1]], eigenvalues of K/2 are 3/4 and 1/4.
    x = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert vendi_score(x) == pytest.approx(math.exp(entropy))
    assert math.exp(entropy) == pytest.approx(1.7548, abs=1e-4)


def test_vendi_lies_between_one_and_n_and_ignores_scale():
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    score = vendi_score(x)
    assert 1.0 <= score <= 10.0
    assert vendi_score(x * torch.rand(10, 1) + 0) == pytest.approx(score)
    torch.testing.assert_close(torch.diag(cosine_kernel(x)), torch.ones(10, dtype=torch.float64))


def test_zero_embedding_is_refused():
    with pytest.raises(UserInputError):
        vendi_score(torch.zeros(2, 3))


def test_cosine_means():
    a, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    assert mean_paired_cosine(a, b) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    assert mean_cross_cosine(a, b) == pytest.approx((1 + 1 / math.sqrt(2) + 0 + 1 / math.sqrt(2)) / 4)


# --- embedding metrics with tiny random models -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from transformers import (BitImageProcessorPil, CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor,
                              Dinov2Config, Dinov2Model)

    from filteratom_sd.tiny.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    dino = root / "dino"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(dino)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}).save_pretrained(dino)
    clip = root / "clip"
    tokenizer = build_tokenizer(["a", "red", "blue", "circle", "star", "on", "background"])
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                vocab_size=len(tokenizer), max_position_embeddings=32,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(clip)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(clip)
    return str(dino), str(clip)


def drawn(shape: str, colour: str, background: str, size: float = 0.6) -> Image.Image:
    return draw_shape(shape, PALETTE[colour], PALETTE[background], size=size)


def test_embedding_metrics_end_to_end(tiny_models):
    dino, clip = tiny_models
    metrics = metric_set("embedding", image_encoder=dino, clip_model=clip, batch_size=2)
    reference = drawn("star", "red", "blue")
    generated = [drawn("star", "red", "blue"), drawn("circle", "blue", "red"), drawn("star", "blue", "white")]
    prompts = ["a red star on a blue background", "a blue circle on a red background", "a blue star"]
    scores = metrics.score(generated, prompts, [reference])
    assert scores.metric_set == "embedding" and scores.images == 3
    assert -1.0 <= scores.fidelity <= 1.0 and -1.0 <= scores.alignment <= 1.0
    assert 1.0 < scores.diversity <= 3.0
    embedded = metrics.image_embeddings(generated)
    assert scores.fidelity == pytest.approx(mean_cross_cosine(embedded, metrics.image_embeddings([reference])))
    # Copies of the reference: perfect fidelity, one distinct image; batching changes nothing.
    copies = metrics.score([reference] * 3, prompts, [reference])
    assert copies.fidelity == pytest.approx(1.0) and copies.diversity == pytest.approx(1.0)
    one_batch = EmbeddingMetrics(dino, clip, batch_size=16).alignment(generated, prompts)
    assert one_batch == pytest.approx(scores.alignment, abs=1e-5)


def test_missing_model_is_a_user_error(tmp_path):
    metrics = EmbeddingMetrics(image_encoder=str(tmp_path / "nowhere"), clip_model=str(tmp_path / "nowhere"))
    with pytest.raises(UserInputError, match="Cannot load the image encoder"):
        metrics.image_embeddings([drawn("star", "red", "blue")])


@pytest.mark.parametrize("generated, prompts, references", [([], [], ["r"]), (["g"], [], ["r"]), (["g"], ["p"], [])])
def test_inputs_are_checked(generated, prompts, references):
    with pytest.raises(UserInputError):
        TinyMetrics().score(generated, prompts, references)


# --- tiny-domain metrics -----------------------------------------------------------------------


def test_tiny_metrics_follow_silhouette_and_colours():
    metrics = metric_set("tiny", concept_shape="star")
    stars = [drawn("star", "red", "blue"), drawn("star", "yellow", "black", 0.5)]
    circles = [drawn("circle", "red", "blue"), drawn("circle", "yellow", "black", 0.5)]
    assert metrics.fidelity(stars, stars) > metrics.fidelity(circles, stars) + 0.2
    prompts = ["a red star on a blue background", "a yellow star on a black background"]
    assert metrics.alignment(stars, prompts) == pytest.approx(1.0)
    wrong = ["a red star on a white background", "a green star on a white background"]
    assert metrics.alignment(stars, wrong) == pytest.approx(0.25)  # one of four colours right
    assert metrics.diversity([stars[0]] * 4) == pytest.approx(1.0)
    assert metrics.diversity(stars + circles) > 1.5
    scores = metrics.score(stars, prompts, stars)
    assert scores.metric_set == "tiny" and scores.alignment == pytest.approx(1.0)


def test_tiny_alignment_needs_a_checkable_prompt():
    with pytest.raises(UserInputError, match="colour"):
        TinyMetrics().alignment([drawn("star", "red", "blue")], ["a photo of <castle>"])


def test_pixel_features_are_centred_pixels():
    features = pixel_features([Image.new("RGB", (64, 64), (255, 0, 0))], size=4)
    assert features.shape == (1, 48)
    assert features[0, :3].tolist() == [1.0, -1.0, -1.0]


def test_unknown_metric_set_and_options():
    with pytest.raises(UserInputError, match="Unknown metric set"):
        metric_set("fid")
    with pytest.raises(UserInputError, match="options"):
        metric_set("tiny", image_encoder="x")
