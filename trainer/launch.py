"""Kubernetes-native Horovod launcher: no ssh, no MPI operator.

In an Indexed Job of N pods behind a headless Service, pod i (`JOB_COMPLETION_INDEX`) is
reachable as the host template filled with i (e.g. `trainer-{index}.trainer`). Every pod computes
the same host plan; pod 0 also serves Horovod's rendezvous on a fixed port, for one attempt: the
other pods join that attempt before they start anything, and a replaced pod joining again ends it,
so that pod 0 is replaced too and nobody registers into a store whose peers are gone
(trainer/rendezvous.py). Each pod then starts one process per slot (GPU) with the HOROVOD_*
environment that `horovodrun --gloo` would set, its rendezvous through the pod's relay to the attempt.

    python -m trainer.launch --pods 4 --slots 8 --host-template trainer-{index}.trainer -- \\
        python -m trainer.train ...
    python -m trainer.launch --local-pods 2 -- python -m trainer.train ...   # N "pods" as local processes
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import math
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time

from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts

from trainer.errors import EXIT_ATTEMPT_ENDED, EXIT_PEER_LOST, UsageError
from trainer.rendezvous import AttemptServer, RendezvousError, Relay, join_attempt

log = logging.getLogger("trainer.launch")

POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 10   # for the others to exit after SIGTERM, then SIGKILL


def host_plan(pods: int, slots: int, template: str) -> list:
    """Horovod's slot assignment (rank, local and cross rank) for `pods` hosts of `slots` each."""
    hosts = ",".join(f"{template.format(index=i)}:{slots}" for i in range(pods))
    return get_host_assignments(parse_hosts(hosts), pods * slots)


def slot_environment(slot, rendezvous_addr: str, port: int, iface: str) -> dict[str, str]:
    return {
        "HOROVOD_HOSTNAME": slot.hostname, "HOROVOD_RANK": str(slot.rank), "HOROVOD_SIZE": str(slot.size),
        "HOROVOD_LOCAL_RANK": str(slot.local_rank), "HOROVOD_LOCAL_SIZE": str(slot.local_size),
        "HOROVOD_CROSS_RANK": str(slot.cross_rank), "HOROVOD_CROSS_SIZE": str(slot.cross_size),
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": rendezvous_addr, "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
        "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_IFACE": iface, "NCCL_SOCKET_IFNAME": iface,
    }


def serve_rendezvous(plan: list, port: int, rendezvous_addr: str) -> AttemptServer:
    """Pod 0: Horovod's rendezvous server, for one attempt, on the fixed port every pod was told. The
    store has no authentication (docs/reliability.md, "Dependency audit"): it listens on loopback when
    the job is local, and the chart's NetworkPolicy fences it in on a cluster."""
    host = "127.0.0.1" if ipaddress_is_loopback(rendezvous_addr) else "0.0.0.0"
    server = AttemptServer((host, port), plan)
    log.info("pod 0 serves rendezvous attempt %s on port %d", server.attempt, port)
    return server


def ipaddress_is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:   # a DNS name: another pod's
        return address == "localhost"


def run_pod(index: int, pods: int, slots: int, template: str, rendezvous_addr: str, port: int, iface: str,
            command: list[str], rendezvous_timeout: float = 600) -> int:
    """Start this pod's slot processes once it is in a rendezvous attempt; the first failure stops the others
    (no rank may hang). Pods start in any order (scheduling, image pulls) and pod 0's DNS name exists only
    once it runs, but Horovod's rendezvous client gives up after about 1.5 s: pods > 0 first wait to join."""
    plan = host_plan(pods, slots, template)
    hostname = template.format(index=index)
    server = None
    if index == 0:
        try:
            server = serve_rendezvous(plan, port, rendezvous_addr)
        except OSError as exc:   # taken (a local run), or not ours to bind
            raise UsageError(f"--port: pod 0 cannot serve the rendezvous on port {port}: {exc.strerror or exc}") from None
    if server is None:
        relay = Relay(rendezvous_addr, port, join_attempt(rendezvous_addr, port, index, rendezvous_timeout))
    else:   # its own server: reachable before its DNS name resolves
        relay = Relay("127.0.0.1", port, server.attempt)
    mine = [s for s in plan if s.hostname == hostname]
    try:
        processes = _start(command, [{**os.environ, **slot_environment(s, "127.0.0.1", relay.server_port, iface)}
                                     for s in mine])
    except BaseException:
        relay.shutdown()
        if server is not None:
            server.shutdown()
        raise
    try:
        return _wait(processes, [f"rank {s.rank}" for s in mine], ended=server.ended if server else None)
    finally:
        relay.shutdown()
        if server is not None:
            server.shutdown()


