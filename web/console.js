// vizor's console page: connects noVNC or spice-html5 to vizor's WebSocket with the
// token from this page's address, and says what is happening in words. vizor answers
// the VM's password itself, so no password is ever asked for here.

const kind = document.body.dataset.kind;
const stateEl = document.getElementById("state");
const screenEl = document.getElementById("screen");
const cadButton = document.getElementById("cad");
const pasteButton = document.getElementById("paste");
const fullscreenButton = document.getElementById("fullscreen");

function say(state, words) {
    stateEl.dataset.state = state;
    stateEl.textContent = words;
}

// The token opens one session; once it is read, it leaves the address bar and the
// history, so neither a reload nor a shared screenshot shows it.
const token = new URLSearchParams(location.search).get("token");
if (token !== null) {
    history.replaceState(null, "", location.pathname);
}
const wsBase = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/websockify";
const wsUrl = wsBase + (token !== null ? "?token=" + encodeURIComponent(token) : "");

// A WebSocket as noVNC takes one (its Websock attaches any object shaped like it),
// which keeps vizor's text messages for this page: noVNC gets the binary ones, RFB.
function rfbChannel(ws, onText) {
    const channel = {
        onopen: null,
        onmessage: null,
        onclose: null,
        onerror: null,
        get binaryType() {
            return ws.binaryType;
        },
        set binaryType(v) {
            ws.binaryType = v;
        },
        get readyState() {
            return ws.readyState;
        },
        get protocol() {
            return ws.protocol;
        },
        send: (data) => ws.send(data),
        close: (code, reason) => ws.close(code, reason),
    };
    ws.onopen = (e) => channel.onopen && channel.onopen(e);
    ws.onmessage = (e) => {
        if (typeof e.data === "string") {
            onText(e.data);
        } else if (channel.onmessage) {
            channel.onmessage(e);
        }
    };
    ws.onclose = (e) => channel.onclose && channel.onclose(e);
    ws.onerror = (e) => channel.onerror && channel.onerror(e);
    return channel;
}

// What vizor says on the console's WebSocket besides RFB: the resume credential.
function heard(text) {
    let words;
    try {
        words = JSON.parse(text);
    } catch {
        return;
    }
    if (typeof words.resume === "string") {
        credential = words.resume;
        document.body.dataset.resumable = "true";
        document.body.dataset.credentials = String(Number(document.body.dataset.credentials || 0) + 1);
    }
}

fullscreenButton.addEventListener("click", () => {
    if (document.fullscreenElement) {
        document.exitFullscreen();
    } else {
        document.documentElement.requestFullscreen().catch((e) => {
            fullscreenButton.title = "Fullscreen is not allowed here: " + e.message;
        });
    }
});

// Who else is on this console, what this page may do and how long it has: vizor's
// presence stream for this page's connection, once the console is connected.
const policyEl = document.getElementById("policy");
const timeleftEl = document.getElementById("timeleft");
const presenceEl = document.getElementById("presence");
const warningEl = document.getElementById("warning");
let endsAt = null;
let ticker = null;
let onViewOnly = () => {};

function clock(ms) {
    const s = Math.max(0, Math.ceil(ms / 1000));
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const pad = (n) => String(n).padStart(2, "0");
    return (h > 0 ? h + ":" + pad(m) : String(m)) + ":" + pad(s % 60);
}

function tick() {
    if (endsAt === null) {
        return;
    }
    const left = endsAt - Date.now();
    timeleftEl.hidden = false;
    timeleftEl.textContent = clock(left) + " left";
    const warn = left <= 60000;
    timeleftEl.dataset.warn = warn ? "true" : "false";
    if (warn && warningEl.hidden) {
        warningEl.hidden = false;
        warningEl.textContent = "This session ends in under a minute.";
    }
}

function presence(info) {
    const you = info.you;
    canPaste = !you.view_only && you.role !== "observer" && you.clipboard !== "none" &&
        you.clipboard !== "from_vm";
    pasteButton.disabled = !canPaste || typingNow;
    if (you.view_only) {
        policyEl.hidden = false;
        policyEl.textContent = "View only";
        onViewOnly();
    } else if (you.clipboard !== "both") {
        policyEl.hidden = false;
        policyEl.textContent = "Clipboard: " + you.clipboard.replace("_", " ");
    }
    if (you.ends_in_ms !== null && you.ends_in_ms !== undefined) {
        endsAt = Date.now() + you.ends_in_ms;
        if (ticker === null) {
            ticker = setInterval(tick, 1000);
        }
        tick();
    }
    const others = info.others.map((o) => o.user + " (" + o.role + ")");
    presenceEl.hidden = others.length === 0;
    presenceEl.textContent = others.length ? "Also here: " + others.join(", ") : "";
    presenceEl.dataset.count = String(others.length);
}

