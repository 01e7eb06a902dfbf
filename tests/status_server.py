"""A stand-in for Kubeflow Trainer's status server: HTTPS with a certificate
from its own CA, recording each POST (path, headers, JSON body) and answering
with the status code the test sets. Used by the progress-report tests."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TOKEN = "test-token-of-the-trainjob"
PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/default/trainjobs/mnist-train/status"


def _certificate(subject: str, key, issuer_name, issuer_key, ca: bool, hosts=()):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        names = [
            x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h)
            for h in hosts
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_ca(directory: Path, hosts: tuple[str, ...]) -> tuple[Path, Path, Path]:
    """(ca.crt, server.crt, server.key) under `directory`: a CA and a server
    certificate it signed for `hosts`."""
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test status CA")])
    ca = _certificate("test status CA", ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(hosts[0], key, ca_name, ca_key, ca=False, hosts=hosts)
    paths = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


@dataclass
class StatusServer:
    url: str
    ca_cert: Path
    token_file: Path
    requests: list[dict] = field(default_factory=list)
    answer: int = 200

    def bodies(self) -> list[dict]:
        return [r["body"] for r in self.requests]


def serve(directory: Path, host: str = "127.0.0.1", hosts=("localhost", "127.0.0.1")):
    """Start the server on a free port; returns (StatusServer, stop())."""
    ca_cert, cert, key = make_ca(directory, hosts)
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    state = StatusServer("", ca_cert, token_file)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length)
            state.requests.append(
                {"path": self.path, "headers": dict(self.headers), "body": json.loads(raw)}
            )
            self.send_response(state.answer)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    state.url = f"https://{hosts[0]}:{server.server_address[1]}{PATH}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()

    return state, stop
