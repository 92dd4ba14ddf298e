"""A minimal S3-compatible server that costs the client's cores as little as possible.

For CPU measurements, not correctness: moto stays the server of the storage tests. moto
and s3rver spend far more CPU per byte than the client under test (moto reads the whole
object to serve each range), and on a small machine they compete with it for the same
cores. This one serves a ranged GET with ``sendfile`` from a file on tmpfs (over TLS, from
an ``mmap``), stores an uploaded body with one copy, and does nothing per byte besides:
no signature checks, no MD5 (ETags are opaque counters), no checksums.

What it speaks, enough for our client (s3fs/aiobotocore), upstream's (obstore) and raw
botocore or obstore calls, path-style addressing only (``endpoint/bucket/key``):

- ``HEAD``/``GET`` object, ``Range`` (``bytes=a-b``, ``a-``, ``-n``; 206 with
  ``Content-Range``, 416 past the end), ``If-Match`` (412 on a mismatch) and
  ``If-None-Match`` (304);
- ``PUT`` object, multipart create / upload part / complete / abort, with plain,
  ``Transfer-Encoding: chunked`` and ``aws-chunked`` bodies (signatures and trailers
  ignored);
- ``DELETE`` object, ``DeleteObjects``, ``ListObjectsV2`` (prefix, delimiter, pages);
- buckets exist implicitly: ``PUT``/``HEAD`` bucket succeed.

Anything else answers 501 ``NotImplemented`` naming the request, and logs it to standard
error, so a client that needs more says so instead of failing obscurely.

Run it as a process (so its CPU is accounted apart from the client's)::

    with MiniS3(tls=True) as s3:       # a certificate made now, for 127.0.0.1
        s3.endpoint                    # https://127.0.0.1:PORT
        s3.ca_file                     # the CA to trust (AWS_CA_BUNDLE, SSL_CERT_FILE)
        s3.env()                       # AWS_* and FLYTE_AWS_* variables for clients
        s3.pid                         # its CPU: /proc/PID/stat

or ``python path/to/mini_s3.py --root DIR [--cert PEM --key PEM [--http-port 0]]`` (the file
needs only the standard library, so any interpreter runs it), which prints ``port N`` once it
listens (and first ``http-port N`` for the plain port beside a TLS one).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import email.utils
import itertools
import mmap
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.etree import ElementTree
from xml.sax.saxutils import escape

__all__ = ["MiniS3", "TLSFiles", "make_tls"]

_PIECE = 1 << 20  # bytes per read/send of a body
_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"


# ---------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class TLSFiles:
    """A CA and a server certificate it signed, for 127.0.0.1 and localhost."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_tls(directory: Path) -> TLSFiles:
    """Make a CA and a server certificate for 127.0.0.1 / localhost in ``directory``, valid
    for two days. Uses the ``cryptography`` package when installed, else ``openssl``.
    (A separate CA, not one self-signed certificate: rustls refuses a CA certificate used
    as the server's own.)"""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = TLSFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    try:
        _make_tls_cryptography(files)
    except ImportError:
        _make_tls_openssl(files, directory)
    return files


def _make_tls_cryptography(files: TLSFiles) -> None:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2))

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("mini-s3 test CA"))
          .issuer_name(name("mini-s3 test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(valid[0]).not_valid_after(valid[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(
              digital_signature=False, content_commitment=False, key_encipherment=False,
              data_encipherment=False, key_agreement=False, key_cert_sign=True,
              crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1"))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0]).not_valid_after(valid[1])
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    files.ca_file.write_bytes(ca.public_bytes(pem))
    files.cert_file.write_bytes(cert.public_bytes(pem))
    files.key_file.write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _make_tls_openssl(files: TLSFiles, directory: Path) -> None:
    if shutil.which("openssl") is None:
        raise RuntimeError("a TLS certificate needs the cryptography package or openssl")
    ca_key, csr, ext = directory / "ca.key", directory / "server.csr", directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                   "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for command in (
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", files.ca_file, "-days", "2",
         "-subj", "/CN=mini-s3 test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["openssl", "req", *ec, "-keyout", files.key_file, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", files.ca_file, "-CAkey", ca_key,
         "-CAcreateserial", "-out", files.cert_file, "-days", "2", "-extfile", ext],
    ):
        subprocess.run([str(part) for part in command], check=True, capture_output=True,
                       timeout=60)


