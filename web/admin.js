// vizor's admin page: the live sessions, with Watch (an observer console), End (with a
// reason) and a session's live event stream. The admin key is asked for here and kept
// in this page's memory only: never in an address, a cookie or storage. Every request
// carries it as a bearer header, and a reload forgets it.

const loginForm = document.getElementById("login");
const keyInput = document.getElementById("key");
const loginError = document.getElementById("login-error");
const sessionsEl = document.getElementById("sessions");
const rowsEl = document.getElementById("rows");
const statusEl = document.getElementById("status");
const eventsEl = document.getElementById("events");
const eventsTitle = document.getElementById("events-title");
const eventsList = document.getElementById("events-list");
const eventsClose = document.getElementById("events-close");
const endDialog = document.getElementById("end-dialog");
const endForm = document.getElementById("end-form");
const endReason = document.getElementById("end-reason");
const endTitle = document.getElementById("end-title");
const endCancel = document.getElementById("end-cancel");

let key = null;
let refresher = null;
let following = null;
let ending = null;

function api(method, path, body) {
    const init = { method, headers: { Authorization: "Bearer " + key }, cache: "no-store" };
    if (body !== undefined) {
        init.headers["Content-Type"] = "application/json";
        init.body = JSON.stringify(body);
    }
    return fetch(path, init);
}

async function answer(r) {
    let v = null;
    try {
        v = await r.json();
    } catch {
        // Not JSON: the status says enough.
    }
    if (!r.ok) {
        throw new Error((v && v.error) || r.status + " " + r.statusText);
    }
    return v;
}

function say(words, error) {
    statusEl.textContent = words;
    statusEl.dataset.error = error ? "true" : "false";
}

function rate(bytesPerSecond) {
    const units = ["B/s", "KiB/s", "MiB/s", "GiB/s"];
    let v = bytesPerSecond;
    let i = 0;
    while (v >= 1024 && i < units.length - 1) {
        v /= 1024;
        i++;
    }
    return (i === 0 ? Math.round(v) : v.toFixed(1)) + " " + units[i];
}

function ms(q) {
    return q ? q.p50.toFixed(1) + " / " + q.p99.toFixed(1) + " ms" : "–";
}

function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) {
        td.className = cls;
    }
    row.append(td);
    return td;
}

function button(label, onClick, cls) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.className = cls || "";
    b.addEventListener("click", onClick);
    return b;
}

function render(sessions) {
    rowsEl.replaceChildren();
    for (const s of sessions) {
        const tr = document.createElement("tr");
        tr.dataset.session = String(s.id);
        tr.dataset.domain = s.domain;
        // With [state], the replica holding it: each numbers its own.
        cell(tr, s.replica ? s.replica + " · " + s.id : String(s.id));
        cell(tr, s.user);
        cell(tr, s.domain);
        cell(tr, s.kind);
        const who = [s.user + " (owner)"].concat(
            s.participants.map((p) => p.user + " (" + p.role + (p.announced ? "" : ", unannounced") + ")"),
        );
        cell(tr, who.join(", "), "participants");
        cell(tr, new Date(s.started_at).toLocaleTimeString());
        const bw = s.bytes_per_second;
        cell(tr, "↓ " + rate(bw.vm_to_browser) + " ↑ " + rate(bw.browser_to_vm), "num");
        cell(tr, ms(s.frame_latency_ms), "num");
        cell(tr, ms(s.input_to_display_ms), "num");
        const actions = cell(tr, "", "actions");
        actions.append(
            button("Watch", () => watch(s), "watch"),
            button("Events", () => follow(s), "follow"),
            button("End", () => askEnd(s), "end danger"),
        );
        rowsEl.append(tr);
    }
    sessionsEl.dataset.count = String(sessions.length);
}

// Back to the key form: the key no longer works (revoked, or vizor restarted with
// others). Polling stops, so a stale page does not use up this address's allowance.
function signOut(words) {
    clearInterval(refresher);
    refresher = null;
    key = null;
    if (following) {
        following.abort();
        following = null;
    }
    sessionsEl.hidden = true;
    loginForm.hidden = false;
    loginError.textContent = words;
}

async function refresh() {
    try {
        const r = await api("GET", "/api/v1/sessions");
        if (r.status === 401 && refresher !== null) {
            signOut("The admin key no longer works: enter a current one.");
            say("Signed out", true);
            return false;
        }
        const v = await answer(r);
        render(v.sessions);
        // With [state]: whether the other replicas' sessions are in the list.
        const partial = v.other_replicas_unlisted;
        say(v.sessions.length + " live session" + (v.sessions.length === 1 ? "" : "s") +
            " · updated " + new Date().toLocaleTimeString() +
            (partial ? " · this replica's only: " + partial : ""), !!partial);
        return true;
    } catch (e) {
        say("Could not list sessions: " + e.message, true);
        return false;
    }
}

