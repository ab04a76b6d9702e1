#!/usr/bin/env python3
"""Times one model on onnxruntime, one thread, the way inference/examples/runtime_bench.rs
times tract: warm up, run batches of the bundled test inputs for a fixed time, report the
median time per batch (the input copy is outside the timed call on both sides).

usage: bench_onnxruntime.py MODEL.onnx BATCH [SECONDS]
"""
import itertools
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort

path, batch = sys.argv[1], int(sys.argv[2])
seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
with open(os.path.join(root, "models", "digits_test_vectors.json")) as f:
    rows = json.load(f)["inputs"]
x = np.array(list(itertools.islice(itertools.cycle(rows), batch)), dtype=np.float32)

opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
for _ in range(200):
    sess.run(None, {"pixels": x})
times = []
end = time.perf_counter() + seconds
while time.perf_counter() < end:
    xi = x.copy()
    t = time.perf_counter()
    out = sess.run(None, {"pixels": xi})
    times.append(time.perf_counter() - t)
times.sort()
print(json.dumps({"runtime": "onnxruntime", "model": path, "batch": batch, "runs": len(times),
                  "median_us": round(times[len(times) // 2] * 1e6, 2)}))
