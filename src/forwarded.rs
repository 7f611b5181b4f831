//! Who the client is behind reverse proxies, sans-IO. Only a TCP peer in
//! `[server] trusted_proxies` is believed when it says, in `Forwarded` (RFC 7239) or
//! `X-Forwarded-For`, whom it forwards for; each hop is believed only while the hop
//! that named it is trusted, from the right. The client is the rightmost address not
//! in the trusted ranges, so a client cannot name itself anyone by sending the header
//! itself: its own entries lie to the left of the one its proxy appends.

use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

/// The client of a request from `peer`: `forwarded` holds the `Forwarded` header
/// values, `x_forwarded_for` the `X-Forwarded-For` ones, in the order received
/// (`Forwarded` wins when both are present). An entry that is not an address
/// (`unknown`, an obfuscated name, garbage) ends the walk: the client is then the last
/// trusted hop, which is all that is known.
pub fn client(
    peer: IpAddr,
    trusted: &[IpNet],
    forwarded: &[&str],
    x_forwarded_for: &[&str],
) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<Option<IpAddr>> = if !forwarded.is_empty() {
        forwarded
            .iter()
            .flat_map(|v| v.split(','))
            .map(forwarded_for)
            .collect()
    } else {
        x_forwarded_for
            .iter()
            .flat_map(|v| v.split(','))
            .map(address)
            .collect()
    };
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        if !is_trusted(&client) {
            break;
        }
        match hop {
            Some(ip) => client = ip.to_canonical(),
            None => break,
        }
    }
    client
}

/// The `for=` address of one `Forwarded` element (`for=192.0.2.1;proto=https`,
/// `For="[2001:db8::1]:4711"`).
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("for") {
            return None;
        }
        address(v.trim().trim_matches('"'))
    })
}

/// An address, perhaps with a port, IPv6 perhaps in brackets.
fn address(text: &str) -> Option<IpAddr> {
    let t = text.trim();
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = t.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    t.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|r| r.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn only_trusted_proxies_are_believed_and_the_rightmost_untrusted_is_the_client() {
        let t = nets(&["10.0.0.0/8", "::1/128"]);
        // Not from a proxy: the header is the client's own word, ignored.
        assert_eq!(
            client(ip("203.0.113.9"), &t, &[], &["198.51.100.1"]),
            ip("203.0.113.9")
        );
        // From a proxy: the address it appended.
        assert_eq!(
            client(ip("10.0.0.2"), &t, &[], &["203.0.113.7"]),
            ip("203.0.113.7")
        );
        // A client that sent its own X-Forwarded-For: the proxy appends the real one
        // on the right; what the client wrote is never reached.
        assert_eq!(
            client(ip("10.0.0.2"), &t, &[], &["1.2.3.4, 203.0.113.7"]),
            ip("203.0.113.7")
        );
        // Two trusted proxies in a row, headers repeated.
        assert_eq!(
            client(
                ip("10.0.0.2"),
                &t,
                &[],
                &["203.0.113.7, 10.1.1.1", "10.2.2.2"]
            ),
            ip("203.0.113.7")
        );
        // Every hop trusted: the leftmost.
        assert_eq!(
            client(ip("10.0.0.2"), &t, &[], &["10.9.9.9"]),
            ip("10.9.9.9")
        );
        // No header: the proxy itself.
        assert_eq!(client(ip("10.0.0.2"), &t, &[], &[]), ip("10.0.0.2"));
        // Garbage or "unknown" stops the walk at the last trusted hop.
        assert_eq!(
            client(ip("10.0.0.2"), &t, &[], &["203.0.113.7, unknown"]),
            ip("10.0.0.2")
        );
        assert_eq!(client(ip("10.0.0.2"), &t, &[], &["x"]), ip("10.0.0.2"));
        // IPv4-mapped IPv6 peers are their IPv4 address.
        let t4 = nets(&["127.0.0.0/8"]);
        assert_eq!(
            client(ip("::ffff:127.0.0.1"), &t4, &[], &["203.0.113.7"]),
            ip("203.0.113.7")
        );
    }

    #[test]
    fn forwarded_is_read_as_rfc_7239_writes_it() {
        let t = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client(
                ip("10.0.0.2"),
                &t,
                &["for=1.2.3.4, For=\"[2001:db8::7]:4711\";proto=https"],
                &["9.9.9.9"]
            ),
            ip("2001:db8::7"),
            "Forwarded wins over X-Forwarded-For"
        );
        assert_eq!(
            client(
                ip("10.0.0.2"),
                &t,
                &["proto=https;for=192.0.2.60:8080"],
                &[]
            ),
            ip("192.0.2.60")
        );
        assert_eq!(
            client(ip("10.0.0.2"), &t, &["for=_hidden"], &[]),
            ip("10.0.0.2")
        );
        assert_eq!(
            client(ip("10.0.0.2"), &t, &["by=10.0.0.2"], &[]),
            ip("10.0.0.2")
        );
    }
}
