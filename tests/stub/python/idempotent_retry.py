#!/usr/bin/env python3
"""Idempotent produce from a language without an Ordo client: stubs generated from proto/ only.

Generates the Python stubs of proto/ordo/v1/ordo.proto with grpcio-tools into a temp dir at run
time, then follows the contract of the proto's "Idempotent producers" comment by hand against a
running cluster, and checks that a retried request is written once:

  a. InitProducer; a produce at sequence 0 and the exact same request again (a by-hand retry,
     through another node) get the same acks, the second with `duplicate` set; the same for the
     next batch at sequence 3, and for the first batch once more (still remembered).
  b. A gap (sequence 10 where 5 is expected): FAILED_PRECONDITION, OUT_OF_ORDER_SEQUENCE with
     metadata expected_sequence "5".
  c. An idempotent produce without a partition: INVALID_ARGUMENT, PARTITION_REQUIRED.
  d. A producer id never allocated: FAILED_PRECONDITION, UNKNOWN_PRODUCER.
  e. Fencing: a second InitProducer of the same name keeps the id and bumps the epoch; the old
     epoch is refused (FAILED_PRECONDITION, PRODUCER_FENCED), the new one starts at sequence 0.
  f. Fetch reads every partition back: each record sent and acked is there exactly once, in
     order, and nothing refused or retried was written.

Every error is read the way any gRPC client can: the status code, and the google.rpc.Status in
the grpc-status-details-bin trailer with its google.rpc.ErrorInfo (domain "ordo"). UNAVAILABLE
(nothing written, e.g. no leader yet right after CreateTopic) and DEADLINE_EXCEEDED (outcome
unknown) are retried with the same request, as the contract says, a bounded number of times.

Usage: idempotent_retry.py --endpoints 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003 --topic T
The topic must not exist: the script creates it (2 partitions, replication factor 3).
Needs grpcio-tools and grpcio-status (scripts/setup installs them in /var/tmp/ordo-venv).
Exits 0 when every check passed, 1 with the failed check on stderr otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
from google.rpc import error_details_pb2, status_pb2

# tests/stub/python/idempotent_retry.py -> the repository root.
REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_DIR = REPO_ROOT / "proto"
PROTO_FILE = "ordo/v1/ordo.proto"

# The ErrorInfo domain of every Ordo error.
DOMAIN = "ordo"
# Deadline of every single call (seconds).
CALL_TIMEOUT = 10
# How long one operation may keep retrying UNAVAILABLE / outcome-unknown answers (seconds),
# and at most how many attempts it makes.
RETRY_WINDOW = 45
RETRY_ATTEMPTS_MAX = 150
# Pause between two attempts of the same request (seconds).
RETRY_PAUSE = 0.3
# Upper bound on record bytes one Fetch returns.
FETCH_BYTES_MAX = 1024 * 1024
# Fetch calls made at most to read one partition back.
FETCH_CALLS_MAX = 20

PARTITIONS = 2
REPLICATION_FACTOR = 3
# A producer id the cluster never allocated: ids are allocated from small numbers upwards.
NEVER_ALLOCATED_PRODUCER_ID = 999_999_999
FENCED_PRODUCER_NAME = "py-fence"


class CheckFailed(Exception):
    """A check of the contract did not hold."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def ok(message: str) -> None:
    print(f"ok: {message}", flush=True)


def generate_stubs(out_dir: Path) -> tuple[Any, Any]:
    """Runs grpc_tools.protoc on proto/ordo/v1/ordo.proto into out_dir and imports the result."""
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        PROTO_FILE,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise CheckFailed(
            f"protoc failed ({result.returncode}): {' '.join(command)}\n{result.stdout}{result.stderr}"
        )
    sys.path.insert(0, str(out_dir))
    pb2 = importlib.import_module("ordo.v1.ordo_pb2")
    pb2_grpc = importlib.import_module("ordo.v1.ordo_pb2_grpc")
    ok(f"generated and imported stubs of {PROTO_FILE} with grpc_tools.protoc (grpcio {grpc.__version__})")
    return pb2, pb2_grpc


@dataclass
class ErrorInfo:
    reason: str
    domain: str
    metadata: dict[str, str]


def error_info(error: grpc.RpcError) -> ErrorInfo | None:
    """The google.rpc.ErrorInfo of a failed call, from its grpc-status-details-bin trailer."""
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return ErrorInfo(info.reason, info.domain, dict(info.metadata))
    return None


