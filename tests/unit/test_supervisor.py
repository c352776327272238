"""Supervisor invariants that hold whatever the interpreter's flags."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SPAWN_WITH_A_THREAD = """
import os
import signal
import sys
import threading
from pathlib import Path

from pmnc.runtime.balance import Balance
from pmnc.runtime.config import load_config
from pmnc.runtime.supervisor import Supervisor, _Cage

cfg = load_config(sys.argv[1])
sup = Supervisor(cfg)
cage = _Cage(cfg.cages[0], (), (), None, Path(sys.argv[2]), Balance(1))
release = threading.Event()
other = threading.Thread(target=release.wait)
other.start()
try:
    sup._spawn(cage, 0)
except RuntimeError as e:
    print("refused:", e)
else:
    print("forked from a threaded process")
    for pid in list(sup._workers):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
finally:
    release.set()
    other.join()
"""


def test_spawn_refuses_to_fork_from_a_threaded_process_even_under_python_o(
    tmp_path: Path,
) -> None:
    (tmp_path / "modules").mkdir()
    config = tmp_path / "node.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            node: n
            data_dir: {tmp_path / "var"}
            cages:
              - name: c
                modules: {tmp_path / "modules"}
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-O", "-c", SPAWN_WITH_A_THREAD, str(config), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused: the supervisor must stay single-threaded"), (
        result.stdout,
        result.stderr,
    )
