use super::*;
use cairn_proto::v1::command::Op;

fn open() -> (tempfile::TempDir, State) {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Database::create(dir.path().join("m.redb")).unwrap());
    (dir, State::open(db).unwrap())
}

fn run(s: &State, index: u64, op: Op) -> Result<command_result::Result, ErrorCode> {
    let cmd = Command { request_id: index, time_ns: index as i64, op: Some(op) };
    let mut r = s.apply_batch(&[(index, Some(cmd))], index).unwrap();
    match r.pop().unwrap().result.unwrap() {
        command_result::Result::Error(e) => Err(e.code()),
        ok => Ok(ok),
    }
}

fn mkdir(path: &str, parents: bool) -> Op {
    Op::Mkdir(MkdirRequest { path: path.into(), parents, mode: 0o755, ..Default::default() })
}

fn file(path: &str, chunks: &[u8]) -> Op {
    Op::CommitFile(CommitFileRequest {
        path: path.into(),
        extents: chunks.iter().map(|c| Extent { hash: vec![*c; 32], length: 10 }).collect(),
        replication: 3,
        mode: 0o644,
        ..Default::default()
    })
}

use cairn_proto::v1::ErrorCode;

#[test]
fn namespace_operations_and_their_errors() {
    let (_d, s) = open();
    let mut i = 0;
    let mut go = |op| {
        i += 1;
        run(&s, i, op)
    };
    assert_eq!(go(mkdir("/a/b", false)), Err(ErrorCode::NotFound));
    go(mkdir("/a/b", true)).unwrap();
    assert_eq!(go(mkdir("/a", false)), Err(ErrorCode::AlreadyExists));
    go(mkdir("/a", true)).unwrap();
    go(file("/a/f", &[1, 2])).unwrap();
    assert_eq!(go(file("/a/f/g", &[1])), Err(ErrorCode::NotADirectory));
    assert_eq!(go(file("/nope/g", &[1])), Err(ErrorCode::NotFound));
    assert_eq!(go(file("/a/b", &[1])), Err(ErrorCode::IsADirectory));
    assert_eq!(
        go(Op::Remove(RemoveRequest { path: "/a".into(), recursive: false, id: None })),
        Err(ErrorCode::NotEmpty)
    );
    assert_eq!(
        go(Op::Rename(RenameRequest { src: "/a".into(), dst: "/a/b/c".into(), id: None })),
        Err(ErrorCode::InvalidArgument)
    );
    assert_eq!(
        go(Op::Rename(RenameRequest { src: "/x".into(), dst: "/y".into(), id: None })),
        Err(ErrorCode::NotFound)
    );
    go(Op::Rename(RenameRequest { src: "/a/f".into(), dst: "/a/b/f".into(), id: None })).unwrap();
    let r = s.reader().unwrap();
    assert_eq!(r.stat("/a/b/f").unwrap().size, 20);
    assert!(matches!(r.stat("/a/f"), Err(MetaError::NotFound(_))));
    assert_eq!(r.files().unwrap(), 1);
    assert_eq!(r.bytes().unwrap(), 20);
    let mut chunks = 0;
    r.for_each_chunk(|_, goal| {
        assert_eq!(goal, 3);
        chunks += 1
    })
    .unwrap();
    assert_eq!(chunks, 2);
    drop(r);
    // Replacing a file drops its old chunks' references; removing a tree drops the rest.
    go(file("/a/b/f", &[2, 3])).unwrap();
    go(file("/a/b/g", &[3])).unwrap();
    let r = s.reader().unwrap();
    let mut refs = vec![];
    r.for_each_chunk(|h, _| refs.push(h[0])).unwrap();
    assert_eq!(refs, vec![2, 3]);
    assert_eq!(r.stat("/a/b/f").unwrap().version, 2);
    drop(r);
    go(Op::Remove(RemoveRequest { path: "/a".into(), recursive: true, id: None })).unwrap();
    let r = s.reader().unwrap();
    let mut n = 0;
    r.for_each_chunk(|_, _| n += 1).unwrap();
    assert_eq!(n, 0);
    assert_eq!((r.files().unwrap(), r.bytes().unwrap()), (0, 0));
    assert_eq!(r.list("/", "", 10, false).unwrap().1.len(), 0);
    assert_eq!(s.applied_index().unwrap(), i);
}

