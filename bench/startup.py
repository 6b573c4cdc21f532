"""Start-up time: ``vgt --help``, ``vgt plugins`` and ``import vgt_core``, each a fresh process, side by side.

    python bench/startup.py [--repeats 5] [--json OUT]

Each command runs as a subprocess of this Python (``python -m vgt_core.cli`` is what the ``vgt`` script runs, and
it picks up the sources on ``PYTHONPATH``); an untimed warm-up run of each fills the OS file cache, then the
commands run in interleaved rounds and the median wall time is kept. ``python -c pass`` (the interpreter alone)
and ``import torch`` are timed alongside, so the library's own share can be read off. Target: ``vgt --help`` < 2 s.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import interleaved, parser, setup, write_json  # noqa: E402

COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "import torch": ["-c", "import torch"],
    "import vgt_core": ["-c", "import vgt_core"],
    "vgt --help": ["-m", "vgt_core.cli", "--help"],
    "vgt plugins": ["-m", "vgt_core.cli", "plugins"],
}


def main() -> None:
    p = parser(__doc__, repeats=5)
    args = p.parse_args()
    info = setup(args)

    def run(argv: list[str]):
        return lambda: subprocess.run([sys.executable, *argv], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    median = interleaved({name: run(argv) for name, argv in COMMANDS.items()}, args.repeats)
    print(f"{args.repeats} rounds (median), {sys.executable}\n\n{'command':<18} {'s':>7}")
    for name, sec in median.items():
        print(f"{name:<18} {sec:>7.2f}")
    help_s = median["vgt --help"]
    print(f"\nvgt --help: {help_s:.2f} s (target < 2 s: {'holds' if help_s < 2 else 'fails'})")
    write_json(args.json, {**info, "script": "bench/startup.py", "command": " ".join(sys.argv), "repeats": args.repeats,
                           "seconds": {k: round(v, 3) for k, v in median.items()}, "vgt_help_under_2s": help_s < 2})


if __name__ == "__main__":
    main()
