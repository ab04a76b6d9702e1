"""Seldon Core v1's own Thompson-sampling router class, behind the two HTTP endpoints
`switchyard load --reward` drives, so that the bandit benchmark can run it side by side
with the sidecar (bench/bandit-http.sh, SELDON_ROUTER=...).

Seldon's code is not in this repository: pass the path of `ThompsonSampling.py` from a
checkout of seldon-core (components/routers/thompson-sampling/, v1 branches). This file
only does what Seldon's executor does around it: per prediction, call `route()` and
answer as the chosen branch; per feedback, call `send_feedback()` with the branch that
answered, one prediction per feedback (`features.shape[0] == 1`), at once: reward 1 for a
conversion and 0 otherwise; for a revenue, the profit (revenue minus the branch's
`--costs`, per 1000 predictions as in `cost_per_1k`) clipped into [0, 1], since the
router counts int(reward) successes and 1 - int(reward) failures per prediction. It
answers the prediction itself (no upstream): only the choice matters to regret.

    python3 bench/seldon_router.py --router PATH/ThompsonSampling.py --port 19402 \
        --branches a:b:c --seed 1

Needs numpy (the router's own import). Loopback only.
"""

import argparse
import importlib.util
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


def load_router(path, branches, seed):
    spec = importlib.util.spec_from_file_location("seldon_thompson", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ThompsonSampling(n_branches=len(branches), seed=seed, branch_names=":".join(branches))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--router", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--branches", default="a:b:c")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--costs", default="", help="a=400,b=50: cost per 1000 predictions")
    args = ap.parse_args()
    branches = args.branches.split(":")
    costs = {}
    for part in filter(None, args.costs.split(",")):
        name, value = part.split("=")
        costs[name] = float(value) / 1000.0
    router = load_router(args.router, branches, args.seed)
    lock = threading.Lock()
    decided = {}  # request id -> branch index
    features = np.zeros((1, 1))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def answer(self, status, body, headers=()):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            n = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(n) if n else b""
            if self.path == "/v1/feedback":
                v = json.loads(body)
                items = v["feedback"] if isinstance(v, dict) and "feedback" in v else [v]
                results = []
                for it in items:
                    rid = it.get("request_id")
                    with lock:
                        branch = decided.pop(rid, None)
                        if branch is not None:
                            if "revenue" in it:
                                profit = float(it["revenue"]) - costs.get(branches[branch], 0.0)
                                reward = min(max(profit, 0.0), 1.0)
                            else:
                                reward = 1.0 if it.get("converted") else 0.0
                            router.send_feedback(features, [], reward, None, routing=branch)
                    results.append({"request_id": rid, "status": 200 if branch is not None else 404})
                if "feedback" in (v if isinstance(v, dict) else {}):
                    self.answer(200, {"results": results})
                else:
                    self.answer(results[0]["status"], results[0])
                return
            rid = self.headers.get("x-request-id") or uuid.uuid4().hex
            with lock:
                branch = int(router.route(features, []))
                decided[rid] = branch
            self.answer(
                200,
                {"predictions": [[0.1] * 10]},
                [("x-switchyard-variant", branches[branch]), ("x-request-id", rid)],
            )

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