def _start(command: list[str], environments: list[dict[str, str]]) -> list[subprocess.Popen]:
    """One process per environment; a command that exec() refuses (checked up front, but e.g. a file that is
    no program) is a UsageError, the processes already started stopped."""
    processes: list[subprocess.Popen] = []
    try:
        for env in environments:
            processes.append(subprocess.Popen(command, env=env))
    except OSError as exc:
        for process in processes:
            process.kill()
            process.wait()
        raise UsageError(f"cannot start {command[0]}: {exc.strerror or exc}") from None
    return processes


_children: list[subprocess.Popen] = []   # what a SIGTERM to this launcher is passed on to
_stopping = threading.Event()


def _forward_sigterm(signum, frame) -> None:
    """Kubernetes stops a pod with SIGTERM (to this launcher, PID 1): each process gets it, finishes
    its step, checkpoints with the others and exits 143; the launcher waits for them all."""
    if not _children:   # nothing started yet (waiting for the rendezvous): just stop
        sys.exit(143)
    _stopping.set()
    for process in _children:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(ProcessLookupError):   # a frozen process handles it once it runs
                os.kill(process.pid, signal.SIGCONT)


def _wait(processes: list[subprocess.Popen], names: list[str], grace: float = STOP_GRACE_SECONDS,
          groups: bool = False, ended: threading.Event | None = None) -> int:
    """Exit code of the first process to fail (0 when all succeed); the rest are then stopped. After
    a SIGTERM to this launcher, every process is waited for (they checkpoint before they exit).
    `groups`: each process leads a process group, killed whole if it outlasts the grace period.
    `ended` (pod 0): set when its rendezvous attempt can no longer complete; all are stopped."""
    _children.extend(processes)
    try:
        while True:
            if _stopping.is_set():
                codes = [p.wait() for p in processes]
                return next((c if c > 0 else 128 - c for c in codes if c), 0)
            if ended is not None and ended.is_set():
                return EXIT_ATTEMPT_ENDED
            codes = [p.poll() for p in processes]
            failed = [(name, c) for name, c in zip(names, codes) if c not in (None, 0)]
            if failed:
                # The cause before its consequences: a rank that lost another one seen in the same poll.
                name, code = min(failed, key=lambda failure: failure[1] == EXIT_PEER_LOST)
                print(f"trainer.launch: {name} {_describe(code)}; stopping the others", file=sys.stderr, flush=True)
                return code if code > 0 else 128 - code   # a shell's code for death by signal
            if all(c == 0 for c in codes):
                return 0
            time.sleep(POLL_SECONDS)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                with contextlib.suppress(ProcessLookupError):   # a frozen process handles SIGTERM once it runs
                    os.kill(process.pid, signal.SIGCONT)
        deadline = time.monotonic() + grace
        for process in processes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:   # e.g. frozen (SIGSTOP): SIGTERM waits for it to run again
                if groups:
                    os.killpg(process.pid, signal.SIGKILL)
                else:
                    process.kill()
                process.wait()


