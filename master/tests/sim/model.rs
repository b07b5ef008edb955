//! What clients ask and what they must be answered: each client owns a subtree and runs one
//! operation at a time, so a model of that subtree predicts every answer exactly.

use std::collections::BTreeMap;

use cairn_master::error::MetaError;
use cairn_master::state::State;
use cairn_proto::v1::{Extent, InodeKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    NotFound,
    AlreadyExists,
    NotADirectory,
    IsADirectory,
    NotEmpty,
    InvalidArgument,
}

/// The answer to an operation, as far as the model can predict it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Dir,
    File { size: u64, version: u64 },
    Done,
    Err(Code),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File { size: u64, version: u64 },
}

pub type Tree = BTreeMap<Vec<String>, Kind>;

#[derive(Clone, Debug)]
pub enum OpKind {
    /// The client's own directory, /c<k>: its first operation.
    MkBase,
    /// Under the client's directory (names relative to it), or under /s, shared by all.
    Mkdir {
        names: Vec<String>,
        parents: bool,
        shared: bool,
    },
    Commit {
        names: Vec<String>,
        extents: Vec<Extent>,
        replication: u32,
    },
    Rename {
        src: Vec<String>,
        dst: Vec<String>,
    },
    Remove {
        names: Vec<String>,
        recursive: bool,
    },
    /// A ReadIndex barrier; the state it allows to read is checked where it is answered.
    Read,
}

/// One client's subtree as the sequence of its acknowledged operations leaves it. The client is
/// the only writer there and runs one operation at a time, so every answer is predictable; the
/// rules (and the order in which errors are detected) mirror `state.rs`.
#[derive(Default)]
pub struct Model {
    /// The client's directory exists.
    pub base: bool,
    pub tree: Tree,
}

impl Model {
    fn get(&self, p: &[String]) -> Option<&Kind> {
        if p.is_empty() {
            Some(&Kind::Dir)
        } else {
            self.tree.get(p)
        }
    }

    fn resolve(&self, p: &[String]) -> Result<&Kind, Code> {
        for i in 0..p.len() {
            if self.get(&p[..i]) != Some(&Kind::Dir) {
                return Err(Code::NotADirectory);
            }
            if self.get(&p[..=i]).is_none() {
                return Err(Code::NotFound);
            }
        }
        Ok(self.get(p).expect("resolved"))
    }

    fn resolve_dir(&self, p: &[String]) -> Result<(), Code> {
        match self.resolve(p)? {
            Kind::Dir => Ok(()),
            _ => Err(Code::NotADirectory),
        }
    }

    fn has_children(&self, p: &[String]) -> bool {
        self.tree.range(p.to_vec()..).nth(1).is_some_and(|(k, _)| k.starts_with(p))
    }

    fn subtree(&self, p: &[String]) -> Vec<Vec<String>> {
        self.tree.range(p.to_vec()..).take_while(|(k, _)| k.starts_with(p)).map(|(k, _)| k.clone()).collect()
    }

    /// Applies a private operation and returns the answer it must get.
    pub fn apply(&mut self, op: &OpKind) -> Outcome {
        let res = match op {
            OpKind::MkBase => {
                self.base = true;
                Ok(Outcome::Dir)
            }
            OpKind::Mkdir { names, parents, .. } => self.mkdir(names, *parents),
            OpKind::Commit { names, extents, .. } => self.commit(names, extents.iter().map(|e| e.length).sum()),
            OpKind::Rename { src, dst } => self.rename(src, dst),
            OpKind::Remove { names, recursive } => self.remove(names, *recursive),
            OpKind::Read => Ok(Outcome::Done),
        };
        res.unwrap_or_else(Outcome::Err)
    }

    fn mkdir(&mut self, names: &[String], parents: bool) -> Result<Outcome, Code> {
        for i in 0..names.len() {
            let last = i + 1 == names.len();
            match self.get(&names[..=i]) {
                Some(k) if last => {
                    return if parents && *k == Kind::Dir { Ok(Outcome::Dir) } else { Err(Code::AlreadyExists) }
                }
                Some(Kind::Dir) => {}
                Some(_) => return Err(Code::NotADirectory),
                None if last || parents => {
                    for j in i..names.len() {
                        self.tree.insert(names[..=j].to_vec(), Kind::Dir);
                    }
                    return Ok(Outcome::Dir);
                }
                None => return Err(Code::NotFound),
            }
        }
        unreachable!("names are never empty")
    }

