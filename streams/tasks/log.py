"""The task API's Kafka side: writing tasks and statuses (acknowledged), and following
task-status and task-results into the :class:`~streams.tasks.book.TaskBook`.

Writes are awaited until the broker acknowledges them: ``202 Accepted`` means the task is
in Kafka, not in a buffer of this process. The writer's producer is polled by the event
loop (delivery callbacks settle their futures there, with no thread in between). The
follower is a thread that reads both topics from their start (no consumer group: every
replica reads everything) and hands decoded batches to the event loop, which alone
changes the book.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_END, KafkaError, Message, TopicPartition

from schemas.codec import Codec, CodecError
from streams.kafka.runtime import KafkaRuntime

log = logging.getLogger(__name__)

Batch = list[tuple[str, dict[str, Any]]]  # (schema name, record)
WRITER_HEADER = "loadcast.writer"
POLL_S = 0.002  # delivery reports are served this often while records are in flight
IDLE_POLL_S = 0.5  # and this often otherwise (error callbacks)


class TaskWriter:
    """An idempotent producer whose sends are futures on the event loop.

    The producer is polled by the event loop itself (:meth:`_serve`): every
    ``POLL_S`` while acknowledgements are outstanding, every ``IDLE_POLL_S`` otherwise
    (error callbacks). Delivery callbacks thus run on the loop and settle their futures
    directly: a polling thread handing acks over cost a GIL hand-off per poll (a
    thousand a second under load) and a wake-up of the loop per batch of acks.
    """

    def __init__(self, rt: KafkaRuntime, codec: Codec, client_id: str) -> None:
        # The API builds every record it writes from checked input: no range checks again.
        self.codec = Codec(codec.ids, validate_on_encode=False)
        self.topics = {name: rt.topic(short) for name, short in (
            ("Task", "tasks"), ("TaskStatus", "task-status"), ("TaskResult", "task-results"))}
        self._producer = rt.producer(**{
            "client.id": client_id, "enable.idempotence": True, "linger.ms": 5,
            "partitioner": "murmur2_random", "queue.buffering.max.messages": 200_000,
        })
        self.nonce = uuid.uuid4().hex.encode()  # this writer, not a previous process
        self._own: list[tuple[str, str | bytes | None]] = [(WRITER_HEADER, self.nonce)]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unacked = 0  # records produced whose delivery report was not served yet
        self._timer: asyncio.TimerHandle | None = None
        self._fast = False  # the timer is a POLL_S one
        self._closed = False

    def send(self, schema: str, record: dict[str, Any],
             own: bool = False) -> asyncio.Future[None]:
        """Encode and produce ``record`` keyed by its task id; the future is done when the
        broker acknowledged it (``BufferError`` at once when the producer is full).
        ``own``: marked with this writer's nonce (header ``loadcast.writer``), for a record
        this process applied already and skips when it reads it back."""
        return self.send_all([(schema, record, own)])

    def send_all(self, records: list[tuple[str, dict[str, Any], bool]]) -> asyncio.Future[None]:
        """Produce ``(schema, record, own)`` each as :meth:`send` does; one future, done
        when the broker acknowledged them all (failed at the first refusal). A
        ``BufferError`` at once leaves the records produced before it in flight."""
        loop = self._loop or self._start(asyncio.get_running_loop())
        fut: asyncio.Future[None] = loop.create_future()
        left = len(records)

        def delivered(err: KafkaError | None, msg: Message) -> None:
            nonlocal left
            self._unacked -= 1
            left -= 1
            if fut.done():
                return
            if err is not None:
                fut.set_exception(RuntimeError(f"Kafka did not take the record: {err}"))
            elif left == 0:
                fut.set_result(None)

        if not self._fast:
            self._schedule(POLL_S)
        produce, encode, own_headers = self._producer.produce, self.codec.encode, self._own
        for schema, record, own in records:
            produce(self.topics[schema], encode(schema, record), record["task_id"].encode(),
                    on_delivery=delivered, headers=own_headers if own else None)
            self._unacked += 1
        return fut

    def _start(self, loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
        self._loop = loop
        self._schedule(IDLE_POLL_S)
        return loop

    def _schedule(self, delay: float) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._fast = delay == POLL_S
        self._timer = None if self._closed else self._loop.call_later(delay, self._serve)

    def _serve(self) -> None:
        """Serve delivery reports (and error callbacks) on the loop."""
        self._timer = None
        self._producer.poll(0)
        self._schedule(POLL_S if self._unacked > 0 else IDLE_POLL_S)

    async def aclose(self, timeout: float = 10.0) -> None:
        """Wait (up to ``timeout``) until every record is acknowledged, then stop polling."""
        deadline = time.monotonic() + timeout
        while len(self._producer) > 0 and time.monotonic() < deadline:
            self._producer.poll(0)
            await asyncio.sleep(POLL_S)
        self._producer.poll(0)
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class StatusFollower:
    """Reads task-status and task-results from their start and keeps following; calls
    ``deliver(batch)`` on ``loop`` for each decoded batch. ``caught_up`` is set once every
    partition was read to the end it had at start. ``scores``: load-scores too, from
    their end (only new forecasts matter, and that topic is large).

    One consumer (no group) has every partition of the topics assigned: one fetch a
    round for all of them, where a reader per topic tripled the fetches, threads and
    wake-ups of an idle API.
    """

    def __init__(self, rt: KafkaRuntime, codec: Codec, loop: asyncio.AbstractEventLoop,
                 deliver: Callable[[Batch], None], skip_writer: bytes | None = None,
                 scores: bool = False, metadata_timeout: float = 10.0) -> None:
        self.codec = codec
        self.skip = (WRITER_HEADER, skip_writer) if skip_writer else None
        self.loop = loop
        self.deliver = deliver
        topics = [("task-status", "TaskStatus", 0), ("task-results", "TaskResult", 0)]
        if scores:  # forecasts of task arrivals (streams.tasks.demand)
            topics.append(("load-scores", "LoadScore", OFFSET_END))
        # a short fetch wait: brokers that answer only at the max wait (Tansu) would add
        # it to every status change the API sees
        overrides: dict[str, Any] = {"fetch.wait.max.ms": 10, "enable.partition.eof": True}
        self.consumer = rt.consumer(None, **overrides)
        self.schemas: dict[str, str] = {}
        assignment: list[TopicPartition] = []
        for short, schema, start in topics:
            topic = rt.topic(short)
            t = self.consumer.list_topics(topic, timeout=metadata_timeout).topics.get(topic)
            if t is None or t.error is not None:
                self.consumer.close()
                raise KeyError(f"topic {topic} does not exist (run `loadcast topics ensure`)")
            self.schemas[topic] = schema
            assignment += [TopicPartition(topic, p, start) for p in sorted(t.partitions)]
        self.consumer.assign(assignment)
        self._unread = {(tp.topic, tp.partition) for tp in assignment}  # end not reached yet
        self.caught_up = threading.Event()
        self.bad = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="task-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait_caught_up(self, timeout: float) -> None:
        """Block until the start-up read reached the end (TimeoutError after ``timeout``)."""
        if not self.caught_up.wait(timeout):
            raise TimeoutError(f"task-status was not read to its end in {timeout}s")

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self._decode(self.consumer.consume(2000, 0.02))
                if batch:
                    self.loop.call_soon_threadsafe(self.deliver, batch)
                if not self._unread and not self.caught_up.is_set():
                    # after the batch above: the loop applies it before it sees the flag
                    self.loop.call_soon_threadsafe(self.caught_up.set)
        except Exception:  # a dead follower must be loud: the API would answer stale
            log.exception("task follower stopped")
            raise

    def _decode(self, messages: list[Message]) -> Batch:
        out: Batch = []
        for m in messages:
            err, topic = m.error(), m.topic() or ""
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._unread.discard((topic, m.partition() or 0))
                else:
                    log.warning("following %s: %s", topic, err)
                continue
            value = m.value()
            if value is None:
                continue
            if self.skip is not None:
                headers = m.headers()
                if headers and self.skip in headers:
                    continue
            schema = self.schemas[topic]
            try:
                out.append((schema, self.codec.decode(value, schema)))
            except CodecError as e:
                self.bad += 1
                log.warning("%s[%s]@%s: undecodable record skipped: %s",
                            topic, m.partition(), m.offset(), e)
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        with contextlib.suppress(Exception):
            self.consumer.close()


def now_ms() -> int:
    """Wall-clock epoch milliseconds (the time records carry)."""
    return int(time.time() * 1000)
