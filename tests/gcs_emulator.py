"""A local GCS emulator for tests (gcp-storage-emulator on 127.0.0.1, in memory), run as a subprocess.

  python tests/gcs_emulator.py PORT BUCKET

The emulator's routes and storage are used as they are; three things around them are changed:

* Threads. Its server (`http.server.HTTPServer`) handles one connection at a time. Clients that open several
  connections (tensorstore's curl pool, gcsfs's aiohttp pool, a second training process) then queue behind one
  another; a client that holds a connection open while it waits for another of its requests deadlocks the whole
  server (the hangs of #18). Here every connection gets a thread (`ThreadingHTTPServer`); one lock serialises the
  handlers (the emulator's storage is plain dicts), while request bodies are read before the lock is taken, so a
  slow sender never blocks the others.
* `Expect: 100-continue`. curl (tensorstore) sends it with every upload over 1 KiB and waits up to 1 s for the
  interim reply before sending the body; the emulator speaks HTTP/1.0, which never sends it, so every upload stalled
  for a second. Here the server speaks HTTP/1.1 (and answers 100 Continue), closing the connection after each
  response as before.
* `x-goog-generation`. Its media downloads lack the header that real GCS sends, so tensorstore (orbax's array store)
  reads every object as generation 0 and rejects its next conditional write ("Malformed StorageGeneration"). The
  header is added. Preconditions (`ifGenerationMatch`) are still ignored, which is harmless here: one writer per
  object.

Every request is logged to stdout as `METHOD path status seconds` (the tests keep it in a file, for post-mortems).
"""
from __future__ import annotations

import io
import os
import sys
import threading
import time
from functools import partial
from http import server as http_server

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import buckets, objects
from gcp_storage_emulator.storage import Storage

_download = objects.download
_LOCK = threading.Lock()


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  except NotFound:
    pass
  return _download(request, response, storage, *args, **kwargs)


def _patch() -> None:
  objects.download = _download_with_generation          # objects.get(alt=media) calls it by name
  for _, handlers in server.HANDLERS:
    for method, fn in list(handlers.items()):
      if fn is _download:
        handlers[method] = _download_with_generation


class Handler(server.RequestHandler):
  """The emulator's handler, thread-safe, with HTTP/1.1 interim replies and one request per connection."""

  protocol_version = "HTTP/1.1"

  def _buffer_body(self) -> None:
    """Reads the whole request body now (outside the lock) and hands the emulator a Content-Length body."""
    length = self.headers.get("Content-Length")
    if length:
      body = self.rfile.read(int(length))
    elif (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
      parts = []
      while True:
        line = self.rfile.readline().strip().split(b";")[0]
        size = int(line, 16) if line else 0
        if size == 0:
          while self.rfile.readline().strip():          # trailers, up to the blank line
            pass
          break
        parts.append(self.rfile.read(size))
        self.rfile.readline()
      body = b"".join(parts)
      del self.headers["Transfer-Encoding"]
      self.headers["Content-Length"] = str(len(body))
    else:
      body = b""
    self.rfile = io.BytesIO(body)

  def _handle(self, method: str) -> None:
    t0 = time.perf_counter()
    self._buffer_body()
    self.close_connection = True
    with _LOCK:
      server.Router(self).handle(method)
    self._log(method, time.perf_counter() - t0)

  def send_response(self, code, message=None):
    self._status = code
    super().send_response(code, message)
    if code >= 200:
      self.send_header("Connection", "close")

  def _log(self, method: str, seconds: float) -> None:
    sys.stdout.write(f"{method} {self.path} {getattr(self, '_status', '-')} {seconds:.3f}\n")
    sys.stdout.flush()

  def do_GET(self):
    self._handle(server.GET)

  def do_POST(self):
    self._handle(server.POST)

  def do_DELETE(self):
    self._handle(server.DELETE)

  def do_PUT(self):
    self._handle(server.PUT)

  def do_PATCH(self):
    self._handle(server.PATCH)


class ThreadingServer(http_server.ThreadingHTTPServer):
  daemon_threads = True
  request_queue_size = 128

  def handle_error(self, request, client_address):
    if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
      return                                # the client stopped reading (e.g. a ranged read it had enough of)
    super().handle_error(request, client_address)


def serve(port: int, bucket: str) -> ThreadingServer:
  """Starts the emulator on 127.0.0.1:`port` with `bucket` created, in a background thread; returns the server."""
  _patch()
  storage = Storage(use_memory_fs=True)
  buckets.create_bucket(bucket, storage)
  httpd = ThreadingServer(("127.0.0.1", port), partial(Handler, storage))
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  return httpd


def main() -> None:
  port, bucket = int(sys.argv[1]), sys.argv[2]
  httpd = serve(port, bucket)
  print("ready", flush=True)
  parent = os.getppid()
  while os.getppid() == parent:             # exit with the test process, even when it is killed
    time.sleep(0.5)
  httpd.shutdown()


if __name__ == "__main__":
  main()
