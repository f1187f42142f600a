"""Textual-inversion embeddings (diffusers learned-embeddings files) for the text-conditioned priors.

A file is a safetensors mapping {placeholder token: tensor (D,) or (n, D)}, the format diffusers' textual-inversion
training writes (`learned_embeds.safetensors`). Loading adds each placeholder to the prior's tokenizer and its
vectors to the text encoder's token-embedding table; a token of n vectors becomes n tokens (`<tok>`, `<tok>_1`,
... as diffusers' `load_textual_inversion` names them) and a prompt's `<tok>` is expanded to all of them. Pickled
files (`.bin`, `.pt`) are never read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shared.errors import FailedPrecondition, NotFound

FIELD = "learned_embeddings"


def read_learned_embeddings(path: Path) -> dict[str, torch.Tensor]:
    """{token: (n, D) float32} from a diffusers learned-embeddings safetensors file."""
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise FailedPrecondition(f"learned embeddings must be a .safetensors file, not {path.name}", FIELD)
    if not path.is_file():
        raise NotFound(f"learned embeddings file {path} is missing on the server", FIELD)
    vectors = {}
    for token, tensor in load_file(str(path)).items():
        if tensor.ndim not in (1, 2) or tensor.shape[-1] == 0:
            raise FailedPrecondition(f"{path.name}: {token!r} has shape {list(tensor.shape)}, not (D,) or (n, D)", FIELD)
        vectors[token] = tensor.reshape(-1, tensor.shape[-1]).float()
    if not vectors:
        raise FailedPrecondition(f"{path.name} holds no embeddings", FIELD)
    return vectors


def token_names(token: str, count: int) -> list[str]:
    """The tokens one placeholder of `count` vectors becomes (diffusers' naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def add_to_text_model(tokenizer, text_encoder: torch.nn.Module, vectors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Adds the placeholders to the tokenizer and their vectors to the text encoder (in place).

    Returns {placeholder: its expansion in prompts} for placeholders of several vectors. A placeholder that the
    tokenizer already knows, or vectors of another width than the encoder's, are FailedPrecondition."""
    table = text_encoder.get_input_embeddings()
    width = table.weight.shape[1]
    new_tokens: list[str] = []
    for token, rows in vectors.items():
        if rows.shape[1] != width:
            raise FailedPrecondition(f"{token!r} has width {rows.shape[1]}, the text encoder {width}", FIELD)
        names = token_names(token, rows.shape[0])
        taken = [name for name in names if name in tokenizer.get_vocab()]
        if taken:
            raise FailedPrecondition(f"token {taken[0]!r} is already in the tokenizer's vocabulary", FIELD)
        new_tokens += names
    tokenizer.add_tokens(new_tokens)
    if len(tokenizer) > table.weight.shape[0]:
        text_encoder.resize_token_embeddings(len(tokenizer))
        table = text_encoder.get_input_embeddings()
    expansions = {}
    with torch.no_grad():
        for token, rows in vectors.items():
            names = token_names(token, rows.shape[0])
            ids = tokenizer.convert_tokens_to_ids(names)
            table.weight[ids] = rows.to(table.weight.device, table.weight.dtype)
            if len(names) > 1:
                expansions[token] = " ".join(names)
    return expansions


def expand_placeholders(prompt: str, expansions: dict[str, str]) -> str:
    for token, expansion in expansions.items():
        prompt = prompt.replace(token, expansion)
    return prompt
