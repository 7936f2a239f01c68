# -*- test-case-name: runai.test.test_modes -*-
"""Prompts longer than CLIP's 77 tokens, encoded in chunks instead of silently cut.

The text encoder sees at most 75 tokens between its start and end tokens. A longer
prompt is split into chunks of 75 tokens, each encoded on its own, and the embeddings are
joined along the sequence (the UNet's cross-attention takes any length): the approach
AUTOMATIC1111's webui made familiar. Prompts that fit are left to diffusers, unchanged.
"""

import torch

from runai.core import errors

MAX_CHUNKS = 8


def token_ids(tokenizer, text):
    return tokenizer(text, truncation=False, add_special_tokens=False).input_ids if text else []


def needs_chunks(tokenizer, *texts):
    room = tokenizer.model_max_length - 2
    return any(len(token_ids(tokenizer, text)) > room for text in texts)


def encode(pipe, prompt, negative_prompt, device):
    """(prompt_embeds, negative_prompt_embeds) of equal length, one row each."""
    tokenizer = pipe.tokenizer
    room = tokenizer.model_max_length - 2
    ids = token_ids(tokenizer, prompt)
    negative_ids = token_ids(tokenizer, negative_prompt)
    chunks = max(1, -(-len(ids) // room), -(-len(negative_ids) // room))
    if chunks > MAX_CHUNKS:
        raise errors.RunaiError(
            errors.OUT_OF_RANGE,
            f"the prompts are {max(len(ids), len(negative_ids))} tokens long; the limit is {MAX_CHUNKS * room}",
        )
    # Both sides get the same number of chunks: classifier-free guidance batches them.
    return _embed(pipe, tokenizer, ids, chunks, device), _embed(pipe, tokenizer, negative_ids, chunks, device)


def _embed(pipe, tokenizer, ids, chunks, device):
    room = tokenizer.model_max_length - 2
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for k in range(chunks):
        piece = ids[k * room:(k + 1) * room]
        rows.append([tokenizer.bos_token_id] + piece + [tokenizer.eos_token_id] + [pad] * (room - len(piece)))
    with torch.inference_mode():
        hidden = pipe.text_encoder(torch.tensor(rows, device=device))[0]
    # (chunks, 77, dim) -> (1, chunks * 77, dim)
    return hidden.reshape(1, -1, hidden.shape[-1]).to(pipe.unet.dtype)
