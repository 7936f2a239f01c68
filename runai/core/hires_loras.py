# -*- test-case-name: runai.test.test_hires_loras -*-
"""The LoRAs of a hires fix's second pass, as AUTOMATIC1111 (1.6+) applies them.

Where a request gives ``hr_prompt`` (or ``hr_negative_prompt``), the second pass applies
the ``<lora:...>`` tags of its own prompts, as the first pass applies those of ``prompt``
and ``negative_prompt``; a prompt it does not give is the first pass's, LoRAs included, so
without either the second pass applies the first pass's LoRAs. They are resolved here,
before the job is queued, like the first pass's (an unknown name: ``model_not_found``), and
the two passes together name at most :data:`runai.core.prompts.MAX_NETWORKS` (a network
named in both, with the same weights, counts once). The worker switches the merged set
between the passes (:mod:`runai.engine.hires`).

Torch-free: it runs on the reactor thread, with the request parser.
"""

from dataclasses import replace

from runai.core import errors, prompts
from runai.models import loras


def second_pass_networks(hires, parsed):
    """The :class:`runai.core.prompts.Network` tags the second pass applies, or None where
    they are the first pass's; ``parsed``: the parsed prompt, negative prompt, ``hr_prompt``
    and ``hr_negative_prompt``."""
    if not (hires.prompt or hires.negative_prompt):
        return None
    positive = parsed[2] if hires.prompt else parsed[0]
    negative = parsed[3] if hires.negative_prompt else parsed[1]
    return positive.networks + negative.networks


def with_loras(hires, parsed, model_dir):
    """``hires`` with the second pass's :class:`runai.models.loras.LoraRef` (None: the first
    pass's); raises RunaiError where the passes name too many networks or an unknown one."""
    second = second_pass_networks(hires, parsed)
    if second is None:
        return hires
    first = parsed[0].networks + parsed[1].networks
    named = set(first)
    total = len(first) + len([network for network in second if network not in named])
    if total > prompts.MAX_NETWORKS:
        raise errors.RunaiError(errors.OUT_OF_RANGE, f"the prompts of both passes name {total} extra networks; "
                                                     f"the limit is {prompts.MAX_NETWORKS}")
    return replace(hires, loras=loras.resolve(model_dir, second) if second else ())


def second_pass_loras(request):
    """The LoRAs of a hires-fix ``request``'s second pass."""
    hires = getattr(request, "hires", None)
    return request.loras if hires is None or hires.loras is None else hires.loras


def job_loras(request):
    """Every LoRA file the job applies, in either pass, each once (first pass's first): what
    its ``Lora hashes`` name."""
    found, seen = [], set()
    for ref in tuple(request.loras) + tuple(second_pass_loras(request)):
        if (ref.name, ref.path) not in seen:
            seen.add((ref.name, ref.path))
            found.append(ref)
    return tuple(found)
