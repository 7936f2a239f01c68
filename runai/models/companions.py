# -*- test-case-name: runai.test.test_singlefile_flow -*-
"""The companion files of an SD3 or FLUX.1 single file: its VAE and text encoders, found by
convention and told apart by content.

Forge and ComfyUI users keep a FLUX.1 transformer (``flux1-dev.safetensors``, often in
float8) apart from its VAE (``ae.safetensors``), CLIP-L (``clip_l.safetensors``) and T5-XXL
(``t5xxl_fp16.safetensors``, ``t5xxl_fp8_e4m3fn.safetensors``); an SD3 file may lack its
CLIP-L, CLIP-G (``clip_g.safetensors``) and T5-XXL. :func:`find_companions` finds what a
file lacks: first in the file's own folder, then in the conventional folders
(:data:`FOLDERS`) of each folder from there up to the model folder, nearest first. A
candidate is a ``.safetensors`` file whose *header* says what it is (the library's
classification, :mod:`runai.models.classify`) and whose widths fit the transformer's
(:func:`runai.models.flowparts.requirements`); a name only breaks ties (``t5xxl_fp16``
before ``t5xxl_fp8``, ``clip_g`` for the CLIP-G). Every candidate is resolved, symlinks
included, and skipped unless it lies inside the model folder. Files the client chose
(Forge's ``forge_additional_modules``) override the search role by role.

Torch-free: :func:`sd_modules` answers Forge's ``GET /sdapi/v1/sd-modules`` on the reactor.
"""

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from runai.models import checkpoint, flowparts, sources
from runai.models.classify import classify_state
from runai.models.errors import CheckpointError, LoadError
from runai.models.flowparts import CLIP, CLIP_G, CLIP_L, T5XXL
from runai.models.paths import contained

VAE = "vae"
# The companions each family takes, and those it can do without.
ROLES = {"flux": (VAE, CLIP_L, T5XXL), "sd3": (VAE, CLIP_L, CLIP_G, T5XXL)}
OPTIONAL = {"flux": (), "sd3": (T5XXL,)}  # SD3 runs without T5 (its CLIP-only files)
LABELS = {"flux": "FLUX.1", "sd3": "SD3"}
# Conventional companion folders (Forge's VAE/ and text_encoder/, ComfyUI's vae/, clip/,
# text_encoders/), looked for in the model file's folder and each folder above it.
FOLDERS = ("vae", "VAE", "text_encoder", "text_encoders", "clip")
MAX_FILES_PER_FOLDER = 256
COMPANION_KINDS = ("vae", "text_encoder")


def describe_role(family, role):
    """A role in words, with the file names users know it by."""
    return {
        VAE: "VAE (ae.safetensors)" if family == "flux" else "VAE (the SD3 VAE, e.g. sd3_vae.safetensors)",
        CLIP_L: "CLIP-L (clip_l.safetensors)",
        CLIP_G: "CLIP-G (clip_g.safetensors)",
        T5XXL: "T5-XXL (t5xxl_fp16.safetensors or an fp8 one such as t5xxl_fp8_e4m3fn.safetensors)",
    }[role]


def _and(items):
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclass(frozen=True)
class Candidate:
    path: Path  # resolved
    shown: str  # relative to the model folder
    kind: str
    variant: object
    width: object = None  # CLIP: hidden width; T5: d_model; VAE: latent channels
    projection: object = None  # CLIP: pooled (projected) width

    def name_hint(self):
        stem = self.path.stem.lower().replace("-", "_")
        if any(h in stem for h in ("clip_g", "clipg", "bigg")):
            return CLIP_G
        if any(h in stem for h in ("clip_l", "clipl")):
            return CLIP_L
        return None


# -- reading candidates ---------------------------------------------------------------

_cache = {}
_cache_lock = threading.Lock()


def _read(resolved):
    """``(Classification, shapes)`` of a .safetensors header, cached by size and mtime."""
    st = os.stat(resolved)
    key = (str(resolved), st.st_size, st.st_mtime_ns, st.st_ino)
    with _cache_lock:
        found = _cache.get(key)
    if found is None:
        tensors, metadata = checkpoint.read_safetensors_header(resolved)
        shapes = {k: v.shape for k, v in tensors.items()}
        found = (classify_state(shapes, metadata), shapes)
        with _cache_lock:
            if len(_cache) > 1024:
                _cache.clear()
            _cache[key] = found
    return found


def candidate(model_dir, resolved):
    """The :class:`Candidate` of a resolved, contained file, or None if it is no companion."""
    try:
        c, shapes = _read(resolved)
    except (OSError, CheckpointError):
        return None
    shown = resolved.relative_to(model_dir).as_posix()
    if c.kind == VAE:
        prefix = flowparts.vae_prefix(shapes)
        if prefix is None:
            return Candidate(resolved, shown, VAE, "diffusers-layout")  # not a layout runai converts
        return Candidate(resolved, shown, VAE, None, width=flowparts.latent_channels(shapes, prefix))
    if c.kind != "text_encoder" or "+" in str(c.variant):
        return None
    if c.variant == T5XXL:
        width = flowparts.t5_width(shapes, flowparts.t5_prefixes(shapes)[0])
        return Candidate(resolved, shown, c.kind, T5XXL, width=width)
    prefix, outer = flowparts.clip_prefixes(shapes)[0]
    hidden, projection = flowparts.clip_widths(shapes, prefix, outer)
    return Candidate(resolved, shown, c.kind, c.variant, width=hidden, projection=projection)


