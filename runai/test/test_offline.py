"""runai.models.offline: the libraries' notices in runai's log, once each, and none that a
user can do nothing about."""

import logging

from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from runai.models import offline

del offline  # imported for what importing it does: the libraries' records come to runai's log


class NoticeTests(SynchronousTestCase):
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def said(self):
        return [formatEvent(e) for e in self.events if e.get("log_namespace") == "runai.libraries"]

    def test_idle_notices_are_not_logged(self):
        logging.getLogger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
        logging.getLogger("diffusers.models.modeling_utils").warning(
            "There are modules in AutoencoderKL that should be kept in float32: []. Casting directly with `to()` ...")
        self.assertEqual(self.said(), [])
        logging.getLogger("diffusers.models.modeling_utils").warning("a notice worth reading (test_offline)")
        logging.getLogger("diffusers.models.modeling_utils").warning("a notice worth reading (test_offline)")
        self.assertEqual(self.said(), ["diffusers.models.modeling_utils: a notice worth reading (test_offline)"])
        self.assertEqual([e["log_level"] for e in self.events if e.get("log_namespace") == "runai.libraries"],
                         [LogLevel.warn])
