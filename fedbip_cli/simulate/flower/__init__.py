"""``fedbip simulate`` on Flower: the strategies as a Flower strategy, and the apps that run them.

The server step is ``loop.server_round`` (over ``strategies.server_step``) and a client's round is
``loop.train_client`` / ``loop.evaluate_client``, exactly as in the in-process loop; this package
only carries states and metrics between them as Flower messages. Importing it needs ``flwr``
(``pip install 'fedbip[flower]'``).
"""

import os

# Offline and quiet by default, set before any module of this package imports flwr (which reads
# FLWR_TELEMETRY_ENABLED once, at import): no telemetry, no update check, no Ray usage statistics.
# A variable the user has set wins.
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

# The action of a method's post-training train messages ("train.finish"): here, where the light relay
# ClientApp (``relay``) can name it without importing the heavy apps.
FINISH = "finish"
