#!/usr/bin/env python3
"""Instructions per event of one criterion row, from two callgrind runs.

Run the bench binary twice under callgrind with different --profile-time
(criterion's fixed-time mode), e.g. 3 and 10 seconds:

    valgrind --tool=callgrind --callgrind-out-file=short <bench> --bench <row> --profile-time 3
    valgrind --tool=callgrind --callgrind-out-file=long  <bench> --bench <row> --profile-time 10

then: callgrind_per_event.py short long <function> <events per call>

<function> is called once per iteration (the drop of the row's future, say):
its call counts give the iterations of each run, and the difference of the
two programs' totals over the difference of iterations is the cost of one
iteration without the process's start-up and the benchmark's set-up.
Instruction counts do not depend on the machine's load (docs/benchmarks.md).
"""
import re
import subprocess
import sys


def totals(path, function):
    names, calls, callee = {}, 0, None
    with open(path, errors="replace") as f:
        for line in f:
            m = re.match(r"^(c?fn)=\((\d+)\)(?: (.*))?$", line.strip())
            if m:
                kind, ident, name = m.groups()
                if name:
                    names[ident] = name
                if kind == "cfn":
                    callee = ident
                continue
            m = re.match(r"^calls=(\d+)", line)
            if m and callee and names.get(callee) == function:
                calls += int(m.group(1))
    out = subprocess.run(["callgrind_annotate", path], capture_output=True, text=True, check=True).stdout
    ir = int(re.search(r"([\d,]+) \(100.0%\)\s+PROGRAM TOTALS", out).group(1).replace(",", ""))
    return ir, calls


def main():
    short, long_, function, events = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    (i1, n1), (i2, n2) = totals(short, function), totals(long_, function)
    if n2 <= n1:
        sys.exit(f"{function}: called {n1} then {n2} times; the longer run must call it more often")
    print(f"iterations {n1} -> {n2}; instructions per event {(i2 - i1) / (n2 - n1) / events:.0f}")


if __name__ == "__main__":
    main()
