#!/usr/bin/python3
"""Network-emulation benchmark for swarm: real processes in Linux network namespaces.

    emulate.py run [--nodes 8] [--size 64MiB] [--uplink 100mbit] [--node-rate 200mbit]
                   [--scenario edge|incluster|churn[,...]] [--systems direct,swarm,libtorrent]
                   [--swarm-bin PATH] [--json OUT.json]
    emulate.py selftest [--swarm-bin PATH]     N=3, 4 MiB, incluster: direct + swarm (+ libtorrent)
    emulate.py cleanup [--force]               remove leftover swbench-* namespaces and work dirs

Needs root, iproute2 (ip, tc, ss), curl and Debian's docker-registry; the libtorrent
baseline needs python3-libtorrent under /usr/bin/python3. Standard library only.

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
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
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


def push_blob(ns, base_url, path, digest):
    """Monolithic blob upload (POST then PUT ?digest=) run inside `ns` by this script."""
    sh(["ip", "netns", "exec", ns, SYS_PY, os.path.abspath(__file__), "_push", base_url, REPO_NAME, path, digest],
       timeout=120)


def cmd_push(a):
    base = a.url.rstrip("/")
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


# ---------------------------------------------------------------- systems

class Ctx:
    """What a system needs to know about the run."""

    def __init__(self, topo, args, blob, digest, size, workdir, layout, timeout):
        self.topo, self.args, self.blob, self.digest, self.size = topo, args, blob, digest, size
        self.workdir, self.layout, self.timeout = workdir, layout, timeout
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

    def available(self, args):
        return True, ""

    def setup(self, ctx):
        """Before the common start: servers, seeds, trackers, agents."""

    def launch(self, ctx, i, restart=False):
        """Starts node i's download; returns (procs, done_proc, output_path)."""
        raise NotImplementedError

    def teardown(self, ctx):
        stop_all(ctx.procs)


