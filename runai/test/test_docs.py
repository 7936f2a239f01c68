"""The README and docs/*.md against the code (runai.test.docs_check): links and anchors,
the options their commands name, the HTTP routes; the README short, with the two command
blocks that .ci/run takes from it. And the checker itself, on made-up input."""

import argparse
import glob
import os
import re

from twisted.python import usage
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from runai.test.docs_check import Checker, Reference, anchors, github_slug

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")

_reference = None


def reference():
    """The code's options and routes, read once per test run."""
    global _reference
    if _reference is None:
        _reference = Reference.from_code()
    return _reference


def pages():
    if not os.path.exists(README):
        raise SkipTest("no README.md beside the package: not a checkout")
    return [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


class DocsTests(SynchronousTestCase):
    def test_every_page_agrees_with_the_code(self):
        checker = Checker(ROOT, reference())
        for page in pages():
            self.assertEqual(checker.check_file(page), [], page)

    def test_there_are_pages(self):
        names = {os.path.basename(p) for p in pages()}
        for name in ("socket-protocol.md", "http-api.md", "openai-api.md", "models.md", "families.md",
                     "history.md", "tls.md", "scale-out.md", "operations.md"):
            self.assertIn(name, names)

    def test_every_page_is_reachable_from_the_readme(self):
        linked, todo = set(), [README]
        while todo:
            page = todo.pop()
            with open(page, encoding="utf-8") as f:
                text = f.read()
            for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", text):
                full = os.path.normpath(os.path.join(os.path.dirname(page), target))
                if full not in linked and os.path.exists(full):
                    linked.add(full)
                    todo.append(full)
        orphans = [p for p in pages()[1:] if os.path.normpath(p) not in linked]
        self.assertEqual(orphans, [])

    def test_the_readme_is_short(self):
        pages()
        with open(README, encoding="utf-8") as f:
            self.assertLess(len(f.read().splitlines()), 200)

    def ci_block(self, marker):
        """The first code block after ``<!-- marker -->``, as .ci/run's awk takes it, and
        the line after the marker."""
        pages()
        with open(README, encoding="utf-8") as f:
            lines = f.read().splitlines()
        self.assertEqual(lines.count(f"<!-- {marker} -->"), 1, marker)
        at = lines.index(f"<!-- {marker} -->")
        block, inside = [], False
        for line in lines[at + 1:]:
            if line.startswith("```"):
                if inside:
                    break
                inside = True
            elif inside:
                block.append(line)
        return lines[at + 1], block

    def test_the_ci_blocks_follow_their_markers(self):
        for marker in ("ci:setup-and-start", "ci:test"):
            following, block = self.ci_block(marker)
            self.assertEqual(following, "```sh", marker)
            self.assertEqual(len(block), 1, marker)
            self.assertTrue(block[0].strip(), marker)

    def test_the_setup_command_pins_torch_with_its_torchvision(self):
        _, block = self.ci_block("ci:setup-and-start")
        self.assertIn("torch==2.14.1 torchvision==0.29.1 -e .", block[0])
        self.assertIn("twistd --nodaemon --pidfile= --logfile=- runai", block[0])

    def test_the_checker_reads_the_docs(self):
        """With a reference that knows no option and no route, the docs' own commands and
        routes are problems: the pages are really checked, not skipped."""
        cli = argparse.ArgumentParser(prog="runai")
        cli.add_subparsers().add_parser("ping")
        checker = Checker(ROOT, Reference(ServerOptions, {"runai": usage.Options, "runai-worker": usage.Options},
                                          cli, (), lambda segments: False))
        pages()
        problems = "\n".join(problem for name in ("operations.md", "scale-out.md", "http-api.md", "openai-api.md",
                                                   "socket-protocol.md")
                              for problem in checker.check_file(os.path.join(ROOT, "docs", name)))
        for expected in ("twistd runai --device: runai has no such option",
                         "twistd runai-worker --broker: runai-worker has no such option",
                         "/sdapi/v1/txt2img: the HTTP door has no such route",
                         "/v1/images/generations: the OpenAI door has no such route",
                         "--cache-size: no runai, twistd or runai-worker option",
                         "runai generate: no such subcommand"):
            self.assertIn(expected, problems)


class SlugTests(SynchronousTestCase):
    def test_github_slugs(self):
        self.assertEqual(github_slug("TLS, for a server on a LAN"), "tls-for-a-server-on-a-lan")
        self.assertEqual(github_slug("SD3 and FLUX.1"), "sd3-and-flux1")
        self.assertEqual(github_slug("Prompts: AUTOMATIC1111's syntax"), "prompts-automatic1111s-syntax")
        self.assertEqual(github_slug("History (optional, encrypted)"), "history-optional-encrypted")
        self.assertEqual(github_slug("The `runai` command"), "the-runai-command")
        self.assertEqual(github_slug("Scale out: workers on other machines (Redis)"),
                         "scale-out-workers-on-other-machines-redis")
        self.assertEqual(github_slug("snake_case stays"), "snake_case-stays")

    def test_repeated_headings_are_numbered(self):
        self.assertEqual(anchors("# A\n## B\n## B\n```\n# not a heading\n```\n"), {"a", "b", "b-1"})


class CheckerTests(SynchronousTestCase):
    def setUp(self):
        self.root = os.path.realpath(self.mktemp())
        os.makedirs(os.path.join(self.root, "docs"))
        with open(os.path.join(self.root, "docs", "other.md"), "w") as f:
            f.write("# Other page\n\n## A section\n\ntext\n")
        self.checker = Checker(self.root, reference())

    def check(self, markdown, checker=None):
        return (checker or self.checker).check_text(markdown, os.path.join(self.root, "docs", "page.md"))

    def assertFlags(self, markdown, *fragments, checker=None):
        problems = self.check(markdown, checker)
        self.assertEqual(len(problems), len(fragments), problems)
        for problem, fragment in zip(problems, fragments):
            self.assertIn(fragment, problem)

    def test_a_made_up_server_option(self):
        self.assertFlags("```sh\n.venv/bin/twistd --nodaemon runai --port 1 --made-up-option 3\n```\n",
                         "docs/page.md:2: twistd runai --made-up-option: runai has no such option")
        self.assertFlags("Start it with `twistd runai --made-up-option`.\n", "--made-up-option")
        self.assertFlags("```sh\ntwistd runai --port 1 \\\n    --made-up-option 3\n```\n", "--made-up-option")
        self.assertFlags("`twistd runai --port 1 --device cpu --cache-size 8GiB -m /srv --help`\n")

    def test_each_plugin_has_its_own_options(self):
        self.assertFlags("`twistd runai-worker --broker redis://h/0 --claim-timeout 5 --device cuda:0`\n")
        self.assertFlags("`twistd runai --claim-timeout 5`\n", "twistd runai --claim-timeout")
        self.assertFlags("`twistd runai-worker --port 5`\n", "twistd runai-worker --port")
        self.assertFlags("`twistd runai-made-up --port 5`\n", "twistd runai-made-up: no twistd plugin")

    def test_twistd_own_options(self):
        self.assertFlags("`twistd --nodaemon --pidfile= --logfile=- runai --port 1`\n")
        self.assertFlags("`twistd --pidfile x.pid runai --port 1`\n")
        self.assertFlags("`twistd --no-demon runai`\n", "twistd --no-demon: twistd has no such option")

    def test_a_bare_option(self):
        self.assertFlags("`--cache-size 8GiB`, `--device cuda:0 --device cuda:1`, `--nodaemon`, `--tls`\n")
        self.assertFlags("`--made-up 8GiB` and `-z`\n", "--made-up: no runai, twistd or runai-worker option")

    def test_the_runai_command(self):
        self.assertFlags('```sh\nrunai generate "a (lighthouse)" -m v1/m -o out.png --steps 30 -n "fog"\n'
                         "runai history list --query lighthouse --limit 100 --json\n"
                         "runai systemd-unit --model-dir /srv -- --port 6000 --db ~/h.db > runai.service\n"
                         "sudo systemctl enable --now runai && journalctl -u runai -f\n```\n")
        self.assertFlags("```sh\nrunai generate x --made-up 3\n```\n", "runai generate --made-up: no such option")
        self.assertFlags("`runai history list --made-up`\n", "runai history list --made-up: no such option")
        self.assertFlags("`.venv/bin/runai made-up --x`\n", "runai made-up: no such subcommand")
        self.assertFlags("`runai systemd-unit -- --made-up 1`\n", "twistd runai has no such option")
        self.assertFlags("`runai: the server refused` and `a runai database` and `the runai command`\n")

    def test_new_options_and_commands_are_picked_up(self):
        """What the code adds is known at once: a new plugin option, a new subcommand."""
        import runai.tap

        class Extended(runai.tap.Options):
            optParameters = runai.tap.Options.optParameters + [["new-endpoint-option", None, None, "new"]]

        cli = argparse.ArgumentParser(prog="runai")
        cli.add_subparsers().add_parser("fetch-thing").add_argument("--variant")
        checker = Checker(self.root, Reference(ServerOptions, {"runai": Extended}, cli, (), lambda s: False))
        self.assertFlags("`twistd runai --new-endpoint-option tcp:9108` `runai fetch-thing org/x --variant fp16`\n",
                         checker=checker)
        self.assertFlags("`twistd runai --new-endpoint-option tcp:9108`\n", "--new-endpoint-option")

    def test_routes(self):
        self.assertFlags("`POST /sdapi/v1/txt2img`, `GET /sdapi/v1/progress?skip_current_image=true`, "
                         "`/sdapi/v1/...`, `GET /v1/models/{name}`, `/v1/images/content/<id>.<ext>`, "
                         "`http://127.0.0.1:8000/v1`\n")
        self.assertFlags("`POST /sdapi/v1/made-up`\n", "/sdapi/v1/made-up: the HTTP door has no such route")
        self.assertFlags("```sh\ncurl localhost:7860/sdapi/v1/txt2imgs -d '{}'\n```\n", "/sdapi/v1/txt2imgs")
        self.assertFlags("`POST /v1/images/made-up`\n", "/v1/images/made-up: the OpenAI door has no such route")

    def test_links(self):
        self.assertFlags("# Page\n\n## Here\n\n[a](other.md), [b](other.md#a-section), [c](#here), "
                         "[d](https://example.com/x.md#nope), [e](../docs/other.md#other-page)\n\n"
                         "```\n[f](missing.md)\n```\n`[g](missing.md)`\n")
        self.assertFlags("[a](other.md#nope)\n", "link 'other.md#nope': docs/other.md has no heading #nope")
        self.assertFlags("[a](missing.md)\n", "link 'missing.md': no such file")
        self.assertFlags("# Page\n[a](#nope)\n", "link '#nope': this page has no heading #nope")
        self.assertFlags("[a](../../outside.md)\n", "leaves the repository")
        self.assertFlags("- one [a](#x)\n- two\n| [b](other.md#y) |\n", "#x", "#y")


class LayoutTests(SynchronousTestCase):
    """The README's folder map, and docs/layout.md's module list, stay true to the tree."""

    def folder_map(self):
        pages()
        with open(README, encoding="utf-8") as f:
            text = f.read()
        layout = text[text.index("\n## Layout"):]
        return re.search(r"```\n(.*?)```", layout, re.S).group(1)

    def test_every_package_is_on_the_map(self):
        named = set(re.findall(r"^(\S+)", self.folder_map(), re.M))
        packages = sorted(os.path.relpath(os.path.dirname(p), ROOT) + "/"
                          for p in glob.glob(os.path.join(ROOT, "runai", "*", "__init__.py")))
        self.assertTrue(packages)
        self.assertEqual([p for p in packages if p not in named], [])

    def test_every_path_on_the_map_exists(self):
        paths = re.findall(r"(?:^|\s)((?:runai|twisted|benchmarks|systemd|docs)/[\w./]*)", self.folder_map(), re.M)
        self.assertGreater(len(paths), 10)
        self.assertEqual([p for p in paths if not os.path.exists(os.path.join(ROOT, p.rstrip(".")))], [])

    def test_every_module_is_in_docs_layout(self):
        """docs/layout.md names every module of runai/ (tests aside) under its folder's
        entry: the module's file name after the folder's line, before the next folder's."""
        with open(os.path.join(ROOT, "docs", "layout.md"), encoding="utf-8") as f:
            text = f.read()
        tree = re.search(r"```\n(.*?)```", text, re.S).group(1)
        missing = []
        for path in sorted(glob.glob(os.path.join(ROOT, "runai", "**", "*.py"), recursive=True)):
            relative = os.path.relpath(path, ROOT)
            name = os.path.basename(relative)
            folder = os.path.dirname(relative) + "/"
            if name == "__init__.py" or folder.startswith("runai/test/"):
                continue
            if folder == "runai/":
                found = re.search(rf"^{re.escape(relative)}\b", tree, re.M)
            else:
                start = re.search(rf"^{re.escape(folder)}", tree, re.M)
                entry = tree[start.end():] if start else ""
                following = re.search(r"^\S", entry, re.M)
                entry = entry[:following.start()] if following else entry
                found = start and (re.search(rf"\b{re.escape(name)}\b", entry)
                                   or re.search(rf"^{re.escape(relative)}\b", tree, re.M))
            if not found:
                missing.append(relative)
        self.assertEqual(missing, [])
