# -*- test-case-name: runai.test.test_cli_generate,runai.test.test_cli -*-
"""``runai generate`` (txt2img, img2img, inpaint, outpaint on a running server) and
``runai schedulers`` (the names ``--scheduler`` takes; no server needed).

The mode follows from the options: ``--init-image`` alone is img2img, with ``--mask`` an
inpaint, with ``--outpaint`` an outpaint; neither is txt2img. Everything that can be
checked here is checked before anything is sent: the input files are read, and every
output file name is free (or ``--force`` is given), so that a finished generation is
never lost to an existing file or a typo.
"""

import os
import sys

from runai.cli.common import ProgressLine, connect
from runai.client import ServerError, generation_request
from runai.core.schedulers import DEFAULT_SCHEDULER, SCHEDULERS

# The options this command sends, by their names on the wire (the action's prefix apart),
# and the flags that set them: the server's errors name the flags the user typed.
FLAGS = {"model": "--model", "negative_prompt": "--negative-prompt", "steps": "--steps", "scale": "--scale",
         "seed": "--seed", "width": "--width", "height": "--height", "n_samples": "--n-samples",
         "n_iter": "--n-iter", "scheduler": "--scheduler", "strength": "--strength", "pixels": "--init-image",
         "mask": "--mask", "pos_x": "--pos-x", "pos_y": "--pos-y", "prompt": "the prompt"}
# What a picture file starts with, for each format the server decodes.
SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"))