# ---------------------------------------------------------------------- the store


@dataclass
class _Object:
    #: (file, bytes) in order: a multipart object is its parts' files, never concatenated.
    segments: list[tuple[Path, int]]
    etag: str
    modified: float = field(default_factory=time.time)

    @property
    def size(self) -> int:
        return sum(size for _, size in self.segments)


class _Store:
    """Objects by (bucket, key), each body in files under ``root``; one lock for the maps."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.objects: dict[tuple[str, str], _Object] = {}
        self.uploads: dict[str, tuple[str, str, dict[int, tuple[Path, int, str]]]] = {}
        self._counter = itertools.count(1)

    def new_file(self) -> Path:
        return self.root / f"body-{next(self._counter)}-{uuid.uuid4().hex[:8]}"

    def etag(self, parts: int = 0) -> str:
        tag = f"{uuid.uuid4().hex}"
        return f'"{tag}-{parts}"' if parts else f'"{tag}"'

    def publish(self, bucket: str, key: str, obj: _Object) -> None:
        with self.lock:
            old = self.objects.get((bucket, key))
            self.objects[(bucket, key)] = obj
        if old is not None:
            self.discard(old.segments)

    def delete(self, bucket: str, key: str) -> None:
        with self.lock:
            old = self.objects.pop((bucket, key), None)
        if old is not None:
            self.discard(old.segments)

    @staticmethod
    def discard(segments: list[tuple[Path, int]]) -> None:
        # A GET that opened a segment keeps reading it: unlinking an open file is safe.
        for path, _ in segments:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# ---------------------------------------------------------------------- requests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mini-s3"
    sys_version = ""
    store: _Store
    tls: bool

    def log_message(self, format: str, *args: object) -> None:  # quiet per request
        pass

    def setup(self) -> None:
        if self.tls:
            self.request.settimeout(60)
            self.request.do_handshake()
        super().setup()

    # --- plumbing

    def _target(self) -> tuple[str, str, dict[str, str]]:
        parsed = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(parsed.path)
        bucket, _, key = path.lstrip("/").partition("/")
        query = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
        return bucket, key, query

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
               content_type: str = "application/xml") -> None:
        self.send_response(status)
        self.send_header("x-amz-request-id", uuid.uuid4().hex[:16])
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if body or status not in (204, 304):
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, resource: str = "") -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{escape(message)}</Message><Resource>{escape(resource)}</Resource>"
                f"<RequestId>0</RequestId></Error>").encode()
        self._reply(status, b"" if self.command == "HEAD" else body)

    def _not_implemented(self) -> None:
        what = f"{self.command} {self.path}"
        print(f"mini-s3: not implemented: {what}", file=sys.stderr, flush=True)
        self._drain()
        self._error(501, "NotImplemented", f"mini-s3 does not implement {what}", self.path)

    def _drain(self) -> None:
        """Read and drop a request body, so that the connection stays usable."""
        for _ in self._body():
            pass

    def _body(self):
        """The request body's decoded pieces (memoryviews of a reused buffer)."""
        encoding = self.headers.get("Content-Encoding", "") + self.headers.get(
            "x-amz-content-sha256", "")
        chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
        if "aws-chunked" in encoding or "STREAMING-" in encoding:
            yield from self._chunks(outer_chunked=chunked)
        elif chunked:
            yield from self._chunks(outer_chunked=False)
        else:
            yield from self._exactly(int(self.headers.get("Content-Length") or 0))

    def _exactly(self, count: int, buffer: bytearray | None = None):
        buffer = buffer or bytearray(min(_PIECE, max(count, 1)))
        view = memoryview(buffer)
        while count:
            got = self.rfile.readinto(view[:min(count, len(view))])
            if not got:
                raise ConnectionError("request body ended early")
            count -= got
            yield view[:got]

    def _chunks(self, outer_chunked: bool):
        """``size[;ext]\\r\\n data \\r\\n`` ... ``0\\r\\n trailers \\r\\n``: HTTP chunked and
        aws-chunked share it. aws-chunked under HTTP chunked (a client streaming a signed
        body without a length) is read as one stream: the two framings nest, so the outer
        one is taken apart first."""
        source = self.rfile
        if outer_chunked and "aws-chunked" in self.headers.get("Content-Encoding", ""):
            import io

            # Rare (no client here does it by default): decode the outer framing to memory.
            self.rfile = io.BytesIO(b"".join(bytes(p) for p in self._chunks(False)))
            try:
                yield from self._chunks(False)
            finally:
                self.rfile = source
            return
        buffer = bytearray(_PIECE)
        while True:
            line = self.rfile.readline(4096)
            if not line:
                raise ConnectionError("chunked body ended early")
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(65536) not in (b"\r\n", b"\n", b""):
                    pass  # trailers (x-amz-checksum-*, x-amz-trailer-signature)
                return
            yield from self._exactly(size, buffer)
            self.rfile.readline(16)  # the CRLF after the data

    def _write_body(self) -> tuple[Path, int]:
        path = self.store.new_file()
        size = 0
        with open(path, "wb", buffering=0) as f:
            for piece in self._body():
                f.write(piece)
                size += len(piece)
        return path, size

    def _read_xml(self) -> ElementTree.Element:
        data = b"".join(bytes(piece) for piece in self._body())
        root = ElementTree.fromstring(data)
        for element in root.iter():  # drop namespaces: clients differ in sending one
            element.tag = element.tag.rpartition("}")[2]
        return root

    # --- verbs

    def do_HEAD(self) -> None:
        self._get_or_head()

    def do_GET(self) -> None:
        bucket, key, query = self._target()
        if not key and ("list-type" in query or not query):
            return self._list(bucket, query)
        if not key and "location" in query:
            return self._reply(200, b'<?xml version="1.0" encoding="UTF-8"?>\n'
                               b"<LocationConstraint/>")
        if not key:
            return self._not_implemented()
        self._get_or_head()

    def _get_or_head(self) -> None:
        bucket, key, query = self._target()
        if not key:
            return self._reply(200)  # buckets exist implicitly
        if query and not set(query) <= {"partNumber", "versionId", "x-id"}:
            return self._not_implemented()
        with self.store.lock:
            obj = self.store.objects.get((bucket, key))
        if obj is None:
            return self._error(404, "NoSuchKey", "The specified key does not exist.", key)
        wanted = self.headers.get("If-Match")
        if wanted and wanted.strip() != "*" and obj.etag not in (wanted.strip(),
                                                                  f'"{wanted.strip()}"'):
            return self._error(412, "PreconditionFailed",
                               "At least one of the pre-conditions you specified did not hold",
                               key)
        unwanted = self.headers.get("If-None-Match")
        if unwanted and (unwanted.strip() == "*" or obj.etag in (unwanted.strip(),
                                                                  f'"{unwanted.strip()}"')):
            return self._reply(304, headers={"ETag": obj.etag})
        size = obj.size
        start, end, status = 0, size, 200
        ranged = self.headers.get("Range")
        if ranged and size:  # an empty object has no range to serve: all of it, 200
            match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", ranged)
            if match and match.group(1):
                start = int(match.group(1))
                end = min(size, int(match.group(2)) + 1) if match.group(2) else size
            elif match and match.group(2):
                start = max(0, size - int(match.group(2)))
            if match and (start >= size or start >= end):
                return self._error(416, "InvalidRange",
                                   "The requested range is not satisfiable", key)
            if match:
                status = 206
        headers = {
            "ETag": obj.etag,
            "Last-Modified": email.utils.formatdate(obj.modified, usegmt=True),
            "Accept-Ranges": "bytes",
            "Content-Type": "binary/octet-stream",
            "Content-Length": str(end - start),
        }
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{max(start, end - 1)}/{size}"
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "GET":
            self._send_range(obj.segments, start, end)

    def _send_range(self, segments: list[tuple[Path, int]], start: int, end: int) -> None:
        offset = 0
        for path, size in segments:
            lo, hi = max(start, offset), min(end, offset + size)
            if lo < hi:
                with open(path, "rb") as f:
                    if self.tls:
                        # No sendfile through TLS here; an mmap spares one copy at least.
                        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                            view = memoryview(mapped)
                            try:
                                position = lo - offset
                                while position < hi - offset:
                                    step = min(_PIECE, hi - offset - position)
                                    self.connection.sendall(view[position:position + step])
                                    position += step
                            finally:
                                view.release()
                    else:
                        self.connection.sendfile(f, lo - offset, hi - lo)
            offset += size

    def do_PUT(self) -> None:
        bucket, key, query = self._target()
        if not key:
            self._drain()
            return self._reply(200)
        if "x-amz-copy-source" in self.headers:
            return self._not_implemented()
        if "uploadId" in query:
            return self._upload_part(query)
        if query and not set(query) <= {"x-id"}:
            return self._not_implemented()
        path, size = self._write_body()
        obj = _Object([(path, size)], self.store.etag())
        self.store.publish(bucket, key, obj)
        self._reply(200, headers={"ETag": obj.etag})

    def _upload_part(self, query: dict[str, str]) -> None:
        upload = self.store.uploads.get(query["uploadId"])
        if upload is None:
            self._drain()
            return self._error(404, "NoSuchUpload", "The specified upload does not exist.",
                               query["uploadId"])
        path, size = self._write_body()
        etag = self.store.etag()
        with self.store.lock:
            old = upload[2].get(int(query["partNumber"]))
            upload[2][int(query["partNumber"])] = (path, size, etag)
        if old is not None:
            self.store.discard([old[:2]])
        self._reply(200, headers={"ETag": etag})

    def do_POST(self) -> None:
        bucket, key, query = self._target()
        if "uploads" in query and key:
            self._drain()
            upload_id = uuid.uuid4().hex
            with self.store.lock:
                self.store.uploads[upload_id] = (bucket, key, {})
            return self._reply(200, _xml("InitiateMultipartUploadResult", Bucket=bucket,
                                         Key=key, UploadId=upload_id))
        if "uploadId" in query and key:
            return self._complete(bucket, key, query["uploadId"])
        if "delete" in query and not key:
            root = self._read_xml()
            deleted = []
            for element in root.iter("Object"):
                name = element.findtext("Key") or ""
                self.store.delete(bucket, name)
                deleted.append(f"<Deleted><Key>{escape(name)}</Key></Deleted>")
            return self._reply(200, (f'<?xml version="1.0" encoding="UTF-8"?>\n<DeleteResult'
                                     f' xmlns="{_XMLNS}">{"".join(deleted)}</DeleteResult>'
                                     ).encode())
        self._not_implemented()

    def _complete(self, bucket: str, key: str, upload_id: str) -> None:
        root = self._read_xml()
        with self.store.lock:
            upload = self.store.uploads.get(upload_id)
            if upload is None:
                return self._error(404, "NoSuchUpload", "The specified upload does not exist.",
                                   upload_id)
            parts = upload[2]
            chosen = []
            for element in root.iter("Part"):
                number = int(element.findtext("PartNumber") or 0)
                tag = (element.findtext("ETag") or "").strip()
                if number not in parts or parts[number][2] not in (tag, f'"{tag}"'):
                    return self._error(400, "InvalidPart",
                                       f"part {number} was not uploaded with ETag {tag}",
                                       upload_id)
                chosen.append(number)
            if chosen != sorted(set(chosen)):
                return self._error(400, "InvalidPartOrder", "parts are not in ascending order",
                                   upload_id)
            del self.store.uploads[upload_id]
        unused = [parts[n][:2] for n in parts if n not in chosen]
        self.store.discard(unused)
        obj = _Object([parts[n][:2] for n in chosen], self.store.etag(len(chosen)))
        self.store.publish(bucket, key, obj)
        self._reply(200, _xml("CompleteMultipartUploadResult", Location=f"/{bucket}/{key}",
                              Bucket=bucket, Key=key, ETag=obj.etag))

    def do_DELETE(self) -> None:
        bucket, key, query = self._target()
        self._drain()
        if "uploadId" in query:
            with self.store.lock:
                upload = self.store.uploads.pop(query["uploadId"], None)
            if upload is None:
                return self._error(404, "NoSuchUpload", "The specified upload does not exist.",
                                   query["uploadId"])
            self.store.discard([part[:2] for part in upload[2].values()])
            return self._reply(204)
        if key:
            self.store.delete(bucket, key)
        self._reply(204)

    def _list(self, bucket: str, query: dict[str, str]) -> None:
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        limit = max(1, min(1000, int(query.get("max-keys", "1000") or 1000)))
        after = query.get("continuation-token") or query.get("start-after", "")
        with self.store.lock:
            names = sorted((key, obj) for (b, key), obj in self.store.objects.items()
                           if b == bucket and key.startswith(prefix) and key > after)
        contents, prefixes, last, truncated = [], [], "", False
        for key, obj in names:
            if delimiter and delimiter in key[len(prefix):]:
                common = prefix + key[len(prefix):].split(delimiter, 1)[0] + delimiter
                if common in prefixes:
                    continue
                entry = f"<CommonPrefixes><Prefix>{escape(common)}</Prefix></CommonPrefixes>"
            else:
                common = ""
                modified = datetime.datetime.fromtimestamp(obj.modified, datetime.timezone.utc)
                entry = (f"<Contents><Key>{escape(key)}</Key><LastModified>"
                         f"{modified.strftime('%Y-%m-%dT%H:%M:%S.000Z')}</LastModified>"
                         f"<ETag>{escape(obj.etag)}</ETag><Size>{obj.size}</Size>"
                         f"<StorageClass>STANDARD</StorageClass></Contents>")
            if len(contents) + len(prefixes) == limit:
                truncated = True
                break
            (prefixes if common else contents).append(common or entry)
            last = key if not common else common.rstrip(delimiter) + "\U0010ffff"
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="{_XMLNS}">'
                f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>"
                f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount>"
                f"<MaxKeys>{limit}</MaxKeys>"
                + (f"<Delimiter>{escape(delimiter)}</Delimiter>" if delimiter else "")
                + f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
                + (f"<NextContinuationToken>{escape(last)}</NextContinuationToken>"
                   if truncated else "")
                + "".join(contents)
                + "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>"
                          for p in prefixes)
                + "</ListBucketResult>")
        self._reply(200, body.encode())


