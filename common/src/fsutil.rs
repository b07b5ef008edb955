//! Crash-safe writes of small state files (node id, certificates, keys), the open-file limit,
//! and reads that never wait for the disk.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `bytes` to `path` so that after a crash the file holds either its old content or all of
/// the new: write a temp file beside it, fsync it, rename it over `path`, fsync the directory.
/// `mode` is the permission of the new file (0o600 for keys).
pub fn durable_write(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| std::io::Error::other("path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// fsyncs a directory, which makes the creations, renames and deletions inside it durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Raises this process's soft limit on open files to its hard limit (a chunkserver keeps files
/// of recently read chunks open; many systems start services with a soft limit of 1024). Returns
/// the limit now in force.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    let mut lim = nofile()?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit only reads the struct passed to it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// This process's soft limit on open files (1024 if it cannot be read).
pub fn open_file_limit() -> u64 {
    nofile().map_or(1024, |lim| lim.rlim_cur)
}

/// Fills `buf` from `file` at `offset` if the page cache holds that whole range (`preadv2` with
/// `RWF_NOWAIT`), so that an async thread never waits for the disk. `Ok(false)` when some of it
/// would have to come from the disk or the file ends first (then `buf` holds part of the range
/// or nothing): read it the usual way. On a kernel or file system that cannot tell (no
/// `RWF_NOWAIT`), it reads the usual way itself, as before there was a choice.
pub fn read_cached_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    static UNSUPPORTED: AtomicBool = AtomicBool::new(false);
    let plain = |buf: &mut [u8]| match file.read_exact_at(buf, offset) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    };
    if UNSUPPORTED.load(Ordering::Relaxed) {
        return plain(buf);
    }
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let iov = libc::iovec { iov_base: rest.as_mut_ptr().cast(), iov_len: rest.len() };
        let at = libc::off_t::try_from(offset + done as u64).map_err(std::io::Error::other)?;
        // SAFETY: the one iovec points into `rest`, which outlives the call; the kernel writes at
        // most `iov_len` bytes there.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
        match n {
            0 => return Ok(false),
            n if n > 0 => done += n as usize,
            _ => {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(false),
                    Some(libc::EINTR) => {}
                    Some(libc::EOPNOTSUPP | libc::ENOSYS) => {
                        UNSUPPORTED.store(true, Ordering::Relaxed);
                        return plain(buf);
                    }
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(true)
}

fn nofile() -> std::io::Result<libc::rlimit> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct passed to it.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(lim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_sets_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key.pem");
        durable_write(&p, b"one", 0o600).unwrap();
        durable_write(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left behind");
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        let now = raise_open_file_limit().unwrap();
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!((lim.rlim_cur, lim.rlim_max), (now, now));
        assert_eq!(open_file_limit(), now);
    }

    #[test]
    fn a_cached_read_is_served_from_the_page_cache_only() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
        fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        f.sync_all().unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(read_cached_at(&f, &mut buf, 8192).unwrap(), "just written: in the page cache");
        assert_eq!(buf, data[8192..12288]);
        assert!(!read_cached_at(&f, &mut buf, 65536 - 100).unwrap(), "the file ends first");
        // Clean pages dropped from the cache: not served, and not waited for. (tmpfs keeps its
        // pages: they are its storage.)
        // SAFETY: fstatfs writes into the struct; fadvise only takes the descriptor.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) }, 0);
        assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
        if st.f_type != libc::TMPFS_MAGIC {
            assert!(!read_cached_at(&f, &mut buf, 0).unwrap(), "dropped from the cache");
        }
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(read_cached_at(&f, &mut buf, 0).unwrap(), "read back in");
        assert_eq!(buf, data[..4096]);
    }
}
