"""Pivotal tuning: the token's embedding is trained beside the atoms, stored in the adapter, loaded and unloaded."""

from __future__ import annotations

import logging
import signal

import pytest
import torch
from safetensors.torch import load_file

from filteratom_sd.core.adapter_file import read_adapter
from filteratom_sd.core.api import load_adapter, merge_and_unload, unload_adapter
from filteratom_sd.core.inject import attached_adapters
from filteratom_sd.core.token_embedding import TrainableToken, initial_embedding
from filteratom_sd.errors import ConfigError
from filteratom_sd.export import export_adapter
from filteratom_sd.models import load_pipeline
from filteratom_sd.training.latents import encode_prompts
from filteratom_sd.training.loop import TrainingInterrupted, train

from .test_cli import assert_user_error, run_cli
from .test_train import _interrupt_at
from .train_helpers import CASTLE, quick_settings

TOKEN = "<castle>"
WITH_TOKEN, WITHOUT_TOKEN = "a <castle> on a red background", "a red square on a blue background"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Four steps that learn the token's embedding with the atoms, a checkpoint at step 2."""
    out = tmp_path_factory.mktemp("token") / "castle"
    train(quick_settings(out, lr=5e-2, train_token=True, token_init="square", token_lr=0.5), progress=False)
    return out


def _table(pipe) -> torch.Tensor:
    return pipe.text_encoder.get_input_embeddings().weight.detach().clone()


def test_the_adapter_holds_a_trained_token_embedding_and_each_checkpoint_its_own(run):
    final = read_adapter(run / "castle.safetensors")
    at_step_2 = read_adapter(run / "checkpoints" / "step-000002")
    start = initial_embedding(load_pipeline(None), "square")
    assert final.token == TOKEN and final.token_embedding.shape == (1, start.shape[0])
    assert TOKEN not in str(sorted(final.tensors))  # the UNet's tensors are apart from the embedding
    moved = (final.token_embedding[0] - start).norm() / start.norm()
    assert moved > 0.05, moved
    assert not torch.equal(final.token_embedding, at_step_2.token_embedding)


def test_loading_adds_the_token_and_unloading_restores_the_text_side(run):
    pipe = load_pipeline(None)
    size, table = len(pipe.tokenizer), _table(pipe)
    before = encode_prompts(pipe, [WITH_TOKEN, WITHOUT_TOKEN], "cpu")
    name = load_adapter(pipe, run / "castle.safetensors")
    assert pipe.tokenizer.tokenize(WITH_TOKEN)[1] == TOKEN
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(TOKEN)]
    assert torch.equal(row.detach(), read_adapter(run / "castle.safetensors").token_embedding[0])
    loaded = encode_prompts(pipe, [WITH_TOKEN, WITHOUT_TOKEN], "cpu")
    assert torch.equal(loaded[1], before[1])  # prompts without the token are untouched
    assert not torch.allclose(loaded[0], before[0])
    unload_adapter(pipe, name)
    assert len(pipe.tokenizer) == size and torch.equal(_table(pipe), table)
    assert torch.equal(encode_prompts(pipe, [WITH_TOKEN, WITHOUT_TOKEN], "cpu"), before)


def test_a_second_adapter_with_the_same_token_is_refused_and_leaves_nothing_behind(run):
    pipe = load_pipeline(None)
    load_adapter(pipe, run / "castle.safetensors")
    size, table = len(pipe.tokenizer), _table(pipe)
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ConfigError, match="already a word"):
        load_adapter(pipe, run / "castle.safetensors", adapter_name="again")
    assert list(attached_adapters(pipe.unet)) == ["castle"]
    assert len(pipe.tokenizer) == size and torch.equal(_table(pipe), table)
    assert all(torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())


def test_merge_keeps_the_token_and_a_bare_unet_loads_the_layers_with_a_warning(run, caplog):
    pipe = load_pipeline(None)
    load_adapter(pipe, run / "castle.safetensors")
    merge_and_unload(pipe)
    assert pipe.tokenizer.tokenize(WITH_TOKEN)[1] == TOKEN  # the merged weights still need their token
    bare = load_pipeline(None).unet
    with caplog.at_level(logging.WARNING):
        name = load_adapter(bare, run / "castle.safetensors")
    assert name in attached_adapters(bare)
    assert any("token embedding" in r.message for r in caplog.records)


def test_a_file_export_writes_the_embedding_that_diffusers_loads(run, tmp_path):
    out = tmp_path / "castle-lora.safetensors"
    result = export_adapter(run / "castle.safetensors", "lora", out, rank=4)
    assert result.embedding == tmp_path / "castle-lora.embedding.safetensors"
    stored = read_adapter(run / "castle.safetensors").token_embedding
    assert torch.equal(load_file(result.embedding)["emb_params"], stored)
    pipe = load_pipeline(None)  # what a user without filteratom-sd does with the file
    pipe.load_textual_inversion(str(result.embedding), token=TOKEN)
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(TOKEN)]
    assert torch.equal(row.detach(), stored[0])


