"""Start-up time: ``vgt --help``, ``vgt plugins``, ``vgt presets`` and ``import vgt_core``, each a fresh process, side
by side.

    python bench/startup.py [--repeats 5] [--json OUT]

Each command runs as a subprocess of this Python (``python -m vgt_core.cli`` is what the ``vgt`` script runs, and
it picks up the sources on ``PYTHONPATH``); an untimed warm-up run of each fills the OS file cache, then the
commands run in interleaved rounds and the median wall time is kept. ``python -c pass`` (the interpreter alone)
and ``import torch`` are timed alongside, so the library's own share can be read off. Target: each ``vgt`` command
< 2 s, which means importing no torch on these paths (plugins register their models lazily, docs/plugins.md).
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
    "vgt presets": ["-m", "vgt_core.cli", "presets"],
}
TARGET_S = 2.0
CLI = ("vgt --help", "vgt plugins", "vgt presets")


def main() -> None:
    p = parser(__doc__, repeats=5)
    args = p.parse_args()
    info = setup(args)

    def run(argv: list[str]):
        return lambda: subprocess.run([sys.executable, *argv], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    median = interleaved({name: run(argv) for name, argv in COMMANDS.items()}, args.repeats)
    base = median["python -c pass"]
    print(f"{args.repeats} rounds (median), {sys.executable}\n\n{'command':<18} {'s':>7} {'- python':>9}  target")
    for name, sec in median.items():
        verdict = (f"< {TARGET_S:.0f} s: " + ("holds" if sec < TARGET_S else "FAILS")) if name in CLI else ""
        print(f"{name:<18} {sec:>7.2f} {sec - base:>9.2f}  {verdict}")
    holds = {name: median[name] < TARGET_S for name in CLI}
    slowest = max(median[n] for n in CLI)
    print(f"\nslowest vgt command: {slowest:.2f} s (import torch alone: {median['import torch']:.2f} s); "
          f"target < {TARGET_S:.0f} s {'holds' if all(holds.values()) else 'fails'}")
    write_json(args.json, {**info, "script": "bench/startup.py", "command": " ".join(sys.argv), "repeats": args.repeats,
                           "seconds": {k: round(v, 3) for k, v in median.items()}, "target_s": TARGET_S,
                           "under_target": holds})


if __name__ == "__main__":
    main()
