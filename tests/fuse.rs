//! The FUSE mount on a real cluster, driven by the tools users run in it: cp, tar, git, sqlite3,
//! shells appending, python's mmap, a non-root user, a second mount; and the POSIX suite
//! (pjdfstest) with fsx through `tests/conformance/run.sh`.
//!
//! Needs root and /dev/fuse. Without /dev/fuse the tests fail and say so: a mount that was never
//! tested must not pass.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{random_bytes, wait_for, Cluster, Options, BIN, MIB};

/// A `cairn mount` process; on drop it gets SIGTERM (a clean unmount), then SIGKILL and a lazy
/// unmount if it did not go within a few seconds.
struct Mount {
    child: Option<std::process::Child>,
    dir: PathBuf,
}

impl Mount {
    fn start(c: &Cluster, dir: &Path, extra: &[&str]) -> Mount {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: the FUSE tests need it (and root); they cannot pass without a mount"
        );
        std::fs::create_dir_all(dir).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("mount").arg(dir).args(extra).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in c.env() {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn cairn mount");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let mut m = Mount { child: Some(child), dir: dir.to_path_buf() };
        if !line.starts_with("mounted on") {
            let mut err = String::new();
            if let Some(mut e) = m.child.as_mut().and_then(|c| c.stderr.take()) {
                std::io::Read::read_to_string(&mut e, &mut err).unwrap();
            }
            m.stop();
            panic!("cairn mount did not come up: {line} {err}");
        }
        m
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// SIGTERM and wait; returns whether it exited cleanly and left nothing mounted.
    fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else { return true };
        // SAFETY: sending a signal to our own child by its PID.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success() && !mounted(&self.dir);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        false
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop();
    }
}

fn mounted(dir: &Path) -> bool {
    let canon = dir.canonicalize().unwrap_or(dir.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(canon.to_str().unwrap()))
}

/// Runs `sh -c SCRIPT` in `dir`; panics with its output unless it succeeds. Returns stdout.
fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(script).current_dir(dir).output().expect("run sh");
    assert!(
        out.status.success(),
        "`{script}` failed in {}:\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn start() -> (Cluster, Mount) {
    let c = Cluster::start(Options { chunkservers: 3, ..Default::default() });
    let m = Mount::start(&c, &c.dir.path().join("mnt"), &[]);
    (c, m)
}

#[test]
fn trees_copy_and_untar_bit_for_bit_and_git_works() {
    let (c, m) = start();
    let src = c.dir.path().join("src");
    std::fs::create_dir_all(src.join("a/b/c")).unwrap();
    for (i, size) in [0, 1, 4095, 4096, 100_000, 5 * MIB + 7].iter().enumerate() {
        std::fs::write(src.join(format!("a/b/f{i}")), random_bytes(*size, i as u64)).unwrap();
    }
    std::os::unix::fs::symlink("b/f1", src.join("a/link")).unwrap();
    std::fs::write(src.join("a/b/c/deep"), b"deep").unwrap();
    let mnt = m.dir.clone();
    sh(&mnt, &format!("cp -a {} ./copy && diff -r --no-dereference {} ./copy", src.display(), src.display()));
    let tarball = c.dir.path().join("t.tar");
    sh(&src, &format!("tar cf {} .", tarball.display()));
    sh(
        &mnt,
        &format!(
            "mkdir x && cd x && tar xf {} && cd .. && diff -r --no-dereference {} x",
            tarball.display(),
            src.display()
        ),
    );
    // The same bytes through the client library.
    let back = c.cli(&["get", "/copy/a/b/f5", "-"]);
    assert!(back.status.success());
    assert!(back.stdout == random_bytes(5 * MIB + 7, 5), "the file reads back different through the CLI");

    sh(&mnt, "git init -q repo");
    let repo = m.path("repo");
    sh(&repo, "for i in 1 2 3; do echo line $i > f$i; done && mkdir sub && echo x > sub/y");
    sh(&repo, "git add . && git -c user.email=t@e -c user.name=t commit -qm first");
    sh(&repo, "echo more >> f1 && git -c user.email=t@e -c user.name=t commit -qam second");
    assert_eq!(sh(&repo, "git log --oneline | wc -l").trim(), "2");
    assert_eq!(sh(&repo, "git status --porcelain"), "");
    sh(&repo, "git fsck --strict 2>&1 && git checkout -q HEAD~1 && test \"$(cat f1)\" = 'line 1'");
}