def describe(error: grpc.RpcError) -> str:
    info = error_info(error)
    detail = f"{info.domain}/{info.reason} {info.metadata}" if info else "no ErrorInfo"
    return f"{error.code().name} ({detail}): {error.details()}"


def ordo_reason(error: grpc.RpcError) -> str | None:
    info = error_info(error)
    return info.reason if info and info.domain == DOMAIN else None


@dataclass
class Outcome:
    response: Any = None
    error: grpc.RpcError | None = None
    # Whether an earlier attempt ended with an unknown outcome (it may have done the work).
    maybe_done_before: bool = False
    attempts: int = 0


# Answers after which the same request may be sent again. UNAVAILABLE: nothing was done.
# DEADLINE_EXCEEDED: the outcome is unknown, and for an idempotent produce a retry is the
# documented way to learn it. RESOURCE_EXHAUSTED with reason RESOURCE_EXHAUSTED: too many
# requests in flight, nothing done (other RESOURCE_EXHAUSTED reasons, such as
# TOO_MANY_PRODUCERS, are verdicts).
def retryable(error: grpc.RpcError) -> bool:
    code = error.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return True
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and ordo_reason(error) == "RESOURCE_EXHAUSTED"


def call(
    what: str,
    method: Callable[..., Any],
    request: Any,
    may_retry: Callable[[grpc.RpcError], bool] = retryable,
) -> Outcome:
    """Calls `method(request)`, sending the same request again after a retryable answer, within
    RETRY_WINDOW seconds and RETRY_ATTEMPTS_MAX attempts. Returns the final answer, success or
    verdict; raises CheckFailed when still retryable at the bound."""
    outcome = Outcome()
    give_up_at = time.monotonic() + RETRY_WINDOW
    while True:
        outcome.attempts += 1
        try:
            outcome.response = method(request, timeout=CALL_TIMEOUT)
            outcome.error = None
            return outcome
        except grpc.RpcError as error:
            outcome.error = error
            if not may_retry(error):
                return outcome
            if outcome.attempts >= RETRY_ATTEMPTS_MAX or time.monotonic() >= give_up_at:
                raise CheckFailed(
                    f"{what}: still {describe(error)} after {outcome.attempts} attempts "
                    f"in {RETRY_WINDOW} s"
                ) from None
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                outcome.maybe_done_before = True
            if outcome.attempts == 1:
                print(f"  {what}: {describe(error)}; retrying the same request", flush=True)
            time.sleep(RETRY_PAUSE)


def expect_ok(what: str, outcome: Outcome) -> Any:
    if outcome.error is not None:
        raise CheckFailed(f"{what}: expected success, got {describe(outcome.error)}")
    return outcome.response


def expect_refused(
    what: str, outcome: Outcome, code: grpc.StatusCode, reason: str
) -> ErrorInfo:
    """Checks that a call ended with `code` and an ordo ErrorInfo of `reason`; returns it."""
    if outcome.error is None:
        raise CheckFailed(
            f"{what}: expected {code.name} / {reason}, got success: {outcome.response}"
        )
    error = outcome.error
    check(
        error.code() == code,
        f"{what}: expected status {code.name} / {reason}, got {describe(error)}",
    )
    info = error_info(error)
    check(
        info is not None,
        f"{what}: {code.name} without a google.rpc.ErrorInfo in grpc-status-details-bin",
    )
    assert info is not None
    check(
        info.domain == DOMAIN,
        f"{what}: ErrorInfo domain {info.domain!r}, expected {DOMAIN!r}",
    )
    check(
        info.reason == reason,
        f"{what}: ErrorInfo reason {info.reason!r}, expected {reason!r} ({describe(error)})",
    )
    return info


def acks_of(response: Any) -> list[tuple[int, int]]:
    return [(ack.partition, ack.offset) for ack in response.acks]