    fn commit(&mut self, names: &[String], size: u64) -> Result<Outcome, Code> {
        let (_, parent) = names.split_last().expect("names are never empty");
        self.resolve_dir(parent)?;
        let version = match self.get(names) {
            Some(Kind::File { version, .. }) => version + 1,
            Some(Kind::Dir) => return Err(Code::IsADirectory),
            None => 1,
        };
        self.tree.insert(names.to_vec(), Kind::File { size, version });
        Ok(Outcome::File { size, version })
    }

    fn rename(&mut self, src: &[String], dst: &[String]) -> Result<Outcome, Code> {
        let (_, sparent) = src.split_last().expect("names are never empty");
        let (_, dparent) = dst.split_last().expect("names are never empty");
        self.resolve_dir(sparent)?;
        let skind = self.get(src).cloned().ok_or(Code::NotFound)?;
        if src == dst {
            return Ok(Outcome::Done);
        }
        if skind == Kind::Dir && dst.len() > src.len() && dst.starts_with(src) {
            return Err(Code::InvalidArgument);
        }
        self.resolve_dir(dparent)?;
        if let Some(dkind) = self.get(dst) {
            match (&skind, dkind) {
                (Kind::Dir, Kind::File { .. }) => return Err(Code::NotADirectory),
                (Kind::File { .. }, Kind::Dir) => return Err(Code::IsADirectory),
                (Kind::Dir, Kind::Dir) if self.has_children(dst) => return Err(Code::NotEmpty),
                _ => {}
            }
            self.tree.remove(dst);
        }
        for old in self.subtree(src) {
            let kind = self.tree.remove(&old).expect("listed");
            let mut new = dst.to_vec();
            new.extend_from_slice(&old[src.len()..]);
            self.tree.insert(new, kind);
        }
        Ok(Outcome::Done)
    }

    fn remove(&mut self, names: &[String], recursive: bool) -> Result<Outcome, Code> {
        let (_, parent) = names.split_last().expect("names are never empty");
        self.resolve_dir(parent)?;
        let kind = self.get(names).cloned().ok_or(Code::NotFound)?;
        if kind == Kind::Dir && !recursive && self.has_children(names) {
            return Err(Code::NotEmpty);
        }
        for p in self.subtree(names) {
            self.tree.remove(&p);
        }
        Ok(Outcome::Done)
    }
}

/// The subtree at `base` on one node (None: `base` does not exist).
pub fn walk(state: &State, base: &str) -> Result<Option<Tree>, String> {
    let reader = state.reader().map_err(|e| format!("open a reader: {e}"))?;
    let mut out = Tree::new();
    let mut stack = vec![(Vec::<String>::new(), base.to_string())];
    while let Some((names, path)) = stack.pop() {
        let entries = match reader.list(&path, "", 100_000, false) {
            Ok((_, entries, _)) => entries,
            Err(MetaError::NotFound(_)) if names.is_empty() => return Ok(None),
            Err(e) => return Err(format!("list {path}: {e}")),
        };
        for e in entries {
            let attr = e.attr.unwrap_or_default();
            let mut child = names.clone();
            child.push(e.name.clone());
            let kind = match attr.kind() {
                InodeKind::Directory => {
                    stack.push((child.clone(), format!("{path}/{}", e.name)));
                    Kind::Dir
                }
                InodeKind::File => Kind::File { size: attr.size, version: attr.version },
                k => return Err(format!("{path}/{}: unexpected kind {k:?}", e.name)),
            };
            out.insert(child, kind);
        }
    }
    Ok(Some(out))
}

impl OpKind {
    /// One line, without extent hashes.
    pub fn describe(&self, base: &str) -> String {
        let p = |names: &[String]| format!("{base}/{}", names.join("/"));
        match self {
            OpKind::MkBase => format!("mkdir {base}"),
            OpKind::Mkdir { names, parents, shared: true } => {
                format!("mkdir{} /{}", if *parents { " -p" } else { "" }, names.join("/"))
            }
            OpKind::Mkdir { names, parents, .. } => format!("mkdir{} {}", if *parents { " -p" } else { "" }, p(names)),
            OpKind::Commit { names, extents, .. } => {
                format!("commit {} ({} bytes)", p(names), extents.iter().map(|e| e.length).sum::<u64>())
            }
            OpKind::Rename { src, dst } => format!("rename {} {}", p(src), p(dst)),
            OpKind::Remove { names, recursive } => format!("rm{} {}", if *recursive { " -r" } else { "" }, p(names)),
            OpKind::Read => "read barrier".into(),
        }
    }
}
