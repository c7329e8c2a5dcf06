"""The command line as a new user meets it: real subprocesses (``relay_cli``, ``CommandProcess``)
on real stores, the embedded one included.

`relay keys` says which store it used and refuses a directory without one; keys are found by
any unique prefix of 6 characters or more; balances read as a key holder reads them; the demo
reuses its key; the fake upstream's delays are flags; a stopped relay says so in one line.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient

from relay.keys import hash_key
from relay.serve import DEMO_KEY_FILE, demo_key
from relay.store.connect import close_client, open_store
from tests.helpers import TEST_KEY, add_key, eventually, mock_store, one_upstream_config, unused_port
from tests.processes import ROOT, RelayProcess, db_uri, relay_cli

HI = [{"role": "user", "content": "Hi"}]


async def cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``relay_cli`` off the event loop (which may serve a fake upstream meanwhile)."""
    return await asyncio.get_running_loop().run_in_executor(None, lambda: relay_cli(*args, env=env, cwd=cwd))


class CommandProcess:
    """A long-running ``relay`` command (demo, fake-upstream), its output kept in files."""

    def __init__(self, workdir: Path, *args: str):
        self.out, self.err = workdir / f"out-{id(self)}.txt", workdir / f"err-{id(self)}.txt"
        pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "relay", *args], stdout=out, stderr=err, cwd=workdir,
                                         env={**os.environ, "PYTHONPATH": pythonpath}, start_new_session=True)

    async def answering(self, url: str, timeout: float = 60.0) -> None:
        client = AsyncHTTPClient(force_instance=True)

        async def up() -> bool:
            assert self.proc.poll() is None, self.stderr()
            try:
                return (await client.fetch(url, request_timeout=1, raise_error=False)).code < 500
            except OSError:
                return False
        await eventually(up, timeout=timeout, interval=0.1, message=f"{url} never answered")
        client.close()

    async def interrupt(self, timeout: float = 60.0) -> int:
        """Ctrl-C, as a terminal sends it: SIGINT to the process group (the embedded store has its own)."""
        os.killpg(self.proc.pid, signal.SIGINT)
        code = await asyncio.get_running_loop().run_in_executor(None, lambda: self.proc.wait(timeout))
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()


async def stream_chat(url: str, key: str = TEST_KEY, first_chunk: asyncio.Event | None = None,
                      model: str = "gpt-4") -> tuple[float, list[float], str]:
    """A streamed chat: seconds to the response's first line, each chunk's arrival, the body."""
    t0 = time.monotonic()
    headers_at: list[float] = []
    arrivals: list[float] = []
    body: list[bytes] = []

    def on_chunk(data: bytes) -> None:
        arrivals.append(time.monotonic() - t0)
        body.append(data)
        if first_chunk is not None:
            first_chunk.set()
    client = AsyncHTTPClient(force_instance=True)
    try:
        await client.fetch(url + "/v1/chat/completions", method="POST", request_timeout=60,
                           headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                           body=json.dumps({"model": model, "stream": True, "messages": HI}),
                           header_callback=lambda line: headers_at.append(time.monotonic() - t0),
                           streaming_callback=on_chunk)
    finally:
        client.close()
    return headers_at[0], arrivals, b"".join(body).decode()


def spread(arrivals: list[float], gap: float) -> int:
    """How many arrivals came at least ``gap`` seconds after the one before (chunks one by one)."""
    return sum(1 for a, b in zip(arrivals, arrivals[1:], strict=False) if b - a >= gap)


# --- which store `relay keys` uses ---------------------------------------------------------

