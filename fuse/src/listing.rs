//! Directory listings that answer a run of lookups in one directory.
//!
//! A program that walks a directory whose entries the kernel forgot (`ls -l` after the caches
//! were dropped, `find`, `stat` on every file, a backup tool) sends one LOOKUP per name, each a
//! round trip to the masters. After [`RUN`] lookups in a row in the same directory (none of them
//! of a name the masters did not find: see [`Listings::not_found`]), the mount
//! fetches the directory's listing (names with attributes, a few calls for thousands of entries)
//! and answers the following lookups from it, for at most the attribute TTL counted from before
//! the fetch: exactly the staleness the kernel's own entry cache already allows, so no answer is
//! older than one the kernel could have kept. A name missing from a listing is asked of the
//! masters (a negative answer is never served from here).
//!
//! This mount's own changes never meet a stale listing: every change bumps a generation (a
//! listing fetched across it is not kept) and, before it runs and again before it is answered,
//! drops what it makes stale: the names it touches, every entry of the files they named (other
//! hard links) and of their directories, or everything when it cannot say which files it
//! changes (writes, attributes, a name not listed).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cairn_proto::v1::Attr;

/// Lookups in a row in one directory that make the mount fetch its listing.
pub const RUN: u32 = 16;
/// Directories larger than this are not listed for lookups (memory; the fetch would be long).
pub const MAX_ENTRIES: usize = 100_000;
/// Listings kept at once.
const MAX_DIRS: usize = 16;
/// How long a directory found larger than [`MAX_ENTRIES`] is not fetched again for lookups.
const TOO_LARGE_FOR: Duration = Duration::from_secs(60);

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
    /// Directories found too large to list, and when.
    too_large: HashMap<u64, Instant>,
}

/// What a change made through the mount may have made stale.
#[derive(Clone, Debug)]
pub enum Change {
    /// These names, in these directories (and the directories' own attributes).
    Names(Vec<(u64, String)>),
    /// Anything.
    All,
}

/// What to drop once a change is done: see [`Listings::before`].
#[derive(Clone, Debug)]
pub struct After {
    names: Vec<(u64, String)>,
    /// Files and directories whose entries are dropped wherever they are listed.
    inodes: Vec<u64>,
    all: bool,
}

impl Listings {
    /// The attributes of `name` in `dir` and until when they may be trusted, if a listing
    /// fresher than `ttl` has it.
    pub fn get(&mut self, dir: u64, name: &str, ttl: Duration) -> Option<(Attr, Instant)> {
        let l = self.dirs.get(&dir)?;
        let until = l.at + ttl;
        if Instant::now() >= until {
            self.dirs.remove(&dir);
            return None;
        }
        Some((l.entries.get(name)?.clone(), until))
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
        if let Some(t) = self.too_large.get(&dir) {
            if t.elapsed() < TOO_LARGE_FOR {
                return None;
            }
            self.too_large.remove(&dir);
        }
        self.run.1 = 0;
        Some(self.gen)
    }

    /// Notes that the masters found no such name in `dir`: the run of lookups there starts over.
    /// A listing never answers that a name is missing (those go to the masters anyway), so a
    /// program probing for names that do not exist (a search path, a build tool) would have the
    /// directory fetched for nothing. (A create, the other source of such lookups, resets the
    /// run already: see [`Listings::before`].)
    pub fn not_found(&mut self, dir: u64) {
        if self.run.0 == dir {
            self.run.1 = 0;
        }
    }

