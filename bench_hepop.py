#!/usr/bin/env python3
"""Capture benchmark: how fast hepop stores realistic SIP over HEP3 without loss, on this machine.

It measures, in one run:
  1. the ceiling: a bare Python loop that only receives UDP datagrams, fed as fast as one sender can;
  2. hepop (python3 hepop.py, default settings) at fixed offered rates over UDP and over TCP, each for a
     bounded time, with a mix of INVITE, 100, 180, 200, ACK and BYE carrying unique Call-IDs (500-900 B).
For each rate it prints: sent, stored (rows in the Parquet files that metadata.json lists, after SIGTERM),
loss %, hepop's CPU microseconds per packet, its peak RSS, and bytes on disk per row; then hepop's highest
zero-loss rate as a fraction of the ceiling.  Other parts (--compaction, --query, --starvation) measure
compaction, queries over a day, and capture while clients loop large JSON results.  All traffic goes to
127.0.0.1.

    python3 bench_hepop.py                 # everything, about 25 minutes
    python3 bench_hepop.py --quick         # capture at two rates, under a minute
    python3 bench_hepop.py --capture --sustained --overload   # the capture figures only
    python3 bench_hepop.py --starvation --quick               # capture while queries run, 10 s per load
"""

from __future__ import annotations

import argparse
import collections
import glob
import http.client
import json
import os
import platform
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.compute as pc

HERE = Path(__file__).resolve().parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def sip_messages(rng: random.Random) -> list[bytes]:
    """One call's six messages, 500-900 bytes each: random Call-ID, tags, branches, numbers and hosts,
    as real traffic has, so that compression figures are not flattered by repetition."""
    token = lambda n: "%0*x" % (n, rng.getrandbits(4 * n))
    caller, callee = f"+49{rng.randrange(10**9, 10**10)}", f"+49{rng.randrange(10**9, 10**10)}"
    uac, uas = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}", f"192.168.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    call_id = f"{token(32)}@{uac}"
    from_tag, to_tag = token(10), token(10)
    via = f"Via: SIP/2.0/UDP {uac}:{rng.randrange(1024, 65535)};branch=z9hG4bK{token(16)};rport\r\n"
    common = (f"From: \"Caller {caller[-4:]}\" <sip:{caller}@carrier.example.com>;tag={from_tag}\r\n"
              f"To: <sip:{callee}@pbx.example.net>{{totag}}\r\nCall-ID: {call_id}\r\n")
    record_route = (f"Record-Route: <sip:10.20.30.1;lr;ftag={from_tag};did={token(3)}.{token(4)}>\r\n"
                    f"P-Asserted-Identity: <sip:{caller}@carrier.example.com>\r\n")
    sdp = (f"v=0\r\no=- {rng.getrandbits(32)} {rng.getrandbits(32)} IN IP4 {uac}\r\ns=-\r\nc=IN IP4 {uac}\r\n"
           f"t=0 0\r\nm=audio {rng.randrange(10000, 60000, 2)} RTP/AVP 8 0 101\r\na=rtpmap:8 PCMA/8000\r\n"
           "a=rtpmap:101 telephone-event/8000\r\n")

    def request(method, cseq, body="", totag=""):
        return (f"{method} sip:{callee}@pbx.example.net SIP/2.0\r\n{via}{record_route}Max-Forwards: 70\r\n"
                + common.format(totag=totag) + f"CSeq: {cseq} {method}\r\nContact: <sip:{caller}@{uac}>\r\n"
                "User-Agent: bench-uac 1.0\r\nAllow: INVITE, ACK, BYE, CANCEL, OPTIONS\r\n"
                f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n{body}")

    def response(code, reason, body=""):
        return (f"SIP/2.0 {code} {reason}\r\n{via}{record_route}"
                + common.format(totag=f";tag={to_tag}" if code > 100 else "")
                + f"CSeq: 1 INVITE\r\nContact: <sip:{callee}@{uas}>\r\nServer: bench-uas 1.0\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}")

    messages = [request("INVITE", 1, sdp), response(100, "Trying"), response(180, "Ringing"),
                response(200, "OK", sdp), request("ACK", 1, totag=f";tag={to_tag}"),
                request("BYE", 2, totag=f";tag={to_tag}")]
    return [m.encode() for m in messages]


def hep3(payload: bytes, seq: int, rng: random.Random, ago_s: float = 0) -> bytes:
    now = time.time() - ago_s
    body = b"".join(struct.pack("!HHH", 0, kind, len(value) + 6) + value for kind, value in (
        (1, b"\x02"), (2, b"\x11"), (3, rng.randbytes(4)), (4, rng.randbytes(4)),
        (7, struct.pack("!H", 5060)), (8, struct.pack("!H", 5060)), (9, struct.pack("!I", int(now))),
        (10, struct.pack("!I", seq % 1_000_000)), (11, b"\x01"), (12, struct.pack("!I", 2001)), (15, payload)))
    return b"HEP3" + struct.pack("!H", len(body) + 6) + body


def packets(count: int, seed: int = 1, ago_s: float = 0) -> list[bytes]:
    """`count` HEP3 packets of realistic SIP, captured `ago_s` seconds ago."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        out.extend(hep3(m, len(out), rng, ago_s) for m in sip_messages(rng))
    return out[:count]


def free_port() -> int:
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        return tcp.getsockname()[1]


def send_paced(pool: list[bytes], rate: int, seconds: float, port: int, transport: str) -> int:
    """Send at `rate` packets/s for `seconds`, in 1 ms slices; returns how many were sent.  Over TCP a
    receiver that cannot keep up makes the sends block, so the rate achieved can be lower: time it."""
    total = int(rate * seconds)
    if transport == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        send = lambda batch: [sock.sendto(p, ("127.0.0.1", port)) for p in batch]
    else:
        sock = socket.create_connection(("127.0.0.1", port))
        send = lambda batch: sock.sendall(b"".join(batch))
    start = time.perf_counter()
    sent = 0
    while sent < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        if due > sent:
            send([pool[i % len(pool)] for i in range(sent, due)])
            sent = due
        else:
            time.sleep(0.0005)
    sock.close()
    return sent


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stored(data_dir: Path) -> tuple[int, int]:
    """Rows and bytes of the files listed in every metadata.json."""
    rows = size = 0
    for metadata in data_dir.glob("*/dbs/hep-0/hep_*-0/metadata.json"):
        content = json.loads(metadata.read_text())
        rows += content["row_count"]
        size += content["parquet_size_bytes"]
    return rows, size


def metrics(http_port: int) -> dict[str, float]:
    """hepop's /metrics as {name{labels}: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    pairs = (line.rpartition(" ") for line in lines if line and not line.startswith("#"))
    return {name: float(value) for name, _, value in pairs}


def received_total(values: dict[str, float]) -> float:
    return sum(v for k, v in values.items() if k.startswith("hepop_hep_received_total"))


def settle(http_port: int, timeout: float = 30.0) -> dict[str, float]:
    """Wait until hepop has taken in everything sent (its received count stops moving); its metrics."""
    last, deadline = -1.0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1.2)                    # counts reach /metrics when a batch is decoded: every 1 s
        values = metrics(http_port)
        if received_total(values) == last:
            return values
        last = received_total(values)
    return values