class Run:
    """One run of the checks against a cluster."""

    def __init__(self, pb2: Any, pb2_grpc: Any, endpoints: list[str], topic: str) -> None:
        self.pb2 = pb2
        self.topic = topic
        self.endpoints = endpoints
        self.channels = [grpc.insecure_channel(endpoint) for endpoint in endpoints]
        self.logs = [pb2_grpc.LogStub(channel) for channel in self.channels]
        self.admin = pb2_grpc.AdminStub(self.channels[0])
        # Calls go to the first node; by-hand retries go to another one when there is one.
        self.log = self.logs[0]
        self.retry_log = self.logs[1 % len(self.logs)]
        self.retry_endpoint = endpoints[1 % len(endpoints)]
        # What each partition must hold at the end, in order.
        self.expected: dict[int, list[bytes]] = {p: [] for p in range(PARTITIONS)}

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def record(self, label: str) -> Any:
        return self.pb2.Record(value=f"{self.topic}/{label}".encode())

    def sequence(self, producer: tuple[int, int], sequence: int) -> Any:
        producer_id, epoch = producer
        return self.pb2.ProducerSequence(
            producer_id=producer_id, producer_epoch=epoch, sequence=sequence
        )

    def create_topic(self) -> None:
        request = self.pb2.CreateTopicRequest(
            name=self.topic, partitions=PARTITIONS, replication_factor=REPLICATION_FACTOR
        )
        outcome = call(f"CreateTopic({self.topic})", self.admin.CreateTopic, request)
        if (
            outcome.error is not None
            and outcome.error.code() == grpc.StatusCode.ALREADY_EXISTS
            and outcome.maybe_done_before
        ):
            ok(f"topic {self.topic} created (by an attempt whose answer was lost)")
            return
        response = expect_ok(f"CreateTopic({self.topic})", outcome)
        check(
            len(response.topic.partitions) == PARTITIONS,
            f"CreateTopic answered {len(response.topic.partitions)} partitions, expected {PARTITIONS}",
        )
        ok(f"created topic {self.topic}: {PARTITIONS} partitions, replication factor {REPLICATION_FACTOR}")

    def init_producer(self, name: str = "") -> tuple[int, int]:
        # Only UNAVAILABLE is retried: a retry after an unknown outcome could allocate twice,
        # and with a name bump the epoch twice.
        outcome = call(
            f"InitProducer({name!r})",
            self.log.InitProducer,
            self.pb2.InitProducerRequest(producer_name=name),
            may_retry=lambda error: error.code() == grpc.StatusCode.UNAVAILABLE,
        )
        response = expect_ok(f"InitProducer({name!r})", outcome)
        return response.producer_id, response.producer_epoch

    def produce(self, what: str, request: Any, log: Any = None) -> Outcome:
        return call(what, (log or self.log).Produce, request)

    def produce_written(self, what: str, request: Any) -> Any:
        """A first send: written now (not a duplicate, unless an attempt's answer was lost)."""
        outcome = self.produce(what, request)
        response = expect_ok(what, outcome)
        check(
            len(response.acks) == len(request.records),
            f"{what}: {len(response.acks)} acks for {len(request.records)} records",
        )
        if not outcome.maybe_done_before:
            check(
                not response.duplicate,
                f"{what}: first send answered duplicate=true: {acks_of(response)}",
            )
        partition = request.partition
        start = len(self.expected[partition])
        expected_acks = [(partition, start + i) for i in range(len(request.records))]
        check(
            acks_of(response) == expected_acks,
            f"{what}: acks {acks_of(response)}, expected {expected_acks} (a fresh topic)",
        )
        self.expected[partition].extend(record.value for record in request.records)
        ok(f"{what}: written at {acks_of(response)}, duplicate={response.duplicate}")
        return response

    def retry_by_hand(self, what: str, request: Any, first: Any) -> None:
        """Sends `request` again (through another node): same acks, duplicate=true."""
        response = expect_ok(what, self.produce(what, request, log=self.retry_log))
        check(
            acks_of(response) == acks_of(first),
            f"{what}: acks {acks_of(response)}, expected the first write's {acks_of(first)}",
        )
        check(
            response.duplicate,
            f"{what}: duplicate=false, expected true (acks {acks_of(response)})",
        )
        ok(
            f"{what} via {self.retry_endpoint}: same acks {acks_of(response)}, duplicate=true"
        )

    def retries_are_written_once(self) -> tuple[int, int]:
        producer = self.init_producer()
        ok(f"InitProducer() -> producer_id={producer[0]} epoch={producer[1]}")
        first = self.pb2.ProduceRequest(
            topic=self.topic,
            partition=0,
            records=[self.record(f"r{i}") for i in range(3)],
            producer=self.sequence(producer, 0),
        )
        first_acks = self.produce_written("produce r0..r2 to partition 0 at sequence 0", first)
        self.retry_by_hand("retry of sequence 0", first, first_acks)

        second = self.pb2.ProduceRequest(
            topic=self.topic,
            partition=0,
            records=[self.record(f"r{i}") for i in range(3, 5)],
            producer=self.sequence(producer, 3),
        )
        second_acks = self.produce_written("produce r3..r4 to partition 0 at sequence 3", second)
        self.retry_by_hand("retry of sequence 3", second, second_acks)
        self.retry_by_hand("late retry of sequence 0", first, first_acks)
        return producer

    def gap_is_refused(self, producer: tuple[int, int]) -> None:
        what = "produce at sequence 10 where 5 is expected"
        request = self.pb2.ProduceRequest(
            topic=self.topic,
            partition=0,
            records=[self.record("gap")],
            producer=self.sequence(producer, 10),
        )
        info = expect_refused(
            what,
            self.produce(what, request),
            grpc.StatusCode.FAILED_PRECONDITION,
            "OUT_OF_ORDER_SEQUENCE",
        )
        check(
            info.metadata.get("expected_sequence") == "5",
            f"{what}: ErrorInfo metadata {info.metadata}, expected expected_sequence='5'",
        )
        ok(f"{what}: FAILED_PRECONDITION, OUT_OF_ORDER_SEQUENCE, expected_sequence=5")

    def partition_is_required(self, producer: tuple[int, int]) -> None:
        what = "idempotent produce without a partition"
        request = self.pb2.ProduceRequest(
            topic=self.topic,
            records=[self.record("no-partition")],
            producer=self.sequence(producer, 5),
        )
        check(not request.HasField("partition"), "the request must not carry a partition")
        expect_refused(
            what,
            self.produce(what, request),
            grpc.StatusCode.INVALID_ARGUMENT,
            "PARTITION_REQUIRED",
        )
        ok(f"{what}: INVALID_ARGUMENT, PARTITION_REQUIRED")

    def unknown_producer_is_refused(self) -> None:
        what = f"produce as producer {NEVER_ALLOCATED_PRODUCER_ID} (never allocated)"
        request = self.pb2.ProduceRequest(
            topic=self.topic,
            partition=0,
            records=[self.record("unknown-producer")],
            producer=self.sequence((NEVER_ALLOCATED_PRODUCER_ID, 0), 0),
        )
        expect_refused(
            what,
            self.produce(what, request),
            grpc.StatusCode.FAILED_PRECONDITION,
            "UNKNOWN_PRODUCER",
        )
        ok(f"{what}: FAILED_PRECONDITION, UNKNOWN_PRODUCER")

    def old_epoch_is_fenced(self) -> None:
        producer_id, old_epoch = self.init_producer(FENCED_PRODUCER_NAME)
        ok(f"InitProducer({FENCED_PRODUCER_NAME!r}) -> producer_id={producer_id} epoch={old_epoch}")
        self.produce_written(
            f"produce f0 to partition 1 at sequence 0, epoch {old_epoch}",
            self.pb2.ProduceRequest(
                topic=self.topic,
                partition=1,
                records=[self.record("f0")],
                producer=self.sequence((producer_id, old_epoch), 0),
            ),
        )

        again_id, new_epoch = self.init_producer(FENCED_PRODUCER_NAME)
        check(
            again_id == producer_id,
            f"second InitProducer({FENCED_PRODUCER_NAME!r}): producer_id {again_id}, expected "
            f"the same id {producer_id}",
        )
        check(
            new_epoch == old_epoch + 1,
            f"second InitProducer({FENCED_PRODUCER_NAME!r}): epoch {new_epoch}, expected "
            f"{old_epoch + 1}",
        )
        ok(f"InitProducer({FENCED_PRODUCER_NAME!r}) again -> same producer_id, epoch={new_epoch}")

        what = f"produce f1 to partition 1 at sequence 1 with the old epoch {old_epoch}"
        info = expect_refused(
            what,
            self.produce(
                what,
                self.pb2.ProduceRequest(
                    topic=self.topic,
                    partition=1,
                    records=[self.record("f1-fenced")],
                    producer=self.sequence((producer_id, old_epoch), 1),
                ),
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "PRODUCER_FENCED",
        )
        current = info.metadata.get("current_epoch")
        check(
            current == str(new_epoch),
            f"{what}: ErrorInfo metadata {info.metadata}, expected current_epoch='{new_epoch}'",
        )
        ok(f"{what}: FAILED_PRECONDITION, PRODUCER_FENCED, current_epoch={current}")

        self.produce_written(
            f"produce f2 to partition 1 at sequence 0 with the new epoch {new_epoch}",
            self.pb2.ProduceRequest(
                topic=self.topic,
                partition=1,
                records=[self.record("f2")],
                producer=self.sequence((producer_id, new_epoch), 0),
            ),
        )

    def fetch(self, partition: int, offset: int) -> Any:
        request = self.pb2.FetchRequest(
            topic=self.topic,
            partition=partition,
            offset=offset,
            max_bytes=FETCH_BYTES_MAX,
            max_wait_ms=0,
        )
        what = f"Fetch({self.topic}/{partition} from {offset})"
        return expect_ok(what, call(what, self.log.Fetch, request))

    def fetch_until(self, partition: int, end: int) -> list[Any]:
        """The records of a partition from offset 0 to `end`, in as many Fetch calls as it takes.

        A node serves what its own replica has committed as far as it knows: a follower may not
        yet know that the last acked records are committed (its high watermark lags the
        leader's), and it answers fewer records. The next Fetch, from the offset after them, is at
        its end and goes to the leader, as any consumer's would."""
        records: list[Any] = []
        for _ in range(FETCH_CALLS_MAX):
            response = self.fetch(partition, len(records))
            records.extend(response.records)
            if len(records) >= end:
                return records
            if not response.records:
                time.sleep(RETRY_PAUSE)
        raise CheckFailed(
            f"Fetch({self.topic}/{partition}): {len(records)} records after {FETCH_CALLS_MAX} "
            f"calls, expected {end}"
        )

    def log_holds_each_record_once(self) -> None:
        for partition in range(PARTITIONS):
            expected = self.expected[partition]
            records = self.fetch_until(partition, len(expected))
            got = [record.value for record in records]
            offsets = [record.offset for record in records]
            check(
                got == expected,
                f"partition {partition} holds {[v.decode(errors='replace') for v in got]}, expected "
                f"exactly {[v.decode(errors='replace') for v in expected]}",
            )
            check(
                offsets == list(range(len(expected))),
                f"partition {partition}: offsets {offsets}, expected 0..{len(expected) - 1}",
            )
            # Nothing after them: a Fetch at the end is answered by the leader (the node's own
            # replica ends there too, or earlier), with its high watermark.
            tail = self.fetch(partition, len(expected))
            check(
                not tail.records and tail.high_watermark == len(expected),
                f"partition {partition}: after the {len(expected)} records sent, Fetch from "
                f"{len(expected)} answered {len(tail.records)} more records, high watermark "
                f"{tail.high_watermark}",
            )
            labels = [value.decode().rsplit("/", 1)[-1] for value in got]
            ok(
                f"partition {partition} holds exactly {len(expected)} records {labels} at offsets "
                f"{offsets}, high watermark {tail.high_watermark}: each sent value once, in "
                f"order; nothing refused, and no retry, was written"
            )

    def run(self) -> None:
        self.create_topic()
        producer = self.retries_are_written_once()
        self.gap_is_refused(producer)
        self.partition_is_required(producer)
        self.unknown_producer_is_refused()
        self.old_epoch_is_fenced()
        self.log_holds_each_record_once()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--endpoints",
        required=True,
        help="comma-separated gRPC addresses (host:port) of the cluster's nodes",
    )
    parser.add_argument("--topic", required=True, help="name of the topic to create and use")
    args = parser.parse_args()
    endpoints = [
        endpoint.strip().removeprefix("http://")
        for endpoint in args.endpoints.split(",")
        if endpoint.strip()
    ]
    if not endpoints:
        parser.error("--endpoints names no endpoint")

    out_dir = Path(tempfile.mkdtemp(prefix="ordo-stubs-"))
    run = None
    try:
        pb2, pb2_grpc = generate_stubs(out_dir)
        run = Run(pb2, pb2_grpc, endpoints, args.topic)
        run.run()
    except CheckFailed as failure:
        print(f"FAILED: {failure}", file=sys.stderr, flush=True)
        return 1
    finally:
        if run is not None:
            run.close()
        shutil.rmtree(out_dir, ignore_errors=True)
    print("idempotent_retry: every check passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
