#!/usr/bin/python3
"""Network-emulation benchmark for swarm: real processes in Linux network namespaces.

    emulate.py run [--nodes 8] [--size 64MiB] [--uplink 100mbit] [--node-rate 200mbit]
                   [--scenario edge|incluster|churn|edge-churn|edge-containerd|edge-killholder|edge-trackerkill
                               |edge-masterfirst|edge-flakyuplink|edge-replicakill|edge-knownpeer|edge-stage
                               |edge-stagecap[,...]]
                   [--master-down 15] [--outage 60] [--baseline-pulls 2] [--stage-cap 40mbit]
                   [--systems direct,swarm,libtorrent]
                   [--swarm-bin PATH] [--json OUT.json]
    emulate.py selftest [--swarm-bin PATH]     N=3, 4 MiB, incluster: direct + swarm (+ libtorrent)
    emulate.py cleanup [--force]               remove leftover swbench-* namespaces, processes,
                                               mounts and work dirs

Needs root, iproute2 (ip, tc, ss), curl and Debian's docker-registry; the libtorrent
baseline needs python3-libtorrent under /usr/bin/python3, edge-containerd Debian's
containerd (containerd and ctr). Standard library only.

Topology (one invocation = one topology, systems run on it one after another):

    swbench-<pid>-up   upstream host, 198.18.0.1: docker-registry on :5000, libtorrent
                       seed (edge). eth0 egress: tbf at --uplink (the WAN uplink).
    swbench-<pid>-sw   the switch: bridge br0, one veth port per host. The port towards
                       each node is shaped at --node-down (default: --node-rate), i.e.
                       the node's download direction, so a node's link is symmetric like
                       a real NIC; the port towards upstream is not shaped (upstream only
                       receives requests and ACKs).
    swbench-<pid>-nI   node I (1..N), 198.18.0.(10+I). eth0 egress: tbf at --node-rate.
                       Node 1 is the master: swarm tracker, the seed in incluster.

Addresses are from 198.18.0.0/15 only, no namespace has a default route and none is
linked to the root namespace, so no packet can leave. IPv6 is disabled in every
namespace so its chatter does not pollute the byte counters. The veths are created
inside the namespaces, so deleting the namespaces removes everything.

Scenarios: edge (blob only upstream; every node downloads), incluster (blob on node 1;
nodes 2..N download; the uplink should carry ~nothing), churn (incluster layout; a
quarter of the downloaders are SIGKILLed at --churn-at and restarted --churn-down
seconds later unless --no-restart; figures are over the nodes that stay, the restarted
ones are reported apart). edge-churn is the same churn on the edge layout.

edge-containerd is the edge layout pulled by a real containerd (Debian's 1.6) on every
node instead of curl: containerd --config with root, state and sockets under the node's
work dir, started in the node's namespace (so 127.0.0.1:5001 there is that node's
agent), before the common start. The image is built here without tools: one layer, a
gzip'd tar holding the run's random blob (gzip cannot shrink it), an OCI config and
manifest, pushed to the upstream registry as swbench/image:v1. A node is done when its
`ctr images pull` (fetch and unpack, what a user gets) exits 0; then `ctr images check`
must say complete and unpacked, and the layer in the content store must hash right.
F is the layer's size (the blob + < 0.1 % of tar and gzip framing): the layer is what
swarm distributes and what fills the uplink; manifest and config (< 1 KiB each,
fetched by every node) show in the uplink bytes. direct: containerd pulls from the
registry (hosts.toml: http://198.18.0.1:5000 its only host). swarm: the agents of the edge
scenario, and hosts.toml written by `swarm containerd-config` (the agent at
http://127.0.0.1:5001 with pull + resolve, the registry as fallback). libtorrent (and
swarm-seed) cannot back containerd, which pulls through a registry API only: their
cells say "not applicable". containerd's and ctr's CPU count in both systems.

Resilience scenarios, edge layout, swarm only (other systems: "not applicable"):
edge-killholder (the node whose agent logs that it fetches as the lease holder is
SIGKILLed at --churn-at for good; `killed_holders`), edge-trackerkill (the tracker
SIGKILLed at --churn-at for good; `tracker_killed_at_s`), and five scripted flows
(class Flow; their events are extra result fields):
  edge-masterfirst   node 1 (tracker + agent) pulls; once its store has the blob
                     complete, tracker and agent are SIGKILLed for --master-down s
                     while node 2 pulls; node 1 comes back (same data dir, fresh
                     tracker); nodes 3..N pull one after another. Pulls are curl via
                     the agent, then the registry if the agent fails (containerd's
                     fallback): node field `fell_back`; `master_down_at_s`,
                     `master_back_at_s`, `master_complete_at_s`.
  edge-flakyuplink   every node pulls; the upstream's TCP connections reset with
                     `ss -K` at 25 % and 40 % of F carried, the switch port towards
                     upstream down at 55 % for --outage s: `resets` [{at_s,
                     uplink_fraction, connections}], `outage_from_s`, `outage_to_s`,
                     `outage_s`, `outage_uplink_fraction`, `upstream_resumes` (Range
                     resumptions logged by the agents).
  edge-replicakill   trackers on nodes 1-3, agents given all three; at a third of F
                     carried, the tracker that logged the blob's lease grant (its
                     arbiter) is SIGKILLed: `tracker_killed_at_s`,
                     `killed_tracker_node`, `killed_tracker`,
                     `killed_at_uplink_fraction`, `arbiter_error`.
  edge-knownpeer     before the start node 2 pulls the blob and a 1 MiB warm-up blob,
                     node 3 the warm-up blob (so knows node 2), the tracker is killed
                     and node 3's agent restarts; measured: node 3 pulls the blob,
                     which only node 2 holds: `known_peers` (node 3's <data>/peers),
                     `holder`, `from_known_peer`, `tracker_killed_before_start`.
  edge-stage         issue 11: a 3-layer image (6:3:1 of --size); before the start
                     each node's containerd pulls it --baseline-pulls times from a
                     docker-registry in the node's namespace (a skopeo copy; image
                     and content removed after each); then `swarm stage IMAGE` in
                     node 1's namespace (must exit 0), then edge-masterfirst with
                     every pull a real containerd's through its agent: `stage_s`,
                     `stage_rc`, `stage_uplink_bytes`, `stage_nodes`, `image_bytes`,
                     `uplink_over_image`, `pull_over_baseline_max`; per node
                     `pull_s`, `baseline_s`, `baseline_median_s`,
                     `pull_over_baseline`.
  edge-stagecap      issue 11: the same image staged with the tracker's --uplink-cap
                     at --stage-cap (every node at once; up to three lease holders
                     share the cap), the uplink sampled every 100 ms: `uplink_cap_bps`,
                     `stage_uplink_peak_bps`, `stage_peak_over_cap` (peak over 1 s
                     windows, Ethernet frames counted), `stage_s`, `stage_over_f_cap`
                     (stage_s / (F / cap)); then every node's containerd pulls it.
Flows log swarm at warn,swarm_peer=info,swarm_tracker=info (they read the logs).

Figures per system and scenario (field names match swarm-sim's): per-node completion
time from the common start, last_s / median_s / p90_s (nearest rank, as swarm-sim),
t_min_s (Kumar & Ross), ratio = last_over_t_min = last_s / t_min_s, uplink
bytes (upstream eth0 tx_bytes delta, frames incl. Ethernet/IP/TCP-or-UDP headers)
and uplink_ratio = uplink_over_f = uplink bytes / blob size, cpu_s_per_gb = user+sys CPU seconds of
every process of the system (rusage from wait4 of each process, plus the registry's
/proc/PID/stat delta over the system's run) per 10^9 bytes delivered to nodes. Every
node's copy is checked by sha256; a wrong copy fails the run.
"""

import argparse
import gzip
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
import urllib.request

PREFIX = "swbench-"
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
SYS_PY = "/usr/bin/python3"
REGISTRY_BIN = "/usr/bin/docker-registry"
UP_IP = "198.18.0.1"
NET_PREFIX = 24
REPO_NAME = "swbench/blob"
IMAGE_NAME, IMAGE_TAG = "swbench/image", "v1"
# edge-stage: the image (three layers, 6:3:1 of --size, like tests/stage.rs's 6, 3
# and 1 MiB) and the bound on `swarm stage`.
STAGE_IMAGE_NAME = "swbench/staged"
STAGE_LAYER_SHARES = (0.6, 0.3, 0.1)
STAGE_TIMEOUT_S = 120
# Scenarios that stage the 3-layer image of STAGE_LAYER_SHARES.
STAGE_SCENARIOS = ("edge-stage", "edge-stagecap")
CONTAINERD_BIN = "/usr/bin/containerd"
CTR_BIN = "/usr/bin/ctr"
REG_PORT = 5000
TRACKER_PORT = 7000
PEER_PORT = 7001
MIRROR_PORT = 5001
LT_PORT = 6881
SCHEMA = "swarm-emulate/1"
SETPRIV = shutil.which("setpriv") is not None


