//! Reading audit logs back: the sessions they hold, and what was typed in one.

use serde_json::Value;
use std::collections::BTreeMap;
use vizor_keys::Key;
use vizor_rfb::keysym::keysym_char;

/// Reads the records of `files` (oldest first); lines that are not JSON are skipped
/// (`vizor audit verify` reports them).
pub fn read(files: &[impl AsRef<std::path::Path>]) -> std::io::Result<Vec<Value>> {
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read(f.as_ref())?;
        for line in text.split(|b| *b == b'\n') {
            if let Ok(v) = serde_json::from_slice::<Value>(line) {
                out.push(v);
            }
        }
    }
    Ok(out)
}

/// Which run of vizor wrote each record: the `seq` of the run's `audit_open` or new
/// `chain_start` (0 before the first one in the files). Session ids restart with each
/// run, so a session is known by its run and id.
fn runs(records: &[Value]) -> Vec<u64> {
    let mut run = 0;
    records
        .iter()
        .map(|r| {
            let opens =
                r["event"] == "audit_open" || (r["event"] == "chain_start" && r["reason"] == "new");
            if opens {
                run = r["seq"].as_u64().unwrap_or(run);
            }
            run
        })
        .collect()
}

/// One session as the log tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    /// The run of vizor it belongs to (see [`Session::label`]).
    pub run: u64,
    /// The session id.
    pub id: u64,
    /// The token's user.
    pub user: String,
    /// The domain.
    pub domain: String,
    /// vnc or spice.
    pub kind: String,
    /// The browser's address.
    pub client: String,
    /// When it started (the first start record's time).
    pub start: String,
    /// How long it lasted, in milliseconds (the longest channel), if it ended.
    pub duration_ms: Option<u64>,
    /// Key presses recorded.
    pub keys: u64,
    /// Why it ended, if it did: the main channel's reason for SPICE, else the last
    /// end record's.
    pub end: Option<String>,
    /// SPICE channels.
    pub channels: Vec<String>,
}

impl Session {
    /// `ID`, or `ID@RUN` when `all` has another session with the same id.
    pub fn label(&self, all: &[Session]) -> String {
        if all.iter().filter(|s| s.id == self.id).count() > 1 {
            format!("{}@{}", self.id, self.run)
        } else {
            self.id.to_string()
        }
    }
}

