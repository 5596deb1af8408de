"""Run the seeds of a seeded pipeline or experiment in parallel processes, one intra-op
thread each (small CPU models use two threads poorly: two one-thread processes do about
twice the work of one two-thread process), then the normal command once more, which finds
every seed complete and writes the seeded tables.

    python bench/run_seeds.py --procs 3 -- all --experiment table1 --seeds 3 --out runs/table1

Each worker runs the given command with only its share of the seeds (the seeded run's own
folders: <out>/seed<k>, <teachers>/seed<k>), so a killed driver is rerun as is: complete
seeds are skipped, interrupted ones resume. Numbers are those of one thread per process.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

# a worker runs its seeds' one-seed pipelines (their own folders, each locked by its run)
# and stops there: the seeded folder itself and the tables are the final command's
_WORKER = """
import sys
import guard_fast.pipeline.run as run
keep = {int(s) for s in sys.argv[1].split(",")}

def seeds_only(cfg, p, rank, log):
    for s, sub in run.seed_runs(cfg):
        if s in keep:
            run._run_pipeline(sub, run.resolve_settings(sub), rank, log)
    raise SystemExit(0)

run._run_seeds = seeds_only
from guard_fast.train import main
sys.exit(main(sys.argv[2:]))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=2, help="worker processes (one thread each)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the guard_fast.train arguments")
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if "--seeds" not in cmd:
        ap.error("the command needs --seeds N")
    n = int(cmd[cmd.index("--seeds") + 1])
    first = int(cmd[cmd.index("--seed") + 1]) if "--seed" in cmd else 0
    if n < 1 or a.procs < 1:
        ap.error("--seeds and --procs must be >= 1")
    seeds = list(range(first, first + n))
    shares = [seeds[i::a.procs] for i in range(min(a.procs, n))]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, ",".join(map(str, share)), *cmd],
                              env=env) for share in shares]
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"workers ended with {codes}; rerun this command to continue", file=sys.stderr)
        return 1
    return subprocess.call([sys.executable, "-m", "guard_fast.train", *cmd], env=env)


if __name__ == "__main__":
    sys.exit(main())
