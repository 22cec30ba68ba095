"""Run ``dip-r1`` and ``python -m dip_r1.export`` command lines in fresh processes, paying the imports once.

``python tests/cli_runner.py`` imports the package (about 6 s of torch, Lightning and transformers) and then
reads one JSON request a line on stdin, ``{"module", "argv", "cwd", "env", "timeout"}``; for each it forks a
child that runs the module's ``main()`` as ``python -m <module> <argv>`` would (its own working folder,
environment, ``sys.argv``, stdout and stderr, and the exit status Python gives a ``SystemExit``), and answers
``{"rc", "stdout", "stderr", "seconds"}`` on stdout. A child running past ``timeout`` is killed (rc -9).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path


def _child(request: dict, out: str, err: str) -> None:
    """In the forked child: run the command, exit with its status; never returns."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, out), (2, err)):
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(handle, fd)
            os.close(handle)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 (the process ends below)
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        sys.argv = [request["module"], *request["argv"]]
        module = __import__(request["module"], fromlist=["main"])
        try:
            module.main()
            code = 0
        except SystemExit as exit_:  # what the interpreter does with it
            if exit_.code is None:
                code = 0
            elif isinstance(exit_.code, int):
                code = exit_.code
            else:
                print(exit_.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    import dip_r1.cli  # noqa: F401  the imports every command pays, paid once
    import dip_r1.export  # noqa: F401
    import dip_r1.lightning_cli  # noqa: F401
    import dip_r1.module  # noqa: F401

    answers = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        with tempfile.TemporaryDirectory() as folder:
            out, err = os.path.join(folder, "out"), os.path.join(folder, "err")
            start = time.monotonic()
            pid = os.fork()
            if pid == 0:
                _child(request, out, err)
            rc = None
            while rc is None:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    rc = os.waitstatus_to_exitcode(status)
                elif time.monotonic() - start > request["timeout"]:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    rc = -9
                else:
                    time.sleep(0.05)
            answer = {
                "rc": rc,
                "stdout": Path(out).read_text() if os.path.exists(out) else "",
                "stderr": Path(err).read_text() if os.path.exists(err) else "",
                "seconds": round(time.monotonic() - start, 2),
            }
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    serve()