// A session's API path: with [state], replicas each number their own sessions, and
// a session is named by the member the list gives it.
function sessionPath(s, tail) {
    const path = "/api/v1/sessions/" + s.id + tail;
    return s.member ? path + "?member=" + encodeURIComponent(s.member) : path;
}

async function watch(s) {
    try {
        const v = await answer(await api("POST", sessionPath(s, "/watch"), {}));
        // An observer console of its own; the token leaves its address bar at once.
        window.open(v.console_url, "_blank", "noopener");
        say("Watching session " + s.id + " (" + s.domain + ")", false);
    } catch (e) {
        say("Cannot watch session " + s.id + ": " + e.message, true);
    }
}

function askEnd(s) {
    ending = s;
    endTitle.textContent = "End session " + s.id + " (" + s.user + " on " + s.domain + ")";
    endReason.value = "";
    endDialog.showModal();
    endReason.focus();
}

endCancel.addEventListener("click", () => endDialog.close());

endForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const s = ending;
    const reason = endReason.value.trim();
    if (!s || !reason) {
        endReason.setCustomValidity("Say why: everyone on the console is shown it.");
        endReason.reportValidity();
        return;
    }
    endReason.setCustomValidity("");
    endDialog.close();
    try {
        await answer(await api("DELETE", sessionPath(s, ""), { reason }));
        say("Ended session " + s.id + ": " + reason, false);
    } catch (err) {
        say("Cannot end session " + s.id + ": " + err.message, true);
    }
    refresh();
});

function line(kind, text) {
    const li = document.createElement("li");
    li.dataset.kind = kind;
    li.textContent = text;
    eventsList.append(li);
    while (eventsList.children.length > 500) {
        eventsList.firstChild.remove();
    }
    li.scrollIntoView({ block: "end" });
}

function shown(event, data) {
    if (event === "text") {
        line("text", data.user + " typed " + JSON.stringify(data.text));
    } else if (event === "record") {
        const r = data;
        const rest = Object.entries(r)
            .filter(([k]) => !["ts", "event", "seq", "chain", "v"].includes(k))
            .map(([k, v]) => k + "=" + (typeof v === "string" ? v : JSON.stringify(v)))
            .join(" ");
        line(r.event, (r.ts ? r.ts.slice(11, 23) + " " : "") + r.event + " " + rest);
    } else if (event === "lagged") {
        line("lagged", "(" + data.missed + " records missed: this page fell behind)");
    } else if (event === "end") {
        line("end", "The session ended.");
    }
}

// A session's Server-Sent Events, read with fetch: EventSource cannot send the key.
async function follow(s) {
    if (following) {
        following.abort();
    }
    const controller = new AbortController();
    following = controller;
    eventsEl.hidden = false;
    eventsTitle.textContent = "Events of session " + s.id + " (" + s.user + " on " + s.domain + ")";
    eventsList.replaceChildren();
    try {
        const r = await fetch(sessionPath(s, "/events"), {
            headers: { Authorization: "Bearer " + key, Accept: "text/event-stream" },
            signal: controller.signal,
            cache: "no-store",
        });
        if (!r.ok) {
            await answer(r);
        }
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
            const { value, done } = await reader.read();
            if (done) {
                break;
            }
            buf += value;
            let at;
            while ((at = buf.indexOf("\n\n")) >= 0) {
                const block = buf.slice(0, at);
                buf = buf.slice(at + 2);
                let event = "message";
                let data = "";
                for (const l of block.split("\n")) {
                    if (l.startsWith("event: ")) {
                        event = l.slice(7);
                    } else if (l.startsWith("data: ")) {
                        data += l.slice(6);
                    }
                }
                if (data) {
                    shown(event, JSON.parse(data));
                }
            }
        }
    } catch (e) {
        if (e.name !== "AbortError") {
            line("error", "The event stream failed: " + e.message);
        }
    }
}

eventsClose.addEventListener("click", () => {
    if (following) {
        following.abort();
        following = null;
    }
    eventsEl.hidden = true;
});

loginForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    key = keyInput.value.trim();
    // The key stays in this variable alone.
    keyInput.value = "";
    loginError.textContent = "";
    if (!(await refresh())) {
        loginError.textContent = statusEl.textContent;
        key = null;
        return;
    }
    loginForm.hidden = true;
    sessionsEl.hidden = false;
    refresher = setInterval(refresh, 2000);
});

window.vizorAdmin = {
    signedIn: () => key !== null && refresher !== null,
};
