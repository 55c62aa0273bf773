#!/usr/bin/env python3
"""Race in tansu 0.6's PostgreSQL engine: the same idempotent batch, produced on
two connections whose transactions overlap, is stored twice, and the producer's
next batch is answered DUPLICATE_SEQUENCE_NUMBER and is not stored (lost).

tansu-storage 0.6.0 src/pg.rs `produce_in_tx`: `idempotent_message_check` reads
producer_detail.sequence with a plain SELECT (producer_select_for_update.sql has
no FOR UPDATE), upserts `sequence = producer_detail.sequence + n`, and only then
locks the watermark row FOR NO KEY UPDATE. Holding that watermark row lock from
psql parks both produce transactions after their sequence check, so they overlap
every time. See README.md. Exit 1: the race showed; 0: the broker behaved; 2: no verdict.

Needs: psql, a PostgreSQL server (REPRO_PG), tansu 0.6.0 with the postgres
feature (DUALSTREAM_TANSU), `pip install kafka-python==2.3.3` (3.x is a rewrite).
"""
import os, socket, subprocess, sys, time, traceback, uuid
from pathlib import Path

from kafka.protocol.admin import CreateTopicsRequest
from kafka.protocol.fetch import FetchRequest
from kafka.protocol.parser import KafkaProtocol
from kafka.protocol.produce import ProduceRequest
from kafka.protocol.api import Request, Response
from kafka.protocol.types import CompactString, Int16, Int32, Int64, Schema, TaggedFields
from kafka.record import MemoryRecords
from kafka.record.default_records import DefaultRecordBatchBuilder

PG = os.environ.get("REPRO_PG", "postgres://postgres@127.0.0.1:5432")
SCHEMA = Path(__file__).resolve().parents[2] / "xtask/assets/tansu-0.6-postgres.sql"
TANSU = os.environ.get("DUALSTREAM_TANSU") or os.path.expanduser(
    "~/.cache/dualstream/tansu-0.6.0-dynostore-libsql-postgres/bin/tansu")
TOPIC = "repro"
ERRORS = {-1: "UNKNOWN_SERVER_ERROR", 0: "NONE", 45: "OUT_OF_ORDER_SEQUENCE_NUMBER", 46: "DUPLICATE_SEQUENCE_NUMBER"}


class InitProducerIdResponse_v3(Response):
    API_KEY, API_VERSION, FLEXIBLE_VERSION = 22, 3, True
    SCHEMA = Schema(("throttle_time_ms", Int32), ("error_code", Int16), ("producer_id", Int64),
                    ("producer_epoch", Int16), ("tags", TaggedFields))


class InitProducerIdRequest_v3(Request):
    """v3 (KIP-360): tansu 0.6's PostgreSQL engine panics (todo!) unless producer id and epoch are -1."""
    API_KEY, API_VERSION, FLEXIBLE_VERSION, RESPONSE_TYPE = 22, 3, True, InitProducerIdResponse_v3
    SCHEMA = Schema(("transactional_id", CompactString("utf-8")), ("transaction_timeout_ms", Int32),
                    ("producer_id", Int64), ("producer_epoch", Int16), ("tags", TaggedFields))


def psql(db, sql=None, file=None):
    args = ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", f"{PG}/{db}?sslmode=disable"]
    args += ["-f", str(file)] if file else ["-c", sql]
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


class Conn:
    """One TCP connection to the broker, one request at a time."""
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.proto = KafkaProtocol(client_id="tansu-repro")

    def send(self, request):
        self.proto.send_request(request)
        self.sock.sendall(self.proto.send_bytes())

    def receive(self):
        while True:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("broker closed the connection")
            for _, response in self.proto.receive_bytes(data):
                return response

    def call(self, request):
        self.send(request)
        return self.receive()


def batch(pid, epoch, base_sequence, values):
    b = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=pid,
                                  producer_epoch=epoch, base_sequence=base_sequence, batch_size=1 << 20)
    for i, value in enumerate(values):
        b.append(i, timestamp=None, key=None, value=value, headers=[])
    return bytes(b.build())


def produce(pid, epoch, base_sequence, values):  # acks=-1, message format v2
    return ProduceRequest[3](transactional_id=None, required_acks=-1, timeout=30000,
                             topics=[(TOPIC, [(0, batch(pid, epoch, base_sequence, values))])])


def answer(response):
    (_, [(_, code, offset, *_)]), = response.topics
    return f"{ERRORS.get(code, code)}, base offset {offset}", code, offset


