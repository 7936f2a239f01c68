# -*- test-case-name: runai.test.test_emphasis,runai.test.test_modes,runai.test.test_engine_xl -*-
"""Prompts through CLIP text encoders as AUTOMATIC1111 encodes them: chunks of 75 tokens,
emphasis, BREAK and textual-inversion embeddings.

A prompt is read with :mod:`runai.core.prompts`. Where it says nothing but its text (every
weight 1, no BREAK, no embedding) and fits in 75 tokens, the family hands diffusers the
text, which encodes it as it always does: ``(a:1.0)`` paints ``a``'s very image. Otherwise
it is encoded here, as A1111's ``sd_hijack_clip`` does:

- Each ``(text, weight)`` segment is tokenized on its own and its tokens carry its weight.
  The tokens fill chunks of 75 (a BREAK closes one early); each chunk goes through the
  encoder between its start and end tokens, padded to 77, and the chunks are joined along
  the sequence (the denoiser's cross-attention takes any length). Both prompts get the same
  number of chunks, an empty prompt's chunk making up the difference.
- An embedding's name, as whole words, becomes as many placeholder tokens as it has
  vectors (a new chunk where they do not fit), and while the encoder runs, its token
  embedding layer gives those vectors at those places instead: a forward hook, removed
  after the call, so the model is never changed.
- Emphasis, A1111's default ("Original"): the hidden states are multiplied by their
  tokens' weights, then each chunk is scaled back to its unweighted mean.

Torch is imported inside the functions: the family modules are torch-free at import.
"""

from twisted.logger import Logger

from runai.core import errors, prompts

log = Logger()

MAX_CHUNKS = 8
PLACEHOLDER = 0  # the token id an embedding's vectors stand in for (A1111's)


def token_ids(tokenizer, text):
    return tokenizer(text, truncation=False, add_special_tokens=False).input_ids if text else []


def tokenizers(pipe):
    """The pipeline's CLIP tokenizers: one, or two."""
    return [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]


def parsed(text):
    """``text`` as a :class:`runai.core.prompts.Prompt` (one already parsed is kept)."""
    return text if isinstance(text, prompts.Prompt) else prompts.parse(text)


def vectors(pipe, request, encoders):
    """``{name: {key: tensor}}`` of the request's embeddings that the pipeline's
    ``encoders`` (a family's ``embedding_encoders``) take; any other is logged and left out."""
    from runai.models import embeddings
    from runai.models.errors import CheckpointError

    found = {}
    for ref in getattr(request, "embeddings", ()):
        try:
            sets = embeddings.load(ref)
        except (CheckpointError, OSError) as e:
            log.warn("embedding {name} could not be read: {why}", name=ref.name, why=getattr(e, "message", e))
            continue
        if all(key in sets and sets[key].shape[1] == getattr(pipe, name).get_input_embeddings().weight.shape[1]
               for name, key in encoders):
            found[ref.name] = sets
        else:
            log.warn("embedding {name} does not fit this model's text encoders: skipped", name=ref.name)
    return found


def is_plain(texts, found):
    """Whether every prompt of ``texts`` says nothing but its text: no weight, no BREAK,
    no embedding of ``found`` (:func:`vectors`)."""
    lookup = prompts.name_index(found) if found else {}
    return not any(text.weighted or (lookup and prompts.names_in(text, lookup)) for text in texts)


def fits(pipe, texts):
    """Whether the plain texts fit each tokenizer's 75 tokens."""
    return all(len(token_ids(t, text.plain)) <= t.model_max_length - 2 for t in tokenizers(pipe) for text in texts)


class _Chunks:
    """A1111's ``tokenize_line`` (without its comma backtracking): a prompt's tokens in
    chunks of at most 75, as ``[(ids, weights, [(offset, embedding name)])]``."""

    def __init__(self, tokenizer, prompt, counts, lookup):
        self.room = tokenizer.model_max_length - 2
        self.chunks, self.ids, self.weights, self.fixes = [], [], [], []
        for segment in prompt.segments:
            if segment is prompts.BREAK:
                self.close()
                continue
            text, weight = segment
            at = 0
            for start, end, name in (prompts.find_names(text, lookup) if lookup else ()):
                self.add(token_ids(tokenizer, text[at:start]), weight)
                if len(self.ids) + counts[name] > self.room:
                    self.close()
                self.fixes.append((len(self.ids), name))
                self.ids += [PLACEHOLDER] * counts[name]
                self.weights += [weight] * counts[name]
                at = end
            self.add(token_ids(tokenizer, text[at:]), weight)
        if self.ids or not self.chunks:
            self.close()

    def add(self, ids, weight):
        for token in ids:
            if len(self.ids) == self.room:
                self.close()
            self.ids.append(token)
            self.weights.append(weight)

    def close(self):
        self.chunks.append((self.ids, self.weights, self.fixes))
        self.ids, self.weights, self.fixes = [], [], []


