"""What `lmeraser forget|rectify|requests --server URL` calls: the service's API over HTTP, with the
standard library only (a CLI call stays light). The token comes from $LMERASER_API_TOKEN, else the
workspace's token file (a CLI on the service's own machine)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from lmeraser.errors import LmeraserError, shown

SERVER_ENV = "LMERASER_SERVER"


class Client:
    def __init__(self, url: str, token: str, timeout: float = 600.0):
        if not url.startswith(("http://", "https://")):
            raise LmeraserError(f"--server {shown(url, 200)}: not an http:// or https:// URL.")
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def _call(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None):
        request = urllib.request.Request(
            self.url + path, data=body, method=method, headers={"Authorization": f"Bearer {self.token}"}
        )
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as error:
            try:
                message = json.loads(error.read()).get("error")
            except (ValueError, AttributeError):
                message = None
            raise LmeraserError(f"{self.url}{path}: HTTP {error.code}: {message or error.reason}") from None
        except (urllib.error.URLError, OSError) as error:
            raise LmeraserError(
                f"{self.url}: the service cannot be reached ({getattr(error, 'reason', error)})."
            ) from None

    def submit(self, requests: list[dict], method: str, image: Path | None = None) -> dict:
        """Submit requests (all or none); `image` is a rectify request's corrected image file."""
        body = {"requests": requests, "method": method} if image is None else {**requests[0], "method": method}
        if image is None:
            return self._call("POST", "/v1/requests", json.dumps(body).encode(), "application/json")
        from lmeraser.io import read_input_bytes
        from lmeraser.request import MAX_IMAGE_FILE

        raw = read_input_bytes(image, "corrected input", MAX_IMAGE_FILE)
        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="request"\r\n\r\n'.encode()
            + json.dumps(body).encode()
            + b"\r\n",
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + raw
            + b"\r\n",
            f"--{boundary}--\r\n".encode(),
        ]
        return self._call("POST", "/v1/requests", b"".join(parts), f"multipart/form-data; boundary={boundary}")

    def requests(self, pending: bool = False, overdue: bool = False) -> list[dict]:
        return self._call("GET", f"/v1/requests?pending={str(pending).lower()}&overdue={str(overdue).lower()}")

    def health(self) -> dict:
        return self._call("GET", "/v1/health")
