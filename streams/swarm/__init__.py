"""The swarm worker: takes tasks from Kafka, runs a handler, heartbeats, publishes results."""