def wait_until(ok, timeout):
    end = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def run(db, port):
    setup = Conn(port)
    print("create topic:", setup.call(CreateTopicsRequest[0](
        create_topic_requests=[(TOPIC, 1, 1, [], [])], timeout=10000)).topic_errors)
    init = setup.call(InitProducerIdRequest_v3(
        transactional_id=None, transaction_timeout_ms=60000, producer_id=-1, producer_epoch=-1, tags={}))
    pid, epoch = init.producer_id, init.producer_epoch
    print(f"InitProducerId: error {init.error_code}, producer id {pid}, epoch {epoch}")
    first, second = [b"a0", b"a1", b"a2"], [b"b0", b"b1", b"b2"]

    # Hold the partition's watermark row lock, as tansu's watermark_select_for_update.sql takes it.
    lock = subprocess.Popen(["psql", "-X", "-q", "-A", "-t", "-d", f"{PG}/{db}?sslmode=disable"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lock.stdin.write(f"begin;\nselect w.high from topic t join topition tp on tp.topic = t.id join watermark w "
                     f"on w.topition = tp.id where t.name = '{TOPIC}' and tp.partition = 0 for no key update;\n"
                     "\\echo locked\n")
    lock.stdin.flush()
    while (line := lock.stdout.readline()).strip() != "locked":
        if not line:
            raise RuntimeError("psql could not lock the watermark row")
    print("psql: BEGIN; watermark row locked FOR NO KEY UPDATE")

    a, b = Conn(port), Conn(port)
    a.send(produce(pid, epoch, 0, first))
    b.send(produce(pid, epoch, 0, first))
    print(f"sent the same batch (producer {pid}, epoch {epoch}, base sequence 0, 3 records) on connections A and B")
    waiting = (f"select case when query like '%for no key update%' then 'watermark select ... for no key update' "
               f"when query like '%insert into producer_detail%' then 'insert into producer_detail ... on conflict' "
               f"else left(query, 60) end from pg_stat_activity where datname = '{db}' and wait_event_type = 'Lock' "
               "order by 1 desc")
    # Both transactions parked: tansu 0.6 parks one on the watermark row, the other on the first one's
    # uncommitted producer_detail row (both have already passed the sequence check by then).
    # A broker that serializes them elsewhere may park only one: go on after 5 s.
    wait_until(lambda: len(psql(db, waiting).splitlines()) == 2, timeout=5)
    for line in psql(db, waiting).splitlines():
        print("  tansu transaction waiting in:", line)
    lock.stdin.write("rollback;\n")
    lock.stdin.close()
    lock.wait()
    print("psql: ROLLBACK (lock released)")
    (ra, ca, oa), (rb, cb, ob) = answer(a.receive()), answer(b.receive())
    print("  A:", ra)
    print("  B:", rb)

    rn, cn, on = answer(a.call(produce(pid, epoch, 3, second)))
    print("next batch (base sequence 3, 3 new records) on A:", rn)

    # tansu's PostgreSQL fetch hides records written after the oldest transaction still running anywhere
    # on the server (record_fetch_pg.sql: pg_snapshot_xmin), so on a busy server an early fetch may be empty.
    for attempt in range(100):
        fetch = setup.call(FetchRequest[4](replica_id=-1, max_wait_time=0, min_bytes=1, max_bytes=1 << 20,
                                           isolation_level=0, topics=[(TOPIC, [(0, 0, 1 << 20)])]))
        (_, [(_, code, high, *_, data)]), = fetch.topics
        records = [r for rb in MemoryRecords(data) for r in rb] if data else []
        if len(records) >= high:
            break
        time.sleep(0.1)
    print(f"fetch from offset 0: error {code}, high watermark {high}, {len(records)} records (attempt {attempt + 1})")
    for r in records:
        print(f"  offset {r.offset}: {r.value.decode()}")
    rows = psql(db, "select offset_id || ':' || encode(v, 'escape') from record order by offset_id").split()
    print("record table (offset:value):", " ".join(rows))
    stored = [row.split(":", 1)[1].encode() for row in rows]  # the verdict trusts the table, not the fetch
    print("producer_detail.sequence:", psql(db, "select sequence from producer_detail"))

    print("\nexpected (correct idempotent broker): one of A/B stored at offset 0, the other DUPLICATE_SEQUENCE_NUMBER"
          " (or offset 0); next batch stored at offset 3; a0 a1 a2 b0 b1 b2 stored, no duplicate")
    dup = len(set(stored)) != len(stored)
    lost = [v.decode() for v in second if v not in stored]
    if not dup and not lost and stored == first + second and (cn, on) == (0, 3):
        ideal = {(ca, oa), (cb, ob)} == {(0, 0), (46, -1)} or ca == cb == oa == ob == 0
        print("VERDICT: ok, no duplicate, nothing lost" + ("" if ideal else f" (but A answered {ra}, B {rb})"))
        return 0
    print(f"VERDICT: RACE: {'the same batch stored twice' if dup else 'no duplicate'}; next batch answered {rn}; "
          f"{'lost (not stored): ' + ' '.join(lost) if lost else 'next batch stored'}")
    return 1


def main():
    db = f"tansu_repro_{uuid.uuid4().hex[:12]}"
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    broker, log = None, open(f"/tmp/{db}.log", "w")
    try:
        psql("postgres", f'create database "{db}"')
        psql(db, file=SCHEMA)
        listener = f"tcp://127.0.0.1:{port}"
        broker = subprocess.Popen([TANSU, "broker", "--storage-engine", f"{PG}/{db}?sslmode=disable",
                                   "--listener-url", listener, "--advertised-listener-url", listener],
                                  stdout=log, stderr=subprocess.STDOUT)

        def listening():
            if broker.poll() is not None:
                raise RuntimeError(f"tansu exited with {broker.returncode}, see {log.name}")
            with socket.socket() as c:
                return c.connect_ex(("127.0.0.1", port)) == 0
        if not wait_until(listening, timeout=20):
            raise RuntimeError(f"tansu did not listen on {port}, see {log.name}")
        print(f"tansu {TANSU} on 127.0.0.1:{port}, storage database {db} (log {log.name})")
        return run(db, port)
    finally:
        if broker is not None:
            broker.terminate()
            try:
                broker.wait(10)
            except subprocess.TimeoutExpired:
                broker.kill()
                broker.wait()
        psql("postgres", f'drop database if exists "{db}" with (force)')


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(2)  # could not run the scenario: no verdict
