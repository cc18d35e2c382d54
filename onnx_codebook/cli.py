"""The ``onnx-codebook`` command line.  Thin commands over the library.

Every :class:`CodebookError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .config import FORMATS
from .data import ImageOptions
from .errors import CodebookError, CodebookWarning, ConfigError, OutputError
from .schema import SUPPORTED_OPS

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Codebook (weight-sharing) compression of ONNX CNNs: ONNX in, ONNX out.",
)
def _console(stderr: bool = False) -> Console:
    c = Console(stderr=stderr)
    # Not a terminal (pipes, CI logs): rich would assume 80 columns and fold the tables.
    return c if c.is_terminal else Console(stderr=stderr, width=140)


out = _console()
err = _console(stderr=True)

# Options shared by several commands, defined once.
ModelArg = Annotated[Path, typer.Argument(help="ONNX model file.", show_default=False)]
OutOpt = Annotated[Path, typer.Option("--output", "-o", help="Where to write the result.", show_default=False)]
WeightInputsOpt = Annotated[bool, typer.Option(
    "--weight-inputs", help="Also compress weights the model lists as graph inputs (they stop being inputs).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
ReportOpt = Annotated[Optional[Path], typer.Option("--report", help="Write a JSON report here.")]
DataOpt = Annotated[str, typer.Option("--data", help="An .npz, an image folder (one subfolder per class) or sklearn:digits.")]
SizeOpt = Annotated[Optional[int], typer.Option("--size", help="Images: resize the shorter side to this.")]
CropOpt = Annotated[Optional[int], typer.Option("--crop", help="Images: centre crop to this square.")]
ScaleOpt = Annotated[float, typer.Option("--scale", help="Images: multiply pixels (0-255) by this first.")]
MeanOpt = Annotated[str, typer.Option("--mean", help="Images: per-channel mean, comma-separated (after --scale).")]
StdOpt = Annotated[str, typer.Option("--std", help="Images: per-channel std, comma-separated.")]
LayoutOpt = Annotated[str, typer.Option("--layout", help="Images: NCHW or NHWC.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Samples per onnxruntime run.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="onnxruntime intra-op threads.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")]


class CliError(CodebookError):
    pass


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _image_options(size, crop, scale, mean, std, layout) -> ImageOptions:
    return ImageOptions(size=size, crop=crop, scale=scale, mean=_floats(mean, "--mean"),
                        std=_floats(std, "--std"), layout=layout.upper())


def _run(fn):
    """Run a command body, mapping library errors to one line and exit code 2."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn()
        for w in caught:
            if issubclass(w.category, CodebookWarning):
                err.print(f"[yellow]warning:[/] {w.message}", highlight=False, soft_wrap=True)
        return result
    except CodebookError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written")


def _setup_logging(verbose: bool) -> None:
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _layer_table(title: str, rows: list[dict]) -> Table:
    """Per-layer table; the ratio divides the "original" column (the weight as the
    input model stored it) by the stored bytes."""
    before = "original"
    t = Table(title=title, title_justify="left")
    for col, just in (("layer", "left"), ("op", "left"), ("shape", "left"), ("bits", "right"),
                      ("granularity", "left"), ("codebook", "right"), (before, "right"), ("stored", "right"),
                      ("ratio", "right"), ("SQNR dB", "right")):
        t.add_column(col, justify=just, overflow="fold", no_wrap=col != "layer")
    for r in rows:
        sq = r.get("sqnr_db")
        t.add_row(
            str(r["name"]), r["op"], "x".join(map(str, r["shape"])), str(r["bits"]), r["granularity"],
            str(r["codebook_entries"]), _fmt_bytes(r[f"bytes_{before}"]), _fmt_bytes(r["bytes_stored"]),
            f"{r[f'bytes_{before}'] / max(r['bytes_stored'], 1):.1f}x",
            "-" if sq is None else ("inf" if math.isinf(sq) else f"{sq:.1f}"),
        )
    return t


def _metrics_table(rows: dict[str, dict]) -> Table:
    t = Table(title="accuracy", title_justify="left")
    t.add_column("model")
    keys = [k for k in ("top1", "top5", "agreement", "sqnr_db", "samples") if any(r.get(k) is not None for r in rows.values())]
    for k in keys:
        t.add_column({"top1": "top-1 %", "top5": "top-5 %", "agreement": "agreement %", "sqnr_db": "SQNR dB"}.get(k, k), justify="right")
    for name, r in rows.items():
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append("-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v)))
        t.add_row(name, *cells)
    return t


def _write_json(path: Path, payload: dict, force: bool = True) -> None:
    from .io import check_output_path

    check_output_path(path, force=force)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({e.strerror})") from e


def _json_default(o):
    if isinstance(o, float) and math.isinf(o):
        return None
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True)


