"""Kafka client settings shared by every loadcast process.

``KafkaSettings`` is a section of the root settings (``loadcast.settings``); it is read
from the environment (``LOADCAST_KAFKA__BOOTSTRAP_SERVERS=…``) or the settings file. SASL
and TLS options are passed through to librdkafka unchanged::

    LOADCAST_KAFKA__SECURITY_PROTOCOL=SASL_SSL
    LOADCAST_KAFKA__SASL_MECHANISM=SCRAM-SHA-512
    LOADCAST_KAFKA__SASL_USERNAME=loadcast
    LOADCAST_KAFKA__SASL_PASSWORD=…
    LOADCAST_KAFKA__SSL_CA_LOCATION=/etc/ssl/kafka-ca.pem
    LOADCAST_KAFKA__EXTRA='{"client.rack": "eu-west-1a"}'   # any other librdkafka key
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from streams.kafka.brokerwatch import RDKAFKA_LOGGER, watch


class KafkaSettings(BaseModel):
    """Where Kafka is and how to talk to it."""

    model_config = ConfigDict(extra="forbid")

    bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="host:port[,host:port…] of the Kafka cluster"
    )
    topic_prefix: str = Field("loadcast.", description="prefix of every loadcast topic")
    partitions: int = Field(6, ge=1, le=10_000, description="partitions of new topics")
    replication_factor: int = Field(1, ge=1, le=16, description="replicas of new topics")
    security_protocol: str | None = Field(
        None, description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    extra: dict[str, str] = Field(
        default_factory=dict, description="other librdkafka properties, passed through"
    )
    schema_registry_url: str | None = Field(
        None, description="Confluent-compatible Schema Registry; unset = embedded id table"
    )

    def client_config(self) -> dict[str, Any]:
        """librdkafka properties common to producers, consumers and admin clients."""
        # Brokers closing idle connections is routine; librdkafka would log each one. A
        # lost broker is logged once (then every 30 s) by the process's broker watch.
        w = watch(self)
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "log.connection.close": False,
            "error_cb": w.error_cb,
            "logger": RDKAFKA_LOGGER,
        }
        optional = {
            "security.protocol": self.security_protocol,
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
        }
        conf.update({k: v for k, v in optional.items() if v is not None})
        conf.update(self.extra)
        return conf

    def consumer_config(self, group_id: str | None, **overrides: Any) -> dict[str, Any]:
        """Consumer properties. Short session timeouts: group joins take about half the
        session timeout on some brokers (Tansu), and a lost worker should be noticed fast."""
        conf = self.client_config()
        conf.update(
            {
                "group.id": group_id or "loadcast-reader",
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 1000,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": group_id is not None,
            }
        )
        conf.update(overrides)
        return conf
