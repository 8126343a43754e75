"""Tests of hepop as its users see it: HEP in, Parquet rows out, restarts and crashes survived.

Unit tests build HEP bytes with the small independent encoder below; end-to-end tests start the real
server (`python3 hepop.py`) on free ports in a temporary folder and read back the Parquet files it wrote,
with DuckDB, through the files its metadata.json lists.  Real third-party senders (hep-js, Kamailio with
SIPp) are used where installed; `.ci/run` installs them, and with HEPOP_REQUIRE_SENDERS=1 a missing one
fails the run instead of skipping.
"""

from __future__ import annotations

import collections
import importlib.util
import contextlib
import http.client as http_client
import datetime
import errno
import glob
import gzip
import json
import logging
import os
import random
import resource
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import hepop

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "testdata"


# ---------------------------------------------------------------------------------------------------------
# An independent HEP encoder for the tests
# ---------------------------------------------------------------------------------------------------------

def chunk(kind: int, body: bytes, vendor: int = 0) -> bytes:
    return struct.pack("!HHH", vendor, kind, len(body) + 6) + body


def hep3(payload: bytes = b"OPTIONS sip:x@y SIP/2.0\r\n\r\n", *, src="10.0.0.1", dst="10.0.0.2",
         sport=5060, dport=5061, seconds=None, useconds=0, proto_type=1, capture_id=7,
         extra: bytes = b"", payload_chunk: int = 15, protocol: int = 17) -> bytes:
    """A HEP3 message; seconds=None means the current time, seconds=False sends no time chunks."""
    v6 = ":" in src
    family = socket.AF_INET6 if v6 else socket.AF_INET
    body = chunk(1, bytes([10 if v6 else 2])) + chunk(2, bytes([protocol]))
    body += chunk(5 if v6 else 3, socket.inet_pton(family, src)) + chunk(6 if v6 else 4, socket.inet_pton(family, dst))
    body += chunk(7, struct.pack("!H", sport)) + chunk(8, struct.pack("!H", dport))
    if seconds is not False:
        now = time.time()
        body += chunk(9, struct.pack("!I", int(now) if seconds is None else seconds))
        body += chunk(10, struct.pack("!I", int(now % 1 * 1e6) if seconds is None else useconds))
    body += chunk(11, bytes([proto_type])) + chunk(12, struct.pack("!I", capture_id)) + extra
    body += chunk(payload_chunk, payload)
    return b"HEP3" + struct.pack("!H", len(body) + 6) + body


def sip(call_id: str, method="INVITE", extra="") -> bytes:
    return (f"{method} sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1\r\n"
            f"From: <sip:alice@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\nCall-ID: {call_id}\r\n"
            f"CSeq: 1 {method}\r\n{extra}Content-Length: 0\r\n\r\n").encode()


def build_table(proto_type: int, times_us: list[int], packets: list) -> pa.Table:
    """The stored table of decoded packets, as the writer makes it."""
    return hepop.complete_table(proto_type, hepop.packet_table(times_us, packets))


def fixture_packets(name: str) -> list[bytes]:
    return [Path(p).read_bytes() for p in sorted(glob.glob(str(FIXTURES / name / "*.bin")))]


# ---------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------

GOLDEN = bytes.fromhex(
    "48455033 0071 0000 0001 0007 02 0000 0002 0007 11 0000 0003 000a d4ca0001 0000 0004 000a 527400d3"
    "0000 0007 0008 2eea 0000 0008 0008 13c4 0000 0009 000a 4e4982cb 0000 000a 000a 0001d4c0"
    "0000 000b 0007 01 0000 000c 000a 000000e4 0000 000f 0014".replace(" ", "")) + b"INVITE sip:bob"


def test_golden_vector_from_the_spec_decodes_to_the_exact_fields():
    assert len(GOLDEN) == 113
    packet = hepop.decode(GOLDEN)
    assert packet == hepop.HepPacket(
        version=3, time_us=1313440459_120000, ip_family=2, protocol=17, src_ip=socket.inet_aton("212.202.0.1"),
        dst_ip=socket.inet_aton("82.116.0.211"), src_port=12010, dst_port=5060, proto_type=1, capture_id=228, node_name=None,
        correlation_id=None, vlan=None, auth_key=None, payload=b"INVITE sip:bob")


@pytest.mark.parametrize("name,version,family,address", [
    ("kamailio/hep3", 3, 2, "127.0.0.1"), ("kamailio/hep2", 2, 2, "127.0.0.1"),
    ("kamailio/hep1", 1, 2, "127.0.0.1"), ("kamailio/hep3tcp", 3, 2, "127.0.0.1"),
    ("kamailio/v6hep3", 3, 10, "::1"), ("kamailio/v6hep2", 2, 10, "::1"), ("hep-js", 3, 2, "127.0.0.1")])
def test_messages_captured_from_real_senders_decode(name, version, family, address):
    packets = [hepop.decode(data) for data in fixture_packets(name)]
    assert packets
    for packet in packets:
        packed = socket.inet_pton(socket.AF_INET6 if family == 10 else socket.AF_INET, address)
        assert (packet.version, packet.ip_family, packet.src_ip, packet.dst_ip) == (version, family, packed, packed)
        assert packet.protocol == 17 and packet.proto_type == 1
        assert re.match(rb"^([A-Z]+ sips?:\S+ SIP/2\.0|SIP/2\.0 \d{3} )", packet.payload), packet.payload[:40]
        assert packet.payload.endswith(b"\r\n")
        if version == 1:
            assert packet.time_us is None and packet.capture_id == 0
        else:
            # Captured on 2026-11-01 or later: a big-endian misreading of v2's time block lands in 2027+
            # or before 1990.
            assert 1_790_000_000 < packet.time_us / 1e6 < 1_830_000_000
            assert packet.capture_id == 2001
    times = [p.time_us for p in packets]
    if version != 1:
        assert max(times) - min(times) < 10_000_000       # one call: all within seconds


def test_hep_js_fields_as_that_sender_writes_them():
    packet = hepop.decode(fixture_packets("hep-js")[0])
    assert (packet.node_name, packet.correlation_id, packet.auth_key) == (
        "hepjs-node", "hepjs-test-call-1@127.0.0.1", b"myHep")
    assert (packet.src_port, packet.dst_port) == (5070, 5060)


def test_chunks_in_any_order_unknown_chunks_skipped_last_repeat_wins():
    chunks = [chunk(1, b"\x02"), chunk(2, b"\x06"), chunk(3, bytes([1, 2, 3, 4])), chunk(4, bytes([5, 6, 7, 8])),
              chunk(7, b"\x00\x01"), chunk(8, b"\x00\x02"), chunk(9, struct.pack("!I", 1_700_000_000)),
              chunk(10, struct.pack("!I", 5)), chunk(11, b"\x05"), chunk(12, struct.pack("!I", 9)),
              chunk(15, b"{\"rtcp\":1}"), chunk(17, b"corr"), chunk(18, b"\x00\x2a"), chunk(19, b"node-a"),
              chunk(99, b"unknown generic"), chunk(3, b"vendor!", vendor=8), chunk(13, b"\x00\x05"),
              chunk(32, b"\x01\x02")]
    body = b"".join(chunks)            # the order most agents send: the decoder's fast path takes it
    expected = hepop.decode(b"HEP3" + struct.pack("!H", len(body) + 6) + body)
    for seed in range(20):
        random.Random(seed).shuffle(chunks)
        body = b"".join(chunks)
        packet = hepop.decode(b"HEP3" + struct.pack("!H", len(body) + 6) + body)
        assert packet == expected
    assert expected == hepop.HepPacket(3, 1_700_000_000_000_005, 2, 6, bytes([1, 2, 3, 4]), bytes([5, 6, 7, 8]), 1, 2, 5, 9, "node-a",
                                       "corr", 42, None, b"{\"rtcp\":1}")
    repeated = hep3(b"first", extra=chunk(11, b"\x64")).replace(b"first", b"xxxxx")
    assert hepop.decode(repeated).proto_type == 100 and hepop.decode(repeated).payload == b"xxxxx"


def raw_deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    return deflater.compress(data) + deflater.flush()


@pytest.mark.parametrize("compress", [zlib.compress, gzip.compress, raw_deflate], ids=["zlib", "gzip", "deflate"])
def test_compressed_payload_is_inflated(compress):
    payload = sip("compressed@x") * 3
    assert hepop.decode(hep3(compress(payload), payload_chunk=16)).payload == payload


def test_compressed_payload_bomb_is_refused():
    bomb = zlib.compress(b"\0" * (hepop.MAX_INFLATED_BYTES + 1))
    with pytest.raises(hepop.HepError) as error:
        hepop.decode(hep3(bomb, payload_chunk=16))
    assert error.value.reason == "compressed_payload_too_large"
    with pytest.raises(hepop.HepError):
        hepop.decode(hep3(b"\x78\x9cnot deflate", payload_chunk=16))


@pytest.mark.parametrize("data,reason", [
    (b"HEP3", "short"),
    (b"HEP3\x00\x0a\x00\x00", "length_mismatch"),
    (hep3()[:-1], "length_mismatch"),
    (b"HEP3\x00\x09\x00\x00\x00", "truncated_chunk"),
    (b"HEP3\x00\x0c\x00\x00\x00\x01\x00\x05", "bad_chunk_length"),
    (b"HEP3\x00\x0c\x00\x00\x00\x01\x00\x20", "bad_chunk_length"),
    (b"HEP3\x00\x0e" + chunk(3, b"\x01\x02"), "bad_chunk_3"),
    (b"\x01\x10\x02\x11\x13\xc4\x13\xc4\x7f\x00\x00\x01\x7f\x00\x00", "short"),       # v1 IPv4, 15 bytes
    (b"\x02\x10\x02\x11\x13\xc4\x13\xc4\x7f\x00\x00\x01\x7f\x00\x00\x01" + b"\0" * 11, "short"),  # v2, no time
    (b"\x02\x28\x0a\x11\x13\xc4\x13\xc4" + b"\0" * 31, "short"),                      # v2 IPv6 addresses cut
    (b"\x01\x10\x07\x11\x13\xc4\x13\xc4" + b"\0" * 8, "bad_family"),
    (b"\x01\x10", "short"),
    (b"", "unknown_version"),
    (b"GET / HTTP/1.1\r\n", "unknown_version"),
])
def test_malformed_input_raises_a_hep_error_with_its_reason(data, reason):
    with pytest.raises(hepop.HepError) as error:
        hepop.decode(data)
    assert error.value.reason == reason and reason in hepop.HEP_ERRORS


def test_hundred_thousand_mutated_packets_only_ever_raise_hep_error():
    rng = random.Random(1)
    seeds = [hep3(sip(f"fuzz{i}")) for i in range(5)] + [GOLDEN] + fixture_packets("kamailio/hep2")[:3] + \
        fixture_packets("kamailio/v6hep2")[:2] + fixture_packets("kamailio/hep1")[:2]
    outcomes = {"ok": 0, "error": 0}
    for data in mutations(rng, seeds, 100_000):
        try:
            packet = hepop.decode(data)
        except hepop.HepError as error:
            assert error.reason in hepop.HEP_ERRORS         # its series is on /metrics from the start
            outcomes["error"] += 1
        else:
            assert isinstance(packet.payload, bytes)
            outcomes["ok"] += 1
    assert outcomes["ok"] > 1000 and outcomes["error"] > 1000, outcomes


def test_datagrams_decoded_in_batch_equal_decoding_one_by_one(tmp_path):
    """The writer decodes UDP datagrams of the common layout with Arrow and the rest with decode(): for
    real senders' packets and 20,000 mutations of them, the rows and the counts equal decoding each."""
    rng = random.Random(2)
    seeds = [hep3(sip(f"batch{i}"), src=src, dst=src, proto_type=proto_type, seconds=seconds)
             for i, (src, proto_type, seconds) in enumerate([("10.1.2.3", 1, None), ("2001:db8::7", 1, None),
                                                             ("10.9.9.9", 5, None), ("10.0.0.1", 100, 123)])]
    seeds += [p for name in ("kamailio/hep3", "kamailio/v6hep3", "kamailio/hep3auth", "kamailio/hlog",
                             "kamailio/hep2", "kamailio/hep1", "hep-js") for p in fixture_packets(name)[:3]]
    datagrams = seeds * 20 + list(mutations(rng, seeds, 20_000))
    arrival_us = time.time_ns() // 1000
    counters = hepop.Counters()
    config = hepop.Config.load([], {"PARQUET_DIR": str(tmp_path)})
    writer = hepop.BatchWriter(hepop.Storage(str(tmp_path), "w"), counters, hepop.PacketCheck(config, counters),
                               config)
    tables = writer.message_tables(hepop.ReceivedBatch("udp", arrival_us, 0.0, datagrams, [hepop.Sender(0, ("127.0.0.1", 9))]))

    expected: dict[int, tuple[list, list]] = {}
    received, malformed = collections.Counter(), 0
    for data in datagrams:
        try:
            packet = hepop.decode(data)
        except hepop.HepError:
            malformed += 1
            received[str(data[0]) if data[:1] in (b"\1", b"\2") and data[:4] != b"HEP3" else
                     "3" if data[:4] == b"HEP3" else "unknown"] += 1
            continue
        received[str(packet.version)] += 1
        sane = packet.time_us is not None and hepop.MIN_CAPTURE_TIME_US <= packet.time_us <= arrival_us + 86_400_000_000
        times, packets = expected.setdefault(packet.proto_type, ([], []))
        times.append(packet.time_us if sane else arrival_us)
        packets.append(packet)
    assert sorted(tables) == sorted(expected) and {1, 5, 100} <= set(tables)
    for proto_type, (times, packets) in expected.items():
        rows = lambda table: sorted(map(repr, table.to_pylist()))
        got = hepop.complete_table(proto_type, tables[proto_type])
        assert len(got) == len(packets) and rows(got) == rows(build_table(proto_type, times, packets))
    array = pa.array(datagrams, pa.binary())
    picked = [hepop.decode_common(array, prefix)[0] for prefix in hepop.COMMON_PREFIXES]
    batch_decoded = {index for mask in picked for index, kept in enumerate(mask.to_pylist()) if kept}
    assert {i for i, data in enumerate(datagrams) if hepop.has_common_layout(data)} == batch_decoded
    assert len(batch_decoded) > len(datagrams) // 10
    metrics = counters.snapshot()
    assert {version: metrics.get(f'hep_received_total{{transport="udp",version="{version}"}}', 0)
            for version in received} == dict(received)
    assert sum(v for k, v in metrics.items() if k.startswith('hep_dropped_total{reason="malformed_')) == malformed > 1000