// "Paste as keys": vizor types the text into the VM key by key (a VM without a
// clipboard agent has no clipboard), with the keys of the layout chosen here. The
// progress comes on the presence stream.
const pasteDialog = document.getElementById("paste-dialog");
const pasteForm = document.getElementById("paste-form");
const pasteText = document.getElementById("paste-text");
const pasteLayout = document.getElementById("paste-layout");
const pasteError = document.getElementById("paste-error");
const pastingEl = document.getElementById("pasting");
const pastingWords = document.getElementById("pasting-words");
let canPaste = false;
// A paste is being typed (as the presence stream says).
let typingNow = false;
const pasteUrl = "/console/paste?token=" + encodeURIComponent(token || "");

pasteButton.addEventListener("click", async () => {
    pasteError.textContent = "";
    pasteDialog.showModal();
    try {
        // Offered when the browser lets the page read the clipboard.
        const text = await navigator.clipboard.readText();
        if (text && !pasteText.value) {
            pasteText.value = text;
        }
    } catch (e) {
        // Typed or pasted into the box instead.
    }
    pasteText.focus();
});

pasteForm.addEventListener("submit", async (e) => {
    if (e.submitter && e.submitter.value !== "type") {
        return;
    }
    e.preventDefault();
    const r = await fetch(pasteUrl, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ text: pasteText.value, layout: pasteLayout.value }),
    }).catch((err) => ({ ok: false, json: async () => ({ error: err.message }) }));
    if (!r.ok) {
        const answer = await r.json().catch(() => ({}));
        pasteError.textContent = answer.error || "The paste was refused.";
        return;
    }
    // Queued: the presence stream tells its progress, from 0 to its end.
    pasteDialog.close();
});

document.getElementById("paste-stop").addEventListener("click", () => {
    fetch(pasteUrl, { method: "DELETE" });
});

function pasting(p) {
    typingNow = !p.done;
    if (p.done) {
        pastingEl.hidden = true;
        delete pastingEl.dataset.typed;
        pastingEl.dataset.ended = String(Number(pastingEl.dataset.ended || 0) + 1);
        pasteButton.disabled = !canPaste;
        return;
    }
    pastingEl.hidden = false;
    pasteButton.disabled = true;
    pastingWords.textContent = "Typing " + p.typed + " of " + p.total + "…";
    pastingEl.dataset.typed = String(p.typed);
}

// The credential this page resumes its console with after a network blip: vizor sends
// it in a text message on the console's own WebSocket (so only the page holding the
// connection has it), and a new one after each resume. It never leaves this page's
// memory but for the resume itself.
let credential = null;
// The session is over (the presence stream said so): nothing to resume.
let sessionOver = false;
let events = null;

function follow() {
    if (token === null || events !== null) {
        return;
    }
    events = new EventSource("/console/events?token=" + encodeURIComponent(token));
    events.addEventListener("presence", (e) => presence(JSON.parse(e.data)));
    events.addEventListener("paste", (e) => pasting(JSON.parse(e.data)));
    events.addEventListener("end", () => {
        sessionOver = true;
        credential = null;
        delete document.body.dataset.resumable;
        events.close();
    });
}

// Words for the end of a session: vizor's close reason when it gave one.
function ended(reason, clean) {
    if (reason) {
        say("error", "Disconnected: " + reason);
    } else if (clean) {
        say("disconnected", "Disconnected");
    } else {
        say("error", "Connection lost");
    }
    cadButton.disabled = true;
    pasteButton.disabled = true;
    pastingEl.hidden = true;
    if (ticker !== null) {
        clearInterval(ticker);
        ticker = null;
    }
    presenceEl.hidden = true;
}

// How long the page keeps trying to resume, and its waits between tries: vizor keeps
// the console for `[tokens] resume_window` (30 s unless configured) and refuses a
// resume after it, which ends the trying sooner.
const RESUME_FOR_MS = 10 * 60 * 1000;
const RESUME_WAITS_MS = [500, 1000, 2000, 4000];

// A console's way back after a drop: `lost(code)` says whether a connection that
// closed with `code` is a network blip (1006: no close frame from vizor; a try that
// never opened counts too), and if so tries `connect` again with the credential,
// backing off; false when there is nothing (more) to try. `back()` once connected.
function resumer(connect) {
    let droppedAt = null;
    let tries = 0;
    const again = () => {
        if (sessionOver || credential === null || Date.now() - droppedAt > RESUME_FOR_MS) {
            return false;
        }
        const wait = RESUME_WAITS_MS[Math.min(tries, RESUME_WAITS_MS.length - 1)];
        tries += 1;
        say("reconnecting", "Reconnecting…");
        stateEl.dataset.tries = String(tries);
        cadButton.disabled = true;
        pasteButton.disabled = true;
        setTimeout(() => {
            if (sessionOver || credential === null) {
                ended("the console session has ended", true);
                return;
            }
            connect(wsBase + "?resume=" + encodeURIComponent(credential));
        }, wait);
        return true;
    };
    return {
        lost(code) {
            // The credential stays good until a resume with it succeeds, so a refusal
            // (1008) is vizor's last word.
            const dropped = code === 1006 || (droppedAt !== null && code === 0);
            if (!dropped || credential === null) {
                return false;
            }
            if (droppedAt === null) {
                droppedAt = Date.now();
            }
            return again();
        },
        back() {
            droppedAt = null;
            tries = 0;
        },
    };
}

