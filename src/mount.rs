//! `cairn mount MOUNTPOINT`: the FUSE mount, in the foreground until SIGINT or SIGTERM (or
//! `--daemon`: in the background once the mount is up).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cairn_client::cli::ClusterArgs;

#[derive(clap::Args, Debug)]
pub struct MountArgs {
    /// An empty directory to mount the cluster's namespace on.
    pub mountpoint: PathBuf,
    /// Return once the mount is up; it keeps running in the background (stop it with `umount`).
    #[arg(long)]
    pub daemon: bool,
    /// Replicas of each chunk of files created through the mount.
    #[arg(long, default_value_t = 3)]
    pub replication: u32,
    /// Memory for cached chunks, MiB.
    #[arg(long, default_value_t = 256)]
    pub cache_mib: usize,
    /// Memory for written data on its way to the chunkservers, MiB (over all open files).
    #[arg(long, default_value_t = 512)]
    pub write_mib: usize,
    /// Seconds the kernel may cache attributes and names.
    #[arg(long, default_value_t = 1.0)]
    pub attr_ttl_s: f64,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Whether `dir` is a mount point, from /proc/self/mountinfo (field 5 is the mount point, with
/// spaces and other specials escaped as octal).
pub fn is_mounted(dir: &Path) -> bool {
    let Ok(canon) = dir.canonicalize() else { return false };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = canon.to_string_lossy().replace(' ', "\\040");
    info.lines().any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// The checks a user gets a clear message for, before the kernel gets involved.
pub fn check_mountpoint(dir: &Path) -> Result<()> {
    let meta = std::fs::metadata(dir).with_context(|| format!("mount point {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("mount point {} is not a directory", dir.display());
    }
    if is_mounted(dir) {
        bail!("mount point {} is busy: something is mounted there already (umount it first)", dir.display());
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: load the fuse kernel module (modprobe fuse) or give the container the device");
    }
    Ok(())
}

pub async fn run(a: &MountArgs) -> Result<()> {
    check_mountpoint(&a.mountpoint)?;
    anyhow::ensure!((1..=16).contains(&a.replication), "--replication {} (1 to 16)", a.replication);
    if a.daemon {
        return daemonize(a).await;
    }
    let client = a.cluster.connect().await?;
    client.getattr(1).await.context("reach the cluster")?;
    let opts = cairn_fuse::MountOptions {
        replication: a.replication,
        attr_ttl: Duration::from_secs_f64(a.attr_ttl_s.max(0.0)),
        cache_bytes: a.cache_mib << 20,
        write_bytes: a.write_mib << 20,
        ..Default::default()
    };
    let fs = cairn_fuse::CairnFs::new(client, tokio::runtime::Handle::current(), opts);
    let session = cairn_fuse::mount_fs(fs.clone(), &a.mountpoint)
        .with_context(|| format!("mount on {}", a.mountpoint.display()))?;
    println!("mounted on {}", a.mountpoint.display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = wait_unmounted(&a.mountpoint) => {
            // Unmounted from outside (umount): the session ends on its own; commits of files
            // closed just before may still be on their way.
            let joined = tokio::task::spawn_blocking(move || session.join()).await?;
            if let Err(e) = fs.sync_all().await {
                eprintln!("cairn: some written data could not be committed: {e:?}");
            }
            return joined.map_err(|e| anyhow::anyhow!("FUSE session: {e}"));
        }
    }
    if let Err(e) = fs.sync_all().await {
        eprintln!("cairn: some written data could not be committed before unmounting: {e:?}");
    }
    let dir = &a.mountpoint;
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: a valid NUL-terminated path; umount2 does not keep it.
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        let busy = std::io::Error::last_os_error();
        if busy.raw_os_error() != Some(libc::EBUSY) {
            anyhow::bail!("unmount {}: {busy}", dir.display());
        }
        // A process still has a file open there: detach the mount from the tree and keep
        // serving those files until they are closed, so that their last writes are committed.
        // SAFETY: as above.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            anyhow::bail!("unmount {}: {}", dir.display(), std::io::Error::last_os_error());
        }
        eprintln!(
            "cairn: {} is busy: detached; serving the files still open there until they are closed \
             (signal again to stop at once)",
            dir.display()
        );
    }
    // The session ends when the kernel lets go of the mount (at once unless detached while busy).
    let mut joined = tokio::task::spawn_blocking(move || session.join());
    tokio::select! {
        r = &mut joined => {
            if let Err(e) = r? {
                eprintln!("cairn: FUSE session: {e}");
            }
        }
        _ = tokio::signal::ctrl_c() => eprintln!("cairn: stopping with files still open"),
        _ = term.recv() => eprintln!("cairn: stopping with files still open"),
    }
    if let Err(e) = fs.sync_all().await {
        eprintln!("cairn: some written data could not be committed: {e:?}");
    }
    Ok(())
}

async fn wait_unmounted(dir: &Path) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if !is_mounted(dir) {
            return;
        }
    }
}

/// Starts this command again in the foreground as a detached child and waits until its mount is
/// up (or it failed, with its error).
async fn daemonize(a: &MountArgs) -> Result<()> {
    let exe = std::env::current_exe().context("find the cairn binary")?;
    let args: Vec<String> = std::env::args().skip(1).filter(|x| x != "--daemon").collect();
    let err = tempfile::NamedTempFile::new().context("create a temporary file")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(err.reopen().context("open the temporary file")?);
    // SAFETY: setsid is async-signal-safe; it detaches the child from our terminal session.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("start the mount in the background")?;
    for _ in 0..600 {
        if is_mounted(&a.mountpoint) {
            println!("mounted on {} (pid {})", a.mountpoint.display(), child.id());
            return Ok(());
        }
        if child.try_wait()?.is_some() {
            let msg = std::fs::read_to_string(err.path()).unwrap_or_default();
            bail!("{}", msg.trim().trim_start_matches("cairn: "));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    bail!("the mount did not come up within 60 s")
}
