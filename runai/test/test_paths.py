"""Tests for runai.models.paths: a client's model names never lead outside the model folder,
and a name without an extension finds the best format there."""

import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from runai.core import errors
from runai.models.paths import MAX_NAME_LENGTH, resolve_model, safety_checker_path
from runai.test import library_fixtures as fx


class ResolveModelTests(SynchronousTestCase):
    def setUp(self):
        root = Path(self.mktemp())
        root.mkdir()
        self.root = Path(os.path.realpath(root))
        self.model_dir = self.root / "models"
        self.tiny = self.make_model(self.model_dir / "v1" / "tiny")
        self.make_model(self.model_dir / "runwayml" / "stable-diffusion-v1-5")
        (self.model_dir / "v2" / "empty").mkdir(parents=True)  # no model_index.json
        # A model outside the model folder, right next to it.
        self.outside = self.make_model(self.root / "elsewhere" / "secret")

    def make_model(self, path):
        path.mkdir(parents=True)
        (path / "model_index.json").write_text("{}")
        return path

    def resolve(self, name, base_path=None):
        return resolve_model(self.model_dir, name, base_path)

    def assert_code(self, name, code, base_path=None):
        with self.assertRaises(errors.RunaiError) as caught:
            self.resolve(name, base_path)
        self.assertEqual(caught.exception.code, code, caught.exception.message)
        return caught.exception

    def symlink(self, link, target):
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(target, link)
        except (OSError, NotImplementedError) as e:
            self.skipTest(f"cannot create symlinks here: {e}")

    # Accepted -----------------------------------------------------------------------

    def test_relative_name(self):
        self.assertEqual(self.resolve("v1/tiny"), (self.tiny, "v1/tiny"))

    def test_nested_name(self):
        path, name = self.resolve("runwayml/stable-diffusion-v1-5")
        self.assertEqual(name, "runwayml/stable-diffusion-v1-5")
        self.assertEqual(path, self.model_dir / "runwayml" / "stable-diffusion-v1-5")

    def test_absolute_inside(self):
        self.assertEqual(self.resolve(str(self.tiny)), (self.tiny, "v1/tiny"))

    def test_dotdot_that_stays_inside(self):
        self.assertEqual(self.resolve("v2/../v1/./tiny"), (self.tiny, "v1/tiny"))

    def test_base_path_is_the_model_folder(self):
        # What the Krita client sends: model_base_path, and the model joined onto it.
        base = str(self.model_dir)
        self.assertEqual(self.resolve("v1/tiny", base), (self.tiny, "v1/tiny"))
        self.assertEqual(self.resolve(os.path.join(base, "v1", "tiny"), base), (self.tiny, "v1/tiny"))

    def test_base_path_inside(self):
        base = str(self.model_dir / "v1")
        self.assertEqual(self.resolve("tiny", base), (self.tiny, "v1/tiny"))
        self.assertEqual(self.resolve(str(self.tiny), base), (self.tiny, "v1/tiny"))

    def test_relative_base_path_is_taken_from_the_model_folder(self):
        self.assertEqual(self.resolve("tiny", "v1"), (self.tiny, "v1/tiny"))
        self.assert_code("tiny", errors.PATH_OUTSIDE_MODEL_DIR, base_path="..")

    def test_symlink_inside_to_inside(self):
        self.symlink(self.model_dir / "links" / "favourite", self.tiny)
        path, name = self.resolve("links/favourite")
        self.assertEqual(path, self.tiny)
        self.assertEqual(name, "v1/tiny")  # the resolved name, not the link

    def test_relative_symlink_inside(self):
        self.symlink(self.model_dir / "v1" / "alias", "tiny")
        self.assertEqual(self.resolve("v1/alias"), (self.tiny, "v1/tiny"))

    def test_display_name_is_relative_posix(self):
        for name in ("v1/tiny", str(self.tiny), "./v1//tiny/"):
            path, display = self.resolve(name)
            self.assertFalse(os.path.isabs(display), display)
            self.assertNotIn("\\", display)
            self.assertEqual(display, "v1/tiny")
            self.assertEqual(self.model_dir / display, path)

    def test_model_folder_itself(self):
        (self.model_dir / "model_index.json").write_text("{}")
        self.assertEqual(self.resolve("."), (self.model_dir, "."))

    # Refused: outside -----------------------------------------------------------------

    def test_dotdot_escape(self):
        self.assert_code("../elsewhere/secret", errors.PATH_OUTSIDE_MODEL_DIR)
        self.assert_code("v1/../../elsewhere/secret", errors.PATH_OUTSIDE_MODEL_DIR)
        self.assert_code("..", errors.PATH_OUTSIDE_MODEL_DIR)
        self.assert_code("../" * 50 + "etc", errors.PATH_OUTSIDE_MODEL_DIR)

    def test_absolute_outside(self):
        self.assert_code("/etc", errors.PATH_OUTSIDE_MODEL_DIR)
        self.assert_code("/", errors.PATH_OUTSIDE_MODEL_DIR)
        self.assert_code(str(self.outside), errors.PATH_OUTSIDE_MODEL_DIR)

    def test_sibling_with_common_prefix(self):
        # /x/models-evil is not inside /x/models, though the string starts the same.
        self.make_model(self.root / "models-evil")
        self.assert_code(str(self.root / "models-evil"), errors.PATH_OUTSIDE_MODEL_DIR)
        self.assert_code("../models-evil", errors.PATH_OUTSIDE_MODEL_DIR)

    def test_symlink_inside_pointing_outside(self):
        self.symlink(self.model_dir / "v1" / "sneaky", self.outside)
        self.assertTrue((self.model_dir / "v1" / "sneaky" / "model_index.json").is_file())
        self.assert_code("v1/sneaky", errors.PATH_OUTSIDE_MODEL_DIR)
        self.assert_code(str(self.model_dir / "v1" / "sneaky"), errors.PATH_OUTSIDE_MODEL_DIR)

    def test_symlinked_folder_pointing_outside(self):
        # The link is a parent folder of the model, not the model itself.
        self.symlink(self.model_dir / "shared", self.outside.parent)
        self.assert_code("shared/secret", errors.PATH_OUTSIDE_MODEL_DIR)

    def test_relative_symlink_pointing_outside(self):
        self.symlink(self.model_dir / "up", "../elsewhere/secret")
        self.assert_code("up", errors.PATH_OUTSIDE_MODEL_DIR)

    def test_base_path_outside(self):
        for base in ("/", "/etc", str(self.root), str(self.root / "elsewhere")):
            self.assert_code("v1/tiny", errors.PATH_OUTSIDE_MODEL_DIR, base)
        self.assert_code("secret", errors.PATH_OUTSIDE_MODEL_DIR, str(self.root / "elsewhere"))

    def test_base_path_symlink_pointing_outside(self):
        self.symlink(self.model_dir / "door", self.outside.parent)
        self.assert_code("secret", errors.PATH_OUTSIDE_MODEL_DIR, str(self.model_dir / "door"))

    def test_absolute_name_ignores_base(self):
        # An absolute model name with a valid base still has to be inside.
        self.assert_code(str(self.outside), errors.PATH_OUTSIDE_MODEL_DIR, str(self.model_dir))

    def test_outside_does_not_leak_existence(self):
        there = self.assert_code(str(self.outside), errors.PATH_OUTSIDE_MODEL_DIR)
        missing = self.assert_code(str(self.root / "elsewhere" / "nothing"), errors.PATH_OUTSIDE_MODEL_DIR)
        self.assertEqual(type(there), type(missing))
        self.assert_code("../nothing/at/all", errors.PATH_OUTSIDE_MODEL_DIR)

    # Refused: not found, bad names ---------------------------------------------------

    def test_not_found(self):
        e = self.assert_code("v1/nope", errors.MODEL_NOT_FOUND)
        self.assertNotIn(str(self.root), e.message)  # the reply names it relatively
        self.assert_code(str(self.model_dir / "v3" / "x"), errors.MODEL_NOT_FOUND)

    def test_folder_without_model_index(self):
        self.assert_code("v2/empty", errors.MODEL_NOT_FOUND)
        self.assert_code("v1", errors.MODEL_NOT_FOUND)

    def test_file_instead_of_folder(self):
        self.assert_code("v1/tiny/model_index.json", errors.MODEL_NOT_FOUND)

    def test_model_index_is_a_folder(self):
        (self.model_dir / "odd" / "model_index.json").mkdir(parents=True)
        self.assert_code("odd", errors.MODEL_NOT_FOUND)

    def test_dangling_symlink_inside(self):
        self.symlink(self.model_dir / "gone", self.model_dir / "never-was")
        self.assert_code("gone", errors.MODEL_NOT_FOUND)

    def test_symlink_loop(self):
        self.symlink(self.model_dir / "loop", self.model_dir / "loop")
        e = self.assertRaises(errors.RunaiError, self.resolve, "loop")
        self.assertIn(e.code, (errors.MODEL_NOT_FOUND, errors.PATH_OUTSIDE_MODEL_DIR))

    def test_nul_in_name(self):
        self.assert_code("v1/tiny\x00", errors.BAD_REQUEST)
        self.assert_code("\x00/etc", errors.BAD_REQUEST)
        self.assert_code("v1/tiny", errors.BAD_REQUEST, str(self.model_dir) + "\x00")

    def test_not_a_string(self):
        for name in (None, "", 5, ["v1/tiny"], b"v1/tiny"):
            self.assert_code(name, errors.BAD_REQUEST)
        for base in ("", 5, ["/"]):
            self.assert_code("v1/tiny", errors.BAD_REQUEST, base)

    def test_too_long(self):
        self.assert_code("a" * (MAX_NAME_LENGTH + 1), errors.OUT_OF_RANGE)
        self.assert_code("v1/tiny", errors.OUT_OF_RANGE, "/" * (MAX_NAME_LENGTH + 1))

    def test_component_too_long_for_the_file_system(self):
        # Under MAX_NAME_LENGTH but past the file system's NAME_MAX: an answer, not OSError.
        self.assert_code("a" * 300, errors.MODEL_NOT_FOUND)
        self.assert_code("v1/" + "a" * 1000 + "/x", errors.MODEL_NOT_FOUND)

    def test_unencodable_name(self):
        # JSON can carry a lone surrogate; no file name can hold one.
        self.assert_code("v1/\ud800", errors.BAD_REQUEST)
        self.assert_code("v1/tiny", errors.BAD_REQUEST, str(self.model_dir) + "/\udfff")

    def test_the_model_folder_itself(self):
        # Not a name to add ".safetensors" to (that was "..safetensors", outside).
        for name, base in ((".", None), ("./", None), (str(self.model_dir), None), ("v1/..", None), ("..", "v1")):
            error = self.assert_code(name, errors.MODEL_NOT_FOUND, base)
            self.assertIn("is the model folder itself", error.message)
            self.assertNotIn("safetensors", error.message)