async function vnc() {
    const { default: RFB } = await import("/novnc/core/rfb.js");
    let rfb = null;
    let viewOnly = false;
    onViewOnly = () => {
        // vizor drops this page's input anyway; noVNC then sends none.
        viewOnly = true;
        if (rfb) {
            rfb.viewOnly = true;
        }
        cadButton.disabled = true;
    };
    const connect = (url) => {
        // The page opens the WebSocket itself so that it hears vizor's close reason.
        const ws = new WebSocket(url, ["binary"]);
        let reason = "";
        let code = 0;
        ws.addEventListener("close", (e) => {
            reason = e.reason;
            code = e.code;
        });
        rfb = new RFB(screenEl, rfbChannel(ws, heard));
        // noVNC's screen (its canvas inside): kept, dimmed, while the page resumes.
        const drawn = screenEl.lastElementChild;
        rfb.scaleViewport = true;
        rfb.resizeSession = false;
        rfb.viewOnly = viewOnly;
        rfb.addEventListener("connect", () => {
            for (const stale of screenEl.querySelectorAll(".stale")) {
                stale.remove();
            }
            resuming.back();
            say("connected", "Connected");
            cadButton.disabled = viewOnly;
            pasteButton.hidden = false;
            pasteButton.disabled = !canPaste || typingNow;
            rfb.focus();
            follow();
        });
        rfb.addEventListener("disconnect", (e) => {
            // 1006: the connection dropped without vizor's close frame (a network
            // blip, a proxy restarting), and vizor keeps the console for a while.
            if (resuming.lost(code)) {
                // noVNC took its screen away: the last frame stays, dimmed, until the
                // console is back, rather than a blank page.
                if (drawn && !drawn.isConnected && !screenEl.querySelector(".stale")) {
                    drawn.classList.add("stale");
                    screenEl.prepend(drawn);
                }
                return;
            }
            ended(reason, e.detail.clean);
        });
        rfb.addEventListener("securityfailure", (e) => {
            reason = "refused" + (e.detail.reason ? ": " + e.detail.reason : "");
        });
        rfb.addEventListener("credentialsrequired", () => {
            reason = "the VM asked this page for a password, which vizor answers itself";
            rfb.disconnect();
        });
        rfb.addEventListener("desktopname", (e) => {
            document.getElementById("title").title = e.detail.name;
        });
    };
    const resuming = resumer(connect);
    connect(wsUrl + (token !== null ? "&resumable=1" : ""));
    cadButton.addEventListener("click", () => {
        rfb.sendCtrlAltDel();
        rfb.focus();
    });
    window.vizorConsole = {
        get rfb() {
            return rfb;
        },
    };
}

