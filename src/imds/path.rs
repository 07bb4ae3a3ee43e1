//! Request paths: `/`, `/<version>`, `/<version>/<category>/…`, with every dated version aliased to
//! `latest` and the trailing slash optional everywhere (botocore asks for
//! `placement/availability-zone/`, Go for `/latest/meta-data`).
//!
//! Paths are percent-decoded per segment; anything that is not UTF-8, holds control characters, or
//! climbs with `.`/`..` is refused outright rather than interpreted.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

/// Metadata versions EC2 lists at `/`, oldest first; `latest` follows them.
pub const VERSIONS: &[&str] = &[
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
    "2011-01-01",
    "2011-05-01",
    "2012-01-12",
    "2014-02-25",
    "2014-11-05",
    "2015-10-20",
    "2016-04-19",
    "2016-06-30",
    "2016-09-02",
    "2018-03-28",
    "2018-08-17",
    "2018-09-24",
    "2019-10-01",
    "2020-10-27",
    "2021-01-03",
    "2021-03-23",
    "2021-07-15",
];

/// A parsed request path. `rest` borrows from the request when it is already in canonical form
/// (nothing to decode, no doubled or trailing slashes), as SDKs send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataPath<'a> {
    /// `/`: the version listing.
    Root,
    /// `/<version>/<rest>`; `rest` is the segments joined by `/`, empty for the version root.
    Versioned { latest: bool, rest: Cow<'a, str> },
    /// A first segment that is not a version EC2 knows; `rest` as for `Versioned`, so that a
    /// token PUT under it can still be refused as a versioned one.
    UnknownVersion { rest: Cow<'a, str> },
}

/// Why a path was refused with 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path is not valid UTF-8 once decoded")]
    NotUtf8,
    #[error("the path contains a control character")]
    ControlCharacter,
    #[error("the path contains a '.' or '..' segment")]
    DotSegment,
}

pub fn parse(raw: &str) -> Result<MetadataPath<'_>, PathError> {
    if let Some(path) = parse_canonical(raw) {
        return Ok(path);
    }
    // Printable ASCII with nothing to decode: every segment is itself, so the checks below are
    // the general ones, without decoding or copying.
    if raw.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'%') {
        return parse_plain(raw);
    }
    parse_decoded(raw)
}

/// [`parse`] for a path in the form SDKs send (`/latest/meta-data/…`): printable ASCII, nothing
/// to decode, no empty segment but a trailing slash, nothing starting with a dot; `None` for
/// anything else. Every request goes through here, so it is one pass over the bytes that the
/// compiler can vectorise, then one search for the first segment's end.
fn parse_canonical(raw: &str) -> Option<MetadataPath<'_>> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return None;
    }
    // A byte to decode or refuse, or `//` or `/.` anywhere: the general parsers decide. Each
    // byte after the leading `/` is checked with the one before it, in one pass.
    // Non-short-circuit `|` and `&`: no branch per byte, so the loop vectorises.
    let odd = |(&a, &b): (&u8, &u8)| {
        u8::from(
            !(b' '..=b'~').contains(&b) | (b == b'%') | ((a == b'/') & ((b == b'/') | (b == b'.'))),
        )
    };
    if bytes
        .iter()
        .zip(&bytes[1..])
        .fold(0, |acc, pair| acc | odd(pair))
        != 0
    {
        return None;
    }
    let path = &raw[1..];
    let path = path.strip_suffix('/').unwrap_or(path);
    if path.is_empty() {
        return Some(MetadataPath::Root);
    }
    // The version is a few bytes: a plain scan finds its end sooner than a `memchr` call.
    let (first, rest) = match path.bytes().position(|b| b == b'/') {
        Some(end) => (&path[..end], &path[end + 1..]),
        None => (path, ""),
    };
    Some(versioned(first, Cow::Borrowed(rest)))
}

/// [`parse`] for any path: each segment percent-decoded and checked.
fn parse_decoded(raw: &str) -> Result<MetadataPath<'_>, PathError> {
    let mut segments = Vec::new();
    for segment in raw.split('/') {
        if segment.is_empty() {
            continue;
        }
        let decoded = percent_decode_str(segment)
            .decode_utf8()
            .map_err(|_| PathError::NotUtf8)?;
        if decoded.chars().any(char::is_control) {
            return Err(PathError::ControlCharacter);
        }
        if decoded == "." || decoded == ".." || decoded.contains('/') {
            return Err(PathError::DotSegment);
        }
        segments.push(decoded);
    }
    let Some((first, rest)) = segments.split_first() else {
        return Ok(MetadataPath::Root);
    };
    Ok(versioned(first, Cow::Owned(rest.join("/"))))
}

