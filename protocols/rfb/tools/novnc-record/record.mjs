// Records a real noVNC session with a QEMU VNC server, in the capture format of
// ../../tests/support/capture.rs, for the codec's fixtures.
//
//   VIZOR_VNC_PASSWORD=... node record.mjs HOST:PORT OUT.rfbcap.gz
//
// noVNC runs in headless Chromium (Debian's /usr/bin/chromium) and connects through a
// WebSocket-to-TCP bridge in this process, which records every byte both ways with
// timestamps. The page types keys, moves and clicks the pointer and pastes clipboard
// text; noVNC itself decides what goes on the wire. The VNC authentication response is
// zeroed in the record.
import { createServer } from "node:http";
import { readFileSync } from "node:fs";
import { writeFileSync } from "node:fs";
import { connect } from "node:net";
import { gzipSync } from "node:zlib";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { WebSocketServer } from "ws";
import { chromium } from "playwright-core";

const [addr, out] = process.argv.slice(2);
const password = process.env.VIZOR_VNC_PASSWORD;
if (!addr || !out || !password) {
  console.error("usage: VIZOR_VNC_PASSWORD=... node record.mjs HOST:PORT OUT.rfbcap.gz");
  process.exit(2);
}
const [host, port] = [addr.slice(0, addr.lastIndexOf(":")), Number(addr.slice(addr.lastIndexOf(":") + 1))];
const here = dirname(fileURLToPath(import.meta.url));
const novnc = join(here, "node_modules/@novnc/novnc");

const start = process.hrtime.bigint();
const micros = () => (process.hrtime.bigint() - start) / 1000n;
const chunks = [];
let recording = true;
let c2sOffset = 0;
let lastS2C = 0n;
let chosenVncAuth = false;

function record(dir, buf) {
  if (!recording) return;
  let bytes = Buffer.from(buf);
  if (dir === "C") {
    // Version (12 bytes), security type (1), then the 16-byte VNC auth response.
    if (c2sOffset <= 12 && c2sOffset + bytes.length > 12) chosenVncAuth = bytes[12 - c2sOffset] === 2;
    if (chosenVncAuth) {
      bytes = Buffer.from(bytes);
      for (let i = 0; i < bytes.length; i++) {
        const at = c2sOffset + i;
        if (at >= 13 && at < 29) bytes[i] = 0;
      }
    }
    c2sOffset += buf.length;
  } else {
    lastS2C = micros();
  }
  chunks.push({ dir, t: micros(), bytes });
}

const page = `<!doctype html><meta charset="utf-8"><title>rec</title>
<div id="screen" style="width:800px;height:600px"></div>
<script type="module">
import RFB from "/novnc/core/rfb.js";
window.startVnc = (url, password) => new Promise((resolve, reject) => {
  const rfb = new RFB(document.getElementById("screen"), url, { credentials: { password } });
  rfb.addEventListener("connect", () => resolve());
  rfb.addEventListener("disconnect", (e) => reject(new Error("disconnected: " + JSON.stringify(e.detail))));
  rfb.addEventListener("securityfailure", (e) => reject(new Error("security failure: " + e.detail.reason)));
  window.rfb = rfb;
});
</script>`;

const http = createServer((req, res) => {
  if (req.url === "/") {
    res.writeHead(200, { "content-type": "text/html" });
    return res.end(page);
  }
  if (req.url.startsWith("/novnc/") && !req.url.includes("..")) {
    try {
      const body = readFileSync(join(novnc, req.url.slice("/novnc/".length)));
      res.writeHead(200, { "content-type": "text/javascript" });
      return res.end(body);
    } catch {
      /* fall through */
    }
  }
  res.writeHead(404);
  res.end();
});
const wss = new WebSocketServer({ server: http });
wss.on("connection", (ws) => {
  const tcp = connect(port, host);
  tcp.on("data", (d) => {
    record("S", d);
    ws.send(d);
  });
  ws.on("message", (d) => {
    record("C", d);
    tcp.write(d);
  });
  ws.on("close", () => tcp.end());
  tcp.on("close", () => ws.close());
});
await new Promise((r) => http.listen(0, "127.0.0.1", r));
const url = `http://127.0.0.1:${http.address().port}/`;

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const quiet = async (ms) => {
  for (let i = 0; i < 100 && micros() - lastS2C < BigInt(ms) * 1000n; i++) await sleep(100);
};
try {
  const p = await browser.newPage();
  await p.goto(url);
  await p.evaluate(([u, pw]) => window.startVnc(u, pw), [url.replace("http", "ws"), password]);
  await quiet(500);
  await p.evaluate(() => window.rfb.focus());
  for (const key of ["Escape", "a", "Shift+B", "Enter", "ArrowDown", "F2"]) {
    await p.keyboard.press(key);
    await sleep(50);
  }
  await p.evaluate(() => window.rfb.sendCtrlAltDel());
  const box = await p.locator("canvas").boundingBox();
  await p.mouse.move(box.x + 20, box.y + 20);
  await p.mouse.click(box.x + 40, box.y + 30);
  await p.mouse.wheel(0, 120);
  await p.evaluate(() => window.rfb.clipboardPasteFrom("vizor clipboard é"));
  await sleep(1000);
  await quiet(1000);
  recording = false;
  await p.evaluate(() => window.rfb.disconnect());
} finally {
  await browser.close();
  http.close();
}

const meta = JSON.stringify({
  scenario: "novnc-1.7",
  client: "noVNC 1.7.0 in headless Chromium",
  redacted: "the 16-byte VNC authentication response is zeroed",
});
const parts = [Buffer.from("VZRFBCAP1\n"), Buffer.from(meta + "\n")];
for (const c of chunks) {
  const h = Buffer.alloc(13);
  h[0] = c.dir.charCodeAt(0);
  h.writeBigUInt64BE(c.t, 1);
  h.writeUInt32BE(c.bytes.length, 9);
  parts.push(h, c.bytes);
}
writeFileSync(out, gzipSync(Buffer.concat(parts), { level: 9 }));
console.log(`${out}: ${chunks.length} chunks`);
