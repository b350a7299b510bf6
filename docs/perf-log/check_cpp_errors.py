"""Each bad-input call of the C++ operators in its own process: does it raise, or crash the interpreter?

    python docs/perf-log/check_cpp_errors.py

Prints one line per call with the child's exit status (0: the call raised or returned; -11: SIGSEGV) and what it
printed. Written for the device-build crash in docs/perf-log/NOTES.md ("C++ operators crash on bad input").
"""
import subprocess
import sys

CALLS = [
    "torch.ops.hooklens.lowrank_svd(A, torch.randn(4, 5))",
    "torch.ops.hooklens.lowrank_eigvals(A, torch.randn(3, 6))",
    "torch.ops.hooklens.lowrank_trace(A, B.double())",
    "torch.ops.hooklens.lowrank_fro_norm(A.int(), B.int())",
    "torch.ops.hooklens.lowrank_fro_norm(A, torch.randn(3))",
    "torch.ops.hooklens.lowrank_trace(torch.randn(2, 5, 3), torch.randn(3, 3, 5))",
    "torch.ops.hooklens.small_eigvals(torch.randn(2, 3, 4))",
    "torch.ops.hooklens.small_eigvals(torch.randn(2, 3, 3), 'bogus')",
    "torch.ops.hooklens.lowrank_max(A, torch.randn(4, 5))",
    "torch.ops.hooklens.lowrank_svd(A, B)",  # valid: must print ok
]
PRELUDE = "import torch, hooklens.ops as o; o.load_extension(True); A, B = torch.randn(5, 3), torch.randn(3, 5)\n"


def main() -> int:
    crashed = 0
    for call in CALLS:
        code = PRELUDE + (f"try:\n    {call}\n    print('ok')\n"
                          "except Exception as e:\n    print(type(e).__name__, str(e)[:150])")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        crashed += result.returncode != 0
        print(f"rc={result.returncode} {call}: {result.stdout.strip()} {result.stderr.strip()[-300:]}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