def _progress_bar(stream):
    line = ProgressLine(stream)

    def show(message):
        if message.get("action") == 4:
            step, total = message.get("step", 0), message.get("total", 1) or 1
            width = 30
            filled = width * step // total
            line.show(f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{total}")
            if step >= total:
                line.end()
        elif message.get("action") == "queued":
            line.end()
            stream.write(f"queued: {message.get('position')} job(s) ahead\n")
            stream.flush()
        elif message.get("action") == "withheld":
            line.end()
            stream.write(f"image {message.get('index')} (seed {message.get('seed')}) withheld: "
                         f"{message.get('reason')}\n")
            stream.flush()
    return show


def is_picture(data):
    """Whether ``data`` starts as a PNG, JPEG or WebP file does."""
    return any(data.startswith(magic) for magic, _ in SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def flags_named(message, action):
    """The server's ``message`` with the options it names (``option 'txt2img_width'``) as
    the flags that set them (``--width``)."""
    for wire, flag in FLAGS.items():
        for name in (f"{action}_{wire}", wire):
            message = message.replace(f"option '{name}'", flag).replace(f"'{name}'", flag)
    return message


def _output_names(output, count):
    if count == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [f"{stem}-{k}{ext or '.png'}" for k in range(count)]


def mode(args):
    """The action ``args`` ask for: txt2img, img2img, inpaint or outpaint."""
    if args.outpaint:
        return "outpaint"
    if args.mask is not None:
        return "inpaint"
    return "txt2img" if args.init_image is None else "img2img"


def usage_problem(args):
    """What is wrong with the combination of options, in one line; or None."""
    if args.init_image is None:
        for given, option in ((args.outpaint, "--outpaint"), (args.mask is not None, "--mask"),
                              (args.strength is not None, "--strength")):
            if given:
                return f"{option} needs --init-image FILE (the picture to start from)"
    return None


def _read(path, option):
    """A file's bytes, or a one-line reason it cannot be read (as a ValueError)."""
    try:
        with open(os.path.expanduser(path), "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {option} {path}: {e.strerror or e}") from None
    if not is_picture(data):
        raise ValueError(f"{option} {path} is not a picture: PNG, JPEG or WebP")
    return data


def output_problem(names, force):
    """Why the images cannot be written under ``names`` (an existing file without
    ``force``, a missing folder, a folder in the way); or None."""
    for name in names:
        folder = os.path.dirname(name) or "."
        if not os.path.isdir(folder):
            return f"cannot write {name}: there is no folder {folder}"
        if os.path.isdir(name):
            return f"cannot write {name}: it is a folder"
    existing = [name for name in names if os.path.lexists(name)]
    if existing and not force:
        more = f" (and {len(existing) - 1} more of the {len(names)} output files)" if len(existing) > 1 else ""
        return f"{existing[0]} already exists{more}; --force overwrites, or choose another -o"
    return None


def _write(name, png, force):
    """Write one image; False if the file appeared since the check and is kept."""
    try:
        with open(name, "wb" if force else "xb") as f:
            f.write(png)
    except FileExistsError:
        print(f"runai: {name} appeared while generating; it is kept, this image is not written",
              file=sys.stderr)
        return False
    return True


def generate(args):
    problem = usage_problem(args)
    if problem:
        print(f"runai generate: {problem}", file=sys.stderr)
        return 2
    action = mode(args)
    names = _output_names(args.output, (args.n_samples or 1) * (args.n_iter or 1))
    try:
        pixels = None if args.init_image is None else _read(args.init_image, "--init-image")
        mask = None if args.mask is None else _read(args.mask, "--mask")
    except ValueError as e:
        print(f"runai: {e}", file=sys.stderr)
        return 1
    problem = output_problem(names, args.force)
    if problem:
        print(f"runai: {problem}", file=sys.stderr)
        return 1
    request = generation_request(
        action, args.prompt, args.model, pixels=pixels, mask=mask,
        negative_prompt=args.negative, steps=args.steps, scale=args.scale, seed=args.seed,
        width=args.width, height=args.height, n_samples=args.n_samples, n_iter=args.n_iter,
        scheduler=args.scheduler, strength=args.strength, pos_x=args.pos_x, pos_y=args.pos_y,
    )
    try:
        with connect(args, timeout=None) as client:
            images = client.run(request, None if args.quiet else _progress_bar(sys.stderr))
    except ServerError as e:
        raise ServerError(e.code, flags_named(e.message, action)) from None
    show_position = action == "outpaint" or args.pos_x is not None or args.pos_y is not None
    written = True
    for image, name in zip(images, names):
        if _write(name, image.png, args.force):
            where = f", position {image.pos_x},{image.pos_y}" if show_position else ""
            print(f"{name} (seed {image.seed}{where})")
        else:
            written = False
    return 0 if written else 1


def schedulers(args):
    for name in SCHEDULERS:
        print(name)
    return 0


def add_commands(commands, common):
    gen = commands.add_parser(
        "generate", parents=[common],
        help="txt2img, img2img (--init-image), inpaint (--mask), outpaint (--outpaint): write PNG file(s)",
        description="Generate on a running server and write the image(s) as PNG. The mode follows from "
                    "the options: --init-image alone is img2img, with --mask an inpaint, with --outpaint "
                    "an outpaint; without --init-image, txt2img. Options left out take the server's "
                    "defaults. No output file is overwritten without --force.",
    )
    gen.add_argument("prompt", help="what the image should show")
    gen.add_argument("-m", "--model", required=True,
                     help="model folder, relative to the server's model folder (e.g. v1/mymodel)")
    gen.add_argument("-o", "--output", default="out.png",
                     help="PNG file (several images: out-0.png, ...; default out.png)")
    gen.add_argument("-f", "--force", action="store_true", help="overwrite existing output files (default: never)")
    gen.add_argument("-n", "--negative-prompt", "--negative", dest="negative", default=None, metavar="TEXT",
                     help="what the image should not show (default: nothing)")
    gen.add_argument("--steps", type=int, default=None,
                     help="denoising steps, 1 to 150 (default: the model family's, 20 for SD)")
    gen.add_argument("--scale", type=float, default=None,
                     help="guidance scale, 0 to 50 (default: the model family's, 7.5 for SD)")
    gen.add_argument("--seed", type=int, default=None, help="0 to 2^32-1; image k has seed + k (default: random)")
    gen.add_argument("--width", type=int, default=None,
                     help="64 to 2048, a multiple of 8 (default: the model family's, 512 to 1024; with "
                          "--init-image, its width)")
    gen.add_argument("--height", type=int, default=None,
                     help="64 to 2048, a multiple of 8 (default: the model family's, 512 to 1024; with "
                          "--init-image, its height)")
    gen.add_argument("--n-samples", type=int, default=None, help="images per batch, 1 to 8 (default 1)")
    gen.add_argument("--n-iter", type=int, default=None, help="batches, 1 to 16 (default 1)")
    gen.add_argument("--scheduler", choices=list(SCHEDULERS), default=None, metavar="NAME",
                     help=f"one of: {', '.join(SCHEDULERS)} (default: the model family's, {DEFAULT_SCHEDULER} for SD; "
                          "`runai schedulers` lists them)")
    gen.add_argument("--init-image", default=None, metavar="FILE",
                     help="img2img: the picture to start from (PNG, JPEG or WebP; default: none, txt2img)")
    gen.add_argument("--strength", type=float, default=None,
                     help="with --init-image: how much of it is repainted, 0 to 1 "
                          "(default 0.8 for img2img, 1.0 for inpaint and outpaint)")
    gen.add_argument("--mask", default=None, metavar="FILE",
                     help="inpaint: white = repaint, black = keep (transparent pixels of --init-image "
                          "are repainted too; default: none)")
    gen.add_argument("--outpaint", action="store_true",
                     help="outpaint: paint the empty (transparent, or white in --mask) part of --init-image "
                          "(default: off)")
    gen.add_argument("--pos-x", type=int, default=None,
                     help="position of the picture, echoed with each image (default 0)")
    gen.add_argument("--pos-y", type=int, default=None,
                     help="position of the picture, echoed with each image (default 0)")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar (default: a progress bar on stderr)")
    gen.set_defaults(func=generate)

    s = commands.add_parser("schedulers", help="list the scheduler names --scheduler takes (no server needed)")
    s.set_defaults(func=schedulers)
