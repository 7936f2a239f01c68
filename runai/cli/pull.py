# -*- test-case-name: runai.test.test_cli_pull -*-
"""``runai pull REPO``: download a model from the Hugging Face Hub into the model folder.

The one command that touches the network, and only when it is typed: the server never
does. It lists the repository (one request), picks the files runai uses
(:mod:`runai.models.hub_files`), and lets ``huggingface_hub.snapshot_download`` fetch just
those (its progress bars on stderr), pinned to the commit it listed, into
``<org>/.<name>.partial`` beside the destination; when every file is there, the folder is
renamed to ``<org>/<name>``. A failure before any byte arrived leaves nothing behind; after
some, the ``.partial`` folder stays and the same command resumes it. The token comes from
the ``HF_TOKEN`` environment variable (or ``huggingface-cli login``), never the command
line; ``HF_ENDPOINT`` names another Hub.
"""

import glob
import importlib
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

from runai.models import hub_files

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
CACHE = ".cache"  # huggingface_hub's bookkeeping inside a local_dir download


class PullError(Exception):
    """What stops the pull, in one line."""


def repo_parts(repo):
    """``(org, name)`` of ``org/name``; PullError for anything else (no ``..``, no path)."""
    parts = repo.split("/")
    if len(parts) != 2 or not all(_NAME.fullmatch(p) and ".." not in p for p in parts):
        raise PullError(f"{repo!r} is not a Hub repository name (org/name: letters, digits, '.', '_', '-')")
    return parts[0], parts[1]


def default_model_dir():
    return os.path.expanduser("~/stablediffusion")


def _transport_errors():
    """The network's exceptions, as the HTTP library under huggingface_hub raises them
    (httpx2 for huggingface_hub 1.x and later, requests before)."""
    found = [ConnectionError, TimeoutError, socket.gaierror]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _hub_error_line(e, repo, endpoint):
    """One line for what huggingface_hub or the network raised; None when not theirs."""
    from huggingface_hub import utils as errors

    where = endpoint or "the Hub"
    chain, seen = [], e
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    transport = _transport_errors() + (errors.OfflineModeIsEnabled,)
    for error in chain:
        if isinstance(error, transport):
            said = str(error).splitlines()[0] if str(error) else type(error).__name__
            return f"cannot reach {where} (offline?): {said}"
    for error in chain:
        if isinstance(error, errors.RevisionNotFoundError):
            return f"{repo} has no such revision on {where}"
        if isinstance(error, errors.GatedRepoError):
            return f"{repo} is gated: it needs HF_TOKEN set to a token with access (accept its terms on its Hub page)"
        if isinstance(error, errors.HfHubHTTPError) and error.response is not None:
            status = error.response.status_code
            code = error.response.headers.get("X-Error-Code")
            if status == 404 or code == "RepoNotFound":
                return f"no such repo {repo} on {where} (a private one needs HF_TOKEN with access)"
            if status in (401, 403):
                return f"{repo} refused access ({status}): it needs HF_TOKEN set to a token with access"
            return f"{where} answered {status} for {repo}"
    return None


def _downloaded_bytes(folder):
    """Whether ``folder`` holds bytes of the model worth resuming (a whole file, or part of
    one; ``model_index.json`` alone, fetched first to choose the rest, is not)."""
    for root, _, files in os.walk(folder):
        inside = Path(root).relative_to(folder).parts
        in_cache = CACHE in inside
        for name in files:
            if (in_cache and not name.endswith(".incomplete")) or (not inside and name == "model_index.json"):
                continue
            try:
                if os.path.getsize(os.path.join(root, name)) > 0:
                    return True
            except OSError:
                pass
    return False


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