#[test]
fn rename_replaces_and_lists_page_by_page() {
    let (_d, s) = open();
    for (i, n) in ["c", "a", "b", "d"].iter().enumerate() {
        run(&s, i as u64 + 1, file(&format!("/{n}"), &[i as u8])).unwrap();
    }
    run(&s, 10, Op::Rename(RenameRequest { src: "/a".into(), dst: "/b".into(), id: None })).unwrap();
    let r = s.reader().unwrap();
    let (_, page, more) = r.list("/", "", 2, false).unwrap();
    assert_eq!(page.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), vec!["b", "c"]);
    assert!(more);
    let (_, page, more) = r.list("/", "c", 2, false).unwrap();
    assert_eq!(page.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), vec!["d"]);
    assert!(!more);
    assert_eq!(r.files().unwrap(), 3);
}

#[test]
fn bad_names_are_refused() {
    for p in ["", "a", "/a//b", "/.", "/a/..", "/a\0b", &format!("/{}", "x".repeat(256))] {
        assert!(split_path(p).is_err(), "{p:?} accepted");
    }
    assert_eq!(split_path("/a/b/").unwrap(), vec!["a", "b"]);
    assert!(split_path("/").unwrap().is_empty());
    assert!(split_path(&format!("/{}", "x".repeat(255))).is_ok());
}

fn with_id(op: Op, client: u64, seq: u64) -> Op {
    with_request(op, cairn_proto::v1::ClientRequestId { client, seq, first_unanswered: 0 })
}

fn with_request(mut op: Op, id: cairn_proto::v1::ClientRequestId) -> Op {
    let id = Some(id);
    match &mut op {
        Op::Mkdir(r) => r.id = id,
        Op::CommitFile(r) => r.id = id,
        Op::Rename(r) => r.id = id,
        Op::Remove(r) => r.id = id,
        Op::SetRepairLimits(r) => r.id = id,
        Op::Drain(r) => r.request = id,
        Op::Node(r) => r.id = id,
        Op::AccessKey(r) => r.request = id,
        Op::RegisterChunkserver(_) | Op::SetMaster(_) => {}
    }
    op
}

fn run_at(s: &State, index: u64, time_ns: i64, op: Op) -> Result<command_result::Result, ErrorCode> {
    let cmd = Command { request_id: index, time_ns, op: Some(op) };
    let mut r = s.apply_batch(&[(index, Some(cmd))], index).unwrap();
    match r.pop().unwrap().result.unwrap() {
        command_result::Result::Error(e) => Err(e.code()),
        ok => Ok(ok),
    }
}

#[test]
fn a_retried_mutation_takes_effect_once() {
    let (_d, s) = open();
    let mk = with_id(mkdir("/a", false), 7, 1);
    let first = run_at(&s, 1, 10, mk.clone()).unwrap();
    // The retry (same client and seq) gets the first answer, not AlreadyExists.
    assert_eq!(run_at(&s, 2, 11, mk).unwrap(), first);
    run_at(&s, 3, 12, file("/a/f", &[1])).unwrap();
    let mv = with_id(Op::Rename(RenameRequest { src: "/a/f".into(), dst: "/a/g".into(), id: None }), 7, 2);
    run_at(&s, 4, 13, mv.clone()).unwrap();
    // Someone creates /a/f again; a late retry of the rename must not move it over /a/g.
    run_at(&s, 5, 14, file("/a/f", &[2])).unwrap();
    run_at(&s, 6, 15, mv).unwrap();
    let r = s.reader().unwrap();
    assert_eq!(r.stat("/a/f").unwrap().version, 1);
    assert!(r.stat("/a/g").is_ok());
    drop(r);
    // A failed mutation is remembered as failed too.
    let rm = with_id(Op::Remove(RemoveRequest { path: "/a".into(), recursive: false, id: None }), 7, 3);
    assert_eq!(run_at(&s, 7, 16, rm.clone()), Err(ErrorCode::NotEmpty));
    assert_eq!(run_at(&s, 8, 17, rm), Err(ErrorCode::NotEmpty));
    // Another client's seq 1 is its own request.
    assert_eq!(run_at(&s, 9, 18, with_id(mkdir("/a", false), 8, 1)), Err(ErrorCode::AlreadyExists));
    // Answers expire after the TTL: the same id is then a new request.
    let later = 18 + RESULT_TTL_NS + 1;
    run_at(&s, 10, later, mkdir("/b", false)).unwrap();
    assert_eq!(run_at(&s, 11, later + 1, with_id(mkdir("/a", false), 7, 1)), Err(ErrorCode::AlreadyExists));
}

