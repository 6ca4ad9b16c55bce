"""`gmv milvus start|stop|status|run`: a long-lived embedded Milvus for a data dir.

Every command on a data dir whose embedded Milvus already runs (started here, or owned by a
running `gmv serve`) uses it instead of starting its own, which saves 5-30 s a command.
`start` runs `gmv milvus run` in the background, in a session of its own, and returns once
Milvus is healthy; the Milvus still lives and dies with that background process (stop it
with `gmv milvus stop`; kill -9 of it stops Milvus too).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gmv_engine.errors import GMVError
from gmv_engine.settings import Settings, add_config_flag, add_flags, from_args

from .common import EXIT_OK

EXIT_NOT_RUNNING = 3  # as LSB init scripts' status: "program is not running"
START_TIMEOUT_S = 240.0  # two start attempts of the embedded Milvus (ATTEMPT_TIMEOUTS_S), plus a margin
STOP_TIMEOUT_S = 60.0
OWNER = "gmv milvus run"


def register(commands) -> None:
    milvus = commands.add_parser("milvus", help="run the embedded Milvus of a data dir in the background").add_subparsers(
        dest="milvus_command", required=True)
    helps = {"start": "start it in the background; other commands on the data dir then use it",
             "stop": "stop the one `gmv milvus start` started",
             "status": f"is one running on the data dir, and whose (exit {EXIT_NOT_RUNNING} when none)",
             "run": "run it in the foreground until SIGTERM/SIGINT (what `start` runs)"}
    for name, help_text in helps.items():
        parser = milvus.add_parser(name, help=help_text)
        add_config_flag(parser)
        add_flags(parser, names=("data_dir", "milvus_port"))


def run(args) -> int:
    settings = from_args(args)
    if settings.milvus_uri:
        raise GMVError("`gmv milvus` manages the embedded Milvus of --data-dir; unset --milvus-uri/GMV_MILVUS_URI")
    return {"start": start, "stop": stop, "status": status, "run": run_foreground}[args.milvus_command](settings)


def milvus_dir(settings: Settings) -> Path:
    return (Path(settings.data_dir) / "milvus").resolve()


def describe(holder) -> str:
    return f"http://127.0.0.1:{holder.port} (pid {holder.pid}, {holder.owner or 'a GMV process'})"


def status(settings: Settings) -> int:
    from gmv_engine.milvus.embedded import running_server

    holder = running_server(milvus_dir(settings))
    if holder is None:
        print(f"no embedded Milvus is running on {milvus_dir(settings)}")
        return EXIT_NOT_RUNNING
    print(f"the embedded Milvus of {milvus_dir(settings)} is up at {describe(holder)}")
    return EXIT_OK


def start(settings: Settings) -> int:
    from gmv_engine.milvus.embedded import running_server

    directory = milvus_dir(settings)
    if (holder := running_server(directory)) is not None:
        print(f"already running at {describe(holder)}")
        return EXIT_OK
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "gmv-milvus.log"
    with open(log_path, "ab") as log_file, open(os.devnull, "rb") as nothing:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "gmv_server.cli", "milvus", "run", "--data-dir", str(settings.data_dir),
             "--milvus-port", str(settings.milvus_port)],
            stdin=nothing, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command and its terminal, by design
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while (holder := running_server(directory)) is None or holder.pid != daemon.pid:
        if daemon.poll() is not None:
            raise GMVError(f"the embedded Milvus did not start (exit {daemon.returncode}); see {log_path}:\n"
                           + _tail(log_path))
        if time.monotonic() > deadline:
            daemon.kill()
            raise GMVError(f"the embedded Milvus did not start within {START_TIMEOUT_S:.0f} s; see {log_path}")
        time.sleep(0.3)
    print(f"started the embedded Milvus of {directory} at {describe(holder)}; "
          f"stop it with `gmv milvus stop --data-dir {settings.data_dir}`")
    return EXIT_OK


def stop(settings: Settings) -> int:
    from gmv_engine.milvus.embedded import process_alive, running_server

    directory = milvus_dir(settings)
    holder = running_server(directory)
    if holder is None:
        print(f"no embedded Milvus is running on {directory}")
        return EXIT_OK
    if holder.owner != OWNER:
        raise GMVError(f"the embedded Milvus of {directory} belongs to pid {holder.pid} ({holder.owner}), not to "
                       "`gmv milvus start`: stop that process instead")
    os.kill(holder.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while process_alive(holder.pid):
        if time.monotonic() > deadline:
            os.kill(holder.pid, signal.SIGKILL)  # its Milvus dies with it (the death pipe)
            break
        time.sleep(0.2)
    print(f"stopped the embedded Milvus of {directory}")
    return EXIT_OK


def run_foreground(settings: Settings) -> int:
    from gmv_engine.milvus.embedded import EmbeddedMilvus

    with EmbeddedMilvus(milvus_dir(settings), port=settings.milvus_port, owner=OWNER) as server:
        print(f"embedded Milvus up at {server.uri}", flush=True)
        # cli.main turned SIGTERM into SystemExit, which unwinds the `with` and stops Milvus.
        while True:
            time.sleep(1.0)
            if server.exited():
                print("the embedded Milvus exited; restarting it", flush=True)
                server.restart()


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
