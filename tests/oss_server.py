"""A local OSS-protocol server for tests: oss2 talks to it over real HTTP on 127.0.0.1.

As strict as OSS where it matters here: every request must carry a valid V1 signature (HMAC-SHA1 over the verb,
Content-MD5, Content-Type, Date, the canonical x-oss-* headers and the resource with its sub-resources) from the
configured key pair and a Date within 15 minutes; failures answer with OSS's error XML (InvalidAccessKeyId,
SignatureDoesNotMatch, RequestTimeTooSkewed, NoSuchBucket, NoSuchKey, InvalidPart, NoSuchUpload, InvalidDigest,
FileAlreadyExists). ``x-oss-forbid-overwrite: true`` on a put or a multipart completion refuses an existing key with 409
FileAlreadyExists, atomically (the check and the write under one lock); a value other than true/false is a 400.
Implements put/get (with Range)/head/delete object, list objects v2 (prefix, max-keys, continuation-token,
start-after, url encoding) and multipart upload (initiate, upload part, complete, abort); GET and HEAD answer the
object's CRC-64 (x-oss-hash-crc64ecma) as OSS does. Faults can be injected: a fraction of requests answered 503, a
fraction of connections dropped without an answer, a delay per request, object bodies cut off after some bytes or
with a flipped byte, and outages (:meth:`OssServer.outage`: connections refused, then back on the same port).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import random
import secrets
import socket
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, unquote, urlsplit
from xml.etree import ElementTree

# The sub-resources OSS includes in the signed resource (those oss2 may send here).
SUBRESOURCES = frozenset(
    {
        "acl",
        "uploads",
        "uploadId",
        "partNumber",
        "continuation-token",
        "delete",
        "append",
        "position",
        "tagging",
        "objectMeta",
        "symlink",
        "security-token",
        "response-content-type",
        "response-content-disposition",
    }
)


@dataclass
class Faults:
    """Injected faults: each request is answered 503 with probability ``error_rate``, has its connection dropped with
    probability ``drop_rate`` (before it is applied), and waits ``delay_s`` first."""

    error_rate: float = 0.0
    drop_rate: float = 0.0
    delay_s: float = 0.0
    cut_bodies: int = 0  # the next this many object bodies (GET) stop after cut_after bytes and the connection drops
    cut_after: int = 0
    corrupt_bodies: int = 0  # the next this many object bodies have one byte flipped
    seed: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


@dataclass
class Stored:
    data: bytes
    etag: str
    mtime: datetime


class OssServer:
    """One bucket on a loopback port. Use as a context manager; ``endpoint`` is what oss2 connects to."""

    def __init__(self, access_key_id: str, access_key_secret: str, bucket: str) -> None:
        self.access_key_id, self.access_key_secret, self.bucket = access_key_id, access_key_secret, bucket
        self.objects: dict[str, Stored] = {}
        self.uploads: dict[str, dict[int, bytes]] = {}
        self.faults = Faults()
        self.counts = {"requests": 0, "errors_503": 0, "dropped": 0, "rejected": 0, "outages": 0}
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"oss": self})
        self.down = threading.Event()
        self._handler = handler
        self._httpd = self._listen(0)
        self._port = self._httpd.server_address[1]

    def _listen(self, port: int) -> ThreadingHTTPServer:
        httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler)
        httpd.daemon_threads = True
        return httpd

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def __enter__(self) -> OssServer:
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def go_down(self) -> None:
        """Unreachable: new connections are refused (the listening socket is closed) and requests on connections
        already open are dropped without an answer."""
        self.down.set()
        self.counts["outages"] += 1
        self._httpd.shutdown()
        self._httpd.server_close()

    def come_back(self) -> None:
        """Listens again on the same port."""
        self._httpd = self._listen(self._port)
        self.down.clear()
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def outage(self, seconds: float, after_requests: int = 0, when=None) -> threading.Thread:
        """Goes down for ``seconds``, in a background thread, once ``after_requests`` more requests were served and
        ``when()`` (if given) holds, e.g. once a stage has written its first output object."""

        def run() -> None:
            target = self.counts["requests"] + after_requests
            while self.counts["requests"] < target or (when is not None and not when()):
                threading.Event().wait(0.01)
            self.go_down()
            threading.Event().wait(seconds)
            self.come_back()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def signature(self, string_to_sign: bytes) -> str:
        digest = hmac.new(self.access_key_secret.encode(), string_to_sign, hashlib.sha1).digest()
        return base64.b64encode(digest).decode()


class OssError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    oss: OssServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    # ---------------------------------------------------------------------------------------------------- plumbing

    def _handle(self) -> None:
        oss = self.oss
        body = self._read_body()
        if oss.down.is_set():  # a keep-alive connection from before the outage
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        with oss.lock:
            oss.counts["requests"] += 1
            roll_drop, roll_error = oss.faults.rng.random(), oss.faults.rng.random()
        if oss.faults.delay_s:
            threading.Event().wait(oss.faults.delay_s)
        if roll_drop < oss.faults.drop_rate:
            with oss.lock:
                oss.counts["dropped"] += 1
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        try:
            split = urlsplit(self.path)
            params = dict(parse_qsl(split.query, keep_blank_values=True))
            bucket, _, key = unquote(split.path).lstrip("/").partition("/")
            self._authenticate(bucket, key, params)
            if roll_error < oss.faults.error_rate:
                with oss.lock:
                    oss.counts["errors_503"] += 1
                raise OssError(503, "ServiceUnavailable", "Please reduce your request rate.")
            if bucket != oss.bucket:
                raise OssError(404, "NoSuchBucket", "The specified bucket does not exist.")
            self._dispatch(key, params, body)
        except OssError as err:
            if err.status == 403:
                with oss.lock:
                    oss.counts["rejected"] += 1
            self._error(err)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authenticate(self, bucket: str, key: str, params: dict[str, str]) -> None:
        oss = self.oss
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("OSS ") or ":" not in auth:
            raise OssError(403, "AccessDenied", "Anonymous access is forbidden for this operation.")
        key_id, _, signature = auth[4:].partition(":")
        if key_id != oss.access_key_id:
            raise OssError(
                403, "InvalidAccessKeyId", "The OSS Access Key Id you provided does not exist in our records."
            )
        date = self.headers.get("x-oss-date") or self.headers.get("Date", "")
        try:
            skew = abs((datetime.now(UTC) - parsedate_to_datetime(date)).total_seconds())
        except (TypeError, ValueError):
            raise OssError(403, "AccessDenied", "Invalid date in the request.") from None
        if skew > 15 * 60:
            raise OssError(403, "RequestTimeTooSkewed", "The difference between the request time and now is too large.")
        canonical = sorted(
            (name.lower(), value) for name, value in self.headers.items() if name.lower().startswith("x-oss-")
        )
        sub = sorted((k, v) for k, v in params.items() if k in SUBRESOURCES)
        resource = f"/{bucket}/{key}"
        if sub:
            resource += "?" + "&".join(f"{k}={v}" if v else k for k, v in sub)
        string_to_sign = "\n".join(
            [
                self.command,
                self.headers.get("Content-MD5", ""),
                self.headers.get("Content-Type", ""),
                date,
                "".join(f"{k}:{v}\n" for k, v in canonical) + resource,
            ]
        ).encode()
        if not hmac.compare_digest(signature, oss.signature(string_to_sign)):
            raise OssError(403, "SignatureDoesNotMatch", "The request signature we calculated does not match.")

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("x-oss-request-id", secrets.token_hex(12).upper())
        self.send_header("Date", format_datetime(datetime.now(UTC), usegmt=True))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, err: OssError) -> None:
        root = ElementTree.Element("Error")
        for tag, text in (
            ("Code", err.code),
            ("Message", err.message),
            ("RequestId", secrets.token_hex(12).upper()),
            ("HostId", "127.0.0.1"),
        ):
            ElementTree.SubElement(root, tag).text = text
        body = b'<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(root)
        self._send(err.status, body, {"Content-Type": "application/xml"})

    # -------------------------------------------------------------------------------------------------- operations

    def _dispatch(self, key: str, params: dict[str, str], body: bytes) -> None:
        verb = self.command
        if not key:
            if verb == "GET" and params.get("list-type") == "2":
                return self._list_v2(params)
            raise OssError(400, "NotImplemented", f"{verb} on a bucket is not implemented here")
        if verb == "POST" and "uploads" in params:
            return self._initiate(key)
        if verb == "PUT" and "uploadId" in params:
            return self._upload_part(params, body)
        if verb == "POST" and "uploadId" in params:
            return self._complete(key, params, body)
        if verb == "DELETE" and "uploadId" in params:
            self._upload(params["uploadId"])
            with self.oss.lock:
                del self.oss.uploads[params["uploadId"]]
            return self._send(204)
        if verb == "PUT":
            return self._put(key, body)
        if verb in ("GET", "HEAD"):
            return self._get(key)
        if verb == "DELETE":
            with self.oss.lock:
                self.oss.objects.pop(key, None)
            return self._send(204)
        raise OssError(405, "MethodNotAllowed", f"{verb} is not allowed")

    def _put(self, key: str, body: bytes) -> None:
        md5 = hashlib.md5(body).digest()
        claimed = self.headers.get("Content-MD5")
        if claimed and claimed != base64.b64encode(md5).decode():
            raise OssError(400, "InvalidDigest", "The Content-MD5 you specified was invalid.")
        etag = md5.hex().upper()
        forbid = self._forbid_overwrite()
        with self.oss.lock:
            self._refuse_existing(key, forbid)
            self.oss.objects[key] = Stored(body, etag, datetime.now(UTC))
        self._send(200, headers={"ETag": f'"{etag}"'})

    def _forbid_overwrite(self) -> bool:
        value = self.headers.get("x-oss-forbid-overwrite")
        if value not in (None, "true", "false"):
            raise OssError(400, "InvalidArgument", "x-oss-forbid-overwrite must be true or false.")
        return value == "true"

    def _refuse_existing(self, key: str, forbid: bool) -> None:
        """Called with the lock held, so no other write can slip in between the check and the write."""
        if forbid and key in self.oss.objects:
            message = "The object you specified already exists and can not be overwritten."
            raise OssError(409, "FileAlreadyExists", message)

    def _get(self, key: str) -> None:
        with self.oss.lock:
            obj = self.oss.objects.get(key)
        if obj is None:
            raise OssError(404, "NoSuchKey", "The specified key does not exist.")
        headers = {
            "ETag": f'"{obj.etag}"',
            "Last-Modified": format_datetime(obj.mtime, usegmt=True),
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "x-oss-hash-crc64ecma": str(_crc64(obj.data)),
        }
        data, status = obj.data, 200
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes="):
            first, _, last = range_header[6:].partition("-")
            start = int(first) if first else max(0, len(data) - int(last))
            end = min(int(last), len(data) - 1) if first and last else len(data) - 1
            if start < len(data) and start <= end:
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start : end + 1], 206
        if self.command == "HEAD":
            headers["Content-Length-Real"] = str(len(data))
            self.send_response(status)
            self.send_header("x-oss-request-id", secrets.token_hex(12).upper())
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return
        with self.oss.lock:
            cut, corrupt = self.oss.faults.cut_bodies > 0, self.oss.faults.corrupt_bodies > 0
            self.oss.faults.cut_bodies -= cut
            self.oss.faults.corrupt_bodies -= corrupt and not cut
        if corrupt and not cut and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if not cut:
            return self._send(status, data, headers)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: self.oss.faults.cut_after])
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _list_v2(self, params: dict[str, str]) -> None:
        prefix = params.get("prefix", "")
        max_keys = min(int(params.get("max-keys") or 100), 1000)
        after = params.get("continuation-token") or params.get("start-after") or ""
        with self.oss.lock:
            keys = sorted(k for k in self.oss.objects if k.startswith(prefix) and k > after)
            page = [(k, self.oss.objects[k]) for k in keys[:max_keys]]
        truncated = len(keys) > max_keys
        url = params.get("encoding-type") == "url"

        def enc(text: str) -> str:
            return quote(text, safe="/") if url else text

        root = ElementTree.Element("ListBucketResult")
        for tag, text in (
            ("Name", self.oss.bucket),
            ("Prefix", enc(prefix)),
            ("MaxKeys", str(max_keys)),
            ("KeyCount", str(len(page))),
            ("IsTruncated", str(truncated).lower()),
        ):
            ElementTree.SubElement(root, tag).text = text
        if url:
            ElementTree.SubElement(root, "EncodingType").text = "url"
        if truncated:
            ElementTree.SubElement(root, "NextContinuationToken").text = enc(page[-1][0])
        for k, obj in page:
            node = ElementTree.SubElement(root, "Contents")
            for tag, text in (
                ("Key", enc(k)),
                ("LastModified", obj.mtime.strftime("%Y-%m-%dT%H:%M:%S.000Z")),
                ("ETag", f'"{obj.etag}"'),
                ("Type", "Normal"),
                ("Size", str(len(obj.data))),
                ("StorageClass", "Standard"),
            ):
                ElementTree.SubElement(node, tag).text = text
        self._send(200, ElementTree.tostring(root), {"Content-Type": "application/xml"})

    def _upload(self, upload_id: str) -> dict[int, bytes]:
        with self.oss.lock:
            parts = self.oss.uploads.get(upload_id)
        if parts is None:
            raise OssError(404, "NoSuchUpload", "The specified upload does not exist.")
        return parts

    def _initiate(self, key: str) -> None:
        upload_id = secrets.token_hex(16).upper()
        with self.oss.lock:
            self.oss.uploads[upload_id] = {}
        root = ElementTree.Element("InitiateMultipartUploadResult")
        for tag, text in (("Bucket", self.oss.bucket), ("Key", key), ("UploadId", upload_id)):
            ElementTree.SubElement(root, tag).text = text
        self._send(200, ElementTree.tostring(root), {"Content-Type": "application/xml"})

    def _upload_part(self, params: dict[str, str], body: bytes) -> None:
        parts = self._upload(params["uploadId"])
        with self.oss.lock:
            parts[int(params["partNumber"])] = body
        self._send(200, headers={"ETag": f'"{hashlib.md5(body).hexdigest().upper()}"'})

    def _complete(self, key: str, params: dict[str, str], body: bytes) -> None:
        parts = self._upload(params["uploadId"])
        listed = [
            (int(p.findtext("PartNumber")), p.findtext("ETag").strip('"'))
            for p in ElementTree.fromstring(body).findall("Part")
        ]
        data = []
        for number, etag in listed:
            if number not in parts or hashlib.md5(parts[number]).hexdigest().upper() != etag:
                raise OssError(400, "InvalidPart", f"part {number} was not uploaded or its ETag does not match")
            data.append(parts[number])
        blob = b"".join(data)
        etag = f"{hashlib.md5(b''.join(hashlib.md5(d).digest() for d in data)).hexdigest().upper()}-{len(data)}"
        forbid = self._forbid_overwrite()
        with self.oss.lock:
            self._refuse_existing(key, forbid)
            self.oss.objects[key] = Stored(blob, etag, datetime.now(UTC))
            del self.oss.uploads[params["uploadId"]]
        root = ElementTree.Element("CompleteMultipartUploadResult")
        for tag, text in (("Bucket", self.oss.bucket), ("Key", key), ("ETag", f'"{etag}"')):
            ElementTree.SubElement(root, tag).text = text
        self._send(200, ElementTree.tostring(root), {"Content-Type": "application/xml"})


def _crc64(data: bytes) -> int:
    import oss2

    crc = oss2.utils.Crc64(0)
    crc.update(data)
    return crc.crc


def main() -> None:
    """Serves one bucket until SIGTERM/SIGINT (``make demo-oss``), optionally seeded with a folder's files."""
    import argparse
    import os
    import signal
    from pathlib import Path

    parser = argparse.ArgumentParser(description="Local OSS-protocol server (loopback only).")
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--seed-from", type=Path, help="upload this folder's files at start")
    parser.add_argument("--seed-prefix", default="", help="key prefix for the seeded files")
    parser.add_argument("--endpoint-file", type=Path, help="write the endpoint here once listening")
    args = parser.parse_args()
    # The key pair comes from the environment, as the pipeline's does; it is never printed.
    server = OssServer(os.environ["OSS_ACCESS_KEY_ID"], os.environ["OSS_ACCESS_KEY_SECRET"], args.bucket)
    if args.seed_from:
        for path in sorted(p for p in args.seed_from.rglob("*") if p.is_file()):
            data = path.read_bytes()
            key = args.seed_prefix + path.relative_to(args.seed_from).as_posix()
            server.objects[key] = Stored(data, hashlib.md5(data).hexdigest().upper(), datetime.now(UTC))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with server:
        if args.endpoint_file:
            args.endpoint_file.write_text(server.endpoint)
        print(f"OSS test server for bucket {args.bucket!r} at {server.endpoint} ({len(server.objects)} objects)")
        stop.wait()


if __name__ == "__main__":
    main()