class Hepop:
    """python3 hepop.py in a temp folder, with its own ports."""

    def __init__(self, tmp: str, **settings):
        self.tmp = Path(tmp)
        self.port, self.http_port = free_port(), free_port()
        env = {**os.environ, "PORT": str(self.port), "HTTP_PORT": str(self.http_port), "PARQUET_DIR": tmp,
               "WRITER_ID": "bench", "LOG_LEVEL": "INFO", **settings}
        self.log_path = self.tmp / "hepop.log"
        self.process = subprocess.Popen([sys.executable, str(HERE / "hepop.py")], env=env,
                                        stderr=open(self.log_path, "w"))
        wait_listening(self.port)

    def stop(self) -> dict:
        """SIGTERM; the final counters it logged."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=300)
        for line in self.log_path.read_text().splitlines():
            if "final counters" in line:
                return json.loads(line.split("final counters ", 1)[1])
        return {}


def serve(tmp: str, **settings) -> tuple[subprocess.Popen, int, int]:
    """python3 hepop.py serving the files under `tmp` (writer "bench", nothing compacted or expired
    meanwhile) once its HTTP port answers: the process, its HEP port and its HTTP port."""
    port, http_port = free_port(), free_port()
    env = {**os.environ, "PORT": str(port), "HTTP_PORT": str(http_port), "PARQUET_DIR": tmp, "WRITER_ID": "bench",
           "RETENTION": "30d", "MAX_DISK_PERCENT": "0", "COMPACT_INTERVAL_S": "3600", "LOG_LEVEL": "WARNING",
           **settings}
    server = subprocess.Popen([sys.executable, str(HERE / "hepop.py")], env=env)
    wait_listening(http_port)
    return server, port, http_port


def median_ms(run, runs: int) -> tuple[float, object]:
    """The median time of `runs` calls of run(), in ms, and what the last one returned."""
    timings, result = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = run()
        timings.append(1000 * (time.perf_counter() - t0))
    return sorted(timings)[len(timings) // 2], result


def dropped(values: dict[str, float]) -> dict[str, float]:
    """hepop's drops by reason, and the kernel's drops on its UDP socket."""
    out = {k.split('"')[1]: v for k, v in values.items() if k.startswith("hepop_hep_dropped_total") and v}
    kernel = values.get("hepop_udp_kernel_drops_total", 0)
    return {**out, **({"kernel": kernel} if kernel else {})}


def run_hepop(rate: int, seconds: float, transport: str, pool: list[bytes], data_dir: str = "",
              **settings) -> dict:
    with tempfile.TemporaryDirectory(prefix="hepop-bench-") as tmp:
        tmp = data_dir or tmp
        hepop = Hepop(tmp, **settings)
        cpu_before = process_cpu_seconds(hepop.process.pid)
        started = time.perf_counter()
        sent = send_paced(pool, rate, seconds, hepop.port, transport)
        achieved = sent / (time.perf_counter() - started)
        values = settle(hepop.http_port)
        rss = peak_rss_mib(hepop.process.pid)
        cpu = process_cpu_seconds(hepop.process.pid) - cpu_before
        counters = hepop.stop()
        rows, size = stored(Path(tmp))
        return {"transport": transport, "rate": rate, "sent": sent, "achieved": achieved, "stored": rows,
                "loss_pct": 100.0 * (sent - rows) / sent, "cpu_us": 1e6 * cpu / max(rows, 1), "rss_mib": rss,
                "bytes_per_row": size / max(rows, 1), "dropped": dropped(values),
                "compactions": sum(v for k, v in counters.items() if k.startswith("compactions_total")),
                "loop_busy_ms_max": 1000 * counters.get("loop_busy_seconds_max", 0),
                "flush_ms_max": 1000 * counters.get("flush_seconds_max", 0)}


def zero_loss(r: dict) -> bool:
    """Everything sent was stored, at (nearly) the rate offered: a TCP sender held back by a slow
    receiver does not count as a rate taken without loss."""
    return r["stored"] == r["sent"] and r["achieved"] >= 0.97 * r["rate"]


def wait_listening(port: int, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("hepop did not start")


BARE_RECEIVER = """
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)
sock.bind(("127.0.0.1", int(sys.argv[1])))
sock.settimeout(1.0)
print("ready", flush=True)
count, first, last = 0, None, None
try:
    while True:
        sock.recvfrom(65535)
        last = time.perf_counter()
        first = first or last
        count += 1
except socket.timeout:
    pass
