# -*- test-case-name: runai.test.test_docs -*-
"""The Markdown documentation checked against the code: every relative link and its
``#anchor`` (GitHub's heading slugs), every option that a ``twistd runai``, ``twistd
runai-worker`` or ``runai SUBCOMMAND`` command names (in code blocks and in backticks),
and every ``/sdapi/v1/...`` and ``/v1/...`` route.

The options and routes are read from the code itself (the twistd plugins' ``usage.Options``,
the ``runai`` command's argparse parser, the HTTP doors' route tables), so an option or a
route added there is known here at once. Imports no torch.
"""

import argparse
import os
import re
import shlex

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
OPTION = re.compile(r"^(--?[A-Za-z][A-Za-z0-9_-]*)(=.*)?$")
BARE_OPTION = re.compile(r"^--[A-Za-z]")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
SDAPI = re.compile(r"/sdapi/v1/([\w{}<>.-]+(?:/[\w{}<>.-]+)*)")
OPENAI = re.compile(r"(?<![\w/.:])/v1/([\w{}<>.-]+(?:/[\w{}<>.-]+)*)")
ITEM = re.compile(r"^\s*([-*+]|\d+\.)\s|^\s*\|")
SEPARATORS = {"|", "||", "&", "&&", ";", ";;", ">", ">>", "<", "<<", "(", ")", "2>", "2>&1"}
# Words after which a command starts (besides a separator, or the line's start).
PREFIXES = {"sudo", "exec", "env", "time", "nohup", "$"}
# Options of other programs that the docs name in backticks on their own.
FOREIGN_OPTIONS = {"--api-auth"}  # AUTOMATIC1111's webui


def github_slug(text):
    """The anchor GitHub gives a heading: its rendered text lower-cased, without
    punctuation but ``-`` and ``_``, spaces made ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown):
    """Every heading's anchor, a repeated one numbered ``-1``, ``-2`` as GitHub does."""
    seen, out = {}, set()
    for _, line in _prose_lines(markdown):
        m = HEADING.match(line)
        if m:
            slug = github_slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _prose_lines(markdown):
    """``(line number, line)`` of the lines outside fenced code blocks."""
    fence = None
    for number, line in enumerate(markdown.split("\n"), 1):
        m = FENCE.match(line)
        if m and (fence is None or m.group(1) == fence):
            fence = None if fence else m.group(1)
            continue
        if fence is None:
            yield number, line


def code_blocks(markdown):
    """``(line number, logical line)`` of the fenced code blocks, ``\\`` continuations joined."""
    fence, pending, start = None, "", 0
    for number, line in enumerate(markdown.split("\n"), 1):
        m = FENCE.match(line)
        if m and (fence is None or m.group(1) == fence):
            fence = None if fence else m.group(1)
            continue
        if fence is None:
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def paragraphs(markdown):
    """``(first line number, text)`` of the prose: lines outside code blocks, joined up to a
    blank line, a heading, a list item or a table row, so that a code span broken across
    lines stays whole."""
    lines, start, previous = [], 0, None
    for number, line in _prose_lines(markdown):
        blank = not line.strip() or HEADING.match(line) or ITEM.match(line)
        if lines and (blank or previous is not None and number != previous + 1):
            yield start, " ".join(lines)
            lines = []
        if HEADING.match(line):
            yield number, line
        elif line.strip():
            if not lines:
                start = number
            lines.append(line.strip())
        previous = number
    if lines:
        yield start, " ".join(lines)


def code_spans(text):
    return [m.group(2).strip() for m in CODE_SPAN.finditer(text)]


def tokens(command):
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote: a fragment of a longer command
        return command.split()


class OptionSet:
    """The options one command takes: long and short names, and which take a value."""

    def __init__(self, long=(), short=(), valued=()):
        self.long, self.short, self.valued = set(long), set(short), set(valued)

    @classmethod
    def from_usage(cls, options_class):
        """From a ``twisted.python.usage.Options`` subclass, as it parses: its
        optParameters, optFlags, ``opt_`` methods and their short forms."""
        options = options_class()
        long = {name.rstrip("=") for name in options.longOpt}
        valued = {"--" + name.rstrip("=") for name in options.longOpt if name.endswith("=")}
        short = set(re.findall(r"[A-Za-z]", options.shortOpt))
        valued |= {"-" + c for c in re.findall(r"([A-Za-z]):", options.shortOpt)}
        return cls({"--" + n for n in long} | {"--" + n.replace("_", "-") for n in long},
                   {"-" + c for c in short}, valued)

    @classmethod
    def from_argparse(cls, parser):
        names, valued = set(), set()
        for action in parser._actions:
            names.update(action.option_strings)
            if action.option_strings and action.nargs != 0:
                valued.update(action.option_strings)
        return cls({n for n in names if n.startswith("--")}, {n for n in names if not n.startswith("--")}, valued)

    def __contains__(self, option):
        return option in self.long or option in self.short

    def __or__(self, other):
        return OptionSet(self.long | other.long, self.short | other.short, self.valued | other.valued)