@pytest.mark.timeout(seconds=180)
async def test_keys_names_its_store_and_refuses_a_directory_without_one(tmp_path, io_loop):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    listed = await cli("keys", "list", cwd=elsewhere)
    assert listed.returncode == 1 and listed.stdout == ""
    assert f"no store in {elsewhere / 'relay-data'}" in listed.stderr and "--data-dir" in listed.stderr, listed.stderr
    assert "Traceback" not in listed.stderr
    assert not (elsewhere / "relay-data").exists(), "a keys command creates no store"
    empty = tmp_path / "empty"
    empty.mkdir()
    shown = await cli("keys", "show", "ak-abcdef", "--data-dir", str(empty))
    assert shown.returncode == 1 and f"no store in {empty}" in shown.stderr
    assert list(empty.iterdir()) == []

    # Asked to: an empty store, and the line says it is new.
    fresh = tmp_path / "fresh"
    made = await cli("keys", "list", "--create", "--data-dir", str(fresh))
    assert made.returncode == 0, made.stderr
    assert f"relay keys: store: a new embedded store in {fresh}\n" in made.stderr
    assert len(made.stdout.splitlines()) == 1 and "available" in made.stdout  # the header, no key

    # `keys create` creates the store it needs; the others find it, the options before the
    # command or after it, or RELAY_DATA_DIR.
    data = tmp_path / "data"
    created = await cli("keys", "create", "--quota", "5000", "--note", "first", "--data-dir", str(data))
    assert created.returncode == 0, created.stderr
    assert f"store: a new embedded store in {data}" in created.stderr
    key = created.stdout.strip()
    listed = await cli("--data-dir", str(data), "keys", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stderr.splitlines() == [f"relay keys: store: the embedded store in {data}"]
    assert key[:10] in listed.stdout and "first" in listed.stdout
    by_env = await cli("keys", "show", key[:7], cwd=elsewhere, env={"RELAY_DATA_DIR": str(data)})
    assert by_env.returncode == 0, by_env.stderr
    assert json.loads(by_env.stdout)["prefix"] == key[:10]
    after_wins = await cli("--data-dir", str(empty), "keys", "topup", key[:6], "10", "--data-dir", str(data))
    assert after_wins.returncode == 0, after_wins.stderr
    assert json.loads(after_wins.stdout)["granted"] == 5010
    assert list(empty.iterdir()) == []


# --- prefixes and balances (a MongoDB URI: the module's embedded server) -------------------

@pytest.fixture
def keys_db(embedded, request):
    """A database of its own on the module's embedded server."""
    return db_uri(embedded, "cli_" + request.node.name[5:40])


async def test_a_key_is_found_by_any_unique_prefix_of_six_characters_or_more(keys_db, io_loop):
    uri, store = keys_db, await open_store(keys_db)
    one, two, other = ("ak-ZQO4a" + "1" * 36, "ak-ZQO4b" + "2" * 36, "ak-Xyz99" + "3" * 36)
    for key in (one, two, other):
        await add_key(store, key=key, quota=1000)

    async def keys(*args: str) -> subprocess.CompletedProcess:
        return await cli("keys", *args, "--mongodb-uri", uri)

    for given, expected in ((one[:8], one), (other[:6], other), (two[:10], two), (two, two)):
        shown = await keys("show", given)
        assert shown.returncode == 0, (given, shown.stderr)
        assert json.loads(shown.stdout)["prefix"] == expected[:10]
    ambiguous = await keys("show", "ak-ZQO4")
    assert ambiguous.returncode == 1 and ambiguous.stdout == ""
    assert "ambiguous: 2 keys start with 'ak-ZQO4' (ak-ZQO4a11, ak-ZQO4b22)" in ambiguous.stderr, ambiguous.stderr
    everything = await keys("show", "ak-")
    assert everything.returncode == 1 and "ambiguous: 3 keys start with 'ak-'" in everything.stderr
    short = await keys("show", "ak-X")  # unique, but too short to be meant
    assert short.returncode == 1 and "give at least 6 characters of the key" in short.stderr
    missing = await keys("disable", "ak-Nope99")
    assert missing.returncode == 1 and "no key matches 'ak-Nope99'" in missing.stderr
    unknown = "ak-" + "9" * 40
    whole = await keys("show", unknown)
    assert whole.returncode == 1 and unknown not in whole.stderr and "ak-9999999..." in whole.stderr
    topped = await keys("topup", other[:6], "500")
    assert topped.returncode == 0 and json.loads(topped.stdout)["granted"] == 1500
    assert topped.stderr.splitlines()[0] == f"relay keys: store: MongoDB at {uri.split('?')[0]}"
    secret = await cli("keys", "show", other[:6], "--mongodb-uri", uri.replace("mongodb://", "mongodb://me:pw@"))
    assert "pw" not in secret.stderr and "MongoDB at mongodb://***@127.0.0.1" in secret.stderr
    for key in (one, two, other):
        assert (await store.key_doc(hash_key(key)))["status"] == "active", "nothing was disabled"
    await close_client(store.client)


async def test_balances_read_as_the_key_holder_reads_them(keys_db, io_loop):
    """Right after a request a relay process holds a slice (`reserved`), and an overdraw the
    quota rules allow leaves `balance` below 0: neither shows as what the key has left."""
    uri, store = keys_db, await open_store(keys_db)
    sliced, overdrawn, in_flight = ("ak-Slice" + "1" * 36, "ak-Overd" + "2" * 36, "ak-Fligh" + "3" * 36)
    for key, quota in ((sliced, 100_000), (overdrawn, 1000), (in_flight, 5000)):
        await add_key(store, key=key, quota=quota)
    assert await store.open_lease(hash_key(sliced), "relay-process-1", 100, 10_930) == 10_930
    # Charged 50 more than was left (a request's excess over what it could hold).
    await store.keys.update_one({"_id": hash_key(overdrawn)}, {"$inc": {"used": 1050, "balance": -1050}})
    assert await store.reserve(hash_key(in_flight), "req-1", 10, 700) == 700

    listed = await cli("keys", "list", "--mongodb-uri", uri)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["prefix", "status", "granted", "used", "available", "note"]
    table = {row.split()[0]: [int(n) for n in row.split()[2:5]] for row in rows}
    assert table == {sliced[:10]: [100_000, 0, 100_000], overdrawn[:10]: [1000, 1050, 0],
                     in_flight[:10]: [5000, 0, 5000]}
    assert "-" not in " ".join(" ".join(row.split()[2:5]) for row in rows), "no negative number"

    shown = await cli("keys", "show", sliced[:8], "--mongodb-uri", uri)
    view = json.loads(shown.stdout)
    assert (view["available"], view["reserved"], view["balance"]) == (100_000, 10_930, 89_070)
    assert "reserved: 10930 units held by relay processes as a slice, returned when idle" in shown.stderr
    shown = await cli("keys", "show", overdrawn[:8], "--mongodb-uri", uri)
    assert json.loads(shown.stdout)["available"] == 0
    assert "balance: overdrawn by 50 units" in shown.stderr, shown.stderr
    shown = await cli("keys", "show", in_flight[:8], "--mongodb-uri", uri)
    assert "reserved: 700 units held by requests in flight" in shown.stderr, shown.stderr
    assert "slice" not in shown.stderr
    await close_client(store.client)


# --- the fake upstream's delays ------------------------------------------------------------

async def test_fake_upstream_delay_flags_send_chunks_one_by_one(tmp_path, io_loop):
    port = unused_port()
    fake = CommandProcess(tmp_path, "fake-upstream", "--port", str(port), "--first-byte-ms", "400",
                          "--chunk-delay-ms", "150")
    url = f"http://127.0.0.1:{port}"
    try:
        await fake.answering(url + "/v1/models")
        first_line, arrivals, body = await stream_chat(url, "sk-any")
        assert body.rstrip().endswith("data: [DONE]")
        assert first_line >= 0.4, first_line
        # 10 content chunks, the finish, the [DONE]: each 150 ms after the one before.
        assert spread(arrivals, 0.1) >= 10 and arrivals[-1] - arrivals[0] >= 11 * 0.15, arrivals
        client = AsyncHTTPClient(force_instance=True)
        await client.fetch(url + "/_fake/reset", method="POST", body=b"")
        kept = json.loads((await client.fetch(url + "/_fake/behaviour")).body)["behaviour"]
        client.close()
        assert (kept["first_byte_delay"], kept["chunk_delay"]) == (0.4, 0.15), "a reset keeps the flags"
        assert await fake.interrupt() == 0
    finally:
        fake.kill()
    bad = await cli("fake-upstream", "--chunk-delay-ms", "-5")
    assert bad.returncode != 0 and "'-5' is not a number of milliseconds" in bad.stderr


# --- the demo ------------------------------------------------------------------------------

@pytest.mark.timeout(seconds=180)
async def test_demo_reuses_its_key_streams_slowly_when_asked_and_says_when_it_stopped(tmp_path, io_loop):
    data = tmp_path / "demo-data"
    port, upstream = unused_port(), unused_port()
    args = ("demo", "--port", str(port), "--upstream-port", str(upstream), "--data-dir", str(data),
            "--chunk-delay-ms", "150")
    url = f"http://127.0.0.1:{port}"
    demo = CommandProcess(tmp_path, *args)
    try:
        await demo.answering(url + "/healthz")
        key_file = data / DEMO_KEY_FILE
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, "the demo key is readable by its user only"
        key = key_file.read_text().strip()
        # A stream through relay from the fake upstream the demo runs: chunks arrive one by one.
        # Ctrl-C while it is in flight: it finishes, then the demo says it has stopped.
        first = asyncio.Event()
        streaming = asyncio.ensure_future(stream_chat(url, key, first, model="gpt-3.5-turbo"))
        await asyncio.wait_for(first.wait(), 30)
        assert await demo.interrupt() == 0, demo.stderr()
        _, arrivals, body = await streaming
        assert body.rstrip().endswith("data: [DONE]") and spread(arrivals, 0.1) >= 8, arrivals
    finally:
        demo.kill()
    out, err = demo.stdout(), demo.stderr()
    assert f"demo key: {key}   (100000 quota units left; new, kept in {key_file})" in out, out
    assert f"{url}/usage?lang=en" in out
    assert err.splitlines()[-1] == \
        "relay demo stopped: 1 request(s) in flight drained; the embedded store stopped.", err
    assert key not in err

    again = CommandProcess(tmp_path, *args)
    try:
        await again.answering(url + "/healthz")
        assert await again.interrupt() == 0
    finally:
        again.kill()
    assert f"demo key: {key}   (99981 quota units left; reused from {key_file})" in again.stdout(), again.stdout()
    assert again.stderr().splitlines()[-1] == \
        "relay demo stopped: 0 request(s) in flight drained; the embedded store stopped."
    listed = await cli("keys", "list", "--data-dir", str(data))
    assert [line.split()[-1] for line in listed.stdout.splitlines()[1:]] == ["demo"], "one demo key, not two"


async def test_demo_key_is_reused_or_replaced_saying_why(tmp_path, io_loop):
    store = mock_store()
    data = tmp_path / "data"
    path = data / DEMO_KEY_FILE
    key, how = await demo_key(store, str(data), 1000)
    assert how == f"new, kept in {path}" and path.read_text() == key + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert await demo_key(store, str(data), 1000) == (key, f"reused from {path}")
    path.chmod(0o644)
    assert (await demo_key(store, str(data), 1000))[0] == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "tightened to the user only"

    await store.set_status(hash_key(key), "disabled")
    replaced, how = await demo_key(store, str(data), 1000)
    assert replaced != key and how == f"new, kept in {path}: the key in {path} ({key[:10]}) is disabled"
    other_store = mock_store()
    fresh, how = await demo_key(other_store, str(data), 1000)
    assert fresh != replaced and how.endswith(f": the key in {path} is not in this store")
    path.write_text("not a key\n")
    assert (await demo_key(other_store, str(data), 1000))[1].endswith(f": {path} holds no key")
    assert len(await other_store.list_keys()) == 2 and (await store.list_keys())[0]["status"] == "disabled"


# --- Ctrl-C on relay serve -----------------------------------------------------------------

@pytest.mark.timeout(seconds=120)
async def test_ctrl_c_drains_relay_serve_and_says_so_in_one_line(fake, tmp_path, io_loop):
    data = tmp_path / "data"
    made = await cli("keys", "create", "--quota", "100000", "--data-dir", str(data))
    key = made.stdout.strip()
    fake.state.behaviour.chunk_delay = 0.1
    relay = await RelayProcess(one_upstream_config(fake.base_url), tmp_path, "--data-dir", str(data)).start()
    first = asyncio.Event()
    streaming = asyncio.ensure_future(stream_chat(relay.url, key, first))
    await asyncio.wait_for(first.wait(), 30)
    os.killpg(relay.proc.pid, signal.SIGINT)
    _, _, body = await streaming
    assert body.rstrip().endswith("data: [DONE]"), "the request in flight finished"
    await eventually(lambda: relay.proc.poll() is not None, timeout=60, interval=0.05, message="relay stopped")
    assert relay.proc.returncode == 0
    assert relay.log().splitlines()[-1] == \
        "relay stopped: 1 request(s) in flight drained; the embedded store stopped.", relay.log()[-2000:]


@pytest.mark.timeout(seconds=120)
async def test_ctrl_c_stops_relay_serve_workers_then_the_store(fake, tmp_path, io_loop):
    relay = await RelayProcess(one_upstream_config(fake.base_url), tmp_path, "--data-dir", str(tmp_path / "data"),
                               "--workers", "2").start()
    os.killpg(relay.proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: supervisor and workers alike
    await eventually(lambda: relay.proc.poll() is not None, timeout=60, interval=0.05, message="relay stopped")
    assert relay.proc.returncode == 0
    assert relay.log().splitlines()[-1] == "relay stopped: 2 workers drained; the embedded store stopped."
    assert "Traceback" not in relay.log()