def log(msg):
    sys.stderr.write("[emulate %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


class Fail(Exception):
    pass


# ---------------------------------------------------------------- units

def parse_rate(s):
    """'100mbit', '100Mbit/s', '1gbit', '12.5MB/s', '800kbit' -> bits per second."""
    t = s.strip().lower().replace("/s", "").replace("ps", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    mult = {"bit": 1, "b": 1, "": 1, "kbit": 1e3, "kb": 8e3, "mbit": 1e6, "mb": 8e6,
            "gbit": 1e9, "gb": 8e9}
    if unit not in mult:
        raise argparse.ArgumentTypeError("%r: unknown rate unit (use kbit, mbit, gbit or kB, MB, GB)" % s)
    v = float(num) * mult[unit]
    if v < 8000:
        raise argparse.ArgumentTypeError("%r: rate too low" % s)
    return int(v)


def parse_size(s):
    """'64MiB', '4MiB', '1GiB', '64MB', '1000000' -> bytes."""
    t = s.strip()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = t[len(num):].strip()
    mult = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
            "kB": 1000, "KB": 1000, "MB": 10 ** 6, "GB": 10 ** 9, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if unit not in mult:
        raise argparse.ArgumentTypeError("%r: unknown size unit (use B, KiB, MiB, GiB, kB, MB, GB)" % s)
    v = int(float(num) * mult[unit])
    if v <= 0:
        raise argparse.ArgumentTypeError("%r: size must be positive" % s)
    return v


def human_rate(bps):
    for unit, f in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= f:
            return "%g %s" % (bps / f, unit)
    return "%d bit/s" % bps


def human_size(n):
    for unit, f in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= f:
            return "%g %s" % (round(n / f, 2), unit)
    return "%d B" % n


# ---------------------------------------------------------------- statistics

def percentile(xs, p):
    """Nearest rank (the smallest value with at least p % of the values at or below
    it), as swarm-sim's report computes it, so the two compare exactly."""
    xs = sorted(xs)
    if not xs:
        return None
    rank = min(max(math.ceil(p / 100.0 * len(xs)), 1), len(xs))
    return xs[rank - 1]


def t_min(size, n_down, u_s_bps, u_nodes_bps, d_min_bps):
    """Kumar & Ross: max(F/u_s, F/d_min, N*F/(u_s + sum u_i)), rates in bit/s."""
    f = size * 8.0
    terms = {  # swarm-sim's TMin field names
        "source_s": f / u_s_bps,
        "download_s": f / d_min_bps if d_min_bps else 0.0,
        "swarm_s": n_down * f / (u_s_bps + sum(u_nodes_bps)),
        "zone_s": 0.0,
    }
    return max(terms.values()), terms


# ---------------------------------------------------------------- shell helpers

def sh(argv, check=True, capture=True, timeout=30, input=None):
    r = subprocess.run(argv, stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise Fail("command failed (%d): %s\n%s" % (r.returncode, " ".join(argv),
                                                    r.stderr.decode(errors="replace").strip()))
    return r.stdout.decode(errors="replace") if capture else ""


def netns_list():
    out = sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def proc_cpu_s(pid):
    """user+sys CPU seconds of a live process (its threads included) from /proc."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


# ---------------------------------------------------------------- processes

class Proc:
    """A process in a namespace. Its stdout lines are time-stamped by a reader thread;
    a waiter thread reaps it with wait4, keeping its rusage (CPU of the process and its
    threads). `done_at` is set when the process signals completion: on a clean exit
    (done_on='exit') or on the first stdout line the predicate accepts."""

    def __init__(self, name, ns, argv, workdir, side="cluster", node=None, done_on=None,
                 stdin=False, env=None, on_line=None):
        self.name, self.ns, self.side, self.node = name, ns, side, node
        self.done_on = done_on
        self.on_line = on_line
        self.lines = []
        self.done_at = None
        self.exit_at = None
        self.rc = None
        self.cpu_s = None
        self.cpu_at_t0 = 0.0
        self.killed = False
        self.stopped = False
        self.started_at = time.monotonic()
        self.cond = threading.Condition()
        self.log_path = os.path.join(workdir, "log-%s.txt" % name)
        logf = open(self.log_path, "ab")
        # Repeats append to the same file: where this process's lines begin.
        self.log_start = logf.tell()
        # setpriv (util-linux) keeps the pid (it execs) and makes the process die with
        # this script even when the script is SIGKILLed and cannot clean up.
        guard = ["setpriv", "--pdeathsig", "KILL", "--"] if SETPRIV else []
        full = ["ip", "netns", "exec", ns] + guard + list(argv)
        self.argv = full
        self.p = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=logf,
                                  stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                  env=env, start_new_session=True)
        logf.close()
        self.pid = self.p.pid
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._wait, daemon=True).start()

    def _read(self):
        for raw in self.p.stdout:
            now = time.monotonic()
            line = raw.decode(errors="replace").rstrip("\n")
            with self.cond:
                self.lines.append((now, line))
                if self.done_at is None and callable(self.done_on) and self.done_on(line):
                    self.done_at = now
                self.cond.notify_all()
            if self.on_line:
                self.on_line(self, line)

    def _wait(self):
        _, status, ru = os.wait4(self.pid, 0)
        now = time.monotonic()
        with self.cond:
            self.rc = os.waitstatus_to_exitcode(status)
            self.p.returncode = self.rc  # we reaped it; keep Popen from trying again
            self.cpu_s = ru.ru_utime + ru.ru_stime
            self.exit_at = now
            if self.done_on == "exit" and self.rc == 0 and self.done_at is None:
                self.done_at = now
            self.cond.notify_all()

    @property
    def alive(self):
        return self.rc is None

    def wait_line(self, pred, timeout):
        """Blocks until a stdout line matches `pred` (returns it) or the process exits."""
        end = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for _, line in self.lines[seen:]:
                    if pred(line):
                        return line
                seen = len(self.lines)
                if self.rc is not None:
                    raise Fail("%s exited (%s) before it was ready; log: %s" % (self.name, self.rc, self.tail()))
                left = end - time.monotonic()
                if left <= 0:
                    raise Fail("%s not ready after %.0f s; log: %s" % (self.name, timeout, self.tail()))
                self.cond.wait(min(left, 0.2))

    def signal(self, sig):
        if self.rc is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self):
        self.killed = True
        self.signal(signal.SIGKILL)

    def stop(self, grace=5.0):
        self.stopped = True
        self.signal(signal.SIGTERM)

    def join(self, timeout):
        end = time.monotonic() + timeout
        with self.cond:
            while self.rc is None and time.monotonic() < end:
                self.cond.wait(0.1)
        return self.rc is not None

    def tail(self, n=6):
        try:
            with open(self.log_path, "rb") as f:
                data = f.read()[-4000:].decode(errors="replace")
            return " | ".join(data.strip().splitlines()[-n:])
        except OSError:
            return ""

    def write(self, text):
        try:
            self.p.stdin.write(text.encode())
            self.p.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def summary(self):
        return {"name": self.name, "node": self.node, "side": self.side, "rc": self.rc,
                "cpu_s": None if self.cpu_s is None else round(self.cpu_s - self.cpu_at_t0, 4),
                "cpu_setup_s": round(self.cpu_at_t0, 4),
                "killed_by_churn": self.killed}


def stop_all(procs, grace=5.0):
    for p in procs:
        p.stop()
    end = time.monotonic() + grace
    for p in procs:
        if not p.join(max(0.0, end - time.monotonic())):
            p.kill()
    for p in procs:
        p.join(5.0)


# ---------------------------------------------------------------- topology

class Topology:
    def __init__(self, tag, n, uplink_bps, node_bps, node_down_bps, burst_ms, latency_ms, workdir):
        self.tag = tag
        self.n = n
        self.uplink_bps, self.node_bps, self.node_down_bps = uplink_bps, node_bps, node_down_bps
        self.burst_ms, self.latency_ms = burst_ms, latency_ms
        self.workdir = workdir
        self.sw = "%s%s-sw" % (PREFIX, tag)
        self.up = "%s%s-up" % (PREFIX, tag)
        self.nodes = ["%s%s-n%d" % (PREFIX, tag, i) for i in range(1, n + 1)]
        self.tc_commands = []
        self.created = []

    def ip(self, i):
        """Address of node i (1-based)."""
        return "198.18.0.%d" % (10 + i)

    def ns(self, i):
        return self.nodes[i - 1]

    def _tbf(self, ns, dev, bps):
        rate_Bps = bps / 8.0
        burst = max(int(rate_Bps * self.burst_ms / 1000.0), 16 * 1514)
        cmd = ["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
               "rate", "%dbit" % bps, "burst", str(burst), "latency", "%dms" % self.latency_ms]
        sh(cmd)
        self.tc_commands.append(" ".join(cmd))

    def create(self):
        if self.n < 2 or self.n > 200:
            raise Fail("--nodes must be between 2 and 200")
        for ns in [self.sw, self.up] + self.nodes:
            sh(["ip", "netns", "add", ns])
            self.created.append(ns)
            for key in ("all", "default"):
                sh(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                    "net.ipv6.conf.%s.disable_ipv6=1" % key], check=False)
            sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        sh(["ip", "-n", self.sw, "link", "add", "br0", "type", "bridge", "forward_delay", "0", "stp_state", "0"])
        sh(["ip", "-n", self.sw, "link", "set", "br0", "up"])
        hosts = [(self.up, "pu", UP_IP, self.uplink_bps, None)]
        for i in range(1, self.n + 1):
            hosts.append((self.ns(i), "p%d" % i, self.ip(i), self.node_bps, self.node_down_bps))
        for ns, port, addr, egress, ingress in hosts:
            sh(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.sw])
            sh(["ip", "-n", ns, "addr", "add", "%s/%d" % (addr, NET_PREFIX), "dev", "eth0"])
            sh(["ip", "-n", ns, "link", "set", "eth0", "up"])
            sh(["ip", "-n", self.sw, "link", "set", port, "master", "br0"])
            sh(["ip", "-n", self.sw, "link", "set", port, "up"])
            self._tbf(ns, "eth0", egress)           # the host's upload
            if ingress:
                self._tbf(self.sw, port, ingress)   # the host's download

    def check_reachability(self):
        """Every node reaches the registry upstream (and so the bridge works)."""
        for i in range(1, self.n + 1):
            deadline = time.monotonic() + 10
            while True:
                r = subprocess.run(["ip", "netns", "exec", self.ns(i), "curl", "-s", "-o", "/dev/null", "-m", "2",
                                    "-w", "%{http_code}", "http://%s:%d/v2/" % (UP_IP, REG_PORT)],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=5)
                if r.stdout.strip() == b"200":
                    break
                if time.monotonic() > deadline:
                    raise Fail("node %d cannot reach the registry at %s:%d" % (i, UP_IP, REG_PORT))
                time.sleep(0.1)

    def counters(self, ns, dev="eth0"):
        out = json.loads(sh(["ip", "-j", "-s", "-n", ns, "link", "show", "dev", dev]))
        st = out[0]["stats64"]
        return st["tx"]["bytes"], st["rx"]["bytes"]

    def uplink_tx(self):
        return self.counters(self.up)[0]

    def snapshot(self):
        return {"up": self.counters(self.up), **{i: self.counters(self.ns(i)) for i in range(1, self.n + 1)}}

    def destroy(self):
        for ns in reversed(self.created):
            kill_ns_pids(ns)
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        self.created = []


def kill_ns_pids(ns):
    out = subprocess.run(["ip", "netns", "pids", ns], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
    for tok in out.decode().split():
        try:
            os.kill(int(tok), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass


def kill_containerds_under(path):
    """SIGKILLs containerd and containerd-shim* processes whose command line names
    something under `path`: shims outlive their containerd, and a containerd whose
    namespace was deleted by name still runs."""
    needle = (path.rstrip("/") + "/").encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/comm" % pid, "rb") as f:
                if not f.read().startswith(b"containerd"):
                    continue
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                if needle in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def unmount_under(path):
    """Unmounts what is mounted at or under `path`, deepest first (lazily if busy).
    containerd mounts snapshots while it unpacks; it runs under `ip netns exec`, whose
    private mount namespace normally takes them along when it dies, but a containerd
    started any other way leaves them here, and rmtree must not descend into them."""
    prefix = path.rstrip("/")
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if mp == prefix or mp.startswith(prefix + "/"):
                points.append(mp)
    for mp in sorted(points, key=len, reverse=True):
        if subprocess.run(["umount", mp], stderr=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)
    return points


def wait_listen(ns, proto, port, timeout=15.0, proc=None):
    """Waits until something in `ns` listens on `port` (proto 'tcp' or 'udp')."""
    flag = "-Hltn" if proto == "tcp" else "-Hlun"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = sh(["ip", "netns", "exec", ns, "ss", flag, "sport = :%d" % port], check=False)
        if out.strip():
            return
        if proc is not None and not proc.alive:
            raise Fail("%s exited (%s) before listening on %s/%d; log: %s" % (proc.name, proc.rc, proto, port, proc.tail()))
        time.sleep(0.05)
    raise Fail("nothing listens on %s/%d in %s after %.0f s%s" % (proto, port, ns, timeout,
                                                                 "; log: " + proc.tail() if proc else ""))


# ---------------------------------------------------------------- fabric calibration

def calibrate(topo, seconds=2.0):
    """What the emulated network itself delivers, with iperf3 (TCP, cheap on CPU):
    every node sending to the next one at once (all uplinks and downlinks busy), then
    upstream to node 1 alone. Goodput in bit/s and as a fraction of the tbf rate."""
    if not shutil.which("iperf3"):
        return {"status": "unavailable", "reason": "iperf3 not installed (apt-get install iperf3)"}
    port = 5201

    def servers(hosts):
        ps = [subprocess.Popen(["ip", "netns", "exec", ns, "iperf3", "-s", "-1", "-B", addr, "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for ns, addr in hosts]
        for ns, _ in hosts:
            wait_listen(ns, "tcp", port, timeout=10)
        return ps

    def clients(pairs):
        cs = [subprocess.Popen(["ip", "netns", "exec", ns, "iperf3", "-c", dst, "-p", str(port), "-t", str(seconds),
                                "-J"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for ns, dst in pairs]
        got = []
        for c in cs:
            try:
                out = json.loads(c.communicate(timeout=seconds + 20)[0] or b"{}")
                got.append(out["end"]["sum_received"]["bits_per_second"])
            except (subprocess.TimeoutExpired, KeyError, ValueError):
                c.kill()
                got.append(None)
        return got

    n = topo.n
    srv = servers([(topo.ns(i), topo.ip(i)) for i in range(1, n + 1)])
    ring = clients([(topo.ns(i), topo.ip(i % n + 1)) for i in range(1, n + 1)])
    for p in srv:
        p.kill()
        p.wait()
    srv = servers([(topo.ns(1), topo.ip(1))])
    up = clients([(topo.up, topo.ip(1))])[0]
    for p in srv:
        p.kill()
        p.wait()
    ok = [g for g in ring if g]
    return {
        "status": "ok", "tool": "iperf3 TCP, %g s" % seconds,
        "ring_bps": ring,
        "ring_min_fraction": round(min(ok) / topo.node_bps, 4) if ok else None,
        "uplink_bps": up,
        "uplink_fraction": round(up / topo.uplink_bps, 4) if up else None,
    }


# ---------------------------------------------------------------- the upstream registry

class Registry:
    def __init__(self, topo, ns, addr, root, name):
        self.topo, self.ns, self.addr, self.root, self.name = topo, ns, addr, root, name
        self.proc = None

    def start(self, workdir):
        cfg = os.path.join(workdir, "registry-%s.yml" % self.name)
        with open(cfg, "w") as f:
            f.write("version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                    "storage:\n  filesystem:\n    rootdirectory: %s\n  maintenance:\n"
                    "    uploadpurging:\n      enabled: false\n"
                    "http:\n  addr: %s:%d\n" % (self.root, self.addr, REG_PORT))
        self.proc = Proc("registry-" + self.name, self.ns, [REGISTRY_BIN, "serve", cfg], workdir, side="upstream")
        wait_listen(self.ns, "tcp", REG_PORT, proc=self.proc)

    def cpu_s(self):
        return proc_cpu_s(self.proc.pid) if self.proc and self.proc.alive else None

    def stop(self):
        if self.proc:
            stop_all([self.proc])


def push_blob(ns, base_url, repo, path, digest, tag=None, media_type=None):
    """Monolithic blob upload (POST then PUT ?digest=) run inside `ns` by this script;
    with `tag`, `path` is a manifest of `media_type` PUT as repo:tag instead."""
    extra = ["--tag", tag, "--media-type", media_type] if tag else []
    sh(["ip", "netns", "exec", ns, SYS_PY, os.path.abspath(__file__), "_push", base_url, repo, path, digest] + extra,
       timeout=120)


def cmd_push(a):
    base = a.url.rstrip("/")
    if a.tag:
        return put_manifest(base, a)
    req = urllib.request.Request("%s/v2/%s/blobs/uploads/" % (base, a.repo), method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=30) as r:
        loc = r.headers["Location"]
    loc = urllib.parse.urljoin(base + "/", loc)
    sep = "&" if "?" in loc else "?"
    with open(a.file, "rb") as f:
        data = f.read()
    req = urllib.request.Request(loc + sep + "digest=" + urllib.parse.quote(a.digest), method="PUT", data=data,
                                 headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=120) as r:
        if r.status not in (201, 204):
            raise SystemExit("push: unexpected status %d" % r.status)
    with urllib.request.urlopen(urllib.request.Request("%s/v2/%s/blobs/%s" % (base, a.repo, a.digest), method="HEAD"),
                                timeout=30) as r:
        if int(r.headers.get("Content-Length", -1)) != os.path.getsize(a.file):
            raise SystemExit("push: registry reports a different length")
    return 0


def put_manifest(base, a):
    with open(a.file, "rb") as f:
        data = f.read()
    req = urllib.request.Request("%s/v2/%s/manifests/%s" % (base, a.repo, a.tag), method="PUT", data=data,
                                 headers={"Content-Type": a.media_type})
    with urllib.request.urlopen(req, timeout=30) as r:
        if r.status != 201:
            raise SystemExit("push: manifest: unexpected status %d" % r.status)
        if r.headers.get("Docker-Content-Digest") != a.digest:
            raise SystemExit("push: the registry stored the manifest as %s, expected %s" % (
                r.headers.get("Docker-Content-Digest"), a.digest))
    return 0


# ---------------------------------------------------------------- edge-containerd: the image, containerd

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
# The image's platform must be this machine's, or ctr finds no manifest to pull.
GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
    platform.machine(), platform.machine())


class HashingWriter:
    """A write-only file object that hashes what it passes on."""

    def __init__(self, out, h):
        self.out, self.h = out, h

    def write(self, b):
        self.h.update(b)
        return self.out.write(b)


class Image:
    """An image built here without tools: one layer per blob file (a gzip'd tar holding
    the file; the edge-containerd image has one, the run's blob as /blob.bin; the
    edge-stage image three, /layer-K.bin), an OCI config (its diff_ids are the tars'
    sha256) and an OCI manifest, all under WORKDIR/<dir>. `layer`, `size` and
    `layer_hex` are the first layer's: for edge-containerd F and the digest every
    node's copy is checked against; `blobs` are every blob a pull fetches (layers,
    then the config) and `total_bytes` their size plus the manifest's: the image's
    bytes (edge-stage's F)."""

    registry = "%s:%d" % (UP_IP, REG_PORT)

    def __init__(self, workdir, blobs, name=IMAGE_NAME, tag=IMAGE_TAG, dirname="image"):
        self.name, self.tag = name, tag
        self.ref = "%s/%s:%s" % (self.registry, name, tag)
        d = os.path.join(workdir, dirname)
        os.makedirs(d)
        layers, diff_ids = [], []
        for k, blob in enumerate(blobs):
            path = os.path.join(d, "layer-%d.tar.gz" % k)
            diff = hashlib.sha256()
            with open(path, "wb") as out, \
                    gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=1, mtime=0) as gz, \
                    tarfile.open(fileobj=HashingWriter(gz, diff), mode="w|", format=tarfile.USTAR_FORMAT) as tar, \
                    open(blob, "rb") as f:
                info = tarfile.TarInfo("blob.bin" if len(blobs) == 1 else "layer-%d.bin" % k)
                info.size, info.mode = os.path.getsize(blob), 0o644
                tar.addfile(info, f)
            layers.append((path, sha256_file(path), os.path.getsize(path)))
            diff_ids.append("sha256:" + diff.hexdigest())
        self.layer, self.layer_hex, self.size = layers[0]
        self.layers = layers
        config = {"architecture": GOARCH, "os": "linux", "config": {},
                  "rootfs": {"type": "layers", "diff_ids": diff_ids}}
        self.config, config_digest, config_size = self._write(d, "config.json", config)
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                               "size": config_size},
                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                "digest": "sha256:" + hexd, "size": n} for _, hexd, n in layers]}
        self.manifest, self.manifest_digest, manifest_size = self._write(d, "manifest.json", manifest)
        self.blobs = [(path, "sha256:" + hexd) for path, hexd, _ in layers] + [(self.config, config_digest)]
        self.total_bytes = sum(n for _, _, n in layers) + config_size + manifest_size

    @staticmethod
    def _write(d, name, obj):
        data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        path = os.path.join(d, name)
        with open(path, "wb") as f:
            f.write(data)
        return path, "sha256:" + hashlib.sha256(data).hexdigest(), len(data)

    def push(self, ns):
        base = "http://" + self.registry
        for path, digest in self.blobs:
            push_blob(ns, base, self.name, path, digest)
        push_blob(ns, base, self.name, self.manifest, self.manifest_digest, tag=self.tag, media_type=MANIFEST_TYPE)


