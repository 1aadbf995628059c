"""A local GCS emulator for tests (gcp-storage-emulator on 127.0.0.1, in memory), run as a subprocess.

  python tests/gcs_emulator.py PORT BUCKET

One fix to the emulator: its media downloads lack the `x-goog-generation` header that real GCS sends, so
tensorstore (orbax's array store) reads every object as generation 0 and rejects its next conditional write
("Malformed StorageGeneration"). The wrapper below adds that header. The emulator ignores preconditions
(`ifGenerationMatch`), which is harmless here: one writer per object.
"""
from __future__ import annotations

import os
import sys
import time

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


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


def main() -> None:
  port, bucket = int(sys.argv[1]), sys.argv[2]
  _patch()
  srv = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  srv.start()
  print("ready", flush=True)
  parent = os.getppid()
  while os.getppid() == parent:             # exit with the test process, even when it is killed
    time.sleep(0.5)
  srv.stop()


if __name__ == "__main__":
  main()
