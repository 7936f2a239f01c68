# -*- test-case-name: runai.test.test_upscale_doors -*-
"""``runai upscale IN.png -u NAME [--scale 2 | --width W --height H] -o OUT.png``: a picture
made larger on a running server, by a built-in filter (None, Lanczos, Nearest) or a model
upscaler of its model folder (``4x-UltraSharp``: the file's name without its extension).

``runai upscalers`` lists the names. The input is read and the output name checked before anything is sent, as ``runai
generate`` does: a finished upscale is never lost to an existing file or a typo.
"""

import base64
import sys

from runai.cli.common import connect
from runai.cli.generate import _progress_bar, _read, _write, output_problem
from runai.client import ServerError

# The options this command sends, and the flags that set them, for the server's errors.
FLAGS = {"upscaler": "--upscaler", "scale": "--scale", "width": "--width", "height": "--height",
         "image": "the input picture"}


def upscale_request(image, upscaler, scale=None, width=None, height=None, crop=False):
    """A legacy-format ``upscale`` request for an image file's bytes; options that are
    None are left out, so the server's defaults apply."""
    options = {"upscale_image": base64.b64encode(image).decode("ascii"), "upscale_upscaler": upscaler}
    for name, value in (("scale", scale), ("width", width), ("height", height)):
        if value is not None:
            options[f"upscale_{name}"] = value
    if crop:
        options["upscale_crop"] = True
    return {"action": "upscale", "options": options}


def flags_named(message):
    for wire, flag in FLAGS.items():
        for name in (f"upscale_{wire}", wire):
            message = message.replace(f"option '{name}'", flag).replace(f"'{name}'", flag)
    return message


def upscale(args):
    if args.scale is not None and (args.width is not None or args.height is not None):
        print("runai upscale: --scale, or --width/--height, not both", file=sys.stderr)
        return 2
    if args.crop and (args.width is None or args.height is None):
        print("runai upscale: --crop needs both --width and --height", file=sys.stderr)
        return 2
    try:
        image = _read(args.input, "the input")
    except ValueError as e:
        print(f"runai: {e}", file=sys.stderr)
        return 1
    problem = output_problem([args.output], args.force)
    if problem:
        print(f"runai: {problem}", file=sys.stderr)
        return 1
    request = upscale_request(image, args.upscaler, args.scale, args.width, args.height, args.crop)
    try:
        with connect(args, timeout=None) as client:
            images = client.run(request, None if args.quiet else _progress_bar(sys.stderr))
    except ServerError as e:
        raise ServerError(e.code, flags_named(e.message)) from None
    if not images:
        print("runai: the server answered no picture", file=sys.stderr)
        return 1
    if not _write(args.output, images[0].png, args.force):
        return 1
    print(args.output)
    return 0


def upscalers_command(args):
    """``runai upscalers``: the names ``-u`` takes."""
    with connect(args, timeout=120) as client:
        client.send({"action": "upscalers"})
        while True:
            message = client.receive()
            if "error" in message:
                raise ServerError(message["error"].get("code"), message["error"].get("message"))
            if message.get("action") == "upscalers":
                break
    for entry in message.get("upscalers", []):
        if entry.get("path") is None:
            print(f"{entry['name']}  (built in)")
        else:
            print(f"{entry['name']}  {entry['path']}  ({entry.get('arch')} x{entry.get('scale')})")
    return 0


def add_commands(commands, common):
    up = commands.add_parser(
        "upscale", parents=[common],
        help="make a picture larger with an upscaler (a built-in filter or an ESRGAN-family model file)",
        description="Upscale a picture on a running server and write it as PNG. The upscaler is None, "
                    "Lanczos, Nearest, or a model file of the server's model folder by its name without "
                    "extension (e.g. 4x-UltraSharp). No output file is overwritten without --force.",
    )
    up.add_argument("input", help="the picture (PNG, JPEG or WebP)")
    up.add_argument("-u", "--upscaler", default="Lanczos",
                    help="None, Lanczos, Nearest, or a model upscaler's name (default Lanczos)")
    up.add_argument("-o", "--output", default="upscaled.png", help="PNG file to write (default upscaled.png)")
    up.add_argument("-f", "--force", action="store_true", help="overwrite the output file (default: never)")
    up.add_argument("--scale", type=float, default=None, help="how many times larger, 1 to 8 (default 2)")
    up.add_argument("--width", type=int, default=None,
                    help="the width to reach (alone: the height keeps the aspect ratio; default: by --scale)")
    up.add_argument("--height", type=int, default=None,
                    help="the height to reach (alone: the width keeps the aspect ratio; default: by --scale)")
    up.add_argument("--crop", action="store_true",
                    help="with --width and --height: cover that box and cut its middle (default: stretch to it)")
    up.add_argument("-q", "--quiet", action="store_true", help="no progress bar (default: a progress bar on stderr)")
    up.set_defaults(func=upscale)

    names = commands.add_parser("upscalers", parents=[common],
                                help="list the upscalers `runai upscale -u` takes: built-ins and model files")
    names.set_defaults(func=upscalers_command)