#[test]
fn a_client_that_says_what_it_waits_for_is_answered_once_from_a_small_row() {
    let (_d, s) = open();
    let id = |seq, first_unanswered| cairn_proto::v1::ClientRequestId { client: 7, seq, first_unanswered };
    let mk = |path: &str, seq, first| with_request(mkdir(path, false), id(seq, first));
    // Two mutations in flight at once (both wait), then their retries: first answers back.
    let a = run_at(&s, 1, 10, mk("/a", 1, 1)).unwrap();
    let b = run_at(&s, 2, 11, mk("/b", 2, 1)).unwrap();
    assert_eq!(run_at(&s, 3, 12, mk("/a", 1, 1)).unwrap(), a);
    assert_eq!(run_at(&s, 4, 13, mk("/b", 2, 1)).unwrap(), b);
    // A failed mutation is remembered as failed too.
    assert_eq!(run_at(&s, 5, 14, mk("/a", 3, 2)), Err(ErrorCode::AlreadyExists));
    assert_eq!(run_at(&s, 6, 15, mk("/a", 3, 2)), Err(ErrorCode::AlreadyExists));
    // The client got the answers below 4: they are forgotten, and a stale copy of one of them
    // is refused instead of applied again (here: /c made twice would be AlreadyExists, not Ok).
    run_at(&s, 7, 16, mk("/c", 4, 4)).unwrap();
    let r = s.reader().unwrap();
    assert!(matches!(r.remembered(7, 1).unwrap(), Some(command_result::Result::Error(_))), "forgotten, not new");
    assert!(matches!(r.remembered(7, 4).unwrap(), Some(command_result::Result::Attr(_))));
    drop(r);
    assert_eq!(run_at(&s, 8, 17, mk("/d", 2, 1)), Err(ErrorCode::InvalidArgument));
    assert!(s.reader().unwrap().stat("/d").is_err(), "a stale copy took effect");
    // One row for the client, holding only what it may still retry; another client is apart.
    let row = |s: &State| {
        let r = s.reader().unwrap();
        let t = r.txn.open_table(CLIENTS).unwrap();
        let v = t.get(7).unwrap().map(|v| ClientAnswers::decode(v.value()).unwrap());
        v
    };
    assert_eq!(row(&s).unwrap().answers.iter().map(|a| a.seq).collect::<Vec<_>>(), vec![4]);
    assert_eq!(
        run_at(
            &s,
            9,
            18,
            with_request(
                mkdir("/c", false),
                cairn_proto::v1::ClientRequestId { client: 8, seq: 1, first_unanswered: 1 }
            )
        ),
        Err(ErrorCode::AlreadyExists)
    );
    // An answer a master of the version before kept on its own is found by a retry that now
    // carries the mark.
    let old = run_at(&s, 19, 19, with_id(mkdir("/o", false), 5, 1)).unwrap();
    let retry =
        with_request(mkdir("/o", false), cairn_proto::v1::ClientRequestId { client: 5, seq: 1, first_unanswered: 1 });
    assert_eq!(run_at(&s, 20, 20, retry).unwrap(), old);
    // The rows of clients idle for the TTL go at the next sweep; the client then starts anew.
    let later = 18 + RESULT_TTL_NS + CLIENTS_SWEEP_NS;
    run_at(&s, 21, later, mkdir("/e", false)).unwrap();
    assert!(row(&s).is_none(), "the idle client's row was kept");
    // Snapshots carry the rows.
    run_at(&s, 22, later + 1, mk("/f", 9, 9)).unwrap();
    let (_d2, s2) = open();
    let r = s.reader().unwrap();
    let mut records = Vec::new();
    dump(&r.txn, |t, k, v| {
        records.push(Ok((t, k, v)));
        Ok(())
    })
    .unwrap();
    let txn = s2.db.begin_write().unwrap();
    load(&txn, records.into_iter(), 22).unwrap();
    txn.commit().unwrap();
    assert_eq!(run_at(&s2, 23, later + 2, mk("/f", 9, 9)).unwrap(), run_at(&s, 23, later + 2, mk("/f", 9, 9)).unwrap());
}

#[test]
fn membership_changes_are_remembered_for_retries() {
    let (_d, s) = open();
    let id = Some(cairn_proto::v1::ClientRequestId { client: 9, seq: 4, first_unanswered: 4 });
    let add = cairn_proto::v1::MasterMember { id: 4, addr: "127.0.0.1:7004".into(), removed: false, request: id };
    assert!(s.reader().unwrap().remembered(9, 4).unwrap().is_none());
    let first = run_at(&s, 1, 10, Op::SetMaster(add)).unwrap();
    let r = s.reader().unwrap();
    assert_eq!(r.remembered(9, 4).unwrap(), Some(first));
    assert_eq!(r.masters().unwrap().get(&4).map(String::as_str), Some("127.0.0.1:7004"));
    drop(r);
    let rm = cairn_proto::v1::MasterMember { id: 4, removed: true, ..Default::default() };
    run_at(&s, 2, 11, Op::SetMaster(rm)).unwrap();
    assert!(!s.reader().unwrap().masters().unwrap().contains_key(&4));
}

