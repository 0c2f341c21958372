//! NBD URIs (`doc/uri.md` of the NetworkBlockDevice/nbd project) for the
//! exports `ubd serve` prints. They must be valid RFC 3986 URIs: the export
//! name (the path) and the socket path (a query value) are percent-encoded,
//! every byte but the unreserved characters and `/`.

use std::fmt::Write;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `nbd+unix:///EXPORT?socket=SOCKET` (`nbds+unix` with `tls`).
pub fn unix(tls: bool, socket: &Path, export: &str) -> String {
    let s = if tls { "s" } else { "" };
    format!(
        "nbd{s}+unix:///{}?socket={}",
        encode(export.as_bytes()),
        encode(socket.as_os_str().as_bytes())
    )
}

/// `nbd://HOST:PORT/EXPORT` (`nbds` with `tls`). A server listening on
/// every address (`0.0.0.0`, `::`) is printed as `localhost`: a client can
/// connect to that, and a server certificate names it (as `scripts/tls-certs`
/// makes them), where neither holds for the unspecified address.
pub fn tcp(tls: bool, addr: SocketAddr, export: &str) -> String {
    let s = if tls { "s" } else { "" };
    let export = encode(export.as_bytes());
    if addr.ip().is_unspecified() {
        return format!("nbd{s}://localhost:{}/{export}", addr.port());
    }
    match addr {
        // Without the zone of a link-local address: the client names its own.
        SocketAddr::V6(a) => format!("nbd{s}://[{}]:{}/{export}", a.ip(), a.port()),
        SocketAddr::V4(a) => format!("nbd{s}://{a}/{export}"),
    }
}

/// Percent-encodes all of `bytes` but ALPHA, DIGIT, `-._~` and `/`.
fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_unchanged() {
        assert_eq!(
            unix(false, Path::new("/run/ubd/nbd.sock"), ""),
            "nbd+unix:///?socket=/run/ubd/nbd.sock"
        );
        assert_eq!(
            unix(true, Path::new("/s"), "disk-1_a.b~"),
            "nbds+unix:///disk-1_a.b~?socket=/s"
        );
        assert_eq!(
            tcp(false, "127.0.0.1:10809".parse().unwrap(), "disk"),
            "nbd://127.0.0.1:10809/disk"
        );
        assert_eq!(
            tcp(true, "[::1]:10809".parse().unwrap(), ""),
            "nbds://[::1]:10809/"
        );
    }

    #[test]
    fn a_server_on_every_address_is_reached_at_localhost() {
        assert_eq!(
            tcp(true, "0.0.0.0:10809".parse().unwrap(), "d"),
            "nbds://localhost:10809/d"
        );
        assert_eq!(
            tcp(false, "[::]:7".parse().unwrap(), ""),
            "nbd://localhost:7/"
        );
    }

    #[test]
    fn everything_else_is_percent_encoded() {
        assert_eq!(
            unix(false, Path::new("/t/a b#?%&=\".sock"), "x?y%z#w"),
            "nbd+unix:///x%3Fy%25z%23w?socket=/t/a%20b%23%3F%25%26%3D%22.sock"
        );
        assert_eq!(
            tcp(false, "10.0.0.1:1".parse().unwrap(), "é /d"),
            "nbd://10.0.0.1:1/%C3%A9%20/d"
        );
        // A socket path that is not UTF-8 keeps its bytes.
        let path = std::ffi::OsStr::from_bytes(b"/t/\xff");
        assert_eq!(
            unix(false, Path::new(path), ""),
            "nbd+unix:///?socket=/t/%FF"
        );
    }
}
