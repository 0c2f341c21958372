//! The few fields of an X.509 certificate that `ubd serve` reads itself:
//! when it is valid (`notBefore`, `notAfter`), so that it can warn at start
//! about a certificate that clients will refuse (expired, or not valid
//! yet). rustls checks neither for the server's own certificate; GnuTLS
//! clients (libnbd, qemu) refuse it in the handshake, with a message the
//! server never sees. And its version, to say why rustls refuses a v1
//! certificate.
//!
//! Only the path to the validity is parsed (certificate, to-be-signed part,
//! version, serial, signature algorithm, issuer, validity), strictly inside
//! each element's length; anything else is `None`, never a panic.

/// A certificate's validity, as Unix seconds and as the RFC 3339 text of
/// the same instant (the DER times are UTC, to the second).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validity {
    pub not_before: (i64, String),
    pub not_after: (i64, String),
}

/// The validity of the DER certificate `der`, or `None` if it cannot be
/// read.
pub fn validity(der: &[u8]) -> Option<Validity> {
    let tbs = to_be_signed(der)?;
    // The version, [0] EXPLICIT, is there for v2 and v3.
    let mut rest = match element(tbs)? {
        (0xa0, _, rest) => rest,
        _ => tbs,
    };
    // serialNumber INTEGER, signature SEQUENCE, issuer SEQUENCE.
    for tag in [0x02, 0x30, 0x30] {
        let (got, _, next) = element(rest)?;
        if got != tag {
            return None;
        }
        rest = next;
    }
    let (0x30, dates, _) = element(rest)? else {
        return None;
    };
    let (tag, before, rest) = element(dates)?;
    let not_before = time(tag, before)?;
    let (tag, after, _) = element(rest)?;
    let not_after = time(tag, after)?;
    Some(Validity {
        not_before,
        not_after,
    })
}

/// The X.509 version of the DER certificate `der` (1, 2 or 3), or `None`
/// if it cannot be read.
pub fn version(der: &[u8]) -> Option<u8> {
    match element(to_be_signed(der)?)? {
        (0xa0, explicit, _) => match element(explicit)? {
            (0x02, &[v], _) if v < 3 => Some(v + 1),
            _ => None,
        },
        // DEFAULT v1: absent.
        _ => Some(1),
    }
}

/// The contents of the certificate's `tbsCertificate`.
fn to_be_signed(der: &[u8]) -> Option<&[u8]> {
    let (0x30, cert, _) = element(der)? else {
        return None;
    };
    let (0x30, tbs, _) = element(cert)? else {
        return None;
    };
    Some(tbs)
}

/// The DER element at the start of `der`: its tag, its contents and what
/// follows it.
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |len, &b| len << 8 | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// A UTCTime (tag 0x17, `YYMMDDHHMMSSZ`, years 1950-2049) or
/// GeneralizedTime (0x18, `YYYYMMDDHHMMSSZ`).
fn time(tag: u8, bytes: &[u8]) -> Option<(i64, String)> {
    // ASCII only: the slicing below is by byte.
    if !bytes.is_ascii() {
        return None;
    }
    let text = std::str::from_utf8(bytes).ok()?;
    let (year, rest) = match tag {
        0x17 if text.len() == 13 => {
            let yy = number(&text[..2])?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &text[2..])
        }
        0x18 if text.len() == 15 => (number(&text[..4])?, &text[4..]),
        _ => return None,
    };
    if !rest.ends_with('Z') {
        return None;
    }
    let field = |i: usize| number(&rest[2 * i..2 * i + 2]);
    let (month, day, hour, minute, second) =
        (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    let text = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z");
    Some((secs, text))
}

/// A run of ASCII digits as a number.
fn number(digits: &str) -> Option<i64> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Days from 1970-01-01 to `year-month-day` in the proleptic Gregorian
/// calendar (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_with_characters_beyond_ascii_is_none() {
        // 13 bytes of valid UTF-8 whose byte 2 is inside a character.
        let text = "2\u{e9}101000000Z".as_bytes();
        assert_eq!(text.len(), 13);
        assert_eq!(time(0x17, text), None);
        let text = "20300101\u{e9}0000Z".as_bytes();
        assert_eq!(text.len(), 15);
        assert_eq!(time(0x18, text), None);
    }

    /// A DER element with a short or long length.
    fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let n = contents.len();
        if n < 0x80 {
            out.push(n as u8);
        } else {
            out.extend([0x82, (n >> 8) as u8, n as u8]);
        }
        out.extend_from_slice(contents);
        out
    }

    fn cert(version: bool, before: (u8, &str), after: (u8, &str)) -> Vec<u8> {
        let mut tbs = Vec::new();
        if version {
            tbs.extend(tlv(0xa0, &tlv(0x02, &[2])));
        }
        tbs.extend(tlv(0x02, &[0x12, 0x34]));
        tbs.extend(tlv(0x30, &tlv(0x06, &[0x2a, 0x86, 0x48])));
        tbs.extend(tlv(0x30, &[0x55; 200]));
        let mut dates = tlv(before.0, before.1.as_bytes());
        dates.extend(tlv(after.0, after.1.as_bytes()));
        tbs.extend(tlv(0x30, &dates));
        tbs.extend(tlv(0x30, &[0; 10]));
        let mut body = tlv(0x30, &tbs);
        body.extend(tlv(0x30, &[1, 2, 3]));
        tlv(0x30, &body)
    }

    #[test]
    fn reads_utc_and_generalized_times() {
        let der = cert(true, (0x17, "200101000000Z"), (0x18, "20991231235959Z"));
        let v = validity(&der).expect("validity");
        assert_eq!(v.not_before, (1_577_836_800, "2020-01-01T00:00:00Z".into()));
        assert_eq!(
            v.not_after,
            (4_102_444_799, "2099-12-31T23:59:59Z".to_string())
        );
        let v1 = cert(false, (0x17, "491231235959Z"), (0x17, "500101000000Z"));
        let v = validity(&v1).expect("a v1 certificate's validity");
        assert_eq!(v.not_before.1, "2049-12-31T23:59:59Z");
        assert_eq!(v.not_after, (-631_152_000, "1950-01-01T00:00:00Z".into()));
    }

    #[test]
    fn reads_the_version() {
        let v3 = cert(true, (0x17, "200101000000Z"), (0x17, "210101000000Z"));
        assert_eq!(version(&v3), Some(3));
        let v1 = cert(false, (0x17, "200101000000Z"), (0x17, "210101000000Z"));
        assert_eq!(version(&v1), Some(1));
        assert_eq!(version(&v3[..v3.len() - 1]), None);
    }

    #[test]
    fn anything_else_is_none_and_never_a_panic() {
        let good = cert(true, (0x17, "200101000000Z"), (0x17, "210101000000Z"));
        for n in 0..good.len() {
            assert_eq!(validity(&good[..n]), None, "cut at {n}");
        }
        for bad in [
            "2001010000Z",
            "200101000000+",
            "20a101000000Z",
            "201301000000Z",
        ] {
            let der = cert(true, (0x17, bad), (0x17, "210101000000Z"));
            assert_eq!(validity(&der), None, "{bad}");
        }
        let der = cert(true, (0x13, "200101000000Z"), (0x17, "210101000000Z"));
        assert_eq!(validity(&der), None, "a PrintableString");
        for i in 0..good.len() {
            let mut bent = good.clone();
            bent[i] ^= 0xff;
            let _ = validity(&bent);
        }
    }
}
