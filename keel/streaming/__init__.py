"""Streaming features: account events through NATS JetStream into Feast's online and offline stores.

``events`` turns the generator's days into timestamped transactions and publishes them;
``features`` holds the window maths (spend and transactions in the last hour and today);
``state`` is the consumer's durable event log; ``consumer`` runs ``keel stream consume``;
``lag`` reads how far behind it is; ``cli`` is ``keel stream``. NATS, Feast and pandas are
imported inside functions: loading Dagster definitions stays fast.
"""