/// Finds the session `wanted` (`ID` or `ID@RUN`) names.
pub fn find<'a>(all: &'a [Session], wanted: &str) -> Result<&'a Session, String> {
    let (id, run) = match wanted.split_once('@') {
        Some((i, r)) => (i, Some(r)),
        None => (wanted, None),
    };
    let id: u64 = id
        .parse()
        .map_err(|_| format!("bad session {wanted:?}: ID or ID@RUN"))?;
    let run: Option<u64> = run
        .map(|r| {
            r.parse()
                .map_err(|_| format!("bad session {wanted:?}: ID or ID@RUN"))
        })
        .transpose()?;
    let matching: Vec<&Session> = all
        .iter()
        .filter(|s| s.id == id && run.is_none_or(|r| s.run == r))
        .collect();
    match matching.as_slice() {
        [one] => Ok(one),
        [] => Err(format!("no session {wanted} in these files")),
        many => Err(format!(
            "session {id} is in several runs of vizor; choose one of: {}",
            many.iter()
                .map(|s| format!("{}@{}", s.id, s.run))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The sessions in `records`, in the order they started.
pub fn sessions(records: &[Value]) -> Vec<Session> {
    let mut by_id: BTreeMap<(u64, u64), Session> = BTreeMap::new();
    let mut order = Vec::new();
    for (r, run) in records.iter().zip(runs(records)) {
        let Some(id) = r["session"].as_u64() else {
            continue;
        };
        let key = (run, id);
        let s = |k: &str| r[k].as_str().unwrap_or("").to_owned();
        match r["event"].as_str() {
            Some("session_start") => {
                let entry = by_id.entry(key).or_insert_with(|| {
                    order.push(key);
                    Session {
                        run,
                        id,
                        user: s("user"),
                        domain: s("domain"),
                        kind: s("kind"),
                        client: s("client"),
                        start: s("ts"),
                        duration_ms: None,
                        keys: 0,
                        end: None,
                        channels: Vec::new(),
                    }
                });
                if let Some(c) = r["channel"].as_str() {
                    entry.channels.push(c.to_owned());
                }
            }
            Some("key") if r["down"] == true && r.get("ignored").is_none() => {
                if let Some(e) = by_id.get_mut(&key) {
                    e.keys += 1;
                }
            }
            Some("session_end") => {
                if let Some(e) = by_id.get_mut(&key) {
                    let d = r["duration_ms"].as_u64();
                    e.duration_ms = e.duration_ms.max(d);
                    // A SPICE session ends with its main channel: that channel's
                    // reason is the session's, whichever channel closed last.
                    // Another channel's end (a display closed, usbredir left) does
                    // not end a live session. Records without a channel (VNC, and
                    // SPICE logs written before channels were named) end it.
                    match r["channel"].as_str() {
                        Some(c) if !c.starts_with("spice:main:") => {}
                        _ => e.end = Some(s("reason")),
                    }
                }
            }
            _ => {}
        }
    }
    order
        .into_iter()
        .filter_map(|key| by_id.remove(&key))
        .collect()
}

/// A piece of reconstructed text.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Char(char),
    Marker(String),
}

/// The character a US keyboard types for a key name (as SPICE records name
/// scancodes), unshifted and shifted.
fn us_layout(name: &str) -> Option<(char, char)> {
    let mut chars = name.chars();
    if let (Some(c), None) = (chars.next(), chars.next()) {
        if c.is_ascii_lowercase() {
            return Some((c, c.to_ascii_uppercase()));
        }
        if c.is_ascii_digit() {
            let shifted = b")!@#$%^&*("[(c as u8 - b'0') as usize] as char;
            return Some((c, shifted));
        }
    }
    Some(match name {
        "space" => (' ', ' '),
        "minus" => ('-', '_'),
        "equal" => ('=', '+'),
        "bracketleft" => ('[', '{'),
        "bracketright" => (']', '}'),
        "semicolon" => (';', ':'),
        "apostrophe" => ('\'', '"'),
        "grave" => ('`', '~'),
        "backslash" => ('\\', '|'),
        "comma" => (',', '<'),
        "period" => ('.', '>'),
        "slash" => ('/', '?'),
        "less" => ('<', '>'),
        _ => return None,
    })
}

#[derive(Default)]
struct Mods {
    shift: u8,
    ctrl: u8,
    alt: u8,
    logo: u8,
    caps: bool,
    num: bool,
}

impl Mods {
    /// Tracks a modifier; false if `name` is none.
    fn track(&mut self, name: &str, down: bool) -> bool {
        let counter = match name {
            "Shift_L" | "Shift_R" => &mut self.shift,
            "Control_L" | "Control_R" => &mut self.ctrl,
            "Alt_L" | "Alt_R" | "Meta_L" | "Meta_R" => &mut self.alt,
            "Super_L" | "Super_R" | "Hyper_L" | "Hyper_R" => &mut self.logo,
            "Caps_Lock" => {
                if down {
                    self.caps = !self.caps;
                }
                return true;
            }
            "Num_Lock" => {
                if down {
                    self.num = !self.num;
                }
                return true;
            }
            "ISO_Level3_Shift" | "Mode_switch" | "Scroll_Lock" | "Shift_Lock" => return true,
            _ => return false,
        };
        *counter = if down {
            counter.saturating_add(1).min(2)
        } else {
            counter.saturating_sub(1)
        };
        true
    }
}

/// What was typed in session `id`: characters as typed (shift applied, BackSpace
/// deleting, Return a new line, Tab a tab), and other keys and control combinations
/// as markers such as `<Escape>` or `<Ctrl+Alt+Delete>`. Keys are read as the VM took
/// them: by the key QEMU acted on, typed as a US layout types it, with the guest's lock
/// state from the log's `locks` records; events QEMU passed to no guest are left out.
/// Redacted key records give `*` for a printable key and `<control>`/`<function>`
/// markers. Records without `via` (written before vizor named keys by what QEMU acts
/// on) are read as they were: VNC keys by keysym.
pub fn text(records: &[Value], session: &Session) -> String {
    let mut typist = Typist::default();
    let mut out: Vec<Piece> = Vec::new();
    for (r, run) in records.iter().zip(runs(records)) {
        if r["session"].as_u64() != Some(session.id) || run != session.run {
            continue;
        }
        match typist.record(r) {
            None => {}
            Some(Typed::BackSpace) => match out.last() {
                Some(Piece::Char(_)) => {
                    out.pop();
                }
                _ => out.push(Piece::Marker("<BackSpace>".into())),
            },
            Some(Typed::Piece(p)) => out.push(p),
        }
    }
    out.into_iter()
        .map(|p| match p {
            Piece::Char(c) => c.to_string(),
            Piece::Marker(m) => m,
        })
        .collect()
}

/// What one record typed.
#[derive(Debug, Clone, PartialEq)]
enum Typed {
    Piece(Piece),
    /// BackSpace: the last character taken back, when there is one.
    BackSpace,
}

/// Reads one session's key and lock records in order, as [`text`] does, one at a time:
/// for a live view of what is typed.
#[derive(Default)]
pub struct Typist {
    mods: Option<Mods>,
}

impl Typist {
    /// What the record `r` (of the typist's session) typed, as text: a character, a
    /// marker such as `<Escape>`, `<BackSpace>`; `None` when it typed nothing.
    pub fn typed(&mut self, r: &Value) -> Option<String> {
        Some(match self.record(r)? {
            Typed::Piece(Piece::Char(c)) => c.to_string(),
            Typed::Piece(Piece::Marker(m)) => m,
            Typed::BackSpace => "<BackSpace>".to_owned(),
        })
    }

    fn record(&mut self, r: &Value) -> Option<Typed> {
        // Num Lock is on unless the log says otherwise: firmware turns it on at boot.
        let mods = self.mods.get_or_insert(Mods {
            num: true,
            ..Mods::default()
        });
        if r["event"] == "locks" {
            mods.caps = r["caps"] == true;
            mods.num = r["num"] == true;
            return None;
        }
        if r["event"] != "key" || r.get("ignored").is_some() {
            return None;
        }
        let down = r["down"] == true;
        let Some(name) = r["key"].as_str() else {
            // Redacted: the class only.
            if !down {
                return None;
            }
            return match r["class"].as_str() {
                Some("printable") => Some(Typed::Piece(Piece::Char('*'))),
                Some("modifier") | None => None,
                Some(class) => Some(Typed::Piece(Piece::Marker(format!("<{class}>")))),
            };
        };
        if mods.track(name, down) || !down {
            return None;
        }
        // A paste's key carries the character vizor typed with it, on the layout the
        // page chose (the key alone reads as the US one); a dead key's first half types
        // nothing, its second carries the composed character.
        if r["origin"] == "paste" {
            let keysym = r["keysym"].as_u64().and_then(|k| u32::try_from(k).ok());
            if let Some(c) = keysym.and_then(keysym_char) {
                return Some(Typed::Piece(Piece::Char(c)));
            }
            if keysym.is_some_and(vizor_keys::layout::is_dead) {
                return None;
            }
        }
        let typed = match (r.get("via"), r["scancode"].as_u64(), r["keysym"].as_u64()) {
            // The key QEMU acted on.
            (Some(_), Some(n), _) => u8::try_from(n)
                .ok()
                .and_then(|n| typed_by(Key::from_number(n), mods)),
            // A keymap vizor does not model, or an older record: the keysym.
            (_, _, Some(k)) => keysym_char(k as u32),
            // An old SPICE record: the key's name.
            _ => us_layout(name).map(|(plain, shifted)| {
                let letter = plain.is_ascii_lowercase();
                if (mods.shift > 0) != (letter && mods.caps) {
                    shifted
                } else {
                    plain
                }
            }),
        };
        if mods.ctrl > 0 || mods.alt > 0 || mods.logo > 0 {
            let mut m = String::from("<");
            for (held, label) in [
                (mods.ctrl, "Ctrl+"),
                (mods.alt, "Alt+"),
                (mods.logo, "Super+"),
            ] {
                if held > 0 {
                    m.push_str(label);
                }
            }
            if mods.shift > 0 && typed.is_none() {
                m.push_str("Shift+");
            }
            match typed {
                Some(c) if c != ' ' => m.push(c),
                _ => m.push_str(name),
            }
            m.push('>');
            return Some(Typed::Piece(Piece::Marker(m)));
        }
        Some(match (typed, name) {
            (Some(c), _) => Typed::Piece(Piece::Char(c)),
            (None, "BackSpace") => Typed::BackSpace,
            (None, "Return" | "KP_Enter") => Typed::Piece(Piece::Char('\n')),
            (None, "Tab") => Typed::Piece(Piece::Char('\t')),
            (None, other) => Typed::Piece(Piece::Marker(format!("<{other}>"))),
        })
    }
}

/// What `key` types on a US layout with `mods` held.
fn typed_by(key: Key, mods: &Mods) -> Option<char> {
    let c = key.chars();
    if let Some(digit) = c.numpad {
        // Shift inverts Num Lock on a PC keypad.
        return (mods.num != (mods.shift > 0)).then_some(digit);
    }
    let plain = c.plain?;
    let letter = plain.is_ascii_lowercase();
    if (mods.shift > 0) != (letter && mods.caps) {
        c.shifted.or(Some(plain))
    } else {
        Some(plain)
    }
}

/// Key records of session `id` whose keysym disagrees with the key the VM took
/// (`mismatch`): the browser claimed one key and the VM got another.
pub fn mismatches(records: &[Value], session: &Session) -> usize {
    records
        .iter()
        .zip(runs(records))
        .filter(|(r, run)| {
            r["event"] == "key"
                && r["session"].as_u64() == Some(session.id)
                && *run == session.run
                && r["mismatch"] == true
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn of(id: u64) -> Session {
        Session {
            run: 0,
            id,
            user: String::new(),
            domain: String::new(),
            kind: String::new(),
            client: String::new(),
            start: String::new(),
            duration_ms: None,
            keys: 0,
            end: None,
            channels: Vec::new(),
        }
    }

    #[test]
    fn session_ids_are_told_apart_by_run() {
        let start = |seq: u64| json!({"event": "session_start", "session": 1, "seq": seq, "ts": "t", "user": "u", "domain": "d", "kind": "vnc", "client": "c"});
        let key = |name: &str| json!({"event": "key", "session": 1, "down": true, "key": name});
        let r = vec![
            json!({"event": "chain_start", "reason": "new", "seq": 0}),
            start(1),
            key("a"),
            json!({"event": "audit_close", "seq": 3}),
            json!({"event": "audit_open", "reason": "restart", "seq": 4}),
            start(5),
            key("b"),
        ];
        let all = sessions(&r);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].label(&all), "1@0");
        assert_eq!(all[1].label(&all), "1@4");
        let err = find(&all, "1").unwrap_err();
        assert!(err.contains("1@0, 1@4"), "{err}");
        assert_eq!(text(&r, find(&all, "1@4").unwrap()), "b");
        assert_eq!(text(&r, find(&all, "1@0").unwrap()), "a");
        assert!(find(&all, "2").is_err());
        assert!(find(&all, "x@1").is_err());
    }

    fn vnc(down: bool, keysym: u32) -> Value {
        json!({"event": "key", "session": 1, "down": down, "keysym": keysym,
               "key": vizor_rfb::keysym::keysym_name(keysym)})
    }

    fn spice(down: bool, name: &str) -> Value {
        json!({"event": "key", "session": 2, "down": down, "key": name, "scancode": 1})
    }

    fn press_vnc(keys: &[u32]) -> Vec<Value> {
        keys.iter()
            .flat_map(|k| [vnc(true, *k), vnc(false, *k)])
            .collect()
    }

    #[test]
    fn vnc_keys_become_the_typed_text() {
        const SHIFT: u32 = 0xffe1;
        const CTRL: u32 = 0xffe3;
        const ALT: u32 = 0xffe9;
        const BS: u32 = 0xff08;
        const RET: u32 = 0xff0d;
        const DEL: u32 = 0xffff;
        let mut r = vec![vnc(true, SHIFT)];
        r.extend(press_vnc(&[b'H' as u32]));
        r.push(vnc(false, SHIFT));
        r.extend(press_vnc(&[b'i' as u32, b'x' as u32, BS, b'!' as u32, RET]));
        r.extend([vnc(true, CTRL), vnc(true, ALT)]);
        r.extend(press_vnc(&[DEL]));
        r.extend([vnc(false, ALT)]);
        r.extend(press_vnc(&[b'c' as u32]));
        r.extend([vnc(false, CTRL)]);
        r.extend(press_vnc(&[0xff1b, BS]));
        // Another session's keys do not mix in.
        r.push(json!({"event": "key", "session": 9, "down": true, "keysym": 0x71, "key": "q"}));
        assert_eq!(
            text(&r, &of(1)),
            "Hi!\n<Ctrl+Alt+Delete><Ctrl+c><Escape><BackSpace>"
        );
    }

    #[test]
    fn spice_scancodes_apply_shift_and_caps_lock() {
        let mut r = Vec::new();
        let mut press = |name: &str| {
            r.push(spice(true, name));
            r.push(spice(false, name));
        };
        press("h");
        press("1");
        press("Caps_Lock");
        press("a");
        press("Caps_Lock");
        let mut r2 = r.clone();
        r2.push(spice(true, "Shift_L"));
        r2.extend([spice(true, "1"), spice(false, "1"), spice(true, "slash")]);
        r2.push(spice(false, "Shift_L"));
        r2.extend([spice(true, "space"), spice(true, "Return")]);
        assert_eq!(text(&r2, &of(2)), "h1A!? \n");
    }

    /// A record as vizor writes it now: the key QEMU acted on, by number.
    fn acted(down: bool, number: u8, keysym: Option<u32>, extra: Value) -> Value {
        let key = Key::from_number(number);
        let mut r = json!({"event": "key", "session": 6, "down": down, "via": "keycode",
            "scancode": number, "key": key.name(), "class": key.class().as_str()});
        if let Some(k) = keysym {
            r["keysym"] = json!(k);
            if !key.produces(k) {
                r["mismatch"] = json!(true);
            }
        }
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        r
    }

    fn tap(number: u8, keysym: Option<u32>) -> [Value; 2] {
        [
            acted(true, number, keysym, json!({})),
            acted(false, number, keysym, json!({})),
        ]
    }

    /// A paste's keys read as the characters vizor typed for the layout the page
    /// chose: German z (the US y key), AltGr+Q for @, and a dead circumflex then e.
    #[test]
    fn a_paste_reads_as_the_text_typed_on_its_layout() {
        use vizor_keys::layout::{events, Layout};
        let presses = Layout::De.plan("zä@ê\n", false).unwrap();
        let r: Vec<Value> = events(&presses)
            .iter()
            .map(|e| {
                acted(
                    e.down,
                    e.key.number(),
                    Some(e.keysym),
                    json!({"origin": "paste"}),
                )
            })
            .collect();
        assert_eq!(text(&r, &of(6)), "zä@ê\n");
        // The same keys without the marker read as a US keyboard's.
        let plain: Vec<Value> = events(&Layout::De.plan("z", false).unwrap())
            .iter()
            .map(|e| acted(e.down, e.key.number(), Some(e.keysym), json!({})))
            .collect();
        assert_eq!(text(&plain, &of(6)), "y");
    }

    #[test]
    fn text_follows_the_keys_the_vm_took_not_the_keysyms() {
        // The example: keysym z with keycode b, keysym Shift_L with keycode c.
        let mut r = Vec::new();
        r.extend(tap(0x30, Some(u32::from(b'z'))));
        r.extend(tap(0x2e, Some(0xffe1)));
        // Shift held by keycode makes the next key a capital.
        r.push(acted(true, 0x2a, Some(0xffe1), json!({})));
        r.extend(tap(0x1e, Some(u32::from(b'A'))));
        r.push(acted(false, 0x2a, Some(0xffe1), json!({})));
        // A release QEMU dropped and a console switch type nothing.
        r.push(acted(false, 0x1f, None, json!({"ignored": "not_pressed"})));
        r.push(acted(
            true,
            0x03,
            None,
            json!({"ignored": "console_switch"}),
        ));
        assert_eq!(text(&r, &of(6)), "bcA");
        assert_eq!(
            mismatches(&r, &of(6)),
            4,
            "z/b and Shift_L/c, pressed and released"
        );
    }

    #[test]
    fn the_guests_lock_state_decides_case_and_keypad() {
        let mut r = vec![
            json!({"event": "locks", "session": 6, "caps": true, "num": false, "scroll": false}),
        ];
        r.extend(tap(0x1e, None));
        r.extend(tap(0x48, None)); // keypad 8 with Num Lock off: Up
        r.push(
            json!({"event": "locks", "session": 6, "caps": false, "num": true, "scroll": false}),
        );
        r.extend(tap(0x1e, None));
        r.extend(tap(0x48, None));
        r.extend(tap(0x37, None)); // keypad *
        assert_eq!(text(&r, &of(6)), "A<KP_8>a8*");
    }

    #[test]
    fn redacted_keys_keep_their_class() {
        let r = vec![
            json!({"event": "key", "session": 3, "down": true, "class": "printable"}),
            json!({"event": "key", "session": 3, "down": false, "class": "printable"}),
            json!({"event": "key", "session": 3, "down": true, "class": "modifier"}),
            json!({"event": "key", "session": 3, "down": true, "class": "function"}),
        ];
        assert_eq!(text(&r, &of(3)), "*<function>");
    }

    #[test]
    fn sessions_group_spice_channels() {
        let r = vec![
            json!({"event": "session_start", "session": 4, "ts": "t0", "user": "u", "domain": "d", "kind": "spice", "client": "c", "channel": "spice:main:0"}),
            json!({"event": "session_start", "session": 4, "ts": "t1", "user": "u", "domain": "d", "kind": "spice", "client": "c", "channel": "spice:inputs:0"}),
            json!({"event": "key", "session": 4, "down": true, "key": "a"}),
            json!({"event": "key", "session": 4, "down": false, "key": "a"}),
            json!({"event": "session_end", "session": 4, "duration_ms": 900, "reason": "browser closed the connection", "channel": "spice:main:0"}),
            json!({"event": "session_end", "session": 4, "duration_ms": 1000, "reason": "the VM closed the console connection", "channel": "spice:display:0"}),
            json!({"event": "session_start", "session": 5, "ts": "t2", "user": "v", "domain": "e", "kind": "vnc", "client": "c"}),
        ];
        let s = sessions(&r);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].channels, ["spice:main:0", "spice:inputs:0"]);
        assert_eq!(s[0].keys, 1);
        assert_eq!(s[0].duration_ms, Some(1000));
        // The main channel's reason, though the display channel ended after it.
        assert_eq!(s[0].end.as_deref(), Some("browser closed the connection"));
        assert_eq!(s[1].end, None);
        // A live session whose display channel closed has not ended.
        let live = vec![
            json!({"event": "session_start", "session": 6, "ts": "t0", "user": "u", "domain": "d", "kind": "spice", "client": "c", "channel": "spice:main:0"}),
            json!({"event": "session_end", "session": 6, "duration_ms": 5, "reason": "the VM closed the console connection", "channel": "spice:display:0"}),
        ];
        assert_eq!(sessions(&live)[0].end, None);
    }
}
