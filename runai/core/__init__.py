"""The core: what every front door and every back end share, in no wire format.

:mod:`~runai.core.requests` (validated requests) read through :mod:`~runai.core.fields`,
with :mod:`~runai.core.images` (client images, checked) and :mod:`~runai.core.schedulers`
(the names); :mod:`~runai.core.jobs` and :mod:`~runai.core.interfaces` (the job listener,
the back end, the worker); :mod:`~runai.core.queue` (the FIFO queue in front of the local
workers); :mod:`~runai.core.service` (the policy every door goes through);
:mod:`~runai.core.errors` (the codes). No transports, no torch, no JSON.
"""
