# -*- test-case-name: runai.test.test_singlefile -*-
"""No model hub, ever: the environment that keeps huggingface_hub offline and quiet.

huggingface_hub reads these variables once, when diffusers or transformers first import
it. Every runai module that imports diffusers or transformers at module level imports
this module first::

    from runai.models import offline  # before diffusers and transformers

    del offline  # imported for what importing it does

A variable already set in the environment is left as it is.
"""

import os

ENVIRONMENT = {
    # A server must never reach out to a model hub, nor stall while trying to.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DISABLE_TELEMETRY": "1",
    # Progress bars would go to the server's stderr, one line per load and per image.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}

for _name, _value in ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)
