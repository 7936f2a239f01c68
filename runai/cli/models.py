# -*- test-case-name: runai.test.test_cli_models,runai.test.test_convert -*-
"""``runai models``, ``runai loras`` and ``runai embeddings`` (ask the server), and
``runai convert SRC DST`` (runs here, offline).

``convert`` goes both ways: a ``.safetensors``/``.ckpt`` file becomes a diffusers folder,
and a diffusers folder becomes one ``.safetensors`` in the original LDM layout that
AUTOMATIC1111 and diffusers' ``from_single_file`` load. It needs no server, and like the
server it unpickles a ``.ckpt`` only with the restricted unpickler and fetches nothing.
"""

import json
import os
import sys
from pathlib import Path

from runai.cli.common import ProgressLine, connect, end_progress


def _size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def models_command(args):
    with connect(args, timeout=120) as client:
        models = client.models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print("no models: the server's model folder (its --model-dir, ~/stablediffusion by default) holds no "
              "diffusers folder, .safetensors or .ckpt file; see docs/models.md, \"The model folder\"")
        return 0
    for m in models:
        flags = [m["format"], m["version"]]
        if m.get("kind") not in (None, "pipeline", "unknown"):
            flags.append(m["kind"])
        if m.get("variant"):
            flags.append(m["variant"])
        if m.get("inpainting"):
            flags.append("inpainting")
        if m.get("prediction_type") == "v_prediction":
            flags.append("v-prediction")
        if not m.get("served"):
            flags.append("not served" + (f": {m['error']}" if m.get("error") else ""))
        if m.get("loaded"):
            flags.append("loaded")
        print(f"{m['name']}  ({', '.join(flags)}; {_size(m.get('size', 0))})")
    return 0


def loras_command(args):
    with connect(args, timeout=120) as client:
        files = client.loras()
    if args.json:
        print(json.dumps(files, indent=2))
        return 0
    if not files:
        print("no LoRAs: the server's model folder holds no LoRA file (.safetensors, .pt or .ckpt)")
        return 0
    for f in files:
        version = f.get("version") or "unknown"
        print(f"<lora:{f['name']}:1>  {f['path']}  ({version}; {_size(f.get('size', 0))})")
    return 0


def embeddings_command(args):
    with connect(args, timeout=120) as client:
        listed = client.embeddings(args.model)
    if args.json:
        print(json.dumps(listed, indent=2))
        return 0
    if not listed["loaded"] and not listed["skipped"]:
        print("no embeddings: the server's model folder holds no embedding file (.pt, .bin or .safetensors)")
        return 0
    for state in ("loaded", "skipped"):
        for name, e in sorted(listed[state].items()):
            note = f"; does not fit {args.model}" if state == "skipped" else ""
            print(f"{name}  ({e.get('vectors')} vector(s), {e.get('shape')} wide{note})")
    return 0


def _progress(step, total):
    line = ProgressLine.current if ProgressLine.current is not None else ProgressLine()
    line.show(f"converting: stage {step}/{total}")
    if step >= total:
        line.end()


def convert_command(args):
    from runai.models import convert
    from runai.models.errors import ConvertError
    from runai.models.library import ModelLibrary
    from runai.models.paths import model_format

    src = Path(os.path.realpath(os.path.expanduser(args.src)))
    dst = Path(os.path.abspath(os.path.expanduser(args.dst)))
    fmt = model_format(src)
    try:
        if fmt == "diffusers":
            import torch

            count = convert.diffusers_to_single_file(src, dst, dtype=torch.float16 if args.half else None)
            print(f"{dst}: {count} tensors, original (LDM/SGM) layout")
        elif fmt in ("safetensors", "ckpt"):
            if args.half:
                print("runai convert: --half applies to diffusers -> .safetensors only", file=sys.stderr)
                return 2
            model_dir = os.path.realpath(os.path.expanduser(args.model_dir))
            entry = ModelLibrary(src.parent).describe(src, src.name)
            version = convert.single_file_to_diffusers(src, dst, model_dir, entry, on_progress=_progress)
            print(f"{dst}: diffusers folder of a {version} model")
        else:
            print(f"runai convert: {src} is neither a diffusers folder nor a .safetensors/.ckpt file",
                  file=sys.stderr)
            return 1
    except ConvertError as e:
        end_progress()
        print(f"runai convert: {e.message}", file=sys.stderr)
        return 1
    return 0


def add_commands(commands, common):
    m = commands.add_parser("models", parents=[common], help="list the server's models and what each is")
    m.add_argument("--json", action="store_true", help="the server's answer as it is (default: one line each)")
    m.set_defaults(func=models_command)

    lo = commands.add_parser("loras", parents=[common], help="list the server's LoRAs, as prompts name them")
    lo.add_argument("--json", action="store_true", help="the server's answer as it is (default: one line each)")
    lo.set_defaults(func=loras_command)

    e = commands.add_parser("embeddings", parents=[common],
                            help="list the server's textual-inversion embeddings, as prompts name them")
    e.add_argument("-m", "--model", help="only say which this model takes (the rest are listed as not fitting; "
                                         "default: every embedding, for no model in particular)")
    e.add_argument("--json", action="store_true", help="the server's answer as it is (default: one line each)")
    e.set_defaults(func=embeddings_command)

    c = commands.add_parser(
        "convert", help="convert a .safetensors/.ckpt into a diffusers folder, or a diffusers folder into "
                        "one .safetensors (the original LDM/SGM layout); runs here, without a server",
    )
    c.add_argument("src", help="a .safetensors or .ckpt file, or a diffusers folder")
    c.add_argument("dst", help="the diffusers folder, or the .safetensors file, to create (never overwritten)")
    c.add_argument("--model-dir", default="~/stablediffusion",
                   help="where the base models' configs and tokenizer are (for a single-file source; "
                        "default ~/stablediffusion)")
    c.add_argument("--half", action="store_true",
                   help="write float16 weights (diffusers -> .safetensors; default: as the source's)")
    c.set_defaults(func=convert_command)
