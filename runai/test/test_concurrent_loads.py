"""Several workers loading at once (issue 23): runai.models.loadlock, through the engine and
through the real server with two CPU workers.

Every round starts cold (fresh engines, or a fresh server), so that the loads really meet;
the tiny models of :mod:`runai.test.library_fixtures` load in a twentieth of a second.
"""

import sys
import threading

import torch
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from runai.backends.local import LocalWorker
from runai.core import errors
from runai.engine.engine import Engine
from runai.models import assemble, cache, loadlock
from runai.models.library import ModelLibrary
from runai.test import library_fixtures as fx
from runai.test.support import make_server
from runai.test.test_cache import generate, request
from runai.test.test_e2e import LegacyClient, legacy_request, png_of

# A diffusers folder, the same model as a single file, another version, another folder.
SAME = ("v1/both", "v1/both.safetensors", "v1/both.ckpt")
DIFFERENT = ("v1/both", "v1/both.safetensors", "v2/tiny.safetensors", "runwayml/stable-diffusion-v1-5")
WAIT = 20  # seconds: far more than a tiny load takes, even on a busy machine


def at_once(calls):
    """Run each call in a thread of its own, all released together by one barrier; their
    results, in order. An exception in any of them is raised here."""
    barrier = threading.Barrier(len(calls), timeout=WAIT)
    outcomes = [None] * len(calls)

    def run(index, call):
        try:
            barrier.wait()
            outcomes[index] = (True, call())
        except BaseException:
            outcomes[index] = (False, sys.exc_info()[1])

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 3)
    if any(thread.is_alive() for thread in threads):
        raise AssertionError("a load never ended")
    for ok, value in outcomes:
        if not ok:
            raise value
    return [value for _, value in outcomes]


def weights(pipe):
    return [t for c in pipe.components.values() if isinstance(c, torch.nn.Module)
            for t in list(c.parameters()) + list(c.buffers())]


class ConcurrentLoadCase(SynchronousTestCase):
    def setUp(self):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.addCleanup(torch.set_num_threads, threads)
        self.models = fx.model_folder()
        self.library = ModelLibrary(self.models)
        self._references = {}

    def engines(self, count):
        return [Engine(device="cpu", dtype="float32", library=self.library) for _ in range(count)]

    def png(self, engine, name):
        [image] = generate(engine, request(self.models, name))
        return image.png

    def reference(self, name):
        """The image of ``name`` from an engine that loaded it alone."""
        if name not in self._references:
            self._references[name] = self.png(self.engines(1)[0], name)
        return self._references[name]

    def cold_round(self, names):
        """Fresh engines, one per name, load at the same instant and then generate at the
        same instant; each must give the image its model gives when loaded alone."""
        engines = self.engines(len(names))
        pipes = at_once([lambda e=e, n=n: e.load(str(self.models / n), n) for e, n in zip(engines, names)])
        self.assertEqual([e.load_count for e in engines], [1] * len(engines))
        pngs = at_once([lambda e=e, n=n: self.png(e, n) for e, n in zip(engines, names)])
        self.assertEqual(pngs, [self.reference(n) for n in names])
        return engines, pipes

    def assertIndependent(self, pipes):
        """No two pipelines share a weight, a module, a scheduler or a tokenizer: each
        worker changes its own (the scheduler per request, the VAE's precision)."""
        storages = [{t.untyped_storage().data_ptr() for t in weights(p)} for p in pipes]
        for i, a in enumerate(pipes):
            for j in range(i):
                b = pipes[j]
                self.assertFalse(storages[i] & storages[j], "two workers share weights")
                for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
                    self.assertIsNot(getattr(a, component), getattr(b, component), component)


class EngineTests(ConcurrentLoadCase):
    def test_two_workers_load_the_same_model_at_once(self):
        for _ in range(4):
            for name in SAME:
                _, pipes = self.cold_round([name, name])
                self.assertIndependent(pipes)

    def test_four_workers_load_the_same_model_at_once(self):
        for name in SAME:
            _, pipes = self.cold_round([name] * 4)
            self.assertIndependent(pipes)

    def test_four_workers_load_different_models_at_once(self):
        for turn in range(3):
            names = DIFFERENT[turn:] + DIFFERENT[:turn]
            _, pipes = self.cold_round(list(names))
            self.assertEqual([p.unet.config.cross_attention_dim for p in pipes],
                             [fx.V2_WIDTH if n.startswith("v2/") else 32 for n in names])

    def test_a_worker_changing_its_copy_leaves_the_other_alone(self):
        engines, (a, b) = self.cold_round(["v1/both", "v1/both"])
        steps = a.scheduler.num_inference_steps
        b.vae.to(torch.float64)
        b.scheduler.set_timesteps(5)
        self.assertEqual(a.vae.dtype, torch.float32)
        self.assertEqual(a.scheduler.num_inference_steps, steps)
        self.assertEqual(self.png(engines[0], "v1/both"), self.reference("v1/both"))


