//! The `cairn` binary as a user drives it: `cairn dev`, put/get/ls/mv/rm/status, stdin and
//! stdout, directory trees, and every kind of bad input answered with one line and exit code 1.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn ok(out: &std::process::Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn dev_cluster_user_tour_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("dev");
    let start_dev = || {
        let mut p = Proc {
            child: Some(
                Command::new(BIN)
                    .args(["dev", "--dir", data_dir.to_str().unwrap(), "--chunkservers", "4"])
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(dir.path().join("dev.log")).unwrap())
                    .spawn()
                    .unwrap(),
            ),
            addr: String::new(),
            data: data_dir.clone(),
            args: vec![],
        };
        wait_for("cairn dev to write DIR/env", Duration::from_secs(60), || {
            assert!(
                p.alive(),
                "cairn dev exited: {}",
                std::fs::read_to_string(dir.path().join("dev.log")).unwrap_or_default()
            );
            data_dir.join("env").exists()
        });
        let env: Vec<(String, String)> = std::fs::read_to_string(data_dir.join("env"))
            .unwrap()
            .lines()
            .filter_map(|l| {
                l.trim_start_matches("export ").split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        assert!(env.iter().any(|(k, _)| k == "CAIRN_MASTERS"), "env names the masters: {env:?}");
        (p, env)
    };
    let (mut dev, env) = start_dev();
    let run = |args: &[&str]| cli_env(args, &env, None);

    let local = dir.path().join("in.bin");
    let data = random_bytes(9 * MIB + 17, 1);
    std::fs::write(&local, &data).unwrap();
    ok(&run(&["mkdir", "-p", "/docs/x"]), "mkdir -p");
    ok(&run(&["put", local.to_str().unwrap(), "/docs/"]), "put into a directory");
    let listing = ok(&run(&["ls", "/docs"]), "ls");
    assert!(listing.contains("in.bin") && listing.contains("x/"), "{listing}");
    let back = dir.path().join("back.bin");
    ok(&run(&["get", "/docs/in.bin", back.to_str().unwrap()]), "get");
    assert_eq!(std::fs::read(&back).unwrap(), data);
    // A named pipe (or a device: /dev/null) is written into, not replaced by a file.
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    ok(&run(&["get", "/docs/in.bin", fifo.to_str().unwrap()]), "get into a FIFO");
    // (Checked before the reader is joined: a FIFO replaced by a file would leave it waiting.)
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&std::fs::metadata(&fifo).unwrap().file_type()));
    assert_eq!(reader.join().unwrap(), data);
    // Through a symbolic link (relative, to a file not there yet): the link stays and its
    // target gets the content, as with cp.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink("sub/target.bin", &link).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    ok(&run(&["get", "/docs/in.bin", link.to_str().unwrap()]), "get through a symlink");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link was replaced");
    assert_eq!(std::fs::read(dir.path().join("sub/target.bin")).unwrap(), data);
    // stdin and stdout
    let out = cli_env(&["put", "-", "/docs/stdin.txt"], &env, Some(b"from stdin\n"));
    ok(&out, "put -");
    assert_eq!(ok(&run(&["get", "/docs/stdin.txt", "-"]), "get -"), "from stdin\n");
    ok(&run(&["mv", "/docs/stdin.txt", "/docs/x"]), "mv into a directory");
    assert_eq!(ok(&run(&["get", "/docs/x/stdin.txt", "-"]), "get moved"), "from stdin\n");
    let st = ok(&run(&["stat", "--json", "/docs/in.bin"]), "stat");
    let st: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["size"], data.len() as u64);
    assert_eq!(st["chunks"], 3);
    // A tree with put -r, listed recursively.
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::write(tree.join("a/b/one"), b"1").unwrap();
    std::fs::write(tree.join("two"), random_bytes(5 * MIB, 2)).unwrap();
    ok(&run(&["put", "-r", tree.to_str().unwrap(), "/t"]), "put -r");
    let rec = ok(&run(&["ls", "-r", "/t"]), "ls -r");
    assert!(rec.contains("/t/a/b/one") && rec.contains("/t/two"), "{rec}");
    let status: serde_json::Value = serde_json::from_str(&ok(&run(&["status", "--json"]), "status")).unwrap();
    assert_eq!(status["chunkservers"].as_array().unwrap().len(), 4);
    let masters = status["masters"].as_array().unwrap();
    assert_eq!(masters.len(), 3, "cairn dev starts a group of 3 masters");
    assert_eq!(masters.iter().filter(|m| m["role"] == "leader").count(), 1, "{status}");
    assert_eq!(status["files"], 4);
    let human = ok(&run(&["status"]), "status");
    assert!(human.contains("CHUNKSERVERS") && human.contains("alive"), "{human}");
    ok(&run(&["rm", "-r", "/t"]), "rm -r");
    expect_error(&run(&["stat", "/t"]), "stat after rm -r");

    // kill -9 a chunkserver: `cairn dev` says so, and the data still reads.
    let children =
        String::from_utf8(Command::new("pgrep").args(["-P", &dev.pid().to_string()]).output().unwrap().stdout).unwrap();
    let cs = children
        .split_whitespace()
        .find(|pid| std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default().contains("chunkserver"))
        .expect("a chunkserver child of cairn dev")
        .to_string();
    Command::new("kill").args(["-9", &cs]).status().unwrap();
    std::fs::remove_file(&back).unwrap();
    ok(&run(&["get", "/docs/in.bin", back.to_str().unwrap()]), "get after kill -9");
    assert_eq!(std::fs::read(&back).unwrap(), data);
    wait_for("cairn dev to report the dead child", Duration::from_secs(10), || {
        std::fs::read_to_string(dir.path().join("dev.log")).unwrap_or_default().contains("exited")
    });

    // SIGTERM stops every child; a second start on the same DIR has all the data.
    Command::new("kill").args(["-TERM", &dev.pid().to_string()]).status().unwrap();
    let t = Instant::now();
    while dev.alive() {
        assert!(t.elapsed() < Duration::from_secs(30), "cairn dev did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in children.split_whitespace() {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z"),
            "child {pid} still running"
        );
    }
    let (_dev2, env) = start_dev();
    let back2 = dir.path().join("back2.bin");
    ok(&cli_env(&["get", "/docs/in.bin", back2.to_str().unwrap()], &env, None), "get after restart");
    assert_eq!(std::fs::read(&back2).unwrap(), data);
}

