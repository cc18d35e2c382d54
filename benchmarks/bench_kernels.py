"""Fused codebook kernels vs fp32 onnxruntime (and MatMulNBits for FC layers).

Synthetic models are built with random weights straight from the fused-format spec
(4 bits, one 16-entry codebook per output channel); their fused variant folds each
following Relu (and residual Add) into the op's epilogue, as onnxruntime does for fp32:

* resnet50  - ResNet-50-shaped (bottlenecks 3-4-6-3, 224x224, FC 1000)
* mobile    - EfficientNet-Lite0-shaped (MBConv with depthwise 3x3/5x5, 224x224)
* unet      - small UNet on 128x128 (3x3 Conv, MaxPool down, 2x2 stride-2 ConvTranspose up)
* digits    - small CNN on 8x8 inputs (2 Conv + 2 Gemm)
* fc        - 3 MatMul of 4096x4096; also compared with MatMulNBits 4-bit (block 32)

Real models go through the real pipeline, ``onnx_codebook.compress(path, bits=4,
granularity="channel", format="fused")`` (whatever epilogue folding the rewrite does):

* digits_cnn   - the bundled models/digits_cnn.onnx
* effnet_lite0 - EfficientNet-Lite0 from benchmarks/data.py (cached in ~/.cache/onnx-codebook)

For each (model, batch, threads) one subprocess times all variants, interleaved in
blocks (untimed runs for 0.15 s, then two timed runs) so that they share whatever load
the rest of the machine puts on it while no variant runs against another one's spinning
thread pool
(median wall clock and median process CPU time per run), and one fresh subprocess per variant
records the peak RSS of creating the session and running it twice, above the peak it
had after importing onnxruntime (VmHWM from /proc: ru_maxrss would start at the
parent's peak, as Linux carries it across execve).  Prints a markdown table and writes
benchmarks/results/kernels.md.

    pip install '.[bench]'   # onnx_ir, which onnxruntime's MatMulNBitsQuantizer imports
    python benchmarks/bench_kernels.py [--models resnet50,mobile,fc,digits_cnn,effnet_lite0] [--repeats 10]
        [--baseline-library path/to/other/libonnx_codebook_ops.so]   # A/B against another kernel build
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# The checked-out package, not an older installed copy: the real models are compressed
# by its rewrite.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnx_codebook import ops, schema  # noqa: E402
from onnx_codebook.pack import pack_bits  # noqa: E402

BITS = 4
OPSET = 17
MIN_SECONDS, MAX_SECONDS = 2.0, 20.0
TIMED_PER_BLOCK = 2
SETTLE_SECONDS = 0.15
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

    def conv(self, x, cin, cout, k, stride=1, group=1, act=True, residual=None):
        """Conv [+ residual] [-> Relu]; the fused variant folds both into the op."""
        shape = [cout, cin // group, k, k]
        cb, idx, w = self._weight(shape, 0, shape[1] * k * k)
        bias = (self.rng.standard_normal(cout) * 0.01).astype(np.float32)
        y = self.name("conv")
        attrs = {"strides": [stride, stride], "pads": [k // 2] * 4, "group": group, "kernel_shape": [k, k]}
        self.nodes.append(("Conv", dict(x=x, y=y, attrs=attrs, cb=cb, idx=idx, w=w, b=bias, shape=shape,
                                        act=act, z=residual)))
        return y

    def deconv(self, x, cin, cout, k, stride, act=True):
        """ConvTranspose (weight [cin, cout, k, k], no padding) [-> Relu]."""
        shape = [cin, cout, k, k]
        cb, idx, w = self._weight(shape, 1, cin * k * k // (stride * stride))
        bias = (self.rng.standard_normal(cout) * 0.01).astype(np.float32)
        y = self.name("deconv")
        attrs = {"strides": [stride, stride], "kernel_shape": [k, k]}
        self.nodes.append(("ConvTranspose", dict(x=x, y=y, attrs=attrs, cb=cb, idx=idx, w=w, b=bias, shape=shape,
                                                 act=act)))
        return y

    def gemm(self, x, kin, nout, act=False):
        shape = [nout, kin]  # transB=1
        cb, idx, w = self._weight(shape, 0, kin)
        bias = (self.rng.standard_normal(nout) * 0.01).astype(np.float32)
        y = self.name("gemm")
        self.nodes.append(("Gemm", dict(x=x, y=y, attrs={"transB": 1}, cb=cb, idx=idx, w=w, b=bias, shape=shape,
                                        act=act)))
        return y

    def matmul(self, x, kin, nout, act=False):
        shape = [kin, nout]
        cb, idx, w = self._weight(shape, 1, kin)
        y = self.name("mm")
        self.nodes.append(("MatMul", dict(x=x, y=y, attrs={}, cb=cb, idx=idx, w=w, b=None, shape=shape, act=act)))
        return y

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
            act, z = p.get("act", False), p.get("z")
            extra = []
            if p["b"] is not None:
                inits.append(numpy_helper.from_array(p["b"], f"{y}.b"))
                extra = [f"{y}.b"]
            if fused:
                cb_name, idx_name, _ = schema.indices_names(y)
                inits.append(numpy_helper.from_array(p["cb"], cb_name))
                inits.append(numpy_helper.from_array(pack_bits(p["idx"], BITS), idx_name))
                if z is not None:
                    extra = (extra or [""]) + [z]
                epilogue = {"activation": "Relu"} if act else {}
                nodes.append(helper.make_node(
                    schema.FUSED_OF[kind], [p["x"], idx_name, cb_name, *extra], [y], domain=schema.DOMAIN,
                    bits=BITS, weight_shape=p["shape"], group_size=1, **p["attrs"], **epilogue))
            else:
                inits.append(numpy_helper.from_array(p["w"], f"{y}.w"))
                out = f"{y}.op" if act or z is not None else y
                nodes.append(helper.make_node(kind, [p["x"], f"{y}.w", *extra], [out], **p["attrs"]))
                if z is not None:
                    added = f"{y}.add" if act else y
                    nodes.append(helper.make_node("Add", [out, z], [added]))
                    out = added
                if act:
                    nodes.append(helper.make_node("Relu", [out], [y]))
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
            short = b.conv(x, cin, width * 4, 1, stride=s, act=False) if i == 0 else x
            x = b.conv(h, width, width * 4, 1, act=True, residual=short)  # relu(conv + shortcut)
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
            x = b.conv(h, mid, cout, 1, act=False, residual=x if s == 1 and cin == cout else None)
            cin = cout
    x = b.conv(x, cin, 1280, 1)
    x = b.plain("GlobalAveragePool", [x])
    x = b.plain("Flatten", [x])
    return b.gemm(x, 1280, 1000), [3, 224, 224]


def build_unet(b: Builder):
    """A small UNet: 3x3 convolutions, 2x2 max pooling down, 2x2 stride-2 ConvTranspose up."""
    skips, x, cin = [], "x", 3
    for width in (32, 64, 128):
        x = b.conv(b.conv(x, cin, width, 3), width, width, 3)
        skips.append(x)
        x = b.plain("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        cin = width
    x = b.conv(b.conv(x, cin, 256, 3), 256, 256, 3)
    cin = 256
    for width, skip in zip((128, 64, 32), reversed(skips)):
        x = b.deconv(x, cin, width, 2, 2)
        x = b.plain("Concat", [x, skip], axis=1)
        x = b.conv(b.conv(x, 2 * width, width, 3), width, width, 3)
        cin = width
    return b.conv(x, cin, 4, 1, act=False), [3, 128, 128]


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


MODELS = {"resnet50": build_resnet50, "mobile": build_mobile, "unet": build_unet, "digits": build_digits,
          "fc": build_fc}


def real_model_path(name: str) -> Path:
    repo = Path(__file__).resolve().parents[1]
    if name == "digits_cnn":
        return repo / "models" / "digits_cnn.onnx"
    sys.path.insert(0, str(repo))
    from benchmarks.data import efficientnet_lite0_onnx

    return efficientnet_lite0_onnx()


REAL_MODELS = ("digits_cnn", "effnet_lite0")


def variants_of(name: str) -> dict[str, onnx.ModelProto]:
    """fp32 / fused (/ nbits) ModelProtos of a synthetic or real model."""
    if name in REAL_MODELS:
        import onnx_codebook

        path = real_model_path(name)
        fused = onnx_codebook.compress(str(path), bits=BITS, granularity="channel", format="fused")
        return {"fp32": onnx.load(str(path)), "fused": fused}
    b = Builder(np.random.default_rng(0))
    output, in_shape = MODELS[name](b)
    variants = {"fp32": b.emit(False, ["N", *in_shape], output), "fused": b.emit(True, ["N", *in_shape], output)}
    if name == "fc":
        fp32_copy = onnx.ModelProto()
        fp32_copy.CopyFrom(variants["fp32"])
        variants["nbits"] = matmul_nbits(fp32_copy)  # quantizes in place
    return variants


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


def _session(path: str, threads: int, batch: int, needs_ops: bool, library: str | None = None):
    """library: a custom-op library file to register instead of the package's own."""
    import onnxruntime as ort

    options = ops.session_options(needs_ops and library is None, threads)
    if library is not None:
        options.register_custom_ops_library(library)
    sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal([batch, *inp.shape[1:]]).astype(np.float32)
    return sess, {inp.name: x}


