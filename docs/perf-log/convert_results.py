"""Convert the dated per-run result files kept here (`results/**/*.json`, the harness's old output format) into rows
of the benchmarks' results log, so every measurement lives in one machine-readable file:

    python docs/perf-log/convert_results.py [--log benchmarks/results.jsonl]

Rows are built by `benchmarks/harness.result_rows` (the same schema `benchmarks/run.py` appends) and carry the
original file as `source`. Files of another format (the tile sweep's `tune-attention` output) are skipped. The old
kernel workloads timed 20 launches per call: their times are divided by 20 so rows are per launch, as CUDA-event
timing now records them (ratios are unchanged). Rows already in the log with the same `source` are not added twice.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import harness  # noqa: E402

OLD_KERNEL_CALLS = 20  # launches per timed call of the old kernel workloads ("times are of 20 calls" in their note)
RUN_KEYS = ("device", "date", "commit", "torch", "triton", "timer", "command", "results")


def rows_of(path: Path) -> list:
    """The results-log rows of one old result file ([] for a file of another format)."""
    payload = json.loads(path.read_text())
    if "results" not in payload or "command" not in payload:
        return []
    meta = {
        "device": payload["device"], "date": payload["date"], "commit": payload["commit"],
        "command": payload["command"], "torch": payload["torch"], "triton": payload["triton"],
        "timer": payload.get("timer", "wall"),
        "run": {k: v for k, v in payload.items() if k not in RUN_KEYS},
        "source": str(path.relative_to(REPO_ROOT)),
    }
    records = []
    for result in payload["results"]:
        fields = {k: v for k, v in result.items() if k in harness.Record.__dataclass_fields__}
        record = harness.Record(**fields)
        if f"times are of {OLD_KERNEL_CALLS} calls" in record.note:
            for name in ("hooklens_s", "reference_s", "hooklens_min_s", "reference_min_s"):
                value = getattr(record, name)
                if value is not None:
                    setattr(record, name, value / OLD_KERNEL_CALLS)
            record.note += f"; converted to seconds per launch (recorded: {OLD_KERNEL_CALLS} launches per call)"
        if record.reference == "device_copy":  # the pattern kernel's floor: ratio = fraction of copy bandwidth
            record.floor_fraction = record.ratio
        records.append(record)
    return harness.result_rows(records, meta)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", default=str(harness.RESULTS_LOG))
    args = parser.parse_args()
    log = Path(args.log)
    seen = set()
    if log.exists():
        seen = {json.loads(line).get("source") for line in log.read_text().splitlines() if line.strip()}
    added = 0
    with log.open("a") as f:
        for path in sorted((HERE / "results").rglob("*.json")):
            for row in rows_of(path):
                if row["source"] in seen:
                    continue
                f.write(json.dumps(row) + "\n")
                added += 1
    print(f"appended {added} rows to {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
