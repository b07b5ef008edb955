//! The S3 gateway on a real cluster, driven by real S3 clients: boto3 (every operation, multipart,
//! listings of thousands of keys, signatures, presigned URLs, clock skew; tests/s3/boto3_test.py)
//! and the AWS CLI (cp, ls, sync), with objects shared both ways with the client library, and
//! access keys managed with `cairn admin key`.
//!
//! Needs python3 with boto3 and the `aws` command (.ci/run installs python3-boto3 and awscli).
//! Without them the test fails and says so.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{random_bytes, spawn, wait_for, Cluster, Options, Proc, MIB};

/// A python3 that can import boto3: the one on PATH, or Debian's.
fn python() -> &'static str {
    for p in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(p).args(["-c", "import boto3"]).output().is_ok_and(|o| o.status.success());
        if ok {
            return p;
        }
    }
    panic!("no python3 with boto3 found: install python3-boto3 (.ci/run does)");
}

struct Key {
    id: String,
    secret: String,
}

fn create_key(c: &Cluster) -> Key {
    let out = c.cli(&["admin", "key", "create", "--description", "s3 test", "--json"]);
    assert!(out.status.success(), "key create: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("key create --json");
    Key {
        id: v["access_key_id"].as_str().unwrap().to_string(),
        secret: v["secret_access_key"].as_str().unwrap().to_string(),
    }
}

fn gateway(c: &Cluster, name: &str, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec![
        "s3".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--masters".into(),
        c.master.addr.clone(),
        "--tls".into(),
        c.client_tls.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    spawn(&args, &c.dir.path().join(format!("{name}.log")))
}

/// `aws --endpoint-url EP ARGS` with `key`, isolated from any AWS configuration on the machine.
fn aws(ep: &str, key: &Key, dir: &Path, args: &[&str]) -> Output {
    aws_command(ep, key, dir, args).output().expect("run aws (install awscli; .ci/run does)")
}

/// The command [`aws`] runs, for a caller that sets more of its environment.
fn aws_command(ep: &str, key: &Key, dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("aws");
    cmd.arg("--endpoint-url")
        .arg(ep)
        .args(args)
        .env("AWS_ACCESS_KEY_ID", &key.id)
        .env("AWS_SECRET_ACCESS_KEY", &key.secret)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", dir.join("no-aws-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.join("no-aws-credentials"))
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_PROFILE");
    cmd
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn s3_clients_against_the_gateway() {
    let c = Cluster::start(Options::default());
    let key = create_key(&c);
    let listed = ok(&c.cli(&["admin", "key", "list"]), "key list");
    assert!(listed.contains(&key.id) && listed.contains("s3 test"), "{listed}");
    assert!(!listed.contains(&key.secret), "key list shows a secret");

    let gw = gateway(&c, "s3", &[]);
    let gc = gateway(&c, "s3-gc", &["--upload-expiry-s", "3"]);
    let ep = format!("http://{}", gw.addr);

    // An object written with the client library, read through S3 by boto3.
    ok(&c.cli(&["mkdir", "-p", "/shared/from-cli"]), "mkdir /shared/from-cli");
    let cli_content = "written with cairn put\n";
    c.put_data(cli_content.as_bytes(), "/shared/from-cli/note.txt");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/s3/boto3_test.py");
    let out = Command::new(python())
        .arg(&script)
        .env("S3_ENDPOINT", &ep)
        .env("S3_GC_ENDPOINT", format!("http://{}", gc.addr))
        .env("AWS_ACCESS_KEY_ID", &key.id)
        .env("AWS_SECRET_ACCESS_KEY", &key.secret)
        .env("AWS_CONFIG_FILE", c.dir.path().join("no-aws-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", c.dir.path().join("no-aws-credentials"))
        .env("CLI_BUCKET", "shared")
        .env("CLI_KEY", "from-cli/note.txt")
        .env("CLI_CONTENT", cli_content)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "boto3 checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // ... and an object written through S3, read with the client library.
    assert_eq!(c.get_data("/shared/from-s3/hello.txt"), b"written through S3\n");
    // The multipart object is a plain file of the namespace too.
    let stat = ok(&c.cli(&["stat", "/alpha/big/multipart.bin", "--json"]), "stat multipart object");
    let v: serde_json::Value = serde_json::from_str(&stat).unwrap();
    assert_eq!(v["size"].as_u64(), Some(100 * MIB as u64), "{stat}");

    // The AWS CLI: a multipart upload (above its 8 MiB threshold), a listing, a download, a sync.
    let dir = c.dir.path();
    let big = random_bytes(20 * MIB + 7, 7);
    std::fs::write(dir.join("big.bin"), &big).unwrap();
    ok(
        &aws(
            &ep,
            &key,
            dir,
            &["s3", "cp", "--only-show-errors", dir.join("big.bin").to_str().unwrap(), "s3://shared/aws/big.bin"],
        ),
        "aws s3 cp up",
    );
    let ls = ok(&aws(&ep, &key, dir, &["s3", "ls", "--recursive", "s3://shared/"]), "aws s3 ls");
    assert!(ls.contains(&format!("{} aws/big.bin", big.len())), "{ls}");
    assert!(ls.contains("from-cli/note.txt") && ls.contains("from-s3/hello.txt"), "{ls}");
    ok(
        &aws(
            &ep,
            &key,
            dir,
            &["s3", "cp", "--only-show-errors", "s3://shared/aws/big.bin", dir.join("back.bin").to_str().unwrap()],
        ),
        "aws s3 cp down",
    );
    assert!(std::fs::read(dir.join("back.bin")).unwrap() == big, "aws s3 cp round trip differs");
    assert!(c.get_data("/shared/aws/big.bin") == big, "the AWS CLI upload differs through the client library");
    // A copy inside S3 above the CLI's multipart threshold: UploadPartCopy of 8 MiB ranges.
    ok(
        &aws(
            &ep,
            &key,
            dir,
            &["s3", "cp", "--only-show-errors", "s3://shared/aws/big.bin", "s3://shared/aws/copy.bin"],
        ),
        "aws s3 cp s3 to s3",
    );
    assert!(c.get_data("/shared/aws/copy.bin") == big, "the multipart copy differs");
    let tree = dir.join("tree");
    for i in 0..12 {
        std::fs::create_dir_all(tree.join(format!("sub{}", i % 3))).unwrap();
        std::fs::write(tree.join(format!("sub{}/f{i}.txt", i % 3)), format!("file {i}\n")).unwrap();
    }
    let sync = |what| {
        ok(
            &aws(&ep, &key, dir, &["s3", "sync", "--only-show-errors", tree.to_str().unwrap(), "s3://shared/synced/"]),
            what,
        )
    };
    sync("aws s3 sync");
    assert_eq!(c.get_data("/shared/synced/sub1/f4.txt"), b"file 4\n");
    std::fs::write(tree.join("sub2/f5.txt"), "changed\n").unwrap();
    sync("aws s3 sync again");
    assert_eq!(c.get_data("/shared/synced/sub2/f5.txt"), b"changed\n");

    // A deleted key stops working (the gateway trusts its cache for 10 s at most).
    ok(&c.cli(&["admin", "key", "delete", &key.id]), "key delete");
    wait_for("the deleted key to be refused", Duration::from_secs(30), || {
        let out = aws(&ep, &key, dir, &["s3", "ls"]);
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("InvalidAccessKeyId")
    });
    let out = c.cli(&["admin", "key", "delete", &key.id]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err}");
    drop(gc);
    drop(gw);
}

/// `cairn cp -r` follows symbolic links as `aws s3 cp` does (a loop back up is skipped, with a
/// line on stderr, as is a link to nothing), and `cp -r . DST` copies the content of ".".
#[test]
fn cp_follows_links_and_copies_the_content_of_dot() {
    let c = Cluster::start(Options { chunkservers: 3, ..Default::default() });
    let tree = c.dir.path().join("linked");
    std::fs::create_dir_all(tree.join("a")).unwrap();
    std::fs::write(tree.join("a/x.txt"), "x\n").unwrap();
    std::os::unix::fs::symlink("a", tree.join("alink")).unwrap();
    std::os::unix::fs::symlink("a/x.txt", tree.join("flink")).unwrap();
    std::os::unix::fs::symlink("..", tree.join("a/up")).unwrap();
    std::os::unix::fs::symlink("nowhere", tree.join("dangling")).unwrap();
    ok(&c.cli(&["mkdir", "/d"]), "mkdir");
    let out =
        Command::new(common::BIN).args(["cp", "-r", ".", "s3://d/"]).current_dir(&tree).envs(c.env()).output().unwrap();
    let stdout = ok(&out, "cp -r .");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("upload: ")).count(), 3, "{stdout}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a link back to a directory above it") && err.contains("a link to nothing"), "{err}");
    let ls = ok(&c.cli(&["ls", "-r", "/d"]), "ls -r");
    let mut names: Vec<&str> = ls.lines().filter_map(|l| l.rsplit(' ').next()).collect();
    names.sort();
    assert_eq!(names, ["/d/a/x.txt", "/d/alink/x.txt", "/d/flink"], "{ls}");
    assert_eq!(c.get_data("/d/flink"), b"x\n");
    // Listed as s3:// objects, by key.
    let ls = ok(&c.cli(&["ls", "-r", "s3://d/"]), "ls -r s3://");
    assert!(ls.lines().any(|l| l.ends_with(" alink/x.txt")), "{ls}");
}

