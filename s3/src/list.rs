//! ListObjects (V1 and V2) over the directory tree.
//!
//! Keys are listed in S3's order (bytewise) by a depth-first walk in which a directory sorts as
//! its name followed by '/': every key under it starts with that, so the walk yields keys in
//! order without sorting more than one directory at a time. Subtrees that cannot hold a key
//! after the marker or under the prefix are not read; with a delimiter, a directory whose keys
//! all roll up into one common prefix is reported without being read either.

use base64::Engine;
use cairn_client::Error;
use cairn_proto::v1::{Attr, InodeKind};
use s3s::dto::*;
use s3s::{s3_error, S3Result};

use crate::names::{self, encode_key};
use crate::{internal, Gateway};

const MAX_KEYS: usize = 1000;

struct Item {
    key: String,
    dir: bool,
    attr: Attr,
    etag: String,
}

/// One page of a listing.
#[derive(Default)]
struct Page {
    objects: Vec<Item>,
    prefixes: Vec<String>,
    truncated: bool,
    /// The last key or common prefix of the page: where the next page starts.
    last: Option<String>,
}

impl Page {
    fn len(&self) -> usize {
        self.objects.len() + self.prefixes.len()
    }
}

impl Gateway {
    /// The keys of `bucket` under `prefix` after `after`, at most `max`, rolled up by
    /// `delimiter`.
    async fn walk(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        after: &str,
        max: usize,
    ) -> S3Result<Page> {
        self.require_bucket(bucket).await?;
        let mut page = Page::default();
        if max == 0 {
            return Ok(page);
        }
        // Start in the deepest directory the prefix names in full.
        let start = &prefix[..prefix.rfind('/').map_or(0, |i| i + 1)];
        let path = if start.is_empty() {
            names::bucket_path(bucket)
        } else {
            match names::object_path(bucket, start) {
                Ok(p) => p,
                Err(_) => return Ok(page), // no key can have this prefix
            }
        };
        let delimiter = delimiter.filter(|d| !d.is_empty());
        let mut stack = vec![self.read_dir(&path, start).await?.into_iter()];
        while let Some(items) = stack.last_mut() {
            let Some(item) = items.next() else {
                stack.pop();
                continue;
            };
            let k = item.key.as_str();
            let under = k.starts_with(prefix);
            if !(under || item.dir && prefix.starts_with(k)) {
                continue;
            }
            // With a delimiter, the common prefix every key under this one rolls up into, if
            // that is already decided by this key.
            let rolled = match delimiter {
                Some(d) if under => k[prefix.len()..].find(d).map(|i| k[..prefix.len() + i + d.len()].to_string()),
                _ => None,
            };
            if let Some(cp) = rolled {
                if cp.as_str() <= after || page.prefixes.last() == Some(&cp) {
                    continue;
                }
                if page.len() == max {
                    page.truncated = true;
                    break;
                }
                page.last = Some(cp.clone());
                page.prefixes.push(cp);
                continue;
            }
            if item.dir {
                if k <= after && !after.starts_with(k) {
                    continue; // everything under it sorts before the marker
                }
                let path = names::object_path(bucket, k).map_err(|_| s3_error!(InternalError, "bad path {k}"))?;
                stack.push(self.read_dir(&path, k).await?.into_iter());
                continue;
            }
            if k <= after {
                continue;
            }
            if page.len() == max {
                page.truncated = true;
                break;
            }
            page.last = Some(item.key.clone());
            page.objects.push(item);
        }
        Ok(page)
    }

    /// The regular files and directories of one directory, as keys under `key_prefix`, in key
    /// order. A directory that went away meanwhile lists as empty.
    async fn read_dir(&self, path: &str, key_prefix: &str) -> S3Result<Vec<Item>> {
        let entries = match self.client.list_with(path, true).await {
            Ok((attr, entries)) if names::is_dir(&attr) => entries,
            Ok(_) | Err(Error::NotFound(_) | Error::NotADirectory(_)) => return Ok(vec![]),
            Err(e) => return Err(internal(e)),
        };
        let mut items: Vec<Item> = entries
            .into_iter()
            .filter_map(|e| {
                let attr = e.attr?;
                let dir = match attr.kind() {
                    InodeKind::Directory => true,
                    InodeKind::File => false,
                    _ => return None, // symlinks, devices: not objects
                };
                let key = if dir { format!("{key_prefix}{}/", e.name) } else { format!("{key_prefix}{}", e.name) };
                let etag = if dir { String::new() } else { names::etag_of(&attr, &e.xattrs) };
                Some(Item { key, dir, attr, etag })
            })
            .collect();
        items.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(items)
    }

