//! How S3 names and metadata map onto the namespace: bucket and key to path, object metadata to
//! extended attributes, attributes to ETag and Last-Modified.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, UNIX_EPOCH};

use cairn_proto::v1::{Attr, InodeKind};
use cairn_proto::ETAG_XATTR;
use s3s::dto::{Owner, Timestamp};
use s3s::{S3Error, S3ErrorCode, S3Result};

/// The MD5 of nothing: the ETag of an empty object.
pub const EMPTY_MD5: &str = "d41d8cd98f00b204e9800998ecf8427e";
const CONTENT_TYPE: &str = "user.s3.content-type";
const META_PREFIX: &str = "user.s3.meta.";
/// Standard headers kept with an object, beside its content type.
const HEADERS: [&str; 4] = ["cache-control", "content-disposition", "content-encoding", "content-language"];
const HEADER_PREFIX: &str = "user.s3.header.";
/// Longest path the namespace takes, and longest name in it (as on Linux).
const PATH_MAX: usize = 4096;
const NAME_MAX: usize = 255;

pub fn is_dir(a: &Attr) -> bool {
    a.kind() == InodeKind::Directory
}

pub fn bucket_path(bucket: &str) -> String {
    format!("/{bucket}")
}

/// What S3 accepts as a bucket name (lowercase letters, digits, '-' and '.', 3 to 63
/// characters, starting and ending with a letter or digit). Other top-level directories (such as
/// `.s3-uploads`) are not buckets.
pub fn is_bucket_name(name: &str) -> bool {
    let b = name.as_bytes();
    (3..=63).contains(&b.len())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// The path of object `key` in `bucket`. Keys that cannot be a path ("a//b", "./x", a name
/// over 255 bytes) are refused with a clear S3 error. A key ending in '/' names a directory.
pub fn object_path(bucket: &str, key: &str) -> S3Result<String> {
    let bad = |why: &str| {
        S3Error::with_message(S3ErrorCode::InvalidArgument, format!("key {key:?} cannot be stored as a path: {why}"))
    };
    if key.is_empty() {
        return Err(bad("empty key"));
    }
    let body = key.strip_suffix('/').unwrap_or(key);
    if body.is_empty() {
        return Err(bad("no name before '/'"));
    }
    for name in body.split('/') {
        match name {
            "" => return Err(bad("empty path component (leading '/' or '//')")),
            "." | ".." => return Err(bad("'.' and '..' are not names")),
            _ if name.len() > NAME_MAX => {
                return Err(S3Error::with_message(
                    S3ErrorCode::KeyTooLongError,
                    format!("a path component of key {key:?} is longer than {NAME_MAX} bytes"),
                ))
            }
            _ if name.contains('\0') => return Err(bad("contains NUL")),
            _ => {}
        }
    }
    let path = format!("/{bucket}/{body}");
    if path.len() > PATH_MAX {
        return Err(S3Error::with_message(S3ErrorCode::KeyTooLongError, format!("path longer than {PATH_MAX} bytes")));
    }
    Ok(path)
}

pub fn timestamp(ns: i64) -> Timestamp {
    Timestamp::from(UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64))
}

/// Last-Modified as HTTP carries it: whole seconds.
pub fn last_modified(a: &Attr) -> Timestamp {
    timestamp(a.mtime_ns.max(0) / 1_000_000_000 * 1_000_000_000)
}

/// One owner for everything: the cluster.
pub fn owner() -> Owner {
    Owner { display_name: Some("cairn".into()), id: Some("cairn".into()) }
}

/// An object's ETag: the one recorded when it was written through S3 (MD5 of the content, or of
/// the parts for a multipart upload), or for a file written otherwise one derived from its inode
/// and version, shaped like a multipart ETag so that clients do not take it for an MD5.
pub fn etag_of(a: &Attr, xattrs: &BTreeMap<String, Vec<u8>>) -> String {
    if let Some(e) = xattrs.get(ETAG_XATTR).and_then(|v| std::str::from_utf8(v).ok()) {
        return e.to_string();
    }
    if a.size == 0 {
        return EMPTY_MD5.to_string();
    }
    let mut h = blake3::Hasher::new();
    h.update(&a.inode.to_le_bytes());
    h.update(&a.version.to_le_bytes());
    format!("{}-1", hex::encode(&h.finalize().as_bytes()[..16]))
}

/// The metadata an S3 client sets on an object and gets back with it.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ObjectMeta {
    pub content_type: Option<String>,
    /// cache-control, content-disposition, content-encoding, content-language.
    pub headers: BTreeMap<String, String>,
    /// x-amz-meta-* (names without the prefix, lowercase).
    pub user: BTreeMap<String, String>,
}