/// `cairn cp`, `cairn sync` and `cairn ls` as AWS CLI users know them, through the client library.
#[test]
fn cp_sync_and_ls_like_the_aws_cli() {
    let c = Cluster::start(Options::default());
    let dir = c.dir.path();
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::write(tree.join("a/b/1.txt"), "one\n").unwrap();
    std::fs::write(tree.join("2.txt"), "two\n").unwrap();
    let big = random_bytes(9 * MIB, 3);
    std::fs::write(tree.join("big.bin"), &big).unwrap();
    let t = tree.to_str().unwrap();
    ok(&c.cli(&["mkdir", "/data"]), "mkdir");

    let out = ok(&c.cli(&["cp", "-r", t, "s3://data/"]), "cp -r up");
    assert_eq!(out.lines().filter(|l| l.starts_with("upload: ")).count(), 3, "{out}");
    let ls = ok(&c.cli(&["ls", "-r", "/data"]), "ls -r");
    assert_eq!(ls.lines().count(), 3, "{ls}");
    assert!(ls.contains(" /data/tree/a/b/1.txt") && ls.contains(&format!("{} /data/tree/big.bin", 9 * MIB)), "{ls}");
    let ls = ok(&c.cli(&["ls", "-H", "--summarize", "s3://data/tree"]), "ls -H --summarize");
    assert!(ls.contains("PRE a/") && ls.contains("9.0 MiB big.bin") && ls.contains("4 Bytes 2.txt"), "{ls}");
    assert!(ls.contains("Total Objects: 2") && ls.contains("Total Size: 9.0 MiB"), "{ls}");

    // Nothing changed: nothing copied. Then a same-size change (found by hash) and a new file.
    assert_eq!(ok(&c.cli(&["sync", t, "s3://data/tree"]), "sync unchanged"), "");
    std::fs::write(tree.join("2.txt"), "TWO\n").unwrap();
    std::fs::write(tree.join("a/new.txt"), "new\n").unwrap();
    let dry = ok(&c.cli(&["sync", "--dryrun", t, "s3://data/tree"]), "sync --dryrun");
    assert_eq!(dry.lines().count(), 2, "{dry}");
    assert_eq!(c.get_data("/data/tree/2.txt"), b"two\n", "a dry run copies nothing");
    let out = ok(&c.cli(&["sync", t, "cairn:/data/tree"]), "sync");
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].ends_with("2.txt to cairn:/data/tree/2.txt") && lines[1].contains("a/new.txt"), "{out}");
    assert_eq!(c.get_data("/data/tree/2.txt"), b"TWO\n");

    // Down, and inside the cluster (metadata-only).
    let back = dir.join("back");
    ok(&c.cli(&["cp", "-r", "s3://data/tree", back.to_str().unwrap()]), "cp -r down");
    for f in ["a/b/1.txt", "a/new.txt", "2.txt", "big.bin"] {
        assert_eq!(std::fs::read(back.join(f)).unwrap(), std::fs::read(tree.join(f)).unwrap(), "{f}");
    }
    assert_eq!(ok(&c.cli(&["sync", "s3://data/tree", back.to_str().unwrap()]), "sync down unchanged"), "");
    ok(&c.cli(&["cp", "s3://data/tree/big.bin", "cairn:/data/copy.bin"]), "cp inside the cluster");
    assert!(c.get_data("/data/copy.bin") == big);

    for (args, why) in [
        (vec!["cp", t, dir.join("x").to_str().unwrap()], "neither side is in the cluster"),
        (vec!["cp", "s3://data/tree", dir.join("x").to_str().unwrap()], "is a directory (use -r)"),
        (vec!["cp", "s3://data/nope", dir.join("x").to_str().unwrap()], "does not exist"),
    ] {
        let out = c.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.lines().count() == 1 && err.contains(why), "{args:?}: {err}");
    }
}

