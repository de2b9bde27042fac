"""The benchmark suite: the commands that made the committed results, kept in this one list, run one after the
other (timing benchmarks need the machine to themselves). ``make bench`` runs them all; together they take most
of a day on 2 cores.

    python benchmarks/suite.py             # everything, in order
    python benchmarks/suite.py --list      # the commands only
    python benchmarks/suite.py accuracy    # the commands whose script name contains "accuracy"
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

QUICK_FEATURES = "--quick --qat-epochs 1"
COMMANDS = [
    "prepare.py",
    "overhead.py",
    "compiled_backward.py",
    "accuracy.py --quick",
    f"accuracy.py {QUICK_FEATURES} --recipes features_short --tag features",
    f"accuracy.py {QUICK_FEATURES} --recipes lsq_w2a2,fpq_w2a2,mec_w2a2 --seeds 1,2 --fp-seed 0 "
    "--merge benchmarks/results/accuracy_resnet20_quick_features.json --tag features_seeds",
    f"accuracy.py {QUICK_FEATURES} --recipes lsq_w4a4,cr_w4a4,mec_w4a4 --tag features_w4a4",
    f"accuracy.py {QUICK_FEATURES} --recipes lsq_w2a2,cr_w2a2,fpq_cr_w2a2 --tag features_cr_warmup",
    *(
        f"accuracy.py {QUICK_FEATURES} --model mobilenet_v2_small --recipes lsq_{bits},fpq_{bits},mec_{bits} "
        f"--set quant.activation.init=mse --tag features_mse_{bits}"
        for bits in ("w2a2", "w4a4")
    ),
    f"accuracy.py {QUICK_FEATURES} --recipes lsq_w2a2,fpq_w2a2 --tag features_mse_w2a2",
    f"accuracy.py {QUICK_FEATURES} --recipes mec_w2a2 --tag features_mse_w2a2_mec",
    f"accuracy.py {QUICK_FEATURES} --recipes cr_w2a2,fpq_cr_w2a2 --tag features_mse_w2a2_cr",
    f"accuracy.py {QUICK_FEATURES} --recipes lsq_w4a4,fpq_w4a4 --tag features_mse_w4a4",
    "coreset.py --quick --bits w4a4",
    "coreset.py --quick --bits w2a2 --tag w2a2",
    "zeroshot.py",
    "sharpness.py",
    "sharpness.py --only-budgets --budgets avg3 --methods hessian,sam,saq --search-first-last --saq-iterations 60 "
    "--tag budgets_avg3",
    "sharpness.py --only-budgets --budgets avg2 --methods hessian,sam --search-first-last --tag budgets_avg2",
    "export.py",
    "coverage.py",
    "vit_fmnist.py --train-images 60000 --fp-epochs 6 --qat-epochs 2",
    # the seeded methods table (hours; resumable: a second call runs only what the ledger lacks)
    "methods.py --seeds 0,1,2",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="?", default="", help="run the commands whose script contains this text")
    parser.add_argument("--list", action="store_true", help="print the commands and exit")
    args = parser.parse_args()
    chosen = [c for c in COMMANDS if args.only in c.split()[0]]
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
