"""Kubernetes-native Horovod launcher: no ssh, no MPI operator.

In an Indexed Job of N pods behind a headless Service, pod i (`JOB_COMPLETION_INDEX`) is
reachable as the host template filled with i (e.g. `trainer-{index}.trainer`). Every pod computes
the same host plan; pod 0 also serves Horovod's rendezvous on a fixed port. Each pod then starts
one process per slot (GPU) with the HOROVOD_* environment that `horovodrun --gloo` would set.

    python -m trainer.launch --pods 4 --slots 8 --host-template trainer-{index}.trainer -- \\
        python -m trainer.train ...
    python -m trainer.launch --local-pods 2 -- python -m trainer.train ...   # N "pods" as local processes
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

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


def serve_rendezvous(plan: list, port: int, rendezvous_addr: str) -> RendezvousHTTPServer:
    """Pod 0: Horovod's rendezvous server on the fixed port every pod was told. The store has no
    authentication (docs/reliability.md, "Dependency audit"): it listens on loopback when the job
    is local, and the chart's NetworkPolicy fences it in on a cluster."""
    host = "127.0.0.1" if ipaddress_is_loopback(rendezvous_addr) else "0.0.0.0"
    server = RendezvousHTTPServer((host, port), RendezvousHandler, 0)
    server.init(plan)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def ipaddress_is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:   # a DNS name: another pod's
        return address == "localhost"


def wait_for_rendezvous(addr: str, port: int, timeout: float) -> None:
    """Pods start in any order (scheduling, image pulls) and pod 0's DNS name exists only once it runs,
    but Horovod's rendezvous client gives up after about 1.5 s: wait until the server answers."""
    deadline = time.monotonic() + timeout
    print(f"trainer.launch: waiting for the rendezvous server at {addr}:{port}", file=sys.stderr, flush=True)
    while True:
        try:
            socket.create_connection((addr, port), timeout=5).close()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                sys.exit(f"trainer.launch: rendezvous server {addr}:{port} not reachable after {timeout:.0f} s: {exc}")
            time.sleep(1)


def run_pod(index: int, pods: int, slots: int, template: str, rendezvous_addr: str, port: int, iface: str,
            command: list[str], rendezvous_timeout: float = 600) -> int:
    """Start this pod's slot processes; the first failure stops the others (no rank may hang)."""
    plan = host_plan(pods, slots, template)
    hostname = template.format(index=index)
    server = serve_rendezvous(plan, port, rendezvous_addr) if index == 0 else None
    wait_for_rendezvous(rendezvous_addr, port, rendezvous_timeout)
    mine = [s for s in plan if s.hostname == hostname]
    processes = [subprocess.Popen(command, env={**os.environ, **slot_environment(s, rendezvous_addr, port, iface)})
                 for s in mine]
    try:
        return _wait(processes, [f"rank {s.rank}" for s in mine])
    finally:
        if server is not None:
            server.shutdown()


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
          groups: bool = False) -> int:
    """Exit code of the first process to fail (0 when all succeed); the rest are then stopped. After
    a SIGTERM to this launcher, every process is waited for (they checkpoint before they exit).
    `groups`: each process leads a process group, killed whole if it outlasts the grace period."""
    _children.extend(processes)
    try:
        while True:
            if _stopping.is_set():
                codes = [p.wait() for p in processes]
                return next((c if c > 0 else 128 - c for c in codes if c), 0)
            codes = [p.poll() for p in processes]
            failed = [(name, c) for name, c in zip(names, codes) if c not in (None, 0)]
            if failed:
                name, code = failed[0]
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
    parser.add_argument("--pod-index", type=int, default=int(os.environ.get("JOB_COMPLETION_INDEX", "0")),
                        help="this pod's index (default $JOB_COMPLETION_INDEX)")
    parser.add_argument("--host-template", default="localhost",
                        help="pod i's DNS name with {index}, e.g. trainer-{index}.trainer (headless Service)")
    parser.add_argument("--rendezvous-addr", help="address of pod 0 (default: the template filled with 0)")
    parser.add_argument("--port", type=int, default=29500, help="rendezvous port served by pod 0 (default 29500)")
    parser.add_argument("--rendezvous-timeout", type=float, default=600,
                        help="seconds to wait for pod 0's rendezvous server to answer (default 600)")
    parser.add_argument("--iface", default="eth0", help="network interface Gloo and NCCL use (default eth0)")
    parser.add_argument("--local-pods", type=int, help="run this many pods as local processes (tests, demo)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the training command")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    if args.local_pods is not None and not 1 <= args.local_pods <= MAX_LOCAL_PODS:
        parser.error(f"--local-pods {args.local_pods} must be in 1..{MAX_LOCAL_PODS}: each is a process on this machine")
    if not 0 <= args.pod_index < args.pods and not args.local_pods:
        parser.error(f"pod index {args.pod_index} must be in 0..{args.pods - 1}")
    signal.signal(signal.SIGTERM, _forward_sigterm)
    if args.local_pods:
        return run_local(args.local_pods, args.slots, args.port, command)
    return run_pod(args.pod_index, args.pods, args.slots, args.host_template,
                   args.rendezvous_addr or args.host_template.format(index=0), args.port, args.iface, command,
                   args.rendezvous_timeout)


if __name__ == "__main__":
    sys.exit(main())
