"""Reading a report page back: its tables (standard-library HTML parser) and its rendering in headless Chromium.

The browser is driven over the Chrome DevTools protocol with a small WebSocket client written on the standard
library (RFC 6455: the handshake, masked client frames, unmasked server frames), so the tests need neither Selenium
nor Playwright.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"

# -------------------------------------------------------------------------------------------------- tables


@dataclass
class Cell:
    tag: str
    attrs: dict[str, str]
    text: str = ""

    @property
    def value(self) -> str | None:
        return self.attrs.get("data-value")

    def number(self) -> float | None:
        v = self.attrs.get("data-value")
        return None if v in (None, "") else float(v)


@dataclass
class Table:
    attrs: dict[str, str]
    rows: list[tuple[dict[str, str], list[Cell]]] = field(default_factory=list)
    images: int = 0

    def kv(self) -> dict[str, Cell]:
        """A two-column key/value table as ``{data-key: value cell}``."""
        return {cells[1].attrs["data-key"]: cells[1] for _, cells in self.rows if len(cells) == 2}

    def by(self, row_attr: str) -> dict[str, dict[str, Cell]]:
        """Rows keyed by a row attribute (``data-threat``), each as ``{data-col: cell}``."""
        return {
            attrs[row_attr]: {c.attrs["data-col"]: c for c in cells if "data-col" in c.attrs}
            for attrs, cells in self.rows
            if row_attr in attrs
        }

    def records(self) -> list[dict[str, Cell]]:
        """Rows with ``data-col`` cells, in order."""
        return [
            {c.attrs["data-col"]: c for c in cells if "data-col" in c.attrs}
            for _, cells in self.rows
            if any("data-col" in c.attrs for c in cells)
        ]


class PageParser(HTMLParser):
    """Collects every table with an ``id`` (nested tables are not used by the report), and other ids."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, Table] = {}
        self.ids: dict[str, dict[str, str]] = {}
        self.text_by_id: dict[str, str] = {}
        self._table: Table | None = None
        self._row: list[Cell] | None = None
        self._cell: Cell | None = None
        self._open_ids: list[tuple[str, str, int]] = []  # (id, tag, depth)
        self._depth = 0
        self._texts: dict[str, list[str]] = {}
        self.all_text: list[str] = []

    def handle_starttag(self, tag: str, attrs_list: list[tuple[str, str | None]]) -> None:
        attrs = {k: v or "" for k, v in attrs_list}
        if tag not in ("img", "br", "meta", "input"):
            self._depth += 1
        if "id" in attrs:
            self.ids[attrs["id"]] = attrs
            if tag not in ("img", "br"):
                self._open_ids.append((attrs["id"], tag, self._depth))
                self._texts[attrs["id"]] = []
        if tag == "table" and "id" in attrs:
            self._table = Table(attrs)
            self.tables[attrs["id"]] = self._table
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.rows.append((attrs, self._row))
        elif tag in ("td", "th") and self._row is not None:
            self._cell = Cell(tag, attrs)
            self._row.append(self._cell)
        elif tag == "img" and self._table is not None:
            self._table.images += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            if self._cell is not None:
                self._cell.text = self._cell.text.strip()
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "table":
            self._table = None
        while self._open_ids and self._open_ids[-1][2] >= self._depth:
            ident, _, _ = self._open_ids.pop()
            self.text_by_id[ident] = " ".join("".join(self._texts[ident]).split())
        if tag not in ("img", "br", "meta", "input"):
            self._depth -= 1

    def handle_data(self, data: str) -> None:
        self.all_text.append(data)
        if self._cell is not None:
            self._cell.text += data
        for ident, _, _ in self._open_ids:
            self._texts[ident].append(data)


