//! The administrators of the management API, by bearer key: the single
//! `[api] admin_key_file` (the administrator `admin`) and the named keys of
//! `[api] admin_keys_file`, one `NAME KEY` per line. Read at start and again on SIGHUP;
//! a file that no longer reads keeps the keys in use.

use std::path::Path;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// The administrator the single `admin_key_file` key names.
pub const DEFAULT_ADMIN: &str = "admin";

/// The longest administrator name.
pub const MAX_NAME_LEN: usize = 64;

/// The administrators vizor knows.
pub struct Admins {
    keys: Vec<(String, Zeroizing<String>)>,
}

impl std::fmt::Debug for Admins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.keys.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Admins").field("names", &names).finish()
    }
}

/// Whether `name` may name an administrator: 1 to [`MAX_NAME_LEN`] letters, digits and
/// `.`, `_`, `-`, `@` (it goes into audit records, logs and close frames).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
    {
        return Err(format!(
            "administrator name {:?} must be 1 to {MAX_NAME_LEN} letters, digits, '.', '_', '-' or '@'",
            name.chars().take(80).collect::<String>()
        ));
    }
    Ok(())
}

impl Admins {
    /// The administrators of `[api]`: `None` when neither file is set (the API is off).
    pub fn load(single: Option<&Path>, named: Option<&Path>) -> Result<Option<Admins>, String> {
        let mut keys = Vec::new();
        if let Some(p) = single {
            keys.push((
                DEFAULT_ADMIN.to_owned(),
                crate::serve::load_bearer_key(p, "admin key file")?,
            ));
        }
        if let Some(p) = named {
            keys.extend(read_keys_file(p)?);
        }
        if single.is_none() && named.is_none() {
            return Ok(None);
        }
        for (i, (name, key)) in keys.iter().enumerate() {
            for (other, other_key) in &keys[..i] {
                if other == name {
                    return Err(format!(
                        "administrator {name:?} is named twice (the admin_key_file key is \"{DEFAULT_ADMIN}\")"
                    ));
                }
                if bool::from(other_key.as_bytes().ct_eq(key.as_bytes())) {
                    return Err(format!(
                        "administrators {other:?} and {name:?} have the same key: each needs its own, so the audit log can say who acted"
                    ));
                }
            }
        }
        Ok(Some(Admins { keys }))
    }

    /// The administrator whose key `given` is. Every key is compared, in constant time
    /// in its content, so the time taken says nothing of which matched.
    pub fn who(&self, given: &str) -> Option<&str> {
        let mut found = None;
        for (name, key) in &self.keys {
            let same =
                given.len() == key.len() && bool::from(given.as_bytes().ct_eq(key.as_bytes()));
            if same {
                found = Some(name.as_str());
            }
        }
        found
    }

    /// Whether an administrator of that name is known.
    pub fn named(&self, name: &str) -> bool {
        self.keys.iter().any(|(n, _)| n == name)
    }

    /// How many administrators there are.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none (a keys file without a key).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Reads `[api] admin_keys_file`: mode 0600 or stricter, one `NAME KEY` per line,
/// blank lines and `#` comments allowed.
fn read_keys_file(path: &Path) -> Result<Vec<(String, Zeroizing<String>)>, String> {
    let shown = path.display();
    let what = "admin keys file";
    let text = crate::serve::read_private(path, what)?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{what} {shown}, line {}", n + 1);
        let mut words = line.split_whitespace();
        let (Some(name), Some(key), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!(
                "{}: a line is NAME KEY (two words; the key is not shown)",
                at()
            ));
        };
        // Neither word is shown: a line written KEY NAME would show the key.
        if check_name(name).is_err() {
            return Err(format!(
                "{}: the name (the first word) must be 1 to {MAX_NAME_LEN} letters, digits, '.', '_', '-' or '@'",
                at()
            ));
        }
        if key.len() < 16 {
            return Err(format!(
                "{}: the key (the second word) is shorter than 16 characters (for example: head -c 32 /dev/urandom | base64)",
                at()
            ));
        }
        keys.push((name.to_owned(), Zeroizing::new(key.to_owned())));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(dir: &Path, name: &str, text: &str, mode: u32) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn named_keys_name_their_administrators() {
        let dir = tempfile::tempdir().unwrap();
        let single = file(dir.path(), "admin.key", "0123456789abcdef-one\n", 0o600);
        let named = file(
            dir.path(),
            "admins",
            "# who may act\n\nalice 0123456789abcdef-alice\n  bob.ops@example  0123456789abcdef-bob  \n",
            0o600,
        );
        let a = Admins::load(Some(&single), Some(&named)).unwrap().unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(a.who("0123456789abcdef-one"), Some("admin"));
        assert_eq!(a.who("0123456789abcdef-alice"), Some("alice"));
        assert_eq!(a.who("0123456789abcdef-bob"), Some("bob.ops@example"));
        assert_eq!(a.who("0123456789abcdef-bo"), None);
        assert_eq!(a.who(""), None);
        assert!(!format!("{a:?}").contains("0123456789"), "no key in Debug");
        let only_named = Admins::load(None, Some(&named)).unwrap().unwrap();
        assert_eq!(only_named.who("0123456789abcdef-one"), None);
        assert!(Admins::load(None, None).unwrap().is_none());
    }

    #[test]
    fn bad_keys_files_are_refused_saying_why() {
        let dir = tempfile::tempdir().unwrap();
        let single = file(dir.path(), "admin.key", "0123456789abcdef-one\n", 0o600);
        for (text, mode, want) in [
            (
                "alice 0123456789abcdef-a\n",
                0o640,
                "readable by group or others",
            ),
            ("alice\n", 0o600, "a line is NAME KEY"),
            (
                "alice 0123456789abcdef-a extra\n",
                0o600,
                "a line is NAME KEY",
            ),
            ("alice short\n", 0o600, "shorter than 16"),
            (
                "al/ice 0123456789abcdef-a\n",
                0o600,
                "the name (the first word)",
            ),
            (
                "0123456789abcdef/key alice\n",
                0o600,
                "the name (the first word)",
            ),
            (
                "alice 0123456789abcdef-a\nalice 0123456789abcdef-b\n",
                0o600,
                "named twice",
            ),
            ("admin 0123456789abcdef-b\n", 0o600, "named twice"),
            ("bob 0123456789abcdef-one\n", 0o600, "the same key"),
        ] {
            let p = file(dir.path(), "admins", text, mode);
            let e = Admins::load(Some(&single), Some(&p)).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains("0123456789abcdef"), "no key in {e}");
            assert!(!e.contains("al/ice"), "no word of the line in {e}");
        }
        let e = Admins::load(None, Some(&dir.path().join("none"))).unwrap_err();
        assert!(e.contains("admin keys file"), "{e}");
    }
}
