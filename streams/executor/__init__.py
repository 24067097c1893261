"""The mirror executor (``loadcast executor``): the edge agent's part that runs API mirrors.

It reads ``mirror-commands`` (every partition, no consumer group: commands are few and
keyed by region) and keeps the commands of its own region. Each one is checked in this
order, and a failed check is a REJECTED status on ``mirror-status`` with the reason (and a
log line), with nothing started:

1. signature: unsigned, unknown key, or a signature that does not match
   (:mod:`processors.signing`, Ed25519 public keys only);
2. expiry: ``expires_at`` passed;
3. sequence: not above the last accepted sequence of its (api, region) — a replay or an
   out-of-order delivery. The very same command again (same id and sequence) is not an
   attack but a redelivery: it changes nothing and the current state is re-announced;
4. for ACTIVATE, the bundle: fetched from the store by digest unless already unpacked,
   and rejected when its bytes do not hash to the digest.

An accepted command is written to ``<work_dir>/state.json`` (atomically, together with
the consumed offsets) *before* it is applied, then the API is reconciled to it: the bundle
is unpacked into ``<work_dir>/bundles/<hex digest>/``, instances are started (the
manifest's command, the port in its ``port_env`` variable, in a session of their own, log
in ``<work_dir>/logs/``), each reported STARTING and, once its health path answers 200,
READY with its URL; RETIRE (and HIBERNATE) reports DRAINING, waits ``drain_seconds`` so
sidecars stop sending new requests, stops the process (SIGTERM, then SIGKILL) and reports
RETIRED. Running instances are in the state file too (pid and process start time, so a
reused pid is never mistaken for one), so a restarted executor adopts the ones still
alive and healthy, re-announces them READY, and starts what its last accepted commands
still want: applying a command twice, or restarting, changes nothing that runs.

Commands are applied one at a time, in order (a start waits for its health check):
commands are rare, and order per (api, region) is what matters.

One module a job:

- :mod:`.service`: :class:`~streams.executor.service.Executor`, the service: decode,
  check, accept, apply each command; its lifecycle;
- :mod:`.consume`: the command consumer (made in one place) and where it starts reading;
- :mod:`.verify`: the pure checks (signature, expiry, sequence, digest) and their verdict;
- :mod:`.fetch`: bundles fetched by digest, verified and unpacked in the work directory;
- :mod:`.supervise`: API processes started, health-checked, adopted, drained and stopped;
- :mod:`.report`: MirrorStatus records and dead letters;
- :mod:`.state`: the state file (accepted commands, instances, offsets).
"""
