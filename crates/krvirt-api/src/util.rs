//! Small self-contained helpers: SHA-1 / UUIDv5 (for deterministic firmware
//! UUIDs), base64 decoding (cloud-init payloads) and the Kubernetes name
//! syntaxes. Written here to keep the crate free of extra dependencies.

/// SHA-1 digest of `data` (FIPS 180-4). Used only for name-based UUIDs, not
/// for anything security related.
pub(crate) fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let bit_len = (data.len() as u64).wrapping_mul(8);
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for chunk in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in chunk.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let temp = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = temp;
        }
        h[0] = h[0].wrapping_add(a);
        h[1] = h[1].wrapping_add(b);
        h[2] = h[2].wrapping_add(c);
        h[3] = h[3].wrapping_add(d);
        h[4] = h[4].wrapping_add(e);
    }
    let mut out = [0u8; 20];
    for (i, v) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

/// Parse a UUID in the canonical 8-4-4-4-12 hex form (either case).
pub(crate) fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let bytes = s.as_bytes();
    if bytes.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut n = 0;
    let mut i = 0;
    while i < 36 {
        if matches!(i, 8 | 13 | 18 | 23) {
            if bytes[i] != b'-' {
                return None;
            }
            i += 1;
            continue;
        }
        let hi = hex_val(bytes[i])?;
        let lo = hex_val(*bytes.get(i + 1)?)?;
        out[n] = (hi << 4) | lo;
        n += 1;
        i += 2;
    }
    Some(out)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

pub(crate) fn format_uuid(u: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// RFC 4122 name-based UUID, version 5 (SHA-1).
pub(crate) fn uuid_v5(namespace: &[u8; 16], name: &[u8]) -> String {
    let mut input = namespace.to_vec();
    input.extend_from_slice(name);
    let digest = sha1(&input);
    let mut u = [0u8; 16];
    u.copy_from_slice(&digest[..16]);
    u[6] = (u[6] & 0x0f) | 0x50;
    u[8] = (u[8] & 0x3f) | 0x80;
    format_uuid(&u)
}

/// Decode standard base64 (RFC 4648 alphabet, `=` padding required as Go's
/// `base64.StdEncoding` does). CR and LF are skipped like Go does.
pub(crate) fn decode_base64(s: &str) -> Result<Vec<u8>, String> {
    let clean: Vec<u8> = s.bytes().filter(|b| *b != b'\n' && *b != b'\r').collect();
    if !clean.len().is_multiple_of(4) {
        return Err(format!(
            "length {} is not a multiple of 4 (missing padding?)",
            clean.len()
        ));
    }
    let mut out = Vec::with_capacity(clean.len() / 4 * 3);
    let chunks = clean.len() / 4;
    for (ci, chunk) in clean.chunks_exact(4).enumerate() {
        let last = ci + 1 == chunks;
        let mut vals = [0u8; 4];
        let mut pad = 0;
        for (i, c) in chunk.iter().enumerate() {
            vals[i] = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                b'=' if last && i >= 2 => {
                    pad += 1;
                    0
                }
                _ => {
                    return Err(format!("illegal base64 data at input byte {}", ci * 4 + i));
                }
            };
            if pad > 0 && *c != b'=' {
                return Err(format!("illegal base64 data at input byte {}", ci * 4 + i));
            }
        }
        let n = (u32::from(vals[0]) << 18)
            | (u32::from(vals[1]) << 12)
            | (u32::from(vals[2]) << 6)
            | u32::from(vals[3]);
        let bytes = n.to_be_bytes();
        out.push(bytes[1]);
        if pad < 2 {
            out.push(bytes[2]);
        }
        if pad < 1 {
            out.push(bytes[3]);
        }
    }
    Ok(out)
}

