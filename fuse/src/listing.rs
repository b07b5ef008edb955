//! Directory listings that answer a run of lookups in one directory.
//!
//! A program that walks a directory whose entries the kernel forgot (`ls -l` after the caches
//! were dropped, `find`, `stat` on every file, a backup tool) sends one LOOKUP per name, each a
//! round trip to the masters. After [`RUN`] lookups in a row in the same directory, the mount
//! fetches the directory's listing (names with attributes, a few calls for thousands of entries)
//! and answers the following lookups from it, for at most the attribute TTL counted from before
//! the fetch: exactly the staleness the kernel's own entry cache already allows, so no answer is
//! older than one the kernel could have kept. A name missing from a listing is asked of the
//! masters (a negative answer is never served from here).
//!
//! This mount's own changes never meet a stale listing: every change bumps a generation (a
//! listing fetched across it is not kept) and, before and after it runs, drops what it makes
//! stale: the names it touches and the attributes of their directories, or everything when it
//! may change attributes of entries it cannot name (hard links, writes, attributes).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cairn_proto::v1::Attr;

/// Lookups in a row in one directory that make the mount fetch its listing.
pub const RUN: u32 = 16;
/// Directories larger than this are not listed for lookups (memory; the fetch would be long).
pub const MAX_ENTRIES: usize = 100_000;
/// Listings kept at once.
const MAX_DIRS: usize = 16;

struct Listing {
    /// When the fetch started: the TTL counts from here.
    at: Instant,
    entries: HashMap<String, Attr>,
}

#[derive(Default)]
pub struct Listings {
    gen: u64,
    dirs: HashMap<u64, Listing>,
    /// The directory of the latest lookups the masters answered, and how many in a row.
    run: (u64, u32),
}

/// What a change made through the mount may have made stale.
#[derive(Clone, Debug)]
pub enum Change {
    /// These names, in these directories (and the directories' own attributes).
    Names(Vec<(u64, String)>),
    /// Anything.
    All,
}

impl Listings {
    /// The attributes of `name` in `dir` and how much of `ttl` is left, if a listing fresher
    /// than `ttl` has it.
    pub fn get(&mut self, dir: u64, name: &str, ttl: Duration) -> Option<(Attr, Duration)> {
        let l = self.dirs.get(&dir)?;
        let age = l.at.elapsed();
        if age >= ttl {
            self.dirs.remove(&dir);
            return None;
        }
        Some((l.entries.get(name)?.clone(), ttl - age))
    }

    /// Counts a lookup in `dir` the masters must answer. Returns the generation to fetch the
    /// listing with when the run is long enough and no listing is held.
    pub fn miss(&mut self, dir: u64) -> Option<u64> {
        if self.run.0 == dir {
            self.run.1 += 1;
        } else {
            self.run = (dir, 1);
        }
        if self.run.1 < RUN || self.dirs.contains_key(&dir) {
            return None;
        }
        self.run.1 = 0;
        Some(self.gen)
    }

    /// Keeps a listing fetched from `at` on, unless the mount changed something since `gen`.
    pub fn put(&mut self, dir: u64, gen: u64, at: Instant, entries: HashMap<String, Attr>) {
        if gen != self.gen {
            return;
        }
        if self.dirs.len() >= MAX_DIRS {
            self.dirs.clear();
        }
        self.dirs.insert(dir, Listing { at, entries });
    }