def test_a_batch_that_fails_to_decode_is_counted_and_the_writer_goes_on(tmp_path, monkeypatch):
    counters = hepop.Counters()
    config = hepop.Config.load([], {"PARQUET_DIR": str(tmp_path)})
    writer = hepop.BatchWriter(hepop.Storage(str(tmp_path), "w"), counters, hepop.PacketCheck(config, counters),
                               config)
    writer.start()
    datagrams = [hep3(sip(f"d{i}")) for i in range(10)]
    real = hepop.BatchWriter.message_tables
    monkeypatch.setattr(hepop.BatchWriter, "message_tables", lambda self, batch: 1 / 0)
    writer.submit(hepop.ReceivedBatch("udp", time.time_ns() // 1000, 0.0, datagrams[:4], [hepop.Sender(0, ("127.0.0.1", 9))], 4000))
    deadline = time.monotonic() + 10
    while counters.snapshot().get('hep_dropped_total{reason="decode_error"}') != 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    monkeypatch.setattr(hepop.BatchWriter, "message_tables", real)
    writer.submit(hepop.ReceivedBatch("udp", time.time_ns() // 1000, 0.0, datagrams[4:], [hepop.Sender(0, ("127.0.0.1", 9))], 6000))
    writer.close()
    metrics = counters.snapshot()
    assert metrics['hep_dropped_total{reason="decode_error"}'] == 4
    assert metrics['rows_written_total{type="1"}'] == 6 and writer.pending_bytes == 0


def mutations(rng: random.Random, seeds: list[bytes], count: int):
    """Random bytes, truncations, bit flips, wrong lengths and bad chunk lengths of real packets."""
    for i in range(count):
        data = bytearray(rng.choice(seeds))
        how = i % 6
        if how == 0:
            data = bytearray(rng.randbytes(rng.randrange(0, 200)))
            if rng.random() < 0.5:
                data[:1] = bytes([rng.choice((1, 2))])
        elif how == 1:
            del data[rng.randrange(0, len(data)):]
        elif how == 2:
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif how == 3 and data[:4] == b"HEP3":
            data[4:6] = struct.pack("!H", rng.randrange(65536))
        elif how == 4 and data[:4] == b"HEP3":
            offset = rng.randrange(6, len(data) - 6)
            data[offset:offset + 6] = struct.pack("!HHH", 0, rng.randrange(40), rng.randrange(65536))
        else:
            data[rng.randrange(len(data)):rng.randrange(len(data))] = rng.randbytes(rng.randrange(1, 20))
        yield bytes(data)


# ---------------------------------------------------------------------------------------------------------
# TCP framing
# ---------------------------------------------------------------------------------------------------------

def frames_from(stream: hepop.HepStream, data: bytes, decode_check=True) -> list[bytes]:
    stream.feed(data)
    frames = []
    while (frame := stream.next_frame()) is not None:
        try:
            if decode_check:
                hepop.decode(frame)
        except hepop.HepError:
            stream.reject()
            continue
        frames.append(frame)
    return frames


def test_stream_cuts_glued_frames():
    frames = [hep3(sip(f"glued{i}")) for i in range(5)]
    assert frames_from(hepop.HepStream(), b"".join(frames)) == frames


def test_stream_reassembles_a_frame_split_at_every_byte_offset():
    frames = [hep3(sip("split-a")), hep3(sip("split-b"))]
    data = b"".join(frames)
    for cut in range(1, len(data)):
        stream = hepop.HepStream()
        assert frames_from(stream, data[:cut]) + frames_from(stream, data[cut:]) == frames, cut
    stream = hepop.HepStream()
    assert [f for byte in data for f in frames_from(stream, bytes([byte]))] == frames


def test_stream_resynchronises_after_garbage_and_counts_it():
    frames = [hep3(sip(f"garbage{i}")) for i in range(3)]
    garbage = [b"\x00junk\xff", b"HEP", b"HEP3\x00\x02", b"HE"]
    stream = hepop.HepStream()
    got = frames_from(stream, garbage[0] + frames[0] + garbage[1] + garbage[2] + frames[1] + garbage[3] + frames[2])
    assert got == frames
    assert stream.garbage_bytes == sum(map(len, garbage))


def test_a_frame_with_a_lying_length_does_not_swallow_the_frames_behind_it():
    good = [hep3(sip(f"behind{i}")) for i in range(3)]
    liar = bytearray(hep3(sip("liar")))
    liar[4:6] = struct.pack("!H", len(liar) + len(good[0]) + 10)      # claims part of the next frame
    assert frames_from(hepop.HepStream(), bytes(liar) + b"".join(good)) == good
    # Claiming exactly the next frame: its header would read as a vendor chunk; it is refused all the same.
    liar[4:6] = struct.pack("!H", len(liar) + len(good[0]))
    stream = hepop.HepStream()
    assert frames_from(stream, bytes(liar) + b"".join(good)) == good
    assert stream.garbage_bytes == len(liar)


def test_stream_finish_gives_up_on_an_incomplete_frame_and_keeps_what_follows():
    good = hep3(sip("after-incomplete"))
    stream = hepop.HepStream()
    data = b"HEP3\xff\xff" + b"x" * 10 + good
    assert frames_from(stream, data) == []      # waiting for 65535 bytes
    assert stream.finish() == [good]


# ---------------------------------------------------------------------------------------------------------
# SIP fields and the table a batch becomes
# ---------------------------------------------------------------------------------------------------------

def sip_row(payload: bytes) -> dict:
    packet = hepop.decode(hep3(payload))
    row = build_table(1, [packet.time_us], [packet]).to_pylist()[0]
    return {k: row[k] for k in hepop.SIP_COLUMNS}


def test_sip_fields_of_requests_and_responses():
    assert sip_row(sip("abc@host", extra="User-Agent: Kamailio 5.6\r\n")) == {
        "sip_method": "INVITE", "sip_status": None, "call_id": "abc@host", "from_user": "alice", "to_user": "bob",
        "ruri_user": "bob", "cseq": "1 INVITE", "user_agent": "Kamailio 5.6"}
    response = (b"SIP/2.0 486 Busy Here\r\nv: SIP/2.0/UDP h\r\nf: \"Al\" <sips:+4930123@h;user=phone>;tag=a\r\n"
                b"t: <tel:+4940999;phone-context=x>\r\ni: compact-id \r\nCSeq: 7 INVITE\r\nServer: FreeSWITCH\r\n\r\n")
    assert sip_row(response) == {
        "sip_method": None, "sip_status": 486, "call_id": "compact-id", "from_user": "+4930123",
        "to_user": "+4940999", "ruri_user": None, "cseq": "7 INVITE", "user_agent": "FreeSWITCH"}
    register = b"REGISTER sip:example.com SIP/2.0\r\nCALL-ID: r1\r\nFrom: sip:u1@example.com;tag=x\r\nTo: sip:u1@example.com\r\n\r\n"
    assert sip_row(register) == {
        "sip_method": "REGISTER", "sip_status": None, "call_id": "r1", "from_user": "u1", "to_user": "u1",
        "ruri_user": None, "cseq": None, "user_agent": None}
    assert set(sip_row(b"not sip at all").values()) == {None}


def test_user_agent_and_server_in_any_letter_case_in_one_batch():
    extras = ["User-Agent: A 1\r\n", "user-agent: B 2\r\n", "", "SERVER: C 3\r\n", "Server: D 4\r\nuser-agent: E\r\n"]
    packets = [hepop.decode(hep3(sip(f"ua{i}", extra=extra))) for i, extra in enumerate(extras)]
    table = build_table(1, [p.time_us for p in packets], packets)
    assert table["user_agent"].to_pylist() == ["A 1", "B 2", None, "C 3", "D 4"]
    assert table["call_id"].to_pylist() == [f"ua{i}" for i in range(5)]


def test_payload_bytes_that_are_not_utf8_are_kept_exactly():
    packets = [hepop.decode(hep3(p)) for p in (b"plain text", b"bin\xff\xfe\x00ary", "caf\u00e9 \ufffd".encode())]
    table = build_table(5, [p.time_us for p in packets], packets)
    rows = table.to_pylist()
    assert [r["payload_raw"] if r["payload_raw"] is not None else r["payload"].encode() for r in rows] == \
        [p.payload for p in packets]
    assert rows[1]["payload_raw"] == b"bin\xff\xfe\x00ary" and rows[0]["payload_raw"] is None
    assert rows[1]["payload"] is None           # one form stored: the bytes
    assert rows[2]["payload_raw"] is None       # a real U+FFFD in valid UTF-8 is text
    assert table.schema == hepop.table_schema(5) and table.schema.names[-1] == "payload"


# ---------------------------------------------------------------------------------------------------------
# Storage: atomic files, metadata.json and recovery
# ---------------------------------------------------------------------------------------------------------

def table_of(times_s: list[float], proto_type=1) -> pa.Table:
    packets = [hepop.decode(hep3(sip(f"t{i}"), proto_type=proto_type)) for i in range(len(times_s))]
    return build_table(proto_type, [int(t * 1e6) for t in times_s], packets)


def listed_files(type_dir: Path) -> set[str]:
    metadata = json.loads((type_dir / "metadata.json").read_text())
    return {entry["path"] for entry in metadata["files"]}


def parquet_on_disk(root: Path, type_dir: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in type_dir.rglob("*.parquet")}


def test_a_batch_spanning_ten_minute_folders_is_split(tmp_path):
    store = hepop.Storage(str(tmp_path), "w").store(1)
    base = 1_795_000_200          # 2026-11-18 11:10:00 UTC
    entries = store.write(table_of([base + 1, base + 599, base + 600, base + 3600 * 24 + 5]))
    assert [(Path(e["path"]).parent.parent.name + "/" + Path(e["path"]).parent.name, e["row_count"]) for e in entries] == [
        ("2026-11-18/11-10", 2), ("2026-11-18/11-20", 1), ("2026-11-19/11-10", 1)]
    assert [e["chunk_time"] for e in entries] == [base * 10**9, (base + 600) * 10**9, (base + 86400) * 10**9]
    assert entries[0]["min_time"] == (base + 1) * 10**9 and entries[0]["max_time"] == (base + 599) * 10**9
    type_dir = tmp_path / "w/dbs/hep-0/hep_1-0"
    assert listed_files(type_dir) == parquet_on_disk(tmp_path, type_dir)
    metadata = json.loads((type_dir / "metadata.json").read_text())
    assert (metadata["type"], metadata["row_count"], metadata["wal_sequence"]) == (1, 4, 3)
    file = pq.ParquetFile(tmp_path / entries[0]["path"])
    assert file.metadata.row_group(0).column(0).compression == "ZSTD"
    assert file.schema_arrow.names[-1] == "payload"


def test_recovery_makes_metadata_equal_to_the_tree(tmp_path):
    store = hepop.Storage(str(tmp_path), "w").store(1)
    now = time.time()
    kept = store.write(table_of([now]))[0]
    gone = store.write(table_of([now, now]))[0]
    type_dir = tmp_path / "w/dbs/hep-0/hep_1-0"
    folder = (tmp_path / kept["path"]).parent
    # A crash after the rename of file 3, before metadata listed it: the file is complete.
    pq.write_table(table_of([now, now, now]), folder / "0000000003.parquet")
    # A crash in the middle of writing file 4: only its temp file exists.
    (folder / "0000000004.parquet.tmp").write_bytes(b"PAR1 half a file")
    (type_dir / "metadata.json.tmp").write_bytes(b"{")
    # A file someone truncated, and a listed file that was deleted.
    (folder / "0000000005.parquet").write_bytes(b"PAR1 not really")
    os.remove(tmp_path / gone["path"])

    store = hepop.Storage(str(tmp_path), "w").store(1)
    assert sorted(glob.glob(str(type_dir / "**/*.tmp"), recursive=True)) == []
    assert not (folder / "0000000005.parquet").exists()
    assert listed_files(type_dir) == parquet_on_disk(tmp_path, type_dir) == {
        kept["path"], str((folder / "0000000003.parquet").relative_to(tmp_path))}
    metadata = json.loads((type_dir / "metadata.json").read_text())
    assert metadata["row_count"] == 4
    assert store.write(table_of([now]))[0]["id"] == 6      # fresh sequence numbers, never reused

    complete = json.loads((type_dir / "metadata.json").read_text())
    (type_dir / "metadata.json").write_text("{ damaged")
    hepop.Storage(str(tmp_path), "w").store(1)
    assert json.loads((type_dir / "metadata.json").read_text()) == complete        # rebuilt from the tree
    os.remove(type_dir / "metadata.json")
    hepop.Storage(str(tmp_path), "w").store(1)
    assert json.loads((type_dir / "metadata.json").read_text()) == complete


def test_file_description_from_the_footer_equals_the_rows(tmp_path):
    """Row count and time range come from the footer's statistics, or from the rows of a file written
    without statistics; both equal what the rows say."""
    times = [time.time() - random.uniform(0, 3000) for _ in range(5000)]
    table = table_of(times)
    expected_us = sorted(table.column("time").cast(pa.int64()).to_pylist())
    for name, options in (("stats", {"row_group_size": 700}), ("bare", {"write_statistics": False})):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(table, path, **options)
        with open(path, "rb") as source:
            described = hepop.describe_file(source)
        assert described.row_count == 5000
        assert (described.min_time_us, described.max_time_us) == (expected_us[0], expected_us[-1])
        assert described.size_bytes == path.stat().st_size


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------

def run_hepop(*args, env=None, timeout=30):
    return subprocess.run([sys.executable, str(HERE / "hepop.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_help_shows_every_setting_with_its_default():
    result = run_hepop("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for setting in hepop.SETTINGS:
        assert setting.flag in text and f"env {setting.name}, default" in text
    assert "env PORT, default 9069" in text and "env HTTP_PORT, default PORT+1" in text
    assert "env PARQUET_DIR, default ./data" in text and "env FLUSH_INTERVAL_S, default 1.0" in text
    assert run_hepop("--version").stdout.strip() == f"hepop {hepop.__version__}"


@pytest.mark.parametrize("name,value", [
    ("PORT", "70000"), ("PORT", "http"), ("FLUSH_INTERVAL_S", "0"), ("FLUSH_ROWS", "-5"),
    ("RCVBUF_BYTES", "lots"), ("WRITER_ID", "../escape"), ("LOG_LEVEL", "LOUD"), ("HTTP_PORT", "0"),
    ("QUERY_MEMORY_MB", "64")])
def test_a_bad_setting_exits_2_and_names_it(name, value):
    result = run_hepop(env={name: value})
    assert result.returncode == 2
    assert name in result.stderr and value in result.stderr


def test_flags_win_over_environment_and_defaults_derive():
    config = hepop.Config.load(["--port", "7000", "--flush-bytes", "2M"], {"PORT": "8000", "WRITER_ID": "w9"})
    assert (config.port, config.http_port, config.flush_bytes, config.writer_id) == (7000, 7001, 2 << 20, "w9")
    assert config.parquet_dir == os.path.abspath("./data")


# ---------------------------------------------------------------------------------------------------------
# The running server
# ---------------------------------------------------------------------------------------------------------

def free_port(family=socket.AF_INET, host="127.0.0.1") -> int:
    """A port free for both UDP and TCP."""
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as tcp, socket.socket(family, socket.SOCK_DGRAM) as udp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind((host, port))
            except OSError:
                continue
            return port


class Server:
    """hepop.py running in a subprocess with its own port and data folder."""

    def __init__(self, data_dir: Path, preexec_fn=None, wait_ready=True, **settings):
        self.data_dir = data_dir
        self.port = int(settings.pop("PORT", 0)) or free_port()
        settings.setdefault("HTTP_PORT", free_port())
        # The disk guard is off unless a test turns it on: a CI disk fuller than 90% must not delete test data.
        self.env = {**os.environ, "PORT": str(self.port), "PARQUET_DIR": str(data_dir), "WRITER_ID": "test",
                    "FLUSH_INTERVAL_S": "0.2", "CALL_RECORDS_INTERVAL_S": "0.1", "LOG_LEVEL": "INFO", "MAX_DISK_PERCENT": "0",
                    **{k: str(v) for k, v in settings.items()}}
        self.lines: list[str] = []
        self.process = subprocess.Popen([sys.executable, str(HERE / "hepop.py")], env=self.env,
                                        stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        self.http_port = int(self.env.get("HTTP_PORT", 0)) or None
        if wait_ready:
            self.wait_for_log("ready")

    def _read_stderr(self):
        for line in self.process.stderr:
            self.lines.append(line)

    def wait_for_log(self, text: str, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} in hepop's log:\n{''.join(self.lines)}")

    def stop(self, sig=signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        code = self.process.wait(timeout=60)
        self._reader.join(timeout=5)
        return code

    def counters(self) -> dict:
        line = next(line for line in reversed(self.lines) if "final counters" in line)
        return json.loads(line.split("final counters ", 1)[1])

    def udp(self, packets, host="127.0.0.1", pace_every=0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            for i, data in enumerate(packets):
                sock.sendto(data, (host, self.port))
                if pace_every and i % pace_every == pace_every - 1:
                    time.sleep(0.002)

    def tcp(self, data: bytes):
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.sendall(data)


@pytest.fixture
def servers(tmp_path):
    started = []

    def start(data_dir: Path | None = None, **settings) -> Server:
        server = Server(data_dir or tmp_path / "data", **settings)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def type_dirs(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("*/dbs/hep-0/hep_*-0"))


def stored_rows(data_dir: Path, proto_type=1, columns="*", running=False) -> list[dict]:
    """Every row of a type, read with DuckDB from exactly the files metadata.json lists.

    Once the server has stopped, metadata must list exactly the files on disk; while it runs, a file
    may be on disk a moment before it is listed, never the other way round.
    """
    files = []
    for type_dir in data_dir.glob(f"*/dbs/hep-0/hep_{proto_type}-0"):
        if running and not (type_dir / "metadata.json").exists():
            continue                        # the folder is made a moment before the first file is listed
        if running:
            assert listed_files(type_dir) <= parquet_on_disk(data_dir, type_dir)
        else:
            assert listed_files(type_dir) == parquet_on_disk(data_dir, type_dir)
        files += sorted(str(data_dir / path) for path in listed_files(type_dir))
    if not files:
        return []
    with duckdb.connect() as con:
        con.execute("SET TimeZone='UTC'")
        result = con.execute(f"SELECT {columns} FROM read_parquet({files!r}) ORDER BY time")
        names = [d[0] for d in result.description]
        return [dict(zip(names, row)) for row in result.fetchall()]


def exact_payloads(rows) -> list[bytes]:
    return [row["payload_raw"] if row["payload_raw"] is not None else row["payload"].encode() for row in rows]


def test_fixtures_over_udp_and_tcp_are_stored_exactly(servers, tmp_path):
    server = servers()
    udp_names = ["kamailio/hep3", "kamailio/hep2", "kamailio/hep1", "kamailio/v6hep3", "kamailio/v6hep2", "hep-js"]
    sent = [data for name in udp_names for data in fixture_packets(name)]
    server.udp(sent)
    tcp_frames = fixture_packets("kamailio/hep3tcp")
    server.tcp(b"".join(tcp_frames))
    assert server.stop() == 0
    rows = stored_rows(tmp_path / "data")
    by_payload = sorted(exact_payloads(rows))
    expected = [hepop.decode(d) for d in sent + tcp_frames]
    assert by_payload == sorted(p.payload for p in expected)
    for row in rows:
        assert row["src_ip"] in ("127.0.0.1", "::1") and row["protocol"] == 17
        assert {row["src_port"], row["dst_port"]} <= {5060, 5070, 5080}          # SIPp, Kamailio, SIPp
    decoded_times = sorted(p.time_us for p in expected if p.time_us is not None)
    stored_times = sorted(round(r["time"].timestamp() * 1e6) for r in rows)
    assert set(decoded_times) <= set(stored_times)
    assert {r["ip_family"] for r in rows} == {2, 10}
    counters = server.counters()
    assert counters['hep_received_total{transport="udp",version="1"}'] == 12
    assert counters['hep_received_total{transport="udp",version="2"}'] == 24
    assert counters['hep_received_total{transport="tcp",version="3"}'] == 12
    assert counters['hep_time_replaced_total{why="missing"}'] == 12       # HEPv1 carries no time


def test_tcp_frames_split_glued_and_with_garbage_are_stored_once(servers, tmp_path):
    server = servers()
    frames = [hep3(sip(f"tcp-{i}")) for i in range(40)]
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"".join(frames[:10]))                              # glued
        for i, frame in enumerate(frames[10:20]):                        # split across reads
            cut = (1, 4, 5, 6, 7, len(frame) // 2, len(frame) - 1, 2, 3, 11)[i]
            sock.sendall(frame[:cut])
            time.sleep(0.02)
            sock.sendall(frame[cut:])
        for frame in frames[20:30]:                                      # garbage in between
            sock.sendall(b"\x00\x01garbage HEP" + frame + b"HEP3\x00\x01")
        sock.sendall(b"".join(frames[30:]))                              # and afterwards all is well
        time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        one = hep3(sip("byte-by-byte"))
        for byte in one:
            sock.send(bytes([byte]))
    assert server.stop() == 0
    call_ids = [r["call_id"] for r in stored_rows(tmp_path / "data")]
    assert sorted(call_ids) == sorted([f"tcp-{i}" for i in range(40)] + ["byte-by-byte"])
    assert server.counters()["tcp_garbage_bytes_total"] == 10 * (len(b"\x00\x01garbage HEP") + 6)


def test_many_tcp_agents_at_once_each_kept_open(servers, tmp_path):
    server = servers()
    agents = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(200)]
    for round_ in range(3):
        for n, agent in enumerate(agents):
            agent.sendall(hep3(sip(f"agent{n}-{round_}")))
        time.sleep(0.3)
    assert {r["call_id"] for r in stored_rows(tmp_path / "data", columns="time, call_id", running=True)} == {
        f"agent{n}-{r}" for n in range(200) for r in range(3)}                 # seen while still open
    assert server.stop() == 0
    for agent in agents:
        agent.close()


def test_a_flood_of_malformed_packets_is_counted_and_good_ones_still_stored(servers, tmp_path):
    server = servers()
    rng = random.Random(7)
    seeds = [hep3(sip(f"seed{i}")) for i in range(3)] + fixture_packets("kamailio/hep2")[:2]
    sent = list(mutations(rng, seeds, 100_000))
    server.udp(sent, pace_every=200)
    time.sleep(0.5)
    server.udp([hep3(sip("after-the-flood"))])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
            r["call_id"] == "after-the-flood" for r in stored_rows(tmp_path / "data", columns="time, call_id", running=True)):
        time.sleep(0.1)
    assert server.process.poll() is None
    assert server.stop() == 0
    counters = server.counters()
    received = sum(v for k, v in counters.items() if k.startswith("hep_received_total"))
    dropped = sum(v for k, v in counters.items() if k.startswith("hep_dropped_total"))
    malformed = sum(v for k, v in counters.items() if k.startswith('hep_dropped_total{reason="malformed_'))
    stored = sum(len(stored_rows(tmp_path / "data", t, "time")) for t in range(256)
                 if (tmp_path / f"data/test/dbs/hep-0/hep_{t}-0").exists())
    assert received >= 0.95 * (len(sent) + 1), (received, len(sent))
    assert malformed > 30_000
    assert stored + dropped == received                       # every packet: stored, or counted dropped
    assert any("malformed HEP" in line for line in server.lines)
    assert sum("malformed HEP" in line for line in server.lines) < 200          # rate-limited


def test_a_malformed_datagram_is_logged_with_the_agent_that_sent_it(servers, tmp_path):
    server = servers()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as good, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bad:
        good.bind(("127.0.0.1", 0))
        bad.bind(("127.0.0.1", 0))
        for i in range(200):                 # one batch: the writer finds the peer among the batch's senders
            good.sendto(hep3(sip(f"g{i}")), ("127.0.0.1", server.port))
            if i in (50, 150):
                bad.sendto(b"GET / HTTP/1.1\r\n\r\n", ("127.0.0.1", server.port))
        good_port, bad_port = good.getsockname()[1], bad.getsockname()[1]
    assert server.stop() == 0
    logged = [line for line in server.lines if "malformed HEP" in line]
    assert len(logged) == 2 and all(f"'127.0.0.1', {bad_port})" in line for line in logged)
    assert not any(str(good_port) in line for line in logged)
    assert len(stored_rows(tmp_path / "data", columns="time")) == 200


def test_sigterm_flushes_every_packet_received(servers, tmp_path):
    server = servers(FLUSH_INTERVAL_S="30")
    server.udp([hep3(sip(f"u{i}")) for i in range(3000)], pace_every=500)
    server.tcp(b"".join(hep3(sip(f"t{i}")) for i in range(2000)))
    assert server.stop() == 0
    call_ids = [r["call_id"] for r in stored_rows(tmp_path / "data", columns="time, call_id")]
    assert len(call_ids) == 5000 and len(set(call_ids)) == 5000


def test_sigterm_reads_what_an_open_tcp_connection_has_in_flight(servers, tmp_path):
    """The agent keeps its connection open; SIGTERM comes the moment its last send returned, with
    megabytes still in the kernel's buffers on both sides."""
    server = servers(FLUSH_INTERVAL_S="30")
    frames = [hep3(sip(f"flight{i}")) for i in range(40_000)]
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"".join(frames))
        assert server.stop() == 0
    call_ids = [r["call_id"] for r in stored_rows(tmp_path / "data", columns="time, call_id")]
    assert len(call_ids) == 40_000 and len(set(call_ids)) == 40_000


def test_kill_9_during_a_stream_loses_nothing_written_and_doubles_nothing(servers, tmp_path):
    server = servers(FLUSH_INTERVAL_S="0.05", FLUSH_ROWS="50")
    stop = threading.Event()
    sent = []

    def stream():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            while not stop.is_set():
                sock.sendto(hep3(sip(f"crash-{len(sent)}")), ("127.0.0.1", server.port))
                sent.append(1)
                time.sleep(0.0002)

    sender = threading.Thread(target=stream)
    sender.start()
    time.sleep(1.5)
    server.process.kill()                   # kill -9 while files are being written
    server.process.wait()
    stop.set()
    sender.join()
    # A kill between a file's rename and its listing leaves it unlisted: the restart adopts it.
    before = stored_rows(tmp_path / "data", columns="time, call_id", running=True)
    restarted = servers(PORT=server.port)
    restarted.udp([hep3(sip(f"after-{i}")) for i in range(100)])
    assert restarted.stop() == 0
    rows = stored_rows(tmp_path / "data", columns="time, call_id")   # checks metadata == files on disk
    call_ids = [r["call_id"] for r in rows]
    assert len(call_ids) == len(set(call_ids))                         # no row twice
    assert {c for c in call_ids if c.startswith("after-")} == {f"after-{i}" for i in range(100)}
    assert {r["call_id"] for r in before} <= set(call_ids)
    assert len(before) > 100 and len(call_ids) <= len(sent) + 100
    for path in (tmp_path / "data").rglob("*"):
        assert not path.name.endswith(".tmp")
        if path.suffix == ".parquet":
            pq.read_table(path)                                        # every file reads


def test_auth_key_keeps_only_packets_with_the_right_key(servers, tmp_path):
    server = servers(HEP_AUTH_KEY="s3cret")
    server.udp(fixture_packets("kamailio/hep3auth"))                  # Kamailio's auth_key "s3cret"
    server.udp(fixture_packets("kamailio/hep3"))                      # no key
    server.udp([hep3(sip("wrong-key"), extra=chunk(14, b"s3creT")), hep3(sip("right-key"), extra=chunk(14, b"s3cret"))])
    server.udp(fixture_packets("kamailio/hep2"))                      # v2 cannot carry a key
    assert server.stop() == 0
    rows = stored_rows(tmp_path / "data", columns="time, call_id")
    assert len(rows) == 13 and "right-key" in {r["call_id"] for r in rows}
    assert server.counters()['hep_dropped_total{reason="auth"}'] == 12 + 1 + 12
    for path in (tmp_path / "data").rglob("*"):
        if path.is_file():
            assert b"s3cret" not in path.read_bytes(), path


def test_missing_and_absurd_capture_times_get_the_arrival_time(servers, tmp_path):
    server = servers()
    before = time.time()
    future = int(time.time()) + 3 * 86400
    server.udp([hep3(sip("no-time"), seconds=False), hep3(sip("in-1990"), seconds=631_152_000),
                hep3(sip("future"), seconds=future), hep3(sip("fine"), seconds=1_790_000_000, useconds=250)])
    assert server.stop() == 0
    after = time.time()
    times = {r["call_id"]: r["time"].timestamp() for r in stored_rows(tmp_path / "data", columns="time, call_id")}
    for call_id in ("no-time", "in-1990", "future"):
        assert before - 1 <= times[call_id] <= after + 1, call_id
    assert times["fine"] == 1_790_000_000.00025
    counters = server.counters()
    assert counters['hep_time_replaced_total{why="absurd"}'] == 2
    assert counters['hep_time_replaced_total{why="missing"}'] == 1


def test_rows_reach_disk_within_the_flush_interval(servers, tmp_path):
    server = servers(FLUSH_INTERVAL_S="1.0")
    server.udp([hep3(sip("fresh"))])
    started = time.monotonic()
    while not stored_rows(tmp_path / "data", columns="time", running=True):
        assert time.monotonic() - started < 3, "not on disk after 3 s"
        time.sleep(0.05)
    assert server.stop() == 0


def test_types_go_to_their_own_tables_and_ipv6_listener_takes_ipv4_too(servers, tmp_path):
    server = servers(HOST="::")
    server.udp([hep3(b'{"type":"rtcp"}', proto_type=5), hep3(b"log line", proto_type=100),
                hep3(b"dns", proto_type=53), hep3(sip("v6"), src="2001:db8::1", dst="2001:db8::2")], host="::1")
    server.udp([hep3(sip("v4"))], host="127.0.0.1")
    assert server.stop() == 0
    data = tmp_path / "data"
    assert [d.name for d in type_dirs(data)] == ["hep_1-0", "hep_100-0", "hep_5-0", "hep_53-0"]
    assert [r["payload"] for r in stored_rows(data, 100)] == ["log line"]
    assert [r["payload"] for r in stored_rows(data, 5)] == ['{"type":"rtcp"}']
    assert "sip_method" not in stored_rows(data, 5)[0]
    v6 = [r for r in stored_rows(data, 1) if r["call_id"] == "v6"][0]
    assert (v6["src_ip"], v6["dst_ip"], v6["ip_family"]) == ("2001:db8::1", "2001:db8::2", 10)


def test_buffer_full_drops_are_counted_never_silent(servers, tmp_path):
    server = servers(MAX_PENDING_BYTES="1000", FLUSH_INTERVAL_S="30")
    small = [hep3(sip(f"s{i}")[:120]) for i in range(20)]          # a few fit in MAX_PENDING_BYTES
    large = [hep3(sip(f"l{i}") + b"x" * 1000) for i in range(20)]  # never fit
    server.udp([packet for pair in zip(small, large) for packet in pair])
    assert server.stop() == 0
    stored = stored_rows(tmp_path / "data", columns="payload")
    counters = server.counters()
    small_payloads = {hepop.decode(p).payload.decode() for p in small}
    assert stored and all(row["payload"] in small_payloads for row in stored)
    assert counters['hep_dropped_total{reason="buffer_full"}'] == 40 - len(stored)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_full_buffers_pause_reading_instead_of_dropping(servers, tmp_path, transport):
    """A burst four times MAX_PENDING_BYTES: the loop stops reading while the writer makes room (datagrams
    wait in the kernel's buffer, the TCP agent is held back), and shutdown waits for room too, so the
    whole burst is stored and nothing is dropped.  The kernel's buffer must hold the burst while reading
    waits: 20,000 datagrams take over 32 MiB of it (about 2 KiB of accounting each), and at the default
    RCVBUF_BYTES the kernel dropped one now and then."""
    server = servers(MAX_PENDING_BYTES="1M", RCVBUF_BYTES="128M")
    packets = [hep3(sip(f"burst{i}")) for i in range(20_000)]
    assert sum(map(len, packets)) > 4 * (1 << 20)
    if transport == "udp":
        server.udp(packets)
    else:
        server.tcp(b"".join(packets))
    assert server.stop() == 0
    counters = server.counters()
    assert len(stored_rows(tmp_path / "data", columns="time")) == len(packets)
    assert not any(v for key, v in counters.items() if key.startswith("hep_dropped_total"))
    assert counters["reading_paused_total"] >= 1


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_messages_with_the_bytes_of_a_compressed_chunk_header_are_charged_what_they_take(servers, tmp_path,
                                                                                        transport):
    """A message is charged MAX_INFLATED_BYTES more only when it holds a compressed payload (chunk 16),
    not whenever the four bytes 00 00 00 10 occur in it: capture ID 16 holds them, and so does a capture
    time whose microseconds are 16 (one message in a million, one a minute at 20,000/s).  Charged 1 MiB
    each, those overflowed MAX_PENDING_BYTES: UDP dropped them as buffer_full, and a TCP agent was held
    back for room that never came, its stream lost at shutdown (the TCP burst test failed one run in 30)."""
    server = servers(MAX_PENDING_BYTES="1M")
    packets = [hep3(sip(f"id16-{i}"), capture_id=16) for i in range(300)]
    packets += [hep3(sip(f"usec16-{i}"), useconds=16, seconds=int(time.time())) for i in range(300)]
    assert all(hepop.COMPRESSED_CHUNK in data for data in packets)
    if transport == "udp":
        server.udp(packets, pace_every=50)
    else:
        server.tcp(b"".join(packets))
    assert server.stop() == 0
    counters = server.counters()
    assert len(stored_rows(tmp_path / "data", columns="time")) == len(packets)
    assert not any(v for key, v in counters.items() if key.startswith("hep_dropped_total"))


def test_a_tcp_frame_charged_more_than_the_buffers_hold_is_not_held_back_for_good(servers, tmp_path):
    """A compressed frame is charged MAX_INFLATED_BYTES (1 MiB) more until it is decoded, so at
    MAX_PENDING_BYTES=1M it never fits.  It is decoded at once, like any frame not of the common layout,
    and stored at what it inflates to, with the frames behind it; held back for room instead, the agent
    was never read again and everything it sent from that frame on was lost."""
    server = servers(MAX_PENDING_BYTES="1M")
    before = [hep3(sip(f"before{i}")) for i in range(100)]
    after = [hep3(sip(f"after{i}")) for i in range(100)]
    compressed = hep3(zlib.compress(sip("compressed")), payload_chunk=16)
    server.tcp(b"".join(before + [compressed] + after))
    assert server.stop() == 0
    counters = server.counters()
    call_ids = {row["call_id"] for row in stored_rows(tmp_path / "data", columns="call_id")}
    assert call_ids == {f"before{i}" for i in range(100)} | {"compressed"} | {f"after{i}" for i in range(100)}
    assert not any(v for key, v in counters.items() if key.startswith("hep_dropped_total"))


# ---------------------------------------------------------------------------------------------------------
# Real third-party senders
# ---------------------------------------------------------------------------------------------------------

def need(tool: str, found: bool):
    if not found:
        message = f"{tool} is not installed (bash .ci/run installs it)"
        if os.environ.get("HEPOP_REQUIRE_SENDERS") == "1":
            pytest.fail(message)
        pytest.skip(message)


def hep_js_dir() -> str | None:
    for base in (HERE, Path.cwd()):
        if (base / "node_modules/hep-js/index.js").exists():
            return str(base / "node_modules")
    return None


HEP_JS_SENDER = r"""
const hep = require('hep-js'); const dgram = require('dgram'); const net = require('net');
const [transport, port, count] = [process.argv[2], +process.argv[3], +process.argv[4]];
const now = Date.now();
const messages = [];
for (let i = 0; i < count; i++) {
  const payload = `INVITE sip:bob@127.0.0.1 SIP/2.0\r\nCall-ID: hepjs-${transport}-${i}\r\nFrom: <sip:alice@127.0.0.1>;tag=1\r\nTo: <sip:bob@127.0.0.1>\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n`;
  messages.push(hep.encapsulate(payload, {protocolFamily: 2, protocol: 17, srcIp: '192.168.1.10', dstIp: '10.1.2.3',
    srcPort: 5070 + i, dstPort: 5060, timeSeconds: Math.floor(now / 1000), timeUseconds: (now % 1000) * 1000 + i,
    payloadType: 1, captureId: 2001, hepNodeName: 'hepjs-node', capturePass: 'myHep',
    correlation_id: `corr-${i}`}));
}
if (transport === 'udp') {
  const sock = dgram.createSocket('udp4'); let left = messages.length;
  for (const m of messages) sock.send(m, port, '127.0.0.1', () => { if (--left === 0) sock.close(); });
} else {
  const sock = net.connect(port, '127.0.0.1', () => { sock.end(Buffer.concat(messages)); });
}
"""


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_hep_js_sender_end_to_end(servers, tmp_path, transport):
    modules = hep_js_dir()
    need("node with the npm package hep-js", shutil.which("node") is not None and modules is not None)
    server = servers()
    script = tmp_path / "send.js"
    script.write_text(HEP_JS_SENDER)
    subprocess.run(["node", str(script), transport, str(server.port), "25"], check=True, timeout=30,
                   env={**os.environ, "NODE_PATH": modules})
    time.sleep(0.3)
    assert server.stop() == 0
    rows = stored_rows(tmp_path / "data")
    assert [r["call_id"] for r in rows] == [f"hepjs-{transport}-{i}" for i in range(25)]
    for i, row in enumerate(rows):
        assert (row["src_ip"], row["dst_ip"], row["src_port"], row["dst_port"]) == ("192.168.1.10", "10.1.2.3", 5070 + i, 5060)
        assert (row["node_name"], row["correlation_id"], row["capture_id"]) == ("hepjs-node", f"corr-{i}", 2001)
        assert (row["sip_method"], row["from_user"], row["to_user"]) == ("INVITE", "alice", "bob")
    counters = server.counters()
    assert counters[f'hep_received_total{{transport="{transport}",version="3"}}'] == 25


# Kamailio's own settings for the test; what it needs to send HEP to hepop is the README's block.
KAMAILIO_CFG = """#!KAMAILIO
debug=2
log_stderror=yes
children=1
auto_aliases=no
{listen}
{tcp}
loadmodule "pv.so"
{siptrace}
{auth}
request_route {{
    {hlog}
    $du = "sip:{forward}";
    forward();
    exit;
}}
"""


def readme_kamailio_block(transport: str) -> str:
    """The README's Kamailio configuration for HEP over UDP or TCP, as written there."""
    blocks = re.findall(r"```cfg\n(.*?)```", (HERE / "README.md").read_text(), re.S)
    return next(block for block in blocks if block.startswith(f"# Kamailio, HEP over {transport} to hepop"))


def kamailio_siptrace(transport: str, hep_port: int, hep_version: int) -> str:
    """The README's block with this test's addresses, ports and HEP version put in, and nothing else."""
    block = readme_kamailio_block(transport)
    filled = block.replace("CAPTURE_HOST:9069", f"127.0.0.1:{hep_port}").replace(
        '"hep_version", 3', f'"hep_version", {hep_version}').replace(
        "listen=tcp:KAMAILIO_IP:5060", f"listen=tcp:127.0.0.1:{free_port()}")
    settings = "\n".join(line for line in filled.splitlines() if not line.startswith("#"))
    assert filled.count("\n") == block.count("\n") and "CAPTURE_HOST" not in settings and "KAMAILIO_IP" not in settings
    return filled


def free_udp_port(host="127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_udp_bound(host: str, port: int, process, timeout=15):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "kamailio exited"
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing bound {host}:{port}")


def kamailio_calls(tmp_path: Path, hep_port: int, *, hep_version=3, tcp=False, ipv6=False, auth_key=None,
                   hlog=False, calls=1, scenarios: tuple[str, str] | None = None):
    """Kamailio traces SIPp calls as HEP to hepop: SIPp's own answered call (12 SIP messages), or the UAC
    and UAS `scenarios` (SIPp XML) given."""
    need("kamailio and sipp", bool(shutil.which("kamailio") and shutil.which("sipp")))
    host = "::1" if ipv6 else "127.0.0.1"
    bracketed = f"[{host}]" if ipv6 else host
    kam_port, uas_port, uac_port = free_udp_port(host), free_udp_port(host), free_udp_port(host)
    run_dir = tmp_path / f"kamailio-{kam_port}"
    run_dir.mkdir()
    cfg = run_dir / "kamailio.cfg"
    listen = f"listen=udp:{bracketed}:{kam_port}"
    if ipv6:                                   # HEP still goes to hepop over IPv4: it needs a socket there
        listen += f"\nlisten=udp:127.0.0.1:{free_udp_port()}"
    cfg.write_text(KAMAILIO_CFG.format(
        listen=listen, tcp="" if tcp else "disable_tcp=yes",
        siptrace=kamailio_siptrace("TCP" if tcp else "UDP", hep_port, hep_version),
        auth=f'modparam("siptrace", "auth_key", "{auth_key}")' if auth_key else "",
        hlog='hlog("$ci", "forwarding $rm from $si:$sp");' if hlog else "",
        forward=f"{bracketed}:{uas_port}"))
    log_file = open(run_dir / "kamailio.log", "w")
    kamailio = subprocess.Popen(["kamailio", "-f", str(cfg), "-Y", str(run_dir), "-P", str(run_dir / "kam.pid"),
                                 "-DD", "-E", "-m", "64", "-M", "8"], stdout=log_file, stderr=subprocess.STDOUT)
    sipp_common = ["-i", host, "-mi", host, "-ci", "127.0.0.1", "-nostdin", "-trace_err",      # control: IPv4 only
                   "-error_file", str(run_dir / "sipp-{}.err")]
    uas = None
    try:
        wait_udp_bound(host, kam_port, kamailio)
        uac_scenario, uas_scenario = ["-sn", "uac"], ["-sn", "uas"]
        if scenarios:
            for side, xml in zip(("uac", "uas"), scenarios):
                (run_dir / f"{side}.xml").write_text(xml)
            uac_scenario, uas_scenario = ["-sf", "uac.xml"], ["-sf", "uas.xml"]
        uas_args = [a.format("uas") for a in sipp_common]
        uas = subprocess.Popen(["sipp", *uas_scenario, "-p", str(uas_port), "-cp", str(free_udp_port()),
                                "-mp", str(free_udp_port()), *uas_args], cwd=run_dir,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_udp_bound(host, uas_port, uas)
        uac_args = [a.format("uac") for a in sipp_common]
        subprocess.run(["sipp", *uac_scenario, "-p", str(uac_port), "-cp", str(free_udp_port()), "-mp",
                        str(free_udp_port()), "-m", str(calls), "-r", "50", *uac_args, f"{bracketed}:{kam_port}"],
                       cwd=run_dir, check=True, timeout=60, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
    finally:
        for process in (uas, kamailio):
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        log_file.close()


@pytest.mark.parametrize("hep_version,tcp,ipv6", [
    (3, False, False), (3, True, False), (2, False, False), (1, False, False), (3, False, True), (2, False, True)],
    ids=["hep3-udp", "hep3-tcp", "hep2-udp", "hep1-udp", "hep3-ipv6", "hep2-ipv6"])
def test_kamailio_and_sipp_calls_are_stored(servers, tmp_path, hep_version, tcp, ipv6):
    server = servers()
    kamailio_calls(tmp_path, server.port, hep_version=hep_version, tcp=tcp, ipv6=ipv6, calls=2)
    assert server.stop() == 0
    rows = stored_rows(tmp_path / "data")
    assert len(rows) == 24, [r["payload"][:30] for r in rows]
    assert len({r["call_id"] for r in rows}) == 2
    calls = {}
    for row in rows:
        calls.setdefault(row["call_id"], []).append(row["sip_method"] or str(row["sip_status"]))
    for sequence in calls.values():
        assert sorted(sequence) == sorted(["INVITE", "180", "200", "ACK", "BYE", "200"] * 2)
    address = "::1" if ipv6 else "127.0.0.1"
    assert {r["src_ip"] for r in rows} == {address} and {r["ip_family"] for r in rows} == {10 if ipv6 else 2}
    assert {r["capture_id"] for r in rows} == ({0} if hep_version == 1 else {2001})
    assert all(r["payload"].endswith("\r\n") and r["payload_raw"] is None for r in rows)
    if hep_version == 2:
        # v2's little-endian time block read right: within seconds of now.
        assert all(abs(r["time"].timestamp() - time.time()) < 120 for r in rows)
    counters = server.counters()
    key = f'hep_received_total{{transport="{"tcp" if tcp else "udp"}",version="{hep_version}"}}'
    assert counters[key] == 24
    assert not any(v for k, v in counters.items() if k.startswith("hep_dropped_total"))


def test_kamailio_auth_key_right_and_wrong(servers, tmp_path):
    server = servers(HEP_AUTH_KEY="s3cret")
    kamailio_calls(tmp_path, server.port, auth_key="s3cret")
    kamailio_calls(tmp_path, server.port, auth_key="wrong")
    assert server.stop() == 0
    assert len(stored_rows(tmp_path / "data", columns="time")) == 12
    assert server.counters()['hep_dropped_total{reason="auth"}'] == 12


def test_kamailio_type_100_logs_land_in_hep_100(servers, tmp_path):
    server = servers()
    kamailio_calls(tmp_path, server.port, hlog=True)
    assert server.stop() == 0
    sip_rows = stored_rows(tmp_path / "data", 1)
    logs = stored_rows(tmp_path / "data", 100)
    assert len(sip_rows) == 12 and len(logs) == 3
    call_id = sip_rows[0]["call_id"]
    assert {r["correlation_id"] for r in logs} == {call_id}
    assert sorted(re.search(r"forwarding (\w+) from", r["payload"]).group(1) for r in logs) == ["ACK", "BYE", "INVITE"]
    assert "sip_method" not in logs[0]


# ---------------------------------------------------------------------------------------------------------
# Compaction, retention and crash safety
# ---------------------------------------------------------------------------------------------------------

HOUR = 1_795_000_200 - 600           # 2026-11-18 11:00:00 UTC


def open_store(root: Path, delete_grace_s=0.0, **env) -> tuple[hepop.Storage, hepop.Compactor]:
    """A writer's storage and compactor, in this process.  Unlisted files are deleted at once, not after
    FileLeases.DELETE_GRACE_S, unless a test asks for the grace: those of compaction check the tree."""
    config = hepop.Config.load([], {"PARQUET_DIR": str(root), "WRITER_ID": "w", "COMPACT_GRACE_S": "60",
                                    "MAX_DISK_PERCENT": "0", **env})
    storage = hepop.Storage(str(root), "w")
    storage.leases.DELETE_GRACE_S = delete_grace_s
    return storage, hepop.Compactor(config, storage, hepop.Counters())


def sip_table(times_s: list[float], tag: str, proto_type=1) -> pa.Table:
    """Rows with distinct, varied contents (non-UTF-8 bytes included) at the given capture times."""
    packets, times = [], []
    for i, t in enumerate(times_s):
        payload = sip(f"{tag}-{i}", method=("INVITE", "BYE", "OPTIONS")[i % 3]) + (b"\xff\xfe" if i % 7 == 0 else b"")
        packets.append(hepop.decode(hep3(payload, src=f"10.0.{i % 250}.1", sport=1024 + i, proto_type=proto_type,
                                         extra=chunk(17, f"corr-{i}".encode()) if i % 2 else b"")))
        times.append(int(t * 1e6))
    return build_table(proto_type, times, packets)


def rows_of(store: hepop.TypeStore) -> list[dict]:
    """Every row of the files metadata.json lists, which must be exactly the files on disk."""
    type_dir = Path(store.file_store.reader_path(store.dir_key))
    assert listed_files(type_dir) == parquet_on_disk(Path(store.layout.root), type_dir)
    assert not list(type_dir.rglob("*.tmp"))
    rows = []
    for path in sorted(listed_files(type_dir)):
        rows += pq.read_table(Path(store.layout.root) / path).to_pylist()
    return rows


def canonical(rows: list[dict]) -> list[str]:
    return sorted(repr(sorted(row.items())) for row in rows)


def test_compaction_merges_a_closed_hour_into_one_sorted_file_with_exactly_the_same_rows(tmp_path):
    storage, compactor = open_store(tmp_path)
    store = storage.store(1)
    rng = random.Random(5)
    for batch in range(6):
        store.write(sip_table([HOUR + rng.uniform(0, 3599.999) for _ in range(300)], f"b{batch}"))
    store.write(sip_table([HOUR + 3600 + 5], "next-hour"))          # the next hour: not closed yet
    before = rows_of(store)
    compactor.run_once(now_us=(HOUR + 3600 + 61) * 1_000_000)
    files = store.snapshot()
    assert [(f["type"], f["range"], f["row_count"]) for f in files] == [("raw", "10m", 1), ("compacted", "1h", 1800)]
    compacted = files[1]
    assert re.fullmatch(r"w/dbs/hep-0/hep_1-0/2026-11-18/11-00/c_\d{10}\.parquet", compacted["path"])
    assert compacted["chunk_time"] == HOUR * 10**9
    compactor.run_once(now_us=(HOUR + 3600 + 62) * 1_000_000)      # the inputs go on the next pass
    after = rows_of(store)
    assert canonical(after) == canonical(before)
    table = pq.read_table(store.path(compacted))
    times = table.column("time").to_pylist()
    assert times == sorted(times)
    assert pq.read_schema(store.path(compacted)).remove_metadata() == store.schema
    meta = pq.ParquetFile(store.path(compacted)).metadata
    stats = meta.row_group(0).column(0).statistics
    assert stats.has_min_max and stats.min == times[0] and meta.row_group(0).column(0).compression == "ZSTD"
    assert [p.name for p in (tmp_path / "w/dbs/hep-0/hep_1-0/2026-11-18").iterdir()] == ["11-00", "12-00"] or \
        sorted(p.name for p in (tmp_path / "w/dbs/hep-0/hep_1-0/2026-11-18").iterdir()) == ["11-00", "12-00"]
    compactor.close()


def merged_hour(tmp_path: Path, files: int, rows_per_file: int, tag: str) -> Path:
    """`files` raw files of an hour, 10 minutes apart, merged by HourMerger in 1 MiB row groups."""
    paths = []
    for n in range(files):
        path = tmp_path / f"in-{n}.parquet"
        pq.write_table(sip_table([HOUR + n * 600 + i * 0.05 for i in range(rows_per_file)], f"{tag}{n}"), path)
        paths.append(str(path))
    out = tmp_path / "c.parquet"
    with open(out, "wb") as sink:
        hepop.HourMerger(16, str(tmp_path / "spill")).merge(sink, hepop.table_schema(1), paths)
    return out


def test_a_compacted_hour_is_written_in_row_groups_of_one_size_not_each_with_a_sliver(tmp_path):
    """Each row group was written as a full one and the few rows over it as another (about 19,900 and 80
    rows at a busy site): twice the row groups, and a footer twice as large, for every query to read."""
    out = merged_hour(tmp_path, files=4, rows_per_file=6000, tag="f")
    meta = pq.ParquetFile(out).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sum(sizes) == 24_000 and len(sizes) > 4
    assert max(sizes[:-1]) - min(sizes[:-1]) <= max(sizes[:-1]) // 10, sizes     # the last holds what is left
    assert pq.read_table(out).column("time").to_pylist() == sorted(pq.read_table(out).column("time").to_pylist())


def bloom_filters_exclude_what_is_absent(path: Path, tag: str) -> None:
    """DuckDB skips a row group whose bloom filter excludes a searched Call-ID or user; min/max statistics
    cannot exclude a value that lies between others."""
    groups = pq.ParquetFile(path).metadata.num_row_groups
    probe = lambda column, value: [excluded for _, _, excluded in duckdb.execute(
        "SELECT * FROM parquet_bloom_probe($file, $column, $value)", {"file": str(path), "column": column,
                                                                       "value": value}).fetchall()]
    for column, present, absent in [("call_id", f"{tag}0-7", f"{tag}0-7x"), ("from_user", "alice", "alicf"),
                                    ("to_user", "bob", "boa"), ("ruri_user", "bob", "boa")]:
        assert len(probe(column, absent)) == groups, column
        assert all(probe(column, absent)) and not all(probe(column, present)), column


def test_a_compacted_hour_has_bloom_filters_for_the_call_and_its_users(tmp_path):
    out = merged_hour(tmp_path, files=2, rows_per_file=3000, tag="b")
    assert pq.ParquetFile(out).metadata.num_row_groups > 1
    bloom_filters_exclude_what_is_absent(out, "b")


def test_raw_files_and_a_merged_folder_have_bloom_filters_too(tmp_path):
    """A Call-ID over the 600 raw files of 10 minutes at 20,000 messages/s: 515 ms without, 85 ms with."""
    storage, compactor = open_store(tmp_path)
    store = storage.store(1)
    entries = store.write(sip_table([HOUR + i * 0.01 for i in range(2000)], "r0"))
    bloom_filters_exclude_what_is_absent(Path(store.path(entries[0])), "r")
    merged = tmp_path / "folder.parquet"
    hepop.merge_folder([store.path(entries[0])], hepop.table_schema(1), str(merged))
    bloom_filters_exclude_what_is_absent(merged, "r")
    compactor.close()


def test_queries_parse_a_files_footer_once_not_each_time(tmp_path):
    """The query process keeps footers and bloom filters in DuckDB's object cache (inside its memory
    limit): a Call-ID over a compacted hour of 72 M rows took 303 ms without it and 110 ms with it."""
    out = merged_hour(tmp_path, files=2, rows_per_file=3000, tag="m")
    engine = hepop.QueryEngine(hepop.Config.load([], {"PARQUET_DIR": str(tmp_path), "WRITER_ID": "w"}))
    cached = lambda: engine.db.execute("SELECT coalesce(sum(memory_usage_bytes), 0) FROM duckdb_memory() "
                                       "WHERE tag = 'OBJECT_CACHE'").fetchone()[0]
    before = cached()
    assert engine.db.execute("SELECT count(*) FROM read_parquet($file) WHERE call_id = 'm0-7'",
                             {"file": str(out)}).fetchone()[0] == 1
    assert cached() - before >= pq.read_metadata(out).serialized_size


def test_closed_folders_of_the_current_hour_are_merged_each_into_one_file(tmp_path):
    """At 20,000 messages/s an hour is 3,600 raw files, each opened by every query over it (a Call-ID over
    an hour of them took 3.5 s): a closed 10-minute folder becomes one m_ file, with exactly its rows,
    long before its hour is compacted; late packets are merged in at the next pass; then the hour's."""
    storage, compactor = open_store(tmp_path)
    store = storage.store(1)
    for folder in range(4):
        for batch in range(3):
            store.write(sip_table([HOUR + folder * 600 + batch * 100 + i for i in range(50)], f"f{folder}b{batch}"))
    store.write(sip_table([HOUR + 3599], "lone"))                  # one raw file: nothing to merge
    before = rows_of(store)
    kinds = lambda: sorted((f["path"].split("/")[-2], f["path"].split("/")[-1][:2], f["range"], f["row_count"])
                           for f in store.snapshot())
    compactor.run_once(now_us=(HOUR + 1800 + 60) * 1_000_000)      # folders 00, 10, 20 ended a grace ago
    compactor.run_once(now_us=(HOUR + 1800 + 61) * 1_000_000)      # the inputs go on the next pass
    assert kinds() == [("11-00", "m_", "10m", 150), ("11-10", "m_", "10m", 150), ("11-20", "m_", "10m", 150)] + \
        [("11-30", "00", "10m", 50)] * 3 + [("11-50", "00", "10m", 1)]
    assert all(f["type"] == "compacted" for f in store.snapshot() if "/m_" in f["path"])
    assert canonical(rows_of(store)) == canonical(before)
    merged = store.path(next(f for f in store.snapshot() if "11-10/m_" in f["path"]))
    bloom_filters_exclude_what_is_absent(Path(merged), "f1b")
    store.write(sip_table([HOUR + 700], "late"))                   # a late packet in a merged folder
    compactor.run_once(now_us=(HOUR + 1800 + 120) * 1_000_000)
    compactor.run_once(now_us=(HOUR + 1800 + 121) * 1_000_000)
    assert [k for k in kinds() if k[0] == "11-10"] == [("11-10", "m_", "10m", 151)]
    compactor.run_once(now_us=(HOUR + 3600 + 61) * 1_000_000)      # the hour closes: one sorted file
    compactor.run_once(now_us=(HOUR + 3600 + 62) * 1_000_000)
    assert kinds() == [("11-00", "c_", "1h", 602)]
    times = pq.read_table(store.path(store.snapshot()[0])).column("time").to_pylist()
    assert times == sorted(times)
    assert canonical(rows_of(store)) == canonical(before + [r for r in rows_of(store) if r["call_id"] == "late-0"])
    compactor.close()
    storage.close()
    recovered = hepop.Storage(str(tmp_path), "w")                  # and the restart finds nothing amiss
    assert [f["range"] for f in recovered.store(1).snapshot()] == ["1h"]
    recovered.close()


def test_an_hour_with_a_file_without_statistics_is_compacted(tmp_path):
    """A raw file written without min/max statistics (by another tool) is read for its time range: the
    hour is compacted with every row once, instead of the compaction process failing on every pass."""
    storage, compactor = open_store(tmp_path)
    store = storage.store(1)
    for batch in range(3):
        store.write(sip_table([HOUR + 600 * batch + i for i in range(200)], f"s{batch}"))
    bare = store.path(store.snapshot()[1])
    pq.write_table(pq.read_table(bare), bare, write_statistics=False)
    assert pq.read_metadata(bare).row_group(0).column(0).statistics is None
    before = rows_of(store)
    compactor.run_once(now_us=(HOUR + 3600 + 61) * 1_000_000)
    compactor.run_once(now_us=(HOUR + 3600 + 62) * 1_000_000)
    assert [(f["type"], f["row_count"]) for f in store.snapshot()] == [("compacted", 600)]
    assert canonical(rows_of(store)) == canonical(before)
    compactor.close()


def test_row_groups_are_sized_by_bytes(tmp_path):
    storage, compactor = open_store(tmp_path, COMPACT_MEMORY_MB="8")        # 1 MiB row groups
    store = storage.store(1)
    big = b"X" * 20_000
    packets = [hepop.decode(hep3(big + str(i).encode())) for i in range(300)]
    store.write(build_table(1, [int((HOUR + i) * 1e6) for i in range(300)], packets))
    store.write(sip_table([HOUR + 1000], "small"))
    compactor.run_once(now_us=(HOUR + 7200) * 1_000_000)
    meta = pq.ParquetFile(store.path(store.snapshot()[0])).metadata
    assert meta.num_rows == 301 and meta.num_row_groups >= 4
    compactor.close()


CRASH_SCRIPT = r"""
import os, sys
sys.path.insert(0, sys.argv[4])
import hepop
root, step, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = hepop.Config.load([], {"PARQUET_DIR": root, "WRITER_ID": "w", "COMPACT_GRACE_S": "60", "MAX_DISK_PERCENT": "0"})
storage = hepop.Storage(root, "w")
storage.leases.DELETE_GRACE_S = 0
compactor = hepop.Compactor(config, storage, hepop.Counters())
real_replace, real_remove, real_delete = os.replace, os.remove, hepop.FileLeases.delete_when_free
removed = 0
def replace(src, dst):
    compacted = os.path.basename(dst).startswith("c_")
    if step == "output_written" and compacted:
        os._exit(9)
    real_replace(src, dst)
    if step == "output_renamed" and compacted:
        os._exit(9)
def remove(path):
    global removed
    real_remove(path)
    removed += 1
    if step == "input_deleted" and removed == nth:
        os._exit(9)
def delete_when_free(self, *args):
    if step == "metadata_swapped":          # the swap is in metadata.json, no input deleted yet
        os._exit(9)
    real_delete(self, *args)
os.replace, os.remove, hepop.FileLeases.delete_when_free = replace, remove, delete_when_free
now = (int(sys.argv[5]) + 7200) * 1_000_000
compactor.run_once(now_us=now)
compactor.run_once(now_us=now)
"""


@pytest.mark.parametrize("step,nth", [("output_written", 0), ("output_renamed", 0), ("metadata_swapped", 0),
                                      ("input_deleted", 1), ("input_deleted", 2), ("input_deleted", 3),
                                      ("input_deleted", 4)])
def test_a_compactor_killed_after_any_step_leaves_every_row_once(tmp_path, step, nth):
    storage, compactor = open_store(tmp_path)
    store = storage.store(1)
    store.write(sip_table([HOUR + 10, HOUR + 700], "early"))
    compactor.run_once(now_us=(HOUR + 7200) * 1_000_000)
    compactor.run_once(now_us=(HOUR + 7200) * 1_000_000)                 # one c_ file, inputs gone
    store.write(sip_table([HOUR + 20, HOUR + 1900], "late-a"))           # late packets: raw files again
    store.write(sip_table([HOUR + 3500], "late-b"))
    compactor.close()
    storage.close()                                                      # the crashing process takes the folder
    sent = canonical(rows_of(store))
    assert len(store.snapshot()) == 4                                    # c_ + 3 raw: 4 inputs
    result = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(tmp_path), step, str(nth), str(HERE),
                             str(HOUR)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 9, result.stderr                        # it died where it was told to
    damaged = tmp_path.parent / f"{tmp_path.name}-rebuild"
    shutil.copytree(tmp_path, damaged)
    storage, compactor = open_store(tmp_path)                            # the restart
    assert canonical(rows_of(storage.store(1))) == sent
    compactor.run_once(now_us=(HOUR + 7200) * 1_000_000)                 # and compaction completes
    compactor.run_once(now_us=(HOUR + 7200) * 1_000_000)
    assert [e["type"] for e in storage.store(1).snapshot()] == ["compacted"]
    assert canonical(rows_of(storage.store(1))) == sent
    compactor.close()
    os.remove(damaged / "w/dbs/hep-0/hep_1-0/metadata.json")             # same crash, metadata lost too
    storage, compactor = open_store(damaged)
    assert canonical(rows_of(storage.store(1))) == sent
    compactor.close()


def test_storage_compaction_and_retention_reach_the_files_only_through_their_file_store(tmp_path):
    """The seam that object storage plugs into: with the data's files kept by a FileStore somewhere else
    than PARQUET_DIR, writing, recovery, compaction, set-aside, retention, folder cleanup and the query
    catalog all work there, and no data file, temp file or metadata.json appears under PARQUET_DIR."""
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    config = hepop.Config.load([], {"PARQUET_DIR": str(root), "WRITER_ID": "w", "COMPACT_GRACE_S": "60",
                                    "MAX_DISK_PERCENT": "0", "RETENTION": "7d"})

    def open_it():
        storage = hepop.Storage(str(root), "w", hepop.LocalFileStore(str(elsewhere)))
        storage.leases.DELETE_GRACE_S = 0
        return storage, hepop.Compactor(config, storage, hepop.Counters())

    storage, compactor = open_it()
    store = storage.store(1)
    store.write(sip_table([HOUR + 10, HOUR + 700], "a"))
    store.write(sip_table([HOUR + 1900], "b"))
    store.write(sip_table([HOUR - 8 * 86400], "expired"))
    sent = canonical([row for e in store.snapshot() if e["min_time"] >= HOUR * 10 ** 9 for row in pq.read_table(store.path(e)).to_pylist()])
    compactor.close()
    storage.close()
    type_dir = elsewhere / "w/dbs/hep-0/hep_1-0"
    (type_dir / "2026-11-18/11-10/0000000099.parquet.tmp").write_bytes(b"half")        # a crash's leftovers
    (type_dir / "2026-11-18/11-10/stray.parquet").write_bytes(b"not ours")
    storage, compactor = open_it()                                                       # recovery
    store = storage.store(1)
    assert (elsewhere / "w/set-aside/dbs/hep-0/hep_1-0/2026-11-18/11-10/stray.parquet").exists()
    assert not list(elsewhere.rglob("*.tmp"))
    now_us = (HOUR + 7200) * 1_000_000
    compactor.run_once(now_us=now_us)
    compactor.run_once(now_us=now_us)
    entries = store.snapshot()
    assert [e["type"] for e in entries] == ["compacted"] and entries[0]["row_count"] == 3
    assert canonical(pq.read_table(store.path(entries[0])).to_pylist()) == sent
    assert Path(store.path(entries[0])).is_relative_to(elsewhere)
    metadata = json.loads((type_dir / "metadata.json").read_text())
    assert [e["path"] for e in metadata["files"]] == [entries[0]["path"]]
    on_disk = sorted(str(p.relative_to(elsewhere)) for p in type_dir.rglob("*.parquet"))
    assert on_disk == [entries[0]["path"]]                        # inputs deleted, expired one too
    assert not (type_dir / "2026-11-10").exists()                 # and its empty folders
    window = hepop.TimeWindow(HOUR * 1_000_000, (HOUR + 3600) * 1_000_000, False)
    catalog = hepop.FileCatalog(storage)
    assert [listed.key for listed in catalog.files(1, window)] == [entries[0]["path"]]
    assert not [p for p in root.rglob("*") if p.suffix in (".parquet", ".tmp", ".json")]
    compactor.close()
    storage.close()


def test_queries_see_the_rows_of_a_file_whose_listing_in_metadata_json_failed(tmp_path, monkeypatch):
    """A raw file published while metadata.json cannot be saved (a full disk) holds rows counted as
    written: a query lists it at once, not only once a later save or the next start lists it."""
    storage, compactor = open_store(tmp_path)
    store = storage.store(1)
    store.write(sip_table([HOUR + 10], "listed"))
    real = hepop.write_atomically

    def full_disk(path, write):
        if path.endswith("metadata.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(hepop, "write_atomically", full_disk)
    with pytest.raises(OSError):
        store.write(sip_table([HOUR + 20], "unlisted"))
    on_disk = json.loads(Path(store.file_store.reader_path(store.metadata_key)).read_text())
    assert len(on_disk["files"]) == 1 and len(store.snapshot()) == 2
    window = hepop.TimeWindow(HOUR * 1_000_000, (HOUR + 3600) * 1_000_000, False)
    keys = [listed.key for listed in hepop.FileCatalog(storage).files(1, window)]
    assert keys == [e["path"] for e in store.snapshot()]
    assert sorted(pq.read_table(store.file_store.reader_path(keys[1]))["call_id"].to_pylist()) == ["unlisted-0"]
    compactor.close()
    storage.close()


def test_late_packets_for_a_compacted_hour_are_merged_once(tmp_path):
    storage, compactor = open_store(tmp_path)
    store = storage.store(1)
    store.write(sip_table([HOUR + i for i in range(0, 3600, 100)], "on-time"))
    now = (HOUR + 7200) * 1_000_000
    compactor.run_once(now_us=now)
    compactor.run_once(now_us=now)
    first = store.snapshot()
    assert [e["type"] for e in first] == ["compacted"]
    store.write(sip_table([HOUR + 5, HOUR + 3599], "late"))
    before = canonical(rows_of(store))
    compactor.run_once(now_us=now)
    compactor.run_once(now_us=now)
    files = store.snapshot()
    assert [e["type"] for e in files] == ["compacted"] and files[0]["id"] > first[0]["id"]
    assert files[0]["row_count"] == 38 and canonical(rows_of(store)) == before
    compactor.close()


def test_retention_deletes_old_files_per_type_and_empty_folders_go(tmp_path):
    now = HOUR + 30 * 86400
    storage, compactor = open_store(tmp_path, RETENTION="7d", RETENTION_100="1d")
    sip_store, log_store = storage.store(1), storage.store(100)
    sip_store.write(sip_table([now - 10 * 86400, now - 8 * 86400], "old"))
    sip_store.write(sip_table([now - 2 * 86400, now - 600], "kept"))
    log_store.write(sip_table([now - 2 * 86400], "old-log", proto_type=100))
    log_store.write(sip_table([now - 3600], "kept-log", proto_type=100))
    compactor.run_once(now_us=now * 1_000_000)
    compactor.run_once(now_us=now * 1_000_000)
    assert sorted(r["call_id"] for r in rows_of(sip_store)) == ["kept-0", "kept-1"]
    assert [exact_payloads([r])[0].split(b"Call-ID: ")[1].split(b"\r")[0] for r in rows_of(log_store)] == [b"kept-log-0"]
    days = sorted(p.name for p in Path(sip_store.file_store.reader_path(sip_store.dir_key)).iterdir() if p.is_dir())
    assert days == [time.strftime("%Y-%m-%d", time.gmtime(t)) for t in sorted({now - 2 * 86400, now - 600})]
    assert not [p for p in Path(log_store.file_store.reader_path(log_store.dir_key)).rglob("*") if p.is_dir() and not any(p.iterdir())]
    counters = compactor.counters.snapshot()
    assert counters['deleted_files_total{type="1",why="retention"}'] == 2
    assert counters['deleted_rows_total{type="100",why="retention"}'] == 1
    compactor.close()


def test_disk_guard_deletes_the_oldest_hours_first_and_never_the_current_one(tmp_path):
    now = HOUR + 10 * 3600 + 1200
    storage, compactor = open_store(tmp_path, MAX_DISK_PERCENT="0")
    store = storage.store(1)
    for hours_ago in (5, 4, 3, 2):
        store.write(sip_table([now - hours_ago * 3600 + i for i in range(50)], f"h{hours_ago}"))
    store.write(sip_table([now - 60], "current"))
    compactor.run_once(now_us=now * 1_000_000)
    sizes = {e["chunk_time"] // 10**9 // 3600: e["size_bytes"] for e in store.snapshot()}
    budget = sum(sorted(sizes.items())[-3][1:]) + sum(size for _, size in sorted(sizes.items())[-2:])
    compactor.close()
    storage, compactor = open_store(tmp_path, MAX_DISK_PERCENT="0", MAX_DISK_BYTES=str(budget))
    compactor.run_once(now_us=now * 1_000_000)
    assert {r["call_id"].split("-")[0] for r in rows_of(storage.store(1))} == {"h3", "h2", "current"}
    compactor.close()
    storage, compactor = open_store(tmp_path, MAX_DISK_PERCENT="0.0001")   # always over: all but this hour
    compactor.run_once(now_us=now * 1_000_000)
    assert {r["call_id"] for r in rows_of(storage.store(1))} == {"current-0"}
    assert compactor.counters.snapshot()['deleted_files_total{type="1",why="disk_full"}'] == 2
    compactor.close()


def test_readers_of_listed_files_never_see_a_row_twice_or_miss_one_while_compaction_loops(tmp_path):
    """Readers outside hepop (a script, another writer's hepop) that read the files metadata.json lists."""
    storage, compactor = open_store(tmp_path, delete_grace_s=hepop.FileLeases.DELETE_GRACE_S)
    store = storage.store(1)
    committed: list[str] = []
    stop = threading.Event()
    errors = []

    def write():
        n = 0
        while not stop.is_set():
            ids = [f"r{n + i}" for i in range(20)]
            table = sip_table([HOUR + random.uniform(0, 3 * 3600) for _ in ids], "x")
            table = table.set_column(table.schema.get_field_index("call_id"), "call_id", pa.array(ids))
            store.write(table)
            committed.extend(ids)
            n += 20
            time.sleep(0.01)

    def compact():
        while not stop.is_set():
            compactor.run_once(now_us=(HOUR + 5 * 3600) * 1_000_000)
            time.sleep(0.3)

    threads = [threading.Thread(target=write), threading.Thread(target=compact)]
    for thread in threads:
        thread.start()
    reads = compactions_seen = 0
    compactions = lambda: compactor.counters.snapshot().get("compactions_total{type=\"1\"}", 0)
    deadline = time.monotonic() + 90                  # each compaction starts a process: about a second
    with duckdb.connect() as con:
        while time.monotonic() < deadline and (compactions() < 4 or reads <= 20):
            expected = set(committed)
            metadata = json.loads(Path(store.file_store.reader_path(store.metadata_key)).read_text())
            files = [str(tmp_path / e["path"]) for e in metadata["files"]]
            compactions_seen += any(e["type"] == "compacted" for e in metadata["files"])
            if not files:
                continue
            ids = [r[0] for r in con.execute("SELECT call_id FROM read_parquet($files)", {"files": files}).fetchall()]
            if len(ids) != len(set(ids)) or not expected <= set(ids):
                errors.append((len(ids), len(set(ids)), len(expected - set(ids))))
            reads += 1
    stop.set()
    for thread in threads:
        thread.join()
    compactor.close()
    assert not errors and reads > 20 and compactions_seen > 3
    assert compactions() >= 4


def test_the_server_compacts_closed_hours_and_merges_late_packets(servers, tmp_path):
    """Late packets of a compacted hour are merged into it; the other hour's file is left as it is.

    The writer may flush one burst in more than one file, each merged in a pass of its own: the test
    waits for rows, never counts passes (it did, and failed one CI run in many with 4 passes for 3)."""
    server = servers(COMPACT_INTERVAL_S="0.3", COMPACT_GRACE_S="1")
    two_hours_ago = int(time.time()) // 3600 * 3600 - 7200
    server.udp([hep3(sip(f"old-{i}"), seconds=two_hours_ago + i * 60) for i in range(90)])   # 1.5 hours
    folder = tmp_path / "data/test/dbs/hep-0/hep_1-0"

    def files_by_hour():
        path = folder / "metadata.json"
        if not path.exists():
            return []
        metadata = json.loads(path.read_text())
        return sorted((e["chunk_time"] // 10**9 - two_hours_ago, e["type"], e["row_count"], e["path"])
                      for e in metadata["files"])

    def wait_for(expected):
        deadline = time.monotonic() + 20
        while [entry[:3] for entry in files_by_hour()] != expected:
            assert time.monotonic() < deadline, files_by_hour()
            time.sleep(0.1)

    wait_for([(0, "compacted", 60), (3600, "compacted", 30)])
    second_hour = tmp_path / "data" / files_by_hour()[1][3]
    second_hour_before = second_hour.stat()
    server.udp([hep3(sip(f"late-{i}"), seconds=two_hours_ago + 30 + i) for i in range(5)])
    wait_for([(0, "compacted", 65), (3600, "compacted", 30)])
    second_hour_after = second_hour.stat()
    assert (second_hour_after.st_ino, second_hour_after.st_mtime_ns) == \
        (second_hour_before.st_ino, second_hour_before.st_mtime_ns)
    assert server.stop() == 0
    call_ids = [r["call_id"] for r in stored_rows(tmp_path / "data", columns="time, call_id")]
    assert sorted(call_ids) == sorted([f"old-{i}" for i in range(90)] + [f"late-{i}" for i in range(5)])
    assert server.counters()['compactions_total{type="1"}'] >= 3


# ---------------------------------------------------------------------------------------------------------
# The query API
# ---------------------------------------------------------------------------------------------------------

def http(server: Server, path: str, body: bytes | None = None, headers: dict | None = None, method=None):
    """(status, headers, body) of one request to the server's HTTP port."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    conn.request(method or ("POST" if body is not None else "GET"), path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    result = (response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    conn.close()
    return result


def query(server: Server, sql: str, fmt: str | None = None, headers=None):
    import urllib.parse
    params = {"q": sql, **({"format": fmt} if fmt else {})}
    status, head, body = http(server, "/query?" + urllib.parse.urlencode(params), headers=headers)
    return status, head, (json.loads(body) if (fmt or "json") == "json" else body)


SEED_HOUR = 1739041200          # 2025-02-08T19:00:00Z


def seed_calls() -> list[dict]:
    """Known traffic: 30 calls on 2025-02-08 between 19:00 and 19:30 from three agents, every third failed."""
    calls = []
    for n in range(30):
        start = SEED_HOUR + n * 60
        failed = n % 3 == 0
        src = f"10.0.0.{n % 3 + 1}"
        messages = [("INVITE", None, 0), (None, 100, 0.01), (None, 486 if failed else 200, 0.5)]
        if not failed:
            messages += [("ACK", None, 0.6), ("BYE", None, 30), (None, 200, 30.01)]
        for method, status, offset in messages:
            if method:
                payload = sip(f"call-{n}@seed", method=method)
            else:
                payload = (f"SIP/2.0 {status} {'OK' if status == 200 else 'Busy Here' if status == 486 else 'Trying'}\r\n"
                           f"From: <sip:alice@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\nCall-ID: call-{n}@seed\r\n"
                           f"CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n").encode()
            calls.append({"time_us": round((start + offset) * 1e6), "src_ip": src, "dst_ip": "10.0.1.1",
                          "call_id": f"call-{n}@seed", "method": method, "status": status, "payload": payload})
    return calls


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """One server, fed through the capture path with the seed traffic, logs, and recent packets."""
    root = tmp_path_factory.mktemp("query")
    server = Server(root / "data", RETENTION="3650d", COMPACT_INTERVAL_S="3600", QUERY_MAX_ROWS="1000")
    calls = seed_calls()
    packets = []
    for c in calls:
        seconds, useconds = divmod(c["time_us"], 1_000_000)
        packets.append(hep3(c["payload"], src=c["src_ip"], dst=c["dst_ip"], seconds=seconds, useconds=useconds))
    logs = [hep3(f"log for call-{n}@seed".encode(), proto_type=100, seconds=SEED_HOUR + n * 60 + 1,
                 extra=chunk(17, f"call-{n}@seed".encode())) for n in range(0, 30, 5)]
    now = int(time.time())
    recent = [hep3(sip(f"recent-{i}"), seconds=now - 60 - i) for i in range(3)] + \
             [hep3(sip(f"older-{i}"), seconds=now - 1200 - i) for i in range(2)]
    server.udp(packets + logs + recent)
    deadline = time.monotonic() + 10
    while len(stored_rows(root / "data", columns="time", running=True)) < len(packets) + len(recent):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    yield server, calls
    assert server.stop() == 0


def rows_json(server, sql):
    status, head, body = query(server, sql)
    assert status == 200, body
    return body


def test_seed_examples_return_the_exact_rows(seeded):
    server, calls = seeded
    hour = [c for c in calls if SEED_HOUR <= c["time_us"] / 1e6 < SEED_HOUR + 3600]
    iso = lambda us: datetime.datetime.fromtimestamp(us / 1e6, datetime.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
    rows = rows_json(server, "SELECT time, src_ip, dst_ip, payload FROM hep_1 WHERE time >= '2025-02-08T19:00:00' "
                             "AND time < '2025-02-08T20:00:00' ORDER BY time")
    assert rows == [{"time": iso(c["time_us"]), "src_ip": c["src_ip"], "dst_ip": c["dst_ip"],
                     "payload": c["payload"].decode()} for c in sorted(hour, key=lambda c: c["time_us"])]
    invites = rows_json(server, "SELECT call_id FROM hep_1 WHERE time >= '2025-02-08T19:00:00' AND time < "
                                "'2025-02-08T20:00:00' AND payload LIKE '%INVITE%' ORDER BY time DESC LIMIT 5 OFFSET 2")
    with_invite = sorted((c for c in hour if b"INVITE" in c["payload"]), key=lambda c: -c["time_us"])
    assert invites == [{"call_id": c["call_id"]} for c in with_invite[2:7]]
    by_src = rows_json(server, "SELECT src_ip, COUNT(*) AS n, MIN(time) AS first, MAX(time) AS last FROM hep_1 "
                               "WHERE time >= '2025-02-08T19:00:00' AND time < '2025-02-08T20:00:00' "
                               "GROUP BY src_ip ORDER BY src_ip")
    assert by_src == [{"src_ip": ip, "n": len(group), "first": iso(min(c["time_us"] for c in group)),
                       "last": iso(max(c["time_us"] for c in group))}
                      for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3")
                      for group in [[c for c in hour if c["src_ip"] == ip]]]
    failed = rows_json(server, "SELECT DISTINCT call_id FROM hep_1 WHERE time >= '2025-02-08T19:00:00' AND "
                               "(payload LIKE '%SIP/2.0 4%' OR payload LIKE '%SIP/2.0 5%' OR payload LIKE '%SIP/2.0 6%') "
                               "ORDER BY call_id")
    assert failed == [{"call_id": c} for c in sorted({c["call_id"] for c in hour if c["status"] == 486})]
    logs = rows_json(server, "SELECT correlation_id, payload FROM hep_100 WHERE time >= '2025-02-08' ORDER BY time")
    assert logs == [{"correlation_id": f"call-{n}@seed", "payload": f"log for call-{n}@seed"} for n in range(0, 30, 5)]


def test_what_a_real_user_adds_joins_ctes_having_windows(seeded):
    server, calls = seeded
    one_call = rows_json(server, "SELECT sip_method, sip_status FROM hep_1 WHERE call_id = 'call-4@seed' "
                                 "AND time >= '2025-02-08' AND time < '2025-02-09' ORDER BY time")
    assert one_call == [{"sip_method": c["method"], "sip_status": c["status"]} for c in calls if c["call_id"] == "call-4@seed"]
    joined = rows_json(server, "SELECT s.call_id, l.payload AS log FROM hep_1 s JOIN hep_100 l ON s.call_id = l.correlation_id "
                               "WHERE s.time >= '2025-02-08' AND s.sip_method = 'INVITE' ORDER BY s.call_id")
    assert joined == sorted([{"call_id": f"call-{n}@seed", "log": f"log for call-{n}@seed"} for n in range(0, 30, 5)],
                            key=lambda r: r["call_id"])
    having = rows_json(server, "WITH per_call AS (SELECT call_id, count(*) AS messages FROM hep_1 WHERE time >= "
                               "'2025-02-08' GROUP BY call_id) SELECT count(*) AS short_calls FROM per_call "
                               "GROUP BY messages HAVING messages = 3")
    assert having == [{"short_calls": 10}]
    window = rows_json(server, "SELECT call_id, sip_status, row_number() OVER (PARTITION BY call_id ORDER BY time) AS step "
                               "FROM hep_1 WHERE time >= '2025-02-08' AND call_id = 'call-3@seed' ORDER BY time")
    assert [r["step"] for r in window] == [1, 2, 3] and window[2]["sip_status"] == 486
    rcinfo = rows_json(server, "SELECT timestamp, rcinfo FROM hep_1 WHERE time >= '2025-02-08' ORDER BY time LIMIT 1")[0]
    assert rcinfo["rcinfo"]["srcIp"] == "10.0.0.1" and rcinfo["rcinfo"]["timeSeconds"] == SEED_HOUR
    assert rcinfo["rcinfo"]["dstPort"] == 5061 and rcinfo["timestamp"] == "2025-02-08T19:00:00.000000Z"


def test_without_a_time_condition_only_the_last_ten_minutes_are_searched(seeded):
    server, _ = seeded
    status, head, body = query(server, "SELECT call_id FROM hep_1 ORDER BY call_id")
    assert status == 200 and body == [{"call_id": f"recent-{i}"} for i in range(3)]
    assert "default" in head["x-hepop-time-window"]
    with_time = rows_json(server, "SELECT call_id FROM hep_1 WHERE time > now() - INTERVAL 1 HOUR ORDER BY call_id")
    assert with_time == [{"call_id": f"older-{i}"} for i in range(2)] + [{"call_id": f"recent-{i}"} for i in range(3)]
    assert rows_json(server, "SELECT count(*) AS n FROM hep_5") == [{"n": 0}]           # a type with no data
    status, _, body = query(server, "SELECT payload, sip_method FROM hep_77 WHERE time > '2020-01-01'")
    assert status == 400 and "sip_method" in body["error"]             # no SIP columns outside hep_1


def test_formats_and_the_post_and_raw_url_forms(seeded):
    server, _ = seeded
    sql = "SELECT time, call_id FROM hep_1 WHERE time >= '2025-02-08T19:00:00' ORDER BY time LIMIT 3"
    expected = rows_json(server, sql)
    status, head, body = http(server, "/query", json.dumps({"query": sql}).encode(), {"Content-Type": "application/json"})
    assert status == 200 and json.loads(body) == expected
    status, head, body = query(server, sql, "ndjson")
    assert [json.loads(line) for line in body.decode().splitlines()] == expected
    status, head, body = query(server, sql, "csv")
    assert body.decode().splitlines() == ["time,call_id"] + [f"{r['time']},{r['call_id']}" for r in expected]
    status, head, body = query(server, sql, "arrow")
    table = pa.ipc.open_stream(body).read_all()
    assert table.column("call_id").to_pylist() == [r["call_id"] for r in expected]
    with socket.create_connection(("127.0.0.1", server.http_port)) as raw:       # spaces as typed in a URL
        raw.sendall(f"GET /query?q={sql} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        response = b""
        while chunk_ := raw.recv(65536):
            response += chunk_
    assert response.startswith(b"HTTP/1.1 200") and b"call-0@seed" in response


def test_pruning_reads_only_the_files_of_the_range(servers, tmp_path):
    server = servers(RETENTION="3650d", COMPACT_INTERVAL_S="3600")
    day = 1_795_000_200 // 86400 * 86400 - 86400
    server.udp([hep3(sip(f"d{i}"), seconds=day + i * 600 + 30) for i in range(144)], pace_every=50)
    deadline = time.monotonic() + 15
    while len(stored_rows(tmp_path / "data", columns="time", running=True)) < 144:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    total_files = len(listed_files(tmp_path / "data/test/dbs/hep-0/hep_1-0"))
    minute = datetime.datetime.fromtimestamp(day + 50 * 600, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:00")
    status, head, body = query(server, f"SELECT call_id FROM hep_1 WHERE time >= '{minute}' "
                                       f"AND time < TIMESTAMP '{minute}' + INTERVAL 1 MINUTE")
    assert status == 200 and body == [{"call_id": "d50"}]
    assert total_files == 144 and head["x-hepop-files"] == "1"
    status, head, body = query(server, f"SELECT count(*) AS n FROM hep_1 WHERE time >= '{minute}' OR call_id = 'd1'")
    assert body == [{"n": 144 - 50}] or head["x-hepop-files"] == "144"
    assert server.stop() == 0


ATTACKS = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM read_parquet('{data}/../../../etc/*.parquet')",
    "SELECT * FROM read_text('{data}/../secret.txt')",
    "COPY (SELECT 1) TO '{data}/x.csv'",
    "COPY (SELECT 1) TO '/tmp/hepop-attack.csv'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{data}/y.csv'",
    "ATTACH '{data}/x.db' AS x",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SET allowed_directories = ['/']",
    "PRAGMA enable_profiling",
    "SELECT 1; CREATE TABLE t AS SELECT 1",
    "CREATE TABLE t AS SELECT 1",
    "CALL pragma_version()",
    "SELECT * FROM query('COPY (SELECT 1) TO ''{data}/z.csv''')",
]


def test_attacks_are_refused_with_400_and_change_nothing(seeded):
    server, _ = seeded
    data = server.data_dir
    (data.parent / "secret.txt").write_text("secret")
    before = sorted(str(p) for p in data.rglob("*"))
    for attack in ATTACKS:
        status, _, body = query(server, attack.format(data=data))
        assert status == 400, (attack, body)
        assert body["error"], attack
    assert sorted(str(p) for p in data.rglob("*")) == before
    assert not os.path.exists("/tmp/hepop-attack.csv")
    assert rows_json(server, "SELECT 42 AS answer") == [{"answer": 42}]


def test_the_newest_rows_of_many_files_come_within_the_memory_either_way_round(servers, tmp_path):
    """`ORDER BY time DESC LIMIT 100` over many files listed oldest first: DuckDB's top-N kept every row
    that came better than the last, so its memory grew with the files read (out of memory at
    QUERY_MEMORY_MB=512 over a busy hour's 3,600 files; here 40 files at 192).  Files are
    now listed in the order the query's ORDER BY time ... LIMIT reads them best first, so the pruning
    stops at once."""
    storage = hepop.Storage(str(tmp_path / "data"), "w")
    start_s = time.time() - 3000
    pad = "X-Pad: " + "x" * 800 + "\r\n"                # rows of about 1 KB, as real INVITEs
    methods = ("INVITE", "ACK", "BYE", "OPTIONS", "REGISTER", "PRACK")      # one row in six an INVITE
    rows = build_table(1, [0] * 10_000, [hepop.decode(hep3(sip(f"r-{i}", methods[i % 6], extra=pad)))
                                         for i in range(10_000)])
    for n in range(80):                                  # 800,000 rows, the files in time order
        times = pa.array([int((start_s + n * 30 + i * 0.002) * 1e6) for i in range(10_000)]).cast(hepop.TIME_TYPE)
        call_ids = pa.array([f"f{n}-{i}" for i in range(10_000)])
        storage.store(1).write(rows.set_column(0, "time", times).set_column(
            rows.schema.get_field_index("call_id"), "call_id", call_ids))
    storage.close()
    server = servers(QUERY_MEMORY_MB="192")
    for order, expected in (("DESC", [f"f79-{i}" for i in range(9996, 9396, -6)]), ("", [f"f0-{i}" for i in range(0, 600, 6)])):
        status, _, body = query(server, "SELECT * FROM hep_1 WHERE sip_method = 'INVITE' AND time > now() - "
                                        f"INTERVAL 1 HOUR ORDER BY time {order} LIMIT 100")
        assert status == 200, body
        assert [row["call_id"] for row in body] == expected
    assert server.stop() == 0


def test_plain_top_n_is_told_apart_from_queries_whose_answer_needs_other_rows():
    engine = duckdb.connect()
    aggregates = frozenset(name for (name,) in engine.execute(
        "SELECT DISTINCT function_name FROM duckdb_functions() WHERE function_type = 'aggregate'").fetchall())
    tree = lambda sql: json.loads(engine.execute("SELECT json_serialize_sql($sql)", {"sql": sql}).fetchone()[0])
    plain = "SELECT time, call_id, upper(sip_method) FROM hep_1 WHERE sip_method = 'INVITE' ORDER BY time DESC"
    assert hepop.plain_top_n(tree(plain + " LIMIT 100"), aggregates) == 100
    assert hepop.plain_top_n(tree(plain + ", call_id LIMIT 5 OFFSET 20"), aggregates) == 5
    assert hepop.plain_top_n(tree('SELECT * FROM hep_5 ORDER BY "timestamp" DESC LIMIT 10'), aggregates) == 10
    for sql in [plain, plain.replace("DESC", "ASC") + " LIMIT 10", plain + " LIMIT 1001",
                "SELECT max(time) AS time FROM hep_1 ORDER BY time DESC LIMIT 1",
                "SELECT time, count(*) OVER () FROM hep_1 ORDER BY time DESC LIMIT 1",
                "SELECT sip_method, min(time) AS time FROM hep_1 GROUP BY 1 ORDER BY time DESC LIMIT 3",
                "SELECT DISTINCT call_id, time FROM hep_1 ORDER BY time DESC LIMIT 3",
                "SELECT -epoch(time) AS time FROM hep_1 ORDER BY time DESC LIMIT 3",
                "SELECT * FROM hep_1 WHERE call_id IN (SELECT call_id FROM hep_1 WHERE sip_status = 486) "
                "ORDER BY time DESC LIMIT 3",
                "SELECT a.time FROM hep_1 a JOIN hep_100 b ON a.call_id = b.correlation_id ORDER BY a.time DESC LIMIT 3",
                "WITH x AS (SELECT * FROM hep_1) SELECT * FROM x ORDER BY time DESC LIMIT 3",
                "SELECT * FROM (SELECT * FROM hep_1) ORDER BY time DESC LIMIT 3",
                "SELECT * FROM (SELECT * FROM calls) ORDER BY time DESC LIMIT 3"]:
        assert hepop.plain_top_n(tree(sql), aggregates) is None, sql
    # The calls too: answered from the calls that began in the newest minutes (QueryRun._calls_begun_since)
    assert hepop.plain_top_n(tree("SELECT * FROM calls WHERE status >= 300 ORDER BY time DESC LIMIT 3"), aggregates) == 3


def test_a_plain_top_n_is_answered_from_the_newest_rows_and_the_same_as_over_the_whole_window(servers, tmp_path):
    """Inside a compacted hour, whose row groups go oldest first, DuckDB's top-N by time descending read
    the whole hour (the newest 100 INVITEs at 20,000 messages/s: 4.5 s, or out of memory); the newest
    minutes that hold the rows asked for give the same answer."""
    storage = hepop.Storage(str(tmp_path / "data"), "w")
    now_s = time.time()
    storage.store(1).write(sip_table([now_s - 3000 + i for i in range(3000)], "n"))   # a row a second
    storage.close()
    server = servers()
    since = lambda ago_s: f"time > '{hepop.format_time(int((now_s - ago_s) * 1e6))}'"   # both queries alike
    hour = since(3600)
    for where, tail, read_from_s in [(hour, "LIMIT 20", 60), (hour, "LIMIT 200 OFFSET 10", 480),
                                     (f"{hour} AND sip_method = 'BYE'", "LIMIT 300", None),
                                     (since(300), "LIMIT 1000", None)]:
        sql = f"SELECT call_id, time, sip_method FROM hep_1 WHERE {where} ORDER BY time DESC {tail}"
        status, head, body = query(server, sql)
        assert status == 200, body
        whole_status, whole_head, whole = query(server, f"SELECT * FROM ({sql.replace(tail, '')}) ORDER BY time DESC {tail}")
        assert whole_status == 200 and "x-hepop-read-from" not in whole_head
        assert body == whole and body, sql
        if read_from_s is None:
            assert "x-hepop-read-from" not in head, sql
        else:
            read_from = datetime.datetime.fromisoformat(head["x-hepop-read-from"].replace("Z", "+00:00")).timestamp()
            assert abs(read_from - (time.time() - read_from_s)) < 30, (sql, head["x-hepop-read-from"])
    assert server.stop() == 0


def test_a_thread_that_the_address_space_cap_refuses_is_a_memory_error():
    """Under the query process's RLIMIT_AS a thread whose stack does not fit raised RuntimeError, which
    was answered 500 "internal error" (seen at QUERY_MEMORY_MB=64), not as the memory it is."""
    script = ("import resource, threading, hepop\n"
              "size = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
              "resource.setrlimit(resource.RLIMIT_AS, (size + (64 << 20), resource.RLIM_INFINITY))\n"
              "threading.stack_size(128 << 20)\n"
              "try:\n    hepop.start_thread(threading.Thread(target=print))\n"
              "except MemoryError as exc:\n    print('MemoryError', exc)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("MemoryError no room left for a thread"), result.stdout + result.stderr


def test_bad_queries_get_duckdbs_message(seeded):
    server, _ = seeded
    for sql, words in [("SELEC 1", "syntax"), ("SELECT nope FROM hep_1", "nope"), ("SELECT * FROM hep_x", "hep_x"),
                       ("SELECT * FROM no_such_table", "no_such_table")]:
        status, _, body = query(server, sql)
        assert status == 400 and words in body["error"], body
    status, _, body = http(server, "/query", b"x" * (2 << 20), {"Content-Type": "text/plain"})
    assert status == 413
    status, _, body = http(server, "/nowhere")
    assert status == 404 and "error" in json.loads(body)


def test_a_damaged_metadata_file_is_reported_not_skipped(servers, tmp_path):
    server = servers()
    server.udp([hep3(sip("kept"))])
    time.sleep(0.5)
    damaged = tmp_path / "data/other-writer/dbs/hep-0/hep_1-0/metadata.json"
    damaged.parent.mkdir(parents=True)
    damaged.write_text("{ not json")
    status, _, body = query(server, "SELECT call_id FROM hep_1")
    assert status == 503 and "other-writer/dbs/hep-0/hep_1-0/metadata.json" in body["error"]
    damaged.write_text(json.dumps({"files": []}))
    assert rows_json(server, "SELECT call_id FROM hep_1") == [{"call_id": "kept"}]
    assert server.stop() == 0


def test_row_cap_timeout_token_health_and_metrics(servers, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families
    server = servers(QUERY_MAX_ROWS="5", QUERY_TIMEOUT_S="1", API_TOKEN="s3cr3t")
    auth = {"Authorization": "Bearer s3cr3t"}
    status, head, body = query(server, "SELECT * FROM range(100)", headers=auth)
    assert status == 200 and len(body) == 5 and head["x-hepop-truncated"] == "true"
    status, head, body = query(server, "SELECT * FROM range(3)", headers=auth)
    assert len(body) == 3 and head["x-hepop-truncated"] == "false"
    started = time.monotonic()
    status, _, body = query(server, "SELECT sum(a.range * b.range) FROM range(1000000) a, range(1000000) b", headers=auth)
    assert status == 504 and "QUERY_TIMEOUT_S" in body["error"] and time.monotonic() - started < 10
    assert query(server, "SELECT 1", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert http(server, "/metrics")[0] == 401
    status, _, body = http(server, "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["writer_id"] == "test" and health["uptime_s"] >= 0
    server.udp([hep3(sip("metrics")), b"garbage"])
    time.sleep(0.5)
    status, head, body = http(server, "/metrics", headers=auth)
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("hepop_hep_received_total", (("transport", "udp"), ("version", "3")))] == 1
    assert samples[("hepop_hep_dropped_total", (("reason", "malformed_unknown_version"),))] == 1
    assert samples[("hepop_rows_written_total", (("type", "1"),))] == 1
    assert samples[("hepop_queries_total", (("status", "504"),))] == 1
    assert ("hepop_udp_kernel_drops_total", ()) in samples and json.loads(http(server, "/health")[2])["last_flush"]
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------------------------
# The binary and the systemd unit (dist/hepop is made by build.sh, which .ci/run runs first)
# ---------------------------------------------------------------------------------------------------------

BINARY = HERE / "dist" / "hepop"


def need_binary():
    if not BINARY.exists():
        message = "dist/hepop is not built (run ./build.sh; bash .ci/run does)"
        if os.environ.get("HEPOP_REQUIRE_BINARY") == "1":
            pytest.fail(message)
        pytest.skip(message)


def test_the_binary_runs_with_no_python_captures_a_real_sender_and_answers_queries(tmp_path):
    need_binary()
    modules = hep_js_dir()
    need("node with the npm package hep-js", shutil.which("node") is not None and modules is not None)
    port, http_port = free_port(), free_port()
    workdir = tmp_path / "box"
    workdir.mkdir()
    no_python = tmp_path / "empty-bin"                                   # a PATH with no Python on it
    no_python.mkdir()
    env = {"PATH": str(no_python), "PORT": str(port), "HTTP_PORT": str(http_port), "WRITER_ID": "box"}
    started = time.monotonic()
    process = subprocess.Popen(["env", "-i", *[f"{k}={v}" for k, v in env.items()], str(BINARY)], cwd=workdir,
                               stderr=subprocess.PIPE, text=True)
    while True:
        try:
            socket.create_connection(("127.0.0.1", http_port), timeout=0.2).close()
            break
        except OSError:
            assert process.poll() is None and time.monotonic() - started < 30, process.stderr.read()
            time.sleep(0.05)
    cold_start = time.monotonic() - started
    script = tmp_path / "send.js"
    script.write_text(HEP_JS_SENDER)
    subprocess.run(["node", str(script), "udp", str(port), "40"], check=True, timeout=30, env={**os.environ, "NODE_PATH": modules})
    time.sleep(1.5)
    need("curl", shutil.which("curl") is not None)
    answer = subprocess.run(["curl", "-sfG", f"http://127.0.0.1:{http_port}/query", "--data-urlencode",
                             "q=SELECT call_id FROM hep_1 ORDER BY call_id"], capture_output=True, timeout=30, check=True)
    answered = json.loads(answer.stdout)
    assert sorted(r["call_id"] for r in answered) == sorted(f"hepjs-udp-{i}" for i in range(40))
    for path, text in (("/", "<title>hepop</title>"), ("/hepop.js", "function drawLadder")):     # the page inside
        page = subprocess.run(["curl", "-sf", f"http://127.0.0.1:{http_port}{path}"], capture_output=True,
                              timeout=30, check=True, text=True)
        assert text in page.stdout, path
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    rows = stored_rows(workdir / "data", columns="time, call_id")        # PARQUET_DIR defaults to ./data
    assert sorted(r["call_id"] for r in rows) == sorted(f"hepjs-udp-{i}" for i in range(40))
    print(f"binary cold start to ports bound: {cold_start:.2f} s, size {BINARY.stat().st_size / 2**20:.0f} MiB")


@pytest.mark.parametrize("command", ["module", "binary"])
def test_systemd_notify_ready_after_ports_accept_and_stopping_on_sigterm(tmp_path, command):
    if command == "binary":
        need_binary()
    argv = [str(BINARY)] if command == "binary" else [sys.executable, str(HERE / "hepop.py")]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)
    port, http_port = free_port(), free_port()
    process = subprocess.Popen(argv, env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                                          "PORT": str(port), "HTTP_PORT": str(http_port),
                                          "PARQUET_DIR": str(tmp_path / "data"), "JOURNAL_STREAM": "8:1234"},
                               stderr=subprocess.PIPE, text=True)
    try:
        ready = notify.recv(4096).decode()
        assert "READY=1" in ready.splitlines()
        socket.create_connection(("127.0.0.1", port), timeout=1).close()           # accepting already
        socket.create_connection(("127.0.0.1", http_port), timeout=1).close()
        process.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in notify.recv(4096).decode().splitlines()
        assert process.wait(timeout=60) == 0
        log_lines = process.stderr.read().splitlines()
        assert log_lines and all(re.match(r"<[2-7]>(DEBUG|INFO|WARNING|ERROR) ", line) for line in log_lines), log_lines[:3]
    finally:
        if process.poll() is None:
            process.kill()
        notify.close()


def test_the_unit_file_verifies_clean(tmp_path):
    need_binary()
    if not shutil.which("systemd-analyze"):
        need("systemd-analyze", False)
    unit = tmp_path / "hepop.service"
    unit.write_text((HERE / "hepop.service").read_text().replace("ExecStart=/usr/local/bin/hepop", f"ExecStart={BINARY}"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), result.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True,
                              text=True, timeout=60)
    exposure = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout).group(1))
    assert exposure <= 2.0, security.stdout[-2000:]


# ---------------------------------------------------------------------------------------------------------
# The store stays whole: one writer, a store it cannot write, failed writes, damaged files and metadata
# ---------------------------------------------------------------------------------------------------------

def without_root_powers():
    """In the child before exec: drop the capabilities that let root write where the modes say no
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER), so that it meets permissions as hepop's dynamic
    user does under the unit."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):
        if libc.prctl(24, capability, 0, 0, 0) != 0:        # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def count_of(server, sql="SELECT count(*) AS n FROM hep_1 WHERE time > now() - INTERVAL 1 DAY", headers=None) -> int:
    status, _, body = query(server, sql, headers=headers)
    assert status == 200, body
    return body[0]["n"]


def wait_for_rows(server, n, timeout=15, headers=None):
    deadline = time.monotonic() + timeout
    while count_of(server, headers=headers) < n:
        assert time.monotonic() < deadline, f"fewer than {n} rows after {timeout} s"
        time.sleep(0.1)


def wait_for_calls(server, timeout=15, headers=None):
    """Until the call records count every stored SIP message with a Call-ID: they are written
    CALL_RECORDS_INTERVAL_S after the messages."""
    sql = ("SELECT (SELECT count(*) FROM hep_1 WHERE call_id IS NOT NULL AND time > TIMESTAMP '2000-01-01') - "
           "(SELECT coalesce(sum(messages), 0) FROM calls WHERE time > TIMESTAMP '2000-01-01') AS n")
    deadline = time.monotonic() + timeout
    while count_of(server, sql, headers=headers) != 0:
        assert time.monotonic() < deadline, f"the call records lag {count_of(server, sql, headers=headers)} messages"
        time.sleep(0.05)


def test_a_second_hepop_on_the_same_folder_refuses_and_kill_9_frees_it(servers, tmp_path):
    first = servers()
    first.udp([hep3(sip(f"first-{i}")) for i in range(5)])
    wait_for_rows(first, 5)
    second = servers(wait_ready=False)
    assert second.process.wait(timeout=20) == 2
    log = "".join(second.lines)
    assert "PARQUET_DIR" in log and f"in use by hepop process {first.process.pid}" in log, log
    first.stop(signal.SIGKILL)
    third = servers()                       # the kernel released the lock with the process
    third.udp([hep3(sip(f"third-{i}")) for i in range(3)])
    wait_for_rows(third, 8)
    assert third.stop() == 0
    assert len(stored_rows(tmp_path / "data", columns="call_id")) == 8


def test_a_store_it_cannot_write_is_an_error_at_start_and_on_health_while_it_runs(servers, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o555)
    refused = servers(preexec_fn=without_root_powers, wait_ready=False)
    assert refused.process.wait(timeout=20) == 2
    assert "PARQUET_DIR=" in "".join(refused.lines) and "Traceback" not in "".join(refused.lines)
    os.chmod(data, 0o755)
    (tmp_path / "file").write_text("not a folder")
    blocked = Server(tmp_path / "file" / "data", wait_ready=False)
    assert blocked.process.wait(timeout=20) == 2 and "Traceback" not in "".join(blocked.lines)

    server = servers(preexec_fn=without_root_powers)
    server.udp([hep3(sip("before"))])
    wait_for_rows(server, 1)
    assert http(server, "/health")[0] == 200
    type_dir = data / "test/dbs/hep-0/hep_1-0"
    folders = [type_dir, *[p for p in type_dir.rglob("*") if p.is_dir()]]
    for folder in folders:
        os.chmod(folder, 0o555)
    server.udp([hep3(sip("while-read-only"))])
    deadline = time.monotonic() + 15
    while (answer := http(server, "/health"))[0] != 503:
        assert time.monotonic() < deadline, answer
        time.sleep(0.1)
    health = json.loads(answer[2])
    assert health["status"] == "failing" and "Permission denied" in health["error"]
    for folder in folders:
        os.chmod(folder, 0o755)
    server.udp([hep3(sip("after"))])
    deadline = time.monotonic() + 20
    while http(server, "/health")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert server.stop() == 0


def test_a_failed_metadata_write_never_doubles_rows(tmp_path, monkeypatch):
    """metadata.json hits ENOSPC twice after the batch's file was published: the file is not written
    again, its rows are listed once the save succeeds, and nothing is counted as dropped."""
    counters = hepop.Counters()
    config = hepop.Config.load([], {"PARQUET_DIR": str(tmp_path), "WRITER_ID": "w"})
    storage = hepop.Storage(str(tmp_path), "w")
    writer = hepop.BatchWriter(storage, counters, hepop.PacketCheck(config, counters),
                               config)
    storage.store(1)                        # opened before the disk fills: its failures hit the batch
    real, failures = hepop.write_atomically, [2]

    def full_disk(path, write):
        if path.endswith("metadata.json") and failures[0]:
            failures[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(hepop, "write_atomically", full_disk)
    writer.start()
    datagrams = [hep3(sip(f"enospc-{i}")) for i in range(88)]
    writer.submit(hepop.ReceivedBatch("udp", time.time_ns() // 1000, 0.0, datagrams,
                                      [hepop.Sender(0, ("127.0.0.1", 9))], 88 * 700))
    writer.close()
    storage.close()
    assert failures == [0]
    rows = rows_of(hepop.Storage(str(tmp_path), "w").store(1))
    assert sorted(row["call_id"] for row in rows) == sorted(f"enospc-{i}" for i in range(88))
    values = counters.snapshot()
    assert not any(v for key, v in values.items() if key.startswith("hep_dropped_total")), values
    assert values['rows_written_total{type="1"}'] == 88 and "metadata_errors_total" not in values


def test_an_unreadable_file_is_set_aside_and_retention_still_runs(tmp_path):
    storage, compactor = open_store(tmp_path, RETENTION="4h")
    store = storage.store(1)
    store.write(sip_table([HOUR + 10, HOUR + 700], "old-hour"))
    for batch in range(3):
        store.write(sip_table([HOUR + 3 * 3600 + 600 * batch + 5], f"closed-{batch}"))
    damaged = [e for e in store.snapshot() if "closed-1" in str(pq.read_table(store.path(e))["call_id"])][0]
    with open(store.path(damaged), "r+b") as file:
        file.truncate(damaged["size_bytes"] // 2)
    now_us = (HOUR + 6 * 3600 + 1800) * 1_000_000
    compactor.run_once(now_us=now_us)
    hours = {e["chunk_time"] // 10**9 // 3600 * 3600 for e in store.snapshot()}
    assert hours == {HOUR + 3 * 3600}                           # the 6-hour-old hour went by retention
    aside = tmp_path / "w/set-aside" / Path(damaged["path"]).relative_to("w")
    assert aside.exists() and not Path(store.path(damaged)).exists()
    assert compactor.counters.snapshot()['files_set_aside_total{type="1"}'] == 1
    compactor.run_once(now_us=now_us)                           # the rest of the hour merges
    assert [(e["type"], e["row_count"]) for e in store.snapshot()] == [("compacted", 2)]
    assert sorted(r["call_id"] for r in rows_of(store)) == ["closed-0-0", "closed-2-0"]
    compactor.close()


DAMAGES = {
    "entry without id": lambda meta: meta["files"][0].pop("id"),
    "row_count as text": lambda meta: meta["files"][0].update(row_count="3"),
    "null min_time": lambda meta: meta["files"][0].update(min_time=None),
    "huge wal_sequence": lambda meta: meta.update(wal_sequence=10 ** 400),
    "a list, not an object": lambda meta: meta.update(files={"a": 1}),
    "a path outside the tree": lambda meta: meta["files"][0].update(
        path="../victim.parquet", min_time=0, max_time=0),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_metadata_is_rebuilt_whatever_the_damage(servers, tmp_path, damage):
    server = servers(COMPACT_INTERVAL_S="0.5")
    server.udp([hep3(sip(f"kept-{i}")) for i in range(3)])
    wait_for_rows(server, 3)
    assert server.stop() == 0
    victim = tmp_path / "victim.parquet"
    victim.write_text("not hepop's")
    metadata_path = tmp_path / "data/test/dbs/hep-0/hep_1-0/metadata.json"
    metadata = json.loads(metadata_path.read_text())
    DAMAGES[damage](metadata)
    metadata_path.write_text(json.dumps(metadata))
    server = servers(COMPACT_INTERVAL_S="0.5")
    assert any("damaged" in line and "rebuilding" in line for line in server.lines)
    server.udp([hep3(sip("after"))])
    wait_for_rows(server, 4)
    time.sleep(1.2)                                              # a compactor pass with retention
    assert http(server, "/health")[0] == 200 and victim.exists()
    assert server.stop() == 0
    assert len(stored_rows(tmp_path / "data", columns="call_id")) == 4
    assert json.loads(metadata_path.read_text())["wal_sequence"] < 10


def test_glob_readers_see_each_row_once_right_after_a_compaction_and_queries_keep_their_files(tmp_path):
    storage, compactor = open_store(tmp_path, delete_grace_s=0.5)
    store = storage.store(1)
    for batch in range(4):
        store.write(sip_table([HOUR + 600 * batch + i for i in range(50)], f"g{batch}"))
    glob_count = lambda: duckdb.sql(f"SELECT count(*) FROM '{tmp_path}/*/dbs/hep-0/hep_1-0/*/*/*.parquet'").fetchall()[0][0]
    assert glob_count() == 200
    held = storage.leases.hold(lambda: [e["path"] for e in store.snapshot()[:2]])      # a query reads two
    compactor.run_once(now_us=(HOUR + 7200) * 1_000_000)
    assert [e["type"] for e in store.snapshot()] == ["compacted"]
    merged = lambda: [p for p in (tmp_path / "w/dbs/hep-0/hep_1-0").rglob("*.parquet") if not p.name.startswith("c_")]
    assert len(merged()) == 4                                    # unlisted; deleted after the grace
    time.sleep(0.6)
    storage.leases.delete_due()                                  # as the compactor's thread does
    assert sorted(map(str, merged())) == sorted(str(tmp_path / key) for key in held)   # nobody held these: gone
    storage.leases.release(held)
    assert merged() == []                                        # and these once the query let go
    assert glob_count() == 200
    compactor.close()


def write_an_old_hour(root: Path, rows: int, files: int) -> None:
    """A closed hour of `files` raw files of realistic SIP rows, written as the writer writes them."""
    storage = hepop.Storage(str(root), "test")
    store = storage.store(1)
    base = sip_table([HOUR + i * 0.001 for i in range(rows)], "bulk")
    for n in range(files):
        store.write(base.set_column(0, "time", pc.add(base["time"].cast(pa.int64()), n * 60_000_000)
                                    .cast(hepop.TIME_TYPE)))
    storage.close()


def test_sigterm_during_a_compaction_exits_within_10_s(servers, tmp_path):
    write_an_old_hour(tmp_path / "data", 20_000, 40)
    server = servers(COMPACT_INTERVAL_S="0.5", RETENTION="3650d", COMPACT_MEMORY_MB="64")
    server.wait_for_log("compacting 40 files", timeout=30)
    time.sleep(0.2)                                  # the merge of 800,000 rows takes about 2 s
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 10
    assert not any("compacted 40 files" in line for line in server.lines)      # it was killed, not finished
    assert not list((tmp_path / "data").rglob("c_*.parquet"))
    assert not list((tmp_path / "data").rglob("*.tmp"))
    assert len(stored_rows(tmp_path / "data", columns="time")) == 800_000


def test_a_stop_between_two_merges_starts_no_other(tmp_path, monkeypatch):
    """A stop that comes while the compactor is between two hours (not inside a merge, where it is
    killed) must not let it go on through the backlog: each merge of a large hour took 111 s."""
    storage, compactor = open_store(tmp_path)
    store = storage.store(1)
    for hour in range(3):
        store.write(sip_table([HOUR + hour * 3600 + 5], f"h{hour}"))
    started = []
    real_merge, real_swap = hepop.Compactor._merge_in_a_process, hepop.TypeStore.add_merged
    monkeypatch.setattr(hepop.Compactor, "_merge_in_a_process",
                        lambda self, *args: (started.append(args), real_merge(self, *args)))

    def swap_then_stop(self, *args):
        output = real_swap(self, *args)
        threading.Thread(target=compactor.stop).start()      # SIGTERM's stop, from another thread
        time.sleep(0.2)
        return output

    monkeypatch.setattr(hepop.TypeStore, "add_merged", swap_then_stop)
    compactor.run_once(now_us=(HOUR + 5 * 3600) * 1_000_000)
    assert len(started) == 1
    assert sorted(e["type"] for e in store.snapshot()) == ["compacted", "raw", "raw"]
    compactor.close()


def test_sigterm_on_a_store_that_fails_every_write_exits_within_10_s_and_counts_the_rows(servers, tmp_path):
    server = servers(preexec_fn=without_root_powers, FLUSH_INTERVAL_S="0.1")
    server.udp([hep3(sip("before"))])
    wait_for_rows(server, 1)
    type_dir = tmp_path / "data/test/dbs/hep-0/hep_1-0"
    for folder in [type_dir, *[p for p in type_dir.rglob("*") if p.is_dir()]]:
        os.chmod(folder, 0o555)
    for burst in range(4):                               # several batches queued behind failing writes
        server.udp([hep3(sip(f"lost-{burst}-{i}")) for i in range(10)])
        time.sleep(0.25)
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 10
    counters = server.counters()
    assert counters['hep_dropped_total{reason="write_error"}'] == 40


def test_queries_spill_to_a_bounded_folder_that_the_disk_guard_does_not_count(tmp_path):
    storage, compactor = open_store(tmp_path)
    store = storage.store(1)
    store.write(sip_table([HOUR + 10], "keep"))
    config = hepop.Config.load([], {"PARQUET_DIR": str(tmp_path), "WRITER_ID": "w", "QUERY_SPILL_BYTES": "64M"})
    engine = hepop.QueryEngine(config)
    spill_dir = storage.layout.query_spill_dir("w")
    assert engine.db.execute("SELECT current_setting('temp_directory')").fetchone()[0] == spill_dir
    assert "64" in engine.db.execute("SELECT current_setting('max_temp_directory_size')").fetchone()[0]
    os.makedirs(spill_dir, exist_ok=True)
    stat = os.statvfs(tmp_path)
    used_percent = 100.0 * (stat.f_blocks - stat.f_bavail) / stat.f_blocks
    spill_bytes = 1 << 30
    with open(os.path.join(spill_dir, "duckdb_temp_block"), "wb") as spill:
        os.posix_fallocate(spill.fileno(), 0, spill_bytes)
    limit = used_percent + 50.0 * spill_bytes / (stat.f_blocks * stat.f_frsize)   # over it only with the spill
    guard = hepop.Compactor(hepop.Config.load([], {
        "PARQUET_DIR": str(tmp_path), "WRITER_ID": "w", "MAX_DISK_PERCENT": f"{limit:.6f}"}), storage, hepop.Counters())
    guard.guard_disk((HOUR + 7200) * 1_000_000)
    assert [r["call_id"] for r in rows_of(store)] == ["keep-0"]
    os.remove(os.path.join(spill_dir, "duckdb_temp_block"))
    compactor.close()


# ---------------------------------------------------------------------------------------------------------
# Answers say exactly what is true: UTC, the time window, exact JSON, EXPLAIN, errors, logs
# ---------------------------------------------------------------------------------------------------------

def strict_json(body: bytes):
    """JSON as a browser's JSON.parse takes it: no NaN or Infinity."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(body, parse_constant=refuse)


def test_time_literals_are_utc_whatever_the_servers_zone(servers, tmp_path):
    server = servers(TZ="America/New_York", RETENTION="3650d")
    server.udp([hep3(sip("utc"), seconds=SEED_HOUR + 30)])               # 2025-02-08T19:00:30Z
    deadline = time.monotonic() + 10
    while not stored_rows(tmp_path / "data", columns="call_id", running=True):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    for _ in range(3):                                                   # each request its own cursor
        rows = rows_json(server, "SELECT call_id, time FROM hep_1 WHERE time BETWEEN '2025-02-08 19:00:00' "
                                 "AND '2025-02-08 19:01:00'")
        assert rows == [{"call_id": "utc", "time": "2025-02-08T19:00:30.000000Z"}]
    assert rows_json(server, "SELECT hour(time) AS h FROM hep_1 WHERE time > '2025-01-01'") == [{"h": 19}]
    assert server.stop() == 0


def test_a_time_condition_the_pruning_cannot_read_reads_every_file(seeded):
    server, calls = seeded
    status, head, body = query(server, "SELECT count(*) AS n FROM hep_1 WHERE time::date = '2025-02-08'")
    assert status == 200 and body == [{"n": len(calls)}]
    assert "all files" in head["x-hepop-time-window"]
    status, head, body = query(server, "SELECT count(*) AS n FROM hep_1")            # time not named: default
    assert "default" in head["x-hepop-time-window"] and body == [{"n": 3}]


def test_json_is_exact_and_valid_in_every_format(seeded):
    server, _ = seeded
    sql = ("SELECT sum(v) AS s, 9007199254740993 AS big, 'nan'::DOUBLE AS nan, 'infinity'::DOUBLE AS inf, "
           "INTERVAL 90 MINUTE AS i, [1, 2] AS l, {'a': 'nan'::DOUBLE} AS st, 'infinity'::DATE AS d, "
           "TIMESTAMP '294246-01-01' AS far, 1.25::DECIMAL(10, 2) AS dec "
           "FROM (VALUES (9007199254740993::BIGINT)) t(v)")
    status, _, body = http(server, "/query?" + __import__("urllib.parse").parse.urlencode({"q": sql}))
    assert status == 200
    row = strict_json(body)[0]
    assert row["s"] == 9007199254740993 and isinstance(row["s"], int) and row["big"] == 9007199254740993
    assert row["nan"] is None and row["inf"] is None and row["i"] == "PT1H30M"
    assert row["l"] == [1, 2] and row["st"] == {"a": None} and row["d"] == "infinity" and row["dec"] == 1.25
    assert "since 1970" in row["far"]
    status, _, body = query(server, sql, "ndjson")
    assert strict_json(body.decode().splitlines()[0]) == row
    status, _, body = query(server, "SELECT rcinfo, [1, 2] AS l FROM hep_1 WHERE time >= '2025-02-08' "
                                    "ORDER BY time LIMIT 1", "csv")
    record = list(__import__("csv").reader(body.decode().splitlines()))[1]
    assert json.loads(record[0])["srcIp"] == "10.0.0.1" and json.loads(record[1]) == [1, 2]


def test_an_error_after_the_first_byte_cuts_the_response_and_is_counted(servers, tmp_path):
    from http.client import HTTPConnection, IncompleteRead
    server = servers()
    sql = ("SELECT CASE WHEN range < 90000 THEN repeat('x', 200) ELSE error('failed at row ' || range) END AS v "
           "FROM range(100000)")
    conn = HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    started = time.monotonic()
    conn.request("GET", "/query?" + __import__("urllib.parse").parse.urlencode({"q": sql}))
    response = conn.getresponse()
    assert response.status == 200
    with pytest.raises(IncompleteRead):
        response.read()
    assert time.monotonic() - started < 10          # at once, not after QUERY_TIMEOUT_S (30 s)
    conn.close()
    server.wait_for_log("failed at row 90000", timeout=5)      # DuckDB's error, not a lost query process
    _, _, metrics = http(server, "/metrics")
    assert 'hepop_queries_total{status="aborted"} 1' in metrics.decode()
    assert 'status="200"' not in metrics.decode()
    assert server.stop() == 0


def test_explain_and_every_statement_the_readme_lists(seeded):
    server, _ = seeded
    for sql in ["EXPLAIN SELECT call_id FROM hep_1 WHERE time >= '2025-02-08'",
                "EXPLAIN ANALYZE SELECT count(*) FROM hep_1", "DESCRIBE hep_1", "DESCRIBE SELECT 1 AS a",
                "SUMMARIZE SELECT * FROM hep_1 WHERE time >= '2025-02-08'", "VALUES (1, 'a')", "FROM hep_1 LIMIT 1",
                "WITH t AS (SELECT 1 AS a) SELECT * FROM t",
                "SELECT s.call_id FROM hep_1 s JOIN hep_100 l ON s.call_id = l.correlation_id WHERE s.time >= '2025-02-08'"]:
        status, _, body = query(server, sql)
        assert status == 200, (sql, body)
    status, head, body = query(server, "EXPLAIN SELECT call_id FROM hep_1 WHERE time >= '2025-02-08T19:00:00' "
                                       "AND time < '2025-02-08T19:10:00'")
    assert head["x-hepop-time-window"].startswith("2025-02-08T19:00:00")


def raw_http(server, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=15) as raw:
        raw.sendall(request)
        response = b""
        while data := raw.recv(65536):
            response += data
    return response


def json_answer(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), strict_json(body)


def test_every_error_is_json_with_a_status_that_says_whose_fault(seeded):
    server, _ = seeded
    for method, status in (("DELETE", 405), ("PUT", 405), ("PATCH", 405)):
        code, _, body = http(server, "/query", method=method)
        assert code == status and "error" in strict_json(body), (method, body)
    for request, status in ((b"FOO /query HTTP/1.1\r\nHost: x\r\n\r\n", 501),
                            (b"GET /query HTTP/1.1\r\nX-Long: " + b"x" * 70000 + b"\r\n\r\n", 431),
                            (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 505)):
        code, body = json_answer(raw_http(server, request))
        assert code == status and body["error"], request
    nested = "SELECT 1 FROM hep_1 WHERE " + "NOT " * 600 + "time > '2025-01-01'"
    status, _, body = query(server, nested)
    assert status == 400 and body["error"]
    status, head, body = query(server, "SELECT count(*) AS n FROM hep_1 WHERE time > '99999-01-01'")
    assert status == 200 and body == [{"n": 0}] and "since 1970" in head["x-hepop-time-window"]


def test_bodies_are_read_strictly_and_the_413_always_reaches_the_client(seeded):
    server, _ = seeded
    for _ in range(30):                      # was lost to a broken pipe about one time in three
        status, _, body = http(server, "/query", b"x" * (2 << 20), {"Content-Type": "text/plain"})
        assert status == 413 and "error" in strict_json(body)
    for length, status in ((b"-1", 400), (b"abc", 400), (b"999999999", 413)):
        code, body = json_answer(raw_http(server, b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Length: " + length +
                                          b"\r\n\r\nSELECT 1"))
        assert code == status and body["error"], length
    code, body = json_answer(raw_http(server, b"POST /query HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                              b"8\r\nSELECT 1\r\n0\r\n\r\n"))
    assert code == 411
    started = time.monotonic()               # a body shorter than its length: 408 once the wait ends
    code, body = json_answer(raw_http(server, b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\nSELECT 1"))
    assert code == 408 and time.monotonic() - started < 15


def test_the_counters_line_says_what_changed_and_nothing_when_nothing_did(servers, tmp_path):
    server = servers(STATS_INTERVAL_S="0.3")
    server.udp([hep3(sip(f"c{i}")) for i in range(10)])
    wait_for_rows(server, 10)
    time.sleep(0.7)
    quiet_from = len(server.lines)
    time.sleep(1.5)                                   # five intervals with nothing new
    assert not [line for line in server.lines[quiet_from:] if "counters" in line]
    grown = [json.loads(line.split("counters grew ", 1)[1]) for line in server.lines if "counters grew" in line]
    assert sum(g.get('hep_received_total{transport="udp",version="3"}', 0) for g in grown) == 10
    sent_at = len(server.lines)
    server.udp([hep3(sip("one-more"))])
    wait_for_rows(server, 11)                         # its queries grow queries_total: lines of their own
    time.sleep(0.7)
    grown = [json.loads(line.split("counters grew ", 1)[1]) for line in server.lines[sent_at:] if "counters grew" in line]
    assert sum(g.get('hep_received_total{transport="udp",version="3"}', 0) for g in grown) == 1
    assert server.stop() == 0


@pytest.mark.parametrize("name", [s.name for s in hepop.SETTINGS if s.parse in (
    hepop.parse_port, hepop.parse_positive_int, hepop.parse_seconds, hepop.parse_percent)])
def test_a_setting_that_is_not_a_number_says_what_it_must_be(name):
    result = run_hepop(env={name: "abc"})
    assert result.returncode == 2 and name in result.stderr and "must be" in result.stderr
    assert "invalid literal" not in result.stderr and "could not convert" not in result.stderr


# ---------------------------------------------------------------------------------------------------------
# The README works as written
# ---------------------------------------------------------------------------------------------------------

SKIP_MARK = re.compile(r"<!-- not run by the tests: (.+?) -->\s*$")


def readme_shell_blocks() -> list[tuple[str, str | None]]:
    """Each ```sh block of the README, with the reason it gives for not being run (None: run it)."""
    lines = (HERE / "README.md").read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if lines[index].strip() == "```sh":
            end = lines.index("```", index + 1)
            mark = SKIP_MARK.match(lines[index - 1]) if index else None
            blocks.append(("\n".join(lines[index + 1:end]), mark.group(1) if mark else None))
            index = end
        index += 1
    return blocks


def test_the_readme_commands_run_as_written(tmp_path):
    """The README's first command starts the server in a fresh folder (on its default ports, as
    written); real HEP goes to it; then every other sh block runs there, as written, and must succeed.
    The second command of the first block is .ci/run, which is what runs this test."""
    blocks = readme_shell_blocks()
    first, _ = blocks[0]
    start, ci = first.splitlines()
    assert ci.split("#")[0].strip() == "bash .ci/run"
    for name in ("hepop.py", "requirements.txt"):
        shutil.copy(HERE / name, tmp_path / name)
    for port in (9069, 9070):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is taken: the README's commands need it"
    # With the Python of Debian 12 where there is one: it refuses pip outside a virtual environment (PEP 668).
    system_python = Path("/usr/bin/python3")
    env = dict(os.environ)
    if list(system_python.parent.parent.glob("lib/python3*/EXTERNALLY-MANAGED")):
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "python3").symlink_to(system_python)
        env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"
    server = subprocess.Popen(["bash", "-c", start], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                              start_new_session=True, env=env)
    lines = []
    threading.Thread(target=lambda: lines.extend(server.stderr), daemon=True).start()
    try:
        deadline = time.monotonic() + 120          # pip checks the requirements first
        while not any("ready" in line for line in lines):
            assert server.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        import urllib.request
        with urllib.request.urlopen("http://127.0.0.1:9070/health", timeout=10) as health:
            assert health.status == 200 and json.load(health)["status"] == "ok"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for i in range(30):
                sock.sendto(hep3(sip(f"readme-{i}")), ("127.0.0.1", 9069))
        time.sleep(6.0)                             # the call records come CALL_RECORDS_INTERVAL_S later
        ran = 0
        for block, skipped_because in blocks[1:]:
            if skipped_because:
                continue
            result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, (block, result.stdout[-2000:], result.stderr[-2000:])
            assert "readme-" in result.stdout or "INVITE" in result.stdout, (block, result.stdout[-2000:])
            ran += 1
        assert ran >= 2 and all(reason for _, reason in blocks if reason is not None)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        assert server.wait(timeout=30) == 0


# ---------------------------------------------------------------------------------------------------------
# Nothing from the network stops capture (issue 12, in part): exposure, descriptors, accept, logs
# ---------------------------------------------------------------------------------------------------------

def listening_addresses(pid: int, port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp[6] gives them) a process listens on at `port`."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):          # a descriptor closed since the listing
            inodes.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if int(port_hex, 16) == port and fields[3] == "0A" and f"socket:[{fields[9]}]" in inodes:
                found.add(address)
    return found


def test_http_is_closed_to_the_network_unless_a_token_or_an_address_opens_it(servers, tmp_path):
    assert hepop.Config.load([], {}).http_host == "127.0.0.1"
    assert hepop.Config.load([], {"API_TOKEN": "t", "HOST": "::"}).http_host == "::"
    closed = servers()
    assert listening_addresses(closed.process.pid, closed.http_port) == {"0100007F"}    # 127.0.0.1
    assert any("loopback only" in line and "API_TOKEN" in line for line in closed.lines)
    assert closed.stop() == 0
    opened = servers(HTTP_HOST="0.0.0.0")
    assert listening_addresses(opened.process.pid, opened.http_port) == {"00000000"}
    assert any("WARNING" in line and "without API_TOKEN" in line for line in opened.lines)
    assert opened.stop() == 0
    with_token = servers(API_TOKEN="s3cr3t")
    assert listening_addresses(with_token.process.pid, with_token.http_port) == {"00000000"}
    assert not any("without API_TOKEN" in line for line in with_token.lines)
    assert with_token.stop() == 0


def with_open_files(limit: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return preexec


def test_connections_the_user_set_that_cannot_fit_the_open_file_limit_are_refused_at_start():
    result = subprocess.run([sys.executable, str(HERE / "hepop.py")], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "PARQUET_DIR": "/nonexistent-never-made", "MAX_TCP_CONNECTIONS": "4096"},
                            preexec_fn=with_open_files(1024))
    assert result.returncode == 2
    assert "MAX_TCP_CONNECTIONS=4096" in result.stderr and "open-file limit is 1024" in result.stderr


def test_the_defaults_fit_themselves_to_an_open_file_limit_of_1024_and_serve(servers, tmp_path):
    """The defaults need 4,416 descriptors: under a hard limit of 1,024 hepop exited 2.  Now what the user
    did not set is scaled to fit, said in the log, and hepop serves TCP agents and HTTP."""
    server = servers(preexec_fn=with_open_files(1024))
    assert any("MAX_TCP_CONNECTIONS=704 and MAX_HTTP_CONNECTIONS=64 were chosen" in line for line in server.lines)
    agents = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
    for i, agent in enumerate(agents):
        agent.sendall(hep3(sip(f"nofile-{i}")))
    wait_for_rows(server, 20)
    for agent in agents:
        agent.close()
    assert server.stop() == 0


def test_agents_and_idle_http_clients_past_their_limits_never_take_the_writers_descriptors(servers, tmp_path):
    server = servers(preexec_fn=with_open_files(512), MAX_TCP_CONNECTIONS="100", MAX_HTTP_CONNECTIONS="16")
    agents = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(150)]
    idle = [socket.create_connection(("127.0.0.1", server.http_port)) for _ in range(40)]
    server.udp([hep3(sip(f"fd-{i}")) for i in range(300)], pace_every=50)
    time.sleep(1.5)
    assert server.process.poll() is None
    for sock in agents + idle:
        sock.close()
    time.sleep(0.5)
    wait_for_rows(server, 300)
    _, _, metrics = http(server, "/metrics")
    text = metrics.decode()
    counted = lambda name: int(float((re.search(rf"^hepop_{name} (\S+)$", text, re.M) or [0, 0])[1]))
    assert counted("tcp_connections_refused_total") == 50
    # Idle HTTP connections past the limit give their slots to newer ones (waiting longest for a head) or
    # are refused: never more than MAX_HTTP_CONNECTIONS at once.
    assert counted("http_connections_refused_total") + counted("http_connections_evicted_total") >= 24
    assert server.stop() == 0
    assert server.counters()['hep_dropped_total{reason="write_error"}'] == 0


def test_an_accept_out_of_descriptors_backs_off_never_crashes_or_spins(servers, tmp_path):
    server = servers()
    pid = server.process.pid
    server.udp([hep3(sip("before"))])
    wait_for_rows(server, 1)
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 4, limits[1]))
    agents = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(30)]
    server.udp([hep3(sip(f"during-{i}")) for i in range(50)])
    cpu = lambda: sum(int(v) for v in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
    before = cpu()
    time.sleep(2.0)
    spent_s = (cpu() - before) / os.sysconf("SC_CLK_TCK")
    assert server.process.poll() is None and spent_s < 0.5, spent_s       # the old loop spun at 94 % CPU
    for sock in agents:
        sock.close()
    resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
    wait_for_rows(server, 51, timeout=30)                  # the writer's retries get their descriptors back
    assert server.stop() == 0
    counters = server.counters()
    assert counters["tcp_accept_errors_total"] >= 1 and counters['hep_dropped_total{reason="write_error"}'] == 0
    assert not any("Traceback" in line for line in server.lines)


def test_a_flood_of_reset_http_connections_is_counted_not_printed(servers, tmp_path):
    server = servers()
    for _ in range(300):
        sock = socket.create_connection(("127.0.0.1", server.http_port))
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()                                        # a reset in the middle of the request
    time.sleep(1.0)
    assert http(server, "/health")[0] == 200
    assert server.stop() == 0
    assert not any("Traceback" in line or "Exception occurred" in line for line in server.lines)
    assert len(server.lines) < 40
    assert server.counters().get("http_connection_errors_total", 0) >= 1


def test_a_burst_of_http_connects_is_taken_by_the_backlog_without_retries(servers, tmp_path):
    server = servers()
    started = time.monotonic()
    sockets = []
    for _ in range(300):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", server.http_port))
        sockets.append(sock)
    import select
    pending = list(sockets)
    while pending and time.monotonic() - started < 0.9:
        _, writable, _ = select.select([], pending, [], 0.05)
        pending = [s for s in pending if s not in writable]
    assert pending == [], f"{len(pending)} of 300 connects waited for a SYN retry"
    for sock in sockets:
        sock.close()
    assert server.stop() == 0


def test_queries_past_max_queries_wait_then_get_503_with_retry_after(servers, tmp_path):
    server = servers(MAX_QUERIES="1", QUERY_TIMEOUT_S="4")
    slow = threading.Thread(target=lambda: query(server, "SELECT sum(a.range * b.range) FROM range(1000000) a, "
                                                         "range(1000000) b"))
    slow.start()
    time.sleep(0.5)
    started = time.monotonic()
    status, head, body = query(server, "SELECT 1 AS one")
    assert status == 503 and head["retry-after"] == "2" and "MAX_QUERIES" in body["error"]
    assert 1.5 < time.monotonic() - started < 4
    slow.join()
    assert rows_json(server, "SELECT 1 AS one") == [{"one": 1}]          # the turn came back
    assert server.stop() == 0


def test_idle_tcp_agents_give_up_their_slot_to_a_new_agent(servers, tmp_path):
    server = servers(MAX_TCP_CONNECTIONS="3", TCP_IDLE_TIMEOUT_S="1")
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
    time.sleep(0.3)
    server.tcp(hep3(sip("refused")))               # every slot taken by agents silent for under 1 s
    time.sleep(1.2)
    server.tcp(b"".join(hep3(sip(f"late-{i}")) for i in range(5)))
    wait_for_rows(server, 5)
    for sock in idle:
        sock.close()
    assert server.stop() == 0
    assert sorted(r["call_id"] for r in stored_rows(tmp_path / "data", columns="call_id")) == \
        [f"late-{i}" for i in range(5)]
    counters = server.counters()
    assert counters["tcp_idle_closed_total"] == 1 and counters["tcp_connections_refused_total"] == 1


def peak_rss_mib(pid: int) -> float:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def test_compressed_payloads_are_charged_what_they_inflate_to_on_a_budget_of_their_own(servers, tmp_path):
    """1,500 datagrams of about 1 KiB that each inflate to 1 MiB, among 1,500 ordinary ones: the writer
    takes them in batches it can hold (FLUSH_BYTES of what they inflate to), not all at once.  Charged
    against MAX_PENDING_BYTES they had the ordinary datagrams beside them dropped as buffer_full; on
    MAX_INFLATING_BYTES of their own, only they are dropped (inflating_full), and the ordinary ones all kept."""
    server = servers()
    bomb = hep3(zlib.compress(b"A" * (hepop.MAX_INFLATED_BYTES - 100)), payload_chunk=16)
    assert len(bomb) < 1200
    baseline = peak_rss_mib(server.process.pid)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(1500):
            sock.sendto(bomb, ("127.0.0.1", server.port))
            sock.sendto(hep3(sip(f"legit-{i}")), ("127.0.0.1", server.port))
    deadline = time.monotonic() + 60
    while count_of(server, "SELECT count(*) AS n FROM hep_1 WHERE call_id LIKE 'legit-%'") < 1500:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.0)
    grown = peak_rss_mib(server.process.pid) - baseline
    assert server.stop() == 0
    assert grown < 400, f"the process grew by {grown:.0f} MiB"
    lengths = [r["n"] for r in stored_rows(tmp_path / "data", columns="length(payload) AS n")]
    bombs = lengths.count(hepop.MAX_INFLATED_BYTES - 100)
    counters = server.counters()
    dropped = counters.get('hep_dropped_total{reason="inflating_full"}', 0)
    assert len(lengths) - bombs == 1500 and counters['hep_dropped_total{reason="buffer_full"}'] == 0
    assert bombs + dropped == 1500 and bombs >= 32 and dropped > 0      # past their budget: counted


def test_queries_cannot_read_the_servers_settings_or_paths(seeded):
    server, _ = seeded
    data = str(server.data_dir)
    for sql, name in [("SELECT current_setting('temp_directory') AS t", "current_setting"),
                      ("SELECT * FROM duckdb_settings()", "duckdb_settings"),
                      ("SELECT path FROM duckdb_temporary_files()", "duckdb_temporary_files"),
                      ("SELECT * FROM query('SELECT current_setting(''allowed_directories'')')", "query"),
                      ("SELECT 1 FROM hep_1 WHERE time > '2025-01-01' AND current_setting('memory_limit') > ''",
                       "current_setting")]:
        status, _, body = query(server, sql)
        assert status == 400 and name in body["error"] and data not in json.dumps(body), (sql, body)
    assert rows_json(server, "SELECT count(*) AS n FROM (DESCRIBE hep_1)")[0]["n"] > 10


def test_a_result_row_too_large_to_make_text_of_is_refused_and_memory_stays_bounded(servers, tmp_path):
    server = servers()
    baseline = peak_rss_mib(server.process.pid)
    status, _, body = query(server, "SELECT repeat('x', 100000000) AS big")
    assert status == 400 and "over 64 MiB" in body["error"]
    status, _, body = query(server, "SELECT repeat('x', 1000) AS v FROM range(50000)")   # 50 MB, many rows
    assert status == 200 and len(body) == 50000 and body[-1]["v"] == "x" * 1000
    grown = peak_rss_mib(server.process.pid) - baseline
    assert server.stop() == 0
    assert grown < 450, f"the process grew by {grown:.0f} MiB"


# ---------------------------------------------------------------------------------------------------------
# Queries run in a process of their own; memory is bounded by settings, partial frames included
# ---------------------------------------------------------------------------------------------------------

def child_pids(pid: int) -> list[int]:
    """The children of process `pid`, as its threads list them; a thread that ends while being read has none."""
    pids = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            pids += [int(child) for child in children.read_text().split()]
    return pids


def query_process_of(server, other_than=None) -> int:
    """The pid of hepop's query process: its child that the kernel's memory killer is to take first."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for pid in child_pids(server.process.pid):
            with contextlib.suppress(OSError):      # a child that has just ended
                if Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "1000" and pid != other_than:
                    return pid
        time.sleep(0.1)
    raise AssertionError("no query process")


def metric(server, name: str, headers=None) -> float:
    status, _, body = http(server, "/metrics", headers=headers)
    assert status == 200, body
    values = dict(line.rsplit(" ", 1) for line in body.decode().splitlines() if line and not line[0] == "#")
    return float(values.get("hepop_" + name, 0))


def send_paced(port: int, packets: list[bytes], rate: int, transport="udp") -> None:
    """`packets` to 127.0.0.1:port at `rate` per second, in 10 ms slices."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM) if transport == "udp" else \
        socket.create_connection(("127.0.0.1", port))
    started, sent = time.perf_counter(), 0
    with sock:
        while sent < len(packets):
            due = min(len(packets), int((time.perf_counter() - started) * rate) + 1)
            if transport == "udp":
                for data in packets[sent:due]:
                    sock.sendto(data, ("127.0.0.1", port))
            else:
                sock.sendall(b"".join(packets[sent:due]))
            sent = due
            time.sleep(0.01)


def test_queries_run_in_a_process_of_their_own_that_comes_back_when_killed(servers, tmp_path):
    server = servers()
    first = query_process_of(server)
    answer = {}
    slow = threading.Thread(target=lambda: answer.update(
        result=query(server, "SELECT count(*) AS n FROM range(100000000000) WHERE range % 7 = 1")))
    slow.start()
    time.sleep(1.5)
    os.kill(first, signal.SIGKILL)                  # as the kernel's memory killer would
    server.udp([hep3(sip(f"during-{i}")) for i in range(500)], pace_every=50)
    slow.join(30)
    status, _, body = answer["result"]
    assert status == 500 and "query process ended" in body["error"]
    wait_for_rows(server, 500)                      # capture went on, and the next query has a process
    assert query_process_of(server, other_than=first) != first
    assert metric(server, "query_process_restarts_total") == 1
    assert server.stop() == 0


def test_large_json_results_for_many_clients_do_not_starve_capture(servers, tmp_path):
    """Four clients loop 100,000-row JSON results (about 150 MB each) while 160,000 packets arrive at
    20,000/s.  When results were made text in the capture process, holding its GIL, such a load lost
    a fifth of the packets to the kernel."""
    server = servers(FLUSH_INTERVAL_S="1.0")
    padding = "X-Padding: " + "p" * 900 + "\r\n"
    send_paced(server.port, [hep3(sip(f"before-{i}", extra=padding)) for i in range(100000)], 25000)
    wait_for_rows(server, 100000, timeout=60)
    stop, answered = threading.Event(), []

    def client():
        while not stop.is_set():
            status, _, body = http(server, "/query?" + urllib.parse.urlencode(
                {"q": "SELECT * FROM hep_1 WHERE time > now() - INTERVAL 1 DAY LIMIT 100000"}))
            answered.append(status)
    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    time.sleep(2.0)
    send_paced(server.port, [hep3(sip(f"during-{i}", extra=padding)) for i in range(160000)], 20000)
    stop.set()
    for thread in clients:
        thread.join(120)
    assert answered.count(200) >= 4, answered
    assert metric(server, "udp_kernel_drops_total") == 0
    assert server.stop() == 0
    assert count_of_stored(tmp_path, "during-") == 160000


def count_of_stored(tmp_path: Path, prefix: str) -> int:
    return len([r for r in stored_rows(tmp_path / "data", columns="call_id") if r["call_id"].startswith(prefix)])


def test_incomplete_tcp_frames_are_charged_to_the_budget_and_bounded(servers, tmp_path):
    """Agents that stop in the middle of a frame: their bytes count in MAX_PENDING_BYTES, and together
    they may hold a quarter of it; past that, the agent whose frame does not fit is disconnected."""
    server = servers(MAX_PENDING_BYTES="4M")
    frame = hep3(sip("never-completes", extra="X-Padding: " + "p" * 50000 + "\r\n"))
    stalled = []
    for _ in range(40):                             # 40 x 40,000 bytes: 1.6 MB, over 1 MiB
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(frame[:40000])
        stalled.append(sock)
        time.sleep(0.02)
    time.sleep(0.5)
    closed = 0
    for sock in stalled:
        sock.settimeout(0.01)
        try:
            closed += sock.recv(1) == b""
        except ConnectionResetError:
            closed += 1
        except (TimeoutError, BlockingIOError):
            pass
    assert 14 <= closed <= 15, closed               # 1 MiB holds 26 of the 40 frames
    assert metric(server, 'hep_dropped_total{reason="partial_frames_full"}') == closed
    server.tcp(b"".join(hep3(sip(f"whole-{i}")) for i in range(100)))
    wait_for_rows(server, 100)                      # whole frames still get in, and reading was not paused
    for sock in stalled:
        sock.close()
    assert server.stop() == 0


def memory_cgroup(limit_bytes: int) -> Path | None:
    """A new memory cgroup (v1) under this process's own, limited to `limit_bytes` of memory, as the unit's
    MemoryMax puts hepop in one; None where this machine does not let us make one."""
    own = next((line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.split(":")[1] == "memory"), None)
    if own is None:
        return None
    group = Path("/sys/fs/cgroup/memory") / own.lstrip("/") / f"hepop-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        with contextlib.suppress(OSError):          # no swap accounting: there is no swap to go to
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
    except OSError:
        return None
    return group


def test_under_a_1_gib_memory_limit_no_attack_stops_capture(servers, tmp_path):
    """Defaults, in a 1 GiB memory cgroup: compressed bombs over UDP, rows too large to show, results
    too large to hold, bodies that lie about their length, and clients looping large JSON, all at once,
    while legitimate packets arrive over UDP and TCP.  The capture process stays up and stores every
    legitimate packet, /health answers throughout; the query process may be killed, and comes back."""
    group = memory_cgroup(1 << 30)
    if group is None:
        pytest.skip("this machine lets no memory cgroup be made (v1, under our own)")
    try:
        server = servers(FLUSH_INTERVAL_S="1.0",
                         preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        stop, health, answers = threading.Event(), [], []

        def poll_health():
            while not stop.is_set():
                started = time.monotonic()
                try:
                    status, _, _ = http(server, "/health")
                except OSError as exc:
                    status = repr(exc)
                health.append((status, time.monotonic() - started))
                time.sleep(0.25)

        def attack(sql, fmt=None):
            while not stop.is_set():
                try:
                    answers.append(query(server, sql, fmt)[0])
                except (OSError, ValueError, http_client.HTTPException):     # a result cut short, by design
                    answers.append("cut")

        def lying_bodies():
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    raw_http(server, b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n" + b"x" * 65536)
                time.sleep(0.1)

        bomb = hep3(zlib.compress(b"A" * (hepop.MAX_INFLATED_BYTES - 100)), payload_chunk=16)
        workers = [threading.Thread(target=poll_health), threading.Thread(target=lying_bodies)]
        workers += [threading.Thread(target=attack, args=("SELECT repeat('x', 600000000) AS big", "arrow"))
                    for _ in range(2)]
        workers += [threading.Thread(target=attack, args=("SELECT repeat('x', 300000000) AS big",))]
        workers += [threading.Thread(target=attack, args=(
            "SELECT * FROM hep_1 WHERE time > now() - INTERVAL 1 DAY LIMIT 100000",)) for _ in range(2)]
        for worker in workers:
            worker.start()
        legit_udp = [hep3(sip(f"legit-udp-{i}")) for i in range(10000)]
        legit_tcp = [hep3(sip(f"legit-tcp-{i}")) for i in range(10000)]
        tcp_sender = threading.Thread(target=send_paced, args=(server.port, legit_tcp, 1000, "tcp"))
        tcp_sender.start()
        interleaved = [p for pair in zip(legit_udp, [bomb] * 3000 + [None] * 7000) for p in pair if p]
        send_paced(server.port, interleaved, 1300)
        tcp_sender.join(60)
        time.sleep(2.0)
        stop.set()
        for worker in workers:
            worker.join(120)
        assert server.process.poll() is None, "the capture process died"
        slow = [seconds for status, seconds in health if status != 200 or seconds > 2.0]
        assert len(health) > 20 and not slow, slow
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        restarts = metric(server, "query_process_restarts_total")
        kernel_drops = metric(server, "udp_kernel_drops_total")
        assert server.stop() == 0
        counters = server.counters()
        lengths = collections.Counter(
            "bomb" if r["n"] == hepop.MAX_INFLATED_BYTES - 100 else r["id"].rsplit("-", 1)[0]
            for r in stored_rows(tmp_path / "data", columns="length(payload) AS n, call_id AS id"))
        dropped = sum(v for k, v in counters.items() if k.startswith("hep_dropped_total"))
        print(f"peak {peak / 2**20:.0f} MiB of 1024, query process restarts {restarts:g}, answers "
              f"{collections.Counter(answers)}, stored {dict(lengths)}, dropped {dropped:g}, kernel {kernel_drops:g}")
        assert lengths["legit-tcp"] == 10000                    # TCP is held back, never dropped
        assert lengths["legit-udp"] + lengths["bomb"] + dropped + kernel_drops == 13000   # each datagram accounted
        assert lengths["legit-udp"] > 5000
    finally:
        for _ in range(50):
            with contextlib.suppress(OSError):
                group.rmdir()
                break
            time.sleep(0.1)


# ---------------------------------------------------------------------------------------------------------
# Login: users with hashed passwords, HS256 tokens, the API token, the limit on failed logins
# ---------------------------------------------------------------------------------------------------------

def hash_of(password: str) -> str:
    result = subprocess.run([sys.executable, str(HERE / "hepop.py"), "hash-password"], input=password + "\n",
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def login(server, username: str, password: str):
    status, head, body = http(server, "/api/v3/auth", json.dumps(
        {"username": username, "password": password, "type": "internal"}).encode(),
        {"Content-Type": "application/json"})
    return status, head, json.loads(body)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_hash_password_makes_a_salted_scrypt_hash_that_never_holds_the_password():
    first, second = hash_of("s3cret-Pass"), hash_of("s3cret-Pass")
    assert first.startswith("scrypt$") and first != second and "s3cret" not in first    # a random salt each time
    assert hepop.password_matches("s3cret-Pass", first) and not hepop.password_matches("s3cret-pass", first)
    empty = subprocess.run([sys.executable, str(HERE / "hepop.py"), "hash-password"], input="", capture_output=True,
                           text=True, timeout=30)
    assert empty.returncode == 2 and "stdin" in empty.stderr


def test_users_log_in_for_a_token_that_opens_the_api_and_nothing_else_does(servers, tmp_path):
    users = tmp_path / "users"
    users.write_text(f"# who may search\nadmin:{hash_of('right-password')}\n")
    server = servers(API_USERS_FILE=str(users))
    status, _, body = http(server, "/api/v3/auth/type/list")                  # the login page asks, unauthenticated
    assert status == 200 and json.loads(body)["data"]["internal"]["type"] == "internal"
    assert query(server, "SELECT 1 AS one")[0] == 401
    status, _, body = login(server, "admin", "right-password")
    assert status == 201 and body["user"] == {"admin": True} and body["scope"]
    token = body["token"]
    header, claims, _ = token.split(".")
    claims = json.loads(hepop.b64url_decode(claims))
    assert json.loads(hepop.b64url_decode(header))["alg"] == "HS256"
    assert claims["username"] == "admin" and 12 * 3600 - 5 < claims["exp"] - time.time() <= 12 * 3600
    assert query(server, "SELECT 1 AS one", headers=bearer(token))[2] == [{"one": 1}]
    assert http(server, "/metrics", headers=bearer(token))[0] == 200
    assert http(server, "/health")[0] == 200                                   # never behind the login
    tampered = json.loads(hepop.b64url_decode(token.split(".")[1]))
    tampered["username"] = "root"
    forged = ".".join([header, hepop.b64url(json.dumps(tampered).encode()), token.split(".")[2]])
    unsigned = ".".join([hepop.b64url(b'{"alg":"none","typ":"JWT"}'), token.split(".")[1], ""])
    for wrong in (forged, unsigned, token[:-2], "garbage", ""):
        status, _, body = query(server, "SELECT 1 AS one", headers=bearer(wrong))
        assert status == 401 and body["error"], wrong
    for name, password in (("admin", "wrong"), ("nobody", "right-password")):
        status, _, body = login(server, name, password)
        assert status == 401 and body["statuscode"] == 401 and body["message"] and body["error"]
    assert login(server, "admin", "right-password")[0] == 201                   # 2 failures: not yet limited
    assert server.stop() == 0
    assert server.counters()['logins_total{result="failed"}'] == 2


def test_tokens_expire_and_outlive_a_restart_and_the_api_token_still_works(servers, tmp_path):
    users = tmp_path / "users"
    users.write_text(f"ops:{hash_of('pw')}\n")
    server = servers(API_USERS_FILE=str(users), TOKEN_TTL="8s", API_TOKEN="machine-token")
    token = login(server, "ops", "pw")[2]["token"]
    expires = json.loads(hepop.b64url_decode(token.split(".")[1]))["exp"]
    secret = tmp_path / "data.jwt-secret"                   # JWT_SECRET_FILE: beside PARQUET_DIR, not in it
    assert secret.stat().st_mode & 0o777 == 0o600
    assert query(server, "SELECT 1 AS one", headers=bearer(token))[0] == 200
    assert query(server, "SELECT 1 AS one", headers=bearer("machine-token"))[0] == 200
    assert server.stop() == 0
    server = servers(API_USERS_FILE=str(users), HTTP_PORT=server.http_port)
    assert time.time() < expires - 1
    assert query(server, "SELECT 1 AS one", headers=bearer(token))[0] == 200    # the same key after a restart
    time.sleep(max(0.0, expires - time.time()) + 1.0)
    status, _, body = query(server, "SELECT 1 AS one", headers=bearer(token))
    assert status == 401
    assert server.stop() == 0


def test_failed_logins_are_limited_per_address_and_counted(servers, tmp_path):
    users = tmp_path / "users"
    users.write_text(f"admin:{hash_of('pw')}\n")
    server = servers(API_USERS_FILE=str(users))
    statuses = [login(server, "admin", f"guess-{i}")[0] for i in range(hepop.LOGIN_FAILURES_MAX)]
    assert statuses == [401] * hepop.LOGIN_FAILURES_MAX
    status, head, body = login(server, "admin", "pw")                           # even the right one, for now
    assert status == 429 and 0 < int(head["retry-after"]) <= hepop.LOGIN_WINDOW_S and "failed logins" in body["error"]
    assert server.stop() == 0
    counters = server.counters()
    assert counters['logins_total{result="limited"}'] == 1
    assert counters['logins_total{result="failed"}'] == hepop.LOGIN_FAILURES_MAX


@pytest.mark.parametrize("content", ["admin\n", "admin:plain-password\n", ":scrypt$1$2$3$a$b\n"])
def test_a_users_file_without_hashes_is_a_bad_setting(tmp_path, content):
    users = tmp_path / "users"
    users.write_text(content)
    result = run_hepop(env={"API_USERS_FILE": str(users), "PARQUET_DIR": str(tmp_path / "data")})
    assert result.returncode == 2 and "API_USERS_FILE" in result.stderr and "line 1" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# HOMER's /api/v3: search, one message, the ladder, pcap and text exports
# ---------------------------------------------------------------------------------------------------------

HOMER_BASE_S = int(time.time()) - 1800      # the calls happened half an hour ago


def sip_message(call_id: str, first_line: str, cseq: str, from_user="1001", to_user="2002", extra="") -> bytes:
    return (f"{first_line}\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK{abs(hash(first_line + call_id))}\r\n"
            f"From: <sip:{from_user}@example.com>;tag=ft-{call_id[:4]}\r\nTo: <sip:{to_user}@example.com>"
            f"{';tag=tt-' + call_id[:4] if first_line.startswith('SIP/') else ''}\r\nCall-ID: {call_id}\r\n"
            f"CSeq: {cseq}\r\n{extra}Content-Length: 0\r\n\r\n").encode()


def homer_traffic() -> list[dict]:
    """The calls the HOMER tests search: an A leg and its B leg (correlated), a REGISTER, an OPTIONS, an
    IPv6 call, a call over TCP, and a call that began 400 s before the rest."""
    a, b, v4, v6 = ("10.0.0.1", 5060), ("10.0.0.2", 5060), ("10.0.0.3", 5060), ("2001:db8::1", 5060)
    v6b = ("2001:db8::2", 5062)
    flows = [
        ("a-leg@x", "INVITE sip:2002@example.com SIP/2.0", "1 INVITE", a, b, 0.0, {}),
        ("a-leg@x", "SIP/2.0 100 Trying", "1 INVITE", b, a, 0.01, {}),
        ("b-leg@y", "INVITE sip:2002@pbx.example.net SIP/2.0", "1 INVITE", b, v4, 0.02, {"corr": "a-leg@x"}),
        ("b-leg@y", "SIP/2.0 200 OK", "1 INVITE", v4, b, 2.0, {"corr": "a-leg@x"}),
        ("a-leg@x", "SIP/2.0 200 OK", "1 INVITE", b, a, 2.01, {"marker": True}),
        ("a-leg@x", "ACK sip:2002@example.com SIP/2.0", "1 ACK", a, b, 2.1, {}),
        ("a-leg@x", "BYE sip:2002@example.com SIP/2.0", "2 BYE", a, b, 30.0, {}),
        ("a-leg@x", "SIP/2.0 200 OK", "2 BYE", b, a, 30.01, {}),
        ("reg@x", "REGISTER sip:example.com SIP/2.0", "1 REGISTER", a, b, 40.0, {"from": "3003", "to": "3003"}),
        ("opt@x", "OPTIONS sip:example.com SIP/2.0", "1 OPTIONS", a, b, 41.0, {"from": "ping", "to": "ping"}),
        ("v6@x", "INVITE sip:5005@example.com SIP/2.0", "1 INVITE", v6, v6b, 50.0, {"from": "4004", "to": "5005"}),
        ("v6@x", "SIP/2.0 486 Busy Here", "1 INVITE", v6b, v6, 50.5, {"from": "4004", "to": "5005"}),
        ("tcp@x", "INVITE sip:7007@example.com SIP/2.0", "1 INVITE", a, v4, 60.0, {"from": "6006", "to": "7007",
                                                                                     "tcp": True}),
        ("early@x", "INVITE sip:8008@example.com SIP/2.0", "1 INVITE", a, b, -400.0, {"from": "9009", "to": "8008"}),
        ("early@x", "SIP/2.0 200 OK", "1 INVITE", b, a, 45.0, {"from": "9009", "to": "8008"}),
    ]
    sent = []
    for call_id, first, cseq, (src, sport), (dst, dport), offset, more in flows:
        time_us = round((HOMER_BASE_S + offset) * 1e6)
        payload = sip_message(call_id, first, cseq, more.get("from", "1001"), more.get("to", "2002"),
                              "X-Marker-Q: 1\r\n" if more.get("marker") else "")
        seconds, useconds = divmod(time_us, 1_000_000)
        packet = hep3(payload, src=src, dst=dst, sport=sport, dport=dport, seconds=seconds, useconds=useconds,
                      protocol=6 if more.get("tcp") else 17,
                      extra=chunk(17, more["corr"].encode()) if "corr" in more else b"")
        sent.append({"call_id": call_id, "first": first, "cseq": cseq, "src": src, "sport": sport, "dst": dst,
                     "dport": dport, "time_us": time_us, "payload": payload, "packet": packet,
                     "from_user": more.get("from", "1001"), "to_user": more.get("to", "2002")})
    return sent


@pytest.fixture(scope="module")
def homer(tmp_path_factory):
    root = tmp_path_factory.mktemp("homer")
    server = Server(root / "data", COMPACT_INTERVAL_S="3600")
    sent = homer_traffic()
    server.udp([s["packet"] for s in sent])
    deadline = time.monotonic() + 10
    while len(stored_rows(root / "data", columns="time", running=True)) < len(sent):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    yield server, sent
    assert server.stop() == 0


def homer_window_ms(before_s=-60, after_s=120) -> dict:
    return {"from": (HOMER_BASE_S + before_s) * 1000, "to": (HOMER_BASE_S + after_s) * 1000}


def homer_search(server, search: dict, orlogic=False, window=None) -> tuple[int, dict]:
    body = {"param": {"transaction": {}, "limit": 200, "orlogic": orlogic, "search": search,
                      "location": {"node": ["localnode"]}, "timezone": {"value": -60, "name": "Local"}},
            "timestamp": window or homer_window_ms()}
    status, _, data = http(server, "/api/v3/search/call/data", json.dumps(body).encode(),
                           {"Content-Type": "application/json"})
    return status, json.loads(data)


def field(name, value, kind="string"):
    return {"name": name, "value": value, "type": kind, "hepid": 1}


def call_ids(body) -> list[str]:
    return sorted({row["callid"] for row in body["data"]})


def test_homer_search_answers_each_value_form_with_the_rows_sent(homer):
    server, sent = homer
    status, body = homer_search(server, {"1_call": [field("data_header.from_user", "1001")]})
    assert status == 201 and body["total"] == len(body["data"]) == 8 and call_ids(body) == ["a-leg@x", "b-leg@y"]
    assert set(body["keys"]) == {key for row in body["data"] for key in row}
    expected = [s for s in sent if s["call_id"] in ("a-leg@x", "b-leg@y")]
    for row, message in zip(body["data"], sorted(expected, key=lambda s: s["time_us"])):   # in time order
        first = message["first"].split()
        assert row["callid"] == row["sid"] == message["call_id"]
        assert row["method"] == (first[1] if first[0].startswith("SIP/") else first[0])
        assert (row["srcIp"], row["srcPort"], row["dstIp"], row["dstPort"]) == \
            (message["src"], message["sport"], message["dst"], message["dport"])
        assert row["create_date"] == message["time_us"] // 1000
        assert row["timeSeconds"] * 1_000_000 + row["timeUseconds"] == message["time_us"]
        assert (row["from_user"], row["to_user"], row["cseq"]) == ("1001", "2002", message["cseq"])
        assert row["from_tag"] == f"ft-{message['call_id'][:4]}" and row["uuid"] == row["id"]
        assert row["correlation_id"] == ("a-leg@x" if message["call_id"] == "b-leg@y" else "")
        assert "raw" not in row and row["node"] == "localnode" and row["table"] == "hep_proto_1_call"
    by_value = {
        "1001;4004": ["a-leg@x", "b-leg@y", "v6@x"], "9%": ["early@x"], "!=1001": ["early@x", "tcp@x", "v6@x"],
        "nobody": []}
    for value, ids in by_value.items():
        assert call_ids(homer_search(server, {"1_call": [field("data_header.from_user", value)]})[1]) == ids, value
    assert call_ids(homer_search(server, {"1_call": [field("data_header.user_agent", "isEmpty")]})[1]) == \
        ["a-leg@x", "b-leg@y", "early@x", "tcp@x", "v6@x"]
    either = [field("data_header.from_user", "4004"), field("data_header.to_user", "||8008")]
    assert call_ids(homer_search(server, {"1_call": either})[1]) == ["early@x", "v6@x"]
    both = [field("data_header.from_user", "4004"), field("data_header.to_user", "8008")]
    assert call_ids(homer_search(server, {"1_call": both})[1]) == []
    assert call_ids(homer_search(server, {"1_call": both}, orlogic=True)[1]) == ["early@x", "v6@x"]
    status, body = homer_search(server, {"1_call": [field("protocol_header.srcPort", "5062", "integer")]})
    assert [(r["callid"], r["method"], r["srcIp"]) for r in body["data"]] == [("v6@x", "486", "2001:db8::2")]
    assert body["data"][0]["aliasSrc"] == "[2001:db8::2]:5062"
    assert [r["method"] for r in homer_search(server, {"1_call": [field("raw", "x-marker-q")]})[1]["data"]] == ["200"]
    limited = homer_search(server, {"1_call": [field("data_header.from_user", "1001"), field("limit", "3")]})[1]
    assert [r["method"] for r in limited["data"]] == ["ACK", "BYE", "200"]          # the newest 3, in time order
    assert call_ids(homer_search(server, {"1_registration": [field("node", "localnode")]})[1]) == ["reg@x"]
    assert homer_search(server, {"1_call": [field("protocol_header.capturePass", "secret")]})[1]["total"] == 0
    assert call_ids(homer_search(server, {"1_default": []})[1]) == ["opt@x"]
    assert homer_search(server, {"1_call": []}, window=homer_window_ms(-3600, -1000))[1]["total"] == 0
    for bad in ({"1_call": [field("data_header.nonsense", "1")]}, {"1_nonsense": []},
                {"1_call": [field("limit", "lots")]}, {"1_call": [field("protocol_header.srcPort", "x", "integer")]}):
        status, body = homer_search(server, bad)
        assert status == 400 and body["error"] and body["message"] == body["error"], bad


def homer_post(server, path: str, callids: list[str], window=None) -> tuple[int, dict, bytes]:
    body = {"param": {"search": {"1_call": {"id": 0, "callid": callids}}, "location": {"node": ["localnode"]},
                      "transaction": {"call": True, "registration": False, "rest": False}},
            "timestamp": window or homer_window_ms(-300, 300)}
    return http(server, path, json.dumps(body).encode(), {"Content-Type": "application/json"})


def test_homer_search_filters_the_profile_as_a_join_only_where_the_call_ids_keep_few_rows():
    """A profile's nine CSeq methods as IN (a join, cheapest over a handful of rows) only when the search
    keeps the rows of given Call-IDs; otherwise as one contains(), which lets the newest-first top-N skip
    older row groups."""
    window = hepop.TimeWindow(0, 10**15, False)
    by_id, by_user = field("data_header.callid", "a@x"), field("data_header.from_user", "1001")
    sql = lambda fields, orlogic=False: hepop.homer_search("1_call", fields, orlogic, window, False).sql
    for fields, orlogic in [([by_id], False), ([by_user, by_id], False), ([by_id], True),
                            ([field("data_header.callid", "a@x;b@x")], False), ([by_id, field("limit", "5")], False)]:
        assert " IN ('INVITE', " in sql(fields, orlogic) and "contains(' INVITE" not in sql(fields, orlogic), fields
    for fields, orlogic in [([by_user], False), ([by_id, by_user], True), ([by_user, field("sid", "||a@x")], False),
                            ([field("data_header.callid", "!=a@x")], False), ([field("sid", "a%")], False), ([], False)]:
        assert "contains(' INVITE ACK " in sql(fields, orlogic) and " IN ('INVITE'" not in sql(fields, orlogic), fields
    assert "NOT contains(' INVITE" in hepop.homer_search("1_default", [by_user], False, window, False).sql


def test_homer_transaction_is_the_whole_call_with_both_legs(homer):
    server, sent = homer
    status, _, data = homer_post(server, "/api/v3/call/transaction", ["a-leg@x"])
    body = json.loads(data)
    assert status == 201
    messages, calldata, hosts = body["data"]["messages"], body["data"]["calldata"], body["data"]["hosts"]
    legs = sorted((s for s in sent if s["call_id"] in ("a-leg@x", "b-leg@y")), key=lambda s: s["time_us"])
    assert [m["raw"].encode() for m in messages] == [s["payload"] for s in legs]
    assert len(calldata) == len(messages) == body["total"] == 8
    for message, call in zip(messages, calldata):                 # the UI joins them on (create_date, id)
        assert (message["create_date"], message["id"]) == (call["create_date"], call["id"])
        assert hosts[call["dstId"]]["position"] == call["destination"] and hosts[call["srcId"]]["host"] == [call["srcId"]]
    assert {h: v["position"] for h, v in hosts.items()} == {"10.0.0.1:5060": 0, "10.0.0.2:5060": 1, "10.0.0.3:5060": 2}
    assert body["data"]["alias"] == {} and {m["profile"] for m in messages} == {"1_call"}
    status, _, data = homer_post(server, "/api/v3/call/transaction", ["early@x"], homer_window_ms(-100, 300))
    early = json.loads(data)["data"]["messages"]
    assert [m["method"] for m in early] == ["INVITE", "200"]      # it began 300 s before the window asked for
    status, _, data = homer_post(server, "/api/v3/call/transaction", ["v6@x"])
    assert set(json.loads(data)["data"]["hosts"]) == {"[2001:db8::1]:5060", "[2001:db8::2]:5062"}


def test_homer_message_by_id_with_its_payload(homer):
    server, sent = homer
    row = homer_search(server, {"1_call": [field("data_header.callid", "v6@x")]})[1]["data"][0]
    body = {"param": {"search": {"1_call": {"id": row["id"]}}, "limit": 1},
            "timestamp": {"from": row["create_date"] - 5000, "to": row["create_date"] + 5000}}
    status, _, data = http(server, "/api/v3/search/call/message", json.dumps(body).encode())
    found = json.loads(data)
    assert status == 201 and found["total"] == 1
    assert found["data"][0]["raw"].encode() == next(s["payload"] for s in sent if s["call_id"] == "v6@x")
    assert found["data"][0]["id"] == row["id"] and found["data"][0]["create_ts"] == row["create_date"]


def test_homer_exports_a_pcap_that_tshark_reads_and_the_flow_as_text(homer, tmp_path):
    need("tshark", shutil.which("tshark") is not None)
    server, sent = homer
    for callids in (["a-leg@x"], ["v6@x"], ["tcp@x"]):
        status, head, data = homer_post(server, "/api/v3/export/call/messages/pcap", callids)
        assert status == 200 and head["content-type"] == "application/vnd.tcpdump.pcap"
        path = tmp_path / "call.pcap"
        path.write_bytes(data)
        result = subprocess.run(["tshark", "-r", str(path), "-o", "tcp.check_checksum:TRUE",
                                 "-o", "udp.check_checksum:TRUE", "-T", "fields", "-E", "separator=|",
                                 "-e", "frame.time_epoch", "-e", "ip.src", "-e", "ipv6.src", "-e", "udp.srcport",
                                 "-e", "tcp.srcport", "-e", "sip.Call-ID", "-e", "sip.Method", "-e", "sip.Status-Code",
                                 "-e", "_ws.expert"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        lines = [line.split("|") for line in result.stdout.splitlines()]
        expected = sorted((s for s in sent if s["call_id"] in callids or
                           (callids == ["a-leg@x"] and s["call_id"] == "b-leg@y")), key=lambda s: s["time_us"])
        assert len(lines) == len(expected)
        for fields, message in zip(lines, expected):
            epoch, ip4, ip6, udp_port, tcp_port, call_id, method, status_code, expert = fields
            assert round(float(epoch) * 1e6) == message["time_us"]
            assert (ip4 or ip6) == message["src"] and int(udp_port or tcp_port) == message["sport"]
            assert bool(tcp_port) == (message["call_id"] == "tcp@x")
            assert call_id == message["call_id"] and (method or status_code) == message["first"].split()[
                1 if message["first"].startswith("SIP/") else 0]
            assert "checksum" not in expert.lower(), expert
    status, head, data = homer_post(server, "/api/v3/export/call/messages/text", ["a-leg@x"])
    text = data.decode()
    assert status == 200 and text.count("Call-ID: a-leg@x") == 6 and text.count("Call-ID: b-leg@y") == 2
    assert "10.0.0.1:5060 -> 10.0.0.2:5060 INVITE" in text


def test_message_ids_stay_the_same_after_compaction_and_a_restart(servers, tmp_path):
    hour_ago = (int(time.time()) // 3600 - 2) * 3600 + 600           # in an hour that is closed
    server = servers(COMPACT_INTERVAL_S="1", COMPACT_GRACE_S="1")
    packets = [hep3(sip_message(f"id-{i}@x", "INVITE sip:1@x SIP/2.0", "1 INVITE"), seconds=hour_ago + i)
               for i in range(20)]
    server.udp(packets)
    window = {"from": (hour_ago - 10) * 1000, "to": (hour_ago + 60) * 1000}

    def ids():
        rows = homer_search(server, {"1_call": []}, window=window)[1]["data"]
        return {row["callid"]: row["id"] for row in rows}
    deadline = time.monotonic() + 30
    while len(before := ids()) < 20:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert len(set(before.values())) == 20
    type_dir = type_dirs(tmp_path / "data")[0]
    while not any(path.name.startswith("c_") for path in type_dir.rglob("*.parquet")):
        assert time.monotonic() < deadline + 30
        time.sleep(0.2)
    assert ids() == before
    assert server.stop() == 0
    server = servers(HTTP_PORT=server.http_port)
    assert ids() == before
    assert server.stop() == 0


def test_the_stock_uis_start_up_calls_answer_with_the_shapes_it_reads(homer):
    server, _ = homer
    get = lambda path: (lambda r: (r[0], json.loads(r[2])))(http(server, "/api/v3/" + path))
    for path in ("advanced", "alias", "user/settings", "user/settings/system", "hepsub/protocol", "agent/subscribe"):
        status, body = get(path)
        assert status == 200 and body["data"] == [] and body["count"] == 0, path
    status, board = get("dashboard/store/home")
    widgets = {widget["name"]: widget for widget in board["data"]["widgets"]}
    assert status == 200 and {"protosearch", "result"} <= set(widgets) and board["owner"] == "admin"
    status, mapping = get("mapping/protocol")
    call = next(entry for entry in mapping["data"] if entry["hepid"] == 1 and entry["profile"] == "call")
    assert call["hep_alias"] == "SIP" and mapping["count"] == len(mapping["data"])
    ids = {f["id"] for f in call["fields_mapping"]}
    searched = {f["field_name"] for f in widgets["protosearch"]["config"]["fields"]}
    assert searched - {"targetResultsContainer"} <= ids and "targetResultsContainer" in searched   # results in place
    assert {"data_header.from_user", "data_header.callid", "protocol_header.srcIp", "raw"} <= ids
    profile = get("users/profile")[1]["data"]
    assert isinstance(profile["guid"], str) and profile["displayname"] == "admin"        # the UI's menu reads both
    assert get("database/node/list")[1]["data"][0]["name"] == "localnode"
    assert get("version/api/info")[1]["data"]["name"] == "hepop"
    assert get("modules/status")[0] == 200 and get("dashboard/info")[1]["data"][0]["id"] == "home"
    status, _, data = http(server, "/api/v3/search/call/decode/message", json.dumps({"param": {}}).encode())
    assert status == 201 and json.loads(data)["data"] == []
    assert http(server, "/api/v3/no/such/thing")[0] == 404


def test_a_saved_dashboard_is_kept_across_a_restart(servers, tmp_path):
    server = servers()
    board = {"id": "home", "name": "Mine", "widgets": [{"name": "result", "id": "r1"}]}
    status, _, _ = http(server, "/api/v3/dashboard/store/home", json.dumps(board).encode(), method="PUT")
    assert status == 200
    assert server.stop() == 0
    server = servers(HTTP_PORT=server.http_port)
    status, _, data = http(server, "/api/v3/dashboard/store/home")
    assert status == 200 and json.loads(data)["data"] == board
    assert http(server, "/api/v3/dashboard/store/home", method="DELETE")[0] == 200
    assert json.loads(http(server, "/api/v3/dashboard/store/home")[2])["data"]["name"] == "Home"   # the default
    assert server.stop() == 0


def test_logs_and_rtcp_of_a_call_for_the_uis_tabs(homer):
    server, _ = homer
    time_us = round((HOMER_BASE_S + 1.0) * 1e6)
    seconds, useconds = divmod(time_us, 1_000_000)
    report = json.dumps({"type": 200, "ssrc": 1234, "report_count": 1}).encode()
    server.udp([hep3(b"INFO kamailio: call a-leg@x routed", proto_type=100, seconds=seconds, useconds=useconds,
                     extra=chunk(17, b"a-leg@x")),
                hep3(report, proto_type=5, seconds=seconds, useconds=useconds + 1, extra=chunk(17, b"a-leg@x")),
                hep3(report, proto_type=5, seconds=seconds, useconds=useconds + 2, extra=chunk(17, b"other@x"))])
    deadline = time.monotonic() + 10
    while True:
        logs = json.loads(homer_post(server, "/api/v3/call/report/log", ["a-leg@x"])[2])
        qos = json.loads(homer_post(server, "/api/v3/call/report/qos", ["a-leg@x"])[2])
        if logs["total"] and qos["rtcp"]["total"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(r["raw"], r["sid"], r["method"]) for r in logs["data"]] == [
        ("INFO kamailio: call a-leg@x routed", "a-leg@x", "LOG")]
    assert qos["rtcp"]["total"] == 1 and json.loads(qos["rtcp"]["data"][0]["raw"])["ssrc"] == 1234
    assert qos["rtp"] == {"total": 0, "data": []}
    assert qos["rtcp"]["data"][0]["create_date"] == time_us // 1000


def test_ui_dir_serves_the_built_ui_with_its_types_and_index_for_its_routes(servers, tmp_path):
    ui = tmp_path / "ui"
    (ui / "assets").mkdir(parents=True)
    (ui / "index.html").write_text("<!doctype html><title>homer</title>")
    (ui / "main.js").write_text("console.log('ui')")
    (ui / "assets" / "style.css").write_text("body {}")
    (tmp_path / "secret.txt").write_text("not for the web")
    server = servers(UI_DIR=str(ui))
    for path, kind, text in (("/", "text/html", "<title>homer"), ("/main.js", "javascript", "console.log"),
                             ("/assets/style.css", "text/css", "body"), ("/search/result?x=1", "text/html", "<title>"),
                             ("/%2e%2e/secret.txt", "text/html", "<title>"), ("/../secret.txt", "text/html", "<title>")):
        status, head, body = http(server, path)
        assert status == 200 and kind in head["content-type"] and text in body.decode(), path
    assert http(server, "/api/v3/nothing")[0] == 404 and http(server, "/health")[0] == 200
    assert server.stop() == 0
    server = servers(HTTP_PORT=server.http_port)            # without UI_DIR: hepop's own page, and its policy
    for path in ("/", "/index.html", "/hepop.js", "/hepop.css"):
        status, head, body = http(server, path)
        assert status == 200 and "default-src 'none'" in head["content-security-policy"], path
    assert "<title>hepop</title>" in http(server, "/")[2].decode()
    assert "javascript" in http(server, "/hepop.js")[1]["content-type"]
    for path in ("/search/x", "/../secret.txt", "/%2e%2e/secret.txt"):            # its views are in the fragment
        status, _, body = http(server, path)
        assert status == 404 and json.loads(body)["error"], path
    status, _, body = http(server, "/nothing", b"{}")
    assert status == 405 and json.loads(body)["error"]
    assert server.stop() == 0


def test_a_kamailio_traced_sipp_call_through_homers_search_ladder_logs_and_pcap(servers, tmp_path):
    """A real call: SIPp through Kamailio, traced as HEP with its log line; found by HOMER's search,
    compared field by field with the stored rows, then its ladder, its log and its pcap."""
    server = servers()
    started_ms = int(time.time() * 1000) - 1000
    kamailio_calls(tmp_path, server.port, hlog=True)
    window = {"from": started_ms, "to": int(time.time() * 1000) + 1000}
    wait_for_rows(server, 12)
    status, found = homer_search(server, {"1_call": [field("data_header.from_user", "sipp")]}, window=window)
    stored = rows_json(server, "SELECT epoch_us(time) AS us, src_ip, src_port, dst_ip, dst_port, call_id, "
                               "coalesce(sip_method, sip_status::VARCHAR) AS method, from_user, cseq FROM hep_1 "
                               "WHERE time > now() - INTERVAL 1 HOUR ORDER BY time")
    assert status == 201 and found["total"] == len(stored) == 12
    for row, want in zip(found["data"], stored):
        assert (row["timeSeconds"] * 1_000_000 + row["timeUseconds"], row["srcIp"], row["srcPort"], row["dstIp"],
                row["dstPort"], row["callid"], row["method"], row["from_user"], row["cseq"]) == tuple(want.values())
    call_id = stored[0]["call_id"]
    status, _, data = homer_post(server, "/api/v3/call/transaction", [call_id], window)
    ladder = json.loads(data)["data"]
    assert [m["method"] for m in ladder["messages"]] == [r["method"] for r in stored]
    assert len(ladder["hosts"]) == 3                    # SIPp's client, Kamailio, SIPp's server
    logs = json.loads(homer_post(server, "/api/v3/call/report/log", [call_id], window)[2])
    assert logs["total"] >= 1 and all(call_id == r["sid"] for r in logs["data"])
    assert any("forwarding INVITE" in r["raw"] for r in logs["data"])
    need("tshark", shutil.which("tshark") is not None)
    pcap = tmp_path / "sipp.pcap"
    pcap.write_bytes(homer_post(server, "/api/v3/export/call/messages/pcap", [call_id], window)[2])
    as_sip = [arg for port in sorted({r["dst_port"] for r in stored}) for arg in ("-d", f"udp.port=={port},sip")]
    result = subprocess.run(["tshark", "-r", str(pcap), *as_sip, "-T", "fields", "-e", "sip.Call-ID"],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == [call_id] * 12
    assert server.stop() == 0


def test_an_answer_before_the_body_is_read_closes_the_connection_so_the_body_is_no_request(servers, tmp_path):
    """A 401 answered before a POST's body is read: on a kept-alive connection the body's bytes were read as
    the next request, and the browser's login that followed got 501 "Unsupported method" (found by the page)."""
    server = servers(API_TOKEN="t0ken")
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        body = b'{"query": "SELECT 1"}'
        sock.sendall(b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = b""
        while chunk_read := sock.recv(65536):
            answers += chunk_read
    statuses = re.findall(rb"^HTTP/1\.1 (\d{3})", answers, re.MULTILINE)
    assert statuses[0] == b"401" and b"Connection: close" in answers.split(b"\r\n\r\n")[0]
    assert statuses == [b"401"]                     # closed after it: the body was never taken for a request
    assert server.stop() == 0


def test_the_login_limit_forgets_the_address_that_failed_longest_ago_not_every_address(monkeypatch, tmp_path):
    """An attacker who fails from many addresses must not wipe the count of the one being limited."""
    monkeypatch.setattr(hepop, "LOGIN_ADDRESSES_MAX", 3)
    config = hepop.Config.load([], {"PARQUET_DIR": str(tmp_path), "JWT_SECRET": "k"})
    users = tmp_path / "users"
    users.write_text(f"admin:{hepop.hash_password('pw')}\n")
    access = hepop.Access(config, hepop.Users(str(users)), hepop.Tokens(b"k", 60))

    def attempt(address, password="guess"):
        assert access.start_attempt(address) == 0
        return access.login(address, "admin", password)
    for _ in range(hepop.LOGIN_FAILURES_MAX):
        assert attempt("203.0.113.9") is None
    assert access.start_attempt("203.0.113.9") > 0
    for address in ("198.51.100.1", "198.51.100.2", "198.51.100.3"):
        attempt(address)
    assert access.start_attempt("203.0.113.9") == 0                  # the oldest went, at the bound
    assert attempt("198.51.100.3", "pw") is not None
    attempt("198.51.100.4")
    assert set(access._attempts) == {"203.0.113.9", "198.51.100.3", "198.51.100.4"}
    assert len(access._attempts["198.51.100.3"]) == 1                 # the right password took back its try


def test_homer_bounds_what_a_request_can_make_it_hold(homer):
    server, _ = homer
    status, body = homer_search(server, {"1_call": [field("limit", str(hepop.MAX_SEARCH_LIMIT + 1))]})
    assert status == 400 and str(hepop.MAX_SEARCH_LIMIT) in body["error"]
    board = {"id": "big", "widgets": [{"name": "x" * hepop.MAX_DASHBOARD_BYTES}]}
    status, _, data = http(server, "/api/v3/dashboard/store/big", json.dumps(board).encode(), method="PUT")
    assert status == 400 and "KiB at most" in json.loads(data)["error"]


def test_homer_searches_every_writer_and_every_profile_of_other_types(homer):
    """A second capture box's files in the same PARQUET_DIR are searched too; logs (100_default) and RTCP
    (5_default) are searched by their own fields."""
    server, _ = homer
    other = hepop.Storage(str(server.data_dir), "other-box")
    other.store(1).write(sip_table([HOMER_BASE_S - 1200.0], "box2"))    # an INVITE, Call-ID box2-0, away from
    window = homer_window_ms(-1260, -1140)                                  # the other tests' calls
    other.close()
    found = homer_search(server, {"1_call": [field("data_header.callid", "box2-0")]}, window=window)[1]
    assert [(r["callid"], r["method"]) for r in found["data"]] == [("box2-0", "INVITE")]
    seconds = HOMER_BASE_S - 1200
    server.udp([hep3(b"ERROR: no route for b-leg@y", proto_type=100, seconds=seconds, extra=chunk(17, b"b-leg@y")),
                hep3(b'{"type": 200, "ssrc": 99}', proto_type=5, seconds=seconds, extra=chunk(17, b"b-leg@y"))])
    deadline = time.monotonic() + 10
    while True:
        logs = homer_search(server, {"100_default": [field("sid", "b-leg@y"), field("raw", "no route")]}, window=window)[1]
        rtcp = homer_search(server, {"5_default": [field("protocol_header.correlation_id", "b-leg@y")]},
                             window=window)[1]
        if logs["total"] and rtcp["total"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(r["sid"], r["method"], r["raw"]) for r in logs["data"]] == [("b-leg@y", "LOG", "ERROR: no route for b-leg@y")]
    assert [(r["sid"], r["method"], r["payloadType"]) for r in rtcp["data"]] == [("b-leg@y", "RTCP", 5)]


def test_reading_comes_back_after_a_pause_while_an_agent_holds_part_of_a_frame(servers, tmp_path):
    """Incomplete frames count in MAX_PENDING_BYTES; a few bytes of one held by a quiet agent must not keep
    reading paused once the writer has written everything else."""
    server = servers(MAX_PENDING_BYTES="1M")
    quiet = socket.create_connection(("127.0.0.1", server.port))
    half = hep3(sip("half-sent"))
    quiet.sendall(half[:100])
    time.sleep(0.3)
    burst = [hep3(sip(f"burst{i}")) for i in range(20_000)]
    sender = threading.Thread(target=server.tcp, args=(b"".join(burst),))
    sender.start()
    sender.join(30)
    assert not sender.is_alive(), "the burst's sender is still held back: reading never came back"
    wait_for_rows(server, 20_000, timeout=30)
    quiet.sendall(half[100:])
    wait_for_rows(server, 20_001)
    quiet.close()
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------------------------
# hepop's own page, driven in a real headless Chromium (Debian's, through Playwright for Python)
# ---------------------------------------------------------------------------------------------------------

SCREENSHOTS = Path(os.environ.get("HEPOP_SCREENSHOTS", HERE / "screenshots"))
REASONS = {100: "Trying", 180: "Ringing", 200: "OK", 404: "Not Found", 480: "Temporarily Unavailable", 486: "Busy Here",
           487: "Request Terminated"}


def call_flow(call_id: str, from_user: str, to_user: str, status: int, start_s: float, a=("10.0.0.1", 5060),
              b=("10.0.0.2", 5060), correlation: str = "", trying: str = "Trying") -> list[dict]:
    """One call's SIP messages as HEP: INVITE, 100, then 180, 200, ACK, BYE, 200 when answered, CANCEL,
    its 200, 487 and ACK when cancelled, or the final `status` and its ACK; each with the label the
    ladder must draw."""
    steps = [(0.0, f"INVITE sip:{to_user}@example.com SIP/2.0", "1 INVITE", a, b),
             (0.01, f"SIP/2.0 100 {trying}", "1 INVITE", b, a)]
    if status == 200:
        steps += [(0.4, "SIP/2.0 180 Ringing", "1 INVITE", b, a), (2.0, "SIP/2.0 200 OK", "1 INVITE", b, a),
                  (2.01, f"ACK sip:{to_user}@example.com SIP/2.0", "1 ACK", a, b),
                  (12.0, f"BYE sip:{to_user}@example.com SIP/2.0", "2 BYE", a, b),
                  (12.02, "SIP/2.0 200 OK", "2 BYE", b, a)]
    elif status == 487:
        steps += [(0.9, f"CANCEL sip:{to_user}@example.com SIP/2.0", "1 CANCEL", a, b),
                  (0.91, "SIP/2.0 200 OK", "1 CANCEL", b, a), (0.92, "SIP/2.0 487 Request Terminated", "1 INVITE", b, a),
                  (0.93, f"ACK sip:{to_user}@example.com SIP/2.0", "1 ACK", a, b)]
    else:
        steps += [(1.0, f"SIP/2.0 {status} {REASONS[status]}", "1 INVITE", b, a),
                  (1.01, f"ACK sip:{to_user}@example.com SIP/2.0", "1 ACK", a, b)]
    flow = []
    for offset_s, first, cseq, (src, sport), (dst, dport) in steps:
        seconds, useconds = divmod(round((start_s + offset_s) * 1e6), 1_000_000)
        payload = sip_message(call_id, first, cseq, from_user, to_user, "User-Agent: test-phone\r\n")
        flow.append({"label": first.split(" ")[0] if not first.startswith("SIP/") else first.split(" ", 1)[1],
                     "payload": payload, "time_us": seconds * 1_000_000 + useconds, "packet": hep3(payload, src=src, sport=sport, dst=dst, dport=dport,
                     seconds=seconds, useconds=useconds, extra=chunk(17, correlation.encode()) if correlation else b"")})
    return flow


@pytest.fixture(scope="module")
def chromium():
    need("Debian's chromium and Playwright for Python",
         bool(shutil.which("chromium")) and importlib.util.find_spec("playwright") is not None)
    from playwright.sync_api import sync_playwright
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        yield browser
        browser.close()


class Browsing:
    """One browser tab on a server's page, that records console errors and every request off the machine
    (refused, so none leaves it)."""

    def __init__(self, browser, server):
        self.base = f"http://127.0.0.1:{server.http_port}/"
        self.context = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
        self.off_machine: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _route(self, route):
        url = route.request.url
        if urllib.parse.urlsplit(url).hostname in ("127.0.0.1", "::1") or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            self.off_machine.append(url)
            route.abort()

    def open(self, fragment: str, ready: str):
        """Go to #/<fragment> and wait until that view has drawn."""
        if self.page.url.startswith(self.base):
            self.page.evaluate("delete document.getElementById('view').dataset.ready")
            self.page.evaluate("hash => { location.hash = hash }", "#/" + fragment)
        else:
            self.page.goto(self.base + "#/" + fragment)
        self.wait(ready)

    def wait(self, ready: str):
        self.page.wait_for_selector(f"#view[data-ready={ready}]", timeout=20_000)

    def until(self, check: Callable[[], bool], timeout_s: float = 20):
        """Wait for a check in Python (the page's policy refuses the JavaScript that Playwright would eval)."""
        deadline = time.monotonic() + timeout_s
        while not check():
            assert time.monotonic() < deadline, "the page did not get there"
            self.page.wait_for_timeout(100)

    def screenshot(self, name: str):
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)

    def arrows(self) -> list[str]:
        return self.page.locator(".ladder .arrow text.label").all_text_contents()

    def hosts(self) -> list[str]:
        return self.page.locator(".ladder text.host").all_text_contents()

    def close(self):
        self.context.close()


def test_the_page_finds_calls_draws_their_ladders_and_downloads_a_pcap(servers, chromium, tmp_path):
    """Real SIP from SIPp through Kamailio (over IPv4 and IPv6) and crafted calls (a refused one, a B2BUA's
    two legs): the search finds exactly them, each ladder has its arrows and host columns, a click shows
    the message, and the pcap opens in tshark."""
    server = servers()
    kamailio_calls(tmp_path, server.port, calls=2)
    kamailio_calls(tmp_path, server.port, ipv6=True)
    now_s = time.time() - 60
    busy = call_flow("busy@page", "5550001", "6660001", 486, now_s - 30)
    answered = call_flow("answered@page", "5550002", "6660002", 200, now_s - 20)
    leg_a = call_flow("leg-a@page", "5550003", "6660003", 200, now_s - 10, a=("10.1.0.1", 5060), b=("10.1.0.2", 5060))
    leg_b = call_flow("leg-b@page", "5550003", "6660003", 200, now_s - 9.995, a=("10.1.0.2", 5060),
                      b=("10.1.0.3", 5060), correlation="leg-a@page")
    cancelled = call_flow("cancelled@page", "5550004", "6660004", 487, now_s - 25,
                          trying="Trying -- your call is important to us, please hold the line")
    seconds = int(now_s - 28)
    register = [{"packet": hep3(sip_message("register@page", first, cseq, "5550005", "5550005"), seconds=seconds)}
                for first, cseq in (("REGISTER sip:example.com SIP/2.0", "1 REGISTER"), ("SIP/2.0 200 OK", "1 REGISTER"))]
    crafted = busy + answered + leg_a + leg_b + cancelled + register
    server.udp([m["packet"] for m in crafted])
    wait_for_rows(server, 36 + len(crafted))
    sipp = rows_json(server, "SELECT call_id, list(CASE WHEN sip_method IS NULL THEN split_part(payload, "
                             "chr(13), 1)[9:] ELSE sip_method END ORDER BY time) AS labels, list(payload ORDER "
                             "BY time) AS payloads FROM hep_1 WHERE from_user = 'sipp' AND time > now() - "
                             "INTERVAL 1 HOUR GROUP BY call_id ORDER BY min(time)")
    assert len(sipp) == 3 and all(len(call["labels"]) == 12 for call in sipp)
    wait_for_calls(server)
    tab = Browsing(chromium, server)
    try:
        tab.open("calls?range=1h", "calls")                          # INVITE dialogs: no REGISTER
        assert tab.page.locator("tr.call").count() == 3 + 5
        row = tab.page.locator('tr.call[data-call-id="cancelled@page"] .status')
        assert row.text_content() == "487 cancelled" and "fail" not in row.get_attribute("class")
        assert tab.page.locator('tr.call[data-call-id="busy@page"] .status').evaluate(
            "s => getComputedStyle(s).color") != row.evaluate("s => getComputedStyle(s).color")     # not red
        tab.screenshot("calls")
        tab.open("calls?range=1h&method=any", "calls")
        assert tab.page.locator("tr.call").count() == 3 + 6
        tab.open("calls?range=1h&method=REGISTER", "calls")
        assert tab.page.locator("tr.call").evaluate_all("rows => rows.map(r => r.dataset.callId)") == ["register@page"]
        tab.open("calls?range=1h&q=sipp", "calls")                   # SIPp's From user
        assert sorted(tab.page.locator("tr.call").evaluate_all("rows => rows.map(r => r.dataset.callId)")) == \
            sorted(call["call_id"] for call in sipp)
        tab.open("calls?range=1h&q=5550001", "calls")                # a number: exactly the call it made
        rows = tab.page.locator("tr.call")
        assert rows.count() == 1 and rows.first.get_attribute("data-call-id") == "busy@page"
        assert rows.first.locator(".status").text_content() == "486"
        assert "fail" in rows.first.locator(".status").get_attribute("class")
        tab.screenshot("search-by-number")
        tab.open("calls?range=1h&failed=1", "calls")                 # failed calls only: cancelled is none
        assert tab.page.locator("tr.call").evaluate_all("rows => rows.map(r => r.dataset.callId)") == ["busy@page"]
        tab.open("calls?range=1h&q=6660002", "calls")
        assert tab.page.locator("tr.call .status").all_text_contents() == ["200"]
        tab.page.locator("tr.call").first.click()                   # open it from the list
        tab.wait("call")
        assert tab.arrows() == [m["label"] for m in answered] and len(tab.hosts()) == 2

        for call, host_count, name in ((sipp[0], 3, "ladder-kamailio"), (sipp[2], 3, "ladder-ipv6")):
            start_ms = rows_json(server, f"SELECT epoch_ms(min(time)) AS ms FROM hep_1 WHERE call_id = "
                                         f"{hepop.sql_string(call['call_id'])}")[0]["ms"]
            tab.open(f"call?id={urllib.parse.quote(call['call_id'])}&from={start_ms}&to={start_ms + 5000}", "call")
            assert tab.arrows() == [label.strip() for label in call["labels"]]
            hosts = tab.hosts()
            assert len(hosts) == host_count
            if name == "ladder-ipv6":
                assert all(host.startswith("[::1]:") for host in hosts)
            tab.page.locator(".ladder .arrow").nth(3).click()           # the message behind an arrow
            assert tab.page.locator(".message pre.sip").text_content() == call["payloads"][3].replace("\r\n", "\n")
            tab.screenshot(name)

        start_ms = int((now_s - 10) * 1000)
        tab.open(f"call?id=leg-a@page&from={start_ms}&to={start_ms + 13000}", "call")      # both legs, one ladder
        both = sorted(leg_a + leg_b, key=lambda m: m["time_us"])
        assert tab.arrows() == [m["label"] for m in both]
        assert tab.hosts() == ["10.1.0.1:5060", "10.1.0.2:5060", "10.1.0.3:5060"]
        tab.screenshot("ladder-two-legs")

        start_ms = int((now_s - 25) * 1000)                            # a long reason phrase: cut to its arrow
        tab.open(f"call?id=cancelled@page&from={start_ms}&to={start_ms + 2000}", "call")
        labels = tab.page.locator(".ladder .arrow text.label")
        long_label = cancelled[1]["label"]
        assert labels.nth(1).get_attribute("data-full") == long_label and len(long_label) > 40
        assert labels.nth(1).text_content().endswith("…") and long_label.startswith(labels.nth(1).text_content()[:-1])
        box, hosts = labels.nth(1).bounding_box(), tab.page.locator(".ladder text.host")
        left, right = (hosts.nth(i).bounding_box() for i in range(2))
        assert box["width"] < (right["x"] + right["width"] / 2) - (left["x"] + left["width"] / 2)
        assert tab.arrows()[2:] == ["CANCEL", "200 OK", "487 Request Terminated", "ACK"]
        tab.screenshot("ladder-long-label")

        call = sipp[0]
        start_ms = rows_json(server, f"SELECT epoch_ms(min(time)) AS ms FROM hep_1 WHERE call_id = "
                                     f"{hepop.sql_string(call['call_id'])}")[0]["ms"]
        tab.open(f"call?id={urllib.parse.quote(call['call_id'])}&from={start_ms}&to={start_ms + 5000}", "call")
        with tab.page.expect_download() as download:
            tab.page.get_by_role("button", name="Download pcap").click()
        pcap = tmp_path / "page.pcap"
        download.value.save_as(str(pcap))
        ports = sorted({r["dst_port"] for r in rows_json(server, f"SELECT DISTINCT dst_port FROM hep_1 WHERE "
                        f"call_id = {hepop.sql_string(call['call_id'])} AND time > now() - INTERVAL 1 HOUR")})
        as_sip = [arg for port in ports for arg in ("-d", f"udp.port=={port},sip")]
        need("tshark", shutil.which("tshark") is not None)
        result = subprocess.run(["tshark", "-r", str(pcap), *as_sip, "-T", "fields", "-e", "sip.Call-ID"],
                                capture_output=True, text=True, timeout=60)
        assert result.stdout.split() == [call["call_id"]] * 12, result.stderr
        assert tab.errors == [] and tab.off_machine == []
    finally:
        tab.close()
    assert server.stop() == 0


def rtcp_report(jitter: int, fraction_lost: int) -> bytes:
    """An RTCP receiver report as captagent and heplify send it (HEP type 5, JSON)."""
    return json.dumps({"type": 201, "ssrc": 77, "report_count": 1, "report_blocks": [
        {"source_ssrc": 78, "fraction_lost": fraction_lost, "packets_lost": fraction_lost, "highest_seq_no": 500,
         "ia_jitter": jitter, "lsr": 0, "dlsr": 0}]}).encode()


def test_the_page_shows_a_calls_logs_rtcp_retransmissions_the_overview_and_sql(servers, chromium):
    server = servers()
    start_s = time.time() - 120
    flow = call_flow("rtcp@page", "5551234", "6661234", 200, start_s)
    seconds, useconds = divmod(round((start_s + 0.005) * 1e6), 1_000_000)
    flow.insert(1, {**flow[0], "label": "INVITE (retransmission)", "packet": hep3(
        flow[0]["payload"], sport=5060, dport=5060, src="10.0.0.1", dst="10.0.0.2", seconds=seconds,
        useconds=useconds)})
    side = [hep3(b"INFO routed rtcp@page to 6661234", proto_type=100, seconds=int(start_s) + 1,
                 extra=chunk(17, b"rtcp@page"))]
    side += [hep3(rtcp_report(jitter=80 * (i + 1), fraction_lost=8 * i), proto_type=5, seconds=int(start_s) + 3 + i,
                  src="10.0.0.2", sport=4001, dst="10.0.0.1", dport=4000, extra=chunk(17, b"rtcp@page"))
             for i in range(4)]
    server.udp([m["packet"] for m in flow] + side)
    wait_for_rows(server, len(flow))
    deadline = time.monotonic() + 15                    # the logs and reports are written too, in files of their own
    while count_of(server, "SELECT (SELECT count(*) FROM hep_100 WHERE time > now() - INTERVAL 1 HOUR) + (SELECT "
                           "count(*) FROM hep_5 WHERE time > now() - INTERVAL 1 HOUR) AS n") < len(side):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    wait_for_calls(server)
    tab = Browsing(chromium, server)
    try:
        start_ms = int(start_s * 1000)
        tab.open(f"call?id=rtcp@page&from={start_ms}&to={start_ms + 13000}", "call")
        labels = tab.arrows()
        assert labels[:2] == ["INVITE", "INVITE (retransmission)"] and len(labels) == len(flow)
        assert tab.page.locator(".arrow.retransmission").count() == 1
        tab.page.get_by_role("tab", name="Logs").click()
        tab.page.wait_for_selector("td.log")
        assert tab.page.locator("td.log").all_text_contents() == ["INFO routed rtcp@page to 6661234"]
        tab.screenshot("call-logs")
        tab.page.get_by_role("tab", name="RTCP").click()
        tab.page.wait_for_selector(".chart svg")
        charts = tab.page.locator(".chart")
        assert charts.locator("h3").all_text_contents() == ["Jitter", "Packet loss", "MOS (estimated)"]
        assert charts.first.locator("circle").count() == 4          # one point per report
        tab.screenshot("call-rtcp")

        tab.open("overview?range=1h", "overview")
        rate = tab.page.locator('[data-card="received per second"] .value')
        tab.until(lambda: rate.count() == 1 and rate.text_content().isdigit())       # refreshed: a rate
        received = int(tab.page.locator('[data-card="received"] .value').text_content())
        assert received == len(flow) + len(side)
        assert tab.page.locator(".chart").nth(0).locator("rect").count() > 0
        assert set(tab.page.locator(".chart").nth(1).locator(".legend span").all_text_contents()) == {"1xx", "2xx"}
        tab.screenshot("overview")

        sql = "SELECT call_id, status, messages FROM calls WHERE time > now() - INTERVAL 1 HOUR"
        tab.open("sql?q=" + urllib.parse.quote(sql), "sql")
        assert tab.page.locator(".result td").all_text_contents() == ["rtcp@page", "200", str(len(flow))]
        assert "now" not in tab.page.locator("p.muted[data-window]").get_attribute("data-window")
        assert tab.page.locator("p.muted[data-window]").get_attribute("data-window").endswith("Z/")
        tab.screenshot("sql")
        assert tab.errors == [] and tab.off_machine == []
        tab.open("sql?q=" + urllib.parse.quote("SELECT nothing FROM nowhere"), "sql")
        assert "nowhere" in tab.page.locator("#view .error").text_content()
        assert len(tab.errors) == 1 and "400" in tab.errors[0]        # the browser's line for the answer
    finally:
        tab.close()
    assert server.stop() == 0


def test_the_overview_charts_asr_ner_acd_and_post_dial_delay_per_node(servers, chromium):
    """The calls of two capture nodes in one minute: the overview's KPI charts have a point per node with
    the ASR, NER, ACD and post-dial delay of what was sent."""
    server = servers()
    base_s = (time.time() - 300) // 60 * 60 + 5
    sent = {"7": (200, 200, 486, 404), "edge-2": (200, 404)}
    packets = []
    for node, statuses in sent.items():
        for i, status in enumerate(statuses):
            flow = call_flow(f"kpi-{node}-{i}@page", f"555{i}", "6660001", status, base_s + len(packets) * 0.01)
            extra = b"" if node == "7" else chunk(19, node.encode())
            packets += [hep3(m["payload"], seconds=m["time_us"] // 1_000_000, useconds=m["time_us"] % 1_000_000,
                             extra=extra) for m in flow]
    server.udp(packets)
    wait_for_rows(server, len(packets))
    wait_for_calls(server)
    tab = Browsing(chromium, server)
    try:
        tab.open("overview?range=1h", "overview")
        tab.page.wait_for_selector(".chart h3:text('Post-dial delay')")
        points = lambda title: sorted(tab.page.locator(".chart", has=tab.page.locator(f"h3:text('{title}')"))
                                      .locator("circle title").all_text_contents())
        assert points("ASR") == ["node 7: 50 %", "node edge-2: 50 %"]
        assert points("NER") == ["node 7: 75 %", "node edge-2: 50 %"]          # 404 is not the callee's answer
        assert points("ACD") == ["node 7: 10 s", "node edge-2: 10 s"]
        assert points("Post-dial delay") == ["node 7 median: 700 ms", "node 7 p95: 1000 ms",
                                             "node edge-2 median: 700 ms", "node edge-2 p95: 970 ms"]
        tab.page.locator(".chart", has=tab.page.locator("h3:text('ASR')")).scroll_into_view_if_needed()
        tab.screenshot("overview-kpis")
        assert tab.errors == [] and tab.off_machine == []
    finally:
        tab.close()
    assert server.stop() == 0

def test_the_page_asks_for_a_login_and_refuses_a_wrong_password(servers, chromium, tmp_path):
    users = tmp_path / "users"
    users.write_text(f"admin:{hash_of('right-password')}\n")
    server = servers(API_USERS_FILE=str(users), API_TOKEN="page-token")
    flow = call_flow("login@page", "5557777", "6667777", 200, time.time() - 60)
    server.udp([m["packet"] for m in flow])
    token = login(server, "admin", "right-password")[2]["token"]
    deadline = time.monotonic() + 15
    while query(server, "SELECT count(*) AS n FROM hep_1 WHERE time > now() - INTERVAL 1 HOUR",
                headers=bearer(token))[2][0]["n"] < len(flow):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    wait_for_calls(server, headers=bearer(token))
    tab = Browsing(chromium, server)
    try:
        tab.page.goto(tab.base + "#/calls?range=1h")
        form = tab.page.locator("#login-form")
        form.wait_for(state="visible")
        assert tab.page.locator("tr.call").count() == 0                 # nothing shown before the login
        form.locator("input[name=username]").fill("admin")
        form.locator("input[name=password]").fill("wrong-password")
        form.get_by_role("button", name="Log in").click()
        tab.until(lambda: tab.page.locator("#login-error").text_content() != "")
        assert "password" in tab.page.locator("#login-error").text_content().lower()
        assert form.is_visible()
        tab.screenshot("login-refused")
        form.locator("summary").click()                                # or an API token: a wrong one
        form.locator("input[name=token]").fill("wrong-token")
        form.get_by_role("button", name="Log in").click()
        tab.until(lambda: "token is not accepted" in tab.page.locator("#login-error").text_content())
        assert form.is_visible() and tab.page.locator("tr.call").count() == 0
        form.locator("input[name=token]").fill("")
        form.locator("input[name=password]").fill("right-password")
        form.get_by_role("button", name="Log in").click()
        tab.wait("calls")                                       # the list the login was asked for
        assert tab.page.locator("tr.call").get_attribute("data-call-id") == "login@page"
        assert not form.is_visible()
        tab.screenshot("calls-after-login")
        # the 401s before the login are the browser's own console lines for refused requests, nothing else
        assert all("401" in error for error in tab.errors) and tab.off_machine == []
    finally:
        tab.close()
    tab = Browsing(chromium, server)                                   # the right API token, in a new tab
    try:
        tab.page.goto(tab.base + "#/calls?range=1h")
        form = tab.page.locator("#login-form")
        form.wait_for(state="visible")
        form.locator("summary").click()
        form.locator("input[name=token]").fill("page-token")
        form.get_by_role("button", name="Log in").click()
        tab.wait("calls")
        assert tab.page.locator("tr.call").get_attribute("data-call-id") == "login@page"
        assert all("401" in error for error in tab.errors) and tab.off_machine == []
    finally:
        tab.close()
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------------------------
# Object storage (issue 16): S3_URL, against a real S3-compatible server (moto's) on loopback
# ---------------------------------------------------------------------------------------------------------

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture(scope="session")
def s3_endpoint():
    """The URL of moto's S3 server, run as a child process for the whole session."""
    need("moto[server] (pip install 'moto[server]')", importlib.util.find_spec("moto") is not None)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            break
        assert process.poll() is None and time.monotonic() < deadline, "moto's server did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    process.kill()
    process.wait()


def s3_client(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1",
                             access_key="testing", secret_key="testing", allow_bucket_creation=True)


def new_bucket(endpoint: str, name: str) -> pafs.S3FileSystem:
    client = s3_client(endpoint)
    client.create_dir(name)
    return client


def s3_settings(endpoint: str, url: str, **more) -> dict:
    return {"S3_URL": url, "S3_ENDPOINT": endpoint, "UPLOAD_DELAY_S": "0.5", **S3_CREDENTIALS, **more}


def bucket_objects(client: pafs.S3FileSystem, base: str) -> list[str]:
    """The keys of every object below bucket/prefix `base`, relative to it."""
    return sorted(info.path[len(base) + 1:] for info in
                  client.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
                  if info.type == pafs.FileType.File)


def bucket_listed(client: pafs.S3FileSystem, base: str, type_folder="hep_1-0") -> dict[str, list[str]]:
    """The objects each writer's metadata.json of a type in the bucket lists, by writer."""
    listed = {}
    for key in bucket_objects(client, base):
        if key.endswith(f"/{type_folder}/metadata.json"):
            with client.open_input_stream(f"{base}/{key}") as source:
                listed[key.split("/")[0]] = [entry["path"] for entry in json.load(source)["files"]]
    return listed


def past_sip(tag: str, n: int, ago_s: int) -> list[bytes]:
    """n SIP messages captured `ago_s` seconds ago: their 10-minute folder has closed."""
    seconds = int(time.time()) - ago_s
    return [hep3(sip(f"{tag}-{i}"), seconds=seconds, useconds=i) for i in range(n)]


def wait_for_metric(server, name: str, value: float, timeout=30) -> None:
    deadline = time.monotonic() + timeout
    while metric(server, name) < value:
        assert time.monotonic() < deadline, f"{name} stayed under {value}:\n{''.join(server.lines[-20:])}"
        time.sleep(0.2)


def recent_call_ids(server) -> list[str]:
    status, _, body = query(server, "SELECT call_id FROM hep_1 WHERE time > now() - INTERVAL 3 HOUR")
    assert status == 200, body
    return sorted(row["call_id"] for row in body)


def test_two_writers_share_one_bucket_and_each_answers_for_every_row_of_both_once(servers, tmp_path, s3_endpoint):
    client = new_bucket(s3_endpoint, "two-writers")
    # Folders of two hours ago go up; this one's stays on each box all through the test
    settings = s3_settings(s3_endpoint, "s3://two-writers/eu1", UPLOAD_DELAY_S="1800")
    first = servers(tmp_path / "first", WRITER_ID="first", **settings)
    second = servers(tmp_path / "second", WRITER_ID="second", **settings)
    first.udp(past_sip("first-old", 300, 7200) + [hep3(sip(f"first-new-{i}")) for i in range(50)], pace_every=50)
    second.udp(past_sip("second-old", 200, 7200) + [hep3(sip(f"second-new-{i}")) for i in range(30)], pace_every=50)
    wait_for_metric(first, "uploaded_rows_total", 300)
    wait_for_metric(second, "uploaded_rows_total", 200)
    # Each box answers for every object in the bucket and for its own rows not uploaded yet
    uploaded = [f"first-old-{i}" for i in range(300)] + [f"second-old-{i}" for i in range(200)]
    for server, own in ((first, [f"first-new-{i}" for i in range(50)]),
                        (second, [f"second-new-{i}" for i in range(30)])):
        deadline = time.monotonic() + 15
        while recent_call_ids(server) != sorted(uploaded + own):       # the new rows are there a flush later
            assert time.monotonic() < deadline, f"{len(recent_call_ids(server))} rows of {len(uploaded + own)}"
            time.sleep(0.2)
    assert metric(first, "upload_backlog_folders") == 0 and metric(first, "upload_errors_total") == 0
    health = json.loads(http(first, "/health")[2])
    assert health["uploads"] == {"status": "ok", "backlog_folders": 0}
    # On each box, only what is not uploaded yet: this 10-minute folder's rows
    assert sorted(row["call_id"] for row in stored_rows(tmp_path / "first", running=True)) == \
        sorted(f"first-new-{i}" for i in range(50))
    # The call records went up with their messages: each box's `calls` has both writers' calls, once
    for server, own in ((first, [f"first-new-{i}" for i in range(50)]),
                        (second, [f"second-new-{i}" for i in range(30)])):
        wait_for_calls(server)
        calls = rows_json(server, "SELECT call_id FROM calls WHERE time > now() - INTERVAL 3 HOUR")
        assert sorted(call["call_id"] for call in calls) == sorted(uploaded + own)
    assert first.stop() == 0 and second.stop() == 0
    # In the bucket: one object per writer's closed folder and type, each listed once, by its writer, nothing else
    objects = bucket_objects(client, "two-writers/eu1")
    records = bucket_listed(client, "two-writers/eu1", "calls-0")
    assert sorted(records) == ["first", "second"] and all(len(keys) == 1 for keys in records.values())
    listed = bucket_listed(client, "two-writers/eu1")
    parquet = [key for key in objects if key.endswith(".parquet") and "/calls-0/" not in key]
    assert sorted(listed) == ["first", "second"] and all(len(keys) == 1 for keys in listed.values())
    assert sorted(key for keys in listed.values() for key in keys) == parquet
    assert sorted(key for keys in records.values() for key in keys) == sorted(
        key for key in objects if key.endswith(".parquet") and "/calls-0/" in key)
    assert not [key for key in objects if not key.endswith((".parquet", "metadata.json"))]
    # Any engine reads the bucket directly: DuckDB over pyarrow's dataset, ClickHouse (chdb) by s3()
    dataset = ds.dataset([f"two-writers/eu1/{key}" for key in parquet], filesystem=client, format="parquet")
    with duckdb.connect() as con:
        found = con.register("objects", dataset).sql("SELECT call_id FROM objects ORDER BY call_id").fetchall()
    assert [row[0] for row in found] == sorted([f"first-old-{i}" for i in range(300)] +
                                              [f"second-old-{i}" for i in range(200)])
    need("chdb", importlib.util.find_spec("chdb") is not None)
    readers = [block for block, why in readme_shell_blocks() if why and "test_two_writers_share_one_bucket" in why]
    assert len(readers) == 2                                    # the README's DuckDB and ClickHouse, as written
    for block in readers:
        result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=tmp_path, capture_output=True,
                                text=True, timeout=120, env={**os.environ, **settings})
        assert result.returncode == 0 and re.search(r"INVITE\D+500\b", result.stdout), (block, result.stdout,
                                                                                        result.stderr[-2000:])


def open_bucket_store(root: Path, endpoint: str, url: str) -> tuple[hepop.Storage, hepop.Uploader]:
    """A writer's storage with a bucket, and its uploader, in this process (S3_CREDENTIALS in its environment)."""
    config = hepop.Config.load([], {"PARQUET_DIR": str(root), "WRITER_ID": "w", **s3_settings(endpoint, url)})
    bucket = hepop.open_bucket(config)
    storage = hepop.Storage(str(root), "w", bucket=bucket)
    storage.leases.DELETE_GRACE_S = 0
    return storage, hepop.Uploader(config, storage, hepop.Counters())


def rows_everywhere(storage: hepop.Storage, proto_type=1) -> list[dict]:
    """Every row of the files this writer lists on its disk and in the bucket, read from their stores."""
    rows = []
    for store in (storage.types.get(proto_type), storage.uploaded.get(proto_type)):
        for entry in store.snapshot() if store else []:
            with store.file_store.open_input(entry["path"]) as source:
                rows += pq.read_table(source).to_pylist()
    return rows


UPLOAD_CRASH_SCRIPT = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
import hepop
root, endpoint, url, step = sys.argv[2:6]
config = hepop.Config.load([], {"PARQUET_DIR": root, "WRITER_ID": "w", "S3_URL": url, "S3_ENDPOINT": endpoint,
                                "UPLOAD_DELAY_S": "1"})
storage = hepop.Storage(root, "w", bucket=hepop.open_bucket(config))
real_publish, real_delete = hepop.S3FileStore.publish, hepop.TypeStore.delete
def publish(self, spool_path, key):
    real_publish(self, spool_path, key)
    if step == "uploaded":                  # the object is in the bucket, its listing not yet
        os._exit(9)
def delete(self, entries):
    if step == "listed":                    # the bucket's metadata.json lists it, the disk's its inputs
        os._exit(9)
    real_delete(self, entries)
hepop.S3FileStore.publish, hepop.TypeStore.delete = publish, delete
hepop.Uploader(config, storage, hepop.Counters()).run_once()
"""


@pytest.mark.parametrize("step", ["uploaded", "listed"])
def test_a_writer_killed_during_an_upload_has_every_row_once_after_its_restart(tmp_path, s3_endpoint, step,
                                                                              monkeypatch):
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    new_bucket(s3_endpoint, f"crash-{step}")
    url = f"s3://crash-{step}/box"
    storage, uploader = open_bucket_store(tmp_path, s3_endpoint, url)
    local = storage.store(1)
    local.write(sip_table([HOUR + 10, HOUR + 20, HOUR + 700], "first"))      # two 10-minute folders
    local.write(sip_table([HOUR + 30, HOUR + 710], "second"))
    sent = canonical(rows_everywhere(storage))
    storage.close()                                                       # the crashing process takes the folder
    result = subprocess.run([sys.executable, "-c", UPLOAD_CRASH_SCRIPT, str(HERE), str(tmp_path), s3_endpoint, url,
                             step], capture_output=True, text=True, timeout=60)
    assert result.returncode == 9, result.stderr                         # it died where it was told to
    storage, uploader = open_bucket_store(tmp_path, s3_endpoint, url)   # the restart
    assert canonical(rows_everywhere(storage)) == sent
    on_disk = {e["path"] for e in storage.types[1].snapshot()}
    in_bucket = {e["path"] for e in storage.uploaded[1].snapshot()}
    assert len(in_bucket) == 1 and not on_disk & in_bucket and len(on_disk) == 2     # one folder went up
    assert storage.types[1].sequence >= max(e["id"] for e in storage.uploaded[1].snapshot())
    uploader.run_once()                                                   # and the upload completes
    assert canonical(rows_everywhere(storage)) == sent
    assert not storage.types[1].snapshot() and len(storage.uploaded[1].snapshot()) == 2
    client = s3_client(s3_endpoint)
    assert sorted(bucket_listed(client, f"crash-{step}/box")["w"]) == \
        [key for key in bucket_objects(client, f"crash-{step}/box") if key.endswith(".parquet")]
    assert not [p for p in tmp_path.rglob("*.parquet")]                  # nothing left on this disk
    # Retention applies to the bucket's objects as to files on disk
    config = hepop.Config.load([], {"PARQUET_DIR": str(tmp_path), "WRITER_ID": "w", "MAX_DISK_PERCENT": "0"})
    compactor = hepop.Compactor(config, storage, hepop.Counters())
    compactor.run_once(now_us=(HOUR + 8 * 86400) * 1_000_000)
    assert not storage.uploaded[1].snapshot() and bucket_listed(client, f"crash-{step}/box")["w"] == []
    assert not [key for key in bucket_objects(client, f"crash-{step}/box") if key.endswith(".parquet")]
    compactor.close()
    storage.close()


class Proxy:
    """A TCP proxy on loopback to `target_port` that can go down (connections refused, those open cut) and
    come back up on the same port: an object store's outage, as its clients see it."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.lock = threading.Lock()
        self.open: list[socket.socket] = []
        self.listener = None
        self.up()

    def up(self):
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self):
        self.listener.shutdown(socket.SHUT_RDWR)            # wakes the accept() of its thread, on Linux
        self.listener.close()
        with self.lock:
            for sock in self.open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self.open.clear()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            with self.lock:
                self.open += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source, target):
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)


def test_a_bucket_down_for_12_s_costs_disk_space_and_no_packet(servers, tmp_path, s3_endpoint):
    """Down through a failed try, back before the next one, 10 s later (the backoff doubles from 5 s)."""
    new_bucket(s3_endpoint, "outage")
    proxy = Proxy(int(s3_endpoint.rsplit(":", 1)[1]))
    server = servers(**s3_settings(f"http://127.0.0.1:{proxy.port}", "s3://outage/box", UPLOAD_DELAY_S="1800"))
    proxy.down()
    went_down = time.monotonic()
    server.udp(past_sip("during-a", 200, 7200), pace_every=50)            # two closed folders
    server.udp(past_sip("during-b", 100, 7800), pace_every=50)
    wait_for_metric(server, "upload_errors_total", 1)
    status, _, body = http(server, "/health")
    uploads = json.loads(body)["uploads"]
    assert status == 200 and uploads["status"] == "failing" and uploads["backlog_folders"] == 2 * 2, body  # and records
    assert "outage" in uploads["error"] or "127.0.0.1" in uploads["error"], uploads
    status, _, body = query(server, "SELECT count(*) AS n FROM hep_1 WHERE time > now() - INTERVAL 3 HOUR")
    assert status == 503 and "bucket" in body["error"]          # never an answer without the other writers
    assert len(stored_rows(tmp_path / "data", running=True)) == 300         # on this disk meanwhile
    time.sleep(max(0.0, 12 - (time.monotonic() - went_down)))
    proxy.up()
    wait_for_metric(server, "uploaded_rows_total", 300, timeout=90)             # the backlog drains
    wait_for_metric(server, "uploaded_call_records_total", 300, timeout=30)     # and the calls' records
    assert metric(server, "upload_backlog_folders") == 0 and metric(server, "upload_errors_total") >= 1
    assert json.loads(http(server, "/health")[2])["uploads"] == {"status": "ok", "backlog_folders": 0}
    assert recent_call_ids(server) == sorted([f"during-a-{i}" for i in range(200)] + [f"during-b-{i}" for i in range(100)])
    assert stored_rows(tmp_path / "data", running=True) == []
    assert server.stop() == 0
    assert any("uploads to the bucket work again" in line for line in server.lines)
    assert any("next try in 10 s" in line for line in server.lines)               # the backoff doubled


def test_the_binary_uploads_to_a_bucket_and_s3_settings_that_cannot_work_exit_2_naming_them(tmp_path, s3_endpoint,
                                                                                           capsys):
    need_binary()
    for flags, named in ((["--s3-url", "s3://Capture"], "bad setting S3_URL='s3://Capture'"),
                         (["--s3-endpoint", "ftp://x"], "bad setting S3_ENDPOINT='ftp://x'"),
                         (["--upload-delay-s", "-1"], "bad setting UPLOAD_DELAY_S='-1'")):
        assert hepop.main(flags) == 2 and named in capsys.readouterr().err
    client = new_bucket(s3_endpoint, "binary")
    closed_port = free_port()                                            # nothing listens there
    base = {"PATH": "/usr/bin:/bin", "PARQUET_DIR": str(tmp_path / "data"), "WRITER_ID": "box",
            "MAX_DISK_PERCENT": "0", **S3_CREDENTIALS}
    for settings, named in (({"S3_URL": "s3://no-such-bucket/eu1", "S3_ENDPOINT": s3_endpoint},
                             "S3_URL=s3://no-such-bucket/eu1 (S3_ENDPOINT=" + s3_endpoint + ", S3_REGION=us-east-1): "
                             "bucket no-such-bucket does not exist"),
                            ({"S3_URL": "s3://binary", "S3_ENDPOINT": f"http://127.0.0.1:{closed_port}"},
                             f"S3_ENDPOINT=http://127.0.0.1:{closed_port}")):
        started = time.monotonic()
        result = subprocess.run([str(BINARY)], env={**base, "PORT": str(free_port()), **settings},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and named in result.stderr, (settings, result.stderr)
        assert time.monotonic() - started < 20
    # With settings that work, the binary (pyarrow's S3 inside) uploads a closed folder
    port, http_port = free_port(), free_port()
    process = subprocess.Popen([str(BINARY)], stderr=subprocess.PIPE, text=True, env={
        **base, "PORT": str(port), "HTTP_PORT": str(http_port), "S3_URL": "s3://binary/eu1",
        "S3_ENDPOINT": s3_endpoint, "UPLOAD_DELAY_S": "1"})
    try:
        server = SimpleNamespace(port=port, http_port=http_port)        # for the helpers that take a Server
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                if http(server, "/health")[0] == 200:
                    break
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        Server.udp(server, past_sip("binary", 50, 7200))
        wait_for_metric(server, "uploaded_rows_total", 50)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    objects = [key for key in bucket_objects(client, "binary/eu1") if key.endswith(".parquet")]
    assert bucket_listed(client, "binary/eu1")["box"] == objects and len(objects) == 1
    with client.open_input_file(f"binary/eu1/{objects[0]}") as source:
        assert sorted(pq.read_table(source)["call_id"].to_pylist()) == sorted(f"binary-{i}" for i in range(50))


def test_a_listing_in_the_bucket_that_fails_leaves_no_second_object_of_the_same_rows(tmp_path, s3_endpoint,
                                                                                     monkeypatch, caplog):
    """The object is in the bucket and its metadata.json PUT fails: the folder's next upload writes the
    same key again, so no unlisted object of the same rows is left for a restart to adopt."""
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    client = new_bucket(s3_endpoint, "failed-listing")
    storage, uploader = open_bucket_store(tmp_path, s3_endpoint, "s3://failed-listing/box")
    storage.store(1).write(sip_table([HOUR + 10, HOUR + 20], "first"))
    storage.uploaded_store(1)                                             # its metadata.json is in the bucket
    sent = canonical(rows_everywhere(storage))
    real_write, failures = hepop.S3FileStore.write, []

    def failing_put(self, key, write):
        if key.endswith("metadata.json") and not failures:
            failures.append(key)
            raise OSError("AWS Error SLOW_DOWN during PutObject operation")
        return real_write(self, key, write)

    monkeypatch.setattr(hepop.S3FileStore, "write", failing_put)
    with pytest.raises(OSError):
        uploader.run_once()
    assert failures and storage.uploaded[1].snapshot() == [] and len(storage.types[1].snapshot()) == 1
    storage.store(1).write(sip_table([HOUR + 30], "late"))                 # a late packet meanwhile
    sent += canonical(rows_of(storage.store(1))[-1:])
    uploader.run_once()
    objects = [key for key in bucket_objects(client, "failed-listing/box") if key.endswith(".parquet")]
    assert len(objects) == 1 and bucket_listed(client, "failed-listing/box")["w"] == objects
    storage.close()
    caplog.clear()
    storage, uploader = open_bucket_store(tmp_path, s3_endpoint, "s3://failed-listing/box")    # a restart
    assert sorted(canonical(rows_everywhere(storage))) == sorted(sent) and not storage.types[1].snapshot()
    assert not [r.message for r in caplog.records if r.levelno >= logging.WARNING]   # the bucket's listing is whole
    storage.close()


def test_the_bucket_hours_are_compacted_and_raw_files_it_holds_never_come_back(tmp_path, s3_endpoint, monkeypatch):
    """The closed hours of the bucket become one sorted object each, as on disk.  Raw files of this disk
    whose deletion after their upload was lost (put back here as a failing disk would leave them) are
    deleted at the restart even once their object was compacted: the hour's footer names them."""
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    client = new_bucket(s3_endpoint, "compacted")
    storage, uploader = open_bucket_store(tmp_path, s3_endpoint, "s3://compacted/box")
    storage.store(1).write(sip_table([HOUR + 10, HOUR + 700, HOUR + 1300], "first"))    # three folders
    storage.store(1).write(sip_table([HOUR + 20, HOUR + 3700], "second"))             # and the next hour
    sent = canonical(rows_everywhere(storage))
    kept = tmp_path.parent / f"{tmp_path.name}-before-upload"
    shutil.copytree(tmp_path / "w/dbs", kept)
    uploader.run_once()
    assert len(storage.uploaded[1].snapshot()) == 4 and not storage.types[1].snapshot()
    config = hepop.Config.load([], {"PARQUET_DIR": str(tmp_path), "WRITER_ID": "w", "MAX_DISK_PERCENT": "0",
                                    "COMPACT_GRACE_S": "60", "S3_URL": "s3://compacted/box"})
    compactor = hepop.Compactor(config, storage, hepop.Counters())
    compactor.run_once(now_us=(HOUR + 3600 + 120) * 1_000_000)           # the first hour is closed
    compactor.close()
    entries = storage.uploaded[1].snapshot()
    assert sorted(e["type"] for e in entries) == ["compacted", "raw"] and canonical(rows_everywhere(storage)) == sent
    objects = [key for key in bucket_objects(client, "compacted/box") if key.endswith(".parquet")]
    assert sorted(objects) == sorted(e["path"] for e in entries) == sorted(bucket_listed(client, "compacted/box")["w"])
    compacted = next(e for e in entries if e["type"] == "compacted")
    with client.open_input_file(f"compacted/box/{compacted['path']}") as source:
        times = pq.read_table(source)["time"].to_pylist()
    assert times == sorted(times) and len(times) == 4
    storage.close()
    shutil.rmtree(tmp_path / "w/dbs")
    shutil.copytree(kept, tmp_path / "w/dbs")                            # the lost deletions
    storage, uploader = open_bucket_store(tmp_path, s3_endpoint, "s3://compacted/box")    # a restart
    assert not storage.types[1].snapshot() and canonical(rows_everywhere(storage)) == sent
    storage.close()


# ---------------------------------------------------------------------------------------------------------
# Closed means closed: what a logged-in user, or anyone, could do that they must not
# ---------------------------------------------------------------------------------------------------------

def test_query_reads_the_stored_parquet_files_and_nothing_else_under_parquet_dir(servers, tmp_path):
    """A login's token could read the signing key through read_text(); now /query reads the tables hepop
    makes and nothing else, the key lives outside PARQUET_DIR, and an old key inside it is deleted."""
    users = tmp_path / "users"
    users.write_text(f"ops:{hash_of('pw')}\nguest:{hash_of('pw2')}\n")
    old_key = tmp_path / "data" / "test" / ".jwt-secret"
    old_key.parent.mkdir(parents=True)
    old_key.write_text("an-old-key-queries-could-read")
    server = servers(API_USERS_FILE=str(users))
    assert not old_key.exists() and (tmp_path / "data.jwt-secret").exists()
    token = login(server, "guest", "pw2")[2]["token"]
    server.udp([hep3(sip(f"sandbox-{i}")) for i in range(5)])
    wait_for_rows(server, 5, headers=bearer(token))
    data = tmp_path / "data"
    secrets = [p for p in data.rglob("*") if p.is_file() and p.suffix != ".parquet"]
    assert any(p.name == "metadata.json" for p in secrets) and any(p.name == ".lock" for p in secrets)
    parquet = next(data.rglob("*.parquet"))
    key_text = (tmp_path / "data.jwt-secret").read_text().strip()
    for path in secrets + [tmp_path / "data.jwt-secret"]:
        for sql in [f"SELECT * FROM read_text('{path}')", f"SELECT * FROM read_blob('{path}')",
                    f"SELECT * FROM read_csv('{path}')", f"SELECT * FROM read_json('{path}')",
                    f"SELECT * FROM read_csv_auto('{path}', header=false)", f"SELECT * FROM '{path}'",
                    f"DESCRIBE '{path}'", f"SELECT count(*) FROM (SELECT * FROM read_text('{path}'))",
                    f"WITH k AS (FROM read_text('{path}')) SELECT * FROM hep_1, k",
                    f"SELECT * FROM glob('{path.parent}/*')"]:
            status, _, body = query(server, sql, headers=bearer(token))
            assert status == 400 and body["error"], (sql, body)
            assert key_text not in json.dumps(body)
    for sql in [f"SELECT * FROM read_parquet('{parquet}')", f"SELECT * FROM parquet_metadata('{parquet}')",
                "SELECT * FROM pg_catalog.pg_settings", "SELECT * FROM information_schema.tables",
                "SELECT * FROM duckdb_views()", "SELECT * FROM main.hep_1"]:
        status, _, body = query(server, sql, headers=bearer(token))
        assert status == 400 and body["error"], (sql, body)
    assert rows_json_as(server, "WITH x AS (SELECT call_id FROM hep_1) SELECT count(*) AS n FROM x, range(2)",
                        bearer(token)) == [{"n": 10}]
    # A user taken out of the file loses the tokens they had; SIGHUP reads the file again and hepop lives on.
    users.write_text(f"ops:{hash_of('pw')}\n")
    assert query(server, "SELECT 1 AS one", headers=bearer(token))[0] == 401
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log("1 users")
    assert server.process.poll() is None                     # SIGHUP used to kill hepop
    assert query(server, "SELECT 1 AS one", headers=bearer(token))[0] == 401
    assert login(server, "ops", "pw")[0] == 201 and login(server, "guest", "pw2")[0] == 401
    assert server.stop() == 0


def rows_json_as(server, sql, headers):
    status, _, body = query(server, sql, headers=headers)
    assert status == 200, body
    return body


def test_a_key_file_inside_parquet_dir_is_a_bad_setting(tmp_path):
    result = run_hepop(env={"PARQUET_DIR": str(tmp_path), "JWT_SECRET_FILE": str(tmp_path / "w" / "key")})
    assert result.returncode == 2 and "JWT_SECRET_FILE" in result.stderr


@pytest.mark.parametrize("sql", [
    "SELECT * FROM json_execute_serialized_sql(json_serialize_sql('SELECT current_setting(''allowed_directories'') AS a'))",
    "SELECT * FROM query('SELECT 1')",
    "SELECT * FROM query_table('hep_1')",
    "SELECT * FROM (SELECT * FROM duckdb_settings())",
    "SELECT * FROM hep_1, LATERAL (SELECT * FROM query('SELECT 1'))",
    "WITH s AS (SELECT * FROM duckdb_settings()) SELECT * FROM s",
    "SELECT (SELECT value FROM duckdb_settings() LIMIT 1) AS v",
    "SELECT getenv('HOME') AS h",
    "SELECT * FROM duckdb_temporary_files()",
    "EXPLAIN SELECT * FROM json_execute_serialized_sql(json_serialize_sql('SELECT 1'))",
])
def test_functions_that_run_sql_text_or_show_settings_are_refused_however_wrapped(seeded, sql):
    server, _ = seeded
    status, _, body = query(server, sql)
    assert status == 400 and "not available here" in body["error"] and str(server.data_dir) not in json.dumps(body)


def test_wrong_logins_sent_at_once_are_limited_as_if_sent_one_by_one(servers, tmp_path):
    users = tmp_path / "users"
    users.write_text(f"admin:{hash_of('pw')}\n")
    server = servers(API_USERS_FILE=str(users))
    start = threading.Barrier(40)
    statuses = []

    def attempt(i):
        start.wait()
        statuses.append(login(server, "admin", f"guess-{i}")[0])
    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [401] * hepop.LOGIN_FAILURES_MAX + [429] * (40 - hepop.LOGIN_FAILURES_MAX)
    assert server.stop() == 0
    assert server.counters()['logins_total{result="failed"}'] == hepop.LOGIN_FAILURES_MAX


def test_framing_and_values_that_were_misread_get_a_clear_400(servers, tmp_path):
    server = servers()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nContent-Length: 40\r\n\r\n"
                     b"SELECT 1 AS one")
        answer = b""
        while data := sock.recv(65536):
            answer += data
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 400") and "Content-Length headers that disagree" in answer
    status, _, body = http(server, "/index.html%00.js")
    assert status == 400 and "NUL" in json.loads(body)["error"]
    status, body = homer_search(server, {"1_call": [field("from_user", "alice")]},
                                window={"from": 10 ** 17, "to": 10 ** 17 + 1})
    assert status == 400 and "milliseconds since 1970" in body["error"] and "Binder" not in body["error"]
    now = int(time.time())
    server.udp([hep3(sip("micro-ok"), seconds=now, useconds=999_999),
                hep3(sip("micro-bad"), seconds=now, useconds=1_000_000)])
    server.tcp(hep3(sip("micro-bad-tcp"), seconds=now, useconds=4_000_000_000))
    wait_for_rows(server, 1)
    time.sleep(0.5)
    assert server.stop() == 0
    assert [r["call_id"] for r in stored_rows(tmp_path / "data", columns="call_id")] == ["micro-ok"]
    assert server.counters()['hep_dropped_total{reason="malformed_bad_microseconds"}'] == 2
    with pytest.raises(hepop.HepError, match="bad_microseconds"):
        hepop.decode(hep3(sip("x"), seconds=now, useconds=1_000_000))


def test_garbage_tricklers_on_every_tcp_slot_do_not_shut_out_a_real_agent(servers, tmp_path):
    """25 connections that send a garbage byte every half second, never idle and never framed, held all
    20 slots for good: a real agent was reset.  Now it takes the slot of the one unframed longest, and
    every trickler is closed once it has sent no frame for TCP_FRAME_TIMEOUT_S."""
    server = servers(MAX_TCP_CONNECTIONS="20", TCP_FRAME_TIMEOUT_S="4")
    tricklers = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(25)]
    stop = threading.Event()

    def trickle():
        while not stop.is_set():
            for sock in tricklers:
                with contextlib.suppress(OSError):
                    sock.send(b"x")
            stop.wait(0.5)
    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        time.sleep(1.5)
        with socket.create_connection(("127.0.0.1", server.port)) as agent:
            for i in range(50):
                agent.sendall(hep3(sip(f"real-{i}")))
            wait_for_rows(server, 50)
        time.sleep(4.5)             # past TCP_FRAME_TIMEOUT_S and the once-a-second check
        still_open = sum(not closed_by_server(sock) for sock in tricklers)
    finally:
        stop.set()
        thread.join()
        for sock in tricklers:
            sock.close()
    assert still_open == 0
    assert server.stop() == 0
    assert count_rows(tmp_path) == 50
    assert server.counters()["tcp_unframed_closed_total"] >= 20


def closed_by_server(sock: socket.socket, wait_s: float = 0.5) -> bool:
    """Whether the server closed the connection: its end reached within wait_s, whatever came before it."""
    sock.settimeout(wait_s)
    try:
        while sock.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def count_rows(tmp_path: Path) -> int:
    return len(stored_rows(tmp_path / "data", columns="call_id"))


def test_slowloris_on_every_http_slot_does_not_stop_health_or_a_query(servers, tmp_path):
    """12 connections sending a header line every second held the 8 slots (each read came within the
    per-read timeout): /health answered none.  Now the head is bounded as a whole, and a new connection
    takes the slot of the one waiting longest for its head."""
    server = servers(MAX_HTTP_CONNECTIONS="8", API_TOKEN="tok")
    slow = []
    for _ in range(12):
        with contextlib.suppress(OSError):
            sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=5)
            sock.sendall(b"GET /query?q=SELECT+1 HTTP/1.1\r\nHost: x\r\n")
            slow.append(sock)
    stop = threading.Event()

    def drip():
        n = 0
        while not stop.wait(1.0):
            n += 1
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.sendall(f"X-Slow-{n}: 1\r\n".encode())
    thread = threading.Thread(target=drip)
    thread.start()
    answered, asked = 0, 0
    try:
        started = time.monotonic()
        while time.monotonic() - started < 12:        # past HEAD_TIMEOUT_S
            asked += 1
            with contextlib.suppress(OSError, http_client.HTTPException):
                answered += http(server, "/health")[0] == 200
            asked += 1
            with contextlib.suppress(OSError, http_client.HTTPException):
                answered += query(server, "SELECT 42 AS n", headers=bearer("tok"))[2] == [{"n": 42}]
            time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    closed = sum(closed_by_server(sock) for sock in slow)
    for sock in slow:
        sock.close()
    assert answered == asked
    assert closed == len(slow)
    assert server.stop() == 0
    counters = server.counters()
    assert counters["http_connections_evicted_total"] + counters.get("http_head_timeouts_total", 0) >= 4


def test_a_writer_folder_linked_out_of_parquet_dir_is_left_out_and_the_others_answer(servers, tmp_path):
    """A writer's folder that is a symlink out of PARQUET_DIR made every query of its type fail with
    DuckDB's Permission Error; now its files are left out, the answer says so, the rest answer."""
    outside = tmp_path / "elsewhere"
    for writer_id, data_dir, tag in (("w2", outside, "linked"), ("w3", tmp_path / "data", "other")):
        writer = servers(data_dir, WRITER_ID=writer_id)
        writer.udp([hep3(sip(f"{tag}-{i}")) for i in range(3)])
        wait_for_rows(writer, 3)
        assert writer.stop() == 0
    os.symlink(outside / "w2", tmp_path / "data" / "w2")
    server = servers()
    server.udp([hep3(sip(f"own-{i}")) for i in range(2)])
    wait_for_rows(server, 5)
    status, head, body = query(server, "SELECT call_id FROM hep_1 WHERE time > now() - INTERVAL 1 HOUR ORDER BY call_id")
    assert status == 200, body
    assert [row["call_id"] for row in body] == ["other-0", "other-1", "other-2", "own-0", "own-1"]
    assert head["x-hepop-left-out"] == "w2"
    assert server.stop() == 0
    assert any("leave out the files of writers w2" in line for line in server.lines)


def test_a_flood_inside_the_current_hour_is_held_at_the_disk_limit_and_counted(servers, tmp_path):
    """MAX_DISK_BYTES=3M and 15 MB of payloads in the current hour: the guard deleted the older hours, then
    the files grew past the limit without bound while /health said ok.  Now what arrives once only this
    hour is left is dropped as disk_full, /health says so, and nothing is dropped silently."""
    server = servers(MAX_DISK_BYTES="3M", FLUSH_BYTES="256K", RETENTION="3650d")
    now = int(time.time())
    old = [hep3(sip(f"old-{i}"), seconds=now - 7200 - i) for i in range(20)]
    server.udp(old)
    wait_for_rows(server, 20)
    sent, healths = 0, []
    for i in range(1500):                                          # 15 MB, over about 6 s, about 2:1 in zstd
        server.udp([hep3(sip(f"flood-{i}", extra=f"X-Pad: {os.urandom(5000).hex()}\r\n"))])
        sent += 1
        if i % 100 == 99:
            time.sleep(0.4)
            status, _, body = http(server, "/health")
            healths.append((status, json.loads(body)["status"]))
    time.sleep(1.0)
    type_dir = tmp_path / "data/test/dbs/hep-0/hep_1-0"
    listed_bytes = sum(f["size_bytes"] for f in json.loads((type_dir / "metadata.json").read_text())["files"])
    assert (503, "disk_full") in healths and healths[0] == (200, "ok")
    assert server.stop() == 0
    counters = server.counters()
    stored = [r["call_id"] for r in stored_rows(tmp_path / "data", columns="call_id")]
    assert not [c for c in stored if c.startswith("old-")]            # the older hour went first
    dropped = counters['hep_dropped_total{reason="disk_full"}']
    assert dropped > 500 and len(stored) + dropped == sent             # every packet stored or counted
    assert listed_bytes <= 3 * 2 ** 20 + 2 * 256 * 1024, listed_bytes  # held at the limit, a flush or two past



def test_a_query_larger_than_its_memory_spills_and_answers_the_right_rows(servers, tmp_path):
    """At QUERY_MEMORY_MB=128 this sort answered 400 'Out of Memory Error: Failed to allocate block': the
    threads the first query starts had taken 88 MiB of the cap.  They are now started before it, and the
    sort spills to QUERY_SPILL_BYTES and answers."""
    server = servers(QUERY_MEMORY_MB="128")
    sql = ("SELECT r, s FROM (SELECT hash(range) / 18446744073709551615 AS r, md5(range::VARCHAR) || "
           "md5((range + 1)::VARCHAR) AS s FROM range(3000000)) ORDER BY r OFFSET 2999990")
    status, _, body = query(server, sql)
    assert status == 200, body
    expected = duckdb.connect().execute(sql).fetchall()
    assert [(row["r"], row["s"]) for row in body] == expected and len(expected) == 10
    assert server.stop() == 0
    result = run_hepop(env={"PARQUET_DIR": str(tmp_path / "small"), "QUERY_MEMORY_MB": "64"})
    assert result.returncode == 2 and f"at least {hepop.QUERY_MEMORY_MIN_MB} MB" in result.stderr



def test_every_drop_reason_is_on_metrics_at_zero_from_the_start(servers, tmp_path):
    """A series that appeared only at the first drop could not be alerted on with rate() or increase()."""
    from prometheus_client.parser import text_string_to_metric_families
    server = servers()
    status, _, body = http(server, "/metrics")
    assert status == 200
    dropped = {s.labels["reason"]: s.value for f in text_string_to_metric_families(body.decode())
               for s in f.samples if s.name == "hepop_hep_dropped_total"}
    assert dropped == {reason: 0 for reason in hepop.DROP_REASONS}
    assert {"malformed_bad_chunk_9", "buffer_full", "disk_full", "inflating_full", "auth"} <= set(dropped)
    assert server.stop() == 0


def test_an_unknown_table_is_answered_with_the_tables_there_are(seeded):
    """DuckDB's own words were "Did you mean sqlite_temp_master"."""
    server, _ = seeded
    for sql, name in [("SELECT * FROM hep_300", "hep_300"), ("SELECT count(*) FROM sip WHERE x = 1", "sip"),
                      ("SELECT * FROM hep_1 JOIN rtcp USING (call_id)", "rtcp")]:
        status, _, body = query(server, sql)
        assert status == 400, body
        assert body["error"] == f"there is no table {name}: the tables are hep_1, hep_100, calls", body


def test_a_lookup_without_time_reads_all_retention_and_an_aggregate_the_last_ten_minutes(seeded):
    """A Call-ID 20 minutes old answered [] under the default window; a query that pins every row by a
    Call-ID, a correlation id or a number now reads the whole retention, newest files first."""
    server, _ = seeded
    status, head, body = query(server, "SELECT call_id FROM hep_1 WHERE call_id = 'older-1'")
    assert status == 200 and body == [{"call_id": "older-1"}]
    assert "a lookup by call_id" in head["x-hepop-time-window"]
    body = rows_json(server, "SELECT call_id, count(*) AS n FROM hep_1 WHERE call_id IN ('call-4@seed', 'older-0') "
                             "AND sip_method IS NOT NULL GROUP BY 1 ORDER BY 1")
    assert body == [{"call_id": "call-4@seed", "n": 3}, {"call_id": "older-0", "n": 1}]
    seeded_from_alice = 10 * 3 + 20 * 6 + 3 + 2                       # the seed's calls, recent and older
    assert rows_json(server, "SELECT count(*) AS n FROM hep_1 WHERE from_user = 'alice'") == [{"n": seeded_from_alice}]
    for sql in ["SELECT count(*) AS n FROM hep_1",
                "SELECT count(*) AS n FROM hep_1 WHERE call_id = 'older-1' OR sip_method = 'INVITE'"]:
        status, head, body = query(server, sql)
        assert "default" in head["x-hepop-time-window"], sql
    assert rows_json(server, "SELECT count(*) AS n FROM hep_1") == [{"n": 3}]


def test_cseq_method_is_set_on_every_response(seeded):
    server, _ = seeded
    body = rows_json(server, "SELECT cseq_method, sip_status, count(*) AS n FROM hep_1 WHERE time > '2025-01-01' "
                             "AND sip_status IS NOT NULL GROUP BY ALL ORDER BY ALL")
    assert body == [{"cseq_method": "INVITE", "sip_status": 100, "n": 30},      # the seed answers BYE as INVITE
                    {"cseq_method": "INVITE", "sip_status": 200, "n": 40},
                    {"cseq_method": "INVITE", "sip_status": 486, "n": 10}]
    assert rows_json(server, "SELECT cseq_method FROM hep_1 WHERE call_id = 'call-1@seed' AND sip_method = 'BYE'") == \
        [{"cseq_method": "BYE"}]


def test_new_senders_are_logged_once_and_silence_is_said_in_the_log_and_on_health(servers, tmp_path):
    """A Kamailio without trace_on sends nothing, and hepop's log said nothing meanwhile."""
    server = servers(QUIET_WARNING_S="1")
    server.wait_for_log("nothing received for", timeout=10)
    health = json.loads(http(server, "/health")[2])
    assert health["receiving"] is False and health["last_received"] is None and health["status"] == "ok"
    for i in range(5):                                   # five source ports, one address
        server.udp([hep3(sip(f"heard-{i}"))])
    server.tcp(hep3(sip("heard-tcp")))
    wait_for_rows(server, 6)
    health = json.loads(http(server, "/health")[2])
    assert health["receiving"] is True and health["last_received"].startswith(time.strftime("%Y-", time.gmtime()))
    assert server.stop() == 0
    new_sender = [line for line in server.lines if "HEP from a new sender" in line]
    assert len(new_sender) == 1 and "127.0.0.1 over udp" in new_sender[0]
    assert any("receiving HEP again" in line for line in server.lines)



def test_a_payload_that_is_not_utf8_is_stored_once_and_queries_still_show_it(servers, tmp_path):
    """Kept as its bytes and as text with replacement characters, such a payload took 1.9 times the disk."""
    rng = random.Random(3)
    packets = [hepop.decode(hep3(bytes(rng.randrange(256) for _ in range(800)), proto_type=5)) for _ in range(2000)]
    path = tmp_path / "binary.parquet"
    pq.write_table(build_table(5, [p.time_us for p in packets], packets), path, compression="zstd")
    assert path.stat().st_size < 1.1 * 2000 * 800                    # random bytes do not compress
    server = servers()
    server.udp([hep3(b"bin\xff\xfe\x00ary", proto_type=5), hep3(b"plain text", proto_type=5)])
    deadline = time.monotonic() + 10
    while count_of(server, "SELECT count(*) AS n FROM hep_5") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    body = rows_json(server, "SELECT payload, payload_raw IS NOT NULL AS raw FROM hep_5 ORDER BY payload")
    assert body == [{"payload": "bin\\xFF\\xFE\\x00ary", "raw": True}, {"payload": "plain text", "raw": False}]
    assert rows_json(server, "SELECT count(*) AS n FROM hep_5 WHERE payload LIKE 'bin%'") == [{"n": 1}]
    assert server.stop() == 0


def test_sip_messages_and_calls_are_counted_on_metrics_as_they_arrive(servers, tmp_path):
    """Requests by method, responses by code and CSeq method (heplify-server's labels), calls by their
    final class, Q.850 causes, and the post-dial delay, setup and duration histograms, per capture node,
    parsed as Prometheus does, equal what was sent; an unknown method is OTHER."""
    from prometheus_client.parser import text_string_to_metric_families
    server = servers()
    now_s = time.time() - 60
    statuses = [200, 200, 486, 487, 404, 480]
    flows = [call_flow(f"kpi-{i}@test", "5551000", "6661000", status, now_s + i) for i, status in enumerate(statuses)]
    bye = next(m for m in flows[0] if m["label"] == "BYE")
    bye["packet"] = hep3(bye["payload"].replace(b"Content-Length", b"Reason: Q.850;cause=16;text=\"Normal\"\r\nContent-Length"),
                         seconds=bye["time_us"] // 1_000_000, useconds=bye["time_us"] % 1_000_000)
    packets = [m["packet"] for flow in flows for m in flow]
    packets += [hep3(sip("kpi-odd", method="FOO"), extra=chunk(19, b"edge-2")),
                hep3(sip_message("kpi-odd-code", "SIP/2.0 499 No Such Code", "1 INVITE"))]
    later = [m["packet"] for m in flows[1][-2:]]          # one call's BYE and its 200 in a later batch
    server.udp([p for p in packets if p not in later])
    time.sleep(0.6)
    server.udp(later)
    wait_for_rows(server, len(packets))
    wait_for_calls(server)
    status, _, body = http(server, "/metrics")
    samples = [(f.name, f.type, s) for f in text_string_to_metric_families(body.decode()) for s in f.samples]
    of = lambda name: {tuple(sorted(s.labels.items())): s.value for family, _, s in samples if s.name == name}
    expected = collections.Counter()
    for flow in flows:
        for m in flow:
            first, cseq = m["payload"].split(b"\r\n")[0].decode(), re.search(rb"CSeq: \d+ (\w+)", m["payload"])[1].decode()
            response = first.split(" ")[1] if first.startswith("SIP/2.0") else first.split(" ")[0]
            expected[(("method", cseq), ("node", "7"), ("response", response))] += 1
    expected[(("method", "OTHER"), ("node", "edge-2"), ("response", "OTHER"))] += 1
    expected[(("method", "INVITE"), ("node", "7"), ("response", "4xx"))] += 1     # a code no RFC has: its class
    assert of("hepop_sip_messages_total") == dict(expected)
    assert of("hepop_calls_total") == {(("class", "answered"), ("node", "7")): 2, (("class", "busy"), ("node", "7")): 1,
                                       (("class", "cancelled"), ("node", "7")): 1, (("class", "failed"), ("node", "7")): 1,
                                       (("class", "no_answer"), ("node", "7")): 1}
    assert of("hepop_sip_q850_causes_total") == {(("cause", "16"), ("node", "7")): 1}
    types = {family: kind for family, kind, _ in samples}
    assert types["hepop_call_pdd_seconds"] == types["hepop_call_duration_seconds"] == "histogram"
    pdd = of("hepop_call_pdd_seconds_count")[(("node", "7"),)]
    assert pdd == len(statuses)                          # each call's first 18x or final answer
    assert of("hepop_call_setup_seconds_count")[(("node", "7"),)] == 2
    assert of("hepop_call_duration_seconds_count")[(("node", "7"),)] == 2
    assert of("hepop_call_duration_seconds_sum")[(("node", "7"),)] == pytest.approx(2 * 10.0)   # answered at 2 s, BYE at 12 s
    answered_pdd = [0.4, 0.4]                            # 180 after 0.4 s; the others' final after 1.0 s or 0.92 s
    assert of("hepop_call_pdd_seconds_sum")[(("node", "7"),)] == pytest.approx(sum(answered_pdd) + 1.0 * 3 + 0.92)
    assert of("hepop_call_pdd_seconds_bucket")[(("le", "0.5"), ("node", "7"))] == 2
    # The README's ASR, NER and ACD from the counters, and from `calls` by its SQL: both what was sent.
    calls = of("hepop_calls_total")
    asr = calls[(("class", "answered"), ("node", "7"))] / sum(calls.values())
    ner = sum(v for k, v in calls.items() if dict(k)["class"] in ("answered", "busy", "no_answer", "cancelled")) / sum(calls.values())
    acd = of("hepop_call_duration_seconds_sum")[(("node", "7"),)] / of("hepop_call_duration_seconds_count")[(("node", "7"),)]
    sql = re.search(r"```\n(SELECT avg\(\(status BETWEEN 200 AND 299\)::INT\) AS asr.*?)```",
                    (HERE / "README.md").read_text(), re.S)[1]
    from_calls = rows_json(server, sql)[0]
    assert asr == pytest.approx(2 / 6) and from_calls["asr"] == pytest.approx(asr)
    assert ner == pytest.approx(5 / 6) and from_calls["ner"] == pytest.approx(ner)
    assert acd == pytest.approx(10.0) and from_calls["acd_s"] == pytest.approx(acd)
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------------------------
# Call records
# ---------------------------------------------------------------------------------------------------------

# The oracle the records are held to: a call as the GROUP BY over its messages in hep_1 gives it (the `calls`
# view before the records), with the records' own columns; `class` and `q850_cause` are made in Python.
CALLS_FROM_MESSAGES_SQL = r"""
WITH messages AS (
    SELECT time, call_id, sip_method, sip_status, from_user, to_user, ruri_user, user_agent, src_ip, src_port,
           dst_ip, dst_port, cseq_method, correlation_id, coalesce(node_name, CAST(capture_id AS VARCHAR)) AS node,
           CASE WHEN sip_method IN ('BYE', 'CANCEL') OR sip_status >= 300
                THEN nullif(regexp_extract(payload, '(?i)\nReason:[ \t]*([^\r\n]+)', 1), '') END AS reason
    FROM hep_1 WHERE call_id IS NOT NULL AND time > TIMESTAMP '2000-01-01'),
per_call AS (
    SELECT call_id, min(time) AS time, max(time) AS last_time, count(*) AS messages,
           arg_min({'method': sip_method, 'from_user': from_user, 'to_user': to_user, 'ruri_user': ruri_user,
                    'user_agent': user_agent, 'src_ip': src_ip, 'src_port': src_port, 'dst_ip': dst_ip,
                    'dst_port': dst_port}, time) FILTER (WHERE sip_method IS NOT NULL) AS first_request,
           min(time) FILTER (WHERE sip_method = 'INVITE') AS invite_time,
           min(time) FILTER (WHERE cseq_method = 'INVITE' AND sip_status >= 180) AS progress_time,
           min(time) FILTER (WHERE cseq_method = 'INVITE' AND sip_status BETWEEN 200 AND 299) AS answer_time,
           arg_min(sip_status, time) FILTER (WHERE cseq_method = 'INVITE' AND sip_status BETWEEN 200 AND 299)
               AS answer_status,
           arg_max(sip_status, time) FILTER (WHERE sip_status >= 200 AND cseq_method NOT IN
               ('ACK', 'BYE', 'CANCEL', 'PRACK', 'UPDATE', 'INFO')) AS last_final_status,
           min(time) FILTER (WHERE sip_method = 'BYE') AS bye_time,
           arg_min(reason, time) FILTER (WHERE reason IS NOT NULL) AS reason,
           arg_min(correlation_id, time) FILTER (WHERE correlation_id IS NOT NULL) AS correlation_id,
           arg_min(node, time) AS node
    FROM messages GROUP BY call_id)
SELECT call_id, time, last_time, answer_time, first_request.method AS method,
       coalesce(answer_status, last_final_status) AS status,
       date_diff('millisecond', invite_time, progress_time) AS pdd_ms,
       date_diff('millisecond', answer_time, coalesce(bye_time, last_time)) / 1000.0 AS duration_s,
       first_request.from_user AS from_user, first_request.to_user AS to_user,
       first_request.ruri_user AS ruri_user, first_request.user_agent AS user_agent,
       first_request.src_ip AS src_ip, first_request.src_port AS src_port, first_request.dst_ip AS dst_ip,
       first_request.dst_port AS dst_port, messages, reason, correlation_id, node, bye_time IS NOT NULL AS bye
FROM per_call ORDER BY call_id"""


def expected_class(status, bye: bool, method) -> str | None:
    if status is None:
        return "ringing" if method == "INVITE" else None
    if 200 <= status <= 299:
        return "answered" if bye or method != "INVITE" else "up"
    return {486: "busy", 600: "busy", 408: "no_answer", 480: "no_answer", 487: "cancelled"}.get(
        status, "redirected" if 300 <= status <= 399 else "failed")


def calls_match_their_messages(server) -> list[dict]:
    """`calls` (from the records) row for row against the GROUP BY over the messages; the calls."""
    wait_for_calls(server)
    oracle = rows_json(server, CALLS_FROM_MESSAGES_SQL)
    calls = rows_json(server, "SELECT * FROM calls WHERE time > TIMESTAMP '2000-01-01' ORDER BY call_id")
    assert len(calls) == len(oracle) == len({call["call_id"] for call in calls})
    for call, truth in zip(calls, oracle):
        cause, bye = re.match(r"(?i)Q\.850\b.*?cause=(\d+)", truth["reason"] or ""), truth.pop("bye")
        truth = {**truth, "class": expected_class(truth["status"], bye, truth["method"]), "q850_cause": int(cause[1]) if cause else None}
        assert call == truth
    # A number's calls, and a Call-ID: picked by the records that name them, merged from all of theirs
    named = [call for call in calls if call["to_user"] and call["ruri_user"] and call["method"]]
    for call in named[::max(1, len(named) // 4)]:
        for condition, holds in ((f"from_user = '{call['to_user']}'", lambda c: c["from_user"] == call["to_user"]),
                                 (f"(to_user = '{call['to_user']}' OR ruri_user = '{call['ruri_user']}')",
                                  lambda c: call["to_user"] == c["to_user"] or call["ruri_user"] == c["ruri_user"]),
                                 (f"call_id = '{call['call_id']}' AND method = 'INVITE'",
                                  lambda c: c["call_id"] == call["call_id"] and c["method"] == "INVITE")):
            picked = rows_json(server, f"SELECT * FROM calls WHERE time > TIMESTAMP '2000-01-01' AND {condition} "
                                       "ORDER BY call_id")
            assert picked == [c for c in calls if holds(c)], condition
    return calls


RECORD_OUTCOMES = (200, 486, 487, 480, 408, 503, 302, 404, "up", "ringing")


def varied_calls(tag: str, start_s: float, count: int, spacing_s: float = 0.4) -> list[list[bytes]]:
    """`count` calls of every outcome (answered, busy, cancelled, no answer, failed, redirected, still up,
    still ringing), with retransmissions, Reason headers, correlation ids and two capture nodes: the HEP
    packets of each call."""
    calls = []
    for i in range(count):
        outcome = RECORD_OUTCOMES[i % len(RECORD_OUTCOMES)]
        status = outcome if isinstance(outcome, int) else 200
        caller, callee = ("10.0.0.1", 5060), ("10.0.0.2", 5060)
        steps = [(0.0, f"INVITE sip:666{i:04d}@example.com SIP/2.0", "1 INVITE", ""),
                 (0.01, "SIP/2.0 100 Trying", "1 INVITE", "")]
        if outcome == "ringing":
            steps += [(0.3, "SIP/2.0 183 Session Progress", "1 INVITE", "")]
        elif status == 200:
            steps += [(0.4, "SIP/2.0 180 Ringing", "1 INVITE", ""), (2.0, "SIP/2.0 200 OK", "1 INVITE", ""),
                      (2.01, f"ACK sip:666{i:04d}@example.com SIP/2.0", "1 ACK", "")]
            if outcome != "up":              # the callee hangs up on every other call: From and To swapped
                steps += [(9.0, f"BYE sip:{'555' if i % 2 else '666'}{i:04d}@example.com SIP/2.0", "2 BYE",
                           'Reason: Q.850;cause=16;text="Normal call clearing"\r\n'), (9.02, "SIP/2.0 200 OK", "2 BYE", "")]
        elif status == 487:
            steps += [(0.9, f"CANCEL sip:666{i:04d}@example.com SIP/2.0", "1 CANCEL",
                       'Reason: SIP;cause=200;text="Call completed elsewhere"\r\n'),
                      (0.91, "SIP/2.0 200 OK", "1 CANCEL", ""), (0.92, "SIP/2.0 487 Request Terminated", "1 INVITE", ""),
                      (0.93, f"ACK sip:666{i:04d}@example.com SIP/2.0", "1 ACK", "")]
        else:
            reason = "Reason: Q.850;cause=34\r\n" if status == 503 else ""
            steps += [(1.0, f"SIP/2.0 {status} Final", "1 INVITE", reason),
                      (1.01, f"ACK sip:666{i:04d}@example.com SIP/2.0", "1 ACK", "")]
        if i % 3 == 0:                       # retransmissions: the INVITE, and the last answer to it
            steps.append((0.5, *steps[0][1:]))
            last = max(step for step in steps if step[1].startswith("SIP/") and step[2] == "1 INVITE")
            steps.append((last[0] + 0.05, *last[1:]))
        packets = []
        extra = chunk(17, f"corr-{tag}-{i // 2}".encode()) if i % 4 == 1 else b""
        extra += chunk(19, b"edge-1") if i % 5 == 0 else b""
        for offset_s, first, cseq, headers in steps:
            seconds, useconds = divmod(round((start_s + i * spacing_s + offset_s) * 1e6), 1_000_000)
            by_callee = cseq == "2 BYE" and i % 2 == 1
            request = not first.startswith("SIP/")
            (src, sport), (dst, dport) = (caller, callee) if request != by_callee else (callee, caller)
            parties = (f"666{i:04d}", f"555{i:04d}") if by_callee else (f"555{i:04d}", f"666{i:04d}")
            payload = sip_message(f"{tag}-{i}@records", first, cseq, *parties, "User-Agent: test-phone\r\n" + headers)
            packets.append(hep3(payload, src=src, sport=sport, dst=dst, dport=dport, seconds=seconds,
                                useconds=useconds, extra=extra))
        calls.append(packets)
    return calls


def wait_for_stored(server, n: int, timeout=20) -> None:
    deadline = time.monotonic() + timeout
    sql = "SELECT count(*) AS n FROM hep_1 WHERE time > TIMESTAMP '2000-01-01'"
    while count_of(server, sql) < n:
        assert time.monotonic() < deadline, f"fewer than {n} rows after {timeout} s"
        time.sleep(0.1)


def record_files(data_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(data_dir)) for p in data_dir.glob("*/dbs/hep-0/calls-0/*/*/*.parquet"))


def test_calls_from_the_records_equal_the_messages_across_folders_hours_restarts_and_compaction(servers, tmp_path):
    """Calls that straddle an hour (compacted) and a 10-minute folder, sent out of order, retransmitted,
    half before a restart and half after: `calls` equals the GROUP BY over their messages, row for row."""
    now_s = int(time.time())
    hour_s = (now_s // 3600 - 2) * 3600                 # two hours ago: closed, compacted during the test
    folder_s = (now_s // 600 - 2) * 600                 # a 10-minute boundary of the last half hour
    calls = varied_calls("hour", hour_s - 6, 30) + varied_calls("folder", folder_s - 6, 30)
    packets = [packet for call in calls for packet in call]
    random.Random(11).shuffle(packets)
    half = len(packets) // 2
    server = servers(COMPACT_INTERVAL_S="0.5", COMPACT_GRACE_S="1")
    server.udp(packets[:half], pace_every=40)
    wait_for_stored(server, half)
    assert server.stop() == 0
    server = servers(COMPACT_INTERVAL_S="0.5", COMPACT_GRACE_S="1")
    server.udp(packets[half:], pace_every=40)
    wait_for_stored(server, len(packets))
    deadline = time.monotonic() + 20                    # both types' hour compacted into one c_ file
    hour_folder = time.strftime("%Y-%m-%d/%H-00", time.gmtime(hour_s - 3600))
    while not [f for f in record_files(tmp_path / "data") if hour_folder in f and "/c_" in f]:
        assert time.monotonic() < deadline, record_files(tmp_path / "data")
        time.sleep(0.2)
    found = calls_match_their_messages(server)
    assert len(found) == 60
    classes = collections.Counter(call["class"] for call in found)
    assert classes == {"answered": 6, "busy": 6, "cancelled": 6, "no_answer": 12, "failed": 12, "redirected": 6,
                       "up": 6, "ringing": 6}                # 60 calls over RECORD_OUTCOMES' ten outcomes
    assert {call["q850_cause"] for call in found} == {16, 34, None}
    assert sum(call["correlation_id"] is not None for call in found) == 16
    assert {call["node"] for call in found} == {"7", "edge-1"}
    assert server.stop() == 0
    assert not [line for line in server.lines if "making them again" in line]   # nothing was missing


# SIPp scenarios for the outcomes SIPp's own uac and uas do not make: busy, no answer, cancelled.
SIPP_HEADERS = """
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch{branch}]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: [service] <sip:[service]@[remote_ip]:[remote_port]>{to_tag}
      Call-ID: [call_id]
      CSeq: 1 {method}
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0
"""
SIPP_REQUEST = """  <send{retrans}><![CDATA[

      {method} sip:[service]@[remote_ip]:[remote_port] SIP/2.0""" + SIPP_HEADERS + """
    ]]></send>
"""
SIPP_RESPONSE = """  <send><![CDATA[

      SIP/2.0 {status}
      [last_Via:]
      [last_From:]
      [last_To:]{to_tag}
      [last_Call-ID:]
      CSeq: 1 {method}
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Content-Length: 0

    ]]></send>
"""


def sipp_scenarios(outcome: str) -> tuple[str, str]:
    """The UAC's and the UAS's SIPp XML of a call that ends busy (486), no_answer (180, then 480) or
    cancelled (180, CANCEL, 200, 487)."""
    request = lambda method, branch="", to_tag="", retrans=' retrans="500"': SIPP_REQUEST.format(
        method=method, branch=branch, to_tag=to_tag, retrans=retrans)
    tag = ";tag=[pid]SIPpTag01[call_number]"
    response = lambda status, method="INVITE", to_tag=tag: SIPP_RESPONSE.format(status=status, method=method,
                                                                                to_tag=to_tag)
    ack = lambda branch: request("ACK", branch, "[peer_tag_param]", "")
    if outcome == "cancelled":
        uac = (request("INVITE") + '  <recv response="180"/>\n' + request("CANCEL", "-2", "", "") +
               '  <recv response="200"/>\n  <recv response="487" rrs="true"/>\n' + ack("-5"))
        uas = ('  <recv request="INVITE"/>\n' + response("180 Ringing") + '  <recv request="CANCEL"/>\n' +
               response("200 OK", "CANCEL", "") + response("487 Request Terminated") + '  <recv request="ACK"/>\n')
    else:
        final = {"busy": "486 Busy Here", "no_answer": "480 Temporarily Unavailable"}[outcome]
        uac = (request("INVITE") + '  <recv response="180" optional="true"/>\n' +
               f'  <recv response="{final[:3]}" rrs="true"/>\n' + ack("-2"))
        uas = ('  <recv request="INVITE"/>\n' + response("180 Ringing") + '  <pause milliseconds="200"/>\n' +
               response(final) + '  <recv request="ACK"/>\n')
    wrap = lambda name, body: (f'<?xml version="1.0" encoding="ISO-8859-1" ?>\n<scenario name="hepop {name}">\n'
                               f'{body}</scenario>\n')
    return wrap(f"uac {outcome}", uac), wrap(f"uas {outcome}", uas)


def test_calls_from_the_records_equal_the_messages_of_kamailio_and_sipp_calls(servers, tmp_path):
    """Kamailio traces SIPp calls answered, busy, not answered and cancelled: `calls` equals the GROUP BY
    over their messages, and each has its class."""
    server = servers()
    kamailio_calls(tmp_path, server.port, calls=2)
    for outcome in ("busy", "no_answer", "cancelled"):
        kamailio_calls(tmp_path, server.port, scenarios=sipp_scenarios(outcome))
    time.sleep(0.5)
    found = calls_match_their_messages(server)
    assert collections.Counter(call["class"] for call in found) == {"answered": 2, "busy": 1, "no_answer": 1,
                                                                   "cancelled": 1}
    assert {call["from_user"] for call in found} == {"sipp"} and all(call["messages"] >= 4 for call in found)
    assert server.stop() == 0

def test_the_newest_calls_are_read_from_the_newest_minutes_and_a_call_begun_earlier_keeps_its_start(servers, tmp_path):
    """The call list's plain top-N reads the newest minute's records; a call that began 20 minutes ago
    and ends now (its BYE and a re-INVITE in that minute) is not taken for a new one: it is left out
    while enough calls began in the minute, and shown with its true start and messages when not."""
    now_s = time.time()
    short = [call_flow(f"new-{i}@narrow", f"5552{i:03d}", "6660000", 486, now_s - 45 + i * 0.5) for i in range(60)]
    long_call = call_flow("long@narrow", "5551111", "6661111", 200, now_s - 1200)
    for message, offset_s in zip(long_call[-2:], (10, 9.98)):     # its BYE and the 200 to it: in the newest minute
        message["time_us"] = round((now_s - offset_s) * 1e6)
        message["packet"] = hep3(message["payload"], seconds=message["time_us"] // 1_000_000,
                                 useconds=message["time_us"] % 1_000_000)
    reinvite = sip_message("long@narrow", "INVITE sip:6661111@example.com SIP/2.0", "3 INVITE", "5551111", "6661111")
    packets = [m["packet"] for m in long_call] + [hep3(reinvite, seconds=int(now_s - 5))]
    server = servers()
    server.udp([m["packet"] for flow in short for m in flow] + packets)
    wait_for_stored(server, sum(map(len, short)) + len(packets))
    wait_for_calls(server)
    where = "WHERE time > now() - INTERVAL 1 HOUR"
    for limit in (50, 70):
        status, head, narrowed = query(server, f"SELECT * FROM calls {where} ORDER BY time DESC LIMIT {limit}")
        assert status == 200 and ("x-hepop-read-from" in head) == (limit < 61), (head, len(narrowed))
        whole = rows_json(server, f"SELECT * FROM (SELECT * FROM calls {where}) ORDER BY time DESC LIMIT {limit}")
        assert narrowed == whole and len(narrowed) == min(limit, 61)
    assert "long@narrow" not in [call["call_id"] for call in whole[:60]]
    long_row = whole[60]                 # the 61st: its INVITE 20 minutes ago, all of its messages
    assert long_row["call_id"] == "long@narrow" and long_row["messages"] == len(long_call) + 1
    invite_s, invite_us = divmod(long_call[0]["time_us"], 1_000_000)
    assert long_row["time"] == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(invite_s)) + f".{invite_us:06d}Z"
    assert long_row["class"] == "answered" and long_row["duration_s"] == pytest.approx(1200 - 10 - 2.0, abs=0.01)
    assert server.stop() == 0

def test_call_records_of_several_files_are_written_as_one_and_at_a_stop(servers, tmp_path):
    """A busy site's writer writes a SIP file a second: their call records wait CALL_RECORDS_INTERVAL_S to
    be written as one file per folder, and SIGTERM writes those still waiting."""
    server = servers(CALL_RECORDS_INTERVAL_S="30")
    calls = varied_calls("together", time.time() - 30, 25)
    for first in range(0, 25, 5):
        server.udp([packet for call in calls[first:first + 5] for packet in call])
        time.sleep(0.4)                  # past FLUSH_INTERVAL_S: a SIP file each
    wait_for_stored(server, sum(map(len, calls)))
    data = tmp_path / "data"
    assert record_files(data) == []      # still waiting
    assert server.stop() == 0
    sip_files = [p for p in data.glob("*/dbs/hep-0/hep_1-0/*/*/*.parquet")]
    assert len(sip_files) >= 4 and len(record_files(data)) == len({p.parent for p in sip_files})    # one a folder
    server = restart_and_check_records(servers)
    assert not [line for line in server.lines if "making them again" in line]
    assert server.stop() == 0

def test_call_records_waiting_to_be_written_are_bounded_by_rows_too(servers, tmp_path):
    """A new Call-ID in every message makes a record of each: at most 5 x FLUSH_ROWS wait, whatever
    CALL_RECORDS_INTERVAL_S says (a flood of them held every record for the whole interval)."""
    server = servers(CALL_RECORDS_INTERVAL_S="300", FLUSH_ROWS="100")
    server.udp([hep3(sip(f"flood-{i}")) for i in range(1500)], pace_every=100)
    wait_for_rows(server, 1500)
    deadline = time.monotonic() + 10
    sql = "SELECT count(*) AS n FROM calls WHERE time > now() - INTERVAL 1 HOUR"
    while count_of(server, sql) < 1500 - 5 * 100:
        assert time.monotonic() < deadline, f"{count_of(server, sql)} calls of 1,500 after 10 s"
        time.sleep(0.1)
    assert server.stop() == 0
    assert len(record_files(tmp_path / "data")) >= 2

def restart_and_check_records(servers, **settings):
    server = servers(**settings)
    server.wait_for_log("call records checked: every hour")
    calls_match_their_messages(server)
    return server


def test_call_records_after_kill_9_a_lost_or_doubled_file_and_their_deletion_are_made_again(servers, tmp_path):
    """kill -9 at random moments while calls arrive and folders are merged; then a records file lost, one
    doubled, and all of them deleted: after each restart `calls` equals the GROUP BY over the messages."""
    now_s = int(time.time())
    packets = [packet for call in varied_calls("crash", now_s - 1500, 300, spacing_s=0.02) for packet in call]
    random.Random(7).shuffle(packets)
    rng, quarter = random.Random(3), len(packets) // 4 + 1
    settings = {"COMPACT_INTERVAL_S": "0.3", "COMPACT_GRACE_S": "1", "FLUSH_INTERVAL_S": "0.05"}
    for start in range(0, len(packets), quarter):
        server = servers(**settings)
        sender = threading.Thread(target=server.udp, args=(packets[start:start + quarter],), kwargs={"pace_every": 4})
        sender.start()
        time.sleep(rng.uniform(0.05, 0.5))
        server.process.kill()
        server.process.wait()
        sender.join()
    server = restart_and_check_records(servers, **settings)
    assert len(rows_json(server, "SELECT call_id FROM calls WHERE time > TIMESTAMP '2000-01-01'")) > 0
    # Records of this folder, raw: one is lost, another doubled (an unlisted copy is adopted at start)
    for half in (varied_calls("open", time.time() - 5, 10), varied_calls("late", time.time() - 4, 6)):
        server.udp([packet for call in half for packet in call])
        time.sleep(1)                    # past CALL_RECORDS_INTERVAL_S: a records file each
    assert server.stop() == 0
    data = tmp_path / "data"
    raw = [data / f for f in record_files(data) if "/c_" not in f and "/m_" not in f]
    assert len(raw) >= 2, record_files(data)
    raw[0].unlink()                      # 10 calls' records lost, 6 calls' twice: the hour's count is off
    shutil.copy(raw[-1], raw[-1].with_name("9000000000.parquet"))
    server = restart_and_check_records(servers, **settings)
    assert any("making them again" in line for line in server.lines)
    assert server.stop() == 0
    # All of them deleted: made again from the messages
    shutil.rmtree(next(data.glob("*/dbs/hep-0/calls-0")))
    server = restart_and_check_records(servers, **settings)
    assert server.stop() == 0


def test_discarded_methods_and_their_responses_are_counted_not_stored(servers, tmp_path):
    server = servers(DISCARD_METHODS="options, Notify")
    now_s = time.time() - 10
    packets = []
    for method in ("OPTIONS", "NOTIFY", "INVITE"):
        for first in (f"{method} sip:x@example.com SIP/2.0", "SIP/2.0 200 OK"):
            packets.append(hep3(sip_message(f"discard-{method}", first, f"1 {method}"), seconds=int(now_s)))
    server.udp(packets[:2])                  # a batch with nothing left to store
    time.sleep(0.6)
    server.udp(packets[2:])
    wait_for_rows(server, 2)
    time.sleep(0.5)
    assert server.stop() == 0
    rows = stored_rows(tmp_path / "data", columns="call_id, sip_method, sip_status")
    assert sorted((r["call_id"], r["sip_status"] or 0) for r in rows) == [("discard-INVITE", 0), ("discard-INVITE", 200)]
    counters = server.counters()
    assert counters['hep_discarded_total{method="OPTIONS"}'] == 2 and counters['hep_discarded_total{method="NOTIFY"}'] == 2
    assert not any(v for k, v in counters.items() if k.startswith("hep_dropped_total"))
    result = run_hepop(env={"PARQUET_DIR": str(tmp_path / "x"), "DISCARD_METHODS": "OPTIONS;DROP TABLE"})
    assert result.returncode == 2 and "DISCARD_METHODS" in result.stderr


def make_certificates(folder: Path) -> SimpleNamespace:
    """A CA, a server certificate for 127.0.0.1 and a client certificate signed by it, and a client
    certificate signed by nobody hepop knows, all made by the openssl command."""
    need("openssl", shutil.which("openssl") is not None)
    run = lambda *args: subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=hepop test CA",
        "-keyout", "ca.key", "-out", "ca.pem")
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        (folder / f"{name}.ext").write_text(extra + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=rogue",
        "-keyout", "rogue.key", "-out", "rogue.pem")
    return SimpleNamespace(**{name: str(folder / name) for name in (
        "ca.pem", "server.pem", "server.key", "client.pem", "client.key", "rogue.pem", "rogue.key")})


def tls_agent(port: int, certs, cert: str = "", key: str = ""):
    import ssl
    context = ssl.create_default_context(cafile=getattr(certs, "ca.pem"))
    if cert:
        context.load_cert_chain(cert, key)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def test_hep_over_tls_is_stored_and_a_stalled_handshake_stops_no_other_agent(servers, tmp_path):
    certs = make_certificates(tmp_path)
    tls_port = free_port()
    server = servers(TLS_PORT=str(tls_port), TLS_CERT=getattr(certs, "server.pem"), TLS_KEY=getattr(certs, "server.key"),
                     TCP_FRAME_TIMEOUT_S="2")
    stalled = socket.create_connection(("127.0.0.1", tls_port))
    stalled.sendall(b"\x16\x03\x01\x02\x00\x01")          # the start of a ClientHello, and no more
    with tls_agent(tls_port, certs) as agent:
        for i in range(20):
            agent.sendall(hep3(sip(f"tls-{i}")))
        server.udp([hep3(sip("udp-beside"))])
        server.tcp(hep3(sip("tcp-beside")))
        wait_for_rows(server, 22)
    frames = tmp_path / "frames.bin"                     # a capture piped through openssl s_client
    frames.write_bytes(b"".join(hep3(sip(f"s-client-{i}")) for i in range(5)))
    with open(frames, "rb") as source:
        result = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{tls_port}", "-quiet", "-no_ign_eof",
                                 "-CAfile", getattr(certs, "ca.pem"), "-verify_return_error"],
                                stdin=source, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr[-2000:]
    wait_for_rows(server, 27)
    time.sleep(3.5)                                      # past TCP_FRAME_TIMEOUT_S and its check
    assert closed_by_server(stalled)
    stalled.close()
    assert server.stop() == 0
    counters = server.counters()
    assert counters['hep_received_total{transport="tls",version="3"}'] == 25
    assert counters["tls_connections_total"] == 2 and counters["tcp_unframed_closed_total"] >= 1
    calls = sorted(r["call_id"] for r in stored_rows(tmp_path / "data", columns="call_id"))
    assert calls == sorted([f"tls-{i}" for i in range(20)] + [f"s-client-{i}" for i in range(5)] + ["udp-beside", "tcp-beside"])


def test_hep_over_tls_refuses_an_agent_without_a_certificate_the_client_ca_signed(servers, tmp_path):
    import ssl
    certs = make_certificates(tmp_path)
    tls_port = free_port()
    server = servers(TLS_PORT=str(tls_port), TLS_CERT=getattr(certs, "server.pem"), TLS_KEY=getattr(certs, "server.key"),
                     TLS_CLIENT_CA=getattr(certs, "ca.pem"))
    with tls_agent(tls_port, certs, getattr(certs, "client.pem"), getattr(certs, "client.key")) as agent:
        agent.sendall(hep3(sip("signed-agent")))
        wait_for_rows(server, 1)
    for cert, key in ((getattr(certs, "rogue.pem"), getattr(certs, "rogue.key")), ("", "")):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with tls_agent(tls_port, certs, cert, key) as agent:     # TLS 1.3: refused at the first read
                agent.sendall(hep3(sip("refused-agent")))
                agent.recv(1)
    time.sleep(0.5)
    assert server.stop() == 0
    assert [r["call_id"] for r in stored_rows(tmp_path / "data", columns="call_id")] == ["signed-agent"]
    assert server.counters()["tls_handshake_failures_total"] == 2
    result = run_hepop(env={"PARQUET_DIR": str(tmp_path / "x"), "TLS_PORT": str(tls_port), "TLS_CERT": "/nonexistent.pem",
                            "TLS_KEY": "/nonexistent.key"})
    assert result.returncode == 2 and "TLS_CERT" in result.stderr


def test_a_failure_counting_the_kpis_never_stops_the_writing(tmp_path, monkeypatch):
    """A bug in the KPIs raised out of the writer's thread, and nothing more was written."""
    def broken(self, table):
        raise ValueError("a bug")
    monkeypatch.setattr(hepop.SipKpis, "count", broken)
    counters = hepop.Counters()
    config = hepop.Config.load([], {"PARQUET_DIR": str(tmp_path)})
    storage = hepop.Storage(str(tmp_path), "w")
    writer = hepop.BatchWriter(storage, counters, hepop.PacketCheck(config, counters), config)
    writer.start()
    for n in range(2):
        writer.submit(hepop.ReceivedBatch("udp", time.time_ns() // 1000, 0.0, [hep3(sip(f"kpi-bug-{n}"))],
                                          [hepop.Sender(0, ("127.0.0.1", 9))], 700))
    writer.close()
    assert sorted(r["call_id"] for r in rows_of(storage.store(1))) == ["kpi-bug-0", "kpi-bug-1"]
    assert counters.snapshot()["kpi_errors_total"] == 2
    storage.close()