class SafetyCheckerPathTests(SynchronousTestCase):
    def setUp(self):
        self.model_dir = Path(os.path.realpath(self.mktemp()))
        self.checker = self.model_dir / "CompVis" / "stable-diffusion-safety-checker"
        self.checker.mkdir(parents=True)
        (self.checker / "config.json").write_text("{}")

    def test_installed(self):
        self.assertEqual(safety_checker_path(self.model_dir), str(self.checker))

    def test_missing(self):
        (self.checker / "config.json").unlink()
        self.assertIsNone(safety_checker_path(self.model_dir))

    def test_a_file_linked_outside_is_refused(self):
        outside = Path(os.path.realpath(self.mktemp()))
        outside.mkdir()
        (outside / "model.safetensors").write_bytes(b"secret")
        (self.checker / "model.safetensors").symlink_to(outside / "model.safetensors")
        with self.assertRaises(errors.RunaiError) as caught:
            safety_checker_path(self.model_dir)
        self.assertEqual(caught.exception.code, errors.PATH_OUTSIDE_MODEL_DIR)


class BestFormatTests(SynchronousTestCase):
    def setUp(self):
        self.models = fx.model_folder()

    def resolve(self, name, base=None):
        path, display = resolve_model(self.models, name, base)
        return display

    def test_folder_then_safetensors_then_ckpt(self):
        self.assertEqual(self.resolve("v1/both"), "v1/both")
        self.assertEqual(self.resolve("v1/pair"), "v1/pair.safetensors")
        self.assertEqual(self.resolve("v1/old"), "v1/old.ckpt")

    def test_explicit_names_are_honoured(self):
        self.assertEqual(self.resolve("v1/both.ckpt"), "v1/both.ckpt")
        self.assertEqual(self.resolve("v1/both.safetensors"), "v1/both.safetensors")
        self.assertEqual(self.resolve(str(self.models / "v1" / "pair.ckpt")), "v1/pair.ckpt")
        self.assertEqual(self.resolve("pair.ckpt", str(self.models / "v1")), "v1/pair.ckpt")

    def test_an_explicit_missing_file_is_not_replaced(self):
        with self.assertRaises(errors.RunaiError) as caught:
            self.resolve("v1/old.safetensors")
        self.assertEqual(caught.exception.code, errors.MODEL_NOT_FOUND)

    def test_not_found_says_what_was_looked_for(self):
        with self.assertRaises(errors.RunaiError) as caught:
            self.resolve("v1/nothing")
        self.assertEqual(caught.exception.code, errors.MODEL_NOT_FOUND)
        self.assertIn("v1/nothing.safetensors", caught.exception.message)

    def test_links_and_escapes_are_refused(self):
        for name in ("v1/outside", "v1/outside.safetensors", "../outside.safetensors", "../outside",
                     str(self.models.parent / "outside.safetensors")):
            with self.assertRaises(errors.RunaiError) as caught:
                self.resolve(name)
            self.assertEqual(caught.exception.code, errors.PATH_OUTSIDE_MODEL_DIR, name)

    def test_other_files_are_not_models(self):
        for name in ("v2/vpred.yaml", "v1/both/unet/config.json"):
            with self.assertRaises(errors.RunaiError) as caught:
                self.resolve(name)
            self.assertEqual(caught.exception.code, errors.MODEL_NOT_FOUND, name)
