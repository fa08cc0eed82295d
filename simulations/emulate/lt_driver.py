#!/usr/bin/python3
"""libtorrent baseline for the netns benchmark (driven by emulate.py).

Debian's python3-libtorrent (2.0.8) imports only under /usr/bin/python3.

    lt_driver.py create FILE OUT.torrent [--piece-size BYTES]
    lt_driver.py seed   TORRENT DIR --listen IP:PORT
    lt_driver.py leech  TORRENT DIR --listen IP:PORT --peer IP:PORT ... [--wait-go]

Every session has DHT, local service discovery, UPnP, NAT-PMP and the IP notifier
off and no trackers: peers are only the ones given with --peer (plus what they tell
each other through peer exchange), so nothing leaves the benchmark's namespaces.
uTP is off unless --utp (LEDBAT backs off on the tbf queues; TCP is libtorrent's
faster configuration here).

Protocol on stdout, one JSON object a line:
    {"event": "ready"}                 session up, torrent not added yet (leech --wait-go)
    {"event": "seeding"}               seed is serving
    {"event": "done", "t": UNIX_TIME}  leech has every piece, verified by libtorrent
    {"event": "exit", "uploaded": B, "downloaded": B}   on SIGTERM or --timeout
With --wait-go a leecher adds the torrent only when it reads a line on stdin, so
Python's start-up is not part of the measured time. Leechers keep seeding after
"done" until SIGTERM.
"""

import argparse
import json
import os
import signal
import sys
import threading
import time

import libtorrent as lt


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def settings(listen, utp):
    return {
        "listen_interfaces": listen,
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_ip_notifier": False,
        "dht_bootstrap_nodes": "",
        "enable_outgoing_utp": utp,
        "enable_incoming_utp": utp,
        "enable_outgoing_tcp": True,
        "enable_incoming_tcp": True,
        # All peers share one /24 and are the benchmark's own: no per-IP limits.
        "allow_multiple_connections_per_ip": True,
        "alert_mask": lt.alert.category_t.status_notification | lt.alert.category_t.error_notification,
    }


def cmd_create(a):
    fs = lt.file_storage()
    lt.add_files(fs, a.file)
    ct = lt.create_torrent(fs, a.piece_size)
    ct.set_creator("swarm emulate.py")
    lt.set_piece_hashes(ct, os.path.dirname(os.path.abspath(a.file)))
    with open(a.out, "wb") as f:
        f.write(lt.bencode(ct.generate()))
    ti = lt.torrent_info(a.out)
    emit({"event": "created", "piece_length": ti.piece_length(), "num_pieces": ti.num_pieces(),
          "info_hash": str(ti.info_hashes().v1)})


def parse_peer(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


def cmd_run(a, seed):
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ses = lt.session(settings(a.listen, a.utp))
    ti = lt.torrent_info(a.torrent)
    if a.wait_go:
        emit({"event": "ready"})
        if not sys.stdin.readline():
            return 1
    atp = lt.add_torrent_params()
    atp.ti = ti
    atp.save_path = a.dir
    atp.flags &= ~lt.torrent_flags.auto_managed
    atp.flags &= ~lt.torrent_flags.paused
    if seed:
        atp.flags |= lt.torrent_flags.seed_mode
    h = ses.add_torrent(atp)
    for p in a.peer or []:
        h.connect_peer(parse_peer(p))
    if seed:
        emit({"event": "seeding"})
    deadline = time.monotonic() + a.timeout
    done = seed
    reconnect_at = time.monotonic() + 1.0
    while not stop.is_set() and time.monotonic() < deadline:
        alerts = []
        if ses.wait_for_alert(20) is not None:
            alerts = ses.pop_alerts()
        st = h.status()
        if not done and (st.is_finished or st.is_seeding or st.state == lt.torrent_status.seeding):
            done = True
            emit({"event": "done", "t": time.time(), "num_peers": st.num_peers})
        for al in alerts:
            if isinstance(al, (lt.torrent_error_alert, lt.file_error_alert)):
                sys.stderr.write("lt error: %s\n" % al.message())
        # Peers that were not up yet when we first tried: try again now and then.
        if not done and time.monotonic() >= reconnect_at:
            reconnect_at = time.monotonic() + 1.0
            if st.num_peers < len(a.peer or []):
                for p in a.peer or []:
                    h.connect_peer(parse_peer(p))
    st = h.status()
    emit({"event": "exit", "uploaded": st.total_payload_upload, "downloaded": st.total_payload_download,
          "finished": bool(done)})
    return 0 if done else 2


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create")
    c.add_argument("file")
    c.add_argument("out")
    c.add_argument("--piece-size", type=int, default=0, help="0 = libtorrent's choice")
    for name in ("seed", "leech"):
        r = sub.add_parser(name)
        r.add_argument("torrent")
        r.add_argument("dir", help="save path (the seed's file lies here)")
        r.add_argument("--listen", required=True)
        r.add_argument("--peer", action="append")
        r.add_argument("--wait-go", action="store_true")
        r.add_argument("--utp", action="store_true")
        r.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args()
    if a.cmd == "create":
        cmd_create(a)
        return 0
    return cmd_run(a, seed=(a.cmd == "seed"))


if __name__ == "__main__":
    sys.exit(main())