def _describe(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


MAX_LOCAL_PODS = 16   # local mode is for tests and demos on one machine


def run_local(pods: int, slots: int, port: int, command: list[str]) -> int:
    """N pods as local process groups on 127.0.0.1: the same launcher, as tests and the demo run it.
    Real pods each have their own address; local ones share one, so each pod's ports (trainer.train's
    --metrics-port + local rank) are moved past the previous pods' (TRAINER_PORT_OFFSET)."""
    launchers = [subprocess.Popen([sys.executable, "-m", "trainer.launch", "--pods", str(pods), "--slots", str(slots),
                                   "--pod-index", str(i), "--host-template", "pod-{index}", "--rendezvous-addr",
                                   "127.0.0.1", "--port", str(port), "--iface", "lo", "--", *command],
                                  env={**os.environ, "TRAINER_PORT_OFFSET": str(i * slots)}, start_new_session=True)
                 for i in range(pods)]
    # Longer than each pod's own grace: a pod launcher stops its processes before it is killed.
    # A pod that does not stop in time is killed with its processes, as a node's kubelet would.
    return _wait(launchers, [f"pod {i}" for i in range(pods)], grace=2 * STOP_GRACE_SECONDS, groups=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=1, help="pods in the job (the Indexed Job's completions)")
    parser.add_argument("--slots", type=int, default=1, help="processes per pod, one per GPU (default 1)")
    parser.add_argument("--pod-index", type=int, default=os.environ.get("JOB_COMPLETION_INDEX", "0"),
                        help="this pod's index (default $JOB_COMPLETION_INDEX)")
    parser.add_argument("--host-template", default="localhost",
                        help="pod i's DNS name with {index}, e.g. trainer-{index}.trainer (headless Service)")
    parser.add_argument("--rendezvous-addr", help="address of pod 0 (default: the template filled with 0)")
    parser.add_argument("--port", type=int, default=29500, help="rendezvous port served by pod 0 (default 29500)")
    parser.add_argument("--rendezvous-timeout", type=float, default=600,
                        help="seconds a pod waits for pod 0's rendezvous server to admit it to an attempt "
                             "(default 600)")
    parser.add_argument("--iface", default="eth0", help="network interface Gloo and NCCL use (default eth0)")
    parser.add_argument("--local-pods", type=int, help="run this many pods as local processes (tests, demo)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the training command")
    return parser


_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?")


def template_problem(template: str, pods: int) -> str | None:
    """Why --host-template cannot name the pods: it must hold {index} (with more than one pod) and nothing
    else to fill in, and give host names."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as exc:   # a brace left open or unmatched
        return f"{exc}; use {{index}} for the pod's index (and {{{{ }}}} for a literal brace)"
    other = next((field for field in fields if field != "index"), None)
    if other is not None:
        return f"{{{other}}} is not {{index}}, the one field filled in (with the pod's index)"
    if pods > 1 and not fields:
        return f"must contain {{index}}: with {pods} pods, each needs a host name of its own"
    try:
        names = [template.format(index=i) for i in range(min(pods, 2))]
    except (ValueError, KeyError, IndexError) as exc:   # a format spec that does not fit an integer
        return f"{{index}} cannot be filled in ({exc})"
    bad = next((name for name in names if not _HOST.fullmatch(name)), None)
    if bad is not None:
        return f"gives {bad!r}, not a host name (letters, digits, '-', '_' and '.')"
    return None


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def command_problem(program: str) -> str | None:
    """Why `program` cannot be started here (as every rank would fail to), or None."""
    if shutil.which(program):
        return None
    if os.sep not in program:
        return "not found on PATH"
    if not os.path.exists(program):
        return "no such file"
    if os.path.isdir(program):
        return "a directory"
    return "not executable"


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, command: list[str]) -> None:
    """Every flag at once, before a rendezvous is served or joined: one line (parser.error, exit 2) each."""
    if not command:
        parser.error("give the command to run after --")
    if args.local_pods is not None and not 1 <= args.local_pods <= MAX_LOCAL_PODS:
        parser.error(f"--local-pods {args.local_pods} must be in 1..{MAX_LOCAL_PODS}: each is a process on this machine")
    if args.pods < 1:
        parser.error(f"--pods {args.pods} must be >= 1")
    if args.slots < 1:
        parser.error(f"--slots {args.slots} must be >= 1: the processes per pod (one per GPU, or one on CPUs)")
    if not 0 <= args.pod_index < args.pods and not args.local_pods:
        parser.error(f"pod index {args.pod_index} must be in 0..{args.pods - 1}")
    if not 1 <= args.port <= 65535:
        parser.error(f"--port {args.port} must be in 1..65535")
    if not (math.isfinite(args.rendezvous_timeout) and args.rendezvous_timeout > 0):
        parser.error(f"--rendezvous-timeout {args.rendezvous_timeout:g} must be a number of seconds above 0")
    problem = template_problem(args.host_template, args.pods)
    if problem:
        parser.error(f"--host-template {args.host_template!r}: {problem}")
    addr = args.rendezvous_addr
    if addr is not None and not (_HOST.fullmatch(addr) or _is_ip(addr)):
        parser.error(f"--rendezvous-addr {addr!r} is not a host name or IP address")
    interfaces = [name for _, name in socket.if_nameindex()]
    if not args.local_pods and args.iface not in interfaces:   # local pods use lo, whatever --iface says
        parser.error(f"--iface {args.iface}: no such network interface here (there are: {', '.join(interfaces)})")
    problem = command_problem(command[0])
    if problem:
        parser.error(f"cannot start {command[0]}: {problem}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    check_flags(parser, args, command)
    signal.signal(signal.SIGTERM, _forward_sigterm)
    logging.basicConfig(format="%(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    if args.local_pods:
        return run_local(args.local_pods, args.slots, args.port, command)
    try:
        return run_pod(args.pod_index, args.pods, args.slots, args.host_template,
                       args.rendezvous_addr or args.host_template.format(index=0), args.port, args.iface, command,
                       args.rendezvous_timeout)
    except RendezvousError as exc:
        log.error("%s", exc)
        return 1
    except UsageError as exc:   # found only once started: the port taken, a command exec() refuses
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
