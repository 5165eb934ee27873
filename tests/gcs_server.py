"""A GCS JSON API on 127.0.0.1 for the tests: `gcp-storage-emulator`, completed with two
things of the real API that tensorstore's OCDBT driver (under orbax) relies on and that the
emulator leaves out: an object's generation in the `x-goog-generation` header of a read, and
the `ifGenerationMatch` / `ifGenerationNotMatch` preconditions (a write that would replace an
object another writer changed fails with 412; a read of an unchanged object answers 304); a
write's body read before it is answered; and multipart uploads read byte for byte. The
emulator parses those with Python's email parser, which takes a line ending at the end of the
file's bytes for the one before the closing delimiter: gcsfs ends its lines with LF, so a file
whose last byte is CR lost it, and a checkpoint copied through gcsfs no longer matched its
recorded MD5 now and then.

    python tests/gcs_server.py BUCKET

It listens on a port the system picks and prints that port once it is serving: a port chosen
by the caller and freed before the server binds it could be taken meanwhile by another test
worker's emulator, which the caller would then talk to instead.
"""

import http.server
import json
import re
import sys
import threading
import time
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_LOCK = threading.Lock()  # a precondition and the write it guards happen together


def _generation(storage, bucket: str, name: str) -> str:
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"  # the API's generation of an object that does not exist


def _precondition_failed(response) -> None:
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({"error": {"code": 412, "message": "Precondition Failed"}})


def _with_generations(handler, reads: bool):
    def wrapped(request, response, storage, *args, **kwargs):
        params = request.params or {}
        bucket = params.get("bucket_name")
        name = params.get("object_id") or (request.query.get("name") or [None])[0]
        if bucket is None or name is None:
            return handler(request, response, storage, *args, **kwargs)
        if not reads:
            # The body is read before any answer: a write refused by its precondition would
            # otherwise be answered and its connection closed with the body unread (which the
            # kernel answers with a reset), as the real API never does.
            request.data  # noqa: B018
        with _LOCK:
            current = _generation(storage, bucket, name)
            match = request.query.get("ifGenerationMatch")
            not_match = request.query.get("ifGenerationNotMatch")
            if match and match[0] != current and not (reads and current == "0"):
                return _precondition_failed(response)
            if not_match and not_match[0] == current:
                if not reads:
                    return _precondition_failed(response)
                response.status = HTTPStatus.NOT_MODIFIED
                response["x-goog-generation"] = current
                return None
            out = handler(request, response, storage, *args, **kwargs)
            if reads and current != "0" and response.status.value < 300:
                response["x-goog-generation"] = current
            return out

    return wrapped


def _multipart_related(raw: bytes, content_type: str) -> dict:
    """The JSON metadata and the file's bytes of a `multipart/related` upload body. Each part
    follows its delimiter's line ending, and the line ending before the next delimiter belongs
    to that delimiter; parts use the line ending of the first (CRLF, or gcsfs's LF)."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type).group(1).encode()
    parts = raw.split(b"--" + boundary)[1:-1]
    newline = b"\r\n" if parts[0].startswith(b"\r\n") else b"\n"
    out = []
    for part in parts:
        headers, _, body = part[len(newline) :].partition(newline * 2)
        if not body.endswith(newline):
            raise ValueError("a multipart part does not end with a line ending")
        out.append((headers.decode(), body[: -len(newline)]))
    media_type = re.search(r"(?im)^content-type:\s*(.+?)\s*$", out[1][0])
    return {
        "meta": json.loads(out[0][1]),
        "content": out[1][1],
        "content-type": media_type.group(1) if media_type else "application/octet-stream",
    }


def _read_data(request_handler, query):
    content_type = request_handler.headers.get("Content-Type") or ""
    if not content_type.startswith("multipart/related"):
        return _emulator_read_data(request_handler, query)
    raw = server._read_raw_data(request_handler)
    return _multipart_related(server._decode_raw_data(raw, request_handler), content_type)


_emulator_read_data = server._read_data


class _Backlogged(http.server.HTTPServer):
    # Connections waiting to be accepted: http.server's 5 overflowed when tensorstore opened
    # its dozens at once, and the connections the kernel dropped stalled (a request answered
    # after seconds, now and then never).
    request_queue_size = 1024


def install() -> None:
    """Wraps the emulator's object handlers in its routing tables, reads multipart uploads
    with `_read_data`, and gives its server a backlog that holds a client's connections."""
    server.server.HTTPServer = _Backlogged
    server._read_data = _read_data
    wrapped = {
        objects.download: _with_generations(objects.download, reads=True),
        objects.get: _with_generations(objects.get, reads=True),
        objects.insert: _with_generations(objects.insert, reads=False),
        objects.delete: _with_generations(objects.delete, reads=False),
    }
    for _, methods in server.HANDLERS:
        for method, handler in methods.items():
            methods[method] = wrapped.get(handler, handler)


if __name__ == "__main__":
    install()
    emulator = server.create_server("127.0.0.1", 0, in_memory=True, default_bucket=sys.argv[1])
    emulator.start()
    print(emulator._api._httpd.server_port, flush=True)
    while True:  # until terminated
        time.sleep(3600)