#[test]
fn sqlite_keeps_ten_thousand_rows_intact() {
    let (_c, m) = start();
    let script = "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);\
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 10000) \
        INSERT INTO t SELECT i, hex(randomblob(40)) FROM n;";
    sh(&m.dir, &format!("sqlite3 db.sqlite '{script}'"));
    sh(&m.dir, "for i in 1 2 3 4 5; do sqlite3 db.sqlite \"UPDATE t SET v = 'x$i' WHERE id % 7 = $i\"; done");
    assert_eq!(sh(&m.dir, "sqlite3 db.sqlite 'SELECT count(*) FROM t'").trim(), "10000");
    assert_eq!(sh(&m.dir, "sqlite3 db.sqlite \"SELECT count(*) FROM t WHERE v = 'x3'\"").trim(), "1429");
    assert_eq!(sh(&m.dir, "sqlite3 db.sqlite 'PRAGMA integrity_check'").trim(), "ok");
}

#[test]
fn posix_semantics_of_names_links_appends_truncate_and_mmap() {
    let (c, m) = start();
    let d = m.dir.clone();
    // Appends from several processes at once: every line arrives whole.
    sh(&d, "for p in 1 2 3 4; do (for i in $(seq 1 200); do echo \"p$p line $i\" >> log; done) & done; wait");
    let log = std::fs::read_to_string(m.path("log")).unwrap();
    assert_eq!(log.lines().count(), 800);
    for p in 1..=4 {
        assert_eq!(log.lines().filter(|l| l.starts_with(&format!("p{p} "))).count(), 200);
    }
    // Rename over an existing file replaces it atomically.
    sh(&d, "echo old > a && echo new > b && mv b a && test \"$(cat a)\" = new && test ! -e b");
    // Truncate down and up.
    sh(&d, "head -c 10000000 /dev/urandom > big && truncate -s 4194310 big && test $(stat -c %s big) = 4194310");
    sh(
        &d,
        "truncate -s 9000000 big && test $(stat -c %s big) = 9000000 && \
            test \"$(tail -c 4805690 big | tr -d '\\0' | wc -c)\" = 0",
    );
    // Growing a file past the largest one the cluster holds (256 GiB) is EFBIG, by truncate, by a
    // write far past the end, by an open file's ftruncate and fallocate, and changes nothing.
    let efbig = r#"python3 -c "
import errno, os
def efbig(f):
    try:
        f()
    except OSError as e:
        assert e.errno == errno.EFBIG, e
        return
    raise SystemExit('grew past the limit')
efbig(lambda: os.truncate('big', 1 << 50))
efbig(lambda: os.truncate('big', (256 << 30) + 1))
fd = os.open('big', os.O_WRONLY)
efbig(lambda: os.pwrite(fd, b'x', 1 << 50))
efbig(lambda: os.ftruncate(fd, 1 << 40))
efbig(lambda: os.posix_fallocate(fd, 0, 1 << 40))
os.pwrite(fd, b'end', 9000000)
os.close(fd)
assert os.stat('big').st_size == 9000003, os.stat('big')
""#;
    sh(&d, efbig);
    // Hard links share content and count; symlinks resolve and dangle.
    sh(
        &d,
        "echo shared > h1 && ln h1 h2 && test $(stat -c %h h1) = 2 && echo more >> h2 && \
            test \"$(cat h1)\" = \"$(printf 'shared\\nmore')\" && rm h1 && test $(stat -c %h h2) = 1",
    );
    sh(
        &d,
        "ln -s h2 s && test \"$(cat s)\" = \"$(cat h2)\" && test \"$(readlink s)\" = h2 && rm h2 && \
            ! cat s 2>/dev/null && test -L s",
    );
    sh(&d, "mkfifo fifo && test -p fifo && setfattr -n user.k -v val a && test \"$(getfattr --only-values -n user.k a)\" = val");
    // A write drops file capabilities (the kernel asks for them first; an open file answers
    // from its open, and forgets that when an xattr changes through the mount).
    sh(
        &d,
        "python3 -c \"import os\nf=os.open('capf',os.O_CREAT|os.O_WRONLY,0o755); os.write(f,b'a')\n\
os.setxattr('capf','security.capability',bytes.fromhex('00000002'+'01000000'+'00'*12))\n\
assert os.getxattr('capf','security.capability')[4]==1; os.write(f,b'b'); os.close(f)\n\
try: os.getxattr('capf','security.capability'); raise SystemExit('the capability outlived a write')\n\
except OSError as e: assert e.errno==61, e\"",
    );
    // mmap: write through a shared mapping, read back through read(2) after close.
    sh(
        &d,
        "python3 -c \"import mmap,os\nf=open('mm','w+b'); f.truncate(3*4096); m=mmap.mmap(f.fileno(),3*4096)\n\
m[4096:4101]=b'hello'; m.flush(); m.close(); f.close()\nassert open('mm','rb').read()[4096:4101]==b'hello'\"",
    );
    // An open file outlives its last name.
    sh(
        &d,
        "python3 -c \"import os\nf=open('gone','w+'); os.unlink('gone'); f.write('still'); f.flush(); f.seek(0)\n\
assert f.read()=='still'; assert os.fstat(f.fileno()).st_nlink==0\"",
    );
    // ... and so does an open file that a rename replaces.
    sh(
        &d,
        "echo replacement > other && python3 -c \"import os\nf=open('victim','w+'); f.write('kept'); f.flush()\n\
os.rename('other','victim'); f.seek(0); assert f.read()=='kept'; assert os.fstat(f.fileno()).st_nlink==0\" && \
            test \"$(cat victim)\" = replacement",
    );
    // Growing a file by gigabytes stores one chunk of zeros, not gigabytes of memory.
    sh(
        &d,
        "truncate -s 3G sparse && test $(stat -c %s sparse) = 3221225472 && \
            test \"$(tail -c 100000 sparse | tr -d '\\0' | wc -c)\" = 0 && \
            printf end >> sparse && test \"$(tail -c 3 sparse)\" = end",
    );
    // Permissions are enforced for other users.
    sh(&d, "mkdir private && chmod 700 private && echo secret > private/f && chmod 600 private/f");
    let denied = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(m.path("private/f"))
        .output()
        .unwrap();
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("Permission denied"), "{denied:?}");
    sh(&d, "mkdir open && chmod 777 open");
    let allowed = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            "echo mine > open/f && stat -c %u open/f",
        ])
        .current_dir(&d)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&allowed.stdout).trim(), "65534", "{allowed:?}");
    // What the mount wrote, the CLI reads (and the other way round).
    let out = c.cli(&["get", "/a", "-"]);
    assert_eq!(out.stdout, b"new\n");
    c.put_data(b"from the cli", "/cli.txt");
    assert_eq!(std::fs::read(m.path("cli.txt")).unwrap(), b"from the cli");
}