class ReadOnceTests(ConcurrentLoadCase):
    """Workers that want the same model at once: one reads it, the others copy it."""

    def setUp(self):
        super().setUp()
        self.entered = set()
        real = loadlock.loading

        def counting():
            # load_once counts a loader as waiting before it takes the lock: once every
            # thread has called this, all of them wait for the model.
            self.entered.add(threading.get_ident())
            return real()

        self.patch(loadlock, "loading", counting)

    def slow_disk(self, loaders, fail_first=False):
        """Make ``ModelLoader._load_folder`` wait until ``loaders`` loaders wait, count its
        calls, and raise in the first one if ``fail_first``."""
        real = cache.ModelLoader._load_folder
        reads = []

        def load_folder(loader, path, *args):
            reads.append(path)
            for _ in range(WAIT * 100):
                if len(self.entered) >= loaders:
                    break
                threading.Event().wait(0.01)
            if fail_first and len(reads) == 1:
                raise RuntimeError("the disk says no")
            return real(loader, path, *args)

        self.patch(cache.ModelLoader, "_load_folder", load_folder)
        return reads

    def test_one_read_from_disk_and_a_copy_for_each_other(self):
        self.reference("v1/both")
        reads = self.slow_disk(3)
        engines, pipes = self.cold_round(["v1/both"] * 3)
        self.assertEqual(len(reads), 1)
        self.assertIndependent(pipes)
        for pipe in pipes[1:]:
            for mine, theirs in zip(weights(pipe), weights(pipes[0])):
                self.assertTrue(torch.equal(mine, theirs))
                self.assertEqual(mine.dtype, theirs.dtype)
        # Each keeps it in its cache, as a load; nothing else keeps it once they let go.
        self.assertEqual([e.loader.loaded_paths for e in engines], [(str(self.models / "v1/both"),)] * 3)
        self.assertEqual(loadlock._shares, {})

    def test_a_copy_is_of_the_model_as_loaded_not_as_run(self):
        # The worker that read the model runs a job on it at once, with a scheduler of the
        # job's own, while the other's copy is made: the copy's scheduler, and the config
        # every later job's scheduler is built from, are the model's.
        lone = self.engines(1)[0]
        lone.load(str(self.models / "v1/both"))
        self.reference("v1/both")
        self.slow_disk(2)
        ran, copies = threading.Event(), []
        real = loadlock._Template.copy_to

        def copy_to(template, device):
            copies.append(device)
            self.assertTrue(ran.wait(WAIT))
            return real(template, device)

        self.patch(loadlock._Template, "copy_to", copy_to)
        engines = self.engines(2)

        def load_and_run(engine):
            engine.load(str(self.models / "v1/both"))
            scheduler = type(engine.pipe.scheduler).__name__
            generate(engine, request(self.models, "v1/both", scheduler="dpmpp_2m_karras"))
            ran.set()
            return scheduler

        schedulers = at_once([lambda e=e: load_and_run(e) for e in engines])
        self.assertEqual(len(copies), 1)
        self.assertEqual(schedulers, [type(lone.pipe.scheduler).__name__] * 2)
        for engine in engines:
            self.assertEqual(engine.loader.current.scheduler_config, lone.loader.current.scheduler_config)
            self.assertEqual(self.png(engine, "v1/both"), self.reference("v1/both"))

    def test_a_copy_that_fails_is_a_read_from_disk(self):
        for where in ("__init__", "copy_to"):
            def broken(*args):
                raise RuntimeError("cannot copy")

            self.reference("v1/both")
            reads = self.slow_disk(2)
            self.entered.clear()
            self.patch(loadlock._Template, where, broken)
            self.cold_round(["v1/both"] * 2)
            self.assertEqual(len(reads), 2, where)
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1, where)
            self.assertEqual(loadlock._shares, {})

    def test_a_failed_load_fails_only_its_own_job(self):
        # The first load fails for its own reasons: the lock is let go, and the other
        # worker, which waited for the same model, reads it itself.
        self.reference("v1/both")
        self.slow_disk(2, fail_first=True)
        engines = self.engines(2)
        outcomes = at_once([lambda e=e: self.try_load(e, "v1/both") for e in engines])
        self.assertEqual(sorted(outcomes, key=str), ["RuntimeError: the disk says no", "loaded"])
        [good] = [e for e, o in zip(engines, outcomes) if o == "loaded"]
        self.assertEqual(self.png(good, "v1/both"), self.reference("v1/both"))
        self.assertEqual(loadlock._shares, {})

    def try_load(self, engine, name):
        try:
            engine.load(str(self.models / name), name)
        except errors.RunaiError as e:
            self.assertEqual(e.code, errors.MODEL_LOAD_FAILED)
            return e.message.split(": ", 1)[1]
        return "loaded"


