# -*- test-case-name: runai.test.test_cli -*-
"""The ``runai`` command: talk to a running runai server from a shell."""

import argparse
import os
import sys

from runai.cli import history as history_cli
from runai.cli import models as library_cli
from runai.cli.common import connect, connection_options
from runai.client import ServerError, txt2img_request


def _progress_bar(stream):
    def show(message):
        if message.get("action") == 4:
            step, total = message.get("step", 0), message.get("total", 1) or 1
            width = 30
            filled = width * step // total
            stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] step {step}/{total}")
            if step >= total:
                stream.write("\n")
            stream.flush()
        elif message.get("action") == "queued":
            stream.write(f"queued: {message.get('position')} job(s) ahead\n")
            stream.flush()
    return show


def _output_names(output, count):
    if count == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [f"{stem}-{k}{ext or '.png'}" for k in range(count)]


def generate(args):
    request = txt2img_request(
        args.prompt, args.model,
        negative_prompt=args.negative, steps=args.steps, scale=args.scale, seed=args.seed,
        width=args.width, height=args.height, n_samples=args.n_samples, scheduler=args.scheduler,
    )
    with connect(args, timeout=None) as client:
        images = client.run(request, None if args.quiet else _progress_bar(sys.stderr))
    for image, name in zip(images, _output_names(args.output, len(images))):
        with open(name, "wb") as f:
            f.write(image.png)
        print(f"{name} (seed {image.seed})")
    return 0


def ping(args):
    with connect(args, timeout=30) as client:
        pong = client.ping()
    print(f"runai {pong.get('version')}: {pong.get('queued')} queued, {'busy' if pong.get('busy') else 'idle'}")
    return 0


def parser():
    top = argparse.ArgumentParser(prog="runai", description="Talk to a runai server.")
    common = connection_options()
    commands = top.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", parents=[common], help="txt2img: write the image(s) to a PNG file")
    gen.add_argument("prompt")
    gen.add_argument("-m", "--model", required=True,
                     help="model folder, relative to the server's model folder (e.g. v1/mymodel)")
    gen.add_argument("-o", "--output", default="out.png", help="PNG file (several images: out-0.png, ...)")
    gen.add_argument("-n", "--negative", default=None, help="negative prompt")
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--scale", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--n-samples", type=int, default=None)
    gen.add_argument("--scheduler", default=None)
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=generate)

    p = commands.add_parser("ping", parents=[common], help="check that the server answers")
    p.set_defaults(func=ping)

    history_cli.add_commands(commands, common)
    library_cli.add_commands(commands, common)
    return top


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ServerError as e:
        print(f"runai: the server refused: {e.message} ({e.code})", file=sys.stderr)
    except ConnectionRefusedError:
        print(f"runai: nothing listens on {args.host}:{args.port}; is the server running?", file=sys.stderr)
    except (ConnectionError, OSError) as e:
        print(f"runai: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("runai: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