/// An ftruncate that cannot store its zeros (no chunkserver answers) fails and changes nothing:
/// the open file's next write and close commit its old size, not a half-grown one.
#[test]
fn a_failed_extending_truncate_changes_nothing() {
    use std::os::unix::fs::FileExt;
    let (mut c, m) = start();
    let data = random_bytes(9 * MIB, 21);
    std::fs::write(m.path("f"), &data).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(m.path("f")).unwrap();
    for cs in &mut c.chunkservers {
        cs.kill();
    }
    let t = Instant::now();
    f.set_len(100 * MIB as u64).expect_err("a truncate with no chunkserver to store its zeros");
    eprintln!("the truncate failed after {:?}", t.elapsed());
    for i in 0..c.chunkservers.len() {
        c.restart_chunkserver(i);
    }
    c.wait_alive(c.chunkservers.len());
    f.write_all_at(b"X", 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let got = std::fs::read(m.path("f")).unwrap();
    assert_eq!(got.len(), data.len(), "the failed truncate changed the size");
    assert!(got[0] == b'X' && got[1..] == data[1..], "the content changed");
}

#[test]
fn two_mounts_see_each_others_closed_files_and_unmount_cleanly() {
    use std::os::unix::fs::PermissionsExt;
    let (c, mut m1) = start();
    let mut m2 = Mount::start(&c, &c.dir.path().join("mnt2"), &["--attr-ttl-s", "0"]);
    let data = random_bytes(3 * MIB, 9);
    std::fs::write(m1.path("shared.bin"), &data).unwrap();
    wait_for("the second mount to see the file", Duration::from_secs(10), || {
        std::fs::read(m2.path("shared.bin")).is_ok_and(|b| b == data)
    });
    // Rewritten on the second mount: the first sees the new version on its next open.
    std::fs::write(m2.path("shared.bin"), b"v2").unwrap();
    wait_for("the first mount to see the new version", Duration::from_secs(10), || {
        std::fs::read(m1.path("shared.bin")).is_ok_and(|b| b == b"v2")
    });
    // While a file has writes pending on one mount, a chmod made on the other shows there at
    // once, beside the pending size.
    let mut pending = std::fs::File::create(m2.path("pending.bin")).unwrap();
    std::io::Write::write_all(&mut pending, b"pending").unwrap();
    std::fs::set_permissions(m1.path("pending.bin"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let st = std::fs::metadata(m2.path("pending.bin")).unwrap();
    assert_eq!((st.permissions().mode() & 0o777, st.len()), (0o600, 7), "mode and size seen on the writing mount");
    drop(pending);
    // A file deleted through one mount while the other writes it: there, fsync and close fail
    // with ESTALE (its writes have nowhere to go) instead of reporting success or ENOENT.
    let mut doomed = std::fs::File::create(m2.path("doomed.bin")).unwrap();
    std::io::Write::write_all(&mut doomed, b"first").unwrap();
    doomed.sync_all().unwrap();
    wait_for("the first mount to delete the file", Duration::from_secs(10), || {
        std::fs::remove_file(m1.path("doomed.bin")).is_ok()
    });
    std::io::Write::write_all(&mut doomed, b" second").unwrap();
    let err = doomed.sync_all().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    drop(doomed);
    // The mount point is busy: a second mount there is refused with a clear error.
    let out = common::cli_env(&["mount", m1.dir.to_str().unwrap()], &c.env(), None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("busy"), "{out:?}");
    let file = c.dir.path().join("plain");
    std::fs::write(&file, b"").unwrap();
    let out = common::cli_env(&["mount", file.to_str().unwrap()], &c.env(), None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a directory"), "{out:?}");
    assert!(m2.stop(), "SIGTERM unmounts cleanly");
    assert!(m1.stop(), "SIGTERM unmounts cleanly");
}

/// Two mounts write one file at once, each through its own open: whichever commits second merges
/// onto the first one's commit, so both keep their bytes (also two writes into one chunk), as
/// on NFS. A truncate on one mount and writes on the other are merged the same way.
#[test]
fn two_mounts_writing_one_file_keep_each_others_bytes() {
    use std::os::unix::fs::FileExt;
    let (c, m1) = start();
    let m2 = Mount::start(&c, &c.dir.path().join("mnt2"), &["--attr-ttl-s", "0"]);
    let mut want = random_bytes(10 * MIB, 21);
    std::fs::write(m1.path("both.bin"), &want).unwrap();
    wait_for("the second mount to see the file", Duration::from_secs(10), || {
        std::fs::metadata(m2.path("both.bin")).is_ok_and(|m| m.len() == want.len() as u64)
    });
    let open = |m: &Mount| std::fs::OpenOptions::new().read(true).write(true).open(m.path("both.bin")).unwrap();
    let (a, b) = (open(&m1), open(&m2));
    // The second mount's kernel caches the first pages as they are now.
    let mut head = vec![0; 16 << 10];
    b.read_exact_at(&mut head, 0).unwrap();
    let mut put = |f: &std::fs::File, off: usize, bytes: &[u8]| {
        f.write_all_at(bytes, off as u64).unwrap();
        if want.len() < off + bytes.len() {
            want.resize(off + bytes.len(), 0);
        }
        want[off..off + bytes.len()].copy_from_slice(bytes);
    };
    put(&a, 100, &[b'a'; 1000]);
    put(&a, 5 * MIB + 7, &[b'a'; 3000]);
    put(&b, 2000, &[b'b'; 1000]); // the chunk the first mount changed too
    put(&b, 9 * MIB, &[b'b'; 500]);
    put(&b, 10 * MIB, &random_bytes(MIB + 5, 22)); // and longer
    a.sync_all().unwrap();
    b.sync_all().unwrap();
    drop((a, b));
    for (i, m) in [&m1, &m2].into_iter().enumerate() {
        let got = std::fs::read(m.path("both.bin")).unwrap();
        assert_eq!(got.len(), want.len(), "mount {i}: size after both commits");
        let first = got.iter().zip(&want).position(|(x, y)| x != y);
        assert!(got == want, "mount {i}: content after both commits differs from byte {first:?}");
    }
    // One mount cuts the file (a truncate commits at once) while the other has writes below and
    // above the cut pending: they land on the cut file, the one above growing it again.
    let (a, b) = (open(&m1), open(&m2));
    b.write_all_at(b"kept", MIB as u64).unwrap();
    b.write_all_at(b"past the cut", 8 * MIB as u64).unwrap();
    a.set_len(4 * MIB as u64).unwrap();
    b.sync_all().unwrap();
    drop((a, b));
    want.truncate(4 * MIB);
    want[MIB..MIB + 4].copy_from_slice(b"kept");
    want.resize(8 * MIB, 0);
    want.extend_from_slice(b"past the cut");
    let got = std::fs::read(m1.path("both.bin")).unwrap();
    assert_eq!(got.len(), want.len(), "size after the cut");
    assert!(
        got == want,
        "content after the cut differs from byte {:?}",
        got.iter().zip(&want).position(|(x, y)| x != y)
    );
}

/// A file open on a mount whose chunks moved since its open (the only copy of each, drained to
/// the other node) reads on: the mount asks where the chunks are now.
#[test]
fn an_open_file_reads_on_after_its_chunks_move() {
    use std::os::unix::fs::FileExt;
    let c = Cluster::start(Options { chunkservers: 2, ..Default::default() });
    let m1 = Mount::start(&c, &c.dir.path().join("mnt"), &["--replication", "1"]);
    let data = random_bytes(12 * MIB, 31);
    std::fs::write(m1.path("moving"), &data).unwrap();
    // Opened on another mount, whose cache holds none of it: the open fetches the locations.
    let m2 = Mount::start(&c, &c.dir.path().join("mnt2"), &[]);
    let f = std::fs::File::open(m2.path("moving")).unwrap();
    let victim = c.fullest(&common::chunk_hashes(&data));
    let id = std::fs::read_to_string(c.chunkservers[victim].data.join("node_id")).unwrap();
    let out = c.cli(&["admin", "drain", id.trim()]);
    assert!(out.status.success(), "drain: {}", String::from_utf8_lossy(&out.stderr));
    let mut got = vec![0; data.len()];
    f.read_exact_at(&mut got, 0).unwrap();
    assert!(got == data, "read back different bytes");
}

/// Close-to-open across mounts: a file another mount wrote and closed reads whole at once, even
/// where this mount's kernel still holds the size it looked up before (the attribute timeout).
#[test]
fn an_open_sees_the_size_another_mount_closed_with() {
    let (c, m1) = start();
    let m2 = Mount::start(&c, &c.dir.path().join("mnt2"), &[]);
    std::fs::write(m1.path("cto"), b"").unwrap();
    wait_for("the second mount to see the file", Duration::from_secs(10), || m2.path("cto").exists());
    for round in 0..5u8 {
        // The second mount's kernel caches the file's size as it is now ...
        let before = std::fs::metadata(m2.path("cto")).unwrap().len();
        // ... the first mount writes it longer and closes it ...
        let content = vec![b'a' + round; 1000 * (round as usize + 1)];
        std::fs::write(m1.path("cto"), &content).unwrap();
        // ... and an open on the second mount right after reads all of it.
        let got = std::fs::read(m2.path("cto")).unwrap();
        assert_eq!(got.len(), content.len(), "round {round}: read {} bytes (size was {before})", got.len());
        assert_eq!(got, content, "round {round}");
    }
}

/// Two mounts open the same new names at the same moment: both lookups find nothing, both ask
/// to create, one wins. Without O_EXCL the loser must open the winner's file (as on a local
/// disk), not fail with EEXIST; with O_EXCL exactly one of the two succeeds.
#[test]
fn racing_creates_from_two_mounts_open_the_same_file() {
    let (c, m1) = start();
    let m2 = Mount::start(&c, &c.dir.path().join("mnt2"), &[]);
    std::fs::create_dir(m1.path("race")).unwrap();
    wait_for("the second mount to see the directory", Duration::from_secs(10), || m2.path("race").is_dir());
    const NAMES: usize = 50;
    for exclusive in [false, true] {
        let barrier = std::sync::Barrier::new(2);
        let outcomes: Vec<Vec<Result<(), std::io::ErrorKind>>> = std::thread::scope(|s| {
            let racers: Vec<_> = [&m1, &m2]
                .into_iter()
                .enumerate()
                .map(|(who, m)| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        (0..NAMES)
                            .map(|i| {
                                let path = m.path(&format!("race/{exclusive}-{i}"));
                                barrier.wait();
                                let mut o = std::fs::OpenOptions::new();
                                o.write(true);
                                if exclusive {
                                    o.create_new(true);
                                } else {
                                    o.create(true);
                                }
                                let mut f = o.open(&path).map_err(|e| e.kind())?;
                                std::io::Write::write_all(&mut f, &[b'a' + who as u8]).map_err(|e| e.kind())
                            })
                            .collect()
                    })
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        for (i, pair) in outcomes[0].iter().zip(&outcomes[1]).enumerate() {
            if exclusive {
                assert!(
                    matches!(
                        pair,
                        (Ok(()), Err(std::io::ErrorKind::AlreadyExists))
                            | (Err(std::io::ErrorKind::AlreadyExists), Ok(()))
                    ),
                    "O_EXCL name {i}: {pair:?}"
                );
            } else {
                assert_eq!(pair, (&Ok(()), &Ok(())), "name {i}: both opens succeed");
            }
            let got = std::fs::read(m1.path(&format!("race/{exclusive}-{i}"))).unwrap();
            assert!(got == b"a" || got == b"b", "name {i} holds {got:?}");
        }
    }
}

/// A python process that creates `name` in `dir`, writes `content`, unlinks it and keeps it
/// open; on a line on stdin it reads the content back through its descriptor and answers with
/// it. Killed on drop.
struct Holder(std::process::Child);

impl Holder {
    fn start(dir: &Path, name: &str, content: &str) -> Holder {
        let script = format!(
            "import os,sys\nf=open({name:?},'w+'); f.write({content:?}); f.flush(); os.fsync(f.fileno())\n\
             os.unlink({name:?}); print('ready', flush=True)\nsys.stdin.readline(); f.seek(0)\n\
             print(f.read(), flush=True)"
        );
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python3");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the holder did not keep its file");
        Holder(child)
    }

    /// What the descriptor reads now.
    fn read_back(mut self) -> String {
        std::io::Write::write_all(self.0.stdin.as_mut().unwrap(), b"go\n").unwrap();
        let mut line = String::new();
        BufReader::new(self.0.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        line.trim().to_string()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn files_kept_open_by_a_mount_that_dies_are_freed_after_the_grace() {
    let c = Cluster::start(Options {
        chunkservers: 3,
        master_args: vec!["--kept-grace-s".into(), "2".into()],
        ..Default::default()
    });
    let mut dead = Mount::start(&c, &c.dir.path().join("mnt"), &[]);
    let live = Mount::start(&c, &c.dir.path().join("mnt2"), &[]);
    let orphan = Holder::start(&dead.dir, "orphan", "of a dead mount");
    let kept = Holder::start(&live.dir, "kept", "still here");
    assert_eq!(c.status()["files"], 2, "both files are kept while open");
    // The first mount dies without a chance to release its file.
    if let Some(mut child) = dead.child.take() {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    drop(orphan);
    let _ = Command::new("umount").arg("-l").arg(&dead.dir).status();
    wait_for("the dead mount's file to be freed", Duration::from_secs(30), || {
        c.status()["files"].as_u64().is_some_and(|n| n <= 1)
    });
    // The live mount renews its session: its file outlives several graces.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(c.status()["files"], 1);
    assert_eq!(kept.read_back(), "still here");
    wait_for("the closed file to be freed", Duration::from_secs(10), || c.status()["files"] == 0);
}

/// Makes the kernel forget unused dentries and inodes, so that the next stat is a LOOKUP.
fn forget_dentries() {
    std::fs::write("/proc/sys/vm/drop_caches", "2").expect("drop caches (the FUSE tests run as root)");
}

/// A run of lookups in one directory is answered from its listing (fuse/src/listing.rs): this
/// mount's own changes must show at once, another mount's once the attribute TTL ran out.
#[test]
fn lookups_answered_from_a_listing_never_hide_changes() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (c, m1) = start(); // attribute TTL 1 s
    let m2 = Mount::start(&c, &c.dir.path().join("mnt2"), &["--attr-ttl-s", "0"]);
    std::fs::create_dir(m1.path("scan")).unwrap();
    let names: Vec<String> = (0..40).map(|i| format!("f{i:02}")).collect();
    for n in &names {
        std::fs::write(m1.path(&format!("scan/{n}")), b"v1").unwrap();
    }
    let f = |n: &str| m1.path(&format!("scan/{n}"));
    // Stats every name that exists after the kernel forgot them: more than a run of lookups.
    let scan = || {
        forget_dentries();
        for n in &names {
            let _ = std::fs::metadata(f(n));
        }
        forget_dentries();
    };
    scan();
    std::fs::remove_file(f("f01")).unwrap();
    forget_dentries();
    assert_eq!(std::fs::metadata(f("f01")).unwrap_err().kind(), std::io::ErrorKind::NotFound, "unlinked here");
    scan();
    std::fs::set_permissions(f("f02"), std::fs::Permissions::from_mode(0o600)).unwrap();
    forget_dentries();
    assert_eq!(std::fs::metadata(f("f02")).unwrap().mode() & 0o777, 0o600, "chmod here");
    scan();
    std::fs::write(f("f03"), b"a longer second version").unwrap();
    forget_dentries();
    assert_eq!(std::fs::metadata(f("f03")).unwrap().len(), 23, "rewritten here");
    scan();
    std::fs::rename(f("f04"), f("g04")).unwrap();
    forget_dentries();
    assert!(std::fs::metadata(f("f04")).is_err() && std::fs::metadata(f("g04")).is_ok(), "renamed here");
    scan();
    std::fs::hard_link(f("f05"), m1.path("l05")).unwrap();
    forget_dentries();
    assert_eq!(std::fs::metadata(f("f05")).unwrap().nlink(), 2, "linked here");
    scan();
    std::fs::remove_file(m1.path("l05")).unwrap();
    forget_dentries();
    assert_eq!(std::fs::metadata(f("f05")).unwrap().nlink(), 1, "a link removed elsewhere in the tree");
    // Another mount's change shows once the TTL ran out.
    scan();
    std::fs::remove_file(m2.path("scan/f06")).unwrap();
    wait_for("the first mount to see another mount's unlink", Duration::from_secs(10), || {
        forget_dentries();
        std::fs::metadata(f("f06")).is_err()
    });
}

#[test]
fn posix_conformance_suite_and_fsx_pass_like_local_disk() {
    let (_c, m) = start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/conformance/run.sh");
    let out = Command::new("bash").arg(script).arg(&m.dir).output().expect("run conformance");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "conformance:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("fsx=OK"), "{stdout}");
}

#[test]
fn cairn_dev_mounts_and_unmounts_with_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (data, mnt) = (dir.path().join("dev"), dir.path().join("mnt"));
    let log = dir.path().join("dev.log");
    let child = Command::new(BIN)
        .args(["dev", "--dir", data.to_str().unwrap(), "--chunkservers", "3", "--mount", mnt.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Killed (and the mount detached) by PID even when an assertion fails.
    let mut dev = Mount { child: Some(child), dir: mnt.clone() };
    wait_for("cairn dev to mount", Duration::from_secs(90), || {
        assert!(
            dev.child.as_mut().unwrap().try_wait().unwrap().is_none(),
            "cairn dev exited: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        data.join("env").exists() && mounted(&mnt)
    });
    std::fs::write(mnt.join("hello"), b"through the dev mount").unwrap();
    assert_eq!(std::fs::read(mnt.join("hello")).unwrap(), b"through the dev mount");
    assert!(dev.stop(), "SIGTERM stops cairn dev and unmounts: {}", std::fs::read_to_string(&log).unwrap_or_default());
}
