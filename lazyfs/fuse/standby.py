"""A mount daemon started ahead of its mount: ``python -m lazyfs.fuse.standby READY_FD``.

It starts Python and imports the daemon's modules, then waits for one line of JSON on stdin,
``{"argv": [...], "log": PATH}``, and becomes ``lazyfs mount ARGV --foreground --ready-fd READY_FD``
with its output appended to PATH. End of input without a line ends it. Starting the interpreter and
importing trio, pyfuse3 and httpx costs more than the mount itself, so a snapshotter that keeps one
standby waiting takes that cost off a container's start (:class:`lazyfs.fuse.control.Standby`).
"""

from __future__ import annotations

import json
import os
import sys

import lazyfs.fuse.daemon
import lazyfs.fuse.source
import lazyfs.rafs.builder
from lazyfs import cli

PRELOADED = (cli, lazyfs.fuse.daemon, lazyfs.fuse.source, lazyfs.rafs.builder)
"""What ``lazyfs mount --foreground`` imports, loaded before the mount is asked for."""


def main(ready_fd: int) -> int:
    """Wait for the mount's arguments, then run its daemon in this process."""
    line = sys.stdin.readline()
    if not line:
        return 0
    request = json.loads(line)
    os.dup2(os.open(os.devnull, os.O_RDONLY), sys.stdin.fileno())
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, sys.stdout.fileno())
    os.dup2(log, sys.stderr.fileno())
    os.close(log)
    return cli.main(["mount", *request["argv"], "--foreground", "--ready-fd", str(ready_fd)])


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