    /// Drops what `change` may have made stale; called before and after the change runs.
    pub fn change(&mut self, change: &Change) {
        self.gen += 1;
        self.run = (0, 0);
        let Change::Names(names) = change else {
            self.dirs.clear();
            return;
        };
        for (dir, name) in names {
            let dropped = self.dirs.get_mut(dir).and_then(|l| l.entries.remove(name));
            // Another name of the same file (a hard link), listed elsewhere, would keep a stale
            // link count; so would one of a file this mount did not see listed.
            if dropped.is_none_or(|a| a.nlink > 1) {
                self.dirs.clear();
                return;
            }
            for l in self.dirs.values_mut() {
                l.entries.retain(|_, a| a.inode != *dir);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(inode: u64, nlink: u32) -> Attr {
        Attr { inode, nlink, ..Default::default() }
    }

    fn listing(entries: &[(&str, Attr)]) -> HashMap<String, Attr> {
        entries.iter().map(|(n, a)| (n.to_string(), a.clone())).collect()
    }

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn a_run_of_lookups_asks_for_one_listing() {
        let mut l = Listings::default();
        for _ in 1..RUN {
            assert_eq!(l.miss(7), None);
        }
        let gen = l.miss(7).expect("the run asks for a listing");
        l.put(7, gen, Instant::now(), listing(&[("a", attr(10, 1))]));
        assert_eq!(l.get(7, "a", TTL).map(|(a, _)| a.inode), Some(10));
        assert!(l.get(7, "b", TTL).is_none(), "a name not listed is asked of the masters");
        assert!(l.get(8, "a", TTL).is_none());
        // Another directory breaks the run.
        for _ in 1..RUN {
            assert_eq!(l.miss(8), None);
        }
        assert_eq!(l.miss(9), None);
    }

    #[test]
    fn listings_expire_with_the_ttl_counted_from_the_fetch() {
        let mut l = Listings::default();
        let old = Instant::now() - Duration::from_secs(2);
        l.put(7, 0, old, listing(&[("a", attr(10, 1))]));
        assert!(l.get(7, "a", Duration::from_secs(1)).is_none());
        l.put(7, 0, Instant::now(), listing(&[("a", attr(10, 1))]));
        let (_, left) = l.get(7, "a", Duration::from_secs(1)).unwrap();
        assert!(left <= Duration::from_secs(1));
    }

    #[test]
    fn a_listing_fetched_across_a_change_is_not_kept() {
        let mut l = Listings::default();
        l.change(&Change::All);
        l.put(7, 0, Instant::now(), listing(&[("a", attr(10, 1))]));
        assert!(l.get(7, "a", TTL).is_none());
    }

    #[test]
    fn changes_drop_their_names_and_their_directories() {
        let mut l = Listings::default();
        // Directory 7 ("d" in directory 1) holds a, b, and c (two links).
        l.put(1, 0, Instant::now(), listing(&[("d", attr(7, 2)), ("e", attr(8, 2))]));
        l.put(7, 0, Instant::now(), listing(&[("a", attr(10, 1)), ("b", attr(11, 1)), ("c", attr(12, 2))]));
        l.change(&Change::Names(vec![(7, "a".into())]));
        assert!(l.get(7, "a", TTL).is_none());
        assert!(l.get(7, "b", TTL).is_some(), "other names stay");
        assert!(l.get(1, "d", TTL).is_none(), "the changed directory's own attributes are dropped");
        assert!(l.get(1, "e", TTL).is_some());
        // A name with other links, or one not listed, may leave stale link counts anywhere.
        l.change(&Change::Names(vec![(7, "c".into())]));
        assert!(l.get(7, "b", TTL).is_none() && l.get(1, "e", TTL).is_none());
        l.put(7, l.gen, Instant::now(), listing(&[("b", attr(11, 1))]));
        l.change(&Change::Names(vec![(7, "new".into())]));
        assert!(l.get(7, "b", TTL).is_none());
        l.put(7, l.gen, Instant::now(), listing(&[("b", attr(11, 1))]));
        l.change(&Change::Names(vec![(9, "x".into())]));
        assert!(l.get(7, "b", TTL).is_none(), "x may have been a link of b");
        l.put(7, l.gen, Instant::now(), listing(&[("b", attr(11, 1))]));
        l.change(&Change::All);
        assert!(l.get(7, "b", TTL).is_none());
    }
}
