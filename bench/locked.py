#!/usr/bin/env python3
"""Locked instructions per request in a callgrind dump made with --dump-instr=yes.

    bench/locked.py CALLGRIND_FILE BINARY REQUESTS [TOP]

Counts the executions of BINARY's own `lock`-prefixed instructions, and of `xchg` with
memory (locked without the prefix), as `objdump -d` lists them: atomic read-modify-writes,
some 5 ns each on the benchmark's machine where a plain instruction costs a fraction of
one. Shared libraries (libc) are not counted. Prints the count per request, then the TOP
(default 15) instructions by count with the function each is in (`?` in a stripped
binary). Used by `LOCKS=1 bench/instructions.sh`.
"""
import bisect
import collections
import os
import re
import subprocess
import sys

path, binary, requests = sys.argv[1], os.path.realpath(sys.argv[2]), int(sys.argv[3])
top = int(sys.argv[4]) if len(sys.argv) > 4 else 15

locked = {}
dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", binary], capture_output=True, text=True).stdout
for line in dump.splitlines():
    m = re.match(r"\s+([0-9a-f]+):\s+((lock\s.*)|(xchg\s+\S*\(.*))$", line)
    if m:
        locked[int(m.group(1), 16)] = " ".join(m.group(2).split())

symbols = []
nm = subprocess.run(["nm", "-C", "--defined-only", binary], capture_output=True, text=True).stdout
for line in nm.splitlines():
    parts = line.split(" ", 2)
    if len(parts) == 3 and parts[1] in "tTwW":
        symbols.append((int(parts[0], 16), parts[2]))
symbols.sort()
starts = [a for a, _ in symbols]


def function(address):
    i = bisect.bisect_right(starts, address) - 1
    return symbols[i][1] if i >= 0 else "?"


# callgrind's format: names compressed as "(id) name" once, then "(id)"; with
# "positions: instr line", each cost line starts with an address, absolute (0x...) or
# relative to the last (+n, -n, *); a "calls=" line is followed by the call's line,
# whose cost is the callee's, not this instruction's.
names = {}


def name(kind, text):
    m = re.match(r"\((\d+)\)(?: (.*))?", text)
    if not m:
        return text
    if m.group(2):
        names[(kind, m.group(1))] = m.group(2)
    return names.get((kind, m.group(1)), text)


cost = collections.Counter()
ob, last, call = None, 0, False
for line in open(path):
    line = line.rstrip("\n")
    if line.startswith("ob="):
        ob = name("ob", line[3:])
    elif line.startswith("cob="):
        name("ob", line[4:])
    elif line.startswith("calls="):
        call = True
    elif line and (line[0].isdigit() or line[0] in "+-*"):
        fields = line.split()
        t = fields[0]
        if t == "*":
            address = last
        elif t[0] in "+-":
            step = int(t[1:], 0)
            address = last + step if t[0] == "+" else last - step
        else:
            address = int(t, 0)
        last = address
        if call:
            call = False
            continue
        if ob and os.path.realpath(ob) == binary and len(fields) >= 3:
            cost[address] += int(fields[-1])

# A position-independent binary may be loaded at an offset: the one that matches most.
offset = max((0, 0x108000, 0x400000, 0x4000000), key=lambda o: sum(1 for a in cost if a - o in locked))
by_site = collections.Counter()
for address, n in cost.items():
    if address - offset in locked:
        by_site[(function(address - offset), locked[address - offset])] += n
print(f"{sum(by_site.values()) / requests:.1f}")
for (fn, instruction), n in by_site.most_common(top):
    print(f"{n / requests:6.2f}  {instruction:28s} {fn[:140]}")