/// A GET whose chunks no chunkserver can serve any more is an S3 error (503), never an answer
/// whose body is cut short after a 200, which a client might take for the object.
#[test]
fn a_get_whose_chunks_are_unreachable_is_an_error() {
    let mut c = Cluster::start(Options::default());
    let key = create_key(&c);
    let gw = gateway(&c, "s3", &[]);
    let ep = format!("http://{}", gw.addr);
    ok(&c.cli(&["mkdir", "-p", "/lost"]), "mkdir /lost");
    // One object read whole before the answer, one streamed (more than 1 MiB).
    c.put_data(&random_bytes(64 << 10, 5), "/lost/obj");
    c.put_data(&random_bytes(6 << 20, 6), "/lost/big");
    for cs in &mut c.chunkservers {
        cs.kill();
    }
    for name in ["obj", "big"] {
        let dest = c.dir.path().join(format!("{name}.out"));
        let dest = dest.to_str().unwrap();
        let out =
            aws_command(&ep, &key, c.dir.path(), &["s3api", "get-object", "--bucket", "lost", "--key", name, dest])
                // One attempt: the answer to that attempt is what is checked.
                .env("AWS_MAX_ATTEMPTS", "1")
                .env("AWS_RETRY_MODE", "standard")
                .output()
                .expect("run aws (install awscli; .ci/run does)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "the GET of {name} succeeded without a chunkserver");
        assert!(stderr.contains("ServiceUnavailable"), "{name}: not a 503: {stderr}");
    }
}
