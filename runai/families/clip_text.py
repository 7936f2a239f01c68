# -*- test-case-name: runai.test.test_modes,runai.test.test_engine_xl -*-
"""Prompts longer than CLIP's 77 tokens, encoded in chunks instead of silently cut.

The text encoder sees at most 75 tokens between its start and end tokens. A longer
prompt is split into chunks of 75 tokens, each encoded on its own, and the embeddings are
joined along the sequence (the UNet's cross-attention takes any length): the approach
AUTOMATIC1111's webui made familiar. Prompts that fit are left to diffusers, unchanged.

Shared by the families whose text encoders are CLIP: one encoder here (:func:`encode`);
a family with two joins them in its own module. Encoding runs on the worker thread only
(torch is imported there: every module of this package is torch-free at import).
"""

from runai.core import errors

MAX_CHUNKS = 8


def token_ids(tokenizer, text):
    return tokenizer(text, truncation=False, add_special_tokens=False).input_ids if text else []


def tokenizers(pipe):
    """The pipeline's CLIP tokenizers: one, or two."""
    return [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]


def needs_chunks(tokenizer, *texts):
    room = tokenizer.model_max_length - 2
    return any(len(token_ids(tokenizer, text)) > room for text in texts)


def chunk_count(tokenizer, *texts):
    room = tokenizer.model_max_length - 2
    longest = max(len(token_ids(tokenizer, text)) for text in texts)
    chunks = max(1, -(-longest // room))
    if chunks > MAX_CHUNKS:
        raise errors.RunaiError(
            errors.OUT_OF_RANGE, f"the prompts are {longest} tokens long; the limit is {MAX_CHUNKS * room}")
    return chunks


def encode(pipe, prompt, negative_prompt, device):
    """(prompt_embeds, negative_prompt_embeds) of equal length, one row each."""
    tokenizer = pipe.tokenizer
    # Both sides get the same number of chunks: classifier-free guidance batches them.
    chunks = chunk_count(tokenizer, prompt, negative_prompt)
    return _embed(pipe, tokenizer, prompt, chunks, device), _embed(pipe, tokenizer, negative_prompt, chunks, device)


def rows_of(tokenizer, text, chunks):
    """``chunks`` rows of 77 tokens: start, up to 75 of the text's, end, padding."""
    ids = token_ids(tokenizer, text)
    room = tokenizer.model_max_length - 2
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for k in range(chunks):
        piece = ids[k * room:(k + 1) * room]
        out.append([tokenizer.bos_token_id] + piece + [tokenizer.eos_token_id] + [pad] * (room - len(piece)))
    return out


def _embed(pipe, tokenizer, text, chunks, device):
    import torch

    rows = rows_of(tokenizer, text, chunks)
    with torch.inference_mode():
        hidden = pipe.text_encoder(torch.tensor(rows, device=device))[0]
    # (chunks, 77, dim) -> (1, chunks * 77, dim)
    return hidden.reshape(1, -1, hidden.shape[-1]).to(pipe.unet.dtype)