async function spice() {
    const Spice = await import("/spice-html5/main.js");
    const area = document.createElement("div");
    area.id = "spice-screen";
    area.tabIndex = 0;
    const messages = document.createElement("div");
    messages.id = "spice-messages";
    messages.hidden = true;
    screenEl.append(area, messages);
    // spice-html5 opens a WebSocket per channel, each at the main channel's `url`. As
    // it sees them: vizor's text messages (the resume credential) are this page's,
    // spice-html5 gets the binary ones; how each closed is kept before spice-html5
    // hears of it; and a main channel opened to resume shows the token's address, so
    // the channels after it join the session with the token.
    const Native = window.WebSocket;
    class VizorSocket extends Native {
        constructor(url, protocols) {
            super(url, protocols);
            this.closedWith = null;
            super.addEventListener("close", (e) => {
                this.closedWith = { code: e.code, reason: e.reason };
            });
            super.addEventListener("message", (e) => {
                if (typeof e.data === "string") {
                    heard(e.data);
                }
            });
        }
        get url() {
            return super.url.includes("?resume=") ? wsUrl : super.url;
        }
        addEventListener(type, listener, options) {
            if (type !== "message") {
                return super.addEventListener(type, listener, options);
            }
            return super.addEventListener(
                type,
                (e) => {
                    if (typeof e.data !== "string") {
                        listener.call(this, e);
                    }
                },
                options,
            );
        }
    }
    window.WebSocket = VizorSocket;
    let sc = null;
    // The last frame, kept dimmed while the page resumes (spice-html5 takes its
    // surfaces away when it stops).
    const keepStale = () => {
        const canvas = area.querySelector("canvas");
        if (!canvas || !canvas.width || screenEl.querySelector(".stale")) {
            return;
        }
        const holder = document.createElement("div");
        holder.className = "stale";
        const copy = document.createElement("canvas");
        copy.width = canvas.width;
        copy.height = canvas.height;
        copy.getContext("2d").drawImage(canvas, 0, 0);
        copy.style.transformOrigin = "0 0";
        copy.style.transform = area.style.transform;
        holder.append(copy);
        screenEl.prepend(holder);
    };
    const connect = (url) => {
        let failed = false;
        const conn = new Spice.SpiceMainConn({
            uri: url,
            screen_id: area.id,
            message_id: messages.id,
            password: "",
            onerror: (e) => {
                if (failed) {
                    return;
                }
                failed = true;
                // spice-html5 reports an error before the socket's close: how it closed
                // decides (1006, no close frame from vizor: a network blip).
                const decide = () => {
                    const closed = ws.closedWith || { code: 0, reason: "" };
                    keepStale();
                    conn.stop();
                    if (!resuming.lost(closed.code)) {
                        ended(closed.reason || (e && e.message) || "", false);
                    }
                };
                if (ws.closedWith !== null) {
                    decide();
                } else {
                    // An error before the close (a browser may report one first, with
                    // the socket already closed): the close says how it ended.
                    ws.addEventListener("close", decide, { once: true });
                    keepStale();
                    conn.stop();
                }
            },
            onsuccess: () => {
                resuming.back();
                say("connected", "Connected");
                cadButton.disabled = false;
                pasteButton.hidden = false;
                pasteButton.disabled = !canPaste || typingNow;
                area.focus();
                follow();
            },
        });
        const ws = conn.ws;
        sc = conn;
    };
    const resuming = resumer(connect);
    connect(wsUrl + (token !== null ? "&resumable=1" : ""));
    // Ctrl+Alt+Del as PC scancodes (set 1; 0xE0-prefixed Delete, low byte first). Not
    // spice-html5's sendCtrlAltDel: it sends the keypad Del and then its release
    // without the break bit, so QEMU sees the key pressed twice and never released.
    const Messages = await import("/spice-html5/spicemsg.js");
    const { Constants } = await import("/spice-html5/enums.js");
    const DOWN = Constants.SPICE_MSGC_INPUTS_KEY_DOWN;
    const UP = Constants.SPICE_MSGC_INPUTS_KEY_UP;
    const ctrlAltDel = [
        [DOWN, 0x1d],
        [DOWN, 0x38],
        [DOWN, 0x53e0],
        [UP, 0xd3e0],
        [UP, 0xb8],
        [UP, 0x9d],
    ];
    cadButton.addEventListener("click", () => {
        if (!sc.inputs || sc.inputs.state !== "ready") {
            return;
        }
        for (const [type, code] of ctrlAltDel) {
            const key = new Messages.SpiceMsgcKeyDown();
            key.code = code;
            const msg = new Messages.SpiceMiniData();
            msg.build_msg(type, key);
            sc.inputs.send_msg(msg);
        }
        area.focus();
    });
    // spice-html5 draws at the VM's size; the page scales it to fill the window, up
    // or down, centred, as noVNC's page does. Pointer positions stay right:
    // spice-html5 reads offsetX/offsetY, which the browser maps back through the
    // transform into the canvas's own pixels.
    const fit = () => {
        const canvas = area.querySelector("canvas");
        if (!canvas || !canvas.width || !canvas.height) {
            return;
        }
        // The console is back on a new screen: the last frame goes.
        for (const stale of screenEl.querySelectorAll(".stale")) {
            stale.remove();
        }
        const scale = Math.min(
            screenEl.clientWidth / canvas.width,
            screenEl.clientHeight / canvas.height,
        );
        const dx = Math.max(0, (screenEl.clientWidth - canvas.width * scale) / 2);
        const dy = Math.max(0, (screenEl.clientHeight - canvas.height * scale) / 2);
        area.style.transform = "translate(" + dx + "px, " + dy + "px) scale(" + scale + ")";
    };
    new ResizeObserver(fit).observe(screenEl);
    new MutationObserver(fit).observe(area, {
        subtree: true,
        childList: true,
        attributes: true,
        attributeFilter: ["width", "height"],
    });
    window.vizorConsole = {
        get sc() {
            return sc;
        },
    };
}

const clients = { vnc, spice };
clients[kind]().catch((e) => {
    say("error", "The console client could not start: " + e.message);
});
