// Drives vizor's console page in headless Chromium (Debian's, through playwright-core)
// for tests/browser.rs. One scenario per run; its findings are one JSON line on stdout,
// its screenshots go to OUTDIR.
//
//   node console.mjs vnc-boot-menu URL OUTDIR DOMAIN
//                                               noVNC: SeaBIOS, Escape, the boot menu;
//                                               then pause DOMAIN, disconnect and save
//                                               the final frame
//   node console.mjs replay URL OUTDIR LIVE     the replay's last frame against LIVE
//   node console.mjs spice URL OUTDIR TEXT      spice-html5: a drawn screen, TEXT typed,
//                                               Ctrl+Alt+Del and fullscreen clicked
//   node console.mjs refused URL OUTDIR NAME    a page that refuses: its words
//   node console.mjs connect URL OUTDIR NAME    any console page: connected, a framebuffer
//   node console.mjs policy URL OUTDIR NAME     a view-only page with a max_duration a
//                                               little over a minute: its badge, time
//                                               left, then the warning a minute before
//   node console.mjs paste URL OUTDIR JSON      noVNC: "Paste as keys" for each of JSON's
//                                               pastes ({text, layout}), one stopped
//                                               (cancel), and one it cannot type
//   node console.mjs resume URL OUTDIR JSON     noVNC or spice-html5 (JSON kind) through
//                                               a relay the script cuts (JSON: cut and
//                                               block, its control URLs):
//                                               the page reconnects by itself and the
//                                               screen goes on; then a cut for longer
//                                               than the window, and the page's words
//   node console.mjs admin URL OUTDIR JSON      URL is owner A's console page; JSON has
//                                               admin (the /admin URL), key, other (owner
//                                               B's page), domain (A's): the admin page
//                                               lists both, watches A, follows its
//                                               events, and ends it
// playwright-core comes from web/node_modules (VIZOR_PLAYWRIGHT names its entry point).
const { chromium } = await import(process.env.VIZOR_PLAYWRIGHT || "playwright-core");
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { execFileSync } from "node:child_process";

const [mode, url, outDir, extra] = process.argv.slice(2);
const chromiumPath = process.env.VIZOR_CHROMIUM || "/usr/bin/chromium";

function fail(message) {
    throw new Error(`${mode}: ${message}`);
}

// Waits until `probe` returns something truthy, or fails with `what` after `ms`.
async function until(what, ms, probe) {
    const deadline = Date.now() + ms;
    for (;;) {
        const v = await probe();
        if (v) {
            return v;
        }
        if (Date.now() > deadline) {
            fail(`timed out after ${ms} ms waiting for ${what}`);
        }
        await new Promise((r) => setTimeout(r, 100));
    }
}

// The pixels of a canvas (a selector, or a handle to a canvas kept from earlier), as
// the page sees them: {width, height, rgba (Buffer)}, or null without a canvas.
async function pixels(page, canvas) {
    const read = (c) => {
        c = typeof c === "string" ? document.querySelector(c) : c;
        if (!c || !c.width || !c.height) {
            return null;
        }
        const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let bin = "";
        for (let i = 0; i < data.length; i += 0x8000) {
            bin += String.fromCharCode.apply(null, data.subarray(i, i + 0x8000));
        }
        return { width: c.width, height: c.height, b64: btoa(bin) };
    };
    const got = await page.evaluate(read, canvas);
    if (!got) {
        return null;
    }
    return { width: got.width, height: got.height, rgba: Buffer.from(got.b64, "base64") };
}

// Pixels brighter than the background in rows [y0, y1).
function lit(p, y0, y1) {
    let n = 0;
    for (let y = Math.max(0, y0); y < Math.min(p.height, y1); y++) {
        for (let x = 0; x < p.width; x++) {
            const i = (y * p.width + x) * 4;
            if (p.rgba[i] + p.rgba[i + 1] + p.rgba[i + 2] > 96) {
                n++;
            }
        }
    }
    return n;
}

async function state(page) {
    return page.evaluate(() => {
        const s = document.getElementById("state");
        return s ? { state: s.dataset.state, words: s.textContent } : null;
    });
}

const browser = await chromium.launch({
    executablePath: chromiumPath,
    args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ],
});
// Tests over https use a fresh self-signed certificate.
const context = await browser.newContext({
    viewport: { width: 1024, height: 640 },
    ignoreHTTPSErrors: true,
});
const page = await context.newPage();
const problems = [];
page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
page.on("dialog", (d) => {
    problems.push(`dialog: ${d.type()} ${d.message()}`);
    d.dismiss();
});
const shot = async (name) => {
    const path = join(outDir, `${name}.png`);
    await page.screenshot({ path });
    return path;
};

