"""``fedbip simulate`` on Flower: the strategies as a Flower strategy, and the apps that run them.

The server step is ``loop.server_round`` (over ``strategies.server_step``) and a client's round is
``loop.train_client`` / ``loop.evaluate_client``, exactly as in the in-process loop; this package
only carries states and metrics between them as Flower messages. Importing it needs ``flwr``
(``pip install 'fedbip[flower]'``).
"""