    /// Notes that `dir` has more than [`MAX_ENTRIES`] entries: its lookups go to the masters
    /// for a while without fetching it again.
    pub fn too_large(&mut self, dir: u64) {
        if self.too_large.len() >= MAX_DIRS {
            self.too_large.retain(|_, t| t.elapsed() < TOO_LARGE_FOR);
        }
        self.too_large.insert(dir, Instant::now());
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

    /// Drops what `change` may make stale, before it runs; returns what [`Listings::after`]
    /// drops once it is done (a listing fetched meanwhile may show the old state).
    pub fn before(&mut self, change: Change) -> After {
        self.gen += 1;
        let Change::Names(names) = change else {
            // Writes and creates: a listing would be dropped by the next one (a run of unlinks
            // or renames keeps its listing, which loses only the names they take).
            self.run = (0, 0);
            self.dirs.clear();
            return After { names: Vec::new(), inodes: Vec::new(), all: true };
        };
        let mut inodes = Vec::with_capacity(2 * names.len());
        for (dir, name) in &names {
            match self.dirs.get_mut(dir).and_then(|l| l.entries.remove(name)) {
                Some(a) => inodes.extend([*dir, a.inode]),
                None => {
                    // The file the name held is unknown: it may be listed elsewhere.
                    self.dirs.clear();
                    return After { names: Vec::new(), inodes: Vec::new(), all: true };
                }
            }
        }
        let after = After { names, inodes, all: false };
        self.drop_named(&after);
        after
    }

    /// Drops what a change made stale, once it is done and before it is answered.
    pub fn after(&mut self, after: &After) {
        self.gen += 1;
        if after.all {
            self.dirs.clear();
        } else {
            self.drop_named(after);
        }
    }

    fn drop_named(&mut self, after: &After) {
        for (dir, name) in &after.names {
            if let Some(l) = self.dirs.get_mut(dir) {
                l.entries.remove(name);
            }
        }
        for l in self.dirs.values_mut() {
            l.entries.retain(|_, a| !after.inodes.contains(&a.inode));
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
    fn names_not_found_never_add_up_to_a_listing() {
        // A program probing for names that do not exist.
        let mut l = Listings::default();
        for _ in 0..RUN * 4 {
            assert_eq!(l.miss(7), None, "a directory being filled is not listed");
            l.not_found(7);
        }
        // Another directory's miss is not reset by it.
        for _ in 1..RUN {
            assert_eq!(l.miss(8), None);
        }
        l.not_found(7);
        assert!(l.miss(8).is_some());
    }

    #[test]
    fn a_run_of_unlinks_gets_a_listing_and_keeps_it() {
        let mut l = Listings::default();
        // `rm` of every file: each lookup the masters answer is followed by an unlink.
        let mut fetch = None;
        for i in 0..RUN {
            fetch = l.miss(7);
            if fetch.is_none() {
                let after = l.before(Change::Names(vec![(7, format!("f{i}"))]));
                l.after(&after);
            }
        }
        let gen = fetch.expect("unlinks do not break the run");
        let names: Vec<(String, Attr)> = (RUN..RUN + 3).map(|i| (format!("f{i}"), attr(100 + i as u64, 1))).collect();
        l.put(7, gen, Instant::now(), names.into_iter().collect());
        let after = l.before(Change::Names(vec![(7, format!("f{RUN}"))]));
        l.after(&after);
        assert!(l.get(7, &format!("f{RUN}"), TTL).is_none());
        assert!(l.get(7, &format!("f{}", RUN + 1), TTL).is_some(), "the listing outlives an unlink of a listed name");
        // A create (or a write) drops it and starts the run again.
        let after = l.before(Change::All);
        l.after(&after);
        assert!(l.get(7, &format!("f{}", RUN + 1), TTL).is_none());
        assert_eq!(l.miss(7), None);
    }

    #[test]
    fn a_directory_too_large_to_list_is_not_fetched_again_soon() {
        let mut l = Listings::default();
        for _ in 1..RUN {
            l.miss(7);
        }
        assert!(l.miss(7).is_some());
        l.too_large(7);
        for _ in 0..3 * RUN {
            assert_eq!(l.miss(7), None, "no second fetch of a directory too large to list");
        }
        l.too_large.insert(7, Instant::now() - TOO_LARGE_FOR);
        assert!((0..RUN).any(|_| l.miss(7).is_some()), "asked again once the pause is over");
    }

    #[test]
    fn listings_expire_with_the_ttl_counted_from_the_fetch() {
        let mut l = Listings::default();
        let old = Instant::now() - Duration::from_secs(2);
        l.put(7, 0, old, listing(&[("a", attr(10, 1))]));
        assert!(l.get(7, "a", Duration::from_secs(1)).is_none());
        l.put(7, 0, Instant::now(), listing(&[("a", attr(10, 1))]));
        let (_, until) = l.get(7, "a", Duration::from_secs(1)).unwrap();
        assert!(until <= Instant::now() + Duration::from_secs(1));
    }

    #[test]
    fn a_listing_fetched_across_a_change_is_not_kept() {
        let mut l = Listings::default();
        let after = l.before(Change::All);
        l.put(7, 0, Instant::now(), listing(&[("a", attr(10, 1))]));
        assert!(l.get(7, "a", TTL).is_none());
        // Fetched while the change ran, with the generation it started with: kept, then dropped
        // by the second pass.
        let after2 = l.before(Change::Names(vec![(1, "x".into())]));
        let gen = l.gen;
        l.put(7, gen, Instant::now(), listing(&[("a", attr(10, 1))]));
        assert!(l.get(7, "a", TTL).is_some());
        l.after(&after2);
        l.after(&after);
        assert!(l.get(7, "a", TTL).is_none());
    }

    #[test]
    fn changes_drop_their_names_their_files_and_their_directories() {
        let mut l = Listings::default();
        // Directory 7 ("d" in directory 1) holds a, b and c; "e" in directory 1 is c's other link.
        l.put(1, 0, Instant::now(), listing(&[("d", attr(7, 2)), ("e", attr(12, 2)), ("f", attr(13, 1))]));
        l.put(7, 0, Instant::now(), listing(&[("a", attr(10, 1)), ("b", attr(11, 1)), ("c", attr(12, 2))]));
        let after = l.before(Change::Names(vec![(7, "a".into())]));
        assert!(l.get(7, "a", TTL).is_none());
        assert!(l.get(7, "b", TTL).is_some(), "other names stay");
        assert!(l.get(1, "d", TTL).is_none(), "the changed directory's own attributes are dropped");
        // A listing fetched while the unlink ran may still show the name: dropped after it.
        let gen = l.gen;
        l.put(7, gen, Instant::now(), listing(&[("a", attr(10, 1)), ("b", attr(11, 1)), ("c", attr(12, 2))]));
        l.after(&after);
        assert!(l.get(7, "a", TTL).is_none() && l.get(7, "b", TTL).is_some() && l.get(1, "f", TTL).is_some());
        // Every listed link of a changed file goes: its link count changed.
        let after = l.before(Change::Names(vec![(7, "c".into())]));
        assert!(l.get(1, "e", TTL).is_none() && l.get(1, "f", TTL).is_some());
        l.after(&after);
        // A name not listed may have been a link of anything listed.
        l.before(Change::Names(vec![(9, "x".into())]));
        assert!(l.get(7, "b", TTL).is_none() && l.get(1, "f", TTL).is_none());
        l.put(7, l.gen, Instant::now(), listing(&[("b", attr(11, 1))]));
        let after = l.before(Change::All);
        assert!(l.get(7, "b", TTL).is_none());
        l.put(7, l.gen, Instant::now(), listing(&[("b", attr(11, 1))]));
        l.after(&after);
        assert!(l.get(7, "b", TTL).is_none());
    }
}
