"""The demo's load generator accounts for every arrival: sent = ok + errors + dropped, also
for requests still unanswered when the run ends or is interrupted."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from loadcast.demo.loadgen import LoadGenerator


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_unanswered_requests_cut_off_by_the_end_count_as_errors() -> None:
    held: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read nothing, answer nothing: the client waits

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    arrivals = [(i * 0.01, "central") for i in range(20)]
    recorded: list[int] = []
    lg = LoadGenerator({"a": {"central": f"http://127.0.0.1:{port}"}}, arrivals,
                       lambda *a: recorded.append(a[4]), timeout_s=20.0, max_in_flight=15)
    run = asyncio.create_task(lg.run(lambda: False))
    await asyncio.sleep(1.0)  # every arrival sent, none answered
    run.cancel()  # the run ends (Ctrl-C, the demo's deadline) with requests in flight
    with contextlib.suppress(asyncio.CancelledError):
        await run
    st = lg.stats["a"]
    assert st.sent == 20 and st.dropped == 5 and st.ok == 0
    assert st.ok + st.errors + st.dropped == st.sent, st
    assert st.in_flight == 0
    assert recorded == [0] * 15  # each in-flight one reached the telemetry as a timeout
    for w in held:
        w.close()
    server.close()
    await server.wait_closed()
