# twistd finds this module by scanning sys.path for twisted/plugins; it must stay
# light: importing it happens on every `twistd --help`.
from twisted.application.service import ServiceMaker

runai = ServiceMaker(
    "runai",
    "runai.tap",
    "A private, offline Stable Diffusion server (legacy runai socket protocol).",
    "runai",
)
