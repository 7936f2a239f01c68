"""runai.core.service: the policy every door shares, on a real queue and a scripted
engine."""

from runai.core import errors
from runai.core.jobs import NullListener
from runai.core.requests import GenerationRequest
from runai.test.support import FactoryTestCase


class Recorded(NullListener):
    def __init__(self):
        self.events = []

    def job_done(self, job, result, seconds):
        self.events.append(("done", result))

    def job_failed(self, job, error):
        self.events.append(("failed", error.code))


def request(models, **fields):
    fields.setdefault("steps", 2)
    return GenerationRequest(action="txt2img", model_path=models + "/v1/tiny", model_name="v1/tiny",
                             prompt="a lighthouse", **fields)


class CoreTests(FactoryTestCase):
    def test_submit_runs_and_reports_to_the_doors_listener(self):
        heard = Recorded()
        job = self.core.submit(request(self.models, seed=5), "owner", heard)
        self.assertEqual((job.owner, self.core.status()), ("owner", (0, True)))
        self.pool.run_one()
        self.assertEqual(heard.events, [("done", 1)])
        self.assertEqual(self.core.status(), (0, False))

    def test_nsfw_filter_without_a_checker(self):
        unchecked = request(self.models, nsfw_filter=True)
        self.core.submit(unchecked, "owner", Recorded())
        self.core.refuse_unchecked = True
        with self.assertRaises(errors.RunaiError) as e:
            self.core.submit(unchecked, "owner", Recorded())
        self.assertEqual(e.exception.code, errors.SAFETY_CHECKER_MISSING)
        self.assertEqual(self.queue.queued, 0)

    def test_owner_gone_reports_what_it_dropped(self):
        running, waiting = Recorded(), Recorded()
        self.core.submit(request(self.models), "a", running)
        self.core.submit(request(self.models), "a", waiting)
        dropped = self.core.owner_gone("a")
        self.assertEqual(len(dropped), 1)
        self.assertEqual(waiting.events, [("failed", errors.CANCELLED)])
        self.pool.run_one()
        self.assertEqual(running.events, [("failed", errors.CANCELLED)])

    def test_models_are_listed_with_what_is_loaded(self):
        entries, loaded = self.successResultOf(self.core.list_models())
        self.assertEqual([e.name for e in entries], ["v1/tiny"])
        self.assertEqual(loaded, ())
