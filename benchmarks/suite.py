"""The benchmark suite: the commands that made the committed results, kept in this one list, run one after the
other (timing benchmarks need the machine to themselves). ``make bench`` runs them all; together they take most
of a day on 2 cores.

    python benchmarks/suite.py             # everything, in order
    python benchmarks/suite.py --list      # the commands only
    python benchmarks/suite.py accuracy    # the commands whose script name contains "accuracy"
    python benchmarks/suite.py --gpu       # the GPU benchmarks (scripts/gpu_checks.sh runs them)
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

# Each entry is the command that made one committed results file (written at the top of that file), so that every
# file can be made again; tests/test_docs.py fails for a results file that no command here makes.
ACCURACY = "accuracy.py --quick"
PLAN_RUNS = (  # budget, method, tag of the searched plans
    ("avg3", "hessian", "hessian"),
    ("avg3", "sam", "sam"),
    ("avg2", "sam", "sam_avg2"),
    ("avg3", "saq", "saq"),
)
COMMANDS = [
    "prepare.py --repeats 1 --models ''",
    "overhead.py --steps 15 --fit",  # with the peers: `make bench-peers` runs it in .venv-bench
    "overhead.py --models resnet18,mobilenet_v2,resnet20 --no-compile --no-peers --profile '' --steps 15 "
    "--name overhead_cpu",
    "compiled_backward.py",
    "channels_last.py",
    ACCURACY,
    f"{ACCURACY} --recipes features_short --qat-epochs 1 --threads 1 --tag features",
    f"{ACCURACY} --recipes lsq_w2a2,fpq_w2a2,mec_w2a2 --qat-epochs 1 "
    "--threads 1 --seeds 1,2 --fp-seed 0 --merge benchmarks/results/accuracy_resnet20_quick_features.json "
    "--tag features_seeds",
    f"{ACCURACY} --recipes lsq_w4a4,cr_w4a4,mec_w4a4 --qat-epochs 1 --threads 1 --seeds 0 --fp-seed 0 "
    "--tag features_w4a4",
    f"{ACCURACY} --recipes lsq_w2a2,cr_w2a2,fpq_cr_w2a2 --qat-epochs 1 --threads 1 --seeds 0 --fp-seed 0 "
    "--tag features_cr_warmup",
    *(
        f"{ACCURACY} --model mobilenet_v2_small --recipes lsq_{bits},fpq_{bits},mec_{bits} --qat-epochs 1 "
        f"--threads 1 --seeds 0 --set quant.activation.init=mse --tag features_mse_{bits}"
        for bits in ("w2a2", "w4a4")
    ),
    f"{ACCURACY} --recipes lsq_w2a2,fpq_w2a2 --qat-epochs 1 --threads 1 --seeds 0 --set quant.activation.init=mse "
    "--tag features_mse_w2a2",
    f"{ACCURACY} --recipes mec_w2a2 --qat-epochs 1 --threads 1 --seeds 0 --tag features_mse_w2a2_mec",
    f"{ACCURACY} --recipes cr_w2a2,fpq_cr_w2a2 --qat-epochs 1 --threads 1 --seeds 0 --tag features_mse_w2a2_cr",
    f"{ACCURACY} --recipes lsq_w4a4,fpq_w4a4 --qat-epochs 1 --threads 1 --seeds 0 --tag features_mse_w4a4",
    "coreset.py --quick --bits w4a4 --threads 1",
    "coreset.py --quick --bits w2a2 --threads 1 --tag w2a2",
    "zeroshot.py --threads 1",
    *(
        f"sharpness.py --threads 1 --only-plans --budgets {budget} --methods {method} --tag {tag} --saq-iterations 60"
        for budget, method, tag in PLAN_RUNS
    ),
    "sharpness.py --threads 1 --only-budgets --budgets avg3 --methods hessian,sam,saq --search-first-last "
    "--saq-iterations 60 --seeds 0 --tag budgets_avg3",
    "sharpness.py --threads 1 --only-budgets --budgets avg2 --methods hessian,sam --search-first-last --seeds 0 "
    "--tag budgets_avg2",
    "export.py",
    "coverage.py",
    "vit_fmnist.py --train-images 60000 --fp-epochs 6 --qat-epochs 2",
    # the seeded methods table (hours; resumable: a second call runs only what the ledger lacks), then its table
    "methods.py --seeds 0,1,2",
    "methods.py --render",
]
# On a machine with a CUDA GPU (scripts/gpu_checks.sh runs them, with the gpu tests): eager, then compiled joined in.
GPU_COMMANDS = [
    "gpu_overhead.py --compiled '' --rounds 6 --budget 150",
    "gpu_overhead.py --models '' --compiled llama --modes traced_forward,op --rounds 6 "
    "--merge benchmarks/results/gpu_overhead.json",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="?", default="", help="run the commands whose script contains this text")
    parser.add_argument("--list", action="store_true", help="print the commands and exit")
    parser.add_argument("--gpu", action="store_true", help="the commands that need a CUDA GPU instead")
    args = parser.parse_args()
    chosen = [c for c in (GPU_COMMANDS if args.gpu else COMMANDS) if args.only in c.split()[0]]
    for command in chosen:
        line = f"{sys.executable} benchmarks/{command}"
        if args.list:
            print(f"python benchmarks/{command}")
            continue
        print(f"\n$ python benchmarks/{command}", flush=True)
        done = subprocess.run(shlex.split(line), check=False)
        if done.returncode:
            print(f"benchmarks/suite.py: {command} failed with exit status {done.returncode}", file=sys.stderr)
            return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