def parse_page(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


# -------------------------------------------------------------------------------------------------- browser


class WebSocket:
    """The client side of a WebSocket (text frames only), enough for the DevTools protocol."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        m = re.fullmatch(r"ws://([^:/]+):(\d+)(/.*)", url)
        if m is None:
            raise ValueError(f"not a ws:// URL: {url}")
        host, port, path = m.group(1), int(m.group(2)), m.group(3)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the DevTools server closed the connection during the handshake")
            head += chunk
        status, _, rest = head.partition(b"\r\n\r\n")
        if b" 101 " not in status.split(b"\r\n")[0]:
            raise ConnectionError(f"WebSocket handshake refused: {status.decode(errors='replace')}")
        self.buffer = rest

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the DevTools connection closed")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def send(self, text: str) -> None:
        payload = text.encode()
        head = bytearray([0x81])  # FIN + text frame
        n = len(payload)
        if n < 126:
            head.append(0x80 | n)
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(bytes(head) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self) -> str:
        message = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else b""
            data = self._read(n)
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("the DevTools server closed the WebSocket")
            if opcode in (0x9, 0xA):  # ping / pong: not used by Chromium here
                continue
            message += data
            if b0 & 0x80:
                return message.decode()

    def close(self) -> None:
        self.sock.close()


@dataclass
class Rendered:
    """What the browser saw: console and page errors, requests leaving the file, and every figure's size."""

    errors: list[str]
    requests: list[str]
    figures: list[dict[str, Any]]


_MEASURE = """JSON.stringify(Array.from(document.querySelectorAll('img, svg')).map(e => {
  const r = e.getBoundingClientRect();
  return {tag: e.tagName, alt: e.getAttribute('alt') || '', width: r.width, height: r.height,
          natural: e.tagName === 'IMG' ? e.naturalWidth * e.naturalHeight : null,
          complete: e.tagName === 'IMG' ? e.complete : true};
}))"""


def render(page: Path, timeout: float = 60.0) -> Rendered:
    """Load ``page`` in headless Chromium and report its errors, outgoing requests and figure sizes.

    Raises:
        FileNotFoundError: Chromium is not installed at :data:`CHROMIUM`.
    """
    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="bastion-chromium-")
    proc = subprocess.Popen(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
            "--window-size=1280,1024", "about:blank",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        port_file = Path(profile) / "DevToolsActivePort"
        while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Chromium did not start: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as resp:
            targets = json.load(resp)
        target = next(t for t in targets if t.get("type") == "page")
        ws = WebSocket(target["webSocketDebuggerUrl"], timeout=timeout)
        try:
            return _drive(ws, page, deadline)
        finally:
            ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(profile, ignore_errors=True)


def _drive(ws: WebSocket, page: Path, deadline: float) -> Rendered:
    counter = iter(range(1, 1 << 30))
    errors: list[str] = []
    requests: list[str] = []

    def send(method: str, **params: Any) -> int:
        ident = next(counter)
        ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        return ident

    def wait(ident: int | None = None, event: str | None = None) -> dict[str, Any]:
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Chromium did not answer in time (waiting for {ident or event})")
            msg = json.loads(ws.recv())
            method = msg.get("method")
            if method == "Runtime.consoleAPICalled" and msg["params"]["type"] in ("error", "assert"):
                errors.append("console: " + json.dumps(msg["params"]["args"]))
            elif method == "Runtime.exceptionThrown":
                errors.append("exception: " + json.dumps(msg["params"]["exceptionDetails"]))
            elif method == "Log.entryAdded" and msg["params"]["entry"]["level"] == "error":
                errors.append("log: " + msg["params"]["entry"].get("text", ""))
            elif method == "Network.requestWillBeSent":
                url = msg["params"]["request"]["url"]
                if not url.startswith(("data:", "file:")):
                    requests.append(url)
            if ident is not None and msg.get("id") == ident:
                if "error" in msg:
                    raise RuntimeError(f"DevTools error: {msg['error']}")
                return msg
            if event is not None and method == event:
                return msg

    for method in ("Runtime.enable", "Log.enable", "Page.enable", "Network.enable"):
        wait(send(method))
    wait(send("Page.navigate", url=page.resolve().as_uri()))
    wait(event="Page.loadEventFired")
    result = wait(send("Runtime.evaluate", expression=_MEASURE, returnByValue=True))
    figures = json.loads(result["result"]["result"]["value"])
    return Rendered(errors=errors, requests=requests, figures=figures)
