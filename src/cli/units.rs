//! Sizes as people write them: `10G`, `512M`, `1.5T`, `4096`. Units are binary
//! (K = 1024), as in qemu-img.

const UNITS: [(char, u32); 6] = [
    ('K', 10),
    ('M', 20),
    ('G', 30),
    ('T', 40),
    ('P', 50),
    ('E', 60),
];

/// Parses `4096`, `64K`, `10G`, `1.5T`, `512MiB`, `2gb` (case-insensitive).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.starts_with('-') {
        return Err(format!("{text:?} is negative: a size is 0 or more bytes"));
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let suffix = suffix.trim().to_ascii_uppercase();
    let shift = match suffix.as_str() {
        "" | "B" => 0,
        s => {
            let unit = s.trim_end_matches("IB").trim_end_matches('B');
            let mut chars = unit.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => UNITS
                    .iter()
                    .find(|(u, _)| *u == c)
                    .map(|(_, shift)| *shift)
                    .ok_or_else(|| {
                        format!("unknown size unit {s:?} in {text:?} (use K, M, G, T, P or E)")
                    })?,
                _ => {
                    return Err(format!(
                        "unknown size unit {s:?} in {text:?} (use K, M, G, T, P or E)"
                    ));
                }
            }
        }
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty() {
        return Err(format!(
            "{text:?} is not a size (examples: 4096, 512M, 10G)"
        ));
    }
    let parse = |digits: &str| -> Result<u128, String> {
        if digits.is_empty() {
            return Ok(0);
        }
        digits
            .parse::<u128>()
            .map_err(|_| format!("{text:?} is not a size (examples: 4096, 512M, 10G)"))
    };
    if frac.len() > 18 {
        return Err(format!("{text:?} has too many decimal places"));
    }
    let unit = 1u128 << shift;
    let scale = 10u128.pow(frac.len() as u32);
    let scaled = parse(whole)?
        .checked_mul(unit)
        .and_then(|w| parse(frac).ok()?.checked_mul(unit).map(|f| (w, f)));
    let Some((whole_bytes, frac_bytes)) = scaled else {
        return Err(format!("{text:?} is too large"));
    };
    if frac_bytes % scale != 0 {
        return Err(format!("{text:?} is not a whole number of bytes"));
    }
    u64::try_from(whole_bytes + frac_bytes / scale).map_err(|_| format!("{text:?} is too large"))
}

/// Formats a size compactly: `10G` and `512M` when exact, `976.6K` otherwise,
/// plain bytes under 1K.
pub fn format_size(bytes: u64) -> String {
    for &(unit, shift) in UNITS.iter().rev() {
        let size = 1u64 << shift;
        if bytes >= size {
            if bytes % size == 0 {
                return format!("{}{unit}", bytes / size);
            }
            return format!("{:.1}{unit}", bytes as f64 / size as f64);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_people_write() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2gb"), Ok(2 << 30));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size(" 64K "), Ok(65536));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("15E"), Ok(15 << 60));
    }

    #[test]
    fn refuses_what_is_not_a_size() {
        for bad in [
            "",
            "G",
            "10X",
            "1.0001K",
            "16E",
            "1.2.3",
            "-1",
            "10GG",
            "99999999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_size("-1"),
            Err(r#""-1" is negative: a size is 0 or more bytes"#.to_string())
        );
    }

    #[test]
    fn formats_compactly() {
        assert_eq!(format_size(10 << 30), "10G");
        assert_eq!(format_size(512 << 20), "512M");
        assert_eq!(format_size(1_000_000), "976.6K");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(0), "0");
        for n in [1u64 << 20, 3 << 40, 4096, 1536] {
            assert_eq!(parse_size(&format_size(n)), Ok(n));
        }
    }
}
