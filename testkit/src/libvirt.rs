//! Node files for libvirt's test driver: `test:///path/node.xml` is an in-process
//! libvirt (no daemon) holding running domains whose VNC graphics point at consoles
//! the caller runs (synthetic servers, or a witness in front of real QEMU). vizor
//! looks them up there as it would any domain.

use std::path::Path;

/// Which graphics a test domain has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Graphics {
    /// `<graphics type='vnc'>`.
    #[default]
    Vnc,
    /// `<graphics type='spice'>`, plain port only.
    Spice,
}

/// One running test domain with VNC (or SPICE) graphics on 127.0.0.1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// The domain's name.
    pub name: String,
    /// Its UUID (a token names its domain by it): [`uuid_of`] its name, or the
    /// caller's own scheme.
    pub uuid: [u8; 16],
    /// The VNC port on 127.0.0.1.
    pub port: u16,
    /// The VNC password libvirt stores; empty for graphics without one.
    pub password: String,
    /// VNC or SPICE.
    pub graphics: Graphics,
}

impl Domain {
    /// A domain whose UUID is [`uuid_of`] its name.
    pub fn named(name: &str, port: u16, password: &str) -> Domain {
        Domain {
            name: name.to_owned(),
            uuid: uuid_of(name),
            port,
            password: password.to_owned(),
            graphics: Graphics::Vnc,
        }
    }
}

/// A stable UUID for a test domain named `name` (the first 16 bytes of its SHA-256).
pub fn uuid_of(name: &str) -> [u8; 16] {
    use sha2::Digest;
    let d = sha2::Sha256::digest(name.as_bytes());
    let mut u = [0u8; 16];
    u.copy_from_slice(&d[..16]);
    u
}

/// `uuid` as libvirt writes it: 8-4-4-4-12 lowercase hex digits.
pub fn uuid_string(uuid: &[u8; 16]) -> String {
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Escapes `s` for an XML attribute or text in single quotes.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('\'', "&apos;")
}

/// The node file holding `domains`, each running, with its graphics.
pub fn node_xml(domains: &[Domain]) -> String {
    let mut node = String::from("<node>\n");
    for d in domains {
        node.push_str(&format!(
            "<domain type='test'><name>{}</name><uuid>{}</uuid><memory>65536</memory>\
             <os><type>hvm</type></os><devices><graphics type='{}' port='{}' \
             listen='127.0.0.1'{}/></devices></domain>\n",
            escape(&d.name),
            uuid_string(&d.uuid),
            match d.graphics {
                Graphics::Vnc => "vnc",
                Graphics::Spice => "spice",
            },
            d.port,
            if d.password.is_empty() {
                String::new()
            } else {
                format!(" passwd='{}'", escape(&d.password))
            }
        ));
    }
    node.push_str("</node>\n");
    node
}

/// Writes [`node_xml`] of `domains` to `path`; returns the `test://` URI that names it.
pub fn write_node(path: &Path, domains: &[Domain]) -> std::io::Result<String> {
    std::fs::write(path, node_xml(domains))?;
    Ok(format!("test://{}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_leaves_out_an_empty_password() {
        let xml = node_xml(&[
            Domain::named("a<b", 5901, "&p'w"),
            Domain::named("open", 5902, ""),
        ]);
        assert!(xml.contains("<name>a&lt;b</name>"), "{xml}");
        assert!(xml.contains("port='5901' listen='127.0.0.1' passwd='&amp;p&apos;w'/>"));
        assert!(xml.contains("port='5902' listen='127.0.0.1'/>"), "{xml}");
        assert!(xml.contains(&format!("<uuid>{}</uuid>", uuid_string(&uuid_of("open")))));
    }

    #[test]
    fn uuids_are_hyphenated_hex() {
        let mut u = [0u8; 16];
        u[0] = 0xab;
        u[15] = 0x01;
        assert_eq!(uuid_string(&u), "ab000000-0000-0000-0000-000000000001");
    }
}