/// [`parse`] for a path without percent-escapes or control characters.
fn parse_plain(raw: &str) -> Result<MetadataPath<'_>, PathError> {
    let path = raw.trim_matches('/');
    if path.is_empty() {
        return Ok(MetadataPath::Root);
    }
    if path.split('/').any(|s| s == "." || s == "..") {
        return Err(PathError::DotSegment);
    }
    let (first, rest) = path.split_once('/').unwrap_or((path, ""));
    let rest = rest.trim_start_matches('/');
    let rest = if rest.contains("//") {
        let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        Cow::Owned(segments.join("/"))
    } else {
        Cow::Borrowed(rest)
    };
    Ok(versioned(first, rest))
}

fn versioned<'a>(first: &str, rest: Cow<'a, str>) -> MetadataPath<'a> {
    let latest = first == "latest";
    if !latest && !VERSIONS.contains(&first) {
        return MetadataPath::UnknownVersion { rest };
    }
    MetadataPath::Versioned { latest, rest }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versioned(latest: bool, rest: &str) -> MetadataPath<'_> {
        MetadataPath::Versioned {
            latest,
            rest: rest.into(),
        }
    }

    #[test]
    fn slashes_are_optional_and_versions_alias_latest() {
        assert_eq!(parse("/"), Ok(MetadataPath::Root));
        assert_eq!(parse(""), Ok(MetadataPath::Root));
        assert_eq!(parse("/latest"), Ok(versioned(true, "")));
        assert_eq!(parse("/latest/"), Ok(versioned(true, "")));
        assert_eq!(parse("/latest/meta-data"), Ok(versioned(true, "meta-data")));
        assert_eq!(
            parse("/latest/meta-data/placement/availability-zone/"),
            Ok(versioned(true, "meta-data/placement/availability-zone"))
        );
        assert_eq!(
            parse("/2009-04-04/user-data"),
            Ok(versioned(false, "user-data"))
        );
        assert_eq!(
            parse("//latest//meta-data//"),
            Ok(versioned(true, "meta-data"))
        );
        assert_eq!(
            parse("/2099-01-01/meta-data"),
            Ok(MetadataPath::UnknownVersion {
                rest: "meta-data".into()
            })
        );
    }

    #[test]
    fn odd_paths_are_refused() {
        assert_eq!(parse("/latest/%ff"), Err(PathError::NotUtf8));
        assert_eq!(
            parse("/latest/meta-data/../user-data"),
            Err(PathError::DotSegment)
        );
        assert_eq!(parse("/latest/%2e%2e/x"), Err(PathError::DotSegment));
        assert_eq!(parse("/latest/a%2fb"), Err(PathError::DotSegment));
        assert_eq!(parse("/latest/a%00b"), Err(PathError::ControlCharacter));
        assert_eq!(
            parse("/latest/meta-data/tags/instance/a%3Ab"),
            Ok(versioned(true, "meta-data/tags/instance/a:b"))
        );
    }

    #[test]
    fn plain_paths_parse_as_the_decoding_parser_parses_them() {
        let segments = [
            "",
            ".",
            "..",
            "latest",
            "2009-04-04",
            "2099-01-01",
            "meta-data",
            "a:b",
            "x y",
            "api",
            "token",
            "...",
            ".x",
            "a%2Fb",
        ];
        let (mut checked, mut canonical) = (0, 0);
        for a in segments {
            for b in segments {
                for c in segments {
                    for sep in ["/", "//"] {
                        for tail in ["", "/"] {
                            let raw = format!("/{a}{sep}{b}/{c}{tail}");
                            let decoded = parse_decoded(&raw);
                            if !raw.contains('%') {
                                assert_eq!(parse_plain(&raw), decoded, "{raw}");
                            }
                            // The fast path answers what it takes on as the general one does.
                            if let Some(path) = parse_canonical(&raw) {
                                assert_eq!(Ok(path), decoded, "{raw}");
                                canonical += 1;
                            }
                            assert_eq!(parse(&raw), decoded, "{raw}");
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 14 * 14 * 14 * 4);
        // Whatever has no empty, dot-led or escaped segment: 8 such names at `a` and `b`, one
        // separator, and at `c` the 8 with or without a trailing slash, or the empty one alone.
        assert_eq!(canonical, 8 * 8 * (8 * 2 + 1));
        // What SDKs send takes the fast path and is not copied.
        let raw = "/latest/meta-data/iam/security-credentials/app";
        assert!(parse_canonical(raw).is_some());
        match parse(raw) {
            Ok(MetadataPath::Versioned {
                rest: Cow::Borrowed(rest),
                ..
            }) => assert_eq!(rest, "meta-data/iam/security-credentials/app"),
            other => panic!("{other:?}"),
        }
    }
}
