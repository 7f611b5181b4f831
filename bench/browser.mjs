// The browser side of vizor-bench's `browser` case: noVNC 1.7 (from web/node_modules)
// in headless Chromium (Debian's, through playwright-core), measured inside the page.
//
//   node bench/browser.mjs PAGE_PORT
//
// Serves noVNC and a bare page on 127.0.0.1:PAGE_PORT (the origin vizor's config must
// allow), prints "ready" and then answers one JSON line per request line on stdin:
//
//   {"url": "ws://...", "password": "..." | null, "seconds": 10, "warmup": 2,
//    "input_ms": 100, "client": "vnc" | "spice"}
//
// With "client": "spice", the page is spice-html5 (Debian's, /usr/share/spice-html5)
// instead, measured as SPICE_PAGE below says.
//
// Each request opens a fresh page with an RFB connection, lets it run `warmup` seconds,
// and measures for `seconds`:
//   updates   FramebufferUpdates noVNC finished (decoded and flipped to the canvas)
//   bytes     WebSocket payload the page received; messages, and the largest
//   latency   every `input_ms`, a pointer event is sent (x cycling through 200
//             values). The synthetic server draws the last x it received into the
//             first pixel of each update (with a marker byte): an input's latency is
//             from sending it to the end of drawing the first update that shows it or
//             a later input. Inputs never shown are counted (`unanswered`).
//   next      for a server that draws no input (a real guest): from sending an input
//             to the end of the first update noVNC began parsing after it
// and answers {"updates", "seconds", "bytes", "bytes_all" (warm-up included),
// "messages", "largest", "latency_ms": [sorted], "unanswered", "next_ms": [sorted],
// "error"}.
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { join, normalize, dirname } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { createInterface } from "node:readline";

const here = dirname(fileURLToPath(import.meta.url));
const playwright =
    process.env.VIZOR_PLAYWRIGHT || join(here, "../web/node_modules/playwright-core/index.mjs");
const { chromium } = await import(pathToFileURL(playwright).href);
const port = Number(process.argv[2]);
const novnc = process.env.VIZOR_NOVNC || join(here, "../web/node_modules/@novnc/novnc");
const chromiumPath = process.env.VIZOR_CHROMIUM || "/usr/bin/chromium";