@app.command()
def compress(
    model: ModelArg,
    output: OutOpt,
    bits: Annotated[Optional[int], typer.Option("--bits", help="Bits per weight index (1..8); codebooks get 2^bits entries. [default: 4; 1 with --method binary]", show_default=False)] = None,
    granularity: Annotated[str, typer.Option("--granularity", help="tensor, channel or group (adjacent filters share a codebook).")] = "channel",
    group_size: Annotated[int, typer.Option("--group-size", help="Filters per codebook with --granularity group.")] = 8,
    ops: Annotated[str, typer.Option("--ops", help="Op types whose weights are compressed.")] = ",".join(SUPPORTED_OPS),
    min_elements: Annotated[int, typer.Option("--min-elements", help="Leave smaller weights alone.")] = 4096,
    fmt: Annotated[str, typer.Option("--format", help="standard (Cast+Gather, any runtime) or fused (custom ops).")] = "standard",
    method: Annotated[str, typer.Option("--method", help="kmeans, or binary: sign(W) x a scale per group (1 bit).")] = "kmeans",
    codebook_dtype: Annotated[str, typer.Option("--codebook-dtype", help="float32 or float16.")] = "float32",
    seed: Annotated[int, typer.Option("--seed", help="Seed for the clustering.")] = 0,
    weight_inputs: WeightInputsOpt = False,
    data: Annotated[Optional[str], typer.Option("--data", help="Also evaluate before/after on this data.")] = None,
    report: ReportOpt = None,
    force: ForceOpt = False,
    verbose: VerboseOpt = False,
):
    """Compress every large Conv / ConvTranspose / Gemm / MatMul weight into a codebook + indices."""
    _setup_logging(verbose)

    def body():
        from . import make_config
        from .io import check_output_path, load_model, model_file_bytes, save_model
        from .pipeline import compress_model

        if fmt not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        config = make_config(bits=bits, granularity=granularity, group_size=group_size, ops=ops,
                             min_elements=min_elements, format=fmt, method=method,
                             codebook_dtype=codebook_dtype, seed=seed, weight_inputs=weight_inputs)
        check_output_path(output, inputs=(model,), force=force)
        if report is not None:
            check_output_path(report, inputs=(model, output), force=True)
        proto = load_model(model)
        with _progress() as bar:
            task = bar.add_task("clustering", total=None)

            def tick(name):
                bar.update(task, advance=1, description=f"clustering {name[:40]}")

            result = compress_model(proto, config, progress=tick)
        metrics = {}
        if data is not None:
            from .evaluation import evaluate

            metrics = {"original": evaluate(proto, data), "compressed": evaluate(result.model, data, reference=proto)}
        before = model_file_bytes(model)
        after = save_model(result.model, output)
        summary = {"input": str(model), "output": str(output), "format": fmt,
                   "model_bytes_before": before, "model_bytes_after": after,
                   "model_compression_ratio": before / max(after, 1), **result.summary()}
        if metrics:
            summary["metrics"] = metrics
        if report is not None:
            _write_json(report, summary)
        out.print(_layer_table(f"{model.name} -> {output.name}", summary["layers"]))
        for s in result.skipped:
            out.print(f"[dim]skipped {s.name} ({s.op_type}): {s.reason}[/]", highlight=False)
        out.print(
            f"weights of the {len(summary['layers'])} compressed layers {_fmt_bytes(summary['weight_bytes_before'])} -> "
            f"{_fmt_bytes(summary['weight_bytes_after'])} "
            f"([bold]{summary['compression_ratio']:.2f}x[/]); file {_fmt_bytes(before)} -> {_fmt_bytes(after)} "
            f"([bold]{summary['model_compression_ratio']:.2f}x[/])", highlight=False)
        if metrics:
            out.print(_metrics_table(metrics))

    _run(body)