class Direct(System):
    """Every node GETs the blob from the registry at once (edge: upstream; incluster:
    a second registry on node 1 serving the same storage)."""
    name = "direct"

    def setup(self, ctx):
        self.host = UP_IP
        self.extra = None
        if ctx.layout != "edge":
            self.extra = Registry(ctx.topo, ctx.topo.ns(1), ctx.topo.ip(1), ctx.reg_root, "node1")
            self.extra.start(ctx.workdir)
            self.extra.proc.side = "cluster"
            self.extra.proc.node = 1
            ctx.procs.append(self.extra.proc)
            self.host = ctx.topo.ip(1)

    def launch(self, ctx, i, restart=False):
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
    upstream registry; incluster: `swarm seed` on node 1, `swarm pull` on the others."""
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

    def _common(self, ctx, i):
        addr = UP_IP if i == 0 else ctx.topo.ip(i)
        return ["--tracker", "%s:%d" % (ctx.topo.ip(1), TRACKER_PORT),
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
        self.env = dict(os.environ, SWARM_LOG=os.environ.get("SWARM_LOG", "warn"))
        tr = ctx.spawn("tracker", ctx.topo.ns(1),
                       [b, "tracker", "--listen", "%s:%d" % (ctx.topo.ip(1), TRACKER_PORT), "--token-file", self.token],
                       ctx.workdir, node=1, env=self.env)
        wait_listen(ctx.topo.ns(1), "udp", TRACKER_PORT, proc=tr)
        self.agents = {}
        if self.via_agent(ctx):
            for i in ctx.downloaders:
                self._start_agent(ctx, i)
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
        b = self._bin(ctx.args)
        out = os.path.join(ctx.sysdir, "n%d" % i, "blob")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        if self.via_agent(ctx):
            procs = []
            if restart:
                procs.append(self._start_agent(ctx, i, restart=True))
            url = "http://127.0.0.1:%d/v2/%s/blobs/sha256:%s?ns=%s:%d" % (MIRROR_PORT, REPO_NAME, ctx.digest, UP_IP,
                                                                           REG_PORT)
            p = ctx.spawn("curl-n%d%s" % (i, "-r" if restart else ""), ctx.topo.ns(i),
                          ["curl", "-sS", "--fail", "--max-time", str(int(ctx.timeout) + 5), "-o", out, url],
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


class Libtorrent(System):
    """libtorrent 2.0.8 (Debian) through lt_driver.py: no tracker, no DHT/LSD/UPnP/NAT-PMP;
    every client is told every peer's address. Python start-up is excluded: leechers
    add the torrent when the common start is signalled on stdin."""
    name = "libtorrent"
    driver = os.path.join(HERE, "lt_driver.py")

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

def scenario_layout(scenario):
    return {"edge": ("edge", False), "incluster": ("incluster", False), "churn": ("incluster", True),
            "edge-churn": ("edge", True)}[scenario]


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


def run_system(sysobj, topo, args, blob, digest, size, registry, scenario, workdir, repeat=0):
    layout, churn = scenario_layout(scenario)
    tm, terms, n_down = scenario_tmin(topo, size, layout)
    timeout = args.timeout or default_timeout(topo, size, layout)
    res = {"system": sysobj.name, "scenario": scenario, "repeat": repeat, "layout": layout, "status": "ok", "reason": "",
           "sim_scenario": {"edge": "edge", "incluster": "in-cluster"}.get(scenario, "churn"),
           "t_min_s": round(tm, 4),
           "t_min": dict({k: round(v, 4) for k, v in terms.items()}, t_min_s=round(tm, 4)),
           "n_downloaders": n_down, "size_bytes": size, "timeout_s": timeout}
    ok, why = sysobj.available(args)
    if not ok:
        res.update(status="unavailable", reason="not available: " + why)
        return res
    sysdir = os.path.join(workdir, "%s-%s-%d" % (sysobj.name, scenario, repeat))
    os.makedirs(sysdir)
    ctx = Ctx(topo, args, blob, digest, size, workdir, layout, timeout)
    ctx.sysdir = sysdir
    ctx.reg_root = registry.root
    nodes = {i: {"node": i, "done_s": None, "status": "pending", "killed": False, "restarted": False,
                 "sha256_ok": None} for i in ctx.downloaders}
    done_proc, outputs, node_procs = {}, {}, {}
    churn_plan = None
    try:
        try:
            sysobj.setup(ctx)
        except Unavailable as e:
            res.update(status="unavailable", reason=str(e))
            return res
        time.sleep(0.2)
        up0 = topo.uplink_tx()
        snap0 = topo.snapshot()
        reg0 = registry.cpu_s() or 0.0
        if churn:
            k = args.churn_kill if args.churn_kill is not None else max(1, math.ceil(n_down / 4))
            victims = ctx.downloaders[-k:]
            at = args.churn_at if args.churn_at is not None else 0.5 * tm
            churn_plan = {"victims": victims, "kill_at_s": at, "restart": not args.no_restart,
                          "restart_at_s": at + args.churn_down, "killed": False, "restarted_done": False}
        # CPU spent before the start (hashing by a seed, interpreter start-up) is not
        # part of the distribution: it is reported apart as cpu_setup_s.
        for p in ctx.procs:
            p.cpu_at_t0 = proc_cpu_s(p.pid) or 0.0
        t0 = time.monotonic()
        for i in ctx.downloaders:
            procs, dp, out = sysobj.launch(ctx, i)
            node_procs[i], done_proc[i], outputs[i] = procs, dp, out
            nodes[i]["launched_s"] = round(time.monotonic() - t0, 4)
        log("%s/%s: started %d downloads" % (sysobj.name, scenario, len(ctx.downloaders)))
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
            if churn_plan and not churn_plan["killed"] and now >= churn_plan["kill_at_s"]:
                churn_plan["killed"] = True
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
            churn_pending = churn_plan and (not churn_plan["killed"] or
                                            (churn_plan["restart"] and not churn_plan["restarted_done"]))
            if not churn_pending and all(st["status"] != "pending" for st in nodes.values()):
                break
            if now > timeout:
                for st in nodes.values():
                    if st["status"] == "pending":
                        st["status"] = "timeout"
                break
            time.sleep(0.01)
        wall = time.monotonic() - t0
        up1 = topo.uplink_tx()
        snap1 = topo.snapshot()
        reg1 = registry.cpu_s() or reg0
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
    if sysobj.name == "libtorrent":
        res["lt_piece_length"] = sysobj.meta.get("piece_length")
    if bad:
        res["status"] = "failed"
        res["reason"] = "; ".join("node %d: %s%s" % (st["node"], st["status"],
                                                      (" (" + st["error"] + ")") if st.get("error") else "")
                                  for st in bad)
        # Keep logs of failed processes in the JSON: the work dir is removed.
        res["logs"] = {p.name: p.tail(12) for p in ctx.procs if (p.rc not in (0, None, -15) or p.name.startswith(("seed", "tracker")))}
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
        if s not in ("edge", "incluster", "churn", "edge-churn"):
            raise Fail("unknown scenario %r (edge, incluster, churn, edge-churn)" % s)
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
        (args.timeout or default_timeout(topo, size, scenario_layout(sc)[0])) + 40 for sc in scenarios) * len(systems) * args.repeat + 60)
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
        push_blob(topo.up, "http://%s:%d" % (UP_IP, REG_PORT), blob, "sha256:" + digest)
        if args.calibrate:
            calib = calibrate(topo)
            log("calibration: %s" % json.dumps(calib))
        for sc in scenarios:
            for k in range(args.repeat):
                for name in systems:
                    log("running %s / %s%s" % (name, sc, " (repeat %d)" % (k + 1) if args.repeat > 1 else ""))
                    r = run_system(SYSTEMS[name](), topo, args, blob, digest, size, registry, sc, workdir, k)
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
                 "note": "shared 2-core machine; other jobs (Rust builds) run concurrently, timings are noisy"},
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
    hdr = ("%-10s %-10s %-6s %8s %8s %8s %7s %7s %9s %7s %9s  %s" %
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
        out.write("%-10s %-10s %-6s %8s %8s %8s %7s %7s %9s %7s %9s  %s\n" % (
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
            shutil.rmtree(os.path.join("/tmp", d), ignore_errors=True)
            removed.append("/tmp/" + d)
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
    r.add_argument("--scenario", default="edge", help="edge, incluster, churn, edge-churn (comma-separated list ok)")
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
