"""Calibrate the `auto` strategy: latencies per strategy, ranks and prompt length, from benchmark results.

    python -m apbv.bench.calibrate --from bench/results/DIR/speed-*.jsonl bench/results/DIR/e2e-*.json \
        --out bench/results/DIR/calibration.json
    python -m apbv.bench.calibrate --measure --world-size 8 --out bench/results/DIR/calibration.json  # on the GPUs

Rows of `apbv.bench.speed` (prefill and first token, `slowest_rank_s`) and of `apbv.bench.e2e` (from the file,
`ttft_s`) both count; where both measured the same strategy, ranks and length, the later file wins. --measure runs
the speed sweep at the lengths that matter for the choice (360p x 16 and 64, 720p x 64, 1440p x 64) first. The
engine finds the file by its device name (`apbv.engine.cost_model.Calibration.find`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from apbv.engine.cost_model import Calibration


def rows_of(path: Path) -> tuple[str, list[dict]]:
    """(device name, rows) of a speed JSONL or an e2e/attention JSON results file."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return (rows[0]["meta"]["device_name"] if rows else ""), rows
    data = json.loads(text)
    return data["meta"]["device_name"], data["rows"]


def calibration_from(paths: list[Path]) -> Calibration:
    latencies: dict[tuple[str, int], dict[int, float]] = {}
    devices = set()
    for path in paths:
        device, rows = rows_of(path)
        devices.add(device)
        for row in rows:
            seconds = row.get("ttft_s", row.get("slowest_rank_s"))
            if seconds is None or row.get("oom") or row.get("strategy") == "transformers":
                continue
            latencies.setdefault((row["strategy"], int(row["world_size"])), {})[int(row["tokens"])] = float(seconds)
    if len(devices) != 1:
        raise SystemExit(f"results from one kind of device only, got {sorted(devices)}")
    points = {key: tuple(sorted(by_tokens.items())) for key, by_tokens in latencies.items()}
    return Calibration(devices.pop(), " ".join(str(p) for p in paths), points)


def main(argv: list[str] | None = None) -> Calibration:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="sources", type=Path, nargs="*", default=[], help="results files")
    p.add_argument("--measure", action="store_true", help="run the speed sweep first (its rows count too)")
    p.add_argument("--world-size", type=int, default=8, help="ranks of the measured sweep")
    p.add_argument("--arch", default="qwen2.5-vl-3b")
    p.add_argument("--out", type=Path, required=True, help="the calibration JSON")
    args = p.parse_args(argv)
    sources = list(args.sources)
    if args.measure:
        from apbv.bench import speed

        prefix = args.out.with_name("speed-calibration")
        for resolution, frames in (("360p", ["16", "64"]), ("720p", ["64"]), ("1440p", ["64"])):
            speed.main(["--arch", args.arch, "--resolutions", resolution, "--frames", *frames, "--world-size",
                        str(args.world_size), "--strategies", "dense,apb,apbv", "--warmup", "1", "--repeats", "3",
                        "--out", str(prefix.with_name(f"{prefix.name}-{resolution}"))])  # fmt: skip
            sources.append(prefix.with_name(f"{prefix.name}-{resolution}.jsonl"))
    calibration = calibration_from(sources)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(calibration.to_json())
    print(f"{args.out}: {calibration.device}, {len(calibration.points)} strategy/rank pairs", flush=True)
    return calibration


if __name__ == "__main__":
    main(sys.argv[1:])
