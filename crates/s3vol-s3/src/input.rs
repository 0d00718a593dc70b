//! Checks on strings that come from users and clusters (StorageClass, BucketClass and volume
//! parameters, Secrets) before they become part of a client configuration, shared by the CSI
//! and COSI drivers so both refuse the same values with the same words.
//!
//! - [`quoted`]: a value as an error message may show it — escaped (control characters never
//!   reach a log line raw) and cut to 64 characters, so a huge input is never echoed whole;
//! - [`has_nul`]: a NUL byte can travel in no path, argument or header, and is never meant;
//! - [`bounded`]: an error message as a gRPC status may carry it — control characters
//!   escaped, at most [`MESSAGE_MAX`] bytes — whatever an endpoint answered or a user sent;
//! - [`check_region`]: a region is a name (`us-east-1`, `ap-guangzhou`, `oss-cn-hangzhou`,
//!   Ceph's `default`), never something that could read as a flag (`--read-only`).

/// The longest value an error message quotes; longer ones are cut (with `…`).
pub const QUOTE_MAX: usize = 64;

/// `v` for an error message: `{:?}`-escaped and cut to [`QUOTE_MAX`] characters.
pub fn quoted(v: &str) -> String {
    match v.char_indices().nth(QUOTE_MAX) {
        Some((at, _)) => format!("{:?}…", &v[..at]),
        None => format!("{v:?}"),
    }
}

/// The longest message [`bounded`] lets through.
pub const MESSAGE_MAX: usize = 1024;

/// `msg` with control characters (newlines included) escaped and cut to [`MESSAGE_MAX`]
/// bytes, saying how much was cut: what a gRPC status or a log line may carry of a message
/// that embeds input or a server's answer.
pub fn bounded(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len().min(MESSAGE_MAX) + 32);
    for (i, c) in msg.char_indices() {
        if out.len() >= MESSAGE_MAX {
            out.push_str(&format!("… ({} more bytes)", msg.len() - i));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `v` holds a NUL byte.
pub fn has_nul(v: &str) -> bool {
    v.contains('\0')
}

/// `Err` with the reason when `region` is not 1–64 of `A-Za-z0-9-_.` starting with a letter
/// or digit.
pub fn check_region(region: &str) -> Result<(), String> {
    let ok = region.len() <= 64
        && region.starts_with(|c: char| c.is_ascii_alphanumeric())
        && region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "region {} is not a region name (letters, digits, '-', '_', '.', starting with a \
             letter or digit, at most 64)",
            quoted(region)
        ))
    }
}

/// `Err` with the reason when `url` is not an `http://` or `https://` URL of at most 2048
/// characters without spaces or control characters.
pub fn check_endpoint(url: &str) -> Result<(), String> {
    if (url.starts_with("http://") || url.starts_with("https://"))
        && url.len() <= 2048
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        Ok(())
    } else {
        Err(format!(
            "{} is not an http:// or https:// URL without spaces",
            quoted(url)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes_and_cuts() {
        assert_eq!(quoted("a\nb"), "\"a\\nb\"");
        let long = "x".repeat(10_000);
        let q = quoted(&long);
        assert!(q.len() < 80 && q.ends_with('…'), "{q}");
        assert_eq!(quoted("é".repeat(70).as_str()).chars().count(), 64 + 3);
    }

    #[test]
    fn regions() {
        for ok in [
            "us-east-1",
            "ap-guangzhou",
            "oss-cn-hangzhou",
            "default",
            "cn-north-4",
        ] {
            assert_eq!(check_region(ok), Ok(()), "{ok}");
        }
        for bad in [
            "--read-only",
            "-x",
            "",
            "us east",
            "a\0b",
            "a/b",
            &"r".repeat(65),
        ] {
            assert!(check_region(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn endpoints() {
        assert_eq!(check_endpoint("http://127.0.0.1:9000"), Ok(()));
        assert_eq!(check_endpoint("https://s3.example/path"), Ok(()));
        for bad in [
            "127.0.0.1:9000",
            "http://a b",
            "http://a\r\nHost: x",
            "ftp://x",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn messages_are_bounded() {
        assert_eq!(bounded("no such bucket: b"), "no such bucket: b");
        assert_eq!(bounded("a\nb\r\0"), "a\\nb\\r\\u{0}");
        let body = format!("S3 error: {}", "<Error>".repeat(100_000));
        let b = bounded(&body);
        assert!(b.len() < MESSAGE_MAX + 40, "{}", b.len());
        assert!(b.ends_with("more bytes)"), "{b}");
    }

    #[test]
    fn nul() {
        assert!(has_nul("a\0"));
        assert!(!has_nul("a"));
    }
}
