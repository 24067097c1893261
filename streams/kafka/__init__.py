"""The Kafka runtime: the one place that constructs Kafka clients and Faust apps.

:class:`streams.kafka.runtime.KafkaRuntime` (made from
:class:`streams.kafka.settings.KafkaSettings`) hands out producers, consumers, admin clients
and Faust apps, reads a topic to its end, writes dead letters with the standard headers
and says, with one message, when Kafka cannot be reached. Services get their clients from
it; ``tests/test_kafka_runtime.py`` checks that nothing else constructs one.

- ``runtime``: :class:`KafkaRuntime`, :class:`KafkaUnreachable`.
- ``reader``: :class:`TopicReader`, every partition of a topic read (no consumer group)
  until each is at its end.
- ``faust_config``: the Faust settings every loadcast Faust app uses, and why.
- ``clients``: the bare confluent-kafka constructors (used by the runtime and by the
  modules below it: the record producer, topic administration, the broker watch).

This package imports nothing at import time, so that those modules can use ``clients``.
"""