#[test]
fn repair_limits_default_change_one_at_a_time_and_refuse_nonsense() {
    let (_d, s) = open();
    let defaults = RepairLimits { rate_bytes: DEFAULT_REPAIR_RATE, copies: DEFAULT_REPAIR_COPIES };
    assert_eq!(s.reader().unwrap().repair_limits().unwrap(), defaults);
    let set = |rate_bytes, copies| Op::SetRepairLimits(SetRepairLimitsRequest { rate_bytes, copies, id: None });
    let r = run(&s, 1, set(Some(0), None)).unwrap();
    assert_eq!(r, command_result::Result::Limits(RepairLimits { rate_bytes: 0, ..defaults }));
    run(&s, 2, set(None, Some(4))).unwrap();
    assert_eq!(s.reader().unwrap().repair_limits().unwrap(), RepairLimits { rate_bytes: 0, copies: 4 });
    assert_eq!(run(&s, 3, set(None, Some(0))), Err(ErrorCode::InvalidArgument));
    assert_eq!(run(&s, 4, set(Some(1), Some(MAX_REPAIR_COPIES + 1))), Err(ErrorCode::InvalidArgument));
    assert_eq!(s.reader().unwrap().repair_limits().unwrap(), RepairLimits { rate_bytes: 0, copies: 4 });
}

#[test]
fn chunk_goals_name_referenced_chunks_only() {
    let (_d, s) = open();
    run(&s, 1, file("/f", &[1, 2])).unwrap();
    let goals = s.reader().unwrap().chunk_goals(&[[1u8; 32], [3u8; 32]]).unwrap();
    assert_eq!(goals, vec![Some(3), None]);
    run(&s, 2, Op::Remove(RemoveRequest { path: "/f".into(), recursive: false, id: None })).unwrap();
    assert_eq!(s.reader().unwrap().chunk_goals(&[[1u8; 32]]).unwrap(), vec![None]);
}

// ---------------------------------------------------------------- operations by inode

use cairn_proto::v1::{node_request, LinkNode, MakeNode, NodeRequest, ReleaseNode, RenameNode, UnlinkNode};

fn node(op: node_request::Op) -> Op {
    Op::Node(NodeRequest { op: Some(op), id: None })
}

fn make(parent: u64, name: &str, kind: InodeKind) -> Op {
    node(node_request::Op::Make(MakeNode {
        parent,
        name: name.into(),
        kind: kind as i32,
        mode: 0o644,
        replication: 3,
        symlink_target: "target".into(),
        ..Default::default()
    }))
}

fn ino(r: Result<command_result::Result, ErrorCode>) -> u64 {
    match r.unwrap() {
        command_result::Result::Attr(a) => a.inode,
        other => panic!("no attr: {other:?}"),
    }
}

fn rename(parent: u64, name: &str, new_parent: u64, new_name: &str, no_replace: bool, exchange: bool) -> Op {
    node(node_request::Op::Rename(RenameNode {
        parent,
        name: name.into(),
        new_parent,
        new_name: new_name.into(),
        no_replace,
        exchange,
        keep: false,
        keeper: 0,
    }))
}

fn unlink(parent: u64, name: &str, directory: bool, keep: bool) -> Op {
    node(node_request::Op::Unlink(UnlinkNode { parent, name: name.into(), directory, keep, keeper: 7 }))
}