def _search_folders(model_dir, path):
    folders = [path.parent]
    current = path.parent
    while True:
        folders += [current / name for name in FOLDERS]
        if current == model_dir or current == current.parent:
            break
        current = current.parent
    seen, result = set(), []
    for folder in folders:
        resolved = contained(model_dir, folder)
        if resolved is not None and resolved not in seen and resolved.is_dir():
            seen.add(resolved)
            result.append(resolved)
    return result


def _candidates(model_dir, path):
    """Every companion candidate, nearest folder first, each with its folder's rank."""
    found, seen = [], {Path(os.path.realpath(path))}
    for rank, folder in enumerate(_search_folders(model_dir, path)):
        try:
            with os.scandir(folder) as it:
                names = sorted(e.name for e in it)
        except OSError:
            continue
        names = [n for n in names if n.lower().endswith(".safetensors") and not n.startswith(".")]
        for name in names[:MAX_FILES_PER_FOLDER]:
            resolved = contained(model_dir, folder / name)  # a link to elsewhere is never used
            if resolved is None or resolved in seen or not resolved.is_file():
                continue
            seen.add(resolved)
            found_one = candidate(model_dir, resolved)
            if found_one is not None:
                found.append((rank, found_one))
    return found


# -- fitting them to the model ---------------------------------------------------------


def _name_rank(family, role, cand):
    stem = cand.path.stem.lower()
    if role == VAE:
        flux_named = stem == "ae" or "flux" in stem
        own, other = (flux_named, "sd3" in stem) if family == "flux" else ("sd3" in stem, flux_named)
        return 0 if own else (2 if other else 1)
    if role == T5XXL:
        if "fp16" in stem or "bf16" in stem:
            return 0
        return 2 if ("fp8" in stem or "scaled" in stem or "int8" in stem) else 1
    return 0 if cand.name_hint() == role else 1


def _accepts(role, cand):
    if role == VAE:
        return cand.kind == VAE and cand.variant is None
    if role == T5XXL:
        return cand.variant == T5XXL
    if cand.variant == role:
        return True
    return cand.variant == CLIP and cand.name_hint() in (None, role)


def _fits(family, role, cand, need, clips):
    """Whether ``cand`` fits the transformer's widths as ``role`` (``clips``: the CLIP
    models already settled, for SD3's two, whose pooled widths add up)."""
    if role == VAE:
        return need["latent"] is None or cand.width == need["latent"]
    if role == T5XXL:
        return need["joint"] is None or cand.width == need["joint"]
    if family == "flux":
        return need["pooled"] is None or cand.width == need["pooled"]
    other = clips.get(CLIP_G if role == CLIP_L else CLIP_L)
    if other is None:
        return need["pooled"] is None or cand.projection < need["pooled"]
    return ((need["pooled"] is None or cand.projection + other.projection == need["pooled"])
            and (need["joint"] is None or cand.width + other.width <= need["joint"]))


def _role_of_chosen(family, cand, taken):
    if cand.kind == VAE:
        return VAE if cand.variant is None else None
    if cand.variant in (CLIP_L, CLIP_G, T5XXL):
        return cand.variant
    if cand.variant == CLIP:
        hint = cand.name_hint()
        if hint:
            return hint
        free = [r for r in ROLES[family] if r in (CLIP_L, CLIP_G) and r not in taken]
        return free[0] if free else CLIP_L
    return None


def _what(cand):
    if cand.kind == VAE:
        return "a VAE in diffusers' layout (runai reads the original one, as ae.safetensors has it)"
    return f"a {cand.variant} text encoder"


def _short(family, role):
    return describe_role(family, role).split(" (")[0]


def _inside_clips(shapes, inside):
    """The CLIP models a file holds, as candidates (for SD3's pooled width check)."""
    clips = {}
    for role in (CLIP_L, CLIP_G):
        if role in inside:
            prefix = inside[role]
            outer = prefix[:-len("text_model.")] if prefix.endswith("text_model.") else prefix
            hidden, projection = flowparts.clip_widths(shapes, prefix, outer)
            clips[role] = Candidate(Path(), "", "text_encoder", role, hidden, projection)
    return clips


