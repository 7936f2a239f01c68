# twistd finds this module by scanning sys.path for twisted/plugins; it must stay
# light: importing it happens on every `twistd --help`.
from twisted.application.service import ServiceMaker

runai_worker = ServiceMaker(
    "runai-worker",
    "runai.broker.worker_tap",
    "GPU workers for runai front servers, taking jobs from Redis (--broker).",
    "runai-worker",
)
