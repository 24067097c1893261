"""The task API over Kafka: submit, status, results, cancel (:mod:`streams.tasks.app`)."""