@app.command()
def inspect(model: ModelArg, as_json: JsonOpt = False):
    """Per-layer storage of a model: bits, codebook entries, stored bytes, and totals."""

    def body():
        from .analysis import inspect_model
        from .io import load_model, model_file_bytes

        info = inspect_model(load_model(model))
        info["model_bytes"] = model_file_bytes(model)
        if as_json:
            print(json.dumps(info, indent=2, default=_json_default))
            return
        out.print(_layer_table(str(model), info["layers"]))
        out.print(
            f"{info['compressed_layers']} compressed layers; weights {_fmt_bytes(info['weight_bytes_original'])} -> "
            f"{_fmt_bytes(info['weight_bytes_stored'])} stored ([bold]{info['compression_ratio']:.2f}x[/]); "
            f"file {_fmt_bytes(info['model_bytes'])}", highlight=False)

    _run(body)


@app.command()
def decompress(model: ModelArg, output: OutOpt, force: ForceOpt = False):
    """Write the model with plain float weights (outputs identical to the compressed model's)."""

    def body():
        from .analysis import decompress_model, find_decoders
        from .io import check_output_path, load_model, save_model

        check_output_path(output, inputs=(model,), force=force)
        proto = load_model(model)
        if not find_decoders(proto):
            raise CliError(f"{model}: has no codebook-compressed weights to decompress")
        written = save_model(decompress_model(proto), output)
        out.print(f"wrote {output} ({_fmt_bytes(written)})", highlight=False)

    _run(body)


@app.command()
def evaluate(
    model: ModelArg,
    data: DataOpt,
    reference: Annotated[Optional[Path], typer.Option("--reference", help="Original model: adds top-1 agreement and output SQNR.")] = None,
    as_json: JsonOpt = False,
    size: SizeOpt = None,
    crop: CropOpt = None,
    scale: ScaleOpt = 1 / 255,
    mean: MeanOpt = "0",
    std: StdOpt = "1",
    layout: LayoutOpt = "NCHW",
    batch_size: BatchOpt = 64,
    threads: ThreadsOpt = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use only the first N samples.")] = None,
):
    """Top-1 / top-5 accuracy where labels exist; with --reference, agreement and SQNR too."""

    def body():
        from .evaluation import evaluate as run

        image = _image_options(size, crop, scale, mean, std, layout)
        rows = {}
        if reference is not None:
            rows[reference.name + " (reference)"] = run(reference, data, image=image, batch_size=batch_size,
                                                       threads=threads, limit=limit)
        rows[model.name] = run(model, data, reference, image=image, batch_size=batch_size, threads=threads, limit=limit)
        if as_json:
            print(json.dumps(rows if reference is not None else rows[model.name], indent=2, default=_json_default))
        else:
            out.print(_metrics_table(rows))

    _run(body)


