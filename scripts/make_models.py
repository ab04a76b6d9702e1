#!/usr/bin/env python3
"""Train and export Switchyard's bundled digit classifiers.

Data: scikit-learn's bundled handwritten digits (`load_digits`: 1797 8x8 images, pixel
values 0..16, 10 classes). Nothing is downloaded.

Outputs (in models/):
  digits_mlp.onnx           MLP 64-64-10, trained with scikit-learn's MLPClassifier
  digits_cnn.onnx           CNN conv3x3(8)-conv3x3(16)-maxpool2-dense(10), trained here in NumPy
  digits_test_vectors.json  the held-out test inputs, their labels, and onnxruntime's
                            outputs for both models (the parity reference for our runtimes)
  digits_models.json        what was trained: sizes, seeds, test accuracy, versions

Both graphs take the raw pixels exactly as load_digits gives them, FP32 [N, 64] named
`pixels`, scale them inside the graph, and output FP32 [N, 10] class probabilities named
`probabilities`. The batch dimension is symbolic (`N`).

Run: python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements-models.txt
     .venv/bin/python scripts/make_models.py
"""
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import sklearn
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

SEED = 20261127
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models")
OPSET = 13


def data():
    digits = load_digits()
    x = digits.data.astype(np.float32)  # (1797, 64), 0..16
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=360, random_state=SEED, stratify=y)


def io():
    inp = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 64])
    out = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])
    return inp, out


def save(graph, path, doc):
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="switchyard/scripts/make_models.py",
        doc_string=doc,
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def const(name, array):
    a = np.ascontiguousarray(array, dtype=np.float32)
    # Weights of pixels that are always 0 only ever see L2 decay during training and
    # shrink into the denormal range, where every multiply takes a slow microcode path
    # on x86 (it made a 64x64x64 product 3x slower in onnxruntime and ours). Flushing
    # them changes no output by more than 1e-38.
    a = np.where(np.abs(a) < np.finfo(np.float32).tiny, np.float32(0), a).astype(np.float32)
    return numpy_helper.from_array(a, name)


# --- MLP --------------------------------------------------------------------------------
def train_mlp(x_train, y_train):
    clf = MLPClassifier(
        hidden_layer_sizes=(64,),
        activation="relu",
        solver="adam",
        alpha=1e-4,
        max_iter=400,
        random_state=SEED,
    )
    clf.fit(x_train / 16.0, y_train)
    return clf


