"""Record qlab's outputs on fixed inputs, so a refactoring can prove it changed nothing.

Run once, *before* a change that must not move any number (the core redesign of issue 10 was the first):

    .venv/bin/python tests/data/golden/record.py        # writes tests/data/golden/golden.pt

``tests/test_golden.py`` recomputes every entry with the current code and asserts equality: small tensors
are stored as they are, whole-model results as SHA-256 digests of their bytes (exact, and small).
Entries: RTN / NF4 / FP8 / ternary ... codes, scales, zero points and bytes on a fixed weight; every GGUF
block format's bytes (with and without an imatrix); GPTQ and AWQ codes on a fixed layer; SmoothQuant's
int8 weights; and, on a tiny random Llama, every whole-model path (recipe walker, GGUF mix, sequential
GPTQ and AWQ, W8A8 with and without SmoothQuant): the dequantized weight of every layer and the logits.

Whole-model entries go through BLAS and depend on the CPU's kernels: on another CPU (one with AMX, say) the same
code gives other last bits, so other digests. For such a machine, with code that passes the test on the machine
``golden.pt`` was recorded on (the CI of the landed commit):

    .venv/bin/python tests/data/golden/record.py --platform NAME   # writes platform-NAME.pt

which holds only the entries that differ from ``golden.pt`` on this machine. The test accepts ``golden.pt``, or
``golden.pt`` with one platform file's entries in place of its own; every other entry must still be equal.

A change meant to move some numbers (a method's new revision) re-records those entries only:

    .venv/bin/python tests/data/golden/record.py --update walker/awq/    # those under this key that changed

in golden.pt and in every platform file that holds them, from this machine. (AWQ's revision 2 was recorded so
on the AMX machine of the CI: on another CPU its whole-model entries may need a platform file.)
"""
import hashlib
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/ (for golden_cases)

from golden_cases import compute_all, same  # noqa: E402

if __name__ == "__main__":
    import argparse
    import platform

    p = argparse.ArgumentParser(description="record golden.pt, or a platform file of the entries that differ")
    p.add_argument("--platform", help="write platform-NAME.pt: the entries that differ from golden.pt here")
    p.add_argument("--update", metavar="PREFIX", help="re-record the entries under PREFIX that changed, in "
                                                      "golden.pt and the platform files that hold them")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = compute_all()
    if args.update:  # the entries under PREFIX whose value here equals none recorded (golden.pt's or a platform's)
        files = {path: torch.load(path, weights_only=False) for path in [HERE / "golden.pt", *sorted(HERE.glob("platform-*.pt"))]}
        moved = [k for k in out if k.startswith(args.update)
                 and not any(k in recorded and same(out[k], recorded[k]) for recorded in files.values())]
        for path, recorded in files.items():
            keys = [k for k in moved if k in recorded]
            recorded.update({k: out[k] for k in keys})
            torch.save(recorded, path)
            print(f"{len(keys)} entries re-recorded in {path.name}")
        sys.exit(0)
    if args.platform:
        golden = torch.load(HERE / "golden.pt", weights_only=False)
        out = {k: v for k, v in out.items() if not same(v, golden[k])}
        cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name")),
                     platform.machine())
        out["__machine__"] = f"{model}{' with AMX' if ' amx_tile' in cpu else ''}, torch {torch.__version__}, " \
                             f"{torch.backends.cpu.get_cpu_capability()}"
        path = HERE / f"platform-{args.platform}.pt"
    else:
        path = HERE / "golden.pt"
    torch.save(out, path)
    print(f"{len(out)} entries -> {path} ({path.stat().st_size:,} bytes)")