def child_rss(path: str, batch: int, threads: int, needs_ops: bool, library: str | None = None) -> None:
    """Peak RSS of one model in this (fresh) process: session creation and two runs."""
    import onnxruntime  # noqa: F401  (the baseline includes onnxruntime itself)

    base = peak_rss_kb()
    sess, feeds = _session(path, threads, batch, needs_ops, library)
    out = sess.run(None, feeds)[0]
    sess.run(None, feeds)
    print(json.dumps({"peak_mb": (peak_rss_kb() - base) / 1024, "checksum": float(np.abs(out).mean())}))


def child_time(paths: dict, batch: int, threads: int, repeats: int, baseline: str | None = None) -> None:
    """Times all variants in one process, interleaved in short blocks, so that they see
    the same load from the rest of the machine; prints a JSON line per variant.

    Each block is untimed runs for at least SETTLE_SECONDS (one at least), then
    TIMED_PER_BLOCK timed ones: after a session's run its pool threads spin for a
    while, and with 2 threads on 2 cores the spinning pool of the variant that ran
    before slows the next one down (fp32 ResNet-50 at batch 1 measured 75 ms
    interleaved run by run, 39 ms in blocks, 42 ms alone; on EfficientNet-Lite0 at
    batch 1, 6 ms runs, a single untimed run was not enough).  A deployment runs one
    session per process, so the runs right after a switch are dropped.
    """
    sessions = {v: _session(p, threads, batch, v == "fused") for v, p in paths.items()}
    if baseline:  # the same fused model on another build of the library (an A/B of two kernel versions)
        sessions["baseline"] = _session(paths["fused"], threads, batch, True, baseline)
    for sess, feeds in sessions.values():
        sess.run(None, feeds)  # warm-up
    times = {v: [] for v in sessions}
    cpu = {v: [] for v in sessions}
    start = time.perf_counter()
    # at least `repeats` rounds and MIN_SECONDS (small models), at most MAX_SECONDS
    while True:
        for v, (sess, feeds) in sessions.items():
            settle = time.perf_counter() + SETTLE_SECONDS
            sess.run(None, feeds)  # untimed while the other sessions' pool threads stop spinning
            while time.perf_counter() < settle:
                sess.run(None, feeds)
            for _ in range(TIMED_PER_BLOCK):
                t0, c0 = time.perf_counter(), time.process_time()
                sess.run(None, feeds)
                times[v].append(time.perf_counter() - t0)
                cpu[v].append(time.process_time() - c0)
        rounds, elapsed = len(times["fp32"]) // TIMED_PER_BLOCK, time.perf_counter() - start
        if rounds >= 3 and (elapsed > MAX_SECONDS or (rounds >= repeats and elapsed > MIN_SECONDS)):
            break
        if rounds >= 5000:
            break
    print(json.dumps({v: {"median_ms": 1e3 * float(np.median(times[v])), "cpu_ms": 1e3 * float(np.median(cpu[v])),
                          "runs": len(times[v])} for v in sessions}))