    pub(crate) async fn list_v2(&self, i: ListObjectsV2Input) -> S3Result<ListObjectsV2Output> {
        let prefix = i.prefix.clone().unwrap_or_default();
        let after = match &i.continuation_token {
            Some(t) => base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(t)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| s3_error!(InvalidArgument, "the continuation token is not one this gateway gave out"))?,
            None => i.start_after.clone().unwrap_or_default(),
        };
        let max = max_keys(i.max_keys)?;
        let page = self.walk(&i.bucket, &prefix, i.delimiter.as_deref(), &after, max).await?;
        let url = i.encoding_type.as_ref().is_some_and(|e| e.as_str() == EncodingType::URL);
        let next = page
            .last
            .as_ref()
            .filter(|_| page.truncated)
            .map(|l| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(l.as_bytes()));
        Ok(ListObjectsV2Output {
            name: Some(i.bucket),
            key_count: Some(page.len() as i32),
            max_keys: Some(max as i32),
            is_truncated: Some(page.truncated),
            next_continuation_token: next,
            continuation_token: i.continuation_token,
            start_after: i.start_after.map(|s| encode_key(&s, url)),
            prefix: Some(encode_key(&prefix, url)),
            delimiter: i.delimiter.map(|d| encode_key(&d, url)),
            encoding_type: i.encoding_type,
            common_prefixes: Some(prefixes(&page, url)),
            contents: Some(objects(page, url)),
            ..Default::default()
        })
    }

    pub(crate) async fn list_v1(&self, i: ListObjectsInput) -> S3Result<ListObjectsOutput> {
        let prefix = i.prefix.clone().unwrap_or_default();
        let after = i.marker.clone().unwrap_or_default();
        let max = max_keys(i.max_keys)?;
        let page = self.walk(&i.bucket, &prefix, i.delimiter.as_deref(), &after, max).await?;
        let url = i.encoding_type.as_ref().is_some_and(|e| e.as_str() == EncodingType::URL);
        let next = page.last.as_ref().filter(|_| page.truncated).map(|l| encode_key(l, url));
        Ok(ListObjectsOutput {
            name: Some(i.bucket),
            max_keys: Some(max as i32),
            is_truncated: Some(page.truncated),
            next_marker: next,
            marker: i.marker.map(|m| encode_key(&m, url)),
            prefix: Some(encode_key(&prefix, url)),
            delimiter: i.delimiter.map(|d| encode_key(&d, url)),
            encoding_type: i.encoding_type,
            common_prefixes: Some(prefixes(&page, url)),
            contents: Some(objects(page, url)),
            ..Default::default()
        })
    }
}

fn max_keys(m: Option<i32>) -> S3Result<usize> {
    match m {
        None => Ok(MAX_KEYS),
        Some(n) if n < 0 => Err(s3_error!(InvalidArgument, "max-keys must not be negative")),
        Some(n) => Ok((n as usize).min(MAX_KEYS)),
    }
}

fn prefixes(page: &Page, url: bool) -> Vec<CommonPrefix> {
    page.prefixes.iter().map(|p| CommonPrefix { prefix: Some(encode_key(p, url)) }).collect()
}

fn objects(page: Page, url: bool) -> Vec<Object> {
    page.objects
        .into_iter()
        .map(|o| Object {
            key: Some(encode_key(&o.key, url)),
            e_tag: Some(ETag::Strong(o.etag)),
            last_modified: Some(names::last_modified(&o.attr)),
            size: Some(o.attr.size as i64),
            storage_class: Some(ObjectStorageClass::from_static(ObjectStorageClass::STANDARD)),
            owner: None,
            ..Default::default()
        })
        .collect()
}