def _take_chosen(model_dir, family, chosen, need, clips):
    label, result = LABELS[family], {}
    for chosen_path in chosen:
        resolved = contained(model_dir, chosen_path)
        if resolved is None:
            raise LoadError(f"the module {Path(chosen_path).name} is outside the model folder")
        cand = candidate(model_dir, resolved) if resolved.is_file() else None
        if cand is None:
            raise LoadError(f"the module {Path(chosen_path).name} is not a VAE or text encoder runai can read")
        if any(c.path == cand.path for c in result.values()):
            continue  # the same file twice
        role = _role_of_chosen(family, cand, result)
        if role not in ROLES[family]:
            what = f"a {_short(family, role)}" if role in (CLIP_L, CLIP_G, T5XXL) else _what(cand)
            raise LoadError(f"the module {cand.shown} is {what}, not one of the "
                            f"{_and(_short(family, r) for r in ROLES[family])} that a {label} model takes")
        if role in result:
            raise LoadError(f"the modules {result[role].shown} and {cand.shown} are both a {_short(family, role)}; "
                            "choose one")
        others = {r: c for r, c in dict(clips, **result).items() if r in (CLIP_L, CLIP_G) and r != role}
        if not _fits(family, role, cand, need, others):
            raise LoadError(f"the module {cand.shown} does not fit this {label} model "
                            f"(a {_short(family, role)} of width {cand.width})")
        result[role] = cand
    return result


def _search(family, missing, found, need, clips, taken):
    """The best candidate for each missing role: nearest folder first, then the name; SD3's
    two CLIP models as a pair whose widths fit together."""
    result = {}

    def ranked(role):
        return [c for *_, c in sorted((rank, _name_rank(family, role, c), c.path.name, c)
                                      for rank, c in found if _accepts(role, c))
                if c.path not in taken]

    if CLIP_L in missing and CLIP_G in missing:
        pairs = ((l, g) for l in ranked(CLIP_L) for g in ranked(CLIP_G) if l.path != g.path
                 and _fits(family, CLIP_G, g, need, {CLIP_L: l}))
        pair = next(pairs, None)
        if pair is not None:
            result[CLIP_L], result[CLIP_G] = pair
            taken = taken | {pair[0].path, pair[1].path}
    for role in missing:
        if role in result:
            continue
        for cand in ranked(role):
            if cand.path not in taken and _fits(family, role, cand, need, clips):
                result[role] = cand
                taken = taken | {cand.path}
                break
    return result


def find_companions(model_dir, path, classification, chosen=None, shapes=None):
    """``{role: resolved Path}`` of the companions a single file of SD3 or FLUX.1 needs
    beyond what it holds (roles "vae", "clip_l", "clip_g", "t5xxl"); ``shapes``: the file's
    ``{name: shape}``, when already read.

    ``chosen``: paths the client picked, which override the search (and the file's own
    part) role by role. Raises LoadError naming the files to put where when a needed one is
    missing, and naming a chosen file that is outside the model folder or fits no role.
    """
    model_dir = Path(os.path.realpath(model_dir))
    path = Path(path)
    family = classification.version
    if family not in ROLES:
        return {}
    if shapes is None:
        try:
            shapes, _ = checkpoint.tensor_shapes(path)
        except CheckpointError as e:
            raise LoadError(e.message)
    inside = flowparts.parts(shapes, family)
    need = flowparts.requirements(shapes, family)
    clips = _inside_clips(shapes, inside)
    result = _take_chosen(model_dir, family, chosen or (), need, clips)
    clips.update({r: c for r, c in result.items() if r in (CLIP_L, CLIP_G)})
    missing = [r for r in ROLES[family] if r not in inside and r not in result]
    if missing:
        found = _candidates(model_dir, path)
        result.update(_search(family, missing, found, need, clips, {c.path for c in result.values()}))
    lacking = [r for r in ROLES[family] if r not in inside and r not in result and r not in OPTIONAL[family]]
    if lacking:
        raise LoadError(_missing_message(family, model_dir, path, inside, lacking))
    sources.note(*(cand.path for cand in result.values()))  # the cache reloads when one changes
    return {role: cand.path for role, cand in result.items()}


def _missing_message(family, model_dir, path, inside, lacking):
    label = LABELS[family]
    alone = set(inside) == {"transformer"}
    what = f"a {label} transformer-only file" if alone else f"this {label} file"
    needed = [r for r in ROLES[family] if r not in inside and r not in OPTIONAL[family]]
    shown = path.relative_to(model_dir).as_posix() if path.is_relative_to(model_dir) else path.name
    folder = Path(shown).parent.as_posix()
    beside = "beside it" if folder == "." else f"beside it (in {folder}/)"
    return (f"{what} needs its {_and(describe_role(family, r) for r in needed)} {beside} or in the model "
            f"folder's vae/ and text_encoder/ folders (text_encoders/ and clip/ too); no file that fits was "
            f"found for the {_and(_short(family, r) for r in lacking)}")


def sd_modules(library):
    """Forge's ``GET /sdapi/v1/sd-modules``: every VAE and text encoder file in the model
    folder, ``{"model_name": file stem, "filename": path relative to the model folder}``."""
    return [{"model_name": Path(entry.name).stem, "filename": entry.name}
            for entry in library.scan()
            if entry.format != "diffusers" and entry.classification.kind in COMPANION_KINDS]