#[test]
fn bad_input_gets_one_line_and_exit_1() {
    let c = Cluster::start(Options::default());
    let local = c.dir.path().join("small");
    std::fs::write(&local, b"hello").unwrap();
    let l = local.to_str().unwrap();
    assert!(c.cli(&["mkdir", "/dir"]).status.success());
    assert!(c.cli(&["put", l, "/dir/file"]).status.success());
    assert!(c.cli(&["mkdir", "-p", "/full/sub"]).status.success());
    assert!(c.cli(&["put", l, "/full/sub/x"]).status.success());

    let e = expect_error(&c.cli(&["put", l, "/nope/file"]), "put into a missing parent");
    assert!(e.contains("no such file or directory"), "{e}");
    let e = expect_error(&c.cli(&["put", l, "/dir/file/x"]), "put under a file");
    assert!(e.contains("not a directory"), "{e}");
    for cmd in [&["get", "/missing", "-"][..], &["stat", "/missing"], &["rm", "/missing"], &["ls", "/missing"]] {
        let e = expect_error(&c.cli(cmd), &format!("{cmd:?}"));
        assert!(e.contains("no such file or directory"), "{e}");
    }
    let e = expect_error(&c.cli(&["rm", "/full"]), "rm of a non-empty directory");
    assert!(e.contains("not empty"), "{e}");
    let e = expect_error(&c.cli(&["mv", "/full", "/full/sub/inside"]), "mv into its own subtree");
    assert!(e.contains("subtree"), "{e}");
    let long = format!("/{}", "n".repeat(256));
    for bad in ["/a//b", "/.", "/dir/..", "relative", long.as_str()] {
        let e = expect_error(&c.cli(&["mkdir", bad]), &format!("mkdir {bad:?}"));
        assert!(e.contains("invalid path"), "{e}");
    }
    let e =
        expect_error(&c.cli(&["put", l, "/dir/r5", "--replication", "5"]), "replication above the live chunkservers");
    assert!(e.contains("not enough chunkservers"), "{e}");
    let e = expect_error(&c.cli(&["get", "/dir", "-"]), "get of a directory");
    assert!(e.contains("is a directory"), "{e}");
    // Membership: bad input is refused before or by the leader, in one line.
    let e = expect_error(&c.cli(&["admin", "masters", "add", "nonsense"]), "add without ID=ADDR");
    assert!(e.contains("ID=ADDR"), "{e}");
    let e = expect_error(&c.cli(&["admin", "masters", "add", "2=not-an-address"]), "add with a bad address");
    assert!(e.contains("IP:PORT"), "{e}");
    let e = expect_error(&c.cli(&["admin", "masters", "remove", "9"]), "remove a stranger");
    assert!(e.contains("not a member"), "{e}");
    let e = expect_error(&c.cli(&["admin", "masters", "remove", "1"]), "remove the only master");
    assert!(e.contains("leads") || e.contains("last master"), "{e}");
    let e = expect_error(&c.cli(&["admin", "masters", "transfer"]), "transfer with nobody to take over");
    assert!(e.contains("no other master"), "{e}");
    // Repair limits: changed one at a time, shown by status, nonsense refused.
    let out = c.cli(&["admin", "repair", "--rate", "50M", "--copies", "4", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((r["rate_limit_bytes"].as_u64(), r["copies"].as_u64()), (Some(50 << 20), Some(4)), "{r}");
    assert!(c.cli(&["admin", "repair", "--copies", "6"]).status.success());
    let s = c.status();
    assert_eq!((s["repair"]["rate_limit_bytes"].as_u64(), s["repair"]["copies"].as_u64()), (Some(50 << 20), Some(6)));
    let e = expect_error(&c.cli(&["admin", "repair", "--copies", "0"]), "zero copies");
    assert!(e.contains("1 to 256"), "{e}");
    // The namespace is untouched by all of that.
    let ls = String::from_utf8(c.cli(&["ls", "-r", "/"]).stdout).unwrap();
    assert_eq!(ls.lines().count(), 2, "{ls}");
    assert!(ls.contains(" /dir/file") && ls.contains(" /full/sub/x"), "{ls}");

    // Unreachable masters: a clear error after a bounded wait, not a hang.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let env = vec![("CAIRN_MASTERS".to_string(), dead), ("CAIRN_TLS".to_string(), c.client_tls.display().to_string())];
    let t = Instant::now();
    let e = expect_error(&cli_env(&["ls", "/", "--timeout", "2"], &env, None), "unreachable masters");
    assert!(e.contains("unavailable"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(30), "took {:?}", t.elapsed());
    let e = expect_error(&cli_env(&["ls", "/"], &[], None), "no masters configured");
    assert!(e.contains("CAIRN_MASTERS"), "{e}");
}

#[test]
fn a_client_killed_mid_put_changes_nothing() {
    let c = Cluster::start(Options::default());
    let old = random_bytes(6 * MIB, 3);
    assert!(c.cli_stdin(&["put", "-", "/f"], &old).status.success());
    // Counted before the second put starts: it may store all its full chunks before the test
    // gets to look.
    let before = c.chunk_files();
    // A second put streams from a pipe that we feed partly, then the client is killed.
    let mut child = Command::new(BIN)
        .args(["put", "-", "/f"])
        .envs(c.env())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&random_bytes(30 * MIB, 4)).unwrap();
    // Wait until chunks of the new content reach the chunkservers, then kill -9 the client.
    wait_for("the half-upload to reach chunkservers", Duration::from_secs(30), || c.chunk_files() > before);
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);
    let out = c.cli(&["get", "/f", "-"]);
    assert!(out.status.success());
    assert_eq!(blake3::hash(&out.stdout), blake3::hash(&old), "the old content stays");
    let ls = String::from_utf8(c.cli(&["ls", "/"]).stdout).unwrap();
    assert_eq!(ls.lines().count(), 1, "only the old file: {ls}");
    assert_eq!(c.status()["files"], 1);
}