def subcommands(parser):
    """``{name: subparser}`` of an argparse parser (empty when it has none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


class Reference:
    """What the code offers: ``twistd``'s own options, each ``twistd`` plugin's
    (``{tapname: usage.Options class}``), the ``runai`` command's parser, the routes under
    ``/sdapi/v1/`` (a set of names) and a test for a path under ``/v1/``."""

    def __init__(self, twistd, plugins, cli, sdapi_routes, openai_route):
        self.twistd = OptionSet.from_usage(twistd)
        self.plugins = {name: OptionSet.from_usage(cls) for name, cls in plugins.items()}
        self.cli = cli
        self.sdapi_routes = set(sdapi_routes)
        self.openai_route = openai_route
        everything = self.twistd
        for options in self.plugins.values():
            everything = everything | options
        stack = [cli]
        while stack:
            parser = stack.pop()
            everything = everything | OptionSet.from_argparse(parser)
            stack.extend(subcommands(parser).values())
        self.everything = everything

    @classmethod
    def from_code(cls):
        import twisted.plugins
        from twisted.application.service import IServiceMaker
        from twisted.internet.task import Clock
        from twisted.plugin import getPlugins
        from twisted.scripts.twistd import ServerOptions

        from runai.cli.main import parser
        from runai.doors.http.api import Api as HttpApi
        from runai.doors.openai.api import Api as OpenAiApi

        plugins = {m.tapname: m.options for m in getPlugins(IServiceMaker, twisted.plugins)
                   if m.tapname.startswith("runai")}
        sdapi = {name for _, name in HttpApi(None, Clock()).routes}
        openai = OpenAiApi(None, Clock())

        def openai_route(segments):
            return any(openai._route(method, list(segments)) is not None for method in (b"GET", b"POST"))

        return cls(ServerOptions, plugins, parser(), sdapi, openai_route)


class Checker:
    """Checks Markdown files under ``root`` against a :class:`Reference`; each check returns
    a list of problems, ``"path:line: what"``, empty when all is well."""

    def __init__(self, root, reference):
        self.root = os.path.realpath(root)
        self.reference = reference
        self._anchors = {}

    def check_file(self, path):
        with open(path, encoding="utf-8") as f:
            return self.check_text(f.read(), path)

    def check_text(self, markdown, path):
        name = os.path.relpath(path, self.root)
        problems = []
        for number, text in paragraphs(markdown):
            problems += [f"{name}:{number}: {p}" for p in self.links(CODE_SPAN.sub("", text), path, markdown)]
            for span in code_spans(text):
                problems += [f"{name}:{number}: {p}" for p in self.command(span, bare=True)]
                problems += [f"{name}:{number}: {p}" for p in self.routes(span)]
        for number, line in code_blocks(markdown):
            problems += [f"{name}:{number}: {p}" for p in self.command(line) + self.routes(line)]
        return problems

    # links ----------------------------------------------------------------------------

    def links(self, text, path, markdown):
        problems = []
        for m in LINK.finditer(text):
            target = m.group(2)
            if not target or SCHEME.match(target) or target.startswith("//"):
                continue
            file, _, anchor = target.partition("#")
            if file:
                full = os.path.realpath(os.path.join(os.path.dirname(os.path.realpath(path)), file))
                if not (full == self.root or full.startswith(self.root + os.sep)):
                    problems.append(f"link {target!r} leaves the repository")
                    continue
                if not os.path.exists(full):
                    problems.append(f"link {target!r}: no such file")
                    continue
            else:
                full = None
            if anchor and anchor not in self.anchors_of(full, markdown):
                where = os.path.relpath(full, self.root) if full else "this page"
                problems.append(f"link {target!r}: {where} has no heading #{anchor}")
        return problems

    def anchors_of(self, full, markdown):
        if full is None:
            return anchors(markdown)
        if not full.endswith(".md") or not os.path.isfile(full):
            return set()
        if full not in self._anchors:
            with open(full, encoding="utf-8") as f:
                self._anchors[full] = anchors(f.read())
        return self._anchors[full]

    # commands -------------------------------------------------------------------------

    def command(self, line, bare=False):
        """The options named by the ``twistd`` and ``runai`` commands in ``line``; with
        ``bare``, a code span that starts with an option (``--cache-size 8GiB``) is
        checked against every option any of them takes."""
        words = tokens(line)
        if bare and words and BARE_OPTION.match(words[0]):
            return [f"{o}: no runai, twistd or runai-worker option has this name"
                    for o in _options(words) if o not in self.reference.everything and o not in FOREIGN_OPTIONS]
        problems, i = [], 0
        while i < len(words):
            word = os.path.basename(words[i])
            starts = i == 0 or words[i - 1] in SEPARATORS or words[i - 1] in PREFIXES or "/" in words[i]
            if not starts:
                i += 1
            elif word == "twistd":
                found, i = self._twistd(words, i + 1)
                problems += found
            elif word == "runai":
                found, i = self._runai(words, i + 1)
                problems += found
            else:
                i += 1
        return problems

    def _twistd(self, words, i):
        problems, twistd = [], self.reference.twistd
        while i < len(words) and OPTION.match(words[i]):
            option, value = OPTION.match(words[i]).groups()
            if option not in twistd:
                problems.append(f"twistd {option}: twistd has no such option")
            i += 2 if option in twistd.valued and value is None else 1
        if i >= len(words) or words[i] in SEPARATORS:
            return problems, i
        plugin = words[i]
        options = self.reference.plugins.get(plugin)
        if options is None:
            if plugin.startswith("runai"):
                problems.append(f"twistd {plugin}: no twistd plugin has this name")
            return problems, i + 1
        rest, i = _until_separator(words, i + 1)
        problems += [f"twistd {plugin} {o}: {plugin} has no such option"
                     for o in _options(rest) if o not in options]
        return problems, i

    def _runai(self, words, i):
        parser, path = self.reference.cli, ["runai"]
        while i < len(words) and re.fullmatch(r"[a-z][a-z0-9-]*", words[i]):
            choices = subcommands(parser)
            if not choices:
                break
            if words[i] not in choices:
                return [f"{' '.join(path)} {words[i]}: no such subcommand"], i + 1
            parser = choices[words[i]]
            path.append(words[i])
            i += 1
        if len(path) == 1:  # the word runai, not the command (a unit's name, a log line)
            return [], i
        rest, i = _until_separator(words, i)
        after = None
        if "--" in rest:
            rest, after = rest[:rest.index("--")], rest[rest.index("--") + 1:]
        options = OptionSet.from_argparse(parser)
        problems = [f"{' '.join(path)} {o}: no such option" for o in _options(rest) if o not in options]
        if after is not None and path[-1] == "systemd-unit":  # options after -- go to twistd's plugin
            plugin = "runai-worker" if "--worker" in rest else "runai"
            target = self.reference.plugins.get(plugin, OptionSet())
            problems += [f"{' '.join(path)} -- {o}: twistd {plugin} has no such option"
                         for o in _options(after) if o not in target]
        return problems, i

    # routes ---------------------------------------------------------------------------

    def routes(self, text):
        problems = []
        for m in SDAPI.finditer(text):
            route = m.group(1).split("?")[0].rstrip(".")
            if "..." in m.group(1) or not route:
                continue
            if route not in self.reference.sdapi_routes:
                problems.append(f"/sdapi/v1/{route}: the HTTP door has no such route")
        for m in OPENAI.finditer(text):
            route = m.group(1).split("?")[0].rstrip(".")
            if "..." in m.group(1) or not route:
                continue
            if not self.reference.openai_route(route.split("/")):
                problems.append(f"/v1/{route}: the OpenAI door has no such route")
        return problems


def _until_separator(words, i):
    start = i
    while i < len(words) and words[i] not in SEPARATORS:
        i += 1
    return words[start:i], i


def _options(words):
    return [OPTION.match(w).group(1) for w in words if OPTION.match(w)]