def run_child(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if res.returncode != 0:
        raise RuntimeError(f"child failed for {spec}: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(paths: dict, batch: int, threads: int, repeats: int, baseline: str | None = None) -> dict:
    """{variant: {median_ms, cpu_ms, runs, peak_mb, checksum}} for one configuration."""
    timed = run_child({"mode": "time", "paths": {v: str(p) for v, p in paths.items()}, "batch": batch,
                       "threads": threads, "repeats": repeats, "baseline": baseline})
    for v, p in paths.items():
        timed[v].update(run_child({"mode": "rss", "path": str(p), "batch": batch, "threads": threads,
                                   "needs_ops": v == "fused"}))
    return timed


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join([*MODELS, *REAL_MODELS]))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels.md"))
    parser.add_argument("--baseline-library", help="also time the fused models on this build of the custom-op "
                        "library (e.g. an older commit's), interleaved with the others: an A/B of two kernel versions")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        (child_time if spec.pop("mode") == "time" else child_rss)(**spec)
        return

    ok, message = ops.library_status()
    if not ok:
        sys.exit(f"bench_kernels: {message}")
    import onnxruntime as ort

    command = "python benchmarks/bench_kernels.py" + "".join(f" {a}" for a in sys.argv[1:])
    lines = [
        f"Command: `{command}`",
        "",
        f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, fused = {BITS}-bit per-channel codebooks "
        f"(group_size=1); synthetic models (resnet50, mobile, unet, digits, fc) fold Relu / residual Add into the fused "
        "ops' epilogue, real models (digits_cnn, effnet_lite0) are `onnx_codebook.compress(path, bits=4, "
        'granularity="channel", format="fused")` as the rewrite produces them.  Latency: the variants of a row run '
        "interleaved in one process after a warm-up run, in rounds of one block per variant (untimed runs for "
        f"{SETTLE_SECONDS} s, while the previous variant's pool threads stop spinning, then {TIMED_PER_BLOCK} timed "
        "runs), median "
        f"wall clock of at least {args.repeats} rounds and {MIN_SECONDS:.0f} s (at most {MAX_SECONDS:.0f} s); CPU ms: "
        "median process CPU time "
        "per run (the machine was shared with other jobs); peak RSS = peak resident set (VmHWM; ru_maxrss where /proc "
        "is missing) of a fresh subprocess per variant creating the session and running it twice, above its peak "
        "after importing onnxruntime; weights = bytes of all initializers.",
        "",
        "| model | batch | threads | fp32 ms | fused ms | fused/fp32 | fp32 CPU ms | fused CPU ms | CPU fused/fp32 "
        "| nbits ms | fused/nbits "
        + ("| baseline ms | baseline/fp32 " if args.baseline_library else "")
        + "| fp32 peak MB | fused peak MB | peak ratio | weights fp32 MB | weights fused MB | weight ratio |",
        "|---" * (19 if args.baseline_library else 17) + "|",
    ]
    if args.baseline_library:
        lines[2:2] = [f"Baseline: the fused models on `{args.baseline_library}`, timed in the same rounds.", ""]
    print("\n".join(lines), flush=True)
    notes = ["", "Nodes of the fused graphs:", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            variants = variants_of(name)
            paths, wbytes = {}, {}
            for v, m in variants.items():
                paths[v] = Path(tmp) / f"{name}.{v}.onnx"
                onnx.save(m, str(paths[v]))
                wbytes[v] = weight_bytes(m) / 2**20
            counts = Counter(n.op_type for n in variants["fused"].graph.node)
            notes.append(f"- {name} fused graph: " + ", ".join(f"{op} {c}" for op, c in sorted(counts.items())))
            del variants
            for batch in map(int, args.batches.split(",")):
                for threads in map(int, args.threads.split(",")):
                    r = measure(paths, batch, threads, args.repeats, args.baseline_library)
                    diff = abs(r["fused"]["checksum"] - r["fp32"]["checksum"]) / max(r["fp32"]["checksum"], 1e-12)
                    if diff > 1e-3 and name not in REAL_MODELS:  # real models are re-clustered: they differ
                        print(f"WARNING: {name} fused output differs from fp32 (mean |y| rel diff {diff:.2e})")
                    nb = r.get("nbits")
                    fp, fu = r["fp32"], r["fused"]
                    row = (
                        f"| {name} | {batch} | {threads} | {fp['median_ms']:.2f} | {fu['median_ms']:.2f} "
                        f"| {fu['median_ms'] / fp['median_ms']:.2f} | {fp['cpu_ms']:.2f} | {fu['cpu_ms']:.2f} "
                        f"| {fu['cpu_ms'] / fp['cpu_ms']:.2f} "
                    )
                    row += (
                        f"| {nb['median_ms']:.2f} | {fu['median_ms'] / nb['median_ms']:.2f} " if nb else "| - | - "
                    )
                    if args.baseline_library:
                        bl = r["baseline"]
                        row += f"| {bl['median_ms']:.2f} | {bl['median_ms'] / fp['median_ms']:.2f} "
                    row += (
                        f"| {r['fp32']['peak_mb']:.1f} | {r['fused']['peak_mb']:.1f} "
                        f"| {r['fused']['peak_mb'] / max(r['fp32']['peak_mb'], 1e-9):.2f} "
                        f"| {wbytes['fp32']:.1f} | {wbytes['fused']:.1f} | {wbytes['fused'] / wbytes['fp32']:.3f} |"
                    )
                    lines.append(row)
                    print(row, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print("\n".join(notes))
    out.write_text("# Kernel benchmark\n\n" + "\n".join(lines + notes) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
