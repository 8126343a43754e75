#!/usr/bin/env python3
"""hepop: a HEP capture server that stores everything as plain Apache Parquet.

VoIP platforms (Kamailio, OpenSIPS, FreeSWITCH, Asterisk, heplify, captagent) mirror SIP messages, RTCP
reports, logs and QoS data as HEP/EEP packets (versions 1, 2 and 3) over UDP or TCP.  hepop receives them,
writes them as Parquet in a time-partitioned tree that any tool (DuckDB, ClickHouse, pandas, polars)
opens, compacts each closed hour into one sorted file, and answers SQL over HTTP.

Data flow::

    HEP agents --UDP/TCP--> capture loop (Ingest): the bytes of each datagram or frame, per transport,
                            |   undecoded (a TCP frame of another layout is decoded here, for framing)
                            |   hand-off when a batch is full (rows, bytes) or old (FLUSH_INTERVAL_S)
                            |   (compressed payloads in batches of their own, on MAX_INFLATING_BYTES)
                            v   queue.Queue; the loop pauses reading near MAX_PENDING_BYTES
                     writer thread (BatchWriter): decode the batch (Arrow over the common layout,
                            |   decode() for the rest) -> packet checks -> SIP columns -> one Parquet
                            |   file per 10-minute folder, published atomically, and for SIP its call
                            |   records (a Call-ID's messages summed up, call_records) -> metadata.json
                            v
                     compactor thread: at start, the check of the call records (CallRecordsCheck);
                            |   every COMPACT_INTERVAL_S, each closed 10-minute folder and
                            |   then each closed hour merged by a child process (an hour sorted by
                            |   DuckDB) into c_NNNNNNNNNN.parquet, swapped into metadata.json;
                            |   retention; the disk guard; empty folders
                            |   (with S3_URL: the uploader thread makes each closed 10-minute folder one
                            |   object in the bucket, listed in the bucket's metadata.json, then deleted
                            |   here; the compactor merges the bucket's hours, retention covers it too)
                            v
    HTTP threads: /query, /health, /metrics, HOMER's /api/v3 and the page at / by a route table.  A
                  query goes to the query process (DuckDB over the files that every writer lists,
                  this one from memory and the others from their metadata.json, in the bucket when
                  there is one, pruned to the query's time window, made JSON, CSV or Arrow there);
                  the HTTP thread holds the files it reads and relays its bytes

    PARQUET_DIR/WRITER_ID/dbs/hep-0/hep_<type>-0/metadata.json                the truth about the files
    PARQUET_DIR/WRITER_ID/dbs/hep-0/hep_<type>-0/YYYY-MM-DD/HH-MM/NNNNNNNNNN.parquet   (TreeLayout)
    PARQUET_DIR/WRITER_ID/dbs/hep-0/calls-0/...                     the call records, a type of their own
    s3://BUCKET/PREFIX/WRITER_ID/dbs/hep-0/...                   the same tree, of uploaded folders (S3_URL)

Sections, in reading order; each uses only what is above it:
    Configuration   settings from --flags, the environment and defaults; exit 2 naming a bad one
    Shared          counters and metric names, the rate-limited log, times as text, CPU priorities,
                    logging, the set-up of a child process
    HEP protocol    decode() for v1, v2, v3 and the TCP stream framing: pure code, no I/O
    Batch decoding  the common layout of a whole batch decoded by Arrow
    Packet checks   capture-time bounds, the auth key, what counts as received and dropped
    SIP fields      the SIP columns of a batch, by Arrow; the SIP KPIs (SipKpis)
    Storage         schemas; call_records (a Call-ID's messages in a file, summed up); TreeLayout;
                    the atomic publish; FileStore, the one interface to the data's files (list, read,
                    write-then-publish, delete, size), LocalFileStore and S3FileStore (a bucket,
                    staging key and server-side copy); file_entry and its validation; FileLeases (no
                    file deleted under a query); TypeStore (files and metadata.json of one type,
                    recovery at start); Storage (all types, on this disk
                    and in the bucket, the lock on the writer's folder); CallRecordsCheck (records that
                    count their hour's messages, made again where they do not)
    Writer thread   the batch records the loop hands over; BatchWriter
    Compaction      HourMerger, merge_folder and merge_files (the child process); Compactor (the timer
                    thread)
    Upload          the Uploader (the thread that fills the bucket)
    Query           QueryEngine (the sandbox: refuse_sources lets a query read hepop's tables and no
                    file; the time window, views over listed files, the `calls`
                    view that defines a call, merging its records); plain_top_n (a top-N answered from
                    the newest rows; for calls, of the calls that began there); call_picking_condition;
                    results as exact JSON values and ResultWriter; the query process (serve_queries,
                    QueryRun) and what the capture process keeps of it (QueryProcess, FileCatalog)
    Capture         Ingest (bytes to batches) and CaptureServer (sockets, the selectors loop, signals)
    Access          users and their password hashes (read again on SIGHUP and when the file changes),
                    login tokens (HS256 JWTs, signed by a key kept outside PARQUET_DIR), the login limit
    HOMER API       HOMER 7's searches, ladder and exports: their SQL, their answers' shapes, pcap
    HTTP            the route table, ApiHandler, ApiServer; the static files of hepop's own page (ui/
                    beside this module and inside the binary: HTML, CSS, JavaScript) or of UI_DIR
    main()

Threads and processes, and what each owns:
    main thread     the selectors loop: the sockets, Ingest's open batches and counts, TCP streams.
                    It hands batches to the writer through BatchWriter.queue and never waits for it.
    writer          the writing of raw files and their call records (a SIP file and its records under
                    Storage.pairing); BatchWriter.pending_bytes (under its lock, read by
                    the loop to pause reading), `failing` (read by /health).  After each file it wakes
                    the disk guard (DiskSignals.look_now); while the guard says the disk is full
                    (DiskSignals.full, read by /health) it drops what arrives.
    compactor       the check of the call records (before its first pass; the uploader waits for it, and
                    an hour a pass for hours that only one type holds); merges, retention, the disk
                    guard (at each pass and whenever the writer wrote); at
                    most one merge child process at a time, started and killed under
                    Compactor._merging_lock.
    uploader        with S3_URL: merging closed folders and putting them in the bucket; `failing`
                    (read by /health).
    HTTP threads    one per connection (ThreadingHTTPServer), at most MAX_HTTP_CONNECTIONS; a request's
                    head within HEAD_TIMEOUT_S; with every slot taken, a new connection takes the slot of
                    the one waiting longest for a head (WaitingHeads); at most MAX_QUERIES of them relay
                    a query at once.
    query process   one child process (spawned at start, again if it dies) with its own DuckDB, its
                    address space capped after a first query (warm_up): a thread per query, each on its own cursor and its own socketpair to the HTTP thread
                    that asked; at nice 10, and the first the kernel kills when memory runs out.
    compactor child one per merge, at nice 19.
    They meet in the storage layer: each TypeStore's file list and metadata.json change under its
    `lock` (writer and compactor); FileLeases.lock makes a query's listing of files and holding them
    one step, so compaction and retention delete a file only once no query reads it; Counters has its
    own lock.  One process per PARQUET_DIR/WRITER_ID: a POSIX lock on WRITER_ID/.lock.

A file becomes visible only once it is complete: it is written under a temporary name, fsynced, renamed
and its folder fsynced, and only then listed in metadata.json (written the same way).  On start, whatever
a crash left behind is finished or removed, so no half-written file is ever visible and no row is
counted twice.  SIGTERM: reading stops, what the kernel holds is read, every buffer written, within
STOP_TIMEOUT_S.

Run it with ``python3 hepop.py`` (UDP and TCP on 0.0.0.0:9069, files under ./data); ``--help`` lists
every setting, each also readable from the environment variable of the same name.
"""

from __future__ import annotations

import abc
import argparse
import base64
import bisect
import collections
import contextlib
import ctypes
import csv
import dataclasses
import errno
import datetime
import decimal
import fcntl
import functools
import gc
import hashlib
import hmac
import http.server
import io
import itertools
import json
import logging
import mimetypes
import math
import multiprocessing
import multiprocessing.connection
import os
import queue
import re
import resource
import selectors
import shutil
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse
import uuid
import zlib
from typing import Callable, Iterable, NamedTuple, Optional

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__version__ = "0.1.0"

log = logging.getLogger("hepop")


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------

class ConfigError(ValueError):
    """A setting that does not parse; the message names the setting."""


def number(text: str, kind: type, message: str):
    """`text` as an int or a float; ValueError(message) for anything else (not Python's own words)."""
    try:
        value = kind(text.strip())
    except ValueError:
        raise ValueError(message) from None
    if kind is float and not math.isfinite(value):
        raise ValueError(message)
    return value


def parse_port(text: str) -> int:
    message = "must be a port number from 1 to 65535"
    port = number(text, int, message)
    if not 1 <= port <= 65535:
        raise ValueError(message)
    return port


def parse_port_or_off(text: str) -> int:
    return 0 if text.strip() == "0" else parse_port(text)


def parse_bytes(text: str) -> int:
    """A byte count: a whole number, optionally with a binary suffix K, M or G (32M = 33554432)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError("must be a byte count such as 1048576 or 32M")
    return int(match.group(1)) * 1024 ** " KMG".index(match.group(2).upper() or " ")


def parse_positive_int(text: str) -> int:
    message = "must be a whole number of at least 1"
    value = number(text, int, message)
    if value < 1:
        raise ValueError(message)
    return value


# Below this no sort could spill: DuckDB gets half of QUERY_MEMORY_MB, and a sort of 3 M rows of 64-character
# strings (which spills 240 MB) failed to pin its blocks at 64 and answered at 80 (measured at 16 to 128).
QUERY_MEMORY_MIN_MB = 96


def parse_query_memory_mb(text: str) -> int:
    value = parse_positive_int(text)
    if value < QUERY_MEMORY_MIN_MB:
        raise ValueError(f"at least {QUERY_MEMORY_MIN_MB} MB: below it a query that should spill to disk "
                         "fails as out of memory")
    return value


def parse_seconds(text: str) -> float:
    message = "must be a number of seconds greater than 0 and under 1000000"
    value = number(text, float, message)
    if not 0 < value < 1e6:
        raise ValueError(message)
    return value


def parse_duration(text: str) -> float:
    """A duration in seconds from '7d', '36h', '90m', '30s' or a plain number of seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError("must be a duration such as 7d, 36h, 90m or 3600 (seconds)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2).lower()]


def parse_percent(text: str) -> float:
    message = "must be a percentage from 0 (off) to 100"
    value = number(text, float, message)
    if not 0 <= value <= 100:
        raise ValueError(message)
    return value


def parse_writer_id(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", text) or text in (".", ".."):
        raise ValueError("must be a folder name made of letters, digits, '.', '_' and '-'")
    return text


def parse_methods(text: str) -> frozenset:
    """A comma-separated list of SIP methods, as a set in capitals."""
    methods = frozenset(word.strip().upper() for word in text.split(",") if word.strip())
    if not all(re.fullmatch(r"[A-Z][A-Z_-]{0,31}", method) for method in methods):
        raise ValueError("must be SIP methods separated by commas, such as OPTIONS,NOTIFY")
    return methods


def parse_log_level(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
    return level


def parse_s3_url(text: str) -> str:
    """s3://BUCKET or s3://BUCKET/PREFIX, with a bucket name as S3 allows; '' (off) as it is."""
    if not text:
        return ""
    match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/[A-Za-z0-9_.=/-]*)?", text)
    if not match or ".." in text or "//" in text[5:]:
        raise ValueError("must be s3://BUCKET or s3://BUCKET/PREFIX (a bucket name of 3 to 63 lower-case "
                         "letters, digits, '.' and '-'; a prefix of letters, digits and '_.=/-')")
    return text.rstrip("/")


def parse_endpoint(text: str) -> str:
    """An S3 endpoint as a URL, http://host:port or https://host; '' (AWS itself) as it is."""
    if not text:
        return ""
    url = urllib.parse.urlsplit(text)
    try:
        url.port
    except ValueError:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.hostname or url.path.strip("/") or url.query:
        raise ValueError("must be an endpoint URL such as https://s3.example.net or http://127.0.0.1:9000")
    return text.rstrip("/")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configuration setting: environment variable NAME, flag --name, parser, default, help."""
    name: str
    parse: Callable[[str], object]
    default: Callable[[dict], str]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.lower().replace("_", "-")


SETTINGS = (
    Setting("PORT", parse_port, lambda s: "9069", "HEP port, UDP and TCP"),
    Setting("HOST", str, lambda s: "0.0.0.0", "address to listen on; '::' takes IPv6 and IPv4"),
    Setting("TLS_PORT", parse_port_or_off, lambda s: "0",
            "port of HEP over TLS (TCP framing inside TLS), on HOST; 0: none"),
    Setting("TLS_CERT", str, lambda s: "", "the TLS listener's certificate chain (PEM)"),
    Setting("TLS_KEY", str, lambda s: "", "the TLS listener's private key (PEM)"),
    Setting("TLS_CLIENT_CA", str, lambda s: "",
            "when set, a TLS agent must present a certificate signed by these CAs (PEM)"),
    Setting("HTTP_PORT", parse_port, lambda s: str(s["port"] + 1), "HTTP port of /query, /health, /metrics"),
    Setting("PARQUET_DIR", os.path.abspath, lambda s: "./data", "root folder of the Parquet tree"),
    Setting("WRITER_ID", parse_writer_id, lambda s: socket.gethostname() or "hepop",
            "this server's folder under PARQUET_DIR (default: the host name)"),
    Setting("RCVBUF_BYTES", parse_bytes, lambda s: "32M",
            "UDP receive buffer to ask the kernel for (SO_RCVBUFFORCE when privileged)"),
    Setting("UDP_BATCH", parse_positive_int, lambda s: "256", "datagrams read per wake-up of the loop"),
    Setting("FLUSH_ROWS", parse_positive_int, lambda s: "20000", "write a type's batch at this many rows"),
    Setting("FLUSH_BYTES", parse_bytes, lambda s: "16M", "write a type's batch at this many payload bytes"),
    Setting("FLUSH_INTERVAL_S", parse_seconds, lambda s: "1.0", "write a batch once its oldest row is this old"),
    Setting("CALL_RECORDS_INTERVAL_S", parse_seconds, lambda s: "5.0",
            "write the call records of the SIP files written in this long together, as one file per folder"),
    Setting("MAX_PENDING_BYTES", parse_bytes, lambda s: "256M",
            "bytes buffered and not yet written; near it reading pauses (UDP waits in the kernel, TCP agents "
            "are held back), and a packet that does not fit is dropped as buffer_full"),
    Setting("MAX_INFLATING_BYTES", parse_bytes, lambda s: "64M",
            "compressed payloads (chunk 16) not yet written, each counted as the 1 MiB it may inflate to: a "
            "budget of their own beside MAX_PENDING_BYTES, so that a flood of them never costs uncompressed "
            "traffic; one that does not fit is dropped as inflating_full"),
    Setting("MAX_TCP_CONNECTIONS", parse_positive_int, lambda s: "4096", "concurrent TCP agents accepted"),
    Setting("TCP_IDLE_TIMEOUT_S", parse_seconds, lambda s: "300",
            "a TCP agent silent this long gives up its connection when a new agent needs the slot"),
    Setting("TCP_FRAME_TIMEOUT_S", parse_seconds, lambda s: "15",
            "a TCP connection that sends bytes and no HEP frame this long is closed; with every slot taken, a "
            "new connection takes the slot of the one that has done so longest"),
    Setting("MAX_HTTP_CONNECTIONS", parse_positive_int, lambda s: "64",
            "concurrent HTTP connections; more are closed at once (each takes a thread and a descriptor)"),
    Setting("COMPACT_INTERVAL_S", parse_seconds, lambda s: "60",
            "how often closed hours are merged into one sorted file and retention is applied"),
    Setting("COMPACT_GRACE_S", parse_seconds, lambda s: "300",
            "an hour is compacted once it ended this long ago (late packets still land in raw files)"),
    Setting("COMPACT_MEMORY_MB", parse_positive_int, lambda s: "256",
            "memory budget of the process that compacts an hour, over its imports (DuckDB sorts in half)"),
    Setting("RETENTION", parse_duration, lambda s: "7d",
            "files whose newest row is older are deleted; RETENTION_<type> (e.g. RETENTION_100=1d) per type"),
    Setting("MAX_DISK_PERCENT", parse_percent, lambda s: "90",
            "when the filesystem is fuller, the oldest hours are deleted (0: off)"),
    Setting("MAX_DISK_BYTES", parse_bytes, lambda s: "0",
            "when this writer's files take more, the oldest hours are deleted (0: off)"),
    Setting("S3_URL", parse_s3_url, lambda s: "",
            "s3://BUCKET/PREFIX: each closed 10-minute folder goes there as one object, then leaves this disk; "
            "queries read every writer's objects (credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"),
    Setting("S3_ENDPOINT", parse_endpoint, lambda s: "",
            "URL of an S3-compatible service (MinIO, Ceph, R2; http:// for a local one); default AWS"),
    Setting("S3_REGION", str, lambda s: "us-east-1", "the bucket's region"),
    Setting("UPLOAD_DELAY_S", parse_seconds, lambda s: "60",
            "a 10-minute folder is uploaded this long after it closed (late packets still land in it)"),
    Setting("QUERY_TIMEOUT_S", parse_seconds, lambda s: "30", "a query running longer is stopped (HTTP 504)"),
    Setting("QUERY_MEMORY_MB", parse_query_memory_mb, lambda s: "512",
            "memory of the query process beyond its start, a hard limit; half of it is DuckDB's"),
    Setting("QUERY_SPILL_BYTES", parse_bytes, lambda s: "2G",
            "disk that queries may spill to, in WRITER_ID/.query-tmp; the disk guard does not count it"),
    Setting("QUERY_MAX_ROWS", parse_positive_int, lambda s: "100000", "rows a query returns at most"),
    Setting("MAX_QUERIES", parse_positive_int, lambda s: "4",
            "queries run at once; more wait QUERY_WAIT_S for a turn, then get 503 with Retry-After"),
    Setting("QUERY_THREADS", parse_positive_int, lambda s: "1",
            "threads a query may use; the query process runs at a lower CPU priority than capture"),
    Setting("API_TOKEN", str, lambda s: "",
            "when set, every HTTP route but /health and the login needs 'Authorization: Bearer <token>'"),
    Setting("API_USERS_FILE", str, lambda s: "",
            "users who may log in (POST /api/v3/auth): lines 'name:hash', the hash from 'hepop hash-password'; "
            "when set, every route but /health and the login needs their token or API_TOKEN"),
    Setting("JWT_SECRET", str, lambda s: "",
            "key that signs login tokens (default: a random key kept in JWT_SECRET_FILE)"),
    Setting("JWT_SECRET_FILE", os.path.abspath, lambda s: s["parquet_dir"].rstrip("/") + ".jwt-secret",
            "where the random key that signs login tokens is made once and kept; outside PARQUET_DIR, "
            "where no query reaches it"),
    Setting("TOKEN_TTL", parse_duration, lambda s: "12h", "how long a login token is valid"),
    Setting("UI_DIR", str, lambda s: "", "a folder of static files served at / instead of hepop's own page "
            "(a built homer-ui), with index.html for any other path that is no file and no API route"),
    Setting("HTTP_HOST", str, lambda s: s["host"] if s["api_token"] or s["api_users_file"] else "127.0.0.1",
            "address of the HTTP port: call data is personal data, so without API_TOKEN it is loopback "
            "only unless set here"),
    Setting("HEP_AUTH_KEY", str, lambda s: "",
            "when set, only HEP3 packets whose chunk 14 equals it are kept (never written to disk)"),
    Setting("DISCARD_METHODS", parse_methods, lambda s: "",
            "SIP requests of these methods, and the responses to them (by CSeq), are not stored, only counted "
            "(hep_discarded_total{method}); e.g. OPTIONS,NOTIFY"),
    Setting("MAX_CALLS_TRACKED", parse_positive_int, lambda s: "200000",
            "calls in progress held for the call KPIs on /metrics (about 200 bytes each); past it the one "
            "begun longest ago is let go and counted"),
    Setting("QUIET_WARNING_S", parse_seconds, lambda s: "60",
            "with nothing received this long, say so in the log and on /health (an agent that sends nothing)"),
    Setting("STATS_INTERVAL_S", parse_seconds, lambda s: "60", "log the counters this often while non-zero"),
    Setting("LOG_LEVEL", parse_log_level, lambda s: "INFO", "DEBUG, INFO, WARNING or ERROR"),
)


@dataclasses.dataclass(frozen=True)
class Config:
    port: int
    host: str
    tls_port: int
    tls_cert: str
    tls_key: str
    tls_client_ca: str
    http_port: int
    parquet_dir: str
    writer_id: str
    rcvbuf_bytes: int
    udp_batch: int
    flush_rows: int
    flush_bytes: int
    flush_interval_s: float
    call_records_interval_s: float
    max_pending_bytes: int
    max_inflating_bytes: int
    max_tcp_connections: int
    tcp_idle_timeout_s: float
    tcp_frame_timeout_s: float
    max_http_connections: int
    compact_interval_s: float
    compact_grace_s: float
    compact_memory_mb: int
    retention: float
    max_disk_percent: float
    max_disk_bytes: int
    s3_url: str
    s3_endpoint: str
    s3_region: str
    upload_delay_s: float
    query_timeout_s: float
    query_memory_mb: int
    query_spill_bytes: int
    query_max_rows: int
    max_queries: int
    query_threads: int
    api_token: str
    api_users_file: str
    jwt_secret: str
    jwt_secret_file: str
    token_ttl: float
    ui_dir: str
    http_host: str
    hep_auth_key: str
    discard_methods: frozenset
    max_calls_tracked: int
    quiet_warning_s: float
    stats_interval_s: float
    log_level: str
    retention_by_type: tuple = ()          # ((type, seconds), ...) from RETENTION_<type> variables
    chosen: frozenset = frozenset()         # the names of the settings given by a flag or the environment

    @classmethod
    def load(cls, argv: list[str], environ: dict[str, str]) -> "Config":
        """Settings from --flags, else the environment, else the defaults; raises ConfigError."""
        flags = vars(argument_parser().parse_args(argv))
        values: dict[str, object] = {}
        chosen = set()
        for setting in SETTINGS:
            key = setting.name.lower()
            text = flags.get(key)
            if text is None:
                text = environ.get(setting.name)
            if text is None:
                text = setting.default(values)
            else:
                chosen.add(setting.name)
            try:
                values[key] = setting.parse(text)
            except ValueError as exc:
                raise ConfigError(f"{setting.name}={text!r}: {exc}") from None
        by_type = []
        for name, text in sorted(environ.items()):
            if re.fullmatch(r"RETENTION_\d+", name):
                try:
                    by_type.append((int(name.split("_")[1]), parse_duration(text)))
                except ValueError as exc:
                    raise ConfigError(f"{name}={text!r}: {exc}") from None
        if values["tls_port"] and not (values["tls_cert"] and values["tls_key"]):
            raise ConfigError(f"TLS_PORT={values['tls_port']}: TLS_CERT and TLS_KEY must name its certificate "
                              "and key")
        key_file, data = os.path.realpath(values["jwt_secret_file"]), os.path.realpath(values["parquet_dir"])
        if key_file == data or key_file.startswith(data.rstrip("/") + "/"):
            raise ConfigError(f"JWT_SECRET_FILE={values['jwt_secret_file']!r}: it lies inside PARQUET_DIR, "
                              "where queries read; keep the key outside it")
        return cls(**values, retention_by_type=tuple(by_type), chosen=frozenset(chosen))


# Descriptors kept beside the connections for what hepop opens itself: Parquet files being written,
# metadata.json, DuckDB's files and spill, the compaction process's pipes, /proc.
FILE_DESCRIPTOR_RESERVE = 256


# Below these, a limit the user did not set is not scaled down: too few to be of use, so hepop says so.
MIN_FITTED_TCP_CONNECTIONS = 64
MIN_FITTED_HTTP_CONNECTIONS = 8


def fit_descriptors(config: Config) -> Config:
    """Raise the soft RLIMIT_NOFILE to the hard one and fit the connections allowed in it beside
    FILE_DESCRIPTOR_RESERVE: an agent that connects must never take the descriptor a write needs.
    MAX_TCP_CONNECTIONS and MAX_HTTP_CONNECTIONS that the user did not set are lowered to fit (HTTP to
    an eighth of what is left at most, TCP to the rest): the defaults need 4,416 descriptors, and a hard
    limit of 1,024 or 4,096 is common.  Returns the config as fitted; raises ConfigError naming the
    settings when those the user set do not fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    tcp, http = config.max_tcp_connections, config.max_http_connections
    left = soft - FILE_DESCRIPTOR_RESERVE
    if tcp + http > left and "MAX_HTTP_CONNECTIONS" not in config.chosen:
        room = left - (tcp if "MAX_TCP_CONNECTIONS" in config.chosen else 0)
        http = max(MIN_FITTED_HTTP_CONNECTIONS, min(http, room // 8 if "MAX_TCP_CONNECTIONS" not in
                                                      config.chosen else room))
    if tcp + http > left and "MAX_TCP_CONNECTIONS" not in config.chosen:
        tcp = max(MIN_FITTED_TCP_CONNECTIONS, left - http)
    if tcp + http > left:
        raise ConfigError(f"MAX_TCP_CONNECTIONS={config.max_tcp_connections} and MAX_HTTP_CONNECTIONS="
                          f"{config.max_http_connections} need at least {tcp + http + FILE_DESCRIPTOR_RESERVE} "
                          f"descriptors with {FILE_DESCRIPTOR_RESERVE} "
                          f"kept for files, and the open-file limit is {soft}: lower them, or raise the limit "
                          f"(LimitNOFILE= in the unit)")
    return dataclasses.replace(config, max_tcp_connections=tcp, max_http_connections=http)


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hepop", description="HEP capture server writing Apache Parquet.",
        epilog="Every setting is also read from the environment variable named in capitals; a flag wins. "
               "RETENTION_<type> variables (RETENTION_100=1d) set the retention of one HEP type. "
               "'hepop hash-password' reads a password on stdin and prints the hash for API_USERS_FILE.")
    parser.add_argument("--version", action="version", version=f"hepop {__version__}")
    for setting in SETTINGS:
        default = {"HTTP_PORT": "PORT+1", "WRITER_ID": "host name", "HTTP_HOST": "127.0.0.1, or HOST with "
                   "API_TOKEN or API_USERS_FILE", "JWT_SECRET_FILE": "PARQUET_DIR.jwt-secret"}.get(setting.name) or \
            setting.default({})
        parser.add_argument(setting.flag, dest=setting.name.lower(), metavar=setting.name,
                            help=f"{setting.help} [env {setting.name}, default {default or 'unset'}]")
    return parser


# ---------------------------------------------------------------------------------------------------------
# Shared: counters and their metric names, the rate-limited log, CPU priorities.
# ---------------------------------------------------------------------------------------------------------

def metric_key(name: str, **labels: str) -> str:
    """A counter's name in Prometheus form: name{label="value",...}."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{key}="{value}"' for key, value in sorted(labels.items())) + "}"


class Counters:
    """Every counter of the server in one place, safe to update from the loop and the writer."""

    def __init__(self):
        self._values: collections.Counter = collections.Counter()
        self.histograms: set[str] = set()       # the names observe() made histograms of
        self._lock = threading.Lock()

    def add(self, name: str, amount: float = 1, **labels: str) -> None:
        key = metric_key(name, **labels)
        with self._lock:
            self._values[key] += amount

    def maximum(self, name: str, value: float) -> None:
        with self._lock:
            self._values[name] = max(self._values[name], value)

    def observe(self, name: str, values: list[float], buckets: tuple, **labels: str) -> None:
        """Observations of a Prometheus histogram: name_bucket{le=...} for every bound, _sum, _count."""
        ordered = sorted(values)
        with self._lock:
            self.histograms.add(name)
            for bound in buckets:
                self._values[metric_key(name + "_bucket", le=f"{bound:g}", **labels)] += \
                    bisect.bisect_right(ordered, bound)
            self._values[metric_key(name + "_bucket", le="+Inf", **labels)] += len(ordered)
            self._values[metric_key(name + "_sum", **labels)] += sum(ordered)
            self._values[metric_key(name + "_count", **labels)] += len(ordered)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(sorted(self._values.items()))


class RateLimitedLog:
    """Logs at most `burst` lines per reason in each `interval_s`, then says how many it held back."""

    def __init__(self, interval_s: float = 10.0, burst: int = 5):
        self.interval_s = interval_s
        self.burst = burst
        self._windows: dict[str, list] = {}
        self._lock = threading.Lock()           # the loop and the writer both log bad packets

    def warning(self, reason: str, message: str, *args) -> None:
        with self._lock:
            self._log(logging.WARNING, reason, message, *args)

    def info(self, reason: str, message: str, *args) -> None:
        with self._lock:
            self._log(logging.INFO, reason, message, *args)

    def _log(self, level: int, reason: str, message: str, *args) -> None:
        now = time.monotonic()
        window = self._windows.setdefault(reason, [now, 0, 0])   # start, logged, suppressed
        if now - window[0] >= self.interval_s:
            if window[2]:
                log.warning("%d more '%s' messages were not logged", window[2], reason)
            window[:] = [now, 0, 0]
        if window[1] < self.burst:
            window[1] += 1
            log.log(level, message, *args)
        else:
            window[2] += 1


def format_time(us: int) -> str:
    """A time in microseconds as ISO 8601 UTC; one outside years 1-9999 as its number of microseconds."""
    try:
        moment = EPOCH + datetime.timedelta(microseconds=us)
    except OverflowError:
        return f"{us} us since 1970"
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


QUERY_NICE = 10           # a query someone waits for still gets its share of a busy machine
COMPACTION_NICE = 19      # compaction can wait for the CPU that capture and queries leave


def lower_priority(nice: int) -> None:
    """Run the calling thread (a query's or the compactor's; DuckDB executes in it with one thread)
    below the capture loop, so that heavy work takes the CPU that capture leaves, not the reverse."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, max(os.getpriority(os.PRIO_PROCESS, thread), nice))
    except OSError:
        pass                            # not allowed here (a seccomp filter): run at normal priority


class JournalFormatter(logging.Formatter):
    """Under journald: no timestamp of ours (journald keeps its own) and the level as a <N> prefix,
    which journald reads as the syslog priority."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def setup_logging(level: str) -> None:
    """One line per event on stderr, in the form journald reads well when it is the reader."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


PR_SET_PDEATHSIG = 1
OOM_SCORE_ADJ = {"compaction": 500, "queries": 1000}   # the kernel's memory killer takes these before capture


def become_child(parent_pid: int, nice: int, oom_score_adj: int) -> bool:
    """Set up a child process of hepop's (compaction, queries): it dies with its parent, so that a killed
    hepop leaves nothing behind; it runs below capture's CPU priority; and when the box runs out of
    memory (MemoryMax in the unit), the kernel kills it, not the capture process, which holds packets
    that exist nowhere else.  False if the parent died before this could be armed."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        with open("/proc/self/oom_score_adj", "w") as adjust:
            adjust.write(str(oom_score_adj))
    except (OSError, AttributeError):
        pass                                # not Linux, or not allowed: it still works, less guarded
    return os.getppid() == parent_pid


# ---------------------------------------------------------------------------------------------------------
# HEP protocol: decoding versions 1, 2 and 3, and TCP stream framing.  Pure code, no I/O.
# ---------------------------------------------------------------------------------------------------------

class HepError(ValueError):
    """A packet that cannot be decoded; `reason` names the counter it is dropped under."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class HepPacket(NamedTuple):
    version: int
    time_us: Optional[int]          # capture time in microseconds since the epoch; None when not sent
    ip_family: int
    protocol: int
    src_ip: Optional[bytes]         # packed: 4 bytes IPv4, 16 bytes IPv6; turned into text per batch
    dst_ip: Optional[bytes]
    src_port: int
    dst_port: int
    proto_type: int
    capture_id: int
    node_name: Optional[str]
    correlation_id: Optional[str]
    vlan: Optional[int]
    auth_key: Optional[bytes]       # checked by the server, never stored
    payload: bytes


HEP3_MAGIC = b"HEP3"
MAX_INFLATED_BYTES = 1 << 20       # bound for compressed payloads (chunk 16)
_CHUNK_HEADER = struct.Struct("!HHH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_V2_TIME = struct.Struct("<IIH")    # HEPv2 time block as real senders write it: little-endian
_PORTS = struct.Struct("!HH")


class CommonPrefix(NamedTuple):
    """The chunks that agents send first, in the same order every time: their headers checked with one
    struct and their values read with another, instead of one chunk at a time."""
    size: int
    headers: struct.Struct
    expected: tuple
    values: struct.Struct
    chunks: tuple                   # (kind, struct code, offset of the value) of each chunk
    useconds_offset: int            # where the value of chunk 10, the microseconds, is


# How the value of each chunk of a common prefix is read: addresses stay packed.
_PREFIX_CODES = {1: "B", 2: "B", 3: "4s", 4: "4s", 5: "16s", 6: "16s", 7: "H", 8: "H", 9: "I", 10: "I",
                 11: "B", 12: "I"}
# The chunks whose body has one size; 13 (keep-alive) and 18 (VLAN) are not in any prefix.
_FIXED_CHUNK_BODY = {**{kind: struct.calcsize("!" + code) for kind, code in _PREFIX_CODES.items()}, 13: 2, 18: 2}


def common_prefix(kinds: tuple) -> CommonPrefix:
    codes = [_PREFIX_CODES[kind] for kind in kinds]
    sizes = [struct.calcsize("!" + code) for code in codes]
    headers = struct.Struct("!6x" + "".join(f"HHH{size}x" for size in sizes))
    values = struct.Struct("!6x" + "".join(f"6x{code}" for code in codes))
    expected = tuple(value for kind, size in zip(kinds, sizes) for value in (0, kind, size + 6))
    offsets = list(itertools.accumulate((size + 6 for size in sizes), initial=12))
    return CommonPrefix(headers.size, headers, expected, values, tuple(zip(kinds, codes, offsets)),
                        offsets[kinds.index(10)])


# IP family, protocol, source and destination address, ports, seconds, microseconds, protocol type and
# capture id, in this order: what Kamailio, OpenSIPS, heplify, captagent and hep-js all send first.
COMMON_PREFIXES = (common_prefix((1, 2, 3, 4, 7, 8, 9, 10, 11, 12)), common_prefix((1, 2, 5, 6, 7, 8, 9, 10, 11, 12)))
# Where each field sits in a HepPacket, for the chunk loop that fills one in.
(_VERSION, _TIME, _FAMILY, _PROTOCOL, _SRC_IP, _DST_IP, _SRC_PORT, _DST_PORT, _PROTO_TYPE, _CAPTURE_ID,
 _NODE_NAME, _CORRELATION_ID, _VLAN, _AUTH_KEY, _PAYLOAD) = range(len(HepPacket._fields))


MAX_MICROSECONDS = 999_999       # more would move the time by up to 71 minutes: malformed


# Every reason decode() gives, as hep_dropped_total{reason="malformed_<reason>"} counts them.
HEP_ERRORS = ("unknown_version", "short", "length_mismatch", "truncated_chunk", "bad_chunk_length",
              "embedded_frame", "bad_microseconds", "bad_compressed_payload", "compressed_payload_too_large",
              "bad_family", *(f"bad_chunk_{kind}" for kind in sorted(_FIXED_CHUNK_BODY)))


def decode(buf: bytes) -> HepPacket:
    """Decode one HEP message (a UDP datagram or one TCP frame) of any version."""
    if buf[:4] == HEP3_MAGIC:
        return _decode_v3(buf)
    if buf[:1] in (b"\x01", b"\x02"):
        return _decode_v1_v2(buf)
    raise HepError("unknown_version")


def _decode_v3(buf: bytes) -> HepPacket:
    size = len(buf)
    if size < 6:
        raise HepError("short")
    if _U16.unpack_from(buf, 4)[0] != size:
        raise HepError("length_mismatch")
    for prefix in COMMON_PREFIXES:
        if size >= prefix.size and prefix.headers.unpack_from(buf) == prefix.expected:
            family, protocol, src, dst, src_port, dst_port, seconds, useconds, proto_type, capture_id = \
                prefix.values.unpack_from(buf)
            row = [3, None, family, protocol, src, dst, src_port, dst_port, proto_type, capture_id,
                   None, None, None, None, b""]
            pos = prefix.size
            break
    else:
        row = [3, None, 0, 0, None, None, 0, 0, 0, 0, None, None, None, None, b""]
        seconds, useconds, pos = None, 0, 6
    while pos < size:
        if size - pos < 6:
            raise HepError("truncated_chunk")
        vendor, kind, length = _CHUNK_HEADER.unpack_from(buf, pos)
        end = pos + length
        if length < 6 or end > size:
            raise HepError("bad_chunk_length")
        start = pos + 6
        pos = end
        if vendor != 0:
            if vendor == 0x4845 and kind == 0x5033:      # "HEP3": a frame glued inside a lying length
                raise HepError("embedded_frame")
            continue
        fixed = _FIXED_CHUNK_BODY.get(kind)
        if fixed is not None and length - 6 != fixed:
            raise HepError(f"bad_chunk_{kind}")
        if kind == 15:
            row[_PAYLOAD] = buf[start:end]
        elif kind == 1:
            row[_FAMILY] = buf[start]
        elif kind == 2:
            row[_PROTOCOL] = buf[start]
        elif kind == 3 or kind == 5:
            row[_SRC_IP] = bytes(buf[start:end])
        elif kind == 4 or kind == 6:
            row[_DST_IP] = bytes(buf[start:end])
        elif kind == 7:
            row[_SRC_PORT] = _U16.unpack_from(buf, start)[0]
        elif kind == 8:
            row[_DST_PORT] = _U16.unpack_from(buf, start)[0]
        elif kind == 9:
            seconds = _U32.unpack_from(buf, start)[0]
        elif kind == 10:
            useconds = _U32.unpack_from(buf, start)[0]
        elif kind == 11:
            row[_PROTO_TYPE] = buf[start]
        elif kind == 12:
            row[_CAPTURE_ID] = _U32.unpack_from(buf, start)[0]
        elif kind == 14:
            row[_AUTH_KEY] = bytes(buf[start:end])
        elif kind == 16:
            row[_PAYLOAD] = inflate(buf[start:end])
        elif kind == 17:
            row[_CORRELATION_ID] = buf[start:end].decode("utf-8", "replace")
        elif kind == 18:
            row[_VLAN] = _U16.unpack_from(buf, start)[0]
        elif kind == 19:
            row[_NODE_NAME] = buf[start:end].rstrip(b"\x00").decode("utf-8", "replace")
        # 13 (keep-alive), 20-24 (MACs, ethertype, TCP flags, TOS), 32-41 (QoS tags) and unknown
        # types are accepted and not stored.
    if seconds is not None:
        if useconds > MAX_MICROSECONDS:
            raise HepError("bad_microseconds")
        row[_TIME] = seconds * 1_000_000 + useconds
    row[_PAYLOAD] = bytes(row[_PAYLOAD])
    return tuple.__new__(HepPacket, row)      # HepPacket(*row) without the keyword-argument handling


def _decode_v1_v2(buf: bytes) -> HepPacket:
    """HEPv1/v2: a fixed header without magic or length; the header-length byte is not trusted."""
    version = buf[0]
    if len(buf) < 8:
        raise HepError("short")
    family, protocol = buf[2], buf[3]
    if family == socket.AF_INET:
        address_size = 4
    elif family == 10:
        address_size = 16
    else:
        raise HepError("bad_family")
    addresses_end = 8 + 2 * address_size
    header_end = addresses_end + (12 if version == 2 else 0)
    if len(buf) < header_end:
        raise HepError("short")
    src_port, dst_port = _PORTS.unpack_from(buf, 4)
    src_ip, dst_ip = bytes(buf[8:8 + address_size]), bytes(buf[8 + address_size:addresses_end])
    time_us, capture_id = None, 0
    if version == 2:
        seconds, useconds, capture_id = _V2_TIME.unpack_from(buf, addresses_end)
        if useconds > MAX_MICROSECONDS:
            raise HepError("bad_microseconds")
        time_us = seconds * 1_000_000 + useconds
    return HepPacket(version, time_us, family, protocol, src_ip, dst_ip, src_port, dst_port, 1,
                     capture_id, None, None, None, None, bytes(buf[header_end:]))


def inflate(data: bytes) -> bytes:
    """Inflate a compressed payload (zlib, gzip or raw deflate), refusing more than MAX_INFLATED_BYTES."""
    wbits = 47 if data[:1] in (b"\x78", b"\x1f") else -15   # 47: zlib or gzip by header; -15: raw
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, MAX_INFLATED_BYTES)
    except zlib.error:
        raise HepError("bad_compressed_payload") from None
    if inflater.unconsumed_tail:
        raise HepError("compressed_payload_too_large")
    if not inflater.eof:
        raise HepError("bad_compressed_payload")
    return out


class HepStream:
    """Cuts a TCP byte stream into HEP3 frames, however the bytes are split or glued.

    Frames are found by their magic and length alone.  Bytes that are not part of a frame are skipped
    up to the next "HEP3" and counted in `garbage_bytes`.  When the caller rejects a frame it was given
    (reject()), only that frame's magic is dropped and the search restarts inside it, so a frame whose
    length field lies never swallows the good frames behind it.
    """

    def __init__(self):
        self._buf = bytearray()
        self._pos = 0
        self._last_frame_size = 0
        self.garbage_bytes = 0

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def next_frame(self) -> Optional[bytes]:
        """The next complete frame, or None until more bytes arrive."""
        buf, pos = self._buf, self._pos
        while len(buf) - pos >= 6:
            if buf[pos:pos + 4] != HEP3_MAGIC:
                found = buf.find(HEP3_MAGIC, pos)
                skip_to = found if found >= 0 else max(pos, len(buf) - 3)
                self.garbage_bytes += skip_to - pos
                pos = skip_to
                continue
            length = (buf[pos + 4] << 8) | buf[pos + 5]
            if length < 6:
                self.garbage_bytes += 4
                pos += 4
                continue
            if len(buf) - pos < length:
                break
            self._pos = pos + length
            self._last_frame_size = length
            return bytes(buf[pos:pos + length])
        self._pos = pos
        return None

    def settle(self) -> int:
        """Once the frames were taken: keep only the bytes of the incomplete frame, in a buffer of their own
        size (the read that brought them may have been 256 KiB), and return how many they are."""
        if self._pos:
            self._buf = self._buf[self._pos:]
            self._pos = 0
        return len(self._buf)

    def unread(self) -> None:
        """Put back the frame last returned, whole, to be returned again."""
        self._pos -= self._last_frame_size
        self._last_frame_size = 0

    def reject(self) -> None:
        """Give back the frame last returned, less its magic, to be searched for frames again."""
        self._pos -= self._last_frame_size - 4
        self.garbage_bytes += 4
        self._last_frame_size = 0

    def finish(self) -> list[bytes]:
        """At end of stream: the complete frames left, giving up on a frame that will never complete."""
        frames = []
        while True:
            frame = self.next_frame()
            if frame is not None:
                frames.append(frame)
            elif len(self._buf) - self._pos >= 4:
                self.garbage_bytes += 4
                self._pos += 4
            else:
                self.garbage_bytes += len(self._buf) - self._pos
                self._buf.clear()
                self._pos = 0
                return frames


# ---------------------------------------------------------------------------------------------------------
# Batch decoding: the UDP datagrams and TCP frames of one flush, decoded by Arrow over the whole batch.
#
# Most agents send the common prefix and then the payload chunk, and nothing else (Kamailio, OpenSIPS and
# heplify without an auth key).  Such messages are recognised and decoded by Arrow compute over the whole
# batch, outside the GIL; every other message (another layout, HEP v1 or v2, an auth key, a correlation
# id, a malformed one) goes through decode().  Both give a table of PACKET_SCHEMA.
# ---------------------------------------------------------------------------------------------------------

PACKET_SCHEMA = pa.schema([
    ("time", pa.int64()),               # capture time in microseconds; null when the packet has none
    ("ip_family", pa.uint8()), ("protocol", pa.uint8()),
    ("src_ip", pa.binary()), ("dst_ip", pa.binary()),   # packed, as HepPacket has them
    ("src_port", pa.uint16()), ("dst_port", pa.uint16()),
    ("proto_type", pa.uint8()), ("capture_id", pa.uint32()),
    ("node_name", pa.string()), ("correlation_id", pa.string()), ("vlan", pa.uint16()),
    ("payload", pa.binary()),
])
PAYLOAD_CHUNK = 15
_COLUMN_OF_CHUNK = {1: "ip_family", 2: "protocol", 3: "src_ip", 4: "dst_ip", 5: "src_ip", 6: "dst_ip",
                    7: "src_port", 8: "dst_port", 11: "proto_type", 12: "capture_id"}


def packet_table(times: list, packets: list[HepPacket]) -> pa.Table:
    """The PACKET_SCHEMA table of packets decoded one by one, with the capture times to store."""
    columns = dict(zip(HepPacket._fields, zip(*packets))) if packets else \
        {name: [] for name in HepPacket._fields}
    columns["time"] = times
    return pa.table({field.name: pa.array(columns[field.name], field.type) for field in PACKET_SCHEMA},
                    schema=PACKET_SCHEMA)


def decode_common(datagrams: pa.BinaryArray, prefix: CommonPrefix) -> tuple[pa.BooleanArray, pa.Table]:
    """Over a whole batch: which datagrams are HEP3 with exactly `prefix`, then one payload chunk to the
    end, and the PACKET_SCHEMA table of those.  Their heads are cut to one fixed width first, so that
    each check and each field is one pass over a small array, not over the datagrams."""
    width = prefix.size + 6
    sizes = pc.binary_length(datagrams)
    long_enough = pc.greater_equal(sizes, width)
    head = pc.binary_slice(datagrams, 0, width)
    if long_enough.false_count:
        head = pc.if_else(long_enough, head, pa.scalar(bytes(width)))
    head = head.cast(pa.binary(width))
    checks = [long_enough,
              pc.equal(pc.binary_slice(head, 0, 4), pa.scalar(HEP3_MAGIC)),
              pc.equal(big_endian(head, 4, 2), sizes),
              pc.equal(pc.binary_slice(head, prefix.size, prefix.size + 4),
                       pa.scalar(_CHUNK_HEADER.pack(0, PAYLOAD_CHUNK, 0)[:4])),
              pc.equal(big_endian(head, prefix.size + 4, 2), pc.subtract(sizes, prefix.size))]
    for kind, code, offset in prefix.chunks:
        header = _CHUNK_HEADER.pack(0, kind, struct.calcsize("!" + code) + 6)
        checks.append(pc.equal(pc.binary_slice(head, offset - 6, offset), pa.scalar(header)))
    # What is over MAX_MICROSECONDS is left to decode(), which says why.
    checks.append(pc.less_equal(big_endian(head, prefix.useconds_offset, 4), MAX_MICROSECONDS))
    picked = functools.reduce(pc.and_, checks)
    head, datagrams = kept(head, picked), kept(datagrams, picked)
    columns = {field.name: pa.nulls(len(datagrams), field.type) for field in PACKET_SCHEMA}
    times = {}
    for kind, code, offset in prefix.chunks:
        size = struct.calcsize("!" + code)
        if code.endswith("s"):
            value = pc.binary_slice(head, offset, offset + size).cast(pa.binary())
        else:
            value = big_endian(head, offset, size)
        if kind in (9, 10):
            times[kind] = value.cast(pa.int64())
        else:
            name = _COLUMN_OF_CHUNK[kind]
            columns[name] = value.cast(PACKET_SCHEMA.field(name).type)
    columns["time"] = pc.add(pc.multiply(times[9], 1_000_000), times[10])
    columns["payload"] = pc.binary_slice(datagrams, width, 1 << 16)
    return picked, pa.table(columns, schema=PACKET_SCHEMA)


def kept(values: pa.Array, mask: pa.BooleanArray) -> pa.Array:
    """values.filter(mask), without the copy when the mask keeps them all, as it does in most batches."""
    return values if mask.true_count == len(values) else values.filter(mask)


def has_common_layout(message: bytes) -> bool:
    """decode_common()'s check for one message: for a TCP frame, whose framing must know whether it decodes."""
    size = len(message)
    for prefix in COMMON_PREFIXES:
        if (size >= prefix.size + 6 and message[:4] == HEP3_MAGIC and _U16.unpack_from(message, 4)[0] == size
                and prefix.headers.unpack_from(message) == prefix.expected
                and _CHUNK_HEADER.unpack_from(message, prefix.size) == (0, PAYLOAD_CHUNK, size - prefix.size)
                and _U32.unpack_from(message, prefix.useconds_offset)[0] <= MAX_MICROSECONDS):
            return True
    return False


def big_endian(values: pa.BinaryArray, offset: int, width: int) -> pa.Array:
    """The unsigned big-endian integer of `width` bytes at `offset` in each value (all long enough)."""
    raw = pc.binary_slice(values, offset, offset + width).cast(pa.binary(width))
    native = pa.Array.from_buffers({1: pa.uint8(), 2: pa.uint16(), 4: pa.uint32()}[width], len(raw),
                                   [None, raw.buffers()[1]], offset=raw.offset)
    if width == 1 or sys.byteorder == "big":
        return native
    low_first = [pc.bit_wise_and(pc.shift_right(native, 8 * byte), 0xFF) for byte in range(width)]
    return functools.reduce(lambda high, low: pc.bit_wise_or(pc.shift_left(high, 8), low), low_first)


# ---------------------------------------------------------------------------------------------------------
# Packet checks: capture-time bounds, the auth key, what is counted as received and dropped.
# ---------------------------------------------------------------------------------------------------------

MIN_CAPTURE_TIME_US = 946_684_800 * 1_000_000     # 2000-01-01: anything before is absurd
MAX_CLOCK_AHEAD_US = 86_400 * 1_000_000           # a day ahead of our clock is absurd too


def version_of(data: bytes):
    """The HEP version a message claims, for counting what did not decode."""
    return 3 if data[:4] == HEP3_MAGIC else data[0] if data[:1] in (b"\1", b"\2") else "unknown"


def publish_received(counters: Counters, received: collections.Counter) -> None:
    """Add packets counted by (transport, version) to hep_received_total."""
    for (transport, version), count in received.items():
        counters.add("hep_received_total", count, transport=transport, version=str(version))


# Every reason a packet is dropped for: each series of hep_dropped_total is there from the start, at 0, so
# that rate() and increase() alert on its first drop.
DROP_REASONS = (*(f"malformed_{error}" for error in HEP_ERRORS), "auth", "buffer_full", "inflating_full",
                "partial_frames_full", "decode_error", "write_error", "disk_full")


def count_drops_from_zero(counters: Counters) -> None:
    for reason in DROP_REASONS:
        counters.add("hep_dropped_total", 0, reason=reason)


class PacketCheck:
    """Decoding one message and the checks every decoded packet passes before it is buffered: the auth
    key and a capture time that makes sense.  The loop uses it for the TCP frames it decodes, the writer
    for the messages that batch decoding left to decode(), and capture_times() for those it decoded."""

    def __init__(self, config: Config, counters: Counters):
        self.auth_key = config.hep_auth_key.encode() if config.hep_auth_key else None
        self.counters = counters
        self.bad_packets = RateLimitedLog()

    def decode(self, data: bytes, transport: str, peer, received: collections.Counter) -> Optional[HepPacket]:
        """The packet, counted as received; None when it does not decode (counted as malformed)."""
        try:
            packet = decode(data)
        except HepError as exc:
            received[transport, version_of(data)] += 1
            self.counters.add("hep_dropped_total", reason="malformed_" + exc.reason)
            self.bad_packets.warning(exc.reason, "malformed HEP (%s) from %s over %s: %d bytes",
                                     exc.reason, peer, transport, len(data))
            return None
        received[transport, packet.version] += 1
        return packet

    def capture_time(self, packet: HepPacket, peer, arrival_us: Optional[int] = None) -> Optional[int]:
        """The time to store the packet under; None when it is dropped for its auth key.  A packet without
        a capture time, or with an absurd one, gets its arrival time."""
        if self.auth_key is not None and not hmac.compare_digest(packet.auth_key or b"", self.auth_key):
            self.counters.add("hep_dropped_total", reason="auth")
            self.bad_packets.warning("auth", "HEP from %s without the right auth key: dropped", peer)
            return None
        time_us = packet.time_us
        if time_us is not None and MIN_CAPTURE_TIME_US <= time_us <= time.time_ns() // 1000 + MAX_CLOCK_AHEAD_US:
            return time_us
        if time_us is None:
            self.counters.add("hep_time_replaced_total", why="missing")
        else:
            self.counters.add("hep_time_replaced_total", why="absurd")
            self.bad_packets.warning("bad_time", "absurd capture time %d us from %s: using arrival time",
                                     time_us, peer)
        return arrival_us or time.time_ns() // 1000

    def capture_times(self, packets: pa.Table, arrival_us: int, transport: str) -> Optional[pa.Table]:
        """capture_time() over a table of batch-decoded packets (which carry no auth key): the table with
        absurd times replaced, or None when all are dropped for want of the auth key."""
        if not len(packets):
            return packets
        if self.auth_key is not None:
            self.counters.add("hep_dropped_total", len(packets), reason="auth")
            self.bad_packets.warning("auth", "%d HEP packets over %s without an auth key: dropped", len(packets),
                                     transport)
            return None
        times = packets["time"]
        sane = pc.and_(pc.greater_equal(times, MIN_CAPTURE_TIME_US),
                       pc.less_equal(times, time.time_ns() // 1000 + MAX_CLOCK_AHEAD_US))
        absurd = len(packets) - pc.sum(sane).as_py()
        if absurd:
            self.counters.add("hep_time_replaced_total", absurd, why="absurd")
            self.bad_packets.warning("bad_time", "%d packets over %s with an absurd capture time: using arrival "
                                     "time", absurd, transport)
            packets = packets.set_column(0, "time", pc.if_else(sane, times, pa.scalar(arrival_us, pa.int64())))
        return packets


# ---------------------------------------------------------------------------------------------------------
# SIP fields: extracted over a whole batch at flush by Arrow (outside the GIL), not per packet in Python.
# ---------------------------------------------------------------------------------------------------------

SIP_COLUMNS = ("sip_method", "sip_status", "call_id", "from_user", "to_user", "ruri_user", "cseq", "user_agent")
URI_USER = r"(?:sips?:(?P<user>[^@;?>\s:]+)(?::[^@\s>]*)?@|tel:(?P<user_tel>[^;?>\s]+))"
# The start line: checked whole by a regex without captures (a DFA, fast), then cut into its words.
REQUEST_LINE = r"^[A-Z][A-Za-z_-]* \S* SIP/2\.0"
STATUS_LINE = r"^SIP/2\.0 [1-6][0-9][0-9]"
# Header fields: found by the start of their line as agents write it, with plain string compares.  The
# headers every SIP message has are searched again with a regex in the messages where that found nothing
# (compact forms such as "i:", other letter case, space before the colon: every form RFC 3261 allows).
# User-Agent and Server are optional: the messages that have neither are searched again in any letter case.
SIP_HEADERS = {
    "call_id": ("Call-ID:", r"(?mi)^(?:Call-ID|i)[ \t]*:(?P<value>[^\r\n]*)"),
    "from_user": ("From:", r"(?mi)^(?:From|f)[ \t]*:(?P<value>[^\r\n]*)"),
    "to_user": ("To:", r"(?mi)^(?:To|t)[ \t]*:(?P<value>[^\r\n]*)"),
    "cseq": ("CSeq:", r"(?mi)^CSeq[ \t]*:(?P<value>[^\r\n]*)"),
}


def extract_sip_fields(payload: pa.Array) -> dict[str, pa.Array]:
    """The SIP columns of a batch of payload strings; null where a message lacks the field."""
    lines = pc.split_pattern(payload, "\r\n")
    columns = start_line_fields(pc.list_element(lines, 0))
    header = HeaderLines.of(lines)
    for name, (prefix, pattern) in SIP_HEADERS.items():
        values = header.values(prefix)
        missing = pc.is_null(values)
        if missing.true_count:
            searched = pc.extract_regex(payload.filter(missing), pattern).field("value")
            values = pc.replace_with_mask(values, missing, searched)
        columns[name] = values
    agent = pc.coalesce(header.values("User-Agent:"), header.values("Server:"))
    missing = pc.is_null(agent)
    if missing.true_count:
        rest = header.of_messages(missing)
        agent = pc.coalesce(agent, rest.values("User-Agent:", ignore_case=True),
                            rest.values("Server:", ignore_case=True))
    columns["user_agent"] = agent
    for name in ("from_user", "to_user"):
        columns[name] = uri_user(columns[name], URI_USER)
    for name in ("call_id", "cseq", "user_agent"):       # the others hold no spaces and are never empty
        values = pc.utf8_trim_whitespace(columns[name])
        columns[name] = pc.if_else(pc.equal(values, ""), None, values)
    columns["sip_status"] = columns["sip_status"].cast(pa.uint16())
    return {name: columns[name] for name in SIP_COLUMNS}


def start_line_fields(start_lines: pa.Array) -> dict[str, pa.Array]:
    """Method and Request-URI user of request lines, code of status lines; null in the others.  Worked out
    once for each distinct line: the messages of a dialog repeat theirs."""
    distinct = pc.dictionary_encode(start_lines)
    lines = distinct.dictionary
    request = pc.match_substring_regex(lines, REQUEST_LINE)
    status = pc.match_substring_regex(lines, STATUS_LINE)
    words = pc.split_pattern(lines.filter(request), " ", max_splits=2)
    of_requests = lambda values: pc.replace_with_mask(pa.nulls(len(lines), pa.string()), request, values)
    fields = {"sip_method": of_requests(pc.list_element(words, 0)),
              "sip_status": pc.if_else(status, pc.utf8_slice_codeunits(lines, 8, 11), None),
              "ruri_user": of_requests(uri_user(pc.list_element(words, 1), "^" + URI_USER))}
    return {name: pc.take(values, distinct.indices) for name, values in fields.items()}


def uri_user(values: pa.Array, pattern: str) -> pa.Array:
    """The user part of the SIP, SIPS or tel URI that `pattern` (URI_USER, maybe anchored) finds in each
    value; null where it finds none.  The regex runs once for each distinct value (From and To repeat
    in every message of a dialog): finding its groups costs far more than finding the distinct values."""
    distinct = pc.dictionary_encode(values)
    users = pc.extract_regex(distinct.dictionary, pattern)
    sip, tel = pc.struct_field(users, "user"), pc.struct_field(users, "user_tel")
    return pc.take(pc.if_else(pc.equal(sip, ""), tel, sip), distinct.indices)   # the branch not matched is empty


class HeaderLines:
    """The lines of a batch of SIP messages, flattened, and the message each line belongs to."""

    def __init__(self, lines: pa.Array, message_of_line: pa.Array, count: int):
        self.lines = lines
        self.message_of_line = message_of_line
        self.count = count

    @classmethod
    def of(cls, lines: pa.ListArray) -> "HeaderLines":
        return cls(lines.flatten(), pc.list_parent_indices(lines), len(lines))

    def of_messages(self, mask: pa.BooleanArray) -> "HeaderLines":
        """The lines of the messages where `mask` is true only."""
        keep = pc.take(mask, self.message_of_line)
        return HeaderLines(self.lines.filter(keep), self.message_of_line.filter(keep), self.count)

    def values(self, prefix: str, ignore_case: bool = False) -> pa.Array:
        """Per message, what follows `prefix` on its first line that starts with it; null if none does."""
        hits = pc.indices_nonzero(pc.starts_with(self.lines, prefix, ignore_case=ignore_case))
        messages = pc.take(self.message_of_line, hits)              # in order, as the lines are
        first = pc.fill_null(pc.not_equal(pc.pairwise_diff(messages), 0), True)
        lines = pc.take(self.lines, pc.scatter(hits.filter(first), messages.filter(first),
                                               max_index=self.count - 1))
        if ignore_case:             # what matched may not have the prefix's length in bytes
            return pc.utf8_slice_codeunits(lines, len(prefix))
        return pc.binary_slice(lines.cast(pa.binary()), len(prefix), 1 << 16).cast(pa.string())


# The methods that label SIP counters; any other is OTHER, so that what an agent sends cannot grow the labels.
SIP_METHODS = ("INVITE", "ACK", "BYE", "CANCEL", "REGISTER", "OPTIONS", "PRACK", "UPDATE", "INFO", "REFER",
               "SUBSCRIBE", "NOTIFY", "PUBLISH", "MESSAGE")
MAX_COUNTED_NODES = 64          # capture nodes named in labels; the rest are counted as "other"
# The response codes that label SIP counters (RFC 3261 and the RFCs since); any other is counted by its
# class, 4xx for a 499: 600 codes times 15 methods times 65 nodes would be 600,000 series.
SIP_CODES = (100, 180, 181, 182, 183, 199, 200, 202, 204, 300, 301, 302, 305, 380, 400, 401, 402, 403, 404,
             405, 406, 407, 408, 410, 412, 413, 414, 415, 416, 417, 420, 421, 422, 423, 424, 425, 428, 429, 430,
             433, 436, 437, 438, 439, 440, 469, 470, 480, 481, 482, 483, 484, 485, 486, 487, 488, 489, 491, 493,
             494, 500, 501, 502, 503, 504, 505, 513, 555, 580, 600, 603, 604, 606, 607, 608)
# Histogram bounds in seconds, as Prometheus has them: post-dial delay and setup in seconds, duration in minutes.
PDD_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30)
DURATION_BUCKETS_S = (5, 15, 30, 60, 120, 300, 600, 1800, 3600)
Q850_CAUSE = r"(?i)\nReason:[ \t]*Q\.850[^\r\n]*?cause=(?P<cause>\d{1,3})"


# A call's class by the final answer to its INVITE: the first class whose codes hold it, else "failed".
CALL_CLASSES = (("answered", range(200, 300)), ("busy", (486, 600)), ("no_answer", (408, 480)),
                ("cancelled", (487,)), ("redirected", range(300, 400)))


def call_class(status: int) -> str:
    return next((name for name, codes in CALL_CLASSES if status in codes), "failed")


class CallInProgress:
    """What SipKpis keeps of a call until it ends: about 200 bytes with its Call-ID."""
    __slots__ = ("invite_us", "node", "progressed", "answer_us")

    def __init__(self, invite_us: int, node: str):
        self.invite_us = invite_us
        self.node = node
        self.progressed = False
        self.answer_us: Optional[int] = None


def message_methods(table: pa.Table) -> pa.Array:
    """The method a SIP row belongs to: a request's own, a response's in CSeq (in capitals); null for
    what is not SIP."""
    cseq_method = pc.utf8_upper(pc.replace_substring_regex(table["cseq"], r"^\s*\d+\s+|\s+$", ""))
    return pc.if_else(pc.is_null(table["sip_status"]), table["sip_method"], cseq_method)


class SipKpis:
    """SIP KPIs counted by the writer as it stores each batch of SIP rows, for /metrics; no address or
    number is a label, and every label is bounded (SIP_METHODS or OTHER, codes 100-699, causes 0-127,
    MAX_COUNTED_NODES capture nodes: chunk 19, else the capture id).

    hepop_sip_messages_total{node, method, response}: a request under its method in both labels, a
    response under its CSeq method and its code, as heplify-server's heplify_method_response counts them,
    so that Grafana panels built on it port by renaming.  hepop_sip_q850_causes_total{node, cause}: the
    Q.850 cause of each Reason header.

    Calls, from their INVITE's first final answer: hepop_calls_total{node, class} (call_class), and the
    histograms hepop_call_pdd_seconds (INVITE to the first 18x or final answer), hepop_call_setup_seconds
    (to the answer) and hepop_call_duration_seconds (answer to BYE).  At most MAX_CALLS_TRACKED calls are
    held; past it the one begun longest ago is let go (hepop_calls_untracked_total).  A call whose INVITE
    came before the start, or whose INVITE and answers come out of order across batches, may be missed:
    the `calls` view is the exact account."""

    def __init__(self, counters: Counters, max_calls: int):
        self.counters = counters
        self.max_calls = max_calls
        self.nodes: set[str] = set()
        self.calls: dict[str, CallInProgress] = {}

    def count(self, table: pa.Table) -> None:
        """Arrow over the batch, then a step per call only for the calls that span batches (a step per
        message made it 16-28 us a row; a step per call 1.2-2.5): the writer took 3.3 us a row of whole
        calls without the KPIs, 4.1 with them (BatchWriter._write over 20,000, best of 6)."""
        method = message_methods(table)
        node = pc.coalesce(table["node_name"], table["capture_id"].cast(pa.string()))
        self._count_messages(table, method, node)
        self._track_calls(table, method, node)

    def _node(self, node: str) -> str:
        if node not in self.nodes:
            if len(self.nodes) >= MAX_COUNTED_NODES:
                return "other"
            self.nodes.add(node)
        return node

    def _count_messages(self, table: pa.Table, method: pa.Array, node: pa.Array) -> None:
        status = table["sip_status"]
        request = pc.is_null(status)
        method = pc.if_else(pc.is_in(method, pa.array(SIP_METHODS)), method, pa.scalar("OTHER"))
        code = pc.if_else(pc.is_in(status, pa.array(SIP_CODES, pa.uint16())), status.cast(pa.string()),
                          pc.binary_join_element_wise(pc.divide(status, 100).cast(pa.string()), "xx", ""))
        labels = pa.table({"node": node, "method": method, "response": pc.if_else(request, method, code)})
        sip = pc.or_kleene(pc.is_valid(table["sip_method"]), pc.and_kleene(pc.greater_equal(status, 100),
                                                                         pc.less_equal(status, 699)))
        labels = labels.filter(pc.fill_null(pc.and_kleene(sip, pc.is_valid(table["cseq"])), False))
        for row in labels.group_by(["node", "method", "response"]).aggregate([([], "count_all")]).to_pylist():
            self.counters.add("sip_messages_total", row["count_all"], node=self._node(row["node"]),
                              method=row["method"], response=row["response"])
        ends = pc.fill_null(pc.or_kleene(pc.greater_equal(status, 200), pc.is_in(table["sip_method"], pa.array(
            ["BYE", "CANCEL"]))), False)
        causes = pc.struct_field(pc.extract_regex(table["payload"].filter(ends), Q850_CAUSE), "cause")
        reasons = pa.table({"node": node.filter(ends), "cause": causes}).filter(pc.is_valid(causes))
        for row in reasons.group_by(["node", "cause"]).aggregate([([], "count_all")]).to_pylist():
            if int(row["cause"]) <= 127:
                self.counters.add("sip_q850_causes_total", row["count_all"], node=self._node(row["node"]),
                                  cause=str(int(row["cause"])))

    def _count_whole_calls(self, whole: pa.Table, ended: collections.Counter, seconds: dict) -> None:
        """The calls that began and ended inside the batch, none of them held: counted by Arrow, as the
        step per call would count them (that step took 24 ms of a batch of 20,000 messages)."""
        if not len(whole):
            return
        nodes = pc.dictionary_encode(whole["node_first"].combine_chunks())
        labels = pa.array([self._node(node) for node in nodes.dictionary.to_pylist()], pa.string())
        node = pc.take(labels, nodes.indices)
        final = whole["final_first"]
        kind = pa.array(["failed"] * len(whole), pa.string())
        for name, codes in reversed(CALL_CLASSES):         # the first class that holds a code wins
            kind = pc.if_else(pc.is_in(final, pa.array(list(codes), pa.int64())), pa.scalar(name), kind)
        for row in pa.table({"node": node, "kind": kind}).group_by(["node", "kind"]).aggregate(
                [([], "count_all")]).to_pylist():
            ended[row["node"], row["kind"]] += row["count_all"]
        answered = pc.equal(kind, "answered")
        spans = (("call_pdd_seconds", whole["progress_min"], whole["invite_min"], None),
                 ("call_setup_seconds", whole["answer_min"], whole["invite_min"], answered),
                 ("call_duration_seconds", whole["bye_min"], whole["answer_min"], answered))
        for name, end_us, start_us, keep in spans:
            values = pc.divide(pc.max_element_wise(pc.subtract(end_us, start_us), 0).cast(pa.float64()), 1e6)
            pairs = pa.table({"node": node, "seconds": values})
            pairs = pairs.filter(pc.is_valid(values) if keep is None else pc.and_(keep, pc.is_valid(values)))
            for label in set(pairs["node"].to_pylist()):
                seconds[name, label] += pairs.filter(pc.equal(pairs["node"], label))["seconds"].to_pylist()

    def _track_calls(self, table: pa.Table, message_method: pa.Array, node: pa.Array) -> None:
        status, method = table["sip_status"], table["sip_method"]
        time_us = table["time"].cast(pa.int64())
        to_invite = pc.and_(pc.is_valid(status), pc.equal(message_method, "INVITE"))
        never = pa.scalar(None, pa.int64())
        steps = pa.table({
            "call_id": table["call_id"], "time": time_us, "node": node,
            "invite": pc.if_else(pc.equal(method, "INVITE"), time_us, never),
            "progress": pc.if_else(pc.and_(to_invite, pc.greater_equal(status, 180)), time_us, never),
            "answer": pc.if_else(pc.and_(to_invite, pc.and_(pc.greater_equal(status, 200), pc.less(status, 300))),
                                 time_us, never),
            "final": pc.if_else(pc.and_(to_invite, pc.greater_equal(status, 200)), status.cast(pa.int64()), never),
            "bye": pc.if_else(pc.equal(method, "BYE"), time_us, never)})
        steps = steps.filter(pc.fill_null(pc.and_(pc.is_valid(steps["call_id"]), pc.or_(pc.or_(pc.is_valid(
            steps["invite"]), pc.is_valid(steps["progress"])), pc.is_valid(steps["bye"]))), False))
        if not len(steps):
            return
        steps = steps.sort_by("time")
        per_call = steps.group_by("call_id", use_threads=False).aggregate([
            ("invite", "min"), ("progress", "min"), ("answer", "min"), ("final", "first"), ("bye", "min"),
            ("node", "first")])
        calls = self.calls
        tracked = pa.array([call_id in calls for call_id in per_call["call_id"].to_pylist()], pa.bool_())
        final = per_call["final_first"]
        whole = pc.and_(pc.and_(pc.is_valid(per_call["invite_min"]), pc.is_valid(final)),
                        pc.or_(pc.greater_equal(final, 300), pc.is_valid(per_call["bye_min"])))
        whole = pc.and_(pc.fill_null(whole, False), pc.invert(tracked))
        ended: collections.Counter = collections.Counter()         # (node, class) -> calls
        seconds: dict[tuple, list] = collections.defaultdict(list)  # (histogram, node) -> observations
        self._count_whole_calls(per_call.filter(whole), ended, seconds)
        per_call = per_call.filter(pc.invert(whole))
        columns = [per_call[name].to_pylist() for name in ("call_id", "invite_min", "progress_min", "answer_min",
                                                            "final_first", "bye_min", "node_first")]
        for call_id, invite_us, progress_us, answer_us, final, bye_us, first_node in zip(*columns):
            call = calls.get(call_id)
            if call is None:
                if invite_us is None:
                    continue            # its INVITE came before we started, or it was let go
                call = calls[call_id] = CallInProgress(invite_us, self._node(first_node))
                if len(calls) > self.max_calls:
                    del calls[next(iter(calls))]
                    self.counters.add("calls_untracked_total")
            if progress_us is not None and not call.progressed:
                call.progressed = True
                seconds["call_pdd_seconds", call.node].append(max(0, progress_us - call.invite_us) / 1e6)
            if final is not None and call.answer_us is None:
                ended[call.node, call_class(final)] += 1
                if answer_us is None or final >= 300:
                    del calls[call_id]
                    continue
                call.answer_us = answer_us
                seconds["call_setup_seconds", call.node].append(max(0, answer_us - call.invite_us) / 1e6)
            if bye_us is not None and call.answer_us is not None:
                seconds["call_duration_seconds", call.node].append(max(0, bye_us - call.answer_us) / 1e6)
                del calls[call_id]
        for (node, kind), count in ended.items():
            self.counters.add("calls_total", count, node=node, **{"class": kind})
        for (name, node), values in seconds.items():
            self.counters.observe(name, values, DURATION_BUCKETS_S if name == "call_duration_seconds" else
                                  PDD_BUCKETS_S, node=node)





# ---------------------------------------------------------------------------------------------------------
# Storage: schemas, Parquet files written atomically, and metadata.json per HEP type.
# ---------------------------------------------------------------------------------------------------------

TIME_TYPE = pa.timestamp("us", tz="UTC")
BASE_FIELDS = [
    pa.field("time", TIME_TYPE, nullable=False),
    pa.field("src_ip", pa.string()),
    pa.field("dst_ip", pa.string()),
    pa.field("src_port", pa.uint16()),
    pa.field("dst_port", pa.uint16()),
    pa.field("ip_family", pa.uint8()),
    pa.field("protocol", pa.uint8()),
    pa.field("proto_type", pa.uint8()),
    pa.field("capture_id", pa.uint32()),
    pa.field("node_name", pa.string()),
    pa.field("correlation_id", pa.string()),
    pa.field("vlan", pa.uint16()),
]
SIP_FIELDS = [pa.field(name, pa.uint16() if name == "sip_status" else pa.string()) for name in SIP_COLUMNS]
PAYLOAD_FIELDS = [
    pa.field("payload_raw", pa.binary()),   # the exact bytes, only where the payload is not valid UTF-8
                                            # (payload is then null: queries show these bytes, PAYLOAD_SQL)
    pa.field("payload", pa.string()),       # the payload as text (invalid bytes shown as U+FFFD)
]
SIP_TYPE = 1
# The call records (call_records) are a type of their own, in their own folder, calls-0 (TreeLayout), listed
# in its own metadata.json: a number past HEP's types (chunk 11 is one byte), so that every part of the
# storage (writing, compaction, retention, upload, listing) takes them as it takes the messages.
CALLS_TYPE = 256
TIME_FIELD_NAMES = ("time", "last_time", "first_request_time", "invite_time", "progress_time", "answer_time",
                    "final_time", "bye_time", "reason_time", "correlation_time")
CALL_RECORD_FIELDS = [
    pa.field("call_id", pa.string()),
    *(pa.field(name, TIME_TYPE, nullable=name != "time") for name in TIME_FIELD_NAMES[1:]),
    pa.field("messages", pa.int64()),
    pa.field("node", pa.string()),
    pa.field("answer_status", pa.uint16()),
    pa.field("final_status", pa.uint16()),
    pa.field("reason", pa.string()),
    pa.field("correlation_id", pa.string()),
    pa.field("method", pa.string()),
    *(field for field in SIP_FIELDS + BASE_FIELDS if field.name in ("from_user", "to_user", "ruri_user",
                                                                    "user_agent", "src_ip", "src_port",
                                                                    "dst_ip", "dst_port")),
]
FOLDER_SPAN_US = 600 * 1_000_000            # raw files go to 10-minute folders
HOUR_US = 3600 * 1_000_000                  # compacted files hold an hour
ROW_GROUP_BYTES = 32 << 20
# Raw files are written plain: zstd makes them smaller than dictionaries do (58 bytes a SIP row against
# 65), in less time.  Min/max statistics are written for the time and the numbers only: those of text
# columns (addresses, Call-IDs, payloads) prune nothing in a file of many calls, and cost time to find.
RAW_STATISTICS = [field.name for field in BASE_FIELDS + SIP_FIELDS if not pa.types.is_string(field.type)]
TEMP_SUFFIX = ".tmp"


def table_schema(proto_type: int) -> pa.Schema:
    """Every file of a type has this one schema; SIP tables carry the extracted SIP columns.  A call
    record's `time` (its first column, as in every type: the footers' statistics of column 0 give the
    files' times) is its first message's."""
    if proto_type == CALLS_TYPE:
        return pa.schema([BASE_FIELDS[0]] + CALL_RECORD_FIELDS)
    return pa.schema(BASE_FIELDS + (SIP_FIELDS if proto_type == SIP_TYPE else []) + PAYLOAD_FIELDS)


def type_name(proto_type: int) -> str:
    """How logs and the tree name a type: hep_1, hep_100, calls."""
    return "calls" if proto_type == CALLS_TYPE else f"hep_{proto_type}"


def type_label(proto_type: int) -> str:
    """The `type` label of counters: 1, 100, calls."""
    return "calls" if proto_type == CALLS_TYPE else str(proto_type)


# -- call records: a call's messages summed up where they are written -------------------------------------

CALL_REQUEST_FIELDS = ("sip_method", "from_user", "to_user", "ruri_user", "user_agent", "src_ip", "src_port", "dst_ip",
                       "dst_port")
OUTSIDE_DIALOG_ANSWERS = pa.array(["ACK", "BYE", "CANCEL", "PRACK", "UPDATE", "INFO"])  # their answers end no call
REASON_HEADER = r"(?i)\nReason:[ \t]*(?P<reason>[^\r\n]+)"
# The SIP columns call_records reads (a rebuild reads these only).
CALL_SOURCE_COLUMNS = ("time", "call_id", "sip_status", "cseq", "correlation_id", "node_name", "capture_id", "payload",
                       *CALL_REQUEST_FIELDS)
# A record's columns, from the aggregates of its Call-ID's messages in a table (see call_records).
RECORD_COLUMNS = {"time": "time_min", "last_time": "time_max", "messages": "time_count", "node": "node_first",
                  "invite_time": "invite_time_min", "progress_time": "progress_time_min",
                  "answer_time": "answer_time_min", "answer_status": "answer_status_first",
                  "final_time": "final_time_max", "final_status": "final_status_last", "bye_time": "bye_time_min",
                  "reason_time": "reason_time_min", "reason": "reason_first",
                  "correlation_time": "correlation_time_min", "correlation_id": "correlation_id_first"}


def call_records(sip: pa.Table) -> pa.Table:
    """The call records of a table of SIP rows: one per Call-ID (and one for the rows without one), in the
    schema of their files.

    A record sums up what the `calls` view (CALLS_SQL) needs of a call's messages in one file: each column
    is a minimum, a maximum, a count, or a value kept with the time that picks it (the first request's
    fields with its time, the answer's code with the answer's, the last final answer's with its own, the
    first Reason header of a BYE, CANCEL or failure, the first correlation id, the first message's node).
    So records merged in any grouping give what the same aggregates give over the messages themselves: a
    call that spans files, folders, hours, restarts and compactions, or whose messages come out of order,
    is exact, and nothing is held between files.  The rows without a Call-ID are summed up too, so that a
    file's records count its rows (CallRecordsCheck compares them).

    By Arrow, over the rows sorted by time (stable: a tie keeps the order of arrival), first and last taken
    in that order: 17 ms for 20,000 messages of whole calls, where the same aggregates in DuckDB took 40."""
    status, method = sip["sip_status"], sip["sip_method"]
    ends = pc.fill_null(pc.or_kleene(pc.is_in(method, pa.array(["BYE", "CANCEL"])), pc.greater_equal(status, 300)),
                        False)
    reason = pa.nulls(len(sip), pa.string())
    if pc.any(ends).as_py():                # the pattern over the payloads that may carry one only
        found = pc.struct_field(pc.extract_regex(sip["payload"].filter(ends), REASON_HEADER), "reason")
        reason = pc.replace_with_mask(reason, ends.combine_chunks(), found.combine_chunks())
    rows = pa.table({"time": sip["time"], "call_id": sip["call_id"], "cseq": sip["cseq"], "reason": reason,
                     "node": pc.coalesce(sip["node_name"], sip["capture_id"].cast(pa.string())),
                     "correlation_id": sip["correlation_id"], "sip_status": status,
                     **{name: sip[name] for name in CALL_REQUEST_FIELDS}})
    rows = rows.take(pc.sort_indices(rows["time"]))
    time_of, status, method = rows["time"], rows["sip_status"], rows["sip_method"]
    answered_method = message_methods(rows)         # a response's: the method in its CSeq
    to_invite = pc.equal(answered_method, "INVITE")
    answer = pc.fill_null(pc.and_(to_invite, pc.and_(pc.greater_equal(status, 200), pc.less_equal(status, 299))), False)
    final = pc.fill_null(pc.and_(pc.greater_equal(status, 200), pc.invert(pc.is_in(answered_method,
                                                                                   OUTSIDE_DIALOG_ANSWERS))), False)
    no_time, no_status = pa.scalar(None, time_of.type), pa.scalar(None, status.type)
    at = lambda mask: pc.if_else(pc.fill_null(mask, False), time_of, no_time)
    steps = pa.table({
        "call_id": rows["call_id"], "time": time_of, "node": rows["node"],
        "request_row": pc.if_else(pc.is_valid(method), pa.array(range(len(rows)), pa.int64()),
                                  pa.scalar(None, pa.int64())),
        "invite_time": at(pc.equal(method, "INVITE")),
        "progress_time": at(pc.and_(to_invite, pc.greater_equal(status, 180))),
        "answer_time": at(answer), "answer_status": pc.if_else(answer, status, no_status),
        "final_time": at(final), "final_status": pc.if_else(final, status, no_status),
        "bye_time": at(pc.equal(method, "BYE")),
        "reason_time": at(pc.is_valid(rows["reason"])), "reason": rows["reason"],
        "correlation_time": at(pc.is_valid(rows["correlation_id"])), "correlation_id": rows["correlation_id"]})
    per_call = steps.group_by("call_id", use_threads=False).aggregate([
        ("time", "min"), ("time", "max"), ("time", "count"), ("node", "first"), ("request_row", "first"),
        ("invite_time", "min"), ("progress_time", "min"), ("answer_time", "min"), ("answer_status", "first"),
        ("final_time", "max"), ("final_status", "last"), ("bye_time", "min"), ("reason_time", "min"),
        ("reason", "first"), ("correlation_time", "min"), ("correlation_id", "first")])
    first_request = per_call["request_row_first"]
    columns = {name: per_call[aggregate] for name, aggregate in RECORD_COLUMNS.items()}
    columns.update({"method" if name == "sip_method" else name: pc.take(rows[name], first_request)
                    for name in CALL_REQUEST_FIELDS})
    columns.update(call_id=per_call["call_id"], first_request_time=pc.take(time_of, first_request))
    schema = table_schema(CALLS_TYPE)
    return pa.table({field.name: columns[field.name] for field in schema}).cast(schema).sort_by("time")


_OCTETS = pa.array([str(octet) for octet in range(256)])
_OCTET_SHIFTS = (0, 8, 16, 24) if sys.byteorder == "little" else (24, 16, 8, 0)


def ip_texts(packed: pa.BinaryArray) -> pa.Array:
    """Text form of packed addresses: IPv4 by Arrow over the whole batch, outside the GIL; a batch that
    holds IPv6 addresses takes inet_ntop row by row."""
    try:
        quads = packed.cast(pa.binary(4))
    except pa.ArrowInvalid:
        return pa.array([None if address is None else
                         socket.inet_ntop(socket.AF_INET if len(address) == 4 else socket.AF_INET6, address)
                         for address in packed.to_pylist()], pa.string())
    words = pa.Array.from_buffers(pa.uint32(), len(quads), quads.buffers(), offset=quads.offset)
    octets = [pc.take(_OCTETS, pc.bit_wise_and(pc.shift_right(words, shift), 255)) for shift in _OCTET_SHIFTS]
    return pc.binary_join_element_wise(*octets, ".")


def complete_table(proto_type: int, packets: pa.Table) -> pa.Table:
    """The stored table of one type from a PACKET_SCHEMA table: text addresses, the payload as text
    (and its exact bytes where they are not UTF-8), the SIP columns of SIP."""
    arrays = {"time": packets["time"].combine_chunks().cast(TIME_TYPE)}
    for field in BASE_FIELDS[1:]:
        column = packets[field.name].combine_chunks()
        arrays[field.name] = ip_texts(column) if field.name in ("src_ip", "dst_ip") else column
    raw = packets["payload"].combine_chunks()
    try:
        text = raw.cast(pa.string())
        raw = pa.nulls(len(raw), pa.binary())
    except pa.ArrowInvalid:
        payloads = raw.to_pylist()
        text = pa.array([p.decode("utf-8", "replace") for p in payloads], pa.string())
        raw = pa.array([None if "\ufffd" not in t or p.decode("utf-8", "ignore") == t else p
                        for p, t in zip(payloads, text.to_pylist())], pa.binary())
    if proto_type == SIP_TYPE:
        arrays.update(extract_sip_fields(text))
    if raw.null_count < len(raw):       # one form stored: the bytes (both took 1.9 times the disk)
        text = pc.if_else(pc.is_null(raw), text, pa.scalar(None, pa.string()))
    arrays["payload_raw"] = raw
    arrays["payload"] = text
    return pa.Table.from_pydict(arrays, schema=table_schema(proto_type))


# -- the tree ---------------------------------------------------------------------------------------------

class FileKind(NamedTuple):
    """What a data file holds, which its name says: its prefix, and its `type` and `range` in
    metadata.json (the seed's fields: `range` is the span that starts at its `chunk_time`)."""
    prefix: str
    type: str
    range: str


RAW = FileKind("", "raw", "10m")                    # a flush
FOLDER_MERGED = FileKind("m_", "compacted", "10m")  # a closed 10-minute folder's raw files, as one
COMPACTED = FileKind("c_", "compacted", "1h")       # a closed hour's files, as one sorted by time
FILE_KINDS = {kind.prefix: kind for kind in (RAW, FOLDER_MERGED, COMPACTED)}


class TreeLayout:
    """The one place that knows the tree's layout and its names::

        PARQUET_DIR/WRITER_ID/.lock                               held by the one hepop writing here
        PARQUET_DIR/WRITER_ID/dbs/hep-0/hep_<type>-0/metadata.json  the files of a type: the truth
        PARQUET_DIR/WRITER_ID/dbs/hep-0/hep_<type>-0/YYYY-MM-DD/HH-MM/NNNNNNNNNN.parquet     raw flushes
        PARQUET_DIR/WRITER_ID/dbs/hep-0/hep_<type>-0/YYYY-MM-DD/HH-MM/m_NNNNNNNNNN.parquet   merged folders
        PARQUET_DIR/WRITER_ID/dbs/hep-0/hep_<type>-0/YYYY-MM-DD/HH-00/c_NNNNNNNNNN.parquet   compacted hours
        PARQUET_DIR/WRITER_ID/dbs/hep-0/calls-0/...                the call records, in the same tree and names
        PARQUET_DIR/WRITER_ID/set-aside/...                        files that could not be read, moved away
        PARQUET_DIR/WRITER_ID/.compaction-tmp, .query-tmp          DuckDB's spill, bounded, emptied at start
        PARQUET_DIR/WRITER_ID/.upload-tmp                          a folder's object before its upload (S3_URL)

    The lock, the spill folders and the few files of the writer's own (its login key, dashboards) are on
    this disk and have paths; the data's files are reached through a FileStore and have keys.

    Dates, hours and 10-minute folders are UTC.  Sequence numbers have ten digits and are never reused.
    """

    MAX_SEQUENCE = 10 ** 10 - 1
    FILE_NAME = re.compile(r"(c_|m_)?(\d{10})\.parquet")
    TYPE_FOLDER = re.compile(r"(?:hep_(\d{1,3})|(calls))-0")

    def __init__(self, root: str):
        self.root = root

    def writer_dir(self, writer_id: str) -> str:
        return os.path.join(self.root, writer_id)

    def old_jwt_secret_path(self, writer_id: str) -> str:
        """Where hepop kept its login key before JWT_SECRET_FILE: inside the tree, which queries read."""
        return os.path.join(self.root, writer_id, ".jwt-secret")

    def dashboards_path(self, writer_id: str) -> str:
        return os.path.join(self.root, writer_id, "dashboards.json")

    # Keys (a FileStore's names for files, relative to PARQUET_DIR) of what the FileStore keeps.

    @staticmethod
    def types_key(writer_id: str) -> str:
        return f"{writer_id}/dbs/hep-0"

    @classmethod
    def type_key(cls, writer_id: str, proto_type: int) -> str:
        return f"{cls.types_key(writer_id)}/{type_name(proto_type)}-0"

    @classmethod
    def types_in(cls, folder_names: Iterable[str]) -> set[int]:
        """The types whose folders (hep_<type>-0, calls-0) are among `folder_names`."""
        matches = [match for match in map(cls.TYPE_FOLDER.fullmatch, folder_names) if match]
        return {CALLS_TYPE if match.group(2) else int(match.group(1)) for match in matches}

    @classmethod
    def metadata_key(cls, writer_id: str, proto_type: int) -> str:
        return f"{cls.type_key(writer_id, proto_type)}/metadata.json"

    @classmethod
    def file_key(cls, type_key: str, time_us: int, sequence: int, kind: FileKind) -> str:
        """The key of a file in the 10-minute folder of `time_us` (an hour's start: its HH-00)."""
        return f"{type_key}/{cls.folder_of(time_us)}/{cls.file_name(sequence, kind)}"

    @staticmethod
    def set_aside_key(key: str) -> str:
        writer_id, rest = key.split("/", 1)
        return f"{writer_id}/set-aside/{rest}"

    def compaction_spill_dir(self, writer_id: str) -> str:
        return os.path.join(self.root, writer_id, ".compaction-tmp")

    def upload_spool_dir(self, writer_id: str) -> str:
        return os.path.join(self.root, writer_id, ".upload-tmp")

    def query_spill_dir(self, writer_id: str) -> str:
        return os.path.join(self.root, writer_id, ".query-tmp")

    def transient_dirs(self, writer_id: str) -> list[str]:
        """Folders whose files go away by themselves: DuckDB's spill, the compaction's copies of a
        bucket's objects, an object before its upload."""
        return [self.compaction_spill_dir(writer_id), self.query_spill_dir(writer_id),
                self.upload_spool_dir(writer_id)]

    @staticmethod
    def file_name(sequence: int, kind: FileKind) -> str:
        return f"{kind.prefix}{sequence:010d}.parquet"

    @classmethod
    def parse_file_name(cls, name: str) -> Optional[tuple[int, FileKind]]:
        """(sequence, kind) of one of our file names; None for any other name."""
        match = cls.FILE_NAME.fullmatch(name)
        return (int(match.group(2)), FILE_KINDS[match.group(1) or ""]) if match else None

    @classmethod
    def is_merge_output(cls, key: str) -> bool:
        """Whether a key names a merge's output (a folder's, an hour's), whose footer names its inputs."""
        named = cls.parse_file_name(key.rsplit("/", 1)[-1])
        return named is not None and named[1] is not RAW

    @staticmethod
    def folder_of(time_us: int) -> str:
        """The 10-minute folder, YYYY-MM-DD/HH-MM, of a time (an hour's start gives its HH-00)."""
        start = datetime.datetime.fromtimestamp(time_us // FOLDER_SPAN_US * 600, datetime.timezone.utc)
        return start.strftime("%Y-%m-%d/%H-%M")

    @staticmethod
    def folder_start_us(relative: str) -> Optional[int]:
        """The start of a 'YYYY-MM-DD' or 'YYYY-MM-DD/HH-MM' folder, in us; None for anything else."""
        for form in ("%Y-%m-%d/%H-%M", "%Y-%m-%d"):
            try:
                start = datetime.datetime.strptime(relative.replace(os.sep, "/"), form)
            except ValueError:
                continue
            return int(start.replace(tzinfo=datetime.timezone.utc).timestamp()) * 1_000_000
        return None


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temp: str, path: str) -> None:
    """The atomic publish of a complete, fsynced file: rename it into place, then fsync its folder.

    The rename is the commit: once it is done the file is there, so a failing fsync of the folder is
    logged and not raised; raising would make the caller write the same rows again under another name."""
    os.replace(temp, path)
    try:
        fsync_dir(os.path.dirname(path))
    except OSError as exc:
        log.error("fsync of the folder of %s failed: %s", path, exc)


def write_atomically(path: str, write: Callable[[object], None]) -> None:
    """Write a file under a temporary name, fsync it and publish it.  On an error nothing is left."""
    temp = path + TEMP_SUFFIX
    try:
        with open(temp, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise
    publish(temp, path)


def make_dirs(path: str) -> None:
    """Create a folder and its missing parents, fsyncing each parent so the new entries are durable."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for folder in reversed(missing):
        os.makedirs(folder, exist_ok=True)
        fsync_dir(os.path.dirname(folder))


def folder_size_bytes(path: str) -> int:
    """The bytes the files below a folder take (DuckDB's spill); 0 when it does not exist."""
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(folder, name)).st_blocks * 512
    return total


# -- where the files are kept ------------------------------------------------------------------------------

class FileStore(abc.ABC):
    """Where the tree's files are kept.  Storage, compaction, retention and queries reach them only through
    one of these, as selectors' loops reach the kernel only through a BaseSelector: LocalFileStore keeps
    them on this disk, under PARQUET_DIR; an object store is the other kind.

    A file is named by its key: its path relative to PARQUET_DIR, parts joined by '/', as metadata.json
    lists it (TreeLayout makes the keys).  The promise of every kind: `write` and `publish` make a key
    visible only complete, or not at all, and it stays so once they return."""

    @abc.abstractmethod
    def keys_below(self, folder: str) -> list[str]:
        """The keys of the files below a folder, at any depth, sorted; none when it does not exist."""

    @abc.abstractmethod
    def folders(self, folder: str) -> list[str]:
        """The names of the folders right inside a folder, sorted."""

    @abc.abstractmethod
    def size_bytes(self, key: str) -> int:
        """Raises FileNotFoundError when there is no such file."""

    @abc.abstractmethod
    def change_tag(self, key: str) -> tuple:
        """A value that changes whenever the file is replaced (to keep what was read of it); raises
        FileNotFoundError when there is no such file."""

    @abc.abstractmethod
    def open_input(self, key: str):
        """The file open for reading, binary, seekable (pyarrow reads Parquet from it)."""

    @abc.abstractmethod
    def write(self, key: str, write: Callable[[object], None]) -> None:
        """Write a file whole by `write(out)` and publish it under `key`; on an error nothing is left."""

    @abc.abstractmethod
    def spool_path(self, key: str) -> str:
        """A local path where another process (the compaction's) may write what publish() then takes
        in under `key`."""

    @abc.abstractmethod
    def publish(self, spool_path: str, key: str) -> None:
        """Take in a complete file written at spool_path(key) under `key`."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete a file; one already gone is not an error."""

    @abc.abstractmethod
    def move(self, key: str, target: str) -> None:
        """Give a file another key (to set it aside)."""

    @abc.abstractmethod
    def remove_empty_folders(self, folder: str, removable: Callable[[str], bool]) -> int:
        """Remove the empty folders below `folder` whose path relative to it `removable` allows; how many
        went (a store without folders has none to remove)."""

    @abc.abstractmethod
    def reader_path(self, key: str) -> str:
        """What a reader outside this module is given for a key: DuckDB's read_parquet, the compaction
        process."""

    def leads_outside(self, key: str) -> bool:
        """Whether a key's folder or file is, through a link, outside where the store keeps its files:
        the query sandbox cannot read it.  A store without links has none."""
        return False

    @abc.abstractmethod
    def local_path(self, key: str, scratch_dir: str) -> str:
        """A path on this disk where another process (the compaction's) reads the file: the file itself,
        or a copy made in scratch_dir, which the caller empties."""


class LocalFileStore(FileStore):
    """Files on this disk, under PARQUET_DIR: written under a temporary name, fsynced, renamed into place
    and their folder fsynced (write_atomically), folders made durable as they are made (make_dirs)."""

    def __init__(self, root: str):
        self.root = root

    def reader_path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    def leads_outside(self, key: str) -> bool:
        root = os.path.realpath(self.root)
        return not os.path.realpath(self.reader_path(key)).startswith(root.rstrip("/") + "/")

    def local_path(self, key: str, scratch_dir: str) -> str:
        return self.reader_path(key)

    def key_of(self, path: str) -> str:
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    def keys_below(self, folder: str) -> list[str]:
        return sorted(self.key_of(os.path.join(directory, name))
                      for directory, _, names in os.walk(self.reader_path(folder)) for name in names)

    def folders(self, folder: str) -> list[str]:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            with os.scandir(self.reader_path(folder)) as entries:
                return sorted(entry.name for entry in entries if entry.is_dir())
        return []

    def size_bytes(self, key: str) -> int:
        return os.path.getsize(self.reader_path(key))

    def change_tag(self, key: str) -> tuple:
        stat = os.stat(self.reader_path(key))
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def open_input(self, key: str):
        return open(self.reader_path(key), "rb")

    def write(self, key: str, write: Callable[[object], None]) -> None:
        path = self.reader_path(key)
        make_dirs(os.path.dirname(path))
        write_atomically(path, write)

    def spool_path(self, key: str) -> str:
        path = self.reader_path(key)
        make_dirs(os.path.dirname(path))
        return path + TEMP_SUFFIX           # beside its place: the rename is the publish

    def publish(self, spool_path: str, key: str) -> None:
        publish(spool_path, self.reader_path(key))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.reader_path(key))

    def move(self, key: str, target: str) -> None:
        path = self.reader_path(target)
        make_dirs(os.path.dirname(path))
        os.replace(self.reader_path(key), path)

    def remove_empty_folders(self, folder: str, removable: Callable[[str], bool]) -> int:
        removed, top = 0, self.reader_path(folder)
        for directory, subfolders, names in os.walk(top, topdown=False):
            relative = os.path.relpath(directory, top).replace(os.sep, "/")
            if relative == "." or names or any(os.path.isdir(os.path.join(directory, d)) for d in subfolders):
                continue
            if removable(relative):
                os.rmdir(directory)
                removed += 1
        if removed:
            fsync_dir(top)
        return removed


class S3FileStore(FileStore):
    """Objects in a bucket of S3 or of a service that speaks it, under a prefix: key K is the object
    PREFIX/K.  There are no folders, only keys; listing by a key's prefix stands for them.

    No half objects: pyarrow publishes what a stream holds when it is closed on an error or collected,
    so a Parquet object is uploaded under a staging key (its name ends in TEMP_SUFFIX, which recovery
    deletes), its size checked, copied server-side to its key and that copy's size checked (pyarrow's
    copy can leave a 0-byte object and only print the error), then the staging key is deleted.
    metadata.json, small and made whole in memory first, is one PUT."""

    CONNECT_TIMEOUT_S = 5.0
    REQUEST_TIMEOUT_S = 30.0
    UPLOAD_CHUNK_BYTES = 8 << 20

    def __init__(self, filesystem: pafs.FileSystem, bucket: str, prefix: str, spool_dir: str):
        self.filesystem = filesystem
        self.bucket = bucket
        self.base = "/".join(part for part in (bucket, prefix.strip("/")) if part)
        self.spool_dir = spool_dir

    @classmethod
    def connect(cls, url: str, endpoint: str, region: str, spool_dir: str) -> "S3FileStore":
        """The store of S3_URL (no request is made: check_bucket makes the first)."""
        bucket, _, prefix = url[len("s3://"):].partition("/")
        return cls(s3_filesystem(endpoint, region), bucket, prefix, spool_dir)

    def check_bucket(self) -> None:
        """OSError when the endpoint cannot be reached or the bucket does not exist."""
        info = self.filesystem.get_file_info(self.bucket)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"bucket {self.bucket} does not exist")

    def _path(self, key: str) -> str:
        return f"{self.base}/{key}" if key else self.base

    def _key(self, path: str) -> str:
        return path[len(self.base) + 1:]

    def reader_path(self, key: str) -> str:
        return "s3://" + self._path(key)

    def local_path(self, key: str, scratch_dir: str) -> str:
        make_dirs(scratch_dir)
        path = os.path.join(scratch_dir, key.replace("/", "_"))
        with self.open_input(key) as source, open(path, "wb") as out:
            while chunk := source.read(self.UPLOAD_CHUNK_BYTES):
                out.write(chunk)
        return path

    def keys_below(self, folder: str) -> list[str]:
        selector = pafs.FileSelector(self._path(folder), recursive=True, allow_not_found=True)
        return sorted(self._key(info.path) for info in self.filesystem.get_file_info(selector)
                      if info.type == pafs.FileType.File)

    def folders(self, folder: str) -> list[str]:
        selector = pafs.FileSelector(self._path(folder), recursive=False, allow_not_found=True)
        return sorted(info.base_name for info in self.filesystem.get_file_info(selector)
                      if info.type == pafs.FileType.Directory)

    def size_bytes(self, key: str) -> int:
        info = self.filesystem.get_file_info(self._path(key))
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(errno.ENOENT, "no such object", self._path(key))
        return info.size

    def change_tag(self, key: str) -> tuple:
        """A fresh value each time: an object's modification time has whole seconds, and metadata.json
        can be replaced by one of the same size within one, so what was read of it is never kept."""
        self.size_bytes(key)
        return (object(),)

    def open_input(self, key: str):
        return self.filesystem.open_input_file(self._path(key))

    def write(self, key: str, write: Callable[[object], None]) -> None:
        body = io.BytesIO()
        write(body)
        with self.filesystem.open_output_stream(self._path(key)) as out:
            out.write(body.getvalue())

    def spool_path(self, key: str) -> str:
        make_dirs(self.spool_dir)
        return os.path.join(self.spool_dir, key.replace("/", "_") + TEMP_SUFFIX)

    def publish(self, spool_path: str, key: str) -> None:
        size_bytes = os.path.getsize(spool_path)
        staging = f"{key}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"
        try:
            with open(spool_path, "rb") as source, self.filesystem.open_output_stream(self._path(staging)) as out:
                while chunk := source.read(self.UPLOAD_CHUNK_BYTES):
                    out.write(chunk)
            self._check_size(staging, size_bytes)
            self.filesystem.copy_file(self._path(staging), self._path(key))
            self._check_size(key, size_bytes)
        finally:
            with contextlib.suppress(OSError):
                self.filesystem.delete_file(self._path(staging))
        remove_file(spool_path)

    def _check_size(self, key: str, size_bytes: int) -> None:
        found = self.size_bytes(key)
        if found != size_bytes:
            raise OSError(f"{self._path(key)} has {found} bytes, not the {size_bytes} sent")

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filesystem.delete_file(self._path(key))

    def move(self, key: str, target: str) -> None:
        self.filesystem.copy_file(self._path(key), self._path(target))
        self._check_size(target, self.size_bytes(key))
        self.delete(key)

    def remove_empty_folders(self, folder: str, removable: Callable[[str], bool]) -> int:
        return 0


def s3_filesystem(endpoint: str, region: str) -> pafs.FileSystem:
    """pyarrow's S3 client for S3_ENDPOINT (AWS itself when empty) and S3_REGION; credentials as AWS
    tools read them (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, ~/.aws).  Bounded
    timeouts: an endpoint that hangs fails an upload, which is retried, and never holds a thread."""
    return pafs.S3FileSystem(region=region, endpoint_override=endpoint or None,
                             connect_timeout=S3FileStore.CONNECT_TIMEOUT_S, request_timeout=S3FileStore.REQUEST_TIMEOUT_S,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3))


def split_by_folder(table: pa.Table) -> list[tuple[int, pa.Table]]:
    """(folder start in us, rows) for each 10-minute folder that a batch's capture times fall in."""
    buckets = pc.divide(table.column("time").cast(pa.int64()), FOLDER_SPAN_US)
    low, high = pc.min_max(buckets).values()
    if low == high:
        return [(low.as_py() * FOLDER_SPAN_US, table)]
    return [(bucket * FOLDER_SPAN_US, table.filter(pc.equal(buckets, bucket)))
            for bucket in sorted(pc.unique(buckets).to_pylist())]


def row_group_rows(table: pa.Table, target_bytes: int) -> int:
    """Rows per row group so that a group holds about `target_bytes`: payloads make rows large."""
    return max(1, target_bytes * len(table) // max(1, table.nbytes))


# A call is looked up by these over whole days, and a number by its users: a HOMER search for a From user
# with a few messages over a day of 10 M rows took 702 ms without the users' filters and 251 ms with them,
# for 0.9 % more bytes (DuckDB skips a row group whose filter excludes the value; min/max cannot).  Raw
# files carry them too: a Call-ID over the 600 raw files of 10 minutes at 20,000 messages/s took 515 ms
# without them and 85 ms with them, for 1.5 % more bytes and 0.2 us a row in the writer (18.2 -> 21.9 ms
# for a batch of 20,000; the writer takes 7-10 us a row in all).
BLOOM_FILTER_COLUMNS = ("call_id", "correlation_id", "from_user", "to_user", "ruri_user")
BLOOM_FILTER_FPP = 0.02
# Distinct values per row that a filter is sized for: a SIP call is several messages, and one user makes
# many calls (a filter sized for every row would be twice as large).  A writer keeps every row group's
# filters until the file is closed: about 1 byte per row and column as written.
BLOOM_FILTER_VALUES_PER_ROW = 0.4


def bloom_filters(schema: pa.Schema, rows_per_group: int) -> dict:
    """pyarrow's bloom_filter_options for a file of `schema` written in row groups of `rows_per_group`."""
    ndv = max(64, int(rows_per_group * BLOOM_FILTER_VALUES_PER_ROW))
    return {name: {"ndv": ndv, "fpp": BLOOM_FILTER_FPP} for name in BLOOM_FILTER_COLUMNS if name in schema.names}


# -- a file's entry in metadata.json ------------------------------------------------------------------------

class FileFacts(NamedTuple):
    """What a Parquet file's footer says of it."""
    size_bytes: int
    row_count: int
    min_time_us: int
    max_time_us: int


def describe_file(source) -> FileFacts:
    """Size, row count and time range of a Parquet file open for reading, from its footer (raises if
    unreadable)."""
    footer = pq.read_metadata(source)
    ranges = row_group_times(source, footer)
    return FileFacts(source.seek(0, os.SEEK_END), footer.num_rows, min((low for low, _ in ranges), default=0),
                     max((high for _, high in ranges), default=0))


def row_group_times(source, footer: pq.FileMetaData) -> list[tuple[int, int]]:
    """The (min, max) `time` in microseconds of each row group of a file.

    The footer's statistics give them without reading the column: reading it costs 8 bytes a row, 127 MiB
    for a compacted hour of 16 million rows, over the compactor's budget.  A file written without them
    (by another tool) is read, and its whole range given for each row group."""
    stats = [footer.row_group(index).column(0).statistics for index in range(footer.num_row_groups)]
    if all(group is not None and group.has_min_max for group in stats):
        return [(group.min_raw, group.max_raw) for group in stats]
    times = pq.read_table(source, columns=["time"]).column("time").cast(pa.int64())
    low, high = (value.as_py() or 0 for value in pc.min_max(times).values())
    return [(low, high)] * footer.num_row_groups


def file_entry(relpath: str, sequence: int, kind: FileKind, chunk_time_us: int, facts: FileFacts) -> dict:
    """A file's entry in metadata.json, in the seed's fields: times in nanoseconds."""
    return {"id": sequence, "path": relpath, "size_bytes": facts.size_bytes, "row_count": facts.row_count,
            "chunk_time": chunk_time_us * 1000, "min_time": facts.min_time_us * 1000,
            "max_time": facts.max_time_us * 1000, "range": kind.range, "type": kind.type}


def entry_kind(entry: dict) -> FileKind:
    """The kind of a listed file (entries are checked when metadata.json is read: the name is ours)."""
    return TreeLayout.parse_file_name(entry["path"].rsplit("/", 1)[-1])[1]


ENTRY_FIELDS = {"id": int, "path": str, "size_bytes": int, "row_count": int, "chunk_time": int, "min_time": int,
                "max_time": int, "range": str, "type": str}
MAX_TIME_NS = 253_402_300_800 * 10 ** 9         # 10000-01-01: a listed time past it is damage


def entry_problem(entry, type_relpath: str) -> Optional[str]:
    """What is wrong with an entry read from metadata.json, or None when it is whole and names one of
    this type's own files where the layout puts it (an entry must never point anywhere else: retention
    deletes what is listed)."""
    if not isinstance(entry, dict):
        return "an entry is not an object"
    for name, kind in ENTRY_FIELDS.items():
        value = entry.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{name} of {entry.get('path')!r} is {value!r}, not {'a whole number' if kind is int else 'text'}"
    parts = entry["path"].split("/")
    named = TreeLayout.parse_file_name(parts[-1])
    start_us = TreeLayout.folder_start_us("/".join(parts[-3:-1]))
    if "/".join(parts[:-3]) != type_relpath or named is None or start_us is None:
        return f"path {entry['path']!r} is not a file of {type_relpath}"
    sequence, kind = named
    if entry["id"] != sequence or entry["type"] != kind.type or entry["range"] != kind.range or \
            entry["chunk_time"] != start_us * 1000:
        return f"id, type, range or chunk_time of {entry['path']!r} disagree with its name"
    if not (0 <= entry["min_time"] <= entry["max_time"] < MAX_TIME_NS and entry["size_bytes"] >= 0
            and entry["row_count"] >= 0):
        return f"times, size or row count of {entry['path']!r} are out of range"
    return None


# -- who may delete a file ---------------------------------------------------------------------------------

class FileLeases:
    """Files that queries of this process are reading, and files to delete once no query reads them.

    A file that compaction merged or retention expired is unlisted at once and deleted DELETE_GRACE_S
    later, or once no query of this process holds it if that is later: a glob reader sees each row once
    within seconds of a swap, a query of this server that listed the file never finds it gone, and a
    reader elsewhere (another writer's hepop, a script reading metadata.json) has DELETE_GRACE_S to open
    what it listed.  `delete_due` deletes what is due; the compactor calls it while any file waits.
    Keys are unique across the stores of one writer (one sequence numbers them all), so the local disk's
    and the bucket's files share one set of leases."""

    DELETE_GRACE_S = 2.0

    def __init__(self):
        self._held: collections.Counter = collections.Counter()
        self._doomed: dict[str, DoomedFile] = {}
        self.lock = threading.Lock()

    def hold(self, list_files: Callable[[], list[str]]) -> list[str]:
        """The keys of the files that `list_files` names, held until release(): listing and holding are
        one step, so that no deletion falls between them."""
        with self.lock:
            keys = list_files()
            self._held.update(keys)
            return keys

    def release(self, keys: list[str]) -> None:
        with self.lock:
            self._held.subtract(keys)
            for key in set(keys):
                if self._held[key] <= 0:
                    del self._held[key]
        self.delete_due()

    def delete_when_free(self, file_store: FileStore, keys: list[str]) -> None:
        due_s = time.monotonic() + self.DELETE_GRACE_S
        doomed = {}
        for key in keys:                    # outside the lock: in a bucket, a request each
            with contextlib.suppress(OSError):
                doomed[key] = DoomedFile(file_store, file_store.size_bytes(key), due_s)
        with self.lock:
            self._doomed.update(doomed)

    def delete_due(self, everything: bool = False) -> None:
        """Delete the doomed files whose grace is over and that no query holds (`everything`: at shutdown,
        whatever their grace)."""
        now = time.monotonic()
        with self.lock:
            due = {key: doomed for key, doomed in self._doomed.items()
                   if not self._held[key] and (everything or doomed.due_s <= now)}
            for key in due:
                del self._doomed[key]
        for key, doomed in due.items():
            try:
                doomed.file_store.delete(key)
            except OSError as exc:          # a bucket that fails: tried again later, never forgotten
                log.warning("cannot delete %s: %s; trying again", key, exc)
                with self.lock:
                    self._doomed.setdefault(key, doomed._replace(due_s=now + self.DELETE_GRACE_S))

    def waiting(self) -> bool:
        with self.lock:
            return bool(self._doomed)

    def doomed_bytes(self, file_store: FileStore) -> int:
        """Bytes still in a store only until their deletion is due: the disk guard does not count them."""
        with self.lock:
            return sum(doomed.size_bytes for doomed in self._doomed.values() if doomed.file_store is file_store)


class DoomedFile(NamedTuple):
    file_store: FileStore
    size_bytes: int
    due_s: float                # time.monotonic() from which it may be deleted


def remove_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


# -- the files of one type ----------------------------------------------------------------------------------

class StoreError(Exception):
    """PARQUET_DIR cannot be used: not writable, or held by another hepop.  Exit 2 at start."""


class EntryText(NamedTuple):
    entry: dict
    json: str


class TypeStore:
    """The files of one HEP type: writes them atomically and keeps metadata.json equal to the tree.

    metadata.json is the truth about which files exist; a file is visible to readers only once listed.
    Every change of the file list (new raw files, a compaction's swap, retention, a file set aside)
    happens under `lock`; save_metadata() writes it atomically.  Files are reached through the FileStore
    by their keys, which are the `path` of their entries.
    """

    def __init__(self, layout: TreeLayout, file_store: FileStore, writer_id: str, proto_type: int,
                 leases: FileLeases):
        self.layout = layout
        self.file_store = file_store
        self.proto_type = proto_type
        self.leases = leases
        self.dir_key = layout.type_key(writer_id, proto_type)
        self.metadata_key = layout.metadata_key(writer_id, proto_type)
        self.schema = table_schema(proto_type)
        self.lock = threading.Lock()
        self.files: dict[str, dict] = {}
        self._entry_texts: dict[str, EntryText] = {}      # each listed entry's JSON text, made once
        self.sequence = 0
        self.recover()

    def path(self, entry: dict) -> str:
        """Where a reader outside the FileStore (DuckDB, the compaction process) finds a listed file."""
        return self.file_store.reader_path(entry["path"])

    def snapshot(self) -> list[dict]:
        with self.lock:
            return sorted(self.files.values(), key=lambda entry: entry["id"])

    def listed(self) -> list[dict]:
        """The files listed here, in no order."""
        with self.lock:
            return list(self.files.values())

    # -- writing ------------------------------------------------------------------------------------

    def write(self, table: pa.Table) -> list[dict]:
        """Write a batch as one file per 10-minute folder, then list the new files in metadata."""
        entries = [self.write_file(folder_start_us, part) for folder_start_us, part in split_by_folder(table)]
        self.save_metadata()
        return entries

    def write_file(self, folder_start_us: int, table: pa.Table) -> dict:
        """Publish the rows of one 10-minute folder as a new raw file and list it here (metadata.json
        lists it at the next save_metadata).  On an error no file is left and nothing is listed."""
        with self.lock:
            sequence = self._next_sequence()
            key = self.layout.file_key(self.dir_key, folder_start_us, sequence, RAW)
            rows_per_group = min(len(table), row_group_rows(table, ROW_GROUP_BYTES))
            self.file_store.write(key, lambda out: pq.write_table(
                table, out, compression="zstd", row_group_size=rows_per_group, use_dictionary=False,
                write_statistics=RAW_STATISTICS, bloom_filter_options=bloom_filters(table.schema, rows_per_group)))
            low, high = pc.min_max(table.column("time").cast(pa.int64())).values()
            entry = file_entry(key, sequence, RAW, folder_start_us,
                               FileFacts(self.file_store.size_bytes(key), len(table), low.as_py(), high.as_py()))
            self.files[key] = entry
        log.debug("wrote %s (%d rows, %d bytes)", key, entry["row_count"], entry["size_bytes"])
        return entry

    def _next_sequence(self) -> int:
        if self.sequence >= self.layout.MAX_SEQUENCE:
            raise StoreError(f"{self.metadata_key}: sequence numbers are used up")
        self.sequence += 1
        return self.sequence

    def new_key(self, chunk_time_us: int, kind: FileKind) -> str:
        """A new, never used key for a merge's output: an hour's, a 10-minute folder's, or an object."""
        with self.lock:
            return self.layout.file_key(self.dir_key, chunk_time_us, self._next_sequence(), kind)

    def add_merged(self, spool_path: str, key: str, chunk_time_us: int, inputs: list[dict],
                   source: "TypeStore") -> dict:
        """Publish a merge's complete output, written at the FileStore's spool_path(key), and swap it for
        its inputs, which `source` lists: this store for an hour's compaction (one metadata.json write
        makes the swap), the local disk's for a folder uploaded to the bucket (this store's metadata.json
        lists the object, then the local one unlists the inputs; recovery tells the states apart by the
        inputs the output's footer names).  The inputs are deleted when FileLeases says.  Raises,
        publishing nothing, when the output does not hold exactly the inputs' rows.

        Queries list this writer's files under FileLeases.lock, so the swap takes it: a query sees the
        inputs or the output, never both.  When the bucket's metadata.json cannot be written, nothing is
        listed and the error raised; the object stays under its key, which the next try writes again."""
        sequence, kind = self.layout.parse_file_name(key.rsplit("/", 1)[-1])
        with open(spool_path, "rb") as spooled:
            output = file_entry(key, sequence, kind, chunk_time_us, describe_file(spooled))
        if output["row_count"] != sum(entry["row_count"] for entry in inputs):     # never swap it in
            raise RuntimeError(f"the merge of {[e['path'] for e in inputs]} wrote {output['row_count']} rows")
        self.file_store.publish(spool_path, key)
        if source is self:
            with self.lock:
                for entry in inputs:
                    del self.files[entry["path"]]
                self.files[key] = output
                self._save_metadata()
            self.leases.delete_when_free(self.file_store, [entry["path"] for entry in inputs])
            self.leases.delete_due()
            return output
        with self.leases.lock, self.lock:
            self.files[key] = output
            self.sequence = max(self.sequence, sequence)       # wal_sequence covers every id listed
            try:
                self._save_metadata()
            except BaseException:
                del self.files[key]
                raise
            with source.lock:
                for entry in inputs:
                    source.files.pop(entry["path"], None)
        source.delete(inputs)               # this disk's metadata.json, then the files
        return output

    def delete(self, entries: list[dict]) -> None:
        """Unlist files in one write of metadata.json; they are deleted when FileLeases says."""
        with self.lock:
            for entry in entries:
                self.files.pop(entry["path"], None)
            self._save_metadata()
        self.leases.delete_when_free(self.file_store, [entry["path"] for entry in entries])
        self.leases.delete_due()

    def set_aside(self, entries: list[dict], why: str) -> None:
        """Unlist files that cannot be read and move them out of the tree, under set-aside/, where
        nothing reads or deletes them and whoever looks can."""
        with self.lock:
            for entry in entries:
                self.files.pop(entry["path"], None)
            self._save_metadata()
        for entry in entries:
            self._move_aside(entry["path"], why)

    def _move_aside(self, key: str, why: str) -> None:
        target = self.layout.set_aside_key(key)
        try:
            self.file_store.move(key, target)
            log.error("set aside %s (%s): moved to %s", key, why, target)
        except OSError as exc:
            log.error("cannot set aside %s (%s): %s; removing it", key, why, exc)
            self.file_store.delete(key)

    def remove_empty_folders(self, before_us: int) -> int:
        """Remove the empty 10-minute and day folders of times before `before_us`; how many went."""
        def ended(relative: str) -> bool:
            start = self.layout.folder_start_us(relative)
            return start is not None and start + (86_400 if "/" not in relative else 600) * 1_000_000 <= before_us
        with self.lock:                     # the writer creates folders under the same lock
            return self.file_store.remove_empty_folders(self.dir_key, ended)

    def save_metadata(self) -> None:
        """Write metadata.json from the files listed here."""
        with self.lock:
            self._save_metadata()

    def _save_metadata(self) -> None:
        """Write metadata.json: the seed's fields, then the files, one entry to a line.

        Each entry's JSON text is made once and kept while the same entry is listed: at 4,200 files
        listed, as a busy hour has before its compaction, json.dumps(indent=1) of the whole took a flush
        from 5 to 80 ms (bench_hepop.py --flush)."""
        files = sorted(self.files.values(), key=lambda entry: entry["id"])
        texts = {}
        for entry in files:
            kept = self._entry_texts.get(entry["path"])
            texts[entry["path"]] = kept if kept and kept.entry is entry else EntryText(entry, json.dumps(entry))
        self._entry_texts = texts
        head = json.dumps({
            "type": self.proto_type,
            "parquet_size_bytes": sum(entry["size_bytes"] for entry in files),
            "row_count": sum(entry["row_count"] for entry in files),
            "min_time": min((entry["min_time"] for entry in files), default=None),
            "max_time": max((entry["max_time"] for entry in files), default=None),
            "wal_sequence": self.sequence,
        }, indent=1)
        files_json = ",\n".join(text.json for text in texts.values())
        body = f'{head[:-2]},\n "files": [\n{files_json}\n ]\n}}\n'.encode()
        self.file_store.write(self.metadata_key, lambda out: out.write(body))

    # -- recovery at start ----------------------------------------------------------------------------

    def recover(self) -> None:
        """Make metadata.json equal to the tree, whatever moment a crash struck.

        - Temp files are removed: nothing was listed for them.
        - Listed files that are gone are dropped from metadata with a warning.
        - A compacted file records the files it merged.  Those still on disk are removed: either the
          swap in metadata happened (they are merged) or metadata is being rebuilt and the complete,
          fsynced output holds their rows.  A compacted file that metadata does not list, when
          metadata is whole, is removed: the crash came before the swap and its inputs are still listed.
        - Other unlisted files (raw files renamed just before a crash) are complete, since only fsynced
          files are renamed: they are adopted if they read, else set aside.
        - Files whose name is not one of ours are set aside.
        A missing metadata.json, or one with anything wrong in it, is rebuilt from the tree by the same rules.
        """
        listed, sequence, rebuilding = self._load_metadata()
        on_disk = set()
        for key in self.file_store.keys_below(self.dir_key):
            name = key.rsplit("/", 1)[-1]
            if name.endswith(TEMP_SUFFIX):
                log.warning("removing %s left by an interrupted write", key)
                self.file_store.delete(key)
            elif name.endswith(".parquet") and self.layout.parse_file_name(name) is None:
                self._move_aside(key, "not a name hepop writes")
            elif name.endswith(".parquet"):
                on_disk.add(key)
                sequence = max(sequence, self.layout.parse_file_name(name)[0])   # never reused either
        for key in sorted(set(listed) - on_disk):
            log.warning("metadata lists %s, which is gone: dropping it", key)
            del listed[key]
        compacted = [key for key in on_disk if self.layout.is_merge_output(key) and (rebuilding or key in listed)]
        merged = set()
        for key in compacted:
            try:
                merged.update(merged_inputs(self.file_store, key))
            except Exception as exc:       # unreadable: set aside below, and its inputs stay
                log.warning("cannot read %s: %s", key, exc)
        for key in sorted(on_disk):
            if key in merged:
                log.warning("removing %s: already merged into a compacted file", key)
                listed.pop(key, None)
                self.file_store.delete(key)
            elif key not in listed:
                self._adopt_or_remove(key, listed, rebuilding)
        self.files = listed
        self.sequence = sequence
        self._save_metadata()

    def _adopt_or_remove(self, key: str, listed: dict, rebuilding: bool) -> None:
        if self.layout.is_merge_output(key) and not rebuilding:
            log.warning("removing %s: a compaction output written before a crash, its inputs are listed", key)
            self.file_store.delete(key)
            return
        try:
            entry = self._entry_for_unlisted(key)
        except Exception as exc:  # any unreadable file: pyarrow raises several kinds
            self._move_aside(key, f"unreadable: {exc}")
        else:
            log.warning("adopting %s (%d rows), written before a crash", key, entry["row_count"])
            listed[key] = entry

    def _load_metadata(self) -> tuple[dict[str, dict], int, bool]:
        """Listed files, last sequence number, and whether metadata must be rebuilt from the tree: when
        it is missing, or anything in it is not what hepop writes."""
        try:
            with self.file_store.open_input(self.metadata_key) as source:
                metadata = json.load(source)
            problem = self._metadata_problem(metadata)
        except FileNotFoundError:
            return {}, 0, True
        except (ValueError, RecursionError) as exc:
            problem = f"not JSON: {exc}"
        if problem:
            log.warning("%s is damaged (%s): rebuilding it from the files", self.metadata_key, problem)
            return {}, 0, True
        return {entry["path"]: entry for entry in metadata["files"]}, metadata["wal_sequence"], False

    def _metadata_problem(self, metadata) -> Optional[str]:
        if not isinstance(metadata, dict) or not isinstance(metadata.get("files"), list):
            return "no list of files"
        sequence = metadata.get("wal_sequence")
        if not isinstance(sequence, int) or isinstance(sequence, bool) or \
                not 0 <= sequence <= self.layout.MAX_SEQUENCE:
            return f"wal_sequence is {str(sequence)[:40]!r}"
        paths = set()
        for entry in metadata["files"]:
            problem = entry_problem(entry, self.dir_key)
            if problem:
                return problem
            if entry["path"] in paths or entry["id"] > sequence:
                return f"{entry['path']!r} is listed twice or past wal_sequence"
            paths.add(entry["path"])
        return None

    def _entry_for_unlisted(self, key: str) -> dict:
        folder, name = key.rsplit("/", 1)
        sequence, kind = self.layout.parse_file_name(name)
        chunk = self.layout.folder_start_us(folder[len(self.dir_key) + 1:])
        if chunk is None:
            raise ValueError("not in a YYYY-MM-DD/HH-MM folder")
        with self.file_store.open_input(key) as source:
            if pq.read_schema(source).remove_metadata() != self.schema:
                raise ValueError("schema differs from this type's")
            return file_entry(key, sequence, kind, chunk, describe_file(source))


INPUTS_KEY = b"hepop:inputs"


def merged_inputs(file_store: FileStore, key: str) -> list[str]:
    """The keys of the files that a compacted file merged, as recorded in its footer."""
    with file_store.open_input(key) as source:
        metadata = pq.read_schema(source).metadata or {}
    return json.loads(metadata.get(INPUTS_KEY, b"[]"))


def readable(file_store: FileStore, key: str) -> bool:
    """Whether every row group of a Parquet file reads, one at a time (a truncated or damaged file
    does not)."""
    try:
        with file_store.open_input(key) as source:
            parquet = pq.ParquetFile(source)
            for index in range(parquet.num_row_groups):
                parquet.read_row_group(index)
        return True
    except Exception:                   # pyarrow raises several kinds for damage
        return False


class DiskSignals:
    """What the writer and the disk guard (Compactor.guard_disk) tell each other.  The writer sets
    `look_now` after each file (and each batch it drops), so the guard looks at once, not at its next
    pass: a flood inside the current hour grew this writer's files from a 3 MB MAX_DISK_BYTES to 28 MB
    between passes.  The guard sets `full` once only the current hour is left and the limit is still
    passed; the writer then drops what arrives (hep_dropped_total{reason="disk_full"}), /health says so,
    and the guard clears it when there is room again (the hour has closed and can go)."""

    def __init__(self):
        self.look_now = threading.Event()
        self.full = threading.Event()


class Storage:
    """All HEP types of this writer, opened on first use; existing ones recovered at start.  Their files
    are kept by `file_store`, by default on this disk under PARQUET_DIR.

    With a `bucket` (S3_URL), the files on this disk are the write-ahead log: each closed 10-minute folder
    is merged into one object there (Uploader), listed in the bucket's own metadata.json of the type
    (`uploaded`), and only then unlisted and deleted here.  A raw file here that an object in the bucket
    names as an input (its footer says) was uploaded before a crash: at start it is deleted.

    The writer's folder is locked first (a POSIX lock on WRITER_ID/.lock, which the kernel releases when
    the holder dies, kill -9 included): two hepops writing one folder would write the same file names."""

    def __init__(self, root: str, writer_id: str, file_store: Optional[FileStore] = None,
                 bucket: Optional[FileStore] = None):
        self.layout = TreeLayout(root)
        self.file_store = file_store or LocalFileStore(root)
        self.bucket = bucket
        self.writer_id = writer_id
        self.leases = FileLeases()
        self.disk = DiskSignals()
        self.types: dict[int, TypeStore] = {}
        self.uploaded: dict[int, TypeStore] = {}
        self._opening = threading.Lock()        # the writer and the compactor open types (the call records)
        # Held by the writer from a SIP file's write to the keeping of its call records (PendingRecords) and
        # while it writes them, and by the check of the records (CallRecordsCheck) while it lists both: it
        # sees a file and its records, or neither.  `records_to_come`: the hours of records the writer
        # still holds, under it.
        self.pairing = threading.RLock()
        self.records_to_come: set[int] = set()
        self.records_checked = threading.Event()
        self._lock_file = self._lock_writer_dir()
        found = self._check_writable(self.file_store, f"PARQUET_DIR={root}")
        if bucket is not None:
            found |= self._check_writable(bucket, "S3_URL")
        try:
            for proto_type in sorted(found):
                self.store(proto_type)
        except OSError as exc:
            raise StoreError(f"PARQUET_DIR={root}: {exc.strerror or exc}") from None
        try:
            for proto_type in sorted(found) if bucket is not None else ():
                self._drop_uploaded(self.types[proto_type], self.uploaded_store(proto_type))
        except OSError as exc:
            raise StoreError(f"S3_URL: cannot read the bucket: {exc}") from None

    def _check_writable(self, file_store: FileStore, where: str) -> set[int]:
        """The types that a store holds files of, once a write to it succeeded; StoreError when it fails."""
        base = self.layout.types_key(self.writer_id)
        try:
            file_store.write(f"{base}/.write-check", lambda out: out.write(b"ok"))
            file_store.delete(f"{base}/.write-check")
            return self.layout.types_in(file_store.folders(base))
        except OSError as exc:
            raise StoreError(f"{where}: cannot write {base}: {exc.strerror or exc}") from None

    def stores(self) -> list[TypeStore]:
        """Every type's store on this disk and, with a bucket, in it."""
        return list(self.types.values()) + list(self.uploaded.values())

    def _lock_writer_dir(self):
        path = os.path.join(self.layout.writer_dir(self.writer_id), ".lock")
        try:
            make_dirs(os.path.dirname(path))
            lock_file = open(path, "a+")
        except OSError as exc:
            raise StoreError(f"PARQUET_DIR={self.layout.root}: cannot create {os.path.dirname(path)}: "
                             f"{exc.strerror or exc}") from None
        try:
            fcntl.lockf(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "unknown"
            lock_file.close()
            raise StoreError(f"PARQUET_DIR={self.layout.root}: {os.path.dirname(path)} is in use by hepop "
                             f"process {holder} (one hepop per PARQUET_DIR and WRITER_ID)") from None
        lock_file.truncate(0)
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        return lock_file

    def store(self, proto_type: int) -> TypeStore:
        """The type's store on this disk, where its raw files are written."""
        with self._opening:
            if proto_type not in self.types:
                self.types[proto_type] = TypeStore(self.layout, self.file_store, self.writer_id, proto_type,
                                                   self.leases)
            return self.types[proto_type]

    def new_key(self, proto_type: int, chunk_time_us: int, kind: FileKind) -> str:
        """A new, never used key for a file of a type, on this disk or in the bucket: one numbering for
        both, kept by the type's store on this disk (at start it is moved past every object's)."""
        return self.store(proto_type).new_key(chunk_time_us, kind)

    def uploaded_store(self, proto_type: int) -> TypeStore:
        """The type's store in the bucket (opened by the uploader, never by the writer: a bucket that is
        down must not stop a write); raises OSError when the bucket cannot be read."""
        with self._opening:
            if proto_type not in self.uploaded:
                self.uploaded[proto_type] = TypeStore(self.layout, self.bucket, self.writer_id, proto_type,
                                                      self.leases)
            return self.uploaded[proto_type]

    def _drop_uploaded(self, local: TypeStore, uploaded: TypeStore) -> None:
        """Delete the raw files here that an object in the bucket holds (a crash came between its
        upload and their deletion; the object may since have been compacted into its hour's, whose
        footer names them too), and number new files past every object's."""
        hour_of = lambda entry: entry["chunk_time"] // 1000 // HOUR_US
        hours = {hour_of(entry) for entry in local.listed()}
        merged = set()
        for entry in uploaded.listed():
            if hour_of(entry) in hours:
                merged.update(merged_inputs(uploaded.file_store, entry["path"]))
        done = [entry for entry in local.listed() if entry["path"] in merged]
        if done:
            log.warning("removing %d files of %s already uploaded before a crash", len(done),
                        type_name(local.proto_type))
            local.delete(done)
            self.leases.delete_due(everything=True)     # at start no query holds them
        with local.lock:
            local.sequence = max(local.sequence, uploaded.sequence)

    def close(self) -> None:
        """Let the next hepop have the folder."""
        self._lock_file.close()


class ListedEntry(NamedTuple):
    """A file's entry and the store (this disk's, the bucket's) that lists it."""
    store: TypeStore
    entry: dict


REBUILD_BATCH_ROWS = 65_536             # SIP rows read at a time when records are made again
REBUILD_FILE_ROWS = 1_000_000           # records gathered before they are written


class CallRecordsCheck:
    """The call records are derived data: each hour's records must count the hour's SIP rows (each record
    counts its messages, those without a Call-ID included), else they are made again from the hour's SIP
    files, and the old ones deleted.

    Only where they can differ is it counted: an hour with raw files (a crash may come between a SIP file
    and its records), or one that only one of the two holds (retention and the disk guard delete the
    hours of each type in turn; records deleted by hand, or a tree from before the records).  Merges keep
    the rows they merge, so hours that both hold merged only agree already.  The count cannot tell a
    loss from a double of as many messages in the same hour; hepop makes no double (a records file
    published and not listed before a crash is adopted, never written again), only a hand could.

    It runs in the compactor thread.  At start (`at_start`), before the first pass and with the uploader
    waiting for it (Storage.records_checked), the hours with raw files; the hours that one type lacks are
    left for later passes (`one_deferred_hour`, newest first, an hour a pass), so that a tree of days
    without records does not hold compaction, retention and the disk guard up for hours.  The writer writes
    meanwhile: under Storage.pairing, the check lists a SIP file and its records or neither.  With a bucket,
    a deferred hour that still has files on this disk waits (the uploader moves them); until an hour is
    done, `calls` may miss its records."""

    def __init__(self, storage: Storage, counters: Counters, stopping: threading.Event):
        self.storage = storage
        self.counters = counters
        self.stopping = stopping                # a stop ends it between two batches; the next start goes on
        self.deferred: list[int] = []           # hours, oldest first: the newest is taken first

    def at_start(self) -> None:
        messages, records = self._listed()
        hours = sorted(set(messages) | set(records))
        with_raw = [hour for hour in hours if any(entry_kind(listed.entry) is RAW
                                                  for listed in messages.get(hour, []) + records.get(hour, []))]
        rebuilt = sum(self._check(hour, messages.get(hour, []), records.get(hour, [])) for hour in with_raw)
        self.deferred = [hour for hour in hours if hour not in with_raw and (hour in messages) != (hour in records)]
        log.info("call records of the hours with raw files checked: %d hours of %d made again; %d hours that only "
                 "messages or only records hold are checked one a pass", rebuilt, len(hours), len(self.deferred))
        if not self.deferred:
            log.info("call records checked: every hour")

    def one_deferred_hour(self) -> None:
        """The newest deferred hour, checked and made again where its counts differ."""
        if not self.deferred:
            return
        hour = self.deferred[-1]
        with self.storage.pairing:
            messages, records = self._listed()
            to_come = hour in self.storage.records_to_come
        sip, kept = messages.get(hour, []), records.get(hour, [])
        if to_come or self.storage.bucket is not None and any(listed.store.file_store is self.storage.file_store
                                                              for listed in sip + kept):
            return              # the writer holds records of it, or the uploader moves its files: the next pass
        self.deferred.pop()
        self._check(hour, sip, kept)
        if not self.deferred:
            log.info("call records checked: every hour")

    def _listed(self) -> tuple[dict, dict]:
        with self.storage.pairing:
            return self._by_hour(SIP_TYPE), self._by_hour(CALLS_TYPE)

    def _check(self, hour: int, sip: list[ListedEntry], kept: list[ListedEntry]) -> bool:
        """Whether the hour's records had to be made again."""
        sip_rows = sum(listed.entry["row_count"] for listed in sip)
        counted = sum(self._messages(listed) for listed in kept)
        if counted == sip_rows:
            return False
        log.warning("the call records of %s count %d SIP rows, its files hold %d: making them again",
                    format_time(hour * HOUR_US), counted, sip_rows)
        self.rebuild(sip, kept)
        self.counters.add("call_records_rebuilt_total")
        self.storage.leases.delete_due()
        return True

    def _by_hour(self, proto_type: int) -> dict[int, list[ListedEntry]]:
        hours = collections.defaultdict(list)
        stores = [self.storage.types.get(proto_type), self.storage.uploaded.get(proto_type)]
        for store in stores:
            for entry in store.listed() if store is not None else ():
                hours[entry["chunk_time"] // 1000 // HOUR_US].append(ListedEntry(store, entry))
        return hours

    @staticmethod
    def _messages(listed: ListedEntry) -> int:
        with listed.store.file_store.open_input(listed.entry["path"]) as source:
            return pc.sum(pq.read_table(source, columns=["messages"])["messages"]).as_py() or 0

    def rebuild(self, sip: list[ListedEntry], kept: list[ListedEntry]) -> None:
        """`kept` deleted, then the records of `sip`'s files written here, a million at a time: while it
        runs (3.2 us of CPU a SIP row, bench's tree on this machine), `calls` misses calls of the hour but
        never counts one twice."""
        for held_by in {listed.store for listed in kept}:
            held_by.delete([listed.entry for listed in kept if listed.store is held_by])
        store = self.storage.store(CALLS_TYPE)
        pending: list[pa.Table] = []
        for listed in sip:
            with listed.store.file_store.open_input(listed.entry["path"]) as source:
                for batch in pq.ParquetFile(source).iter_batches(REBUILD_BATCH_ROWS, columns=CALL_SOURCE_COLUMNS):
                    if self.stopping.is_set():
                        raise InterruptedError("stopped")
                    pending.append(call_records(pa.Table.from_batches([batch])))
                    if sum(map(len, pending)) >= REBUILD_FILE_ROWS:
                        store.write(pa.concat_tables(pending))
                        pending.clear()
        if pending:
            store.write(pa.concat_tables(pending))


# ---------------------------------------------------------------------------------------------------------
# Writer thread: the batches the loop hands over, turned into Parquet files.
# ---------------------------------------------------------------------------------------------------------

class Sender(NamedTuple):
    """Where a run of messages from one peer starts in a ReceivedBatch."""
    first: int                  # index of the run's first message
    peer: object                # the socket address it came from


def sender_of(senders: list[Sender], index: int):
    """The peer that sent message `index` of a run of messages described by `senders`."""
    return senders[bisect.bisect_right(senders, index, key=lambda sender: sender.first) - 1].peer


@dataclasses.dataclass
class ReceivedBatch:
    """Messages as received over one transport, of any HEP type, for the writer to decode."""
    transport: str              # "udp", "tcp" or "tls"
    arrival_us: int             # when the first came: the time given to packets without a sane one
    due_s: float                # time.monotonic() at which it is handed over, full or not
    messages: list = dataclasses.field(default_factory=list)     # bytes of each datagram or frame
    senders: list = dataclasses.field(default_factory=list)      # Sender where the peer changes
    nbytes: int = 0
    inflating: bool = False     # its messages have compressed payloads: MAX_INFLATING_BYTES counts it

    @property
    def key(self) -> tuple:
        return self.transport, self.inflating

    def sender_of(self, index: int):
        """The peer that sent message `index`."""
        return sender_of(self.senders, index)


@dataclasses.dataclass
class DecodedBatch:
    """Packets of one HEP type that the loop decoded itself (TCP frames of other layouts)."""
    proto_type: int
    due_s: float
    times_us: list = dataclasses.field(default_factory=list)     # the checked capture time of each
    packets: list = dataclasses.field(default_factory=list)      # HepPacket
    nbytes: int = 0
    inflating = False           # its payloads are decoded: they take what they are charged

    @property
    def key(self) -> int:
        return self.proto_type


PENDING_RECORDS_FLUSHES = 5         # call records waiting to be written: at most this many x FLUSH_ROWS


class PendingRecords:
    """The call records of the SIP files written in the last CALL_RECORDS_INTERVAL_S, by 10-minute folder,
    written together as one file per folder (BatchWriter._write_records): a busy site's writer writes a
    SIP file a second, and a records file for each made 600 in an open folder, every one of which a query
    of `calls` opened (a call list over the last 15 minutes at 2,000 messages/s took 0.27-0.9 s, most of
    it opening files).  At most `max_rows` wait (PENDING_RECORDS_FLUSHES x FLUSH_ROWS): traffic with a
    new Call-ID in every message makes a record of each.  Under Storage.pairing; `hours` tells
    CallRecordsCheck which hours have records still to come."""

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.by_folder: dict[int, list[pa.Table]] = collections.defaultdict(list)
        self.rows = 0
        self.since_s: Optional[float] = None        # time.monotonic() of the oldest

    def add(self, folder_start_us: int, records: pa.Table) -> None:
        self.by_folder[folder_start_us].append(records)
        self.rows += len(records)
        if self.since_s is None:
            self.since_s = time.monotonic()

    def due(self, interval_s: float) -> bool:
        return self.since_s is not None and (self.rows >= self.max_rows or
                                             time.monotonic() - self.since_s >= interval_s)

    def hours(self) -> set[int]:
        return {folder_start_us // HOUR_US for folder_start_us in self.by_folder}

    def take(self) -> dict[int, pa.Table]:
        taken = {folder: pa.concat_tables(tables) for folder, tables in self.by_folder.items()}
        self.by_folder.clear()
        self.rows = 0
        self.since_s = None
        return taken


class BatchWriter(threading.Thread):
    """Turns batches handed over by the loop into Parquet files, off the receive loop.

    `pending_bytes` counts what is queued or being written; the loop pauses reading near
    MAX_PENDING_BYTES (a disk that stalls must not make the process run out of memory).

    A write that fails is tried again, RETRIES times with a growing pause, but never a file that was
    published: the rows of a batch go to one file per 10-minute folder, each published once, and a
    metadata.json that fails to save is saved again by itself (the files are on disk and listed here;
    a restart would adopt them too).  Once a stop has begun (`stop_by`), pauses end there: what still
    fails is counted as dropped, and the process exits on time.  `failing` says why writes fail, for
    /health, until one succeeds again.
    """

    RETRIES = 5

    def __init__(self, storage: Storage, counters: Counters, check: PacketCheck, config: Config):
        super().__init__(name="hepop-writer", daemon=True)
        self.storage = storage
        self.counters = counters
        self.check = check
        self.sip_kpis = SipKpis(counters, config.max_calls_tracked)
        self.records_interval_s = config.call_records_interval_s
        self.pending_records = PendingRecords(PENDING_RECORDS_FLUSHES * config.flush_rows)
        self.discard_methods = config.discard_methods
        self.queue: queue.Queue = queue.Queue()
        self.pending_bytes = 0
        self.pending_inflating_bytes = 0        # of batches of compressed payloads: their own budget
        self.last_flush = None
        self.failing: Optional[str] = None
        self.stop_by: Optional[float] = None         # time.monotonic() by which the process must be gone
        self._lock = threading.Lock()

    def submit(self, batch) -> None:
        self._count_pending(batch, batch.nbytes)
        self.queue.put(batch)

    def _count_pending(self, batch, nbytes: int) -> None:
        with self._lock:
            if batch.inflating:
                self.pending_inflating_bytes += nbytes
            else:
                self.pending_bytes += nbytes

    def close(self) -> None:
        """Write everything submitted so far, then stop."""
        self.queue.put(None)
        self.join()

    def run(self) -> None:
        while True:
            try:
                batch = self.queue.get(timeout=self.records_interval_s)
            except queue.Empty:
                batch = False
            if batch is None:
                break
            if batch:
                self._write(batch)
                self._count_pending(batch, -batch.nbytes)
            self._write_records(everything=False)
        self._write_records(everything=True)

    def _write(self, batch) -> None:
        try:
            if isinstance(batch, ReceivedBatch):
                tables = self.message_tables(batch)
            else:
                tables = {batch.proto_type: packet_table(batch.times_us, batch.packets)}
            tables = {proto_type: complete_table(proto_type, packets) for proto_type, packets in tables.items()}
        except Exception:                   # a bug, not bad input: say so, count it, keep writing
            count = len(batch.messages if isinstance(batch, ReceivedBatch) else batch.packets)
            log.exception("decoding a batch of %d packets failed: dropped", count)
            self.counters.add("hep_dropped_total", count, reason="decode_error")
            return
        for proto_type, table in tables.items():
            if proto_type == SIP_TYPE:
                table = self._without_discarded(table)
                self._count_kpis(table)
            if len(table):
                self._store(proto_type, table)

    def _count_kpis(self, table: pa.Table) -> None:
        """SipKpis over the batch; a failure there (a bug) is logged and counted, and never stops the writing."""
        try:
            self.sip_kpis.count(table)
        except Exception:
            self.counters.add("kpi_errors_total")
            log.exception("counting the SIP KPIs of %d rows failed; the rows are written all the same", len(table))

    def _without_discarded(self, table: pa.Table) -> pa.Table:
        """The SIP rows but those of DISCARD_METHODS (requests, and responses by their CSeq), counted by method."""
        if not self.discard_methods:
            return table
        method = message_methods(table)
        discarded = pc.fill_null(pc.is_in(method, pa.array(sorted(self.discard_methods))), False)
        if not pc.any(discarded).as_py():
            return table
        for row in pa.table({"method": method.filter(discarded)}).group_by("method").aggregate(
                [([], "count_all")]).to_pylist():
            self.counters.add("hep_discarded_total", row["count_all"], method=row["method"])
        return table.filter(pc.invert(discarded))

    def message_tables(self, batch: ReceivedBatch) -> dict[int, pa.Table]:
        """The packets of a flush of messages as received, by type: the common layouts decoded by Arrow over
        the batch, every other message by decode() and the checks the loop makes of the rest."""
        transport, arrival_us = batch.transport, batch.arrival_us
        datagrams = pa.array(batch.messages, pa.binary())
        received: collections.Counter = collections.Counter()
        parts, others = [], None          # others: where the messages that no prefix took are in the batch
        for prefix in COMMON_PREFIXES:
            picked, packets = decode_common(datagrams, prefix)
            received[transport, 3] += len(packets)
            parts.append(self.check.capture_times(packets, arrival_us, transport))
            left = pc.invert(picked)
            others = pc.indices_nonzero(left) if others is None else others.filter(left)
            if not len(others):
                break
            datagrams = datagrams.filter(left)
        times, packets = [], []
        for index in others.to_pylist():
            data, peer = batch.messages[index], batch.sender_of(index)
            packet = self.check.decode(data, transport, peer, received)
            if packet is None:
                continue
            time_us = self.check.capture_time(packet, peer, arrival_us)
            if time_us is not None:
                times.append(time_us)
                packets.append(packet)
        parts.append(packet_table(times, packets))
        publish_received(self.counters, received)
        table = pa.concat_tables([part for part in parts if part is not None])
        types = pc.unique(table["proto_type"]).to_pylist()
        if len(types) == 1:
            return {types[0]: table}
        return {proto_type: table.filter(pc.equal(table["proto_type"], proto_type)) for proto_type in types}

    def _store(self, proto_type: int, table: pa.Table) -> None:
        """Write the rows of one type: each 10-minute folder's file once, then metadata.json; nothing
        while the disk guard says the disk is full (DiskSignals)."""
        if self.storage.disk.full.is_set():
            self.counters.add("hep_dropped_total", len(table), reason="disk_full")
            self.storage.disk.look_now.set()        # for the guard to see when there is room again
            return
        started = time.perf_counter()
        what = f"{len(table)} rows of {type_name(proto_type)}"
        store = self._attempt(f"opening {type_name(proto_type)}", lambda: self.storage.store(proto_type))
        if store is None:
            self.counters.add("hep_dropped_total", len(table), reason="write_error")
            return
        entries = []
        for folder_start_us, part in split_by_folder(table):
            with self.storage.pairing if proto_type == SIP_TYPE else contextlib.nullcontext():
                entry = self._attempt(f"writing {what}", lambda: store.write_file(folder_start_us, part))
                if entry is not None and proto_type == SIP_TYPE:
                    self._keep_call_records(folder_start_us, part)
            if entry is None:
                self.counters.add("hep_dropped_total", len(part), reason="write_error")
            else:
                entries.append(entry)
        if not entries:
            return
        if self._attempt(f"listing {what} in metadata.json", store.save_metadata) is not None:
            self.failing = None
        else:
            self.counters.add("metadata_errors_total")     # listed by the next save, or adopted at start
        elapsed = time.perf_counter() - started
        self.last_flush = time.time()
        self.counters.add("rows_written_total", sum(entry["row_count"] for entry in entries),
                          type=type_label(proto_type))
        self.counters.add("files_written_total", len(entries))
        self.counters.add("bytes_written_total", sum(entry["size_bytes"] for entry in entries))
        self.counters.add("flush_seconds_total", elapsed)
        self.counters.maximum("flush_seconds_max", elapsed)
        self.storage.disk.look_now.set()

    def _keep_call_records(self, folder_start_us: int, sip_rows: pa.Table) -> None:
        """The call records of a SIP file just written, kept to be written with the others of the same
        10-minute folder (PendingRecords); before the check at start is done (Storage.records_checked),
        written at once.  A failure is logged and counted (call_records_errors_total): the messages are
        stored, and the check at the next start (CallRecordsCheck) makes the records that are missing.
        They cost the writer 1.0-1.2 us of CPU a message (bench_hepop.py --writer)."""
        try:
            records = call_records(sip_rows)
        except Exception:
            self.counters.add("call_records_errors_total")
            log.exception("making the call records of %d SIP rows failed; the next start makes them", len(sip_rows))
            return
        self.pending_records.add(folder_start_us, records)
        self.storage.records_to_come = self.pending_records.hours()
        self._write_records(everything=not self.storage.records_checked.is_set())

    def _write_records(self, everything: bool) -> None:
        """Write the pending call records, one file per folder, when CALL_RECORDS_INTERVAL_S has passed
        since the oldest or too many wait (or `everything`: at a stop)."""
        pending = self.pending_records
        if pending.since_s is None or not everything and not pending.due(self.records_interval_s):
            return
        with self.storage.pairing:
            taken = pending.take()
            self.storage.records_to_come = set()
            store = self._attempt("opening the call records", lambda: self.storage.store(CALLS_TYPE))
            for folder_start_us, records in taken.items():
                if store is None or self._attempt(f"writing {len(records)} call records",
                                                  lambda: store.write_file(folder_start_us, records)) is None:
                    self.counters.add("call_records_errors_total")
                else:
                    self.counters.add("call_records_written_total", len(records))
            if store is not None:
                self._attempt("listing call records in metadata.json", store.save_metadata)

    def _attempt(self, what: str, step: Callable[[], object]):
        """step()'s result, tried up to RETRIES times (with pauses that end at `stop_by`); None if it
        never succeeded.  Each failure is logged and kept in `failing` for /health."""
        for attempt in range(1, self.RETRIES + 1):
            try:
                return step() or True
            except Exception as exc:
                self.failing = f"{what} failed: {exc}"
                log.error("%s failed (attempt %d of %d): %s", what, attempt, self.RETRIES, exc)
                pause_s = min(attempt, 5)
                if self.stop_by is not None:
                    pause_s = min(pause_s, self.stop_by - time.monotonic())
                if pause_s <= 0:
                    break
                time.sleep(pause_s)
        return None


# ---------------------------------------------------------------------------------------------------------
# Compaction and retention: a timer thread merges each closed hour into one sorted file with DuckDB,
# deletes what is older than the retention or what overfills the disk, and removes empty folders.
# ---------------------------------------------------------------------------------------------------------

# A new interpreter for each compaction: fork() is unsafe in a process that runs threads (DuckDB's,
# Arrow's, ours), and spawn works the same from python3 hepop.py and from the PyInstaller binary.
PROCESSES = multiprocessing.get_context("spawn")


class InputRowGroup(NamedTuple):
    """A row group of a file to merge, as its footer describes it."""
    min_time_us: int
    max_time_us: int
    size_bytes: int
    rows: int
    path: str


class HourMerger:
    """Writes the rows of one hour's files as one file sorted by time, within COMPACT_MEMORY_MB.

    DuckDB sorts one piece of the hour at a time, within half of the budget and spilling to a temp
    folder inside PARQUET_DIR; pieces are disjoint time ranges sized from the row groups in the files'
    footers, so writing them one after the other gives a sorted hour while the memory needed stays that
    of one piece, however large the hour.  pyarrow writes the file with the type's one schema, as the raw
    files are written, in row groups of a sixteenth of the budget.
    """

    def __init__(self, memory_mb: int, temp_dir: str):
        duckdb_mb = max(64, memory_mb // 2)
        self.piece_bytes = duckdb_mb * (1 << 20) // 9      # measured: DuckDB's sort and the Arrow export
        #                                                    take several times a piece
        self.row_group_bytes = max(1 << 20, memory_mb * (1 << 20) // 16)
        self.db = duckdb.connect(config={"memory_limit": f"{duckdb_mb}MB", "threads": 1,
                                         "temp_directory": temp_dir, "preserve_insertion_order": False,
                                         "max_temp_directory_size": f"{8 * memory_mb}MB"})
        self.db.execute("SET TimeZone = 'UTC'")
        self.db.execute("SET enable_progress_bar = false")       # it prints to stdout: the journal

    def merge(self, out, schema: pa.Schema, files: list[str]) -> None:
        """Write the rows of `files` to `out` sorted by time, one piece of the hour at a time."""
        groups = self._row_groups(files)
        rows_per_group = self.row_group_bytes * sum(g.rows for g in groups) // max(1, sum(g.size_bytes for g in groups))
        with pq.ParquetWriter(out, schema, compression="zstd",
                              bloom_filter_options=bloom_filters(schema, rows_per_group)) as writer:
            pending, pending_bytes = [], 0
            for low, high, piece_files in self._pieces(groups):
                query = self.db.sql("SELECT * FROM read_parquet($files) WHERE time >= make_timestamp($low) "
                                    "AND time < make_timestamp($high) ORDER BY time",
                                    params={"files": piece_files, "low": low, "high": high})
                for batch in query.to_arrow_reader(4096):
                    batch = batch.cast(schema)
                    pending.append(batch)
                    pending_bytes += batch.nbytes
                    if pending_bytes >= self.row_group_bytes:
                        rest = self._write_row_group(writer, schema, pending)
                        pending, pending_bytes = rest.to_batches(), rest.nbytes
            if pending:
                rest = pa.Table.from_batches(pending, schema)
                writer.write_table(rest, row_group_size=len(rest))

    @staticmethod
    def _row_groups(files: list[str]) -> list[InputRowGroup]:
        """The row groups of `files`, by time, from the statistics in their footers."""
        groups = []
        for path in files:
            footer = pq.read_metadata(path)
            for index, (low, high) in enumerate(row_group_times(path, footer)):
                group = footer.row_group(index)
                groups.append(InputRowGroup(low, high, group.total_byte_size, group.num_rows, path))
        return sorted(groups)

    def _pieces(self, groups: list[InputRowGroup]) -> list[tuple[int, int, list[str]]]:
        """Consecutive time ranges [low, high) that together cover all time, each holding about
        `piece_bytes` of rows (DuckDB sorts that much in its memory limit), with the files that have
        rows in it."""
        edges, size = [0], 0
        for group in groups:
            if size and size + group.size_bytes > self.piece_bytes and group.min_time_us > edges[-1]:
                edges.append(group.min_time_us)
                size = 0
            size += group.size_bytes
        edges.append(1 << 62)
        return [(low, high, sorted({g.path for g in groups if g.min_time_us < high and g.max_time_us >= low}))
                for low, high in zip(edges, edges[1:])]

    def _write_row_group(self, writer: pq.ParquetWriter, schema: pa.Schema, batches: list) -> pa.Table:
        """Write the whole row groups of `row_group_bytes` that `batches` hold; return the rows left over,
        which begin the next.  Writing all of them cut each group in two, a full one and a sliver (about
        19,900 and 80 rows): twice the row groups, and a footer twice the size, that every query reads."""
        table = pa.Table.from_batches(batches, schema)
        rows = min(len(table), row_group_rows(table, self.row_group_bytes))
        whole = len(table) // rows * rows
        writer.write_table(table.slice(0, whole), row_group_size=rows)
        return table.slice(whole)


def merge_folder(paths: list[str], schema: pa.Schema, out) -> None:
    """Write the rows of the files at `paths` into one Parquet file, `out` (a path or a file), in their
    order, a row group of about ROW_GROUP_BYTES at a time: memory stays near one row group, whatever the
    folder holds (a folder of a busy site's 10 minutes is 12 million rows)."""
    footers = [pq.read_metadata(path) for path in paths]
    rows = sum(footer.num_rows for footer in footers)
    size_bytes = sum(footer.row_group(index).total_byte_size for footer in footers
                     for index in range(footer.num_row_groups))
    pending, pending_bytes = [], 0
    with pq.ParquetWriter(out, schema, compression="zstd", use_dictionary=False, write_statistics=RAW_STATISTICS,
                          bloom_filter_options=bloom_filters(schema, ROW_GROUP_BYTES * rows // max(1, size_bytes))) as writer:
        def write_pending():
            table = pa.concat_tables(pending)
            writer.write_table(table, row_group_size=len(table))
            pending.clear()
        for path in paths:
            with pq.ParquetFile(path) as parquet:
                for index in range(parquet.num_row_groups):
                    group = parquet.read_row_group(index).cast(schema)     # the footer's metadata too
                    pending.append(group)
                    pending_bytes += group.nbytes
                    if pending_bytes >= ROW_GROUP_BYTES:
                        write_pending()
                        pending_bytes = 0
        if pending:
            write_pending()


def merge_files(path: str, schema: pa.Schema, files: list[str], memory_mb: int, temp_dir: str,
                parent_pid: int, by_time: bool) -> None:
    """The compaction process: write the rows of `files` to `path`, sorted by time (an hour, HourMerger)
    or one file after the other (a 10-minute folder, merge_folder), and fsync it.

    Compaction runs in a process of its own, at nice 19, started for each merge: its memory is returned
    when it ends, so the capture process stays flat however large the hour; it never holds the capture
    process's GIL; and if DuckDB fails hard, or the kernel kills it for memory, capture goes on.  It dies
    with its parent, so that a killed hepop leaves no writer behind on a temp file."""
    if not become_child(parent_pid, COMPACTION_NICE, OOM_SCORE_ADJ["compaction"]):
        return                              # the parent died before the signal was armed
    with open(path, "wb") as out:
        if by_time:
            HourMerger(memory_mb, temp_dir).merge(out, schema, files)
        else:
            merge_folder(files, schema, out)
        out.flush()
        os.fsync(out.fileno())


def merged_sources(inputs: list[dict], paths: list[str]) -> list[str]:
    """What a compacted file's footer names as merged: its inputs, and the files their own footers name
    (an uploaded folder's raw files on the disk it came from: a restart deletes any still there)."""
    keys = dict.fromkeys(entry["path"] for entry in inputs)
    for path in paths:
        with open(path, "rb") as source:
            keys.update(dict.fromkeys(json.loads((pq.read_schema(source).metadata or {}).get(INPUTS_KEY, b"[]"))))
    return list(keys)


def set_aside_unreadable(store: TypeStore, inputs: list[dict], counters: Counters) -> None:
    """After a failed merge: set aside the inputs that do not read, so that the rest merges next time."""
    unreadable = [entry for entry in inputs if not readable(store.file_store, entry["path"])]
    if unreadable:
        store.set_aside(unreadable, "it does not read")
        counters.add("files_set_aside_total", len(unreadable), type=type_label(store.proto_type))
        counters.add("rows_set_aside_total", sum(e["row_count"] for e in unreadable), type=type_label(store.proto_type))


class Compactor(threading.Thread):
    """Every COMPACT_INTERVAL_S: compaction, retention, the disk guard, an hour of the call records'
    check (CallRecordsCheck, whose start-up part runs before the first pass) and folder cleanup, per type.

    An hour is compacted once it ended COMPACT_GRACE_S ago: its files (raw, and compacted by an earlier
    pass) become one c_NNNNNNNNNN.parquet in the hour's HH-00 folder, sorted by time, written by a process
    of its own (merge_files, HourMerger).  Before that, each 10-minute folder of the hour that ended
    COMPACT_GRACE_S ago is merged as it is (merge_files, merge_folder) into one m_ file in that folder:
    at 20,000 messages/s an hour is 3,600 raw files, and every query over the last hour opened each of
    them (a Call-ID over an hour of them took 3.5 s); it then opens at most a folder's 600 and five more.

    The swap (TypeStore.add_merged): the output is written to a temp name and fsynced, then published;
    one atomic metadata.json write replaces the inputs by it; the inputs are deleted as soon as no query
    of this process reads them.  The output's footer lists its inputs, which is how the restart
    (TypeStore.recover) tells every intermediate state apart.

    Each step of a pass (each hour's merge, each type's retention, the disk guard, folder cleanup) fails
    on its own: one that raises is logged and counted, and the others still run.  An hour that fails
    to merge is checked file by file; a file that does not read is set aside, and the rest is merged
    on the next pass.  A stop kills a merge under way and starts no other.
    """

    DELETE_POLL_S = 0.5             # how often, while files wait for their deletion, it is tried

    def __init__(self, config: Config, storage: Storage, counters: Counters):
        super().__init__(name="hepop-compactor", daemon=True)
        self.config = config
        self.storage = storage
        self.counters = counters
        self.retention_us = {t: int(s * 1e6) for t, s in config.retention_by_type}
        self.stopping = threading.Event()
        self.temp_dir = storage.layout.compaction_spill_dir(config.writer_id)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.merging: Optional[multiprocessing.process.BaseProcess] = None
        self._merging_lock = threading.Lock()       # a merge starts, or a stop kills it: never both
        self.records_check = CallRecordsCheck(storage, counters, self.stopping)

    def run(self) -> None:
        lower_priority(COMPACTION_NICE)     # compaction takes the CPU that capture leaves
        try:
            self._step("the check of the call records", self.records_check.at_start)
        finally:
            self.storage.records_checked.set()
        next_pass = time.monotonic() + self.config.compact_interval_s
        look_now = self.storage.disk.look_now
        while True:
            look_now.wait(max(0.0, min(next_pass - time.monotonic(), self.DELETE_POLL_S)
                              if self.storage.leases.waiting() else next_pass - time.monotonic()))
            if self.stopping.is_set():
                return
            if look_now.is_set():               # the writer wrote: a flood must not wait for the pass
                look_now.clear()
                self._step("the disk guard", lambda: self.guard_disk(time.time_ns() // 1000))
            self.storage.leases.delete_due()
            if time.monotonic() >= next_pass:
                self.run_once()
                next_pass = time.monotonic() + self.config.compact_interval_s

    def stop(self) -> None:
        """Stop at once: a merge under way is killed (its temp file is removed) and no other starts."""
        self.stopping.set()
        self.storage.disk.look_now.set()        # wakes run()
        with self._merging_lock:
            if self.merging is not None:
                self.merging.kill()

    def close(self) -> None:
        self.stop()
        if self.is_alive():
            self.join()
        self.storage.leases.delete_due(everything=True)     # unlisted files must not outlive the process

    def run_once(self, now_us: Optional[int] = None) -> None:
        now_us = now_us or time.time_ns() // 1000
        # With a bucket, closed folders leave this disk for it, one object each, long before their hour
        # would be merged here (Uploader): the hours merged are the bucket's.
        for store in list((self.storage.uploaded if self.storage.bucket else self.storage.types).values()):
            merges = [(start_us, inputs, True) for start_us, inputs in self.closed_hours(store, now_us)]
            if not self.storage.bucket:
                merges = [(start_us, inputs, False) for start_us, inputs in self.closed_folders(store, now_us)] + merges
            for start_us, inputs, hour in merges:
                self._step(f"compaction of {type_name(store.proto_type)} at {format_time(start_us)}",
                           lambda: self.compact(store, start_us, inputs, hour))
        for store in self.storage.stores():
            self._step(f"retention of {type_name(store.proto_type)}", lambda: self.expire(store, now_us))
        self._step("the disk guard", lambda: self.guard_disk(now_us))
        self._step("the check of an hour's call records", self.records_check.one_deferred_hour)
        for store in list(self.storage.types.values()):
            self._step(f"folder cleanup of {type_name(store.proto_type)}", lambda: self.counters.add(
                "folders_removed_total", store.remove_empty_folders(now_us - int(self.config.compact_grace_s * 1e6))))

    def _step(self, what: str, step: Callable[[], None]) -> None:
        if self.stopping.is_set():
            return
        try:
            step()
        except Exception as exc:
            if self.stopping.is_set():
                log.info("%s interrupted by shutdown; it starts over at the next start", what)
                return
            log.error("%s failed: %s; the next pass tries again", what, exc)
            self.counters.add("compaction_errors_total")

    # -- compaction -----------------------------------------------------------------------------------

    def closed_hours(self, store: TypeStore, now_us: int) -> list[tuple[int, list[dict]]]:
        """(hour start, files) of each hour that ended a grace period ago and is not one file yet."""
        hours: dict[int, list[dict]] = collections.defaultdict(list)
        for entry in store.snapshot():
            hours[entry["chunk_time"] // 1000 // HOUR_US * HOUR_US].append(entry)
        closes_before = now_us - int(self.config.compact_grace_s * 1e6) - HOUR_US
        return [(hour, entries) for hour, entries in sorted(hours.items())
                if hour <= closes_before and (len(entries) > 1 or entry_kind(entries[0]) is not COMPACTED)]

    def closed_folders(self, store: TypeStore, now_us: int) -> list[tuple[int, list[dict]]]:
        """(folder start, files) of each 10-minute folder with a raw file, of an hour not yet closed for
        compaction, that ended a grace period ago and is not one file yet.  Late packets in a closed hour
        go to its compaction instead, which sorts them in."""
        grace_us = int(self.config.compact_grace_s * 1e6)
        folders: dict[int, list[dict]] = collections.defaultdict(list)
        for entry in store.snapshot():
            folders[entry["chunk_time"] // 1000 // FOLDER_SPAN_US * FOLDER_SPAN_US].append(entry)
        return [(start, entries) for start, entries in sorted(folders.items())
                if start + FOLDER_SPAN_US <= now_us - grace_us < start // HOUR_US * HOUR_US + HOUR_US
                and len(entries) > 1 and any(entry_kind(entry) is RAW for entry in entries)]

    def compact(self, store: TypeStore, start_us: int, inputs: list[dict], hour: bool) -> None:
        """Merge `inputs` into one compacted file: an hour's, sorted by time, or a 10-minute folder's."""
        started = time.perf_counter()
        key = self.storage.new_key(store.proto_type, start_us, COMPACTED if hour else FOLDER_MERGED)
        temp = store.file_store.spool_path(key)
        copies_dir = os.path.join(self.temp_dir, "inputs")     # an object store's inputs, copied here
        what = "hour" if hour else "10 minutes"
        log.info("compacting %d files (%d rows) of %s for the %s of %s", len(inputs),
                 sum(entry["row_count"] for entry in inputs), type_name(store.proto_type), what, format_time(start_us))
        try:
            paths = [store.file_store.local_path(entry["path"], copies_dir) for entry in inputs]
            schema = store.schema.with_metadata({INPUTS_KEY: json.dumps(merged_sources(inputs, paths)).encode()})
            self._merge_in_a_process(temp, schema, paths, hour)
            output = store.add_merged(temp, key, start_us, inputs, store)
        except BaseException:
            remove_file(temp)
            if not self.stopping.is_set():
                set_aside_unreadable(store, inputs, self.counters)
            raise
        finally:
            shutil.rmtree(copies_dir, ignore_errors=True)
        elapsed = time.perf_counter() - started
        in_bytes = sum(entry["size_bytes"] for entry in inputs)
        self.counters.add("compactions_total", type=type_label(store.proto_type))
        self.counters.add("compacted_rows_total", output["row_count"])
        self.counters.add("compaction_seconds_total", elapsed)
        log.info("compacted %d files (%d bytes) of %s into %s: %d rows, %d bytes, %.2f s", len(inputs),
                 in_bytes, type_name(store.proto_type), output["path"], output["row_count"], output["size_bytes"],
                 elapsed)

    def _merge_in_a_process(self, path: str, schema: pa.Schema, files: list[str], by_time: bool) -> None:
        process = PROCESSES.Process(target=merge_files, name="hepop-compaction", daemon=True, args=(
            path, schema, files, self.config.compact_memory_mb, self.temp_dir, os.getpid(), by_time))
        with self._merging_lock:
            if self.stopping.is_set():
                raise InterruptedError("compaction stopped by shutdown")
            process.start()
            self.merging = process
        try:
            process.join()
        finally:
            with self._merging_lock:
                self.merging = None
        if self.stopping.is_set():
            raise InterruptedError("compaction stopped by shutdown")
        if process.exitcode != 0:
            raise RuntimeError(f"the compaction process failed (exit code {process.exitcode})")

    # -- retention and the disk guard ------------------------------------------------------------------

    def expire(self, store: TypeStore, now_us: int) -> None:
        """Delete the files whose newest row is older than the type's retention."""
        kept_as = SIP_TYPE if store.proto_type == CALLS_TYPE else store.proto_type     # calls: as their messages
        keep_us = self.retention_us.get(kept_as, int(self.config.retention * 1e6))
        cutoff_ns = (now_us - keep_us) * 1000
        self.delete(store, [e for e in store.snapshot() if e["max_time"] < cutoff_ns], "retention")

    def guard_disk(self, now_us: int) -> None:
        """While this writer's files (on this disk and in the bucket) take more than MAX_DISK_BYTES, or
        the filesystem is fuller than MAX_DISK_PERCENT, delete the oldest hour of every type, of all the
        stores or of this disk's only; never this hour.  With only this hour left and the limit still
        passed, the disk is full (DiskSignals.full) until there is room."""
        full = self._delete_oldest_hours(self.storage.stores(), self.files_over_limit, now_us)
        full = self._delete_oldest_hours(list(self.storage.types.values()), self.disk_over_limit, now_us) or full
        signal_full = self.storage.disk.full
        if full and not signal_full.is_set():
            signal_full.set()
            log.error("disk over its limit (MAX_DISK_PERCENT / MAX_DISK_BYTES) with only this hour left: what "
                      "arrives is dropped (hep_dropped_total{reason=\"disk_full\"}) until there is room")
        elif not full and signal_full.is_set():
            signal_full.clear()
            log.info("disk back under its limit: writing again")

    def _delete_oldest_hours(self, stores: list[TypeStore], over_limit: Callable[[], bool], now_us: int) -> bool:
        """Whether the limit is still passed with only this hour left."""
        current_hour_ns = now_us // HOUR_US * HOUR_US * 1000
        while over_limit() and not self.stopping.is_set():
            entries = [(store, e) for store in stores for e in store.snapshot()]
            hours = sorted({e["chunk_time"] // 1000 // HOUR_US for _, e in entries
                            if e["chunk_time"] < current_hour_ns})
            if not hours:
                return True
            for store in stores:
                self.delete(store, [e for s, e in entries if s is store and e["chunk_time"] // 1000 // HOUR_US
                                    == hours[0]], "disk_full")

    def files_over_limit(self) -> bool:
        """Whether this writer's files take more than MAX_DISK_BYTES."""
        return bool(self.config.max_disk_bytes) and sum(
            e["size_bytes"] for store in self.storage.stores() for e in store.snapshot()) > self.config.max_disk_bytes

    def disk_over_limit(self) -> bool:
        """Whether the filesystem is fuller than MAX_DISK_PERCENT.  What goes away by itself is not
        counted: DuckDB's spill (bounded by QUERY_SPILL_BYTES and the compaction's own bound), copies and
        objects on their way to or from the bucket (an hour's, a folder's), and files deleted as soon as
        the query reading them ends; deleting data would not make room for those."""
        if not self.config.max_disk_percent:
            return False
        stat = os.statvfs(self.config.parquet_dir)
        transient = self.storage.leases.doomed_bytes(self.storage.file_store) + sum(
            folder_size_bytes(path) for path in self.storage.layout.transient_dirs(self.config.writer_id))
        used_bytes = (stat.f_blocks - stat.f_bavail) * stat.f_frsize - transient
        return 100.0 * used_bytes / (stat.f_blocks * stat.f_frsize) > self.config.max_disk_percent

    def delete(self, store: TypeStore, entries: list[dict], why: str) -> None:
        if not entries:
            return
        store.delete(entries)
        rows = sum(entry["row_count"] for entry in entries)
        self.counters.add("deleted_files_total", len(entries), why=why, type=type_label(store.proto_type))
        self.counters.add("deleted_rows_total", rows, why=why, type=type_label(store.proto_type))
        log.info("deleted %d files (%d rows) of %s: %s", len(entries), rows, type_name(store.proto_type), why)


# ---------------------------------------------------------------------------------------------------------
# Upload: with S3_URL, each closed 10-minute folder leaves this disk for the bucket as one object.
# ---------------------------------------------------------------------------------------------------------

class Uploader(threading.Thread):
    """Every UPLOAD_POLL_S, each 10-minute folder of this disk that closed UPLOAD_DELAY_S ago is merged
    (merge_folder, its footer naming its inputs) into one object in the bucket, under the same key as a
    raw file of that folder would have: the bucket's metadata.json of the type lists it (one PUT), and
    the raw files are then unlisted and deleted here (TypeStore.add_merged).  Late packets make a new raw
    file in a folder already uploaded: it goes up as another object.

    When the bucket fails, capture goes on to this disk: the pass stops at the first error, which is
    counted and shown by /health, and the next one is tried after a delay that doubles up to
    MAX_BACKOFF_S; the backlog (folders waiting) drains when the bucket is back.  The disk guard still
    protects the box meanwhile."""

    UPLOAD_POLL_S = 5.0
    MAX_BACKOFF_S = 60.0
    STOP_WAIT_S = 5.0               # an upload under way at a stop is left: it starts over at the next start

    def __init__(self, config: Config, storage: Storage, counters: Counters):
        super().__init__(name="hepop-uploader", daemon=True)
        self.storage = storage
        self.counters = counters
        self.delay_us = int(config.upload_delay_s * 1e6)
        self.stopping = threading.Event()
        self.failing: Optional[str] = None
        # The key a folder went up under when its listing failed: the next try writes the same key, so
        # that no object is left unlisted beside a listed one of the same rows (a restart would adopt it).
        self._keys: dict[tuple[int, int], str] = {}
        self.spool_dir = storage.layout.upload_spool_dir(config.writer_id)
        shutil.rmtree(self.spool_dir, ignore_errors=True)

    def run(self) -> None:
        lower_priority(COMPACTION_NICE)
        while not self.storage.records_checked.wait(self.UPLOAD_POLL_S):    # CallRecordsCheck first
            if self.stopping.is_set():
                return
        wait_s = self.UPLOAD_POLL_S
        while not self.stopping.wait(wait_s):
            try:
                self.run_once()
            except Exception as exc:
                if self.stopping.is_set():
                    return
                self.counters.add("upload_errors_total")
                wait_s = min(self.MAX_BACKOFF_S, max(2 * wait_s, self.UPLOAD_POLL_S))
                self.failing = f"uploads to the bucket fail: {exc}"
                log.error("%s; %d folders wait, next try in %.0f s", self.failing, self.backlog(), wait_s)
            else:
                if self.failing:
                    log.info("uploads to the bucket work again")
                self.failing, wait_s = None, self.UPLOAD_POLL_S

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(self.STOP_WAIT_S)

    def closed_folders(self, store: TypeStore, now_us: Optional[int] = None) -> dict[int, list[dict]]:
        """The files of each folder that closed UPLOAD_DELAY_S ago, by the folder's start in us."""
        closes_before_us = (now_us or time.time_ns() // 1000) - self.delay_us - FOLDER_SPAN_US
        folders: dict[int, list[dict]] = collections.defaultdict(list)
        for entry in store.snapshot():
            if entry["chunk_time"] // 1000 <= closes_before_us:
                folders[entry["chunk_time"] // 1000].append(entry)
        return dict(sorted(folders.items()))

    def backlog(self) -> int:
        """Folders waiting for their upload."""
        return sum(len(self.closed_folders(store)) for store in list(self.storage.types.values()))

    def run_once(self, now_us: Optional[int] = None) -> None:
        for store in list(self.storage.types.values()):
            for folder_start_us, inputs in self.closed_folders(store, now_us).items():
                if self.stopping.is_set():
                    return
                self.upload(store, folder_start_us, inputs)

    def upload(self, store: TypeStore, folder_start_us: int, inputs: list[dict]) -> None:
        started = time.perf_counter()
        uploaded = self.storage.uploaded_store(store.proto_type)
        folder = (store.proto_type, folder_start_us)
        if folder not in self._keys:            # one numbering for the disk and the bucket
            self._keys[folder] = self.storage.new_key(store.proto_type, folder_start_us, RAW)
        key = self._keys[folder]
        spool_path = uploaded.file_store.spool_path(key)
        schema = store.schema.with_metadata({INPUTS_KEY: json.dumps([entry["path"] for entry in inputs]).encode()})
        try:
            try:
                merge_folder([store.path(entry) for entry in inputs], schema, spool_path)
            except Exception:
                set_aside_unreadable(store, inputs, self.counters)     # a damaged file: the rest goes next time
                raise
            output = uploaded.add_merged(spool_path, key, folder_start_us, inputs, store)
        finally:
            remove_file(spool_path)
        del self._keys[folder]
        self.counters.add("uploaded_objects_total", type=type_label(store.proto_type))
        self.counters.add("uploaded_bytes_total", output["size_bytes"])
        self.counters.add("uploaded_call_records_total" if store.proto_type == CALLS_TYPE else "uploaded_rows_total",
                          output["row_count"])
        log.info("uploaded %d files of %s (%d rows) as %s: %d bytes, %.2f s", len(inputs), type_name(store.proto_type),
                 output["row_count"], output["path"], output["size_bytes"], time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------------------
# Query: SQL over the stored files.  hep_<type> names become views over the files that metadata.json
# lists (every writer under PARQUET_DIR, or in the bucket), pruned to the query's time range, in a DuckDB
# sandbox.
# ---------------------------------------------------------------------------------------------------------

class QueryError(Exception):
    """A query refused or failed; `status` is the HTTP status to answer with, `unknown_table` the table it
    named that is not there (the capture process, which knows the tables, names them in the answer)."""

    def __init__(self, message: str, status: int = 400, unknown_table: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.unknown_table = unknown_table


DEFAULT_WINDOW_US = 600 * 1_000_000          # no time condition: the last 10 minutes
# A plain top-N (plain_top_n) is tried over the newest minute, then 8, 64 and 512 minutes, then the whole
# time window; an answer of up to NARROWED_MAX_ROWS rows is kept in memory while the range is checked
# (rows of HEP's largest payloads, 64 KB, make that 64 MB at most, inside QUERY_MEMORY_MB's default).  A
# first range of 7.5 s was tried for the call list: 469-501 ms against 426-431 at 2,000 messages/s
# (bench_hepop.py --busy), no better.
NARROWED_SPANS_US = tuple(60 * 8 ** power * 1_000_000 for power in range(4))
NARROWED_MAX_ROWS = 1_000
TIME_COLUMNS = ("time", "timestamp")
RCINFO_SQL = ("json_object('protocolFamily', ip_family, 'protocol', protocol, 'srcIp', src_ip, 'dstIp', dst_ip, "
              "'srcPort', src_port, 'dstPort', dst_port, 'timeSeconds', epoch_us(time) // 1000000, "
              "'timeUseconds', epoch_us(time) % 1000000, 'payloadType', proto_type, 'captureId', capture_id, "
              "'hepNodeName', node_name, 'correlation_id', correlation_id, 'vlan', vlan)")


# The one definition of a call, shared by hepop's page, HOMER's search and users' SQL: the `calls` view,
# one row per Call-ID of the call records (call_records) in the query's window, merged.  `time` is its
# first message (so a query's time condition picks calls by their start, and the window reads their
# files); `method` is its first request's.  `status` is the first 2xx to an INVITE, otherwise the last
# final answer to the request that opened the dialog (BYE, ACK, CANCEL, PRACK, UPDATE and INFO answers do
# not count), NULL when none came.  `class` names it (CALL_CLASSES), or says an INVITE's call is still
# `ringing` (no final answer yet) or `up` (answered, no BYE yet); NULL for another dialog with no answer.
# `pdd_ms` is post-dial delay, the first INVITE to the first 18x or final answer to it; `duration_s` is
# the answer to the first BYE (or the last message).
# The parties and addresses are the first request's; `reason` the first Reason header of a BYE, CANCEL or
# failure, `q850_cause` its Q.850 cause; `node` the capture node of the first message.
# ASR is then `avg((status BETWEEN 200 AND 299)::INT)` and ACD `avg(duration_s)`, over any GROUP BY.
# A payload that is not valid UTF-8 is stored once, as its bytes in payload_raw; queries see them as text
# too, in DuckDB's escapes (\xFF) for what is not ASCII.
PAYLOAD_SQL = "coalesce(payload, CAST(payload_raw AS VARCHAR))"
CALLS_VIEW = "calls"
CALL_RECORDS_VIEW = "call_records"      # the records the `calls` view merges: no name a query may use
# A plain top-N of calls over the newest minutes (QueryRun._calls_begun_since): the records before that
# range, and the Call-IDs of calls found there, which began earlier and are left out.
EARLIER_RECORDS_VIEW = "call_records_earlier"
CALLS_LEFT_OUT = "calls_left_out"
ALL_RECORDS_VIEW = "call_records_all"     # the window's records, before a call_picking_condition picks
# The method in CSeq, on responses too ("how many 486 to INVITE"): a column of hep_1's view, not stored.
CSEQ_METHOD_SQL = "upper(split_part(cseq, ' ', 2))"
CALL_CLASS_SQL = ("CASE WHEN first_request.method IS DISTINCT FROM 'INVITE' AND status IS NULL THEN NULL "
                  "WHEN status IS NULL THEN 'ringing' WHEN status BETWEEN 200 AND 299 AND bye_time IS NULL "
                  "AND first_request.method = 'INVITE' THEN 'up' " + " ".join(
                      f"WHEN status BETWEEN {codes.start} AND {codes.stop - 1} THEN '{name}'" if isinstance(codes, range)
                      else f"WHEN status IN ({', '.join(map(str, codes))}) THEN '{name}'"
                      for name, codes in CALL_CLASSES) + " ELSE 'failed' END")
CALLS_SQL = f"""
WITH per_call AS (
    SELECT call_id, min(time) AS time, max(last_time) AS last_time, CAST(sum(messages) AS BIGINT) AS messages,
           arg_min({{'method': method, 'from_user': from_user, 'to_user': to_user, 'ruri_user': ruri_user,
                    'user_agent': user_agent, 'src_ip': src_ip, 'src_port': src_port, 'dst_ip': dst_ip,
                    'dst_port': dst_port}}, first_request_time) FILTER (WHERE first_request_time IS NOT NULL)
               AS first_request,
           min(invite_time) AS invite_time, min(progress_time) AS progress_time, min(answer_time) AS answer_time,
           arg_min(answer_status, answer_time) FILTER (WHERE answer_time IS NOT NULL) AS answer_status,
           arg_max(final_status, final_time) FILTER (WHERE final_time IS NOT NULL) AS last_final_status,
           min(bye_time) AS bye_time, arg_min(reason, reason_time) FILTER (WHERE reason_time IS NOT NULL) AS reason,
           arg_min(correlation_id, correlation_time) FILTER (WHERE correlation_time IS NOT NULL) AS correlation_id,
           arg_min(node, time) AS node
    FROM {CALL_RECORDS_VIEW} WHERE call_id IS NOT NULL GROUP BY call_id),
merged AS (
    SELECT *, coalesce(answer_status, last_final_status) AS status FROM per_call)
SELECT call_id, time, last_time, answer_time, first_request.method AS method, status,
       date_diff('millisecond', invite_time, progress_time) AS pdd_ms,
       date_diff('millisecond', answer_time, coalesce(bye_time, last_time)) / 1000.0 AS duration_s,
       first_request.from_user AS from_user, first_request.to_user AS to_user,
       first_request.ruri_user AS ruri_user, first_request.user_agent AS user_agent,
       first_request.src_ip AS src_ip, first_request.src_port AS src_port, first_request.dst_ip AS dst_ip,
       first_request.dst_port AS dst_port, messages, {CALL_CLASS_SQL} AS class, reason,
       CAST(nullif(regexp_extract(reason, '(?i)^Q[.]850[^0-9].*cause=([0-9]{{1,3}})', 1), '') AS INTEGER)
           AS q850_cause,
       correlation_id, node
FROM merged"""


class TimeWindow(NamedTuple):
    low_us: Optional[int]        # None: unbounded
    high_us: Optional[int]
    default: bool                # the query constrains time nowhere: the last 10 minutes
    unread: bool = False         # the query names time in a condition that could not be read as a range
    lookup: Optional[str] = None     # no time named, and every row pinned by this column: all retention

    def overlaps(self, entry: dict) -> bool:
        return ((self.low_us is None or entry["max_time"] >= self.low_us * 1000) and
                (self.high_us is None or entry["min_time"] <= self.high_us * 1000))

    def header(self) -> str:
        show = lambda us: "" if us is None else format_time(us)
        note = (" (default: last 10 minutes)" if self.default else
                " (all files: the condition on time is not one the pruning reads)" if self.unread else
                f" (all retention, newest files first: a lookup by {self.lookup})" if self.lookup else "")
        return f"{show(self.low_us)}/{show(self.high_us)}{note}"


class QueryEngine:
    """Checks and runs read-only SQL statements over the stored files; it lives in the query process.

    The sandbox: DuckDB with external access off except PARQUET_DIR (allowed_directories), its
    configuration locked, memory and threads capped; one statement, and only a query (SELECT, WITH,
    VALUES, FROM, DESCRIBE, SUMMARIZE, EXPLAIN of a query) that reads hepop's tables and no file
    (refuse_sources); QUERY_TIMEOUT_S; QUERY_MAX_ROWS; QUERY_THREADS.  Rows still in memory are not visible: they are at most one flush interval behind.
    """

    def __init__(self, config: Config):
        self.root = config.parquet_dir
        spill_dir = TreeLayout(config.parquet_dir).query_spill_dir(config.writer_id)
        shutil.rmtree(spill_dir, ignore_errors=True)
        # Spilling goes to the writer's own bounded folder, which the disk guard leaves out of its count:
        # DuckDB's default, <cwd>/.tmp, was the data directory under the unit, and a large query there
        # made the guard delete data.  GLOBAL: every request's cursor gets these, UTC above all.
        # Half of QUERY_MEMORY_MB for DuckDB, half for what results become in Arrow and as text.
        self.db = duckdb.connect(config={"memory_limit": f"{config.query_memory_mb // 2}MB",
                                         "threads": config.query_threads, "temp_directory": spill_dir,
                                         "max_temp_directory_size": f"{config.query_spill_bytes}B"})
        self.db.execute("SET GLOBAL TimeZone = 'UTC'")
        self.db.execute("SET enable_progress_bar = false")
        self.db.execute("SET allowed_directories = $dirs", {"dirs": [self.root.rstrip("/") + "/"]})
        # A file's footer and bloom filters are parsed once, not by every query: files never change under
        # a name.  The cache is DuckDB's object cache, inside memory_limit and evicted under pressure.
        # Over a compacted hour of 72 M rows (3,600 row groups, a 13 MB footer), one thread: a Call-ID
        # 303 -> 110 ms, a From user that is not there 211 -> 6 ms.
        self.db.execute("SET parquet_metadata_cache = true")
        self.db.execute("SET enable_external_access = false")
        self.db.execute("SET lock_configuration = true")
        # DuckDB reads the bucket's objects through a pyarrow dataset (its httpfs extension is not there
        # to load, nor could the sandbox allow it): only the objects the capture process names.
        self.bucket_filesystem = s3_filesystem(config.s3_endpoint, config.s3_region) if config.s3_url else None
        self.bucket_path = config.s3_url[len("s3://"):] + "/"
        self.aggregates = frozenset(name for (name,) in self.db.execute(
            "SELECT DISTINCT function_name FROM duckdb_functions() WHERE function_type = 'aggregate'").fetchall())

    # -- what may run ----------------------------------------------------------------------------------

    @staticmethod
    def check_statement(sql: str) -> None:
        """One statement, and only a query; everything else is refused before it runs."""
        try:
            statements = duckdb.extract_statements(sql)
        except duckdb.Error as exc:
            raise QueryError(str(exc)) from None
        if len(statements) != 1:
            raise QueryError(f"exactly one statement is allowed, not {len(statements)}")
        statement = statements[0]
        kind = statement.type
        if kind == duckdb.StatementType.EXPLAIN:
            inner = EXPLAIN_PREFIX.sub("", statement.query)
            kinds = [s.type for s in duckdb.extract_statements(inner)]
            if kinds != [duckdb.StatementType.SELECT]:
                raise QueryError("only EXPLAIN of a query is allowed")
        elif kind != duckdb.StatementType.SELECT:
            raise QueryError(f"only queries are allowed (SELECT, WITH, VALUES, DESCRIBE, SUMMARIZE, EXPLAIN), "
                             f"not {kind.name}")

    # -- the time window -------------------------------------------------------------------------------

    @staticmethod
    def statement_tree(cursor, sql: str) -> dict:
        """The statement as DuckDB parses it (json_serialize_sql), with EXPLAIN's query for EXPLAIN;
        QueryError for one that calls a function that is refused here."""
        sql = EXPLAIN_PREFIX.sub("", sql)           # EXPLAIN reads what its query would
        tree = json.loads(cursor.execute("SELECT json_serialize_sql($sql)", {"sql": sql}).fetchall()[0][0])
        if tree.get("error"):
            raise QueryError(tree.get("error_message", "cannot parse the query"))
        refuse_sources(tree)
        return tree

    def time_window(self, cursor, tree: dict, now_us: int) -> TimeWindow:
        """The time range the query (its statement_tree) asks for, from its WHERE clauses; without one,
        all retention for a lookup (looked_up), else the last 10 minutes.

        A comparison of `time` or `timestamp` with a constant expression bounds the range; AND narrows,
        OR widens (an OR branch without a bound opens the range), and a comparison with anything but a
        constant leaves it open: the query then reads all the data, as it asked.  The range is a superset of
        what the query selects: DuckDB still applies the query's own conditions.
        """
        wheres = find_where_clauses(tree)
        ranges = [self._range(where, cursor) for where in wheres]
        ranges = [r for r in ranges if r is not None]
        if not ranges:
            if any(names_time(where) for where in wheres):
                return TimeWindow(None, None, False, unread=True)
            top_where = (tree.get("statements") or [{}])[0].get("node", {}).get("where_clause")
            pinned = looked_up(top_where) if isinstance(top_where, dict) else None
            if pinned:
                return TimeWindow(None, None, False, lookup=pinned)
            return TimeWindow(now_us - DEFAULT_WINDOW_US, None, True)
        low = None if any(r[0] is None for r in ranges) else min(r[0] for r in ranges)
        high = None if any(r[1] is None for r in ranges) else max(r[1] for r in ranges)
        return TimeWindow(low, high, False)

    def _range(self, node: dict, cursor) -> Optional[tuple]:
        """(low, high) in us (None: open) that `node` confines time to; None if it does not."""
        kind = node.get("type")
        if kind == "CONJUNCTION_AND":
            found = [r for r in (self._range(child, cursor) for child in node["children"]) if r]
            if not found:
                return None
            lows = [r[0] for r in found if r[0] is not None]
            highs = [r[1] for r in found if r[1] is not None]
            return (max(lows) if lows else None, min(highs) if highs else None)
        if kind == "CONJUNCTION_OR":
            found = [self._range(child, cursor) for child in node["children"]]
            if all(r is None for r in found):
                return None
            if any(r is None for r in found):
                return (None, None)         # a branch without a bound: all time
            return (None if any(r[0] is None for r in found) else min(r[0] for r in found),
                    None if any(r[1] is None for r in found) else max(r[1] for r in found))
        if kind == "COMPARE_BETWEEN" and is_time_column(node.get("input")):
            return (self._constant(node["lower"], cursor), self._constant(node["upper"], cursor))
        if node.get("class") == "COMPARISON":
            left, right = node["left"], node["right"]
            if is_time_column(right):
                left, right = right, left
                kind = FLIPPED.get(kind, kind)
            if not is_time_column(left):
                return None
            value = self._constant(right, cursor)
            if value is None:
                return (None, None)         # compared with something not constant: all time
            if kind in ("COMPARE_GREATERTHAN", "COMPARE_GREATERTHANOREQUALTO"):
                return (value, None)
            if kind in ("COMPARE_LESSTHAN", "COMPARE_LESSTHANOREQUALTO"):
                return (None, value)
            if kind == "COMPARE_EQUAL":
                return (value, value)
            return (None, None)
        return None

    @staticmethod
    def _constant(node: dict, cursor) -> Optional[int]:
        """The value in us of an expression without columns or subqueries (a literal, a cast, now() -
        INTERVAL ...), turned back into SQL and evaluated by DuckDB; None for anything else."""
        if not is_constant(node):
            return None
        statement = json.loads(cursor.execute("SELECT json_serialize_sql('SELECT NULL')").fetchall()[0][0])
        statement["statements"][0]["node"]["select_list"] = [node]
        try:
            select = cursor.execute("SELECT json_deserialize_sql($tree)", {"tree": json.dumps(statement)}).fetchall()[0][0]
            return cursor.execute(f"SELECT epoch_us(CAST(v AS TIMESTAMPTZ)) FROM ({select}) AS t(v)").fetchall()[0][0]
        except duckdb.Error:
            return None

    # -- tables ----------------------------------------------------------------------------------------

    @staticmethod
    def types_named(sql: str) -> list[int]:
        """The types whose hep_<type> table the query names (`calls` is made of the call records)."""
        types = {int(n) for n in re.findall(r"\bhep_(\d+)\b", sql, re.IGNORECASE) if int(n) <= 255}
        if QueryEngine.names_calls(sql):
            types.add(CALLS_TYPE)
        return sorted(types)

    @staticmethod
    def names_calls(sql: str) -> bool:
        """Whether the query names the `calls` view."""
        return bool(re.search(rf"\b{CALLS_VIEW}\b", sql, re.IGNORECASE))

    def create_views(self, cursor, files_by_type: dict[int, list[str]], window: TimeWindow,
                     newest_first: bool = False, calls: bool = False, since_us: Optional[int] = None,
                     picking: Optional[str] = None) -> None:
        """A temp view per hep_<type> over the files it is given (FileCatalog.files: oldest first, or the
        other way round for a query that reads_newest_first), and `calls` over SIP's if asked: binding
        it took a third of a HOMER search that found nothing (about 15 ms).  `since_us` narrows the views
        to the rows from then on (QueryRun's plain top-N); `picking` (picking_query) names the calls whose
        records `calls` merges; views made before are replaced."""
        for proto_type, files in files_by_type.items():
            if newest_first:
                files = files[::-1]
            source = self._source(cursor, proto_type, files)
            lows = [low for low in (window.low_us if window.default else None, since_us) if low is not None]
            condition = f" WHERE time >= make_timestamp({max(lows)})" if lows else ""
            if proto_type == CALLS_TYPE:
                self._call_records_views(cursor, source, condition, since_us, picking)
                continue
            derived = f", {CSEQ_METHOD_SQL} AS cseq_method" if proto_type == SIP_TYPE else ""
            cursor.execute(f'CREATE OR REPLACE TEMP VIEW hep_{proto_type} AS SELECT * REPLACE ({PAYLOAD_SQL} AS '
                           f'payload), time AS "timestamp", {RCINFO_SQL} AS rcinfo{derived} FROM {source}{condition}')
        if calls and CALLS_TYPE in files_by_type:
            cursor.execute(f"CREATE TEMP VIEW {CALLS_VIEW} AS {CALLS_SQL}")

    @staticmethod
    def _call_records_views(cursor, source: str, condition: str, since_us: Optional[int],
                            picking: Optional[str]) -> None:
        """The records `calls` merges: those of the calls that the `picking` query's Call-IDs name
        (call_picking_condition), and narrowed to `since_us`, those of the calls not left out, with the
        records before `since_us` that show which calls began earlier."""
        cursor.execute(f"CREATE OR REPLACE TEMP VIEW {ALL_RECORDS_VIEW} AS SELECT * FROM {source}{condition}")
        conditions = [f"call_id IN ({picking})"] if picking else []
        if since_us is not None:
            cursor.register(CALLS_LEFT_OUT, pa.table({"call_id": pa.array([], pa.string())}))
            conditions.append(f"call_id NOT IN (SELECT call_id FROM {CALLS_LEFT_OUT})")
            cursor.execute(f"CREATE OR REPLACE TEMP VIEW {EARLIER_RECORDS_VIEW} AS SELECT call_id FROM {source} "
                           f"WHERE time < make_timestamp({since_us})")
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        cursor.execute(f"CREATE OR REPLACE TEMP VIEW {CALL_RECORDS_VIEW} AS SELECT * FROM {ALL_RECORDS_VIEW}{where}")

    @staticmethod
    def picking_query(cursor, condition: Optional[dict]) -> Optional[str]:
        """SQL for the Call-IDs of the records that a call_picking_condition holds for; None without one."""
        if condition is None:
            return None
        statement = json.loads(cursor.execute(f"SELECT json_serialize_sql('SELECT DISTINCT call_id FROM "
                                              f"{ALL_RECORDS_VIEW} WHERE true')").fetchall()[0][0])
        statement["statements"][0]["node"]["where_clause"] = condition
        return cursor.execute("SELECT json_deserialize_sql($tree)", {"tree": json.dumps(statement)}).fetchall()[0][0]

    def _source(self, cursor, proto_type: int, files: list[str]) -> str:
        """What a hep_<type> view reads: read_parquet over the files on this disk, a dataset over the
        bucket's objects, or both."""
        local = [path for path in files if not path.startswith("s3://")]
        objects = [path[len("s3://"):] for path in files if path.startswith("s3://")]
        sources = []
        if local:
            sources.append("read_parquet([" + ", ".join(sql_string(path) for path in local) + "])")
        if objects:
            if self.bucket_filesystem is None or not all(path.startswith(self.bucket_path) for path in objects):
                raise QueryError("objects outside S3_URL were named", 500)
            name = f"hep_{proto_type}_bucket"
            cursor.register(name, ds.FileSystemDataset.from_paths(      # no request per object to list it
                objects, schema=table_schema(proto_type), format=ds.ParquetFileFormat(),
                filesystem=self.bucket_filesystem))
            sources.append(name)
        if not sources:
            name = f"hep_{proto_type}_empty"
            cursor.register(name, table_schema(proto_type).empty_table())
            return name
        if len(sources) == 1:
            return sources[0]
        return "(" + " UNION ALL BY NAME ".join(f"SELECT * FROM {source}" for source in sources) + ")"


FLIPPED = {"COMPARE_GREATERTHAN": "COMPARE_LESSTHAN", "COMPARE_LESSTHAN": "COMPARE_GREATERTHAN",
           "COMPARE_GREATERTHANOREQUALTO": "COMPARE_LESSTHANOREQUALTO",
           "COMPARE_LESSTHANOREQUALTO": "COMPARE_GREATERTHANOREQUALTO"}


EXPLAIN_PREFIX = re.compile(r"^\s*EXPLAIN\s+(ANALY[SZ]E\s+)?", re.IGNORECASE)


def tree_nodes(node) -> Iterable[dict]:
    """Every node of a serialized statement (json_serialize_sql), the outermost first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from tree_nodes(value)
    elif isinstance(node, list):
        for item in node:
            yield from tree_nodes(item)


def tree_has(node, found: Callable[[dict], bool]) -> bool:
    """Whether any node of a serialized statement is one that `found` says."""
    return any(found(each) for each in tree_nodes(node))


# What a query may read: the tables hepop makes for it (hep_<type>, `calls`) and its own CTEs, and the
# table functions that make rows from their arguments alone.  Every other table function is refused: those
# that read files (read_text, read_csv, read_json, read_blob, read_parquet, glob, parquet_metadata, ...)
# would reach what else lies under PARQUET_DIR (metadata.json, the lock, spill files), those that run SQL
# given as text (query, query_table, json_execute_serialized_sql) would run what this check never saw, and
# the rest show the server's settings and state.  So are names of other tables: a path in FROM is read as a
# file by DuckDB's replacement scan, and system views (pg_catalog.pg_settings) show the settings.
ALLOWED_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest", "json_each", "json_tree", "repeat",
                                     "repeat_row", "duckdb_functions", "duckdb_keywords", "duckdb_types",
                                     "pg_timezone_names", "icu_calendar_names"})
# Scalar functions that show the server's settings or environment.
REFUSED_FUNCTIONS = frozenset({"current_setting", "getenv", "getvariable"})
TABLE_NAME = re.compile(rf"hep_\d+|{CALLS_VIEW}", re.IGNORECASE)


def refuse_sources(tree: dict) -> None:
    """QueryError if a serialized statement reads anything but what a query may (ALLOWED_TABLE_FUNCTIONS,
    REFUSED_FUNCTIONS, TABLE_NAME and its own CTEs), anywhere in it."""
    nodes = list(tree_nodes(tree))
    cte_names = {str(entry.get("key", "")).lower() for node in nodes if isinstance(node.get("cte_map"), dict)
                 for entry in node["cte_map"].get("map", [])}
    for node in nodes:
        refuse_source(node, cte_names)


def refuse_source(node: dict, cte_names: set) -> None:
    """QueryError for a node of a statement that reads what a query may not."""
    kind = node.get("type")
    if kind == "TABLE_FUNCTION":
        name = str((node.get("function") or {}).get("function_name", "")).lower()
        if name not in ALLOWED_TABLE_FUNCTIONS:
            raise QueryError(f"{name}() is not available here: a query reads the tables hep_<type> and "
                             f"{CALLS_VIEW}, and makes rows with {', '.join(sorted(ALLOWED_TABLE_FUNCTIONS))}")
    elif kind == "BASE_TABLE":
        name = str(node.get("table_name", ""))
        qualified = node.get("schema_name") or node.get("catalog_name")
        if qualified or not (TABLE_NAME.fullmatch(name) or name.lower() in cte_names):
            raise QueryError(f"{name!r} is not a table here: a query reads hep_<type> (hep_1 is SIP, hep_5 "
                             f"RTCP, hep_100 logs, ...) and {CALLS_VIEW}", unknown_table=".".join(
                                 part for part in (qualified and node.get("catalog_name"), qualified and
                                                   node.get("schema_name"), name) if part))
    elif node.get("class") == "FUNCTION" and str(node.get("function_name", "")).lower() in REFUSED_FUNCTIONS:
        raise QueryError(f"{node['function_name']}() is not available here: it shows the server's settings")


def names_time(node) -> bool:
    """Whether an expression tree refers to the time column anywhere."""
    return tree_has(node, is_time_column)


def is_time_column(node) -> bool:
    return (isinstance(node, dict) and node.get("class") == "COLUMN_REF"
            and node["column_names"][-1].lower() in TIME_COLUMNS)


def is_constant(node) -> bool:
    """True for an expression tree with no column, subquery, star or parameter in it."""
    if isinstance(node, dict):
        if node.get("class") in ("COLUMN_REF", "SUBQUERY", "STAR", "PARAMETER", "LAMBDA"):
            return False
        return all(is_constant(value) for key, value in node.items() if key != "type_expr")
    if isinstance(node, list):
        return all(is_constant(item) for item in node)
    return True


# Columns a query looks a call, a correlation or a number up by.  One that pins every row with = or IN
# and names no time reads the whole retention, newest files first, pruned by their bloom filters and
# statistics: a Call-ID 10 minutes and 14 s old answered [] under the default window of 10 minutes.
LOOKUP_COLUMNS = ("call_id", "correlation_id", "from_user", "to_user", "ruri_user")


def looked_up(node: dict) -> Optional[str]:
    """The lookup column that a WHERE clause pins every row to, by = or IN of constants; None if none."""
    kind = node.get("type")
    if kind == "CONJUNCTION_AND":
        return next((column for column in map(looked_up, node["children"]) if column), None)
    if kind == "CONJUNCTION_OR":
        found = [looked_up(child) for child in node["children"]]
        return found[0] if all(found) else None
    pairs = []
    if kind == "COMPARE_EQUAL":
        pairs = [(node["left"], [node["right"]]), (node["right"], [node["left"]])]
    elif kind == "COMPARE_IN":
        pairs = [(node["children"][0], node["children"][1:])]
    for column, values in pairs:
        if column.get("class") == "COLUMN_REF" and column["column_names"][-1].lower() in LOOKUP_COLUMNS \
                and all(is_constant(value) for value in values):
            return column["column_names"][-1].lower()
    return None


# The columns of `calls` that are one record's own value (the first request's, the Call-ID, the first
# correlation id): a condition on them alone holds for a call only if it holds for one of its records.
CALL_PICKING_COLUMNS = frozenset({"call_id", "method", "from_user", "to_user", "ruri_user", "user_agent", "src_ip",
                                  "src_port", "dst_ip", "dst_port", "correlation_id"})


def call_picking_condition(tree: dict) -> Optional[dict]:
    """The part of a query's WHERE on `calls` (its top-level conditions ANDed) that only compares the
    CALL_PICKING_COLUMNS with constants and pins the calls by a lookup column (looked_up: a user, a
    Call-ID, a correlation id), as one condition; None when there is none.  Calls are then merged only
    from the records of the Call-IDs that some record matching it names: a number's calls over a day are
    found through the bloom filters of the users' and Call-IDs' columns, not by merging every call of the
    day first.  A condition that pins nothing (method = 'INVITE') would only add a pass over the records."""
    node = ((tree.get("statements") or [{}])[0].get("node")) or {}
    source = node.get("from_table") or {}
    where = node.get("where_clause")
    if source.get("type") != "BASE_TABLE" or str(source.get("table_name")).lower() != CALLS_VIEW or not where:
        return None
    conditions = where["children"] if where.get("type") == "CONJUNCTION_AND" else [where]

    def picks(condition: dict) -> bool:
        columns = [n for n in tree_nodes(condition) if n.get("class") == "COLUMN_REF"]
        return bool(columns) and all(len(n["column_names"]) == 1 and n["column_names"][0].lower() in
                                     CALL_PICKING_COLUMNS for n in columns) and not tree_has(condition, lambda n: n.get(
                                         "class") in ("SUBQUERY", "WINDOW", "AGGREGATE", "PARAMETER"))
    kept = [condition for condition in conditions if picks(condition) and looked_up(condition)]
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else {**where, "type": "CONJUNCTION_AND", "children": kept}


def reads_newest_first(node) -> Optional[bool]:
    """Whether the first ORDER BY of a statement tree that comes with a LIMIT (a top-N) begins with time
    descending (None: no such ORDER BY).  DuckDB's top-N over files listed the other way round keeps every
    row that comes better than the ones before: its memory grows with the files (the newest 100 INVITEs of
    a busy hour, 3,600 files, ran out of memory at QUERY_MEMORY_MB=512), where the right order lets it
    prune the rest."""
    if isinstance(node, dict):
        modifiers = node.get("modifiers")
        if isinstance(modifiers, list) and any(m.get("type") == "LIMIT_MODIFIER" for m in modifiers):
            orders = [o for m in modifiers if m.get("type") == "ORDER_MODIFIER" for o in m["orders"]]
            if orders and is_time_column(orders[0].get("expression")):
                return orders[0].get("type") == "DESCENDING"
        children = list(node.values())
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = reads_newest_first(child)
        if found is not None:
            return found
    return None


def constant_int(node: Optional[dict]) -> Optional[int]:
    """The value of a whole-number literal node, None for anything else."""
    try:
        return int(node["literal"]["text"]) if node.get("class") == "CONSTANT" else None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def plain_top_n(tree: dict, aggregates: frozenset) -> Optional[int]:
    """The LIMIT of a query that only filters one hep_<type> table (or `calls`: QueryRun._calls_begun_since
    keeps to the calls that began in the range), row by row, and orders it by time descending with a
    constant LIMIT (and OFFSET) of at most NARROWED_MAX_ROWS; None for any other.

    Such a query answers the same over any time range [t, now] that holds its LIMIT + OFFSET rows, and
    QueryRun tries the newest minutes first: a compacted hour's row groups go oldest first, so DuckDB's
    top-N over it kept every row better than the ones before and pruned nothing (the newest 100 INVITEs
    of a compacted hour at 20,000 messages/s: 4.5 s, or out of memory at QUERY_MEMORY_MB=512).  Anything
    that reads other rows than a row's own (an aggregate, a window, a subquery, a join, DISTINCT, GROUP
    BY, a CTE, a sample) or orders by another `time` than the column is not plain."""
    statements = tree.get("statements") or [{}]
    node = statements[0].get("node") or {}
    source = node.get("from_table") or {}
    if len(statements) != 1 or node.get("type") != "SELECT_NODE" or source.get("type") != "BASE_TABLE" \
            or not TABLE_NAME.fullmatch(str(source.get("table_name"))) \
            or node.get("group_expressions") or node.get("group_sets") or node.get("having") \
            or node.get("qualify") or node.get("sample") or (node.get("cte_map") or {}).get("map"):
        return None
    modifiers = node.get("modifiers") or []
    if [modifier.get("type") for modifier in modifiers] != ["ORDER_MODIFIER", "LIMIT_MODIFIER"]:
        return None
    first, limit = modifiers[0]["orders"][0], modifiers[1]
    if first.get("type") != "DESCENDING" or not is_time_column(first.get("expression")) \
            or any(str(item.get("alias", "")).lower() in TIME_COLUMNS and not is_time_column(item)
                   for item in node.get("select_list") or []):
        return None
    rows = constant_int(limit.get("limit"))
    offset = constant_int(limit.get("offset")) if limit.get("offset") else 0
    if rows is None or offset is None or not 0 < rows <= NARROWED_MAX_ROWS or offset < 0:
        return None
    if tree_has(node, lambda n: n.get("class") in ("WINDOW", "SUBQUERY") or (
            n.get("class") == "FUNCTION" and str(n.get("function_name", "")).lower() in aggregates)):
        return None
    return rows


def find_where_clauses(node) -> list[dict]:
    """Every WHERE clause of every SELECT in a serialized statement (CTEs and subqueries included)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "where_clause" and isinstance(value, dict):
                found.append(value)
            found += find_where_clauses(value)
    elif isinstance(node, list):
        for item in node:
            found += find_where_clauses(item)
    return found


def sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# -- results as JSON: exact, valid, and the same in JSON, NDJSON and CSV -----------------------------------

INT64_MAX = (1 << 63) - 1
INT32_MAX = (1 << 31) - 1
# The times that ISO 8601 text shows as they are: years 1 to 9999, as Python's datetime can.
SHOWN_US = (-62_135_596_800 * 1_000_000, 253_402_300_799_999_999)
US_PER_UNIT = {"s": 1_000_000, "ms": 1000, "us": 1}


def json_ready_column(column: pa.Array) -> list:
    """The values of one result column as JSON carries them exactly and validly: integers of any size
    as numbers, NaN and infinities as null, times as ISO 8601 UTC (a time past year 9999 or DuckDB's
    infinity as text that says so), intervals as ISO 8601 durations, binary as base64, nested values as
    JSON.  The common types are converted by Arrow over the column; only the rest value by value."""
    kind = column.type
    if pa.types.is_floating(kind):
        return pc.if_else(pc.is_finite(column), column, pa.scalar(None, kind)).to_pylist()
    if pa.types.is_timestamp(kind):
        return timestamp_texts(column)
    if pa.types.is_date32(kind):
        return date_texts(column)
    if pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_boolean(kind) or \
            pa.types.is_null(kind) or pa.types.is_large_string(kind):
        return column.to_pylist()
    try:
        return [json_ready(value) for value in column.to_pylist()]
    except (OverflowError, ValueError) as exc:
        raise QueryError(f"a value of type {kind} cannot be shown ({exc}): cast it to VARCHAR") from None


def timestamp_texts(column: pa.Array) -> list:
    unit = column.type.unit
    utc = column.cast(pa.timestamp(unit, "UTC"))
    texts = pc.strftime(utc, format="%Y-%m-%dT%H:%M:%SZ").to_pylist()
    if unit == "ns":                        # int64 nanoseconds reach 1677 to 2262 only: all shown
        return texts
    raw = utc.cast(pa.int64())
    low, high = (bound // US_PER_UNIT[unit] for bound in SHOWN_US)
    unshown = pc.invert(pc.and_(pc.greater_equal(raw, low), pc.less_equal(raw, high)))
    for index in pc.indices_nonzero(pc.fill_null(unshown, False)).to_pylist():
        value = raw[index].as_py()
        texts[index] = unshown_time(value, INT64_MAX, f"{value} {unit} since 1970-01-01")
    return texts


def date_texts(column: pa.Array) -> list:
    texts = column.cast(pa.string()).to_pylist()
    for index, text in enumerate(texts):
        if text is not None and text.startswith("<"):          # Arrow's "value out of range"
            days = column[index].cast(pa.int32()).as_py()
            texts[index] = unshown_time(days, INT32_MAX, f"{days} days since 1970-01-01")
    return texts


def unshown_time(raw: int, infinity: int, otherwise: str) -> str:
    return "infinity" if raw == infinity else "-infinity" if raw == -infinity else otherwise


def json_ready(value):
    """One value of a column that Arrow could not convert as a whole, for json.dumps."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return None
        if value == value.to_integral_value():
            return int(value)
        return float(value) if decimal.Decimal(repr(float(value))) == value else str(value)
    if isinstance(value, pa.MonthDayNano):
        return iso_duration(value.months, value.days, value.nanoseconds)
    if isinstance(value, datetime.timedelta):
        return iso_duration(0, 0, (value.days * 86_400_000_000 + value.seconds * 1_000_000 + value.microseconds) * 1000)
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return value.isoformat(timespec="microseconds") + "Z"
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return str(value)                       # UUIDs and whatever else has a text form


def iso_duration(months: int, days: int, nanoseconds: int) -> str:
    """An interval as an ISO 8601 duration: P1Y2M3DT4H5M6.5S; PT0S when empty."""
    years, months = divmod(months, 12) if months >= 0 else (-(-months // 12), -(-months % 12))
    sign = "-" if nanoseconds < 0 else ""
    seconds_ns = abs(nanoseconds)
    hours, seconds_ns = divmod(seconds_ns, 3_600_000_000_000)
    minutes, seconds_ns = divmod(seconds_ns, 60_000_000_000)
    seconds = f"{seconds_ns // 10**9}.{seconds_ns % 10**9:09d}".rstrip("0").rstrip(".")
    date = "".join(f"{n}{unit}" for n, unit in ((years, "Y"), (months, "M"), (days, "D")) if n)
    time_part = "".join(f"{sign}{n}{unit}" for n, unit in ((hours, "H"), (minutes, "M")) if n)
    if seconds != "0":
        time_part += f"{sign}{seconds}S"
    return "P" + date + ("T" + time_part if time_part else "") if date or time_part else "PT0S"


# -- results as JSON, NDJSON, CSV or Arrow, in pieces -------------------------------------------------

READ_AHEAD_BYTES = 8 << 20          # a result this small is sent knowing whether the row cap cut it
RESULT_PIECE_BYTES = 4 << 20        # rows are made text this many bytes at a time
MAX_RESULT_ROW_BYTES = 64 << 20     # a row larger is refused in the text formats


class ResultWriter:
    """Writes Arrow batches as JSON (an array of objects), NDJSON, CSV or an Arrow IPC stream.  The values
    are those of json_ready_column() in every text format; in CSV a nested value is its JSON text and
    rcinfo stays the JSON text it is, while JSON and NDJSON carry it as an object."""

    TYPES = {"json": "application/json", "ndjson": "application/x-ndjson", "csv": "text/csv; charset=utf-8",
             "arrow": "application/vnd.apache.arrow.stream"}

    def __init__(self, fmt: str, schema: pa.Schema, write: Callable[[bytes], None]):
        self.fmt = fmt
        self.write = write
        self.schema = schema
        self.rows = 0
        self.json_columns = {f.name for f in schema if f.name == "rcinfo" and pa.types.is_string(f.type)}
        self.ipc = None
        if fmt == "json":
            write(b"[")
        elif fmt == "csv":
            self._csv_rows([schema.names])
        elif fmt == "arrow":
            self.ipc = pa.ipc.new_stream(WriteAdapter(lambda data: self.write(data)), schema)

    def batch(self, batch: pa.RecordBatch) -> None:
        if self.fmt == "arrow":
            self.ipc.write_batch(batch)
            self.rows += len(batch)
            return
        for piece in result_pieces(batch):
            self._text(piece)

    def _text(self, batch: pa.RecordBatch) -> None:
        columns = [json_ready_column(column) for column in batch.columns]
        if self.fmt == "csv":
            columns = [[json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v for v in values]
                       for values in columns]
            self._csv_rows(zip(*columns))
        else:
            for index, name in enumerate(batch.schema.names):
                if name in self.json_columns:
                    columns[index] = [None if v is None else json.loads(v) for v in columns[index]]
            names = batch.schema.names
            separator = "\n" if self.fmt == "ndjson" else ",\n"
            text = separator.join(json.dumps(dict(zip(names, values)), ensure_ascii=False, allow_nan=False)
                                  for values in zip(*columns))
            if self.fmt == "json" and self.rows and len(batch):
                text = ",\n" + text
            elif self.fmt == "ndjson" and len(batch):
                text += "\n"
            self.write(text.encode())
        self.rows += len(batch)

    def _csv_rows(self, rows: Iterable) -> None:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows)
        self.write(out.getvalue().encode())

    def close(self) -> None:
        if self.fmt == "json":
            self.write(b"]\n")
        elif self.fmt == "arrow":
            self.ipc.close()


def result_pieces(batch: pa.RecordBatch) -> Iterable[pa.RecordBatch]:
    """A batch in slices of about RESULT_PIECE_BYTES (no copy), so that what Python makes of a result
    (objects, then text) stays a few times that whatever the rows hold; QueryError for a row over
    MAX_RESULT_ROW_BYTES.  Measured before: SELECT repeat('x', 300000000) took the process to 1.98 GiB."""
    rows = max(1, len(batch) * RESULT_PIECE_BYTES // max(1, batch.nbytes))
    for start in range(0, len(batch), rows):
        piece = batch.slice(start, rows)
        if len(piece) == 1 and piece.nbytes > MAX_RESULT_ROW_BYTES:        # nbytes: of the slice alone
            raise QueryError(f"a result row is over {MAX_RESULT_ROW_BYTES >> 20} MiB: select a part of it "
                             "(substr(payload, 1, 100000)) or use format=arrow")
        yield piece


class WriteAdapter:
    """The file-like face that pyarrow's IPC writer needs, over a write function."""

    def __init__(self, write: Callable[[bytes], None]):
        self._write = write
        self.closed = False

    def write(self, data) -> int:
        self._write(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


class ResultError(Exception):
    """DuckDB's error while a result's batches are read.  Its Arrow reader raises it as a plain OSError,
    which taken for a closed connection left the client waiting QUERY_TIMEOUT_S for the cut."""


class CappedBatches:
    """The batches of a reader until more than `cap` rows were read; `cut` says if that happened."""

    def __init__(self, reader, cap: int):
        self.reader = iter(reader)
        self.cap = cap
        self.rows = 0

    @property
    def cut(self) -> bool:
        return self.rows > self.cap

    def __iter__(self):
        return self

    def __next__(self) -> pa.RecordBatch:
        if self.cut:
            raise StopIteration
        try:
            batch = next(self.reader)
        except OSError as exc:
            raise ResultError(str(exc)) from None
        self.rows += len(batch)
        return batch


# -- the query process --------------------------------------------------------------------------------------
# Every query runs in one child process (serve_queries), which parses, executes and makes text of it; the
# capture process keeps only the catalog of files and the leases on them, and relays the bytes.  Each
# query is a conversation on a connection of its own (a socketpair whose other end is passed over the
# control socket):
#     capture process                             query process
#     QueryJob(sql, fmt, now_us)          ->
#                                         <-      QueryPlan(types, window), or QueryFailed
#     {type: [files]}, held until the end ->
#                                         <-      QueryStart, bytes..., QueryEnd; or QueryFailed
#     (closes the connection: at the end, or when its client goes away, which stops the query)

QUERY_GRACE_S = 10.0                # past QUERY_TIMEOUT_S, the capture process stops waiting for an answer
QUERY_DATA_BYTES = 1 << 20          # the largest piece of a result on the connection


class QueryJob(NamedTuple):
    sql: str
    fmt: str
    now_us: int                     # "now" for the time window: the moment the request came
    plan: Optional["QueryPlan"] = None      # hepop's own SQL: the tables and window, not read from the SQL
    params: Optional[dict] = None           # values for its $names


class QueryPlan(NamedTuple):
    types: list                     # the hep_<type> tables the query names
    window: TimeWindow


class QueryStart(NamedTuple):
    finished: bool                  # the whole result is in the bytes that follow: `truncated` is known
    truncated: bool
    read_since_us: Optional[int]    # a plain top-N found its answer in the window's rows from then on


class QueryEnd(NamedTuple):
    truncated: bool                 # QUERY_MAX_ROWS cut the result


class QueryFailed(NamedTuple):
    status: int
    message: str
    unknown_table: Optional[str] = None     # the table it named that is not there: the answer names those that are


def start_thread(thread: threading.Thread) -> None:
    """Start a thread of the query process.  Under its address-space cap (cap_address_space) a thread
    whose stack does not fit is a MemoryError, answered as one, not Python's RuntimeError, a 500."""
    try:
        thread.start()
    except RuntimeError as exc:
        raise MemoryError(f"no room left for a thread: {exc}") from None


class QueryRun:
    """One query in the query process, on its own cursor and connection.  A timer stops it at
    QUERY_TIMEOUT_S (DuckDB's interrupt, answered 504); a watcher stops it when the capture process
    closes the connection, which it does when the client goes away."""

    def __init__(self, config: Config, engine: QueryEngine, conn: multiprocessing.connection.Connection):
        self.config = config
        self.engine = engine
        self.conn = conn
        self.cursor = engine.db.cursor()
        self.timed_out = threading.Event()
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.watching = False
        self._lock = threading.Lock()         # interrupt() only while the cursor is open
        self._done = False

    def run(self) -> None:
        timer = threading.Timer(self.config.query_timeout_s, self._time_out)
        try:
            start_thread(timer)
            self._run()
        except QueryError as exc:
            self._answer(QueryFailed(exc.status, str(exc), exc.unknown_table))
        except (duckdb.Error, ResultError) as exc:
            self._failed(exc)
        except RecursionError:
            self._answer(QueryFailed(400, "the query is nested too deeply to be read"))
        except MemoryError as exc:                  # pyarrow's ArrowMemoryError too
            self._answer(QueryFailed(400, f"the query needs more memory than QUERY_MEMORY_MB "
                                          f"({self.config.query_memory_mb} MB) allows: {exc}"))
        except (OSError, EOFError):
            pass                                # the capture process closed the connection
        except Exception:
            log.exception("query failed")
            self._answer(QueryFailed(500, "internal error; see hepop's log"))
        finally:
            timer.cancel()
            with self._lock:
                self._done = True
                self.cursor.close()
            self.finished.set()
            if not self.watching:
                self.conn.close()

    def _run(self) -> None:
        engine, cap = self.engine, self.config.query_max_rows
        job = self.conn.recv()
        engine.check_statement(job.sql)
        tree = engine.statement_tree(self.cursor, job.sql)
        plan = job.plan or QueryPlan(engine.types_named(job.sql), engine.time_window(self.cursor, tree, job.now_us))
        self.conn.send(plan)
        files = self.conn.recv()
        newest_first, calls = reads_newest_first(tree), engine.names_calls(job.sql)
        if newest_first is None:            # a lookup's newest rows are the likeliest: it may stop there
            newest_first = plan.window.lookup is not None
        picking = engine.picking_query(self.cursor, call_picking_condition(tree)) if calls else None
        engine.create_views(self.cursor, files, plan.window, newest_first, calls, picking=picking)
        self.watching = True
        start_thread(threading.Thread(target=self._watch, name="hepop-query-watch", daemon=True))
        rows_asked = None if EXPLAIN_PREFIX.match(job.sql) else plain_top_n(tree, engine.aggregates)
        reader, read_since_us = self._narrowed(job, files, plan.window, rows_asked, calls, picking) if rows_asked \
            else (None, None)
        if reader is None:
            reader = self.cursor.sql(job.sql, params=job.params).to_arrow_reader(2048)
        batches = CappedBatches(reader, cap)
        encoded: list[bytes] = []
        out = ResultWriter(job.fmt, reader.schema, encoded.append)
        sent, size, finished = 0, 0, True
        for batch in batches:
            batch = batch.slice(0, cap - sent)
            out.batch(batch)
            sent += len(batch)
            size += batch.nbytes
            if size >= READ_AHEAD_BYTES:
                finished = False
                break
        if finished:
            out.close()
        self.conn.send(QueryStart(finished, batches.cut, read_since_us))
        out.write = self._send_bytes
        for data in encoded:
            self._send_bytes(data)
        if not finished:
            for batch in batches:
                batch = batch.slice(0, cap - sent)
                if len(batch):
                    out.batch(batch)
                    sent += len(batch)
            out.close()
        self.conn.send(QueryEnd(batches.cut))

    def _narrowed(self, job: QueryJob, files: dict, window: TimeWindow, rows_asked: int, calls: bool,
                  picking: Optional[str]):
        """The answer of a plain top-N (plain_top_n) from the first of NARROWED_SPANS_US, counted back
        from the window's end, that holds all the rows it asks for, and where that range starts; (None,
        None) when none within the window does, with the views over the whole window again, which
        answer it then."""
        end_us = job.now_us if window.high_us is None else window.high_us
        narrowed = False
        for span_us in NARROWED_SPANS_US:
            since_us = end_us - span_us
            if window.low_us is not None and since_us <= window.low_us:
                break
            self.engine.create_views(self.cursor, files, window, True, since_us=since_us, picking=picking)
            narrowed = True
            answer = (self._calls_begun_since(job) if calls else
                      self.cursor.sql(job.sql, params=job.params).to_arrow_table())
            if answer is None:
                break
            if len(answer) >= rows_asked:
                return answer.to_reader(2048), since_us
        if narrowed:
            self.engine.create_views(self.cursor, files, window, True, picking=picking)
        return None, None

    def _calls_begun_since(self, job: QueryJob) -> Optional[pa.Table]:
        """A plain top-N of calls over the narrowed range, of the calls that began in it only.  A call
        with records before the range began earlier: its Call-ID is looked up among the earlier records
        (their bloom filters answer for Call-IDs that are not there), and the calls found are left out
        until the answer holds none; the rows are then those of the whole window.  None when the answer
        has no call_id to look up (the whole window answers it)."""
        checked: set = set()
        left_out: list = []
        while True:
            answer = self.cursor.sql(job.sql, params=job.params).to_arrow_table()
            if "call_id" not in answer.column_names:
                return None
            unchecked = [call_id for call_id in set(answer["call_id"].to_pylist()) - checked if call_id is not None]
            if not unchecked:
                return answer
            checked.update(unchecked)
            found = self.cursor.sql(f"SELECT DISTINCT call_id FROM {EARLIER_RECORDS_VIEW} WHERE call_id IN ("
                                    f"{', '.join(map(sql_string, unchecked))})").fetchall()
            if not found:
                return answer
            left_out += [call_id for (call_id,) in found]
            self.cursor.register(CALLS_LEFT_OUT, pa.table({"call_id": pa.array(left_out, pa.string())}))

    def _failed(self, exc: Exception) -> None:
        """Answer DuckDB's error: 504 when the timer stopped the query, nothing when the client left."""
        if self.timed_out.is_set():
            self._answer(QueryFailed(504, f"the query ran past QUERY_TIMEOUT_S "
                                          f"({self.config.query_timeout_s:g} s) and was stopped"))
        elif not self.cancelled.is_set():
            missing = re.match(r"Catalog Error: Table with name (\S+) does not exist", str(exc))
            self._answer(QueryFailed(400, str(exc), missing.group(1) if missing else None))

    def _send_bytes(self, data: bytes) -> None:
        for start in range(0, len(data), QUERY_DATA_BYTES):
            self.conn.send(data[start:start + QUERY_DATA_BYTES])

    def _answer(self, failed: QueryFailed) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(failed)

    def _time_out(self) -> None:
        self.timed_out.set()
        self._interrupt()

    def _watch(self) -> None:
        """Until the capture process closes the connection (it sends nothing after the file lists): then
        stop the query if it still runs, and close our end once the query has let go of it."""
        with contextlib.suppress(OSError, EOFError):
            self.conn.poll(self.config.query_timeout_s + QUERY_GRACE_S)
        self.cancelled.set()
        self._interrupt()
        self.finished.wait()
        self.conn.close()

    def _interrupt(self) -> None:
        with self._lock:
            if not self._done:
                self.cursor.interrupt()


M_ARENA_MAX = -8                        # mallopt(): how many malloc arenas threads share
QUERY_THREAD_STACK_BYTES = 4 << 20


def cap_address_space(extra_bytes: int) -> None:
    """Let the query process take at most `extra_bytes` of address space beyond what it has now (RLIMIT_AS).

    DuckDB's memory_limit does not cover every allocation: under memory_limit=512MB, SELECT repeat('x',
    600000000) took a process to 1.86 GB, and a 1 GiB memory cgroup then had the kernel kill the capture
    process too.  Under this cap such an allocation fails, as DuckDB's own 'Out of Memory Error' (answered
    400) or pyarrow's (500).  Address space tracks memory here because glibc gets 2 malloc arenas instead
    of one per thread (64 MiB each) and Python threads 4 MiB stacks; measured, DuckDB and pyarrow loaded
    and one connection open took 240 MiB of it."""
    with open("/proc/self/status") as status:
        size_bytes = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    try:
        resource.setrlimit(resource.RLIMIT_AS, (size_bytes + extra_bytes, resource.RLIM_INFINITY))
    except (OSError, ValueError) as exc:
        log.warning("cannot cap the query process's memory (%s): QUERY_MEMORY_MB bounds only DuckDB", exc)


def warm_up(config: Config, engine: QueryEngine) -> None:
    """Run one query through QueryRun, as the capture process would, before the address space is capped.
    The first query starts threads that stay as long as the process (11 here, DuckDB's and Arrow's, each
    with 8 MiB of stack): counted against the cap, they took 88 of QUERY_MEMORY_MB=128's MiB, and a sort
    of 3 M rows that DuckDB would have spilled failed as out of memory instead."""
    ours, theirs = multiprocessing.Pipe()
    run = threading.Thread(target=QueryRun(config, engine, ours).run, name="hepop-query-warm-up")
    run.start()
    theirs.send(QueryJob("SELECT 1 AS warm_up", "json", time.time_ns() // 1000))
    theirs.recv()                           # the plan: no files to read
    theirs.send({})                         # the files of no type
    while not isinstance(answer := theirs.recv(), (QueryEnd, QueryFailed)):
        pass
    run.join()
    if isinstance(answer, QueryFailed):
        log.warning("the query process's first query failed: %s", answer)
    theirs.close()


def serve_queries(config: Config, control: socket.socket, parent_pid: int) -> None:
    """The query process.  It takes each query's connection from the control socket and runs the query
    in a thread of its own; the capture process lets at most MAX_QUERIES run at once.

    Queries run here, not in the capture process, because making text of a result holds the GIL:
    measured in the capture process, 8 clients looping 100,000-row JSON results while 15,000 packets/s
    arrived lost 68.7% of the packets to the kernel, and nice 10 did not help.  Here a query also has
    its own memory, which the kernel takes back first when the box runs out (OOM_SCORE_ADJ), and a
    DuckDB crash ends only this process, which the capture process starts again."""
    if not become_child(parent_pid, QUERY_NICE, OOM_SCORE_ADJ["queries"]):
        return
    setup_logging(config.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # a Ctrl-C reaches the parent, which stops us
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 2)
    threading.stack_size(QUERY_THREAD_STACK_BYTES)
    engine = QueryEngine(config)
    warm_up(config, engine)
    cap_address_space(config.query_memory_mb << 20)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1, 1)
        except OSError:
            return
        if not message:
            return                                      # the capture process is stopping
        for fd in fds:
            conn = multiprocessing.connection.Connection(fd)
            try:
                start_thread(threading.Thread(target=QueryRun(config, engine, conn).run, name="hepop-query",
                                              daemon=True))
            except MemoryError:
                conn.close()                # the HTTP thread answers 500, naming memory


class QueryProcess:
    """The query process as the capture process sees it: started with hepop, started again when it
    died (a crash, or the kernel's memory killer), and the way to open a query's connection to it."""

    def __init__(self, config: Config, counters: Counters):
        self.config = config
        self.counters = counters
        self._lock = threading.Lock()
        self._process = None
        self._control: Optional[socket.socket] = None

    def start(self) -> None:
        with self._lock:
            self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        process = PROCESSES.Process(target=serve_queries, name="hepop-queries", daemon=True,
                                    args=(self.config, theirs, os.getpid()))
        process.start()
        theirs.close()
        self._process, self._control = process, ours

    def connect(self) -> multiprocessing.connection.Connection:
        """A new query's connection, handed to the query process (started again first if it died)."""
        with self._lock:
            for _ in range(2):
                if not self._process.is_alive():
                    self._restart()
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    socket.send_fds(self._control, [b"q"], [theirs.fileno()])
                except OSError:
                    ours.close()
                    self._restart()
                    continue
                finally:
                    theirs.close()
                return multiprocessing.connection.Connection(ours.detach())
        raise QueryError("the query process cannot be started; see hepop's log", 503)

    def _restart(self) -> None:
        exitcode = self._process.exitcode
        log.warning("the query process ended (%s): starting it again", "killed by signal %d" % -exitcode
                    if exitcode and exitcode < 0 else f"exit code {exitcode}")
        self.counters.add("query_process_restarts_total")
        self._control.close()
        self._process.join(1)
        self._start()

    def close(self) -> None:
        """Stop it: closing the control socket ends it; queries still running are cut."""
        with self._lock:
            self._control.close()
            self._process.join(2)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()


class QueryCut(Exception):
    """A query that failed after its first bytes were passed on."""


class QueryCall:
    """One query's conversation with the query process, from the capture process: start() sends the job
    and holds the files its plan reads; iterating gives the result's bytes; close() ends it (and stops the
    query if it still runs).  Errors before the first bytes are QueryErrors, after them QueryCut."""

    def __init__(self, queries: "QueryProcess", catalog: "FileCatalog", counters: Counters, limit_s: float):
        self.catalog = catalog
        self.counters = counters
        self.limit_s = limit_s
        self.conn = queries.connect()
        self.held: list[str] = []
        self.left_out: list[str] = []
        self.plan: Optional[QueryPlan] = None
        self.truncated: Optional[bool] = None
        self._started = False

    def __enter__(self) -> "QueryCall":
        return self

    def __exit__(self, *exc_info) -> None:
        self.conn.close()
        self.catalog.leases.release(self.held)

    def start(self, job: QueryJob) -> QueryStart:
        self.conn.send(job)
        self.plan = self._answer(QueryPlan)
        files = self.catalog.hold(self.plan)
        self.held, self.left_out = files.held, files.left_out
        self.counters.add("query_files_total", len(self.held))
        self.conn.send(files.paths_by_type)
        start = self._answer(QueryStart)
        self._started = True
        if start.finished:
            self.truncated = start.truncated
        return start

    def __iter__(self) -> Iterable[bytes]:
        while not isinstance(answer := self._answer((bytes, QueryEnd)), QueryEnd):
            yield answer
        self.truncated = answer.truncated

    def rows(self, job: QueryJob) -> list[dict]:
        """The whole result of a query whose JSON fits in memory (hepop's own, with a LIMIT)."""
        self.start(job._replace(fmt="json"))
        return json.loads(b"".join(self))

    def _answer(self, expected):
        """The query process's next message if it is what `expected` says; its QueryFailed, its end or its
        silence past `limit_s` as an error."""
        try:
            answer = self.conn.recv() if self.conn.poll(self.limit_s) else QueryFailed(
                504, f"the query process did not answer within {self.limit_s:g} s")
        except (EOFError, OSError):
            answer = QueryFailed(500, "the query process ended while it ran the query (out of memory?); it "
                                      "is started again")
        if isinstance(answer, expected):
            return answer
        if not isinstance(answer, QueryFailed):
            answer = QueryFailed(500, f"the query process answered {type(answer).__name__}")
        if self._started:
            raise QueryCut(answer.message)
        if answer.unknown_table:            # DuckDB's words suggest sqlite_temp_master
            raise QueryError(f"there is no table {answer.unknown_table}: the tables are "
                             f"{', '.join(self.catalog.table_names())}", answer.status)
        raise QueryError(answer.message, answer.status)


class ListedFile(NamedTuple):
    """A file a query may read: its entry in metadata.json and the FileStore that keeps it."""
    entry: dict
    file_store: FileStore

    @property
    def key(self) -> str:
        return self.entry["path"]

    @property
    def reader_path(self) -> str:
        return self.file_store.reader_path(self.entry["path"])


def oldest_first(files: list[ListedFile]) -> list[ListedFile]:
    """By their first row, then their last."""
    return sorted(files, key=lambda listed: (listed.entry["min_time"], listed.entry["max_time"]))


class HeldFiles(NamedTuple):
    paths_by_type: dict             # hep_<type> -> where the query process reads its files, oldest first
    held: list                      # this writer's keys, held until released
    left_out: list                  # other writers whose files the sandbox cannot read


class FileCatalog:
    """The files that every writer lists, for the query process to read: kept in the capture process,
    which holds the files of a running query (FileLeases) so that compaction and retention leave them be.

    This writer's files are read from its TypeStores, other writers' from their metadata.json.  A busy
    writer rewrites its metadata.json at every flush, so reading it back parsed it again for nearly every
    query (20 ms at 4,200 files listed, bench_hepop.py --flush); and a file whose listing in metadata.json
    failed (a full disk) holds rows counted as written, which queries must see all the same.

    With a bucket, the other writers are those in the bucket, by the metadata.json each keeps there: what
    they hold on their own disks is theirs to answer for, and this disk holds only this writer's files."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.layout = storage.layout
        self.shared_store = storage.bucket or storage.file_store
        self.leases = storage.leases
        self._metadata_cache: dict[str, tuple[tuple, list[dict]]] = {}
        self._cache_lock = threading.Lock()
        self.notices = RateLimitedLog()

    def hold(self, plan: QueryPlan) -> HeldFiles:
        """Where the query process reads the files of each type the plan names that overlap its window,
        and the keys of this writer's, held until the caller passes them to `leases.release`.  Other
        writers' listings are read first, outside FileLeases.lock: from a bucket they take a request,
        during which no deletion should wait (and those writers delete their own files)."""
        writers = self._other_writers()
        left_out = self.unreadable(writers)
        readable = [writer_id for writer_id in writers if writer_id not in left_out]
        others = {proto_type: self._others(proto_type, plan.window, readable) for proto_type in plan.types}
        own: dict[int, list[ListedFile]] = {}
        held = self.leases.hold(lambda: [listed.key for proto_type in plan.types for listed in
                                         own.setdefault(proto_type, self._own(proto_type, plan.window))])
        return HeldFiles({proto_type: [listed.reader_path for listed in oldest_first(own[proto_type] + others[proto_type])]
                          for proto_type in plan.types}, held, left_out)

    def unreadable(self, writers: list[str]) -> list[str]:
        """The writers whose folder is a link out of PARQUET_DIR: the sandbox cannot read their files,
        and one such folder made every query of its types fail.  Left out, and said so."""
        left_out = [writer_id for writer_id in writers if self.shared_store.leads_outside(writer_id)]
        if left_out:
            self.notices.warning("left_out", "queries leave out the files of writers %s: their folders lead "
                                 "outside PARQUET_DIR, which queries may not read", ", ".join(left_out))
        return left_out

    def files(self, proto_type: int, window: TimeWindow) -> list[ListedFile]:
        """The files of a type that every writer lists (this one in memory, the others in their
        metadata.json), overlapping the window, oldest first."""
        return oldest_first(self._own(proto_type, window) + self._others(proto_type, window, self._other_writers()))

    def _own(self, proto_type: int, window: TimeWindow) -> list[ListedFile]:
        """This writer's files, on this disk and in the bucket."""
        return [ListedFile(entry, store.file_store)
                for store in (self.storage.types.get(proto_type), self.storage.uploaded.get(proto_type))
                if store is not None for entry in store.listed() if window.overlaps(entry)]

    def table_names(self) -> list[str]:
        """hep_<type> for each type that this writer or another holds files of, and `calls`."""
        types = set(self.storage.types) | set(self.storage.uploaded)
        for writer_id in self._other_writers():
            with contextlib.suppress(OSError):
                types |= self.layout.types_in(self.shared_store.folders(self.layout.types_key(writer_id)))
        return [f"hep_{proto_type}" for proto_type in sorted(types - {CALLS_TYPE})] + [CALLS_VIEW]

    def _other_writers(self) -> list[str]:
        """The writers besides this one: one listing (a request, with a bucket)."""
        try:
            return [writer_id for writer_id in self.shared_store.folders("") if writer_id != self.storage.writer_id]
        except OSError as exc:
            raise QueryError(f"cannot list the writers in the bucket: {exc}", 503) from None

    def _others(self, proto_type: int, window: TimeWindow, writers: list[str]) -> list[ListedFile]:
        return [ListedFile(entry, self.shared_store) for writer_id in writers
                for entry in self._listed(self.layout.metadata_key(writer_id, proto_type)) if window.overlaps(entry)]

    def _listed(self, metadata_key: str) -> list[dict]:
        """A metadata.json's file list, parsed again only when the file changed."""
        try:
            tag = self.shared_store.change_tag(metadata_key)
            with self._cache_lock:
                cached = self._metadata_cache.get(metadata_key)
            if cached and cached[0] == tag:
                return cached[1]
            with self.shared_store.open_input(metadata_key) as source:
                files = json.load(source)["files"]
        except FileNotFoundError:
            return []                   # no such type for that writer, or its folder just went away
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Answering without that writer's files would be a silent wrong answer: say what is wrong.
            log.warning("cannot read %s: %s", metadata_key, exc)
            raise QueryError(f"cannot read {metadata_key}: {exc}; the "
                             "writer that owns it rebuilds it at its next start", 503) from None
        with self._cache_lock:
            self._metadata_cache[metadata_key] = (tag, files)
        return files

# ---------------------------------------------------------------------------------------------------------
# Capture: from raw HEP bytes to batches (Ingest), and the selectors loop over the sockets.
# ---------------------------------------------------------------------------------------------------------

# The header of a compressed payload chunk (vendor 0, type 16) as it stands in a message.
COMPRESSED_CHUNK = _CHUNK_HEADER.pack(0, 16, 0)[:4]


def has_compressed_payload(message: bytes) -> bool:
    """Whether decode() would inflate a chunk of this message: it has a chunk 16 before any chunk that
    stops decoding.  Its header's four bytes are looked for first, at C speed; only a message that has
    them is walked chunk by chunk, since they also stand inside values: capture ID 16, or microseconds
    16 in the capture time (one message in a million).  Charged 1 MiB more on those bytes alone, such
    messages were dropped as buffer_full, and a TCP agent sending one was held back for good at a
    MAX_PENDING_BYTES of 1M.  A message of the common layout has no chunk 16: one check, no walk."""
    if COMPRESSED_CHUNK not in message or message[:4] != HEP3_MAGIC or has_common_layout(message):
        return False
    size = len(message)
    if _U16.unpack_from(message, 4)[0] != size:
        return False
    pos = 6
    while size - pos >= 6:
        vendor, kind, length = _CHUNK_HEADER.unpack_from(message, pos)
        if length < 6 or pos + length > size:
            return False
        if vendor == 0 and kind == 16:
            return True
        pos += length
    return False


def charged_bytes(data: bytes) -> int:
    """What a message as received is counted as in the buffers: see Ingest.messages."""
    return len(data) + 64 + (MAX_INFLATED_BYTES if has_compressed_payload(data) else 0)


class AgentsHeard:
    """Who has sent HEP, and when the last of it came: each new address is logged once (at most
    SENDERS_REMEMBERED of them remembered), and QUIET_WARNING_S without anything received is logged and
    shown on /health, so that an agent whose configuration sends nothing is seen here too (Kamailio
    without trace_on sends nothing, and says nothing)."""

    SENDERS_REMEMBERED = 10_000

    def __init__(self, config: Config):
        self.quiet_after_s = config.quiet_warning_s
        self.port = config.port
        self.known: set[str] = set()
        self.last_s = time.monotonic()          # from the start: one that never heard anything is quiet too
        self.last_received_us: Optional[int] = None     # for /health
        self.quiet = False
        self.notices = RateLimitedLog()

    def heard(self, peers: Iterable, transport: str) -> None:
        self.last_s = time.monotonic()
        self.last_received_us = time.time_ns() // 1000
        if self.quiet:
            self.quiet = False
            log.info("receiving HEP again")
        for peer in peers:
            address = peer[0] if isinstance(peer, tuple) else str(peer)
            if address not in self.known and len(self.known) < self.SENDERS_REMEMBERED:
                self.known.add(address)
                self.notices.info("new_sender", "HEP from a new sender: %s over %s", address, transport)

    def check_quiet(self, now_s: float) -> None:
        if not self.quiet and now_s - self.last_s >= self.quiet_after_s:
            self.quiet = True
            log.warning("nothing received for %.0f s on port %d: are the agents pointed at hepop? (README: "
                        "Point your agents at hepop)", now_s - self.last_s, self.port)


class Ingest:
    """From raw HEP bytes to the batch buffers: UDP datagrams, and TCP frames of the common layout,
    buffered as they come, for the writer to decode in batches; other TCP frames decoded and checked
    here, since the framing needs to know at once whether a frame decodes."""

    def __init__(self, config: Config, writer: BatchWriter, counters: Counters, check: PacketCheck):
        self.config = config
        self.heard = AgentsHeard(config)
        self.writer = writer
        self.counters = counters
        self.check = check
        self.batches: dict[object, ReceivedBatch | DecodedBatch] = {}     # by their key: transport or type
        self.buffered_bytes = 0
        self.inflating_bytes = 0        # of the batches of compressed payloads, counted apart
        self.partial_bytes = 0          # the incomplete TCP frames the loop holds, which the budget counts
        self.received: collections.Counter = collections.Counter()     # (transport, version) -> packets
        self.max_pending_bytes = config.max_pending_bytes               # read at every read of the loop
        self.flush_rows, self.flush_bytes = config.flush_rows, config.flush_bytes

    def messages(self, messages: list, senders: list[Sender], transport: str) -> None:
        """Take in messages as received, buffered as they are for the writer to decode.  One call for all
        that one wake-up of the loop read, so that a datagram costs the loop little more than its
        recvfrom.  Those that would pass MAX_PENDING_BYTES are dropped.

        A message that may hold a compressed payload (chunk 16), which the writer inflates, goes to a
        batch of its own, charged MAX_INFLATED_BYTES more than its bytes against MAX_INFLATING_BYTES
        (_take_inflating).  Charged at wire size, 3,000 datagrams of 1,145 bytes that each inflate to 1 MiB
        took a 2 GiB box down; charged against MAX_PENDING_BYTES, they had the ordinary traffic beside
        them dropped (1,782 of 3,000 INVITEs stored)."""
        self.heard.heard((sender.peer for sender in senders), transport)
        if any(map(bytes.__contains__, messages, itertools.repeat(COMPRESSED_CHUNK))):   # rare: then walk
            plain, plain_senders = [], []
            for index, data in enumerate(messages):
                peer = sender_of(senders, index)
                if has_compressed_payload(data):
                    self._take_inflating(transport, data, peer)
                    continue
                if not plain_senders or plain_senders[-1].peer != peer:
                    plain_senders.append(Sender(len(plain), peer))
                plain.append(data)
            messages, senders = plain, plain_senders
        size = sum(map(len, messages)) + 64 * len(messages)
        room = self.room()
        if size > room:
            fitting, fitting_senders = [], []
            for index, data in enumerate(messages):
                peer = sender_of(senders, index)
                charge = len(data) + 64
                if charge <= room:
                    if not fitting_senders or fitting_senders[-1].peer != peer:
                        fitting_senders.append(Sender(len(fitting), peer))
                    fitting.append(data)
                    room -= charge
                else:
                    self.received[transport, version_of(data)] += 1
            self._drop_for_room(len(messages) - len(fitting))
            messages, senders = fitting, fitting_senders
            size = sum(map(len, messages)) + 64 * len(messages)
        if messages:
            self._append_received(transport, messages, senders, size)

    def _take_inflating(self, transport: str, data: bytes, peer) -> None:
        """One message with a compressed payload, into its transport's batch of them (handed over at
        FLUSH_BYTES of charges, so a few at a time), or dropped as inflating_full."""
        charge = charged_bytes(data)
        if charge > self.inflating_room():
            self.received[transport, version_of(data)] += 1
            self.counters.add("hep_dropped_total", reason="inflating_full")
            self.check.bad_packets.warning("inflating_full", "compressed payloads fill MAX_INFLATING_BYTES: "
                                           "dropping them (uncompressed traffic is not affected)")
            return
        self._append_received(transport, [data], [Sender(0, peer)], charge, inflating=True)

    def _append_received(self, transport: str, messages: list, senders: list[Sender], size: int,
                         inflating: bool = False) -> None:
        batch = self.batches.get((transport, inflating))
        if batch is None:
            batch = ReceivedBatch(transport, time.time_ns() // 1000, self._due(), inflating=inflating)
            self.batches[batch.key] = batch
        offset = len(batch.messages)
        same_peer_goes_on = offset and len(senders) == 1 and senders[0].peer == batch.senders[-1].peer
        if not same_peer_goes_on:
            batch.senders.extend(Sender(offset + sender.first, sender.peer) for sender in senders)
        batch.messages.extend(messages)
        self._added(batch, len(batch.messages), size)

    def packet(self, data: bytes, transport: str, peer) -> bool:
        """Take in one HEP message; False when it does not decode (it is then counted as malformed)."""
        self.heard.heard((peer,), transport)
        packet = self.check.decode(data, transport, peer, self.received)
        if packet is None:
            return False
        time_us = self.check.capture_time(packet, peer)
        if time_us is None:
            return True
        size = len(packet.payload) + 64
        if size > self.room():
            self._drop_for_room(1)
            return True
        batch = self.batches.get(packet.proto_type)
        if batch is None:
            batch = self.batches[packet.proto_type] = DecodedBatch(packet.proto_type, self._due())
        batch.times_us.append(time_us)
        batch.packets.append(packet)
        self._added(batch, len(batch.packets), size)
        return True

    def _due(self) -> float:
        return time.monotonic() + self.config.flush_interval_s

    def _added(self, batch: ReceivedBatch | DecodedBatch, rows: int, size: int) -> None:
        """Account for what was appended to a batch, and hand it over when it is full."""
        batch.nbytes += size
        if batch.inflating:
            self.inflating_bytes += size
        else:
            self.buffered_bytes += size
        if rows >= self.flush_rows or batch.nbytes >= self.flush_bytes:
            self.flush(batch.key)

    def room(self) -> int:
        """The bytes that may still be buffered before MAX_PENDING_BYTES."""
        return self.max_pending_bytes - self.buffered_bytes - self.partial_bytes - self.writer.pending_bytes

    def inflating_room(self) -> int:
        """The charges of compressed payloads that may still be buffered before MAX_INFLATING_BYTES."""
        return self.config.max_inflating_bytes - self.inflating_bytes - self.writer.pending_inflating_bytes

    def _drop_for_room(self, count: int) -> None:
        """Count and log `count` packets dropped because they would pass MAX_PENDING_BYTES."""
        self.counters.add("hep_dropped_total", count, reason="buffer_full")
        self.check.bad_packets.warning("buffer_full", "buffers full (MAX_PENDING_BYTES): dropping packets")

    def publish_counts(self) -> None:
        """Move the packets counted since the last call into the counters: once per pass of the loop
        rather than under the counters' lock for every packet."""
        publish_received(self.counters, self.received)
        self.received.clear()

    def flush(self, key) -> None:
        """Hand one batch to the writer thread: no copy, no I/O on the loop."""
        batch = self.batches.pop(key)
        if batch.inflating:
            self.inflating_bytes -= batch.nbytes
        else:
            self.buffered_bytes -= batch.nbytes
        self.writer.submit(batch)

    def flush_due(self, now: float) -> Optional[float]:
        """Flush the batches whose oldest row is FLUSH_INTERVAL_S old; the next deadline, if any."""
        for key in [key for key, batch in self.batches.items() if batch.due_s <= now]:
            self.flush(key)
        return min((batch.due_s for batch in self.batches.values()), default=None)

    def flush_all(self) -> None:
        for key in list(self.batches):
            self.flush(key)


SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)   # Linux; Python names it only from 3.12 on
# accept() errors of the process, not of one connection: out of descriptors, buffers or memory.
OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def tls_context(config: Config) -> Optional[ssl.SSLContext]:
    """The TLS listener's context (TLS 1.2 at least), or None without TLS_PORT; ConfigError naming the
    setting whose file does not load."""
    if not config.tls_port:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS_CERT={config.tls_cert!r}, TLS_KEY={config.tls_key!r}: {exc}") from None
    if config.tls_client_ca:
        try:
            context.load_verify_locations(config.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"TLS_CLIENT_CA={config.tls_client_ca!r}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclasses.dataclass
class Agent:
    """A TCP agent's connection, as the loop keeps it."""
    stream: HepStream
    peer: object
    last_read_s: float          # time.monotonic() when it last sent anything
    partial_bytes: int = 0      # the bytes of an incomplete frame held for it, charged to Ingest.partial_bytes
    unframed_since_s: Optional[float] = None    # it has sent bytes and no HEP frame since then
    transport: str = "tcp"      # or "tls"
    handshaking: bool = False   # a TLS agent whose handshake has not ended: counted as unframed from its accept


class CaptureServer:
    """The selectors loop: UDP and TCP HEP on one HOST:PORT, and HEP over TLS on TLS_PORT, batches flushed
    on time, signals.  A TLS agent is a TCP agent whose reads go through its TLS session: the same
    framing, bounds and counters; its handshake is made in the loop as its bytes come (never waited for),
    and one that stalls is unframed, so TCP_FRAME_TIMEOUT_S closes it and a new agent may take its slot."""

    TCP_READ_BYTES = 256 * 1024
    TCP_DRAIN_QUIET_S = 0.2
    TCP_DRAIN_MAX_S = 5.0
    UDP_DRAIN_MAX = 1 << 20         # datagrams read at shutdown at most: an agent may go on sending
    READ_ROOM_BYTES = 4 << 20       # reading pauses while the buffers have less room than this
    PAUSED_POLL_S = 0.01
    # From SIGTERM on, writes that fail are retried for this long at most; what still fails is counted as
    # dropped.  The kernel's buffers are read while the writer makes room, for as long as it makes
    # progress: DRAIN_STALL_S without any ends the wait, and so does DRAIN_WAIT_MAX_S in all (systemd's
    # TimeoutStopSec is 120 s).  A disk that fsyncs slowly still writes everything; one that fails lets
    # hepop exit within about STOP_TIMEOUT_S.
    STOP_TIMEOUT_S = 5.0
    DRAIN_STALL_S = 5.0
    DRAIN_WAIT_MAX_S = 60.0
    ACCEPT_BACKOFF_S = 1.0          # accepting pauses this long when the process is out of descriptors

    def __init__(self, config: Config, ingest: Ingest, counters: Counters,
                 tls: Optional[ssl.SSLContext] = None):
        self.config = config
        self.ingest = ingest
        self.counters = counters
        self.tls_context = tls
        self.tls_listener: Optional[socket.socket] = None
        self.selector = selectors.DefaultSelector()
        self.connections: dict[socket.socket, Agent] = {}
        self.held_back: set[socket.socket] = set()      # agents with frames that had no room: not read
        self.stopping = False
        self.reading = True
        self.notices = RateLimitedLog()
        self.accepting_again_at: Optional[float] = None      # while accepting is paused (_pause_accepting)
        self._no_idle_agent_before = 0.0    # time.monotonic() before which no agent can be idle enough
        self._no_unframed_agent_before = 0.0    # ... when the last look found no unframed agent
        self._next_unframed_check_s = 0.0
        self._stalled = False               # at shutdown: the writer made no progress for DRAIN_STALL_S
        self._drain_pending, self._drain_progress_at = 0, 0.0
        self._logged: dict[str, float] = {}            # the counters as log_growth() last saw them
        self.udp: Optional[socket.socket] = None
        self.tcp: Optional[socket.socket] = None
        self._wakeup_r, self._wakeup_w = socket.socketpair()

    # -- sockets ---------------------------------------------------------------------------------------

    def bind(self) -> None:
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        address = (self.config.host, self.config.port)
        self.udp = socket.socket(family, socket.SOCK_DGRAM)
        self.tcp = socket.socket(family, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for sock in (self.udp, self.tcp):
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(address)
            sock.setblocking(False)
        self._set_receive_buffer()
        self.tcp.listen(1024)
        if self.tls_context:
            self.tls_listener = socket.socket(family, socket.SOCK_STREAM)
            self.tls_listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                self.tls_listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self.tls_listener.bind((self.config.host, self.config.tls_port))
            self.tls_listener.setblocking(False)
            self.tls_listener.listen(1024)
            log.info("listening for HEP over TLS on %s port %d%s", self.config.host, self.config.tls_port,
                     " (agents must present a certificate)" if self.config.tls_client_ca else "")
        self.selector.register(self.udp, selectors.EVENT_READ, self._on_udp)
        for listener in self.listeners():
            self.selector.register(listener, selectors.EVENT_READ, self._on_accept)
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, self._on_wakeup)
        signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):   # from here on, a signal means a clean stop
            signal.signal(signum, self._on_signal)
        log.info("listening for HEP on %s port %d (UDP and TCP)", self.config.host, self.config.port)

    def listeners(self) -> list[socket.socket]:
        return [self.tcp] + ([self.tls_listener] if self.tls_listener else [])

    def udp_inode(self) -> Optional[int]:
        """The inode of our UDP socket, by which /proc/net/udp lists its drops."""
        return os.fstat(self.udp.fileno()).st_ino if self.udp and self.udp.fileno() >= 0 else None

    def _set_receive_buffer(self) -> None:
        wanted = self.config.rcvbuf_bytes
        try:
            self.udp.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, wanted)
        except OSError:                       # not privileged: the kernel caps it at net.core.rmem_max
            self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
        granted = self.udp.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # Linux reports double
        if granted < wanted:
            log.warning("UDP receive buffer is %d bytes, not the %d asked for: packets will be lost under "
                        "load; raise the cap with 'sysctl -w net.core.rmem_max=%d'", granted, wanted, wanted)
        else:
            log.info("UDP receive buffer: %d bytes", granted)

    # -- the loop --------------------------------------------------------------------------------------

    def serve(self) -> None:
        """Run until SIGTERM or SIGINT, then read what the kernel still holds and flush everything."""
        next_stats = time.monotonic() + self.config.stats_interval_s
        next_flush = None
        while not self.stopping:
            timeout = min(next_stats, next_flush or next_stats) - time.monotonic()
            events = self.selector.select(max(0.0, min(timeout, 1.0 if self.reading else self.PAUSED_POLL_S)))
            started = time.monotonic()
            for key, _ in events:
                key.data(key.fileobj)
            if self.held_back:
                self._take_held_back()
            self.ingest.publish_counts()
            next_flush = self.ingest.flush_due(started)
            self._pace_reading()
            self._resume_accepting(started)
            self._close_unframed_agents(started)
            self.ingest.heard.check_quiet(started)
            if started >= next_stats:
                self.log_growth()
                next_stats = started + self.config.stats_interval_s
            self.counters.maximum("loop_busy_seconds_max", time.monotonic() - started)
        self._drain()
        self.ingest.publish_counts()
        self.ingest.flush_all()

    def _pace_reading(self) -> None:
        """Stop reading the sockets while the buffers have no room for what a wake-up reads, instead of
        dropping packets here: datagrams wait in the kernel's receive buffer (RCVBUF_BYTES more to absorb
        a burst; what overflows it is counted as the kernel's drops) and TCP agents are held back by flow
        control.  Reading goes on once the writer has made room."""
        room = self.ingest.room()
        if self.reading and room < self._pause_below():
            self._set_reading(False)
            self.ingest.flush_all()                 # the writer can make room only from what it has
            self.counters.add("reading_paused_total")
            self.notices.warning("paused", "buffers full (MAX_PENDING_BYTES): reading paused until the writer "
                                 "catches up")
        elif not self.reading and room >= self._resume_above():
            self._set_reading(True)

    def _pause_below(self) -> int:
        return min(self.READ_ROOM_BYTES, self.config.max_pending_bytes // 2)

    def _resume_above(self) -> int:
        """Twice the pause's room, but never more than three quarters of the budget: incomplete TCP frames
        may hold the other quarter however much the writer writes, and reading must come back.  (At
        MAX_PENDING_BYTES=1M, waiting for all of it to be free held reading paused for good once an
        agent's stream kept a few bytes of a frame.)"""
        return min(2 * self._pause_below(), self.config.max_pending_bytes * 3 // 4)

    def _wait_for_room(self, deadline: float) -> None:
        """At shutdown: while the buffers are full, hand them to the writer and wait for it to make room,
        rather than drop what the kernel still holds: until `deadline`, or until the writer has made no
        progress for DRAIN_STALL_S (its writes fail)."""
        while self.ingest.room() < self._pause_below() and time.monotonic() < deadline and not self._stalled:
            self.ingest.flush_all()
            time.sleep(self.PAUSED_POLL_S)
            if self.ingest.writer.pending_bytes < self._drain_pending:
                self._drain_progress_at = time.monotonic()
            self._drain_pending = self.ingest.writer.pending_bytes
            self._stalled = time.monotonic() - self._drain_progress_at > self.DRAIN_STALL_S

    def _set_reading(self, reading: bool) -> None:
        connections = [conn for conn in self.connections if conn not in self.held_back]
        for sock, on_read in [(self.udp, self._on_udp), *((conn, self._on_tcp) for conn in connections)]:
            if reading:
                self.selector.register(sock, selectors.EVENT_READ, on_read)
            else:
                self.selector.unregister(sock)
        self.reading = reading

    def _on_signal(self, signum, frame) -> None:
        if not self.stopping:
            self.stopping = True
            self.ingest.writer.stop_by = time.monotonic() + self.STOP_TIMEOUT_S

    def _on_wakeup(self, sock) -> None:
        try:
            while sock.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _on_udp(self, sock) -> int:
        """Read a bounded batch of datagrams (draining until empty would starve flushes under load).

        Only the bytes are kept, and the peer where it changes: bytes are not tracked by the garbage
        collector, while (bytes, peer) tuples kept by the hundred thousand made it run every few thousand
        packets, holding the GIL 20-50 ms each time."""
        datagrams, senders, sender = [], [], None
        append, recvfrom = datagrams.append, sock.recvfrom
        for index in range(self.config.udp_batch):
            try:
                data, peer = recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            append(data)
            if peer != sender:
                senders.append(Sender(index, peer))
                sender = peer
        if datagrams:
            self.ingest.messages(datagrams, senders, "udp")
        return len(datagrams)

    def _on_accept(self, listener) -> None:
        while True:
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in OUT_OF_RESOURCES:
                    continue                    # that one connection failed (ECONNABORTED, ...)
                self._pause_accepting(exc)
                return
            if len(self.connections) >= self.config.max_tcp_connections and not self._evict_unframed_agent() \
                    and not self._evict_idle_agent():
                self.counters.add("tcp_connections_refused_total")
                self.notices.warning("tcp_full", "refusing TCP agent %s: MAX_TCP_CONNECTIONS (%d) reached", peer,
                                     self.config.max_tcp_connections)
                conn.close()
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if listener is self.tls_listener:
                now = time.monotonic()
                conn = self.tls_context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
                self.connections[conn] = Agent(HepStream(), peer, now, unframed_since_s=now, transport="tls",
                                               handshaking=True)
            else:
                self.connections[conn] = Agent(HepStream(), peer, time.monotonic())
            if self.reading:
                self.selector.register(conn, selectors.EVENT_READ, self._on_tcp)
            self.counters.add("tcp_connections_total")
            log.debug("TCP agent %s connected", peer)

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of descriptors or memory: stop accepting for ACCEPT_BACKOFF_S rather than crash, or spin on
        a listener that stays readable.  Agents wait in the backlog meanwhile."""
        self.counters.add("tcp_accept_errors_total")
        self.notices.warning("accept", "cannot accept TCP agents (%s): trying again in %g s", exc.strerror,
                             self.ACCEPT_BACKOFF_S)
        for listener in self.listeners():
            with contextlib.suppress(KeyError):
                self.selector.unregister(listener)
        self.accepting_again_at = time.monotonic() + self.ACCEPT_BACKOFF_S

    def _resume_accepting(self, now: float) -> None:
        if self.accepting_again_at is not None and now >= self.accepting_again_at:
            self.accepting_again_at = None
            for listener in self.listeners():
                self.selector.register(listener, selectors.EVENT_READ, self._on_accept)

    def _evict_unframed_agent(self) -> bool:
        """With every slot taken: close the connection that has sent bytes and no frame longest, so that
        connections that trickle garbage, never idle and never framed, cannot lock agents out."""
        if time.monotonic() < self._no_unframed_agent_before:
            return False                # a flood of connects at the limit does not rescan every agent
        unframed = [(agent.unframed_since_s, conn) for conn, agent in self.connections.items()
                    if agent.unframed_since_s is not None and conn not in self.held_back]
        if not unframed:
            self._no_unframed_agent_before = time.monotonic() + 0.1
            return False
        since_s, conn = min(unframed, key=lambda pair: pair[0])
        self._close_unframed(conn, f"sending no HEP frame for {time.monotonic() - since_s:.0f} s: a new agent "
                                   "needs its slot")
        return True

    def _close_unframed_agents(self, now: float) -> None:
        """Close the connections that have sent bytes and no frame for TCP_FRAME_TIMEOUT_S (once a second)."""
        if now < self._next_unframed_check_s:
            return
        self._next_unframed_check_s = now + 1.0
        limit_s = now - self.config.tcp_frame_timeout_s
        for conn, agent in list(self.connections.items()):
            if agent.unframed_since_s is not None and agent.unframed_since_s < limit_s and conn not in self.held_back:
                self._close_unframed(conn, f"no HEP frame in {self.config.tcp_frame_timeout_s:g} s "
                                           "(TCP_FRAME_TIMEOUT_S)")

    def _close_unframed(self, conn, why: str) -> None:
        agent = self.connections[conn]
        self.counters.add("tcp_unframed_closed_total")
        self.notices.warning("tcp_unframed", "closing TCP connection %s, %s", agent.peer, why)
        self._close_agent(conn, keep_partial=False)

    def _evict_idle_agent(self) -> bool:
        """With every slot taken: close the connection silent longest, if it has been for
        TCP_IDLE_TIMEOUT_S, so that connections held open and idle cannot lock agents out.  Quiet agents
        are not closed otherwise: an agent writing into a connection the server closed loses a message."""
        if time.monotonic() < self._no_idle_agent_before:
            return False                # a flood of connects at the limit does not rescan every agent
        conn, agent = min(self.connections.items(), key=lambda item: item[1].last_read_s)
        if time.monotonic() - agent.last_read_s < self.config.tcp_idle_timeout_s:
            self._no_idle_agent_before = agent.last_read_s + self.config.tcp_idle_timeout_s
            return False
        self.counters.add("tcp_idle_closed_total")
        self.notices.warning("tcp_idle", "closing TCP agent %s, silent for %.0f s: a new agent needs its slot",
                             agent.peer, time.monotonic() - agent.last_read_s)
        self._close_agent(conn)
        return True

    def _on_tcp(self, conn) -> bool:
        """Read what one agent sent and store its frames; False once the connection has nothing more."""
        agent = self.connections[conn]
        if agent.handshaking:
            return self._handshake(conn, agent)
        room = self.ingest.room()
        if room <= 0:                           # no room for what it sent: hold it back, unread
            self._hold_back(conn)
            return False
        try:
            data = conn.recv(min(self.TCP_READ_BYTES, room))     # what it holds stays within the budget
            while agent.transport == "tls" and conn.pending() and len(data) < min(self.TCP_READ_BYTES, room):
                data += conn.recv(conn.pending())   # decrypted already: select() would not say so
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError as exc:
            self.notices.warning("tcp_error", "TCP agent %s: %s", agent.peer, exc)
            data = b""
        if not data:
            self._close_agent(conn)
            return False
        agent.last_read_s = time.monotonic()
        if agent.unframed_since_s is None:
            agent.unframed_since_s = agent.last_read_s
        agent.stream.feed(data)
        if not self._take_fitting_frames(agent):
            self._hold_back(conn)
        self._count_garbage(agent.stream)
        return self._hold_partial(conn, agent)

    def _handshake(self, conn: ssl.SSLSocket, agent: Agent) -> bool:
        """A TLS agent's handshake, as far as its bytes go; then its frames, as a TCP agent's."""
        try:
            conn.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except (ssl.SSLError, OSError) as exc:
            self.counters.add("tls_handshake_failures_total")
            self.notices.warning("tls_handshake", "TLS handshake with %s failed: %s", agent.peer, exc)
            self._close_agent(conn, keep_partial=False)
            return False
        agent.handshaking, agent.unframed_since_s = False, None
        self.counters.add("tls_connections_total")
        return self._on_tcp(conn)

    def _hold_back(self, conn) -> None:
        if conn not in self.held_back:
            self.held_back.add(conn)
            if self.reading:
                self.selector.unregister(conn)

    def _take_fitting_frames(self, agent: Agent) -> bool:
        """Take an agent's complete frames while the buffers have room for them; False if some had none.
        Those stay in its stream, charged as held bytes, and the agent is not read until they fit
        (_take_held_back): TCP holds a sender back rather than drop what it sent.  A frame charged more
        than the room reading waits for (a compressed one at a small MAX_PENDING_BYTES) would wait for
        good: it is taken, and stored or dropped as what it decodes to takes room or not."""
        stream, room, fitted = agent.stream, self.ingest.room(), True
        never_waits_bytes = self._pause_below()

        def fitting():
            nonlocal room, fitted
            while (frame := stream.next_frame()) is not None:
                charge = charged_bytes(frame)
                if charge <= never_waits_bytes:
                    room -= charge
                    if room < 0:
                        stream.unread()
                        fitted = False
                        return
                yield frame
        if self._take_frames(stream, agent.peer, fitting(), agent.transport):
            agent.unframed_since_s = None
        return fitted

    def _take_held_back(self) -> None:
        """The frames of agents held back, as far as the writer has made room; read them again after."""
        for conn in list(self.held_back):
            if self.ingest.room() < self._pause_below():
                return
            agent = self.connections[conn]
            if self._take_fitting_frames(agent):
                self.held_back.discard(conn)
                if self.reading:
                    self.selector.register(conn, selectors.EVENT_READ, self._on_tcp)
            self._hold_partial(conn, agent)

    def _hold_partial(self, conn, agent: Agent) -> bool:
        """Charge an agent's incomplete frame to the memory budget.  Incomplete frames may take a quarter
        of MAX_PENDING_BYTES, so that connections that stop in the middle of a frame can neither grow
        memory past the bound nor hold reading paused: past it, the agent whose frame does not fit is
        disconnected and its frame counted as dropped."""
        held = agent.stream.settle()
        total = self.ingest.partial_bytes - agent.partial_bytes + held
        # An agent held back keeps whole frames, read within the room there was: only the others count.
        if held and total > self.config.max_pending_bytes // 4 and conn not in self.held_back:
            self.counters.add("hep_dropped_total", reason="partial_frames_full")
            self.notices.warning("partial_frames_full", "incomplete TCP frames fill a quarter of "
                                 "MAX_PENDING_BYTES: disconnecting %s, which is in the middle of one", agent.peer)
            self._close_agent(conn, keep_partial=False)
            return False
        self.ingest.partial_bytes = total
        agent.partial_bytes = held
        return True

    def _close_agent(self, conn, keep_partial: bool = True) -> None:
        """Store the complete frames an agent's stream still holds, then close its connection."""
        agent = self.connections.pop(conn)
        self.held_back.discard(conn)
        with contextlib.suppress(KeyError):         # not registered while reading is paused or held back
            self.selector.unregister(conn)
        self.ingest.partial_bytes -= agent.partial_bytes
        if keep_partial:
            self._take_frames(agent.stream, agent.peer, agent.stream.finish(), agent.transport)
            self._count_garbage(agent.stream)
        conn.close()
        log.debug("TCP agent %s disconnected", agent.peer)

    def _take_frames(self, stream: HepStream, peer, frames: Iterable[bytes], transport: str) -> int:
        """Frames of the common layout surely decode: buffered as they are, like datagrams, all in one call.
        Any other frame is decoded now, and when it does not decode, the stream searches inside it (its
        length may have swallowed good frames).  Returns how many decoded."""
        common, decoded = [], 0
        for frame in frames:
            if has_common_layout(frame):
                common.append(frame)
            elif self.ingest.packet(frame, transport, peer):
                decoded += 1
            else:
                stream.reject()
        if common:
            self.ingest.messages(common, [Sender(0, peer)], transport)
        return decoded + len(common)

    def _count_garbage(self, stream: HepStream) -> None:
        if stream.garbage_bytes:
            self.counters.add("tcp_garbage_bytes_total", stream.garbage_bytes)
            stream.garbage_bytes = 0

    def _drain(self) -> None:
        """At shutdown: take in every datagram and TCP byte the kernel already holds for us.  When the buffers
        are full, the writer is given until the stop deadline to make room; what then has none is counted as
        dropped."""
        if not self.reading:
            self._set_reading(True)
        self.selector.unregister(self._wakeup_r)    # a signal's byte left unread would make select() spin
        self.selector.unregister(self.udp)
        for listener in self.listeners():
            with contextlib.suppress(KeyError):    # not registered while accepting is paused
                self.selector.unregister(listener)
            self._on_accept(listener)               # agents still in the backlog may have sent already
            listener.close()
        wait_until = time.monotonic() + self.DRAIN_WAIT_MAX_S
        self._drain_pending, self._drain_progress_at = self.ingest.writer.pending_bytes, time.monotonic()
        read = 0
        while read < self.UDP_DRAIN_MAX:
            self._wait_for_room(wait_until)
            if not (count := self._on_udp(self.udp)):       # the first EAGAIN
                break
            read += count
        # An agent's bytes still in flight on the connection arrive as we read; read until none came for
        # TCP_DRAIN_QUIET_S, or for TCP_DRAIN_MAX_S at most (an agent may go on sending).
        # An agent held back for room is not in the selector: its frames are taken as room comes, and it
        # is read again, or its bytes still in the kernel would be lost unread.
        deadline = time.monotonic() + self.TCP_DRAIN_MAX_S
        while self.connections and time.monotonic() < deadline:
            if self.held_back:
                self._wait_for_room(wait_until)
                self._take_held_back()
            events = self.selector.select(self.TCP_DRAIN_QUIET_S)
            connections = [key.fileobj for key, _ in events if key.fileobj in self.connections]
            if not connections and not self.held_back:
                break
            for conn in connections:
                self._wait_for_room(wait_until)
                self._on_tcp(conn)
        for conn in list(self.connections):
            if conn in self.held_back:
                self._wait_for_room(wait_until)
            self._close_agent(conn)
        self.udp.close()

    def log_growth(self) -> None:
        """Log how much each counter grew since the last such line (every STATS_INTERVAL_S); nothing
        when none did.  Maxima and gauges are on /metrics and in the final line."""
        values = self.counters.snapshot()
        grown = {key: value - self._logged.get(key, 0) for key, value in values.items()
                 if key.split("{")[0].endswith("_total") and value != self._logged.get(key, 0)}
        self._logged = values
        if grown:
            log.info("counters grew %s", json.dumps(grown, separators=(",", ":")))

    def log_counters(self, what: str) -> None:
        log.info("%s %s", what, json.dumps(self.counters.snapshot(), separators=(",", ":")))


# ---------------------------------------------------------------------------------------------------------
# Access: the users who may log in, their password hashes, and the tokens (HS256 JWTs) a login gives
# ---------------------------------------------------------------------------------------------------------

# scrypt at n=2**14, r=8: 16 MiB and about 40 ms per check here, so a guessed password costs an attacker
# as much; LOGIN_CHECKS bounds how many run at once (memory), the limiter how often one address may try.
SCRYPT_COST = {"n": 1 << 14, "r": 8, "p": 1}
LOGIN_CHECKS = 2
LOGIN_FAILURES_MAX = 5              # failed logins per client address within LOGIN_WINDOW_S
LOGIN_WINDOW_S = 60.0
LOGIN_ADDRESSES_MAX = 10_000        # addresses the limiter remembers


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    """'scrypt$n$r$p$salt$digest', with a random salt: what a line of API_USERS_FILE holds after 'name:'."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **SCRYPT_COST)
    return "$".join(["scrypt", *(str(SCRYPT_COST[k]) for k in "nrp"), b64url(salt), b64url(digest)])


def password_matches(password: str, stored: str) -> bool:
    kind, n, r, p, salt, digest = stored.split("$")
    computed = hashlib.scrypt(password.encode(), salt=b64url_decode(salt), n=int(n), r=int(r), p=int(p),
                              dklen=len(b64url_decode(digest)), maxmem=64 << 20)
    return hmac.compare_digest(computed, b64url_decode(digest))


def read_users(path: str) -> dict[str, str]:
    """API_USERS_FILE: {name: hash}; ConfigError naming the line that is not 'name:scrypt$...'."""
    users = {}
    try:
        with open(path) as source:
            lines = source.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"API_USERS_FILE={path!r}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, stored = line.strip().partition(":")
        parts = stored.split("$")
        if not name or len(parts) != 6 or parts[0] != "scrypt" or not all(p.isdigit() for p in parts[1:4]):
            raise ConfigError(f"API_USERS_FILE={path!r} line {number}: not 'name:hash' with a hash from "
                              "'hepop hash-password'")
        users[name] = stored
    return users


def user_guid(username: str) -> str:
    """A user's guid, as HOMER's UI wants one: the same for the same name, on every box."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "hepop:" + username))


class Tokens:
    """Login tokens: HS256 JWTs with the claims HOMER's UI reads (username, useradmin, exp, ...)."""

    HEADER = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())

    def __init__(self, secret: bytes, ttl_s: float):
        self.secret = secret
        self.ttl_s = ttl_s

    def issue(self, username: str) -> str:
        now = int(time.time())
        claims = {"username": username, "guid": user_guid(username), "useradmin": True, "usergroup": "admin",
                  "partid": 10, "externalauth": False, "externaltype": "", "force_password": False,
                  "displayname": username, "avatar": "", "iat": now, "exp": now + int(self.ttl_s)}
        body = f"{self.HEADER}.{b64url(json.dumps(claims, separators=(',', ':')).encode())}"
        return f"{body}.{b64url(self._sign(body))}"

    def check(self, token: str) -> Optional[dict]:
        """The claims of a token this server signed and that has not expired; None for any other."""
        try:
            header, claims, signature = token.split(".")
            if not hmac.compare_digest(b64url_decode(signature), self._sign(f"{header}.{claims}")):
                return None
            if json.loads(b64url_decode(header)).get("alg") != "HS256":
                return None
            claims = json.loads(b64url_decode(claims))
            return claims if claims["exp"] > time.time() else None
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def _sign(self, body: str) -> bytes:
        return hmac.new(self.secret, body.encode(), hashlib.sha256).digest()


def token_secret(config: Config) -> bytes:
    """JWT_SECRET, or the random key made once in JWT_SECRET_FILE (mode 0600), so that tokens outlive a
    restart.  A key that an older hepop kept inside the tree, where queries could read it, is deleted:
    the tokens it signed are no longer good, and their users log in again."""
    old_path = TreeLayout(config.parquet_dir).old_jwt_secret_path(config.writer_id)
    with contextlib.suppress(FileNotFoundError):
        os.remove(old_path)
        log.warning("deleted the login key %s, which queries could read: tokens issued before are no longer "
                    "valid (log in again); the key is now %s", old_path, config.jwt_secret_file)
    if config.jwt_secret:
        return config.jwt_secret.encode()
    path = config.jwt_secret_file
    with contextlib.suppress(FileExistsError):
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(b64url(os.urandom(32)).encode())
            out.flush()
            os.fsync(out.fileno())
        os.link(path + ".tmp", path)        # FileExistsError: made already, keep it
    with contextlib.suppress(FileNotFoundError):
        os.remove(path + ".tmp")
    with open(path, "rb") as source:
        return source.read().strip()


class Users:
    """API_USERS_FILE as it is now: read again when it changes (its size, time or inode) and on SIGHUP
    (reload); a file that no longer parses keeps the users read before, and says why in the log."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._users = read_users(path) if path else {}

    def _file_stamp(self) -> Optional[tuple]:
        try:
            facts = os.stat(self.path)
        except OSError:
            return None
        return facts.st_ino, facts.st_size, facts.st_mtime_ns

    def current(self) -> dict[str, str]:
        if self.path and self._file_stamp() != self._stamp:
            self.reload()
        return self._users

    def reload(self) -> None:
        if not self.path:
            return
        with self._lock:
            stamp = self._file_stamp()
            try:
                users = read_users(self.path)
            except ConfigError as exc:
                log.error("%s: keeping the %d users read before", exc, len(self._users))
                self._stamp = stamp
                return
            removed = sorted(set(self._users) - set(users))
            self._users, self._stamp = users, stamp
        log.info("read %s: %d users%s", self.path, len(users),
                 f"; removed, with their tokens: {', '.join(removed)}" if removed else "")


class Access:
    """Who may use the HTTP API: API_TOKEN, the users of API_USERS_FILE and the tokens they log in for;
    a token is good only while its user is in the file.  With neither set, every route is open (and
    HTTP listens on loopback only)."""

    def __init__(self, config: Config, users: Users, tokens: Tokens):
        self.api_token = config.api_token
        self.users = users
        self.tokens = tokens
        self.checks = threading.BoundedSemaphore(LOGIN_CHECKS)
        self._attempts: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self._decoy = hash_password(os.urandom(8).hex())   # an unknown name costs a check as a known one

    @property
    def closed(self) -> bool:
        return bool(self.api_token or self.users.path)

    def allows(self, authorization: str) -> bool:
        """Whether an Authorization header opens the closed routes."""
        if not self.closed:
            return True
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credential:
            return False
        if self.api_token and hmac.compare_digest(credential.encode(), self.api_token.encode()):
            return True
        claims = self.tokens.check(credential) if self.users.path else None
        return claims is not None and claims.get("username") in self.users.current()

    def start_attempt(self, address: str) -> float:
        """0 if `address` may try to log in now, the attempt then counted as failed until `login` says
        otherwise; else the seconds until it may.  Counted before the password is checked, so that
        attempts sent at the same moment are limited as ones sent one after the other."""
        with self._lock:
            now = time.monotonic()
            recent = [t for t in self._attempts.pop(address, []) if t > now - LOGIN_WINDOW_S]
            wait_s = recent[0] + LOGIN_WINDOW_S - now if len(recent) >= LOGIN_FAILURES_MAX else 0.0
            while len(self._attempts) >= LOGIN_ADDRESSES_MAX:         # the address that tried longest ago
                del self._attempts[next(iter(self._attempts))]
            self._attempts[address] = recent + ([] if wait_s else [now])
            return wait_s

    def login(self, address: str, username: str, password: str) -> Optional[str]:
        """A token for a right name and password (the attempt started by start_attempt then no longer
        counts); None for a wrong one."""
        users = self.users.current()
        with self.checks:
            stored = users.get(username)
            right = password_matches(password, stored or self._decoy) and stored is not None
        if not right:
            return None
        with self._lock:
            if self._attempts.get(address):
                self._attempts[address].pop()
        return self.tokens.issue(username)


# ---------------------------------------------------------------------------------------------------------
# HOMER API: HOMER 7's /api/v3 searches, ladders and exports, as SQL over the stored files.  What the
# requests and answers look like is homer-app's; the SQL is built here from names and values the
# request gives, never from its text: field names come from HOMER_FIELDS, values are $parameters.
# ---------------------------------------------------------------------------------------------------------

class HomerError(ValueError):
    """A HOMER request that cannot be answered as asked (400)."""


HOMER_NODE = "localnode"
DEFAULT_SEARCH_LIMIT = 200
# HOMER's answers are made in the capture process, from the rows' JSON: json.loads holds the GIL, about
# 50 ms for 10,000 rows here, which the kernel's receive buffer covers at 20,000 packets/s.
MAX_SEARCH_LIMIT = 10_000
CALL_METHODS = ("INVITE", "ACK", "BYE", "CANCEL", "UPDATE", "PRACK", "REFER", "INFO", "NOTIFY")


class SipProfile(NamedTuple):
    """HOMER 7 files SIP under a profile by its CSeq method, responses with their request."""
    methods: tuple
    negated: bool                   # every method but these

    def condition(self, few_rows: bool) -> str:
        """The CSeq method is (or is not) one of `methods`.  DuckDB makes an IN of five values or more a
        join above the scan: cheapest for a search that keeps few rows (a Call-ID's over a day of 10 M
        rows: 160-195 ms, 211 ms as a word in a string), but a newest-first top-N above a join no longer
        skips the older row groups, so for a search that may keep many (a From user's newest 200: 742 ms
        with IN, 529-582 ms so) the methods are a word found in one string."""
        if few_rows or len(self.methods) == 1:
            test = f"{CSEQ_METHOD_SQL} IN ({', '.join(map(sql_string, self.methods))})"
        else:
            test = f"contains(' {' '.join(self.methods)} ', ' ' || {CSEQ_METHOD_SQL} || ' ')"
        return f"NOT {test}" if self.negated else test


SIP_PROFILES = {
    "call": SipProfile(CALL_METHODS, False),
    "registration": SipProfile(("REGISTER",), False),
    "default": SipProfile(CALL_METHODS + ("REGISTER",), True),
}
# A message's id: 53 bits (a JavaScript number) of the md5 of what makes it itself, so that it is the same
# before and after compaction, after a restart and from any writer, with no column to store.  Ids are
# looked up within seconds of the message's time, where two messages with the same time, addresses,
# ports and length do not occur.
MESSAGE_ID_SQL = ("CAST(md5_number(concat_ws('|', epoch_us(time), src_ip, src_port, dst_ip, dst_port, capture_id, "
                  "length(payload))) % 9007199254740881 AS BIGINT)")
NON_SIP_METHODS = {100: "LOG", 5: "RTCP", 34: "Report RTP", 35: "Report RTP", 54: "ISUP", 81: "CDR"}
HEADER_FIELDS = {
    "protocol_header.correlation_id": "correlation_id", "protocol_header.srcIp": "src_ip",
    "protocol_header.srcPort": "src_port", "protocol_header.dstIp": "dst_ip", "protocol_header.dstPort": "dst_port",
    "protocol_header.timeSeconds": "epoch_us(time) // 1000000", "protocol_header.timeUseconds": "epoch_us(time) % 1000000",
    "protocol_header.payloadType": "proto_type", "protocol_header.protocolFamily": "ip_family",
    "protocol_header.protocol": "protocol", "protocol_header.captureId": "capture_id", "id": MESSAGE_ID_SQL,
    "raw": "payload",
    "protocol_header.capturePass": "CAST(NULL AS VARCHAR)",      # the auth key is never stored
}
# Fields of HOMER's mapping that say where to search, not what: one node here, the profile is the key.
LOCATION_FIELDS = ("node", "profile")
SIP_FIELDS_SQL = {
    "sid": "call_id", "data_header.callid": "call_id",
    "data_header.method": "coalesce(sip_method, CAST(sip_status AS VARCHAR))",
    "data_header.ruri_user": "ruri_user", "data_header.from_user": "from_user", "data_header.to_user": "to_user",
    "data_header.user_agent": "user_agent", "data_header.cseq": "cseq",
    "data_header.from_tag": r"regexp_extract(payload, '(?im)^(?:from|f)[ \t]*:[^\r\n]*?;[ \t]*tag=([^;>\s]+)', 1)",
    "data_header.to_tag": r"regexp_extract(payload, '(?im)^(?:to|t)[ \t]*:[^\r\n]*?;[ \t]*tag=([^;>\s]+)', 1)",
    "data_header.ruri_domain": r"regexp_extract(payload, '^[A-Za-z]+ sips?:(?:[^@\s>;]*@)?([^\s;>:]+)', 1)",
    "data_header.protocol": r"regexp_extract(payload, '(?im)^(?:via|v)[ \t]*:[ \t]*SIP/2\.0/([A-Za-z]+)', 1)",
}


def homer_fields(proto_type: int) -> dict[str, str]:
    """The fields a search may name for a type, and the SQL of each."""
    if proto_type == SIP_TYPE:
        return {**HEADER_FIELDS, **SIP_FIELDS_SQL}
    return {**HEADER_FIELDS, "sid": "correlation_id"}


def homer_columns(proto_type: int) -> str:
    """The columns of a HOMER row, as SQL (each the row's key)."""
    fields = homer_fields(proto_type)
    columns = {"id": fields["id"], "create_date": "epoch_ms(time)", "sid": fields["sid"], "srcIp": "src_ip",
               "dstIp": "dst_ip", "srcPort": "src_port", "dstPort": "dst_port", "protocol": "protocol",
               "protocolFamily": "ip_family", "payloadType": "proto_type", "captureId": "capture_id",
               "timeSeconds": fields["protocol_header.timeSeconds"],
               "timeUseconds": fields["protocol_header.timeUseconds"],
               "correlation_id": "coalesce(correlation_id, '')"}
    if proto_type == SIP_TYPE:
        columns.update({name.split(".")[1]: fields[name] for name in fields            # `protocol` stays the
                        if name.startswith("data_header.") and name != "data_header.protocol"})  # header's number
    else:
        columns["method"] = sql_string(NON_SIP_METHODS.get(proto_type, f"HEP {proto_type}"))
    return ", ".join(f'{sql} AS "{name}"' for name, sql in columns.items())


class HomerSearch(NamedTuple):
    proto_type: int
    sql: str
    params: dict


HOMER_LATEST_MS = 253_402_300_799_999


def homer_window(request: dict) -> TimeWindow:
    """timestamp.from/to (ms, as the UI sends them) as a TimeWindow."""
    try:
        stamps = request["timestamp"]
        low_ms, high_ms = int(stamps["from"]), int(stamps["to"])
    except (KeyError, TypeError, ValueError):
        raise HomerError('the request needs "timestamp": {"from": ms, "to": ms}') from None
    if not 0 <= low_ms <= HOMER_LATEST_MS or not 0 <= high_ms <= HOMER_LATEST_MS:
        raise HomerError(f"timestamp.from and timestamp.to are milliseconds since 1970, from 0 to "
                         f"{HOMER_LATEST_MS} (the end of year 9999)")
    if low_ms > high_ms:
        raise HomerError("timestamp.from is after timestamp.to")
    return TimeWindow(low_ms * 1000, high_ms * 1000 + 999, False)


def homer_search(profile: str, fields: list, orlogic: bool, window: TimeWindow, with_raw: bool,
                 condition: str = "") -> HomerSearch:
    """The SQL of one profile's search (`1_call`, `100_default`, ...): its conditions, ANDed or, with
    `orlogic` or a value starting '||', ORed; the newest `limit` rows (the pseudo-field, 200 by default)."""
    type_text, _, name = profile.partition("_")
    if not type_text.isdigit() or not 0 <= int(type_text) <= 255:
        raise HomerError(f"unknown search profile {profile!r}: use <hepid>_<profile>, e.g. 1_call")
    proto_type = int(type_text)
    known = homer_fields(proto_type)
    params, limit = {}, DEFAULT_SEARCH_LIMIT
    if proto_type == SIP_TYPE and name not in SIP_PROFILES:
        raise HomerError(f"unknown SIP profile {name!r}: use call, registration or default")
    if not isinstance(fields, list):
        raise HomerError(f"param.search.{profile} must be a list of {{name, value}}")
    terms, by_call_id = "", False           # whether `terms` keeps only the rows of given Call-IDs
    for field in fields:
        try:
            field_name, value, kind = str(field["name"]), str(field["value"]), str(field.get("type", "string"))
        except (KeyError, TypeError, AttributeError):
            raise HomerError(f"a search field of {profile} is not {{name, value}}") from None
        if field_name in LOCATION_FIELDS:
            continue
        if field_name == "limit":
            if not value.strip().isdigit() or not 0 < int(value) <= MAX_SEARCH_LIMIT:
                raise HomerError(f"limit {value!r} is not a number of rows from 1 to {MAX_SEARCH_LIMIT}")
            limit = int(value)
            continue
        if field_name not in known:
            raise HomerError(f"unknown search field {field_name!r} for {profile}")
        joiner = "OR" if orlogic or value.startswith("||") else "AND"
        value = value.removeprefix("||")
        call_ids = known[field_name] == "call_id" and not any(mark in value for mark in ("!=", "%", "isNull",
                                                                                          "isEmpty"))
        if not terms:
            by_call_id = call_ids
        elif joiner == "AND":
            by_call_id = by_call_id or call_ids
        else:
            by_call_id = by_call_id and call_ids
        term = search_term(known[field_name], field_name, value, kind, params)
        terms = f"({terms}) {joiner} ({term})" if terms else term
    profile_condition = SIP_PROFILES[name].condition(by_call_id) if proto_type == SIP_TYPE else ""
    where = " AND ".join(c for c in [f"time BETWEEN make_timestamp({window.low_us}) AND make_timestamp({window.high_us})",
                                     profile_condition, f"({terms})" if terms else "", condition] if c)
    # Three steps in one statement.  The times of the newest `limit` matches first, from the searched
    # columns alone; then the rows, read only from the row groups between the oldest and the newest of
    # those times; the columns made of the payload (tags, domain, the id) only for those rows.  Reading
    # whole rows of every match (payload included) took a From user's search over a day of 10 M rows
    # 936 ms, this 0.5 s (Intel Xeon); bounding the second step by the newest time too took a Call-ID's
    # search over that day from 230 to 160 ms in DuckDB (AMD EPYC): the hours after the call are not read again.
    columns = homer_columns(proto_type) + (', payload AS "raw"' if with_raw else "")
    sql = (f"WITH newest AS MATERIALIZED (SELECT time FROM hep_{proto_type} WHERE {where} ORDER BY time DESC "
           f"LIMIT {limit}) SELECT {columns}, time FROM (SELECT * FROM hep_{proto_type} WHERE {where} AND "
           f"time BETWEEN (SELECT min(time) FROM newest) AND (SELECT max(time) FROM newest) "
           f"ORDER BY time DESC LIMIT {limit}) ORDER BY time")
    return HomerSearch(proto_type, sql, params)


def search_term(column_sql: str, field_name: str, value: str, kind: str, params: dict) -> str:
    """One condition in HOMER's value syntax: '!=' negates; 'a;b' is IN; '%' is LIKE; isEmpty, isNull;
    `raw` matches the payload case-blind anywhere; type integer compares numbers."""
    negate = value.startswith("!=")
    value = value.removeprefix("!=").strip()
    key = f"p{len(params)}"
    text = f"CAST({column_sql} AS VARCHAR)"
    if value == "isNull":
        term = f"{column_sql} IS NULL"
    elif value == "isEmpty":
        term = f"({column_sql} IS NULL OR {text} = '')"
    elif field_name == "raw":
        params[key] = value if "%" in value else f"%{value}%"
        term = f"{column_sql} ILIKE ${key}"
    elif kind == "integer":
        try:
            params[key] = [int(v) for v in value.split(";")]
        except ValueError:
            raise HomerError(f"{field_name}: {value!r} is not an integer") from None
        term = f"list_contains(${key}::BIGINT[], TRY_CAST({column_sql} AS BIGINT))"
    elif ";" in value:
        params[key] = [v.strip() for v in value.split(";")]
        term = f"list_contains(${key}::VARCHAR[], {text})"
    elif "%" in value:
        params[key] = value
        term = f"{text} LIKE ${key}"
    else:
        params[key] = value
        term = f"{text} = ${key}"
    return f"NOT coalesce({term}, false)" if negate else term


def homer_row(row: dict, profile: str) -> dict:
    """A row as homer-app gives it: its own keys, and the ones it adds."""
    row.pop("time", None)
    host_of = lambda ip, port: f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"
    return {**row, "uuid": row["id"], "node": HOMER_NODE, "dbnode": HOMER_NODE,
            "aliasSrc": host_of(row["srcIp"], row["srcPort"]), "aliasDst": host_of(row["dstIp"], row["dstPort"]),
            "table": f"hep_proto_{profile}", "profile": profile}


def search_profiles(request: dict) -> dict:
    try:
        search = request["param"]["search"]
    except (KeyError, TypeError):
        raise HomerError('the request needs "param": {"search": {"1_call": [...]}}') from None
    if not isinstance(search, dict):
        raise HomerError("param.search must be an object keyed by profile")
    return search


def transaction_call_ids(request: dict) -> list[str]:
    """The Call-IDs a transaction, export or report asks for, from every profile of param.search."""
    ids = []
    for value in search_profiles(request).values():
        if isinstance(value, dict):
            found = value.get("callid") or value.get("sid") or []
            ids.extend(found if isinstance(found, list) else [found])
    ids = [str(i) for i in ids if str(i)]
    if not ids:
        raise HomerError('the request names no call: param.search.1_call.callid is a list of Call-IDs')
    return ids


# homer-app looks around the window the UI sends (itself the call's time +-300 s) so that a call whose
# messages straddle its edges comes back whole: the "empty ladder" HOMER users meet comes from a narrower one.
TRANSACTION_BEFORE_US = 600 * 1_000_000
TRANSACTION_AFTER_US = 600 * 1_000_000
TRANSACTION_MAX_ROWS = 5000


def transaction_sql(proto_type: int, with_correlated: bool) -> str:
    """A call's messages of one type: SIP by Call-ID or by a correlation id naming one (the other leg),
    other types by correlation id; $ids, $low, $high."""
    match = "(list_contains($ids, call_id) OR list_contains($ids, correlation_id))" if with_correlated \
        else "list_contains($ids, correlation_id)"
    return (f"SELECT {homer_columns(proto_type)}, payload AS raw, time FROM hep_{proto_type} "
            f"WHERE time BETWEEN make_timestamp($low) AND make_timestamp($high) AND {match} "
            f"ORDER BY time LIMIT {TRANSACTION_MAX_ROWS}")


def ladder(messages: list[dict]) -> dict:
    """The transaction's data: `messages`, `calldata` (one per message, joined on create_date and id),
    `hosts` in the order they first appear, `alias`."""
    hosts: dict[str, dict] = {}
    calldata = []
    for message in messages:
        source, destination = message["aliasSrc"], message["aliasDst"]
        for host in (source, destination):
            hosts.setdefault(host, {"host": [host], "position": len(hosts)})
        method = message.get("method") or ""
        calldata.append({
            "id": message["id"], "sid": message["sid"], "create_date": message["create_date"],
            "srcHost": message["srcIp"], "dstHost": message["dstIp"], "srcIp": message["srcIp"],
            "dstIp": message["dstIp"], "srcPort": message["srcPort"], "dstPort": message["dstPort"],
            "srcId": source, "dstId": destination, "aliasSrc": source, "aliasDst": destination,
            "method": method, "method_text": method, "protocol": message["protocol"],
            "msg_color": "red" if method[:1] in "3456" and method.isdigit() else
                         "green" if method.isdigit() else "blue",
            "ruri_user": message.get("ruri_user") or "", "destination": hosts[destination]["position"],
            "table": message["table"]})
    return {"messages": messages, "calldata": calldata, "hosts": hosts, "alias": {}}


def side_sql(proto_types: list[int]) -> str:
    """A call's rows of other types (logs, RTCP, RTP reports), by the correlation id they carry; $ids,
    $low, $high."""
    return " UNION ALL ".join(
        f"SELECT {homer_columns(t)}, payload AS raw, time FROM hep_{t} WHERE time BETWEEN make_timestamp($low) "
        f"AND make_timestamp($high) AND list_contains($ids, correlation_id)" for t in proto_types) + \
        f" ORDER BY time LIMIT {TRANSACTION_MAX_ROWS}"


# -- what the stock HOMER UI asks for besides searches ---------------------------------------------------

SEARCH_PROFILES = ((SIP_TYPE, "call", "SIP"), (SIP_TYPE, "registration", "SIP"), (SIP_TYPE, "default", "SIP"),
                   (100, "default", "LOG"), (5, "default", "RTCP"))
INTEGER_FIELDS = {"protocol_header.srcPort", "protocol_header.dstPort", "protocol_header.timeSeconds",
                  "protocol_header.timeUseconds", "protocol_header.payloadType", "protocol_header.protocolFamily",
                  "protocol_header.protocol", "protocol_header.captureId", "id"}
HOME_SEARCH_FIELDS = ("data_header.from_user", "data_header.to_user", "data_header.ruri_user",
                      "data_header.callid", "data_header.method", "protocol_header.srcIp", "protocol_header.dstIp")
MAX_DASHBOARDS = 100
MAX_DASHBOARD_BYTES = 256 << 10     # the UI's own are a few KB
# The columns the UI's result grid shows at first (the user picks others in its settings); all of them
# at once made each too narrow to read its header.
SHOWN_FIELDS = {"data_header.method", "data_header.from_user", "data_header.to_user", "data_header.ruri_user",
                "data_header.callid", "data_header.user_agent", "data_header.cseq", "protocol_header.srcIp",
                "protocol_header.srcPort", "protocol_header.dstIp", "protocol_header.dstPort",
                "protocol_header.correlation_id"}


def field_title(name: str) -> str:
    """'data_header.from_user' as 'From user', 'protocol_header.srcIp' as 'Src IP'."""
    words = re.sub(r"([a-z])([A-Z])", r"\1 \2", name.rpartition(".")[2]).replace("_", " ")
    return words[:1].upper() + words[1:].replace(" ip", " IP").replace("id", "ID" if words == "id" else "id")


def protocol_mapping() -> list[dict]:
    """/mapping/protocol: each profile hepop searches, with the fields it takes (homer_fields)."""
    entries = []
    for position, (proto_type, profile, alias) in enumerate(SEARCH_PROFILES):
        fields = [{"id": name, "name": field_title(name), "type": "integer" if name in INTEGER_FIELDS else "string",
                   "index": "none", "form_type": "input", "position": index, "skip": False,
                   "hide": name not in SHOWN_FIELDS}
                  for index, name in enumerate(homer_fields(proto_type))]
        entries.append({"guid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"hepop:{proto_type}_{profile}")),
                        "profile": profile, "hepid": proto_type, "hep_alias": alias, "partid": 10, "version": 1,
                        "retention": 7, "partition_step": 10, "create_index": {}, "create_table": "",
                        "fields_mapping": fields, "correlation_mapping": [], "schema_mapping": {},
                        "schema_settings": {}, "position": position})
    return entries


def home_dashboard() -> dict:
    """The dashboard the UI opens first, until one is saved: a call search form and its results."""
    fields = [{"field_name": name, "hepid": SIP_TYPE, "name": f"1:call:{name}", "selection": field_title(name),
               "type": "string", "value": ""} for name in HOME_SEARCH_FIELDS]
    # The UI shows a search's results in the dashboard's result widget only with this field; without it,
    # it opens its own results page.
    fields.append({"field_name": "targetResultsContainer", "hepid": SIP_TYPE, "name": "1:call:targetResultsContainer",
                   "selection": "Results container", "type": "string", "value": ""})
    search = {"id": "protosearch-home", "name": "protosearch", "title": "Call search", "group": "Search",
              "description": "Search calls", "refresh": False, "row": 0, "rows": 2, "col": 0, "cols": 2,
              "x": 0, "y": 0, "countFieldColumns": 1, "fields": fields,
              "config": {"title": "Call search", "searchbutton": True,
                         "protocol_id": {"name": "SIP", "value": SIP_TYPE},
                         "protocol_profile": {"name": "call", "value": "call"}}}
    return {"id": "home", "name": "Home", "alias": "home", "param": "home", "type": 1, "shared": False,
            "weight": 10, "selectedItem": "",
            "config": {"columns": 5, "gridType": "scrollVertical", "ignoreMinSize": "Ignore", "maxrows": 5,
                       "pushing": True},
            "widgets": [{"id": "protosearch-home", "name": "protosearch", "strongIndex": "ProtosearchWidgetComponent",
                         "title": "Call search", "x": 0, "y": 0, "cols": 2, "rows": 2, "output": {}, "config": search},
                        {"id": "result-home", "name": "result", "strongIndex": "ResultWidgetComponent",
                         "title": "Results", "x": 2, "y": 0, "cols": 3, "rows": 2, "output": {}, "config": {}}]}


class Dashboards:
    """The dashboards the UI saves, kept in WRITER_ID/dashboards.json (written atomically)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()

    def all(self) -> dict[str, dict]:
        try:
            with open(self.path) as source:
                saved = json.load(source)
            return saved if isinstance(saved, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, name: str) -> Optional[dict]:
        return self.all().get(name) or (home_dashboard() if name == "home" else None)

    def put(self, name: str, dashboard: dict) -> None:
        with self._lock:
            saved = self.all()
            if name not in saved and len(saved) >= MAX_DASHBOARDS:
                raise HomerError(f"{MAX_DASHBOARDS} dashboards are kept at most: delete one first")
            if len(json.dumps(dashboard)) > MAX_DASHBOARD_BYTES:
                raise HomerError(f"a dashboard is {MAX_DASHBOARD_BYTES >> 10} KiB at most")
            saved[name] = dashboard
            write_atomically(self.path, lambda out: out.write(json.dumps(saved).encode()))

    def delete(self, name: str) -> None:
        with self._lock:
            saved = self.all()
            saved.pop(name, None)
            write_atomically(self.path, lambda out: out.write(json.dumps(saved).encode()))


# -- pcap: the call as packets that Wireshark opens ------------------------------------------------------

PCAP_LINKTYPE_RAW = 101             # each record starts with its IPv4 or IPv6 header
PCAP_MAX_PAYLOAD = 65_000


def internet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip_packet(message: dict, payload: bytes, tcp_sequence: dict) -> bytes:
    """An IPv4 or IPv6 packet with a UDP or TCP segment carrying `payload`, from the stored addresses."""
    v6 = ":" in message["srcIp"]
    family = socket.AF_INET6 if v6 else socket.AF_INET
    source, destination = socket.inet_pton(family, message["srcIp"]), socket.inet_pton(family, message["dstIp"])
    ports = struct.pack("!HH", message["srcPort"] or 0, message["dstPort"] or 0)
    tcp = message["protocol"] == 6
    if tcp:
        flow = (message["srcIp"], message["srcPort"], message["dstIp"], message["dstPort"])
        sequence = tcp_sequence.get(flow, 1)
        tcp_sequence[flow] = (sequence + len(payload)) & 0xFFFFFFFF
        segment = ports + struct.pack("!IIBBHHH", sequence, 1, 5 << 4, 0x18, 65535, 0, 0) + payload
        number = 6
    else:
        segment = ports + struct.pack("!HH", 8 + len(payload), 0) + payload
        number = 17
    pseudo = (source + destination + struct.pack("!IxxxB", len(segment), number) if v6 else
              source + destination + struct.pack("!xBH", number, len(segment)))
    checksum = internet_checksum(pseudo + segment) or 0xFFFF
    at = 16 if tcp else 6
    segment = segment[:at] + struct.pack("!H", checksum) + segment[at + 2:]
    if v6:
        return struct.pack("!IHBB", 6 << 28, len(segment), number, 64) + source + destination + segment
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), 0, 0x4000, 64, number, 0, source, destination)
    header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
    return header + segment


def pcap_of(messages: list[dict]) -> bytes:
    """A pcap file (microsecond times, raw IP) of the messages, in time order."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, PCAP_LINKTYPE_RAW)]
    tcp_sequence: dict = {}
    for message in messages:
        payload = message["raw"].encode("utf-8", "surrogateescape")[:PCAP_MAX_PAYLOAD]
        packet = ip_packet(message, payload, tcp_sequence)
        out.append(struct.pack("<IIII", message["timeSeconds"], message["timeUseconds"], len(packet), len(packet)))
        out.append(packet)
    return b"".join(out)


def text_of(messages: list[dict]) -> str:
    """The call's flow as text: each message with its time and addresses, then its payload."""
    lines = []
    for message in messages:
        lines.append(f"{format_time(message['timeSeconds'] * 1_000_000 + message['timeUseconds'])} "
                     f"{message['aliasSrc']} -> {message['aliasDst']} {message.get('method', '')}")
        lines.append(message["raw"].replace("\r\n", "\n").rstrip("\n"))
        lines.append("")
    return "\n".join(lines) + "\n"


def sip_profile_of(row: dict) -> str:
    """The HOMER profile of a SIP row, by its CSeq method as HOMER 7 files it."""
    method = (row.get("cseq") or "").partition(" ")[2].strip().upper()
    return "1_call" if method in CALL_METHODS else "1_registration" if method == "REGISTER" else "1_default"


# ---------------------------------------------------------------------------------------------------------
# HTTP: a route table on HTTP_PORT (/query, /health, /metrics), every answer JSON, errors in one place.
# ---------------------------------------------------------------------------------------------------------

MAX_BODY_BYTES = 1 << 20
# A body over MAX_BODY_BYTES but under this is read and thrown away before the 413: a client that is
# still sending when the server closes gets a broken pipe instead of the answer.  Larger: 413 at once.
DISCARD_BODY_BYTES = 16 << 20
QUERY_WAIT_S = 2.0                  # how long a query waits for one of MAX_QUERIES turns before its 503
LINGER_S = 2.0                      # how long a connection closed on an unread body drops what still comes
# A request's line and headers must all arrive within this, however slowly each line comes: a per-read
# timeout let connections that send a header line every 5 s hold every slot (slowloris).
HEAD_TIMEOUT_S = 10.0


class HeadReader:
    """A handler's rfile that bounds the reading of a request's head in time: each line read while
    `deadline` is set waits only for what is left of it (TimeoutError after), the rest as the socket's
    own timeout says."""

    def __init__(self, rfile, sock: socket.socket):
        self.rfile = rfile
        self.sock = sock
        self.deadline: Optional[float] = None
        self.head_bytes = 0             # of the head being read
        self.timed_out = False          # a head had begun and did not end in time

    def readline(self, size: int = -1) -> bytes:
        if self.deadline is None:
            return self.rfile.readline(size)
        try:
            left_s = self.deadline - time.monotonic()
            if left_s <= 0:
                raise TimeoutError("the request's head took too long")
            self.sock.settimeout(left_s)
            line = self.rfile.readline(size)
        except TimeoutError:
            self.timed_out = self.head_bytes > 0        # not an idle connection's end
            raise
        self.head_bytes += len(line)
        return line

    def __getattr__(self, name: str):
        return getattr(self.rfile, name)


class Api:
    """What the HTTP handlers serve: the query engine, the counters, and the state /health reports."""

    def __init__(self, config: Config, counters: Counters, writer: BatchWriter, storage: Storage,
                 uploader: Optional[Uploader], udp_inode: Callable, access: Access, heard: AgentsHeard):
        self.config = config
        self.uploader = uploader
        self.access = access
        self.counters = counters
        self.writer = writer
        self.storage = storage
        self.udp_inode = udp_inode
        self.heard = heard
        self.catalog = FileCatalog(storage)
        self.dashboards = Dashboards(storage.layout.dashboards_path(config.writer_id))
        self.queries = QueryProcess(config, counters)
        self.query_turns = threading.BoundedSemaphore(config.max_queries)
        self.started = time.time()

    def query_call(self) -> QueryCall:
        return QueryCall(self.queries, self.catalog, self.counters, self.config.query_timeout_s + QUERY_GRACE_S)

    def health(self) -> tuple[int, dict]:
        """200 while writes succeed; 503 with the reason while they fail or the disk is full."""
        last = self.writer.last_flush
        failing = self.writer.failing or ("the disk is over MAX_DISK_BYTES / MAX_DISK_PERCENT with only the "
                                          "current hour left: what arrives is dropped until there is room"
                                          if self.storage.disk.full.is_set() else None)
        body = {"status": ("disk_full" if self.storage.disk.full.is_set() else "failing") if failing else "ok",
                "version": __version__,
                "writer_id": self.config.writer_id, "uptime_s": round(time.time() - self.started, 1),
                "last_flush": None if last is None else format_time(int(last * 1e6))}
        if failing:
            body["error"] = failing
        # Nothing received for QUIET_WARNING_S: not a failure of hepop's, but the first thing to look at.
        body["receiving"] = not self.heard.quiet
        body["last_received"] = None if self.heard.last_received_us is None else format_time(self.heard.last_received_us)
        if self.uploader:           # capture goes on while the bucket fails: a warning, not a failure
            body["uploads"] = {"status": "failing" if self.uploader.failing else "ok",
                               "backlog_folders": self.uploader.backlog()}
            if self.uploader.failing:
                body["uploads"]["error"] = self.uploader.failing
        return (503 if failing else 200), body

    def metrics(self) -> str:
        """Every counter in Prometheus text format, plus the kernel's drops on our UDP socket."""
        values = self.counters.snapshot()
        values["uptime_seconds"] = time.time() - self.started
        values["pending_bytes"] = self.writer.pending_bytes
        values["udp_kernel_drops_total"] = udp_kernel_drops(self.udp_inode())
        if self.uploader:
            values["upload_backlog_folders"] = self.uploader.backlog()
        lines, typed = [], set()
        for key, value in sorted(values.items()):
            name = key.split("{")[0]
            kind = "counter" if name.endswith("_total") else "gauge"
            for suffix in ("_bucket", "_sum", "_count"):
                if name.endswith(suffix) and name[:-len(suffix)] in self.counters.histograms:
                    name, kind = name[:-len(suffix)], "histogram"
            name = "hepop_" + name
            if name not in typed:
                lines.append(f"# TYPE {name} {kind}")
                typed.add(name)
            lines.append(f"hepop_{key} {value:g}" if isinstance(value, float) else f"hepop_{key} {value}")
        return "\n".join(lines) + "\n"


def udp_kernel_drops(inode: Optional[int]) -> int:
    """Datagrams the kernel dropped on our UDP socket (receive buffer full), from /proc/net/udp[6]."""
    if inode is None:
        return 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as source:
                for line in source.readlines()[1:]:
                    fields = line.split()
                    if len(fields) > 12 and int(fields[9]) == inode:
                        return int(fields[-1])
        except OSError:
            continue
    return 0


class ResponseCut(Exception):
    """A response that ended short after its 200 went out; counted as aborted, nothing more to send."""


class HttpError(Exception):
    """An answer other than 200, with the reason a client reads in `error`."""

    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class Route(NamedTuple):
    """One entry of the route table: a method and a path pattern (a regex matched whole, whose named
    groups are passed to the handler) served by an ApiHandler method."""
    method: str
    pattern: re.Pattern
    handler: str
    open: bool = False          # answered without the API token


ROUTES = (
    Route("GET", re.compile(r"/health"), "get_health", open=True),
    Route("GET", re.compile(r"/metrics"), "get_metrics"),
    Route("GET", re.compile(r"/query"), "query"),
    Route("POST", re.compile(r"/query"), "query"),
    Route("POST", re.compile(r"/api/v3/auth"), "login", open=True),
    Route("GET", re.compile(r"/api/v3/auth/type/list"), "auth_types", open=True),
    Route("POST", re.compile(r"/api/v3/search/call/data"), "homer_search_data"),
    Route("POST", re.compile(r"/api/v3/search/call/message"), "homer_search_message"),
    Route("POST", re.compile(r"/api/v3/call/transaction"), "homer_transaction"),
    Route("POST", re.compile(r"/api/v3/export/call/messages/pcap"), "homer_export_pcap"),
    Route("POST", re.compile(r"/api/v3/export/call/messages/text"), "homer_export_text"),
    Route("POST", re.compile(r"/api/v3/call/report/log"), "homer_report_log"),
    Route("POST", re.compile(r"/api/v3/call/report/qos"), "homer_report_qos"),
    Route("POST", re.compile(r"/api/v3/search/call/decode/message"), "homer_decode"),
    Route("GET", re.compile(r"/api/v3/mapping/protocol"), "homer_mapping"),
    Route("GET", re.compile(r"/api/v3/dashboard/info"), "homer_dashboard_list"),
    Route("GET", re.compile(r"/api/v3/dashboard/store/(?P<name>[\w.-]{1,64})"), "homer_dashboard_get"),
    Route("PUT", re.compile(r"/api/v3/dashboard/store/(?P<name>[\w.-]{1,64})"), "homer_dashboard_put"),
    Route("POST", re.compile(r"/api/v3/dashboard/store/(?P<name>[\w.-]{1,64})"), "homer_dashboard_put"),
    Route("DELETE", re.compile(r"/api/v3/dashboard/store/(?P<name>[\w.-]{1,64})"), "homer_dashboard_delete"),
    Route("GET", re.compile(r"/api/v3/users/profile"), "homer_profile"),
    Route("GET", re.compile(r"/api/v3/database/node/list"), "homer_nodes"),
    Route("GET", re.compile(r"/api/v3/version/api/info"), "homer_version"),
    Route("GET", re.compile(r"/api/v3/modules/status"), "homer_modules"),
    Route("GET", re.compile(r"/api/v3/(?P<what>advanced|alias|hepsub/protocol|agent/subscribe|"
                            r"user/settings(?:/[\w-]{1,64})?)"), "homer_empty"),
    Route("GET", re.compile(r"/(?!api/|query$|health$|metrics$)(?P<path>.*)"), "static_file", open=True),
)

# hepop's own page (ui/ beside this file, and inside the binary): served at / unless UI_DIR names another.
# It asks nothing of any other host, and its Content-Security-Policy says so to the browser.
BUILTIN_UI_DIR = os.path.join(getattr(sys, "_MEIPASS", os.path.dirname(os.path.abspath(__file__))), "ui")
BUILTIN_UI_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


class ApiHandler(http.server.BaseHTTPRequestHandler):
    """Answers by the route table (ROUTES); every answer, errors included, is JSON with an `error`."""

    server_version = f"hepop/{__version__}"
    protocol_version = "HTTP/1.1"
    timeout = 10                    # seconds a client may be silent: idle, or in the middle of a body
    unread_body = False             # a body was left unread: close after the answer, lingering (finish)
    body_read = False               # read_body was called for this request

    @property
    def api(self) -> Api:
        return self.server.api

    def setup(self) -> None:
        super().setup()
        self.rfile = HeadReader(self.rfile, self.connection)

    def handle_one_request(self) -> None:
        """One request, its head (line and headers) within HEAD_TIMEOUT_S from when the server waits for
        it; while it waits, a new connection may take its slot (ApiServer.process_request)."""
        self.rfile.deadline = time.monotonic() + HEAD_TIMEOUT_S
        self.server.heads.waiting(self.connection)
        try:
            super().handle_one_request()
        finally:
            self._head_read()
        if self.rfile.timed_out:
            self.server.api.counters.add("http_head_timeouts_total")

    def _head_read(self) -> None:
        self.rfile.deadline, self.rfile.head_bytes = None, 0
        self.server.heads.done(self.connection)
        with contextlib.suppress(OSError):
            self.connection.settimeout(self.timeout)

    def parse_request(self) -> bool:
        """Also take a request line whose URL has raw spaces (a query typed as is), as %20.  The head
        is read once this returns: the body and the answer go by the socket's own timeout."""
        words = self.raw_requestline.split()
        if len(words) > 3 and words[-1].startswith(b"HTTP/"):
            self.raw_requestline = b" ".join([words[0], b"%20".join(words[1:-1]), words[-1]]) + b"\r\n"
        parsed = super().parse_request()
        self._head_read()
        return parsed

    def send_response(self, code: int, message: Optional[str] = None) -> None:
        """An answer given without reading the request's body (a 401, a route that takes none) closes the
        connection after it: the body's bytes would otherwise be read as the next request."""
        headers = getattr(self, "headers", None)          # none yet for a request line refused as bad
        if headers is not None and not self.body_read and (
                headers.get("Transfer-Encoding") or headers.get("Content-Length", "0").strip() not in ("", "0")):
            self.unread_body = self.close_connection = True
        super().send_response(code, message)

    def route(self) -> None:
        self.body_read = False
        url = urllib.parse.urlsplit(self.path)
        try:
            if len(set(self.headers.get_all("Content-Length") or [])) > 1:    # a proxy may read the other
                self.unread_body = self.close_connection = True
                raise HttpError(400, "the request has Content-Length headers that disagree")
            route, groups = self.find_route(url.path)
            if not route.open and not self.api.access.allows(self.headers.get("Authorization", "")):
                raise HttpError(401, "this server needs 'Authorization: Bearer <token>': a login's token "
                                     "(POST /api/v3/auth) or API_TOKEN")
            getattr(self, route.handler)(url, **groups)
        except HttpError as exc:
            self.send_json(exc.status, {"error": str(exc)}, exc.headers)
        except QueryError as exc:
            self.send_json(exc.status, {"error": str(exc)})
        except HomerError as exc:                   # homer-app's error shape, with hepop's `error`
            self.send_json(400, {"error": str(exc), "message": str(exc), "data": {}})
        except RecursionError:
            self.send_json(400, {"error": "the request is nested too deeply to be read"})
        except (ResponseCut, BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception:
            log.exception("HTTP %s %s failed", self.command, url.path)
            self.send_json(500, {"error": "internal error; see hepop's log"})

    # Every method a client may send reaches the route table, which answers 405 where no route takes it
    # (http.server answers any other with send_error(501), below, and HEAD likewise: no body to a HEAD).
    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = route

    def find_route(self, path: str) -> tuple[Route, dict]:
        allowed = []
        for route in ROUTES:
            match = route.pattern.fullmatch(path)
            if match and route.method == self.command:
                return route, match.groupdict()
            if match:
                allowed.append(route.method)
        if allowed:
            raise HttpError(405, f"{path} takes {', '.join(allowed)}, not {self.command}",
                            {"Allow": ", ".join(allowed)})
        raise HttpError(404, f"no such route: {path}")

    def read_body(self) -> bytes:
        """The request body, read strictly: a Content-Length that is not a number, or a chunked body, is
        refused without reading on; one over MAX_BODY_BYTES is thrown away (up to DISCARD_BODY_BYTES)
        and refused; one that stops short of its length times out after `timeout`."""
        self.body_read = True
        if self.headers.get("Transfer-Encoding"):
            self.unread_body = self.close_connection = True
            raise HttpError(411, "send the body with a Content-Length, not Transfer-Encoding")
        text = self.headers.get("Content-Length") or "0"
        if not text.isdigit():
            self.unread_body = self.close_connection = True
            raise HttpError(400, f"Content-Length {text[:40]!r} is not a number of bytes")
        length = int(text)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            if length <= DISCARD_BODY_BYTES:
                while length > 0 and (data := self._read(min(length, 1 << 16))):
                    length -= len(data)
            else:
                self.unread_body = True
            raise HttpError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        body = self._read(length)
        if len(body) < length:
            self.close_connection = True
            raise HttpError(400, f"the body ended after {len(body)} of its {length} bytes")
        return body

    def _read(self, size: int) -> bytes:
        try:
            return self.rfile.read(size)
        except TimeoutError:
            self.close_connection = True
            raise HttpError(408, f"the body did not come within {self.timeout} s") from None

    # -- routes ----------------------------------------------------------------------------------------

    def get_health(self, url) -> None:
        self.send_json(*self.api.health())

    def login(self, url) -> None:
        """POST /api/v3/auth {"username", "password"}: 201 with a token, as homer-app answers; 401 in its
        error shape; 429 once an address failed LOGIN_FAILURES_MAX times within LOGIN_WINDOW_S."""
        access, address = self.api.access, self.client_address[0]
        wait_s = access.start_attempt(address)
        if wait_s > 0:
            self.api.counters.add("logins_total", result="limited")
            raise HttpError(429, f"too many failed logins from {address}: try again in {wait_s:.0f} s",
                            {"Retry-After": str(math.ceil(wait_s))})
        try:
            request = json.loads(self.read_body())
            username, password = str(request["username"]), str(request["password"])
        except (ValueError, KeyError, TypeError):
            raise HttpError(400, 'the body is not {"username": ..., "password": ...}') from None
        token = access.login(address, username, password) if access.users.path else None
        if token is None:
            self.api.counters.add("logins_total", result="failed")
            self.send_json(401, {"statuscode": 401, "error": "Unauthorized", "message": "wrong username or "
                                 "password" if access.users.path else "no users are set up (API_USERS_FILE)"})
            return
        self.api.counters.add("logins_total", result="ok")
        self.send_json(201, {"token": token, "scope": user_guid(username), "user": {"admin": True}})

    def auth_types(self, url) -> None:
        self.send_json(200, {"data": {"internal": {"enable": True, "name": "Internal", "type": "internal",
                                                   "position": 1}}})

    def get_metrics(self, url) -> None:
        self.send_body(200, self.api.metrics().encode(), "text/plain; version=0.0.4")

    def query(self, url) -> None:
        sql, fmt = self.query_request(url)
        with self.query_turn("200"):
            self.relay_query(sql, fmt)

    @contextlib.contextmanager
    def query_turn(self, status: str):
        """One of MAX_QUERIES turns, waited for QUERY_WAIT_S at most (then 503 with Retry-After), and the
        query counted by its outcome."""
        if not self.api.query_turns.acquire(timeout=QUERY_WAIT_S):
            self.api.counters.add("queries_total", status="503")
            raise HttpError(503, f"MAX_QUERIES ({self.api.config.max_queries}) queries are running: try again",
                            {"Retry-After": str(round(QUERY_WAIT_S))})
        started = time.perf_counter()
        try:
            yield
        except (QueryError, HomerError) as exc:
            status = str(getattr(exc, "status", 400))
            raise
        except BaseException:
            status = "aborted"
            raise
        finally:
            self.api.query_turns.release()
            elapsed = time.perf_counter() - started
            self.api.counters.add("queries_total", status=status)
            self.api.counters.add("query_seconds_total", elapsed)
            self.api.counters.maximum("query_seconds_max", elapsed)

    def query_request(self, url) -> tuple[str, str]:
        """The SQL and the format, from ?q= and ?format=, or a POST body (JSON, form or plain SQL)."""
        params = dict(urllib.parse.parse_qsl(url.query))
        sql, fmt = params.get("q") or params.get("query"), params.get("format", "json")
        if self.command == "POST":
            body = self.read_body().decode("utf-8", "replace")
            kind = self.headers.get("Content-Type", "").split(";")[0].strip()
            if kind == "application/json":
                try:
                    request = json.loads(body)
                    sql, fmt = request.get("query") or request.get("q"), request.get("format", fmt)
                except (ValueError, AttributeError):
                    raise QueryError('the body is not a JSON object like {"query": "SELECT ..."}') from None
            elif kind == "application/x-www-form-urlencoded":
                form = dict(urllib.parse.parse_qsl(body))
                sql, fmt = form.get("q") or form.get("query"), form.get("format", fmt)
            else:
                sql = body
        if not sql or not str(sql).strip():
            raise QueryError("no query: give it as ?q=SELECT... or a POST body {\"query\": \"SELECT ...\"}")
        if fmt not in ResultWriter.TYPES:
            raise QueryError(f"unknown format {fmt!r}: use one of {', '.join(ResultWriter.TYPES)}")
        return str(sql), fmt

    def relay_query(self, sql: str, fmt: str) -> None:
        """Have the query process run the query, holding the files it reads, and pass its rows on as they
        come.  The query process reads READ_AHEAD_BYTES of rows before the headers go out, so that their
        errors still get a status and small results say whether the cap cut them.  An error after that
        ends the response without its last chunk, which every HTTP client reports as a cut transfer, and
        is counted as `aborted`."""
        api = self.api
        with api.query_call() as call:
            start = call.start(QueryJob(sql, fmt, time.time_ns() // 1000))
            headers = {"Content-Type": ResultWriter.TYPES[fmt], "Transfer-Encoding": "chunked",
                       "X-Hepop-Time-Window": call.plan.window.header(), "X-Hepop-Files": str(len(call.held)),
                       "X-Hepop-Row-Cap": str(api.config.query_max_rows)}
            if start.read_since_us is not None:      # the rows before it could not be in the answer
                headers["X-Hepop-Read-From"] = format_time(start.read_since_us)
            if call.left_out:                       # their folders lead where the sandbox may not read
                headers["X-Hepop-Left-Out"] = ", ".join(call.left_out)
            if start.finished:
                headers["X-Hepop-Truncated"] = "true" if start.truncated else "false"
            else:
                headers["Trailer"] = "X-Hepop-Truncated"
            self.send_response(200)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            try:
                for data in call:
                    self.write_chunk(data)
            except QueryCut as exc:
                log.warning("query failed while its rows were being sent: %s", exc)
                self.close_connection = True
                raise ResponseCut(str(exc)) from None
            trailer = b"" if start.finished else \
                f"X-Hepop-Truncated: {'true' if call.truncated else 'false'}\r\n".encode()
            self.wfile.write(b"0\r\n" + trailer + b"\r\n")

    # -- the HOMER API (see the HOMER API section) -----------------------------------------------------------

    def homer_request(self) -> dict:
        try:
            request = json.loads(self.read_body())
        except ValueError:
            raise HomerError("the body is not JSON") from None
        if not isinstance(request, dict):
            raise HomerError("the body is not a JSON object")
        return request

    def homer_rows(self, sql: str, params: dict, proto_type: int, window: TimeWindow) -> list[dict]:
        """The rows of hepop's own SQL over one type's files in `window`, in a query turn."""
        with self.query_turn("201"), self.api.query_call() as call:
            return call.rows(QueryJob(sql, "json", time.time_ns() // 1000, QueryPlan([proto_type], window), params))

    def homer_search_data(self, url) -> None:
        """The call list: each profile's search, newest `limit` rows each, in time order."""
        request = self.homer_request()
        window = homer_window(request)
        orlogic = bool((request.get("param") or {}).get("orlogic"))
        rows = []
        for profile, fields in search_profiles(request).items():
            search = homer_search(profile, fields, orlogic, window, with_raw=profile.startswith("100_"))
            rows += [homer_row(row, profile) for row in self.homer_rows(search.sql, search.params,
                                                                         search.proto_type, window)]
        rows.sort(key=lambda row: (row["timeSeconds"], row["timeUseconds"]))
        self.send_json(201, {"total": len(rows), "data": rows, "keys": sorted({key for row in rows for key in row})})

    def homer_search_message(self, url) -> None:
        """One message by its id (or uuid) in the window, with its payload."""
        request = self.homer_request()
        window = homer_window(request)
        rows = []
        for profile, wanted in search_profiles(request).items():
            if not isinstance(wanted, dict):
                raise HomerError(f"param.search.{profile} must be {{\"id\": ...}}")
            ids = wanted.get("id") or wanted.get("uuid") or []
            try:
                ids = [int(i) for i in (ids if isinstance(ids, list) else [ids])]
            except (TypeError, ValueError):
                raise HomerError("a message id is a number") from None
            search = homer_search(profile, [], False, window, with_raw=True,
                                  condition=f"list_contains($ids::BIGINT[], {MESSAGE_ID_SQL})")
            found = self.homer_rows(search.sql, {**search.params, "ids": ids}, search.proto_type, window) if ids else []
            rows += [{**homer_row(row, profile), "create_ts": row["create_date"], "micro_ts": row["create_date"]}
                     for row in found]
        self.send_json(201, {"total": len(rows), "data": rows, "keys": sorted({key for row in rows for key in row})})

    def homer_call(self, request: dict) -> list[dict]:
        """A call's SIP messages, both legs: the Call-IDs asked for, what names one of them as its
        correlation id, and the Call-IDs those name, over the window widened so the call is whole."""
        window = homer_window(request)
        wide = TimeWindow(window.low_us - TRANSACTION_BEFORE_US, window.high_us + TRANSACTION_AFTER_US, False)
        ids = set(transaction_call_ids(request))
        ids |= {f"{call_id}_b2b-1" for call_id in ids}
        rows: list[dict] = []
        for _ in range(3):
            rows = self.homer_rows(transaction_sql(SIP_TYPE, True), {"ids": sorted(ids), "low": wide.low_us,
                                   "high": wide.high_us}, SIP_TYPE, wide)
            found = ids | {row["sid"] for row in rows} | {row["correlation_id"] for row in rows if row["correlation_id"]}
            if found <= ids:
                break
            ids = found
        return [homer_row(row, sip_profile_of(row)) for row in rows]

    def homer_transaction(self, url) -> None:
        messages = self.homer_call(self.homer_request())
        for message in messages:
            message["create_ts"] = message["create_date"]
        self.send_json(201, {"total": len(messages), "data": ladder(messages), "keys": []})

    def homer_export_pcap(self, url) -> None:
        self.send_body(200, pcap_of(self.homer_call(self.homer_request())), "application/vnd.tcpdump.pcap",
                       {"Content-Disposition": 'attachment; filename="call.pcap"'})

    def homer_export_text(self, url) -> None:
        self.send_body(200, text_of(self.homer_call(self.homer_request())).encode(), "text/plain; charset=utf-8",
                       {"Content-Disposition": 'attachment; filename="call.txt"'})

    def homer_side(self, proto_types: list[int]) -> list[dict]:
        """The call's rows of `proto_types`, by the Call-IDs and window of the request."""
        request = self.homer_request()
        window = homer_window(request)
        wide = TimeWindow(window.low_us - TRANSACTION_BEFORE_US, window.high_us + TRANSACTION_AFTER_US, False)
        ids = sorted(set(transaction_call_ids(request)))
        rows = []
        for proto_type in proto_types:
            rows += [homer_row(row, f"{proto_type}_default") for row in self.homer_rows(
                side_sql([proto_type]), {"ids": ids, "low": wide.low_us, "high": wide.high_us}, proto_type, wide)]
        return rows

    def homer_report_log(self, url) -> None:
        rows = self.homer_side([100])
        self.send_json(201, {"total": len(rows), "data": rows})

    def homer_report_qos(self, url) -> None:
        rows = self.homer_side([5, 34, 35])
        rtcp = [row for row in rows if row["payloadType"] == 5]
        rtp = [row for row in rows if row["payloadType"] != 5]
        self.send_json(201, {"rtcp": {"total": len(rtcp), "data": rtcp}, "rtp": {"total": len(rtp), "data": rtp}})

    def homer_decode(self, url) -> None:
        """What homer-app gets from tshark for one message; hepop has no decoder to run: nothing."""
        self.homer_request()
        self.send_json(201, {"total": 0, "data": []})

    def homer_mapping(self, url) -> None:
        mapping = protocol_mapping()
        self.send_json(200, {"count": len(mapping), "data": mapping})

    def homer_dashboard_list(self, url) -> None:
        dashboards = {"home": home_dashboard(), **self.api.dashboards.all()}
        data = [{key: board.get(key) for key in ("id", "name", "alias", "param", "type", "shared", "weight")}
                for board in dashboards.values() if isinstance(board, dict)]
        self.send_json(200, {"count": len(data), "data": data})

    def homer_dashboard_get(self, url, name: str) -> None:
        board = self.api.dashboards.get(name)
        if board is None:
            raise HttpError(404, f"no dashboard {name!r}")
        self.send_json(200, {"data": board, "owner": self.username()})

    def homer_dashboard_put(self, url, name: str) -> None:
        board = self.homer_request()
        self.api.dashboards.put(name, board)
        self.send_json(201 if self.command == "POST" else 200, {"data": name, "message": "dashboard saved"})

    def homer_dashboard_delete(self, url, name: str) -> None:
        self.api.dashboards.delete(name)
        self.send_json(200, {"data": name, "message": "dashboard deleted"})

    def homer_profile(self, url) -> None:
        name = self.username()
        self.send_json(200, {"count": 1, "data": {
            "guid": user_guid(name), "username": name, "displayname": name, "admin": True, "group": "admin",
            "department": "", "avatar": "", "external_auth": False, "external_profile": ""}})

    def username(self) -> str:
        """The name of the user whose token came with the request ('admin' with API_TOKEN or no login)."""
        scheme, _, credential = self.headers.get("Authorization", "").partition(" ")
        claims = self.api.access.tokens.check(credential) if scheme.lower() == "bearer" else None
        return str(claims["username"]) if claims else "admin"

    def homer_nodes(self, url) -> None:
        self.send_json(200, {"count": 1, "data": [{"name": HOMER_NODE, "value": HOMER_NODE, "node": HOMER_NODE,
                                                   "db_name": "hepop", "host": "", "online": True, "primary": True}]})

    def homer_version(self, url) -> None:
        self.send_json(200, {"data": {"version": __version__, "name": "hepop"}})

    def homer_modules(self, url) -> None:
        self.send_json(200, {"data": {module: {"enable": False} for module in ("loki", "prometheus", "grafana")}})

    def homer_empty(self, url, what: str) -> None:
        """What hepop keeps none of (advanced settings, aliases, HEP subscriptions, user settings)."""
        self.send_json(200, {"count": 0, "data": []})

    def static_file(self, url, path: str) -> None:
        """UI_DIR's files at /, and its index.html for any other path (the UI's own routes); without
        UI_DIR, hepop's own page, whose views are in the URL's fragment: its files, and 404 for others."""
        root = os.path.realpath(self.api.config.ui_dir or BUILTIN_UI_DIR)
        if "\x00" in urllib.parse.unquote(path):
            raise HttpError(400, "a file's name has no NUL byte in it")
        target = os.path.realpath(os.path.join(root, urllib.parse.unquote(path)))
        if not target.startswith(root + os.sep) or not os.path.isfile(target):
            if not self.api.config.ui_dir and path:
                raise HttpError(404, f"no such route or file: /{path}")
            target = os.path.join(root, "index.html")
        try:
            source = open(target, "rb")
        except OSError:
            raise HttpError(404, f"no such file: /{path}") from None
        with source:
            kind = mimetypes.guess_type(target)[0] or "application/octet-stream"
            self.send_response(200)
            self.send_header("Content-Type", kind + ("; charset=utf-8" if kind.startswith("text/") or
                                                     kind.endswith("javascript") else ""))
            self.send_header("Content-Length", str(os.fstat(source.fileno()).st_size))
            for name, value in ({} if self.api.config.ui_dir else BUILTIN_UI_HEADERS).items():
                self.send_header(name, value)
            self.end_headers()
            shutil.copyfileobj(source, self.wfile, 1 << 16)       # streamed: a thread holds 64 KiB of it

    def write_chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def send_json(self, status: int, body: dict, headers: Optional[dict] = None) -> None:
        self.send_body(status, json.dumps(body).encode() + b"\n", "application/json", headers)

    def send_body(self, status: int, body: bytes, content_type: str, headers: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def finish(self) -> None:
        """After an answer to a request whose body was left unread: close our side, then read and drop
        what the client still sends, a little while, before closing.  Closing with unread bytes makes
        the kernel reset the connection, and a reset can destroy the answer before the client reads it."""
        super().finish()
        if not self.unread_body:
            return
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_S)
            deadline, dropped = time.monotonic() + LINGER_S, 0
            while time.monotonic() < deadline and dropped < DISCARD_BODY_BYTES:
                data = self.connection.recv(1 << 16)
                if not data:
                    break
                dropped += len(data)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """The errors http.server answers itself (a bad request line, headers too long, HEAD) as JSON,
        with a status line even where the request line was too broken to say its version."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        self.send_json(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def log_message(self, fmt: str, *args) -> None:
        log.debug("HTTP %s: " + fmt, self.client_address[0], *args)


class WaitingHeads:
    """The connections waiting for a request's head (line and headers): none of them has been let in by
    a token yet, so with every slot taken the one waiting longest gives its slot to a new connection."""

    def __init__(self):
        self._since: dict[socket.socket, float] = {}    # in the order they began to wait
        self._lock = threading.Lock()

    def waiting(self, conn: socket.socket) -> None:
        with self._lock:
            self._since[conn] = time.monotonic()

    def done(self, conn: socket.socket) -> None:
        with self._lock:
            self._since.pop(conn, None)

    def oldest(self) -> Optional[socket.socket]:
        """The connection waiting longest, no longer counted as waiting; None when none is."""
        with self._lock:
            if not self._since:
                return None
            conn = next(iter(self._since))
            del self._since[conn]
            return conn


class ApiServer(http.server.ThreadingHTTPServer):
    """The threaded HTTP server; '::' takes IPv4 too, as the HEP sockets do.  At most
    MAX_HTTP_CONNECTIONS connections (a thread each); past them a new connection takes the slot of the
    one waiting longest for a request's head (WaitingHeads), or is closed at once, and counted.  An accept
    that finds the process out of descriptors pauses instead of spinning; what goes wrong with one
    connection is counted and logged at a bounded rate, never printed to stderr."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024                   # the listen backlog: bursts of connects wait, not retry
    ACCEPT_BACKOFF_S = 0.5

    def __init__(self, config: Config, api: Api):
        self.address_family = socket.AF_INET6 if ":" in config.http_host else socket.AF_INET
        self.api = api
        self.max_connections = config.max_http_connections
        self.connections = 0
        self.heads = WaitingHeads()
        self._connections_lock = threading.Lock()
        self.notices = RateLimitedLog()
        super().__init__((config.http_host, config.http_port), ApiHandler)

    def get_request(self):
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in OUT_OF_RESOURCES:
                self.api.counters.add("http_accept_errors_total")
                self.notices.warning("accept", "cannot accept HTTP connections (%s): pausing", exc.strerror)
                time.sleep(self.ACCEPT_BACKOFF_S)
            raise

    def process_request(self, request, client_address) -> None:
        with self._connections_lock:
            full = self.connections >= self.max_connections
            slowest = self.heads.oldest() if full else None
            if not full or slowest:
                self.connections += 1
        if slowest:                     # it ends at once, and gives back its count
            self.api.counters.add("http_connections_evicted_total")
            self.notices.warning("http_evicted", "MAX_HTTP_CONNECTIONS (%d) reached: closing the connection "
                                 "waiting longest for a request's head, for %s", self.max_connections,
                                 client_address[0])
            with contextlib.suppress(OSError):
                slowest.shutdown(socket.SHUT_RDWR)
        elif full:
            self.api.counters.add("http_connections_refused_total")
            self.notices.warning("http_full", "refusing HTTP from %s: MAX_HTTP_CONNECTIONS (%d) reached",
                                 client_address[0], self.max_connections)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self.connections -= 1

    def handle_error(self, request, client_address) -> None:
        """A connection that failed outside the handler's own error handling (reset mid-request, ...)."""
        self.api.counters.add("http_connection_errors_total")
        self.notices.warning("http_error", "HTTP connection from %s failed: %s", client_address[0],
                             sys.exc_info()[1])

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


# ---------------------------------------------------------------------------------------------------------
# main()
# ---------------------------------------------------------------------------------------------------------

def notify_systemd(state: str) -> None:
    """Tell systemd (Type=notify) our state: READY=1 once the sockets are bound, STOPPING=1 at the end.
    A no-op when NOTIFY_SOCKET is not set."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]        # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", os.environ["NOTIFY_SOCKET"], exc)


def tune_garbage_collector() -> None:
    """Collect young objects every 50,000 allocations instead of every 700, and never scan what exists
    at start (imported modules, pyarrow and DuckDB).  Each packet allocates a few short-lived containers,
    so the default thresholds ran a collection every couple of hundred packets: measured, 4 of the 13 us
    that the receive loop spent per packet.  Cycles are still collected, just in larger rounds."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def announce_exposure(config: Config) -> None:
    """Say at every start who can read the calls over HTTP, and how to open the port safely."""
    loopback = config.http_host in ("localhost", "::1") or config.http_host.startswith("127.")
    if config.api_token or config.api_users_file:
        return
    if loopback:
        log.info("HTTP is on loopback only: set API_TOKEN or API_USERS_FILE to serve it on HOST with a "
                 "login (or HTTP_HOST to choose the address)")
    else:
        log.warning("HTTP_HOST=%s without API_TOKEN or API_USERS_FILE: anyone who reaches port %d reads every "
                    "call; set one of them", config.http_host, config.http_port)


def print_password_hash() -> int:
    """hepop hash-password: a password on stdin (its first line), its hash on stdout, for API_USERS_FILE."""
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("hepop hash-password: give the password on stdin", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def open_bucket(config: Config) -> Optional[S3FileStore]:
    """The bucket of S3_URL, once it answers; StoreError naming the settings when it does not."""
    if not config.s3_url:
        return None
    spool_dir = TreeLayout(config.parquet_dir).upload_spool_dir(config.writer_id)
    try:
        bucket = S3FileStore.connect(config.s3_url, config.s3_endpoint, config.s3_region, spool_dir)
        bucket.check_bucket()
    except OSError as exc:
        raise StoreError(f"S3_URL={config.s3_url} (S3_ENDPOINT={config.s3_endpoint or 'AWS'}, S3_REGION="
                         f"{config.s3_region}): {exc}") from None
    return bucket


def main(argv: Optional[list[str]] = None) -> int:
    multiprocessing.freeze_support()        # in the binary, a compaction or query process starts here
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hash-password"]:
        return print_password_hash()
    try:
        asked = Config.load(argv, dict(os.environ))
        config = fit_descriptors(asked)
        users = Users(config.api_users_file)
        tls = tls_context(config)
    except ConfigError as exc:
        print(f"hepop: bad setting {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    log.info("hepop %s: writer %s, data in %s", __version__, config.writer_id, config.parquet_dir)
    if config != asked:
        log.warning("the open-file limit is %d: MAX_TCP_CONNECTIONS=%d and MAX_HTTP_CONNECTIONS=%d were chosen "
                    "to fit it (set them, or raise the limit: LimitNOFILE= in the unit)",
                    resource.getrlimit(resource.RLIMIT_NOFILE)[0], config.max_tcp_connections,
                    config.max_http_connections)
    counters = Counters()
    count_drops_from_zero(counters)
    try:
        bucket = open_bucket(config)
        storage = Storage(config.parquet_dir, config.writer_id, bucket=bucket)
    except StoreError as exc:
        log.error("%s", exc)
        return 2
    uploader = Uploader(config, storage, counters) if bucket else None
    check = PacketCheck(config, counters)
    writer = BatchWriter(storage, counters, check, config)
    writer.start()
    compactor = Compactor(config, storage, counters)
    server = CaptureServer(config, Ingest(config, writer, counters, check), counters, tls)
    try:
        server.bind()
    except OSError as exc:
        log.error("cannot listen on %s port %d: %s", config.host, config.port, exc)
        writer.close()
        return 1
    api = Api(config, counters, writer, storage, uploader, server.udp_inode,
              Access(config, users, Tokens(token_secret(config), config.token_ttl)), server.ingest.heard)
    signal.signal(signal.SIGHUP, lambda signum, frame: users.reload())     # was: the default, which kills
    try:
        http_server = ApiServer(config, api)
    except OSError as exc:
        log.error("cannot serve HTTP on %s port %d: %s", config.http_host, config.http_port, exc)
        writer.close()
        return 1
    api.queries.start()
    threading.Thread(target=http_server.serve_forever, name="hepop-http", daemon=True).start()
    log.info("HTTP API on %s port %d: /query, /health, /metrics", config.http_host, config.http_port)
    announce_exposure(config)
    compactor.start()
    if uploader:
        uploader.start()
    tune_garbage_collector()
    log.info("ready")
    notify_systemd(f"READY=1\nSTATUS=capturing HEP on port {config.port}\nMAINPID={os.getpid()}")
    server.serve()
    notify_systemd("STOPPING=1")
    log.info("stopping: writing what is buffered")
    compactor.stop()                        # a merge under way is killed: the hour is merged at the next start
    if uploader:
        uploader.stop()                     # an upload under way is left: the folder goes up at the next start
    http_server.shutdown()
    api.queries.close()
    writer.close()
    compactor.close()
    storage.close()
    server.log_counters("final counters")
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
