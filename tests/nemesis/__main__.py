"""Long nemesis run: ``python -m tests.nemesis --broker redis --minutes 60 --seed 123`` loops seeds.

Each seed runs ``tests/test_nemesis.py`` with the long plan in its own pytest process
(the suite's fixtures start the workers and the test database), and every failing
seed is printed with the checker's report. The exit status is 1 if any seed failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.nemesis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], required=True)
    parser.add_argument("--minutes", type=float, default=60.0, help="start new seeds until then")
    parser.add_argument("--seed", type=int, default=None, help="first seed (default: random)")
    parser.add_argument("--profile", choices=["long", "ci"], default="long")
    parser.add_argument("--enable", default="", help="comma-separated switches to turn on, or 'all'")
    parser.add_argument("--disable", default="", help="comma-separated switches to turn off")
    parser.add_argument("--disruptive", action="store_true",
                        help="also restart the broker and close the database (never on a shared machine)")
    default_dump = os.path.join(tempfile.gettempdir(), "nemesis-histories")
    parser.add_argument("--dump-dir", default=os.environ.get("NEMESIS_DUMP_DIR", default_dump),
                        help="where the history of every failing seed is written")
    return parser.parse_args(argv)


def run_seed(args: argparse.Namespace, seed: int) -> tuple[bool, str]:
    """Run one seed in a pytest process; return whether it passed and its output."""
    enable = args.enable + (",broker_restart,db_outage" if args.disruptive else "")
    env = {**os.environ, "NEMESIS_SEED": str(seed), "NEMESIS_PROFILE": args.profile,
           "NEMESIS_ENABLE": enable, "NEMESIS_DISABLE": args.disable,
           "NEMESIS_DUMP_DIR": str(Path(args.dump_dir).resolve())}
    env.setdefault("TEST_DB_NAME", "ordered_tasks_nemesis")
    command = [sys.executable, "-m", "pytest", "tests/test_nemesis.py", "-k", f"test_nemesis and {args.broker}",
               "-p", "no:cacheprovider", "-q", "-s", "-rN"]
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            returncode = child.wait()
        except BaseException:  # Ctrl-C or SIGTERM: the seed's run heals its faults and ends its workers
            child.send_signal(signal.SIGINT)
            try:
                child.wait(120)
            except subprocess.TimeoutExpired:
                child.kill()
            raise
        log.seek(0)
        output = log.read()
    report = [line for line in output.splitlines() if line.startswith(("nemesis seed", "switches on", "  ["))]
    return returncode == 0, "\n".join(report) or output[-3000:]


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, _terminate)  # as Ctrl-C: the running seed is stopped cleanly
    Path(args.dump_dir).mkdir(parents=True, exist_ok=True)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(3), "big")
    deadline = time.monotonic() + args.minutes * 60
    failed: list[int] = []
    runs = 0
    while time.monotonic() < deadline:
        try:
            ok, report = run_seed(args, seed)
        except KeyboardInterrupt:
            print(f"seed {seed}: interrupted (its faults healed, its workers stopped)", flush=True)
            return 130
        runs += 1
        print(f"seed {seed}: {'ok' if ok else 'FAILED'}", flush=True)
        if not ok:
            failed.append(seed)
            print(report, flush=True)
        seed += 1
    print(f"{runs} seed(s) on {args.broker}, {len(failed)} failed: {' '.join(map(str, failed)) or '-'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
