"""Fused codebook kernels vs fp32 onnxruntime (and MatMulNBits for FC layers).

Builds random-weight models straight from the fused-format spec (4 bits, one 16-entry
codebook per output channel), so it depends only on onnx_codebook.schema/pack/ops:

* resnet50  - ResNet-50-shaped (bottlenecks 3-4-6-3, 224x224, FC 1000)
* mobile    - EfficientNet-Lite0-shaped (MBConv with depthwise 3x3/5x5, 224x224)
* digits    - small CNN on 8x8 inputs (2 Conv + 2 Gemm)
* fc        - 3 MatMul of 4096x4096; also compared with MatMulNBits 4-bit (block 32)

Each (model, variant, batch, threads) runs in its own subprocess, which records the
median latency of repeated runs and its peak RSS above the peak it had after
importing onnxruntime (VmHWM from /proc: ru_maxrss would start at the parent's peak,
as Linux carries it across execve).  Prints a markdown table and writes
benchmarks/results/kernels.md.

    python benchmarks/bench_kernels.py [--models resnet50,mobile,digits,fc] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_codebook import ops, schema
from onnx_codebook.pack import pack_bits

BITS = 4
OPSET = 17
IR_VERSION = 8


class Builder:
    """Records a graph once and emits it with fp32 weights or fused codebook ops."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes: list[tuple] = []  # (kind, payload)
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def _weight(self, shape, axis, fan_in):
        channels = shape[axis]
        k = 2**BITS
        scale = np.sqrt(2.0 / fan_in)
        codebook = (np.sort(self.rng.standard_normal((channels, k)), axis=1) * scale).astype(np.float32)
        indices = self.rng.integers(0, k, size=shape).astype(np.uint8)
        rows = np.arange(channels).reshape([-1 if i == axis else 1 for i in range(len(shape))])
        weight = codebook[np.broadcast_to(rows, shape), indices].astype(np.float32)
        return codebook, indices, weight

    def conv(self, x, cin, cout, k, stride=1, group=1, act=True):
        shape = [cout, cin // group, k, k]
        cb, idx, w = self._weight(shape, 0, shape[1] * k * k)
        bias = (self.rng.standard_normal(cout) * 0.01).astype(np.float32)
        y = self.name("conv")
        attrs = {"strides": [stride, stride], "pads": [k // 2] * 4, "group": group, "kernel_shape": [k, k]}
        self.nodes.append(("Conv", dict(x=x, y=y, attrs=attrs, cb=cb, idx=idx, w=w, b=bias, shape=shape)))
        return self.relu(y) if act else y

    def gemm(self, x, kin, nout, act=False):
        shape = [nout, kin]  # transB=1
        cb, idx, w = self._weight(shape, 0, kin)
        bias = (self.rng.standard_normal(nout) * 0.01).astype(np.float32)
        y = self.name("gemm")
        self.nodes.append(("Gemm", dict(x=x, y=y, attrs={"transB": 1}, cb=cb, idx=idx, w=w, b=bias, shape=shape)))
        return self.relu(y) if act else y

    def matmul(self, x, kin, nout, act=False):
        shape = [kin, nout]
        cb, idx, w = self._weight(shape, 1, kin)
        y = self.name("mm")
        self.nodes.append(("MatMul", dict(x=x, y=y, attrs={}, cb=cb, idx=idx, w=w, b=None, shape=shape)))
        return self.relu(y) if act else y

    def plain(self, op, inputs, **attrs):
        y = self.name(op.lower())
        self.nodes.append(("plain", dict(op=op, inputs=inputs, y=y, attrs=attrs)))
        return y

    def relu(self, x):
        return self.plain("Relu", [x])

    def emit(self, fused: bool, input_shape, output) -> onnx.ModelProto:
        nodes, inits = [], []
        for kind, p in self.nodes:
            if kind == "plain":
                nodes.append(helper.make_node(p["op"], p["inputs"], [p["y"]], **p["attrs"]))
                continue
            y = p["y"]
            extra = []
            if p["b"] is not None:
                inits.append(numpy_helper.from_array(p["b"], f"{y}.b"))
                extra = [f"{y}.b"]
            if fused:
                cb_name, idx_name, _ = schema.indices_names(y)
                inits.append(numpy_helper.from_array(p["cb"], cb_name))
                inits.append(numpy_helper.from_array(pack_bits(p["idx"], BITS), idx_name))
                nodes.append(helper.make_node(
                    schema.FUSED_OF[kind], [p["x"], idx_name, cb_name, *extra], [y], domain=schema.DOMAIN,
                    bits=BITS, weight_shape=p["shape"], group_size=1, **p["attrs"]))
            else:
                inits.append(numpy_helper.from_array(p["w"], f"{y}.w"))
                nodes.append(helper.make_node(kind, [p["x"], f"{y}.w", *extra], [y], **p["attrs"]))
        graph = helper.make_graph(
            nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], initializer=inits)
        opsets = [helper.make_opsetid("", OPSET)]
        if fused:
            opsets.append(helper.make_opsetid(schema.DOMAIN, schema.DOMAIN_VERSION))
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = IR_VERSION
        return model


def build_resnet50(b: Builder):
    x = b.conv("x", 3, 64, 7, stride=2)
    x = b.plain("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            s = stride if i == 0 else 1
            h = b.conv(x, cin, width, 1)
            h = b.conv(h, width, width, 3, stride=s)
            h = b.conv(h, width, width * 4, 1, act=False)
            short = b.conv(x, cin, width * 4, 1, stride=s, act=False) if i == 0 else x
            x = b.relu(b.plain("Add", [h, short]))
            cin = width * 4
    x = b.plain("GlobalAveragePool", [x])
    x = b.plain("Flatten", [x])
    return b.gemm(x, 2048, 1000), [3, 224, 224]


def build_mobile(b: Builder):
    x = b.conv("x", 3, 32, 3, stride=2)
    cin = 32
    for expand, cout, repeats, stride, k in [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3),
                                             (6, 112, 3, 1, 5), (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]:
        for i in range(repeats):
            s = stride if i == 0 else 1
            mid = cin * expand
            h = b.conv(x, cin, mid, 1) if expand != 1 else x
            h = b.conv(h, mid, mid, k, stride=s, group=mid)
            h = b.conv(h, mid, cout, 1, act=False)
            x = b.plain("Add", [h, x]) if s == 1 and cin == cout else h
            cin = cout
    x = b.conv(x, cin, 1280, 1)
    x = b.plain("GlobalAveragePool", [x])
    x = b.plain("Flatten", [x])
    return b.gemm(x, 1280, 1000), [3, 224, 224]


def build_digits(b: Builder):
    x = b.conv("x", 1, 16, 3)
    x = b.conv(x, 16, 32, 3)
    x = b.plain("Flatten", [x])
    x = b.gemm(x, 32 * 64, 64, act=True)
    return b.gemm(x, 64, 10), [1, 8, 8]


def build_fc(b: Builder):
    x = b.matmul("x", 4096, 4096, act=True)
    x = b.matmul(x, 4096, 4096, act=True)
    return b.matmul(x, 4096, 4096), [4096]


MODELS = {"resnet50": build_resnet50, "mobile": build_mobile, "digits": build_digits, "fc": build_fc}


def matmul_nbits(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quant = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True, accuracy_level=None)
    quant.process()
    return quant.model.model


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


# ----------------------------------------------------------------------------- child


def peak_rss_kb() -> int:
    """Peak RSS of this process in KiB.

    ru_maxrss survives execve (a child starts with its parent's peak), so VmHWM of
    the fresh address space is read where available.
    """
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(path: str, batch: int, threads: int, repeats: int, needs_ops: bool, shape: list[int]) -> None:
    import onnxruntime as ort

    base = peak_rss_kb()
    options = ops.session_options(needs_ops, threads)
    sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal([batch, *shape]).astype(np.float32)
    out = sess.run(None, {"x": x})[0]
    times, cpu = [], []
    deadline = time.perf_counter() + 20.0
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if time.perf_counter() > deadline and len(times) >= 3:
            break
    peak = peak_rss_kb()
    print(json.dumps({"median_ms": 1e3 * float(np.median(times)), "cpu_ms": 1e3 * float(np.median(cpu)),
                      "peak_mb": (peak - base) / 1024,
                      "runs": len(times),
                      "checksum": float(np.abs(out).mean())}))


def measure(path: Path, batch: int, threads: int, repeats: int, needs_ops: bool, shape) -> dict:
    spec = json.dumps({"path": str(path), "batch": batch, "threads": threads, "repeats": repeats,
                       "needs_ops": needs_ops, "shape": list(shape)})
    cmd = [sys.executable, __file__, "--child", spec]
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if res.returncode != 0:
        raise RuntimeError(f"child failed for {path.name}: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(**json.loads(args.child))
        return

    ok, message = ops.library_status()
    if not ok:
        sys.exit(f"bench_kernels: {message}")
    import onnxruntime as ort

    lines = [
        f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, fused = {BITS}-bit per-channel codebooks "
        f"(group_size=1); median wall-clock latency of up to {args.repeats} runs (CPU-time ratio: median "
        "process CPU time per run, less sensitive to other load on the machine); peak RSS = peak resident set (VmHWM; "
        "ru_maxrss where /proc is missing) of a fresh subprocess per row, above its peak after importing onnxruntime.",
        "",
        "| model | batch | threads | fp32 ms | fused ms | fused/fp32 | CPU-time fused/fp32 | nbits ms | fused/nbits "
        "| fp32 peak MB | fused peak MB | peak ratio | weights fp32 MB | weights fused MB | weight ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            b = Builder(np.random.default_rng(0))
            output, in_shape = MODELS[name](b)
            variants = {"fp32": b.emit(False, ["N", *in_shape], output), "fused": b.emit(True, ["N", *in_shape], output)}
            if name == "fc":
                fp32_copy = onnx.ModelProto()
                fp32_copy.CopyFrom(variants["fp32"])
                variants["nbits"] = matmul_nbits(fp32_copy)  # quantizes in place
            paths, wbytes = {}, {}
            for v, m in variants.items():
                paths[v] = Path(tmp) / f"{name}.{v}.onnx"
                onnx.save(m, str(paths[v]))
                wbytes[v] = weight_bytes(m) / 2**20
            del variants, b
            for batch in map(int, args.batches.split(",")):
                for threads in map(int, args.threads.split(",")):
                    r = {v: measure(p, batch, threads, args.repeats, v == "fused", in_shape) for v, p in paths.items()}
                    diff = abs(r["fused"]["checksum"] - r["fp32"]["checksum"]) / max(r["fp32"]["checksum"], 1e-12)
                    if diff > 1e-3:
                        print(f"WARNING: {name} fused output differs from fp32 (mean |y| rel diff {diff:.2e})")
                    nb = r.get("nbits")
                    fp, fu = r["fp32"], r["fused"]
                    row = (
                        f"| {name} | {batch} | {threads} | {fp['median_ms']:.2f} | {fu['median_ms']:.2f} "
                        f"| {fu['median_ms'] / fp['median_ms']:.2f} | {fu['cpu_ms'] / fp['cpu_ms']:.2f} "
                    )
                    row += (
                        f"| {nb['median_ms']:.2f} | {fu['median_ms'] / nb['median_ms']:.2f} " if nb else "| - | - "
                    )
                    row += (
                        f"| {r['fp32']['peak_mb']:.1f} | {r['fused']['peak_mb']:.1f} "
                        f"| {r['fused']['peak_mb'] / max(r['fp32']['peak_mb'], 1e-9):.2f} "
                        f"| {wbytes['fp32']:.1f} | {wbytes['fused']:.1f} | {wbytes['fused'] / wbytes['fp32']:.3f} |"
                    )
                    lines.append(row)
                    print(row, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Kernel benchmark\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
