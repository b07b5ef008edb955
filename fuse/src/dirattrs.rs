//! Directory attributes as this mount's own changes left them.
//!
//! After an unlink, create, mkdir or rename the kernel forgets the directory's attributes, and
//! with `default_permissions` it asks for them again (GETATTR) before the next change in that
//! directory: a second round trip to the masters for every file created or deleted. The masters
//! answer every change with the directories it touched, as they are right after it; the mount
//! keeps those for the attribute TTL and answers the kernel's GETATTR from them. That is the
//! staleness the kernel's own attribute cache already allows (another mount's change shows
//! within the TTL).
//!
//! An answer is kept only when no other change ran beside the one that brought it (a change
//! that overlapped could have been applied after it, so the answer might already be old), and
//! every change drops, before it is sent, the directories it may touch (all of them when it
//! cannot say).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cairn_proto::v1::Attr;

/// Directories kept at once, at most.
const MAX_DIRS: usize = 1024;

#[derive(Default)]
pub struct DirAttrs {
    dirs: HashMap<u64, (Attr, Instant)>,
    /// Changes begun so far, and those not finished yet.
    begun: u64,
    running: u32,
}

/// A change under way: hand it back to [`DirAttrs::finish`].
#[must_use]
pub struct Begun {
    at: u64,
    /// Whether another change was running when this one began.
    overlapped: bool,
    /// The directories dropped when it began (`None`: all).
    dirs: Option<Vec<u64>>,
}

impl DirAttrs {
    /// The attributes of directory `ino` and how much longer they may be trusted, if kept.
    pub fn get(&mut self, ino: u64) -> Option<(Attr, Duration)> {
        let (attr, until) = self.dirs.get(&ino)?;
        match until.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Some((attr.clone(), left)),
            _ => {
                self.dirs.remove(&ino);
                None
            }
        }
    }

    /// Called before a change is sent: drops the directories `dirs` it may touch (`None`: it
    /// cannot say, so all of them).
    pub fn begin(&mut self, dirs: Option<Vec<u64>>) -> Begun {
        match &dirs {
            Some(d) => d.iter().for_each(|i| {
                self.dirs.remove(i);
            }),
            None => self.dirs.clear(),
        }
        let overlapped = self.running > 0;
        self.begun += 1;
        self.running += 1;
        Begun { at: self.begun, overlapped, dirs }
    }

    /// Called when the change is done (or failed: `parents` empty): keeps the directories as
    /// the masters answered them for `ttl`, unless another change overlapped this one.
    pub fn finish(&mut self, b: Begun, parents: Vec<Attr>, ttl: Duration) {
        self.running = self.running.saturating_sub(1);
        // Nothing ran beside it: nothing was running when it began, nothing began since.
        let alone = !b.overlapped && self.begun == b.at;
        if !alone {
            match b.dirs {
                Some(d) => d.iter().chain(parents.iter().map(|a| &a.inode)).for_each(|i| {
                    self.dirs.remove(i);
                }),
                None => self.dirs.clear(),
            }
            return;
        }
        if ttl.is_zero() {
            return;
        }
        if self.dirs.len() + parents.len() > MAX_DIRS {
            self.dirs.clear();
        }
        let until = Instant::now() + ttl;
        for a in parents {
            self.dirs.insert(a.inode, (a, until));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(ino: u64, nlink: u32) -> Attr {
        Attr { inode: ino, nlink, ..Default::default() }
    }

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn a_change_alone_keeps_its_directories() {
        let mut d = DirAttrs::default();
        let b = d.begin(Some(vec![7]));
        d.finish(b, vec![dir(7, 3)], TTL);
        assert_eq!(d.get(7).map(|(a, _)| a.nlink), Some(3));
        let b = d.begin(Some(vec![7]));
        assert!(d.get(7).is_none(), "dropped while a change runs in it");
        d.finish(b, vec![dir(7, 4)], TTL);
        assert_eq!(d.get(7).map(|(a, _)| a.nlink), Some(4));
        let b = d.begin(None);
        assert!(d.get(7).is_none(), "a change that cannot say drops everything");
        d.finish(b, vec![], TTL);
        assert!(d.get(7).is_none());
    }

    #[test]
    fn overlapping_changes_keep_nothing() {
        let mut d = DirAttrs::default();
        let first = d.begin(Some(vec![7]));
        let second = d.begin(Some(vec![7]));
        // The second is answered first; the first may have been applied after it.
        d.finish(second, vec![dir(7, 5)], TTL);
        assert!(d.get(7).is_none());
        d.finish(first, vec![dir(7, 4)], TTL);
        assert!(d.get(7).is_none());
        // An earlier answer kept for another directory is dropped when an overlapping change
        // names it.
        let b = d.begin(Some(vec![8]));
        d.finish(b, vec![dir(8, 2)], TTL);
        let a = d.begin(Some(vec![9]));
        let c = d.begin(Some(vec![9]));
        d.finish(a, vec![dir(9, 2), dir(8, 3)], TTL);
        assert!(d.get(8).is_none(), "the overlapping change touched 8 too");
        d.finish(c, vec![dir(9, 3)], TTL);
        assert!(d.get(9).is_none());
    }

    #[test]
    fn answers_expire_and_a_zero_ttl_keeps_none() {
        let mut d = DirAttrs::default();
        let b = d.begin(Some(vec![7]));
        d.finish(b, vec![dir(7, 3)], Duration::ZERO);
        assert!(d.get(7).is_none());
        let b = d.begin(Some(vec![7]));
        d.finish(b, vec![dir(7, 3)], Duration::from_millis(20));
        assert!(d.get(7).unwrap().1 <= Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(30));
        assert!(d.get(7).is_none());
    }
}