const PAGE = `<!doctype html><meta charset="utf-8"><title>vizor-bench</title>
<style>html,body{margin:0;height:100%}#screen{width:100%;height:100%}</style>
<div id="screen"></div>
<script type="module">
import RFB from "/novnc/core/rfb.js";

window.measure = (req) => new Promise((resolve) => {
    const out = { updates: 0, seconds: 0, bytes: 0, bytes_all: 0, messages: 0, largest: 0,
                  latency_ms: [], unanswered: 0, next_ms: [], error: null };
    let phase = "connecting";
    let rfb;
    try {
        rfb = new RFB(document.getElementById("screen"), req.url, {
            credentials: req.password ? { password: req.password } : undefined,
            wsProtocols: ["binary"],
        });
    } catch (e) {
        out.error = String(e);
        resolve(out);
        return;
    }
    rfb.scaleViewport = false;
    rfb.viewOnly = false;
    const done = (why) => {
        if (phase === "done") return;
        if (why && !out.error) out.error = why;
        phase = "done";
        clearInterval(inputs);
        try { rfb.disconnect(); } catch (e) {}
        out.latency_ms.sort((a, b) => a - b);
        out.next_ms.sort((a, b) => a - b);
        out.unanswered = sent.length;
        resolve(out);
    };
    rfb.addEventListener("disconnect", (e) => {
        if (phase !== "done") done("disconnected: " + (e.detail.clean ? "clean" : "unclean"));
    });
    rfb.addEventListener("securityfailure", (e) => done("security failure: " + e.detail.reason));
    // Pointer events not yet shown ({x, t}), and those waiting for the first update
    // that starts after them.
    let sent = [];
    let waiting = [];
    let started = null;
    const update = rfb._framebufferUpdate.bind(rfb);
    rfb._framebufferUpdate = () => {
        if (rfb._FBU.rects === 0 && started === null) {
            started = performance.now();
        }
        const finished = update();
        if (finished) {
            const now = performance.now();
            if (phase === "measuring") {
                out.updates++;
                const answered = waiting.filter((t) => t <= started);
                for (const t of answered) out.next_ms.push(now - t);
                // The input this frame shows, by the server's mark in its first pixel.
                const px = rfb._display._drawCtx.getImageData(0, 0, 1, 1).data;
                if (px[2] === 0xa5) {
                    const x = px[0] | (px[1] << 8);
                    const i = sent.findIndex((s) => s.x === x);
                    if (i >= 0) {
                        for (const s of sent.slice(0, i + 1)) out.latency_ms.push(now - s.t);
                        sent = sent.slice(i + 1);
                    }
                }
            }
            waiting = waiting.filter((t) => t > started);
            started = null;
        }
        return finished;
    };
    let inputs = null;
    let x = 0;
    rfb.addEventListener("connect", () => {
        const ws = rfb._sock._websocket;
        ws.addEventListener("message", (e) => {
            const n = e.data.byteLength;
            out.bytes_all += n;
            if (phase !== "measuring") return;
            out.bytes += n;
            out.messages++;
            if (n > out.largest) out.largest = n;
        });
        inputs = setInterval(() => {
            if (phase !== "measuring") return;
            x = (x + 7) % 200;
            const t = performance.now();
            RFB.messages.pointerEvent(rfb._sock, x + 10, 10, 0);
            waiting.push(t);
            sent.push({ x: x + 10, t });
        }, req.input_ms);
        setTimeout(() => {
            phase = "measuring";
            const t0 = performance.now();
            setTimeout(() => {
                out.seconds = (performance.now() - t0) / 1000;
                done(null);
            }, req.seconds * 1000);
        }, req.warmup * 1000);
    });
    setTimeout(() => { if (phase === "connecting") done("not connected within 15 s"); }, 15000);
});
</script>`;

// The spice-html5 page: frames the page drew (animation frames in which spice-html5
// drew anything on a canvas), WebSocket bytes over all of its channels, and input to
// the next drawing (a pointer move on the canvas, which spice-html5 sends to the
// inputs channel; a real guest draws nothing for it).
const SPICE_PAGE = `<!doctype html><meta charset="utf-8"><title>vizor-bench spice</title>
<style>html,body{margin:0;height:100%}</style>
<div id="spice-area"></div><div id="spice-messages" hidden></div>
<script type="module">
import * as Spice from "/spice-html5/main.js";

let onMessage = null;
const NativeWebSocket = window.WebSocket;
window.WebSocket = class extends NativeWebSocket {
    constructor(...args) {
        super(...args);
        this.addEventListener("message", (e) => { if (onMessage) onMessage(e); });
    }
};
let onDraw = null;
for (const name of ["putImageData", "drawImage", "fillRect"]) {
    const native = CanvasRenderingContext2D.prototype[name];
    CanvasRenderingContext2D.prototype[name] = function (...args) {
        const r = native.apply(this, args);
        if (onDraw) onDraw();
        return r;
    };
}

window.measure = (req) => new Promise((resolve) => {
    const out = { updates: 0, seconds: 0, bytes: 0, bytes_all: 0, messages: 0, largest: 0,
                  latency_ms: [], unanswered: 0, next_ms: [], error: null };
    let phase = "connecting";
    let sc;
    let inputs = null;
    let drew = false;
    let waiting = [];
    const done = (why) => {
        if (phase === "done") return;
        if (why && !out.error) out.error = why;
        phase = "done";
        clearInterval(inputs);
        onDraw = null;
        onMessage = null;
        try { sc.stop(); } catch (e) {}
        out.next_ms.sort((a, b) => a - b);
        resolve(out);
    };
    onMessage = (e) => {
        const n = e.data.byteLength || 0;
        out.bytes_all += n;
        if (phase !== "measuring") return;
        out.bytes += n;
        out.messages++;
        if (n > out.largest) out.largest = n;
    };
    onDraw = () => {
        drew = true;
        if (phase !== "measuring" || waiting.length === 0) return;
        const now = performance.now();
        for (const t of waiting) out.next_ms.push(now - t);
        waiting = [];
    };
    const frame = () => {
        if (phase === "done") return;
        if (drew && phase === "measuring") out.updates++;
        drew = false;
        requestAnimationFrame(frame);
    };
    requestAnimationFrame(frame);
    try {
        sc = new Spice.SpiceMainConn({
            uri: req.url,
            screen_id: "spice-area",
            message_id: "spice-messages",
            password: req.password || "",
            onerror: (e) => done("spice-html5: " + ((e && e.message) || e)),
            onsuccess: () => {
                let x = 0;
                inputs = setInterval(() => {
                    const canvas = document.querySelector("#spice-area canvas");
                    if (phase !== "measuring" || !canvas) return;
                    x = (x + 7) % 200;
                    const r = canvas.getBoundingClientRect();
                    canvas.dispatchEvent(new MouseEvent("mousemove", {
                        clientX: r.left + 10 + (x % Math.max(1, r.width - 20)),
                        clientY: r.top + 10, bubbles: true,
                    }));
                    waiting.push(performance.now());
                }, req.input_ms);
                setTimeout(() => {
                    phase = "measuring";
                    const t0 = performance.now();
                    setTimeout(() => {
                        out.seconds = (performance.now() - t0) / 1000;
                        done(null);
                    }, req.seconds * 1000);
                }, req.warmup * 1000);
            },
        });
    } catch (e) {
        done(String(e));
    }
    setTimeout(() => { if (phase === "connecting") done("not connected within 15 s"); }, 15000);
});
</script>`;