impl ObjectMeta {
    pub fn new(
        content_type: Option<String>,
        headers: [Option<String>; 4],
        user: Option<HashMap<String, String>>,
    ) -> ObjectMeta {
        let headers = HEADERS.iter().zip(headers).filter_map(|(n, v)| Some((n.to_string(), v?))).collect();
        ObjectMeta { content_type, headers, user: user.unwrap_or_default().into_iter().collect() }
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).cloned()
    }

    pub fn user_map(&self) -> Option<HashMap<String, String>> {
        (!self.user.is_empty()).then(|| self.user.clone().into_iter().collect())
    }

    /// The response headers this metadata sets on GET and HEAD.
    pub fn head(&self) -> s3s::dto::HeadObjectOutput {
        s3s::dto::HeadObjectOutput {
            content_type: self.content_type.clone(),
            cache_control: self.header("cache-control"),
            content_disposition: self.header("content-disposition"),
            content_encoding: self.header("content-encoding"),
            content_language: self.header("content-language"),
            metadata: self.user_map(),
            ..Default::default()
        }
    }

    /// The extended attributes to commit with an object of this metadata and ETag.
    pub fn to_xattrs(&self, etag: &str) -> BTreeMap<String, Vec<u8>> {
        let mut x = BTreeMap::new();
        x.insert(ETAG_XATTR.to_string(), etag.as_bytes().to_vec());
        if let Some(t) = &self.content_type {
            x.insert(CONTENT_TYPE.to_string(), t.as_bytes().to_vec());
        }
        for (k, v) in &self.headers {
            x.insert(format!("{HEADER_PREFIX}{k}"), v.as_bytes().to_vec());
        }
        for (k, v) in &self.user {
            x.insert(format!("{META_PREFIX}{k}"), v.as_bytes().to_vec());
        }
        x
    }

    pub fn from_xattrs(x: &BTreeMap<String, Vec<u8>>) -> ObjectMeta {
        let text = |v: &Vec<u8>| String::from_utf8_lossy(v).into_owned();
        let mut m = ObjectMeta { content_type: x.get(CONTENT_TYPE).map(text), ..Default::default() };
        for (k, v) in x {
            if let Some(h) = k.strip_prefix(HEADER_PREFIX) {
                m.headers.insert(h.to_string(), text(v));
            } else if let Some(u) = k.strip_prefix(META_PREFIX) {
                m.user.insert(u.to_string(), text(v));
            }
        }
        m
    }
}

/// A key as a listing returns it: percent-encoded when the client asked for `encoding-type=url`
/// (the AWS CLI always does), so that any byte survives XML.
pub fn encode_key(s: &str, url: bool) -> String {
    use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
    const KEEP: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~').remove(b'/');
    if url {
        utf8_percent_encode(s, KEEP).to_string()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_cannot_be_paths_are_refused() {
        assert_eq!(object_path("b", "a/b/c.txt").unwrap(), "/b/a/b/c.txt");
        assert_eq!(object_path("b", "dir/").unwrap(), "/b/dir");
        for bad in ["", "/", "/a", "a//b", "a/./b", "../x", "a/.."] {
            assert_eq!(object_path("b", bad).unwrap_err().code(), &S3ErrorCode::InvalidArgument, "{bad:?}");
        }
        assert_eq!(object_path("b", &"x".repeat(256)).unwrap_err().code(), &S3ErrorCode::KeyTooLongError);
    }

    #[test]
    fn metadata_round_trips_through_xattrs() {
        let mut user = HashMap::new();
        user.insert("color".to_string(), "blue".to_string());
        let m = ObjectMeta::new(Some("text/plain".into()), [None, Some("inline".into()), None, None], Some(user));
        let x = m.to_xattrs("abc");
        assert_eq!(x.get(ETAG_XATTR).unwrap(), b"abc");
        let back = ObjectMeta::from_xattrs(&x);
        assert_eq!(back.content_type.as_deref(), Some("text/plain"));
        assert_eq!(back.header("content-disposition").as_deref(), Some("inline"));
        assert_eq!(back.user.get("color").map(String::as_str), Some("blue"));
    }

    #[test]
    fn bucket_names() {
        assert!(is_bucket_name("my-bucket.1"));
        assert!(!is_bucket_name(".s3-uploads"));
        assert!(!is_bucket_name("ab"));
        assert!(!is_bucket_name("Upper"));
    }
}
