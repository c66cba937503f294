"""A fake Kubernetes API server on 127.0.0.1 (HTTPS, a certificate of its
own) for the ``kubernetes`` client that JAX's cluster detection uses, and
what a pod of an Indexed Job sees: its variables, service account files
and the answers about its pod and Job.

Used by tests/program/commands/test_distributed.py; nothing leaves this
machine.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import json
import pathlib
import ssl
import threading
from typing import Iterator

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NAMESPACE, JOB, SUBDOMAIN = "team", "train", "jaxpods"


def pod(index: int, *, subdomain: str | None = SUBDOMAIN) -> dict:
  """Pod ``index`` of Indexed Job ``JOB``, as the API server describes it."""
  spec = {"containers": [{"name": "trainer", "image": "eqco-jax"}]}
  if subdomain:
    spec["subdomain"] = subdomain
  return {"apiVersion": "v1", "kind": "Pod", "metadata": {
      "name": f"{JOB}-{index}-x7k2p", "namespace": NAMESPACE,
      "labels": {"job-name": JOB},
      "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                           "name": JOB, "uid": "u-1", "controller": True}]},
          "spec": spec}


def job(parallelism: int) -> dict:
  return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {
      "name": JOB, "namespace": NAMESPACE, "labels": {"job-name": JOB}},
          "spec": {"parallelism": parallelism, "completions": parallelism,
                   "completionMode": "Indexed", "template": {"spec": {
                       "containers": [{"name": "trainer",
                                       "image": "eqco-jax"}]}}}}


def routes(index: int, parallelism: int, **pod_fields) -> dict:
  """The API server's answers (path: (status, body)) about pod ``index``
  of a Job of ``parallelism`` pods."""
  return {
      f"/api/v1/namespaces/{NAMESPACE}/pods": (200, {
          "apiVersion": "v1", "kind": "PodList", "metadata": {},
          "items": [pod(index, **pod_fields)]}),
      f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{JOB}": (
          200, job(parallelism)),
      f"/api/v1/namespaces/{NAMESPACE}/services": (200, {
          "apiVersion": "v1", "kind": "ServiceList", "metadata": {},
          "items": []}),
  }


FORBIDDEN = (403, {"apiVersion": "v1", "kind": "Status", "status": "Failure",
                   "reason": "Forbidden", "code": 403,
                   "message": "pods is forbidden: User cannot list pods"})


def _certificate(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
  key = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-api")])
  now = datetime.datetime.now(datetime.timezone.utc)
  certificate = (
      x509.CertificateBuilder().subject_name(name).issuer_name(name)
      .public_key(key.public_key()).serial_number(x509.random_serial_number())
      .not_valid_before(now - datetime.timedelta(minutes=5))
      .not_valid_after(now + datetime.timedelta(hours=1))
      .add_extension(x509.SubjectAlternativeName(
          [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
      .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                     critical=True)
      .sign(key, hashes.SHA256()))
  cert_file, key_file = folder / "ca.crt", folder / "server.key"
  cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
  key_file.write_bytes(key.private_bytes(
      serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
      serialization.NoEncryption()))
  return cert_file, key_file


@contextlib.contextmanager
def serving(folder: pathlib.Path, answers: dict) -> Iterator[dict]:
  """Serves ``answers`` (path: (status, body); any other path is a 404)
  over HTTPS on 127.0.0.1 while the block runs. Yields what a pod sees:
  ``environ`` (KUBERNETES_SERVICE_HOST/PORT), ``token`` and ``ca`` (its
  service account's files, in ``folder``) and ``requests`` (the paths and
  queries asked)."""
  cert_file, key_file = _certificate(folder)
  asked = []

  class Handler(http.server.BaseHTTPRequestHandler):

    def do_GET(self):  # pylint: disable=invalid-name
      asked.append(self.path)
      status, body = answers.get(self.path.split("?")[0], (404, {
          "kind": "Status", "apiVersion": "v1", "code": 404,
          "reason": "NotFound", "status": "Failure"}))
      data = json.dumps(body).encode()
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def log_message(self, *args):
      del args

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  context.load_cert_chain(cert_file, key_file)
  server.socket = context.wrap_socket(server.socket, server_side=True)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  token = folder / "token"
  token.write_text("fake-token")
  try:
    yield {"environ": {"KUBERNETES_SERVICE_HOST": "127.0.0.1",
                       "KUBERNETES_SERVICE_PORT": str(server.server_port)},
           "token": token, "ca": cert_file, "requests": asked}
  finally:
    server.shutdown()
    server.server_close()