#[test]
fn hard_links_keep_a_file_until_its_last_name_goes() {
    let (_d, s) = open();
    let f = ino(run(&s, 1, make(ROOT, "f", InodeKind::File)));
    let d = ino(run(&s, 2, make(ROOT, "d", InodeKind::Directory)));
    let link = |name: &str| node(node_request::Op::Link(LinkNode { inode: f, parent: d, name: name.into() }));
    run(&s, 3, link("g")).unwrap();
    assert_eq!(s.reader().unwrap().getattr(f).unwrap().nlink, 2);
    assert_eq!(run(&s, 4, link("g")), Err(ErrorCode::AlreadyExists));
    let to_dir = node(node_request::Op::Link(LinkNode { inode: d, parent: ROOT, name: "d2".into() }));
    assert_eq!(run(&s, 5, to_dir), Err(ErrorCode::NotPermitted));
    run(&s, 6, unlink(ROOT, "f", false, false)).unwrap();
    let r = s.reader().unwrap();
    assert_eq!(r.getattr(f).unwrap().nlink, 1);
    assert_eq!(r.lookup(d, "g").unwrap().inode, f);
    assert_eq!(r.files().unwrap(), 1);
    // rm -r of the directory drops the last name.
    run(&s, 7, Op::Remove(RemoveRequest { path: "/d".into(), recursive: true, id: None })).unwrap();
    assert!(s.reader().unwrap().getattr(f).is_err());
    assert_eq!(s.reader().unwrap().files().unwrap(), 0);
}

#[test]
fn removing_a_tree_with_two_names_of_one_file_frees_it_once() {
    let (_d, s) = open();
    let d = ino(run(&s, 1, make(ROOT, "d", InodeKind::Directory)));
    let f = ino(run(&s, 2, make(d, "a", InodeKind::File)));
    run(&s, 3, node(node_request::Op::Link(LinkNode { inode: f, parent: d, name: "b".into() }))).unwrap();
    run(&s, 4, Op::Remove(RemoveRequest { path: "/d".into(), recursive: true, id: None })).unwrap();
    let r = s.reader().unwrap();
    assert!(r.getattr(f).is_err(), "the file lost both names and is freed");
    assert_eq!(r.files().unwrap(), 0);
}

#[test]
fn an_open_file_outlives_its_last_name_until_released() {
    let (_d, s) = open();
    let f = ino(run(&s, 1, make(ROOT, "f", InodeKind::File)));
    run(&s, 2, unlink(ROOT, "f", false, true)).unwrap();
    let r = s.reader().unwrap();
    assert_eq!(r.getattr(f).unwrap().nlink, 0);
    assert!(r.lookup(ROOT, "f").is_err());
    assert_eq!(r.kept().unwrap().iter().map(|k| (k.0, k.1)).collect::<Vec<_>>(), vec![(f, 7)]);
    run(&s, 3, node(node_request::Op::Release(ReleaseNode { inode: f, keeper: 0 }))).unwrap();
    assert!(s.reader().unwrap().getattr(f).is_err());
    assert!(s.reader().unwrap().kept().unwrap().is_empty());
}

#[test]
fn the_sweep_frees_a_kept_file_only_for_the_session_that_keeps_it() {
    let (_d, s) = open();
    let f = ino(run(&s, 1, make(ROOT, "f", InodeKind::File)));
    let g = ino(run(&s, 2, make(ROOT, "g", InodeKind::File)));
    run(&s, 3, unlink(ROOT, "f", false, true)).unwrap();
    run(&s, 4, unlink(ROOT, "g", false, true)).unwrap();
    // A client that names no session keeps its file until it releases it: nothing to sweep.
    let h = ino(run(&s, 20, make(ROOT, "h", InodeKind::File)));
    let anonymous = UnlinkNode { parent: ROOT, name: "h".into(), keep: true, ..Default::default() };
    run(&s, 21, node(node_request::Op::Unlink(anonymous))).unwrap();
    assert_eq!(s.reader().unwrap().getattr(h).unwrap().nlink, 0);
    // Another session's sweep leaves it alone.
    run(&s, 5, node(node_request::Op::Release(ReleaseNode { inode: f, keeper: 8 }))).unwrap();
    assert_eq!(s.reader().unwrap().getattr(f).unwrap().nlink, 0);
    // Named again (a link by inode): no longer only kept, so no sweep frees it.
    run(&s, 6, node(node_request::Op::Link(LinkNode { inode: g, parent: ROOT, name: "g2".into() }))).unwrap();
    run(&s, 7, node(node_request::Op::Release(ReleaseNode { inode: g, keeper: 7 }))).unwrap();
    assert_eq!(s.reader().unwrap().getattr(g).unwrap().nlink, 1);
    // The keeping session's sweep frees it, and its chunks' references with it.
    assert_eq!(s.reader().unwrap().kept().unwrap().iter().map(|k| k.0).collect::<Vec<_>>(), vec![f]);
    run(&s, 8, node(node_request::Op::Release(ReleaseNode { inode: f, keeper: 7 }))).unwrap();
    assert!(s.reader().unwrap().getattr(f).is_err());
    assert!(s.reader().unwrap().kept().unwrap().is_empty());
    assert_eq!(s.reader().unwrap().files().unwrap(), 2, "g (named again) and h (kept without a session)");
}

