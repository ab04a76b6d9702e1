#!/usr/bin/env python3
"""Real clients against a running Switchyard (started by tests/clients.rs).

tritonclient 2.73 (HTTP and gRPC) and kserve's InferenceRESTClient, as users run
them, on the bundled digits: binary tensors on and off, FP32 and FP64, batch 1 and 32,
gzip and deflate, to a local variant (`digits`) and through the sidecar to a remote one
(`remote`: an HTTP variant and a gRPC variant on a second Switchyard, the model server);
model config and statistics; errors. Every answer's top-1 is compared with the HTTP/JSON
answer for the same rows. Exits non-zero on the first failure, saying which.

Usage: check_clients.py triton|kserve HOST:PORT VECTORS_JSON
(one process per client: both register the `inference.*` protobuf messages, and one
process's descriptor pool refuses the second set.)
"""

import json
import sys
import urllib.error
import urllib.request

import numpy as np

CHECKS = []


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}", flush=True)
        sys.exit(1)
    CHECKS.append(name)


def json_top1(addr, model, x):
    """The plain HTTP/JSON answer's classes, to compare every client's with."""
    body = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32",
                                   "shape": list(x.shape), "data": x.flatten().tolist()}]}).encode()
    req = urllib.request.Request(f"http://{addr}/v2/models/{model}/infer", data=body,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        out = json.load(r)["outputs"][0]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"]).argmax(axis=1)


def main():
    which, addr, vectors_path = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(vectors_path) as f:
        vectors = json.load(f)
    x_all = np.array(vectors["inputs"], dtype=np.float32)
    labels = np.array(vectors["labels"])
    {"triton": triton, "kserve": kserve}[which](addr, x_all, labels)
    print(f"ok: {len(CHECKS)} {which} checks passed")


def triton(addr, x_all, labels):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    def json_top1_(model, x):
        return json_top1(addr, model, x)

    http = httpclient.InferenceServerClient(addr)
    check("http live", http.is_server_live())
    check("http ready", http.is_server_ready())
    for model in ["digits", "remote"]:
        check(f"http model ready {model}", http.is_model_ready(model))
        for rows in [1, 32]:
            want = json_top1_(model, x_all[:rows])
            for dtype, np_dtype in [("FP32", np.float32), ("FP64", np.float64)]:
                for binary in [False, True]:
                    for compression in [None, "gzip", "deflate"]:
                        inp = httpclient.InferInput("pixels", [rows, 64], dtype)
                        inp.set_data_from_numpy(x_all[:rows].astype(np_dtype), binary_data=binary)
                        out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
                        res = http.infer(model, [inp], outputs=[out],
                                         request_compression_algorithm=compression,
                                         response_compression_algorithm=compression)
                        got = res.as_numpy("probabilities")
                        what = f"http {model} rows={rows} {dtype} binary={binary} {compression}"
                        check(what + " shape", got is not None and got.shape == (rows, 10), got)
                        check(what + " top1", (got.argmax(axis=1) == want).all(),
                              f"{got.argmax(axis=1)} vs {want}")
    # The defaults of tritonclient's InferInput: binary data on.
    acc = (json_top1_("digits", x_all[:32]) == labels[:32]).mean()
    check("held-out accuracy is meaningful", acc > 0.8, acc)

    config = http.get_model_config("digits")
    check("config name", config["name"] == "digits", config)
    check("config input", config["input"][0]["dims"] == [64] and config["input"][0]["data_type"] == "TYPE_FP32", config)
    check("config max_batch_size", config["max_batch_size"] == 32, config)
    stats = http.get_inference_statistics("digits")["model_stats"][0]
    check("stats count", int(stats["inference_count"]) > 0 and int(stats["inference_stats"]["success"]["count"]) > 0, stats)
    meta = http.get_model_metadata("digits")
    check("metadata", meta["inputs"][0]["shape"] == [-1, 64], meta)
    # Through the sidecar to the remote server's own config endpoint (name rewritten).
    remote_config = http.get_model_config("remote")
    check("remote config forwarded", remote_config["name"] == "served", remote_config)

    # Errors.
    try:
        inp = httpclient.InferInput("pixels", [1, 64], "FP32")
        inp.set_data_from_numpy(x_all[:1], binary_data=True)
        http.infer("digits", [inp], model_version="99")
        check("http version 99 is refused", False)
    except InferenceServerException as e:
        check("http version 99 is 404", "99" in e.message() and e.status() == "404", (e.status(), e.message()))
    try:
        inp = httpclient.InferInput("pixels", [1, 64], "FP32")
        inp.set_data_from_numpy(x_all[:1], binary_data=True)
        http.infer("digits", [inp], outputs=[httpclient.InferRequestedOutput("logits")])
        check("unknown output is refused", False)
    except InferenceServerException as e:
        check("unknown output is 400", "logits" in e.message(), e.message())
    # A decompression bomb: 64 MiB of zeros, gzip'd to tens of KB.
    import gzip
    bomb = gzip.compress(b"\0" * (64 << 20))
    req = urllib.request.Request(f"http://{addr}/v2/models/digits/infer", data=bomb,
                                 headers={"content-encoding": "gzip", "content-type": "application/json"})
    try:
        urllib.request.urlopen(req)
        check("bomb refused", False)
    except urllib.error.HTTPError as e:
        check("bomb is 413", e.code == 413, e.code)

    # gRPC, on the same port.
    grpc = grpcclient.InferenceServerClient(addr)
    check("grpc live", grpc.is_server_live())
    check("grpc ready", grpc.is_server_ready())
    check("grpc server metadata", grpc.get_server_metadata().name == "switchyard")
    for model in ["digits", "remote"]:
        check(f"grpc model ready {model}", grpc.is_model_ready(model))
        md = grpc.get_model_metadata(model)
        check(f"grpc metadata {model}", list(md.inputs[0].shape) == [-1, 64], md)
        for rows in [1, 32]:
            want = json_top1_(model, x_all[:rows])
            for dtype, np_dtype in [("FP32", np.float32), ("FP64", np.float64)]:
                inp = grpcclient.InferInput("pixels", [rows, 64], dtype)
                inp.set_data_from_numpy(x_all[:rows].astype(np_dtype))
                res = grpc.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("probabilities")])
                got = res.as_numpy("probabilities")
                what = f"grpc {model} rows={rows} {dtype}"
                check(what + " shape", got.shape == (rows, 10), got.shape)
                check(what + " top1", (got.argmax(axis=1) == want).all(), f"{got.argmax(axis=1)} vs {want}")
    # Triton's extensions over gRPC: a local model's config and statistics (what the
    # HTTP endpoints say, as Triton's messages), and a remote one's forwarded.
    from tritonclient.grpc import model_config_pb2
    config = grpc.get_model_config("digits").config
    check("grpc config name", config.name == "digits", config)
    check("grpc config input", list(config.input[0].dims) == [64]
          and model_config_pb2.DataType.Name(config.input[0].data_type) == "TYPE_FP32", config)
    check("grpc config output", list(config.output[0].dims) == [10] and config.output[0].name == "probabilities", config)
    check("grpc config max_batch_size", config.max_batch_size == 32, config)
    check("grpc config batching", config.HasField("dynamic_batching"), config)
    check("grpc config instances", config.instance_group[0].count > 0
          and model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_CPU", config)
    http_config = http.get_model_config("digits")
    check("grpc config is the http one", config.backend == http_config["backend"]
          and config.platform == http_config["platform"], (config, http_config))
    grpc_stats = grpc.get_inference_statistics("digits").model_stats[0]
    check("grpc stats", grpc_stats.name == "digits" and grpc_stats.inference_count >= int(stats["inference_count"])
          and grpc_stats.inference_stats.success.count > 0 and grpc_stats.inference_stats.compute_infer.ns > 0, grpc_stats)
    remote_grpc_config = grpc.get_model_config("remote").config
    check("grpc remote config forwarded", remote_grpc_config.name == "served", remote_grpc_config)

    # Classification through tritonclient: "score:index" strings, top one the label.
    inp = grpcclient.InferInput("pixels", [1, 64], "FP32")
    inp.set_data_from_numpy(x_all[:1])
    res = grpc.infer("digits", [inp], outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=3)])
    top = res.as_numpy("probabilities")[0][0].decode()
    check("grpc classification", top.endswith(f":{labels[0]}"), top)
    try:
        grpc.infer("digits", [inp], model_version="99")
        check("grpc version 99 is refused", False)
    except InferenceServerException as e:
        check("grpc version 99 is NOT_FOUND", "NOT_FOUND" in str(e.status()), (e.status(), e.message()))
    try:
        grpc.infer("nope", [inp])
        check("grpc unknown model is refused", False)
    except InferenceServerException as e:
        check("grpc unknown model is NOT_FOUND", "NOT_FOUND" in str(e.status()), (e.status(), e.message()))



def kserve(addr, x_all, labels):
    """kserve's REST client, binary tensors on (its default in V2)."""
    import asyncio

    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    async def kserve_infer(rows):
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
        try:
            inp = InferInput(name="pixels", shape=[rows, 64], datatype="FP32")
            inp.set_data_from_numpy(x_all[:rows], binary_data=True)
            req = InferRequest(model_name="digits", infer_inputs=[inp], request_id="kserve-1")
            res = await client.infer(f"http://{addr}", req, model_name="digits")
            return res.outputs[0].as_numpy()
        finally:
            await client.close()

    for rows in [1, 32]:
        got = asyncio.run(kserve_infer(rows))
        want = json_top1(addr, "digits", x_all[:rows])
        check(f"kserve rows={rows} top1", (np.asarray(got).reshape(rows, 10).argmax(axis=1) == want).all(), got)


if __name__ == "__main__":
    main()