print(count, (last or 0) - (first or 0), flush=True)
"""


def bare_ceiling(pool: list[bytes], seconds: float) -> dict:
    """Datagrams/s that a loop doing nothing but recvfrom takes in, fed flat out by one sender."""
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-c", BARE_RECEIVER, str(port)], stdout=subprocess.PIPE, text=True)
    receiver.stdout.readline()
    cpu_before = process_cpu_seconds(receiver.pid)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for data in pool[:1000]:
            sock.sendto(data, ("127.0.0.1", port))
        sent += 1000
    cpu = process_cpu_seconds(receiver.pid) - cpu_before
    count, elapsed = receiver.stdout.readline().split()
    receiver.wait()
    count = int(count)
    return {"sent": sent, "received": count, "rate": count / float(elapsed), "cpu_us": 1e6 * cpu / max(count, 1)}


COMPACT_RUNNER = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import hepop
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
config = hepop.Config.load([], {"PARQUET_DIR": sys.argv[2], "WRITER_ID": "bench", "COMPACT_GRACE_S": "1",
                                "COMPACT_MEMORY_MB": sys.argv[3]})
storage = hepop.Storage(sys.argv[2], "bench")
compactor = hepop.Compactor(config, storage, hepop.Counters())
baseline = status("VmRSS:")
started = time.perf_counter()
compactor.run_once()
compactor.run_once()
print(json.dumps({"seconds": time.perf_counter() - started, "baseline_mib": baseline, "peak_mib": status("VmHWM:"),
                  "child_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def write_closed_hour(root: Path, target_bytes: int, rows_per_file: int = 5000) -> tuple[int, int, int]:
    """Raw files of one SIP hour two hours ago, as the capture path writes them, until `target_bytes`.

    60 batches of distinct messages (300,000) are built once; a larger hour repeats them with new capture
    times.  Repeats lie 300,000 rows apart, further than a row group, so they do not flatter compression.
    """
    sys.path.insert(0, str(HERE))
    import hepop
    storage = hepop.Storage(str(root), "bench")
    store = storage.store(1)
    raw = packets(300_000, seed=7)
    tables = []
    hour_start = (int(time.time()) // 3600 - 2) * 3600
    files = rows = size = 0
    while size < target_bytes:
        if len(tables) < 60:
            batch = [hepop.decode(p) for p in raw[len(tables) * rows_per_file:(len(tables) + 1) * rows_per_file]]
            tables.append(hepop.complete_table(1, hepop.packet_table([0] * len(batch), batch)))
        second = hour_start + files % 3600
        times = pa.array([int((second + i / rows_per_file) * 1e6) for i in range(rows_per_file)]).cast(hepop.TIME_TYPE)
        entry, = store.write(tables[files % len(tables)].set_column(0, "time", times))
        files, rows, size = files + 1, rows + entry["row_count"], size + entry["size_bytes"]
    storage.close()                         # the folder's lock, for the hepop that compacts it next
    return files, rows, size


def bench_compaction(target_mib: int, memory_mb: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="hepop-bench-compact-") as tmp:
        files, rows, size = write_closed_hour(Path(tmp), target_mib << 20)
        result = subprocess.run([sys.executable, "-c", COMPACT_RUNNER, str(HERE), tmp, str(memory_mb)],
                                capture_output=True, text=True, check=True)
        figures = json.loads(result.stdout.splitlines()[-1])
        metadata = json.loads(next(Path(tmp).glob("*/dbs/hep-0/hep_1-0/metadata.json")).read_text())
        assert metadata["row_count"] == rows and len(metadata["files"]) == 1, "compaction did not finish"
        return {"files": files, "rows": rows, "raw_bytes": size, "compacted_bytes": metadata["parquet_size_bytes"],
                **figures}


def bench_loss_while_compacting(target_mib: int, rate: int, pool: list[bytes]) -> dict:
    """hepop takes `rate` packets/s, in 5 s rounds, until it has compacted a closed hour of `target_mib`
    that is on disk when it starts (at most 10 minutes)."""
    with tempfile.TemporaryDirectory(prefix="hepop-bench-load-") as tmp:
        _, old_rows, _ = write_closed_hour(Path(tmp), target_mib << 20)
        port = free_port()
        env = {**os.environ, "PORT": str(port), "PARQUET_DIR": tmp, "WRITER_ID": "bench", "COMPACT_INTERVAL_S": "1",
               "COMPACT_GRACE_S": "1"}
        log_path = Path(tmp) / "hepop.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen([sys.executable, str(HERE / "hepop.py")], env=env, stderr=log)
            wait_listening(port)
            sent, started = 0, time.monotonic()
            while "compacted " not in log_path.read_text() and time.monotonic() - started < 600:
                sent += send_paced(pool, rate, 5, port, "udp")
            seconds = time.monotonic() - started
            time.sleep(0.5)
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=300)
        rows, _ = stored(Path(tmp))
        return {"sent": sent, "stored": rows - old_rows, "seconds": seconds,
                "compacted": "compacted " in log_path.read_text()}


def write_day(root: Path, total_rows: int, rows_per_file: int = 50_000, span_s: int = 86_400,
              bucket_settings: dict | None = None) -> int:
    """`total_rows` SIP rows spread over the `span_s` (24 hours) before now, written by hepop's own writer
    (with their call records) and compacted by its own compactor, as a day of capture leaves them; returns
    the SIP files listed.
    100,000 distinct messages are reused; each reuse gets its own Call-IDs, so a call is found once.
    With `bucket_settings` (S3_URL and the rest), the closed folders are uploaded instead, as hepop's
    uploader does, and the objects in the bucket are counted."""
    sys.path.insert(0, str(HERE))
    import hepop
    config = hepop.Config.load([], {"PARQUET_DIR": str(root), "WRITER_ID": "bench", "COMPACT_GRACE_S": "1",
                                    "RETENTION": "30d", "MAX_DISK_PERCENT": "0", **(bucket_settings or {})})
    storage = hepop.Storage(str(root), "bench", bucket=hepop.open_bucket(config))
    store, records = storage.store(1), storage.store(hepop.CALLS_TYPE)
    pending, records_every = [], max(1, round(config.call_records_interval_s * total_rows / span_s / rows_per_file))
    raw = packets(20 * rows_per_file // 10, seed=11)
    tables = []
    for i in range(10):
        batch = [hepop.decode(p) for p in raw[i * len(raw) // 10:(i + 1) * len(raw) // 10]]
        tables.append(hepop.complete_table(1, hepop.packet_table([0] * len(batch), batch)))
    table = pa.concat_tables(tables)
    end_us = time.time_ns() // 1000
    start_us = end_us - span_s * 1_000_000
    step = span_s * 1_000_000 / total_rows
    for first in range(0, total_rows, rows_per_file):
        count = min(rows_per_file, total_rows - first)
        times = pa.array([int(start_us + (first + i) * step) for i in range(count)]).cast(hepop.TIME_TYPE)
        offset = first % (len(table) - count + 1)
        part = table.slice(offset, count).set_column(0, "time", times)
        index = part.schema.get_field_index("call_id")            # repeated messages, yet unique calls
        call_ids = pc.binary_join_element_wise(part.column(index), pa.scalar(f"-{first}"), "")
        part = part.set_column(index, "call_id", call_ids)
        store.write(part)
        pending += [hepop.call_records(folder_part) for _, folder_part in hepop.split_by_folder(part)]
        if len(pending) >= records_every:       # as the writer writes them: CALL_RECORDS_INTERVAL_S together
            records.write(pa.concat_tables(pending))
            pending.clear()
    if pending:
        records.write(pa.concat_tables(pending))
    if bucket_settings:                     # every folder up, then the bucket's hours compacted
        hepop.Uploader(config, storage, hepop.Counters()).run_once(now_us=end_us + 3600 * 1_000_000)
    compactor = hepop.Compactor(config, storage, hepop.Counters())
    compactor.run_once()
    compactor.close()                       # deletes the merged inputs
    storage.close()                         # the folder's lock, for the hepop that serves it next
    return len((storage.uploaded if bucket_settings else storage.types)[1].snapshot())


def bench_writer(runs: int = 10, rows: int = 20_000) -> None:
    """The writer alone (BatchWriter._write) over one batch of `rows` messages of whole calls, best of
    `runs`: as it runs, without the call records, and without them and the SIP KPIs, in us a row of
    the process's CPU (all its threads) and of the clock (which adds the fsyncs, noisy on a VM's disk)."""
    sys.path.insert(0, str(HERE))
    import hepop
    pool = packets(rows, seed=5)

    def best_us(records: bool, kpis: bool) -> tuple[float, float]:
        best_cpu_s = best_wall_s = float("inf")
        for _ in range(runs):
            with tempfile.TemporaryDirectory(prefix="hepop-bench-writer-") as tmp:
                config = hepop.Config.load([], {"PARQUET_DIR": tmp, "WRITER_ID": "w", "MAX_DISK_PERCENT": "0"})
                counters = hepop.Counters()
                storage = hepop.Storage(tmp, "w")
                writer = hepop.BatchWriter(storage, counters, hepop.PacketCheck(config, counters), config)
                if not records:
                    writer._write_call_records = lambda *args: None
                if not kpis:
                    writer._count_kpis = lambda *args: None
                batch = hepop.ReceivedBatch("udp", time.time_ns() // 1000, 0.0, list(pool),
                                            [hepop.Sender(0, ("127.0.0.1", 9))])
                cpu_s, wall_s = time.process_time(), time.perf_counter()
                writer._write(batch)
                best_cpu_s = min(best_cpu_s, time.process_time() - cpu_s)
                best_wall_s = min(best_wall_s, time.perf_counter() - wall_s)
                storage.close()
        return best_cpu_s / rows * 1e6, best_wall_s / rows * 1e6

    print(f"the writer over {rows:,} messages of whole calls (BatchWriter._write, best of {runs}), us a row:")
    for name, records, kpis in (("as it runs (SIP KPIs and call records)", True, True),
                                ("without the call records", False, True), ("without either", False, False)):
        cpu_us, wall_us = best_us(records, kpis)
        print(f"  {name:<40} CPU {cpu_us:.2f}, clock {wall_us:.2f}", flush=True)


def bench_flush(listed_counts: list[int], runs: int = 20) -> None:
    """What a flush costs as the files listed grow (a busy hour lists 3,600 raw files before compaction):
    a 1,000-row batch written by the store, metadata.json saved with it, beside pyarrow writing the same
    batch alone; and what a query's listing of the files (FileCatalog) costs."""
    sys.path.insert(0, str(HERE))
    import hepop
    raw = packets(1000, seed=5)
    batch = hepop.complete_table(1, hepop.packet_table([time.time_ns() // 1000] * len(raw),
                                                       [hepop.decode(p) for p in raw]))
    print(f"a flush of {len(batch):,} SIP rows as the files listed in metadata.json grow, median of {runs}:", flush=True)
    for listed in listed_counts:
        with tempfile.TemporaryDirectory(prefix="hepop-bench-flush-") as tmp:
            storage = hepop.Storage(tmp, "bench")
            store = storage.store(1)
            entry = store.write(batch)[0]
            for sequence in range(2, listed + 1):        # listed only: the flush never opens them
                key = entry["path"].replace(f"{entry['id']:010d}", f"{sequence:010d}")
                store.files[key] = {**entry, "id": sequence, "path": key}
            store.sequence = listed
            flush, alone, listing = [], [], []
            catalog = hepop.FileCatalog(storage)
            window = hepop.TimeWindow(None, None, False)
            for run in range(runs):
                t0 = time.perf_counter()
                store.write(batch)
                flush.append(1000 * (time.perf_counter() - t0))
                t0 = time.perf_counter()
                pq.write_table(batch, os.path.join(tmp, f"alone-{run}.parquet"), compression="zstd",
                               use_dictionary=False)
                alone.append(1000 * (time.perf_counter() - t0))
                t0 = time.perf_counter()
                catalog.files(1, window)
                listing.append(1000 * (time.perf_counter() - t0))
            size = os.path.getsize(store.file_store.reader_path(store.metadata_key))
            storage.close()
        median = lambda values: sorted(values)[len(values) // 2]
        print(f"  {listed:>6,} files listed: flush {median(flush):6.1f} ms (pyarrow alone {median(alone):.1f} ms), "
              f"metadata.json {size / 1e6:.2f} MB, a query's listing of the files {median(listing):.1f} ms",
              flush=True)


def bench_queries(total_rows: int, runs: int = 5) -> None:
    with tempfile.TemporaryDirectory(prefix="hepop-bench-query-") as tmp:
        started = time.monotonic()
        files = write_day(Path(tmp), total_rows)
        print(f"queries over {total_rows:,} SIP rows spread over the last 24 hours ({files} files after compaction, "
              f"written in {time.monotonic() - started:.0f} s); median of {runs} runs:", flush=True)
        server, port, http_port = serve(tmp)
        sample = json.loads(http_get(http_port, "SELECT call_id FROM hep_1 WHERE time > now() - INTERVAL 1 DAY "
                                                "AND sip_method = 'INVITE' LIMIT 1 OFFSET 1000")[1])[0]["call_id"]
        queries = [
            ("call_id over the day", f"SELECT time, sip_method, sip_status FROM hep_1 WHERE call_id = '{sample}' "
                                     "AND time > now() - INTERVAL 1 DAY ORDER BY time", 300),
            ("COUNT(*) last 10 minutes", "SELECT count(*) FROM hep_1", 100),
            ("LIKE '%INVITE%' over an hour", "SELECT time, call_id FROM hep_1 WHERE time > now() - INTERVAL 3 HOUR "
                                             "AND time < now() - INTERVAL 2 HOUR AND payload LIKE '%INVITE%' "
                                             "ORDER BY time DESC LIMIT 100", 500),
        ]
        for name, sql, target in queries:
            ms, (head, body) = median_ms(lambda: http_get(http_port, sql), runs)
            print(f"  {name:<30} {ms:>7.0f} ms (target {target} ms), {len(json.loads(body))} rows, "
                  f"{head.get('x-hepop-files')} files read", flush=True)
        homer_figures(http_port, runs)
        before, _ = stored(Path(tmp))
        sent, queries, drops = load_while_querying(port, http_port, rate=20_000, seconds=20)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        stored_rows = stored(Path(tmp))[0] - before
        print(f"  loss at 20,000 packets/s UDP for 20 s while heavy queries and HOMER searches ran back to back "
              f"({queries} of each): "
              f"sent {sent:,}, stored {stored_rows:,}, loss {100 * (sent - stored_rows) / sent:.3f} %, "
              f"kernel drops {drops}", flush=True)


def bench_busy_hour(rate: int, runs: int = 5) -> None:
    """The last hour of a busy site: SIP at `rate` messages/s (default 20,000: 72 M rows), written by
    hepop's writer in batches of FLUSH_ROWS as capture makes them, its closed folders and the earlier
    clock hour merged by hepop's compactor; then issue 15's queries over the last hour, and issue 30's over
    the `calls` view (the page's call list: its first page, the newest 51 calls; failed only; a number's
    calls; ASR, NER and ACD per 5 minutes), over HTTP, each beside the same SQL run by DuckDB alone over the
    same files (for `calls`, the call records, merged by the same SQL)."""
    import duckdb
    sys.path.insert(0, str(HERE))
    import hepop
    total_rows = rate * 3600
    with tempfile.TemporaryDirectory(prefix="hepop-bench-busy-") as tmp:
        started = time.monotonic()
        files = write_day(Path(tmp), total_rows, rows_per_file=min(rate, 20_000), span_s=3600)
        paths = sorted(glob.glob(f"{tmp}/bench/dbs/hep-0/hep_1-0/*/*/*.parquet"))
        kinds = collections.Counter(os.path.basename(path)[:2] if os.path.basename(path)[1] == "_" else "raw"
                                    for path in paths)
        print(f"the last hour at {rate:,} messages/s ({total_rows:,} SIP rows, {files} files: "
              f"{', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}; written and merged in "
              f"{time.monotonic() - started:.0f} s); median of {runs} runs:", flush=True)
        server, _, http_port = serve(tmp)
        sample = json.loads(http_get(http_port, "SELECT call_id, from_user FROM hep_1 WHERE time > now() - INTERVAL 30 MINUTE "
                                                "AND sip_method = 'INVITE' LIMIT 1 OFFSET 1000")[1])[0]   # still in the hour
        hour = "time > now() - INTERVAL 1 HOUR"
        queries = [
            ("Call-ID, last hour", f"SELECT time, sip_method FROM hep_1 WHERE {hour} AND call_id = '{sample['call_id']}'", 300),
            ("COUNT(*), last 10 minutes", "SELECT count(*) FROM hep_1 WHERE time > now() - INTERVAL 10 MINUTE", 300),
            ("GROUP BY method, last 10 minutes", "SELECT sip_method, count(*) FROM hep_1 WHERE time > now() - "
                                                 "INTERVAL 10 MINUTE GROUP BY 1 ORDER BY 2 DESC", 300),
            ("newest 100 INVITEs, last hour", f"SELECT time, call_id FROM hep_1 WHERE {hour} AND sip_method = 'INVITE' "
                                              "ORDER BY time DESC LIMIT 100", 500),
            ("payload LIKE a user, last 10 minutes", "SELECT time, call_id FROM hep_1 WHERE time > now() - INTERVAL 10 MINUTE "
                                              f"AND payload LIKE '%{sample['from_user']}%' LIMIT 100", 2000),
            ("From user, last hour", f"SELECT time, call_id FROM hep_1 WHERE {hour} AND from_user = "
                                     f"'{sample['from_user']}' ORDER BY time DESC LIMIT 200", 1000),
            ("call list, first page, last 15 min", "SELECT * FROM calls WHERE time BETWEEN now() - INTERVAL 15 MINUTE "
                                                   "AND now() ORDER BY time DESC LIMIT 51 OFFSET 0", 500),
            ("call list, first page, last hour", "SELECT * FROM calls WHERE time BETWEEN now() - INTERVAL 1 HOUR "
                                                 "AND now() ORDER BY time DESC LIMIT 51 OFFSET 0", 500),
            ("failed calls, first page, last hour", "SELECT * FROM calls WHERE time BETWEEN now() - INTERVAL 1 HOUR "
                                                    "AND now() AND (status IS NULL OR (status >= 300 AND status <> 487)) "
                                                    "ORDER BY time DESC LIMIT 51 OFFSET 0", 500),
            ("one number's calls, last hour", f"SELECT * FROM calls WHERE {hour} AND (from_user = '{sample['from_user']}' "
                                              f"OR to_user = '{sample['from_user']}' OR ruri_user = '{sample['from_user']}') "
                                              "ORDER BY time DESC LIMIT 51", 1000),
            ("ASR, NER, ACD per 5 minutes, last hour", "SELECT time_bucket(INTERVAL 5 MINUTE, time) AS t, "
                                                       "avg((status BETWEEN 200 AND 299)::INT) AS asr, avg((status BETWEEN "
                                                       "200 AND 299 OR status IN (486, 600, 408, 480, 487))::INT) AS ner, "
                                                       "avg(duration_s) FILTER (WHERE status BETWEEN 200 AND 299) AS acd "
                                                       f"FROM calls WHERE {hour} AND method = 'INVITE' GROUP BY t ORDER BY t", 2000),
        ]
        def rows_or_error(sql: str) -> str:
            try:
                return f"{len(json.loads(http_get(http_port, sql)[1]))} rows"
            except SystemExit as exc:       # what the query answered instead (out of memory, a timeout)
                return str(exc)[:90]
        figures = [(name, sql, target, *median_ms(lambda: rows_or_error(sql), runs)) for name, sql, target in queries]
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        db = duckdb.connect(config={"threads": 1, "memory_limit": "256MB",      # as the query process has them
                                    "temp_directory": os.path.join(tmp, ".alone-tmp")})
        db.execute("CREATE VIEW hep_1 AS SELECT * FROM read_parquet([" + ", ".join(f"'{p}'" for p in paths) + "])")
        records = sorted(glob.glob(f"{tmp}/bench/dbs/hep-0/calls-0/*/*/*.parquet"))
        db.execute(f"CREATE VIEW {hepop.CALL_RECORDS_VIEW} AS SELECT * FROM read_parquet([" +
                   ", ".join(f"'{p}'" for p in records) + "])")
        db.execute(f"CREATE VIEW calls AS {hepop.CALLS_SQL}")
        sip_bytes, record_bytes = (sum(os.path.getsize(p) for p in group) for group in (paths, records))
        print(f"  on disk: messages {sip_bytes / 1e6:.0f} MB, call records {record_bytes / 1e6:.0f} MB "
              f"({100 * record_bytes / sip_bytes:.1f} % more)", flush=True)
        for name, sql, target, ms, rows in figures:
            try:
                once_ms, _ = median_ms(lambda: db.execute(sql).fetchall(), 1)
                alone = f"{once_ms:.0f} ms (once)" if once_ms > 10_000 else \
                    f"{median_ms(lambda: db.execute(sql).fetchall(), runs)[0]:.0f} ms"
            except duckdb.Error as exc:
                alone = str(exc).splitlines()[0][:60]
            print(f"  {name:<34} {ms:>7.0f} ms (target {target} ms), {rows}; DuckDB alone over the same "
                  f"files {alone}", flush=True)


class MotoServer:
    """moto's S3 server on loopback, a child process, with one bucket; credentials in os.environ."""

    def __init__(self, bucket: str):
        import pyarrow.fs as pafs
        port = free_port()
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{port}"
        wait_listening(port)
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
        self.client = pafs.S3FileSystem(endpoint_override=self.endpoint, region="us-east-1",
                                        allow_bucket_creation=True)
        self.client.create_dir(bucket)
        self.bucket = bucket

    def settings(self, prefix: str) -> dict:
        return {"S3_URL": f"s3://{self.bucket}/{prefix}", "S3_ENDPOINT": self.endpoint, "UPLOAD_DELAY_S": "1"}

    def objects(self, prefix: str) -> list:
        import pyarrow.fs as pafs
        return [info for info in self.client.get_file_info(pafs.FileSelector(f"{self.bucket}/{prefix}", recursive=True))
                if info.path.endswith(".parquet")]

    def close(self):
        self.process.kill()
        self.process.wait()


def bench_s3(quick: bool, rate: int, runs: int = 5) -> None:
    """Object storage against moto's S3 server on loopback: the upload of a closed folder beside the same
    bytes put by pyarrow alone; hepop's CPU per packet at `rate` with every row uploaded during the run
    beside the same run without a bucket; a Call-ID over a day of objects beside the same day on disk,
    and beside DuckDB alone over the same objects (python3 bench_hepop.py --s3)."""
    import duckdb
    import pyarrow.dataset as ds
    sys.path.insert(0, str(HERE))
    import hepop
    moto = MotoServer("bench")
    try:
        rows = 200_000 if quick else 1_000_000
        with tempfile.TemporaryDirectory(prefix="hepop-bench-upload-") as tmp:
            settings = moto.settings("upload")
            config = hepop.Config.load([], {"PARQUET_DIR": tmp, "WRITER_ID": "bench", **settings})
            storage = hepop.Storage(tmp, "bench", bucket=hepop.open_bucket(config))
            write_folder(storage, rows)
            uploader = hepop.Uploader(config, storage, hepop.Counters())
            t0 = time.perf_counter()
            uploader.run_once()
            elapsed = time.perf_counter() - t0
            entry = storage.uploaded[1].snapshot()[0]
            body = moto.client.open_input_stream(f"bench/upload/{entry['path']}").read()
            t0 = time.perf_counter()
            with moto.client.open_output_stream("bench/alone/object.parquet") as out:
                out.write(body)
            alone = time.perf_counter() - t0
            storage.close()
        mb = entry["size_bytes"] / 1e6
        print(f"object storage (moto's S3 server on loopback), commit {commit()}:", flush=True)
        print(f"  upload of a closed 10-minute folder ({rows:,} rows in {rows // 50_000} raw files, {mb:.0f} MB as one "
              f"object): {elapsed:.2f} s, {mb / elapsed:.0f} MB/s, {rows / elapsed:,.0f} rows/s (merge, staging key, "
              f"copy, listing); pyarrow alone putting the same bytes: {alone:.2f} s, {mb / alone:.0f} MB/s", flush=True)
        seconds = 10.0 if quick else 30.0
        pool = packets(200_000, ago_s=1200)           # their folders are closed: every row goes up during the run
        for name, extra in (("without a bucket", {}), ("with S3_URL", moto.settings("capture"))):
            result = capture_and_upload(rate, seconds, pool, moto, extra)
            print(f"  capture at {rate:,}/s for {seconds:.0f} s {name:<17} sent {result['sent']:,}, stored "
                  f"{result['stored']:,} ({result['uploaded']:,} uploaded), {result['cpu_us']:.1f} us of CPU "
                  f"per packet", flush=True)
        day_rows = 500_000 if quick else 2_000_000
        with tempfile.TemporaryDirectory(prefix="hepop-bench-day-") as local, \
                tempfile.TemporaryDirectory(prefix="hepop-bench-day-s3-") as remote:
            local_files = write_day(Path(local), day_rows)
            objects = write_day(Path(remote), day_rows, bucket_settings=moto.settings("day"))
            print(f"  a Call-ID over a day of {day_rows:,} rows (median of {runs}): on disk {local_files} files, "
                  f"in the bucket {objects} objects", flush=True)
            for name, tmp, extra in (("on disk", local, {}), ("in the bucket", remote, moto.settings("day"))):
                server, _, http_port = serve(tmp, **extra)
                sample = json.loads(http_get(http_port, "SELECT call_id FROM hep_1 WHERE time > now() - INTERVAL 1 DAY "
                                                        "AND sip_method = 'INVITE' LIMIT 1 OFFSET 1000")[1])[0]["call_id"]
                sql = (f"SELECT time, sip_method, sip_status FROM hep_1 WHERE call_id = '{sample}' "
                       "AND time > now() - INTERVAL 1 DAY ORDER BY time")
                ms, found = median_ms(lambda: len(json.loads(http_get(http_port, sql)[1])), runs)
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=60)
                if extra:
                    dataset = ds.dataset([info.path for info in moto.objects("day")], filesystem=moto.client,
                                         format="parquet")
                    source = "dataset"
                else:
                    dataset = None
                    source = "read_parquet(" + repr(sorted(glob.glob(f"{tmp}/bench/dbs/hep-0/hep_1-0/*/*/*.parquet"))) + ")"
                db = duckdb.connect()
                if dataset is not None:
                    db.register("dataset", dataset)
                alone, _ = median_ms(lambda: db.execute(f"SELECT time, sip_method, sip_status FROM {source} WHERE "
                                                        f"call_id = '{sample}' ORDER BY time").fetchall(), runs)
                print(f"    {name:<14} {ms:>7.0f} ms, {found} rows; DuckDB alone over the same files {alone:.0f} ms",
                      flush=True)
    finally:
        moto.close()


def write_folder(storage, rows: int, rows_per_file: int = 50_000) -> None:
    """`rows` SIP rows in one 10-minute folder of an hour ago, in raw files of `rows_per_file`, written by
    hepop's own writer."""
    import hepop
    store = storage.store(1)
    raw = packets(rows_per_file, seed=12)
    batch = [hepop.decode(p) for p in raw]
    start_us = (time.time_ns() // 1000 - 3600 * 1_000_000) // 600_000_000 * 600_000_000
    for first in range(0, rows, rows_per_file):
        times = pa.array([start_us + (first + i) * 100 for i in range(rows_per_file)]).cast(hepop.TIME_TYPE)
        store.write(hepop.complete_table(1, hepop.packet_table([0] * len(batch), batch)).set_column(0, "time", times))


def capture_and_upload(rate: int, seconds: float, pool: list[bytes], moto: MotoServer, settings: dict) -> dict:
    """hepop capturing `pool` at `rate`, with a bucket or not; its CPU per packet once everything is stored
    and, with a bucket, uploaded."""
    with tempfile.TemporaryDirectory(prefix="hepop-bench-capture-") as tmp:
        hepop = Hepop(tmp, MAX_DISK_PERCENT="0", **settings)
        cpu_before = process_cpu_seconds(hepop.process.pid)
        sent = send_paced(pool, rate, seconds, hepop.port, "udp")
        values = settle(hepop.http_port)
        deadline = time.monotonic() + 120
        while settings and values.get("hepop_upload_backlog_folders", 1) > 0 and time.monotonic() < deadline:
            time.sleep(1)
            values = metrics(hepop.http_port)
        cpu = process_cpu_seconds(hepop.process.pid) - cpu_before
        hepop.stop()
        local, _ = stored(Path(tmp))
        uploaded = int(values.get("hepop_uploaded_rows_total", 0))
        return {"sent": sent, "stored": local + uploaded, "uploaded": uploaded, "cpu_us": 1e6 * cpu / max(sent, 1)}


def homer_post(port: int, path: str, body: dict) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    if response.status not in (200, 201):
        raise SystemExit(f"{path} failed: {response.status} {data[:300]!r}")
    return data


def homer_figures(http_port: int, runs: int) -> None:
    """HOMER's API over the same day: a search by From user (one with a few rows, and the one with the
    most, whose newest 200 are asked for) and by Call-ID over the whole day, the ladder of one call, and
    its pcap, median of `runs`, over HTTP."""
    sample = json.loads(http_get(http_port, "SELECT call_id, from_user, epoch_ms(time) AS ms FROM hep_1 WHERE time > "
                                            "now() - INTERVAL 1 DAY AND sip_method = 'INVITE' LIMIT 1 OFFSET 5000")[1])[0]
    busiest = json.loads(http_get(http_port, "SELECT from_user, count(*) AS n FROM hep_1 WHERE time > now() - INTERVAL 1 DAY "
                                             "GROUP BY from_user ORDER BY n DESC, from_user LIMIT 1")[1])[0]
    now_ms = int(time.time() * 1000)
    day = {"from": now_ms - 86_400_000, "to": now_ms}
    around = {"from": sample["ms"] - 300_000, "to": sample["ms"] + 300_000}
    by = lambda name, value: {"param": {"search": {"1_call": [{"name": name, "value": value, "type": "string"}]}},
                              "timestamp": day}
    call = {"param": {"search": {"1_call": {"callid": [sample["call_id"]]}}}, "timestamp": around}
    for name, path, body, target in [
            ("HOMER search, From user, the day", "/api/v3/search/call/data", by("data_header.from_user",
                                                                              sample["from_user"]), 300),
            (f"HOMER search, From user of {busiest['n']:,} rows", "/api/v3/search/call/data",
             by("data_header.from_user", busiest["from_user"]), 300),
            ("HOMER search, Call-ID, the day", "/api/v3/search/call/data", by("data_header.callid", sample["call_id"]),
             300),
            ("HOMER call/transaction", "/api/v3/call/transaction", call, 300),
            ("HOMER pcap export", "/api/v3/export/call/messages/pcap", call, 300)]:
        ms, size = median_ms(lambda: len(homer_post(http_port, path, body)), runs)
        print(f"  {name:<38} {ms:>7.0f} ms (target {target} ms), {size:,} bytes", flush=True)


def load_while_querying(port: int, http_port: int, rate: int, seconds: float) -> tuple[int, int, int]:
    """Packets at `rate`/s over UDP while a client runs heavy queries and HOMER searches over the day back
    to back; returns packets sent, queries answered and the kernel's drops on hepop's UDP socket."""
    stop, done = threading.Event(), []
    heavy = "SELECT src_ip, count(*), max(length(payload)) FROM hep_1 WHERE time > now() - INTERVAL 1 DAY " \
            "AND payload LIKE '%BYE%' GROUP BY src_ip ORDER BY 2 DESC LIMIT 10"
    now_ms = int(time.time() * 1000)
    search = {"param": {"search": {"1_call": [{"name": "data_header.from_user", "value": "%1%"}]}},
              "timestamp": {"from": now_ms - 86_400_000, "to": now_ms}}

    def query_loop():
        while not stop.is_set():
            http_get(http_port, heavy)
            homer_post(http_port, "/api/v3/search/call/data", search)
            done.append(1)

    client = threading.Thread(target=query_loop)
    client.start()
    sent = send_paced(packets(rate * int(seconds), seed=3), rate, seconds, port, "udp")
    stop.set()
    client.join()
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
    conn.request("GET", "/metrics")
    metrics = conn.getresponse().read().decode()
    drops = next((int(float(line.split()[-1])) for line in metrics.splitlines()
                  if line.startswith("hepop_udp_kernel_drops_total")), -1)
    return sent, len(done), drops


LARGE_JSON = "SELECT * FROM hep_1 WHERE time > now() - INTERVAL 1 DAY LIMIT 100000"


def bench_starvation(pool: list[bytes], rate: int, seconds: float, client_counts: list[int]) -> None:
    """Capture at `rate` packets/s over UDP while 1, 4, 8, 20 clients loop 100,000-row JSON results
    (about 80 MB each), the load that lost 68.7 % of the packets when results were made text in the
    capture process.  For each: sent, stored, loss, queries answered and refused, latency, result MB/s, and
    the peak memory of the capture process and of the query process."""
    print(f"capture at {rate:,} packets/s over UDP for {seconds:g} s while clients loop {LARGE_JSON!r} as JSON:",
          flush=True)
    for clients in client_counts:
        with tempfile.TemporaryDirectory(prefix="hepop-bench-starve-") as tmp:
            hepop = Hepop(tmp)
            prefill = send_paced(pool, rate, 100_000 / rate, hepop.port, "udp")
            settle(hepop.http_port)
            stop, answers, refused, latencies_s, result_bytes = threading.Event(), [], [], [], []

            def client():
                while not stop.is_set():
                    started = time.perf_counter()
                    conn = http.client.HTTPConnection("127.0.0.1", hepop.http_port, timeout=120)
                    conn.request("GET", "/query?" + urllib.parse.urlencode({"q": LARGE_JSON}))
                    response = conn.getresponse()
                    body = response.read()
                    conn.close()
                    if response.status == 200:
                        latencies_s.append(time.perf_counter() - started)
                        result_bytes.append(len(body))
                        answers.append(1)
                    else:
                        refused.append(response.status)

            threads = [threading.Thread(target=client) for _ in range(clients)]
            for thread in threads:
                thread.start()
            started = time.perf_counter()
            sent = send_paced(pool[prefill:] + pool[:prefill], rate, seconds, hepop.port, "udp")
            elapsed = time.perf_counter() - started
            stop.set()
            for thread in threads:
                thread.join()
            values = settle(hepop.http_port)
            children = [int(pid) for pid in Path(f"/proc/{hepop.process.pid}/task/{hepop.process.pid}/children")
                        .read_text().split()]
            query_peak = max((peak_rss_mib(pid) for pid in children), default=0.0)
            capture_peak = peak_rss_mib(hepop.process.pid)
            hepop.stop()
            rows = stored(Path(tmp))[0] - prefill
            latencies_s.sort()
            median = latencies_s[len(latencies_s) // 2] if latencies_s else float("nan")
            p95 = latencies_s[int(0.95 * (len(latencies_s) - 1))] if latencies_s else float("nan")
            print(f"  {clients:>2} clients: sent {sent:,}, stored {rows:,}, loss {100 * (sent - rows) / sent:.3f} %, "
                  f"dropped {dropped(values) or 'none'}; {len(answers)} queries answered "
                  f"({len(answers) / elapsed:.2f}/s, {sum(result_bytes) / elapsed / 1e6:.0f} MB/s), {len(refused)} "
                  f"refused 503; latency median {median:.2f} s, p95 {p95:.2f} s; peak RSS capture "
                  f"{capture_peak:.0f} MiB, query process {query_peak:.0f} MiB", flush=True)


def http_get(port: int, sql: str) -> tuple[dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("GET", "/query?" + urllib.parse.urlencode({"q": sql}))
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise SystemExit(f"query failed: {response.status} {body[:300]!r}")
    head = {k.lower(): v for k, v in response.getheaders()}
    conn.close()
    return head, body


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="capture only, short runs at two rates (under a minute)")
    parser.add_argument("--seconds", type=float, help="seconds per rate")
    parser.add_argument("--rates", help="comma-separated packets/s")
    parts = ("capture", "sustained", "overload", "compaction", "query", "starvation", "busy", "flush", "s3",
             "writer")
    for part in parts:
        parser.add_argument(f"--{part}", action="store_true", help=f"only the {part} figures (can be combined)")
    parser.add_argument("--sustained-rate", type=int, default=100_000, help="packets/s of the sustained run")
    parser.add_argument("--busy-rate", type=int, default=20_000, help="SIP messages/s of the busy hour")
    args = parser.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    rates = [int(r) for r in args.rates.split(",")] if args.rates else \
        ([20_000, 60_000] if args.quick else [20_000, 40_000, 60_000, 80_000, 100_000, 120_000])
    print(f"hepop bench: commit {commit()}, {platform.node()}, {os.cpu_count()} cores ({cpu_model()}), "
          f"{platform.python_implementation()} {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    pool = packets(200_000)
    chosen = [part for part in parts if getattr(args, part)] or (["capture"] if args.quick else list(parts))
    if "query" in chosen:
        bench_queries(500_000 if args.quick else 10_000_000)
    if "compaction" in chosen:
        compaction_figures(args.quick, pool)
    if "capture" in chosen:
        capture_figures(args, seconds, rates, pool)
    if "sustained" in chosen:
        sustained_figures(args.sustained_rate, 60.0, pool)
    if "overload" in chosen:
        overload_figures(pool)
    if "busy" in chosen:
        bench_busy_hour(args.busy_rate // 10 if args.quick else args.busy_rate)
    if "starvation" in chosen:
        bench_starvation(pool, 20_000, 10.0 if args.quick else 30.0, [1, 4, 8, 20])
    if "flush" in chosen:
        bench_flush([100, 1_000, 4_200, 10_000])
    if "writer" in chosen:
        bench_writer()
    if "s3" in chosen:
        bench_s3(args.quick, 20_000)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def compaction_figures(quick: bool, pool: list[bytes]) -> None:
    memory_mb = 256
    print(f"compaction of one closed SIP hour of raw files (COMPACT_MEMORY_MB={memory_mb}):")
    print("(hepop's RSS before and at its peak; the compaction process's peak RSS, its imports included)")
    print(f"{'raw MiB':>8} {'files':>6} {'rows':>10} {'seconds':>8} {'rows/s':>9} {'MiB/s':>7} {'B/row raw':>10} "
          f"{'B/row compacted':>16} {'RSS base MiB':>12} {'RSS peak MiB':>12} {'compaction process peak MiB':>28}")
    for target in ([20] if quick else [100, 1024]):
        r = bench_compaction(target, memory_mb)
        print(f"{r['raw_bytes'] / 2**20:>8.0f} {r['files']:>6} {r['rows']:>10,} {r['seconds']:>8.1f} "
              f"{r['rows'] / r['seconds']:>9,.0f} {r['raw_bytes'] / 2**20 / r['seconds']:>7.1f} "
              f"{r['raw_bytes'] / r['rows']:>10.0f} {r['compacted_bytes'] / r['rows']:>16.0f} "
              f"{r['baseline_mib']:>12.0f} {r['peak_mib']:>12.0f} {r['child_peak_mib']:>28.0f}", flush=True)
    target, rate = (20, 20_000) if quick else (1024, 20_000)
    r = bench_loss_while_compacting(target, rate, pool)
    print(f"loss while compacting a {target} MiB hour at {rate:,} packets/s UDP for {r['seconds']:.0f} s: sent "
          f"{r['sent']:,}, stored {r['stored']:,}, loss {100 * (r['sent'] - r['stored']) / r['sent']:.3f} %, "
          f"compaction finished under load: {r['compacted']}", flush=True)


def capture_figures(args, seconds: float, rates: list[int], pool: list[bytes]) -> None:
    sizes = sorted(len(p) for p in pool)
    print(f"packets: HEP3 SIP, {sizes[0]}-{sizes[-1]} bytes, median {sizes[len(sizes) // 2]}")
    print(f"capture: {seconds:g} s per rate")
    ceiling = bare_ceiling(pool, min(seconds, 5.0))
    print(f"bare UDP receive loop: {ceiling['rate']:,.0f} packets/s received "
          f"({ceiling['received']:,} of {ceiling['sent']:,} sent flat out), {ceiling['cpu_us']:.1f} us CPU/packet")
    print(CAPTURE_HEADER)
    best = {}
    for transport in ("udp", "tcp"):
        for rate in rates:
            r = run_hepop(rate, seconds, transport, pool)
            print_capture_row(r)
            if zero_loss(r):
                best[transport] = max(best.get(transport, 0), rate)
    for transport in ("udp", "tcp"):
        zero = best.get(transport, 0)
        print(f"hepop {transport}: highest zero-loss rate {zero:,}/s = {zero / ceiling['rate']:.2f} of the bare UDP "
              f"receive ceiling")


CAPTURE_HEADER = (f"{'transport':>9} {'offered/s':>10} {'achieved/s':>10} {'sent':>9} {'stored':>9} {'loss %':>7} "
                  f"{'CPU us/pkt':>10} {'RSS MiB':>8} {'B/row':>6} {'loop max ms':>11} {'flush max ms':>12}  dropped")


def print_capture_row(r: dict) -> None:
    drops = ", ".join(f"{reason} {count:,.0f}" for reason, count in r["dropped"].items()) or "-"
    print(f"{r['transport']:>9} {r['rate']:>10,} {r['achieved']:>10,.0f} {r['sent']:>9,} {r['stored']:>9,} "
          f"{r['loss_pct']:>7.3f} {r['cpu_us']:>10.1f} {r['rss_mib']:>8.0f} {r['bytes_per_row']:>6.0f} "
          f"{r['loop_busy_ms_max']:>11.1f} {r['flush_ms_max']:>12.1f}  {drops}", flush=True)


def sustained_figures(rate: int, seconds: float, pool: list[bytes]) -> None:
    """`rate` for `seconds` over UDP and over TCP, while hepop compacts a closed hour of 100 MiB that is on
    disk when it starts, and flushes and extracts SIP fields as always."""
    print(f"sustained: {rate:,} packets/s for {seconds:g} s, compacting a closed 100 MiB hour meanwhile")
    print(CAPTURE_HEADER + ", compactions")
    for transport in ("udp", "tcp"):
        with tempfile.TemporaryDirectory(prefix="hepop-bench-hour-") as hour:
            _, old_rows, old_bytes = write_closed_hour(Path(hour), 100 << 20)
            r = run_hepop(rate, seconds, transport, pool, data_dir=hour, COMPACT_INTERVAL_S="5",
                          COMPACT_GRACE_S="1")
        r["stored"] -= old_rows
        r["loss_pct"] = 100.0 * (r["sent"] - r["stored"]) / r["sent"]
        r["bytes_per_row"] = float("nan")          # the files mix the old hour and the new rows
        print_capture_row(r)
        print(f"{'':>9} compactions during the run: {r['compactions']:.0f}; zero loss: {zero_loss(r)}", flush=True)


def overload_figures(pool: list[bytes]) -> None:
    """Far more than hepop can take, then a normal load: what it drops and says it dropped, how fast it
    answers a query meanwhile, and whether it loses anything once the load is back to normal."""
    with tempfile.TemporaryDirectory(prefix="hepop-bench-overload-") as tmp:
        hepop = Hepop(tmp)
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(sent=send_flat_out(pool, 5.0, hepop.port)))
        worker.start()
        time.sleep(2.0)
        started = time.perf_counter()
        body = http_get(hepop.http_port, "SELECT COUNT(*) AS n FROM hep_1")[1]
        query_ms = 1000 * (time.perf_counter() - started)
        worker.join()
        during = settle(hepop.http_port)
        rows_during = stored(Path(tmp))[0]
        after_sent = send_paced(pool, 20_000, 5.0, hepop.port, "udp")
        after = settle(hepop.http_port)
        hepop.stop()
        rows, _ = stored(Path(tmp))
    counted = dropped(during)
    new_drops = sum(v - counted.get(k, 0) for k, v in dropped(after).items())
    print(f"overload: {result['sent']:,} UDP packets sent flat out in 5 s ({result['sent'] / 5:,.0f}/s): hepop "
          f"received {received_total(during):,.0f}, stored {rows_during:,}; drops it reports on /metrics: "
          f"{', '.join(f'{k} {v:,.0f}' for k, v in counted.items()) or 'none'}")
    print(f"  a COUNT(*) query during the overload answered in {query_ms:.0f} ms: {body.decode().strip()[:80]}")
    print(f"  then 20,000/s for 5 s: {after_sent:,} sent, {rows - rows_during:,} stored, new drops "
          f"{new_drops:,.0f}", flush=True)


def send_flat_out(pool: list[bytes], seconds: float, port: int) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for data in pool[sent % len(pool):sent % len(pool) + 1000]:
            sock.sendto(data, ("127.0.0.1", port))
        sent += 1000
    sock.close()
    return sent


if __name__ == "__main__":
    main()
