"""The concept token's own text embedding (pivotal tuning): trained beside the adapter, stored in its file.

Training adds the token to the tokenizer as one new word and learns its input embedding, so that prompts
with the token differ from every prompt without it at the text encoder's input; the text encoder's own
weights stay frozen. Loading and unloading go through diffusers' textual-inversion loader, the same
one plain diffusers uses for the exported embedding file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..atomic import atomic_path
from ..errors import AdapterFormatError, ConfigError

logger = logging.getLogger(__name__)

# The token's embedding (1 x text-encoder width) in the adapter file and among the trainer's parameters
# (checkpoints, the kept step's snapshot); never a UNet parameter's name.
TOKEN_EMBEDDING_KEY = "text_encoder.token_embedding"
_TOKENS_ATTR = "_filteratom_tokens"


def _has_text_side(pipe: Any) -> bool:
    return getattr(pipe, "tokenizer", None) is not None and getattr(pipe, "text_encoder", None) is not None


def _in_vocabulary(tokenizer: Any, token: str) -> bool:
    return token in tokenizer.get_vocab()  # added tokens included, as diffusers' loader checks


def initial_embedding(pipe: Any, init_word: str) -> Tensor:
    """The mean input embedding of the pieces `init_word` tokenizes into (where the new token starts)."""
    ids = pipe.tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise ConfigError(f"--token-init {init_word!r} tokenizes to nothing; give a word.")
    table = pipe.text_encoder.get_input_embeddings().weight
    return table[torch.tensor(ids, device=table.device)].detach().float().mean(dim=0).cpu()


def add_token(pipe: Any, token: str, embedding: Tensor) -> None:
    """Add `token` to the pipeline's tokenizer as one word whose input embedding is `embedding`."""
    if not _has_text_side(pipe):
        raise ConfigError("A trained token embedding needs a pipeline with a tokenizer and a text encoder.")
    if _in_vocabulary(pipe.tokenizer, token):
        raise ConfigError(f"The token {token!r} is already a word of this tokenizer (another adapter's, or the "
                          "model's own); unload that adapter or train with another --token.")
    pipe.load_textual_inversion({token: embedding.detach().cpu()}, token=token)


def remove_token(pipe: Any, token: str) -> None:
    """Remove a token that `add_token` added; the tokenizer and embedding table are as before."""
    if _has_text_side(pipe) and _in_vocabulary(pipe.tokenizer, token):
        pipe.unload_textual_inversion(token)


class TrainableToken(nn.Module):
    """A new token whose input embedding is a trainable vector, swapped in by a hook on the embedding table.

    Only prompts holding the token see the vector, and gradients reach it through the frozen text encoder.
    """

    def __init__(self, pipe: Any, token: str, init_word: str) -> None:
        super().__init__()
        start = initial_embedding(pipe, init_word)
        add_token(pipe, token, start)
        self.token, self.token_id = token, pipe.tokenizer.convert_tokens_to_ids(token)
        self.vector = nn.Parameter(start.to(pipe.text_encoder.device))
        self._hook = pipe.text_encoder.get_input_embeddings().register_forward_hook(self._swap_in)

    def _swap_in(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        hit = (args[0] == self.token_id).unsqueeze(-1)
        if not bool(hit.any()):
            return output  # prompts without the token stay exactly the base model's
        return torch.where(hit, self.vector.to(output.dtype), output)

    def detach_hook(self) -> None:
        """Stop swapping the vector in (the table's row keeps the value it was added with)."""
        self._hook.remove()

    def state(self) -> Tensor:
        """The embedding as the adapter file stores it: 1 x width, float32, on the CPU."""
        return self.vector.detach().float().cpu().unsqueeze(0)


def write_embedding_file(embedding: Tensor, path: Path) -> None:
    """The token's embedding as a textual-inversion file ("emb_params": AUTOMATIC1111's and ComfyUI's key,
    which diffusers' `load_textual_inversion(path, token=...)` reads too), written atomically."""
    with atomic_path(path) as tmp:
        save_file({"emb_params": embedding.detach().float().cpu().reshape(1, -1).contiguous()}, str(tmp))


def attach_token(pipe: Any, unet: nn.Module, adapter_name: str, token: str, embedding: Tensor) -> bool:
    """At load: add the adapter's token with its embedding (1 x width, as `read_adapter` checks); False (and a
    warning) for a bare UNet."""
    if not _has_text_side(pipe):
        logger.warning("the adapter's token embedding for %s is not loaded: pass the pipeline, not the UNet", token)
        return False
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    if embedding.shape[1] != width:
        raise AdapterFormatError(f"The adapter's token embedding is {embedding.shape[1]} wide; this text encoder's "
                                 f"embeddings are {width} wide.")
    add_token(pipe, token, embedding[0])
    tokens = dict(getattr(unet, _TOKENS_ATTR, {}))
    tokens[adapter_name] = token
    setattr(unet, _TOKENS_ATTR, tokens)
    return True


def release_token(unet: nn.Module, adapter_name: str) -> str | None:
    """Forget which token the named adapter added (the token stays loaded); returns it, or None."""
    tokens = dict(getattr(unet, _TOKENS_ATTR, {}))
    token = tokens.pop(adapter_name, None)
    setattr(unet, _TOKENS_ATTR, tokens)
    return token


def detach_token(pipe_or_unet: Any, unet: nn.Module, adapter_name: str) -> None:
    """At unload: remove the token the named adapter added, if it added one."""
    token = release_token(unet, adapter_name)
    if token is not None:
        remove_token(pipe_or_unet, token)
