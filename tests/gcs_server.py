"""A GCS JSON API on 127.0.0.1 for the tests: `gcp-storage-emulator`, completed with two
things of the real API that tensorstore's OCDBT driver (under orbax) relies on and that the
emulator leaves out: an object's generation in the `x-goog-generation` header of a read, and
the `ifGenerationMatch` / `ifGenerationNotMatch` preconditions (a write that would replace an
object another writer changed fails with 412; a read of an unchanged object answers 304).

    python tests/gcs_server.py BUCKET

It listens on a port the system picks and prints that port once it is serving: a port chosen
by the caller and freed before the server binds it could be taken meanwhile by another test
worker's emulator, which the caller would then talk to instead.
"""

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


def install() -> None:
    """Wraps the emulator's object handlers in its routing tables."""
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
