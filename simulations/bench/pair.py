#!/usr/bin/env python3
"""One seed -> one pull on loopback, next to a plain TCP copy of the same file, in
one run: throughput (MB/s) of each, and the pulling peer's peak memory (max RSS).

    cargo build --release
    python3 simulations/bench/pair.py [--size 1GiB] [--swarm-bin target/release/swarm]

The TCP copy is a Python socket.sendfile() sender and a receiver writing to disk,
both on 127.0.0.1: the plain-transport yardstick for the same bytes, same disk.
"""
import argparse, hashlib, os, re, shutil, socket, subprocess, sys, tempfile, threading, time


def size(text):
    m = re.fullmatch(r"(\d+)(B|KiB|MiB|GiB)?", text)
    if not m:
        raise argparse.ArgumentTypeError("expected e.g. 1GiB")
    return int(m.group(1)) * {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_copy(src, dst):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def send():
        conn, _ = srv.accept()
        with conn, open(src, "rb") as f:
            conn.sendfile(f)

    t = threading.Thread(target=send)
    t.start()
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as c, open(dst, "wb") as out:
        while True:
            b = c.recv(1 << 20)
            if not b:
                break
            out.write(b)
    took = time.monotonic() - start
    t.join()
    srv.close()
    return took


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=size, default=1 << 30)
    ap.add_argument("--swarm-bin", default="target/release/swarm")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="swarm-pair-", dir="/var/tmp")
    procs = []
    try:
        src = os.path.join(work, "blob")
        with open(src, "wb") as f:
            left = a.size
            while left:
                n = min(left, 1 << 24)
                f.write(os.urandom(n))
                left -= n
        token = os.path.join(work, "token")
        with open(token, "wb") as f:
            f.write(subprocess.check_output([a.swarm_bin, "token"]))
        tracker = "127.0.0.1:%d" % free_port()
        procs.append(subprocess.Popen([a.swarm_bin, "tracker", "--listen", tracker, "--token-file", token],
                                      stderr=subprocess.DEVNULL))
        seed = subprocess.Popen([a.swarm_bin, "seed", src, "--tracker", tracker, "--listen", "127.0.0.1:0",
                                 "--token-file", token], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(seed)
        digest = seed.stdout.readline().strip()
        if not digest.startswith("sha256:"):
            sys.exit("the seed printed no digest")
        out = os.path.join(work, "pulled")
        start = time.monotonic()
        r = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", a.swarm_bin, "pull", digest, "-o", out,
                            "--tracker", tracker, "--listen", "127.0.0.1:0", "--token-file", token, "--json"],
                           capture_output=True, text=True)
        swarm_s = time.monotonic() - start
        if r.returncode != 0:
            sys.exit("pull failed: " + r.stderr)
        rss_kb = int(re.search(r"MAXRSS_KB (\d+)", r.stderr).group(1))
        os.remove(out)
        tcp_out = os.path.join(work, "tcp")
        tcp_s = tcp_copy(src, tcp_out)
        os.remove(tcp_out)
        mb = a.size / 1e6
        print("loopback, %d MiB, one sender and one receiver, same run:" % (a.size >> 20))
        print("  swarm seed -> pull : %6.2f s  %7.1f MB/s  (process start to verified file on disk)" % (swarm_s, mb / swarm_s))
        print("  plain TCP copy     : %6.2f s  %7.1f MB/s  (socket.sendfile -> recv -> write)" % (tcp_s, mb / tcp_s))
        print("  ratio swarm/TCP    : %.2f" % ((mb / swarm_s) / (mb / tcp_s)))
        print("  pulling peer's peak memory (max RSS): %.1f MiB" % (rss_kb / 1024))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
