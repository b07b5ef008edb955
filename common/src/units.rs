//! Byte quantities as people type them on a command line: `4096`, `64K`, `100M`, `1.5G`,
//! `2TiB`. Suffixes are binary (K = 1024) with or without `i` and `B`.

/// Parses a byte count with an optional K, M, G or T suffix (binary multiples).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let mult: u64 = match unit.trim_end_matches(['B', 'b']).trim_end_matches('i') {
        "" => 1,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        "T" | "t" => 1 << 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M, G or T)")),
    };
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a byte count like 512, 64K, 100M or 1.5G"))?;
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{s:?} is too large"));
    }
    if mult == 1 && num.contains('.') {
        return Err(format!("{s:?}: a fraction of a byte"));
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn parses_plain_and_suffixed_counts_and_refuses_the_rest() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("64K"), Ok(64 << 10));
        assert_eq!(parse_bytes("100M"), Ok(100 << 20));
        assert_eq!(parse_bytes("100MiB"), Ok(100 << 20));
        assert_eq!(parse_bytes("1.5G"), Ok(3 << 29));
        assert_eq!(parse_bytes("2TB"), Ok(2 << 40));
        assert_eq!(parse_bytes("0"), Ok(0));
        for bad in ["", "M", "-1", "10X", "1.5", "1e3", "99999999999T"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} accepted");
        }
    }
}
