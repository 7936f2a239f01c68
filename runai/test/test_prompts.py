"""AUTOMATIC1111's prompt syntax (runai.core.prompts): emphasis, BREAK, extra networks, what
is refused, and names found in a prompt. A1111's own doctests (modules/prompt_parser.py)
are the first cases; hypothesis checks that no text raises anything but RunaiError."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from runai.core import errors, prompts
from runai.core.prompts import BREAK, Network, parse


def pairs(text):
    return [s if s is BREAK else [s[0], s[1]] for s in parse(text).segments]


class EmphasisTests(SynchronousTestCase):
    def test_a1111s_own_examples(self):
        self.assertEqual(pairs("normal text"), [["normal text", 1.0]])
        self.assertEqual(pairs("an (important) word"), [["an ", 1.0], ["important", 1.1], [" word", 1.0]])
        self.assertEqual(pairs("(unbalanced"), [["unbalanced", 1.1]])
        self.assertEqual(pairs("\\(literal\\]"), [["(literal]", 1.0]])
        self.assertEqual(pairs("(unnecessary)(parens)"), [["unnecessaryparens", 1.1]])
        self.assertEqual(pairs("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."), [
            ["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
            [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]])

    def test_brackets(self):
        self.assertEqual(pairs("((a))"), [["a", 1.1 * 1.1]])
        self.assertEqual(pairs("[a]"), [["a", 1 / 1.1]])
        self.assertEqual(pairs("(a:1.3)"), [["a", 1.3]])
        self.assertEqual(pairs("(a:-0.5)"), [["a", -0.5]])
        self.assertEqual(pairs("a]b)c"), [["a]b)c", 1.0]])  # stray closers are text
        self.assertEqual(pairs("[a:b]"), [["a:b", 1 / 1.1]])  # no number: no schedule
        self.assertEqual(pairs("x:1.2)"), [["x:1.2)", 1.0]])
        self.assertEqual(pairs("a\\\\b\\c"), [["a\\bc", 1.0]])  # \\ is \, a lone \ vanishes

    def test_weight_one_is_the_plain_text(self):
        for text in ("(a:1.0)", "(a:1)", "a", "(a:1.00)"):
            parsed = parse(text)
            self.assertEqual((parsed.segments, parsed.plain, parsed.weighted), ((("a", 1.0),), "a", False), text)
        self.assertTrue(parse("(a:1.5)").weighted)
        self.assertEqual(parse("x (a:1.0) y").plain, "x a y")

    def test_plain_text_is_kept_as_it_is(self):
        for text in ("a lighthouse, at dusk: 4k", "", "  spaces  ", "emoji \U0001f600 and ünïcode"):
            self.assertEqual(parse(text).plain, text)
            self.assertFalse(parse(text).weighted)

    def test_break(self):
        self.assertEqual(pairs("a BREAK b"), [["a", 1.0], BREAK, ["b", 1.0]])
        self.assertEqual(pairs("(a BREAK b)"), [["a", 1.1], BREAK, ["b", 1.1]])
        self.assertEqual(pairs("aBREAK b, BREAKING"), [["aBREAK b, BREAKING", 1.0]])
        self.assertEqual(parse("a BREAK b").plain, "a b")
        self.assertTrue(parse("a BREAK b").weighted)
        self.assertEqual(repr(BREAK), "BREAK")

    def test_bounds(self):
        for text in ("(a:11)", "(((((a:10)))))", "(a:-10.5)"):
            with self.assertRaises(errors.RunaiError) as caught:
                parse(text)
            self.assertEqual(caught.exception.code, errors.OUT_OF_RANGE, text)
        with self.assertRaises(errors.RunaiError) as caught:
            parse("(" * (prompts.MAX_DEPTH + 1) + "a")
        self.assertIn("brackets", caught.exception.message)
        with self.assertRaises(errors.RunaiError):
            parse("(a:1.2.3)")


class NetworkTests(SynchronousTestCase):
    def test_lora_and_lyco_tags_are_taken_out(self):
        parsed = parse("a <lora:film:0.8> cat <lyco:grain:0.5:0.25>, <lora:sharp> <lora:x:te=0.2:unet=0.7>")
        self.assertEqual(parsed.plain, "a  cat ,  ")
        self.assertEqual(parsed.networks, (
            Network("lora", "film", 0.8, 0.8), Network("lora", "grain", 0.5, 0.25), Network("lora", "sharp", 1.0, 1.0),
            Network("lora", "x", 0.2, 0.7)))
        self.assertEqual(parse("(<lora:a b/c:1>)").networks, (Network("lora", "a b/c", 1.0, 1.0),))

    def test_bad_tags_are_refused_naming_them(self):
        cases = {"<hypernet:x:1>": "hypernet", "<lora:x:1:2:3>": "runai takes", "<lora::1>": "no network name",
                 "<lora:x:abc>": "must be a number", "<lora:x:dyn=4>": "dyn=", "<lora:x:nan>": "must be a number"}
        for text, said in cases.items():
            with self.assertRaises(errors.RunaiError) as caught:
                parse(text)
            self.assertEqual(caught.exception.code, errors.BAD_REQUEST, text)
            self.assertIn(said, caught.exception.message, text)
        with self.assertRaises(errors.RunaiError) as caught:
            parse("<lora:x:11>")
        self.assertEqual(caught.exception.code, errors.OUT_OF_RANGE)
        with self.assertRaises(errors.RunaiError) as caught:
            parse("<lora:x:1>" * (prompts.MAX_NETWORKS + 1))
        self.assertEqual(caught.exception.code, errors.OUT_OF_RANGE)

    def test_angle_brackets_without_a_kind_are_text(self):
        self.assertEqual(parse("<lora> a < b > c").plain, "<lora> a < b > c")


class RefusedTests(SynchronousTestCase):
    def assertRefused(self, text, said):
        with self.assertRaises(errors.RunaiError) as caught:
            parse(text)
        self.assertEqual(caught.exception.code, errors.BAD_REQUEST, text)
        self.assertIn(said, caught.exception.message, text)

    def test_composition_and_schedules(self):
        self.assertRefused("a cat AND a dog", "AND")
        for text in ("[a:b:0.5]", "[a:b:10]", "[a: 3]", "x [a::0.5] y", "[(a:1.2):.5]", "a[b:[c:d:2]:1]e", "[a:b:1e1]"):
            self.assertRefused(text, "[from:to:when]")
        for text in ("[a|b]", "x [a|b|c] y", "[[a]|b]"):
            self.assertRefused(text, "[a|b]")

    def test_what_only_looks_like_them_is_text(self):
        for text in ("rock and roll", "BRAND NEW", "a | b", "\\[a|b\\]", "[a|b", "(a|b)", "[a:b: 3 ]", "\\[a:b:1\\]"):
            parse(text)


class NameTests(SynchronousTestCase):
    def test_names_are_whole_words_case_insensitive(self):
        index = prompts.name_index(["easynegative", "bad-hands-5", "my emb", "cat"])
        self.assertEqual(prompts.find_names("EasyNegative, bad-hands-5 and my  emb; cats", index),
                         [(0, 12, "easynegative"), (14, 25, "bad-hands-5"), (30, 37, "my emb")])
        self.assertEqual(prompts.find_names("xeasynegative bad-hands-6", index), [])

    def test_the_longest_name_wins(self):
        index = prompts.name_index(["style", "style-2"])
        self.assertEqual(prompts.find_names("a style-2 b style", index), [(2, 9, "style-2"), (12, 17, "style")])

    def test_names_in_a_parsed_prompt(self):
        index = prompts.name_index(["emb", "other"])
        self.assertEqual(prompts.names_in(parse("(emb:1.2) and emb BREAK other"), index), ("emb", "other"))
        self.assertEqual(prompts.names_in(parse("nothing"), index), ())


PROMPT_ALPHABET = st.sampled_from(list("()[]:|\\<>=, .-_aAbB019") + ["BREAK", "AND", "lora", "lyco", "\n", "é"])


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(PROMPT_ALPHABET, max_size=60).map("".join))
    def test_nothing_but_runai_errors_from_syntax_soup(self, text):
        self.checked(text)

    @settings(max_examples=100, deadline=None)
    @given(st.text(max_size=200))
    def test_nothing_but_runai_errors_from_any_text(self, text):
        self.checked(text)

    def checked(self, text):
        try:
            parsed = parse(text)
        except errors.RunaiError:
            return
        self.assertIsInstance(parsed.plain, str)
        for segment in parsed.segments:
            if segment is not BREAK:
                self.assertTrue(segment[0])
                self.assertLessEqual(abs(segment[1]), prompts.MAX_WEIGHT)
        self.assertLessEqual(len(parsed.networks), prompts.MAX_NETWORKS)

    def test_a_long_hostile_prompt_is_parsed_quickly(self):
        import time

        for text in ("(a" * 10_000, "(a(a)" * 4000, "[" * 20_000, "\\" * 20_000, "<lora:" * 4000, "a BREAK " * 2500):
            start = time.perf_counter()
            try:
                parse(text)
            except errors.RunaiError:
                pass
            self.assertLess(time.perf_counter() - start, 1.0, text[:20])


class RequestTests(SynchronousTestCase):
    """The core's request parser reads both prompts before anything waits in the queue."""

    def request(self, **fields):
        from runai.core.fields import DictFields
        from runai.core.requests import generation_request
        from runai.test.prompt_fixtures import prompt_models

        values = dict(model="v1/tiny", prompt="a lighthouse", steps=2, width=64, height=64)
        values.update(fields)
        return generation_request("txt2img", DictFields(values), prompt_models())

    def test_errors_name_the_field(self):
        for field, text, code in (("prompt", "a [b|c]", errors.BAD_REQUEST),
                                  ("negative_prompt", "(fog:20)", errors.OUT_OF_RANGE),
                                  ("prompt", "<hypernet:x:1>", errors.BAD_REQUEST)):
            with self.assertRaises(errors.RunaiError) as caught:
                self.request(**{field: text})
            self.assertEqual(caught.exception.code, code)
            self.assertTrue(caught.exception.message.startswith(f"option '{field}': "), caught.exception.message)
        with self.assertRaises(errors.RunaiError) as caught:
            self.request(enable_hr=True, hr_prompt="[a:b:0.5]")  # the second pass's prompt too
        self.assertTrue(caught.exception.message.startswith("option 'hr_prompt': "), caught.exception.message)

    def test_networks_of_both_prompts_are_looked_up(self):
        for fields in ({"prompt": "a <lora:nowhere:0.5>"}, {"negative_prompt": "<lyco:nowhere>"}):
            with self.assertRaises(errors.RunaiError) as caught:
                self.request(**fields)
            self.assertEqual(caught.exception.code, errors.MODEL_NOT_FOUND)
            self.assertIn("nowhere", caught.exception.message)
        with self.assertRaises(errors.RunaiError) as caught:
            self.request(prompt="<lora:a>" * 9, negative_prompt="<lora:b>" * 8)
        self.assertEqual(caught.exception.code, errors.OUT_OF_RANGE)

    def test_a_plain_prompt_is_kept_as_sent(self):
        request = self.request(prompt="a (lighthouse:1.2)", negative_prompt="fog")
        self.assertEqual((request.prompt, request.negative_prompt, request.loras, request.embeddings),
                         ("a (lighthouse:1.2)", "fog", (), ()))