#[test]
fn unlink_and_rmdir_refuse_the_wrong_kind() {
    let (_d, s) = open();
    let d = ino(run(&s, 1, make(ROOT, "d", InodeKind::Directory)));
    run(&s, 2, make(d, "f", InodeKind::File)).unwrap();
    assert_eq!(run(&s, 3, unlink(ROOT, "d", false, false)), Err(ErrorCode::IsADirectory));
    assert_eq!(run(&s, 4, unlink(d, "f", true, false)), Err(ErrorCode::NotADirectory));
    assert_eq!(run(&s, 5, unlink(ROOT, "d", true, false)), Err(ErrorCode::NotEmpty));
    assert_eq!(run(&s, 6, make(ROOT, &"x".repeat(256), InodeKind::File)), Err(ErrorCode::NameTooLong));
    run(&s, 7, unlink(d, "f", false, false)).unwrap();
    run(&s, 8, unlink(ROOT, "d", true, false)).unwrap();
    assert_eq!(s.reader().unwrap().getattr(ROOT).unwrap().nlink, 2);
}

#[test]
fn renames_exchange_refuse_replacing_and_never_move_a_directory_into_itself() {
    let (_d, s) = open();
    let a = ino(run(&s, 1, make(ROOT, "a", InodeKind::Directory)));
    let b = ino(run(&s, 2, make(a, "b", InodeKind::Directory)));
    let f = ino(run(&s, 3, make(ROOT, "f", InodeKind::File)));
    assert_eq!(run(&s, 4, rename(ROOT, "a", b, "x", false, false)), Err(ErrorCode::InvalidArgument));
    assert_eq!(run(&s, 5, rename(ROOT, "a", a, "x", false, false)), Err(ErrorCode::InvalidArgument));
    // The same through paths, with a directory made by mkdir -p.
    run(&s, 6, mkdir("/p/q/r", true)).unwrap();
    let into = Op::Rename(RenameRequest { src: "/p".into(), dst: "/p/q/r/p".into(), id: None });
    assert_eq!(run(&s, 7, into), Err(ErrorCode::InvalidArgument));
    assert_eq!(run(&s, 8, rename(ROOT, "f", a, "b", true, false)), Err(ErrorCode::AlreadyExists));
    // Exchange a file and a directory across directories: link counts follow.
    run(&s, 9, rename(ROOT, "f", a, "b", false, true)).unwrap();
    let r = s.reader().unwrap();
    assert_eq!(r.lookup(ROOT, "f").unwrap().inode, b);
    assert_eq!(r.lookup(a, "b").unwrap().inode, f);
    assert_eq!(r.getattr(a).unwrap().nlink, 2);
    assert_eq!(r.getattr(ROOT).unwrap().nlink, 5); // a, p, and now the directory f
                                                   // b now lives in the root: moving a below it is fine, moving b below a... is too.
    run(&s, 10, rename(ROOT, "a", b, "a", false, false)).unwrap();
    assert_eq!(run(&s, 11, rename(ROOT, "f", b, "z", false, false)), Err(ErrorCode::InvalidArgument));
}

#[test]
fn access_keys_are_replicated_state() {
    use cairn_proto::v1::{access_key_change, AccessKey, AccessKeyChange};
    let (_d, s) = open();
    let key =
        AccessKey { id: "CKTESTKEY0000000000A".into(), secret: "s".repeat(40), created_ns: 0, description: "t".into() };
    let create = |k: &AccessKey| {
        Op::AccessKey(AccessKeyChange { op: Some(access_key_change::Op::Create(k.clone())), request: None })
    };
    let r = run_at(&s, 1, 77, create(&key)).unwrap();
    assert_eq!(r, command_result::Result::AccessKey(AccessKey { created_ns: 77, ..key.clone() }));
    assert_eq!(run_at(&s, 2, 78, create(&key)), Err(ErrorCode::AlreadyExists));
    let weak = AccessKey { secret: "short".into(), ..key.clone() };
    assert_eq!(
        run_at(&s, 3, 79, create(&AccessKey { id: "CKOTHER0000000000000".into(), ..weak })),
        Err(ErrorCode::InvalidArgument)
    );
    let r = s.reader().unwrap();
    assert_eq!(r.access_key(&key.id).unwrap().secret, key.secret);
    let listed = r.access_keys().unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].secret.is_empty(), "listings carry no secrets");
    let delete =
        Op::AccessKey(AccessKeyChange { op: Some(access_key_change::Op::Delete(key.id.clone())), request: None });
    run_at(&s, 4, 80, delete.clone()).unwrap();
    assert_eq!(run_at(&s, 5, 81, delete), Err(ErrorCode::NotFound));
    assert!(s.reader().unwrap().access_key(&key.id).is_err());
}