def _xml(tag: str, **fields: str) -> bytes:
    inner = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in fields.items())
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<{tag} xmlns="{_XMLNS}">{inner}</{tag}>'
            ).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, handler, context: ssl.SSLContext | None) -> None:
        self.context = context
        super().__init__(address, handler)

    def get_request(self):
        sock, address = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.context is not None:
            # The handshake runs in the request's own thread (_Handler.setup), not here.
            sock = self.context.wrap_socket(sock, server_side=True,
                                            do_handshake_on_connect=False)
        return sock, address


def serve(root: Path, port: int = 0, cert: Path | None = None, key: Path | None = None,
          http_port: int | None = None) -> None:
    """Serve until SIGTERM/SIGINT; prints ``port N`` once listening. With a certificate,
    ``port`` speaks TLS, and ``http_port`` (if given; 0 for a free one) plain http to the same
    objects, announced as ``http-port N`` first."""
    store = _Store(root)
    servers = []
    if cert is not None and http_port is not None:
        servers.append(("http-port", _server(store, http_port, None)))
    context = None
    if cert is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
    servers.append(("port", _server(store, port, context)))

    def shutdown(*_: object) -> None:
        for _, server in servers:
            threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, shutdown)
    for label, server in servers:
        print(f"{label} {server.server_address[1]}", flush=True)
    threads = [threading.Thread(target=server.serve_forever, args=(0.5,), name=label)
               for label, server in servers]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
    except KeyboardInterrupt:
        shutdown()
    finally:
        for thread in threads:
            thread.join(10)
        for _, server in servers:
            server.server_close()