class Pull:
    """One ``runai pull``: ``run()`` installs the repository, or raises."""

    def __init__(self, repo, model_dir, variant=None, revision=None, file=None, force=False,
                 endpoint=None, token=None):
        self.repo = repo
        self.org, self.name = repo_parts(repo)
        self.model_dir = Path(os.path.realpath(os.path.expanduser(model_dir)))
        self.variant, self.revision, self.file, self.force = variant, revision, file, force
        self.endpoint = endpoint
        self.token = token
        self.destination = self.model_dir / self.org / self.name
        self.partial = self.model_dir / self.org / f".{self.name}.partial"

    def _api(self):
        from huggingface_hub import HfApi
        return HfApi(endpoint=self.endpoint, token=self.token)

    def listing(self):
        """``(commit, [paths])`` of the repository at its revision."""
        info = self._api().model_info(self.repo, revision=self.revision)
        return info.sha, [s.rfilename for s in info.siblings or ()]

    def choose(self, commit, listing, base_files=None):
        if base_files is not None:
            return hub_files.base_files(listing, base_files)
        if self.file is not None or "model_index.json" not in listing:
            return hub_files.single_files(listing, self.file)
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(self.repo, "model_index.json", revision=commit, local_dir=self.partial,
                               cache_dir=self.partial / CACHE / "hub", endpoint=self.endpoint, token=self.token)
        try:
            model_index = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise PullError(f"{self.repo}'s model_index.json cannot be read: {e}") from None
        if not isinstance(model_index, dict):
            raise PullError(f"{self.repo}'s model_index.json is not an object")
        return hub_files.diffusers_files(listing, model_index, self.variant)

    def run(self, base_files=None):
        """Install the repository (``base_files``: only those tokenizer files); return
        ``(destination, {installed path: size})``."""
        from huggingface_hub import constants, snapshot_download

        if not self.model_dir.is_dir():
            raise PullError(f"the model folder {self.model_dir} does not exist (--model-dir)")
        if self.destination.exists() and not self.force:
            raise PullError(f"{self.destination} already exists; remove it first, or pull with --force to replace it")
        for path in (self.destination.parent, self.partial):
            if path.is_symlink() or (path.exists() and self.model_dir not in Path(os.path.realpath(path)).parents):
                raise PullError(f"{path} is a link or leads outside the model folder: nothing is written through it")
        offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, False  # this command's one purpose
        created_org = not self.destination.parent.exists()
        try:
            commit, listing = self.listing()
            self.partial.mkdir(parents=True, exist_ok=True)
            chosen = self.choose(commit, listing, base_files)
            snapshot_download(self.repo, revision=commit, local_dir=self.partial,
                              cache_dir=self.partial / CACHE / "hub", endpoint=self.endpoint, token=self.token,
                              allow_patterns=[glob.escape(p) for p in chosen])
            return self.destination, self._install(chosen)
        except BaseException:
            self._clean_up(created_org)
            raise
        finally:
            constants.HF_HUB_OFFLINE = offline

    def _clean_up(self, created_org):
        if self.partial.exists() and not _downloaded_bytes(self.partial):
            shutil.rmtree(self.partial, ignore_errors=True)
        if created_org:
            try:
                self.destination.parent.rmdir()  # only if empty
            except OSError:
                pass

    def _install(self, chosen):
        """Check every file arrived, give variants their plain names, rename into place."""
        missing = [p for p in chosen if not (self.partial / p).is_file()]
        if missing:
            raise PullError(f"the download is incomplete ({len(missing)} file(s) missing, e.g. {missing[0]}); "
                            "run the same command again to resume")
        for path in sorted(self.partial.rglob("*"), reverse=True):  # what an earlier try chose otherwise
            relative = path.relative_to(self.partial)
            if relative.parts[0] != CACHE and path.is_file() and relative.as_posix() not in chosen:
                path.unlink()
            elif path.is_dir() and relative.parts[0] != CACHE and not any(path.iterdir()):
                path.rmdir()
        renames = {a: b for a, b in chosen.items() if a != b}
        for source, target in chosen.items():
            if source != target:
                os.replace(self.partial / source, self.partial / target)
            if target.endswith(".safetensors.index.json"):
                index = self.partial / target
                index.write_text(hub_files.rewrite_index(index.read_text(encoding="utf-8"), renames), encoding="utf-8")
        shutil.rmtree(self.partial / CACHE, ignore_errors=True)
        sizes = {target: (self.partial / target).stat().st_size for target in chosen.values()}
        if self.destination.exists():  # --force: the old one goes once the new one is whole
            old = self.partial.with_name(f".{self.name}.old")
            _remove(old)
            os.replace(self.destination, old)
            os.replace(self.partial, self.destination)
            _remove(old)
        else:
            os.replace(self.partial, self.destination)
        return sizes