def chunk_lists(tokenizer, texts, found, limit=None):
    """Each prompt's chunks (:class:`_Chunks`), padded to one count: the longest one's, or
    ``limit`` chunks (the rest dropped). Raises RunaiError past :data:`MAX_CHUNKS`."""
    counts = {name: len(next(iter(sets.values()))) for name, sets in found.items()}
    lookup = prompts.name_index(found) if found else {}
    lists = [_Chunks(tokenizer, text, counts, lookup).chunks for text in texts]
    count = max(len(chunks) for chunks in lists)
    if limit is None and count > MAX_CHUNKS:
        room = tokenizer.model_max_length - 2
        raise errors.RunaiError(errors.OUT_OF_RANGE,
                                f"the prompts take {count} chunks of {room} tokens; the limit is {MAX_CHUNKS}")
    count = min(count, limit) if limit else count
    return [chunks[:count] + [([], [], [])] * (count - len(chunks)) for chunks in lists]


def rows(tokenizer, chunks):
    """``(ids, weights, fixes)``: a row of 77 token ids per chunk (start, the chunk's,
    end, padding), the weight of each (1 but for the chunk's own), and each embedding's
    ``(row, position, name)``."""
    room = tokenizer.model_max_length - 2
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, weights, fixes = [], [], []
    for k, (chunk_ids, chunk_weights, chunk_fixes) in enumerate(chunks):
        ids.append([tokenizer.bos_token_id] + chunk_ids + [tokenizer.eos_token_id] + [pad] * (room - len(chunk_ids)))
        weights.append([1.0] + chunk_weights + [1.0] * (room - len(chunk_ids) + 1))
        fixes += [(k, 1 + offset, name) for offset, name in chunk_fixes]
    return ids, weights, fixes


def hidden_states(encoder, ids, fixes, found, key, device, penultimate):
    """``(hidden, pooled)``: the encoder's last (or ``penultimate``) hidden states of each
    row, and the projected pooled output of the first row (None for an encoder without
    one), the embeddings' vectors given in place of their placeholders."""
    import torch

    handle = None
    if fixes:
        def swap(module, args, output):
            output = output.clone()
            for row, position, name in fixes:
                vectors = found[name][key][: output.shape[1] - position]
                output[row, position:position + len(vectors)] = vectors.to(output.device, output.dtype)
            return output

        handle = encoder.get_input_embeddings().register_forward_hook(swap)
    try:
        with torch.inference_mode():
            out = encoder(torch.tensor(ids, device=device), output_hidden_states=penultimate)
    finally:
        if handle is not None:
            handle.remove()
    if not penultimate:
        return out[0], None
    return out.hidden_states[-2], (out[0][:1] if out[0].ndim == 2 else None)


def emphasize(hidden, weights):
    """A1111's "Original" emphasis on ``hidden`` (chunks, 77, width): each chunk's states
    times their tokens' weights, scaled back to the chunk's unweighted mean. A chunk whose
    weights are all 1 is left exactly as it is."""
    import torch

    out = []
    for k, chunk_weights in enumerate(weights):
        z = hidden[k]
        if all(w == 1.0 for w in chunk_weights):
            out.append(z)
            continue
        z32 = z.float()
        original = z32.mean()
        z32 = z32 * torch.tensor(chunk_weights, dtype=torch.float32, device=z.device)[:, None]
        ratio = original / z32.mean()
        if torch.isfinite(ratio):
            z32 = z32 * ratio
        out.append(z32.to(z.dtype))
    return torch.stack(out)


def encode_with(pairs, texts, found, device, penultimate, limit=None):
    """For each prompt of ``texts``: ``([hidden (chunks, 77, width) per encoder], [pooled per
    encoder])``; ``pairs``: ``(tokenizer, encoder, embedding key)`` of each encoder."""
    lists = [chunk_lists(tokenizer, texts, found, limit) for tokenizer, _, _ in pairs]
    count = max(len(chunks[0]) for chunks in lists)
    if count > 1:
        log.info("long prompt encoded in {n} chunks", n=count)
    results = []
    for t in range(len(texts)):
        hidden, pooled = [], []
        for (tokenizer, encoder, key), chunks in zip(pairs, lists):
            padded = chunks[t] + [([], [], [])] * (count - len(chunks[t]))
            ids, weights, fixes = rows(tokenizer, padded)
            states, pool = hidden_states(encoder, ids, fixes, found, key, device, penultimate)
            hidden.append(emphasize(states, weights))
            pooled.append(pool)
        results.append((hidden, pooled))
    return results


def joined(states, dtype):
    """Chunks (chunks, 77, width) as one row along the sequence: (1, chunks * 77, width)."""
    return states.reshape(1, -1, states.shape[-1]).to(dtype)


def encode(pipe, prompt, negative_prompt, device, found=None):
    """(prompt_embeds, negative_prompt_embeds) of one CLIP encoder, of equal length, one row
    each; ``found``: the embeddings' vectors (:func:`vectors`)."""
    texts = [parsed(prompt), parsed(negative_prompt)]
    pairs = [(pipe.tokenizer, pipe.text_encoder, None)]
    (embeds, _), (negative, _) = encode_with(pairs, texts, found or {}, device, penultimate=False)
    return joined(embeds[0], pipe.unet.dtype), joined(negative[0], pipe.unet.dtype)