def _server(store: _Store, port: int, context: ssl.SSLContext | None) -> _Server:
    handler = type("Handler", (_Handler,), {"store": store, "tls": context is not None})
    return _Server(("127.0.0.1", port), handler, context)


# ---------------------------------------------------------------------- the process


class MiniS3:
    """The server as a child process on a free loopback port, its bodies in a fresh
    directory (on /dev/shm when there is one: tmpfs keeps the disk out of the figures).

    Args:
        tls: ``True`` makes a certificate now (:func:`make_tls`); a :class:`TLSFiles`
            uses that one; ``False`` speaks plain http.
        root: where bodies go (default: a fresh directory, removed by :meth:`stop`).
    """

    def __init__(self, tls: bool | TLSFiles = False, root: Path | None = None) -> None:
        self._own_root = root is None
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="mini-s3-", dir=shm))
        self._certs = None
        if tls is True:
            self._certs = Path(tempfile.mkdtemp(prefix="mini-s3-tls-"))
            tls = make_tls(self._certs)
        self.tls: TLSFiles | None = tls or None
        self.process: subprocess.Popen | None = None
        self.port = 0
        #: With TLS, a second port speaking plain http to the same objects.
        self.http_port = 0

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def http_endpoint(self) -> str:
        """Plain http to the same objects (with TLS, its second port)."""
        return f"http://127.0.0.1:{self.http_port if self.tls else self.port}"

    @property
    def ca_file(self) -> str | None:
        return str(self.tls.ca_file) if self.tls else None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 30) -> MiniS3:
        # The file itself, not ``-m``: it needs only the standard library, so any interpreter
        # runs it, whatever is installed there.
        command = [sys.executable, __file__, "--root", str(self.root)]
        if self.tls:
            command += ["--cert", str(self.tls.cert_file), "--key", str(self.tls.key_file),
                        "--http-port", "0"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE)
        # Raw reads under select: a buffered reader could swallow the second line unseen.
        deadline = time.monotonic() + timeout
        said = b""
        while b"\nport " not in b"\n" + said or not said.endswith(b"\n"):
            ready, _, _ = select.select([self.process.stdout], [], [],
                                        max(0.0, deadline - time.monotonic()))
            piece = os.read(self.process.stdout.fileno(), 4096) if ready else b""
            if not piece:
                break
            said += piece
        ports = dict(line.split() for line in said.decode().splitlines() if " " in line)
        line = f"port {ports['port']}" if "port" in ports else said.decode()
        self.http_port = int(ports.get("http-port", 0))
        if not line.startswith("port "):
            self.process.kill()
            self.process.wait(10)
            self.stop()
            raise RuntimeError(f"mini-s3 did not start within {timeout} s"
                               f" (exit status {self.process.returncode}, said {line!r})")
        self.port = int(line.split()[1])
        return self

    def env(self, tls: bool | None = None) -> dict[str, str]:
        """Variables that point botocore/s3fs (``AWS_*``) and upstream's SDK
        (``FLYTE_AWS_*``) at this server, and make TLS clients trust its CA
        (``AWS_CA_BUNDLE`` for botocore, ``SSL_CERT_FILE`` for OpenSSL and rustls).
        ``tls=False`` gives the plain http port of a TLS server."""
        endpoint = self.http_endpoint if tls is False else self.endpoint
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "mini",
            "AWS_SECRET_ACCESS_KEY": "mini-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "FLYTE_AWS_ENDPOINT": endpoint,
            "FLYTE_AWS_ACCESS_KEY_ID": "mini",
            "FLYTE_AWS_SECRET_ACCESS_KEY": "mini-secret",
        }
        if self.tls and tls is not False:
            env["AWS_CA_BUNDLE"] = env["SSL_CERT_FILE"] = str(self.tls.ca_file)
        return env

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process is not None and self.process.stdout:
            self.process.stdout.close()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
        if self._certs is not None:
            shutil.rmtree(self._certs, ignore_errors=True)

    def __enter__(self) -> MiniS3:
        return self.start() if self.process is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--http-port", type=int, default=None,
                        help="with --cert, also plain http on this port (0: a free one)")
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    serve(args.root, args.port, args.cert, args.key, args.http_port)


if __name__ == "__main__":
    main()