def torch_functions():
    """What diffusers' and transformers' loaders patch process-wide while they build a
    model: torch.nn.init and its users, torch.linspace, the default dtype."""
    from transformers import initialization

    names = ("torch.nn.init",) + tuple(initialization.TORCH_MODULES_TO_PATCH)
    modules = [sys.modules[n] for n in names if n in sys.modules]
    functions = {(m, k): v for m in modules for k, v in vars(m).items() if callable(v)}
    functions[(torch, "linspace")] = torch.linspace
    return functions, torch.get_default_dtype()


class LockTests(ConcurrentLoadCase):
    """Two loads made to overlap: a diffusers folder whose UNet is being built under
    diffusers' no_init_weights, and a single file whose text encoder is being built under
    transformers' no_init_weights (:mod:`runai.models.assemble`)."""

    def setUp(self):
        super().setUp()
        before = torch_functions()

        def restore():
            functions, dtype = before
            for (module, name), value in functions.items():
                setattr(module, name, value)
            torch.set_default_dtype(dtype)

        self.addCleanup(restore)
        self.before = before

    def overlap(self, patience):
        """The folder's load waits inside diffusers' patch until the single file's load is
        inside transformers' (at most ``patience`` seconds), and the single file's until
        the folder's is done; returns whether they overlapped."""
        from diffusers import UNet2DConditionModel

        folder_inside, file_inside, folder_done = threading.Event(), threading.Event(), threading.Event()
        overlapped = []
        folder_thread = []
        real_from_config = UNet2DConditionModel.from_config
        real_text_config = assemble.text_config

        def from_config(cls, *args, **kwargs):
            if threading.get_ident() in folder_thread and not folder_inside.is_set():
                folder_inside.set()
                overlapped.append(file_inside.wait(patience))
            return real_from_config.__func__(cls, *args, **kwargs)

        def text_config(config):
            file_inside.set()
            folder_done.wait(WAIT)
            return real_text_config(config)

        self.assertNotIn("from_config", vars(UNet2DConditionModel))
        UNet2DConditionModel.from_config = classmethod(from_config)
        self.addCleanup(delattr, UNet2DConditionModel, "from_config")
        self.patch(assemble, "text_config", text_config)
        folder, single = self.engines(2)

        def load_folder():
            folder_thread.append(threading.get_ident())
            try:
                return folder.load(str(self.models / "v1/both"))
            finally:
                folder_done.set()

        def load_file():
            folder_inside.wait(WAIT)
            return single.load(str(self.models / "v1/both.safetensors"))

        at_once([load_folder, load_file])
        return overlapped == [True]

    def test_loads_never_overlap(self):
        self.assertFalse(self.overlap(patience=0.5))
        self.assertEqual(torch_functions(), self.before)

    def test_without_the_lock_a_patch_outlives_both_loads(self):
        # What the lock is for: without it the two loads overlap, and transformers puts
        # back, as torch's own, the no-op that diffusers had put in place.
        class NoLock:
            def __enter__(self):
                pass

            def __exit__(self, *exc):
                pass

        self.patch(loadlock, "_lock", NoLock())
        self.assertTrue(self.overlap(patience=WAIT))
        if torch_functions() == self.before:
            raise SkipTest("these diffusers and transformers leave no patch behind")
        self.assertIsNot(torch.nn.init.normal_, self.before[0][(torch.nn.init, "normal_")])


class TwoColdWorkersServer(TestCase):
    """Two clients send a txt2img at the same instant to a server with two CPU workers
    that have loaded nothing yet, round after round."""

    timeout = 120

    @inlineCallbacks
    def test_every_job_is_served(self):
        models = fx.model_folder()
        library = ModelLibrary(models)
        pictures = []
        for round_ in range(3):
            workers = [LocalWorker(reactor, device="cpu", dtype="float32", name=f"cold-{round_}-{i}",
                                   cpu_threads=1, engine_options=dict(library=library)) for i in range(2)]
            for worker in workers:
                worker.startService()
            queue, _, factory = make_server(reactor, str(models), workers, pool=reactor.getThreadPool(),
                                            idle_timeout=30)
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
            try:
                barrier = threading.Barrier(2, timeout=WAIT)
                ask = legacy_request(str(models), seed=7, txt2img_model=str(models / "v1" / "both"))
                answers = yield gatherResults([deferToThread(self.ask, port.getHost().port, barrier, ask)
                                               for _ in range(2)])
                loaded = [len(w.loaded_models()) for w in workers]
            finally:
                yield port.stopListening()
                yield queue.stopService()
                yield gatherResults([w.stopService() for w in workers])
            self.assertEqual([a[-1].get("action") for a in answers], ["done", "done"], answers)
            # Each worker ran one of the two jobs, and so loaded the model.
            self.assertEqual(loaded, [1, 1])
            pictures += [png_of(next(m for m in a if "image" in m)) for a in answers]
        self.assertEqual(len(pictures), 6)
        self.assertEqual(len(set(pictures)), 1)

    def ask(self, port, barrier, message):
        client = LegacyClient(port)
        try:
            barrier.wait()
            client.send(message)
            return client.until_final()
        finally:
            client.close()