try {
    let result;
    const response = await page.goto(url);
    const status = response.status();
    if (mode === "refused") {
        const heading = await page.locator("#refusal h1").textContent();
        const reason = await page.locator("#reason").textContent();
        result = { status, heading, reason, screenshot: await shot(extra) };
    } else if (mode === "connect") {
        await until("the console to connect", 20000, async () => (await state(page))?.state === "connected");
        const p = await until("a framebuffer", 20000, () => pixels(page, "#screen canvas"));
        result = {
            status,
            width: p.width,
            height: p.height,
            connected: await state(page),
            protocol: await page.evaluate(() => location.protocol),
            screenshot: await shot(extra),
        };
    } else if (mode === "vnc-boot-menu") {
        await until("noVNC to connect", 20000, async () => (await state(page))?.state === "connected");
        // SeaBIOS prints its banner, then "Press ESC for boot menu." on the fourth
        // text row (16 pixels each), and below it nothing until the menu or a timeout.
        const before = await until("the SeaBIOS banner", 20000, async () => {
            const p = await pixels(page, "#screen canvas");
            return p && lit(p, 0, 64) > 1000 ? p : null;
        });
        const prompt = lit(before, 48, 64);
        const belowBefore = lit(before, 80, before.height);
        const seabios = await shot("novnc-seabios");
        const escapeAt = Date.now();
        await page.keyboard.press("Escape");
        const after = await until("the boot menu", 5000, async () => {
            const p = await pixels(page, "#screen canvas");
            return p && lit(p, 80, p.height) > belowBefore + 500 ? p : null;
        });
        const menuMs = Date.now() - escapeAt;
        await page.waitForTimeout(500);
        const menu = await shot("novnc-boot-menu");
        // SeaBIOS's text cursor blinks on the VM's clock, and an update in flight when
        // the page disconnects is recorded but never drawn. Pausing the VM stops the
        // blinking, so the frame settles before the session ends.
        execFileSync("virsh", ["-c", "qemu:///system", "suspend", extra], { stdio: "ignore" });
        let settled = await pixels(page, "#screen canvas");
        await until("the paused VM's frame to settle", 10000, async () => {
            await page.waitForTimeout(1000);
            const now = await pixels(page, "#screen canvas");
            const same = now.rgba.equals(settled.rgba);
            settled = now;
            return same;
        });
        // The session ends from the browser; its last frame is what a replay must show.
        const canvasHandle = await page.evaluateHandle(() => document.querySelector("#screen canvas"));
        await page.evaluate(() => window.vizorConsole.rfb.disconnect());
        await until("the disconnect", 10000, async () => (await state(page))?.state !== "connected");
        await page.waitForTimeout(500);
        const last = await pixels(page, canvasHandle);
        const finalFrame = join(outDir, "novnc-final-frame.rgba");
        writeFileSync(finalFrame, last.rgba);
        result = {
            status,
            width: before.width,
            height: before.height,
            banner_lit: lit(before, 0, 64),
            prompt_lit: prompt,
            below_before: belowBefore,
            below_after: lit(after, 80, after.height),
            menu_ms: menuMs,
            final_frame: finalFrame,
            final_width: last.width,
            final_height: last.height,
            ended: await state(page),
            screenshots: [seabios, menu],
        };
    } else if (mode === "replay") {
        // The replay keeps its last frame on screen (and the page connected) until the
        // viewer leaves; at speed 0 every recorded piece arrives at once. The frame must
        // become the live session's last frame and stay it.
        const live = readFileSync(extra);
        const differing = (p) => {
            if (!p || p.rgba.length !== live.length) {
                return -1;
            }
            let n = 0;
            for (let i = 0; i < live.length; i++) {
                n += live[i] !== p.rgba[i];
            }
            return n;
        };
        await until("noVNC to connect", 20000, async () => (await state(page))?.state === "connected");
        let last = null;
        try {
            await until("the live session's last frame", 20000, async () => {
                last = await pixels(page, "#screen canvas");
                return differing(last) === 0;
            });
        } catch (e) {
            await shot("replay-final-frame");
            fail(`${e.message}: ${differing(last)} of ${live.length} values differ`);
        }
        await page.waitForTimeout(1500);
        const p = await pixels(page, "#screen canvas");
        result = {
            status,
            width: p.width,
            height: p.height,
            values: p.rgba.length,
            differing: differing(p),
            state: await state(page),
            screenshot: await shot("replay-final-frame"),
        };
    } else if (mode === "spice") {
        await until("spice-html5 to connect", 20000, async () => (await state(page))?.state === "connected");
        const drawn = await until("a drawn screen", 20000, async () => {
            const p = await pixels(page, "#spice-screen canvas");
            return p && lit(p, 0, 64) > 1000 ? p : null;
        });
        const before = await shot("spice-seabios");
        // Scaled to fill the window, as noVNC's page is, and the pointer lands where it
        // points: the middle of the drawn screen is the middle of the VM's.
        const fit = await page.evaluate(() => {
            const c = document.querySelector("#spice-screen canvas");
            const r = c.getBoundingClientRect();
            const s = document.getElementById("screen").getBoundingClientRect();
            return { w: r.width, h: r.height, left: r.left, top: r.top, sw: s.width, sh: s.height, cw: c.width, ch: c.height };
        });
        await page.evaluate(() => {
            const c = document.querySelector("#spice-screen canvas");
            c.addEventListener("mousemove", (e) => {
                window.vizorPointer = { x: e.offsetX, y: e.offsetY };
            });
        });
        await page.mouse.move(fit.left + fit.w / 2, fit.top + fit.h / 2);
        const pointer = await until("a pointer position", 5000, () => page.evaluate(() => window.vizorPointer));
        await page.locator("#spice-screen").click({ position: { x: 5, y: 5 } });
        await page.keyboard.type(extra, { delay: 40 });
        // The page's own buttons: Ctrl+Alt+Del to the VM, and fullscreen.
        await page.locator("#cad").click();
        await page.locator("#fullscreen").click();
        const fullscreen = await until("fullscreen", 5000, () =>
            page.evaluate(() => document.fullscreenElement !== null),
        );
        await page.waitForTimeout(500);
        result = {
            fit,
            pointer,
            fullscreen,
            status,
            width: drawn.width,
            height: drawn.height,
            banner_lit: lit(drawn, 0, 64),
            connected: await state(page),
            screenshots: [before],
        };
    } else if (mode === "policy") {
        await until("the console to connect", 20000, async () => (await state(page))?.state === "connected");
        const text = (sel) => page.evaluate((s) => {
            const el = document.querySelector(s);
            return el && !el.hidden ? el.textContent : "";
        }, sel);
        const badge = await until("the view-only badge", 10000, () => text("#policy"));
        const left = await until("the time left", 10000, () => text("#timeleft"));
        const warnedEarly = await text("#warning");
        const viewOnly = await page.evaluate(() => window.vizorConsole.rfb.viewOnly);
        const warning = await until("the warning a minute before the end", 15000, () => text("#warning"));
        const leftWarned = await text("#timeleft");
        const warnShot = await shot(extra + "-warning");
        result = {
            status,
            badge,
            left,
            warned_early: warnedEarly,
            view_only: viewOnly,
            warning,
            left_warned: leftWarned,
            still: await state(page),
            screenshots: [warnShot],
        };
    } else if (mode === "paste") {
        // Each paste of JSON's `pastes` ({text, layout}) through the page's dialog,
        // waited for to the end; then `cancel`'s text, stopped after a few characters.
        const cfg = JSON.parse(extra);
        await until("the console to connect", 20000, async () => (await state(page))?.state === "connected");
        await until("the Paste as keys button", 10000, () =>
            page.evaluate(() => {
                const b = document.getElementById("paste");
                return !b.hidden && !b.disabled;
            }),
        );
        const paste = async (text, layout) => {
            await page.locator("#paste").click();
            await page.locator("#paste-text").fill(text);
            await page.locator("#paste-layout").selectOption(layout);
            await page.locator("#paste-type").click();
        };
        // Pastes the page saw end (the presence stream's `done`).
        const ended = () => page.evaluate(() => Number(document.getElementById("pasting").dataset.ended || 0));
        const pasted = [];
        for (const p of cfg.pastes) {
            const before = await ended();
            await paste(p.text, p.layout);
            // The bar's count while it types, until the stream says it ended.
            let shown = 0;
            await until("the paste to be typed", 60000, async () => {
                const now = await page.evaluate(() => Number(document.getElementById("pasting").dataset.typed || 0));
                shown = Math.max(shown, now);
                return (await ended()) > before;
            });
            pasted.push({ layout: p.layout, most_shown: shown });
        }
        // A long one, stopped while it types.
        const before = await ended();
        await paste(cfg.cancel, "us");
        await until("typing to begin", 10000, () =>
            page.evaluate(() => Number(document.getElementById("pasting").dataset.typed || 0) >= 3),
        );
        await page.locator("#paste-stop").click();
        await until("the stopped paste to end", 10000, async () => (await ended()) > before);
        // What the page says of text it cannot type.
        await page.locator("#paste").click();
        await page.locator("#paste-text").fill("日本");
        await page.locator("#paste-layout").selectOption("de");
        await page.locator("#paste-type").click();
        const refused = await until("the refusal", 5000, () =>
            page.evaluate(() => document.getElementById("paste-error").textContent),
        );
        result = { status, pasted, refused, still: await state(page), screenshots: [await shot("paste")] };
    } else if (mode === "resume") {
        const { cut, block, kind } = JSON.parse(extra);
        const spice = kind === "spice";
        // The console's screen: noVNC's canvas, or spice-html5's primary surface.
        const screen = spice ? "#spice-screen canvas" : "#screen > div:not(.stale) canvas";
        const connected = async () => (await state(page))?.state === "connected";
        // Where keys go: noVNC takes them once connected; spice-html5 once its inputs
        // channel is ready, on its canvas.
        const typable = async () => {
            if (spice) {
                await until("the inputs channel", 20000, () =>
                    page.evaluate(() => window.vizorConsole.sc?.inputs?.state === "ready"));
                await page.locator(screen).click({ position: { x: 5, y: 5 } });
            }
        };
        await until("the console to connect", 20000, connected);
        await until("a framebuffer", 20000, async () => {
            const p = await pixels(page, screen);
            return p && lit(p, 0, p.height) > 0 ? p : null;
        });
        await until("the resume credential", 10000, () =>
            page.evaluate(() => document.body.dataset.resumable === "true"));
        await typable();
        // A key held as the connection drops: vizor lets it go itself.
        await page.keyboard.down("q");
        await new Promise((r) => setTimeout(r, 300));
        const before = await shot("resume-before");
        // The states the page goes through, as they change.
        await page.evaluate(() => {
            window.seen = [];
            const s = document.getElementById("state");
            new MutationObserver(() => window.seen.push(s.dataset.state)).observe(s, {
                attributes: true,
                childList: true,
            });
        });
        const cutAt = Date.now();
        await fetch(cut);
        await until("the page to say it reconnects", 5000, async () =>
            (await page.evaluate(() => window.seen)).includes("reconnecting"));
        const reconnecting = await state(page);
        // The last frame stays on the page, dimmed, while it reconnects.
        const stale = await pixels(page, "#screen > .stale canvas");
        await until("the console to come back", 20000, connected);
        const backMs = Date.now() - cutAt;
        await page.keyboard.up("q");
        // The screen goes on: a framebuffer drawn again, and typing reaches the VM.
        const p = await until("a framebuffer after the resume", 20000, async () => {
            const got = await pixels(page, screen);
            return got && lit(got, 0, got.height) > 0 ? got : null;
        });
        const staleGone = await page.evaluate(() => document.querySelector("#screen > .stale") === null);
        await typable();
        await page.keyboard.type("rs");
        const after = await shot("resume-after");
        await new Promise((r) => setTimeout(r, 500));
        const seen = await page.evaluate(() => window.seen);
        // The page holds the next credential (its presence stream, cut too, came back).
        await until("the next credential", 15000, () =>
            page.evaluate(() => Number(document.body.dataset.credentials) >= 2));
        // Now longer than the window: the page tries, then says why it stops.
        await page.evaluate(() => { window.seen = []; });
        await fetch(block);
        const ended = await until("the page to give up", 30000, async () => {
            const s = await state(page);
            return s && s.state !== "reconnecting" && s.state !== "connected" ? s : null;
        });
        result = {
            status,
            reconnecting,
            stale_lit: stale ? lit(stale, 0, stale.height) : 0,
            stale_gone: staleGone,
            back_ms: backMs,
            seen,
            lit: lit(p, 0, p.height),
            tries: await page.evaluate(() => document.getElementById("state").dataset.tries),
            ended,
            screenshots: [before, after, await shot("resume-ended")],
        };
    } else if (mode === "admin") {
        const cfg = JSON.parse(extra);
        const connected = (p) => until("a console to connect", 20000, async () => (await state(p))?.state === "connected");
        const words = (p, sel) => p.evaluate((s) => {
            const el = document.querySelector(s);
            return el && !el.hidden ? el.textContent : "";
        }, sel);
        await connected(page);
        const ownerB = await context.newPage();
        ownerB.on("pageerror", (e) => problems.push(`owner B page error: ${e.message}`));
        await ownerB.goto(cfg.other);
        await connected(ownerB);
        // The admin page: the key asked for, kept in memory; both sessions listed.
        const admin = await context.newPage();
        admin.on("pageerror", (e) => problems.push(`admin page error: ${e.message}`));
        const adminResponse = await admin.goto(cfg.admin);
        await admin.locator("#key").fill(cfg.key);
        await admin.locator("#login button[type=submit]").click();
        await until("two live sessions on the admin page", 10000, () =>
            admin.evaluate(() => document.querySelectorAll("#rows tr").length === 2),
        );
        const listed = await admin.evaluate(() =>
            [...document.querySelectorAll("#rows tr")].map((tr) => tr.dataset.domain),
        );
        const loginShown = await admin.evaluate(() => getComputedStyle(document.getElementById("login")).display !== "none");
        const keyKept = await admin.evaluate((k) => ({
            url: location.href.includes(k),
            cookie: document.cookie.includes(k),
            storage: JSON.stringify(localStorage).includes(k) || JSON.stringify(sessionStorage).includes(k),
            input: document.getElementById("key").value,
        }), cfg.key);
        const listShot = join(outDir, "admin-list.png");
        await admin.screenshot({ path: listShot });
        const row = admin.locator(`#rows tr[data-domain="${cfg.domain}"]`);
        await row.locator("button.follow").click();
        // Watch: an observer console of A in a new page.
        const [watcher] = await Promise.all([context.waitForEvent("page"), row.locator("button.watch").click()]);
        watcher.on("pageerror", (e) => problems.push(`watcher page error: ${e.message}`));
        await connected(watcher);
        const watcherPresence = await until("the watcher's presence", 10000, async () => {
            const w = await words(watcher, "#presence");
            return w.includes("(owner)") ? w : null;
        });
        const ownerPresence = await until("the owner's presence", 10000, async () => {
            const w = await words(page, "#presence");
            return w.includes("(observer)") ? w : null;
        });
        const watcherPolicy = await words(watcher, "#policy");
        // SeaBIOS on A: the owner presses Escape, and the watcher sees the boot menu.
        const before = await until("the SeaBIOS banner on the watcher's page", 20000, async () => {
            const p = await pixels(watcher, "#screen canvas");
            return p && lit(p, 0, 64) > 1000 ? p : null;
        });
        const belowBefore = lit(before, 80, before.height);
        await page.locator("#screen canvas").click({ position: { x: 5, y: 5 } });
        const escapeAt = Date.now();
        await page.keyboard.press("Escape");
        const after = await until("the boot menu on the watcher's page", 5000, async () => {
            const p = await pixels(watcher, "#screen canvas");
            return p && lit(p, 80, p.height) > belowBefore + 500 ? p : null;
        });
        const watcherMs = Date.now() - escapeAt;
        await watcher.screenshot({ path: join(outDir, "admin-watcher-menu.png") });
        // The admin page's event stream shows what the owner typed.
        const typed = await until("the typed Escape in the admin page's events", 5000, () =>
            admin.evaluate(() =>
                [...document.querySelectorAll("#events-list li[data-kind=text]")].map((li) => li.textContent).join("\n"),
            ).then((t) => (t.includes("<Escape>") ? t : null)),
        );
        // End A with a reason: the owner's page and the watcher's say so.
        await row.locator("button.end").click();
        await admin.locator("#end-reason").fill("end of shift");
        await admin.locator("#end-confirm").click();
        const ownerEnded = await until("the owner's page to end", 5000, async () => {
            const s = await state(page);
            return s && s.state !== "connected" ? s : null;
        });
        const watcherEnded = await until("the watcher's page to end", 5000, async () => {
            const s = await state(watcher);
            return s && s.state !== "connected" ? s : null;
        });
        await page.screenshot({ path: join(outDir, "admin-owner-ended.png") });
        await until("one live session left", 10000, () =>
            admin.evaluate(() => document.querySelectorAll("#rows tr").length === 1),
        );
        result = {
            status,
            admin_status: adminResponse.status(),
            listed,
            key_kept: keyKept,
            login_shown: loginShown,
            watcher_presence: watcherPresence,
            owner_presence: ownerPresence,
            watcher_policy: watcherPolicy,
            below_before: belowBefore,
            below_after: lit(after, 80, after.height),
            watcher_ms: watcherMs,
            typed,
            owner_ended: ownerEnded,
            watcher_ended: watcherEnded,
            other_still: await state(ownerB),
            screenshots: [listShot],
        };
    } else {
        fail(`unknown mode ${mode}`);
    }
    result.problems = problems;
    console.log(JSON.stringify(result));
} catch (e) {
    await shot(`failed-${mode}`).catch(() => {});
    console.error(e.stack || String(e));
    console.error(`page problems: ${JSON.stringify(problems)}`);
    process.exitCode = 1;
} finally {
    await browser.close();
}
