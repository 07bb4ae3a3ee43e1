//! Request paths: `/`, `/<version>`, `/<version>/<category>/…`, with every dated version aliased to
//! `latest` and the trailing slash optional everywhere (botocore asks for
//! `placement/availability-zone/`, Go for `/latest/meta-data`).
//!
//! Paths are percent-decoded per segment; anything that is not UTF-8, holds control characters, or
//! climbs with `.`/`..` is refused outright rather than interpreted.

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

/// A parsed request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataPath {
    /// `/`: the version listing.
    Root,
    /// `/<version>/<rest>`; `rest` is the segments joined by `/`, empty for the version root.
    Versioned { latest: bool, rest: String },
    /// A first segment that is not a version EC2 knows; `rest` as for `Versioned`, so that a
    /// token PUT under it can still be refused as a versioned one.
    UnknownVersion { rest: String },
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

pub fn parse(raw: &str) -> Result<MetadataPath, PathError> {
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
    let latest = first == "latest";
    let rest = rest.join("/");
    if !latest && !VERSIONS.contains(&first.as_ref()) {
        return Ok(MetadataPath::UnknownVersion { rest });
    }
    Ok(MetadataPath::Versioned { latest, rest })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versioned(latest: bool, rest: &str) -> MetadataPath {
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
}
