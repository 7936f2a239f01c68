# -*- test-case-name: runai.test.test_modes,runai.test.test_engine_xl -*-
"""Prompts longer than CLIP's 77 tokens, encoded in chunks instead of silently cut.

The text encoder sees at most 75 tokens between its start and end tokens. A longer
prompt is split into chunks of 75 tokens, each encoded on its own, and the embeddings are
joined along the sequence (the UNet's cross-attention takes any length): the approach
AUTOMATIC1111's webui made familiar. Prompts that fit are left to diffusers, unchanged.

SDXL has two text encoders: each chunk goes through both, their penultimate hidden
states are joined along the width as diffusers joins them, and the pooled embedding is the
second encoder's projected output at the first chunk's end token (what diffusers computes
for a prompt that fits, which is that first chunk). An empty negative prompt is all
zeros where the model says so (``force_zeros_for_empty_prompt``), as diffusers does.
"""

import torch

from runai.core import errors

MAX_CHUNKS = 8


def token_ids(tokenizer, text):
    return tokenizer(text, truncation=False, add_special_tokens=False).input_ids if text else []


def tokenizers(pipe):
    """The pipeline's tokenizers: one for SD 1.x/2.x, two for SDXL."""
    return [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]


def needs_chunks(tokenizer, *texts):
    room = tokenizer.model_max_length - 2
    return any(len(token_ids(tokenizer, text)) > room for text in texts)


def _chunk_count(tokenizer, *texts):
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
    chunks = _chunk_count(tokenizer, prompt, negative_prompt)
    return _embed(pipe, tokenizer, prompt, chunks, device), _embed(pipe, tokenizer, negative_prompt, chunks, device)


def _rows(tokenizer, text, chunks):
    """``chunks`` rows of 77 tokens: start, up to 75 of the text's, end, padding."""
    ids = token_ids(tokenizer, text)
    room = tokenizer.model_max_length - 2
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for k in range(chunks):
        piece = ids[k * room:(k + 1) * room]
        rows.append([tokenizer.bos_token_id] + piece + [tokenizer.eos_token_id] + [pad] * (room - len(piece)))
    return rows


def _embed(pipe, tokenizer, text, chunks, device):
    rows = _rows(tokenizer, text, chunks)
    with torch.inference_mode():
        hidden = pipe.text_encoder(torch.tensor(rows, device=device))[0]
    # (chunks, 77, dim) -> (1, chunks * 77, dim)
    return hidden.reshape(1, -1, hidden.shape[-1]).to(pipe.unet.dtype)


def encode_xl(pipe, prompt, negative_prompt, device):
    """The four embeddings an SDXL pipeline takes, as its keyword arguments: the prompt's
    and the negative prompt's, of equal length, and their pooled embeddings; one row each."""
    chunks = max(_chunk_count(t, prompt, negative_prompt) for t in tokenizers(pipe))
    embeds, pooled = _embed_xl(pipe, prompt, chunks, device)
    if not negative_prompt and pipe.config.force_zeros_for_empty_prompt:
        negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        negative, negative_pooled = _embed_xl(pipe, negative_prompt, chunks, device)
    return dict(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled)


def _embed_xl(pipe, text, chunks, device):
    hidden = []
    pooled = None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        rows = _rows(tokenizer, text, chunks)
        with torch.inference_mode():
            out = encoder(torch.tensor(rows, device=device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if out[0].ndim == 2:
            # The projected pooled output (CLIPTextModelWithProjection), as diffusers takes
            # it: the last encoder's, here of the first chunk.
            pooled = out[0][:1]
    joined = torch.cat(hidden, dim=-1)  # (chunks, 77, width 1 + width 2)
    dtype = pipe.unet.dtype
    return joined.reshape(1, -1, joined.shape[-1]).to(dtype), pooled.to(dtype)
