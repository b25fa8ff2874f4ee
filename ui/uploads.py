"""Which files the server reads for a client: files uploaded to it and the bundled examples, never a URL.

Gradio fetches a URL it finds in a client's file input (`{"path": "https://...", "meta": {"_type":
"gradio.FileData"}}`) before any handler runs. `refuse_url_fetches` routes those fetches through a transport that
refuses them, so no connection is made and the client reads why; `accepted_video` then admits only paths inside
Gradio's upload folder or the examples folder (a client naming a plain path elsewhere on the server is refused).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import gradio as gr
import httpx
from gradio import processing_utils
from gradio.utils import get_upload_folder

from apbv.errors import InputError
from ui.examples import EXAMPLES_DIR

URL_REFUSED = "This server does not fetch URLs: upload the video file itself (or pick a bundled example)."


class _RefuseTransport(httpx.AsyncBaseTransport):
    """An HTTP transport that never connects."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise gr.Error(f"{URL_REFUSED} Refused: {request.url}", print_exception=False)


def refuse_url_fetches() -> None:
    """Make every server-side fetch of Gradio (URLs in clients' file inputs) fail before it connects."""
    processing_utils.async_transport = _RefuseTransport()


def accepted_video(value: dict | str | None) -> str:
    """The server path of a client's video (a Gradio FileData dict or a path); raises InputError for a URL or a
    file outside the upload and examples folders."""
    path = value.get("path") if isinstance(value, dict) else value
    if not path:
        raise InputError("no video: upload one (or pick an example) first")
    if len(urlparse(str(path)).scheme) > 1:  # a one-letter scheme is a Windows drive
        raise InputError(URL_REFUSED)
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(Path(folder).resolve()) for folder in (get_upload_folder(), EXAMPLES_DIR)):
        raise InputError("only videos uploaded to this server and the bundled examples can be read")
    return str(resolved)