fn is_dns_label_body(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Kubernetes DNS-1123 label: at most 63 lower-case alphanumerics or `-`,
/// starting and ending with an alphanumeric. Returns the problem, if any.
pub(crate) fn dns1123_label(s: &str) -> Option<String> {
    if s.len() > 63 {
        return Some(format!(
            "must be no more than 63 characters (is {})",
            s.len()
        ));
    }
    if !is_dns_label_body(s) {
        return Some(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', \
             and must start and end with an alphanumeric character"
                .to_string(),
        );
    }
    None
}

/// Kubernetes DNS-1123 subdomain with a caller-chosen maximum length
/// (253 in Kubernetes; KubeVirt VM names are limited to 63).
pub(crate) fn dns1123_subdomain(s: &str, max: usize) -> Option<String> {
    if s.len() > max {
        return Some(format!(
            "must be no more than {max} characters (is {})",
            s.len()
        ));
    }
    if s.is_empty() || !s.split('.').all(is_dns_label_body) {
        return Some(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
             '-' or '.', and must start and end with an alphanumeric character"
                .to_string(),
        );
    }
    None
}

/// `metadata.generateName` prefix: the name the server will build
/// (`prefix` + 5 random characters) must be a valid name.
pub(crate) fn generate_name_prefix(s: &str, max_name: usize) -> Option<String> {
    if s.is_empty() {
        return Some("must not be empty".to_string());
    }
    if s.len() + 5 > max_name {
        return Some(format!(
            "must be no more than {} characters (is {})",
            max_name - 5,
            s.len()
        ));
    }
    let ok = s
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.');
    let first_ok = s
        .bytes()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !ok || !first_ok {
        return Some(
            "must consist of lower case alphanumeric characters, '-' or '.', and start with an \
             alphanumeric character"
                .to_string(),
        );
    }
    None
}

fn is_qualified_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Label / annotation key: `[prefix/]name`, prefix a DNS subdomain,
/// name at most 63 characters of `[A-Za-z0-9_.-]` starting and ending
/// with an alphanumeric.
pub(crate) fn qualified_name(key: &str) -> Option<String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && let Some(problem) = dns1123_subdomain(p, 253)
    {
        return Some(format!("prefix part {problem}"));
    }
    if !is_qualified_name_part(name) {
        return Some(
            "name part must consist of alphanumeric characters, '-', '_' or '.', must start and \
             end with an alphanumeric character and be at most 63 characters"
                .to_string(),
        );
    }
    None
}

/// Label value: empty, or at most 63 characters of `[A-Za-z0-9_.-]`
/// starting and ending with an alphanumeric.
pub(crate) fn label_value(v: &str) -> Option<String> {
    if v.is_empty() || is_qualified_name_part(v) {
        None
    } else {
        Some(
            "a valid label must be an empty string or consist of at most 63 alphanumeric \
             characters, '-', '_' or '.', and must start and end with an alphanumeric character"
                .to_string(),
        )
    }
}

/// IANA service name as used for port names: 1-15 characters of lower
/// case alphanumerics and `-`, at least one letter, no leading, trailing
/// or doubled `-`.
pub(crate) fn iana_svc_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !s.contains("--")
}

/// A 48-bit MAC address written as six hex octets separated by `:` or `-`.
pub(crate) fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let sep = if s.contains(':') { ':' } else { '-' };
    let parts: Vec<&str> = s.split(sep).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut out = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        let b = p.as_bytes();
        if b.len() != 2 {
            return None;
        }
        out[i] = (hex_val(b[0])? << 4) | hex_val(b[1])?;
    }
    Some(out)
}

