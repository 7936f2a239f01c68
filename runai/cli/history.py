# -*- test-case-name: runai.test.test_cli_history -*-
"""``runai history list|export|delete``: the server's history, over its socket.

The command asks the running server (started with ``--db``), which holds the key; it
never opens the database itself, so the key stays with the server. ``export`` writes
PNGs with their parameters in PNG text chunks: ``parameters`` (the one-line form other
Stable Diffusion tools read) and ``runai`` (the whole history item, as JSON).
"""

import argparse
import base64
import datetime
import json
import os
import sys

from runai.cli.common import connect
from runai.core import pngtext
from runai.core.pngtext import png_with_text
from runai.client import ServerError
from runai.doors.legacy.history import MAX_LIMIT

def parameters_text(item, image):
    """The ``parameters`` text that AUTOMATIC1111-style tools show and read back."""
    params = item.get("params", {})
    fields = [
        ("Steps", params.get("steps")), ("Sampler", params.get("scheduler")), ("CFG scale", params.get("scale")),
        ("Seed", image.get("seed")), ("Size", f"{image.get('width')}x{image.get('height')}"),
        ("Model", item.get("model")),
    ]
    if item.get("action") != "txt2img" and params.get("strength") is not None:
        fields.append(("Denoising strength", params.get("strength")))
    return pngtext.parameters_text(item.get("prompt", ""), item.get("negative_prompt"), fields)


def _ask(client, obj):
    """Send one request; return its messages up to the final one (raises ServerError)."""
    client.send(obj)
    messages = []
    while True:
        message = client.receive()
        if message.get("id") != obj.get("id"):
            continue
        if "error" in message:
            raise ServerError(message["error"].get("code"), message["error"].get("message"))
        messages.append(message)
        if message.get("action") in ("history", "history_delete", "done"):
            return messages


def list_items(client, limit=None, before=None, query=None):
    """History items, newest first, paging through the server's 500-item pages."""
    while limit is None or limit > 0:
        page = min(MAX_LIMIT, limit) if limit is not None else MAX_LIMIT
        request = {"action": "history", "id": "history", "limit": page}
        if before is not None:
            request["before"] = before
        if query:
            request["query"] = query
        [reply] = _ask(client, request)
        yield from reply["items"]
        if limit is not None:
            limit -= len(reply["items"])
        before = reply.get("next_before")
        if before is None:
            return


def get_item(client, request_id):
    """One request's item and its image messages."""
    messages = _ask(client, {"action": "history_get", "id": "get", "request_id": request_id})
    item = next(m["item"] for m in messages if m.get("action") == "history_get")
    return item, [m for m in messages if "image" in m]


class BadReply(Exception):
    """The server's reply holds something that this command will not use."""


def _whole_number(value, what, low):
    """``value`` if it is an int (not a bool) of at least ``low``: file names are made of it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BadReply(f"the server sent {what} {value!r}; expected a whole number of at least {low}")
    return value


def _when(seconds):
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S") if seconds else "-"


def _one_line(text, width):
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def list_command(args):
    with connect(args) as client:
        items = list(list_items(client, args.limit, args.before, args.query))
    if args.json:
        json.dump(items, sys.stdout, indent=1, ensure_ascii=False)
        print()
        return 0
    for item in items:
        print(f"{item['request_id']:>6}  {_when(item['time'])}  {item['status']:<11}  {item['images']:>3} img  "
              f"{item['action']:<8}  {item['model']}  {_one_line(item['prompt'], 60)}")
    if not items:
        print("the history is empty" if not (args.query or args.before) else "nothing matches", file=sys.stderr)
    return 0


def export_command(args):
    os.makedirs(args.directory, exist_ok=True)
    written, status = 0, 0
    try:
        for name in _export(args):
            print(name)
            written += 1
    except BadReply as e:
        print(f"runai: {e}; export stopped", file=sys.stderr)
        status = 1
    print(f"{written} image(s) written to {args.directory}", file=sys.stderr)
    return status


def _export(args):
    """Write the selected requests' images; yields each file's name once written."""
    with connect(args) as client:
        if args.request_id:
            ids = args.request_id
        else:
            ids = [_whole_number(item.get("request_id"), "a request id", 1)
                   for item in list_items(client, args.limit, args.before, args.query)]
        for request_id in ids:
            item, images = get_item(client, request_id)
            for message in images:
                index = _whole_number(message.get("index", 0), f"an image index (request {request_id})", 0)
                about = {k: message.get(k) for k in ("seed", "width", "height", "index")}
                texts = {
                    "parameters": parameters_text(item, about),
                    "runai": json.dumps(dict(item, image=about), ensure_ascii=False, separators=(",", ":")),
                }
                name = os.path.join(args.directory, f"runai-{request_id}-{index}.png")
                try:
                    # Exclusive: an export never overwrites a file, so it can be rerun.
                    with open(name, "xb") as f:
                        f.write(png_with_text(base64.b64decode(message["image"]), texts))
                except FileExistsError:
                    print(f"{name}: exists, left as it was", file=sys.stderr)
                    continue
                yield name


def delete_command(args):
    with connect(args) as client:
        for request_id in args.request_id:
            _ask(client, {"action": "history_delete", "id": "delete", "request_id": request_id})
            print(f"request {request_id} deleted")
    return 0


def _at_least_one(text):
    """An argparse type: a whole number of 1 or more (a count, a request id)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"out of range: must be 1 or more, not {value}")
    return value


def add_commands(commands, common):
    """``runai history ...``, under the ``runai`` command's subparsers."""
    top = commands.add_parser("history", help="the server's history (a server started with --db)")
    sub = top.add_subparsers(dest="history_command", required=True)

    def filters(p, default_limit):
        p.add_argument("--limit", type=_at_least_one, default=default_limit,
                       help=f"at most this many requests, 1 or more (default {default_limit or 'all'})")
        p.add_argument("--before", type=_at_least_one, default=None,
                       help="only requests older than this request id (default: from the newest)")
        p.add_argument("--query", default=None,
                       help="only requests whose prompt contains this text (default: every request)")

    ls = sub.add_parser("list", parents=[common], help="list past requests, newest first")
    filters(ls, 20)
    ls.add_argument("--json", action="store_true", help="the items as JSON (default: one line each)")
    ls.set_defaults(func=list_command)

    ex = sub.add_parser("export", parents=[common], help="write the images as PNGs, with their parameters")
    ex.add_argument("directory", help="the folder to write the PNGs into (made if missing)")
    filters(ex, None)
    ex.add_argument("--request-id", type=_at_least_one, action="append", default=None,
                    help="export this request (repeatable); default: every request the filters select")
    ex.set_defaults(func=export_command)

    rm = sub.add_parser("delete", parents=[common], help="delete requests and their images")
    rm.add_argument("request_id", type=_at_least_one, nargs="+", help="the ids of the requests to delete")
    rm.set_defaults(func=delete_command)
