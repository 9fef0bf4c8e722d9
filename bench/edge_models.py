"""Benchmark of the edge model families on the device: inference latency per input (image decoding
included), RD time and artifact sizes, the MLP on digits next to the conv pair and the worked example
family on mnist-5k.

Each line is trained with the cloud's code (the family's default plan, the guarded int8 export) on a
shipped scenario's presumed data. The device side then runs in a child process where `import torch`
fails, as on a device: it loads the artifact from files, takes inputs as a device's directory source
does (PNG files for the image models, `.npy` for digits; decoding with Pillow, conversion, resize and
scaling included), runs the int8 model on each, and runs RD (preference map + head delta) on the
scenario's first user's private pool. Prints a table and writes bench/results/edge_models.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress, TaskID

from bench import harness

INPUTS = 200  # files the device reads, each PASSES times
PASSES = 3
RD_RUNS = 5


@dataclass(frozen=True)
class Case:
    name: str
    scenario: str
    family: str | None  # None: the scenario's


CASES = (
    Case("mlp · digits", "scenarios/digits-two-users.json", None),
    Case("conv · mnist-5k", "scenarios/mnist-two-users.json", None),
    Case("lenet example · mnist-5k", "scenarios/mnist-two-users.json", "examples.families.lenet:family"),
)


def train(case: Case, workdir: Path, progress: Progress) -> dict[str, Any]:
    """Train the case's line, write its artifact, the device's inputs and an RD pool under `workdir`;
    the cloud-side figures."""
    from PIL import Image

    from cloud.ml.data import build_scenario_data
    from cloud.ml.export import float_file_bytes, int8_accuracy, weight_tensor_bytes
    from cloud.ml.families import NetSpec, default_family
    from cloud.ml.line import plan_for, train_line
    from cloud.ml.nets import parameter_count
    from cloud.ml.scenario import load_scenario

    scenario = load_scenario(harness.ROOT / case.scenario)
    data = build_scenario_data(scenario)
    family = case.family or scenario.family or default_family(data.input_shape)
    spec = NetSpec(family, data.input_shape, data.num_classes)
    tasks: dict[str, TaskID] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(f"{case.name}: {stage}", total=total)
        progress.update(tasks[stage], completed=done, total=total)

    started = time.perf_counter()
    line = train_line(
        data.train,
        spec,
        plan_for(spec, scenario.seed),
        line="bench",
        val=data.val,
        pixel_scale=data.pixel_scale,
        progress=on_progress,
    )
    train_s = time.perf_counter() - started
    float_acc, int8_acc = int8_accuracy(line.artifact, line.student, data.test)
    model_path = line.artifact.save(workdir / "model")
    inputs = workdir / "inputs"
    inputs.mkdir()
    for i, x in enumerate(data.test.x[:INPUTS]):
        if data.pixel_scale is None:
            np.save(inputs / f"{i:04d}.npy", x)
        else:
            pixels = np.clip(np.rint(x * data.pixel_scale), 0, 255).astype(np.uint8)
            Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)).save(
                inputs / f"{i:04d}.png"
            )
    pool = data.users[0].device_train[0]
    np.savez(workdir / "pool.npz", x=pool.x, y=pool.y)
    return {
        "case": case.name,
        "family": family,
        "input_shape": list(data.input_shape),
        "parameters": parameter_count(line.student),
        "float_weight_bytes": parameter_count(line.student) * 4,
        "int8_weight_bytes": weight_tensor_bytes(line.artifact.model),
        "float_file_bytes": float_file_bytes(line.student, data.input_shape),
        "int8_file_bytes": len(line.artifact.model),
        "float_acc": float_acc,
        "int8_acc": int8_acc,
        "train_s": train_s,
        "export": [a.as_dict() for a in line.export],
        "model_path": str(model_path),
    }


def device_side(workdir: Path, model_path: Path) -> dict[str, Any]:
    """In the torchless child: load, infer on every input file PASSES times, run RD RD_RUNS times."""
    from device_firmware_py.images import ImageInput, is_image_file
    from device_firmware_py.rd import extract_knowledge
    from device_firmware_py.runtime import Int8Model

    started = time.perf_counter()
    model = Int8Model.from_files(model_path, model_path.with_suffix(".manifest.json"))
    model.self_test()
    load_ms = (time.perf_counter() - started) * 1000
    image = ImageInput.of(model.manifest)
    files = sorted((workdir / "inputs").iterdir())
    read_ms, run_ms = [], []
    for _ in range(PASSES):
        for path in files:
            clock = time.perf_counter()
            x = image.decode(path) if image is not None and is_image_file(path) else np.load(path)
            decoded = time.perf_counter()
            _, logits = model.run(x)
            model.decide(logits)
            done = time.perf_counter()
            read_ms.append((decoded - clock) * 1000)
            run_ms.append((done - decoded) * 1000)
    with np.load(workdir / "pool.npz") as pool:
        x, y = pool["x"], pool["y"]
    rd_s = []
    report_bytes = 0
    for seed in range(RD_RUNS):
        clock = time.perf_counter()
        report = extract_knowledge(model, x, y, device_id="bench-cam-1", seed=seed)
        rd_s.append(time.perf_counter() - clock)
        report_bytes = len(report.to_bytes())
    q = statistics.quantiles(run_ms, n=20)
    return {
        "load_and_self_test_ms": load_ms,
        "read_ms_p50": statistics.median(read_ms),
        "infer_ms_p50": statistics.median(run_ms),
        "infer_ms_p95": q[18],
        "per_input_ms_p50": statistics.median(r + i for r, i in zip(read_ms, run_ms, strict=True)),
        "rd_samples": len(y),
        "rd_s_median": statistics.median(rd_s),
        "knowledge_bytes": report_bytes,
        "rss_mb_peak": _peak_rss_mb(),
        "torch_imported": "torch" in sys.modules,
    }


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: getrusage's maxrss would include the parent's from
    before the exec, and the parent holds torch)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_child(workdir: Path, model_path: str) -> dict[str, Any]:
    """`device_side` in a child process that cannot import torch."""
    from bench.device_daemon import torch_blocked, torchless_env

    env = torchless_env(workdir)
    if not torch_blocked(env):
        raise RuntimeError("the torch stub does not keep torch out of the child")
    child = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "bench.edge_models", "--device", str(workdir), model_path],
        env=env,
        cwd=harness.ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if child.returncode != 0:
        raise RuntimeError(f"the device side failed:\n{child.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    return figures


def print_table(report: dict[str, Any], console: Console) -> None:
    table = harness.table(
        f"Edge models on the device, no torch (Python {report['python']}, {report['cpus']} CPUs)",
        (
            "family · data",
            "input",
            "params",
            "int8 / float weights B",
            "int8 file B",
            "acc float → int8 %",
            "decode ms",
            "infer ms p50 / p95",
            "RD s (samples)",
            "knowledge B",
            "RSS MB",
        ),
        left=1,
    )
    for r in report["rows"]:
        table.add_row(
            r["case"],
            "×".join(map(str, r["input_shape"])),
            f"{r['parameters']:,}",
            f"{r['int8_weight_bytes']:,} / {r['float_weight_bytes']:,} "
            f"({r['int8_weight_bytes'] / r['float_weight_bytes']:.2f}×)",
            f"{r['int8_file_bytes']:,}",
            f"{100 * r['float_acc']:.1f} → {100 * r['int8_acc']:.1f}",
            f"{r['read_ms_p50']:.3f}",
            f"{r['infer_ms_p50']:.3f} / {r['infer_ms_p95']:.3f}",
            f"{r['rd_s_median']:.2f} ({r['rd_samples']})",
            f"{r['knowledge_bytes']:,}",
            f"{r['rss_mb_peak']:.0f}",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__, "edge_models")
    parser.add_argument("--device", nargs=2, metavar=("WORKDIR", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device:  # the child
        print(json.dumps(device_side(Path(args.device[0]), Path(args.device[1]))))
        return
    console = Console(width=200)
    rows = []
    with Progress(console=console, transient=True) as progress, tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(CASES):
            workdir = Path(tmp) / str(i)
            workdir.mkdir()
            cloud = train(case, workdir, progress)
            model_path = cloud.pop("model_path")
            rows.append({**cloud, **run_child(workdir, model_path)})
    report = {"benchmark": "edge_models", **harness.machine_keys(), "rows": rows}
    print_table(report, console)
    harness.write_results(report, args.out, console)


if __name__ == "__main__":
    main()