def registry_hosts(hosts_dir, registry):
    """Writes HOSTS_DIR/REGISTRY/hosts.toml for containerd to pull from the plain-HTTP
    `registry` itself. containerd 1.6 refuses a hosts.toml without a [host] table, so
    the registry is both: its one host, and the fallback `server`."""
    d = os.path.join(hosts_dir, registry)
    os.makedirs(d)
    with open(os.path.join(d, "hosts.toml"), "w") as f:
        f.write('server = "http://%s"\n\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n'
                % (registry, registry))


class Containerd:
    """A real containerd (Debian's 1.6) on node i, one per system: config, root, state
    and sockets under the node's dir, started in the node's namespace, so
    127.0.0.1:5001 is that node's agent. CRI is off. While unpacking it mounts each
    snapshot under ROOT/tmpmounts, in the private mount namespace `ip netns exec`
    gives it. Its CPU counts like any process of the system (ctx.spawn)."""

    def __init__(self, ctx, i, hosts_dir):
        self.i, self.hosts_dir = i, hosts_dir
        d = os.path.join(ctx.sysdir, "n%d" % i, "containerd")
        os.makedirs(d)
        self.sock = os.path.join(d, "c.sock")
        self.root = os.path.join(d, "root")
        config = os.path.join(d, "config.toml")
        with open(config, "w") as f:
            f.write('version = 2\nroot = "%s"\nstate = "%s"\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                    '[grpc]\n  address = "%s"\n[ttrpc]\n  address = "%s.ttrpc"\n[debug]\n  address = ""\n'
                    '  level = "warn"\n[metrics]\n  address = ""\n[plugins."io.containerd.internal.v1.opt"]\n'
                    '  path = "%s"\n' % (self.root, os.path.join(d, "state"), self.sock, self.sock,
                                         os.path.join(d, "opt")))
        self.proc = ctx.spawn("containerd-n%d" % i, ctx.topo.ns(i), [CONTAINERD_BIN, "--config", config],
                              ctx.workdir, node=i)

    def ctr(self, *args):
        return sh([CTR_BIN, "-a", self.sock] + list(args))

    def wait_ready(self, timeout=60.0):
        end = time.monotonic() + timeout
        while subprocess.run([CTR_BIN, "-a", self.sock, "version"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, timeout=30).returncode != 0:
            if not self.proc.alive:
                raise Fail("containerd of node %d exited (%s) before it was ready; log: %s" % (
                    self.i, self.proc.rc, self.proc.tail()))
            if time.monotonic() > end:
                raise Fail("containerd of node %d not ready after %.0f s; log: %s" % (self.i, timeout, self.proc.tail()))
            time.sleep(0.1)

    def pull(self, ctx, ref, hosts_dir=None, name=None, counted=True):
        """`ctr images pull` of `ref` in the node's namespace (a Proc done at its exit 0).
        `counted`: one of the system's processes (its CPU counts); else a preparation."""
        spawn = ctx.spawn if counted else Proc
        return spawn(name or "ctr-n%d" % self.i, ctx.topo.ns(self.i),
                     [CTR_BIN, "-a", self.sock, "images", "pull", "--hosts-dir", hosts_dir or self.hosts_dir, ref],
                     ctx.workdir, node=self.i, done_on="exit")

    def content_path(self, hexdigest):
        return os.path.join(self.root, "io.containerd.content.v1.content", "blobs", "sha256", hexdigest)

    def check(self, ref):
        """None if `ctr images check` says `ref` is complete and unpacked, else why not."""
        try:
            out = self.ctr("images", "check")
        except Fail as e:
            return "ctr images check on node %d: %s" % (self.i, e)
        line = next((ln for ln in out.splitlines() if ln.split()[:1] == [ref]), None)
        if line is None:
            return "%s is not in `ctr images check` of node %d" % (ref, self.i)
        m = re.search(r"complete \((\d+)/(\d+)\)", line)
        if not m or m.group(1) != m.group(2) or line.split()[-1] != "true":
            return "node %d's image is not complete and unpacked: %s" % (self.i, " ".join(line.split()))
        return None


# ---------------------------------------------------------------- systems

class Ctx:
    """What a system needs to know about the run."""

    def __init__(self, topo, args, blob, digest, size, workdir, layout, timeout, image):
        self.topo, self.args, self.blob, self.digest, self.size = topo, args, blob, digest, size
        self.workdir, self.layout, self.timeout = workdir, layout, timeout
        self.image = image  # edge-containerd: the Image every node's containerd pulls; else None
        self.procs = []  # every process of the system under test, for CPU and teardown

    @property
    def downloaders(self):
        return list(range(1, self.topo.n + 1)) if self.layout == "edge" else list(range(2, self.topo.n + 1))

    def blob_url(self, host):
        return "http://%s:%d/v2/%s/blobs/sha256:%s" % (host, REG_PORT, REPO_NAME, self.digest)

    def spawn(self, *a, **kw):
        p = Proc(*a, **kw)
        self.procs.append(p)
        return p


class System:
    name = "?"
    # Why the system cannot back containerd's pulls (edge-containerd), or None.
    no_containerd = None

    def available(self, args):
        return True, ""

    def setup(self, ctx):
        """Before the common start: servers, seeds, trackers, agents."""

    def lease_holders(self, ctx):
        """Nodes fetching from upstream for the cluster (edge-killholder); none here."""
        return []

    def kill_tracker(self, ctx):
        """edge-trackerkill: stops the system's coordinator for good; returns whether
        there was one."""
        return False

    def launch(self, ctx, i, restart=False):
        """Starts node i's download; returns (procs, done_proc, output_path)."""
        raise NotImplementedError

    def start_containerds(self, ctx, hosts_dir):
        """edge-containerd: a containerd on every node, pulling with `hosts_dir`."""
        self.containerds = {i: Containerd(ctx, i, hosts_dir) for i in ctx.downloaders}
        for c in self.containerds.values():
            c.wait_ready()

    def ctr_pull(self, ctx, i):
        """edge-containerd: node i's `ctr images pull`; its copy is the layer in the
        content store."""
        c = self.containerds[i]
        p = c.pull(ctx, ctx.image.ref)
        return [c.proc, p], p, c.content_path(ctx.digest)

    def verify(self, ctx, i):
        """After the run, before teardown: why node i's finished copy is not usable, or
        None. The copy's sha256 is checked after teardown for every system."""
        if not ctx.image:
            return None
        why = self.containerds[i].check(ctx.image.ref)
        if why is None and len(ctx.image.blobs) > 2:
            # Several layers: every blob in the content store must hash right (the
            # first layer's is checked after teardown like every system's copy).
            for _, digest in ctx.image.blobs:
                path = self.containerds[i].content_path(digest.split(":", 1)[1])
                try:
                    good = sha256_file(path) == digest.split(":", 1)[1]
                except OSError as e:
                    return "node %d: cannot read %s: %s" % (i, path, e)
                if not good:
                    return "node %d: %s in the content store does not hash to its digest" % (i, digest)
        return why

    def teardown(self, ctx):
        stop_all(ctx.procs)
        if ctx.image:
            kill_containerds_under(ctx.sysdir)
            unmount_under(ctx.sysdir)


class Direct(System):
    """Every node GETs the blob from the registry at once (edge: upstream; incluster:
    a second registry on node 1 serving the same storage; edge-containerd: every
    node's containerd pulls the image from upstream)."""
    name = "direct"

    def setup(self, ctx):
        self.host = UP_IP
        self.extra = None
        if ctx.image:
            hosts = os.path.join(ctx.sysdir, "hosts")
            registry_hosts(hosts, ctx.image.registry)
            self.start_containerds(ctx, hosts)
        elif ctx.layout != "edge":
            self.extra = Registry(ctx.topo, ctx.topo.ns(1), ctx.topo.ip(1), ctx.reg_root, "node1")
            self.extra.start(ctx.workdir)
            self.extra.proc.side = "cluster"
            self.extra.proc.node = 1
            ctx.procs.append(self.extra.proc)
            self.host = ctx.topo.ip(1)

    def launch(self, ctx, i, restart=False):
        if ctx.image:
            return self.ctr_pull(ctx, i)
        out = os.path.join(ctx.sysdir, "n%d" % i, "blob")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        argv = ["curl", "-sS", "--fail", "--max-time", str(int(ctx.timeout) + 5), "-o", out]
        if restart:
            argv += ["-C", "-"]
        p = ctx.spawn("curl-n%d%s" % (i, "-r" if restart else ""), ctx.topo.ns(i), argv + [ctx.blob_url(self.host)],
                      ctx.workdir, node=i, done_on="exit")
        return [p], p, out


class Swarm(System):
    """The real binary. Edge: an agent (registry mirror) on every node fetches from the
    upstream registry (edge-containerd: the node's containerd pulls through it, as
    configured by `swarm containerd-config`); incluster: `swarm seed` on node 1,
    `swarm pull` on the others."""
    name = "swarm"
    agent_mode = True

    def via_agent(self, ctx):
        return self.agent_mode and ctx.layout == "edge"

    def _bin(self, args):
        return os.path.abspath(args.swarm_bin)

    def available(self, args):
        b = self._bin(args)
        if not os.access(b, os.X_OK):
            return False, "swarm binary not found at %s (cargo build --release)" % b
        return True, ""

    def agent_available(self, args):
        r = subprocess.run([self._bin(args), "agent", "--help"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return r.returncode == 0

    # The nodes running a tracker; every client gets the whole list (`--tracker a,b,c`).
    tracker_nodes = (1,)

    def _common(self, ctx, i):
        addr = UP_IP if i == 0 else ctx.topo.ip(i)
        trackers = ",".join("%s:%d" % (ctx.topo.ip(t), TRACKER_PORT) for t in self.tracker_nodes)
        return ["--tracker", trackers,
                "--listen", "%s:%d" % (addr, PEER_PORT),
                "--token-file", self.token]

    def setup(self, ctx):
        b = self._bin(ctx.args)
        if self.via_agent(ctx) and not self.agent_available(ctx.args):
            raise Unavailable("not available: swarm agent missing (`%s agent --help` failed)" % b)
        self.token = os.path.join(ctx.sysdir, "token")
        with open(self.token, "w") as f:
            f.write(sh([b, "token"]).strip() + "\n")
        os.chmod(self.token, 0o600)
        flow = getattr(ctx, "flow", None)
        level = "warn,swarm_peer::agent=info" if getattr(ctx, "scenario", "") == "edge-killholder" else "warn"
        if flow:
            # The flows find lease grants and holders in the logs, and a failed flow
            # needs them to be explained.
            level = "warn,swarm_peer=info,swarm_tracker=info"
            self.tracker_nodes = tuple(flow.trackers_on)
        self.env = dict(os.environ, SWARM_LOG=os.environ.get("SWARM_LOG", level))
        self.trackers = {}
        for t in self.tracker_nodes:
            self.start_tracker(ctx, t)
        self.tracker = self.trackers[self.tracker_nodes[0]]
        tracker_started = time.monotonic()
        self.agents = {}
        if self.via_agent(ctx):
            for i in ctx.downloaders:
                self._start_agent(ctx, i)
            if ctx.image:
                hosts = os.path.join(ctx.sysdir, "hosts")
                sh([b, "containerd-config", "--mirror", "http://127.0.0.1:%d" % MIRROR_PORT,
                    "--registry", ctx.image.registry, "--plain-http", ctx.image.registry, "--dir", hosts])
                self.start_containerds(ctx, hosts)
            # A tracker grants no upstream lease during its first seconds (holders of a
            # blob may re-assert theirs: `swarm_core::tracker::LEASE_GRACE`, 6 s). The
            # pulls start after it: the figures are about distribution, not start-up.
            time.sleep(max(0.0, tracker_started + TRACKER_LEASE_GRACE_S - time.monotonic()))
        else:
            # Incluster: node 1 seeds. swarm-seed on edge: the upstream host seeds
            # (like libtorrent's edge seed), nodes pull.
            src = 0 if ctx.layout == "edge" else 1
            seed = ctx.spawn("seed-up" if src == 0 else "seed-n1", ctx.topo.up if src == 0 else ctx.topo.ns(1),
                             [b, "seed", ctx.blob, "--data-dir", os.path.join(ctx.sysdir, "seed-store")]
                             + self._common(ctx, src), ctx.workdir, node=src or None,
                             side="upstream" if src == 0 else "cluster", env=self.env)
            line = seed.wait_line(lambda s: s.startswith("sha256:"), 120)
            if line.strip() != "sha256:" + ctx.digest:
                raise Fail("swarm seed printed %s, expected sha256:%s" % (line.strip(), ctx.digest))

    def kill_tracker(self, ctx):
        self.tracker.kill()
        return True

    def start_tracker(self, ctx, i, restart=False):
        """`swarm tracker` on node i (the first one on node 1 is named `tracker`)."""
        b = self._bin(ctx.args)
        name = "tracker" if i == 1 and not restart else "tracker-n%d%s" % (i, "-r" if restart else "")
        tr = ctx.spawn(name, ctx.topo.ns(i),
                       [b, "tracker", "--listen", "%s:%d" % (ctx.topo.ip(i), TRACKER_PORT), "--token-file", self.token]
                       + (ctx.flow.tracker_args() if ctx.flow else []),
                       ctx.workdir, node=i, env=self.env)
        wait_listen(ctx.topo.ns(i), "udp", TRACKER_PORT, proc=tr)
        self.trackers[i] = tr
        return tr

    def arbiter(self, digest):
        """The node whose tracker logged an upstream lease grant for `digest` (the
        blob's arbiter among the replicas), or None."""
        for i, p in sorted(self.trackers.items()):
            try:
                with open(p.log_path, "rb") as f:
                    f.seek(p.log_start)
                    for line in f:
                        # The grant names the blob by its first 12 hex digits.
                        if b"upstream lease granted" in line and digest[:12].encode() in line:
                            return i
            except OSError:
                pass
        return None

    def fetch(self, ctx, i, repo, digest, out, timeout=120):
        """Node i's curl of `repo`@`digest` through its agent's mirror, outside the
        measured run (a flow's preparation); raises Fail unless it succeeds."""
        url = "http://127.0.0.1:%d/v2/%s/blobs/sha256:%s?ns=%s:%d" % (MIRROR_PORT, repo, digest, UP_IP, REG_PORT)
        p = ctx.spawn("prep-curl-n%d-%s" % (i, digest[:8]), ctx.topo.ns(i),
                      ["curl", "-sS", "--fail", "--max-time", str(int(timeout)), "-o", out, url], ctx.workdir, node=i)
        if not p.join(timeout + 5) or p.rc != 0:
            raise Fail("node %d could not fetch sha256:%s through its agent (curl %s): %s; agent: %s" % (
                i, digest[:16], p.rc, p.tail(), self.agents[i].tail()))
        if sha256_file(out) != digest:
            raise Fail("node %d's agent served wrong bytes for sha256:%s" % (i, digest[:16]))

    def agent_log_count(self, needle, nodes=None):
        """Lines containing `needle` in the logs of the current agents (of `nodes`)."""
        n = 0
        for i, p in sorted(getattr(self, "agents", {}).items()):
            if nodes is not None and i not in nodes:
                continue
            try:
                with open(p.log_path, "rb") as f:
                    f.seek(p.log_start)
                    n += sum(1 for line in f if needle in line)
            except OSError:
                pass
        return n

    def lease_holders(self, ctx):
        """Nodes whose agent logged that it fetches from upstream as the lease holder."""
        found = []
        for i, p in sorted(getattr(self, "agents", {}).items()):
            try:
                with open(p.log_path, "rb") as f:
                    f.seek(p.log_start)
                    if b"as the lease holder" in f.read():
                        found.append(i)
            except OSError:
                pass
        return found

    def _start_agent(self, ctx, i, restart=False):
        b = self._bin(ctx.args)
        data = os.path.join(ctx.sysdir, "n%d" % i, "agent")
        os.makedirs(data, exist_ok=True)
        argv = [b, "agent", "--mirror", "127.0.0.1:%d" % MIRROR_PORT, "--data-dir", data,
                "--plain-http", "%s:%d" % (UP_IP, REG_PORT)] + self._common(ctx, i) + list(ctx.args.agent_arg or [])
        p = ctx.spawn("agent-n%d%s" % (i, "-r" if restart else ""), ctx.topo.ns(i), argv, ctx.workdir, node=i,
                      env=self.env)
        wait_listen(ctx.topo.ns(i), "tcp", MIRROR_PORT, proc=p)
        self.agents[i] = p
        return p

    def launch(self, ctx, i, restart=False):
        if self.via_agent(ctx) and ctx.image:
            procs, p, out = self.ctr_pull(ctx, i)
            return [self.agents[i]] + procs, p, out
        b = self._bin(ctx.args)
        out = os.path.join(ctx.sysdir, "n%d" % i, "blob")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        if self.via_agent(ctx):
            procs = []
            if restart:
                procs.append(self._start_agent(ctx, i, restart=True))
            url = "http://127.0.0.1:%d/v2/%s/blobs/sha256:%s?ns=%s:%d" % (MIRROR_PORT, REPO_NAME, ctx.digest, UP_IP,
                                                                           REG_PORT)
            curl = ["curl", "-sS", "--fail", "--max-time", str(int(ctx.timeout) + 5), "-o", out]
            argv = curl + [url]
            flow = getattr(ctx, "flow", None)
            if flow and flow.fallback:
                # What containerd does with the hosts.toml of `swarm containerd-config`:
                # when the mirror fails, the registry itself (printing `fallback`).
                argv = ["sh", "-c", '%s || { echo fallback; %s; }' % (
                    shlex.join(argv), shlex.join(curl + [ctx.blob_url(UP_IP)]))]
            p = ctx.spawn("curl-n%d%s" % (i, "-r" if restart else ""), ctx.topo.ns(i), argv,
                          ctx.workdir, node=i, done_on="exit")
            procs.append(p)
            if not restart:
                procs.insert(0, self.agents[i])
            return procs, p, out
        argv = [b, "pull", "sha256:" + ctx.digest, "-o", out, "--json", "--linger", "%ds" % (int(ctx.timeout) + 30),
                "--timeout", "%ds" % (int(ctx.timeout) + 5)] + self._common(ctx, i)
        p = ctx.spawn("pull-n%d%s" % (i, "-r" if restart else ""), ctx.topo.ns(i), argv, ctx.workdir, node=i,
                      env=self.env, done_on=lambda s: s.lstrip().startswith("{"))
        return [p], p, out


class SwarmSeed(Swarm):
    """`swarm seed` + `swarm pull` in every scenario: on edge the seed runs on the
    upstream host, as libtorrent's does (no registry, no agent). Not the product's edge
    path (that is the agent's mirror), but the like-for-like comparison with libtorrent."""
    name = "swarm-seed"
    agent_mode = False
    no_containerd = "`swarm seed` and `swarm pull` are no registry; containerd pulls through the agent (swarm)"


class Libtorrent(System):
    """libtorrent 2.0.8 (Debian) through lt_driver.py: no tracker, no DHT/LSD/UPnP/NAT-PMP;
    every client is told every peer's address. Python start-up is excluded: leechers
    add the torrent when the common start is signalled on stdin."""
    name = "libtorrent"
    driver = os.path.join(HERE, "lt_driver.py")
    no_containerd = "libtorrent is no registry, and containerd pulls through a registry (mirror) API only"

    def available(self, args):
        r = subprocess.run([SYS_PY, "-c", "import libtorrent"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if r.returncode != 0:
            return False, "python3-libtorrent is not importable by %s" % SYS_PY
        return True, ""

    def setup(self, ctx):
        self.torrent = os.path.join(ctx.sysdir, "blob.torrent")
        out = sh([SYS_PY, self.driver, "create", ctx.blob, self.torrent, "--piece-size", str(ctx.args.lt_piece_size)],
                 timeout=120)
        self.meta = json.loads(out.strip().splitlines()[-1])
        if ctx.layout == "edge":
            self.seed_ns, self.seed_addr, side, node = ctx.topo.up, UP_IP, "upstream", None
        else:
            self.seed_ns, self.seed_addr, side, node = ctx.topo.ns(1), ctx.topo.ip(1), "cluster", 1
        seed = ctx.spawn("lt-seed", self.seed_ns,
                         [SYS_PY, self.driver, "seed", self.torrent, os.path.dirname(ctx.blob),
                          "--listen", "%s:%d" % (self.seed_addr, LT_PORT), "--timeout", str(int(ctx.timeout) + 30)]
                         + self._utp(ctx), ctx.workdir, side=side, node=node)
        seed.wait_line(lambda s: '"seeding"' in s, 60)
        wait_listen(self.seed_ns, "tcp", LT_PORT, proc=seed)
        # Leechers start now (Python + libtorrent start-up) and wait for the go line.
        self.ready = {}
        for i in ctx.downloaders:
            self.ready[i] = self._spawn(ctx, i, False)
        for i, p in self.ready.items():
            p.wait_line(lambda s: '"ready"' in s, 60)

    def _utp(self, ctx):
        return ["--utp"] if ctx.args.lt_utp else []

    def _spawn(self, ctx, i, restart):
        d = os.path.join(ctx.sysdir, "n%d" % i)
        os.makedirs(d, exist_ok=True)
        peers = ["%s:%d" % (self.seed_addr, LT_PORT)] + ["%s:%d" % (ctx.topo.ip(j), LT_PORT)
                                                          for j in ctx.downloaders if j != i]
        argv = [SYS_PY, self.driver, "leech", self.torrent, d, "--listen", "%s:%d" % (ctx.topo.ip(i), LT_PORT),
                "--wait-go", "--timeout", str(int(ctx.timeout) + 30)] + self._utp(ctx)
        for p in peers:
            argv += ["--peer", p]
        return ctx.spawn("lt-n%d%s" % (i, "-r" if restart else ""), ctx.topo.ns(i), argv, ctx.workdir, node=i,
                         stdin=True, done_on=lambda s: '"done"' in s)

    def launch(self, ctx, i, restart=False):
        out = os.path.join(ctx.sysdir, "n%d" % i, os.path.basename(ctx.blob))
        if restart:
            p = self._spawn(ctx, i, True)
            p.wait_line(lambda s: '"ready"' in s, 60)
        else:
            p = self.ready[i]
        p.write("go\n")
        return [p], p, out


class Unavailable(Exception):
    pass


SYSTEMS = {"direct": Direct, "swarm": Swarm, "swarm-seed": SwarmSeed, "libtorrent": Libtorrent}


# ---------------------------------------------------------------- one system, one scenario

# The tracker's lease grace after it starts (swarm_core::tracker::LEASE_GRACE), plus
# a margin.
TRACKER_LEASE_GRACE_S = 6.2

# scenario -> (layout, churn, containerd)
SCENARIOS = {"edge": ("edge", False, False), "incluster": ("incluster", False, False),
             "churn": ("incluster", True, False), "edge-churn": ("edge", True, False),
             "edge-containerd": ("edge", False, True), "edge-killholder": ("edge", True, False),
             "edge-trackerkill": ("edge", True, False), "edge-masterfirst": ("edge", False, False),
             "edge-flakyuplink": ("edge", False, False), "edge-replicakill": ("edge", False, False),
             "edge-knownpeer": ("edge", False, False), "edge-stage": ("edge", False, True),
             "edge-stagecap": ("edge", False, True)}
# edge-killholder: the churn kill hits the node holding the upstream lease (found in
# its agent's log; at --churn-at, or as soon as one logged it if none had by then)
# and nobody restarts; the others must take the lease over. Its
# simulator twin: swarm-sim --scenario edge --kill-holder-at <churn-at>.
# edge-trackerkill: the churn kill hits the tracker (for good) and no node; the pull
# must go on without it. Simulator twin: --tracker-down-at <churn-at>
# --tracker-down-for <longer than the run>.


# ---------------------------------------------------------------- flows: scripted resilience runs

class Flow:
    """A scripted edge run of swarm alone (the other systems have no agent, tracker or
    lease to test: their cells are "not applicable"). The run's loop calls `step`
    until the flow is `finished`; `step` may launch queued nodes (`launch(i)`), kill
    and restart swarm's processes, or cut the uplink. What happened and when goes in
    `events`, which the result takes as top-level fields."""
    trackers_on = (1,)    # nodes running `swarm tracker`
    fallback = False      # downloads fall back to the registry as containerd would
    min_nodes = 3

    def __init__(self, args):
        self.args = args
        self.events = {}
        self.finished = False
        self._sampled = 0.0
        self._sent = 0

    def measured(self, ctx):
        """The nodes whose downloads are timed and checked."""
        return ctx.downloaders

    def tracker_args(self):
        """Extra `swarm tracker` arguments."""
        return []

    def initial(self, ctx):
        """The nodes launched at the common start (the others are queued)."""
        return self.measured(ctx)

    def extra_time(self):
        """Seconds the flow adds to the system's time limit."""
        return 0.0

    def prepare(self, ctx, sw):
        """After the system's setup, before the common start."""

    def start(self, ctx, t0, up0):
        self.t0, self.up0 = t0, up0

    def sent(self, ctx):
        """Bytes the uplink carried since the start (sampled at most every 50 ms)."""
        now = time.monotonic()
        if now - self._sampled >= 0.05:
            self._sampled = now
            self._sent = ctx.topo.uplink_tx() - self.up0
        return self._sent

    def step(self, ctx, sw, now, nodes, launch):
        self.finished = True

    def finish(self, ctx, sw):
        """After the run, before teardown: facts from the logs."""

    def report(self, res, nodes, done_proc):
        """Adds the flow's figures to the result `res` and its `nodes` (at the end)."""


class MasterFirst(Flow):
    """The Kairos upgrade, master first (GUIDE.md section 7): node 1 (tracker and
    agent) pulls the image; then it reboots: tracker and agent SIGKILLed, down for
    --master-down s, while node 2 pulls (its agent knows nobody holding the blob, so
    it answers 503 and the pull falls back to the registry, as containerd's does); node
    1 comes back with the same data dir and a fresh tracker; then nodes 3..N pull one
    after another (`concurrency: 1`)."""
    fallback = True

    def __init__(self, args):
        super().__init__(args)
        self.stage = "master"

    def initial(self, ctx):
        return [1]

    def extra_time(self):
        return self.args.master_down

    def step(self, ctx, sw, now, nodes, launch):
        if self.stage == "master" and nodes[1]["status"] != "pending":
            # A real reboot comes after the upgrade's install steps, long after the
            # pull: node 1 goes down once its agent's store has the blob complete (the
            # response's last byte can precede the store's whole-digest check).
            marker = os.path.join(ctx.sysdir, "n1", "agent", "blobs", ctx.digest, "complete")
            if not os.path.exists(marker):
                if now > nodes[1]["done_s"] + 10.0:
                    raise Fail("node 1's agent has no complete copy 10 s after its pull ended (%s missing)" % marker)
                return
            self.events["master_complete_at_s"] = round(now, 4)
            sw.tracker.kill()
            sw.agents[1].kill()
            self.events["master_down_at_s"] = round(now, 4)
            log("master-first: node 1 (tracker and agent) down at %.2f s" % now)
            launch(2)
            self.stage = "down"
        elif (self.stage == "down" and nodes[2]["status"] != "pending"
              and now >= self.events["master_down_at_s"] + self.args.master_down):
            sw.tracker.join(5)
            sw.agents[1].join(5)
            sw.tracker = sw.start_tracker(ctx, 1, restart=True)
            sw._start_agent(ctx, 1, restart=True)
            self.events["master_back_at_s"] = round(time.monotonic() - self.t0, 4)
            log("master-first: node 1 back (same data dir, fresh tracker) at %.2f s" % self.events["master_back_at_s"])
            self.stage = 3
        if isinstance(self.stage, int):
            i = self.stage
            if i > ctx.topo.n:
                self.finished = True
            elif i == 3 or nodes[i - 1]["status"] != "pending":
                launch(i)
                self.stage = i + 1


class Staged(MasterFirst):
    """Issue 11's first target: `swarm stage` first, then the master-first upgrade
    through every node's real containerd. Before the start, the baseline: a
    docker-registry in each node's namespace (127.0.0.1:5000) gets a copy of the
    image (skopeo), and the node's containerd pulls it from there --baseline-pulls
    times (the image removed and its content garbage-collected after each). At the
    start `swarm stage IMAGE` runs in node 1's namespace and must exit 0; then the
    master-first flow: node 1's containerd pulls; tracker and agent of node 1 down
    for --master-down s while node 2's pulls; nodes 3..N one after another. The
    uplink is counted over all of it, staging included."""
    fallback = False  # containerd falls back to the registry by itself (hosts.toml)
    min_nodes = 2

    def __init__(self, args):
        super().__init__(args)
        self.stage = "stage"
        self.stager = None
        self.baseline = {}

    def initial(self, ctx):
        return []

    def extra_time(self):
        return self.args.master_down + STAGE_TIMEOUT_S

    def prepare(self, ctx, sw):
        img = ctx.image
        local = "127.0.0.1:%d" % REG_PORT
        hosts = os.path.join(ctx.sysdir, "hosts-local")
        registry_hosts(hosts, local)
        ref = "%s/%s:%s" % (local, img.name, img.tag)
        digests = [d for _, d in img.blobs]
        for i in ctx.downloaders:
            ns, c = ctx.topo.ns(i), sw.containerds[i]
            reg = Registry(ctx.topo, ns, "127.0.0.1", os.path.join(ctx.sysdir, "n%d" % i, "local-registry"),
                           "n%d-local" % i)
            reg.start(ctx.workdir)
            try:
                sh(["ip", "netns", "exec", ns, "skopeo", "copy", "--insecure-policy", "--src-tls-verify=false",
                    "--dest-tls-verify=false", "docker://" + img.ref, "docker://" + ref], timeout=600)
                head = sh(["ip", "netns", "exec", ns, "curl", "-sS", "--fail", "-I", "-H", "Accept: " + MANIFEST_TYPE,
                           "http://%s/v2/%s/manifests/%s" % (local, img.name, img.tag)])
                m = re.search(r"(?im)^docker-content-digest:\s*(\S+)", head)
                if not m or m.group(1) != img.manifest_digest:
                    raise Fail("node %d's local registry holds another manifest (%s) than upstream's %s" % (
                        i, m.group(1) if m else "none", img.manifest_digest))
                times = []
                for k in range(self.args.baseline_pulls):
                    p = c.pull(ctx, ref, hosts_dir=hosts, name="baseline-ctr-n%d-%d" % (i, k), counted=False)
                    if not p.join(300) or p.rc != 0:
                        raise Fail("node %d's containerd could not pull %s from its own registry (%s): %s; "
                                   "containerd: %s" % (i, ref, p.rc, p.tail(), c.proc.tail()))
                    times.append(round(p.exit_at - p.started_at, 4))
                    # Forget it (content and snapshots), so the staged pull fetches and
                    # unpacks everything again.
                    c.ctr("images", "rm", "--sync", ref)
                    left = [d for d in c.ctr("content", "ls", "-q").split() if d in digests]
                    snaps = [ln for ln in c.ctr("snapshots", "ls").splitlines()[1:] if ln.strip()]
                    if left or snaps:
                        raise Fail("node %d's containerd kept %s and %d snapshot(s) after `ctr images rm --sync`" % (
                            i, left, len(snaps)))
                self.baseline[i] = times
                log("edge-stage: node %d pulls the image from its own registry in %s s" % (i, times))
            finally:
                reg.stop()

    def step(self, ctx, sw, now, nodes, launch):
        if self.stage != "stage":
            return super().step(ctx, sw, now, nodes, launch)
        if self.staged(ctx, sw, now):
            self.stage = "master"
            launch(1)

    def staged(self, ctx, sw, now):
        """Runs `swarm stage` (started on the first call); True once it exited 0."""
        if self.stager is None:
            trackers = ",".join("%s:%d" % (ctx.topo.ip(t), TRACKER_PORT) for t in sw.tracker_nodes)
            self.stager = ctx.spawn("stage", ctx.topo.ns(1), [
                sw._bin(ctx.args), "stage", ctx.image.ref, "--tracker", trackers, "--token-file", sw.token,
                "--json", "--timeout", "%ds" % STAGE_TIMEOUT_S], ctx.workdir, node=1, env=sw.env)
            log("edge-stage: swarm stage %s started at %.2f s" % (ctx.image.ref, now))
            return False
        if self.stager.alive:
            return False
        p = self.stager
        self.events.update(stage_s=round(p.exit_at - p.started_at, 4), stage_rc=p.rc,
                           stage_uplink_bytes=ctx.topo.uplink_tx() - self.up0)
        text = "\n".join(line for _, line in p.lines)
        try:
            report = json.loads(text)
            self.events["stage_nodes"] = [{k: n.get(k) for k in ("name", "addr", "state", "blobs", "blobs_held",
                                                                 "bytes_held", "reason")} for n in report["nodes"]]
        except (ValueError, KeyError, TypeError):
            self.events["stage_nodes"] = None
        if p.rc != 0:
            raise Fail("swarm stage exited %s after %.2f s: %s | stderr: %s" % (
                p.rc, self.events["stage_s"], text[-1500:], p.tail()))
        log("edge-stage: staged in %.2f s (uplink %d bytes so far)" % (
            self.events["stage_s"], self.events["stage_uplink_bytes"]))
        return True

    def report(self, res, nodes, done_proc):
        ratios = []
        for i, st in nodes.items():
            base = self.baseline.get(i)
            p = done_proc.get(i)
            st["baseline_s"] = base
            st["baseline_median_s"] = round(statistics.median(base), 4) if base else None
            st["pull_s"] = round(p.done_at - p.started_at, 4) if p is not None and p.done_at is not None else None
            if st["pull_s"] is not None and st["baseline_median_s"]:
                st["pull_over_baseline"] = round(st["pull_s"] / st["baseline_median_s"], 4)
                ratios.append(st["pull_over_baseline"])
            else:
                st["pull_over_baseline"] = None
        res["baseline_pulls"] = self.args.baseline_pulls
        res["image_bytes"] = res["size_bytes"]
        res["uplink_over_image"] = res["uplink_ratio"]
        res["pull_over_baseline_max"] = max(ratios) if ratios else None


# Uplink samples during a capped stage: every 100 ms; the peak is taken over 1 s
# windows (issue 11: "the uplink rate measured over 1 s windows").
CAP_SAMPLE_S = 0.1
CAP_WINDOW_S = 1.0


# Runs inside the upstream namespace: its eth0 transmit counter with the time it was
# read (CLOCK_MONOTONIC, which every namespace shares), every CAP_SAMPLE_S, so the
# samples' times do not depend on how fast this script gets the CPU.
COUNTER_SAMPLER = """
import sys, time
period = float(sys.argv[1])
path = "/sys/class/net/eth0/statistics/tx_bytes"
while True:
    with open(path) as f:
        b = int(f.read())
    print("%.6f %d" % (time.monotonic(), b), flush=True)
    time.sleep(period)
"""


class CounterSampler:
    """The upstream namespace's eth0 tx counter, sampled by COUNTER_SAMPLER."""

    def __init__(self, topo):
        self.samples = []
        self.proc = subprocess.Popen(["ip", "netns", "exec", topo.up, "/usr/bin/python3", "-c", COUNTER_SAMPLER,
                                      str(CAP_SAMPLE_S)], stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            t, b = line.split()
            self.samples.append((float(t), int(b)))

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.thread.join(5)
        return list(self.samples)


def peak_window_rate(samples, window):
    """Highest rate in bytes/s over any span of at least `window` s between two
    samples `(t, bytes)` (the shortest such span from each sample), or None."""
    peak = None
    j = 0
    for i, (t, b) in enumerate(samples):
        j = max(j, i + 1)
        while j < len(samples) and samples[j][0] - t < window:
            j += 1
        if j == len(samples):
            break
        rate = (samples[j][1] - b) / (samples[j][0] - t)
        peak = rate if peak is None else max(peak, rate)
    return peak


class StagedCapped(Staged):
    """Issue 11's second target: the tracker runs with `--uplink-cap` (--stage-cap,
    default 40 Mbit/s) and `swarm stage IMAGE` puts the 3-layer image on every node
    (the layers are fetched from upstream by up to three lease holders at once, which
    share the cap). The uplink's transmit counter is sampled every 100 ms while the
    stage runs: `stage_peak_over_cap` is the highest rate over any 1 s window (bytes on
    the wire, Ethernet frames included) against the cap, `stage_over_f_cap` the
    staging time against F / cap. Then every node's containerd pulls the staged image
    at once (checked like any pull; nothing but tag lookups crosses the uplink)."""

    def __init__(self, args):
        super().__init__(args)
        self.samples = []
        self.sampler = None

    def start(self, ctx, t0, up0):
        super().start(ctx, t0, up0)
        self.sampler = CounterSampler(ctx.topo)

    def tracker_args(self):
        return ["--uplink-cap", "%dbit/s" % self.args.stage_cap]

    def extra_time(self):
        return STAGE_TIMEOUT_S

    def prepare(self, ctx, sw):
        pass

    def step(self, ctx, sw, now, nodes, launch):
        if self.stage != "stage":
            self.finished = True
            return
        if self.staged(ctx, sw, now):
            time.sleep(2 * CAP_SAMPLE_S)
            self.samples = self.sampler.stop()
            self.stage = "pulls"
            for i in self.measured(ctx):
                launch(i)
            self.finished = True

    def report(self, res, nodes, done_proc):
        cap = self.args.stage_cap / 8.0
        peak = peak_window_rate(self.samples, CAP_WINDOW_S)
        f = res["size_bytes"]
        res["image_bytes"] = f
        res["uplink_cap_bps"] = self.args.stage_cap
        res["uplink_samples"] = len(self.samples)
        res["stage_uplink_peak_bps"] = round(peak * 8) if peak is not None else None
        res["stage_peak_over_cap"] = round(peak / cap, 4) if peak is not None else None
        stage_s = self.events.get("stage_s")
        res["stage_over_f_cap"] = round(stage_s / (f / cap), 4) if stage_s is not None else None
        res["uplink_over_image"] = res["uplink_ratio"]
        # The uplink's bytes since the start, every sample: [s since the start, bytes].
        res["stage_uplink_series"] = [[round(t - self.t0, 3), b - self.up0] for t, b in self.samples]

    def finish(self, ctx, sw):
        if self.sampler is not None and self.sampler.proc.poll() is None:
            self.samples = self.sampler.stop()


class FlakyUplink(Flow):
    """An unreliable uplink in the middle of the blob: the upstream's TCP connections
    reset (`ss -K`, the kernel aborts them with an RST) when the uplink has carried
    25 % and 40 % of F, and the uplink down (the switch port towards upstream set
    down) for --outage s from 55 % of F. Every node pulls at once, as in edge."""
    # (fraction of F carried by the uplink, action)
    plan = ((0.25, "reset"), (0.40, "reset"), (0.55, "outage"))

    def __init__(self, args):
        super().__init__(args)
        self.next = 0
        self.events = {"resets": [], "outage_s": args.outage}

    def extra_time(self):
        return self.args.outage + 30.0

    def step(self, ctx, sw, now, nodes, launch):
        topo = ctx.topo
        if "outage_from_s" in self.events:
            if now >= self.events["outage_from_s"] + self.args.outage:
                sh(["ip", "-n", topo.sw, "link", "set", "pu", "up"])
                self.events["outage_to_s"] = round(now, 4)
                log("flaky uplink: uplink up again at %.2f s" % now)
                self.finished = True
            return
        sent = self.sent(ctx)
        fraction, action = self.plan[self.next]
        if sent < fraction * ctx.size:
            return
        if action == "reset":
            out = sh(["ip", "netns", "exec", topo.up, "ss", "-K", "-H", "-tn", "state", "established",
                      "( sport = :%d )" % REG_PORT])
            killed = [ln for ln in out.splitlines() if ln.strip()]
            self.events["resets"].append({"at_s": round(now, 4), "uplink_fraction": round(sent / ctx.size, 4),
                                          "connections": len(killed)})
            log("flaky uplink: reset %d upstream connection(s) at %.2f s (%.0f %% of F sent)" % (
                len(killed), now, 100.0 * sent / ctx.size))
        else:
            sh(["ip", "-n", topo.sw, "link", "set", "pu", "down"])
            self.events["outage_from_s"] = round(now, 4)
            self.events["outage_uplink_fraction"] = round(sent / ctx.size, 4)
            log("flaky uplink: uplink down at %.2f s (%.0f %% of F sent) for %g s" % (
                now, 100.0 * sent / ctx.size, self.args.outage))
        self.next += 1

    def finish(self, ctx, sw):
        # The lease holder's Range resumptions ("upstream blob resumed", one per
        # reconnection that brought bytes again).
        self.events["upstream_resumes"] = sw.agent_log_count(b"upstream blob resumed")


class ReplicaKill(Flow):
    """Three tracker replicas (nodes 1, 2, 3; every agent has all three in
    --tracker): once the uplink carried a third of F, the tracker that granted the
    blob's upstream lease (its arbiter, from the trackers' info logs) is SIGKILLed
    for good."""
    trackers_on = (1, 2, 3)

    def step(self, ctx, sw, now, nodes, launch):
        if self.sent(ctx) < ctx.size / 3.0:
            return
        node = sw.arbiter(ctx.digest)
        if node is None:
            if self._sent > 0.9 * ctx.size:
                self.events["arbiter_error"] = "no tracker logged an upstream lease grant for the blob"
                self.finished = True
            return
        sw.trackers[node].kill()
        self.events.update(tracker_killed_at_s=round(now, 4), killed_tracker_node=node,
                           killed_tracker="%s:%d" % (ctx.topo.ip(node), TRACKER_PORT),
                           killed_at_uplink_fraction=round(self._sent / ctx.size, 4))
        log("replica kill: killed the blob's arbiter, the tracker on node %d, at %.2f s" % (node, now))
        self.finished = True


class KnownPeer(Flow):
    """Peer exchange without a tracker. Before the start: node 2's agent pulls the blob
    (from upstream) and a 1 MiB warm-up blob; node 3's agent pulls the warm-up blob
    (from node 2, which it so learns and keeps in <data>/peers); the tracker is
    SIGKILLed for good; node 3's agent stops (SIGTERM) and starts again with the same
    data dir. Measured: node 3 pulls the blob, which it can get only from node 2."""
    WARMUP = 1 << 20

    def measured(self, ctx):
        return [3]

    def prepare(self, ctx, sw):
        warm = os.path.join(ctx.sysdir, "warmup.bin")
        warm_hex = make_blob(warm, self.WARMUP)
        push_blob(ctx.topo.up, "http://%s:%d" % (UP_IP, REG_PORT), REPO_NAME, warm, "sha256:" + warm_hex)
        prep = os.path.join(ctx.sysdir, "prep")
        os.makedirs(prep)
        sw.fetch(ctx, 2, REPO_NAME, ctx.digest, os.path.join(prep, "n2-blob"))
        sw.fetch(ctx, 2, REPO_NAME, warm_hex, os.path.join(prep, "n2-warmup"))
        sw.fetch(ctx, 3, REPO_NAME, warm_hex, os.path.join(prep, "n3-warmup"))
        sw.tracker.kill()
        sw.tracker.join(5)
        agent = sw.agents[3]
        stop_all([agent], grace=10.0)
        try:
            with open(os.path.join(ctx.sysdir, "n3", "agent", "peers")) as f:
                known = [ln.strip() for ln in f if ln.strip()]
        except OSError:
            known = []
        self.events.update(tracker_killed_before_start=True, known_peers=known,
                           holder="%s:%d" % (ctx.topo.ip(2), PEER_PORT))
        log("known peer: tracker dead, node 3's agent restarting; it knows %s" % (known or "nobody"))
        sw._start_agent(ctx, 3, restart=True)

    def finish(self, ctx, sw):
        self.events["from_known_peer"] = sw.agent_log_count(b"swarming with a peer known from before", [3]) > 0


FLOWS = {"edge-masterfirst": MasterFirst, "edge-stage": Staged, "edge-stagecap": StagedCapped,
         "edge-flakyuplink": FlakyUplink,
         "edge-replicakill": ReplicaKill, "edge-knownpeer": KnownPeer}


def scenario_tmin(topo, size, layout):
    if layout == "edge":
        n_down, u_s = topo.n, topo.uplink_bps
        ups = [topo.node_bps] * topo.n
    else:
        n_down, u_s = topo.n - 1, topo.node_bps
        ups = [topo.node_bps] * (topo.n - 1)
    tm, terms = t_min(size, n_down, u_s, ups, topo.node_down_bps)
    return tm, terms, n_down


def default_timeout(topo, size, layout):
    """Enough for a direct pull (the slowest honest system) with margin."""
    if layout == "edge":
        direct = topo.n * size * 8.0 / topo.uplink_bps
    else:
        direct = (topo.n - 1) * size * 8.0 / topo.node_bps
    return max(30.0, 1.5 * direct + 15.0)


def run_system(sysobj, topo, args, blob, digest, size, registry, scenario, workdir, repeat=0, image=None):
    """One system on one scenario. edge-containerd: `image` is what containerd pulls,
    and blob, digest, size are its layer's."""
    layout, churn, containerd = SCENARIOS[scenario]
    tm, terms, n_down = scenario_tmin(topo, size, layout)
    timeout = args.timeout or default_timeout(topo, size, layout)
    res = {"system": sysobj.name, "scenario": scenario, "repeat": repeat, "layout": layout, "status": "ok", "reason": "",
           "sim_scenario": "churn" if churn else {"edge": "edge", "incluster": "in-cluster"}[layout],
           "t_min_s": round(tm, 4),
           "t_min": dict({k: round(v, 4) for k, v in terms.items()}, t_min_s=round(tm, 4)),
           "n_downloaders": n_down, "size_bytes": size, "timeout_s": timeout}
    if containerd and sysobj.no_containerd:
        res.update(status="unavailable", reason="not applicable: " + sysobj.no_containerd)
        return res
    flow = FLOWS[scenario](args) if scenario in FLOWS else None
    if flow and sysobj.name != "swarm":
        res.update(status="unavailable", reason="not applicable: %s scripts swarm's agents and trackers" % scenario)
        return res
    if flow and topo.n < flow.min_nodes:
        raise Fail("%s needs --nodes %d or more" % (scenario, flow.min_nodes))
    if flow:
        timeout += flow.extra_time()
        res["timeout_s"] = timeout
    ok, why = sysobj.available(args)
    if not ok:
        res.update(status="unavailable", reason="not available: " + why)
        return res
    sysdir = os.path.join(workdir, "%s-%s-%d" % (sysobj.name, scenario, repeat))
    os.makedirs(sysdir)
    ctx = Ctx(topo, args, blob, digest, size, workdir, layout, timeout, image if containerd else None)
    ctx.sysdir = sysdir
    ctx.reg_root = registry.root
    ctx.scenario = scenario
    ctx.flow = flow
    measured = flow.measured(ctx) if flow else ctx.downloaders
    nodes = {i: {"node": i, "done_s": None, "status": "pending", "killed": False, "restarted": False,
                 "sha256_ok": None} for i in measured}
    done_proc, outputs, node_procs = {}, {}, {}
    churn_plan = None
    try:
        try:
            sysobj.setup(ctx)
        except Unavailable as e:
            res.update(status="unavailable", reason=str(e))
            return res
        if flow:
            flow.prepare(ctx, sysobj)
        time.sleep(0.2)
        up0 = topo.uplink_tx()
        snap0 = topo.snapshot()
        reg0 = registry.cpu_s() or 0.0
        if churn:
            k = args.churn_kill if args.churn_kill is not None else max(1, math.ceil(n_down / 4))
            victims = ctx.downloaders[-k:]
            at = args.churn_at if args.churn_at is not None else 0.5 * tm
            if scenario in ("edge-killholder", "edge-trackerkill"):
                victims = []
            churn_plan = {"victims": victims, "kill_at_s": at,
                          "restart": not args.no_restart and scenario not in ("edge-killholder", "edge-trackerkill"),
                          "restart_at_s": at + args.churn_down, "killed": False, "restarted_done": False}
        # CPU spent before the start (hashing by a seed, interpreter start-up) is not
        # part of the distribution: it is reported apart as cpu_setup_s.
        for p in ctx.procs:
            p.cpu_at_t0 = proc_cpu_s(p.pid) or 0.0
        t0 = time.monotonic()

        def launch(i):
            procs, dp, out = sysobj.launch(ctx, i)
            node_procs[i], done_proc[i], outputs[i] = procs, dp, out
            nodes[i]["launched_s"] = round(time.monotonic() - t0, 4)
            nodes[i]["status"] = "pending"

        first = flow.initial(ctx) if flow else measured
        if flow:
            flow.start(ctx, t0, up0)
        for i in measured:
            if i in first:
                launch(i)
            else:
                nodes[i]["status"] = "queued"
        log("%s/%s: started %d downloads" % (sysobj.name, scenario, len(first)))
        while True:
            now = time.monotonic() - t0
            for i, st in nodes.items():
                if st["status"] != "pending":
                    continue
                dp = done_proc[i]
                if dp.done_at is not None:
                    st["done_s"] = round(dp.done_at - t0, 4)
                    st["status"] = "done"
                elif not dp.alive and not dp.killed:
                    st["status"] = "failed"
                    st["error"] = "%s exited %s: %s" % (dp.name, dp.rc, dp.tail())
            holders = None
            if (churn_plan and not churn_plan["killed"] and now >= churn_plan["kill_at_s"]
                    and scenario == "edge-killholder"):
                # No agent logged the lease yet (a loaded machine): kill as soon as one
                # has, while anybody is still pulling.
                holders = sysobj.lease_holders(ctx)
                if not holders and any(st["status"] == "pending" for st in nodes.values()):
                    holders = "wait"
            if (churn_plan and not churn_plan["killed"] and now >= churn_plan["kill_at_s"]
                    and holders != "wait"):
                churn_plan["killed"] = True
                if scenario == "edge-killholder":
                    churn_plan["victims"] = holders
                    res["killed_holders"] = churn_plan["victims"]
                if scenario == "edge-trackerkill" and sysobj.kill_tracker(ctx):
                    res["tracker_killed_at_s"] = round(now, 4)
                    log("churn: killed the tracker at %.2f s" % now)
                for i in churn_plan["victims"]:
                    if nodes[i]["status"] == "pending":
                        for p in node_procs[i]:
                            p.kill()
                        nodes[i]["killed"] = True
                        nodes[i]["killed_at_s"] = round(now, 4)
                        nodes[i]["status"] = "killed"
                    else:
                        nodes[i]["killed"] = False
                        nodes[i]["note"] = "already done at the kill time"
                log("churn: killed nodes %s at %.2f s" % ([i for i in churn_plan["victims"] if nodes[i]["killed"]], now))
            if (churn_plan and churn_plan["killed"] and churn_plan["restart"] and not churn_plan["restarted_done"]
                    and now >= churn_plan["restart_at_s"]):
                churn_plan["restarted_done"] = True
                for i in churn_plan["victims"]:
                    if nodes[i]["killed"]:
                        for p in node_procs[i]:
                            p.join(5)
                        procs, dp, out = sysobj.launch(ctx, i, restart=True)
                        node_procs[i], done_proc[i] = procs, dp
                        nodes[i]["restarted"] = True
                        nodes[i]["restarted_at_s"] = round(time.monotonic() - t0, 4)
                        nodes[i]["status"] = "pending"
                log("churn: restarted the killed nodes at %.2f s" % (time.monotonic() - t0))
            if flow and not flow.finished:
                flow.step(ctx, sysobj, now, nodes, launch)
            churn_pending = churn_plan and (not churn_plan["killed"] or
                                            (churn_plan["restart"] and not churn_plan["restarted_done"]))
            if flow and not flow.finished:
                churn_pending = True
            if not churn_pending and all(st["status"] not in ("pending", "queued") for st in nodes.values()):
                break
            if now > timeout:
                for st in nodes.values():
                    if st["status"] == "pending":
                        st["status"] = "timeout"
                    elif st["status"] == "queued":
                        st["status"] = "not started"
                break
            time.sleep(0.01)
        wall = time.monotonic() - t0
        up1 = topo.uplink_tx()
        snap1 = topo.snapshot()
        reg1 = registry.cpu_s() or reg0
        if flow:
            flow.finish(ctx, sysobj)
        for i, st in nodes.items():
            why = sysobj.verify(ctx, i) if st["status"] == "done" else None
            if why:
                st["status"] = "incomplete"
                st["error"] = why
    except Fail as e:
        res.update(status="failed", reason=str(e))
        return res
    finally:
        sysobj.teardown(ctx)
    # Verify every copy.
    for i, st in nodes.items():
        if st["status"] == "done":
            path = outputs[i]
            try:
                good = sha256_file(path) == digest
            except OSError as e:
                good = False
                st["error"] = "cannot read %s: %s" % (path, e)
            st["sha256_ok"] = good
            if not good:
                st["status"] = "corrupt"
        st["tx_bytes"] = snap1[i][0] - snap0[i][0]
        st["rx_bytes"] = snap1[i][1] - snap0[i][1]
    stayers = [st for st in nodes.values() if not st["killed"]]
    restarted = [st for st in nodes.values() if st["restarted"]]
    times = [st["done_s"] for st in stayers if st["status"] == "done"]
    bad = [st for st in stayers + restarted if st["status"] != "done"]
    delivered = sum(1 for st in nodes.values() if st["status"] == "done") * size
    cpu_cluster = sum((p.cpu_s or 0.0) - p.cpu_at_t0 for p in ctx.procs if p.side == "cluster")
    cpu_up_sys = sum((p.cpu_s or 0.0) - p.cpu_at_t0 for p in ctx.procs if p.side == "upstream")
    cpu_setup = sum(p.cpu_at_t0 for p in ctx.procs)
    cpu_registry = max(0.0, reg1 - reg0)
    cpu_total = cpu_cluster + cpu_up_sys + cpu_registry
    uplink = up1 - up0
    done_nodes = [st for st in nodes.values() if st["status"] == "done"]
    rx_ratio = (sum(st["rx_bytes"] for st in done_nodes) / (len(done_nodes) * size)) if done_nodes else None
    res.update({
        "nodes": [nodes[i] for i in sorted(nodes)],
        "wall_s": round(wall, 4),
        "last_s": max(times) if times else None,
        "median_s": round(percentile(times, 50), 4) if times else None,
        "p90_s": round(percentile(times, 90), 4) if times else None,
        "uplink_bytes": uplink,
        "uplink_ratio": round(uplink / size, 4),
        "delivered_bytes": delivered,
        "cpu_s": round(cpu_total, 4),
        "cpu_s_cluster": round(cpu_cluster, 4),
        "cpu_s_upstream": round(cpu_up_sys + cpu_registry, 4),
        "cpu_s_registry": round(cpu_registry, 4),
        "cpu_s_setup": round(cpu_setup, 4),
        "cpu_s_per_gb": round(cpu_total / (delivered / 1e9), 3) if delivered else None,
        "cpu_s_per_gb_cluster": round(cpu_cluster / (delivered / 1e9), 3) if delivered else None,
        "processes": [p.summary() for p in ctx.procs],
        # Frame bytes each finished node received / F: 1.0x plus headers is ideal,
        # more means duplicate or wasted transfers.
        "node_rx_ratio": round(rx_ratio, 4) if rx_ratio is not None else None,
        # All the system's CPU spread over every core: below this no run can finish
        # on this machine, whatever the network. Close to last_s = CPU-bound here.
        "cpu_floor_s": round(cpu_total / (os.cpu_count() or 1), 4),
    })
    res["ratio"] = round(res["last_s"] / tm, 4) if res["last_s"] is not None else None
    # swarm-sim's names for the same figures.
    res["last_over_t_min"] = res["ratio"]
    res["median_over_t_min"] = round(res["median_s"] / tm, 4) if times else None
    res["p90_over_t_min"] = round(res["p90_s"] / tm, 4) if times else None
    res["uplink_over_f"] = res["uplink_ratio"]
    counted = [st for st in nodes.values() if not st["killed"] or st["restarted"]]
    res["received_over_nf"] = round(sum(st["rx_bytes"] for st in counted) / (size * len(counted)), 4) if counted else None
    if restarted:
        rt = [st["done_s"] for st in restarted if st["status"] == "done"]
        res["restarted_last_s"] = max(rt) if rt else None
    if churn_plan:
        res["churn"] = {k: v for k, v in churn_plan.items() if k in ("victims", "kill_at_s", "restart", "restart_at_s")}
    if flow:
        res.update(flow.events)
        flow.report(res, nodes, done_proc)
        if flow.fallback:
            for i, st in nodes.items():
                st["fell_back"] = i in done_proc and any(line == "fallback" for _, line in done_proc[i].lines)
    if sysobj.name == "libtorrent":
        res["lt_piece_length"] = sysobj.meta.get("piece_length")
    if bad:
        res["status"] = "failed"
        res["reason"] = "; ".join("node %d: %s%s" % (st["node"], st["status"],
                                                      (" (" + st["error"] + ")") if st.get("error") else "")
                                  for st in bad)
        # Keep logs of failed processes in the JSON: the work dir is removed.
        res["logs"] = {p.name: p.tail(12) for p in ctx.procs if (p.rc not in (0, None, -15) or p.name.startswith(("seed", "tracker", "containerd")))}
    # Free disk for the next system.
    shutil.rmtree(sysdir, ignore_errors=True)
    return res


# ---------------------------------------------------------------- driver

_active_topos = []


def _on_signal(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def _on_alarm(signum, frame):
    raise KeyboardInterrupt("overall time limit reached")


def make_blob(path, size):
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            b = os.urandom(min(left, 1 << 20))
            f.write(b)
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def preflight(args):
    if os.geteuid() != 0:
        raise Fail("needs root (network namespaces, tc)")
    for tool in ("ip", "tc", "ss", "curl"):
        if not shutil.which(tool):
            raise Fail("%s not found (apt-get install iproute2 curl)" % tool)
    if not os.access(REGISTRY_BIN, os.X_OK):
        raise Fail("%s not found (apt-get install docker-registry)" % REGISTRY_BIN)


def run(args):
    preflight(args)
    scenarios = [s.strip() for s in args.scenario.split(",") if s.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in scenarios:
        if s not in SCENARIOS:
            raise Fail("unknown scenario %r (%s)" % (s, ", ".join(SCENARIOS)))
    with_containerd = any(SCENARIOS[s][2] for s in scenarios)
    one_layer = any(SCENARIOS[s][2] and s not in STAGE_SCENARIOS for s in scenarios)
    if with_containerd and not (os.access(CONTAINERD_BIN, os.X_OK) and os.access(CTR_BIN, os.X_OK)):
        raise Fail("edge-containerd needs %s and %s (apt-get install containerd)" % (CONTAINERD_BIN, CTR_BIN))
    if "edge-stage" in scenarios and not shutil.which("skopeo"):
        raise Fail("edge-stage copies the image to each node's registry with skopeo (apt-get install skopeo)")
    for s in systems:
        if s not in SYSTEMS:
            raise Fail("unknown system %r (%s)" % (s, ", ".join(SYSTEMS)))
    size = args.size
    tag = str(os.getpid())
    workdir = os.path.join(args.workdir, "%srun-%s" % (PREFIX, tag))
    os.makedirs(workdir)
    topo = Topology(tag, args.nodes, args.uplink, args.node_rate, args.node_down, args.tbf_burst_ms,
                    args.tbf_latency_ms, workdir)
    _active_topos.append(topo)
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    budget = args.max_runtime or (sum(
        (args.timeout or default_timeout(topo, size, SCENARIOS[sc][0])) + 40 for sc in scenarios) * len(systems) * args.repeat + 60)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(int(budget))
    started = time.time()
    results = []
    registry = None
    calib = None
    try:
        log("topology %s: %d nodes, uplink %s, nodes %s up / %s down" % (
            tag, args.nodes, human_rate(args.uplink), human_rate(args.node_rate),
            human_rate(args.node_down) if args.node_down else "unshaped"))
        topo.create()
        blob = os.path.join(workdir, "blob.bin")
        digest = make_blob(blob, size)
        log("blob %s, sha256:%s" % (human_size(size), digest[:16]))
        registry = Registry(topo, topo.up, UP_IP, os.path.join(workdir, "registry"), "upstream")
        registry.start(workdir)
        topo.check_reachability()
        push_blob(topo.up, "http://%s:%d" % (UP_IP, REG_PORT), REPO_NAME, blob, "sha256:" + digest)
        image = stage_image = None
        if one_layer:
            image = Image(workdir, [blob])
            image.push(topo.up)
            log("image %s: one layer of %d bytes (F), sha256:%s" % (image.ref, image.size, image.layer_hex[:16]))
        if any(s in STAGE_SCENARIOS for s in scenarios):
            parts = []
            for k, share in enumerate(STAGE_LAYER_SHARES):
                parts.append(os.path.join(workdir, "stage-layer-%d.bin" % k))
                make_blob(parts[-1], max(1, int(size * share)))
            stage_image = Image(workdir, parts, name=STAGE_IMAGE_NAME, dirname="stage-image")
            stage_image.push(topo.up)
            log("image %s: %d layers, %d bytes with config and manifest (F)" % (
                stage_image.ref, len(stage_image.layers), stage_image.total_bytes))
        if args.calibrate:
            calib = calibrate(topo)
            log("calibration: %s" % json.dumps(calib))
        for sc in scenarios:
            for k in range(args.repeat):
                for name in systems:
                    log("running %s / %s%s" % (name, sc, " (repeat %d)" % (k + 1) if args.repeat > 1 else ""))
                    img = stage_image if sc in STAGE_SCENARIOS else image
                    if sc in STAGE_SCENARIOS:
                        payload = (img.layer, img.layer_hex, img.total_bytes)
                    elif SCENARIOS[sc][2]:
                        payload = (img.layer, img.layer_hex, img.size)
                    else:
                        payload = (blob, digest, size)
                    r = run_system(SYSTEMS[name](), topo, args, *payload, registry, sc, workdir, k, image=img)
                    results.append(r)
                    log("%s / %s: %s %s" % (name, sc, r["status"], r.get("reason", "")[:300]))
                    if r.get("last_s") is not None:
                        log("  last %.2f s (%.2fx T_min), uplink %.2fx F" % (r["last_s"], r["ratio"], r["uplink_ratio"]))
    finally:
        signal.alarm(0)
        if registry:
            registry.stop()
        topo.destroy()
        _active_topos.remove(topo)
        kill_containerds_under(workdir)
        unmount_under(workdir)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        for s, h in old.items():
            signal.signal(s, h)
    doc = {
        "schema": SCHEMA,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 2),
        "params": {
            "nodes": args.nodes, "size_bytes": size, "uplink_bps": args.uplink, "node_rate_bps": args.node_rate,
            "node_down_bps": args.node_down, "scenarios": scenarios, "systems": systems,
            "tbf": {"burst_ms": args.tbf_burst_ms, "latency_ms": args.tbf_latency_ms, "commands": topo.tc_commands},
            "churn": {"kill": args.churn_kill, "at_s": args.churn_at, "down_s": args.churn_down,
                      "restart": not args.no_restart},
            "swarm_bin": os.path.abspath(args.swarm_bin), "swarm_version": swarm_version(args.swarm_bin),
            "libtorrent_version": lt_version(), "lt_utp": args.lt_utp,
        },
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(), "hostname": socket.gethostname(),
                 "loadavg_at_end": os.getloadavg(),
                 "note": "every emulated node shares this machine's cores, so CPU-bound runs vary from run to run"},
        "calibration": calib,
        "results": results,
    }
    return doc


def swarm_version(b):
    try:
        return sh([os.path.abspath(b), "--version"], timeout=10).strip()
    except Exception:  # noqa: BLE001 - informational only
        return None


def lt_version():
    try:
        return sh([SYS_PY, "-c", "import libtorrent; print(libtorrent.version)"], timeout=20).strip()
    except Exception:  # noqa: BLE001
        return None


def fmt(v, spec="%.2f"):
    return "-" if v is None else spec % v


def print_table(doc, out=sys.stdout):
    p = doc["params"]
    out.write("\nswarm netns benchmark: %d nodes, blob %s, uplink %s, nodes %s up / %s down\n" % (
        p["nodes"], human_size(p["size_bytes"]), human_rate(p["uplink_bps"]), human_rate(p["node_rate_bps"]),
        human_rate(p["node_down_bps"]) if p["node_down_bps"] else "unshaped"))
    cal = doc.get("calibration")
    if cal and cal.get("status") == "ok":
        out.write("fabric (iperf3 TCP): all nodes sending at once >= %.0f%% of the node rate each, uplink %.0f%% of its rate\n"
                  % (100 * (cal["ring_min_fraction"] or 0), 100 * (cal["uplink_fraction"] or 0)))
    hdr = ("%-15s %-10s %-6s %8s %8s %8s %7s %7s %9s %7s %9s  %s" %
           ("scenario", "system", "nodes", "last s", "median", "p90", "T_min", "xT_min", "uplink xF", "rx xF",
            "CPU s/GB", "status"))
    out.write(hdr + "\n" + "-" * len(hdr) + "\n")
    for r in doc["results"]:
        nodes = r.get("nodes") or []
        ok = sum(1 for n in nodes if n["status"] == "done" and not n["killed"])
        stay = sum(1 for n in nodes if not n["killed"])
        status = r["status"] if r["status"] == "ok" else "%s: %s" % (r["status"], r["reason"][:90]) \
            if r["status"] != "unavailable" else r["reason"]
        if r.get("restarted_last_s") is not None:
            status += " (restarted nodes last %.2f s)" % r["restarted_last_s"]
        out.write("%-15s %-10s %-6s %8s %8s %8s %7s %7s %9s %7s %9s  %s\n" % (
            r["scenario"], r["system"], "%d/%d" % (ok, stay) if nodes else "-",
            fmt(r.get("last_s")), fmt(r.get("median_s")), fmt(r.get("p90_s")), fmt(r.get("t_min_s")),
            fmt(r.get("ratio")), fmt(r.get("uplink_ratio")), fmt(r.get("node_rx_ratio")),
            fmt(r.get("cpu_s_per_gb"), "%.1f"), status))
    out.write("T_min = max(F/u_s, F/d_min, N*F/(u_s+sum u_i)) from the tbf rates. uplink xF = upstream eth0 tx bytes\n"
              "(frames, headers included) / F. rx xF = mean bytes received per finished node / F. CPU s/GB = user+sys\n"
              "of all the system's processes from the start (registry included) per 10^9 bytes delivered.\n")


# ---------------------------------------------------------------- cleanup and selftest

def cleanup(force=False, quiet=False):
    removed = []
    for ns in netns_list():
        if not ns.startswith(PREFIX):
            continue
        owner = ns[len(PREFIX):].split("-")[0]
        if not force and owner.isdigit() and int(owner) != os.getpid() and _is_emulate(int(owner)):
            if not quiet:
                log("skipping %s: its run (pid %s) is still going (--force to remove anyway)" % (ns, owner))
            continue
        kill_ns_pids(ns)
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        removed.append(ns)
    for d in os.listdir("/tmp"):
        if d.startswith(PREFIX + "run-"):
            owner = d[len(PREFIX + "run-"):]
            if not force and owner.isdigit() and _is_emulate(int(owner)):
                continue
            path = os.path.join("/tmp", d)
            kill_containerds_under(path)
            removed += ["mount " + mp for mp in unmount_under(path)]
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if not quiet:
        log("removed %d leftovers%s" % (len(removed), (": " + ", ".join(removed)) if removed else ""))
    return removed


def _is_emulate(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return b"emulate.py" in f.read()
    except OSError:
        return False


def selftest(args):
    """N=3, 4 MiB, incluster: direct + swarm (+ libtorrent). Exit 0 on success, 1 on
    failure, 77 when the machine cannot run it (not root, tools missing)."""
    try:
        preflight(args)
    except Fail as e:
        log("selftest skipped: %s" % e)
        return 77
    args.nodes, args.size, args.scenario, args.repeat = 3, 4 << 20, "incluster", 1
    systems = ["direct", "swarm"]
    if Libtorrent().available(args)[0]:
        systems.append("libtorrent")
    args.systems = ",".join(systems)
    args.timeout = args.timeout or 25.0
    args.max_runtime = 110
    doc = run(args)
    print_table(doc)
    if args.json:
        write_json(doc, args.json)
    problems = []
    for r in doc["results"]:
        if r["status"] != "ok":
            problems.append("%s: %s %s" % (r["system"], r["status"], r["reason"]))
            continue
        if any(not n["sha256_ok"] for n in r["nodes"]):
            problems.append("%s: a copy failed sha256" % r["system"])
        if r["uplink_ratio"] > 0.05:
            problems.append("%s: incluster moved %.2fx the blob over the uplink" % (r["system"], r["uplink_ratio"]))
        if not r["ratio"] or r["ratio"] < 0.8:
            problems.append("%s: faster than the theoretical minimum (%.2fx): shaping is not working" % (
                r["system"], r["ratio"] or 0))
    left = [ns for ns in netns_list() if ns.startswith(PREFIX + str(os.getpid()))]
    if left:
        problems.append("namespaces left behind: %s" % left)
    for p in problems:
        log("selftest FAILED: " + p)
    n_ok = len(doc["results"]) - len({p.split(":")[0] for p in problems})
    print("selftest: %d passed, %d failed" % (n_ok, len(doc["results"]) - n_ok))
    return 1 if problems else 0


def write_json(doc, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--swarm-bin", default=os.path.join(REPO, "target", "release", "swarm"),
                       help="the swarm binary (default: target/release/swarm of this repo)")
        p.add_argument("--uplink", type=parse_rate, default=parse_rate("100mbit"), help="upstream egress rate")
        p.add_argument("--node-rate", type=parse_rate, default=parse_rate("200mbit"), help="each node's upload rate")
        p.add_argument("--node-down", type=lambda s: 0 if s in ("0", "none") else parse_rate(s), default=None,
                       help="each node's download rate, shaped on the bridge port (default: --node-rate; none = unshaped)")
        p.add_argument("--tbf-burst-ms", type=float, default=10.0, help="tbf bucket size in ms at the rate (min 16 MTUs)")
        p.add_argument("--tbf-latency-ms", type=int, default=50, help="tbf queue length in ms")
        p.add_argument("--timeout", type=float, default=None, help="per system and scenario, seconds "
                       "(default: 1.5x a direct pull's theoretical time + 15 s, at least 30 s)")
        p.add_argument("--max-runtime", type=float, default=None, help="hard limit for the whole invocation, seconds")
        p.add_argument("--churn-kill", type=int, default=None, help="churn: nodes killed (default: a quarter)")
        p.add_argument("--churn-at", type=float, default=None, help="churn: kill time in s (default: T_min/2)")
        p.add_argument("--churn-down", type=float, default=1.0, help="churn: seconds before the restart")
        p.add_argument("--no-restart", action="store_true", help="churn: killed nodes stay down")
        p.add_argument("--master-down", type=float, default=15.0,
                       help="edge-masterfirst: seconds node 1 (tracker and agent) stays down")
        p.add_argument("--baseline-pulls", type=int, default=2,
                       help="edge-stage: pulls from the node's own registry; their median is the baseline")
        p.add_argument("--stage-cap", type=parse_rate, default=parse_rate("40mbit"),
                       help="edge-stagecap: the tracker's --uplink-cap")
        p.add_argument("--outage", type=float, default=60.0,
                       help="edge-flakyuplink: seconds the uplink stays down after the two resets")
        p.add_argument("--agent-arg", action="append", metavar="ARG",
                       help="extra argument for `swarm agent` (repeatable), e.g. --agent-arg=--log=info")
        p.add_argument("--lt-piece-size", type=int, default=0, help="libtorrent piece size (0: libtorrent's choice)")
        p.add_argument("--lt-utp", action="store_true", help="let libtorrent use uTP (default TCP only)")
        p.add_argument("--workdir", default="/tmp", help="parent of the run's scratch directory")
        p.add_argument("--keep", action="store_true", help="keep the scratch directory (logs)")
        p.add_argument("--json", metavar="OUT.json", help="write every raw figure here")
        p.add_argument("--calibrate", action="store_true",
                       help="first measure the emulated fabric with iperf3 (ring of nodes, uplink): ~5 s")

    r = sub.add_parser("run", help="run the benchmark")
    r.add_argument("--nodes", type=int, default=8)
    r.add_argument("--size", type=parse_size, default=parse_size("64MiB"))
    r.add_argument("--scenario", default="edge", help="%s (comma-separated list ok)" % ", ".join(SCENARIOS))
    r.add_argument("--systems", default="direct,swarm,libtorrent",
                   help="comma-separated: direct, swarm, swarm-seed, libtorrent")
    r.add_argument("--repeat", type=int, default=1, help="run every system this many times per scenario")
    common(r)
    s = sub.add_parser("selftest", help="quick check for CI: N=3, 4 MiB, incluster")
    common(s)
    c = sub.add_parser("cleanup", help="remove leftover swbench-* namespaces, processes and work dirs")
    c.add_argument("--force", action="store_true", help="also those of runs that are still going")
    pu = sub.add_parser("_push", help=argparse.SUPPRESS)
    pu.add_argument("url")
    pu.add_argument("repo")
    pu.add_argument("file")
    pu.add_argument("digest")
    pu.add_argument("--tag")
    pu.add_argument("--media-type")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.cmd == "_push":
        return cmd_push(args)
    if args.cmd == "cleanup":
        if os.geteuid() != 0:
            log("cleanup needs root")
            return 1
        cleanup(force=args.force)
        return 0
    if args.node_down is None:
        args.node_down = args.node_rate
    try:
        if args.cmd == "selftest":
            return selftest(args)
        doc = run(args)
    except Fail as e:
        log("error: %s" % e)
        return 1
    except KeyboardInterrupt as e:
        log("interrupted (%s); cleaned up" % (e or "Ctrl-C"))
        return 130
    print_table(doc)
    if args.json:
        write_json(doc, args.json)
        log("wrote %s" % args.json)
    return 0 if all(r["status"] in ("ok", "unavailable") for r in doc["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