#[test]
fn commits_carry_object_metadata_and_content_changes_drop_the_etag() {
    let (_d, s) = open();
    let ext = vec![Extent { hash: vec![1; 32], length: 10 }];
    let mut x = std::collections::BTreeMap::new();
    x.insert(cairn_proto::ETAG_XATTR.to_string(), b"abc".to_vec());
    x.insert("user.s3.content-type".to_string(), b"text/plain".to_vec());
    let commit = |xattrs: Option<std::collections::BTreeMap<String, Vec<u8>>>| {
        Op::CommitFile(CommitFileRequest {
            path: "/obj".into(),
            extents: ext.clone(),
            replication: 1,
            mode: 0o644,
            set_xattrs: xattrs.is_some(),
            xattrs: xattrs.unwrap_or_default(),
            ..Default::default()
        })
    };
    run_at(&s, 1, 1, commit(Some(x.clone()))).unwrap();
    let node = s.reader().unwrap().open_file("/obj").unwrap();
    assert_eq!(node.xattrs, x);
    let listed = s.reader().unwrap().list("/", "", 10, true).unwrap().1;
    assert_eq!(listed[0].xattrs, node.xattrs);
    // Create-only (If-None-Match: *) fails on an existing path.
    let exclusive = match commit(None) {
        Op::CommitFile(c) => Op::CommitFile(CommitFileRequest { exclusive: true, ..c }),
        _ => unreachable!(),
    };
    assert_eq!(run_at(&s, 2, 2, exclusive), Err(ErrorCode::AlreadyExists));
    // A commit without metadata (a write through the mount, `cairn put`) drops the S3 metadata,
    // which described the old content, and keeps other attributes.
    let mut node = s.reader().unwrap().open_file("/obj").unwrap();
    node.xattrs.insert("user.mine".into(), b"kept".to_vec());
    let id = node.attr.as_ref().unwrap().inode;
    run_at(
        &s,
        3,
        3,
        Op::Node(cairn_proto::v1::NodeRequest {
            op: Some(cairn_proto::v1::node_request::Op::SetXattr(cairn_proto::v1::SetXattr {
                inode: id,
                name: "user.mine".into(),
                value: b"kept".to_vec(),
                ..Default::default()
            })),
            id: None,
        }),
    )
    .unwrap();
    run_at(&s, 4, 4, commit(None)).unwrap();
    let node = s.reader().unwrap().open_file("/obj").unwrap();
    assert_eq!(node.xattrs.keys().collect::<Vec<_>>(), ["user.mine"]);
    let (_, entries, _) = s.reader().unwrap().list("/", "", 10, false).unwrap();
    assert!(entries[0].xattrs.is_empty());
}

#[test]
fn a_snapshot_carries_every_table_kept_files_included() {
    let (_d, s) = open();
    let d = ino(run(&s, 1, make(ROOT, "d", InodeKind::Directory)));
    let f = ino(run(&s, 2, make(d, "f", InodeKind::File)));
    run(&s, 3, make(d, "g", InodeKind::File)).unwrap();
    run(&s, 4, unlink(d, "f", false, true)).unwrap();
    let before = snapshot_records(&s);
    assert!(before.iter().any(|(t, _, _)| *t == T_KEPT), "the kept file is in the snapshot");
    // Loaded into another database, the state dumps the same and the sweep can still free it.
    let (_d2, s2) = open();
    let txn = s2.db.begin_write().unwrap();
    load(&txn, before.clone().into_iter().map(Ok), 4).unwrap();
    txn.commit().unwrap();
    assert_eq!(snapshot_records(&s2), before);
    assert_eq!(s2.reader().unwrap().kept().unwrap().iter().map(|k| (k.0, k.1)).collect::<Vec<_>>(), vec![(f, 7)]);
    run(&s2, 5, node(node_request::Op::Release(ReleaseNode { inode: f, keeper: 7 }))).unwrap();
    assert!(s2.reader().unwrap().getattr(f).is_err());
}

fn snapshot_records(s: &State) -> Vec<Record> {
    let mut out = Vec::new();
    dump(&s.db.begin_read().unwrap(), |t, k, v| {
        out.push((t, k, v));
        Ok(())
    })
    .unwrap();
    out
}

