#!/usr/bin/env python3
"""Core-µs an event by thread group and by what the stack is in, from inferno-collapse-perf
output of a cpu-clock perf record (each line's count is nanoseconds). Usage:
perf_split_by_thread.py <side> ... (reads <side>.folded; 1.5 million events: 3 rounds of 500,000).
docs/benchmark-analysis.md, "One profile per side"."""
import sys, collections
EVENTS = 1.5e6
order = [
  ("building the bench's events", "bench::events"),
  ("librdkafka's produce call", "rd_kafka_produce"),
  ("the delivery callback", "::delivery"),
  ("the Redis notifier (ours)", "dualstream_redis::"),
  ("redis crate pipelines (hand-written)", ";redis::"),
  ("the sink (record, topic, hand-over)", "dualstream_kafka::sink::KafkaSink"),
  ("the engine's notify stage", "dualstream_batch::notify"),
  ("the engine's ack stage", "dualstream_batch::ack"),
  ("the engine's lanes", "dualstream_batch::lane"),
  ("submit_many on the caller", "BatchEngine::submit_many"),
  ("the hand-written publisher's loop", "bench::publish::hand_written_dual"),
  ("the raw enqueue loop", "bench::publish::threaded_enqueue"),
]
def group(comm):
    if comm.startswith("tokio"): return "tokio workers"
    if comm.startswith("rdk:"): return "librdkafka threads (rdk:*)"
    if comm.startswith("producer"): return "producer polling thread"
    return comm
for side in sys.argv[1:]:
    threads = collections.Counter(); cats = collections.defaultdict(collections.Counter)
    for line in open(f"{side}.folded"):
        stack, n = line.rstrip().rsplit(" ", 1); n = int(n)
        g = group(stack.split(";", 1)[0])
        threads[g] += n
        label = next((l for l, m in order if m in stack), "other (scheduler, allocator, kernel)")
        cats[g][label] += n
    total = sum(threads.values())
    print(f"== {side}: {total/1e3/EVENTS:.2f} core-us an event")
    for g, n in threads.most_common():
        if n/1e3/EVENTS < 0.01: continue
        print(f"  {g:30s} {n/1e3/EVENTS:5.2f}")
        for label, m in cats[g].most_common():
            if m/1e3/EVENTS >= 0.05: print(f"      {label:42s} {m/1e3/EVENTS:5.2f}")
