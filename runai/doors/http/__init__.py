"""An AUTOMATIC1111-compatible HTTP API (``/sdapi/v1/...``) on the same core, queue and
models as the socket: :mod:`~runai.doors.http.site` (the twisted.web site: body limits,
auth; also the OpenAI door's and --metrics'), :mod:`~runai.doors.http.channel` (one
connection: URL, header and time bounds, early answers), :mod:`~runai.doors.http.api`
(the routes), :mod:`~runai.doors.http.parse` (AUTOMATIC1111's request fields), :mod:`~runai.doors.http.samplers`,
:mod:`~runai.doors.http.checkpoints` (model titles and hashes),
:mod:`~runai.doors.http.replies` (images, ``info``, errors) and
:mod:`~runai.doors.http.jobs` (a request's job, and progress)."""
