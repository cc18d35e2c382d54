"""Fused vs fp32 latency on small real CNNs and on ConvTranspose decoders exported from PyTorch.

Pretrained weights come from registry packages (see ../shared/DATA.md), fetched into the cache of
``benchmarks/data.py`` at first use and exported with torch 2.13 (needed only for that first export):

* mnist_cnn       - ccexam==1.0.0 ``ccexam/weights/mnist.pth`` (2 Conv + 2 Gemm, 1x28x28)
* mtcnn_pnet/rnet/onet - facenet-pytorch==2.6.0 ``facenet_pytorch/data/{p,r,o}net.pt`` (the nets' classes are
  executed from the downloaded package's ``models/mtcnn.py``); P-Net at 3x240x320, R-Net 3x24x24, O-Net 3x48x48

Decoders with random weights (seed 0), defined below, for ``CodebookConvTranspose``:

* dcgan   - DCGAN generator: 5 ConvTranspose 4x4 (the first on a 1x1 latent), BatchNormalization, Relu, Tanh
* seg     - two stride-2 Conv down, two 3x3 stride-2 ConvTranspose with output_padding up, a grouped
  ConvTranspose, 1x1 head; 3x96x128
* audio   - two ConvTranspose1d (kernel 8, stride 4) on 128x50

Other architectures with random weights (seed 0, BatchNormalization statistics that are not the identity),
defined below, for how the fused ops fare on the layer shapes and export patterns of common families:

* mobilenetv2 - MobileNetV2 (inverted residuals, depthwise 3x3, ReLU6 exported as Clip with Constant bounds); 3x224x224
* resnet18    - ResNet-18 (basic blocks, 1x1 stride-2 shortcuts); 3x224x224
* disc        - DCGAN discriminator (4x4 stride-2 Conv, LeakyRelu, a final 8x8 Conv over the whole map; logits out,
                as a Sigmoid would saturate on random weights and hide differences); 3x64x64
* convnext    - two ConvNeXt blocks (depthwise 7x7, LayerNorm, Linear layers as MatMul on NHWC); 3x64x64
* yolo        - a YOLOv8s-shaped backbone and neck (Conv + BatchNorm + SiLU, exported as Sigmoid and Mul; C2f
                blocks with residual bottlenecks, SPPF, upsampling and concatenation); 3x256x256
* resnext     - ResNeXt-50 (32x4d) stages 3 and 4 (bottlenecks with 3x3 convolutions in 32 groups); 256x28x28

Each model is compressed with ``onnx_codebook.compress(bits=4, granularity="channel")`` in the fused and the
standard format (``min_elements`` 4096 for the pretrained models, 1024 for the small decoders), and fp32 and
fused run interleaved in one process in blocks (untimed runs for 0.15 s, so that the other session's pool
threads stop spinning, then 3 timed runs); median of all timed runs.  The fused outputs are checked against
the standard format's.  Writes ``benchmarks/results/real_cnns.md``.

    python benchmarks/bench_real_cnns.py [--models mnist_cnn,dcgan] [--rounds 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import data  # noqa: E402  (benchmarks/data.py: cache and wheel fetching)

CCEXAM = "ccexam==1.0.0"
FACENET = "facenet-pytorch==2.6.0"

# name -> (input shape without batch, min_elements)
MODELS = {
    "mnist_cnn": ((1, 28, 28), 4096),
    "mtcnn_pnet": ((3, 240, 320), 4096),
    "mtcnn_rnet": ((3, 24, 24), 4096),
    "mtcnn_onet": ((3, 48, 48), 4096),
    "dcgan": ((100, 1, 1), 1024),
    "seg": ((3, 96, 128), 1024),
    "audio": ((128, 50), 1024),
    "mobilenetv2": ((3, 224, 224), 4096),
    "resnet18": ((3, 224, 224), 4096),
    "disc": ((3, 64, 64), 4096),
    "convnext": ((3, 64, 64), 4096),
    "yolo": ((3, 256, 256), 4096),
    "resnext": ((256, 28, 28), 4096),
}


def _export(model, shape, path: Path) -> Path:
    import torch

    model.eval()
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(model, (torch.randn(1, *shape),), str(tmp), opset_version=17, dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    tmp.replace(path)
    return path


def _mtcnn_classes():
    """PNet / RNet / ONet from the downloaded facenet-pytorch wheel (its mtcnn.py up to ``class MTCNN``,
    without the import of its face-detection helpers, which need torchvision)."""
    pkg = data.unpacked_wheel(FACENET) / "facenet_pytorch"
    src = (pkg / "models" / "mtcnn.py").read_text().split("class MTCNN(")[0]
    src = src.replace("from .utils.detect_face import detect_face, extract_face", "")
    namespace: dict = {}
    exec(compile(src, str(pkg / "models" / "mtcnn.py"), "exec"), namespace)
    return pkg, namespace


def _decoders():
    import torch
    from torch import nn

    class DCGAN(nn.Module):
        def __init__(self, nz=100, ngf=64):
            super().__init__()
            layers, cin = [], nz
            for i, cout in enumerate((ngf * 8, ngf * 4, ngf * 2, ngf)):
                layers += [nn.ConvTranspose2d(cin, cout, 4, 1 if i == 0 else 2, 0 if i == 0 else 1, bias=False),
                           nn.BatchNorm2d(cout), nn.ReLU(True)]
                cin = cout
            self.main = nn.Sequential(*layers, nn.ConvTranspose2d(cin, 3, 4, 2, 1, bias=False), nn.Tanh())

        def forward(self, x):
            return self.main(x)

    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU())
            self.up = nn.Sequential(nn.ConvTranspose2d(64, 32, 3, 2, 1, output_padding=1), nn.ReLU(),
                                    nn.ConvTranspose2d(32, 16, 3, 2, 1, output_padding=1), nn.ReLU(),
                                    nn.ConvTranspose2d(16, 16, 3, 1, 1, groups=2), nn.Conv2d(16, 5, 1))

        def forward(self, x):
            return self.up(self.down(x))

    class Audio(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.ConvTranspose1d(128, 64, 8, 4, 2), nn.ReLU(), nn.ConvTranspose1d(64, 32, 8, 4, 2))

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(0)
    dcgan = DCGAN()
    for m in dcgan.modules():  # running statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return {"dcgan": dcgan, "seg": Seg(), "audio": Audio()}


def _architectures():
    import torch
    from torch import nn

    def conv_bn(cin, cout, k, stride, groups=1, act=nn.ReLU6):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act()]

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            mid = cin * expand
            layers = (conv_bn(cin, mid, 1, 1) if expand != 1 else []) + conv_bn(mid, mid, 3, stride, mid)
            self.conv = nn.Sequential(*layers, nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            layers, cin = conv_bn(3, 32, 3, 2), 32
            for t, cout, n, stride in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                                       (6, 160, 3, 2), (6, 320, 1, 1)]:
                for i in range(n):
                    layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, t))
                    cin = cout
            self.features = nn.Sequential(*layers, *conv_bn(cin, 1280, 1, 1))
            self.classifier = nn.Linear(1280, 1000)

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride, act=nn.ReLU), *conv_bn(cout, cout, 3, 1)[:2])
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return torch.relu(self.body(x) + self.short(x))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            layers, cin = [*conv_bn(3, 64, 7, 2, act=nn.ReLU), nn.MaxPool2d(3, 2, 1)], 64
            for cout, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]:
                layers.append(BasicBlock(cin, cout, stride))
                cin = cout
            self.features = nn.Sequential(*layers)
            self.fc = nn.Linear(512, 1000)

        def forward(self, x):
            return self.fc(self.features(x).mean((2, 3)))

    class Discriminator(nn.Module):
        def __init__(self):
            super().__init__()
            self.main = nn.Sequential(
                nn.Conv2d(3, 64, 4, 2, 1), nn.LeakyReLU(0.2),
                nn.Conv2d(64, 128, 4, 2, 1, bias=False), nn.BatchNorm2d(128), nn.LeakyReLU(0.2),
                nn.Conv2d(128, 256, 4, 2, 1, bias=False), nn.BatchNorm2d(256), nn.LeakyReLU(0.2),
                nn.Conv2d(256, 1, 8))

        def forward(self, x):
            return self.main(x).flatten(1)

    class ConvNeXtBlock(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
            self.norm = nn.LayerNorm(dim)
            self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
            self.gamma = nn.Parameter(torch.full((dim,), 0.5))

        def forward(self, x):
            h = self.norm(self.dw(x).permute(0, 2, 3, 1))
            return x + (self.fc2(nn.functional.gelu(self.fc1(h))) * self.gamma).permute(0, 3, 1, 2)

    class ConvNeXt(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 96, 4, 4), ConvNeXtBlock(96), nn.Conv2d(96, 192, 2, 2),
                                     ConvNeXtBlock(192))
            self.fc = nn.Linear(192, 100)

        def forward(self, x):
            return self.fc(self.net(x).mean((2, 3)))

    def cbs(cin, cout, k=1, stride=1):  # YOLO's Conv: Conv + BatchNorm + SiLU
        return nn.Sequential(*conv_bn(cin, cout, k, stride, act=nn.SiLU))

    class Bottleneck(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.body = nn.Sequential(cbs(c, c, 3), cbs(c, c, 3))

        def forward(self, x):
            return x + self.body(x)

    class C2f(nn.Module):
        def __init__(self, cin, cout, n, shortcut=True):
            super().__init__()
            self.c = cout // 2
            self.cv1, self.cv2 = cbs(cin, 2 * self.c), cbs((2 + n) * self.c, cout)
            self.m = nn.ModuleList(Bottleneck(self.c) if shortcut else nn.Sequential(cbs(self.c, self.c, 3),
                                                                                     cbs(self.c, self.c, 3))
                                   for _ in range(n))

        def forward(self, x):
            y = list(self.cv1(x).chunk(2, 1))
            for m in self.m:
                y.append(m(y[-1]))
            return self.cv2(torch.cat(y, 1))

    class SPPF(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.cv1, self.cv2, self.pool = cbs(c, c // 2), cbs(2 * c, c), nn.MaxPool2d(5, 1, 2)

        def forward(self, x):
            y = [self.cv1(x)]
            for _ in range(3):
                y.append(self.pool(y[-1]))
            return self.cv2(torch.cat(y, 1))

    class Yolo(nn.Module):  # YOLOv8s widths (32 .. 512), depths 1-2-2-1
        def __init__(self):
            super().__init__()
            self.p3 = nn.Sequential(cbs(3, 32, 3, 2), cbs(32, 64, 3, 2), C2f(64, 64, 1), cbs(64, 128, 3, 2),
                                    C2f(128, 128, 2))
            self.p4 = nn.Sequential(cbs(128, 256, 3, 2), C2f(256, 256, 2))
            self.p5 = nn.Sequential(cbs(256, 512, 3, 2), C2f(512, 512, 1), SPPF(512))
            self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
            self.n4, self.n3 = C2f(768, 256, 1, False), C2f(384, 128, 1, False)
            self.down, self.o4 = cbs(128, 128, 3, 2), C2f(384, 256, 1, False)
            self.heads = nn.ModuleList(nn.Conv2d(c, 80, 1) for c in (128, 256))

        def forward(self, x):
            p3 = self.p3(x)
            p4 = self.p4(p3)
            p5 = self.p5(p4)
            n4 = self.n4(torch.cat([self.up(p5), p4], 1))
            n3 = self.n3(torch.cat([self.up(n4), p3], 1))
            o4 = self.o4(torch.cat([self.down(n3), n4], 1))
            return torch.cat([h(t).flatten(2) for h, t in zip(self.heads, (n3, o4))], 2)

    class NeXtBlock(nn.Module):  # ResNeXt bottleneck, cardinality 32
        def __init__(self, cin, width, cout, stride):
            super().__init__()
            self.body = nn.Sequential(*conv_bn(cin, width, 1, 1, act=nn.ReLU),
                                      *conv_bn(width, width, 3, stride, groups=32, act=nn.ReLU),
                                      *conv_bn(width, cout, 1, 1)[:2])
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return torch.relu(self.body(x) + self.short(x))

    class ResNeXt(nn.Module):  # stages 3 (512 wide, 16 channels per group) and 4 (1024, 32 per group)
        def __init__(self):
            super().__init__()
            blocks = [NeXtBlock(256, 512, 1024, 2)] + [NeXtBlock(1024, 512, 1024, 1) for _ in range(5)]
            blocks += [NeXtBlock(1024, 1024, 2048, 2)] + [NeXtBlock(2048, 1024, 2048, 1) for _ in range(2)]
            self.features = nn.Sequential(*blocks)
            self.fc = nn.Linear(2048, 1000)

        def forward(self, x):
            return self.fc(self.features(x).mean((2, 3)))

    torch.manual_seed(0)
    models = {"mobilenetv2": MobileNetV2(), "resnet18": ResNet18(), "disc": Discriminator(), "convnext": ConvNeXt(),
              "yolo": Yolo(), "resnext": ResNeXt()}
    for model in models.values():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return models


def model_path(name: str) -> Path:
    """The fp32 ONNX model, exported once into the cache."""
    out = data.cache_dir() / "real_cnns" / f"{name}.onnx"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch
    from torch import nn

    shape = MODELS[name][0]
    if name == "mnist_cnn":
        class MNISTNet(nn.Module):  # the layout of ccexam's state dict
            def __init__(self):
                super().__init__()
                self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                              nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
                self.classifier = nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

            def forward(self, x):
                return self.classifier(self.features(x).flatten(1))

        model = MNISTNet()
        weights = data.unpacked_wheel(CCEXAM) / "ccexam" / "weights" / "mnist.pth"
        model.load_state_dict(torch.load(str(weights), map_location="cpu", weights_only=True), strict=True)
    elif name.startswith("mtcnn_"):
        pkg, classes = _mtcnn_classes()
        net = name.split("_")[1]
        model = classes[net[0].upper() + "Net"](pretrained=False)
        model.load_state_dict(torch.load(str(pkg / "data" / f"{net}.pt"), map_location="cpu"), strict=True)
    elif name in ("dcgan", "seg", "audio"):
        model = _decoders()[name]
    else:
        model = _architectures()[name]
    return _export(model, shape, out)


def bench(name: str, rounds: int) -> list[dict]:
    import onnxruntime as ort

    import onnx_codebook
    from onnx_codebook import ops

    shape, min_elements = MODELS[name]
    path = model_path(name)
    variants = {fmt: onnx_codebook.compress(str(path), bits=4, granularity="channel", format=fmt,
                                            min_elements=min_elements) for fmt in ("fused", "standard")}
    rows = []
    for batch in (1, 8):
        for threads in (1, 2):
            sessions = {
                "fp32": ort.InferenceSession(str(path), ops.session_options(False, threads),
                                             providers=["CPUExecutionProvider"]),
                "fused": ops.session(variants["fused"], threads=threads),
                "standard": ops.session(variants["standard"], threads=threads),
            }
            x = {"x": np.random.default_rng(0).uniform(-1, 1, (batch, *shape)).astype(np.float32)}
            outs = {k: s.run(None, x) for k, s in sessions.items()}
            err = max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))
                      for a, b in zip(outs["fused"], outs["standard"]))
            times = {"fp32": [], "fused": []}
            for _ in range(rounds):
                for k in times:
                    end = time.perf_counter() + 0.15
                    while time.perf_counter() < end:
                        sessions[k].run(None, x)
                    for _ in range(3):
                        t0 = time.perf_counter()
                        sessions[k].run(None, x)
                        times[k].append(time.perf_counter() - t0)
            f, u = (float(np.median(times[k])) * 1e3 for k in ("fp32", "fused"))
            rows.append(dict(model=name, batch=batch, threads=threads, fp32=f, fused=u, err=err))
            print(f"{name:11s} b{batch} t{threads}: fp32 {f:.3f} ms, fused {u:.3f} ms, ratio {u / f:.2f}, "
                  f"fused vs standard max rel err {err:.1e}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "real_cnns.md"))
    args = parser.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    rows = [r for name in names for r in bench(name, args.rounds)]
    lines = ["# Real CNNs and decoders: fused vs fp32", "",
             f"Command: `python benchmarks/bench_real_cnns.py --models {','.join(names)} --rounds {args.rounds}`", "",
             "| model | batch | threads | fp32 ms | fused ms | fused/fp32 | fused vs standard max rel err |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['threads']} | {r['fp32']:.3f} | {r['fused']:.3f} | "
              f"{r['fused'] / r['fp32']:.2f} | {r['err']:.1e} |" for r in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
