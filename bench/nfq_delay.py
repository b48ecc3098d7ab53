#!/usr/bin/env python3
"""Userspace stand-in for `tc netem delay`: holds every packet of one NFQUEUE
queue for a fixed time, then accepts it.  Stdlib only (raw AF_NETLINK).
(Taken from shared/peerbench/tools/nfq_delay.py.)

Used because this kernel has no sch_netem (CONFIG_NET_SCH_NETEM unset).  bench/netns.py
pairs it with one iptables rule inside the benchmark's own network namespace that queues
only the packets to or from the origin and proxy ports, e.g.
  iptables-legacy -t mangle -A PREROUTING -i lo -p tcp -m multiport --ports 8080,8443
      -j NFQUEUE --queue-num 7 --queue-bypass
Every loopback packet crosses PREROUTING exactly once, so a delay D gives RTT 2*D.
Hook PREROUTING rather than OUTPUT: at OUTPUT the held skb still belongs to the
sending socket, and TCP Small Queues then throttles any single busy connection
(seen as +25 ms p50 for one multiplexed h2 connection); after loopback_xmit()
the skb is orphaned, as netem does with its queue.
"""
import argparse
import collections
import contextlib
import os
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_META = 1
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5


def _attr(atype, payload):
    ln = 4 + len(payload)
    pad = (4 - ln % 4) % 4
    return struct.pack("=HH", ln, atype) + payload + b"\0" * pad


class NfQueue:
    def __init__(self, qnum):
        self.qnum = qnum
        self.seq = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))

    def _send(self, msg_type, attrs, ack=False):
        self.seq += 1
        body = struct.pack("!BBH", socket.AF_UNSPEC, 0, self.qnum) + b"".join(attrs)
        flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
        hdr = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, self.seq, 0)
        self.sock.send(hdr + body)
        if ack:
            data = self.sock.recv(65536)
            _ln, typ = struct.unpack_from("=IH", data, 0)
            if typ == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", data, 16)
                if err != 0:
                    raise OSError(-err, os.strerror(-err))

    def configure(self, maxlen):
        self._send(NFQNL_MSG_CONFIG, [_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0))], ack=True)
        self._send(NFQNL_MSG_CONFIG, [_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))], ack=True)
        self._send(NFQNL_MSG_CONFIG, [_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen))], ack=True)

    def unbind(self):
        with contextlib.suppress(OSError):
            self._send(NFQNL_MSG_CONFIG, [_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_UNBIND, 0, 0))])

    def accept_upto(self, packet_id):
        # VERDICT_BATCH accepts every queued packet whose id <= packet_id.
        self._send(NFQNL_MSG_VERDICT_BATCH, [_attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))])

    def read_packet_ids(self):
        """Return ids of all packet messages available now (non-blocking)."""
        ids = []
        while True:
            try:
                data = self.sock.recv(262144, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return ids
            off = 0
            while off + 16 <= len(data):
                ln, typ = struct.unpack_from("=IH", data, off)
                if ln < 16:
                    break
                if typ == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    a = off + 16 + 4
                    end = off + ln
                    while a + 4 <= end:
                        alen, atype = struct.unpack_from("=HH", data, a)
                        if alen < 4:
                            break
                        if (atype & 0x3FFF) == NFQA_PACKET_HDR:
                            ids.append(struct.unpack_from("!I", data, a + 4)[0])
                            break
                        a += (alen + 3) & ~3
                off += (ln + 3) & ~3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queue", type=int, default=7)
    ap.add_argument("--delay-ms", type=float, default=25.0)
    ap.add_argument("--maxlen", type=int, default=65536)
    ap.add_argument("--ready-file", default="")
    args = ap.parse_args()
    delay = args.delay_ms / 1000.0
    q = NfQueue(args.queue)
    q.configure(args.maxlen)
    stop = False

    def _stop(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write(str(os.getpid()))
    pending = collections.deque()  # (release_at, packet_id), FIFO == id order
    poller = select.poll()
    poller.register(q.sock, select.POLLIN)
    held = 0
    while not stop:
        now = time.monotonic()
        timeout_ms = 200 if not pending else max(0.0, (pending[0][0] - now) * 1000.0)
        try:
            ev = poller.poll(timeout_ms)
        except InterruptedError:
            continue
        now = time.monotonic()
        if ev:
            for pid in q.read_packet_ids():
                pending.append((now + delay, pid))
                held += 1
        last = None
        while pending and pending[0][0] <= now:
            last = pending.popleft()[1]
        if last is not None:
            q.accept_upto(last)
    # release whatever is still held, then unbind
    if pending:
        q.accept_upto(pending[-1][1])
    q.unbind()
    print(f"nfq_delay: held {held} packets", file=sys.stderr)


if __name__ == "__main__":
    main()
