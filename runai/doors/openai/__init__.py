"""OpenAI's images API (``/v1/...``) on the same core, queue and models as the socket
(``--openai``): :mod:`~runai.doors.openai.site` (the twisted.web site: body limits, the
Bearer token), :mod:`~runai.doors.openai.api` (the routes),
:mod:`~runai.doors.openai.parse` (OpenAI's request fields as core requests),
:mod:`~runai.doors.openai.multipart` (form bodies, bounded, in memory),
:mod:`~runai.doors.openai.replies` (answers, events and errors),
:mod:`~runai.doors.openai.stream` (a request's job, and server-sent events) and
:mod:`~runai.doors.openai.store` (the images of url replies, in memory for a while)."""