/// An IPv4 CIDR such as `10.0.2.0/24`.
pub(crate) fn parse_ipv4_cidr(s: &str) -> Option<(std::net::Ipv4Addr, u8)> {
    let (addr, len) = s.split_once('/')?;
    let addr: std::net::Ipv4Addr = addr.parse().ok()?;
    if len.is_empty() || !len.bytes().all(|c| c.is_ascii_digit()) || len.len() > 2 {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    (len <= 32).then_some((addr, len))
}

/// Absolute path without `.`/`..`/empty components (KubeVirt's rule for
/// containerDisk and kernel boot paths).
pub(crate) fn clean_absolute_path(p: &str) -> Result<(), &'static str> {
    if p == "/" {
        return Err("must not point to root");
    }
    let trimmed = p.strip_suffix('/').unwrap_or(p);
    let Some(rest) = trimmed.strip_prefix('/') else {
        return Err("must be an absolute path to a file without relative components");
    };
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err("must be an absolute path to a file without relative components");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: &[u8]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn sha1_known_vectors() {
        assert_eq!(hex(&sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(
            hex(&sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            hex(&sha1(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        let million_a = vec![b'a'; 1_000_000];
        assert_eq!(
            hex(&sha1(&million_a)),
            "34aa973cd4c4daa4f61eeb2bdbad27316534016f"
        );
    }

    #[test]
    fn uuid_v5_matches_rfc_examples() {
        let dns = parse_uuid("6ba7b810-9dad-11d1-80b4-00c04fd430c8").expect("valid");
        // Python: uuid.uuid5(uuid.NAMESPACE_DNS, 'python.org')
        assert_eq!(
            uuid_v5(&dns, b"python.org"),
            "886313e1-3b8a-5372-9b90-0c9aee199e5d"
        );
        assert_eq!(
            uuid_v5(&dns, b"www.example.com"),
            "2ed6657d-e927-568b-95e1-2665a8aea6a2"
        );
    }

    #[test]
    fn uuid_parse_format_roundtrip() {
        let s = "5d307ca9-b3ef-428c-8861-06e72d69f223";
        assert_eq!(format_uuid(&parse_uuid(s).expect("valid")), s);
        assert!(parse_uuid("5d307ca9b3ef428c886106e72d69f223").is_none());
        assert!(parse_uuid("5d307ca9-b3ef-428c-8861-06e72d69f22g").is_none());
        assert_eq!(
            format_uuid(&parse_uuid("5D307CA9-B3EF-428C-8861-06E72D69F223").expect("valid")),
            s
        );
    }

    #[test]
    fn base64_decoding() {
        assert_eq!(decode_base64("").expect("ok"), b"");
        assert_eq!(decode_base64("Zg==").expect("ok"), b"f");
        assert_eq!(decode_base64("Zm8=").expect("ok"), b"fo");
        assert_eq!(decode_base64("Zm9v").expect("ok"), b"foo");
        assert_eq!(decode_base64("Zm9v\nYmFy").expect("ok"), b"foobar");
        assert!(decode_base64("Zm9").is_err());
        assert!(decode_base64("Zm9v!!!!").is_err());
        assert!(decode_base64("Z===").is_err());
        assert!(decode_base64("Zg==Zg==").is_err());
        assert!(decode_base64("Zg=a").is_err());
    }

    #[test]
    fn names() {
        assert!(dns1123_label("vm-cirros").is_none());
        assert!(dns1123_label("Vm").is_some());
        assert!(dns1123_label("-a").is_some());
        assert!(dns1123_label(&"a".repeat(64)).is_some());
        assert!(dns1123_subdomain("a.b-c.d", 63).is_none());
        assert!(dns1123_subdomain("a..b", 63).is_some());
        assert!(dns1123_subdomain(&"a".repeat(64), 63).is_some());
        assert!(qualified_name("kubevirt.io/vm").is_none());
        assert!(qualified_name("special").is_none());
        assert!(qualified_name("Bad Key").is_some());
        assert!(qualified_name("UPPER.example/x").is_some());
        assert!(label_value("").is_none());
        assert!(label_value("vm-cirros").is_none());
        assert!(label_value("a b").is_some());
        assert!(generate_name_prefix("vm-", 63).is_none());
        assert!(generate_name_prefix("-vm", 63).is_some());
        assert!(iana_svc_name("http"));
        assert!(!iana_svc_name("80"));
        assert!(!iana_svc_name("a--b"));
        assert!(!iana_svc_name("averyveryverylongname"));
    }

    #[test]
    fn macs_cidrs_paths() {
        assert_eq!(
            parse_mac("de:ad:00:00:BE:af"),
            Some([0xde, 0xad, 0, 0, 0xbe, 0xaf])
        );
        assert!(parse_mac("DE-AD-00-00-BE-AF").is_some());
        assert!(parse_mac("de:ad:00:00:be").is_none());
        assert!(parse_mac("de:ad:00:00:be:af:00:11").is_none());
        assert!(parse_mac("zz:ad:00:00:be:af").is_none());
        assert!(parse_ipv4_cidr("10.0.2.0/24").is_some());
        assert!(parse_ipv4_cidr("10.0.2.0/33").is_none());
        assert!(parse_ipv4_cidr("10.0.2.0").is_none());
        assert!(parse_ipv4_cidr("fd10::/120").is_none());
        assert!(clean_absolute_path("/boot/vmlinuz").is_ok());
        assert!(clean_absolute_path("boot/vmlinuz").is_err());
        assert!(clean_absolute_path("/boot/../etc").is_err());
        assert!(clean_absolute_path("/").is_err());
    }
}