#[test]
fn a_batch_applies_as_its_entries_one_by_one_also_past_the_cache() {
    // More files than the write-back cache holds, in one directory that is then removed whole,
    // so that the cache fills, overflows into the tables and is written back mid-batch.
    let mut ops = vec![mkdir("/d", false), mkdir("/e", false)];
    for n in 0..(CACHE_ROWS as u64 + 300) {
        ops.push(file(&format!("/d/f{n}"), &[(n % 7) as u8]));
    }
    for n in 0..300u64 {
        ops.push(file(&format!("/e/g{n}"), &[1, 2]));
        ops.push(file(&format!("/e/g{n}"), &[3])); // a new version of the same file
        if n % 3 == 0 {
            ops.push(Op::Rename(RenameRequest { src: format!("/e/g{n}"), dst: format!("/d/f{n}"), id: None }));
        }
        if n % 5 == 0 {
            ops.push(Op::Remove(RemoveRequest { path: format!("/e/g{n}"), recursive: false, id: None }));
        }
    }
    // A file with more extents than the cache keeps, committed, replaced small, then big again.
    let many: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    ops.extend([file("/e/big", &many), file("/e/big", &[5]), file("/e/big", &many)]);
    ops.push(file("/d", &[1])); // refused: a directory
    ops.push(Op::Remove(RemoveRequest { path: "/d".into(), recursive: true, id: None }));
    ops.push(mkdir("/d", false));
    // Every op from one of three clients that keep a row of answers.
    let cmds: Vec<(u64, Option<Command>)> = ops
        .into_iter()
        .enumerate()
        .map(|(i, op)| {
            let index = i as u64 + 1;
            let id = cairn_proto::v1::ClientRequestId { client: index % 3 + 1, seq: index, first_unanswered: index };
            (index, Some(Command { request_id: index, time_ns: index as i64, op: Some(with_request(op, id)) }))
        })
        .collect();
    let last = cmds.len() as u64;

    let (_d1, one_by_one) = open();
    let mut results = Vec::new();
    for (index, cmd) in &cmds {
        results.extend(one_by_one.apply_batch(&[(*index, cmd.clone())], *index).unwrap());
    }
    let (_d2, batched) = open();
    assert_eq!(batched.apply_batch(&cmds, last).unwrap(), results);
    assert_eq!(snapshot_records(&batched), snapshot_records(&one_by_one));
    let r = batched.reader().unwrap();
    // 300 files in /e: 100 renamed into /d (removed with it), 40 more removed; and the big one.
    assert_eq!(r.files().unwrap(), 161);
    assert_eq!(r.stat("/e/big").unwrap().extent_count, 300);
    // Refused: the 20 removes of a file renamed away before (n a multiple of 15), and the commit
    // over a directory.
    let refused = results.iter().filter(|r| matches!(r.result, Some(command_result::Result::Error(_))));
    assert_eq!(refused.count(), 21);
    // A retry of the last mutation gets its first answer back, from the written-back row.
    let (_, retry) = cmds[cmds.len() - 1].clone();
    assert_eq!(batched.apply_batch(&[(last + 1, retry)], last + 1).unwrap()[0], results[results.len() - 1]);
}

#[test]
fn a_commit_made_from_an_older_version_is_refused() {
    let (_d, s) = open();
    let f = ino(run(&s, 1, make(ROOT, "f", InodeKind::File)));
    let commit = |base_version, chunk: u8| {
        let extents = vec![Extent { hash: vec![chunk; 32], length: 10 }];
        node(node_request::Op::Commit(cairn_proto::v1::CommitNode { inode: f, extents, base_version }))
    };
    let version = |r: Result<command_result::Result, ErrorCode>| match r.unwrap() {
        command_result::Result::Attr(a) => a.version,
        other => panic!("no attr: {other:?}"),
    };
    let v0 = s.reader().unwrap().getattr(f).unwrap().version;
    let v1 = version(run(&s, 2, commit(Some(v0), 1)));
    assert_eq!(v1, v0 + 1);
    // Another writer made its list from v0 too: refused, and the file keeps the first commit.
    assert_eq!(run(&s, 3, commit(Some(v0), 2)), Err(ErrorCode::Changed));
    let r = s.reader().unwrap();
    assert_eq!((r.getattr(f).unwrap().version, r.open_inode(f).unwrap().extents[0].hash[0]), (v1, 1));
    // Made from the newest version, or naming none (an older client): taken.
    assert_eq!(version(run(&s, 4, commit(Some(v1), 2))), v1 + 1);
    assert_eq!(version(run(&s, 5, commit(None, 3))), v1 + 2);
}