def _size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def pull_command(args):
    endpoint = os.environ.get("HF_ENDPOINT") or None
    token = os.environ.get("HF_TOKEN") or None
    model_dir = args.model_dir
    if model_dir is None:  # the default folder is made on first use; a named one must exist
        model_dir = default_model_dir()
        os.makedirs(model_dir, exist_ok=True)
    try:
        if args.base is not None:
            jobs = [(Pull(repo, model_dir, endpoint=endpoint, token=token), files)
                    for repo, files in hub_files.BASES[args.base]]
        else:
            jobs = [(Pull(args.repo, model_dir, variant=args.variant, revision=args.revision, file=args.file,
                          force=args.force, endpoint=endpoint, token=token), None)]
    except PullError as e:
        print(f"runai pull: {e}", file=sys.stderr)
        return 1
    for pull, files in jobs:
        if files is not None and pull.destination.exists():
            print(f"{pull.repo}: already in {pull.destination}", file=sys.stderr)
            continue
        try:
            destination, sizes = pull.run(files)
        except (PullError, hub_files.SelectionError) as e:
            print(f"runai pull: {pull.repo}: {e}", file=sys.stderr)
            return 1
        except Exception as e:
            line = _hub_error_line(e, pull.repo, endpoint)
            if line is None:
                raise
            kept = " (the files so far stay in {}; the same command resumes)".format(pull.partial) \
                if pull.partial.exists() else ""
            print(f"runai pull: {line}{kept}", file=sys.stderr)
            return 1
        name = destination.relative_to(pull.model_dir).as_posix()
        files = f"{len(sizes)} file{'s' if len(sizes) != 1 else ''}"
        print(f"{name}: {files}, {_size(sum(sizes.values()))} in {destination}")
    return 0


def add_commands(commands):
    p = commands.add_parser(
        "pull", help="download a model from the Hugging Face Hub into the model folder",
        description="Download a model from the Hugging Face Hub into the model folder, at ORG/NAME: for a "
                    "diffusers repository its configs, tokenizers and one set of .safetensors weights; else "
                    "its .safetensors file. Resumable; HF_TOKEN (environment) for gated models; HF_ENDPOINT "
                    "for another Hub. The server itself never downloads anything.",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("repo", nargs="?", metavar="REPO", help="the repository, ORG/NAME")
    target.add_argument("--base", choices=sorted(hub_files.BASES),
                        help="instead of a model: the tokenizers that single files of this family need "
                             "(megabytes, no weights; default: none)")
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="the weights' variant, e.g. fp16 (a component without it gets its plain weights; "
                        "default: the plain weights)")
    p.add_argument("--revision", default=None, metavar="REV", help="a branch, tag or commit (default: main)")
    p.add_argument("--file", default=None, metavar="NAME",
                   help="just this .safetensors file of the repository (default: a single-file repository's "
                        "only one)")
    p.add_argument("--force", action="store_true",
                   help="replace ORG/NAME if it exists, once the new one is whole (default: refuse)")
    p.add_argument("--model-dir", "-m", default=None, metavar="DIR",
                   help="the model folder (default ~/stablediffusion)")
    p.set_defaults(func=pull_command)