def test_the_trainable_token_gets_gradients_and_leaves_other_prompts_exact():
    pipe = load_pipeline(None)
    base = encode_prompts(pipe, [WITHOUT_TOKEN], "cpu")
    token = TrainableToken(pipe, TOKEN, "square")
    pipe.text_encoder.requires_grad_(False)  # as the trainer freezes it
    ids = pipe.tokenizer([WITH_TOKEN, WITHOUT_TOKEN], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        token.vector.add_(1.0)  # the swapped-in vector, not the table's row, must reach the encoder
    out = pipe.text_encoder(ids)[0]
    assert torch.equal(out[1:2], base)
    out[0].sum().backward()
    assert token.vector.grad is not None and token.vector.grad.abs().sum() > 0
    assert all(p.grad is None for p in pipe.text_encoder.parameters())
    token.detach_hook()
    assert not torch.allclose(pipe.text_encoder(ids)[0][0], out[0].detach())


def test_train_token_without_an_initial_word_is_a_user_error(tmp_path, monkeypatch, capsys):
    result = run_cli(["train", "--concept", "castle", "--images", str(CASTLE), "--output-dir", str(tmp_path / "o"),
                      "--train-token"], monkeypatch, capsys)
    assert_user_error(result, "--token-init")
    assert not (tmp_path / "o").exists()
    result = run_cli(["train", "--concept", "castle", "--images", str(CASTLE), "--output-dir", str(tmp_path / "o"),
                      "--train-token", "--token-init", "square", "--token", "sks", "--prior-preservation",
                      "--class-prompt", "a photo of sks"], monkeypatch, capsys)
    assert_user_error(result, "must not contain the trained token")
    assert not (tmp_path / "o").exists()


def test_a_resumed_run_continues_the_token_embedding_exactly(tmp_path, monkeypatch):
    token = dict(train_token=True, token_init="square", token_lr=0.5, lr=5e-2, steps=4, checkpoint_every=100)
    whole = train(quick_settings(tmp_path / "whole", **token), progress=False)
    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 2, signal.SIGINT)
        with pytest.raises(TrainingInterrupted):
            train(quick_settings(out, **token), progress=False)
    resumed = train(quick_settings(out, **token), resume=True, progress=False)
    assert len(resumed.losses) == 4
    assert (out / "castle.safetensors").read_bytes() == whole.adapter_path.read_bytes()


def test_the_diffusers_folder_export_carries_the_token_in_its_tokenizer(run, tmp_path):
    from diffusers import StableDiffusionPipeline

    export_adapter(run / "castle.safetensors", "diffusers", tmp_path / "pipeline")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipeline"))
    assert pipe.tokenizer.tokenize(WITH_TOKEN)[1] == TOKEN
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(TOKEN)]
    assert torch.equal(row.detach(), read_adapter(run / "castle.safetensors").token_embedding[0])


def test_a_single_file_export_keeps_the_base_vocabulary_and_puts_the_token_beside(run, tmp_path):
    result = export_adapter(run / "castle.safetensors", "single-file", tmp_path / "castle.safetensors")
    tables = [v for k, v in load_file(result.path).items() if k.endswith("token_embedding.weight")]
    base = load_pipeline(None).text_encoder.get_input_embeddings().weight
    assert len(tables) == 1 and torch.equal(tables[0], base.detach())  # what plain loaders expect
    assert result.embedding == tmp_path / "castle.embedding.safetensors" and result.embedding.is_file()


@pytest.mark.parametrize("change", ["narrow", "two-rows", "no-token"])
def test_a_malformed_token_embedding_is_refused_and_leaves_the_pipeline_as_it_was(run, tmp_path, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from filteratom_sd.errors import AdapterFormatError

    source = run / "castle.safetensors"
    with safe_open(str(source), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    if change == "narrow":
        tensors["text_encoder.token_embedding"] = tensors["text_encoder.token_embedding"][:, :10].contiguous()
    elif change == "two-rows":
        tensors["text_encoder.token_embedding"] = tensors["text_encoder.token_embedding"].repeat(2, 1)
    else:
        metadata["token"] = ""
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    pipe = load_pipeline(None)
    size, table = len(pipe.tokenizer), _table(pipe)
    with pytest.raises(AdapterFormatError, match="token embedding"):
        load_adapter(pipe, bad)
    assert not attached_adapters(pipe.unet)
    assert len(pipe.tokenizer) == size and torch.equal(_table(pipe), table)