const spiceHtml5 = process.env.VIZOR_SPICE_HTML5 || "/usr/share/spice-html5";

/** The file under `root` that `rest` names, or null outside it. */
async function fileUnder(root, rest) {
    const file = normalize(join(root, rest));
    if (!file.startsWith(root)) return null;
    try {
        return { body: await readFile(file), ext: file.slice(file.lastIndexOf(".")) };
    } catch (e) {
        return null;
    }
}

const types = { ".js": "text/javascript", ".html": "text/html", ".json": "application/json" };
const server = createServer(async (req, res) => {
    const path = new URL(req.url, "http://x").pathname;
    if (path === "/" || path === "/bench.html") {
        res.writeHead(200, { "content-type": "text/html" });
        res.end(PAGE);
        return;
    }
    if (path === "/spice.html") {
        res.writeHead(200, { "content-type": "text/html" });
        res.end(SPICE_PAGE);
        return;
    }
    for (const [prefix, root] of [["/novnc/", novnc], ["/spice-html5/", spiceHtml5]]) {
        if (!path.startsWith(prefix)) continue;
        const found = await fileUnder(root, path.slice(prefix.length));
        if (found) {
            res.writeHead(200, { "content-type": types[found.ext] || "application/octet-stream" });
            res.end(found.body);
            return;
        }
    }
    res.writeHead(404);
    res.end();
});
await new Promise((r) => server.listen(port, "127.0.0.1", r));

const browser = await chromium.launch({
    executablePath: chromiumPath,
    args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        // A page in the background must not be throttled: there is no foreground here.
        "--disable-background-timer-throttling",
        "--disable-renderer-backgrounding",
    ],
});
const context = await browser.newContext({ viewport: { width: 1920, height: 1080 } });
console.log("ready");

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
    if (!line.trim()) continue;
    let answer;
    try {
        const req = JSON.parse(line);
        const page = await context.newPage();
        try {
            const which = req.client === "spice" ? "spice.html" : "bench.html";
            await page.goto(`http://127.0.0.1:${port}/${which}`);
            await page.waitForFunction(() => typeof window.measure === "function");
            answer = await page.evaluate((r) => window.measure(r), req);
        } finally {
            await page.close();
        }
    } catch (e) {
        answer = { error: String(e) };
    }
    console.log(JSON.stringify(answer));
}
await browser.close();
server.close();
