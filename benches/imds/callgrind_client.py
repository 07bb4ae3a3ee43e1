"""Load for `scripts/callgrind`: CALLERS callers on their own loopback addresses (127.0.1.1, …;
127.0.0.1 for one), each with its own kept-alive connection and IMDSv2 token, asking for their
credentials round-robin. Sequential on purpose: under valgrind the server is ~50× slower, and
what is counted is instructions, not time.

usage: callgrind_client.py PORT CALLERS ROLES REQUESTS [DOCUMENT]

Prints "warm" after every connection has been used twice, waits for a line on stdin, sends
REQUESTS more GETs, prints "done" and waits for a line on stdin before closing. With DOCUMENT,
the first credentials document served is written there (for the floor to serve the same bytes).
"""
import socket
import sys


def address(i, n):
    return "127.0.0.1" if n == 1 else f"127.0.{1 + i // 250}.{i % 250 + 1}"


def response(sock):
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("the server closed the connection")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split(b" ")[1]), body


def main():
    port, callers, roles, requests = map(int, sys.argv[1:5])
    conns = []
    for i in range(callers):
        sock = socket.socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((address(i, callers), 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(
            b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n"
            b"X-aws-ec2-metadata-token-ttl-seconds: 21600\r\nContent-Length: 0\r\n\r\n"
        )
        status, token = response(sock)
        if status != 200:
            raise SystemExit(f"token PUT: {status}")
        request = (
            f"GET /latest/meta-data/iam/security-credentials/bench-role-{i % roles:02} HTTP/1.1\r\n"
            "Host: 169.254.169.254\r\nUser-Agent: aws-sdk-rust/1.3 os/linux\r\n"
            f"X-aws-ec2-metadata-token: {token.decode()}\r\n\r\n"
        ).encode()
        conns.append((sock, request))

    def run(n):
        body = b""
        for k in range(n):
            sock, request = conns[k % len(conns)]
            sock.sendall(request)
            status, body = response(sock)
            if status != 200 or b'"Success"' not in body:
                raise SystemExit(f"GET: {status} {body[:200]!r}")
        return body

    document = run(2 * len(conns))
    if len(sys.argv) > 5:
        with open(sys.argv[5], "wb") as f:
            f.write(document)
    print("warm", flush=True)
    sys.stdin.readline()
    run(requests)
    print("done", flush=True)
    sys.stdin.readline()


main()