@app.command()
def search(
    model: ModelArg,
    output: OutOpt,
    data: DataOpt,
    max_drop: Annotated[float, typer.Option("--max-drop", help="Allowed metric drop: points (absolute) or percent of the baseline (relative).")] = 1.0,
    drop_type: Annotated[str, typer.Option("--drop-type", help="absolute or relative.")] = "absolute",
    metric: Annotated[str, typer.Option("--metric", help="top1 (needs labels) or agreement (top-1 agreement with the original).")] = "top1",
    bits: Annotated[str, typer.Option("--bits", help="Candidate bit-widths, comma-separated.")] = "2,3,4,5,6,8",
    granularity: Annotated[str, typer.Option("--granularity", help="Candidate granularities, comma-separated.")] = "tensor,channel",
    group_size: Annotated[int, typer.Option("--group-size", help="Filters per codebook for the group granularity.")] = 8,
    holdout_fraction: Annotated[float, typer.Option("--holdout-fraction", help="Data the search never sees, for an honest final figure.")] = 0.2,
    time_budget: Annotated[Optional[float], typer.Option("--time-budget", help="Stop refining after this many seconds.")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Evaluation processes.")] = 1,
    fmt: Annotated[str, typer.Option("--format", help="standard or fused.")] = "standard",
    ops: Annotated[str, typer.Option("--ops", help="Op types whose weights are compressed.")] = ",".join(SUPPORTED_OPS),
    min_elements: Annotated[int, typer.Option("--min-elements", help="Leave smaller weights alone.")] = 4096,
    bias_correction: Annotated[bool, typer.Option("--bias-correction/--no-bias-correction", help="Shift biases by the mean error the codebooks introduce.")] = False,
    activation_aware: Annotated[bool, typer.Option("--activation-aware/--no-activation-aware", help="Weight the clustering by input-activation energy.")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    weight_inputs: WeightInputsOpt = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a Pareto plot (PNG; needs matplotlib).")] = None,
    report: ReportOpt = None,
    force: ForceOpt = False,
    size: SizeOpt = None,
    crop: CropOpt = None,
    scale: ScaleOpt = 1 / 255,
    mean: MeanOpt = "0",
    std: StdOpt = "1",
    layout: LayoutOpt = "NCHW",
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
):
    """Smallest model whose accuracy stays within --max-drop of the original's (no retraining)."""
    _setup_logging(verbose)

    def body():
        from . import search as run_search
        from .io import check_output_path, model_file_bytes, save_model

        check_output_path(output, inputs=(model,), force=force)
        for extra in (report, plot):
            if extra is not None:
                check_output_path(extra, inputs=(model, output), force=True)
        try:
            bit_list = tuple(int(b) for b in bits.split(",") if b.strip())
        except ValueError:
            raise ConfigError(f"--bits must be comma-separated integers, got {bits!r}") from None
        if plot is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ConfigError("--plot needs matplotlib: pip install matplotlib") from None
        image = _image_options(size, crop, scale, mean, std, layout)
        with _progress() as bar:
            task = bar.add_task("search", total=1.0)

            def tick(msg, frac):
                bar.update(task, completed=frac, description=msg[:60])

            result = run_search(model, data, max_drop=max_drop, drop_type=drop_type, metric=metric, bits=bit_list,
                                granularity=granularity, group_size=group_size, holdout_fraction=holdout_fraction,
                                time_budget=time_budget, workers=workers, format=fmt, ops=ops,
                                min_elements=min_elements, bias_correction=bias_correction,
                                activation_aware=activation_aware, image=image, seed=seed, progress=tick,
                                weight_inputs=weight_inputs)
        rep = result.report
        before = model_file_bytes(model)
        after = save_model(result.model, output)
        rep.update(input=str(model), output=str(output), model_bytes_before=before, model_bytes_after=after)
        if report is not None:
            _write_json(report, rep)
        if plot is not None:
            _pareto_plot(rep, plot)
        rows = [dict(r, sqnr_db=None) for r in rep["layers"]]
        out.print(_layer_table(f"{model.name} -> {output.name}", rows))
        for w in result.warnings:
            err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
        tab = Table(title=f"{metric} (budget: drop <= {max_drop} {'points' if drop_type == 'absolute' else '%'})",
                    title_justify="left")
        for c in ("data", "original", "compressed", "drop", "samples"):
            tab.add_column(c, justify="left" if c == "data" else "right")
        for name in ("search", "holdout"):
            r = rep.get(name)
            if r:
                tab.add_row(name, f"{r['baseline']:.2f}", f"{r['compressed']:.2f}", f"{r['drop']:.2f}", str(r["samples"]))
        out.print(tab)
        out.print(
            f"weights {_fmt_bytes(rep['weight_bytes_before'])} -> {_fmt_bytes(rep['weight_bytes_after'])} "
            f"([bold]{rep['compression_ratio']:.2f}x[/]); file {_fmt_bytes(before)} -> {_fmt_bytes(after)}; "
            f"{rep['evaluations']} evaluations + {rep['profile_runs']} profile runs in {rep['wall_time_s']:.1f} s",
            highlight=False)

    _run(body)


def _pareto_plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    pts = rep["points"]
    ax.scatter([p["bytes"] / 1024 for p in pts], [p["metric"] for p in pts], s=12, alpha=0.6, label="evaluated")
    front = rep["pareto"]
    ax.plot([p["bytes"] / 1024 for p in front], [p["metric"] for p in front], "r-o", ms=3, label="Pareto front")
    ax.axhline(rep["target"], color="gray", ls="--", lw=1, label="budget")
    ax.set_xscale("log")
    ax.set_xlabel("stored weight KB (codebooks included)")
    ax.set_ylabel(rep["metric"] + " %")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


@app.command()
def doctor():
    """Report the versions in use and whether the fused-kernel library is available."""
    import numpy
    import onnx
    import onnxruntime

    from . import __version__, ops

    ok, why = ops.library_status()
    out.print(f"onnx-codebook {__version__}; onnx {onnx.__version__}; onnxruntime {onnxruntime.__version__}; "
              f"numpy {numpy.__version__}", highlight=False)
    out.print(f"custom-op library: {'[green]ok[/]' if ok else '[red]missing[/]'} ({why})", highlight=False)
    if not ok:
        raise typer.Exit(code=1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