def export_mlp(clf, path):
    inp, out = io()
    (w1, w2), (b1, b2) = clf.coefs_, clf.intercepts_
    inits = [
        const("scale", np.array([1.0 / 16.0])),
        const("w1", w1), const("b1", b1), const("w2", w2), const("b2", b2),
    ]
    nodes = [
        helper.make_node("Mul", ["pixels", "scale"], ["scaled"]),
        helper.make_node("Gemm", ["scaled", "w1", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    save(helper.make_graph(nodes, "digits_mlp", [inp], [out], inits), path,
         "Digits MLP 64-64-10 (ReLU), input raw pixels 0..16")


# --- CNN (NumPy) ------------------------------------------------------------------------
def im2col(x, k=3, pad=1):
    """x: (N, C, H, W) -> (N, H*W, C*k*k) patches for a stride-1 'same' convolution."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = np.empty((n, c, k, k, h, w), dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = xp[:, :, i:i + h, j:j + w]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n, h * w, c * k * k)


def col2im(cols, shape, k=3, pad=1):
    n, c, h, w = shape
    cols = cols.reshape(n, h, w, c, k, k).transpose(0, 3, 4, 5, 1, 2)
    xp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=cols.dtype)
    for i in range(k):
        for j in range(k):
            xp[:, :, i:i + h, j:j + w] += cols[:, :, i, j]
    return xp[:, :, pad:pad + h, pad:pad + w]


class Cnn:
    """conv3x3(1->8) relu, conv3x3(8->16) relu, maxpool 2x2, dense 256->10, softmax."""

    def __init__(self, rng):
        he = lambda fan_in, shape: rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
        self.p = {
            "c1w": he(9, (8, 1, 3, 3)), "c1b": np.zeros(8, np.float32),
            "c2w": he(72, (16, 8, 3, 3)), "c2b": np.zeros(16, np.float32),
            "dw": he(256, (10, 256)), "db": np.zeros(10, np.float32),
        }

    def forward(self, x):
        n = x.shape[0]
        a0 = (x / 16.0).reshape(n, 1, 8, 8)
        c1 = im2col(a0)                                            # (n, 64, 9)
        z1 = (c1 @ self.p["c1w"].reshape(8, -1).T + self.p["c1b"])  # (n, 64, 8)
        a1 = np.maximum(z1, 0).transpose(0, 2, 1).reshape(n, 8, 8, 8)
        c2 = im2col(a1)                                            # (n, 64, 72)
        z2 = (c2 @ self.p["c2w"].reshape(16, -1).T + self.p["c2b"])  # (n, 64, 16)
        a2 = np.maximum(z2, 0).transpose(0, 2, 1).reshape(n, 16, 8, 8)
        win = a2.reshape(n, 16, 4, 2, 4, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, 16, 4, 4, 4)
        arg = win.argmax(axis=-1)
        pooled = win.max(axis=-1)                                  # (n, 16, 4, 4)
        flat = pooled.reshape(n, 256)
        logits = flat @ self.p["dw"].T + self.p["db"]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
        cache = (n, c1, z1, a1, c2, z2, arg, flat)
        return probs, cache

    def backward(self, probs, y, cache):
        n, c1, z1, a1, c2, z2, arg, flat = cache
        g = {}
        dlogits = probs.copy()
        dlogits[np.arange(n), y] -= 1
        dlogits /= n
        g["dw"] = dlogits.T @ flat
        g["db"] = dlogits.sum(0)
        dpooled = (dlogits @ self.p["dw"]).reshape(n, 16, 4, 4)
        dwin = np.zeros((n, 16, 4, 4, 4), np.float32)
        np.put_along_axis(dwin, arg[..., None], dpooled[..., None], axis=-1)
        da2 = dwin.reshape(n, 16, 4, 4, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, 16, 8, 8)
        dz2 = da2.reshape(n, 16, 64).transpose(0, 2, 1) * (z2 > 0)  # (n, 64, 16)
        g["c2w"] = np.einsum("npo,npk->ok", dz2, c2).reshape(16, 8, 3, 3)
        g["c2b"] = dz2.sum((0, 1))
        dc2 = dz2 @ self.p["c2w"].reshape(16, -1)                   # (n, 64, 72)
        da1 = col2im(dc2, (n, 8, 8, 8))
        dz1 = da1.reshape(n, 8, 64).transpose(0, 2, 1) * (z1 > 0)   # (n, 64, 8)
        g["c1w"] = np.einsum("npo,npk->ok", dz1, c1).reshape(8, 1, 3, 3)
        g["c1b"] = dz1.sum((0, 1))
        return g


def train_cnn(x_train, y_train, epochs=30, batch=32, lr=2e-3):
    rng = np.random.default_rng(SEED)
    net = Cnn(rng)
    m = {k: np.zeros_like(v) for k, v in net.p.items()}
    v = {k: np.zeros_like(v) for k, v in net.p.items()}
    t = 0
    for _ in range(epochs):
        order = rng.permutation(len(x_train))
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            probs, cache = net.forward(x_train[idx])
            grads = net.backward(probs, y_train[idx], cache)
            t += 1
            for k in net.p:  # Adam
                m[k] = 0.9 * m[k] + 0.1 * grads[k]
                v[k] = 0.999 * v[k] + 0.001 * grads[k] ** 2
                mh, vh = m[k] / (1 - 0.9 ** t), v[k] / (1 - 0.999 ** t)
                net.p[k] = (net.p[k] - lr * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
    return net


def export_cnn(net, path):
    inp, out = io()
    p = net.p
    inits = [
        const("scale", np.array([1.0 / 16.0])),
        numpy_helper.from_array(np.array([-1, 1, 8, 8], dtype=np.int64), "image_shape"),
        const("c1w", p["c1w"]), const("c1b", p["c1b"]),
        const("c2w", p["c2w"]), const("c2b", p["c2b"]),
        const("dw", p["dw"]), const("db", p["db"]),
    ]
    nodes = [
        helper.make_node("Mul", ["pixels", "scale"], ["scaled"]),
        helper.make_node("Reshape", ["scaled", "image_shape"], ["image"]),
        helper.make_node("Conv", ["image", "c1w", "c1b"], ["z1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["z1"], ["a1"]),
        helper.make_node("Conv", ["a1", "c2w", "c2b"], ["z2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["z2"], ["a2"]),
        helper.make_node("MaxPool", ["a2"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "dw", "db"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    save(helper.make_graph(nodes, "digits_cnn", [inp], [out], inits), path,
         "Digits CNN conv3x3(8)-conv3x3(16)-maxpool2-dense(10), input raw pixels 0..16")


def main():
    x_train, x_test, y_train, y_test = data()
    os.makedirs(OUT, exist_ok=True)
    mlp_path = os.path.join(OUT, "digits_mlp.onnx")
    cnn_path = os.path.join(OUT, "digits_cnn.onnx")

    mlp = train_mlp(x_train, y_train)
    export_mlp(mlp, mlp_path)
    cnn = train_cnn(x_train, y_train)
    export_cnn(cnn, cnn_path)

    vectors = {"inputs": x_test.tolist(), "labels": y_test.tolist()}
    manifest = {
        "data": "sklearn.datasets.load_digits, stratified split, 360 test images",
        "seed": SEED,
        "versions": {
            "python": sys.version.split()[0], "numpy": np.__version__,
            "scikit-learn": sklearn.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
        "models": {},
    }
    for name, path in [("mlp", mlp_path), ("cnn", cnn_path)]:
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        probs = sess.run(None, {"pixels": x_test})[0]
        acc = float((probs.argmax(1) == y_test).mean())
        # Our own forward pass must agree with onnxruntime: checks the export itself.
        if name == "mlp":
            ours = mlp.predict_proba(x_test / 16.0)
        else:
            ours = cnn.forward(x_test)[0]
        diff = float(np.abs(ours - probs).max())
        assert diff < 1e-4, f"{name}: exported graph differs from the trained model by {diff}"
        vectors[name] = probs.tolist()
        manifest["models"][name] = {
            "file": os.path.basename(path),
            "test_accuracy": acc,
            "trained": True,
            "max_abs_diff_training_vs_onnxruntime": diff,
        }
        print(f"{name}: test accuracy {acc:.4f} (onnxruntime), export check max diff {diff:.2e}")

    with open(os.path.join(OUT, "digits_test_vectors.json"), "w") as f:
        json.dump(vectors, f, separators=(",", ":"))
    with open(os.path.join(OUT, "digits_models.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
